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
* a packet for no connection: RST (unless it is an RST); anything but RESPONSE (or
  RST) on a connection the device asked for and the guest did not accept yet: RST,
  counted as ``bad_packets``, as Linux does;
* REQUEST beyond ``max_connections``, or to a host port nobody listens on:
  RST.

``transport_reset()`` drops every connection and posts
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.7) on the event queue: for a
guest whose connections vanished behind its back, as after a restart of the
daemon under a running guest (``restore_state``). A device reset closes
every connection (the guest's driver is gone).

Connections, flow control and shutdowns: ``vsock_conn``.
"""

import collections
import os
import re
import struct

from ..backends.vsock import listen, remove_listener
from ..config import Matching
from ..schema import REQUIRED, Field, Schema, under, up_to
from ..virtio.buffers import gather, scatter, skip, truncate
from ..virtio.constants import ID_VSOCK, bit
from ..virtio.device import VirtioDevice
from .vsock_conn import (BUF_ALLOC, CONNECT_TIMEOUT, CONNECTING, DRAINING, FIRST_HOST_PORT,
                         GREETING, HEADER, HEADER_LEN, HOST_CID, MASK32, OP_CREDIT_REQUEST,
                         OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW,
                         SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, Connections)

F_STREAM = 0
RX, TX, EVENT = 0, 1, 2
QUEUE_SIZE, EVENT_QUEUE_SIZE = 256, 16

EVENT_STRUCT = struct.Struct("<I")
EVENT_TRANSPORT_RESET = 0

MIN_CID, MAX_CID = 3, 0xFFFFFFFE        # 0-2 are reserved, 0xFFFFFFFF is VMADDR_CID_ANY
MAX_PACKET = 64 << 10                   # payload per packet to the guest (Linux's maximum)
DEFAULT_MAX_CONNECTIONS = 64
MAX_CONNECTIONS = 1024      # each holds a Unix socket (an fd) and up to buf_alloc bytes
READS_PER_CALLBACK = 16                 # packets from one socket per readiness callback


def check_cid(cid):
    if not MIN_CID <= cid <= MAX_CID:
        raise ValueError(f"{cid} is not a guest CID: it must be from {MIN_CID} to {MAX_CID} "
                         "(0-2 are reserved)")


class VsockDevice(Connections, VirtioDevice):
    """A virtio-vsock device for guest ``cid``, its host side at Unix socket ``socket``."""

    device_id = ID_VSOCK
    name = "vsock"
    restartable = True

    def __init__(self, cid, socket, *, max_connections=DEFAULT_MAX_CONNECTIONS,
                 buf_alloc=BUF_ALLOC, connect_timeout=CONNECT_TIMEOUT):
        check_cid(cid)
        up_to(MAX_CONNECTIONS)(max_connections)
        super().__init__(queue_sizes=[QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE],
                         features=bit(F_STREAM), config=struct.pack("<Q", cid))
        self.cid, self.path = cid, os.path.abspath(socket)   # info() shows where it is
        self.max_connections, self.buf_alloc = max_connections, buf_alloc
        self.connect_timeout = connect_timeout
        self.listener = listen(self.path)
        self.conns = {}                          # (host_port, guest_port) -> Connection
        self.greeting = {}                       # fd -> Connection waiting for CONNECT
        self._draining = set()                   # reset by the guest, FIFO not yet sent
        self._control = collections.deque()      # (host_port, guest_port, op, flags, conn)
        self._control_limit = 4 * max_connections + 64
        self._gone = False                       # a connection left the table: stale entries
        self._owed = set()                       # connections owed a dropped credit update
        self._owed_rst = set()                   # closed, owed an RST the queue had no room for
        self._rx_chain = None                    # a receive buffer popped, not yet filled
        self._starved = collections.deque()      # connections waiting for receive buffers
        self._event_pending = False
        self._next_port = FIRST_HOST_PORT
        self._accept_timer = None                # accepting paused: no descriptor left
        self._hdr = bytearray(HEADER_LEN)
        self.counters.update(connections=0, bad_packets=0, rst_sent=0, control_dropped=0)

    # -- lifecycle --------------------------------------------------------------------------

    def attach(self, loop):
        super().attach(loop)
        self.loop.add_reader(self.listener, self._accept)

    def detach(self):
        self._close_all()
        if self._accept_timer is not None:
            self.loop.cancel(self._accept_timer)
            self._accept_timer = None
        if self.listener is not None:
            if self.loop is not None:
                self.loop.remove_reader(self.listener)
            remove_listener(self.listener, self.path)
            self.listener = None
        super().detach()

    def activate(self):
        self._flush_rx()
        self._post_event()

    def reset(self):
        self._close_all()
        self._event_pending = False

    def queue_reset(self, index):
        if index == RX:
            self._rx_chain = None

    def _close_all(self):
        for conn in [*self.conns.values(), *self.greeting.values(), *self._draining]:
            self._close(conn)
        self._control.clear()
        self._owed.clear()
        self._owed_rst.clear()
        self._starved.clear()
        self._rx_chain = None

    def restore_state(self, saved, words, live):
        """The host side of every connection died with the previous daemon: a device
        restored live tells the guest (5.10.6.7, as after a migration), whose sockets
        then close instead of waiting for ever; its listeners stay."""
        self._event_pending = live

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
        queue.add_used(chain, n)
        self.signal_used(queue)

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
                self._guest_reset(conn)
            return
        if dst_cid != HOST_CID or type_ != TYPE_STREAM:
            if conn is not None:                      # the guest closes its socket on the RST
                self._reset(conn)
            else:
                self._queue_rst(dst_port, src_port)   # no such peer or socket type here
            return
        if op == OP_REQUEST:
            if conn is not None:
                self._bad("REQUEST for connection %d:%d that exists; reset", dst_port,
                          src_port)
                self._reset(conn)
            else:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            return
        if conn is None or conn.state == GREETING:
            self._queue_rst(dst_port, src_port)
            return
        if conn.state == CONNECTING and op != OP_RESPONSE:   # as Linux's recv_connecting
            self._bad("op %d on connection %d:%d that is connecting; reset", op, dst_port,
                      src_port)
            self._reset(conn)
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
            if conn.guest_shut & SHUTDOWN_RCV:    # the host writer gets EPIPE, as a
                conn.stream.shutdown_read()       # Linux peer's send() would
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

    # -- host -> guest ----------------------------------------------------------------------

    def _queue(self, conn, op, flags=0):
        """Queue a control packet for ``conn``; with the queue full it is dropped (counted),
        and ``conn``, which cannot go on without it, is reset; a credit update is owed
        instead, queued when there is room (a guest sender waiting at zero credit would
        wait for ever without it)."""
        if op == OP_CREDIT_UPDATE and conn.credit_update_queued:
            return
        if self._full():
            self.counters["control_dropped"] += 1
            if op == OP_CREDIT_UPDATE:
                self._owed.add(conn)
            else:
                self._reset(conn)
            return
        conn.credit_update_queued |= op == OP_CREDIT_UPDATE
        self._control.append((conn.host_port, conn.guest_port, op, flags, conn))

    def _take_owed(self):
        """Queue the RSTs and credit updates owed, as far as there is room; True while
        control packets wait."""
        while self._owed_rst and not self._full():
            conn = self._owed_rst.pop()
            self._queue_rst(*conn.key, conn)
        while self._owed and not self._full():
            self._queue(self._owed.pop(), OP_CREDIT_UPDATE)
        return bool(self._control)

    def _full(self):
        """No room for another control packet, once the entries of connections that left
        the table since the last look (all but their RSTs: ``_flush_control`` skips them)
        are dropped: a guest that posts no receive buffers while it opens and closes
        connections does not fill the queue with packets that will never be sent."""
        if len(self._control) >= self._control_limit and self._gone:
            self._control = collections.deque(e for e in self._control if not _stale(*e))
            self._gone = False
        return len(self._control) >= self._control_limit

    def _queue_rst(self, host_port, guest_port, conn=None):
        """Queue an RST; for ``conn`` (closed already) it carries its counters. With the
        queue full one for ``conn`` is owed (the guest's socket would stay open for ever
        without it; it counts against ``max_connections`` until sent), one for no
        connection dropped."""
        if self._full():
            if conn is None:
                self.counters["control_dropped"] += 1
            else:
                self._owed_rst.add(conn)
            return
        self.counters["rst_sent"] += 1
        self._control.append((host_port, guest_port, OP_RST, 0, conn))

    def _rx_buffer(self):
        """The receive buffer to fill next (held until used), or None."""
        rxq = self.queues[RX]
        returned = False
        while self._rx_chain is None:
            chain = rxq.pop() if self.active and rxq.ready else None
            if chain is None:
                break
            if chain.writable_len < HEADER_LEN:
                self.guest_error("rx buffer of %d bytes cannot hold the %d-byte header; "
                                 "returned empty", chain.writable_len, HEADER_LEN)
                rxq.add_used(chain, 0)
                returned = True
                continue
            self._rx_chain = chain
        if returned:
            self.signal_used(rxq)           # or the guest sees them back only with a later one
        return self._rx_chain

    def _send(self, chain, host_port, guest_port, op, flags, conn, length=0):
        buf_alloc = fwd_cnt = 0                 # no connection: no buffer (as Linux)
        if conn is not None:
            buf_alloc, fwd_cnt = self.buf_alloc, conn.fwd_cnt & MASK32
            conn.fwd_cnt_sent = conn.fwd_cnt
        HEADER.pack_into(self._hdr, 0, HOST_CID, self.cid, host_port, guest_port, length,
                         TYPE_STREAM, op, flags, buf_alloc, fwd_cnt)
        scatter(self._hdr, chain.writable)
        self._rx_chain = None
        self.queues[RX].add_used(chain, HEADER_LEN + length)

    def _flush_control(self):
        """Send waiting control packets; True when none is left."""
        sent = False
        while self._take_owed():
            chain = self._rx_buffer()
            if chain is None:
                break
            entry = host_port, guest_port, op, flags, conn = self._control.popleft()
            if _stale(*entry):
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
            if not conn.peer_credit():
                self._peek(conn)
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
                self.queues[RX].add_used(chain, 0)
                sent = True                 # returned: the guest is told below
                continue
            conn.held = False
            n = conn.stream.read_into(truncate(skip(chain.writable, HEADER_LEN), room))
            if n is None:
                break
            if n <= 0:
                self._ended(conn, n)
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

    def _peek(self, conn):
        """No credit: bytes waiting hold the socket unwatched until there is; its end (or
        an error) reaches the guest at once."""
        n = conn.stream.peek()
        if n is None:
            return
        conn.held = n > 0
        if not conn.held:
            self._ended(conn, n)

    def _ended(self, conn, n):
        """The socket's peer shut its writing side (``n`` 0) or it failed (-1)."""
        if n < 0:
            self._reset(conn)
            return
        conn.host_eof = True
        self._queue(conn, OP_SHUTDOWN, SHUTDOWN_SEND)
        self._flush_control()
        self._drained(conn)

    def _hung_up(self, conn):
        """The guest shut its receiving side (the socket is not read), and now the socket's
        peer has closed: the host will neither send nor receive, and the guest is told so
        (SHUTDOWN with both flags, on which Linux resets the connection)."""
        conn.host_eof = True
        self._update_reader(conn)
        self._queue(conn, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
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
    Field("max_connections", int, None, f"open connections at most (1 to {MAX_CONNECTIONS})",
          up_to(MAX_CONNECTIONS)),
))


ONE_PER_VM = "a guest has one CID"


def _stale(host_port, guest_port, op, flags, conn):
    """A control packet for a connection gone from the table: not sent (but an RST)."""
    return (conn is not None and op != OP_RST
            and (conn.stream is None or conn.state == DRAINING))


def claims(options):
    """What the device must have to itself (avatar_hw.config): its socket, and the paths its
    guest's connections go to (``SOCKET_PORT``): a console's socket or another vsock's there
    would be this guest's to reach."""
    path = os.path.normpath(options["socket"])
    yield "socket", f"path {path}", False
    yield "socket", Matching(re.compile(re.escape(f"path {path}_") + "[0-9]+"),
                             f"{path}_PORT is where its guest connects to host port PORT"), False


def from_config(options):
    """The VMs config's ``vsock = { cid, socket, max_connections }``."""
    return VsockDevice(options["cid"], options["socket"],
                       max_connections=options.get("max_connections",
                                                   DEFAULT_MAX_CONNECTIONS))
