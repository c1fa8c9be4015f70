"""Smoke run of the benchmarks that need no guest: they run and report; no time is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

from patching import this_thread_only

REPO = Path(__file__).resolve().parent.parent


def test_quick_bench_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["parts"]) == {"trap", "core", "cost"}      # every part without a guest
    assert report["parts"]["core"]["notify"]["all_completed"]
    trap = report["parts"]["trap"]["results"]
    assert {(r["model"], r["mode"], r["gap_ns"] > 0) for r in trap} == {
        (model, mode, gap) for model in ("avatar-hw", "C responder")
        for mode in ("busy-poll", "doorbell") for gap in (False, True)}
    for r in trap:
        assert r["unhandled"] == 0 and r["count"] > 0
        assert r["min_ns"] <= r["p50_ns"] <= r["p99_ns"] <= r["max_ns"]
    gap_doorbell = [r for r in trap if r["mode"] == "doorbell" and r["gap_ns"]]
    assert all(r["rings"] > 0 for r in gap_doorbell), "an idle model was never rung"
    assert all(r["rings"] == 0 for r in trap if r["mode"] == "busy-poll")
    cost = report["parts"]["cost"]
    assert any(r["op"].startswith("console") and r["bytes"] > 0 for r in cost["throughput"])
    memory = cost["memory"]
    assert len(memory["devices_per_vm"]) == 4 and memory["vms"] == 8
    assert memory["after_driver_ok"]["VmRSS"] > 0
    assert "Trap path" in result.stdout and "Daemon memory" in result.stdout
    hostile = cost["hostile_memory"]
    assert hostile["daemon_alive"] and hostile["queues_flooded"] == 8 * 6
    assert hostile["after"]["RssWithoutGuestRam"] > 0


def test_bench_without_out_writes_its_report_outside_the_checkout(tmp_path, monkeypatch):
    import bench.__main__ as bench_main
    monkeypatch.setenv("AVATAR_HW_CACHE", str(tmp_path))
    monkeypatch.setattr(bench_main, "_run_part", lambda name, args: {"ran": name})
    monkeypatch.chdir(REPO)                                  # as docs/performance.md runs it
    places = [REPO, REPO / "bench", REPO / "bench" / "results"]
    before = [sorted(place.iterdir()) for place in places]
    assert bench_main.main(["--only", "core"]) == 0
    assert [sorted(place.iterdir()) for place in places] == before
    [out] = (tmp_path / "bench").iterdir()
    assert json.loads(out.read_text())["parts"]["core"]["ran"] == "core"


def test_core_bench_runs_and_completes_every_chain(capsys):
    from bench.core import run
    out = run(quick=True)
    assert out["notify"]["all_completed"] and out["notify"]["us_per_chain"] > 0
    assert out["trap_page"]["all_answered"] and out["trap_page"]["us_per_trap"] > 0
    assert out["dispatch"]["read_us"] > 0 and out["dispatch"]["write_us"] > 0
    assert out["gpu_transfer"]["full_ms"] > 0 and out["gpu_transfer"]["rect_ms"] > 0
    assert "QueueNotify, per 4 KiB chain" in capsys.readouterr().out


def test_soak_runs_a_few_hundred_steps_without_failure(monkeypatch):
    from avatar_hw.virtio.subsystem import Subsystem
    from bench.soak import KINDS, soak
    traps = []
    handle = Subsystem.handle_mmio_trap

    def counted(self, addr, value, is_write, size):
        traps.append(addr)
        return handle(self, addr, value, is_write, size)

    monkeypatch.setattr(Subsystem, "handle_mmio_trap", this_thread_only(handle, counted))
    result = soak(300, seed=13)
    assert result["steps"] >= 300 and result["failures"] == []
    assert result["steps"] == len(traps)                     # a step is one trap, once
    assert set(result["longest_trap_ms_by_kind"]) == set(KINDS)
    assert sum(result["guest_errors"].values()) > 0          # the guest did misbehave


def test_soak_command_runs_and_prints_its_figures():
    result = subprocess.run([sys.executable, "-m", "bench.soak", "--steps", "200", "--seed", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "0 failures" in result.stdout


def test_hostile_bench_measures_every_device_kind():
    from bench.hostile import HEAVY, KINDS, measure, measure_heavy
    for kind in KINDS:
        row = measure(kind, None)
        assert row["chains_done"] == row["queue_size"] and row["max_hold_ms"] > 0
    for kind in HEAVY:            # each request ends its turn, or spreads over several
        row = measure_heavy(kind, count=3)
        assert row["requests_done"] == 3 and row["turns"] >= 2, row


def test_every_bench_module_imports_and_its_qemu_lines_are_built(tmp_path):
    """The guest parts run only by hand (minutes each): at least their code must not rot
    (bench.balloon once imported a helper that no longer existed)."""
    import importlib
    for path in sorted((REPO / "bench").glob("*.py")):
        importlib.import_module(f"bench.{path.stem}")
    from bench import balloon, board
    argv = board.qemu_command("initrd", "disk.img", "share", "console.sock",
                              net=("a.sock", "b.sock"))
    assert "virtio-blk-device,drive=disk" in argv and any("dgram" in a for a in argv)
    assert balloon.qemu_base is board.qemu_base


def test_bench_input_images_are_fsynced_before_a_run(tmp_path, monkeypatch):
    """A disk image the bench writes is clean when the first side runs: else that side's
    flush writes the bench's own data out (the seq write row was 0.13x for that)."""
    import os
    from bench.two_guests import write_image
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", this_thread_only(real_fsync, fsync))
    image = tmp_path / "vm0.img"
    write_image(image, 1 << 16)
    assert image.stat().st_size == 1 << 16
    assert synced == [image.stat().st_ino]


def test_bench_data_lives_in_ram_when_it_has_room(tmp_path, monkeypatch):
    """Disk images and shared folders go to RAM_DIR when it has room for them (the host's
    disk and what its page cache keeps stay out of the figures), else to the temporary
    directory; the results say which."""
    from bench import common
    ram = tmp_path / "ram"
    ram.mkdir()
    monkeypatch.setattr(common, "RAM_DIR", str(ram))
    monkeypatch.setattr(common, "RAM_DIR_SPARE", 0)
    small = common.data_workdir("avatar-test-", 1)
    assert small.parent == ram and common.where(small) == "RAM"
    big = common.data_workdir("avatar-test-", 1 << 62)
    try:
        assert big.parent != ram and common.where(big) == "disk"
    finally:
        big.rmdir()


def test_bench_data_left_by_a_killed_bench_is_removed_by_the_next(tmp_path, monkeypatch):
    """In RAM a SIGKILLed bench's images would stay until a reboot: the next bench removes
    the directories of processes that are gone, and leaves those of live ones."""
    from bench import common
    monkeypatch.setattr(common, "RAM_DIR", str(tmp_path))
    monkeypatch.setattr(common, "RAM_DIR_SPARE", 0)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"avatar-test-{gone.pid}-x"
    live = tmp_path / f"avatar-test-{os.getpid()}-y"
    for path in (stale, live):
        path.mkdir()
        (path / "disk.img").write_bytes(b"image")
    fresh = common.data_workdir("avatar-test-", 1)
    assert not stale.exists() and live.exists()
    assert fresh.name.startswith(f"avatar-test-{os.getpid()}-")


def test_alternate_records_any_exception_of_a_run_and_runs_the_others(capsys):
    """A run that raises what is not an AvatarError (a socket's timeout, a child's) is
    recorded with its type and the rounds after it still run."""
    import socket
    from bench.board import alternate
    errors = iter([socket.timeout("timed out"), subprocess.TimeoutExpired("qemu", 5),
                   OSError(32, "Broken pipe")])

    def qemu():
        raise next(errors)
    raw = {"ours": [], "qemu": []}
    alternate(3, (("ours", lambda: {"seqread_MBps": 1.0}), ("qemu", qemu)), raw, "board")
    assert [r["seqread_MBps"] for r in raw["ours"]] == [1.0] * 3
    assert [r["errors"] for r in raw["qemu"]] == [
        ["TimeoutError: timed out"], ["TimeoutExpired: Command 'qemu' timed out after 5 seconds"],
        ["BrokenPipeError: [Errno 32] Broken pipe"]]
    assert "qemu: 0 s; TimeoutError: timed out" in capsys.readouterr().out


def _bench_main(monkeypatch, fail):
    """bench's main with parts that return ``{"ran": name}``, or raise ``fail[name]``."""
    import bench.__main__ as bench_main

    def run_part(name, args):
        if name in fail:
            raise fail[name]
        return {"ran": name}
    monkeypatch.setattr(bench_main, "_run_part", run_part)
    return bench_main.main


def test_bench_json_has_every_part_that_finished_and_the_error_of_the_one_that_failed(
        tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    main = _bench_main(monkeypatch, {"core": TimeoutError("timed out")})
    assert main(["--only", "core,trap", "--out", str(out)]) == 1
    parts = json.loads(out.read_text())["parts"]
    assert parts["core"]["error"] == "TimeoutError: timed out" and parts["trap"]["ran"] == "trap"


def test_bench_json_is_written_when_interrupted(tmp_path, monkeypatch):
    import pytest
    out = tmp_path / "bench.json"
    main = _bench_main(monkeypatch, {"cost": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        main(["--only", "trap,cost,core", "--out", str(out)])
    parts = json.loads(out.read_text())["parts"]
    assert parts == {"trap": {"ran": "trap", "wall_s": 0.0},
                     "cost": {"error": "KeyboardInterrupt"}}


def test_bench_json_names_the_command_the_commit_and_the_options(tmp_path, monkeypatch):
    from bench.common import git_state
    out = tmp_path / "bench.json"
    main = _bench_main(monkeypatch, {})
    assert main(["--only", "core", "--runs", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"] == [sys.executable, "-m", "bench", "--only", "core", "--runs", "2",
                                 "--out", str(out)]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert report["git"]["commit"] == head and isinstance(report["git"]["dirty"], bool)
    assert report["options"]["only"] == "core" and report["options"]["runs"] == 2
    assert report["options"]["out"] == str(out)
    assert git_state(tmp_path) == {}                        # not a git checkout: nothing


class FakeShell:
    """A guest shell that records its commands and answers each with the next of ``replies``
    ((output, exit status))."""

    def __init__(self, *replies):
        self.commands, self.replies = [], list(replies)

    def run(self, command, timeout=60):
        self.commands.append(command)
        return self.replies.pop(0)


def test_two_guests_busy_load_has_no_end_of_its_own_and_is_stopped_by_the_bench():
    """VM1's busy loop once ran under ``timeout`` seconds computed from the idle phase, and
    VM0's busy phase outlasted it in every run: its last samples were taken beside an idle
    VM1. The loop now runs until stopped, and the stop says whether it still ran."""
    from bench.two_guests import start_busy, stop_busy
    shell = FakeShell(("4242\n", 0), ("", 0), ("sh: can't kill pid 4242\n", 1))
    assert start_busy(shell) == 4242
    assert "timeout" not in shell.commands[0] and "while :; do :; done" in shell.commands[0]
    assert stop_busy(shell, 4242) is True
    assert shell.commands[1] == "kill -0 4242 && kill 4242"
    assert stop_busy(shell, 4242) is False                   # it had ended on its own


def test_board_ours_measures_vsock_after_the_rows_qemu_measures_too(tmp_path, monkeypatch):
    """Ours once ran two 64 MiB vsock echoes between its shell and measure_guest, which QEMU's
    side runs at once: the rows measured first (net, block seq read) were compared at
    different times after boot. Now vsock (ours alone) comes after them; a vsock error
    leaves them in the figures."""
    import contextlib
    from bench import board
    calls = []

    class Shell:
        def wait_ready(self, timeout):
            calls.append("ready")

        def close(self):
            pass

    def measure_guest(shell, kinds, quick, **_):
        calls.append("measure_guest")
        return {"seqread_MBps": 1.0}

    def vsock_guest_echo(shell, path, size):
        raise TimeoutError("timed out")
    monkeypatch.setattr(board, "EmulatedBoard", lambda **_: contextlib.nullcontext(
        type("Board", (), {"console_path": tmp_path / "c.sock", "daemon_process": None})))
    monkeypatch.setattr(board, "connect", lambda path: Shell())
    monkeypatch.setattr(board, "daemon_info", lambda _: {"mode": "adaptive", "trap": {}})
    monkeypatch.setattr(board, "host_pids", lambda _: ())
    monkeypatch.setattr(board, "device_available", lambda kind: True)
    monkeypatch.setattr(board, "measure_guest", measure_guest)
    monkeypatch.setattr(board, "vsock_host_echo",
                        lambda shell, path, size: calls.append("vsock") or 2.0)
    monkeypatch.setattr(board, "vsock_guest_echo", vsock_guest_echo)
    figures = board.run_ours(tmp_path / "initrd", "disk.img", "share", ["block"], quick=True)
    assert calls == ["ready", "measure_guest", "vsock"]
    assert figures["seqread_MBps"] == 1.0 and figures["vsock_host_echo_MBps"] == 2.0
    assert figures["errors"] == ["vsock: TimeoutError: timed out"]
