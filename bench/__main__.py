"""Run avatar-hw's benchmarks, print tables and write the figures as JSON.

    .venv/bin/python -m bench                   # everything (about 20 min on 2 cores)
    .venv/bin/python -m bench --quick           # smoke run of the parts that need no guest
    .venv/bin/python -m bench --only trap,cost  # some parts: trap, core, cost, board,
                                                # two_guests, fs, board_linux
    .venv/bin/python -m bench --profile         # also cProfile the daemon on the trap path
    .venv/bin/python -m bench --only board --wait adaptive   # ours polling after each trap
    .venv/bin/python -m bench --only board --daemon process  # ours' daemon in its own process

Parts: ``trap`` (bench/trappath.py: the trap page with a C stand-in stub,
against avatar-hw and a C floor), ``core`` (bench/core.py: the VirtIO core in
process: register dispatch, the queue machinery per chain), ``cost``
(bench/cost.py: daemon CPU per GiB through the block device, memory with 8 VMs
x 4 devices), ``board``
(bench/board.py: a Linux guest on the emulated board, avatar-hw against
QEMU's own virtio-mmio devices), ``two_guests`` (bench/two_guests.py: VM0's
throughput with VM1 idle, busy, then hostile), ``fs`` (bench/fs.py: virtio-fs through
avatar-hw's vhost-user front end against QEMU's vhost-user-fs-device, same virtiofsd),
``board_linux`` (bench/board_linux.py: board mode's boot to the guest's shell and its trap
round trip, against host mode; a few minutes).
Results go to ``--out FILE``, else to ~/.cache/avatar-hw/bench/<time>.json (never into
the checkout; bench/results/full.json is the run docs/performance.md quotes, made with
``--out``). Run from the repository root. docs/performance.md explains them.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from avatar_hw.emulated.build import cache_dir
from avatar_hw.wait import MODES

from .board import DAEMON_MODES
from .common import error_text, git_state, machine_info

PARTS = ("trap", "core", "cost", "board", "two_guests", "fs", "board_linux")
QUICK_PARTS = ("trap", "core", "cost")  # --quick: what needs no guest


def _run_part(name, args):
    if name == "trap":
        from . import trappath
        return trappath.run(quick=args.quick, profile=args.profile)
    if name == "core":
        from . import core
        return core.run(quick=args.quick)
    if name == "cost":
        from . import cost
        return cost.run(quick=args.quick)
    if name == "fs":
        from . import fs
        return fs.run(quick=args.quick, runs=args.runs)
    if name == "two_guests":
        from . import two_guests
        return two_guests.run(quick=args.quick, daemon=args.daemon, wait=args.wait,
                              vm1_nice=args.vm1_nice)
    if name == "board_linux":
        from . import board_linux
        return board_linux.run(quick=args.quick)
    from . import board
    return board.run(quick=args.quick, runs=args.runs, wait=args.wait, daemon=args.daemon)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="about 20 s: small counts, and only the parts that need no guest "
                             "unless --only says otherwise")
    parser.add_argument("--only", help=f"comma-separated parts ({', '.join(PARTS)})")
    parser.add_argument("--runs", type=int, default=3,
                        help="emulated-board runs per side (median, min, max; default 3)")
    parser.add_argument("--wait", choices=MODES,
                        help="board, two_guests: how avatar-hw's daemon waits for traps "
                             "(default: the emulated board file's trap.wait)")
    parser.add_argument("--daemon", choices=DAEMON_MODES,
                        help="board, two_guests: avatar-hw's daemon in a thread of the bench's "
                             "process or in its own process (default: the emulated board's, "
                             "EmulatedBoard's daemon_process)")
    parser.add_argument("--vm1-nice", action="store_true",
                        help="two_guests: VM1's vCPU thread at nice 19, so that its computing "
                             "cannot take VM0's CPU (a core of its own, as on a board)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the daemon on the trap path and list the top functions")
    parser.add_argument("--out", type=Path,
                        help="JSON file (default ~/.cache/avatar-hw/bench/<time>.json)")
    args = parser.parse_args(argv)
    parts = QUICK_PARTS if args.quick else PARTS
    if args.only:
        parts = tuple(p.strip() for p in args.only.split(","))
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            parser.error(f"--only {unknown[0]}: expected some of {', '.join(PARTS)}")
    out = args.out or cache_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S.json")
    command = sys.argv[1:] if argv is None else list(argv)
    report = {"command": [sys.executable, "-m", "bench", *command], "git": git_state(),
              "options": vars(args), "machine": machine_info(), "quick": args.quick,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    status = 0
    try:
        for name in parts:
            report["parts"][name] = {"error": "KeyboardInterrupt"}     # until it returns
            start = time.monotonic()
            try:
                report["parts"][name] = _run_part(name, args)
            except Exception as err:              # the other parts still run and are written
                report["parts"][name] = {"error": error_text(err)}
                print(f"bench {name}: {error_text(err)}", file=sys.stderr)
                status = 1
            report["parts"][name]["wall_s"] = round(time.monotonic() - start, 1)
    finally:                                      # interrupted too: what finished is written
        report["machine"]["loadavg_at_end"] = os.getloadavg()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nresults: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
