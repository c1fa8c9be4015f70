"""How long one hostile notify holds the daemon's event loop, per device kind (issue 13).

In process, with the test driver: one VM per device kind, its queue flooded the worst
way a guest can (every head an indirect descriptor for one table of ``entries``
descriptors: issue 13's 32768, and the queue size, the longest chain the device
accepts), then one QueueNotify. Every call into the device model is timed: the notify
(the trap) and each event-loop turn after it (the device resuming its queue); the
longest is how long every other VM waited at worst. The run ends when every chain is
back in the used ring (or after ``MAX_TURNS`` turns). Nothing is asserted.

Then the costliest valid requests a device takes (``HEAVY``), a queue full of each: gpu
transfers of one pixel per row over 8192 rows, gpu transfers over a backing of 16384
one-byte pieces, block write zeroes where the file system has no ZERO_RANGE (tmpfs),
balloon inflates of scattered frames on a shared file mapping.

    .venv/bin/python -m bench.hostile                 # table
    .venv/bin/python -m bench.hostile --json          # figures as JSON
    .venv/bin/python -m bench.hostile --heavy         # the costly valid requests only
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import os
import struct

from avatar_hw.devices import gpu
from avatar_hw.devices.balloon import BalloonDevice
from avatar_hw.devices.block import HEADER, SEGMENT, T_IN, T_WRITE_ZEROES, BlockDevice
from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.devices.net import NetDevice
from avatar_hw.devices.p9 import P9Device
from avatar_hw.devices.rng import RngDevice
from avatar_hw.devices.vsock import VsockDevice
from avatar_hw.hw.region import Region
from avatar_hw.loop import EventLoop
from avatar_hw.testing.driver import GuestRam, VirtioDriver
from avatar_hw.testing.hostile import flood, forget_used
from avatar_hw.testing.virtio import RAM_BASE, IrqRecorder, VirtioBench
from avatar_hw.virtio.memory import GuestMemory
from avatar_hw.virtio.subsystem import Subsystem

from .common import table

KINDS = ("console", "block", "rng", "net", "balloon", "9p", "vsock", "gpu")
HEAVY = ("gpu rows", "gpu fragmented", "block zeros (tmpfs)",
         "balloon scattered (shared file)")
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
    if kind == "balloon":
        return BalloonDevice(), 0, [0, 1, 2]
    if kind == "9p":
        os.mkdir(f"{tmp}/share")
        return P9Device(f"{tmp}/share", tag="t"), 0, [0]
    if kind == "vsock":
        return VsockDevice(3, f"{tmp}/v.sock"), 1, [0, 1, 2]
    if kind == "gpu":
        return gpu.GpuDevice(), 0, [0, 1]
    return NetDevice(f"switch:{tmp}/switch.sock"), 1, [0, 1]


def _segments(kind, bench, entries):
    data = bench.ram.alloc(4096)
    if kind == "block":
        bench.ram.write(data, HEADER.pack(T_IN, 0, 0))
        return [(data, 16, False)] + [(data + 512, 512, True)] * (entries - 2) + [
            (data + 1024, 1, True)]
    writable = kind in ("rng", "9p", "gpu")
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


def _timed_turns(loop, q, count):
    """Notify, then loop turns until ``count`` chains are back: the longest hold, turns."""
    start = time.perf_counter()
    q.notify()
    holds = [time.perf_counter() - start]
    done, turns = forget_used(q), 0
    while done < count and turns < MAX_TURNS:
        start = time.perf_counter()
        loop.run_once(0)
        holds.append(time.perf_counter() - start)
        done += forget_used(q)
        turns += 1
    return {"max_hold_ms": round(1000 * max(holds), 2), "turns": turns,
            "total_ms": round(1000 * sum(holds), 1), "requests_done": done}


def _ring(descriptors):
    """The smallest queue size (a power of two) holding ``descriptors``."""
    return 1 << (descriptors - 1).bit_length()


def _gpu(loop, count, size, backing, rects):
    """A gpu whose resource 1 (``size``: width, height) is backed by ``backing`` ((offset,
    length) pieces of one allocation), ``count`` transfers queued, cycling through ``rects``
    (width, height)."""
    bench = VirtioBench(gpu.GpuDevice(), loop=loop, ram_size=RAM)
    ctrl, = bench.driver.init([0], buf_size=0, size=_ring(2 * count))
    ram = bench.ram
    at, answer = ram.alloc(64 + gpu.MEM_ENTRY.size * len(backing)), ram.alloc(64)

    def post(kind, fields):
        """One request, answered OK before the queue is filled (an attach of 16384 entries
        takes four turns)."""
        body = gpu.HEADER.pack(kind, 0, 0, 0, 0) + fields
        ram.write(at, body)
        ctrl.add_chain([(at, len(body), False), (answer, 24, True)])
        ctrl.notify()
        for _ in range(MAX_TURNS):
            if forget_used(ctrl):
                break
            loop.run_once(0)
        code, = struct.unpack_from("<I", ram.read(answer, 4))
        if code != gpu.RESP_OK_NODATA:
            raise RuntimeError(f"gpu command 0x{kind:x} answered 0x{code:x}")
    base = ram.alloc(max(offset + length for offset, length in backing), 4096)
    post(gpu.CMD_RESOURCE_CREATE_2D, struct.pack("<IIII", 1, 1, *size))
    post(gpu.CMD_RESOURCE_ATTACH_BACKING, struct.pack("<II", 1, len(backing)) + b"".join(
        gpu.MEM_ENTRY.pack(base + offset, length) for offset, length in backing))
    bodies = []
    for width, height in rects:
        body = gpu.HEADER.pack(gpu.CMD_TRANSFER_TO_HOST_2D, 0, 0, 0, 0) + struct.pack(
            "<IIIIQI4x", 0, 0, width, height, 0, 1)
        bodies.append((ram.alloc(len(body)), len(body)))
        ram.write(bodies[-1][0], body)
    for i in range(count):
        ctrl.add_chain([(*bodies[i % len(bodies)], False), (answer, 24, True)])
    return bench, ctrl


def _gpu_rows(tmp, loop, count):
    side = gpu.MAX_RESOURCE_DIMENSION
    return _gpu(loop, count, (2, side), [(0, 8 * side)], [(1, side)])


def _gpu_fragmented(tmp, loop, count):
    """64x64 pixels over 16384 one-byte entries, none touching: a transfer of 30 rows
    (7680 entries), then one of all 64, as a guest would to fill a turn to its brim."""
    return _gpu(loop, count, (64, 64), [(2 * i, 1) for i in range(16384)],
                [(64, 30), (64, 64)])


def _block_zeros(tmp, loop, count):
    directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp
    image = os.path.join(directory, f"avatar-bench-zeros-{os.getpid()}.img")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    try:
        bench = VirtioBench(BlockDevice(image), loop=loop, ram_size=RAM)
    finally:
        os.unlink(image)                  # the device keeps its fd
    q, = bench.driver.init([0], buf_size=0, size=_ring(2 * count))
    at = bench.ram.alloc(4096)
    body = HEADER.pack(T_WRITE_ZEROES, 0, 0) + SEGMENT.pack(0, 1 << 16, 0)   # 32 MiB
    bench.ram.write(at, body)
    for _ in range(count):
        q.add_chain([(at, len(body), False), (at + 1024, 1, True)])
    return bench, q


class _FileVm:
    """One VM whose RAM is a shared file mapping (QEMU's on the emulated board), the device
    in slot 0, the test driver: what VirtioBench is, without guard areas."""

    def __init__(self, device, loop, path):
        with open(path, "wb") as f:
            f.truncate(RAM)
        self.region = Region.map_file(path, RAM)
        os.unlink(path)
        self.subsystem = Subsystem(interrupt_line=IrqRecorder(), loop=loop)
        self.subsystem.vm_init(0, GuestMemory(self.region, RAM_BASE))
        transport = self.subsystem.create_device(0, device)
        self.ram = GuestRam(self.region.view(0, RAM), RAM_BASE)
        self.driver = VirtioDriver(self.subsystem.handle_mmio_trap, transport.window, self.ram)


def _balloon_scattered(tmp, loop, count):
    directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp
    vm = _FileVm(BalloonDevice(), loop, os.path.join(directory, f"avatar-bench-{os.getpid()}"))
    vm.region.view(0, RAM)[:] = b"\1" * RAM                # every page populated
    inflate, _, _ = vm.driver.init([0, 1, 2], buf_size=0, size=_ring(count))
    first = (RAM_BASE >> 12) + 256
    frames = struct.pack("<1024I", *(first + 2 * i for i in range(1024)))
    at = vm.ram.alloc(len(frames))
    vm.ram.write(at, frames)
    for _ in range(count):
        inflate.add_chain([(at, len(frames), False)])
    return vm, inflate


def measure_heavy(kind, count=16):
    """A queue of ``count`` of one device's costliest valid requests: the longest hold."""
    make = {"gpu rows": _gpu_rows, "gpu fragmented": _gpu_fragmented,
            "block zeros (tmpfs)": _block_zeros,
            "balloon scattered (shared file)": _balloon_scattered}[kind]
    with tempfile.TemporaryDirectory() as tmp:
        loop = EventLoop()
        bench, q = make(tmp, loop, count)
        try:
            return {"kind": kind, "requests": count, **_timed_turns(loop, q, count)}
        finally:
            bench.subsystem.close()
            loop.close()


def run(floods=True):
    logger = logging.getLogger("avatar_hw")
    level = logger.level
    logger.setLevel(logging.ERROR)                  # the guest errors are counted instead
    try:
        return {"floods": [measure(kind, entries) for kind in KINDS for entries in ENTRIES
                           if floods],
                "heavy": [measure_heavy(kind) for kind in HEAVY]}
    finally:
        logger.setLevel(level)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--heavy", action="store_true",
                        help="only the queues of costly valid requests (no floods)")
    args = parser.parse_args(argv)
    result = run(floods=not args.heavy)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    table("the longest event-loop hold of one hostile notify, per device kind",
          ["device", "table entries", "queue", "longest hold ms", "notify ms", "turns",
                 "total ms", "chains back"],
                [[r["kind"], r["entries"], r["queue_size"], r["max_hold_ms"], r["notify_ms"],
                  r["turns"], r["total_ms"], r["chains_done"]] for r in result["floods"]])
    table("the longest event-loop hold of a queue of costly valid requests",
          ["requests", "count", "longest hold ms", "turns", "total ms", "done"],
          [[r["kind"], r["requests"], r["max_hold_ms"], r["turns"], r["total_ms"],
            r["requests_done"]] for r in result["heavy"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
