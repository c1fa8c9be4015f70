"""``avatar-hw demo``: boot the emulated board with avatar-hw serving its guest.

Builds what is missing (stub, guest assets, initramfs, device tree), starts
QEMU with the stub and the daemon, then either attaches this terminal to the
guest's virtio console (hvc0; leave with Ctrl-] or ``poweroff -f``) or, with
``--run 'CMD'``, runs one command, prints its output and exits with its status.
``--vms 2`` boots two guests (VM n on CPU n, each with its own console);
``--vm N`` picks the one this terminal or ``--run`` talks to, and the others'
console sockets are printed (connect with e.g. ``socat -,raw,echo=0 UNIX-CONNECT:PATH``).
"""

import os
import select
import sys
import termios
import tty

from .memory_map import MAX_VMS
from .session import EmulatedBoard


def _interactive(board, vm):
    shell = board.shell(timeout=120, vm=vm)
    sock = shell.sock
    print(f"avatar-hw demo: VM{vm}'s console (hvc0); Ctrl-] leaves", file=sys.stderr)
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
    if not 0 <= args.vm < args.vms:
        print(f"avatar-hw: --vm {args.vm}: the board runs VMs 0..{args.vms - 1} (--vms)",
              file=sys.stderr)
        return 2
    with EmulatedBoard(vms=args.vms, on_log=log) as board:
        for vm, path in enumerate(board.console_paths):
            if vm != args.vm:
                print(f"avatar-hw demo: VM{vm}'s console: {path}", file=sys.stderr)
        if args.run is None:
            return _interactive(board, args.vm)
        output, status = board.shell(timeout=120, vm=args.vm).run(f"({args.run})",
                                                                  timeout=args.timeout)
        sys.stdout.write(output)
        return status


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo", help="boot an arm64 Linux guest on the emulated board, served by avatar-hw",
        description=__doc__.split("\n\n")[1])
    parser.add_argument("--run", metavar="CMD", help="run CMD in the guest, print its output, "
                        "exit with its status")
    parser.add_argument("--timeout", type=float, default=60, help="seconds for --run (60)")
    parser.add_argument("--stub-log", action="store_true", help="show the EL2 stub's log")
    parser.add_argument("--vms", type=int, choices=range(1, MAX_VMS + 1), default=1,
                        help="guests to boot, VM n on CPU n (1)")
    parser.add_argument("--vm", type=int, default=0,
                        help="the VM whose console this terminal or --run uses (0)")
    parser.set_defaults(func=_demo)
