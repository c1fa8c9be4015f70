"""Console endpoint ``rfc2217:[HOST:]PORT``: the port as an RFC 2217 (Telnet COM port) server.

pyserial's ``rfc2217://host:port``, labgrid's NetworkSerialPort and
ser2net-style tools attach to it. Like ``tcp:``, it listens on loopback
unless a host is given (``rfc2217:0.0.0.0:4560`` for every interface), one
client at a time; port 0 picks a free port, and ``url`` then names the real
one (what ``avatar-hw info`` shows and ``avatar-hw console`` connects to).

The Telnet and RFC 2217 protocol is pyserial's ``PortManager`` (``TelnetSession``): the
client's bytes go through ``PortManager.filter`` (negotiations and COM-port
subnegotiations are answered, IAC IAC becomes one 0xFF byte), output has
each 0xFF doubled. BINARY (RFC 856) is asked for both ways, as pyserial's clients
agree to; a direction the client keeps out of it follows the NVT's rule (RFC 854): a
lone CR goes out as CR NUL, and a CR NUL from the client reaches the guest as CR.
The "serial port" the client configures is ``GuestLine``: settings are accepted and
reported back (a virtio console has no baud rate), the modem lines read as a connected
cable.

Flow control is the ``tcp:`` endpoint's, with escaping in between: output
is taken from the stream in chunks of at most ``CHUNK`` bytes, each escaped
into a small scratch buffer; the chunk's source bytes count as taken (and
the guest's buffer can be returned) only when its whole escaped form was
sent. Caveat: a client that goes away mid-chunk got part of a chunk that the
next client gets again in full (at most one chunk repeated across clients;
nothing skipped). Telnet replies (``write_raw``) go out between chunks, in
order with the data, at most ``RAW_LIMIT`` bytes held. The client's input is
read when the guest has receive buffers. While the guest takes no input the
socket is still read, so that negotiations are answered (a client's open
waits for them), but only while less than ``INPUT_HOLD`` bytes of data are
held (at most ``INPUT_HOLD + RECV_SIZE``); then the kernel's socket buffer,
and the client, wait. What a client sent reaches the guest also after it
left (``server``'s departed clients: its filtered data stays in ``_input``,
the rest is filtered by its own ``PortManager``, whose replies go nowhere);
caveat: a client that comes while more than ``INPUT_HOLD`` bytes of a
departed one wait has its input, and so its negotiations, read after them.

A client is dropped, with what it sent not yet read, when it breaks the
protocol: a request ``PortManager`` raises on (an SE without SB, a
SET-BAUDRATE without its 4 bytes, SET-PARITY 9, ...), a subnegotiation
longer than ``SUBOPTION_LIMIT``, or more than ``RAW_LIMIT`` bytes of replies
it does not read. What a client can make ``PortManager`` log (each unknown
command or option is a line) is rate-limited (``ProtocolLog``), as are
those drops.

A client refused (another one is connected: ``SocketServerEndpoint``) is answered too, by a
``TelnetSession`` of its own, and gets its line once its open is done (or after ``HOLD_S``),
the end ``HOLD_S`` later: pyserial's ``rfc2217://`` open waits for the negotiations (a
socket closed before them was its "Remote does not seem to support RFC2217", not the
reason), and its ``read`` raises, its queue unread, once its reader has seen the end.

A new client gets no output until its open is done: pyserial's ``open()`` (labgrid's
NetworkSerialPort goes through it) ends with PURGE_DATA for its receive buffer, emptying
its own queue of what it read meanwhile, then PURGE_DATA for the transmit buffer. So the
guest's output (the unattached log first) is held until that second purge, or ``HOLD_S``
for a client that never sends one (telnet); Telnet replies are not held.
"""

import logging
import re
import socket
import types

from serial import rfc2217

from ..errors import AGAIN
from ..ratelimit import RateLimitedLog
from ..virtio.buffers import scatter
from .server import SocketServerEndpoint, bound_url, client_address, tcp_listener

log = logging.getLogger(__name__)

IAC = 0xFF
INPUT_HOLD = 4096
RECV_SIZE = 65536
CHUNK = 16384
RAW_LIMIT = 65536
SUBOPTION_LIMIT = 4096      # bytes of one subnegotiation, at most (RFC 2217's: a few)
HOLD_S = 1.0                # at most this long after a client connects, no output (docstring)
NO_REPLIES = types.SimpleNamespace(write=lambda data: None)     # a departed client's
LONE_CR = re.compile(rb"\r(?!\n)")   # a CR an NVT sends as CR NUL (a chunk's last one too)


class ProtocolError(Exception):
    """The client broke the protocol (or would not read its replies): it is dropped."""


class GuestLine:
    """The serial line ``PortManager`` configures: settings kept, modem lines "connected";
    ``opened()`` runs at the client's PURGE_DATA of its transmit buffer (its open is done)."""

    baudrate, bytesize, parity, stopbits = 115200, 8, "N", 1
    xonxoff = rtscts = break_condition = False
    dtr = rts = True
    cts = dsr = cd = True
    ri = False

    def __init__(self, opened=None):
        self.opened = opened

    def reset_input_buffer(self):
        """Purge requests are not honoured: nothing the guest sent or was sent is dropped."""

    def reset_output_buffer(self):
        if self.opened is not None:
            self.opened()


class TelnetSession(rfc2217.PortManager):
    """pyserial's ``PortManager`` that also asks for BINARY our way (it asks only the
    client's), and applies the NVT's CR NUL rule to a direction not in BINARY."""

    def __init__(self, line, connection, logger):
        super().__init__(line, connection, logger=logger)
        self._options = {option.name: option for option in self._telnet_options}
        ours = self._options["we-BINARY"]
        ours.state = rfc2217.REQUESTED
        self.telnet_send_option(ours.send_yes, ours.option)
        self._after_cr = False              # the client's last data byte was a CR

    def data(self, raw):
        """The client's data bytes in ``raw``, as they come (a generator: what came before
        an error ``filter`` raises is had); a NUL after a CR goes while not in BINARY."""
        binary = self._options["they-BINARY"]
        if (self.mode == rfc2217.M_NORMAL and self.suboption is None and IAC not in raw
                and (binary.active or b"\0" not in raw)):
            self._after_cr = raw.endswith(b"\r")
            yield raw                       # plain data: no filtering needed
            return
        for byte in self.filter(raw):
            if byte != b"\0" or not self._after_cr or binary.active:
                yield byte
            self._after_cr = byte == b"\r"

    def escape(self, data):
        """``data`` as the client is sent it: each 0xFF doubled, and while not in BINARY
        each CR not followed by LF followed by NUL."""
        data = data.replace(b"\xff", b"\xff\xff")
        return data if self._options["we-BINARY"].active else LONE_CR.sub(b"\r\0", data)


class ProtocolLog:
    """``PortManager``'s logger: what a client can make it say is rate-limited (an
    endpoint's count outlives its clients)."""

    def __init__(self):
        self.warning = self.error = RateLimitedLog(log)
        self.info = RateLimitedLog(log, level=logging.INFO)
        self.debug = log.debug


class Rfc2217Endpoint(SocketServerEndpoint):
    """A listening TCP socket speaking RFC 2217 to one client at a time."""

    def __init__(self, url, listener, limit):
        super().__init__(url, listener, limit, hold_s=HOLD_S, refuse_after=HOLD_S)
        self.line = GuestLine(self._opened)
        self._protocol_log = ProtocolLog()
        self._input = bytearray()           # filtered client data not yet given to the guest
        self._chunk = memoryview(b"")       # escaped output not yet sent
        self._chunk_source = 0              # stream bytes it stands for
        self._raw = bytearray()             # Telnet replies not yet sent

    def _connected(self):
        self.protocol = TelnetSession(self.line, types.SimpleNamespace(write=self.write_raw),
                                      self._protocol_log)

    def _opened(self):
        """The client's open is done (its last purge, inside ``PortManager.filter``): its
        output flows from the loop's next turn (no device code runs inside the filter,
        whose exceptions drop the client)."""
        self._cancel_hold()
        self._set_writer(True)

    def _drop_client(self, reason, keep_input=False):
        """What the client sent and was read stays in ``_input``; its replies and settings
        from now on go nowhere (a line of its own: its purge releases no one's hold); what
        it did not take goes to the next client."""
        if self.protocol is not None:
            self.protocol.connection, self.protocol.serial = NO_REPLIES, GuestLine()
        self._raw = bytearray()             # new objects: ``flush`` may hold a view of them
        self._chunk, self._chunk_source = memoryview(b""), 0   # resent in full to the next
        super()._drop_client(reason, keep_input)

    def _refusal_pending(self, sock, line):
        refused = types.SimpleNamespace(opened=False, told=False)
        refused.session = TelnetSession(
            GuestLine(lambda: setattr(refused, "opened", True)),
            types.SimpleNamespace(write=lambda data: _send(sock, data)), self._protocol_log)
        self._loop.add_reader(sock, lambda: self._refused_input(sock, refused, line))

    def _refused_input(self, sock, refused, line):
        """A refused client's negotiations answered, its data dropped; its line once its
        open is done (its last purge), the end ``HOLD_S`` later; both at once if it breaks
        the protocol or leaves."""
        session = refused.session
        try:
            raw = sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            for _ in session.data(raw):
                pass
            if session.suboption is not None and len(session.suboption) > SUBOPTION_LIMIT:
                raw = b""
        except AGAIN:
            return
        except Exception:                   # gone, or bad Telnet (``_receive``'s cases)
            raw = b""
        if not raw:
            self._refuse(sock, b"" if refused.told else session.escape(line))
        elif refused.opened and not refused.told:
            refused.told = True
            _send(sock, session.escape(line))
            self._refuse_later(sock, b"", HOLD_S)

    # -- output: guest -> client -------------------------------------------------------------------

    def flush(self):
        stream = self.stream
        self.position = max(self.position, stream.head)
        while self.client is not None:
            if self._chunk:
                n = self._write_now(None, [self._chunk])
                if not n:
                    break
                self._chunk = self._chunk[n:]
                if not self._chunk:
                    self.position += self._chunk_source
                    self._chunk_source = 0
            elif self._raw:
                n = self._write_now(None, [memoryview(self._raw)])
                if not n:
                    break
                del self._raw[:n]
            elif self.position < stream.tail and self._held is None:
                data = b"".join(stream.views_from(self.position, CHUNK))
                self._chunk_source = len(data)
                self._chunk = memoryview(self.protocol.escape(data))
            else:
                break
        if self._own_stream:
            stream.take_done(self.position)
        self._set_writer(self.client is not None and bool(
            self._chunk or self._raw or self.position < stream.tail and self._held is None))

    def write_raw(self, data):
        """``PortManager``'s connection: Telnet replies go out in order with the data
        (``_receive`` flushes them)."""
        if len(self._raw) + len(data) > RAW_LIMIT:
            raise ProtocolError("it does not read its Telnet replies")
        self._raw += data

    # -- input: client -> guest --------------------------------------------------------------------

    def _receive(self):
        """Read the source once and filter it into ``_input``; False once it is gone."""
        sock, manager = self._source()
        try:
            raw = sock.recv(RECV_SIZE)
        except AGAIN:
            return True
        except OSError as err:
            self._input_gone(err)
            return False
        if not raw:
            self._input_gone(None)
            return False
        try:
            for byte in manager.data(raw):      # what came before an error is kept
                self._input += byte
            if manager.suboption is not None and len(manager.suboption) > SUBOPTION_LIMIT:
                raise ProtocolError(f"a subnegotiation longer than {SUBOPTION_LIMIT} bytes")
        except Exception as err:            # pyserial raises on malformed requests
            self._protocol_log.warning("%s: client dropped: bad Telnet (%r)", self, err)
            self._input_gone(err)
            return False
        if self._raw:
            self.flush()
        return True

    def readinto(self, views):
        if self.input_fd() is not None and not self._input:
            self._receive()
        if not self._input:
            return 0
        with memoryview(self._input) as data:
            done = scatter(data, views)
        del self._input[:done]
        return done

    def _update_reader(self):
        # While the guest takes no input the source is read (negotiations are answered,
        # a hang-up is seen) until INPUT_HOLD bytes of data are held.
        self._set_reader(self.input_fd() is not None and (self._want_input or
                                                          len(self._input) < INPUT_HOLD))

    def _readable_while_paused(self):
        self._receive()
        self._update_reader()

    def resume_input(self):
        super().resume_input()
        if self._input and self._loop is not None and self._on_input is not None:
            self._loop.call_later(0, self._on_input)


def _send(sock, data):
    """A refused client's Telnet replies (a few bytes; a client not taking them loses them)."""
    try:
        sock.send(data, socket.MSG_DONTWAIT)
    except OSError:
        pass


def open_url(url, rest, limit):
    """The endpoint; port 0 picks a free port, which ``url`` then names."""
    listener = tcp_listener(url, rest)
    endpoint = Rfc2217Endpoint(url, listener, limit)
    endpoint.url = bound_url("rfc2217", listener)
    return endpoint


def pyserial_url(rest):
    return f"rfc2217://{client_address(rest)}"
