"""``avatar-hw serve``: run the device model daemon (avatar_hw.daemon) until a signal."""

import argparse
import logging
import math
from pathlib import Path

from . import values_may_be_negative
from ..board import load_board
from ..control import default_control_path
from ..daemon import Daemon
from ..sizes import parse_size
from ..errors import AvatarError
from ..replay import DEFAULT_MAX_SIZE
from ..shipped import board_path
from ..tracing import trace_log
from ..wait import BUSY_POLL, MODES


def add_wait_option(parser):
    """``--wait MODE`` (and ``--busy-poll``, the same as ``--wait busy-poll``); default None:
    the board file's ``trap.wait``."""
    parser.add_argument("--wait", choices=MODES, metavar="MODE",
                        help="how the daemon waits for traps: doorbell (sleep until the stub "
                             "rings), adaptive (poll a while after each trap while the host "
                             "has a core to spare, then sleep), "
                             "busy-poll (spin; a whole core); default: the board file's "
                             "trap.wait")
    parser.add_argument("--busy-poll", dest="wait", action="store_const", const=BUSY_POLL,
                        help="the same as --wait busy-poll")


def seconds(text):
    """An option's number of seconds: finite and above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def record_size(text):
    """``--record-max-size``: bytes, or a number with K, M, G or T; at least 1 MiB."""
    try:
        value = parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is below 1M (a recording's header and "
                                         "first pages need more)")
    return value


def run(args):
    if args.trace:
        trace_log.setLevel(logging.INFO)
    board = load_board(board_path(args.board))
    if board.name == "emulated":
        raise AvatarError(f"{board.path}: the emulated board is served only by avatar-hw demo "
                          "(or the EmulatedBoard API: avatar_hw.emulated.session), which gives "
                          "each run its own RAM file")
    daemon = Daemon(board, args.config, doorbell=args.doorbell, wait=args.wait,
                    trace=args.trace, control_path=args.control, user=args.user,
                    wait_stub=args.wait_stub, sysfs_root=args.sysfs_root, dev_root=args.dev_root,
                    record=args.record, record_max_size=args.record_max_size,
                    state=args.state)
    daemon.run()
    return 0


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "serve", parents=parents, help="run the device model daemon",
        description="Map the trap page and the guests' RAM, build the VMs' devices from the "
                    "config, attach to the trap page and serve traps until SIGINT/SIGTERM.")
    values_may_be_negative(parser)
    parser.add_argument("--board", required=True,
                        help="board file, or the name of a shipped board (e.g. rpi4)")
    parser.add_argument("--config", required=True, type=Path, help="VMs config (VMS.toml)")
    parser.add_argument("--trace", action="store_true", help="log every trap")
    add_wait_option(parser)
    parser.add_argument("--user", help="drop root to this user after mapping the devices")
    parser.add_argument("--control", help="control socket path (default: "
                                          f"{default_control_path()})")
    parser.add_argument("--doorbell", help="uio (default), or fifo:PATH[,STUB_PATH]")
    parser.add_argument("--wait-stub", type=seconds, default=10.0, metavar="SECONDS",
                        help="how long to wait for the stub to initialise the trap page")
    parser.add_argument("--sysfs-root", default="/sys",
                        help="where UIO devices are looked up (default /sys; tests use a tree)")
    parser.add_argument("--dev-root", default="/dev", help="where /dev/uioN nodes are")
    parser.add_argument("--record", type=Path, metavar="FILE",
                        help="record every trap, the guest memory it reads and writes and the "
                             "interrupts raised, for `avatar-hw replay FILE`")
    parser.add_argument("--record-max-size", type=record_size, default=DEFAULT_MAX_SIZE,
                        metavar="SIZE", help="stop recording (the file ends there, whole) "
                                             "before it grows past SIZE (e.g. 512M; "
                                             f"default {DEFAULT_MAX_SIZE >> 30}G)")
    parser.add_argument("--state", type=Path, metavar="FILE",
                        help="keep every device's state in FILE; a daemon started again "
                             "with the FILE a killed or stopped one left carries on under the "
                             "running guests (no reset); docs/testing.md, \"Restart\"")
    parser.set_defaults(func=run, verbosity=1)        # info by default: what it serves
