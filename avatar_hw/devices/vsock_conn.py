"""virtio-vsock's connections (``vsock.VsockDevice``'s): the stream state machine between
the guest and a host Unix socket, apart from the device's queues.

States: GREETING (a host client has connected, its ``CONNECT <port>`` line awaited),
CONNECTING (REQUEST sent to the guest, its RESPONSE awaited), ESTABLISHED. A host
connection gets a host port from 2**30 up; a guest connection reaches
``<socket>_<port>``.

Flow control (5.10.6.3), both ways, nothing lost and nothing held without
bound: the device advertises ``buf_alloc`` bytes per connection and
``fwd_cnt`` (bytes written to the Unix socket); guest bytes the socket does
not take at once wait in that connection's FIFO (at most ``buf_alloc``).
It sends a CREDIT_UPDATE when the guest may be short of credit (half of it
used and some freed) and for every CREDIT_REQUEST. Towards the guest it
never sends more than ``buf_alloc - (tx_cnt - fwd_cnt)`` of the guest's
last header: with no credit (or no receive buffers) it stops reading the
Unix socket, so the host writer blocks in its socket. Without credit it still
watches a socket with no bytes waiting, so that its end reaches the guest.

Shutdown: the guest's SHUTDOWN SEND half-closes the Unix socket once the
FIFO is empty; SHUTDOWN RCV stops reading it and shuts its reading side (the host
writer gets EPIPE, as a Linux vsock peer's send() does) and watches it for its peer's
close, told to the guest as SHUTDOWN with both flags; with both flags the device
answers RST once the FIFO is empty and closes the socket. The guest's RST closes the
socket once the FIFO is empty (what the device took within its credit is not lost;
until then the connection is DRAINING, off the table but counted in
``max_connections``). End of stream on the Unix socket sends SHUTDOWN SEND to the
guest; an error on it, RST.
Control packets to the guest wait (at most ``4 * max_connections + 64``;
beyond that they are dropped and counted, and a connection that needed one
is reset; its RST, like a credit update, is owed and queued once there is room)
until the guest gives receive buffers, and always go before data.
"""

import errno
import struct

from ..backends.vsock import Stream, parse_connect, read_line, try_connect_unix
from ..virtio.buffers import skip, truncate

HEADER = struct.Struct("<QQIIIHHIII")   # src_cid dst_cid src_port dst_port len type op flags
HEADER_LEN = HEADER.size                # buf_alloc fwd_cnt (44 bytes)
HOST_CID = 2
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = \
    range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2

BUF_ALLOC = 256 << 10                   # bytes of guest data held per connection
CONNECT_TIMEOUT = 2.0                   # seconds for a CONNECT line, then for the guest
ACCEPT_RETRY_S = 0.1                    # accepting paused this long when out of descriptors
FIRST_HOST_PORT = 1 << 30               # host-side ports of host-initiated connections
MASK32 = 0xFFFFFFFF
MAX_LOG = 40                            # bytes of a bad CONNECT line in the log

GREETING, CONNECTING, ESTABLISHED = "greeting", "connecting", "established"
DRAINING = "draining"       # the guest reset it: its FIFO still goes to the socket
READING, WRITING, HANGING = "reading", "writing", "hanging"   # a Connection's flags: its
                                                               # socket is watched for


class Connection:
    """One stream: ``host_port`` on CID 2 <-> ``guest_port`` on the guest."""

    def __init__(self, stream, host_port, guest_port, state):
        self.stream, self.host_port, self.guest_port, self.state = \
            stream, host_port, guest_port, state
        self.rx_cnt = 0            # bytes received from the guest
        self.fwd_cnt = 0           # of those, written to the socket
        self.fwd_cnt_sent = 0      # fwd_cnt in our last header to the guest
        self.tx_cnt = 0            # bytes sent to the guest
        self.peer_buf_alloc = self.peer_fwd_cnt = 0
        self.guest_shut = 0        # SHUTDOWN flags from the guest, cumulative
        self.host_eof = False      # the socket's peer shut its writing side
        self.held = False          # bytes wait in the socket for the guest's credit
        self.reading = False       # its reader is registered
        self.writing = False       # its writer is registered
        self.hanging = False       # its hang-up is watched (the guest shut its receiving side)
        self.credit_update_queued = False
        self.timer = None
        self.greeting_line = bytearray()   # a host client's CONNECT line so far

    @property
    def key(self):
        return self.host_port, self.guest_port

    def peer_credit(self):
        """Bytes the guest can take now (its last buf_alloc and fwd_cnt)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & MASK32
        return max(0, self.peer_buf_alloc - in_flight)

    def wants_input(self):
        """Should the socket be watched (guest connected and willing; with credit, or
        without it while no bytes are known to wait, for the end of stream)?"""
        return (self.state == ESTABLISHED and not self.host_eof
                and not self.guest_shut & SHUTDOWN_RCV
                and (self.peer_credit() > 0 or not self.held))


class Connections:
    """``VsockDevice``'s connections (a mixin: it uses the device's loop, counters and
    control packets): accepting and greeting host clients, connecting to the host's
    listeners, timeouts, guest bytes into the socket (its FIFO and the credit given
    back), shutdowns, closing."""

    # -- opening and closing -----------------------------------------------------------------------

    def _accept(self):
        try:
            sock, _ = self.listener.accept()
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._pause_accepting(err)      # the client waits in the backlog
            return
        if self._open() >= self.max_connections:
            self.error("host connection to %s refused: %d connections already (max_"
                       "connections)", self.path, self.max_connections)
            sock.close()
            return
        conn = Connection(Stream(sock, self.buf_alloc), 0, 0, GREETING)
        self.greeting[conn.stream.fileno()] = conn
        self._time_out_later(conn)
        self.loop.add_reader(conn.stream, lambda: self._read_greeting(conn))

    def _open(self):
        """Connections counted against ``max_connections``."""
        return len(self.conns) + len(self.greeting) + len(self._draining) + len(self._owed_rst)

    def _time_out_later(self, conn):
        conn.timer = self.loop.call_later(self.connect_timeout, lambda: self._timed_out(conn))

    def _pause_accepting(self, err):
        """No descriptor for a new client: the listener stays readable, so the loop would
        call ``_accept`` again at once, for as long as the shortage lasts. Look again in
        ACCEPT_RETRY_S instead (logged once a pause)."""
        self.error("host connections to %s wait: %s; trying again in %g s", self.path,
                   err.strerror, ACCEPT_RETRY_S)
        self.loop.remove_reader(self.listener)
        self._accept_timer = self.loop.call_later(ACCEPT_RETRY_S, self._resume_accepting)

    def _resume_accepting(self):
        self._accept_timer = None
        self.loop.add_reader(self.listener, self._accept)

    def _read_greeting(self, conn):
        line = read_line(conn.stream.sock, conn.greeting_line)
        if line is None:
            return
        port = parse_connect(line) if line else None
        if port is None:
            self.error("host connection to %s closed: expected 'CONNECT <port>\\n', got "
                       "%r", self.path, bytes(line[:MAX_LOG]))
            self._close(conn)
            return
        self._end_greeting(conn)
        self.loop.cancel(conn.timer)              # the guest gets the whole timeout too
        self._time_out_later(conn)
        conn.host_port, conn.guest_port, conn.state = self._free_port(port), port, CONNECTING
        self.conns[conn.key] = conn
        self.counters["connections"] += 1
        self._queue(conn, OP_REQUEST)
        self._flush_control()

    def _end_greeting(self, conn):
        self.loop.remove_reader(conn.stream)
        del self.greeting[conn.stream.fileno()]

    def _free_port(self, guest_port):
        """The next host port (from 2**30, wrapping) no connection to ``guest_port`` uses."""
        while True:
            port = self._next_port
            self._next_port = FIRST_HOST_PORT + (port + 1 - FIRST_HOST_PORT) % FIRST_HOST_PORT
            if (port, guest_port) not in self.conns:
                return port

    def _timed_out(self, conn):
        conn.timer = None
        if conn.state == ESTABLISHED or conn.stream is None:
            return
        if conn.state == GREETING:
            self._close(conn)
        else:
            self._reset(conn)
            self._flush_control()

    def _guest_connect(self, host_port, guest_port, buf_alloc, fwd_cnt):
        """The guest's REQUEST: connect to ``<socket>_<host_port>``; the REQUEST's header
        already gives the guest's buffer space (5.10.6.3: every packet's does), so what the
        host program sends first (a banner) flows at once."""
        if self._open() >= self.max_connections:
            self.guest_error("guest connection to port %d refused: %d connections already "
                             "(max_connections)", host_port, self.max_connections)
            self._queue_rst(host_port, guest_port)
            return
        sock = try_connect_unix(f"{self.path}_{host_port}")
        if sock is None:
            self._queue_rst(host_port, guest_port)
            return
        conn = Connection(Stream(sock, self.buf_alloc), host_port, guest_port, ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self.conns[conn.key] = conn
        self.counters["connections"] += 1
        self._queue(conn, OP_RESPONSE)
        if conn.stream is not None:           # not closed for a full control queue
            self._update_reader(conn)

    def _established(self, conn):
        if not conn.stream.send_line(f"OK {conn.host_port}\n"):
            self._reset(conn)
            return
        conn.state = ESTABLISHED
        if conn.timer is not None:
            self.loop.cancel(conn.timer)
            conn.timer = None
        self._update_reader(conn)

    def _update_reader(self, conn):
        self._watch(conn, READING, conn.wants_input() and conn not in self._starved)
        self._watch(conn, HANGING, conn.state == ESTABLISHED and not conn.host_eof
                    and bool(conn.guest_shut & SHUTDOWN_RCV))

    def _watch(self, conn, side, want):
        """Keep ``conn``'s socket registered with the loop for ``side`` exactly while
        ``want``: READING calls ``_read(conn)`` when it is readable, WRITING ``_write(conn)``
        when it is writable, HANGING ``_hung_up(conn)`` when its peer has closed."""
        if want == getattr(conn, side):
            return
        setattr(conn, side, want)
        if side == READING:
            add, remove, callback = self.loop.add_reader, self.loop.remove_reader, self._read
        elif side == WRITING:
            add, remove, callback = self.loop.add_writer, self.loop.remove_writer, self._write
        else:
            add, remove, callback = self.loop.add_hangup, self.loop.remove_hangup, self._hung_up
        if want:
            add(conn.stream, lambda: callback(conn))
        else:
            remove(conn.stream)

    def _close(self, conn):
        """Forget ``conn`` and close its socket (no packet to the guest)."""
        if conn.stream is None:
            return
        if conn.state == GREETING:
            self._end_greeting(conn)
        self._unlist(conn)
        self._watch(conn, WRITING, False)
        self._draining.discard(conn)
        conn.stream.close()
        conn.stream = None

    def _unlist(self, conn):
        """``conn`` off the table: no timer, no reading its socket, not starved, owed no
        credit update."""
        self._gone = True
        self._owed.discard(conn)
        if conn.timer is not None:
            self.loop.cancel(conn.timer)
            conn.timer = None
        self._watch(conn, READING, False)
        self._watch(conn, HANGING, False)
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if conn in self._starved:
            self._starved.remove(conn)

    def _guest_reset(self, conn):
        """The guest's RST: its socket is gone. Guest bytes the device took within its
        credit and the socket did not yet (the FIFO) still reach it, as bytes a Linux peer
        received stay readable after an RST; then the socket is closed. Until then the
        connection is off the table (the guest may use its ports again) and counts
        against ``max_connections``."""
        if not conn.stream.pending:
            self._close(conn)
            return
        self._unlist(conn)
        conn.state = DRAINING
        self._draining.add(conn)

    def _reset(self, conn):
        """Close ``conn`` and send the guest RST for it."""
        self._close(conn)
        self._queue_rst(*conn.key, conn)

    # -- guest bytes to the socket ---------------------------------------------------------------

    def _guest_data(self, conn, chain, length):
        if conn.state != ESTABLISHED or conn.guest_shut & SHUTDOWN_SEND:
            self._bad("data on connection %d:%d that is %s; reset", conn.host_port,
                      conn.guest_port, "shut" if conn.state == ESTABLISHED else conn.state)
            self._reset(conn)
            return
        if not length:
            return
        free = self.buf_alloc - (conn.rx_cnt - conn.fwd_cnt)
        views = truncate(skip(chain.readable, HEADER_LEN), length)
        sent = conn.stream.write(views, length) if length <= free else None
        if sent is None:
            if length > free:
                self._bad("%d bytes on connection %d:%d with %d bytes of credit; reset",
                          length, conn.host_port, conn.guest_port, free)
            self._reset(conn)
            return
        conn.rx_cnt += length
        self.count(bytes_from_guest=length)
        self._forwarded(conn, sent)

    def _forwarded(self, conn, sent):
        """``sent`` more guest bytes reached the socket: credit, a writer if some wait."""
        conn.fwd_cnt += sent
        pending = bool(conn.stream.pending)
        self._watch(conn, WRITING, pending)
        unseen = conn.fwd_cnt - conn.fwd_cnt_sent
        if (unseen and conn.rx_cnt - conn.fwd_cnt_sent > self.buf_alloc // 2
                and conn.state != DRAINING):
            self._queue(conn, OP_CREDIT_UPDATE)
        if not pending:
            self._drained(conn)

    def _write(self, conn):
        sent = conn.stream.flush()
        if sent is None:
            if conn.state == DRAINING:
                self._close(conn)       # the guest's side is gone already: no RST
            else:
                self._reset(conn)
            return
        self._forwarded(conn, sent)
        self._flush_rx()

    def _drained(self, conn):
        """The FIFO is empty: carry out the guest's shutdown, if any."""
        if conn.stream is None or conn.stream.pending:
            return
        if conn.state == DRAINING:
            self._close(conn)       # all the guest sent reached the socket: end of stream
            return
        if conn.guest_shut & SHUTDOWN_SEND and (conn.guest_shut & SHUTDOWN_RCV
                                                or conn.host_eof):
            self._reset(conn)       # both sides done: RST ends it (5.10.6.6)
        elif conn.guest_shut & SHUTDOWN_SEND:
            conn.stream.shutdown_write()
