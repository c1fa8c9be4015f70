"""pytest plugin (entry point ``pytest11``): HIL tests on a real Avatar board or the emulated one.

Options:

- ``--avatar-board FILE``: a board file (or a shipped board's name): run against the
  real board whose ``avatar-hw serve`` is reached through ``--avatar-control``;
- ``--avatar-console URL``: the guest console (VM 0, port 0) as any pyserial URL:
  /dev/ttyUSB0, /dev/ttyAMA0, a pty path, socket://host:port, rfc2217://host:port,
  unix:///path; default: the daemon's own endpoint for it;
- ``--avatar-control PATH``: the daemon's control socket (default as ``avatar-hw info``).

Markers (declared here, nowhere else):

- ``hw``: needs a real board; skipped unless ``--avatar-board`` is given;
- ``emulated``: runs on the emulated board. A test marked both runs on the real
  board when one is given, else on the emulated board.

Fixtures:

- ``avatar_board`` (session): a ``avatar_hw.testing.target`` Target: the real board, or the
  emulated board booted once for the session (skipped with the reason when it cannot run);
- ``guest_console`` (session): a ``GuestConsole`` on VM 0's console;
- ``guest_shell``: the same console once a shell answers on it.

When a test that used ``avatar_board`` fails, its report gets an "avatar-hw board" section:
the interrupt diagnosis (the daemon's counters and the GIC's view of each SPI) and the
console's last output.
"""

import pytest

MARKERS = {
    "hw": "needs a real Avatar board (skipped unless --avatar-board is given)",
    "emulated": "runs on the emulated board (QEMU + EL2 stub + arm64 Linux; slow)",
}
HW_SKIP = ("needs a real Avatar board: run with --avatar-board FILE (e.g. boards/rpi4.toml) "
           "next to a running 'avatar-hw serve'")
SHELL_TIMEOUT = 120


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


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    if config.getoption("avatar_board"):
        return
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        if "hw" in marks and "emulated" not in marks:
            item.add_marker(pytest.mark.skip(reason=HW_SKIP))


@pytest.fixture(scope="session")
def avatar_board(request):
    from .errors import AvatarError
    from .testing import target
    config = request.config
    board_file = config.getoption("avatar_board")
    if board_file:
        board = target.HardwareTarget(board_file, console_url=config.getoption("avatar_console"),
                                      control_path=config.getoption("avatar_control"))
        try:
            board.info()
        except AvatarError as err:
            board.close()
            pytest.fail(f"--avatar-board {board_file}: {err}", pytrace=False)
    else:
        missing = target.emulated_board_missing()
        if missing:
            pytest.skip(f"no --avatar-board, and {missing}")
        board = target.EmulatedTarget().start()
    yield board
    board.close()


@pytest.fixture(scope="session")
def guest_console(avatar_board):
    console = avatar_board.console()
    avatar_board.last_console = console
    yield console
    console.close()


@pytest.fixture
def guest_shell(guest_console):
    guest_console.wait_shell(SHELL_TIMEOUT)
    return guest_console


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    board = getattr(item, "funcargs", {}).get("avatar_board")
    if board is None or not report.failed or call.when != "call":
        return
    report.sections.append(("avatar-hw board", board_report(board)))


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
