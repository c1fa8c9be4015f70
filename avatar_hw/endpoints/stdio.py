"""Console endpoint ``stdio``: this process's stdin and stdout."""

import os
import sys

from .base import Endpoint


class StdioEndpoint(Endpoint):
    """This process's stdin (input) and stdout (output), made non-blocking while attached."""

    def __init__(self, url, limit):
        super().__init__(url, limit)
        self._in, self._out = sys.stdin.fileno(), sys.stdout.fileno()
        self._blocking = (os.get_blocking(self._in), os.get_blocking(self._out))
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)

    def input_fd(self):
        return self._in if self.interactive else None

    def output_fd(self):
        return self._out

    def close(self):
        super().close()
        os.set_blocking(self._in, self._blocking[0])
        os.set_blocking(self._out, self._blocking[1])


def open_url(url, rest, limit):
    return StdioEndpoint(url, limit)


def pyserial_url(rest):
    return None                     # not a place a client attaches to
