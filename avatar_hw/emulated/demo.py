"""``avatar-hw demo``: boot the emulated board with avatar-hw serving its guest.

Builds what is missing (stub, guest assets, initramfs, device tree), starts
QEMU with the stub and the daemon, then either attaches this terminal to the
guest's virtio console (hvc0; leave with Ctrl-] or ``poweroff -f``) or, with
``--run 'CMD'``, runs one command, prints its output and exits with its status.
``--config VMS.toml`` gives the guest the devices of a VMs config (the
daemon's format: every device kind of docs/devices.md; relative paths land in the demo's
temporary directory). The demo prints its control socket: ``avatar-hw
list|info|debug|console --control SOCKET`` work while it runs.
``--vms 2`` boots two guests (VM n on CPU n, each with its own console);
``--vm N`` picks the one this terminal or ``--run`` talks to; every VM's
console endpoints are printed (``avatar-hw console N --control SOCKET``, or
e.g. ``socat -,raw,echo=0 UNIX-CONNECT:PATH``).
"""

import os
import select
import signal
import sys
import termios
import tty

from ..commands.query import format_list
from .memory_map import MAX_VMS
from .session import EmulatedBoard

EXIT_KEY = b"\x1d"                  # Ctrl-]


def _say(text):
    print(f"avatar-hw demo: {text}", file=sys.stderr, flush=True)


def _leave(signum, frame):
    """SIGTERM, SIGHUP (the terminal closed): unwind, so the board is stopped and removed."""
    raise SystemExit(128 + signum)


def _announce(board):
    control = board.daemon.control.path
    _say(f"control socket {control}")
    _say("\n  ".join(["devices:", *format_list(board.daemon.list_devices()).splitlines()]))
    info = board.daemon.info()
    for vm in info["vms"]:
        for device in vm["devices"]:
            for port in device.get("ports", ()):
                endpoints = [e for e in port["endpoints"]
                             if e not in {f"unix:{path}" for path in board.console_paths}]
                _say(f"vm{vm['vm']} console port {port['name'] or port['id']}: "
                     f"{', '.join(endpoints) or 'none'}")
    _say(f"another terminal: avatar-hw console 0 --control {control}  "
         f"(also list, info, debug)")


def _interactive(board, vm):
    shell = board.shell(timeout=120, vm=vm)
    sock = shell.sock
    _say(f"guest console (hvc0) of VM{vm}; Ctrl-] leaves")
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    qemu = os.pidfd_open(board.machine.process.pid)
    try:
        if saved:
            tty.setraw(stdin)
        os.write(sys.stdout.fileno(), b"# ")
        while True:
            ready, _, _ = select.select([stdin, sock, qemu], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return _ended(board)
                os.write(sys.stdout.fileno(), data)
            elif qemu in ready:
                return _ended(board)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or EXIT_KEY in data:
                    return 0
                sock.sendall(data)
    finally:
        os.close(qemu)
        if saved:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _ended(board):
    """The console went away: the guest powered off (0) or the daemon stopped (1)."""
    if not board.alive():
        _say(f"\r\nthe guest powered off (QEMU exit status {board.machine.process.returncode})")
        return 0
    _say("\r\nthe device model stopped; see the log above")
    return 1


def _demo(args):
    log = (lambda line: print(line, file=sys.stderr)) if args.stub_log else None
    if not 0 <= args.vm < args.vms:
        print(f"avatar-hw: --vm {args.vm}: the board runs VMs 0..{args.vms - 1} (--vms)",
              file=sys.stderr)
        return 2
    old = {signum: signal.signal(signum, _leave) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with EmulatedBoard(vms=args.vms, on_log=log, config=args.config,
                           control_path=args.control) as board:
            _announce(board)
            if args.run is None:
                return _interactive(board, args.vm)
            output, status = board.shell(timeout=120, vm=args.vm).run(f"({args.run})",
                                                                      timeout=args.timeout)
            sys.stdout.write(output)
            return status
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "demo", parents=parents,
        help="boot an arm64 Linux guest on the emulated board, served by avatar-hw",
        description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", metavar="VMS.toml",
                        help="VMs config for the guest's devices (the daemon's format, e.g. "
                             "boards/vms-example.toml; default: a console only)")
    parser.add_argument("--control", metavar="PATH",
                        help="control socket path (default: in the demo's temporary directory)")
    parser.add_argument("--run", metavar="CMD", help="run CMD in the guest, print its output, "
                        "exit with its status")
    parser.add_argument("--timeout", type=float, default=60, help="seconds for --run (60)")
    parser.add_argument("--stub-log", action="store_true", help="show the EL2 stub's log")
    parser.add_argument("--vms", type=int, choices=range(1, MAX_VMS + 1), default=1,
                        help="guests to boot, VM n on CPU n (1)")
    parser.add_argument("--vm", type=int, default=0,
                        help="the VM whose console this terminal or --run uses (0)")
    parser.set_defaults(func=_demo)
