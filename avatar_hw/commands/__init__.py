"""The ``avatar-hw`` subcommands, one module per command or group (avatar_hw.cli builds
the parser from them): ``layout``, ``serve``, ``query`` (list, info, debug), ``balloon``,
``screenshot``, ``inject``, ``replay``.

Each module has ``add_parser(subparsers, parents=())``; the library modules
(board, daemon, control) know nothing of the command line.
"""

import re

# what Python 3.13's argparse takes for a number (3.11's: -5 and -.5 only)
NEGATIVE_NUMBER = re.compile(r"-\.?\d")


def values_may_be_negative(parser):
    """``parser`` (no option of its own looking like ``-5``) takes a word starting with a
    ``-`` and a digit (``-5M``, ``-1e3``) as a value, positional or an option's, as
    Python 3.13's argparse does: its command, not argparse's usage lines, says what is
    wrong with it (3.11's took ``-5M`` for an unknown option)."""
    parser._negative_number_matcher = NEGATIVE_NUMBER
    return parser
