"""Console endpoint ``rfc2217:[HOST:]PORT``: the port as an RFC 2217 (Telnet COM port) server.

pyserial's ``rfc2217://host:port``, labgrid's NetworkSerialPort and
ser2net-style tools attach to it. Like ``tcp:``, it listens on loopback
unless a host is given (``rfc2217:0.0.0.0:4560`` for every interface), one
client at a time; port 0 picks a free port, and ``url`` then names the real
one (what ``avatar-hw info`` shows and ``avatar-hw console`` connects to).

The Telnet and RFC 2217 protocol is pyserial's ``PortManager``: the client's
bytes go through ``PortManager.filter`` (negotiations and COM-port
subnegotiations are answered, IAC IAC becomes one 0xFF byte), output has
each 0xFF doubled. The "serial port" the client configures is ``GuestLine``:
settings are accepted and reported back (a virtio console has no baud rate),
the modem lines read as a connected cable.

Flow control is the ``tcp:`` endpoint's: the guest's output is accepted only
as far as the buffer (counted after escaping) has room; the client's input is
read when the guest has receive buffers. While the guest takes no input the
socket is still read, so that negotiations are answered (a client's open
waits for them), but only until ``INPUT_HOLD`` bytes of data are held; then
the kernel's socket buffer, and the client, wait.
"""

import logging
import types

from serial import rfc2217

from .console import _AGAIN, IOV_MAX, SocketServerEndpoint, _tcp_endpoint, truncate_views

log = logging.getLogger(__name__)

IAC = 0xFF
INPUT_HOLD = 4096
RECV_SIZE = 65536


class GuestLine:
    """The serial line ``PortManager`` configures: settings kept, modem lines "connected"."""

    baudrate, bytesize, parity, stopbits = 115200, 8, "N", 1
    xonxoff = rtscts = break_condition = False
    dtr = rts = True
    cts = dsr = cd = True
    ri = False

    def reset_input_buffer(self):
        """Purge requests are not honoured: nothing the guest sent or was sent is dropped."""

    reset_output_buffer = reset_input_buffer


class Rfc2217Endpoint(SocketServerEndpoint):
    """A listening TCP socket speaking RFC 2217 to one client at a time."""

    def __init__(self, url, listener, limit):
        super().__init__(url, listener, limit)
        self.line = GuestLine()
        self.manager = None
        self._input = bytearray()           # filtered client data not yet given to the guest

    def _accept(self):
        previous = self.client
        super()._accept()
        if self.client is not None and self.client is not previous:
            self._input.clear()
            self.manager = rfc2217.PortManager(
                self.line, types.SimpleNamespace(write=self.write_raw), logger=log)

    def _drop_client(self):
        self.manager = None
        self._input.clear()
        super()._drop_client()

    # -- output: guest -> client -------------------------------------------------------------------

    def room(self):
        # Escaping at most doubles the bytes; keep the buffer within ``limit``.
        return super().room() // 2

    def write(self, views, n):
        # bytes.replace instead of PortManager.escape: the same escaping, without a
        # generator step per byte on the output path.
        data = b"".join(truncate_views(views, n)).replace(b"\xff", b"\xff\xff")
        super().write([memoryview(data)], len(data))

    def write_raw(self, data):
        """``PortManager``'s connection: Telnet replies go out in order with the data."""
        super().write([memoryview(data)], len(data))

    # -- input: client -> guest ---------------------------------------------------------------------

    def _receive(self):
        """Read the socket once and filter it into ``_input``; False once the client is gone."""
        try:
            raw = self.client.recv(RECV_SIZE)
        except _AGAIN:
            return True
        except OSError as err:
            self._input_gone(err)
            return False
        if not raw:
            self._input_gone(None)
            return False
        manager = self.manager
        if manager.mode == rfc2217.M_NORMAL and manager.suboption is None and IAC not in raw:
            self._input += raw                   # plain data: no filtering needed
        else:
            self._input += b"".join(manager.filter(raw))
        return True

    def readinto(self, views):
        if self.client is not None and not self._input:
            self._receive()
        if not self._input:
            return 0
        done = 0
        for view in views[:IOV_MAX]:
            take = min(len(view), len(self._input) - done)
            view[:take] = self._input[done:done + take]
            done += take
            if done == len(self._input):
                break
        del self._input[:done]
        return done

    def _readable_while_paused(self):
        if self._receive() and len(self._input) >= INPUT_HOLD:
            self._data_waiting = True
            self._update_reader()

    def resume_input(self):
        super().resume_input()
        if self._input and self._loop is not None and self._on_input is not None:
            self._loop.call_later(0, self._on_input)


def open_rfc2217(url, rest, limit):
    """The ``rfc2217:`` scheme of ``avatar_hw.backends.console.open_endpoint``."""
    listener = _tcp_endpoint(url, rest, limit).listener
    endpoint = Rfc2217Endpoint(url, listener, limit)
    host, port = listener.getsockname()[:2]
    endpoint.url = f"rfc2217:{f'[{host}]' if ':' in host else host}:{port}"
    return endpoint
