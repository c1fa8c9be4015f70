"""The pytest plugin (options, markers, fixtures, failure reports) and ``avatar-hw console``.

The "real board" here is ``avatar-hw serve`` against the stand-in stub over a
fake UIO tree (``FakeBoard``): the daemon, its control socket and its console
endpoints are real; only the hypervisor is stood in for.
"""

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from xml.etree import ElementTree

import pytest

from avatar_hw.endpoints.server import BUSY
from avatar_hw.errors import AvatarError
from avatar_hw.hil.target import console_url_from_info, emulated_board_missing
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
from test_guest_console import one_client_url

pytest_plugins = ["pytester"]


@pytest.fixture
def pytester(pytester, monkeypatch):
    """In-process runs without labgrid's plugin (when labgrid is installed): it starts its
    process-wide StepLogger in pytest_configure, which this very process already did."""
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:labgrid")
    return pytester


@pytest.fixture
def daemon(request, tmp_path):
    """A running daemon (stand-in stub) serving VM 0's console on unix: and rfc2217:, and
    the devices of the fixture's parameter (VMs config lines), if any. Its endpoints' paths
    are relative, as boards/vms-example.toml's, to its working directory ``board.root``."""
    board = FakeBoard(tmp_path / "board", vms=1)
    stub = StandinStub(board)
    config = board.root / "vms.toml"
    config.write_text('[vm.0]\nconsole = { endpoints = ["file:vm0.log", "unix:vm0.sock", '
                      '"rfc2217:127.0.0.1:0"] }\n' + getattr(request, "param", ""))
    log = open(board.root / "daemon.log", "wb")
    process = subprocess.Popen(board.serve_argv(config), stdout=log, stderr=subprocess.STDOUT,
                               cwd=board.root)
    try:
        stub.page.wait_attached()
        board.process = process
        yield board
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()
        stub.close()


# -- options and markers ----------------------------------------------------------------------

def test_options_in_help(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--avatar-board=FILE*", "*--avatar-console=URL*",
                                 "*--avatar-control=PATH*", "*--avatar-shell-timeout=SECONDS*",
                                 "*--avatar-board-linux*", "*avatar_board_linux (bool):*"])


def test_markers_are_declared_by_the_plugin(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.hw: needs a real Avatar board*",
                                 "@pytest.mark.emulated: runs on the emulated board*"])


MARKED = """
import pytest

@pytest.mark.hw
def test_needs_board():
    pass

@pytest.mark.hw
@pytest.mark.emulated
def test_either_board():
    pass

def test_plain():
    pass
"""


def test_hw_tests_are_skipped_without_a_board(pytester):
    pytester.makepyfile(MARKED)
    result = pytester.runpytest("--strict-markers", "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * test_hw_tests_are_skipped_without_a_board.py:*: "
                                 "needs a real Avatar board: run with "
                                 "--avatar-board FILE*"])


def test_hw_tests_run_with_a_board(pytester, daemon):
    pytester.makepyfile(MARKED)
    result = pytester.runpytest("--strict-markers", f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.control}")
    result.assert_outcomes(passed=3)


def test_emulated_mode_skips_naming_what_is_missing(pytester, monkeypatch):
    pytester.makepyfile("""
        import pytest
        @pytest.mark.emulated
        def test_uses_board(avatar_board):
            pass
    """)
    monkeypatch.setenv("PATH", "/nonexistent")
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no --avatar-board, and the emulated board needs "
                                 "qemu-system-arm, device-tree-compiler, gcc-aarch64-linux-gnu*"])


BOARD_LINUX_TEST = """
def test_in_the_board_linux(avatar_board_linux):
    assert avatar_board_linux.board_run("echo $((6 * 7)); exit 3") == ("42\\n", 3)
"""


@pytest.mark.parametrize("choice", ["none", "option", "ini"])
def test_board_linux_choice_skips_in_host_mode_or_picks_board_mode(pytester, monkeypatch, choice):
    """Without a board and without the choice, ``avatar_board_linux`` skips saying how to get
    one, before anything boots; with ``--avatar-board-linux`` or the ini key it asks for the
    emulated board (here missing its tools, so ``avatar_board`` skips naming them)."""
    pytester.makepyfile(BOARD_LINUX_TEST)
    if choice == "ini":
        pytester.makeini("[pytest]\navatar_board_linux = true\n")
    monkeypatch.setenv("PATH", "/nonexistent")
    result = pytester.runpytest("-rs", *(["--avatar-board-linux"] if choice == "option" else []))
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs a board Linux: the emulated board in host mode has none; "
                                 "run with --avatar-board-linux*" if choice == "none" else
                                 "*no --avatar-board, and the emulated board needs*"])


# -- fixtures on a (stood-in) real board -----------------------------------------------------------

BOARD_TESTS = """
import pytest

pytestmark = pytest.mark.hw

def test_board(avatar_board):
    assert avatar_board.kind == "hw"
    info = avatar_board.info()
    assert [vm["vm"] for vm in info["vms"]] == [0]
    assert avatar_board.devices(0, "console")[0]["irq"] == 48

def test_console(avatar_board, guest_console):
    assert guest_console.name == avatar_board.console_url()
    assert guest_console.port.is_open

def test_fails(avatar_board):
    assert False, "on purpose"
"""


def test_board_and_console_fixtures_on_a_running_daemon(pytester, daemon):
    pytester.makepyfile(BOARD_TESTS)
    result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.control}")
    result.assert_outcomes(passed=2, failed=1)
    # the failure report carries the board's interrupt diagnosis
    result.stdout.fnmatch_lines(["*- avatar-hw board -*",
                                 "vm0 console0 IRQ 48: status 0, 0 interrupt(s) raised*",
                                 "*GIC distributor not readable here*"])


def test_board_linux_of_a_real_board_is_where_the_tests_run(pytester, daemon):
    """On a real board the tests run in the board's Linux, next to ``avatar-hw serve``."""
    pytester.makepyfile(BOARD_LINUX_TEST)
    result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.control}")
    result.assert_outcomes(passed=1)


def test_console_option_overrides_the_daemons_endpoint(pytester, daemon):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    url = "socket://127.0.0.1:%d" % server.getsockname()[1]
    pytester.makepyfile(f"""
        def test_console(guest_console):
            assert guest_console.name == {url!r}
    """)
    try:
        result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                    f"--avatar-control={daemon.control}",
                                    f"--avatar-console={url}")
    finally:
        server.close()
    result.assert_outcomes(passed=1)


def test_from_another_machine_a_given_console_works_without_the_control_socket(pytester,
                                                                              daemon):
    """docs/testing.md: with only the console reachable (rfc2217 from another machine),
    console tests run and tests that need the control socket fail, saying so."""
    from avatar_hw import control
    info = control.request("info", str(daemon.control))
    endpoints = info["vms"][0]["devices"][0]["ports"][0]["endpoints"]
    address = next(e for e in endpoints if e.startswith("rfc2217:")).split(":", 1)[1]
    pytester.makepyfile("""
        def test_console(guest_console):
            assert guest_console.port.is_open

        def test_control(avatar_board):
            avatar_board.info()
    """)
    result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.root / 'nowhere.sock'}",
                                f"--avatar-console=rfc2217://{address}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*no avatar-hw daemon at *nowhere.sock*"])


VSOCK_TESTS = """
import pytest
from avatar_hw.endpoints.server import BUSY
from avatar_hw.errors import AvatarError

pytestmark = pytest.mark.hw

def test_stream(avatar_board, avatar_vsock):
    assert avatar_board.devices(0, "vsock")[0]["cid"] == 3
    # the stand-in stub's guest has no driver: it never accepts
    with pytest.raises(AvatarError, match="did not accept a connection to port 5000 within "
                                          "0.3 s"):
        avatar_vsock(5000, timeout=0.3)

def test_missing(avatar_vsock):
    with pytest.raises(AvatarError, match="VM 0 has no vsock device"):
        avatar_vsock(5000, vm=0)
"""


@pytest.mark.parametrize("daemon", ['vsock = { cid = 3, socket = "vsock.sock" }\n'],
                         indirect=True)
def test_vsock_fixture_uses_the_vms_vsock_device(pytester, daemon):
    pytester.makepyfile(VSOCK_TESTS)
    result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.control}", "-k", "stream")
    result.assert_outcomes(passed=1)


def test_vsock_fixture_without_a_vsock_device_says_how_to_add_one(pytester, daemon):
    pytester.makepyfile(VSOCK_TESTS)
    result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.control}", "-k", "missing")
    result.assert_outcomes(passed=1)


def test_board_without_a_daemon_is_a_clear_error(pytester, tmp_path):
    board = FakeBoard(tmp_path / "board", vms=1)
    pytester.makepyfile("""
        def test_board(avatar_board):
            pass
    """)
    result = pytester.runpytest(f"--avatar-board={board.board_file}",
                                f"--avatar-control={tmp_path / 'none.sock'}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*--avatar-board {board.board_file}: no avatar-hw daemon at "
                                 f"{tmp_path / 'none.sock'}: is 'avatar-hw serve' running? "
                                 "(give its control socket with --avatar-control)*"])


def test_console_url_from_the_daemons_info(daemon):
    """The daemon names its endpoints' paths in full (its config's are relative to its
    working directory): any client finds them."""
    from avatar_hw import control
    info = control.request("info", str(daemon.control))
    assert info["vms"][0]["devices"][0]["ports"][0]["endpoints"][:2] == [
        f"file:{daemon.root}/vm0.log", f"unix:{daemon.root}/vm0.sock"]
    assert console_url_from_info(info, 0, 0) == f"unix://{daemon.root}/vm0.sock"
    with pytest.raises(AvatarError, match="serves no VM 1; it serves vm0"):
        console_url_from_info(info, 1, 0)
    with pytest.raises(AvatarError, match="no port '3'; it has 0 \\(console\\)"):
        console_url_from_info(info, 0, "3")
    ports = info["vms"][0]["devices"][0]["ports"]
    ports[0]["endpoints"] = [e for e in ports[0]["endpoints"] if e.startswith("file:")]
    with pytest.raises(AvatarError, match="no endpoint a terminal can attach to "
                                          "\\(file:.*\\): add a pty:, unix:"):
        console_url_from_info(info, 0, 0)


# -- avatar-hw console --------------------------------------------------------------------------

# ``python -m avatar_hw`` with SIGINT ignored, as a background job of a non-interactive shell
# starts it (Python then installs no SIGINT handler of its own); exec keeps the disposition.
SIGINT_IGNORED = [sys.executable, "-c", "import os, signal, sys; "
                  "signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  "os.execv(sys.executable, [sys.executable, '-m', 'avatar_hw', *sys.argv[1:]])"]


# ``python -m avatar_hw`` that gets a SIGINT as miniterm has just started its threads, before
# the console waits for them
SIGINT_WHILE_STARTING = [sys.executable, "-c", "import os, signal, sys, time; "
                         "from serial.tools.miniterm import Miniterm; start = Miniterm.start; "
                         "Miniterm.start = lambda self: (start(self), "
                         "os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)); "
                         "from avatar_hw.cli import main; sys.exit(main(sys.argv[1:]))"]


def refusal_wait(seconds):
    """``python -m avatar_hw`` whose console waits ``seconds`` for an endpoint's refusal."""
    return [sys.executable, "-c", "import sys; from avatar_hw import terminal; "
            f"terminal.REFUSAL_WAIT = {seconds}; "
            "from avatar_hw.cli import main; sys.exit(main(sys.argv[1:]))"]


class OnPty:
    """``avatar-hw console ...`` with a pty as its terminal."""

    def __init__(self, *args, sigint_ignored=False, command=None):
        self.master, slave = os.openpty()
        command = command or (SIGINT_IGNORED if sigint_ignored
                              else [sys.executable, "-m", "avatar_hw"])
        self.process = subprocess.Popen([*command, "console", *args],
                                        stdin=slave, stdout=slave, stderr=slave,
                                        start_new_session=True)
        os.close(slave)
        self.output = b""

    def expect(self, text, timeout=10):
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in {self.output!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:              # EIO: the process closed the terminal
                    assert text.encode() in self.output, f"no {text!r} in {self.output!r}"

    def type(self, keys):
        os.write(self.master, keys.encode())

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        os.close(self.master)


@contextlib.contextmanager
def shell_server(path):
    """A Unix socket whose first client gets an interactive sh; closed (the sh killed) at
    the end."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    processes = []

    def serve():
        conn, _ = listener.accept()
        processes.append(subprocess.Popen(["/bin/sh", "-i"], stdin=conn, stdout=conn,
                                          stderr=conn, env={"PS1": "guest$ ", "PATH": "/bin"}))
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        listener.close()
        for process in processes:
            process.kill()
            process.wait()


def test_console_url_round_trip_and_exit_key(tmp_path):
    path = str(tmp_path / "guest.sock")
    with shell_server(path):
        term = OnPty("--url", f"unix://{path}")
        try:
            term.expect(f"--- avatar-hw console: unix://{path} --- quit: Ctrl+]")
            term.type("echo sum=$((2 + 3))\n")
            term.expect("sum=5")
            term.type("\x1d")
            assert term.process.wait(10) == 0
            term.expect("--- exit ---")
        finally:
            term.close()


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_sigint_ends_the_console_even_when_inherited_as_ignored(tmp_path, sigint_ignored):
    """kill -INT ends the terminal (its own Ctrl-C is the guest's), also when SIGINT was
    inherited as ignored (a background job of a non-interactive shell)."""
    path = str(tmp_path / "guest.sock")
    with shell_server(path):
        term = OnPty("--url", f"unix://{path}", sigint_ignored=sigint_ignored)
        try:
            term.expect(f"--- avatar-hw console: unix://{path} ---")
            term.type("echo sum=$((2 + 3))\n")
            term.expect("sum=5")                       # miniterm's threads run
            term.process.send_signal(signal.SIGINT)
            assert term.process.wait(30) == 130
            term.expect("--- exit ---")
        finally:
            term.close()


def test_sigint_while_the_terminal_starts_ends_it_with_its_exit_line(tmp_path):
    path = str(tmp_path / "guest.sock")
    with shell_server(path):
        term = OnPty("--url", f"unix://{path}", command=SIGINT_WHILE_STARTING)
        try:
            assert term.process.wait(30) == 130
            term.expect("--- exit ---")
        finally:
            term.close()


def test_console_of_a_running_daemon(daemon):
    term = OnPty("0", "--control", str(daemon.control))
    try:
        term.expect(f"--- avatar-hw console: unix://{daemon.root}/vm0.sock ---")
        term.type("\x1d")
        assert term.process.wait(10) == 0
    finally:
        term.close()


def test_console_peer_going_away_ends_the_terminal(tmp_path):
    path = str(tmp_path / "guest.sock")
    with shell_server(path):
        term = OnPty("--url", f"unix://{path}")
        try:
            term.expect("guest$ ")
            term.type("exit\n")
            term.expect("socket disconnected")
            assert term.process.wait(30) == 1       # no key needed, not a success
            term.expect("--- exit ---")
        finally:
            term.close()


@pytest.mark.parametrize("wait", [60, 0], ids=["refused", "refused-late"])
def test_a_refused_console_says_so_in_one_line_and_fails(tmp_path, wait):
    """An endpoint that already has a client sends one line and closes: that line only,
    status 2 (the refusal arrives before the terminal starts: a daemon refuses at once).
    One later than the wait (a loaded daemon) still ends the terminal, status 1."""
    line = BUSY.format(url=f"unix:{tmp_path}/console.sock")
    listener, url = one_client_url(socket.AF_UNIX, tmp_path,
                                   lambda conn: conn.sendall(line.encode()))
    try:
        term = OnPty("--url", url, command=refusal_wait(wait))
        try:
            assert term.process.wait(30) == (2 if wait else 1)
            term.expect(line.rstrip())
            if wait:
                term.expect("\n")
                assert term.output == line.rstrip().encode() + b"\r\n"
            else:
                term.expect("--- exit ---")
        finally:
            term.close()
    finally:
        listener.close()


def test_console_errors_are_one_line(tmp_path):
    for args, message in ((["0", "--control", str(tmp_path / "none.sock")],
                           "no avatar-hw daemon at"),
                          (["--url", "nope://x"], "console nope://x: invalid URL")):
        result = subprocess.run([sys.executable, "-m", "avatar_hw", "console", *args],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


# -- console logs, JUnit, VM consoles and reset (the emulated board) ----------------------

EMULATED_TESTS = """
import pytest

pytestmark = pytest.mark.emulated

def test_one(guest_shell):
    assert guest_shell.run("echo first-$((1 + 1)); touch /root/mark") == ("first-2\\n", 0)

def test_two(avatar_console, guest_shell):
    assert avatar_console(0) is guest_shell
    assert guest_shell.run("echo second-$((2 + 2)); test -e /root/mark")[1] == 0

@pytest.mark.avatar_reset
def test_three_after_a_reset(guest_shell):
    assert guest_shell.run("test -e /root/mark")[1] == 1      # a fresh guest
    guest_shell.sendline("echo third-$((3 + 3))")
    assert guest_shell.expect(["never", r"third-(\\d)"], 30) == 1
"""


@pytest.mark.emulated
@pytest.mark.skipif(emulated_board_missing() is not None, reason=str(emulated_board_missing()))
def test_console_logs_per_test_junit_properties_and_reset(pytester, tmp_path):
    from avatar_hw.emulated.assets import guest_assets
    pytester.makepyfile(test_guest=EMULATED_TESTS)
    logs, junit = tmp_path / "logs", tmp_path / "junit.xml"
    result = pytester.runpytest(f"--avatar-log-dir={logs}", f"--junitxml={junit}",
                                "-o", "junit_logging=system-out")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"avatar-hw console logs: {logs}"])
    files = sorted(p.name for p in logs.iterdir())
    assert files == ["test_guest.py_test_one.vm0.log",
                     "test_guest.py_test_three_after_a_reset.vm0.log",
                     "test_guest.py_test_two.vm0.log"]
    one, three, two = ((logs / f).read_text() for f in files)
    assert "first-2" in one and "second-4" not in one
    assert "second-4" in two and "first-2" not in two
    assert "third-6" in three
    cases = {case.get("name"): case for case in ElementTree.parse(junit).iter("testcase")}
    for name, case in cases.items():
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert props["avatar_board"] == "emulated" and props["avatar_target"] == "emulated"
        assert props["avatar_kernel"] == guest_assets().release
        assert props["avatar_hw_version"]
    assert "first-2" in cases["test_one"].find("system-out").text
    assert "avatar-hw vm0 console port 0" in cases["test_two"].find("system-out").text


def test_a_bench_resets_with_its_command_or_says_how(daemon, tmp_path):
    from avatar_hw.hil.target import HardwareTarget
    bench = HardwareTarget(daemon.board_file, control_path=str(daemon.control))
    with pytest.raises(AvatarError, match="give --avatar-reset-command 'CMD'"):
        bench.reset(0)
    done = tmp_path / "reset"
    bench.reset_command = f"echo {{vm}} >{done}"
    assert bench.reset(1) == [1] and done.read_text() == "1\n"
    bench.reset_command = "echo no power switch >&2; exit 3"
    with pytest.raises(AvatarError, match="exited 3: no power switch"):
        bench.reset(0)
    props = bench.properties()
    assert props["avatar_board"] == "qemu-virt" or props["avatar_board"]
    assert props["avatar_target"] == "hw" and "avatar_kernel" not in props


FAULT_TESTS = """
import pytest
from avatar_hw import control

pytestmark = pytest.mark.hw

def test_arms(avatar_board):
    armed = avatar_board.inject(vm=0, device="console", fault="irq-drop", count=3)
    assert armed["fault"] == "irq-drop" and armed["options"]["count"] == 3
    assert control.request("faults", avatar_board.control_path)[0]["faults"]

def test_finds_none_armed(avatar_board):
    assert control.request("faults", avatar_board.control_path) == []
"""


def test_fault_inject_through_the_plugin_is_cleared_at_the_tests_end(pytester, daemon):
    pytester.makepyfile(FAULT_TESTS)
    result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.control}")
    result.assert_outcomes(passed=2)


def test_a_board_file_that_is_not_there_is_one_line(pytester, tmp_path):
    """A mistake in --avatar-board itself (no such file) reads as one line, as a daemon that
    is not running does, not a traceback through the plugin."""
    pytester.makepyfile("""
        def test_board(avatar_board):
            pass
    """)
    result = pytester.runpytest(f"--avatar-board={tmp_path / 'nope.toml'}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*--avatar-board {tmp_path / 'nope.toml'}: "
                                 f"{tmp_path / 'nope.toml'}: no such board file*"])
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*read_toml*")


DAEMON_DIES = """
import os, signal, time
import pytest

pytestmark = pytest.mark.hw

def test_arms_a_fault_then_the_daemon_dies(avatar_board, guest_console):
    avatar_board.inject(vm=0, device="console", fault="irq-drop", count=3)
    os.kill({pid}, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while open("/proc/{pid}/stat").read().split()[2] != "Z":     # our parent reaps it
        assert time.monotonic() < deadline
        time.sleep(0.05)

def test_next(avatar_board):
    pass

def test_next_on_the_console(guest_console):
    pass
"""


def test_a_daemon_dying_with_a_fault_armed_is_one_line_against_its_test(pytester, daemon,
                                                                       monkeypatch):
    """Its faults cannot be cleared: one line in that test's teardown; the next test runs,
    one on the console (the daemon's, gone, not to be found again) errors with one line, and
    the session's consoles are closed without a word."""
    from avatar_hw.hil import pytest_plugin
    monkeypatch.setattr(pytest_plugin, "REOPEN_TIMEOUT", 1)
    pytester.makepyfile(DAEMON_DIES.replace("{pid}", str(daemon.process.pid)))
    result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.control}")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_arms_a_fault_then_the_daemon_dies*",
        "avatar-hw: the faults this test armed were not cleared: no avatar-hw daemon at *",
        "*ERROR at setup of test_next_on_the_console*",
        f"avatar-hw: vm0 console port 0 (unix://{daemon.root}/vm0.sock) went away (*) and did "
        "not open again: no avatar-hw daemon at *"])
    result.stdout.no_fnmatch_line("*was not torn down properly*")
    result.stdout.no_fnmatch_line("*Traceback*")


BOARD_LINUX_FAULT = """
from avatar_hw import control

def test_arms_and_fails(avatar_board_linux):
    avatar_board_linux.inject(vm=0, device="console", fault="irq-drop", count=3)
    assert False, "on purpose"

def test_finds_none_armed(avatar_board):
    assert control.request("faults", avatar_board.control_path) == []
"""


def test_a_board_through_avatar_board_linux_is_cleared_and_reported(pytester, daemon, tmp_path):
    pytester.makepyfile(BOARD_LINUX_FAULT)
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.control}", f"--junitxml={junit}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*- avatar-hw board -*", "vm0 console0 IRQ 48: *"])
    case = next(c for c in ElementTree.parse(junit).iter("testcase")
                if c.get("name") == "test_arms_and_fails")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["avatar_target"] == "hw"


def test_a_console_option_that_does_not_open_is_one_line_naming_it(pytester, daemon, tmp_path):
    pytester.makepyfile("""
        def test_one(guest_console):
            pass

        def test_two(guest_console):
            pass
    """)
    url = str(tmp_path / "ttyUSB9")
    result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                f"--avatar-control={daemon.control}", f"--avatar-console={url}")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([f"--avatar-console {url}: console {url}: cannot open: No such "
                                 "file or directory (give the guest console's URL, or leave "
                                 "the option out to use the daemon's endpoint)"] * 2)
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*During handling*")


def test_a_log_dir_that_is_a_file_is_a_usage_error(pytester, tmp_path):
    pytester.makepyfile("def test_plain():\n    pass\n")
    afile = tmp_path / "afile"
    afile.write_text("")
    result = pytester.runpytest(f"--avatar-log-dir={afile}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --avatar-log-dir {afile}: cannot make this "
                                 "directory (File exists): give a directory"])


@pytest.mark.parametrize("value, message", [
    ("soon", "not a number of seconds: give one such as 120"),
    ("nan", "not a number of seconds: give one such as 120"),
    ("-1", "negative: give 0 or more seconds")])
def test_a_shell_timeout_that_is_not_seconds_is_a_usage_error(pytester, value, message):
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest(f"--avatar-shell-timeout={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.lines[0] == f"ERROR: --avatar-shell-timeout {value}: {message}"
    assert not result.stderr.lines[1:] or not result.stderr.lines[1].strip()


def test_the_shell_timeout_is_how_long_guest_shell_waits(pytester, tmp_path):
    """A console that never answers: guest_shell gives up after --avatar-shell-timeout."""
    board = FakeBoard(tmp_path / "board", vms=1)
    done = threading.Event()
    listener, url = one_client_url(socket.AF_UNIX, tmp_path, lambda conn: done.wait(60))
    pytester.makepyfile("def test_shell(guest_shell):\n    pass\n")
    try:
        start = time.monotonic()
        result = pytester.runpytest(f"--avatar-board={board.board_file}",
                                    f"--avatar-control={tmp_path / 'none.sock'}",
                                    f"--avatar-console={url}", "--avatar-shell-timeout=0.5")
        elapsed = time.monotonic() - start
    finally:
        done.set()
        listener.close()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{url}: no shell answered within 0.5 s*"])
    assert elapsed < 30


SHELL_ON_SOCKET = os.path.join(os.path.dirname(__file__), "shell_on_socket.py")

RESET_TESTS = """
import pytest

pytestmark = pytest.mark.hw

def test_before(guest_shell):
    assert guest_shell.run("echo $((1 + 1))") == ("2\\n", 0)

@pytest.mark.avatar_reset
def test_after_a_power_cycle(guest_shell):
    assert guest_shell.run("echo $((2 + 2))") == ("4\\n", 0)
"""


def shell_on_socket(path, delay=0, pty=False):
    """A guest console stand-in on Unix socket ``path`` (tests/shell_on_socket.py; ``pty``:
    the shell on a terminal); ``delay`` 0: once it listens."""
    subprocess.Popen([sys.executable, SHELL_ON_SOCKET, str(path), str(delay),
                      *(["pty"] if pty else [])])
    deadline = time.monotonic() + 60
    while delay == 0 and not path.exists():
        assert time.monotonic() < deadline, "the console stand-in did not start"
        time.sleep(0.05)


def test_a_reset_reattaches_where_the_console_is_served_now(tmp_path):
    """After a reset the daemon may not answer yet, then serve the console elsewhere (a new
    pty, a new TCP port): ``reopen`` (``avatar_reset``) asks where on every try."""
    from avatar_hw.hil.console import GuestConsole
    before, after = tmp_path / "before.sock", tmp_path / "after.sock"
    shell_on_socket(before)
    answers = [AvatarError("no avatar-hw daemon at /run/avatar-hw.sock"), f"unix://{after}"]

    def locate():
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    try:
        with GuestConsole.open(f"unix://{before}") as console:
            console.wait_shell(30)
            subprocess.run(f"kill -s KILL -- -$(cat {before}.pid)", shell=True)
            shell_on_socket(after, 1)
            console.reopen(locate, 30)
            console.wait_shell(30)
            assert console.run("echo $((2 + 2))") == ("4\n", 0)
            assert console.name == f"unix://{after}"
    finally:
        subprocess.run(f"kill -s KILL -- -$(cat {before}.pid) -$(cat {after}.pid)", shell=True)


def test_a_bench_reset_waits_for_its_console_to_come_back(pytester, daemon, tmp_path):
    """The reset command returns while the guest console is down (a power cycle): the
    console is opened again once it is back, and the guest's shell answers."""
    path = tmp_path / "guest.sock"
    pidfile = f"{path}.pid"
    shell_on_socket(path)
    cycle = (f"kill -s KILL -- -$(cat {pidfile}); "
             f"{sys.executable} {SHELL_ON_SOCKET} {path} 2 >/dev/null 2>&1 &")
    pytester.makepyfile(RESET_TESTS)
    try:
        result = pytester.runpytest(f"--avatar-board={daemon.board_file}",
                                    f"--avatar-control={daemon.control}",
                                    f"--avatar-console=unix://{path}",
                                    f"--avatar-reset-command={cycle}")
    finally:
        subprocess.run(f"kill -s KILL -- -$(cat {pidfile})", shell=True)
    result.assert_outcomes(passed=2)


LEFT_RUNNING = """
import pytest

pytestmark = pytest.mark.hw

def test_leaves_a_command_running(guest_shell):
    assert guest_shell.run("echo $((1 + 1))") == ("2\\n", 0)
    guest_shell.sendline("sleep 1000")
    guest_shell.send("echo half-typ")
    assert False, "on purpose"

def test_next(guest_shell):
    assert guest_shell.run("echo $((2 + 2))") == ("4\\n", 0)
"""


def test_guest_shell_interrupts_what_the_last_test_left_running(pytester, tmp_path):
    """A failed test's command still running and its half-typed line (a terminal's shell):
    guest_shell's Ctrl-C gets the next test a prompt (without it, no shell answered)."""
    board = FakeBoard(tmp_path / "board", vms=1)
    path = tmp_path / "guest.sock"
    shell_on_socket(path, pty=True)
    pytester.makepyfile(LEFT_RUNNING)
    try:
        result = pytester.runpytest(f"--avatar-board={board.board_file}",
                                    f"--avatar-control={tmp_path / 'none.sock'}",
                                    f"--avatar-console=unix://{path}",
                                    "--avatar-shell-timeout=20")
    finally:
        subprocess.run(f"kill -s KILL -- -$(cat {path}.pid)", shell=True)
    result.assert_outcomes(passed=1, failed=1)


LEFT_UNREAD = """
import time
import pytest
from avatar_hw.hil.console import ConsoleTimeout

pytestmark = pytest.mark.hw

def test_leaves_output_unread(guest_shell):
    guest_shell.sendline("echo first-$((1 + 1)); echo unread-$((40 + 2))")
    guest_shell.expect("first-2", 30)
    deadline = time.monotonic() + 30
    while "unread-42" not in guest_shell.buffer:
        assert time.monotonic() < deadline
        guest_shell.drain()

def test_next(guest_console):
    assert guest_console.buffer == ""
    assert guest_console.expect(["unread-42", ConsoleTimeout], 0.5) == 1
"""


def test_output_a_test_left_unread_goes_to_its_log_not_to_the_next_test(pytester, tmp_path):
    board = FakeBoard(tmp_path / "board", vms=1)
    path = tmp_path / "guest.sock"
    logs, junit = tmp_path / "logs", tmp_path / "junit.xml"
    shell_on_socket(path, pty=True)
    pytester.makepyfile(test_unread=LEFT_UNREAD)
    try:
        result = pytester.runpytest(f"--avatar-board={board.board_file}",
                                    f"--avatar-control={tmp_path / 'none.sock'}",
                                    f"--avatar-console=unix://{path}", f"--avatar-log-dir={logs}",
                                    f"--junitxml={junit}", "-o", "junit_logging=system-out")
    finally:
        subprocess.run(f"kill -s KILL -- -$(cat {path}.pid)", shell=True)
    result.assert_outcomes(passed=2)
    assert "unread-42" in (logs / "test_unread.py_test_leaves_output_unread.vm0.log").read_text()
    assert "unread-42" not in (logs / "test_unread.py_test_next.vm0.log").read_text()
    cases = {case.get("name"): case for case in ElementTree.parse(junit).iter("testcase")}
    assert "unread-42" in cases["test_leaves_output_unread"].find("system-out").text


GOES_AWAY = """
import subprocess
import pytest

pytestmark = pytest.mark.hw

def test_power_cut(guest_shell):
    assert guest_shell.run("echo $((1 + 1))") == ("2\\n", 0)
    subprocess.run("{cut}; {start_again}", shell=True)

def test_back(guest_shell):
    assert guest_shell.run("echo $((2 + 2))") == ("4\\n", 0)

def test_power_cut_for_good(guest_console):
    subprocess.run("{cut}", shell=True)

def test_gone(guest_shell):
    pass

def test_still_gone(avatar_console):
    avatar_console(0)
"""


def test_a_console_gone_away_is_opened_again_for_the_next_test(pytester, tmp_path, monkeypatch):
    """The guest console's peer goes away during a test (a power cut, the console back a second
    later): the next test has it again. Gone for good: each test using it fails with one line
    (at setup: an error), the tests after it still try, once each (no wait of
    ``REOPEN_TIMEOUT`` per test)."""
    from avatar_hw.hil import pytest_plugin
    from avatar_hw.hil.console import GuestConsole
    monkeypatch.setattr(pytest_plugin, "REOPEN_TIMEOUT", 3)
    reopen, timeouts = GuestConsole.reopen, []

    def reopening(console, locate, timeout=0.0):
        timeouts.append(timeout)
        return reopen(console, locate, timeout)
    monkeypatch.setattr(GuestConsole, "reopen", reopening)
    board = FakeBoard(tmp_path / "board", vms=1)
    path = tmp_path / "guest.sock"
    shell_on_socket(path)
    pytester.makepyfile(GOES_AWAY.format(
        cut=f"kill -s KILL -- -$(cat {path}.pid)",
        start_again=f"{sys.executable} {SHELL_ON_SOCKET} {path} 1 >/dev/null 2>&1 &"))
    try:
        result = pytester.runpytest(f"--avatar-board={board.board_file}",
                                    f"--avatar-control={tmp_path / 'none.sock'}",
                                    f"--avatar-console=unix://{path}", "-rfE")
    finally:
        subprocess.run(f"kill -s KILL -- -$(cat {path}.pid)", shell=True)
    result.assert_outcomes(passed=3, errors=1, failed=1)
    gone = (f"avatar-hw: vm0 console port 0 (unix://{path}) went away (read failed: socket "
            f"disconnected) and did not open again: console unix://{path}: cannot open: "
            f"Connection refused*")
    result.stdout.fnmatch_lines(["*ERROR at setup of test_gone*", gone,
                                 "*_ test_still_gone _*", gone])
    assert timeouts == [3, 3, 0]          # back a second later; gone: waited for, then once
    result.stdout.no_fnmatch_line("*Traceback*")


def test_hook_options_are_those_of_every_pluggy_pytest_7_2_takes():
    """pyproject.toml says pytest>=7.2, which installs with pluggy 1.0: its hookimpl knows
    no ``wrapper=True`` (pluggy 1.2), and the plugin is loaded by every pytest session."""
    import ast
    import pathlib
    import avatar_hw.hil.pytest_plugin as plugin
    tree = ast.parse(pathlib.Path(plugin.__file__).read_text())
    used = {keyword.arg for node in ast.walk(tree) if isinstance(node, ast.Call)
            and ast.unparse(node.func) == "pytest.hookimpl" for keyword in node.keywords}
    assert used and used <= {"hookwrapper", "tryfirst", "trylast", "optionalhook"}, used
