"""avatar_hw.hil.labgrid: the strategy's shell commands, run by a real sh against ``avatar-hw
serve`` on the stand-in stub; with labgrid installed, ``AvatarStrategy`` in a real
coordinator-less Environment (a local shell as the board's console) and labgrid's
``NetworkSerialPort`` on the emulated board's RFC 2217 console."""

import contextlib
import importlib.util
import re
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from avatar_hw import control
from avatar_hw.hil import labgrid
from avatar_hw.hil.target import emulated_board_missing
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub

AVATAR_HW = f"{sys.executable} -m avatar_hw"


def sh(command, timeout=60):
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                          timeout=timeout)


def test_start_ready_stop_through_a_shell(tmp_path):
    board = FakeBoard(tmp_path / "board", vms=1)
    stub = StandinStub(board)
    config = board.root / "vms.toml"
    config.write_text(f'[vm.0]\nconsole = {{ endpoints = ["file:{board.root}/vm0.log"] }}\n')
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
        deadline = time.monotonic() + 60
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


# -- with labgrid (the test extra installs it): a real coordinator-less Environment ----------------

needs_labgrid = pytest.mark.skipif(importlib.util.find_spec("labgrid") is None,
                                   reason="needs labgrid (pip install -e '.[test]')")


class ShellServer:
    """A local ``sh -i`` on a pty, served raw over TCP: what a board's Linux console is to
    labgrid (NetworkSerialPort, protocol raw). Writing to ``tty`` is output of the "board";
    ``cycle`` is its power cycle, a shell command: a fresh ``sh -i`` (a reboot), then the
    hypervisor's banner. It is ready once its first shell has started: what that shell printed
    (its prompt, dash's "can't access tty" line) is dropped, so that a test sees only what
    follows the power cycle, however late the shell started."""

    def __init__(self, tmp_path):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        master, slave = os.openpty()
        self.tty = os.ttyname(slave)
        pid = tmp_path / "sh.pid"
        self.shell = subprocess.Popen(["/bin/sh", "-c", f"while :; do sh -c 'echo $$ >{pid}; "
                                       "exec sh -i'; done"],
                                      stdin=slave, stdout=slave, stderr=slave,
                                      cwd=tmp_path, start_new_session=True,
                                      env={**os.environ, "PS1": "board$ "})
        self.cycle = f"sh -c \"kill -9 $(cat {pid}); echo Avatar hypervisor >{self.tty}\""
        os.close(slave)
        self.master = master
        self.conn, self.pending, self.lock = None, b"", threading.Lock()
        threading.Thread(target=self._copy, args=(self.master, self._to_client),
                         daemon=True).start()
        self._drop_first_prompt()
        threading.Thread(target=self._serve, daemon=True).start()

    def _drop_first_prompt(self, timeout=60):
        deadline = time.monotonic() + timeout
        while b"board$ " not in self.pending:
            assert time.monotonic() < deadline, f"no shell prompt in {timeout} s: {self.pending}"
            time.sleep(0.01)
        with self.lock:
            self.pending = b""

    def _serve(self):
        """Each client in turn (labgrid connects again after deactivating the console); the
        shell's output goes to the one connected, or waits for the next."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:                         # closed
                return
            with self.lock:
                conn.sendall(self.pending)
                self.conn, self.pending = conn, b""
            threading.Thread(target=self._from_client, args=(conn,), daemon=True).start()

    def _from_client(self, conn):
        self._copy(conn.fileno(), lambda data: os.write(self.master, data))
        with self.lock:
            if self.conn is conn:
                self.conn = None

    def _to_client(self, data):
        with self.lock:
            try:
                self.conn.sendall(data)
            except (AttributeError, OSError):       # none connected, or it went away
                self.conn, self.pending = None, self.pending + data

    @staticmethod
    def _copy(fd, write):
        try:
            while data := os.read(fd, 4096):
                write(data)
        except OSError:
            pass

    def close(self):
        os.killpg(self.shell.pid, signal.SIGKILL)
        self.shell.wait()
        # wakes _serve's accept: else it waits on, and may take the next listener's client
        # once that listener gets the same file descriptor
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def environment_file(tmp_path, server, serve_args, shell=None, **strategy):
    """The environment file of ``server`` as the board (the ShellDriver's attributes
    overridden by ``shell``, the strategy's by ``strategy``)."""
    env = tmp_path / "env.yaml"
    env.write_text(yaml_dump({"targets": {"main": {
        "resources": {"NetworkSerialPort": {"host": "127.0.0.1", "port": server.port,
                                            "protocol": "raw"}},
        "drivers": {
            "ExternalPowerDriver": {"cmd_on": "true", "cmd_off": "true", "delay": 0.0,
                                    "cmd_cycle": server.cycle},
            "SerialDriver": {},
            "ShellDriver": {"prompt": r"board\$ ", "login_prompt": " login: ",
                            "username": "root", "await_login_timeout": 1, **(shell or {})},
            "AvatarStrategy": {"serve_args": serve_args, "avatar_hw": AVATAR_HW,
                               "pidfile": str(tmp_path / "serve.pid"),
                               "log": str(tmp_path / "serve.log"), "boot_timeout": 20,
                               **strategy}}}},
        "imports": ["avatar_hw.hil.labgrid"]}))
    return env


def board_environment(*args, **strategy):
    """``environment_file``'s Environment (call its cleanup())."""
    from labgrid import Environment
    return Environment(str(environment_file(*args, **strategy)))


def yaml_dump(data):
    import yaml                                    # labgrid's dependency
    return yaml.safe_dump(data, sort_keys=False)       # drivers in binding order


@contextlib.contextmanager
def serving_board(tmp_path):
    """A stand-in board, its daemon's labgrid environment over a test shell: (the board's
    control socket, the AvatarStrategy); everything is stopped at the end."""
    board = FakeBoard(tmp_path / "board", vms=1)
    stub = StandinStub(board)
    config = board.root / "vms.toml"
    config.write_text(f'[vm.0]\nconsole = {{ endpoints = ["file:{board.root}/vm0.log"] }}\n')
    server = ShellServer(tmp_path)
    env = board_environment(tmp_path, server, board.serve_argv(config)[4:],
                            control=str(board.control))
    try:
        yield str(board.control), env.get_target("main").get_driver("AvatarStrategy")
    finally:
        env.cleanup()
        server.close()
        stub.close()


@needs_labgrid
def test_strategy_serves_and_restarts_the_daemon_through_labgrid(tmp_path):
    with serving_board(tmp_path) as (control_path, strategy):
        strategy.transition("serving")
        first = control.request("info", control_path)["pid"]
        strategy.transition("serving")                     # labgrid: nothing to do
        assert control.request("info", control_path)["pid"] == first
        strategy.restart_daemon()
        assert control.request("info", control_path)["pid"] != first
        strategy.target.get_driver("ShellDriver").run_check(
            labgrid.stop_command(str(tmp_path / "serve.pid")))


@needs_labgrid
def test_strategy_logs_in_again_after_a_power_cycle(tmp_path):
    """serving -> off -> serving, where the power cycle starts a fresh shell (a reboot): the
    console is deactivated at off, so the ShellDriver logs in (and sets up) again."""
    with serving_board(tmp_path) as (control_path, strategy):
        strategy.transition("serving")
        first = control.request("info", control_path)["pid"]
        strategy.transition("off")
        strategy.transition("serving")
        assert control.request("info", control_path)["pid"] != first
        assert strategy.shell.run_check("echo $((6 * 7))") == ["42"]
        strategy.shell.run_check(labgrid.stop_command(str(tmp_path / "serve.pid")))


@needs_labgrid
def test_lg_initial_state_forces_the_strategy(tmp_path):
    """``pytest --lg-env ENV --lg-initial-state serving`` (labgrid's plugin calls force()): the
    board is taken to be serving, its shell is logged in to, and nothing is started."""
    server = ShellServer(tmp_path)
    env = environment_file(tmp_path, server, ["--board", "rpi4"])
    (tmp_path / "test_forced.py").write_text(
        "def test_forced(strategy):\n"
        "    assert strategy.status.name == 'serving'\n"
        "    assert strategy.shell.run_check('echo $((6 * 7))') == ['42']\n"
        "    strategy.transition('serving')\n")
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 f"--lg-env={env}", "--lg-initial-state=serving",
                                 "test_forced.py"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
    finally:
        server.close()
    assert result.returncode == 0, result.stdout[-3000:]
    assert not (tmp_path / "serve.pid").exists()           # no daemon was started


@needs_labgrid
@pytest.mark.parametrize("key,value,problem", [
    ("boot_timeout", "2m", "'2m' is not a number of seconds (e.g. 120)"),
    ("serve_args", ["--vms", 2], "['--vms', 2] is not a list of texts (e.g. [\"--board\", "
                                 "\"rpi4\"]: quote numbers)"),
    ("banner", "Avatar (", "'Avatar (' is not a regex (missing ), unterminated subpattern at "
                           "position 7)"),
    ("control", 5, "5 is not a text (e.g. /run/avatar-hw.sock)")])
def test_a_strategy_key_of_the_wrong_kind_is_one_line_naming_it(tmp_path, key, value, problem):
    """Refused when labgrid builds the strategy, not at the transition that uses the key."""
    from labgrid import Environment
    from labgrid.exceptions import InvalidConfigError
    server = ShellServer(tmp_path)
    try:
        given = {key: value}
        env = Environment(str(environment_file(tmp_path, server, given.pop("serve_args", []),
                                               **given)))
        with pytest.raises(InvalidConfigError) as err:
            env.get_target("main")
    finally:
        server.close()
    assert str(err.value.__cause__) == f"AvatarStrategy {key}: {problem}"


def transition_error(tmp_path, server, state, serve_args=(), **options):
    """The StrategyError of a transition to ``state`` on ``server``'s board (the environment's
    ``options`` as ``board_environment``'s); the board is stopped."""
    from labgrid.strategy import StrategyError
    env = board_environment(tmp_path, server, list(serve_args), **options)
    try:
        with pytest.raises(StrategyError) as err:
            env.get_target("main").get_driver("AvatarStrategy").transition(state)
    finally:
        env.cleanup()
        server.close()
    return err.value.msg


@needs_labgrid
def test_a_board_that_does_not_boot_is_one_line_saying_what_to_check(tmp_path):
    """No banner on the UART: a StrategyError naming the banner, the wait and the UART's last
    output, not pexpect's TIMEOUT with its dump of the spawn."""
    server = ShellServer(tmp_path)
    server.cycle = f"sh -c 'echo U-Boot 2024.01 >{server.tty}'"     # and no hypervisor
    problem = transition_error(tmp_path, server, "serving", boot_timeout=1)
    assert re.fullmatch(r"the board did not boot: no 'Avatar' \(AvatarStrategy banner\) on the "
                        r"board UART within 1 s of the power cycle; check its power, the "
                        r"UART's port and speed, and the banner; last output: "
                        r"'U-Boot 2024.01\\r?\\n'", problem), problem


@needs_labgrid
def test_a_board_linux_without_the_expected_prompt_is_one_line(tmp_path):
    problem = transition_error(tmp_path, ShellServer(tmp_path), "shell",
                               shell={"prompt": "nobody# ", "login_timeout": 2})
    assert problem == (
        "the board's Linux gave no shell on the board UART: Timeout of 2 seconds exceeded "
        "during waiting for login (check the ShellDriver's prompt, login_prompt and username)")


@needs_labgrid
def test_strategy_surfaces_the_daemons_error_within_seconds(tmp_path):
    missing = tmp_path / "missing.toml"
    problem = transition_error(tmp_path, ShellServer(tmp_path), "serving",
                               ["--board", "rpi4", "--config", str(missing)],
                               control=str(tmp_path / "control.sock"))
    # Seen gone at once (ready_command's exit 2), not after waiting out READY_TIMEOUT.
    assert "avatar-hw serve exited:" in problem
    assert "did not answer within" not in problem
    assert f"avatar-hw: {missing}: no such VMs config file" in problem


@needs_labgrid
@pytest.mark.emulated
# labgrid's serial logger (its pytest plugin's, process-wide) keeps per-driver buffers and
# trips over a driver it has not seen after another Environment's cleanup: its warning.
@pytest.mark.filterwarnings("ignore:unhandled exception during event notification")
@pytest.mark.skipif(emulated_board_missing() is not None, reason=str(emulated_board_missing()))
@pytest.mark.parametrize("scheme,protocol", [("rfc2217", "rfc2217"), ("tcp", "raw")])
def test_network_serial_port_on_the_emulated_boards_console(tmp_path, scheme, protocol):
    """docs/labgrid.md's guest console: NetworkSerialPort (RFC 2217, or raw TCP: pyserial's
    socket://) -> SerialDriver -> ShellDriver, on the emulated board's guest, in a
    coordinator-less Environment. What the guest printed while nobody was attached (the
    unattached log) reaches the SerialDriver first, though pyserial's open empties its
    input."""
    from labgrid import Environment
    from avatar_hw.emulated.session import EmulatedBoard
    config = tmp_path / "vms.toml"
    config.write_text(f'[vm.0]\nconsole = {{ endpoints = ["{scheme}:127.0.0.1:0"] }}\n')
    with EmulatedBoard(config=config) as board:
        [url] = [u for u in board.daemon.info()["vms"][0]["devices"][0]["ports"][0]["endpoints"]
                 if u.startswith(f"{scheme}:")]
        shell = board.shell(timeout=120)                   # the guest's shell is up
        shell.run("(sleep 1; echo unattached-$((6 * 7))) & true")
        shell.close()
        deadline = time.monotonic() + 60
        while board.daemon.debug_device(0, 0)["ports"][0]["log"] < len("unattached-42"):
            assert time.monotonic() < deadline, "the guest's line never reached the log"
            time.sleep(0.1)
        env_file = tmp_path / "env.yaml"
        env_file.write_text(yaml_dump({"targets": {"vm0": {
            "resources": {"NetworkSerialPort": {"host": "127.0.0.1", "protocol": protocol,
                                                "port": int(url.rpartition(":")[2])}},
            "drivers": {"SerialDriver": {},
                        "ShellDriver": {"prompt": "[~/][^ ]* # ", "login_prompt": " login: ",
                                        "username": "root", "await_login_timeout": 1}}}}}))
        env = Environment(str(env_file))
        try:
            target = env.get_target("vm0")
            target.get_driver("SerialDriver").expect("unattached-42", timeout=30)
            shell = target.get_driver("ShellDriver")
            assert shell.run_check("cat /sys/bus/virtio/devices/virtio0/device; uname -m") == [
                "0x0003", "aarch64"]
        finally:
            env.cleanup()


@needs_labgrid
def test_the_documented_exporter_and_environment_load_in_labgrid(tmp_path, recwarn):
    """docs/labgrid.md: the exporter config parses without duplicate keys and its network
    resources build; the environment's targets, import and strategy attributes are valid."""
    import attr
    from labgrid import Target
    from labgrid.config import Config
    from labgrid.factory import target_factory
    from labgrid.remote.config import ResourceConfig
    doc = (Path(__file__).resolve().parent.parent / "docs" / "labgrid.md").read_text()
    exporter, environment = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    (tmp_path / "exporter.yaml").write_text(exporter)
    groups = ResourceConfig(str(tmp_path / "exporter.yaml")).data
    resources = groups["avatar-pi-1"]
    assert [r["cls"] for r in resources.values()] == [
        "USBSerialPort", "NetworkPowerPort", "NetworkSerialPort", "NetworkSerialPort"]
    target = Target("avatar-pi-1")
    for name in ("vm0-console", "vm1-console"):
        args = {k: v for k, v in resources[name].items() if k != "cls"}
        port = target_factory.make_resource(target, "NetworkSerialPort", name, args)
        assert (port.name, port.protocol) == (name, "rfc2217")
    (tmp_path / "env.yaml").write_text(environment)
    config = Config(str(tmp_path / "env.yaml"))
    assert set(config.get_targets()) == {"main", "vm0"} and config.get_imports() == [
        "avatar_hw.hil.labgrid"]
    strategy = config.get_targets()["main"]["drivers"]["AvatarStrategy"]
    assert set(strategy) <= set(attr.fields_dict(labgrid.AvatarStrategy))
    assert not [w for w in recwarn if "duplicate" in str(w.message).lower()]
