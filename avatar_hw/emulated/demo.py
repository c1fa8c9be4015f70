"""``avatar-hw demo``: boot the emulated board with avatar-hw serving its guest.

Builds what is missing (stub, guest assets, initramfs, device tree), starts
QEMU with the stub and the daemon, then either attaches this terminal to the
guest's virtio console (hvc0; leave with Ctrl-] or ``poweroff -f``; input from a pipe
or a file runs line by line, and at its end the demo exits with the last command's
status) or, with ``--run 'CMD'``, runs one command, prints its output and exits with its
status.
``--config VMS.toml`` gives the guest the devices of a VMs config (the
daemon's format: every device kind of docs/devices.md; relative paths land in the demo's
temporary directory). The demo prints its control socket: ``avatar-hw
list|info|debug|console --control SOCKET`` work while it runs.
``--vms 2`` boots two guests (VM n on CPU n, each with its own console);
``--vm N`` picks the one this terminal or ``--run`` talks to; every VM's
console endpoints are printed (``avatar-hw console N --control SOCKET``, or
e.g. ``socat -,raw,echo=0 UNIX-CONNECT:PATH``).
``--board-linux`` runs board mode instead (docs/emulated-board.md): the board's own
Linux on CPU0 with avatar-hw serving the guest (VM 1) on CPU1; ``--run-board 'CMD'``
runs a command in the board Linux (before ``--run``'s in the guest), and without
either this terminal gets the guest's console and the board Linux's shell is
printed (a Unix socket: ``socat -,raw,echo=0 UNIX-CONNECT:PATH``).
"""

import os
import re
import select
import signal
import socket
import sys
import termios
import tty

from ..commands.query import format_list
from ..commands.serve import add_wait_option, seconds
from ..config import config_path
from ..errors import AvatarError
from . import board_linux
from .memory_map import MAX_VMS
from .session import (ConsoleTimeout, EmulatedBoard, GuestGone, load_vms_config,
                      refuse_host_mode_options)

EXIT_KEY = b"\x1d"                  # Ctrl-]
GONE_POLL = 0.5                     # seconds without a byte: has the guest gone (its VM alone)?
INPUT_HELD = 1 << 20                # bytes of input held for the console before stdin waits
LINE_HELD = 4096                    # stdin ended: bytes of a line without its end held back
GUEST_TIMEOUT = 120                 # host mode: seconds until the guest's shell answers
BOARD_TIMEOUT = 300                 # board mode (TCG-slow Python): each of the board Linux's
                                    # shell, its daemon serving, the guest's shell


LEAVE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _say(text):
    print(f"avatar-hw demo: {text}", file=sys.stderr, flush=True)


def _leave(signum, frame):
    """SIGINT (KeyboardInterrupt, as Python's handler), SIGTERM, SIGHUP (the terminal
    closed): unwind, so the board is stopped and removed; later ones are ignored
    (``timeout`` signals the demo, then its process group; an impatient user presses Ctrl-C
    twice: a second signal cut the removal short and left the temporary directory)."""
    for other in LEAVE_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _announce(board, vm):
    """The control socket, the devices, each console port's endpoints, and the command that
    puts another terminal on VM ``vm``'s console (the one this demo talks to)."""
    control = board.daemon.control.path
    _say(f"control socket {control}")
    _say("\n  ".join(["devices:", *format_list(board.daemon.list_devices()).splitlines()]))
    info = board.daemon.info()
    for served in info["vms"]:
        for device in served["devices"]:
            for port in device.get("ports", ()):
                endpoints = [e for e in port["endpoints"]
                             if e not in {f"unix:{path}" for path in board.console_paths}]
                _say(f"vm{served['vm']} console port {port['name'] or port['id']}: "
                     f"{', '.join(endpoints) or 'none'}")
    _say(f"another terminal: avatar-hw console {vm} --control {control}  "
         f"(also list, info, debug)")


def _interactive(board, vm, timeout=GUEST_TIMEOUT):
    """This terminal on the guest's console until Ctrl-], the guest's end or, when stdin is a
    pipe or a file, its end (``_Ending``). Input is sent as the console takes it, never
    blocking the guest's output (which is flow-controlled: a guest blocked writing would
    stop reading)."""
    shell = board.shell(timeout=timeout, vm=vm)
    sock = shell.sock
    _say(f"guest console (hvc0) of VM{vm}; Ctrl-] leaves")
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    qemu = os.pidfd_open(board.machine.process.pid)
    pending, ending = b"", None             # input not yet taken; stdin's end, once seen
    last = b"\n"                            # stdin's last byte: was its last line ended?
    try:
        if saved:
            tty.setraw(stdin)
        os.write(sys.stdout.fileno(), b"# ")
        while True:
            reading = [sock, qemu] + ([stdin] if ending is None and len(pending) < INPUT_HELD
                                      else [])
            ready, writable, _ = select.select(reading, [sock] if pending else [], [],
                                               GONE_POLL)
            if not ready and not writable and board.gone(vm):
                return _ended(board, vm)        # its VM powered off, QEMU runs the others
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return _ended(board, vm)
                if ending is not None:
                    data, status = ending.feed(data)
                    os.write(sys.stdout.fileno(), data)
                    if status is not None:
                        return status
                else:
                    os.write(sys.stdout.fileno(), data)
            elif qemu in ready:
                return _ended(board, vm)
            if writable:
                try:
                    pending = pending[sock.send(pending, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    pass
            if stdin in ready:
                data = os.read(stdin, 4096)
                if EXIT_KEY in data or not data and saved:
                    return 0
                if not data:
                    ending = _Ending()          # after the last line, ended or not
                    data = (b"" if last == b"\n" else b"\n") + ending.command
                last = data[-1:]
                pending += data
    finally:
        os.close(qemu)
        if saved:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


class _Ending:
    """Stdin (a pipe or a file) ended: the shell is asked for the last command's status by a
    line whose result the shell computes, so its echo never matches. The output up to that
    line's echo (its prompt included) is passed on a line at a time; then the demo exits with
    the status, as ``sh <script`` would."""

    def __init__(self):
        tag = int.from_bytes(os.urandom(4), "little")
        self.command = f"echo e-$(({tag} + 0))-$?\n".encode()
        self._echo = self.command[:-1]
        self._result = re.compile(rb"e-%d-(\d+)\r*\n" % tag)
        self._held = b""

    def feed(self, data):
        """(bytes to print, the status once the shell answered, else None)."""
        held = self._held + data
        match = self._result.search(held)
        end = match.start() if match else len(held)
        echo = held.find(self._echo, 0, end)
        if echo >= 0:                           # print nothing from the echo's line on
            end = held.rfind(b"\n", 0, echo) + 1
        elif not match:                         # whole lines (a long one: all but its tail)
            end = held.rfind(b"\n") + 1 or max(0, len(held) - LINE_HELD)
        self._held = held[end:]
        return held[:end], int(match.group(1)) if match else None


def _ended(board, vm):
    """The console went away: the guest ``vm`` powered off (0), QEMU died or the daemon
    stopped (1)."""
    gone = board.gone(vm)
    if gone:
        _say(f"\r\n{gone.reason}")
        return 0 if gone.powered_off else 1
    _say("\r\nthe device model stopped; see the log above")
    return 1


def _demo(args):
    log = (lambda line: print(line, file=sys.stderr)) if args.stub_log else None
    if args.board_linux:
        refuse_host_mode_options([key for key, value in (
            ("config", args.config), ("control", args.control), ("vms", args.vms != 1),
            ("vm", args.vm), ("wait", args.wait)) if value], lambda key: f"--{key}")
    elif args.run_board is not None:
        print("avatar-hw: --run-board needs --board-linux (in host mode the daemon runs in "
              "this process: there is no board Linux)", file=sys.stderr)
        return 2
    elif not 0 <= args.vm < args.vms:
        print(f"avatar-hw: --vm {args.vm}: the board runs VMs 0..{args.vms - 1} (--vms)",
              file=sys.stderr)
        return 2
    elif args.config is not None:
        _check_config_has_vm(config_path(args.config), args.vm, args.vms)
    old = {signum: signal.signal(signum, _leave) for signum in LEAVE_SIGNALS}
    try:
        if args.board_linux:
            return _board_demo(args, log)
        with EmulatedBoard(vms=args.vms, on_log=log, config=config_path(args.config),
                           control_path=args.control, wait=args.wait) as board:
            _announce(board, args.vm)
            if args.run is None:
                return _interactive(board, args.vm)
            return _run(board.shell(timeout=GUEST_TIMEOUT, vm=args.vm), args.run, args.timeout,
                        "--run")
    finally:
        for signum, handler in old.items():
            if signal.getsignal(signum) is _leave:      # after a leave: ignored to the end
                signal.signal(signum, handler)


def _check_config_has_vm(path, vm, vms):
    """Before the board boots: the VMs config gives VM ``vm``, the one this terminal or --run
    talks to (a VM it leaves out boots with no device, not even a console)."""
    given = load_vms_config(path).vms        # VMs it leaves out: EmulatedBoard says so
    if vm not in given:
        fix = f"add [vm.{vm}]"
        runnable = [n for n in sorted(given) if n < MAX_VMS]
        if runnable:
            other = runnable[0]
            fix += f" or use --vm {other}" if other < vms else \
                f" or use --vms {other + 1} --vm {other}"
        raise AvatarError(f"{path}: no [vm.{vm}], the VM this terminal (or --run) talks to; "
                          f"{fix}")


def _run(shell, command, timeout, option):
    """Run ``command`` (given with ``option``) in ``shell``, print its output; its exit status.
    Not done within ``timeout``: what it printed, then an error naming ``--timeout``. The
    guest gone meanwhile: what it printed, then why (0 if it powered off, else 1)."""
    try:
        output, status = shell.run(f"({command})", timeout=timeout)
    except GuestGone as gone:
        _print_raw(gone.output)
        _say(gone.reason)
        return 0 if gone.powered_off else 1
    except ConsoleTimeout as timed_out:
        _print_raw(timed_out.output)
        raise AvatarError(f"{option} {command!r} did not finish within {timeout:g} s: "
                          "give it longer with --timeout SECONDS") from None
    sys.stdout.write(output)
    sys.stdout.flush()
    return status


def _print_raw(output):
    sys.stdout.write(output.replace(b"\r\n", b"\n").decode(errors="replace"))
    sys.stdout.flush()


def _board_demo(args, log):
    """Board mode: the board Linux's shell, its daemon serving, then --run-board, --run or this
    terminal on the guest's console (the board's shell is left to the user's socat)."""
    with EmulatedBoard(board_linux=True, on_log=log) as board:
        _say(f"board mode: the board Linux boots on CPU0, the guest (VM {board_linux.GUEST_VM}) "
             f"on CPU1 once the daemon in the board Linux serves it (TCG: a minute or two)")
        shell = board.board_shell(timeout=BOARD_TIMEOUT)
        _say("the board Linux's shell answers; waiting for its daemon (avatar-hw serve, "
             "started from avatar-hw.service's ExecStart, as the avatar user)")
        board_linux.wait_serving(shell, BOARD_TIMEOUT)
        _say(f"the daemon serves VM {board_linux.GUEST_VM} (its log: {board_linux.DAEMON_LOG}); "
             f"in the board Linux's shell: avatar-hw list (also info, debug)")
        status = 0
        if args.run_board is not None:
            status = _run(shell, args.run_board, args.timeout, "--run-board")
        if args.run is not None:
            guest = _run(board.shell(timeout=BOARD_TIMEOUT), args.run, args.timeout, "--run")
            status = status or guest
        if args.run_board is not None or args.run is not None:
            return status
        shell.close()                   # QEMU takes one client per console: the user's now
        _say(f"the board Linux's shell (its hvc0): socat -,raw,echo=0 "
             f"UNIX-CONNECT:{board.board_console_path}")
        return _interactive(board, board_linux.GUEST_VM, BOARD_TIMEOUT)


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "demo", parents=parents,
        help="boot an arm64 Linux guest on the emulated board, served by avatar-hw",
        description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", metavar="VMS.toml",
                        help="VMs config for the guest's devices (the daemon's format, e.g. "
                             "boards/vms-example.toml, or vms-example: the copy installed "
                             "with avatar-hw; default: a console only)")
    parser.add_argument("--control", metavar="PATH",
                        help="control socket path (default: in the demo's temporary directory)")
    parser.add_argument("--run", metavar="CMD", help="run CMD in the guest, print its output, "
                        "exit with its status")
    parser.add_argument("--timeout", type=seconds, default=60,
                        help="seconds for --run and for --run-board (60)")
    parser.add_argument("--stub-log", action="store_true", help="show the EL2 stub's log")
    parser.add_argument("--vms", type=int, choices=range(1, MAX_VMS + 1), default=1,
                        help="guests to boot, VM n on CPU n (1)")
    parser.add_argument("--vm", type=int, default=0,
                        help="the VM whose console this terminal or --run uses (0)")
    add_wait_option(parser)
    parser.add_argument("--board-linux", action="store_true",
                        help="board mode: the board's own Linux on CPU0 runs avatar-hw, which "
                             "serves the guest (VM 1) on CPU1 (slow: Python under TCG)")
    parser.add_argument("--run-board", metavar="CMD",
                        help="with --board-linux: run CMD in the board Linux (before --run), "
                             "print its output, exit with its status (unless --run fails)")
    parser.set_defaults(func=_demo)
