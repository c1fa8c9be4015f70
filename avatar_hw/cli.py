"""The ``avatar-hw`` command: one subcommand per module in ``COMMANDS``.

Each command module has ``add_parser(subparsers)`` (which registers the
subcommand and sets ``func``) and is imported lazily, so a broken optional
piece never stops the others. Errors a user can cause are ``AvatarError``:
printed as one line, exit status 2.
"""

import argparse
import importlib
import logging
import sys

from .errors import AvatarError

COMMANDS = [
    "avatar_hw.board",        # layout
    "avatar_hw.daemon",       # serve
    "avatar_hw.control",      # list, info, debug
    "avatar_hw.terminal",     # console
    "avatar_hw.emulated.demo",  # demo
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="avatar-hw", description="Userspace VirtIO device model of the Avatar hypervisor.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except AvatarError as err:
        print(f"avatar-hw: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
