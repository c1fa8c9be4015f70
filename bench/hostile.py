"""How long one hostile notify holds the daemon's event loop, per device kind (issue 13).

In process, with the test driver: one VM per device kind, its queue flooded the worst
way a guest can (every head an indirect descriptor for one table of ``entries``
descriptors: issue 13's 32768, and the queue size, the longest chain the device
accepts), then one QueueNotify. Every call into the device model is timed: the notify
(the trap) and each event-loop turn after it (the device resuming its queue); the
longest is how long every other VM waited at worst. The run ends when every chain is
back in the used ring (or after ``MAX_TURNS`` turns). Nothing is asserted.

    .venv/bin/python -m bench.hostile                 # table
    .venv/bin/python -m bench.hostile --json          # figures as JSON
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from avatar_hw.devices.block import HEADER, T_IN, BlockDevice
from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.devices.net import NetDevice
from avatar_hw.devices.rng import RngDevice
from avatar_hw.loop import EventLoop
from avatar_hw.testing.hostile import flood, forget_used
from avatar_hw.testing.virtio import VirtioBench

from .common import table

KINDS = ("console", "block", "rng", "net")
ENTRIES = (32768, None)            # None: the queue size
MAX_TURNS = 100000
RAM = 8 << 20


def _device(kind, tmp):
    """(device, index of the queue a hostile guest floods, queues to set up)."""
    if kind == "console":
        return ConsoleDevice("file:/dev/null"), 1, [0, 1]
    if kind == "block":
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        return BlockDevice(image), 0, [0]
    if kind == "rng":
        return RngDevice(), 0, [0]
    return NetDevice(f"switch:{tmp}/switch.sock"), 1, [0, 1]


def _segments(kind, bench, entries):
    data = bench.ram.alloc(4096)
    if kind == "block":
        bench.ram.write(data, HEADER.pack(T_IN, 0, 0))
        return [(data, 16, False)] + [(data + 512, 512, True)] * (entries - 2) + [
            (data + 1024, 1, True)]
    writable = kind == "rng"
    return [(data, 64, writable)] * entries


def measure(kind, entries):
    """Figures of one flood: the longest hold (notify or loop turn), the turns, chains."""
    with tempfile.TemporaryDirectory() as tmp:
        loop = EventLoop()
        device, index, indices = _device(kind, tmp)
        bench = VirtioBench(device, loop=loop, ram_size=RAM)
        try:
            q = bench.driver.init(indices, buf_size=0)[index]
            entries = entries or q.size
            segments = _segments(kind, bench, entries)
            tablegpa = bench.ram.alloc(16 * entries, 16)
            flood(q, tablegpa, segments)
            start = time.perf_counter()
            q.notify()
            holds = [time.perf_counter() - start]
            done, turns = forget_used(q), 0
            while done < q.size and turns < MAX_TURNS:
                start = time.perf_counter()
                loop.run_once(0)
                holds.append(time.perf_counter() - start)
                done += forget_used(q)
                turns += 1
            return {"kind": kind, "entries": entries, "queue_size": q.size,
                    "max_hold_ms": round(1000 * max(holds), 2),
                    "notify_ms": round(1000 * holds[0], 2), "turns": turns,
                    "total_ms": round(1000 * sum(holds), 1), "chains_done": done}
        finally:
            bench.subsystem.close()
            loop.close()


def run():
    logger = logging.getLogger("avatar_hw")
    level = logger.level
    logger.setLevel(logging.ERROR)                  # the guest errors are counted instead
    try:
        return {"floods": [measure(kind, entries) for kind in KINDS for entries in ENTRIES]}
    finally:
        logger.setLevel(level)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = run()
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    table("the longest event-loop hold of one hostile notify, per device kind",
          ["device", "table entries", "queue", "longest hold ms", "notify ms", "turns",
                 "total ms", "chains back"],
                [[r["kind"], r["entries"], r["queue_size"], r["max_hold_ms"], r["notify_ms"],
                  r["turns"], r["total_ms"], r["chains_done"]] for r in result["floods"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
