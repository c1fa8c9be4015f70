"""avatar_hw.labgrid without labgrid: the strategy's shell commands, run by a real sh against
``avatar-hw serve`` on the stand-in stub."""

import os
import subprocess
import sys
import time

from avatar_hw import control, labgrid
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub

AVATAR_HW = f"{sys.executable} -m avatar_hw"


def sh(command, timeout=60):
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                          timeout=timeout)


def test_start_ready_stop_through_a_shell(tmp_path):
    board = FakeBoard(tmp_path / "board", vms=1)
    stub = StandinStub(board)
    config = board.root / "vms.toml"
    config.write_text(f'[vm.0]\nconsole = {{ backends = ["file:{board.root}/vm0.log"] }}\n')
    serve_args = board.serve_argv(config)[4:]          # after "python -m avatar_hw serve"
    assert serve_args[0] == "--board"
    pidfile, log = str(tmp_path / "serve.pid"), str(tmp_path / "serve.log")
    pid = None
    try:
        assert sh(labgrid.start_command(serve_args, log=log, pidfile=pidfile,
                                        avatar_hw=AVATAR_HW)).returncode == 0
        pid = int(open(pidfile).read())
        ready = sh(labgrid.ready_command(str(board.control), avatar_hw=AVATAR_HW))
        assert ready.returncode == 0, open(log).read()
        assert control.request("info", str(board.control))["vms"][0]["vm"] == 0
        assert sh(labgrid.stop_command(pidfile)).returncode == 0
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline, "daemon did not stop on SIGTERM"
            time.sleep(0.05)
        assert not os.path.exists(pidfile)
    finally:
        if pid is not None:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        stub.close()


def test_ready_command_fails_without_a_daemon(tmp_path):
    result = sh(labgrid.ready_command(str(tmp_path / "none.sock"), timeout=0.5,
                                      avatar_hw=AVATAR_HW))
    assert result.returncode == 1


def test_stop_command_without_a_daemon_is_harmless(tmp_path):
    assert sh(labgrid.stop_command(str(tmp_path / "none.pid"))).returncode == 0


def test_strategy_is_defined_only_with_labgrid():
    import importlib.util
    assert hasattr(labgrid, "AvatarStrategy") == (importlib.util.find_spec("labgrid") is not None)
