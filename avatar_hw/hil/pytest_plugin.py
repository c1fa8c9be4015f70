"""pytest plugin (entry point ``pytest11``): HIL tests on a real Avatar board or the emulated one.

Options:

- ``--avatar-board FILE``: a board file (or a shipped board's name): run against the
  real board whose ``avatar-hw serve`` is reached through ``--avatar-control``;
- ``--avatar-console URL``: the guest console (VM 0, port 0) as any pyserial URL:
  /dev/ttyUSB0, /dev/ttyAMA0, a pty path, socket://host:port, rfc2217://host:port,
  unix:///path; default: the daemon's own endpoint for it;
- ``--avatar-control PATH``: the daemon's control socket (default as ``avatar-hw info``);
- ``--avatar-reset-command CMD``: how a bench resets VM ``{vm}`` (``avatar_reset``);
- ``--avatar-log-dir DIR``: where the per-test console logs go (default: pytest's
  temporary directory, ``<basetemp>/avatar-logs``; the terminal summary names it); made
  at configure time (a usage error if it cannot be).
- ``--avatar-shell-timeout SECONDS``: how long ``guest_shell`` and ``avatar_reset`` wait for
  the guest's shell to answer (default 120; a usage error unless a number of 0 or more).
- ``--avatar-board-linux`` (or the ini key ``avatar_board_linux = true``): without
  ``--avatar-board``, boot the emulated board in board mode (docs/emulated-board.md): the
  board's own Linux runs ``avatar-hw serve`` and the guest is VM 1 (``guest_console`` is
  VM 1's console). Slow: a few minutes to boot, seconds per control request.

Markers (declared here, nowhere else):

- ``hw``: needs a real board; skipped unless ``--avatar-board`` is given;
- ``emulated``: runs on the emulated board. A test marked both runs on the real
  board when one is given, else on the emulated board;
- ``avatar_reset(vm=0)``: start the VM's guest again before the test (``avatar_reset``).

Fixtures:

- ``avatar_board`` (session): a ``avatar_hw.hil.target`` Target: the real board, or the
  emulated board booted once for the session (skipped with the reason when it cannot run);
- ``avatar_console`` (session): ``avatar_console(vm=0, port=0)`` is the ``GuestConsole``
  on that VM's console port, opened once for the session; one that went away (``gone``: a
  daemon restarted, a VM reset, the peer closed) is looked up and opened again for the next
  test that uses it, which errors with one line naming it if that fails within 10 s (the
  tests after it try once each);
- ``guest_console`` (session): ``avatar_console(avatar_board.guest_vm)`` (VM 0; VM 1 in
  board mode);
- ``avatar_board_linux``: ``avatar_board`` where it has a board Linux (a real board, whose
  Linux this runs in; the emulated board in board mode), else the test is skipped saying
  how to get one: ``avatar_board_linux.board_run("avatar-hw list --json")`` is
  ``(output, exit status)`` of a shell command there;
- ``guest_shell``: the same console once a shell answers on it (Ctrl-C first: a command a
  previous test left running, or its half-typed line, is ended);
- ``avatar_vsock``: ``avatar_vsock(port, vm=0, timeout=30)`` is a connected stream socket
  to guest ``port`` through the VM's vsock device (waits until the guest listens; closed
  after the test);
- ``avatar_board.inject(vm=0, device="block", fault="ioerr", sectors="0-7", ...)``: a fault
  armed for the running test (docs/testing.md, "Fault injection"), cleared at its end;
- ``avatar_reset``: ``avatar_reset(vm=0)`` starts that VM's guest again (the emulated
  board: QEMU and the daemon restart, the disk is kept; a bench: ``--avatar-reset-command``)
  and waits until its shell answers on every console the test holds.

Reports: every console opened through ``avatar_console`` is logged per test, one file
per test and VM console (``<log dir>/<test id>.vm<N>[-port<P>].log``; what the test left
unread is drained into it at its end, and no later test can match it), and attached to
the test's report as a "Captured stdout" section, so JUnit XML carries it with
``junit_logging = system-out`` (or ``all``). Tests using ``avatar_board`` (or
``avatar_board_linux``) get the JUnit properties ``avatar_board``, ``avatar_target``,
``avatar_kernel`` (the guest's release, on a real board once ``guest_shell`` has asked),
``avatar_hw_version`` and ``avatar_hw_commit``. When such a test fails, its report gets an
"avatar-hw board" section: the interrupt diagnosis (the daemon's counters and the GIC's
view of each SPI) and the console's last output; and the screen of each VM with a gpu is
saved as ``<log dir>/<test id>.vm<N>.png`` and named in an "avatar-hw screen" section
and in the captured stdout (JUnit XML's system-out) as ``[[ATTACHMENT|path]]``, the
convention of Jenkins' JUnit attachments.
"""

import functools
import math
import re
import time
from pathlib import Path

import pytest

MARKERS = {
    "hw": "needs a real Avatar board (skipped unless --avatar-board is given)",
    "emulated": "runs on the emulated board (QEMU + EL2 stub + arm64 Linux; slow)",
    "avatar_reset": "avatar_reset(vm=0): start the VM's guest again before the test",
}
HW_SKIP = ("needs a real Avatar board: run with --avatar-board FILE (e.g. boards/rpi4.toml) "
           "next to a running 'avatar-hw serve'")
BOARD_LINUX_SKIP = ("needs a board Linux: the emulated board in host mode has none; run with "
                    "--avatar-board-linux (or avatar_board_linux = true in the ini file), or "
                    "--avatar-board FILE on a real board")
SHELL_TIMEOUT = 120
REOPEN_TIMEOUT = 10         # a console gone away: how long the next test tries to open it again
                            # (once it did not open, later tests try once: no wait each)


def pytest_addoption(parser):
    group = parser.getgroup("avatar-hw", "Avatar board (avatar-hw)")
    group.addoption("--avatar-board", metavar="FILE",
                    help="board file or shipped board name: run HIL tests on this real board")
    group.addoption("--avatar-console", metavar="URL",
                    help="guest console (VM 0) as a pyserial URL: /dev/ttyUSB0, a pty path, "
                         "socket://host:port, rfc2217://host:port, unix:///path "
                         "(default: the daemon's endpoint)")
    group.addoption("--avatar-control", metavar="PATH",
                    help="the daemon's control socket (default: $AVATAR_HW_CONTROL or the "
                         "daemon's default)")
    group.addoption("--avatar-reset-command", metavar="CMD",
                    help="shell command that has the hypervisor restart VM {vm}'s guest on "
                         "a bench, for avatar_reset")
    group.addoption("--avatar-log-dir", metavar="DIR",
                    help="per-test console logs (default: <pytest basetemp>/avatar-logs)")
    group.addoption("--avatar-shell-timeout", metavar="SECONDS",
                    help=f"how long guest_shell and avatar_reset wait for the guest's shell "
                         f"to answer (default: {SHELL_TIMEOUT})")
    group.addoption("--avatar-board-linux", action="store_true",
                    help="without --avatar-board: the emulated board in board mode (its own "
                         "Linux runs avatar-hw; the guest is VM 1; slow)")
    parser.addini("avatar_board_linux", type="bool", default=False,
                  help="as --avatar-board-linux")


def _stem(item):
    """The test's id as a file name stem."""
    return re.sub(r"[^\w.\[\]-]+", "_", item.nodeid).strip("_")


class _Consoles:
    """The session's consoles by (vm, port) and the running test's log files."""

    def __init__(self):
        self.log_dir = None
        self.by_port = {}
        self.test = None                # the running item's log file stem
        self.logs = {}                  # (vm, port) -> (path, file) of this test's log
        self.unreachable = set()        # (vm, port) whose last reopen failed

    def open_log(self, key):
        vm, port = key
        path = self.log_dir / f"{self.test}.vm{vm}{f'-port{port}' if str(port) != '0' else ''}.log"
        log = open(path, "a", encoding="utf-8", errors="replace")
        self.by_port[key].log = log
        self.logs[key] = path, log

    def make_log_dir(self, config, tmp_path_factory):
        if self.log_dir is None:
            option = config.getoption("avatar_log_dir")
            self.log_dir = (Path(option) if option else
                            tmp_path_factory.getbasetemp() / "avatar-logs")
            self.log_dir.mkdir(parents=True, exist_ok=True)

    def log_path(self, item, suffix):
        """``<log dir>/<test id>.vm{vm}<suffix>``, a format string (the log dir is made when
        the test opened no console)."""
        self.make_log_dir(item.config, item.config._tmp_path_factory)
        return str(self.log_dir / f"{_stem(item)}.vm{{vm}}{suffix}")

    def start_test(self, item):
        """Logs open; what came between tests read into them, not left for the test to match
        (a console that went away meanwhile is found so: ``gone``)."""
        self.test = _stem(item)
        for key, console in self.by_port.items():
            self.open_log(key)
            _drain(console)
            console.buffer = ""

    def back(self, key, board):
        """The console of ``key``, opened again (looked up again: a daemon started again may
        serve it elsewhere) if it went away; the test fails with one line if it cannot be
        (``REOPEN_TIMEOUT``)."""
        from ..errors import AvatarError
        console, problem = self.by_port[key], None
        if console.gone is None:
            self.unreachable.discard(key)       # open again meanwhile (avatar_reset's reopen)
            return console
        timeout = 0 if key in self.unreachable else REOPEN_TIMEOUT
        try:
            console.reopen(functools.partial(board.console_url, *key), timeout)
            self.unreachable.discard(key)
        except AvatarError as err:
            self.unreachable.add(key)
            vm, port = key
            problem = (f"avatar-hw: vm{vm} console port {port} ({console.name}) went away "
                       f"({console.gone}) and did not open again: {err}")
        if problem:                         # one line (outside the except: no chained error)
            pytest.fail(problem, pytrace=False)
        return console

    def end_test(self, item):
        for key, (path, log) in self.logs.items():
            console = self.by_port.get(key)         # gone when the session ended with this test
            if console is not None:
                _drain(console)
                console.buffer = ""         # the next test matches its own output only
                console.log = None
            log.close()
            text = path.read_text(errors="replace")
            vm, port = key
            item.add_report_section("teardown", "stdout",
                                    f"--- avatar-hw vm{vm} console port {port} ({path}) ---\n"
                                    f"{text}")
        self.logs = {}
        self.test = None

    def close_all(self):
        """Session end: what each console holds goes into the last test's log; all closed."""
        consoles, self.by_port = list(self.by_port.values()), {}
        for console in consoles:
            _drain(console)
            console.close()


def _drain(console):
    """What ``console`` holds, into its log (bounded: a guest may never stop printing)."""
    try:
        console.drain()
    except Exception:                   # a console gone away: its log ends here
        pass


_STATE = pytest.StashKey[_Consoles]()
_TEARDOWN_PROBLEM = pytest.StashKey[str]()
_BOARD = pytest.StashKey[object]()      # the session's avatar_board, while it lives
_SHELL_TIMEOUT = pytest.StashKey[float]()


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config.stash[_STATE] = _Consoles()
    log_dir = config.getoption("avatar_log_dir", None)
    if log_dir:
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise pytest.UsageError(f"--avatar-log-dir {log_dir}: cannot make this directory "
                                    f"({err.strerror}): give a directory") from None
    config.stash[_SHELL_TIMEOUT] = _shell_timeout(config.getoption("avatar_shell_timeout", None))


def _shell_timeout(text):
    """``--avatar-shell-timeout``'s seconds (``SHELL_TIMEOUT`` without it); a usage error
    for anything but a number of 0 or more."""
    if text is None:
        return SHELL_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise pytest.UsageError(f"--avatar-shell-timeout {text}: not a number of seconds: "
                                f"give one such as {SHELL_TIMEOUT}")
    if seconds < 0:
        raise pytest.UsageError(f"--avatar-shell-timeout {text}: negative: give 0 or more "
                                "seconds")
    return seconds


def pytest_collection_modifyitems(config, items):
    if config.getoption("avatar_board"):
        return
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        if "hw" in marks and "emulated" not in marks:
            item.add_marker(pytest.mark.skip(reason=HW_SKIP))


@pytest.fixture(scope="session")
def avatar_board(request):
    from ..errors import AvatarError
    from . import target
    config = request.config
    board_file = config.getoption("avatar_board")
    if board_file:
        board = None
        try:                # a mistake in the options is one line, not a traceback per test
            board = target.HardwareTarget(
                board_file, console_url=config.getoption("avatar_console"),
                control_path=config.getoption("avatar_control"),
                reset_command=config.getoption("avatar_reset_command"))
            if not config.getoption("avatar_console"):
                board.info()    # given a console, the daemon may be out of reach (remote)
        except AvatarError as err:
            if board is not None:
                board.close()
            pytest.fail(f"--avatar-board {board_file}: {err}", pytrace=False)
    else:
        missing = target.emulated_board_missing()
        if missing:
            pytest.skip(f"no --avatar-board, and {missing}")
        board = target.EmulatedTarget(board_linux=_board_linux(config)).start()
    config.stash[_BOARD] = board
    yield board
    del config.stash[_BOARD]
    board.close()


def _board_linux(config):
    """The emulated board in board mode? (--avatar-board-linux, else the ini key)"""
    return bool(config.getoption("avatar_board_linux") or config.getini("avatar_board_linux"))


@pytest.fixture
def avatar_board_linux(request):
    config = request.config
    if not config.getoption("avatar_board") and not _board_linux(config):
        pytest.skip(BOARD_LINUX_SKIP)
    return request.getfixturevalue("avatar_board")


@pytest.fixture(scope="session")
def avatar_console(request, avatar_board, tmp_path_factory):
    state = request.config.stash[_STATE]
    state.make_log_dir(request.config, tmp_path_factory)

    def console(vm=0, port=0):
        from ..errors import AvatarError
        key = (vm, port)
        if key not in state.by_port:
            problem = None
            try:
                state.by_port[key] = avatar_board.console(vm, port)
            except AvatarError as err:
                problem = str(err)
            if problem:                     # one line (outside the except: no chained error)
                pytest.fail(problem, pytrace=False)
            if state.test is not None:
                state.open_log(key)
        state.back(key, avatar_board)
        if vm == avatar_board.guest_vm:
            avatar_board.last_console = state.by_port[key]
        return state.by_port[key]

    yield console
    state.close_all()


@pytest.fixture(scope="session")
def guest_console(avatar_console, avatar_board):
    return avatar_console(avatar_board.guest_vm)


@pytest.fixture
def guest_shell(request, guest_console, avatar_board):
    guest_console.wait_shell(request.config.stash[_SHELL_TIMEOUT], interrupt=True)
    if avatar_board.kernel is None:
        avatar_board.kernel = guest_console.check("uname -r").strip()
    return guest_console


@pytest.fixture
def avatar_vsock(avatar_board):
    opened = []

    def open_stream(port, vm=0, timeout=30):
        opened.append(avatar_board.vsock(port, vm, timeout))
        return opened[-1]

    yield open_stream
    for sock in opened:
        sock.close()


@pytest.fixture
def avatar_reset(request, avatar_board, avatar_console):
    state = request.config.stash[_STATE]
    timeout = request.config.stash[_SHELL_TIMEOUT]

    def reset(vm=0):
        from .console import ConsoleTimeout
        restarted = avatar_board.reset(vm)
        for (console_vm, port), console in state.by_port.items():
            if console_vm in restarted:
                deadline = time.monotonic() + timeout       # for the endpoint and the shell
                console.reopen(functools.partial(avatar_board.console_url, console_vm, port),
                               timeout)
                try:
                    console.wait_shell(max(0.0, deadline - time.monotonic()))
                except ConsoleTimeout:
                    if port == 0:
                        raise
    return reset


@pytest.fixture(autouse=True)
def _avatar_reset_marker(request):
    marker = request.node.get_closest_marker("avatar_reset")
    if marker is not None:
        request.getfixturevalue("avatar_reset")(*marker.args, **marker.kwargs)


@pytest.fixture(autouse=True)
def _avatar_consoles_back(request, _avatar_reset_marker):
    """The guest console of a test that uses it, opened again if it went away (the accessor
    ``avatar_console`` does so for the others); after the ``avatar_reset`` marker's reset."""
    if "guest_console" in request.node.fixturenames:
        board = request.getfixturevalue("avatar_board")
        request.getfixturevalue("avatar_console")(board.guest_vm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.config.stash[_STATE].start_test(item)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    """Faults never outlive their test; nor does its console log. A daemon gone away is one
    line against this test (``pytest_runtest_makereport``: a hook wrapper that raised would
    leave the rest of the teardown undone), and the next test starts clean."""
    from ..errors import AvatarError
    board = item.config.stash.get(_BOARD, None)
    if board is not None and board.faults_armed:
        try:
            board.clear_faults()
        except AvatarError as err:
            item.stash[_TEARDOWN_PROBLEM] = ("avatar-hw: the faults this test armed were not "
                                             f"cleared: {err}")
    try:
        yield
    finally:
        item.config.stash[_STATE].end_test(item)


def _used_board(item):
    """The session's board if ``item`` asked for it (through any fixture), else None."""
    if {"avatar_board", "avatar_board_linux"} & set(getattr(item, "fixturenames", ())):
        return item.config.stash.get(_BOARD, None)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    problem = item.stash.get(_TEARDOWN_PROBLEM, None)
    if call.when == "teardown" and problem and report.passed:
        report.outcome, report.longrepr = "failed", problem
    board = _used_board(item)
    if board is None:
        return
    if call.when == "setup" and report.passed:
        item.user_properties.extend(board.properties().items())
    if report.failed and call.when == "call":
        report.sections.append(("avatar-hw board", board_report(board)))
        screens = save_screens(board, item.config.stash[_STATE].log_path(item, ".png"))
        if screens:
            report.sections.append(("avatar-hw screen", screens))
            item.add_report_section("call", "stdout", screens)   # JUnit's system-out


def pytest_terminal_summary(terminalreporter, config):
    state = config.stash.get(_STATE, None)
    if state is not None and state.log_dir is not None:
        terminalreporter.write_line(f"avatar-hw console logs: {state.log_dir}")


def save_screens(board, path):
    """Save the screen of every VM with a gpu to ``path.format(vm=N)``; the report lines
    naming them (``[[ATTACHMENT|path]]``, the JUnit attachments convention); never raises."""
    lines = []
    try:
        vms = [vm["vm"] for vm in board.info()["vms"]
               if any(d["name"] == "gpu" for d in vm["devices"])]
    except Exception as err:        # a report must not hide the test's own failure
        return f"no screenshot: {err}"
    for vm in vms:
        try:
            png, saved = board.screenshot(vm), path.format(vm=vm)
            with open(saved, "wb") as f:
                f.write(png)
            lines.append(f"avatar-hw vm{vm} screen: {saved}\n[[ATTACHMENT|{saved}]]")
        except Exception as err:
            lines.append(f"avatar-hw vm{vm} screen: no screenshot: {err}")
    return "\n".join(lines)


def board_report(board):
    """The interrupt diagnosis and the console's last output (never raises)."""
    parts = []
    try:
        parts.append(board.diagnose_interrupts())
    except Exception as err:        # a report must not hide the test's own failure
        parts.append(f"no interrupt diagnosis: {err}")
    console = getattr(board, "last_console", None)
    if console is not None:
        parts.append(f"last console output:\n{console.tail(2000)}")
    return "\n".join(parts)
