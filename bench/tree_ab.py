"""Interleaved A/B of this checkout against another revision: ours alone on the emulated
board, 4 KiB QD1 random reads, rng, 1 MiB block and 9p reads and writes, in each wait mode,
with the interrupt counters.

    .venv/bin/python bench/tree_ab.py --base main --rounds 4 --wait adaptive,doorbell

Each run is a fresh board (``EmulatedBoard``: its own QEMU, stub, daemon) in a process of
its own, whose ``avatar_hw`` and stub sources are the tree's: this checkout, or ``--base``
exported with ``git archive`` (a revision of this repository). The order of the two sides
alternates from round to round. Per run: ``avbench randread /dev/vda 20000 5.0`` and
``avbench rng 4194304 5.0`` (bench/guest/avbench.c), ``avbench seqread``/``seqwrite`` of
64 MiB on the block device and on a 9p mount (bench/board.py's ``measure_9p``), and, for
each, the daemon's counters over it: traps, interrupts, and where the tree has them the
stub's rings sent and spared (``StubInterruptLine``) and the stub's WFI counters
(``TrapPage.vm_counters``). On a shared host only the ratios of interleaved runs mean
anything (docs/performance.md section 4).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BULK = 64 << 20          # bytes of each 1 MiB sequential figure (block, 9p)
FIGURES = ("randread_iops", "rng_MBps", "seqread_MBps", "seqwrite_MBps", "p9read_MBps",
           "p9write_MBps")
COUNTERS = ("stub_rings", "stub_rings_skipped", "wfi_caught", "wfi_ran_out", "wfi_slept")


def one_run(tree, initrd, image, wait):
    """In a process of its own: one board of ``tree``'s sources, both figures and their
    counters."""
    sys.path.insert(0, tree)
    import avatar_hw
    from avatar_hw.emulated.session import EmulatedBoard
    from bench.board import P9_TAG, connect, measure_9p
    if not avatar_hw.__file__.startswith(tree):
        raise SystemExit(f"avatar_hw imported from {avatar_hw.__file__}, not {tree}")

    share = Path(image).parent / "share"
    devices = (f'block = {{ image = "{image}" }}\nrng = {{ }}\n'
               f'9p = {{ tag = "{P9_TAG}", path = "{share}", security_model = "none" }}')
    out = {"load": os.getloadavg()[0]}
    with EmulatedBoard(initrd=Path(initrd), devices=devices, wait=wait) as board:
        shell = connect(board.console_path)
        shell.wait_ready(240)
        daemon = board.daemon

        def counters():
            info = daemon.info()
            found = {"traps": info["trap"]["served"],
                     "interrupts": sum(d["interrupts"] for d in info["vms"][0]["devices"])}
            found.update({k: v for k, v in {**info["trap"], **info["vms"][0]}.items()
                          if k in COUNTERS})
            return found

        def measured(run):
            """``run()``'s result, and the counters' change over it."""
            before = counters()
            result = run()
            after = counters()
            return result, {k: after[k] - before[k] for k in after}

        def over(command, pattern):
            return measured(lambda: shell.result(command, pattern))

        (ios, ns, p50, _), out["randread"] = over(
            "avbench randread /dev/vda 20000 5.0", r"ios=(\d+) ns=(\d+) p50_ns=(\d+) p99_ns=(\d+)")
        (done, ns2), out["rng"] = over(f"avbench rng {4 << 20} 5.0", r"bytes=(\d+) ns=(\d+)")
        out.update(randread_iops=ios / ns * 1e9, randread_p50_us=p50 / 1e3,
                   rng_MBps=done / ns2 * 1e3)
        for op in ("seqread", "seqwrite"):
            (done, ns), out[op] = over(f"avbench {op} /dev/vda {BULK}", r"bytes=(\d+) ns=(\d+)")
            out[f"{op}_MBps"] = done / ns * 1e3
        p9, out["p9"] = measured(lambda: measure_9p(shell, BULK))
        out.update(p9)
        shell.close()
    return out


def summary(results):
    lines = []
    for wait in sorted({r["wait"] for r in results}):
        for side in ("this", "base"):
            runs = [r for r in results if r["wait"] == wait and r["side"] == side]
            if not runs:
                continue
            lines.append(f"{wait:9} {side:4} load {' '.join('%.1f' % r['load'] for r in runs)}")
            for figure in FIGURES:
                values = [r[figure] for r in runs if figure in r]
                if values:
                    lines.append(f"    {figure:14} median {statistics.median(values):9.3f}: "
                                 f"{' '.join(f'{x:.3f}' for x in values)}")
            for figure in ("randread", "rng", "seqread", "seqwrite", "p9"):
                if figure not in runs[0]:
                    continue
                total = {k: sum(r[figure].get(k, 0) for r in runs) for k in runs[0][figure]}
                if "stub_rings" in total:
                    raised = total["stub_rings"] + total["stub_rings_skipped"]
                    total["spared"] = f"{total['stub_rings_skipped'] / max(raised, 1):.1%}"
                lines.append(f"    {figure}: {total}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/tree_ab.py", description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="main", help="the revision to compare with (git)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wait", default="adaptive,doorbell", help="wait modes, comma-separated")
    parser.add_argument("--out", help="JSON results (default: print only)")
    parser.add_argument("--one", nargs=4, metavar=("TREE", "INITRD", "IMAGE", "WAIT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(*args.one)))
        return 0
    sys.path.insert(0, str(REPO))
    from bench.board import IMAGE_SIZE, MIB, build_initrd
    from bench.common import write_synced

    results = []
    with tempfile.TemporaryDirectory(prefix="avatar-tree-ab-") as work:
        work = Path(work)
        base = work / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        initrd = build_initrd(work, programs=("avbench",))
        image = work / "disk.img"
        write_synced(image, [os.urandom(MIB)] * (IMAGE_SIZE // MIB))
        (work / "share").mkdir()
        write_synced(work / "share" / "p9read", [os.urandom(MIB)] * (BULK // MIB))
        trees = {"this": REPO, "base": base}
        for n in range(args.rounds):
            for wait in args.wait.split(","):
                for side in (("this", "base") if n % 2 == 0 else ("base", "this")):
                    started = time.time()
                    run = subprocess.run(
                        [sys.executable, __file__, "--one", str(trees[side]), str(initrd),
                         str(image), wait],
                        cwd=trees[side], capture_output=True, text=True, timeout=900)
                    if run.returncode:
                        print(f"{side} {wait}: failed: {run.stderr[-800:]}", flush=True)
                        continue
                    result = {"side": side, "wait": wait, "round": n, "started": started,
                              **json.loads(run.stdout.splitlines()[-1])}
                    results.append(result)
                    print(json.dumps(result), flush=True)
    print(summary(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
