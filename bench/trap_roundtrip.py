"""Trap round trip through ``avatar-hw serve``: the stand-in stub posts register reads.

Starts the daemon as a subprocess on a FakeBoard (as the tests do), then
times N reads of a console's DeviceID register from this process, which plays
the stub: post, doorbell (or not, in busy-poll mode), wait for DONE. Prints
the median and 99th percentile per mode. Two Python processes on one host:
an upper bound for the daemon's share of a trap on a board.

    .venv/bin/python bench/trap_roundtrip.py [--count N]
"""

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from avatar_hw.layout import Layout
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
from avatar_hw.virtio import constants as vc


def measure(mode_args, count):
    with tempfile.TemporaryDirectory() as tmp:
        board = FakeBoard(Path(tmp) / "board", vms=1)
        stub = StandinStub(board)
        config = board.root / "vms.toml"
        config.write_text(f'[vm.0]\nconsole = {{ backends = ["file:{board.root}/log"] }}\n')
        daemon = subprocess.Popen(board.serve_argv(config, "--log-level", "warning",
                                                   *mode_args))
        try:
            stub.page.wait_attached()
            addr = Layout().window(0, 0) + vc.REG_DEVICE_ID
            times = []
            for _ in range(count):
                start = time.perf_counter_ns()
                stub.page.post(0, 0, addr, 4, False)
                times.append(time.perf_counter_ns() - start)
        finally:
            daemon.terminate()
            daemon.wait(10)
            stub.close()
    times.sort()
    return statistics.median(times) / 1000, times[int(len(times) * 0.99)] / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    for name, mode in (("doorbell (FIFO)", []), ("busy-poll", ["--busy-poll"])):
        median, p99 = measure(mode, args.count)
        print(f"{name:16s} {args.count} reads: median {median:7.1f} us, p99 {p99:7.1f} us")


if __name__ == "__main__":
    main()
