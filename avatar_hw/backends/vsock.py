"""Host side of a virtio-vsock device: Unix stream sockets, Firecracker's convention.

* The device listens on ``PATH``. A host program connects there and writes
  ``CONNECT <port>\\n`` (decimal, case-insensitive ``connect``); once the guest
  accepts, it reads ``OK <host_port>\\n`` and the socket is the byte stream to
  the guest's port. A refused connection (guest RST, timeout, bad line) is
  closed without the ``OK`` line.
* A guest connecting to host CID 2, port ``P``, gets a connection to the Unix
  socket ``PATH_P`` (non-blocking connect; refused, missing or full: the
  guest gets RST). No greeting line in that direction.

``Stream`` is one such socket: writes of guest payload go straight from
guest RAM (``sendmsg`` on the chain's views); what the socket does not take
at once is copied into a FIFO bounded by the credit the device advertised
(``buf_alloc``), so a guest that keeps to its credit can never make it grow
beyond that, and one that does not is reset. Reads go straight into the
guest's receive buffers (``recvmsg_into``).
"""

import errno
import os
import socket

from .. import paths
from ..errors import AGAIN, ConfigError, os_reason
from ..virtio.buffers import first_batch

MAX_LINE = 32                     # "CONNECT 4294967295\n" is 19 bytes
MAX_PORT = 0xFFFFFFFF


SUN_PATH_MAX = 107                      # bytes of a Unix socket path (sun_path less its NUL)


def listen(path):
    """A non-blocking listening Unix stream socket at ``path`` (a stale socket file is
    replaced; a live one, or anything else there, is a ConfigError, and so is a path too
    long for the guest's connections' ``<path>_<port>`` sockets)."""
    longest = len(os.fsencode(f"{path}_{0xFFFFFFFF}"))
    if longest > SUN_PATH_MAX:
        raise ConfigError(path, None, f"too long for the sockets of the guest's connections "
                          f"(<path>_<port>, up to {longest} bytes; a Unix socket path has "
                          f"{SUN_PATH_MAX}): choose a shorter path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                         | socket.SOCK_NONBLOCK)
    try:
        try:
            sock.bind(path)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise ConfigError(path, None, f"cannot create the vsock socket: "
                                  f"{os_reason(err)}; choose another path") from None
            problem = paths.clear_for_socket(path)
            if problem:
                raise ConfigError(path, None, f"{problem}; choose another path") from None
            sock.bind(path)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


def parse_connect(line):
    """The port of a ``CONNECT <port>`` line (bytes without the newline), or None."""
    parts = line.split()
    if len(parts) != 2 or parts[0].lower() != b"connect" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= MAX_PORT else None


def read_line(sock, partial):
    """One ``\\n``-terminated line from ``sock`` without reading past it: the line
    (without ``\\n``), None when it is not complete yet, b"" when the peer closed or
    sent more than ``MAX_LINE`` bytes without a newline (give up). ``partial`` (a
    bytearray) keeps what came of an incomplete line: it is read, not only peeked, or the
    socket would stay readable and a level-triggered loop would call again at once until
    the rest came (a client that sends ``CONN`` and waits had the daemon spinning)."""
    try:
        head = sock.recv(MAX_LINE - len(partial), socket.MSG_PEEK)
    except AGAIN:
        return None
    except OSError:
        return b""
    if not head:
        return b""
    end = head.find(b"\n")
    if end < 0:
        partial += sock.recv(len(head))
        return b"" if len(partial) >= MAX_LINE else None
    sock.recv(end + 1)
    line = bytes(partial + head[:end])
    partial.clear()
    return line


def try_connect_unix(path):
    """A connected non-blocking socket to ``path``, or None (missing, refused, full, or no
    descriptor left for it)."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                             | socket.SOCK_NONBLOCK)
    except OSError:
        return None
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


class Stream:
    """One connection's Unix socket and its bounded FIFO of guest bytes not yet sent."""

    def __init__(self, sock, limit):
        sock.setblocking(False)
        self.sock, self.limit = sock, limit
        self.pending = bytearray()     # guest bytes the socket has not taken yet (<= limit)

    def fileno(self):
        return self.sock.fileno()

    def write(self, views, length):
        """Send ``length`` bytes of ``views`` (guest RAM); what the socket does not take
        is copied into ``pending``. Returns the bytes the socket took, or None when the
        socket is gone (EPIPE, ECONNRESET) or ``pending`` would pass ``limit``."""
        if len(self.pending) + length > self.limit:
            return None
        sent = 0 if self.pending else self._send(self.sock.sendmsg, first_batch(views))
        if sent is None:
            return None
        left = sent
        for view in views:
            if left >= len(view):
                left -= len(view)
                continue
            self.pending += view[left:]
            left = 0
        return sent

    def flush(self):
        """Send what is pending; the bytes the socket took, or None when it is gone."""
        if not self.pending:
            return 0
        with memoryview(self.pending) as view:
            sent = self._send(self.sock.send, view)
        if sent:
            del self.pending[:sent]
        return sent

    @staticmethod
    def _send(send, data):
        """``send(data)``'s count of bytes the socket took: 0 when it is full, None when it
        is gone (EPIPE, ECONNRESET)."""
        try:
            return send(data)
        except AGAIN:
            return 0
        except OSError:
            return None

    def read_into(self, views):
        """Bytes received into ``views``: a count, 0 at end of stream, None when nothing
        is there now, -1 on an error (reset by the peer)."""
        return self._receive(lambda: self.sock.recvmsg_into(first_batch(views))[0])

    def peek(self):
        """``read_into``'s answer without taking a byte: 1 when bytes wait."""
        return self._receive(lambda: len(self.sock.recv(1, socket.MSG_PEEK)))

    @staticmethod
    def _receive(call):
        try:
            return call()
        except AGAIN:
            return None
        except OSError:
            return -1

    def send_line(self, text):
        """A short greeting on a freshly connected socket; False if it did not go out whole."""
        data = text.encode()
        try:
            return self.sock.send(data) == len(data)
        except OSError:
            return False

    def shutdown_write(self):
        self._shutdown(socket.SHUT_WR)

    def shutdown_read(self):
        """No more reading: the peer's writes fail (EPIPE) instead of blocking for ever."""
        self._shutdown(socket.SHUT_RD)

    def _shutdown(self, how):
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def close(self):
        self.sock.close()


def remove_listener(sock, path):
    sock.close()
    paths.remove(path)
