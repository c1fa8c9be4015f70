"""``avatar-hw demo``: boot the emulated board with avatar-hw serving its guest.

Builds what is missing (stub, guest assets, initramfs, device tree), starts
QEMU with the stub and the daemon, then either attaches this terminal to the
guest's virtio console (hvc0; leave with Ctrl-] or ``poweroff -f``) or, with
``--run 'CMD'``, runs one command, prints its output and exits with its status.
"""

import os
import select
import sys
import termios
import tty

from .session import EmulatedBoard


def _interactive(board):
    shell = board.shell(timeout=120)
    sock = shell.sock
    print("avatar-hw demo: guest console (hvc0); Ctrl-] leaves", file=sys.stderr)
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved:
            tty.setraw(stdin)
        os.write(sys.stdout.fileno(), b"# ")
        while True:
            ready, _, _ = select.select([stdin, sock], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return 0
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or b"\x1d" in data:
                    return 0
                sock.sendall(data)
    finally:
        if saved:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _demo(args):
    log = (lambda line: print(line, file=sys.stderr)) if args.stub_log else None
    with EmulatedBoard(on_log=log) as board:
        if args.run is None:
            return _interactive(board)
        output, status = board.shell(timeout=120).run(f"({args.run})", timeout=args.timeout)
        sys.stdout.write(output)
        return status


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "demo", parents=parents, help="boot an arm64 Linux guest on the emulated board, served by avatar-hw",
        description=__doc__.split("\n\n")[1])
    parser.add_argument("--run", metavar="CMD", help="run CMD in the guest, print its output, "
                        "exit with its status")
    parser.add_argument("--timeout", type=float, default=60, help="seconds for --run (60)")
    parser.add_argument("--stub-log", action="store_true", help="show the EL2 stub's log")
    parser.set_defaults(func=_demo)
