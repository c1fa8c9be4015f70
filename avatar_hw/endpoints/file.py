"""Console endpoint ``file:PATH``: an append-only log of the output (never read).

The path must be a regular file (made if missing) or a memory device such as
/dev/null: writes to those complete at once. Anything else could block the
daemon's one loop (a FIFO whose reader stops, a terminal): refused, naming the
endpoint that fits.
"""

import errno
import logging
import os
import stat

from ..errors import ConfigError
from ..ratelimit import RateLimitedLog
from .base import Endpoint

log = logging.getLogger(__name__)

MEMORY_DEVICES = 1          # the character devices' major number of /dev/null, /dev/full
NOT_A_FILE = ("is not a regular file (writes to it could keep the daemon waiting): log to a "
              "file, or give a reader pty: or unix:")


class FileEndpoint(Endpoint):
    """Append-only log of the output; never reads. Its writes complete at once."""

    interactive = False

    def __init__(self, url, path, limit):
        super().__init__(url, limit)
        self._error_log = RateLimitedLog(log, level=logging.ERROR)   # the guest's output
        try:                        # O_NONBLOCK: a FIFO without a reader fails, not hangs
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                              | os.O_NONBLOCK, 0o644)
        except OSError as err:
            if err.errno == errno.ENXIO:            # a FIFO without a reader
                raise ConfigError(url, "path", NOT_A_FILE) from None
            raise ConfigError(url, "path", f"cannot open the log file: {err.strerror}") from None
        mode = os.fstat(self.fd)
        if not (stat.S_ISREG(mode.st_mode) or stat.S_ISCHR(mode.st_mode)
                and os.major(mode.st_rdev) == MEMORY_DEVICES):
            os.close(self.fd)
            raise ConfigError(url, "path", NOT_A_FILE)

    def output_fd(self):
        return self.fd

    def _write_now(self, fd, views):
        try:
            return os.writev(fd, views)
        except OSError as err:                  # skipped: counted and logged (rate-limited)
            left = self.stream.tail - self.position
            self._error_log("%s: log write failed (%s); %d bytes not logged", self, err, left)
            return left

    @property
    def output_errors(self):
        """Writes that failed (each logged, rate-limited: the guest's output repeats them)."""
        return self._error_log.count

    def close(self):
        super().close()
        os.close(self.fd)


def open_url(url, rest, limit):
    if not rest:
        raise ConfigError(url, None, "file: needs a path, e.g. file:/var/log/avatar/vm0.log")
    return FileEndpoint(url, rest, limit)


def pyserial_url(rest):
    return None                     # not a place a client attaches to
