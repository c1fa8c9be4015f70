"""The ``avatar-hw`` subcommands, one module per command or group (avatar_hw.cli builds
the parser from them): ``layout``, ``serve``, ``query`` (list, info, debug), ``balloon``,
``screenshot``, ``inject``, ``replay``.

Each module has ``add_parser(subparsers, parents=())``; the library modules
(board, daemon, control) know nothing of the command line.
"""
