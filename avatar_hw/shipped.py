"""Files shipped beside the package: board files found by name, and what lies beside them.

They are in the checkout's boards/ or the installed copy (pyproject's data-files put
boards/ under ``PREFIX/share/avatar-hw/boards``: board files, the emulated board's stub
sources, the trap ABI header, the kernel driver and the systemd unit); ``BOARD_DIRS`` is
searched in order.
"""

import site
import sys
import tomllib
from pathlib import Path

from .errors import AvatarError, ConfigError

BOARD_DIRS = (
    Path(__file__).resolve().parent.parent / "boards",               # a checkout
    Path(sys.prefix) / "share" / "avatar-hw" / "boards",              # pip install
    Path(site.getuserbase()) / "share" / "avatar-hw" / "boards",      # pip install --user
)
DEFAULT_BOARD = "rpi4"


def _is_board_file(path):
    try:
        with open(path, "rb") as f:
            return "board" in tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def shipped_file(relative):
    """A file shipped beside the board files (``emulated/start.S``), from the checkout's
    boards/ or the installed copy (BOARD_DIRS, first found)."""
    for directory in BOARD_DIRS:
        candidate = directory / relative
        if candidate.exists():
            return candidate
    raise AvatarError(f"{relative}: not in {' or '.join(map(str, BOARD_DIRS))}; reinstall "
                      "avatar-hw (its board files are missing)")


def shipped_boards():
    """Names of the board files (not VMs configs) found in BOARD_DIRS."""
    return sorted({p.stem for d in BOARD_DIRS if d.is_dir() for p in d.glob("*.toml")
                   if _is_board_file(p)})


def shipped_hint():
    """``shipped boards: NAME, ...``, for the error about a board file not found."""
    return f"shipped boards: {', '.join(shipped_boards()) or 'none found'}"


def names_a_path(text):
    """Whether ``--board``/``--config`` ``text`` is a path as given, not a shipped file's
    name: it has a ``/``, ends in ``.toml`` or is a file (``b5.txt`` here wins)."""
    return "/" in text or text.endswith(".toml") or Path(text).is_file()


def board_path(name_or_path):
    """A path as given, or the shipped board file called ``name_or_path`` (e.g. ``rpi4``)."""
    text = str(name_or_path)
    if names_a_path(text):
        return Path(text)
    for directory in BOARD_DIRS:
        candidate = directory / f"{text}.toml"
        if candidate.is_file():
            return candidate
    raise ConfigError(text, None, f"no board file or shipped board of that name; "
                                  f"{shipped_hint()}")
