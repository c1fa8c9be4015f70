"""Soak: a hostile guest scribbling for a long time at every device kind, in process.

The fuzzers' moves (``avatar_hw.testing.hostile``: random descriptors, indirect
tables, available rings, used events and flags, random register accesses between
notifies; in half the rounds random request contents in the descriptors' buffers; and
now and then a flood of the longest chains) drawn with ``random``
instead of hypothesis, round after round, against one VM per device kind (console
with a named port, block, rng, net on a switch, balloon, 9p, vsock, gpu) sharing one
event loop. A *step* is
one register access the guest makes (one trap). Every round checks what the fuzz
tests check: every access answered, nothing outside the VM's RAM written, no
device error escaping into a catch-all, no queue with more chains in flight than its
size.

    .venv/bin/python -m bench.soak --steps 1000000          # the figures in docs/
    .venv/bin/python -m bench.soak --steps 2000 --seed 7     # a quick run

Prints steps, wall time, peak RSS of the process, the longest single trap and event-
loop turn, and the failures (with the seed and round to replay them).
"""

import argparse
import json
import logging
import random
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

from avatar_hw.devices.balloon import BalloonDevice
from avatar_hw.devices.block import BlockDevice
from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.devices.gpu import GpuDevice
from avatar_hw.devices.net import NetDevice
from avatar_hw.devices.p9 import P9Device
from avatar_hw.devices.rng import RngDevice
from avatar_hw.devices.vsock import VsockDevice
from avatar_hw.loop import EventLoop
from avatar_hw.testing.hostile import RandomGuest, flood, internal_errors, random_rings
from avatar_hw.testing.virtio import RAM_BASE, VirtioBench

RAM = 1 << 20
KINDS = ("console", "block", "rng", "net", "balloon", "9p", "vsock", "gpu")


class Timed:
    """One VM's accesses: how many, the longest in wall time and in this thread's CPU time
    (the work, without the time the process was preempted on a loaded host)."""

    def __init__(self):
        self.steps, self.longest, self.longest_cpu = 0, 0.0, 0.0


def timed_traps(subsystem, timers):
    """The shared ``subsystem``'s ``handle_mmio_trap``, counting and timing each access for
    its VM in ``timers`` (a list, one ``Timed`` per VM). One wrapper for every VM: a wrapper
    per VM around the previous one counted an access once per VM created after its own."""
    handle, base, vm_size = subsystem.handle_mmio_trap, subsystem.layout.base, \
        subsystem.layout.vm_size

    def timed(addr, value, is_write, size):
        timer = timers[min(max(addr - base, 0) // vm_size, len(timers) - 1)]
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            return handle(addr, value, is_write, size)
        finally:
            timer.longest = max(timer.longest, time.perf_counter() - start)
            timer.longest_cpu = max(timer.longest_cpu, time.thread_time() - start_cpu)
            timer.steps += 1
    return timed


def _device(kind, tmp):
    if kind == "console":
        return ConsoleDevice(ports={"p": None}, size=(80, 25)), [0, 1, 2, 3]
    if kind == "block":
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        return BlockDevice(image), [0]
    if kind == "rng":
        return RngDevice(), [0]
    if kind == "balloon":
        return BalloonDevice(), [0, 1, 2]
    if kind == "9p":
        (Path(tmp) / "share").mkdir()
        return P9Device(Path(tmp) / "share", tag="t"), [0]
    if kind == "vsock":
        return VsockDevice(3, f"{tmp}/v.sock"), [0, 1, 2]
    if kind == "gpu":
        return GpuDevice(), [0, 1]
    return NetDevice(f"switch:{tmp}/switch.sock", mac="52:54:00:00:00:01"), [0, 1]


def soak(steps, seed, log=None):
    """Run until ``steps`` traps were made; the figures as a dict."""
    # The guest's errors are counted, not printed; the level stays, so that the records of
    # internal errors still reach ``internal_errors``.
    logger, quiet = logging.getLogger("avatar_hw"), logging.NullHandler()
    propagate = logger.propagate
    logger.addHandler(quiet)
    logger.propagate = False
    try:
        return _soak(steps, seed, log)
    finally:
        logger.removeHandler(quiet)
        logger.propagate = propagate


def _soak(steps, seed, log):
    rng = random.Random(seed)
    guest = RandomGuest(rng)
    loop = EventLoop()
    failures, longest_turn, rounds = [], 0.0, 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="avatar-soak-") as tmp:
        benches = []
        for vm, kind in enumerate(KINDS):
            device, indices = _device(kind, tmp)
            subsystem = benches[0][1].subsystem if benches else None
            bench = VirtioBench(device, ram_size=RAM, loop=loop, subsystem=subsystem, vm_id=vm)
            benches.append((kind, bench, indices, Timed()))
        shared = benches[0][1].subsystem
        shared.handle_mmio_trap = timed_traps(shared, [b[3] for b in benches])
        for _, bench, _, _ in benches:
            bench.driver.mmio = shared.handle_mmio_trap
        total = 0
        try:
            with internal_errors() as escaped:
                while total < steps:
                    kind, bench, indices, timed = benches[rounds % len(benches)]
                    try:
                        bench.ram.reset_alloc()
                        if rng.random() < 0.05:
                            q = bench.driver.init(indices, buf_size=0, size=16)[0]
                            entries = rng.choice([q.size, q.size + 1, 32768])
                            table = bench.ram.alloc(16 * 32768, 16)
                            data = bench.ram.alloc(512)
                            flood(q, table, [(data, rng.randrange(64), rng.random() < 0.5)]
                                  * entries)
                            q.notify()
                        else:
                            rings = guest.rings(RAM_BASE, RAM)
                            if rng.random() < 0.5:
                                for gpa, data in guest.contents(RAM_BASE, RAM, rings["descs"]):
                                    bench.ram.write(gpa, data)
                            random_rings(bench, indices, **rings)
                        for _ in range(rng.randrange(3)):
                            turn = time.perf_counter()
                            loop.run_once(0)
                            longest_turn = max(longest_turn, time.perf_counter() - turn)
                        if escaped:
                            raise AssertionError(f"internal error: {escaped[-1].getMessage()}")
                    except Exception as err:
                        failures.append({"round": rounds, "kind": kind, "error": repr(err),
                                         "where": traceback.format_exc(limit=3)[-600:]})
                        escaped.clear()
                        if len(failures) >= 20:
                            break
                    rounds += 1
                    total = sum(b[3].steps for b in benches)
                    if log and rounds % 2000 == 0:
                        log(f"{total} steps, {rounds} rounds, {len(failures)} failures, "
                            f"{time.perf_counter() - start:.0f} s")
        finally:
            for _, bench, _, _ in benches[::-1]:
                bench.subsystem.close()
            loop.close()
    devices = {kind: bench.device.info() for kind, bench, _, _ in benches}
    return {"steps": total, "rounds": rounds, "seed": seed,
            "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "longest_trap_ms": round(1000 * max(b[3].longest for b in benches), 2),
            "longest_trap_ms_by_kind": {k: round(1000 * t.longest, 2) for k, _, _, t in benches},
            "longest_trap_cpu_ms_by_kind": {k: round(1000 * t.longest_cpu, 2)
                                            for k, _, _, t in benches},
            "longest_loop_turn_ms": round(1000 * longest_turn, 2),
            "failures": failures,
            "guest_errors": {k: d.get("guest_errors", 0) for k, d in devices.items()},
            "log_lines_suppressed": {k: d.get("log_lines_suppressed", 0)
                                     for k, d in devices.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100000,
                        help="register accesses (traps) the guest makes in all")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: a new one, printed)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    seed = random.randrange(1 << 32) if args.seed is None else args.seed
    result = soak(args.steps, seed, log=lambda text: print(text, file=sys.stderr, flush=True))
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        cpu_ms = max(result["longest_trap_cpu_ms_by_kind"].values())
        print(f"steps {result['steps']} ({result['rounds']} rounds, seed {seed}) in "
              f"{result['wall_s']} s; peak RSS {result['peak_rss_mib']} MiB; longest trap "
              f"{result['longest_trap_ms']} ms ({cpu_ms} ms of CPU), longest loop turn "
              f"{result['longest_loop_turn_ms']} ms; {len(result['failures'])} failures")
        for failure in result["failures"]:
            print(f"  round {failure['round']} ({failure['kind']}): {failure['error']}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
