"""How long one virtio-blk request holds the daemon's event loop.

    .venv/bin/python -m bench.block_stall [--dir DIR] [--runs N]

The block device does its I/O synchronously inside the QueueNotify trap, and
the daemon serves every trap, VM and device from one event loop: the time a
notify takes is the time every other guest's MMIO access, console byte and
network frame waits. This measures that time per request kind, on a real
image file in ``--dir`` (default: a temporary directory under bench/results;
choose one on the disk you care about: on tmpfs fdatasync costs nothing),
driven through the driver-side harness (one request per notify, so the figure
is one request; a notify serves up to a queue's worth, 256, of them).
"Cold" reads drop the image's pages from the host page cache first
(``posix_fadvise(DONTNEED)``). Prints median and max in milliseconds.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from avatar_hw.devices import block as blk
from avatar_hw.devices.block import BlockDevice
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio.constants import bit

from .common import BENCH

MIB = 1 << 20
IMAGE_BYTES = 2048 * MIB           # sparse; covers a 1 GiB discard
RAM_BYTES = 40 * MIB
MAX_REQUEST = blk.MAX_REQUEST_BYTES


class Disk:
    """A block device on ``image`` in a VM, with one request queue."""

    def __init__(self, image, *, drop=0):
        self.device = BlockDevice(image)
        self.bench = VirtioBench(self.device, ram_size=RAM_BYTES)
        self.queue, = self.bench.driver.init([0], drop=drop, buf_size=0, size=blk.QUEUE_SIZE)
        ram = self.bench.ram
        self.header, self.status = ram.alloc(16), ram.alloc(16)
        self.data = ram.alloc(MAX_REQUEST, 4096)
        self.segments = ram.alloc(16 * blk.MAX_DWZ_SEGMENTS)
        self.ram = ram
        ram.write(self.data, os.urandom(MAX_REQUEST))

    def request(self, kind, sector=0, length=0, segment=None):
        """One request; the seconds its notify took."""
        self.ram.write(self.header, blk.HEADER.pack(kind, 0, sector))
        chain = [(self.header, 16, False)]
        if segment is not None:
            self.ram.write(self.segments, blk.SEGMENT.pack(*segment))
            chain.append((self.segments, 16, False))
        chain += [(self.data + off, min(blk.SIZE_MAX, length - off), kind == blk.T_IN)
                  for off in range(0, length, blk.SIZE_MAX)]
        chain.append((self.status, 1, True))
        self.queue.add_chain(chain)
        start = time.perf_counter()
        self.queue.notify()
        took = time.perf_counter() - start
        [used] = self.queue.get_used(read_data=False)
        status = self.ram.read(self.status, 1)[0]
        if status != blk.S_OK:
            raise RuntimeError(f"request type {kind} answered status {status}")
        return took

    def drop_cache(self):
        os.posix_fadvise(self.device.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self):
        self.bench.subsystem.close()


def measure(directory, runs):
    """{case: [seconds per run]}."""
    results = {}
    image = Path(directory) / "stall.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    disk = Disk(image)
    try:
        def case(name, prepare, kind, **request):
            times = []
            for run in range(runs):
                prepare(run)
                times.append(disk.request(kind, **request))
            results[name] = times

        def nothing(run):
            pass

        def write_dirty(nbytes):
            def prepare(run):
                disk.request(blk.T_OUT, sector=(512 * MIB + run * nbytes) // 512, length=nbytes)
            return prepare

        # give the read cases data on disk
        for off in range(0, 64 * MIB, MAX_REQUEST):
            disk.request(blk.T_OUT, sector=off // 512, length=min(MAX_REQUEST, 64 * MIB - off))
        disk.request(blk.T_FLUSH)
        case("read 4 KiB, page cache", nothing, blk.T_IN, length=4096)
        case("read 4 KiB, cold", lambda run: disk.drop_cache(), blk.T_IN, length=4096)
        case("read 1 MiB, cold", lambda run: disk.drop_cache(), blk.T_IN, length=MIB)
        case(f"read {MAX_REQUEST // MIB} MiB (largest request), cold",
             lambda run: disk.drop_cache(), blk.T_IN, length=MAX_REQUEST)
        case("write 4 KiB", nothing, blk.T_OUT, sector=(256 * MIB) // 512, length=4096)
        case("write 1 MiB", nothing, blk.T_OUT, sector=(256 * MIB) // 512, length=MIB)
        case(f"write {MAX_REQUEST // MIB} MiB (largest request)", nothing, blk.T_OUT,
             sector=(256 * MIB) // 512, length=MAX_REQUEST)
        case("flush after 4 KiB written", write_dirty(4096), blk.T_FLUSH)
        case("flush after 1 MiB written", write_dirty(MIB), blk.T_FLUSH)
        case(f"flush after {MAX_REQUEST // MIB} MiB written", write_dirty(MAX_REQUEST),
             blk.T_FLUSH)
        case("discard 1 GiB (one segment)", nothing, blk.T_DISCARD,
             segment=(IMAGE_BYTES // 1024, blk.MAX_DISCARD_SECTORS, 0))
        case("write zeroes 32 MiB", nothing, blk.T_WRITE_ZEROES,
             segment=(0, blk.MAX_WRITE_ZEROES_SECTORS, 0))
    finally:
        disk.close()
    through = Disk(image, drop=bit(blk.F_FLUSH))
    try:
        results["write 4 KiB, write-through (no FLUSH negotiated)"] = [
            through.request(blk.T_OUT, sector=(256 * MIB) // 512, length=4096)
            for _ in range(runs)]
    finally:
        through.close()
        image.unlink()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.block_stall",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=BENCH / "results",
                        help="where the 2 GiB sparse image goes (default bench/results)")
    parser.add_argument("--runs", type=int, default=10, help="requests per case (default 10)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="block-stall-") as directory:
        results = measure(directory, args.runs)
    print(f"event loop held by one request ({args.runs} runs, image in {args.dir})")
    print(f"{'request':52} {'median ms':>10} {'max ms':>10}")
    for name, times in results.items():
        print(f"{name:52} {statistics.median(times) * 1e3:10.3f} {max(times) * 1e3:10.3f}")


if __name__ == "__main__":
    main()
