"""What the adaptive mode's spare-core measure reads (avatar_hw/wait.py, ``SpareCores``).

One guest on the emulated board does 4 KiB O_DIRECT reads at queue depth 1, then reads
its rng, while this samples ``avatar-hw info``'s ``poll_spare_cores`` (the last measure,
taken every 250 ms) four times a second; with ``--busy`` another process keeps a core
busy meanwhile. ``--min 0`` (the default here) polls whatever the measure says, so the
figures are what a poll sees, quiet or beside the busy process: ``SPARE_CORES_MIN``
must lie between the two. ``--wait doorbell`` gives the reads' figure to compare with.

    .venv/bin/python -m bench.spare_cores [--busy] [--min X] [--wait MODE]
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

from avatar_hw import wait
from avatar_hw.emulated.session import EmulatedBoard

from .board import build_initrd, connect, daemon_info
from .common import data_workdir, write_synced

MIB = 1 << 20
SECONDS = 6
WINDOW_COUNTERS = ("poll_window_ns", "poll_grown", "poll_shrunk", "poll_preempted",
                   "poll_no_spare_core")


def sample(board, stop, out):
    while not stop.wait(0.25):
        cores = daemon_info(board)["trap"].get("poll_spare_cores")
        if cores is not None:
            out.append(cores)


def spread(values):
    return (f"{min(values):.2f}-{max(values):.2f} (median {statistics.median(values):.2f}, "
            f"{len(values)} samples)") if values else "not measured"


def run(busy=False, minimum=0.0, mode=wait.ADAPTIVE):
    wait.SPARE_CORES_MIN = minimum          # the daemon runs in a thread of this process
    workdir = data_workdir("avatar-bench-spare-", 64 * MIB)
    image = workdir / "disk.img"
    write_synced(image, [os.urandom(MIB)] * 64)
    hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if busy else None
    try:
        with EmulatedBoard(initrd=build_initrd(workdir), wait=mode,
                           devices=f'block = {{ image = "{image}" }}\nrng = {{ }}') as board:
            shell = connect(board.console_path)
            shell.wait_ready(120)
            figures, stop = {}, threading.Event()
            for name, command, pattern in (
                    ("4 KiB reads", f"avbench randread /dev/vda 100000 {SECONDS}",
                     r"ios=(\d+) ns=(\d+)"),
                    ("rng", f"avbench rng {4 * MIB} {SECONDS}", r"bytes=(\d+) ns=(\d+)")):
                measures = []
                sampler = threading.Thread(target=sample, args=(board, stop, measures))
                sampler.start()
                try:
                    done, ns = shell.result(command, pattern)
                finally:
                    stop.set()
                    sampler.join()
                    stop.clear()
                trap = daemon_info(board)["trap"]
                figures[name] = (done / ns * 1e9, measures,
                                 {key: trap.get(key) for key in WINDOW_COUNTERS})
            shell.close()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()
    print(f"{'one core busy' if busy else 'quiet'}, wait {mode}, SPARE_CORES_MIN {minimum}:")
    for name, (rate, measures, counters) in figures.items():
        unit = "IOPS" if name.startswith("4") else "bytes/s"
        print(f"  {name}: {rate:,.0f} {unit}; spare cores {spread(measures)}; window "
              "counters so far: " + ", ".join(f"{k.removeprefix('poll_')} {v}"
                                              for k, v in counters.items()))
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.spare_cores",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", action="store_true", help="another process keeps a core busy")
    parser.add_argument("--min", type=float, default=0.0,
                        help="SPARE_CORES_MIN for this run (default 0: always poll)")
    parser.add_argument("--wait", choices=wait.MODES, default=wait.ADAPTIVE)
    args = parser.parse_args(argv)
    run(args.busy, args.min, args.wait)


if __name__ == "__main__":
    main()
