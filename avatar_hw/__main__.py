import importlib
import sys

from .cli import COMMANDS, main

try:                                    # as main does: a Python without the dependencies
    for name in COMMANDS:               # says so in one line
        importlib.import_module(name)
except ModuleNotFoundError as err:
    if (err.name or "").startswith("avatar_hw"):
        raise
    sys.exit(f"avatar-hw: this Python ({sys.executable}) has no module {err.name!r}: run "
             "scripts/setup and use .venv/bin/avatar-hw (or pip install this checkout)")

sys.exit(main())
