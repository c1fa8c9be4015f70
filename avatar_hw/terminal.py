"""``avatar-hw console VM [--port N]``: an interactive terminal on a guest console.

The console is a running daemon's (its endpoint for that VM and port, found
through the control socket: a pty, unix:, tcp: or rfc2217: endpoint) or any
pyserial URL given with ``--url`` (/dev/ttyUSB0, rfc2217://board:4560, ...).
The terminal is pyserial's miniterm: Ctrl-] quits, Ctrl-T opens its menu.
"""

import signal
import sys
import threading
import time

import serial
from serial.tools.miniterm import Miniterm, key_description

from . import control
from .errors import AvatarError
from .hil.console import open_serial
from .hil.target import console_url_from_info

EXIT_KEY, MENU_KEY = "\x1d", "\x14"        # Ctrl-], Ctrl-T
READ_TIMEOUT = 0.1                        # lets the reader thread notice the exit key
REFUSAL_WAIT = 0.5          # an endpoint refuses a client at once: its line comes within this
REFUSAL_PREFIX = b"avatar-hw: "           # the endpoints' refusal lines (endpoints/server.py)


class Terminal(Miniterm):
    """miniterm that ends with a one-line message, not a traceback, when the peer goes
    away, and then without waiting for a key: ``ended`` is set when either thread ends,
    ``peer_gone`` says the reader's did (the writer, blocked reading the terminal, is
    left to end with the process: miniterm's cancel() would push a NUL into the
    terminal's input, and fails on a terminal that is not the controlling one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.console.cancel = lambda: None
        self.ended = threading.Event()
        self.peer_gone = False

    def reader(self):
        try:
            super().reader()
        except serial.SerialException as err:
            self.peer_gone = True
            sys.stderr.write(f"\n--- {self.serial.portstr}: {err}\n")
        finally:
            self.ended.set()

    def writer(self):
        try:
            super().writer()
        finally:
            self.ended.set()

    def show(self, data):
        """Output received before the terminal started, shown as the reader shows it."""
        text = self.rx_decoder.decode(data)
        for transformation in self.rx_transformations:
            text = transformation.rx(text)
        self.console.write(text)


def first_output(port, wait):
    """What the peer sends first: (bytes, whether it closed), once it closed, sent a line
    that is not a refusal, or ``wait`` s passed."""
    received, deadline = b"", time.monotonic() + wait
    while time.monotonic() < deadline and (
            b"\n" not in received or received.startswith(REFUSAL_PREFIX)):
        try:
            received += port.read(port.in_waiting or 1)
        except serial.SerialException:
            return received, True
    return received, False


def refusal(received, closed):
    """The refusal line (without its prefix) of an endpoint that serves one client at a
    time (``avatar-hw: ... already has a client ...``) and closed, else None."""
    line = received.rstrip(b"\r\n")
    if closed and line.startswith(REFUSAL_PREFIX) and b"\n" not in line:
        return line[len(REFUSAL_PREFIX):].decode("utf-8", "replace")
    return None


def resolve_url(args):
    if args.url:
        return args.url
    if args.vm is None:
        raise AvatarError("console: give a VM number (and the daemon's --control socket) "
                          "or --url URL")
    return console_url_from_info(control.request("info", args.control), args.vm, args.port)


def _console(args):
    url = resolve_url(args)
    port = open_serial(url, timeout=READ_TIMEOUT)
    if not sys.stdin.isatty():
        port.close()
        raise AvatarError("console: stdin is not a terminal (this is an interactive one); "
                          "from a script, use the avatar_console fixture or GuestConsole "
                          "(docs/testing.md), or pipe commands into avatar-hw demo")
    term = Terminal(port, echo=False, eol=args.eol, filters=["direct"])
    term.exit_character, term.menu_character = EXIT_KEY, MENU_KEY
    term.set_rx_encoding("utf-8")
    term.set_tx_encoding("utf-8")
    # A refused client gets the endpoint's one line, not a terminal that starts and ends
    # (a refusal later than REFUSAL_WAIT, by a loaded daemon, still ends it, status 1); so
    # does a peer that closed at once having sent nothing (a refusal without its line).
    # Keys typed meanwhile wait, unechoed, for the writer (the terminal's modes already).
    term.console.setup()
    received, closed = first_output(port, REFUSAL_WAIT)
    refused = refusal(received, closed)
    if refused is None and closed and not received:
        refused = (f"console {url}: closed at once, having sent nothing: check that its "
                   "daemon or server runs and takes this client (avatar-hw info lists a "
                   "daemon's endpoints; its log says why it refused one)")
    if refused is not None:
        term.console.cleanup()
        port.close()
        raise AvatarError(refused)
    sys.stderr.write(f"--- avatar-hw console: {url} --- quit: {key_description(EXIT_KEY)} | "
                     f"menu: {key_description(MENU_KEY)} ---\n")
    term.show(received)
    # SIGINT blocked while miniterm starts its threads: they inherit the mask, so the signal
    # always comes to this thread, and only inside the try below (one sent meanwhile is
    # delivered as the mask is restored), never between start() and the try, where it
    # would skip the reader's stop and the exit line
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    status = 0
    try:
        try:
            term.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        term.ended.wait()
    except KeyboardInterrupt:
        # SIGINT (a kill: Ctrl-C in this raw terminal goes to the guest). The writer stays
        # blocked reading the terminal (a daemon thread, it ends with the process): stop
        # the reader only; miniterm's join() would wait for the writer forever.
        term.stop()
        status = 130
    else:
        if term.peer_gone:              # status 1; the writer ends with the process
            term.stop()
            status = 1
        else:                           # the exit key
            term.join()
    term.receiver_thread.join()          # it sees alive cleared within READ_TIMEOUT
    term.close()
    sys.stderr.write("\n--- exit ---\n")
    return status


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "console", parents=parents, help="interactive terminal on a guest console (quit: Ctrl-])",
        description="Attach this terminal to a guest console: a running daemon's (VM and "
                    "port) or any pyserial URL. Ctrl-] quits, Ctrl-T opens miniterm's menu.")
    parser.add_argument("vm", type=int, nargs="?", help="VM number (with the daemon)")
    parser.add_argument("--port", default="0",
                        help="console port: 0 (the console, default), a number or a port name")
    where = parser.add_mutually_exclusive_group()
    control.add_control_option(where)
    where.add_argument("--url", help="any pyserial URL instead of the daemon's endpoint: "
                                     "/dev/ttyUSB0, rfc2217://host:port, socket://host:port, "
                                     "unix:///path, a pty path")
    parser.add_argument("--eol", choices=["lf", "cr", "crlf"], default="lf",
                        help="what Enter sends (default lf, what a Linux guest's tty takes)")
    parser.set_defaults(func=_console)
