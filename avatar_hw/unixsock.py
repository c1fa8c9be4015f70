"""Connecting to a Unix stream socket that its owner (QEMU, a back-end, a daemon) may not
have bound or be listening on yet."""

import socket
import time


def connect_unix(path, wait, *, alive=None, poll=0.02, timeout=None):
    """A stream socket connected to ``path``, retried every ``poll`` s while the socket is
    missing or not listening, for up to ``wait`` s or until ``alive()`` is false (its
    owner died). Raises the last ``OSError``. ``timeout``: the socket's timeout, set before
    connecting, so a listener whose backlog is full fails at once (``BlockingIOError``,
    retried as above) instead of blocking until it accepts."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
            sock.close()
            if time.monotonic() >= deadline or (alive is not None and not alive()):
                raise
        except OSError:
            sock.close()
            raise
        time.sleep(poll)
