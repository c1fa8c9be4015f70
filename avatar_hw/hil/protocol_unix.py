"""pyserial URL handler ``unix:///path/to/socket``: a console on a Unix stream socket.

pyserial's ``socket://`` handler does TCP only; the daemon's ``unix:`` console
endpoints (and the emulated board's console) are Unix sockets. Everything but
connecting is pyserial's ``socket://`` handler. ``open_serial`` in
``avatar_hw.hil.console`` registers this package with pyserial.
"""

import fcntl
import socket
import struct
import termios
import urllib.parse

from serial import PortNotOpenError, SerialException
from serial.urlhandler import protocol_socket


def waiting(sock):
    """The bytes ``sock`` has to read (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, bytes(4)))[0]


class Serial(protocol_socket.Serial):
    """A pyserial port on a Unix stream socket (settings are ignored, as for socket://)."""

    def open(self):
        self.logger = None
        if self._port is None:
            raise SerialException("Port must be configured before it can be used.")
        if self.is_open:
            raise SerialException("Port is already open.")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(protocol_socket.POLL_TIMEOUT)
            sock.connect(self.from_url(self.portstr))
        except OSError as err:
            sock.close()
            raise SerialException(f"Could not open port {self.portstr}: {err}") from None
        sock.setblocking(False)
        self._socket = sock
        self.is_open = True
        # No reset_input_buffer() as socket:// does: what the peer sent as soon as we
        # connected (a shell's first prompt, the daemon's backlog) is output, not line noise.

    @property
    def in_waiting(self):
        """The bytes there are to read (socket://'s says 1 for any, and for the peer's close)."""
        if not self.is_open:
            raise PortNotOpenError()
        return waiting(self._socket)

    def from_url(self, url):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "unix" or not parts.path:
            raise SerialException(f"expected a URL like unix:///run/avatar/vm0.sock, not {url!r}")
        return parts.path
