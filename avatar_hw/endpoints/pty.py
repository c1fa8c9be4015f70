"""Console endpoint ``pty:PATH``: a pseudo-terminal; ``PATH`` becomes a stable symlink to its
/dev/pts/N (``pty:`` alone: no symlink, the name is in ``avatar-hw info``)."""

import os
import tty

from .. import paths
from ..errors import ConfigError
from .base import Endpoint


class PtyEndpoint(Endpoint):
    """A pseudo-terminal in raw mode; ``path`` becomes a symlink to its /dev/pts/N."""

    def __init__(self, url, path, limit):
        super().__init__(url, limit)
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        self.tty_name = os.ttyname(self._slave)
        self.path = path
        if path:
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                os.symlink(self.tty_name, tmp)
                os.replace(tmp, path)
            except OSError as err:
                self._close_fds()
                raise ConfigError(url, "path", f"cannot create the pty symlink: {err}") from None

    def input_fd(self):
        return self.master

    def output_fd(self):
        return self.master

    def _close_fds(self):
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self):
        super().close()
        self._close_fds()
        if self.path and os.path.islink(self.path) and os.readlink(self.path) == self.tty_name:
            paths.remove(self.path)


def open_url(url, rest, limit):
    return PtyEndpoint(url, rest, limit)


def pyserial_url(rest):
    return rest or None             # the symlink; without one, the pty's name is in info
