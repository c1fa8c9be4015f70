"""The trap path without a guest: a C stand-in stub against avatar-hw and against a C floor.

``bench/trapload.c`` plays Avatar's EL2 stub on a trap page in a fake UIO
tree (``avatar_hw.testing.standin_stub.FakeBoard``): it posts 4-byte register
accesses into one slot as fast as they are answered and times each one. The
model side is either

- ``avatar-hw serve`` (the real daemon, a subprocess) serving a virtio
  console in VM 0, which the Python stand-in first brings to DRIVER_OK; the
  load reads MagicValue and Status and writes QueueNotify of the transmit
  queue (an empty ring: the notify path without data), or
- ``bench/responder.c``, which answers every slot with a constant: the cost
  of the shared-memory handshake and the doorbell alone.

Each in busy-poll mode (the model spins on the slots) and in doorbell mode
(the model sleeps in its event loop; the stub rings a FIFO with a 4-byte
count, as the daemon's fifo: doorbell expects), and each back to back (the
next trap is posted as soon as the last is answered: a model still scanning
catches it without sleeping) and with an idle gap between traps (the guest
runs for ``GAP_NS``; a doorbell-mode model is asleep when the trap comes, so
every trap pays the wake-up).
"""

import json
import pstats
import subprocess
import tempfile
from pathlib import Path

from avatar_hw.errors import AvatarError
from avatar_hw.layout import Layout
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
from avatar_hw.virtio import constants as vc

from .common import Child, compile_c, table

GAP_NS = 200_000
CASES = (("busy-poll", 0), ("busy-poll", GAP_NS), ("doorbell", 0), ("doorbell", GAP_NS))
MODELS = ("avatar-hw", "C responder")
PROFILE_TOP = 12


def load_ops(window):
    """The register accesses the load cycles through, as trapload arguments."""
    return [f"r{window + vc.REG_MAGIC_VALUE:x}", f"r{window + vc.REG_STATUS:x}",
            f"w{window + vc.REG_QUEUE_NOTIFY:x}=1"]


def run_load(trapload, board, count, warmup, gap_ns):
    window = Layout().window(0, 0)
    argv = [trapload, board.node("avatar-trap"), board.doorbell, 0, 0, count, warmup, gap_ns,
            *load_ops(window)]
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AvatarError(f"trapload failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def measure(model, mode, gap_ns, binaries, count, warmup, profile=None):
    """One configuration: returns trapload's figures plus the model's CPU per trap."""
    with tempfile.TemporaryDirectory(prefix="avatar-bench-trap-") as tmp:
        board = FakeBoard(Path(tmp) / "board", vms=1)
        stub = StandinStub(board)
        try:
            if model == "avatar-hw":
                config = board.root / "vms.toml"
                config.write_text(f'[vm.0]\nconsole = '
                                  f'{{ endpoints = ["file:{board.root}/log"] }}\n')
                argv = board.serve_argv(config, "--log-level", "warning",
                                        *(["--busy-poll"] if mode == "busy-poll" else []))
                if profile:
                    argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
            else:
                argv = [binaries["responder"], board.node("avatar-trap"), board.doorbell,
                        "poll" if mode == "busy-poll" else "doorbell"]
            log = open(board.root / "model.log", "w")
            with log, Child(argv, stdout=log, stderr=subprocess.STDOUT) as server:
                stub.page.wait_attached()
                if model == "avatar-hw":
                    stub.driver(0, 0).init([0, 1])     # DRIVER_OK, so QueueNotify is served
                cpu_before = server.cpu_seconds()
                result = run_load(binaries["trapload"], board, count, warmup, gap_ns)
                cpu = server.cpu_seconds() - cpu_before
                if server.stop() != 0:
                    raise AvatarError(f"{model} exited with status {server.process.returncode}: "
                                       f"{(board.root / 'model.log').read_text()[-1000:]}")
        finally:
            stub.close()
    result["model_cpu_us_per_trap"] = cpu * 1e6 / (count + warmup)
    if result["unhandled"]:
        raise AvatarError(f"{model}: {result['unhandled']} traps answered UNHANDLED")
    return result


def profile_top(path, top=PROFILE_TOP):
    """The ``top`` functions by own time in a cProfile dump: [(name, calls, tottime s)]."""
    stats = pstats.Stats(str(path))
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls,
             "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4)}
            for (file, line, name), (_, calls, tottime, cumtime, _) in rows]


def trap_count(model, gap_ns, quick):
    if gap_ns:
        return 500 if quick else 10_000
    if model == "avatar-hw":
        return 2_000 if quick else 50_000
    return 5_000 if quick else 500_000


def run(quick=False, profile=False):
    out = {"ops": "read MagicValue, read Status, write QueueNotify (round robin, 4 bytes each)",
           "gap_ns": GAP_NS, "results": []}
    with tempfile.TemporaryDirectory(prefix="avatar-bench-bin-") as tmp:
        binaries = {name: compile_c(name, tmp) for name in ("trapload", "responder")}
        for model in MODELS:
            for mode, gap_ns in CASES:
                count = trap_count(model, gap_ns, quick)
                figures = measure(model, mode, gap_ns, binaries, count, warmup=count // 10)
                out["results"].append({"model": model, "mode": mode, "gap_ns": gap_ns,
                                       **figures})
        if profile:
            dump = Path(tmp) / "daemon.prof"
            count = trap_count("avatar-hw", 0, quick)
            measure("avatar-hw", "doorbell", 0, binaries, count, count // 10, profile=dump)
            out["profile"] = {"run": f"avatar-hw, doorbell mode, {count + count // 10} traps "
                                     "back to back, cProfile of the whole daemon process "
                                     "(start-up included)",
                              "top_by_tottime": profile_top(dump)}
    report(out)
    return out


def report(out):
    rows = [[r["model"], r["mode"], f"{r['gap_ns'] // 1000} µs" if r["gap_ns"] else "none",
             r["count"], "-" if r["gap_ns"] else f"{r['traps_per_s']:,.0f}",
             f"{r['p50_ns'] / 1000:.2f}", f"{r['p99_ns'] / 1000:.2f}",
             f"{r['p999_ns'] / 1000:.2f}", f"{r['max_ns'] / 1000:.0f}",
             f"{r['model_cpu_us_per_trap']:.2f}", r["rings"]]
            for r in out["results"]]
    table("Trap path (C stand-in stub; latency post -> DONE seen, µs)",
          ["model", "mode", "idle gap", "traps", "traps/s", "p50", "p99", "p99.9", "max",
           "model CPU µs/trap", "rings"],
          rows)
    if "profile" in out:
        table(f"Daemon profile ({out['profile']['run']})", ["function", "calls", "tottime s"],
              [[p["function"], p["calls"], p["tottime_s"]]
               for p in out["profile"]["top_by_tottime"]])
