"""The ``avatar-hw`` command: one subcommand per module in ``COMMANDS``.

Each command module has ``add_parser(subparsers, parents)`` (which registers
the subcommand with ``parents=parents``, so ``-v`` works after it too, and
sets ``func``) and is imported lazily, so a broken optional piece never stops
the others. Errors a user can cause are ``AvatarError``: printed as one line,
exit status 2; so is an option given an empty string or path (``--control ""`` is not
the default), and so is any command line argparse refuses (``_Parser``). A reader that
goes away (``avatar-hw info | head``) ends the command quietly. SIGINT ends any command
(status 130, the demo and the console cleaning up as they unwind), also when it was
inherited as ignored (a background job of a non-interactive shell): Python then installs
no handler; and one that comes while the commands load ends it as quietly.

Log level: warnings by default, ``-v`` info, ``-vv`` debug; a command may
set ``verbosity`` (``serve`` starts at info), and ``--log-level`` wins.
"""

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import AvatarError

COMMANDS = [
    "avatar_hw.commands.layout",    # layout
    "avatar_hw.commands.serve",     # serve
    "avatar_hw.commands.query",     # list, info, debug
    "avatar_hw.commands.balloon",   # balloon
    "avatar_hw.commands.screenshot",  # screenshot
    "avatar_hw.commands.inject",    # inject
    "avatar_hw.commands.replay",    # replay
    "avatar_hw.terminal",     # console
    "avatar_hw.emulated.demo",  # demo
]
LEVELS = ["warning", "info", "debug"]


def version():
    from importlib import metadata     # here: a Ctrl-C while it loads ends main() quietly
    try:
        return metadata.version("avatar-hw")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _common():
    """Options every command takes, before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output: -v info, -vv debug")
    common.add_argument("--log-level", choices=LEVELS + ["error"], default=argparse.SUPPRESS,
                        help="log level (overrides -v)")
    return common


class _Parser(argparse.ArgumentParser):
    """A parser (its commands' too: argparse makes them of its class) whose errors are one
    line, ``PROG: error: MESSAGE``: argparse's usage lines came first and hid it. A message
    of argparse's own (an unknown or a missing argument, a choice or a number it refused)
    ends with ``; see PROG --help``; an option's type already says what to give."""

    _type_error = None          # the message of the last value an option's type refused

    def _get_value(self, action, arg_string):
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as err:
            if isinstance(err.__context__, argparse.ArgumentTypeError):
                self._type_error = str(err)
            raise

    def parse_args(self, args=None, namespace=None):
        """Arguments no parser took are named by the command's parser, not ``avatar-hw``'s."""
        args, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = next((a.choices for a in self._actions
                             if isinstance(a, argparse._SubParsersAction)), {})
            parser = commands.get(getattr(args, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return args

    def error(self, message):
        if message != self._type_error:
            message += f"; see {self.prog} --help"
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    common = _common()
    parser = _Parser(
        prog="avatar-hw", parents=[common],
        description="Userspace VirtIO device model of the Avatar hypervisor.")
    parser.add_argument("--version", action="version", version=f"avatar-hw {version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        _load(name).add_parser(sub, [common])
    _refuse_empty(parser)
    return parser


def _load(name):
    """The command module ``name``; a Python without a dependency (``python -m avatar_hw``
    with the system's) says so in one line."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if (err.name or "").startswith("avatar_hw"):
            raise
        raise AvatarError(f"this Python ({sys.executable}) has no module {err.name!r}: run "
                          "scripts/setup and use .venv/bin/avatar-hw (or pip install this "
                          "checkout)") from None


def _refuse_empty(parser):
    """Every option taking a string or a path refuses an empty one (``--control ""`` fell
    back to the default socket, ``--config ""`` to no config)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _refuse_empty(command)
        elif action.option_strings and action.nargs is None and action.type in (None, str, Path):
            action.type = _non_empty(action.type or str)


def _non_empty(kind):
    """An option's ``type``: ``kind(text)``, or an error for an empty ``text``."""
    def convert(text):
        if not text:
            raise argparse.ArgumentTypeError("an empty value: give one, or leave the option out")
        return kind(text)
    return convert


def log_level(args):
    if getattr(args, "log_level", None):
        return getattr(logging, args.log_level.upper())
    verbosity = getattr(args, "verbosity", 0) + getattr(args, "verbose", 0)
    return getattr(logging, LEVELS[min(verbosity, len(LEVELS) - 1)].upper())


def _interruptible():
    """Python's SIGINT handler (KeyboardInterrupt), whatever this process inherited; the old
    disposition, to be restored (None outside the main thread, where nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv=None):
    old_sigint = _interruptible()
    try:
        args = build_parser().parse_args(argv)     # imports every command: a Ctrl-C may come
        logging.basicConfig(level=log_level(args),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        status = args.func(args) or 0
        sys.stdout.flush()
        return status
    except AvatarError as err:
        print(f"avatar-hw: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (| head): nothing more to say. Point stdout at /dev/null so
        # the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        # A command that left SIGINT ignored (the demo, once a signal made it unwind) keeps
        # it so to the end: a second Ctrl-C in that window was an uncaught KeyboardInterrupt.
        if old_sigint is not None and signal.getsignal(signal.SIGINT) is \
                signal.default_int_handler:
            signal.signal(signal.SIGINT, old_sigint)


if __name__ == "__main__":
    sys.exit(main())
