"""virtio-vsock through the driver-side harness: connections both ways over Unix sockets
(Firecracker's CONNECT convention), credit flow control both ways, shutdown and reset,
malformed headers from a hostile guest, limits, the event queue and config errors."""

import errno
import hashlib
import os
import socket
import struct
import threading
import time

import pytest

from avatar_hw.commands.query import format_device
from avatar_hw.config import parse_config
from avatar_hw.devices import vsock
from avatar_hw.devices.vsock import (HEADER, HEADER_LEN, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
                                     OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
                                     SHUTDOWN_RCV, SHUTDOWN_SEND, VsockDevice)
from avatar_hw.errors import AvatarError, ConfigError
from avatar_hw.hil.vsock import connect
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import constants as c
from test_console import loop  # noqa: F401 (fixture)

CID = 7
GUEST_BUF = 256 << 10           # the guest's buf_alloc unless a test says otherwise
PAYLOAD = 4096                  # payload bytes per receive buffer (like Linux 6.1)


class Guest:
    """A vsock device in a VM, with a guest driver played from the host side."""

    def __init__(self, tmp_path, loop, **kw):
        self.loop = loop
        self.path = str(tmp_path / "v.sock")
        self.device = VsockDevice(CID, self.path, **kw)
        self.bench = VirtioBench(self.device, loop=loop, ram_size=8 << 20)
        self.driver = self.bench.driver
        self.rx, self.tx, self.event = self.driver.init([0, 1, 2], buf_size=PAYLOAD + 64)
        self.fwd_cnt = {}        # guest_port -> bytes the guest consumed (its fwd_cnt)
        self.buf_alloc = GUEST_BUF

    def spin(self, rounds=20):
        for _ in range(rounds):
            self.loop.run_once(0)

    def wait(self, seconds):
        """Serve the loop for ``seconds``; every timer due by then has run, however late this
        process was scheduled (the last turn starts after the deadline)."""
        deadline = time.monotonic() + seconds
        while True:
            late = time.monotonic() >= deadline
            self.loop.run_once(0 if late else 0.01)
            if late:
                return

    def listen(self, port, backlog=128):
        """A host program listening on ``port`` (the device's ``PATH_port`` socket)."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(f"{self.path}_{port}")
        server.listen(backlog)
        return server

    def give_rx(self, n):
        for _ in range(n):
            self.rx.post(writable=[HEADER_LEN, PAYLOAD])
        self.rx.notify()

    def send(self, src_port, dst_port, op, payload=b"", *, flags=0, src_cid=CID,
             dst_cid=2, type_=1, length=None, buf_alloc=None, fwd_cnt=None):
        header = HEADER.pack(src_cid, dst_cid, src_port, dst_port,
                             len(payload) if length is None else length, type_, op, flags,
                             self.buf_alloc if buf_alloc is None else buf_alloc,
                             self.fwd_cnt.get(src_port, 0) if fwd_cnt is None else fwd_cnt)
        parts = [header] + [payload[i:i + PAYLOAD] for i in range(0, len(payload), PAYLOAD)]
        self.tx.post(readable=parts)
        self.tx.notify()
        assert all(u.length == 0 for u in self.tx.get_used())

    def packets(self, rounds=20):
        """Packets the device put in the receive queue: (header tuple, payload)."""
        self.spin(rounds)
        out = []
        for used in self.rx.get_used():
            assert used.length >= HEADER_LEN
            hdr = HEADER.unpack(used.data[:HEADER_LEN])
            payload = used.data[HEADER_LEN:]
            assert hdr[4] == len(payload) and hdr[0] == 2 and hdr[1] == CID and hdr[5] == 1
            out.append((hdr, payload))
        return out

    def host_connect(self, port):
        """A host client asking for guest ``port``: (client socket, REQUEST header)."""
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(self.path)
        client.sendall(f"CONNECT {port}\n".encode())
        (hdr, _), = self.packets()
        assert hdr[6] == OP_REQUEST and hdr[3] == port
        return client, hdr

    def established(self, port=5000):
        """A host-initiated connection the guest accepted: (client, host_port)."""
        self.give_rx(32)
        client, hdr = self.host_connect(port)
        self.send(port, hdr[2], OP_RESPONSE)
        self.spin()
        client.settimeout(2)
        assert read_line(client) == f"OK {hdr[2]}"
        return client, hdr[2]

    def status(self):
        return self.driver.status


def read_line(sock):
    line = b""
    while not line.endswith(b"\n"):
        line += sock.recv(1)
    return line[:-1].decode()


def closed(sock):
    """Did the device close ``sock`` (end of stream, or a reset when input was unread)?"""
    sock.settimeout(2)
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def ops(packets):
    return [hdr[6] for hdr, _ in packets]


def test_identity_config_and_features(tmp_path, loop):
    g = Guest(tmp_path, loop)
    assert g.driver.read(c.REG_DEVICE_ID) == 19
    assert g.driver.read_config(0) | g.driver.read_config(4) << 32 == CID
    assert g.driver.device_features() & 1                   # VIRTIO_VSOCK_F_STREAM
    assert not g.driver.device_features() & 2               # no SEQPACKET


def test_host_connects_to_a_guest_port(tmp_path, loop):
    g = Guest(tmp_path, loop)
    client, host_port = g.established(5000)
    assert host_port >= 1 << 30
    client.sendall(b"hello guest")
    (hdr, payload), = g.packets()
    assert hdr[6] == OP_RW and (hdr[2], hdr[3]) == (host_port, 5000) and payload == b"hello guest"
    assert hdr[8] == vsock.BUF_ALLOC                         # our buf_alloc, honestly
    g.send(5000, host_port, OP_RW, b"hello host")
    assert client.recv(100) == b"hello host"
    assert g.device.counters["bytes_to_guest"] == 11
    assert g.device.counters["bytes_from_guest"] == 10


def test_guest_refusing_or_ignoring_a_connect_closes_the_client(tmp_path, loop):
    g = Guest(tmp_path, loop, connect_timeout=0.3)
    g.give_rx(8)
    client, hdr = g.host_connect(6000)
    g.send(6000, hdr[2], OP_RST)
    g.spin()
    assert client.recv(10) == b""                            # no OK line
    client, hdr = g.host_connect(6001)                       # the guest never answers
    g.wait(0.5)
    assert client.recv(10) == b""
    assert ops(g.packets()) == [OP_RST]
    assert not g.device.conns and not g.device.greeting


def test_the_guest_gets_the_whole_timeout_after_a_late_connect_line(tmp_path, loop):
    """connect_timeout is for the CONNECT line, then again for the guest's answer: a client
    that took most of it to send its line does not leave the guest only the rest."""
    g = Guest(tmp_path, loop, connect_timeout=0.3)
    g.give_rx(8)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(g.path)
    g.wait(0.2)
    client.sendall(b"CONNECT 6002\n")
    (hdr, _), = g.packets()
    assert hdr[6] == OP_REQUEST
    g.wait(0.2)                                              # 0.4 s since the client came
    g.send(6002, hdr[2], OP_RESPONSE)
    g.spin()
    client.settimeout(2)
    assert read_line(client) == f"OK {hdr[2]}"


@pytest.mark.parametrize("line", [b"HELLO\n", b"CONNECT x\n", b"CONNECT 99999999999\n",
                                  b"A" * 40])
def test_a_bad_connect_line_closes_the_client(tmp_path, loop, line):
    g = Guest(tmp_path, loop)
    g.give_rx(4)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(g.path)
    client.sendall(line)
    assert g.packets() == []
    assert closed(client)
    assert not g.device.greeting and not g.device.conns


def guest_connecting(tmp_path, loop):
    """A guest that asked for host port 1234 (from its port 40000), and the host program's
    listener there: (Guest, listening socket)."""
    g = Guest(tmp_path, loop)
    g.give_rx(16)
    server = g.listen(1234, backlog=1)
    g.send(40000, 1234, OP_REQUEST)
    return g, server


def test_guest_connects_to_the_host_port_socket(tmp_path, loop):
    g, server = guest_connecting(tmp_path, loop)
    (hdr, _), = g.packets()
    assert hdr[6] == OP_RESPONSE and (hdr[2], hdr[3]) == (1234, 40000)
    peer, _ = server.accept()
    peer.settimeout(2)
    g.send(40000, 1234, OP_RW, b"from guest")
    assert peer.recv(100) == b"from guest"
    peer.sendall(b"from host")
    (hdr, payload), = g.packets()
    assert hdr[6] == OP_RW and payload == b"from host"
    g.send(40001, 4321, OP_REQUEST)                          # nobody listens at _4321
    (hdr, _), = g.packets()
    assert hdr[6] == OP_RST and (hdr[2], hdr[3]) == (4321, 40001)


def test_a_host_program_that_speaks_first_reaches_the_guest(tmp_path, loop):
    """The guest's REQUEST already says how much it can take (buf_alloc, 5.10.6.3): a host
    server's banner, sent before the guest writes anything, reaches it, and so does the
    server's close. The guest sends nothing after its REQUEST (Linux does not until its
    program writes)."""
    g, server = guest_connecting(tmp_path, loop)
    peer, _ = server.accept()
    peer.sendall(b"220 banner\n")
    got = g.packets()
    assert [(hdr[6], payload) for hdr, payload in got] == [(OP_RESPONSE, b""),
                                                            (OP_RW, b"220 banner\n")]
    peer.close()
    (hdr, _), = g.packets()
    assert hdr[6] == OP_SHUTDOWN


def test_a_client_that_sends_part_of_its_connect_line_leaves_the_loop_idle(tmp_path, loop):
    """A host client that sends ``CONN`` and waits: what came is read and kept (only
    peeked, it left the socket readable, and the level-triggered loop called the greeting's
    reader again at once, for the 2 s the client had); the rest completes the line."""
    g = Guest(tmp_path, loop)
    g.give_rx(4)
    calls, real = [], g.device._read_greeting
    g.device._read_greeting = lambda conn: (calls.append(1), real(conn))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(g.path)
    client.sendall(b"CONN")
    g.wait(0.3)
    assert len(calls) <= 3
    client.sendall(b"ECT 5000\n")
    (hdr, _), = g.packets()
    assert hdr[6] == OP_REQUEST and hdr[3] == 5000


def test_out_of_descriptors_the_listener_waits_instead_of_spinning(tmp_path, loop):
    """accept() failing with EMFILE leaves the client in the backlog and the listener
    readable: the device looks again every ACCEPT_RETRY_S instead of at every turn of the
    loop, and takes the client once descriptors are back."""
    g = Guest(tmp_path, loop)
    g.give_rx(4)
    real, calls = g.device.listener, []

    class Exhausted:
        def fileno(self):
            return real.fileno()

        def accept(self):
            calls.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
    g.device.listener = Exhausted()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(g.path)
    client.sendall(b"CONNECT 5000\n")
    g.wait(0.35)
    assert 1 <= len(calls) <= 6
    g.device.listener = real
    g.wait(0.25)
    (hdr, _), = g.packets()
    assert hdr[6] == OP_REQUEST and hdr[3] == 5000


def test_a_guest_without_credit_stalls_the_host_writer_without_loss(tmp_path, loop):
    """The guest advertises 8 KiB: the device reads no more than that from the socket;
    the writer blocks in its socket (the device holds nothing); credit updates let the rest
    through, in order, every byte."""
    g = Guest(tmp_path, loop)
    g.buf_alloc = 8192
    client, host_port = g.established()
    data = os.urandom(1 << 20)
    client.setblocking(False)
    written = 0
    for _ in range(400):                 # write until the socket is full
        try:
            written += client.send(data[written:written + 65536])
        except BlockingIOError:
            g.spin(2)
            try:
                written += client.send(data[written:written + 65536])
            except BlockingIOError:
                break
        g.spin(2)
    assert written < len(data)           # the writer is held back...
    received = b"".join(p for _, p in g.packets())
    assert len(received) == 8192         # ...and the guest got exactly its credit
    for _ in range(5):
        assert g.packets() == []         # no credit, nothing more
    # the guest consumes and says so; the rest follows, in order
    consumed = len(received)
    while consumed < len(data):
        g.fwd_cnt[5000] = consumed
        g.send(5000, host_port, OP_CREDIT_UPDATE)
        g.give_rx(8 - (g.rx.size - len(g.rx.free)) // 2)
        got = g.packets()
        for _, p in got:
            received += p
        consumed = len(received)
        assert consumed - g.fwd_cnt[5000] <= 8192
        if written < len(data):
            try:
                written += client.send(data[written:written + 65536])
            except BlockingIOError:
                pass
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_a_guest_lying_about_its_credit_gets_only_what_its_buffers_hold(tmp_path, loop):
    """A 4 GiB buf_alloc, then a fwd_cnt ahead of what was sent: the device reads the
    socket only into receive buffers the guest gave (it holds no host bytes itself), a
    credit that is not there stops it, and what arrives is the stream, in order."""
    g = Guest(tmp_path, loop)
    g.buf_alloc = 0xFFFFFFFF
    client, host_port = g.established()              # 32 receive buffers, one used
    data = os.urandom(1 << 20)
    client.setblocking(False)
    written = 0
    for _ in range(400):
        try:
            written += client.send(data[written:written + 65536])
        except BlockingIOError:
            break
        g.spin(2)
    received = b"".join(p for _, p in g.packets())
    assert len(received) == 31 * PAYLOAD             # the buffers it had, no more
    assert written > len(received)                   # the rest waits in the host's socket
    assert g.packets() == [] and not g.device._control
    conn = next(iter(g.device.conns.values()))
    ahead = (conn.tx_cnt + 1000) & 0xFFFFFFFF        # "consumed" more than it got
    g.send(5000, host_port, OP_CREDIT_UPDATE, buf_alloc=4096, fwd_cnt=ahead)
    g.give_rx(4)
    assert g.packets() == []                         # 4096 - (sent - ahead) mod 2**32 < 0
    g.send(5000, host_port, OP_CREDIT_UPDATE, buf_alloc=4096, fwd_cnt=conn.tx_cnt)
    got = b"".join(p for _, p in g.packets())
    assert len(got) == 4096                          # exactly the credit, then it stops
    received += got
    assert received == data[:len(received)]
    assert g.device.counters["bad_packets"] == 0 and g.device.conns


def test_guest_data_the_host_does_not_read_waits_within_the_credit_advertised(tmp_path,
                                                                             loop):
    """The host reader stalls: the device keeps at most buf_alloc bytes (its advertised
    credit), tells the guest only what reached the socket, and a guest that sends past
    the credit is reset."""
    g = Guest(tmp_path, loop, buf_alloc=64 << 10)
    client, host_port = g.established()
    conn = next(iter(g.device.conns.values()))
    sent, fwd_cnt, chunk = 0, 0, os.urandom(PAYLOAD)
    for _ in range(4000):
        for hdr, _ in g.packets(1):
            fwd_cnt = hdr[9]
            assert hdr[8] == 64 << 10
        if sent + PAYLOAD - fwd_cnt > 64 << 10:
            break                                            # no credit left
        g.send(5000, host_port, OP_RW, chunk)
        sent += PAYLOAD
        g.give_rx(1)
    else:
        pytest.fail("the guest never ran out of credit")
    assert len(conn.stream.pending) <= 64 << 10
    assert conn.fwd_cnt == fwd_cnt or conn.fwd_cnt - fwd_cnt < (64 << 10)
    g.send(5000, host_port, OP_RW, chunk)                    # past the credit: reset
    assert OP_RST in ops(g.packets())
    assert g.device.counters["bad_packets"] == 1 and not g.device.conns
    assert g.status() & c.STATUS_DEVICE_NEEDS_RESET == 0


def test_credit_request_gets_a_credit_update(tmp_path, loop):
    g = Guest(tmp_path, loop)
    client, host_port = g.established()
    g.send(5000, host_port, OP_RW, b"x" * 100)
    assert client.recv(200) == b"x" * 100
    g.send(5000, host_port, OP_CREDIT_REQUEST)
    (hdr, _), = g.packets()
    assert hdr[6] == OP_CREDIT_UPDATE and hdr[9] == 100 and hdr[8] == vsock.BUF_ALLOC


def test_host_half_close_and_guest_shutdown(tmp_path, loop):
    g = Guest(tmp_path, loop)
    client, host_port = g.established()
    client.shutdown(socket.SHUT_WR)                          # host: no more data
    (hdr, _), = g.packets()
    assert hdr[6] == OP_SHUTDOWN and hdr[7] == SHUTDOWN_SEND
    g.send(5000, host_port, OP_RW, b"still flowing")         # the other way still works
    assert client.recv(100) == b"still flowing"
    g.send(5000, host_port, OP_SHUTDOWN, flags=SHUTDOWN_SEND | SHUTDOWN_RCV)
    assert ops(g.packets()) == [OP_RST]                       # the clean close ends in RST
    assert client.recv(10) == b"" and not g.device.conns


def test_guest_shutdown_send_half_closes_the_socket(tmp_path, loop):
    g = Guest(tmp_path, loop)
    client, host_port = g.established()
    g.send(5000, host_port, OP_RW, b"last words")
    g.send(5000, host_port, OP_SHUTDOWN, flags=SHUTDOWN_SEND)
    g.spin()
    assert client.recv(100) == b"last words" and client.recv(10) == b""
    client.sendall(b"reply")                                 # host -> guest still open
    (hdr, payload), = g.packets()
    assert payload == b"reply"
    g.send(5000, host_port, OP_RW, b"more")                  # but the guest said SEND
    assert ops(g.packets()) == [OP_RST]
    assert g.device.counters["bad_packets"] == 1


def test_guest_shutdown_rcv_makes_the_host_writer_fail_instead_of_block(tmp_path, loop):
    """Once the guest will read no more, the host writer gets EPIPE (a Linux vsock
    peer's send() does too) instead of blocking for ever in a full socket."""
    g = Guest(tmp_path, loop)
    client, host_port = g.established()
    g.send(5000, host_port, OP_SHUTDOWN, flags=SHUTDOWN_RCV)
    g.spin()
    client.setblocking(False)
    with pytest.raises(BrokenPipeError):
        for _ in range(200):
            try:
                client.send(b"x" * 65536)
            except BlockingIOError:
                g.spin(2)
    assert g.packets() == [] and (host_port, 5000) in g.device.conns
    g.send(5000, host_port, OP_RW, b"guest -> host still flows")
    client.settimeout(2)
    assert client.recv(100) == b"guest -> host still flows"


@pytest.mark.parametrize("close", ["close", "shutdown both ways"])
def test_a_host_close_reaches_a_guest_that_shut_its_receiving_side(tmp_path, loop, close):
    """The socket is no longer read once the guest shut RCV, so its peer's close was
    never seen: now it is (its hang-up), and the guest is told the host will neither send
    nor receive, once; guest bytes after it are refused (RST), as the socket's are."""
    g = Guest(tmp_path, loop)
    client, host_port = g.established()
    g.send(5000, host_port, OP_SHUTDOWN, flags=SHUTDOWN_RCV)
    g.spin()
    assert g.packets() == []
    if close == "close":
        client.close()
    else:
        client.shutdown(socket.SHUT_RDWR)
    g.spin()
    (hdr, _), = g.packets()
    assert hdr[6] == OP_SHUTDOWN and hdr[7] == SHUTDOWN_RCV | SHUTDOWN_SEND
    g.spin(3)
    assert g.packets() == [] and (host_port, 5000) in g.device.conns
    g.send(5000, host_port, OP_RW, b"too late")
    g.spin()
    assert ops(g.packets()) == [OP_RST] and not g.device.conns


@pytest.mark.parametrize("op", [OP_SHUTDOWN, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_RW])
def test_anything_but_response_to_a_request_resets_it(tmp_path, loop, op):
    """Before its RESPONSE the guest may only answer RESPONSE or RST (Linux's
    virtio_transport_recv_connecting resets on anything else): the host client is
    closed without an OK line, not half-closed or answered a credit update."""
    g = Guest(tmp_path, loop)
    g.give_rx(8)
    client, hdr = g.host_connect(5000)
    g.send(5000, hdr[2], op, b"x" if op == OP_RW else b"", flags=SHUTDOWN_SEND)
    assert ops(g.packets()) == [OP_RST] and not g.device.conns
    assert closed(client)
    assert g.device.counters["bad_packets"] == 1


def test_guest_rst_closes_the_client(tmp_path, loop):
    g = Guest(tmp_path, loop)
    client, host_port = g.established()
    g.send(5000, host_port, OP_RST)
    g.spin()
    assert client.recv(10) == b"" and not g.device.conns
    assert g.packets() == []                                  # no answer to an RST


def test_guest_bytes_taken_before_its_rst_still_reach_a_slow_host_reader(tmp_path, loop):
    """Linux's close sends SHUTDOWN, and RST 8 s later if the host has not answered: a
    host reader slower than that once got a clean end of stream after part of what the
    device had taken within its credit (the rest, in its FIFO, was dropped). Now the FIFO
    still goes to the socket, the connection off the table but counted, then the end."""
    g = Guest(tmp_path, loop, max_connections=1)
    client, host_port = g.established()
    data = os.urandom(256 << 10)                            # the credit, no more
    for i in range(0, len(data), PAYLOAD):
        g.send(5000, host_port, OP_RW, data[i:i + PAYLOAD])
    assert next(iter(g.device.conns.values())).stream.pending     # the socket is full
    g.packets()                                             # its credit updates
    g.send(5000, host_port, OP_SHUTDOWN, flags=SHUTDOWN_SEND | SHUTDOWN_RCV)
    g.send(5000, host_port, OP_RST)                         # the guest's close timed out
    assert g.packets() == [] and not g.device.conns
    server = g.listen(1, backlog=1)
    g.send(5001, 1, OP_REQUEST)                             # its slot is still taken
    assert ops(g.packets()) == [OP_RST]
    client.settimeout(2)
    got = b""
    while True:
        chunk = client.recv(65536)
        g.spin(2)
        if not chunk:
            break
        got += chunk
    assert got == data and not g.device._draining
    assert g.packets() == [] and g.device.counters["bad_packets"] == 0


def test_packets_for_unknown_connections_get_rst(tmp_path, loop):
    g = Guest(tmp_path, loop)
    g.give_rx(8)
    for op in (OP_RW, OP_RESPONSE, OP_SHUTDOWN, OP_CREDIT_UPDATE):
        g.send(111, 222, op, b"data" if op == OP_RW else b"")
    got = g.packets()
    assert ops(got) == [OP_RST] * 4 and all((h[2], h[3]) == (222, 111) for h, _ in got)
    g.send(111, 222, OP_RST)
    assert g.packets() == []


@pytest.mark.parametrize("kind", ["short", "src_cid", "length", "dst_cid", "type", "op",
                                  "payload_on_control", "response_when_established",
                                  "duplicate_request"])
def test_malformed_packets_are_dropped_or_reset_never_raised(tmp_path, loop, kind):
    g = Guest(tmp_path, loop)
    client, host_port = g.established()
    hp = host_port
    if kind == "short":
        g.tx.post(readable=[b"\0" * 20])
        g.tx.notify()
        g.tx.get_used()
    elif kind == "src_cid":
        g.send(5000, hp, OP_RW, b"x", src_cid=CID + 1)
    elif kind == "length":
        g.send(5000, hp, OP_RW, b"abc", length=5000)
    elif kind == "dst_cid":
        g.send(5000, hp, OP_RW, b"x", dst_cid=3)
    elif kind == "type":
        g.send(5000, hp, OP_RW, b"x", type_=2)
    elif kind == "op":
        g.send(5000, hp, 99)
    elif kind == "payload_on_control":
        g.send(5000, hp, OP_CREDIT_UPDATE, b"junk")
    elif kind == "response_when_established":
        g.send(5000, hp, OP_RESPONSE)
    elif kind == "duplicate_request":
        g.send(5000, hp, OP_REQUEST)
    got = g.packets()
    conn_alive = (hp, 5000) in g.device.conns
    if kind in ("short", "src_cid"):
        assert got == [] and conn_alive                     # dropped, nothing to answer
    else:                       # dst_cid, type: the guest closes its socket on the RST too
        assert ops(got) == [OP_RST] and not conn_alive
        client.settimeout(2)
        assert client.recv(10) == b""
    if kind not in ("dst_cid", "type"):
        assert g.device.counters["bad_packets"] == 1
        assert g.device.context.guest_errors >= 1
    assert g.status() & c.STATUS_DEVICE_NEEDS_RESET == 0
    g.bench.check_guards()


def test_tiny_receive_buffers_are_returned_empty(tmp_path, loop):
    g = Guest(tmp_path, loop)
    g.rx.post(writable=[10])
    g.rx.notify()
    g.send(1, 2, OP_RW, b"x")                                 # the RST needs a buffer
    used = g.rx.get_used()
    assert [u.length for u in used] == [0]
    g.give_rx(1)
    assert ops(g.packets()) == [OP_RST]


def test_a_tiny_receive_buffer_is_returned_with_an_interrupt(tmp_path, loop):
    """A host client's connect needs a receive buffer; the only one is too small for a
    header: it is returned empty and the guest is interrupted for it (with nothing else
    sent, no later interrupt would tell it), and the REQUEST waits for a real buffer."""
    g = Guest(tmp_path, loop)
    g.rx.post(writable=[10])
    g.rx.notify()
    g.bench.irq.take()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(g.path)
    client.sendall(b"CONNECT 5000\n")
    g.spin()
    assert [u.length for u in g.rx.get_used()] == [0]
    assert g.bench.irq.take(), "no interrupt for the returned buffer"
    g.give_rx(1)
    assert ops(g.packets()) == [OP_REQUEST]
    client.close()


def test_a_receive_buffer_with_no_room_for_data_is_returned_with_an_interrupt(tmp_path, loop):
    """Data for the guest and its only receive buffer holds just a header: the buffer is
    returned empty, and the guest is interrupted for it (nothing else is sent)."""
    g = Guest(tmp_path, loop)
    g.give_rx(1)
    client, hdr = g.host_connect(5000)
    g.send(5000, hdr[2], OP_RESPONSE)
    g.spin()
    client.settimeout(2)
    assert read_line(client) == f"OK {hdr[2]}"
    g.rx.post(writable=[HEADER_LEN])
    g.rx.notify()
    g.bench.irq.take()
    g.driver.ack_interrupt()                # or a new used buffer raises nothing new
    client.sendall(b"data")
    g.spin()
    assert [u.length for u in g.rx.get_used()] == [0]
    assert g.bench.irq.take(), "no interrupt for the returned buffer"
    client.close()


def test_connections_are_bounded(tmp_path, loop):
    g = Guest(tmp_path, loop, max_connections=2)
    g.give_rx(16)
    servers = []
    for port in (1, 2, 3):
        servers.append(g.listen(port, backlog=1))
        g.send(100 + port, port, OP_REQUEST)
    assert ops(g.packets()) == [OP_RESPONSE, OP_RESPONSE, OP_RST]
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(g.path)
    g.spin()
    client.settimeout(2)
    assert client.recv(10) == b""                             # refused: full
    assert len(g.device.conns) == 2


def test_control_packets_without_receive_buffers_are_bounded(tmp_path, loop):
    g = Guest(tmp_path, loop, max_connections=1)
    for i in range(200):                                      # RSTs for nobody, no rx buffer
        g.send(1000 + i, 1, OP_RW, b"x")
    assert len(g.device._control) == 4 * 1 + 64
    assert g.device.counters["control_dropped"] == 200 - 68
    g.give_rx(100)
    assert ops(g.packets()) == [OP_RST] * 68


def test_connections_opened_without_receive_buffers_cannot_grow_the_queue(tmp_path, loop):
    """A guest that opens and breaks connections and never takes a packet: the answers
    waiting for it stay bounded, the connections that cannot be answered are closed."""
    g = Guest(tmp_path, loop, max_connections=2)
    server = g.listen(1)
    for i in range(300):
        g.send(1000 + i, 1, OP_REQUEST)
        g.send(1000 + i, 1, 99)                               # bad op: reset
        while True:                                            # the host side goes away
            try:
                server.setblocking(False)
                server.accept()[0].close()
            except BlockingIOError:
                break
    assert len(g.device._control) <= 4 * 2 + 64
    assert len(g.device.conns) <= 2 and g.device.counters["control_dropped"] > 0
    g.give_rx(100)
    got = ops(g.packets())                    # answers of closed connections are skipped
    owed = 2                                  # RSTs owed count against max_connections
    assert 0 < len(got) <= 4 * 2 + 64 + owed and set(got) <= {OP_RESPONSE, OP_RST}


def test_answers_for_connections_the_guest_closed_do_not_fill_the_control_queue(tmp_path,
                                                                              loop):
    """A guest that posts no receive buffer while it opens and resets connections: the
    answers (RESPONSE) of connections it closed since are never sent, so they make no room
    short for the next ones, whose answers once were dropped and the connections reset."""
    g = Guest(tmp_path, loop, max_connections=2)
    server = g.listen(1, backlog=512)
    for i in range(300):
        g.send(1000 + i, 1, OP_REQUEST)
        g.send(1000 + i, 1, OP_RST)
    assert g.device.counters["control_dropped"] == 0 and g.device.counters["rst_sent"] == 0
    assert len(g.device._control) <= 4 * 2 + 64
    g.send(2000, 1, OP_REQUEST)
    g.give_rx(100)
    assert ops(g.packets()) == [OP_RESPONSE] and list(g.device.conns) == [(1, 2000)]
    server.close()


def test_transport_reset_event_and_device_reset_drop_connections(tmp_path, loop):
    g = Guest(tmp_path, loop)
    client, host_port = g.established()
    g.event.post(writable=[4])
    g.event.notify()
    g.device.transport_reset()
    used = g.event.get_used()
    assert [(u.length, u.data) for u in used] == [(4, struct.pack("<I", 0))]
    client.settimeout(2)
    assert client.recv(10) == b"" and not g.device.conns
    client, host_port = g.established()
    g.driver.reset()                                          # the driver goes away
    g.spin()
    assert client.recv(10) == b"" and not g.device.conns


def test_detach_removes_the_socket(tmp_path, loop):
    g = Guest(tmp_path, loop)
    assert os.path.exists(g.path)
    g.device.detach()
    assert not os.path.exists(g.path)


# -- configuration ------------------------------------------------------------------------------

def build(tmp_path, table):
    config = parse_config(tmp_path / "vms.toml", {"vm": {"0": {"vsock": table}}},
                          base=tmp_path)
    return config.build_device(config.vms[0].devices[0])


@pytest.mark.parametrize("table, message", [
    ({"cid": 2, "socket": "v.sock"}, "cid: 2 is not a guest CID"),
    ({"cid": 3}, "socket: missing"),
    ({"socket": "v.sock"}, "cid: missing"),
    ({"cid": 3, "socket": "/nonexistent/dir/v.sock"}, "cannot create the vsock socket"),
    ({"cid": 3, "socket": "v.sock", "max_connections": 0}, "must be positive"),
    ({"cid": 3, "socket": "s" * 100}, "too long for the sockets of the guest's connections"),
])
def test_config_errors_are_one_line(tmp_path, table, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(tmp_path, table)
    assert "\n" not in str(err.value) and "vm.0.vsock" in str(err.value)


def test_config_builds_a_device_and_refuses_a_live_socket(tmp_path, loop):
    dev = build(tmp_path, {"cid": 42, "socket": "v.sock"})
    assert dev.cid == 42 and dev.path == str(tmp_path / "v.sock")
    with pytest.raises(ConfigError, match="in use"):
        build(tmp_path, {"cid": 43, "socket": "v.sock"})
    dev.detach()


# -- the HIL helper -----------------------------------------------------------------------------

def test_hil_connect_waits_until_the_guest_accepts(tmp_path, loop):
    """``avatar_hw.hil.vsock.connect`` tries again after a refusal and returns the stream
    once the guest answers; a guest that never does is a one-line AvatarError."""
    g = Guest(tmp_path, loop)
    g.give_rx(8)
    result = {}
    thread = threading.Thread(target=lambda: result.update(sock=connect(g.path, 5000, 10)))
    thread.start()
    answers = [OP_RST, OP_RESPONSE]                 # not listening yet, then listening
    deadline = time.monotonic() + 60
    while answers and time.monotonic() < deadline:
        for hdr, _ in g.packets(1):
            assert hdr[6] == OP_REQUEST and hdr[3] == 5000
            g.send(5000, hdr[2], answers.pop(0))
        time.sleep(0.01)
    while thread.is_alive() and time.monotonic() < deadline:
        g.spin(1)
        thread.join(0.01)
    sock = result["sock"]
    sock.sendall(b"ping")
    (_, payload), = g.packets()
    assert payload == b"ping"
    sock.close()
    with pytest.raises(AvatarError, match="did not accept a connection to port 6000 within "
                                          "0.2 s") as err:
        connect(g.path, 6000, 0.2)                  # nobody runs the loop: no answer
    assert "\n" not in str(err.value)


def test_info_shows_the_devices_own_fields(tmp_path, loop):
    g = Guest(tmp_path, loop)
    client, _ = g.established()
    entry = {**g.bench.subsystem.list_all_devices()[0], **g.device.describe()}
    text = format_device(entry)
    assert f"cid {CID}; socket {g.path}; open_connections 1; max_connections 64" in text
    assert "connections 1; bad_packets 0; rst_sent 0" in text


def test_a_credit_update_dropped_for_a_full_control_queue_is_sent_later(tmp_path, loop):
    """The guest asks for credit while the control queue is full (RSTs for packets to no
    connection, no receive buffer): the update was dropped for good, and a Linux sender
    waiting at zero credit waited for ever. It is owed, and sent once there is room."""
    g = Guest(tmp_path, loop, max_connections=1)
    client, host_port = g.established()
    for i in range(150):                # RSTs take the receive buffers, then fill the queue
        g.send(1000 + i, 1, OP_RW, b"x")
    g.send(5000, host_port, OP_RW, b"x" * 100)
    assert client.recv(200) == b"x" * 100
    g.send(5000, host_port, OP_CREDIT_REQUEST)
    assert g.device.counters["control_dropped"] > 0
    received = ops(g.packets())                         # the RSTs that had buffers
    for _ in range(3):
        g.give_rx(60)
        received += ops(g.packets())
    assert OP_CREDIT_UPDATE in received


def test_an_rst_carries_the_connections_counters(tmp_path, loop):
    """The device's RST for a connection carries its real fwd_cnt (Linux's does; the
    guest updates its credit from every header), not 0; an RST for no connection
    advertises no buffer (buf_alloc 0, as Linux's answer without a socket)."""
    g = Guest(tmp_path, loop)
    client, host_port = g.established()
    g.send(5000, host_port, OP_RW, b"x" * 100)
    assert client.recv(200) == b"x" * 100
    g.send(5000, host_port, 99)                              # unknown op: reset
    (hdr, _), = g.packets()
    assert hdr[6] == OP_RST and (hdr[8], hdr[9]) == (vsock.BUF_ALLOC, 100)
    g.send(111, 222, OP_RW, b"x")
    (hdr, _), = g.packets()
    assert hdr[6] == OP_RST and (hdr[8], hdr[9]) == (0, 0)


def test_an_rst_the_full_control_queue_had_no_room_for_is_sent_later(tmp_path, loop):
    """The control queue is full (RSTs for packets to no connection, no receive buffer)
    when a connection must be reset: its RST was dropped, and the guest's socket stayed
    open for ever. It is owed, counted against max_connections until sent."""
    g = Guest(tmp_path, loop, max_connections=1)
    client, host_port = g.established()
    for i in range(150):                # RSTs take the receive buffers, then fill the queue
        g.send(1000 + i, 1, OP_RW, b"x")
    g.send(5000, host_port, 99)                             # unknown op: reset
    assert closed(client) and not g.device.conns
    assert g.device._open() == 1                            # its RST still owed
    received = g.packets()
    for _ in range(3):
        g.give_rx(60)
        received += g.packets()
    assert [(h[2], h[3]) for h, _ in received if h[6] == OP_RST].count((host_port, 5000)) == 1
    assert g.device._open() == 0


def test_the_host_closing_reaches_a_guest_that_gave_no_credit(tmp_path, loop):
    """The guest used all its credit and reads no more: the host program's close once went
    unnoticed (the socket was not watched without credit), and the guest never learnt of
    it. Its end of stream goes at once; bytes still waiting go first, once there is
    credit, then the end."""
    g = Guest(tmp_path, loop)
    g.buf_alloc = 100
    client, host_port = g.established()
    client.sendall(b"x" * 100)
    assert [p for _, p in g.packets()] == [b"x" * 100]          # no credit left
    client.close()
    (hdr, _), = g.packets()
    assert hdr[6] == OP_SHUTDOWN and hdr[7] == SHUTDOWN_SEND
    client, host_port = g.established(5001)
    client.sendall(b"y" * 150)
    assert [p for _, p in g.packets()] == [b"y" * 100]
    conn = g.device.conns[(host_port, 5001)]
    assert conn.held and not conn.reading                       # not watched: no spinning
    client.close()
    assert g.packets() == []                                    # 50 bytes wait: not yet
    g.send(5001, host_port, OP_CREDIT_UPDATE, fwd_cnt=100)
    got = g.packets()
    assert [(h[6], p) for h, p in got] == [(OP_RW, b"y" * 50), (OP_SHUTDOWN, b"")]
