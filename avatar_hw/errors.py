"""Errors with one-line messages meant for the person at the bench.

Every error a user can cause (a bad board file, a missing UIO device, a
config typo) is an ``AvatarError`` whose ``str()`` is one line naming the
file, key or device and what to do; the CLI prints it and exits non-zero.
"""


class AvatarError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""


class ConfigError(AvatarError):
    """A board file or VM config is wrong: names the file, the key and the problem."""

    def __init__(self, file, key, problem):
        self.file, self.key, self.problem = str(file), key, problem
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(f"{where}: {problem}")


class RegionAccessError(AvatarError, ValueError):
    """A register access outside a region or not aligned to its width."""


class DeviceNotFound(AvatarError):
    """A UIO device (or other board resource) is not present."""


def os_reason(err):
    """What went wrong in ``err`` (an ``OSError``) for a one-line message: its strerror, or
    the text of one Python raised itself without an errno (a Unix socket path over 107
    bytes: "AF_UNIX path too long")."""
    return err.strerror or str(err)


AGAIN = (BlockingIOError, InterruptedError)
"""The ``OSError``s of a non-blocking call that cannot proceed now: try again when ready."""
