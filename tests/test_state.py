"""The state file of a restart under a running guest (avatar_hw.state): save, restore,
chains in flight completed exactly once, console output neither lost nor repeated, and
state files that are not ours, of another version or another config, or with values
that make no sense."""

import errno
import logging
import os
import random
import socket
import struct
import time

import pytest

from avatar_hw.devices import block, net
from avatar_hw.devices.balloon import BalloonDevice
from avatar_hw.devices.block import BlockDevice
from avatar_hw.devices.net import NetDevice
from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.devices.vsock import HEADER, HEADER_LEN, OP_REQUEST, VsockDevice
from avatar_hw.hw.region import Region
from avatar_hw.loop import EventLoop
from avatar_hw.state import StateError, StateFile
from avatar_hw.testing.driver import GuestRam, VirtioDriver
from avatar_hw.testing.virtio import RAM_BASE, IrqRecorder, RecordingDevice
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.memory import GuestMemory
from avatar_hw.virtio.queue import USED_KEPT, QueueError, Virtqueue
from avatar_hw.virtio.subsystem import Subsystem
from patching import this_thread_only

RAM_SIZE = 4 << 20


class Restartable(RecordingDevice):
    restartable = True


class Model:
    """One 'daemon': a subsystem with ``device`` over the shared ``ram``, keeping its
    state in ``path``; ``driver`` is the guest's side (it lives on across models)."""

    def __init__(self, ram, device, path, loop=None):
        self.loop = loop
        self.irq = IrqRecorder()
        self.subsystem = Subsystem(interrupt_line=self.irq, loop=loop)
        self.subsystem.vm_init(0, GuestMemory(Region(ram), RAM_BASE))
        self.transport = self.subsystem.create_device(0, device)
        self.device = device
        self.state = StateFile(path, self.subsystem)
        self.state.restore()
        self.state.keep()
        self.subsystem.state = self.state
        self.state.resume()


@pytest.fixture
def ram():
    return memoryview(bytearray(RAM_SIZE))


def driver_for(model, ram):
    return VirtioDriver(model.subsystem.handle_mmio_trap, model.transport.window,
                        GuestRam(ram, RAM_BASE))


def test_restart_under_guest_state_restores_registers_and_held_chains_once(tmp_path, ram):
    path = tmp_path / "state"
    first = Model(ram, Restartable(queue_sizes=(8,), hold=True), path)
    assert not first.state.restored
    driver = driver_for(first, ram)
    (queue,) = driver.init([0])
    heads = [queue.post([b"a" * 16], [32]) for _ in range(3)]
    queue.notify()
    assert [ch.head for _, ch in first.device.held] == heads
    first.transport.device.queues[0].add_used(first.device.held[0][1], 7)  # done before the kill
    # SIGKILL: nothing closed. The next model takes the same RAM and file.
    second = Model(ram, Restartable(queue_sizes=(8,), hold=True), path)
    driver.mmio = second.subsystem.handle_mmio_trap
    assert second.state.restored
    ctx = second.transport.context
    assert ctx.status == first.transport.context.status
    assert ctx.driver_features == first.transport.context.driver_features
    q2 = second.device.queues[0]
    assert (q2.ready, q2.size, q2.desc_addr) == (True, 8, queue.desc)
    assert q2.last_avail_idx == 3 and q2.used_idx == 1
    # the two chains in flight came back through pop, in order, and only them
    assert [ch.head for _, ch in second.device.held] == heads[1:]
    assert second.irq.raised                        # one interrupt at the resume
    for _, ch in second.device.held:
        q2.add_used(ch, 1)
    assert [u.head for u in queue.get_used(read_data=False)] == heads
    # new work after the restart is served as usual
    head = queue.post([b"b"], [8])
    queue.notify()
    assert second.device.held[-1][1].head == head


def test_restart_under_guest_hands_back_a_chain_held_while_a_queues_worth_went_by(tmp_path,
                                                                                 ram):
    """A request held while more than a queue's worth of later ones came and went (a 9p read
    blocked on a FIFO) is still in flight after a restart, and only it."""
    path = tmp_path / "state"
    first = Model(ram, Restartable(queue_sizes=(8,), hold=True), path)
    driver = driver_for(first, ram)
    (queue,) = driver.init([0])
    held = queue.post([b"a" * 16], [32])
    queue.notify()
    device_queue = first.device.queues[0]
    for _ in range(20):                 # each done at once, its descriptors reused
        queue.post([b"b"], [8])
        queue.notify()
        device_queue.add_used(first.device.held[-1][1], 1)
        assert len(queue.get_used(read_data=False)) == 1
    second = Model(ram, Restartable(queue_sizes=(8,), hold=True), path)
    assert [chain.head for _, chain in second.device.held] == [held]
    assert second.device.queues[0].last_avail_idx == 21


def _killed_inside_add_used(ram, path, *, published, heads=1):
    """A model whose process died inside ``add_used`` of its first chain of ``heads``
    in flight, after or before it published the used idx: (model, guest queue, heads)."""
    first = Model(ram, Restartable(queue_sizes=(8,), hold=True), path)
    (queue,) = driver_for(first, ram).init([0])
    posted = [queue.post([b"x"], [8]) for _ in range(heads)]
    queue.notify()
    vq, head = first.device.queues[0], posted[0]
    mark = vq._in_flight[head]
    vq.add_used(first.device.held[0][1], 1)
    # the state file as the process left it: the used word naming the head, the head
    # still marked (and the guest's used idx not yet moved)
    vq._indices[1], vq._in_flight[head] = USED_KEPT | head << 16 | 1, mark
    if not published:
        struct.pack_into("<H", ram, queue.used + 2 - RAM_BASE, 0)
    return first, queue, posted


@pytest.mark.parametrize("published", [True, False])
def test_restart_under_guest_kill_inside_add_used_completes_exactly_once(tmp_path, ram,
                                                                         published):
    path = tmp_path / "state"
    _, queue, (head,) = _killed_inside_add_used(ram, path, published=published)
    second = Model(ram, Restartable(queue_sizes=(8,), hold=True), path)
    vq = second.device.queues[0]
    if published:
        assert second.device.held == [] and vq.used_idx == 1     # not done again
    else:
        assert [ch.head for _, ch in second.device.held] == [head] and vq.used_idx == 0
        vq.add_used(second.device.held[0][1], 1)
    assert [u.head for u in queue.get_used(read_data=False)] == [head]
    assert not second.transport.context.status & c.STATUS_DEVICE_NEEDS_RESET


def test_restart_under_guest_that_rewrote_its_used_ring_completes_nothing_twice(tmp_path,
                                                                               ram, caplog):
    """The process died inside ``add_used`` of one of three chains, after publishing; the
    guest rewrote that used entry to name another chain in flight. Only the kept state
    says which chain was completed: the other two are done again, the first is not (it was
    done again, and the other lost, when restore believed the guest's entry)."""
    path = tmp_path / "state"
    _, queue, heads = _killed_inside_add_used(ram, path, published=True, heads=3)
    struct.pack_into("<I", ram, queue.used + 4 - RAM_BASE, heads[2])
    second = Model(ram, Restartable(queue_sizes=(8,), hold=True), path)
    assert [ch.head for _, ch in second.device.held] == heads[1:]
    assert "the guest rewrote the used entry of head" in caplog.text
    assert not second.transport.context.status & c.STATUS_DEVICE_NEEDS_RESET


@pytest.mark.parametrize("spoil", ["used-idx", "positions"])
def test_restart_under_guest_with_a_used_idx_or_table_that_cannot_be_needs_reset(tmp_path,
                                                                                ram, spoil):
    """A used idx the kept state does not allow (the guest moved it, and wrote an entry
    naming a chain in flight, which restore used to take as completed and drop), or two
    chains in flight from one available-ring position in the state file: the device needs
    a reset, nothing is guessed."""
    path = tmp_path / "state"
    first = Model(ram, Restartable(queue_sizes=(8,), hold=True), path)
    (queue,) = driver_for(first, ram).init([0])
    heads = [queue.post([b"x"], [8]) for _ in range(2)]
    queue.notify()
    vq = first.device.queues[0]
    if spoil == "used-idx":
        struct.pack_into("<HI", ram, queue.used + 2 - RAM_BASE, 1, heads[0])
    else:
        vq._in_flight[heads[1]] = vq._in_flight[heads[0]]
    second = Model(ram, Restartable(queue_sizes=(8,), hold=True), path)
    assert second.transport.context.status & c.STATUS_DEVICE_NEEDS_RESET
    assert second.device.held == []


def _block_model(ram, image, path):
    """A block model on a new 64 KiB ``image``: (model, the guest's driver, its queue)."""
    image.write_bytes(bytes(64 << 10))
    model = Model(ram, BlockDevice(image), path)
    driver = driver_for(model, ram)
    (queue,) = driver.init([0])
    return model, driver, queue


def test_restart_under_guest_block_write_in_flight_is_written_once(tmp_path, ram):
    image, path = tmp_path / "disk.img", tmp_path / "state"
    first, driver, queue = _block_model(ram, image, path)
    vq = first.device.queues[0]
    head = queue.post([struct.pack("<IIQ", 1, 0, 2), b"W" * 512], [1])
    # the daemon dies inside the write: popped, not yet written, no used entry
    vq.pop()
    first.device._close_image()
    assert image.read_bytes()[1024:1536] == bytes(512)
    second = Model(ram, BlockDevice(image), path)
    [used] = queue.get_used()
    assert (used.head, used.length, used.data) == (head, 1, b"\0")       # VIRTIO_BLK_S_OK
    assert image.read_bytes()[1024:1536] == b"W" * 512
    assert second.device.queues[0].in_flight == 0


@pytest.mark.parametrize("when", ["running", "reset", "restore-failed"])
def test_restart_under_guest_block_refuses_flushes_after_a_failed_fdatasync(tmp_path, ram,
                                                                           monkeypatch, when):
    """An fdatasync failed: Linux cleared the error and marked the pages clean. The image a
    restarted daemon opens does not tell, so the failure is in the saved state: its flushes
    are still IOERR — also when the guest had reset the device before the restart, or the
    device's registers could not be restored (it needs a reset, and the guest sets it up
    afresh)."""
    image, path = tmp_path / "disk.img", tmp_path / "state"
    first, driver, queue = _block_model(ram, image, path)
    real = os.fdatasync

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(block.os, "fdatasync", this_thread_only(real, failing))
    queue.post([struct.pack("<IIQ", 4, 0, 0)], [1])                  # FLUSH
    queue.notify()
    assert [u.data for u in queue.get_used()] == [b"\x01"]           # IOERR
    monkeypatch.undo()
    if when == "reset":
        driver.reset()
    elif when == "restore-failed":                                  # a used idx moved
        struct.pack_into("<H", ram, queue.used + 2 - RAM_BASE, 7)
    first.device._close_image()
    second = Model(ram, BlockDevice(image), path)
    driver.mmio = second.subsystem.handle_mmio_trap
    needs_reset = bool(second.transport.context.status & c.STATUS_DEVICE_NEEDS_RESET)
    assert needs_reset == (when == "restore-failed")
    if when != "running":
        driver.reset()
        (queue,) = driver.init([0])
    queue.post([struct.pack("<IIQ", 4, 0, 0)], [1])
    queue.notify()
    assert [u.data for u in queue.get_used()] == [b"\x01"]


@pytest.fixture
def net_daemon(tmp_path, ram):
    """Starts a net device's 'daemon' anew at each call (one switch, one state file)."""
    loop = EventLoop()
    switch, path = f"switch:{tmp_path / 's.sock'}", tmp_path / "state"
    yield lambda: Model(ram, NetDevice(switch), path, loop)
    loop.close()


def test_restart_under_guest_net_keeps_the_mac_the_guest_read(ram, net_daemon, monkeypatch):
    """A device given no mac: its default depends on the host (/etc/machine-id, else the
    host name), which may change under a running guest. The restarted daemon takes back the
    MAC the guest read, and the switch port is locked to it (not to the new default: the
    guest's every frame would be dropped as spoofed)."""
    first = net_daemon()
    driver_for(first, ram).init([0, 1])
    mac = first.device.mac
    first.device.detach()                        # its sockets go, as with the process
    monkeypatch.setattr(net, "default_mac", lambda intid: bytes([2, 9, 9, 9, 9, 9]))
    second = net_daemon()
    assert second.device.mac == mac and bytes(second.device.config[:6]) == mac
    assert second.device.backend.switch.locked == {mac: second.device.backend}
    second.subsystem.close()


def test_restart_under_guest_net_keeps_the_link_the_operator_took_down(ram, net_daemon):
    """The guest was told the link is down: the restarted daemon neither forwards its frames
    nor reports the link up behind its back; taking it up again is kept as well."""
    first = net_daemon()
    driver_for(first, ram).init([0, 1])
    first.device.set_link(False)
    first.device.detach()
    second = net_daemon()
    assert second.device.link_up is False
    assert second.device.config[net.STATUS_OFFSET] & net.S_LINK_UP == 0
    second.device.set_link(True)
    assert second.device.config[net.STATUS_OFFSET] & net.S_LINK_UP
    second.device.detach()
    third = net_daemon()
    assert third.device.link_up is True
    third.subsystem.close()


def test_restart_under_guest_vsock_tells_the_guest_its_connections_are_gone(tmp_path, ram):
    """A vsock connection's host side dies with the daemon. The restarted one does not put
    the device in DEVICE_NEEDS_RESET (the guest would lose its listeners too): it posts
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.7), and host clients connect again."""
    loop = EventLoop()
    try:
        sock, path = str(tmp_path / "v.sock"), tmp_path / "state"
        first = Model(ram, VsockDevice(3, sock), path, loop)
        driver = driver_for(first, ram)
        rx, tx, event = driver.init([0, 1, 2])
        event.post(writable=[4])
        event.notify()
        assert event.get_used() == []                    # no event while nothing happened
        first.device.detach()                            # its sockets go, as with the process
        second = Model(ram, VsockDevice(3, sock), path, loop)
        driver.mmio = second.subsystem.handle_mmio_trap
        assert not second.transport.context.status & c.STATUS_DEVICE_NEEDS_RESET
        assert [(u.length, u.data) for u in event.get_used()] == [(4, struct.pack("<I", 0))]
        rx.post(writable=[HEADER_LEN])
        rx.notify()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(sock)
            client.sendall(b"CONNECT 5000\n")
            for _ in range(20):
                loop.run_once(0.01)
            [used] = rx.get_used()
            header = HEADER.unpack(used.data)
            assert (header[3], header[6]) == (5000, OP_REQUEST)
        second.subsystem.close()
    finally:
        loop.close()


def test_restart_under_guest_balloon_keeps_its_target_and_the_guests_actual(tmp_path, ram):
    """The host's target and the pages the guest holds: a restarted daemon neither forgets
    the VM's balloon (num_pages 0 would let it deflate) nor leaves the driver waiting; the
    target also outlives a reset before the restart."""
    loop = EventLoop()
    try:
        path = tmp_path / "state"
        first = Model(ram, BalloonDevice(stats_interval=3600), path, loop)
        driver = driver_for(first, ram)
        inflate, _, stats = driver.init([0, 1, 2])
        stats.post(readable=[bytes(10)])
        stats.notify()
        first.device.set_target(RAM_SIZE - (1 << 20))
        driver.write_config(4, 200)
        first.device.detach()
        second = Model(ram, BalloonDevice(stats_interval=3600), path, loop)
        driver.mmio = second.subsystem.handle_mmio_trap
        assert driver.status == 0x0F
        assert (driver.read_config(0), driver.read_config(4)) == (256, 200)
        assert second.device._stats_chain is not None         # held again, not returned
        inflate.post(readable=[struct.pack("<I", RAM_BASE // 4096)])
        inflate.notify()
        assert len(inflate.get_used()) == 1
        driver.reset()
        second.device.detach()
        third = Model(ram, BalloonDevice(), path, loop)
        driver.mmio = third.subsystem.handle_mmio_trap
        assert (third.device.num_pages, third.device.actual) == (256, 0)
        third.subsystem.close()
    finally:
        loop.close()


def _balloon_restarted_with(tmp_path, ram, saved):
    """A balloon restarted under its driver from a state whose blob is ``saved`` (JSON
    bytes); the second model."""
    path = tmp_path / "state"
    first = Model(ram, BalloonDevice(stats_interval=0), path)
    driver_for(first, ram).init([0, 1, 2])
    _write_blob(first.state, first.subsystem.layout.window_number(0, 0), saved)
    return Model(ram, BalloonDevice(stats_interval=0), path)


@pytest.mark.parametrize("actual", [0, RAM_SIZE // 4096 + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_restart_under_guest_balloon_takes_back_any_32_bit_actual(tmp_path, ram, actual):
    """The guest may write any 32-bit ``actual`` (more pages than its RAM is a guest error,
    kept and shown as unknown): a restart keeps it, no DEVICE_NEEDS_RESET (it was refused
    above the VM's pages)."""
    path = tmp_path / "state"
    first = Model(ram, BalloonDevice(stats_interval=0), path)
    driver = driver_for(first, ram)
    driver.init([0, 1, 2])
    driver.write_config(4, actual)
    second = Model(ram, BalloonDevice(stats_interval=0), path)
    driver.mmio = second.subsystem.handle_mmio_trap
    assert driver.status == 0x0F
    assert second.device.actual == driver.read_config(4) == actual


@pytest.mark.parametrize("saved, message", [
    (b'{"num_pages":0,"actual":4294967296}', "actual 4294967296 is not an integer from 0"),
    (b'{"num_pages":0,"actual":-1}', "actual -1 is not"),
    (b'{"num_pages":0,"actual":"7"}', "actual '7' is not"),
    (b'{"num_pages":0,"actual":1.0}', "actual 1.0 is not"),
    (b'{"num_pages":0,"actual":true}', "actual True is not"),
    (b'{"num_pages":1025,"actual":0}', "num_pages 1025 is not an integer from 0 to 1024"),
])
def test_restart_under_guest_balloon_refuses_malformed_state(tmp_path, ram, caplog, saved,
                                                              message):
    """Only a value no driver and no host could have kept: DEVICE_NEEDS_RESET, one clear
    line naming the field and the value."""
    with caplog.at_level(logging.ERROR):
        second = _balloon_restarted_with(tmp_path, ram, saved)
    assert second.transport.context.status & c.STATUS_DEVICE_NEEDS_RESET
    assert any(message in r.getMessage() for r in caplog.records), caplog.text


def _console(tmp_path, ram, path, loop):
    """A console model with a client connected before it resumes (a restart's replayed
    output goes to the client, not to the unattached log)."""
    sock_path = str(tmp_path / "con.sock")
    device = ConsoleDevice(f"unix:{sock_path}")
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock_path)
    client.setblocking(False)
    return Model(ram, device, path, loop), client


def _receive(loop, client, n, timeout=5.0):
    out, deadline = b"", time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        loop.run_once(0.01)
        try:
            out += client.recv(1 << 16)
        except BlockingIOError:
            pass
    return out


def _console_killed_with_output_delivered(tmp_path, ram, path, loop):
    """A console model that handed three transmit chains to its client and died before it
    returned them: (the guest's driver, its transmit queue, the chains' heads)."""
    first, client = _console(tmp_path, ram, path, loop)
    driver = driver_for(first, ram)
    rxq, txq = driver.init([0, 1])
    for _ in range(3):
        loop.run_once(0.01)
    first.device.ports[0].backend.take_done = lambda: []
    heads = []
    for data in (b"one-", b"two-", b"three-"):
        heads.append(txq.post([data]))
        txq.notify()
    assert _receive(loop, client, 14) == b"one-two-three-"
    assert first.device.queues[1].in_flight == 3
    client.close()
    first.device.detach()                    # its sockets go, as with the process
    return driver, txq, heads


def test_restart_under_guest_console_output_is_neither_lost_nor_repeated(tmp_path, ram):
    loop = EventLoop()
    path = tmp_path / "state"
    driver, txq, _ = _console_killed_with_output_delivered(tmp_path, ram, path, loop)
    second, client = _console(tmp_path, ram, path, loop)
    driver.mmio = second.subsystem.handle_mmio_trap
    for _ in range(3):
        loop.run_once(0.01)
    txq.post([b"four"])
    txq.notify()
    assert _receive(loop, client, 4) == b"four"
    assert _receive(loop, client, 1, timeout=0.2) == b""
    assert len(txq.get_used(read_data=False)) == 4
    loop.close()


def test_restart_under_guest_console_chain_over_64_kib_is_sent_on_from_its_delivered_byte(
        tmp_path, ram):
    """One 1 MiB transmit chain, part of it (more than 64 KiB) handed to the client when the
    process dies: the client reads what it had, and the next process sends the rest, no
    byte twice (the delivered count was stored in 16 bits, so all past 64 KiB repeated)."""
    loop = EventLoop()
    path = tmp_path / "state"
    first, client = _console(tmp_path, ram, path, loop)
    driver = driver_for(first, ram)
    _, txq = driver.init([0, 1])
    for _ in range(3):
        loop.run_once(0.01)
    endpoint = first.device.ports[0].backend.endpoints[0]
    endpoint.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
    data = random.Random(64).randbytes(1 << 20)
    gpa = txq.ram.alloc(len(data))
    txq.ram.write(gpa, data)
    txq.add_chain([(gpa, len(data), False)])
    txq.notify()
    got = _receive(loop, client, 300 << 10)
    assert 64 << 10 < len(got) < len(data)
    first.device.detach()                    # killed: its sockets go, what they sent stays
    client.setblocking(True)
    while chunk := client.recv(1 << 16):
        got += chunk
    client.close()
    assert len(got) < len(data)
    second, client = _console(tmp_path, ram, path, loop)
    driver.mmio = second.subsystem.handle_mmio_trap
    got += _receive(loop, client, len(data) - len(got))
    assert _receive(loop, client, 1, timeout=0.2) == b""
    assert got == data
    assert [u.length for u in txq.get_used(read_data=False)] == [0]   # nothing written to it
    loop.close()


def test_restart_under_guest_console_output_after_a_bad_replayed_chain_is_not_lost(tmp_path,
                                                                                   ram):
    """Three transmit chains were delivered, not returned, when the process died; the guest
    spoils the middle one's descriptor before the restart. Its replay is a bad chain (the
    queue returns it), and a later chain with its head is sent, not taken for the
    delivered one (the port's restart bookkeeping was by head alone)."""
    loop = EventLoop()
    path = tmp_path / "state"
    driver, txq, heads = _console_killed_with_output_delivered(tmp_path, ram, path, loop)
    txq.write_desc(heads[1], 1 << 40, 4)                 # outside RAM: a bad chain now
    second, client = _console(tmp_path, ram, path, loop)
    driver.mmio = second.subsystem.handle_mmio_trap
    for _ in range(3):
        loop.run_once(0.01)
    assert sorted(u.head for u in txq.get_used(read_data=False)) == sorted(heads)
    txq.free.remove(heads[1])
    txq.free.insert(0, heads[1])
    assert txq.post([b"four"]) == heads[1]
    txq.notify()
    assert _receive(loop, client, 4) == b"four"
    loop.close()


def test_restart_under_guest_restore_of_any_kept_progress_and_rings_is_defined():
    """``Virtqueue.restore`` over random kept progress (indices, used word, in-flight
    table) and random guest rings: a ``QueueError`` exactly when the guest's used idx is
    not one the used word allows or the table has a position twice (or out of range);
    otherwise the chains marked (but for a pop cut short), less the one the used word says
    was published, oldest first, each handed back once by ``pop`` (bad ones completed with
    length 0), never another error."""
    rng = random.Random(13)
    size, base = 8, 0x10000
    buf = bytearray(1 << 16)
    memory = GuestMemory(Region(buf), base)
    refused = 0
    for _ in range(400):
        buf[:] = rng.randbytes(len(buf))
        queue = Virtqueue(0, size)
        queue.size, queue.desc_addr = size, base
        queue.driver_addr, queue.device_addr = base + 0x1000, base + 0x2000
        last = rng.randrange(1 << 16)
        ages = rng.sample([*range(12), 0x7FFF, 0xFFFE, 0xFFFF], size)   # 0xFFFF: cut short
        marks = [0 if rng.random() < 0.4 else (last - age) & 0xFFFF or 0x10000
                 for age in ages]
        if rng.random() < 0.1:
            marks[rng.randrange(size)] = rng.choice([marks[0], rng.randrange(1 << 32)])
        used = rng.choice([rng.randrange(1 << 32), USED_KEPT | rng.randrange(size) << 16
                           | rng.randrange(1 << 16), rng.randrange(1 << 16)])
        guest_used = rng.choice([used & 0xFFFF, (used - 1) & 0xFFFF, rng.randrange(1 << 16)])
        struct.pack_into("<H", buf, 0x2002, guest_used)
        window = {h: (last - m) & 0xFFFF for h, m in enumerate(marks)
                  if m and (last - m) & 0xFFFF != 0xFFFF}
        named = used >> 16 & 0x7FFF if used & USED_KEPT else None
        allowed = {used & 0xFFFF} | ({(used - 1) & 0xFFFF} if named is not None else set())
        if (max(marks) > 0x10000 or len(set(window.values())) != len(window)
                or guest_used not in allowed):
            with pytest.raises(QueueError):
                queue.restore(memory, last, used, marks)
            refused += 1
            assert not queue.ready
            continue
        heads = queue.restore(memory, last, used, marks)
        if guest_used == used & 0xFFFF:
            window.pop(named, None)                       # published before the kill
        assert heads == sorted(window, key=window.get, reverse=True)
        assert queue.used_idx == guest_used
        struct.pack_into("<H", buf, 0x1002, last)         # nothing new available
        popped = [chain.head for chain in queue]
        assert set(popped) <= set(heads) and queue.in_flight == len(popped)
        assert queue.used_idx == (guest_used + len(heads) - len(popped)) & 0xFFFF
    assert 50 < refused < 300, refused


# -- files that are not what they should be -------------------------------------------------------


def _file(tmp_path, ram):
    path = tmp_path / "state"
    model = Model(ram, Restartable(queue_sizes=(8,)), path)
    driver = driver_for(model, ram)
    driver.init([0])
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"NOTOURS!" + b[8:], "is not an avatar-hw state file"),
    (lambda b: b[:8] + struct.pack("<I", 99) + b[12:], "state format version 99"),
    (lambda b: b + bytes(8), "has the wrong size"),
    (lambda b: b[:20], "is not an avatar-hw state file"),
])
def test_restart_under_guest_damaged_state_file_is_one_line_error(tmp_path, ram, damage, message):
    path = _file(tmp_path, ram)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StateError) as err:
        Model(ram, Restartable(queue_sizes=(8,)), path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value) and "remove it" in str(err.value)


def test_restart_under_guest_state_of_another_config_is_refused(tmp_path, ram):
    path = _file(tmp_path, ram)
    with pytest.raises(StateError, match="another VMs config"):
        Model(ram, Restartable(queue_sizes=(16,)), path)


def test_restart_under_guest_nonsense_values_set_device_needs_reset(tmp_path, ram):
    path = _file(tmp_path, ram)
    state = StateFile(path, Model(memoryview(bytearray(RAM_SIZE)), Restartable(
        queue_sizes=(8,)), tmp_path / "other").subsystem)
    state.slots[min(state.slots)].queues[0].size = 3          # not a power of two
    state.close()
    model = Model(ram, Restartable(queue_sizes=(8,)), path)
    assert model.transport.context.status & c.STATUS_DEVICE_NEEDS_RESET
    assert not model.device.queues[0].ready


def _write_blob(state, number, blob):
    """Make ``blob`` window ``number``'s current device state in ``state``'s file."""
    slot = state.slots[number]
    current = slot.record.blob_current & 1
    slot.blobs[current][:len(blob)] = blob
    slot.record.blob_length[current] = len(blob)


class WrongShape(Restartable):
    """Keeps a number where its restore expects a list (a damaged or foreign blob)."""

    def saved_state(self):
        return {"ports": 5}

    def restore_state(self, saved, words, live):
        len(saved["ports"])


@pytest.mark.parametrize("deep", [False, True], ids=["wrong-type", "nested-4000-deep"])
def test_restart_under_guest_device_state_of_the_wrong_shape_needs_reset(tmp_path, ram,
                                                                         deep):
    """The blob is untrusted: a device's restore tripping over it (TypeError here), or
    JSON nested past the parser's recursion limit (RecursionError: the daemon did not
    start at all), puts that device in DEVICE_NEEDS_RESET instead of stopping the daemon
    with a traceback."""
    path = tmp_path / "state"
    first = Model(ram, WrongShape(queue_sizes=(8,)), path)
    driver_for(first, ram).init([0])
    number = first.subsystem.layout.window_number(0, 0)
    first.state.save_device(number)
    if deep:
        _write_blob(first.state, number, b"[" * 4000 + b"]" * 4000)
    second = Model(ram, WrongShape(queue_sizes=(8,)), path)
    assert second.transport.context.status & c.STATUS_DEVICE_NEEDS_RESET


def test_restart_under_guest_device_that_cannot_be_restored_needs_reset(tmp_path, ram):
    """The driver is told (2.1.2): its status, DEVICE_NEEDS_RESET added, and a
    configuration change interrupt; not a status of 0x40 alone it never set."""
    path = tmp_path / "state"
    first = Model(ram, RecordingDevice(queue_sizes=(8,)), path)
    driver = driver_for(first, ram)
    driver.init([0])
    second = Model(ram, RecordingDevice(queue_sizes=(8,)), path)
    driver.mmio = second.subsystem.handle_mmio_trap
    assert driver.status == 0x0F | c.STATUS_DEVICE_NEEDS_RESET
    assert driver.interrupt_status() == c.INT_CONFIG_CHANGE and second.irq.take()
    driver.reset()
    driver.init([0])
    assert driver.status == 0x0F


def test_restart_under_guest_state_from_another_boot_starts_fresh(tmp_path, ram, monkeypatch):
    path = _file(tmp_path, ram)
    monkeypatch.setattr("avatar_hw.state.boot_id", lambda: "another-boot")
    model = Model(ram, Restartable(queue_sizes=(8,)), path)
    assert not model.state.restored and model.transport.context.status == 0


def test_restart_under_guest_close_with_a_ready_queue_lets_go_of_the_mapping(tmp_path, ram,
                                                                              caplog):
    """``close`` re-points a ready queue's progress away from the file, so the mapping
    closes (it used to stay held by the queue's in-flight view) and later pops do not
    store into a closed file."""
    model = Model(ram, Restartable(queue_sizes=(8,), hold=True), tmp_path / "state")
    (queue,) = driver_for(model, ram).init([0])
    head = queue.post([b"a"], [8])
    queue.notify()
    vq = model.device.queues[0]
    caplog.set_level(logging.DEBUG, logger="avatar_hw.state")
    model.state.close()
    assert "still held" not in caplog.text
    assert model.state._map is None
    assert not isinstance(vq._in_flight, memoryview) and vq._in_flight[head]
    vq.add_used(model.device.held[0][1], 1)      # goes on, in its own memory
    assert vq.used_idx == 1
