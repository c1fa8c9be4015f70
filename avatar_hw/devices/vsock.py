"""virtio-vsock (device ID 19, VirtIO 1.2 section 5.10): stream sockets between the guest
and host programs, mapped to Unix sockets (``avatar_hw.backends.vsock``: Firecracker's
``CONNECT <port>`` convention).

Queues: 0 rx (device -> driver packets), 1 tx (driver -> device), 2 event.
Config: ``guest_cid`` (le64). Feature VIRTIO_VSOCK_F_STREAM only (no SEQPACKET).
Every packet starts with the 44-byte ``virtio_vsock_hdr``.

What the device checks in each packet from the guest (tx queue), and answers:

* shorter than the header, ``src_cid`` not the guest's CID, ``len`` larger
  than the bytes after the header: dropped, counted (``bad_packets``) and
  logged (rate-limited); a connection it names is reset (a stream that lost
  bytes cannot go on);
* ``dst_cid`` not the host (2), ``type`` not STREAM, an unknown ``op``, a
  payload on anything but RW, RW before the connection is established or
  after the guest shut its sending side, more payload than the credit the
  device gave: RST (the last four also counted as ``bad_packets``);
* a packet for no connection: RST (unless it is an RST);
* REQUEST beyond ``max_connections``, or to a host port nobody listens on:
  RST.

Flow control (5.10.6.3), both ways, nothing lost and nothing held without
bound: the device advertises ``buf_alloc`` bytes per connection and
``fwd_cnt`` (bytes written to the Unix socket); guest bytes the socket does
not take at once wait in that connection's FIFO (at most ``buf_alloc``).
It sends a CREDIT_UPDATE when the guest may be short of credit (half of it
used and some freed) and for every CREDIT_REQUEST. Towards the guest it
never sends more than ``buf_alloc - (tx_cnt - fwd_cnt)`` of the guest's
last header: with no credit (or no receive buffers) it stops reading the
Unix socket, so the host writer blocks in its socket.

Shutdown: the guest's SHUTDOWN SEND half-closes the Unix socket once the
FIFO is empty; SHUTDOWN RCV stops reading it; with both flags the device
answers RST once the FIFO is empty and closes the socket. End of stream on
the Unix socket sends SHUTDOWN SEND to the guest; an error on it, RST.
Control packets to the guest wait (at most ``4 * max_connections + 64``;
beyond that they are dropped and counted, and a connection that needed one
is closed) until the guest gives receive buffers, and always go before data.

``transport_reset()`` drops every connection and posts
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.7) on the event queue: for a
guest whose connections vanished behind its back. A device reset closes
every connection (the guest's driver is gone).
"""

import collections
import os
import struct

from ..backends.vsock import Stream, connect_unix, listen, parse_connect, read_line, \
    remove_listener
from ..schema import REQUIRED, Field, Schema, positive, under
from ..virtio.buffers import gather, scatter, skip, truncate
from ..virtio.constants import ID_VSOCK, bit
from ..virtio.device import VirtioDevice

F_STREAM = 0
RX, TX, EVENT = 0, 1, 2
QUEUE_SIZE, EVENT_QUEUE_SIZE = 256, 16

HEADER = struct.Struct("<QQIIIHHIII")   # src_cid dst_cid src_port dst_port len type op flags
HEADER_LEN = HEADER.size                # buf_alloc fwd_cnt (44 bytes)
EVENT_STRUCT = struct.Struct("<I")
HOST_CID = 2
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = \
    range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0

MIN_CID, MAX_CID = 3, 0xFFFFFFFE        # 0-2 are reserved, 0xFFFFFFFF is VMADDR_CID_ANY
BUF_ALLOC = 256 << 10                   # bytes of guest data held per connection
MAX_PACKET = 64 << 10                   # payload per packet to the guest (Linux's maximum)
DEFAULT_MAX_CONNECTIONS = 64
CONNECT_TIMEOUT = 2.0                   # seconds for a CONNECT line, then for the guest
READS_PER_CALLBACK = 16                 # packets from one socket per readiness callback
FIRST_HOST_PORT = 1 << 30               # host-side ports of host-initiated connections
MASK32 = 0xFFFFFFFF
MAX_LOG = 40                            # bytes of a bad CONNECT line in the log

GREETING, CONNECTING, ESTABLISHED = "greeting", "connecting", "established"


def check_cid(cid):
    if not MIN_CID <= cid <= MAX_CID:
        raise ValueError(f"{cid} is not a guest CID: it must be from {MIN_CID} to {MAX_CID} "
                         "(0-2 are reserved)")


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
        self.reading = False       # its reader is registered
        self.writing = False       # its writer is registered
        self.credit_update_queued = False
        self.timer = None

    @property
    def key(self):
        return self.host_port, self.guest_port

    def peer_credit(self):
        """Bytes the guest can take now (its last buf_alloc and fwd_cnt)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & MASK32
        return max(0, self.peer_buf_alloc - in_flight)

    def wants_input(self):
        """Should the socket be read (guest connected, willing and with credit)?"""
        return (self.state == ESTABLISHED and not self.host_eof
                and not self.guest_shut & SHUTDOWN_RCV and self.peer_credit() > 0)


class VsockDevice(VirtioDevice):
    """A virtio-vsock device for guest ``cid``, its host side at Unix socket ``socket``."""

    device_id = ID_VSOCK
    name = "vsock"

    def __init__(self, cid, socket, *, max_connections=DEFAULT_MAX_CONNECTIONS,
                 buf_alloc=BUF_ALLOC, connect_timeout=CONNECT_TIMEOUT):
        check_cid(cid)
        positive(max_connections)
        super().__init__(queue_sizes=[QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE],
                         features=bit(F_STREAM), config=struct.pack("<Q", cid))
        self.cid, self.path = cid, os.path.abspath(socket)   # info() shows where it is
        self.max_connections, self.buf_alloc = max_connections, buf_alloc
        self.connect_timeout = connect_timeout
        self.listener = listen(self.path)
        self.conns = {}                          # (host_port, guest_port) -> Connection
        self.greeting = {}                       # fd -> Connection waiting for CONNECT
        self._control = collections.deque()      # (host_port, guest_port, op, flags, conn)
        self._control_limit = 4 * max_connections + 64
        self._rx_chain = None                    # a receive buffer popped, not yet filled
        self._starved = collections.deque()      # connections waiting for receive buffers
        self._event_pending = False
        self._next_port = FIRST_HOST_PORT
        self._hdr = bytearray(HEADER_LEN)
        self.counters.update(connections=0, bad_packets=0, rst_sent=0, control_dropped=0)

    # -- lifecycle --------------------------------------------------------------------------

    def attach(self, loop):
        super().attach(loop)
        self.loop.add_reader(self.listener, self._accept)

    def detach(self):
        self._close_all()
        if self.listener is not None:
            if self.loop is not None:
                self.loop.remove_reader(self.listener)
            remove_listener(self.listener, self.path)
            self.listener = None
        super().detach()

    def activate(self):
        self._flush_rx()

    def reset(self):
        self._close_all()
        self._event_pending = False

    def queue_reset(self, index):
        if index == RX:
            self._rx_chain = None

    def _close_all(self):
        for conn in [*self.conns.values(), *self.greeting.values()]:
            self._close(conn)
        self._control.clear()
        self._starved.clear()
        self._rx_chain = None

    def transport_reset(self):
        """Drop every connection and tell the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)."""
        self._close_all()
        self._event_pending = True
        self._post_event()

    def queue_notify(self, index):
        if index == TX:
            self._transmit()
        elif index == RX:
            self._flush_rx()
        elif index == EVENT:
            self._post_event()

    def _post_event(self):
        queue = self.queues[EVENT]
        if not (self._event_pending and self.active and queue.ready):
            return
        chain = queue.pop()
        if chain is None:
            return
        n = scatter(EVENT_STRUCT.pack(EVENT_TRANSPORT_RESET), chain.writable)
        if n < EVENT_STRUCT.size:
            self.guest_error("event buffer of %d bytes is shorter than an event; returned "
                             "empty", chain.writable_len)
            n = 0
        else:
            self._event_pending = False
        queue.add_used(chain.head, n)
        self.signal_used(queue)

    # -- connections ------------------------------------------------------------------------

    def _accept(self):
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        if len(self.conns) + len(self.greeting) >= self.max_connections:
            self.error("host connection to %s refused: %d connections already (max_"
                       "connections)", self.path, self.max_connections)
            sock.close()
            return
        conn = Connection(Stream(sock, self.buf_alloc), 0, 0, GREETING)
        self.greeting[conn.stream.fileno()] = conn
        conn.timer = self.loop.call_later(self.connect_timeout, lambda: self._timed_out(conn))
        self.loop.add_reader(conn.stream, lambda: self._read_greeting(conn))

    def _read_greeting(self, conn):
        line = read_line(conn.stream.sock)
        if line is None:
            return
        port = parse_connect(line) if line else None
        if port is None:
            self.error("host connection to %s closed: expected 'CONNECT <port>\\n', got "
                       "%r", self.path, bytes(line[:MAX_LOG]))
            self._close(conn)
            return
        self._end_greeting(conn)
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

    def _guest_connect(self, host_port, guest_port):
        if len(self.conns) + len(self.greeting) >= self.max_connections:
            self.error("guest connection to port %d refused: %d connections already "
                       "(max_connections)", host_port, self.max_connections)
            self._queue_rst(host_port, guest_port)
            return
        sock = connect_unix(f"{self.path}_{host_port}")
        if sock is None:
            self._queue_rst(host_port, guest_port)
            return
        conn = Connection(Stream(sock, self.buf_alloc), host_port, guest_port, ESTABLISHED)
        self.conns[conn.key] = conn
        self.counters["connections"] += 1
        self._queue(conn, OP_RESPONSE)

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
        want = conn.wants_input() and conn not in self._starved
        if want != conn.reading:
            conn.reading = want
            if want:
                self.loop.add_reader(conn.stream, lambda: self._read(conn))
            else:
                self.loop.remove_reader(conn.stream)

    def _close(self, conn):
        """Forget ``conn`` and close its socket (no packet to the guest)."""
        if conn.stream is None:
            return
        if conn.timer is not None:
            self.loop.cancel(conn.timer)
            conn.timer = None
        if conn.state == GREETING:
            self._end_greeting(conn)
        if conn.reading:
            self.loop.remove_reader(conn.stream)
        if conn.writing:
            self.loop.remove_writer(conn.stream)
        conn.reading = conn.writing = False
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if conn in self._starved:
            self._starved.remove(conn)
        conn.stream.close()
        conn.stream = None

    def _reset(self, conn):
        """Close ``conn`` and send the guest RST for it."""
        key = conn.key
        self._close(conn)
        self._queue_rst(*key)

    # -- guest -> host ----------------------------------------------------------------------

    def _transmit(self):
        self.consume(self.queues[TX], self._packet)
        self._flush_rx()

    def _bad(self, fmt, *args):
        self.counters["bad_packets"] += 1
        self.guest_error(fmt, *args)

    def _packet(self, chain):
        if chain.readable_len < HEADER_LEN:
            self._bad("tx packet of %d bytes is shorter than the %d-byte header; dropped",
                      chain.readable_len, HEADER_LEN)
            return
        gather(chain.readable, self._hdr)
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc,
         fwd_cnt) = HEADER.unpack(self._hdr)
        key = (dst_port, src_port)
        conn = self.conns.get(key)
        if src_cid != self.cid:
            self._bad("tx packet from CID %d, not the guest's %d; dropped", src_cid, self.cid)
            return
        if length > chain.readable_len - HEADER_LEN:
            self._bad("tx packet says %d payload bytes, has %d; dropped", length,
                      chain.readable_len - HEADER_LEN)
            if conn is not None:
                self._reset(conn)
            return
        if op == OP_RST:
            if conn is not None:
                self._close(conn)
            return
        if dst_cid != HOST_CID or type_ != TYPE_STREAM:
            self._queue_rst(dst_port, src_port)       # no such peer or socket type here
            return
        if op == OP_REQUEST:
            if conn is not None:
                self._bad("REQUEST for connection %d:%d that exists; reset", dst_port,
                          src_port)
                self._reset(conn)
            else:
                self._guest_connect(dst_port, src_port)
            return
        if conn is None or conn.state == GREETING:
            self._queue_rst(dst_port, src_port)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if length and op != OP_RW:
            self._bad("op %d with a %d-byte payload; reset", op, length)
            self._reset(conn)
        elif op == OP_RW:
            self._guest_data(conn, chain, length)
        elif op == OP_RESPONSE:
            if conn.state != CONNECTING:
                self._bad("RESPONSE on connection %d:%d that is not connecting; reset",
                          dst_port, src_port)
                self._reset(conn)
                return
            self._established(conn)
        elif op == OP_SHUTDOWN:
            conn.guest_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            self._update_reader(conn)
            self._drained(conn)
        elif op == OP_CREDIT_REQUEST:
            self._queue(conn, OP_CREDIT_UPDATE)
        elif op != OP_CREDIT_UPDATE:
            self._bad("unknown op %d; reset", op)
            self._reset(conn)
            return
        if conn.stream is not None:
            self._update_reader(conn)

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
        if pending != conn.writing:
            conn.writing = pending
            if pending:
                self.loop.add_writer(conn.stream, lambda: self._write(conn))
            else:
                self.loop.remove_writer(conn.stream)
        unseen = conn.fwd_cnt - conn.fwd_cnt_sent
        if unseen and conn.rx_cnt - conn.fwd_cnt_sent > self.buf_alloc // 2:
            self._queue(conn, OP_CREDIT_UPDATE)
        if not pending:
            self._drained(conn)

    def _write(self, conn):
        sent = conn.stream.flush()
        if sent is None:
            self._reset(conn)
            return
        self._forwarded(conn, sent)
        self._flush_rx()

    def _drained(self, conn):
        """The FIFO is empty: carry out the guest's shutdown, if any."""
        if conn.stream is None or conn.stream.pending:
            return
        if conn.guest_shut & SHUTDOWN_SEND and (conn.guest_shut & SHUTDOWN_RCV
                                                or conn.host_eof):
            self._reset(conn)       # both sides done: RST ends it (5.10.6.6)
        elif conn.guest_shut & SHUTDOWN_SEND:
            conn.stream.shutdown_write()

    # -- host -> guest ----------------------------------------------------------------------

    def _queue(self, conn, op, flags=0):
        """Queue a control packet for ``conn``; with the queue full it is dropped (counted),
        and ``conn``, which cannot go on without it, is closed (a credit update is not
        needed: the next one carries the same)."""
        if op == OP_CREDIT_UPDATE and conn.credit_update_queued:
            return
        if len(self._control) >= self._control_limit:
            self.counters["control_dropped"] += 1
            if op != OP_CREDIT_UPDATE:
                self._close(conn)
            return
        conn.credit_update_queued |= op == OP_CREDIT_UPDATE
        self._control.append((conn.host_port, conn.guest_port, op, flags, conn))

    def _queue_rst(self, host_port, guest_port):
        if len(self._control) >= self._control_limit:
            self.counters["control_dropped"] += 1
            return
        self.counters["rst_sent"] += 1
        self._control.append((host_port, guest_port, OP_RST, 0, None))

    def _rx_buffer(self):
        """The receive buffer to fill next (held until used), or None."""
        rxq = self.queues[RX]
        while self._rx_chain is None:
            if not (self.active and rxq.ready):
                return None
            chain = rxq.pop()
            if chain is None:
                return None
            if chain.writable_len < HEADER_LEN:
                self.guest_error("rx buffer of %d bytes cannot hold the %d-byte header; "
                                 "returned empty", chain.writable_len, HEADER_LEN)
                rxq.add_used(chain.head, 0)
                continue
            self._rx_chain = chain
        return self._rx_chain

    def _send(self, chain, host_port, guest_port, op, flags, conn, length=0):
        fwd_cnt = 0
        if conn is not None:
            fwd_cnt = conn.fwd_cnt & MASK32
            conn.fwd_cnt_sent = conn.fwd_cnt
        HEADER.pack_into(self._hdr, 0, HOST_CID, self.cid, host_port, guest_port, length,
                         TYPE_STREAM, op, flags, self.buf_alloc, fwd_cnt)
        scatter(self._hdr, chain.writable)
        self._rx_chain = None
        self.queues[RX].add_used(chain.head, HEADER_LEN + length)

    def _flush_control(self):
        """Send waiting control packets; True when none is left."""
        sent = False
        while self._control:
            chain = self._rx_buffer()
            if chain is None:
                break
            host_port, guest_port, op, flags, conn = self._control.popleft()
            if conn is not None:
                if conn.stream is None and op != OP_RST:
                    continue
                if op == OP_CREDIT_UPDATE:
                    conn.credit_update_queued = False
            self._send(chain, host_port, guest_port, op, flags, conn)
            sent = True
        if sent:
            self.signal_used(self.queues[RX])
        return not self._control

    def _flush_rx(self):
        """Control packets, then wake the connections that waited for receive buffers."""
        if not self._flush_control():
            return
        while self._starved and self._rx_buffer() is not None:
            conn = self._starved.popleft()
            self._update_reader(conn)
            self._read(conn)

    def _read(self, conn):
        """The socket is readable: move data into receive buffers, within credit."""
        if not self._flush_control():
            self._starve(conn)
            return
        sent = False
        for _ in range(READS_PER_CALLBACK):
            if conn.stream is None or not conn.wants_input():
                break
            chain = self._rx_buffer()
            if chain is None:
                self._starve(conn)
                break
            room = min(conn.peer_credit(), chain.writable_len - HEADER_LEN, MAX_PACKET)
            if room <= 0:
                self.guest_error("rx buffer of %d bytes holds no payload; returned empty",
                                 chain.writable_len)
                self._rx_chain = None
                self.queues[RX].add_used(chain.head, 0)
                continue
            n = conn.stream.read_into(truncate(skip(chain.writable, HEADER_LEN), room))
            if n is None:
                break
            if n < 0:
                self._reset(conn)
                break
            if n == 0:
                conn.host_eof = True
                self._queue(conn, OP_SHUTDOWN, SHUTDOWN_SEND)
                self._flush_control()
                self._drained(conn)
                break
            self._send(chain, conn.host_port, conn.guest_port, OP_RW, 0, conn, n)
            conn.tx_cnt += n
            self.count(bytes_to_guest=n)
            sent = True
        if sent:
            self.signal_used(self.queues[RX])
        if conn.stream is not None:
            self._update_reader(conn)
        self._flush_control()

    def _starve(self, conn):
        if conn not in self._starved:
            self._starved.append(conn)
        self._update_reader(conn)

    # -- introspection ----------------------------------------------------------------------

    def info(self):
        out = super().info()
        out.update(cid=self.cid, socket=self.path, open_connections=len(self.conns),
                   max_connections=self.max_connections)
        return out

SCHEMA = Schema("vsock", (
    Field("cid", int, REQUIRED, f"the guest's CID, an integer from {MIN_CID} to {MAX_CID}",
          check_cid),
    Field("socket", str, REQUIRED, "the path of the host-side Unix socket", path=under),
    Field("max_connections", int, None, "open connections at most", positive),
))


def from_config(options):
    """The VMs config's ``vsock = { cid, socket, max_connections }``."""
    return VsockDevice(options["cid"], options["socket"],
                       max_connections=options.get("max_connections",
                                                   DEFAULT_MAX_CONNECTIONS))
