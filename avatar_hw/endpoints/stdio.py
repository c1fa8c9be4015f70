"""Console endpoint ``stdio``: this process's stdin and stdout.

Both are used through descriptors of their own, non-blocking, opened again from
/proc/self/fd: O_NONBLOCK belongs to the open file description, which stdout
shares with stderr (and a terminal with everything): set on it, the daemon's own
log lines to stderr failed while the guest's output filled the pipe. A regular
file is used as it is (its writes complete at once), a socket made non-blocking
as it is (it cannot be opened again). Input comes only from what epoll can watch
(a pipe, a terminal, a socket): stdin from /dev/null or a file gives none.
"""

import os
import stat
import sys

from .base import Endpoint


class StdioEndpoint(Endpoint):
    """This process's stdin (input) and stdout (output)."""

    def __init__(self, url, limit):
        super().__init__(url, limit)
        self._restore = []                      # (fd, blocking) of shared ones made non-blocking
        self._opened = []
        self._in = self._own(sys.stdin.fileno(), os.O_RDONLY, input_side=True)
        self._out = self._own(sys.stdout.fileno(), os.O_WRONLY | os.O_APPEND)

    def _own(self, fd, flags, input_side=False):
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) or stat.S_ISCHR(mode) and not os.isatty(fd):
            return None if input_side else fd   # a file, /dev/null: nothing to wait for
        if not stat.S_ISSOCK(mode):
            try:
                own = os.open(f"/proc/self/fd/{fd}", flags | os.O_NONBLOCK | os.O_NOCTTY
                              | os.O_CLOEXEC)
            except OSError:
                pass
            else:
                self._opened.append(own)
                return own
        self._restore.append((fd, os.get_blocking(fd)))
        os.set_blocking(fd, False)
        return fd

    def input_fd(self):
        return self._in if self.interactive else None

    def output_fd(self):
        return self._out

    def close(self):
        super().close()
        for fd in self._opened:
            os.close(fd)
        for fd, blocking in self._restore:
            os.set_blocking(fd, blocking)


def open_url(url, rest, limit):
    return StdioEndpoint(url, limit)


def pyserial_url(rest):
    return None                     # not a place a client attaches to
