"""virtio-console: ports, control queues, size, emergency write, host endpoints, flow control."""

import fcntl
import hashlib
import importlib
import os
import select
import subprocess
import sys
import socket
import struct
import termios
import threading
import time
import tracemalloc

import pytest
import serial

from avatar_hw.backends.console import DEFAULT_LOG_SIZE, ConsoleBackend, open_console_backend
from avatar_hw.devices import console as con
from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.endpoints import open_endpoint, pyserial_url, server, tcp
from avatar_hw.errors import ConfigError
from avatar_hw.loop import EventLoop
from avatar_hw.testing.virtio import RAM_BASE, VirtioBench
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.constants import bit


@pytest.fixture
def loop():
    lp = EventLoop()
    yield lp
    lp.close()


class Console:
    """A console device in a VM, its port-0 endpoint a Unix socket with a connected client."""

    def __init__(self, tmp_path, loop, *, ram_size=8 << 20, **kw):
        self.loop = loop
        self.path = str(tmp_path / "con.sock")
        self.device = ConsoleDevice(f"unix:{self.path}", **kw)
        self.bench = VirtioBench(self.device, loop=loop, ram_size=ram_size)
        self.driver = self.bench.driver
        self.client = socket.socket(socket.AF_UNIX)
        self.client.connect(self.path)
        self.client.setblocking(False)
        self.spin()

    def spin(self, rounds=3):
        for _ in range(rounds):
            self.loop.run_once(0)

    def recv(self, wait=30.0):
        """What the client receives: returns once something came and no more is ready, or
        after ``wait`` seconds (short only where nothing may come)."""
        deadline, out = time.monotonic() + wait, b""
        while True:
            self.spin()
            try:
                out += self.client.recv(1 << 20)
            except BlockingIOError:
                if out:
                    break
            if time.monotonic() >= deadline:
                break
        return out

    def close(self):
        self.client.close()
        self.bench.subsystem.close()
        self.bench.check_guards()


@pytest.fixture
def console(tmp_path, loop):
    con_ = Console(tmp_path, loop)
    yield con_
    con_.close()


def test_output_reaches_the_host(console):
    rx, tx = console.driver.init([0, 1])
    tx.post(readable=[b"hello ", b"world\n"])
    tx.notify()
    assert console.recv() == b"hello world\n"
    used = tx.get_used()
    assert [(u.length) for u in used] == [0]
    assert console.device.counters["bytes_from_guest"] == 12


def test_an_empty_transmit_notify_does_no_output_work(console, monkeypatch):
    """A guest notifying its transmit queue with nothing new (a driver's repeat, or one
    flooding notifies) costs the daemon no walk of the output path: no flush of the
    endpoints, no progress kept, no chain returned; the next real buffer goes out as usual."""
    rx, tx = console.driver.init([0, 1])
    tx.post(readable=[b"first\n"])
    tx.notify()
    assert console.recv() == b"first\n" and len(tx.get_used()) == 1
    port = console.device.ports[0]
    calls = []
    monkeypatch.setattr(port.backend, "flush", lambda: calls.append("flush"))
    monkeypatch.setattr(port, "_keep_sent", lambda: calls.append("keep"))
    monkeypatch.setattr(port, "_return_done", lambda: calls.append("return") or 0)
    for _ in range(3):
        tx.notify()
    assert calls == []
    monkeypatch.undo()
    tx.post(readable=[b"second\n"])
    tx.notify()
    assert console.recv() == b"second\n" and len(tx.get_used()) == 1


def test_input_reaches_the_guest(console):
    rx, tx = console.driver.init([0, 1])
    rx.post(writable=[64])
    rx.notify()
    console.client.send(b"typed")
    console.spin()
    assert [u.data for u in rx.get_used()] == [b"typed"]
    assert console.driver.interrupt_status() & c.INT_USED_BUFFER


def test_input_waits_without_receive_buffers(console):
    rx, tx = console.driver.init([0, 1])
    console.client.send(b"early")
    console.spin()
    ep = console.device.ports[0].backend.endpoints[0]
    assert not ep._reading                       # reader removed: nothing read, nothing lost
    rx.post(writable=[3])
    rx.notify()
    console.spin()
    rx.post(writable=[64])
    rx.notify()
    console.spin()
    assert b"".join(u.data for u in rx.get_used()) == b"early"


def start_and_receive(console):
    """Initialise the device, post one receive buffer: what arrives in it."""
    rx, tx = console.driver.init([0, 1])
    rx.post(writable=[64])
    rx.notify()
    console.spin()
    return [u.data for u in rx.get_used()]


def test_input_before_driver_ok_waits(console):
    console.client.send(b"boot")
    console.spin()
    assert start_and_receive(console) == [b"boot"]


def test_receive_buffer_without_writable_part_is_returned(console):
    rx, tx = console.driver.init([0, 1])
    rx.post(readable=[b"x"])
    rx.notify()
    assert [u.length for u in rx.get_used()] == [0]


def read_all(client, loop, want, rounds=100, timeout=None):
    """What ``client`` receives in ``rounds`` turns of the loop, or for ``timeout`` s if
    given, until ``want`` bytes came."""
    got = b""
    client.setblocking(False)
    deadline = None if timeout is None else time.monotonic() + timeout
    turn = 0
    while turn < rounds if deadline is None else time.monotonic() < deadline:
        turn += 1
        loop.run_once(0.01)
        try:
            got += client.recv(65536)
        except BlockingIOError:
            pass
        if len(got) >= want:
            break
    return got


def test_output_without_client_goes_to_the_log_and_the_guest_never_waits(tmp_path, loop):
    """Issue 16: with only socket endpoints and no client, the guest's buffers come back at
    once (Linux's hvc path would spin for them); the last ``log`` bytes are kept and a
    client that connects later receives them first, then the live output."""
    path = str(tmp_path / "c.sock")
    b = VirtioBench(ConsoleDevice(f"unix:{path}", limit=4096, log_size=5000), loop=loop,
                    ram_size=4 << 20)
    rx, tx = b.driver.init([0, 1])
    tx.post(readable=[b"a" * 3000])
    tx.post(readable=[b"b" * 3000])
    tx.notify()
    loop.run_once(0)
    assert [u.length for u in tx.get_used()] == [0, 0]           # the guest does not wait
    port = b.device.info()["ports"][0]
    assert port["log"] == 5000 and port["log_overwritten"] == 1000
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    assert read_all(client, loop, 5000) == b"a" * 2000 + b"b" * 3000
    tx.post(readable=[b"live"])
    tx.notify()
    assert read_all(client, loop, 4) == b"live"
    assert len(tx.get_used()) == 1
    client.close()
    b.subsystem.close()



def test_a_buffer_larger_than_the_log_counts_its_overwritten_head(tmp_path, loop):
    b = VirtioBench(ConsoleDevice(f"unix:{tmp_path / 'c.sock'}", log_size=1000), loop=loop,
                    ram_size=4 << 20)
    rx, tx = b.driver.init([0, 1])
    tx.post(readable=[b"a" * 3000])
    tx.notify()
    loop.run_once(0)
    port = b.device.info()["ports"][0]
    assert port["log"] == 1000 and port["log_overwritten"] == 2000

def test_output_in_flight_at_a_reset_still_reaches_the_client(tmp_path, loop):
    """A client slower than the guest, which then resets (a reboot, its driver unloaded):
    the buffers in flight go back to nobody, but their bytes were printed, and the log's
    being replayed too: copied, they all still reach the client, in order (they were
    dropped: a reboot's last lines, a panic's)."""
    path = str(tmp_path / "c.sock")
    b = VirtioBench(ConsoleDevice(f"unix:{path}", limit=64 << 10, log_size=64 << 10),
                    loop=loop, ram_size=4 << 20)
    rx, tx = b.driver.init([0, 1])
    early = [bytes([97 + i]) * 4000 for i in range(13)]    # 52 000 bytes: into the log
    for chunk in early:
        tx.post(readable=[chunk])
    tx.notify()
    loop.run_once(0)
    client = socket.socket(socket.AF_UNIX)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(path)
    for _ in range(5):
        loop.run_once(0.01)                                 # attached: the log's replay begins
    late = [bytes([65 + i % 26]) * 4000 for i in range(100)]   # more than the socket takes
    for chunk in late:
        tx.post(readable=[chunk])
    tx.notify()
    for _ in range(5):
        loop.run_once(0.01)
    backend = b.device.ports[0].backend
    in_flight = backend.stream.tail - backend.endpoints[0].position   # not yet in the socket
    queued = struct.unpack("i", fcntl.ioctl(client, termios.FIONREAD, b"\0" * 4))[0]
    assert in_flight > 0
    b.driver.write(c.REG_STATUS, 0)                        # reset
    got = read_all(client, loop, queued + in_flight, rounds=500)
    assert len(got) == queued + in_flight and got == b"".join(early + late)[:len(got)]
    client.close()
    b.subsystem.close()


def test_a_reset_keeps_a_bounded_copy_of_one_huge_buffer_in_flight(tmp_path, loop):
    """One 2 MiB guest buffer waits for a client that does not read, and the guest resets:
    the whole buffer was copied into the daemon (300 MiB held for a 300 MiB buffer). At
    most twice the port's buffer is kept; the client still gets the buffer's start, in order."""
    path, limit = str(tmp_path / "c.sock"), 64 << 10
    b = VirtioBench(ConsoleDevice(f"unix:{path}", limit=limit), loop=loop, ram_size=40 << 20)
    rx, tx = b.driver.init([0, 1], buf_size=2 << 20, size=4)
    client = socket.socket(socket.AF_UNIX)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(path)
    for _ in range(5):
        loop.run_once(0.01)
    big = bytes(range(256)) * (8 << 10)
    tx.post(readable=[big])
    tx.notify()
    for _ in range(5):
        loop.run_once(0.01)
    backend = b.device.ports[0].backend
    assert backend.stream.buffered > 2 * limit                 # the guest's buffer, in place
    b.driver.write(c.REG_STATUS, 0)                            # reset
    assert backend.stream.buffered <= 2 * limit
    got = read_all(client, loop, 2 * limit, rounds=500)
    assert len(got) >= 2 * limit - 4096 and got == big[:len(got)]
    client.close()
    b.subsystem.close()


def test_emergency_bytes_cut_at_a_reset_no_longer_count_against_the_limit(tmp_path, loop):
    """Emergency bytes behind a huge buffer in flight, then a reset (and, after more, a
    transmit QueueReset): the cut dropped them but they stayed counted as held, so every
    later emergency write was dropped for the VM's lifetime."""
    path, limit = str(tmp_path / "c.sock"), 4096
    device = ConsoleDevice(f"unix:{path}", limit=limit)
    b = VirtioBench(device, loop=loop, ram_size=24 << 20)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    for _ in range(3):
        loop.run_once(0)

    def queue_reset():
        b.driver.write(c.REG_QUEUE_SEL, 1)
        b.driver.write(c.REG_QUEUE_RESET, 1)
    for reset in (b.driver.reset, queue_reset):
        rx, tx = b.driver.init([0, 1], buf_size=1 << 20, size=4)
        tx.post(readable=[b"g" * (1 << 20)])          # one big buffer: the client is slow
        tx.notify()
        for _ in range(con.EMERG_LIMIT):
            b.driver.write_config(con.EMERG_WR_OFFSET, ord("E"), 4)
        assert device._emerg_held == con.EMERG_LIMIT
        reset()
        assert device._emerg_held == 0             # all of them lay past the cut
    b.driver.write_config(con.EMERG_WR_OFFSET, ord("!"), 4)
    got = b""
    while not got.endswith(b"!") and (more := read_all(client, loop, 1)):
        got += more
    assert got.endswith(b"!")
    assert device._emerg_held == 0
    client.close()
    b.subsystem.close()


def test_a_client_that_wrote_and_left_does_not_hold_the_guest(tmp_path, loop):
    """The output in flight when the last client leaves joins the log; nothing waits in the
    guest, and the next client gets it."""
    path = str(tmp_path / "c.sock")
    b = VirtioBench(ConsoleDevice(f"unix:{path}", limit=4096), loop=loop, ram_size=4 << 20)
    rx, tx = b.driver.init([0, 1])
    client = socket.socket(socket.AF_UNIX)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(path)
    loop.run_once(0)
    rx.post(writable=[64])
    rx.notify()
    client.send(b"typed")
    for _ in range(5):
        loop.run_once(0.01)
    assert [u.data for u in rx.get_used()] == [b"typed"]
    for i in range(200):                  # more than the client and its socket take
        tx.post(readable=[bytes([65 + i % 26]) * 4000])
    tx.notify()
    loop.run_once(0)
    client.close()                                        # wrote and left without reading
    for _ in range(5):
        loop.run_once(0.01)
    tx.notify()
    loop.run_once(0)
    assert len(tx.get_used()) == 200 and b.device.ports[0].backend.buffered == 0
    later = socket.socket(socket.AF_UNIX)
    later.connect(path)
    got = read_all(later, loop, DEFAULT_LOG_SIZE)
    assert len(got) == DEFAULT_LOG_SIZE and got.endswith(bytes([65 + 199 % 26]) * 4000)
    later.close()
    b.subsystem.close()


def test_client_reconnect_keeps_unsent_output(console):
    rx, tx = console.driver.init([0, 1])
    console.client.close()
    console.spin()
    tx.post(readable=[b"while away"])
    tx.notify()
    console.spin()
    console.client = socket.socket(socket.AF_UNIX)
    console.client.connect(console.path)
    console.client.setblocking(False)
    assert console.recv() == b"while away"


def test_a_second_client_is_refused_with_one_line_and_the_first_keeps_the_console(console):
    rx, tx = console.driver.init([0, 1])
    second = socket.socket(socket.AF_UNIX)
    second.connect(console.path)
    console.spin()
    second.settimeout(5)
    refusal = second.recv(4096)
    assert refusal.startswith(b"avatar-hw: unix:") and refusal.endswith(b"\r\n")
    assert refusal.count(b"\n") == 1 and b"already has a client" in refusal
    assert second.recv(4096) == b""                          # and closed
    second.close()
    tx.post(readable=[b"still yours"])
    tx.notify()
    assert console.recv() == b"still yours"                  # the first one was not dropped
    console.client.close()                                   # it leaves; a hang-up not yet seen
    third = socket.socket(socket.AF_UNIX)
    third.connect(console.path)
    third.setblocking(False)
    console.client = third
    tx.post(readable=[b"next"])
    tx.notify()
    assert console.recv() == b"next"                         # served: its predecessor is gone


def connect(console):
    """Another client of ``console``'s socket (non-blocking), once the endpoint answered it:
    its first bytes (a refusal, else empty)."""
    client = socket.socket(socket.AF_UNIX)
    client.connect(console.path)
    client.setblocking(False)
    console.spin()
    try:
        return client, client.recv(4096)
    except BlockingIOError:
        return client, b""


def guest_input(console, rx, buffers=8):
    """What the guest reads into ``buffers`` receive buffers posted now."""
    for _ in range(buffers):
        rx.post(writable=[64])
    rx.notify()
    console.spin(10)
    return b"".join(u.data for u in rx.get_used())


def test_a_client_that_typed_and_left_is_read_and_the_next_is_served(console):
    """A client typed and left before the guest read it: the next client was refused (the
    typing unread looked like a client still there) until the guest read, never for a port
    nobody reads. It is served now, and the guest gets the typing first, then its own."""
    rx, tx = console.driver.init([0, 1])
    console.client.send(b"typed then left\n")
    console.spin()
    console.client.close()
    console.spin()
    console.client, refusal = connect(console)
    assert refusal == b""
    tx.post(readable=[b"to the next one"])
    tx.notify()
    assert console.recv() == b"to the next one"
    console.client.send(b"next\n")
    assert guest_input(console, rx) == b"typed then left\nnext\n"


def test_typing_of_a_client_whose_output_failed_reaches_the_guest(console):
    """The guest printed before it read what a departed client typed: the failed write
    closed the socket with the typing unread, and it was lost."""
    rx, tx = console.driver.init([0, 1])
    console.client.send(b"typed then left\n")
    console.spin()
    console.client.close()
    console.spin()
    tx.post(readable=[b"output"])
    tx.notify()
    console.spin()
    endpoint = console.device.ports[0].backend.endpoints[0]
    assert endpoint.client is None                      # its output failed: it left
    assert guest_input(console, rx) == b"typed then left\n"


def test_clients_that_typed_and_left_wait_in_order_and_in_bounds(console):
    """While the guest reads nothing, clients that typed and left are kept (sockets with
    their input) up to ``MAX_DEPARTED``; then a new client gets one line and is closed.
    The guest gets every typing, in order."""
    rx, tx = console.driver.init([0, 1])
    typed = [b"from client %d\n" % i for i in range(server.MAX_DEPARTED + 1)]
    for i, line in enumerate(typed):
        if i:
            console.client, refusal = connect(console)
            assert refusal == b""
        console.client.send(line)
        console.spin()
        console.client.close()
        console.spin()
    console.client, refusal = connect(console)
    assert b"still waits for the guest" in refusal and refusal.count(b"\n") == 1
    console.client.close()
    assert guest_input(console, rx, buffers=16) == b"".join(typed)
    console.client, refusal = connect(console)           # all read: served again
    assert refusal == b""


# -- features --------------------------------------------------------------------------------------

def test_features_offered(tmp_path, loop):
    plain = ConsoleDevice()
    assert plain.features & 7 == bit(con.F_EMERG_WRITE)
    full = ConsoleDevice(size=(80, 25), ports={"a": None})
    assert full.features & 7 == 7
    assert len(full.queues) == 6
    assert struct.unpack("<HHII", full.config) == (80, 25, 2, 0)
    with pytest.raises(ValueError):
        ConsoleDevice(ports={"a": None}, multiport=False)


def test_size_and_resize(tmp_path, loop):
    con_ = Console(tmp_path, loop, size=(80, 25))
    d = con_.driver
    d.init([0, 1])
    assert (d.read_config(0, 2), d.read_config(2, 2)) == (80, 25)
    gen = d.read(c.REG_CONFIG_GENERATION)
    d.ack_interrupt()
    con_.device.resize(132, 43)
    assert (d.read_config(0, 2), d.read_config(2, 2)) == (132, 43)
    assert d.read(c.REG_CONFIG_GENERATION) != gen
    assert d.interrupt_status() == c.INT_CONFIG_CHANGE
    con_.close()


def test_emergency_write(console):
    console.driver.init([0, 1])
    for ch in b"panic!":
        console.driver.write_config(con.EMERG_WR_OFFSET, ch, 4)
    assert console.recv() == b"panic!"


def test_emergency_write_of_zero_writes_nothing(console):
    """QEMU 7.2's set_config returns on emerg_wr == 0; a NUL byte went out here. Any width
    is taken, its low byte written."""
    console.driver.init([0, 1])
    for value, width in ((ord("a"), 4), (0, 4), (0, 1), (0, 2), (ord("b"), 1),
                         (ord("c") | 0x100, 2)):
        console.driver.write_config(con.EMERG_WR_OFFSET, value, width)
    assert console.recv() == b"abc"


def test_emergency_write_needs_the_feature_offered_not_acknowledged(console):
    """5.3.4: a driver can use it "without initializing virtio queues, or even acknowledging
    the feature" (early boot debugging): before any status, and with the feature declined."""
    console.driver.write_config(con.EMERG_WR_OFFSET, ord("e"), 4)
    console.driver.init([0, 1], drop=bit(con.F_EMERG_WRITE))
    console.driver.write_config(con.EMERG_WR_OFFSET, ord("x"), 4)
    assert console.recv(0.2) == b"ex"


def control(port, event, value, payload=b""):
    return struct.pack("<IHH", port, event, value) + payload


def control_messages(queue):
    out = []
    for u in queue.get_used():
        port, event, value = struct.unpack("<IHH", u.data[:8])
        out.append((port, event, value, u.data[8:]))
    return out


def test_multiport_named_ports(tmp_path, loop):
    named = str(tmp_path / "named.sock")
    con_ = Console(tmp_path, loop, ports={"org.avatar.log": f"unix:{named}"})
    d = con_.driver
    queues = d.init(range(6))
    rx0, tx0, c_ivq, c_ovq, rx1, tx1 = queues
    for _ in range(4):
        c_ivq.post(writable=[128])
    c_ivq.notify()
    c_ovq.post(readable=[control(0, con.DEVICE_READY, 1)])
    c_ovq.notify()
    assert control_messages(c_ivq) == [(0, con.DEVICE_ADD, 0, b""), (1, con.DEVICE_ADD, 0, b"")]
    for _ in range(8):
        c_ivq.post(writable=[128])
    c_ivq.notify()
    c_ovq.post(readable=[control(0, con.PORT_READY, 1)])
    c_ovq.post(readable=[control(1, con.PORT_READY, 1)])
    c_ovq.notify()
    assert control_messages(c_ivq) == [
        (0, con.CONSOLE_PORT, 1, b""), (0, con.PORT_OPEN, 1, b""),
        (1, con.PORT_NAME, 1, b"org.avatar.log"), (1, con.PORT_OPEN, 0, b"")]
    # no client yet on the named port's socket: its host side opens when one connects
    client = socket.socket(socket.AF_UNIX)
    client.connect(named)
    con_.spin()
    assert control_messages(c_ivq) == [(1, con.PORT_OPEN, 1, b"")]
    # the named port's input waits until the guest opens the port
    client.send(b"to port 1")
    rx1.post(writable=[64])
    rx1.notify()
    con_.spin()
    assert rx1.get_used() == []
    c_ovq.post(readable=[control(1, con.PORT_OPEN, 1)])
    c_ovq.notify()
    con_.spin()
    assert [u.data for u in rx1.get_used()] == [b"to port 1"]
    tx1.post(readable=[b"from port 1"])
    tx1.notify()
    con_.spin()
    assert client.recv(100) == b"from port 1"
    # port 0 still goes to its own endpoint
    tx0.post(readable=[b"console"])
    tx0.notify()
    assert con_.recv() == b"console"
    # resize with multiport: a RESIZE control message (rows, cols)
    con_.device.resize(100, 30)
    assert control_messages(c_ivq) == [(0, con.RESIZE, 0, struct.pack("<HH", 30, 100))]
    assert con_.device.info()["ports"][1]["guest_open"] is True
    # the client goes away: the host side closes, the guest's output waits for the next one
    client.close()
    con_.spin()
    assert control_messages(c_ivq) == [(1, con.PORT_OPEN, 0, b"")]
    tx1.post(readable=[b"kept"])
    tx1.notify()
    client = socket.socket(socket.AF_UNIX)
    client.connect(named)
    con_.spin()
    assert control_messages(c_ivq) == [(1, con.PORT_OPEN, 1, b"")]
    assert client.recv(100) == b"kept"
    client.close()
    con_.close()


def test_control_message_edge_cases(tmp_path, loop):
    con_ = Console(tmp_path, loop, multiport=True)
    d = con_.driver
    _, _, c_ivq, c_ovq = d.init(range(4))
    c_ovq.post(readable=[b"\x00\x00"])                       # short
    c_ovq.post(readable=[control(7, con.PORT_READY, 1)])     # unknown port
    c_ovq.post(readable=[control(0, con.DEVICE_READY, 0)])   # driver failed
    c_ovq.post(readable=[control(0, 99, 0)])                 # unknown event
    c_ovq.notify()
    assert len(c_ovq.get_used()) == 4
    c_ivq.post(writable=[4])                                  # too small: truncated
    c_ovq.post(readable=[control(0, con.DEVICE_READY, 1)])
    c_ovq.notify()
    assert [u.length for u in c_ivq.get_used()] == [4]
    assert not d.status & c.STATUS_DEVICE_NEEDS_RESET
    con_.close()


def test_control_buffer_without_writable_part_is_returned_and_the_message_waits(tmp_path,
                                                                               loop):
    """Control receiveq buffers with nothing writable took a DEVICE_ADD each and lost it
    (used length 0): the guest never learnt its ports. They are returned with length 0 as
    a port's receiveq does, and the messages go into the next real buffers."""
    con_ = Console(tmp_path, loop, ports={"p1": None})
    _, _, c_ivq, c_ovq, _, _ = con_.driver.init(range(6))
    c_ivq.post(readable=[b"x"])                                # no writable part
    c_ivq.post(writable=[0])                                   # an empty writable one
    c_ivq.post(writable=[64])
    c_ivq.post(writable=[64])
    c_ivq.notify()
    c_ovq.post(readable=[control(0xFFFFFFFF, con.DEVICE_READY, 1)])
    c_ovq.notify()
    con_.spin()
    used = c_ivq.get_used()
    assert [u.length for u in used] == [0, 0, 8, 8]
    assert [struct.unpack_from("<IH", u.data)[:2] for u in used[2:]] == [
        (0, con.DEVICE_ADD), (1, con.DEVICE_ADD)]
    con_.close()


def test_reset_drops_held_buffers(console):
    rx, tx = console.driver.init([0, 1])
    rx.post(writable=[16])
    rx.notify()
    console.spin()
    assert console.device.ports[0].rx_chain is not None
    console.driver.reset()
    assert console.device.ports[0].rx_chain is None
    console.client.send(b"after reset")
    console.spin()
    assert start_and_receive(console) == [b"after reset"]


# -- endpoints -------------------------------------------------------------------------------------

def wait_attached(loop, pty):
    """Until the pty endpoint saw its slave opened (inotify tells it; it also looks every
    ``poll_interval`` s) and its output flows (the hold after an open is over)."""
    deadline = time.monotonic() + 30
    while not pty.attached or pty._held is not None:
        assert time.monotonic() < deadline, "the pty was opened, but never attached"
        loop.run_once(0.05)


def test_pty_endpoint_with_stable_symlink(tmp_path, loop):
    link = str(tmp_path / "vm0-console")
    b = VirtioBench(ConsoleDevice(f"pty:{link}"), loop=loop, ram_size=4 << 20)
    assert os.path.islink(link) and os.readlink(link).startswith("/dev/pts/")
    rx, tx = b.driver.init([0, 1])
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    wait_attached(loop, b.device.ports[0].backend.endpoints[0])
    try:
        tx.post(readable=[b"login: "])
        tx.notify()
        loop.run_once(0)
        assert os.read(fd, 100) == b"login: "
        rx.post(writable=[64])
        rx.notify()
        os.write(fd, b"root\n")
        deadline = time.monotonic() + 10            # through the tty's work queue
        while not (used := rx.get_used()) and time.monotonic() < deadline:
            loop.run_once(0.01)
        assert [u.data for u in used] == [b"root\n"]
    finally:
        os.close(fd)
        b.subsystem.close()
    assert not os.path.lexists(link)


def test_tcp_endpoint_on_loopback(loop):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ep = open_endpoint(f"tcp:{port}")
    assert ep.listener.getsockname()[0] == "127.0.0.1"
    b = VirtioBench(ConsoleDevice(ConsoleBackend([ep])), loop=loop, ram_size=4 << 20)
    rx, tx = b.driver.init([0, 1])
    client = socket.create_connection(("127.0.0.1", port))
    client.setblocking(False)
    loop.run_once(0.1)
    tx.post(readable=[b"over tcp"])
    tx.notify()
    assert read_all(client, loop, 8) == b"over tcp"
    client.close()
    b.subsystem.close()


def test_output_printed_while_a_new_client_is_held_reaches_it_and_comes_back(loop,
                                                                             monkeypatch):
    """What the guest prints during a new client's hold (``OPENER_HOLD_S``) is sent when the
    hold ends, and the guest's buffers come back then, with nothing else happening. The
    hold is 2 s here, not 0.25 s, so that it still holds when the test looks."""
    monkeypatch.setattr(tcp, "OPENER_HOLD_S", 2.0)     # read by open_url
    ep = open_endpoint("tcp:127.0.0.1:0")
    b = VirtioBench(ConsoleDevice(ConsoleBackend([ep])), loop=loop, ram_size=4 << 20)
    rx, tx = b.driver.init([0, 1])
    client = socket.create_connection(("127.0.0.1", int(ep.url.rpartition(":")[2])))
    client.setblocking(False)
    while not ep.connected:
        loop.run_once(0.01)
    tx.post(readable=[b"during the hold"])
    tx.notify()
    loop.run_once(0)
    assert not tx.get_used()                              # held for this client
    try:
        assert read_all(client, loop, 15, timeout=10) == b"during the hold"
        deadline = time.monotonic() + 10
        while not tx.get_used():
            assert time.monotonic() < deadline, "the buffer never came back"
            loop.run_once(0.01)
    finally:
        client.close()
        b.subsystem.close()


def slow_socket_opens(monkeypatch):
    """pyserial's socket:// open takes 50 ms more before it empties its input (a loaded
    machine's client)."""
    from serial.urlhandler import protocol_socket

    configure = protocol_socket.Serial._reconfigure_port

    def slow_open(port, *args, **kwargs):
        time.sleep(0.05)
        return configure(port, *args, **kwargs)
    monkeypatch.setattr(protocol_socket.Serial, "_reconfigure_port", slow_open)


def test_output_logged_before_a_pyserial_socket_client_came_reaches_it(loop, monkeypatch):
    """pyserial's socket:// open (labgrid's NetworkSerialPort, ``protocol: raw``) empties
    its input right after connecting: the log sent at the accept was lost whenever the
    client's Python was slower than the daemon, as here (a client held 50 ms in its open,
    as a loaded machine does). The endpoint's first output waits ``OPENER_HOLD_S``: 3 s
    here, not 0.25 s, so that a stall of this test's client does not outlast it."""
    monkeypatch.setattr(tcp, "OPENER_HOLD_S", 3.0)     # read by open_url
    ep = open_endpoint("tcp:127.0.0.1:0")
    b = VirtioBench(ConsoleDevice(ConsoleBackend([ep])), loop=loop, ram_size=4 << 20)
    rx, tx = b.driver.init([0, 1])
    tx.post(readable=[b"printed-before-anyone-came\n"])
    tx.notify()
    loop.run_once(0)
    assert tx.get_used()                                  # nobody attached: logged at once
    slow_socket_opens(monkeypatch)
    opened = {}
    thread = threading.Thread(target=lambda: opened.setdefault(
        "port", serial.serial_for_url(pyserial_url(ep.url), timeout=0.05)))
    thread.start()
    while thread.is_alive():
        loop.run_once(0.005)
    port, got = opened["port"], b""
    try:
        deadline = time.monotonic() + 30
        while b"\n" not in got and time.monotonic() < deadline:
            loop.run_once(0.01)
            got += port.read(100)
        assert got == b"printed-before-anyone-came\n"
    finally:
        port.close()
        b.subsystem.close()


def test_a_refused_pyserial_socket_client_gets_the_refusal_line(loop, monkeypatch):
    """The refusal went out at the accept, and pyserial's socket:// open, emptying its
    input, discarded it whenever the client was slower than the daemon (50 ms here):
    ``avatar-hw console`` saw a peer close without a word, printed its header, then an
    error line. The line is sent ``OPENER_HOLD_S`` after the accept now."""
    from avatar_hw import terminal

    ep = open_endpoint("tcp:127.0.0.1:0")
    b = VirtioBench(ConsoleDevice(ConsoleBackend([ep])), loop=loop, ram_size=4 << 20)
    first = socket.create_connection(("127.0.0.1", int(ep.url.rpartition(":")[2])))
    while not ep.connected:
        loop.run_once(0.01)
    slow_socket_opens(monkeypatch)
    result = {}

    def refused_client():
        port = serial.serial_for_url(pyserial_url(ep.url), timeout=0.05)
        result["first"] = terminal.first_output(port, 10)
        port.close()
    thread = threading.Thread(target=refused_client)
    thread.start()
    while thread.is_alive():
        loop.run_once(0.005)
    try:
        line = terminal.refusal(*result["first"])
        assert line is not None and "already has a client" in line
        assert ep.connected                                   # the first client kept it
    finally:
        first.close()
        b.subsystem.close()


def test_refused_clients_waiting_for_their_line_are_bounded(loop):
    """Past ``MAX_REFUSING`` refused clients waiting, the next is refused at once; closing
    the endpoint sends every waiting line."""
    ep = open_endpoint("tcp:127.0.0.1:0")
    b = VirtioBench(ConsoleDevice(ConsoleBackend([ep])), loop=loop, ram_size=4 << 20)
    address = ("127.0.0.1", int(ep.url.rpartition(":")[2]))
    clients = [socket.create_connection(address)]
    while not ep.connected:
        loop.run_once(0.01)
    for _ in range(server.MAX_REFUSING + 1):     # one at a time: the backlog is 1
        clients.append(socket.create_connection(address))
        while select.select([ep.listener], [], [], 0)[0]:
            loop.run_once(0)
    last, deadline = clients[-1], time.monotonic() + 10
    last.setblocking(False)
    while not select.select([last], [], [], 0)[0]:
        assert time.monotonic() < deadline, "the last one was not refused at once"
        loop.run_once(0.01)
    assert len(ep._refusing) == server.MAX_REFUSING
    assert b"already has a client" in last.recv(4096)
    b.subsystem.close()
    for client in clients[1:-1]:
        client.settimeout(10)
        assert client.recv(4096).startswith(b"avatar-hw: tcp:")
    for client in clients:
        client.close()


def test_log_file_and_pty_at_once(tmp_path, loop):
    log_path = tmp_path / "vm0.log"
    log_path.write_bytes(b"old\n")
    link = str(tmp_path / "pty")
    b = VirtioBench(ConsoleDevice([f"pty:{link}", f"file:{log_path}"]), loop=loop,
                    ram_size=4 << 20)
    rx, tx = b.driver.init([0, 1])
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
    wait_attached(loop, b.device.ports[0].backend.endpoints[0])
    tx.post(readable=[b"both\n"])
    tx.notify()
    assert os.read(fd, 100) == b"both\n"
    assert log_path.read_bytes() == b"old\nboth\n"
    assert not b.device.ports[0].backend.endpoints[1].interactive
    os.close(fd)
    b.subsystem.close()


def test_stdio_endpoint(tmp_path):
    script = (
        "import sys\n"
        "from avatar_hw.loop import EventLoop\n"
        "from avatar_hw.devices.console import ConsoleDevice\n"
        "from avatar_hw.testing.virtio import VirtioBench\n"
        "loop = EventLoop()\n"
        "b = VirtioBench(ConsoleDevice('stdio'), loop=loop, ram_size=4 << 20)\n"
        "rx, tx = b.driver.init([0, 1])\n"
        "rx.post(writable=[64]); rx.notify()\n"
        "got = []\n"
        "while not got:\n"
        "    loop.run_once(0.05); got = rx.get_used()\n"
        "tx.post(readable=[b'echo:' + got[0].data]); tx.notify()\n"
        "b.subsystem.close()\n")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", script], input=b"ping", capture_output=True,
                         timeout=30)
    assert out.stdout == b"echo:ping", out.stderr.decode()


@pytest.mark.parametrize("url,match", [
    ("serial:/dev/ttyS0", "unknown console endpoint"),
    ("tcp:localhost:http", "needs a port"),
    ("file:", "needs a path"),
    ("unix:", "needs a path"),
    ("file:/nonexistent/dir/log", "cannot open the log file"),
    ("pty:/nonexistent/dir/link", "cannot create the pty symlink"),
])
def test_bad_endpoint_urls_are_one_line_errors(url, match):
    with pytest.raises(ConfigError, match=match) as err:
        open_console_backend(url)
    assert "\n" not in str(err.value) and url in str(err.value)


# -- done-when: 16 MiB each way, host reader stalls, nothing lost ----------------------------------

class Progress:
    """A stream's stall check that holds under any load: it fails only when nothing moved
    for ``limit`` seconds (a wall-clock bound on the whole stream would fail a slow machine)."""

    def __init__(self, limit=60.0):
        self.limit, self.state, self.since = limit, None, time.monotonic()

    def moved(self, *state):
        """Whether ``state`` changed since the last call; fails after ``limit`` s without."""
        now = time.monotonic()
        if state != self.state:
            self.state, self.since = state, now
            return True
        assert now - self.since < self.limit, f"stream stalled for {self.limit} s at {state}"
        return False


def test_16_mib_each_way_with_stalls(tmp_path, loop):
    """First the host reader stalls and the guest posts no receive buffers, until both ways
    are held (the bounds must hold then); then both sides run. Nothing is timed: the phases
    end on the device's state, and only a stream that moves nothing for a minute fails."""
    total, chunk = 16 << 20, 64 << 10
    con_ = Console(tmp_path, loop, ram_size=24 << 20, limit=256 << 10)
    d = con_.driver
    rx, tx = d.init([0, 1], buf_size=chunk, size=64)
    backend = con_.device.ports[0].backend
    out_data = os.urandom(total)                        # guest -> host
    in_data = os.urandom(total)                         # host -> guest
    sent_guest = sent_host = tx_used = 0
    got_host, got_guest = hashlib.sha256(), hashlib.sha256()
    got_host_n = got_guest_n = 0
    stalled, progress = True, Progress()
    while got_host_n < total or got_guest_n < total:
        # guest: post transmit buffers and (unless stalled) receive buffers
        while sent_guest < total and len(tx.free) >= 1:
            tx.post(readable=[out_data[sent_guest:sent_guest + chunk]])
            sent_guest += chunk
        if not stalled:
            while len(rx.free) >= 1:
                rx.post(writable=[chunk])
        tx.notify()
        rx.notify()
        loop.run_once(0)
        # host: write input, read output unless stalled
        if sent_host < total:
            try:
                sent_host += con_.client.send(in_data[sent_host:sent_host + (1 << 20)])
            except BlockingIOError:
                pass
        while not stalled:
            try:
                data = con_.client.recv(1 << 20)
            except BlockingIOError:
                break
            got_host.update(data)
            got_host_n += len(data)
        for used in rx.get_used():
            got_guest.update(used.data)
            got_guest_n += len(used.data)
        tx_used += len(tx.get_used(read_data=False))
        assert backend.buffered <= 256 << 10            # held output stays within its bound
        if stalled and backend.buffered and not backend.endpoints[0]._reading:
            # Both ways held: the guest's transmit buffers wait (the backend holds no more
            # than its bound), and the endpoint is not read while the guest has no receive
            # buffers, so the host's data waits in the socket.
            assert tx.outstanding and got_host_n == 0 and got_guest_n == 0
            stalled = False
        if not progress.moved(sent_guest, sent_host, tx_used, got_host_n, got_guest_n,
                              backend.buffered):
            loop.run_once(0.001)                        # nothing moved: let the kernel run
    assert not stalled
    assert got_host_n == total and got_host.digest() == hashlib.sha256(out_data).digest()
    assert got_guest_n == total and got_guest.digest() == hashlib.sha256(in_data).digest()
    counters = con_.device.counters
    assert counters["bytes_from_guest"] == total and counters["bytes_to_guest"] == total
    con_.close()


def test_console_without_endpoint_logs_until_one_is_added(tmp_path, loop):
    b = VirtioBench(ConsoleDevice(), loop=loop, ram_size=4 << 20)
    rx, tx = b.driver.init([0, 1])
    tx.post(readable=[b"early boot"])
    tx.notify()
    loop.run_once(0)
    assert [u.length for u in tx.get_used()] == [0]      # logged: the guest does not wait
    log_path = tmp_path / "late.log"
    b.device.ports[0].backend.add_endpoint(f"file:{log_path}")
    assert log_path.read_bytes() == b"early boot"
    b.subsystem.close()


# -- hostile control queues, bad chains, device bugs ---------------------------------------------

def test_huge_overlapping_control_message_is_read_without_copying_it(tmp_path, loop):
    """8 bytes are read from a control chain describing 240 MiB (overlapping views of RAM)."""
    ram = 16 << 20
    con_ = Console(tmp_path, loop, ram_size=ram, multiport=True)
    _, _, c_ivq, c_ovq = con_.driver.init(range(4), size=32, buf_size=64)
    for _ in range(2):
        c_ivq.post(writable=[64])
    c_ivq.notify()
    message = RAM_BASE + ram - 4096
    con_.bench.ram.write(message, control(0, con.DEVICE_READY, 1))
    segments = [(message, 8, False)] + [(RAM_BASE, 15 << 20, False)] * 15
    tracemalloc.start()
    try:
        c_ovq.add_chain(segments, indirect=True)
        c_ovq.notify()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [u.length for u in c_ovq.get_used()] == [0]
    assert control_messages(c_ivq) == [(0, con.DEVICE_ADD, 0, b"")]     # it was read
    assert peak < 1 << 20, f"{peak} bytes allocated to read an 8-byte message"
    con_.close()


def test_repeated_ready_messages_do_not_queue_control_messages(tmp_path, loop):
    """A driver that repeats DEVICE_READY/PORT_READY but never gives queue 2 buffers."""
    con_ = Console(tmp_path, loop, ports={"p1": None})
    d = con_.driver
    d.negotiate()
    c_ovq = d.setup_queue(3, 32, buf_size=64)
    d.driver_ok()
    for _ in range(50):
        for _ in range(8):
            c_ovq.post(readable=[control(0, con.DEVICE_READY, 1)])
            c_ovq.post(readable=[control(1, con.PORT_READY, 1)])
        c_ovq.notify()
        c_ovq.get_used()
    # two DEVICE_ADDs, then PORT_NAME (+ PORT_OPEN 0: no host side) for port 1, once
    assert len(con_.device._control_out) == 4
    assert not d.status & c.STATUS_DEVICE_NEEDS_RESET
    assert con_.bench.transport.guest_errors >= 50 * 16 - 2
    con_.close()


def test_a_newer_resize_replaces_the_one_still_waiting(tmp_path, loop):
    """Host-side changes the driver has not taken yet (its control queues never set up):
    only the latest RESIZE waits, so no amount of churn fills the queue and fails the
    device (a host client connecting and leaving in a loop did, through PORT_OPEN)."""
    con_ = Console(tmp_path, loop, multiport=True, size=(80, 25))
    d = con_.driver
    d.init([0, 1])
    for cols in range(con.CONTROL_OUT_LIMIT + 10):
        con_.device.resize(80 + cols, 25)
    waiting = list(con_.device._control_out)
    assert waiting == [control(0, con.RESIZE, 0, struct.pack("<HH", 25, 80 + cols))]
    assert not d.status & c.STATUS_DEVICE_NEEDS_RESET
    con_.close()


def test_control_messages_beyond_the_cap_fail_the_device(tmp_path, loop):
    """The cap stays, behind the merging: a driver that never takes a message."""
    con_ = Console(tmp_path, loop, multiport=True, size=(80, 25))
    d = con_.driver
    d.init([0, 1])                            # control queues never set up
    for _ in range(con.CONTROL_OUT_LIMIT + 10):
        con_.device._send_control(0, con.CONSOLE_PORT, 1)
    assert len(con_.device._control_out) == con.CONTROL_OUT_LIMIT
    assert d.status & c.STATUS_DEVICE_NEEDS_RESET
    con_.close()


def test_bad_chain_is_returned_with_an_interrupt(console):
    rx, tx = console.driver.init([0, 1])
    console.bench.irq.take()
    tx.add_chain([(0x1000, 16, False)])       # outside RAM
    tx.notify()
    console.spin()
    assert [(u.length) for u in tx.get_used()] == [0]
    assert console.bench.irq.take() == [console.bench.transport.intid]
    rx.add_chain([(0x1000, 16, True)])
    rx.notify()
    assert [(u.length) for u in rx.get_used()] == [0]
    assert console.driver.interrupt_status() & c.INT_USED_BUFFER


def test_bug_in_an_event_loop_callback_fails_only_that_device(tmp_path, loop, caplog):
    first = Console(tmp_path, loop)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second = Console(other_dir, loop)
    try:
        for con_ in (first, second):
            rx, _ = con_.driver.init([0, 1])
            rx.post(writable=[64])
            rx.notify()

        def broken(views):
            raise RuntimeError("backend bug")
        first.device.ports[0].backend.endpoints[0].readinto = broken
        first.client.send(b"x")
        second.client.send(b"y")
        for _ in range(5):
            loop.run_once(0.01)                     # does not raise
        assert first.driver.status & c.STATUS_DEVICE_NEEDS_RESET
        assert "backend bug" in caplog.text
        assert not second.driver.status & c.STATUS_DEVICE_NEEDS_RESET
        assert [u.data for u in second.driver.queues[0].get_used()] == [b"y"]
    finally:
        first.close()
        second.close()


def test_transmit_queue_notifications_are_off_while_the_output_buffer_is_full(tmp_path, loop):
    path = str(tmp_path / "c.sock")
    b = VirtioBench(ConsoleDevice(f"unix:{path}", limit=4096), loop=loop, ram_size=4 << 20)
    client = socket.socket(socket.AF_UNIX)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(path)
    client.setblocking(False)
    loop.run_once(0)
    b.device.ports[0].backend.endpoints[0].client.setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rx, tx = b.driver.init([0, 1], drop=bit(c.F_RING_EVENT_IDX), size=64)
    for _ in range(64):
        tx.post(readable=[b"z" * 1024])
    tx.notify()
    loop.run_once(0)
    assert b.device.ports[0].backend.buffered >= 4096          # the guest is held
    assert tx.used_flags() & c.USED_F_NO_NOTIFY
    got = 0
    for _ in range(500):
        loop.run_once(0.01)
        try:
            got += len(client.recv(1 << 20))
        except BlockingIOError:
            pass
        tx.get_used(read_data=False)
        if got == 64 * 1024:
            break
    assert got == 64 * 1024
    assert not tx.used_flags() & c.USED_F_NO_NOTIFY
    client.close()
    b.subsystem.close()


def test_endpoint_schemes_are_public():
    from avatar_hw.endpoints import SCHEMES
    assert set(SCHEMES) == {"pty", "unix", "tcp", "file", "stdio", "rfc2217"}
    for scheme in SCHEMES:          # each scheme is the module of that name
        module = importlib.import_module(f"avatar_hw.endpoints.{scheme}")
        assert callable(module.open_url) and callable(module.pyserial_url)


@pytest.mark.parametrize("reader", [False, True], ids=["no-reader", "reader"])
def test_a_file_endpoint_on_a_fifo_is_refused_not_waited_for(tmp_path, reader):
    """``file:`` on a FIFO: its open waited for a reader, and with one that never read,
    the guest's output kept the daemon's loop in writev (every VM waited). Refused with a
    one-line config error naming the endpoints that take a reader; /dev/null still works."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    held = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) if reader else None
    try:
        with pytest.raises(ConfigError, match=r"^file:.*out\.fifo: path: is not a regular "
                                              r"file .*pty: or unix:$"):
            open_endpoint(f"file:{fifo}")
    finally:
        if held is not None:
            os.close(held)
    open_endpoint("file:/dev/null").close()


STDIO_CHECK = """
import os, sys
from avatar_hw.endpoints import open_endpoint
from avatar_hw.loop import EventLoop
loop = EventLoop()
endpoint = open_endpoint("stdio")
endpoint.attach(loop, lambda: None, lambda: None)
loop.run_once(0)
print(os.get_blocking(1), os.get_blocking(2), endpoint.input_fd() is None, flush=True)
endpoint.close()
"""


@pytest.mark.parametrize("stdin", ["devnull", "file", "pipe"])
def test_stdio_takes_any_stdin_and_leaves_stderr_blocking(tmp_path, stdin):
    """``stdio`` with stdin from /dev/null or a file (systemd's default, nohup, a script's
    ``&``): epoll cannot watch those and the daemon died with a traceback; now there is no
    input. Its non-blocking output no longer makes stdout's and stderr's shared file
    description non-blocking (the daemon's log lines were lost while the pipe was full)."""
    source = {"devnull": subprocess.DEVNULL, "pipe": subprocess.PIPE}.get(stdin)
    if stdin == "file":
        (tmp_path / "in").write_text("typed\n")
        source = open(tmp_path / "in", "rb")
    done = subprocess.run([sys.executable, "-c", STDIO_CHECK], stdin=source,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert done.stdout.decode().split() == ["True", "True", str(stdin != "pipe")], done.stdout


def test_a_file_endpoint_writes_a_turns_worth_of_one_huge_buffer_a_loop_turn(tmp_path, loop):
    """One guest buffer larger than a turn's bytes (a file takes any amount at once: 800 MiB
    held every VM 2.7 s) is written TURN_BYTES a loop turn; all of it, in order."""
    from avatar_hw.virtio.queue import TURN_BYTES
    path = tmp_path / "out.log"
    endpoint = open_endpoint(f"file:{path}")
    drained = []
    endpoint.attach(loop, lambda: None, lambda: drained.append(endpoint.position))
    data = bytes(range(256)) * ((2 * TURN_BYTES + 12345) // 256)
    endpoint.stream.submit([memoryview(data)], len(data))
    endpoint.flush()
    assert path.stat().st_size == TURN_BYTES
    for _ in range(3):
        loop.run_once(0)
    assert drained == [2 * TURN_BYTES, len(data)]
    assert path.read_bytes() == data
    endpoint.close()
