"""A hostile guest (its own RAM and registers only) against every device kind, one class of
bad input per test: descriptor loops, addresses outside the RAM, huge lengths, indirect
tables inside indirect tables, device-writable descriptors where the device reads and
read-only ones where it writes, notify storms, and configuration writes at every offset
and width.

For each: nothing escapes into the trap path's catch-all (``internal_errors``), no byte
outside the VM's RAM changes (the bench's guard areas), every queue keeps at most its size
in flight, the lines logged stay few (the rate limit), and a queue's work per notify is a
turn's (test_hostile.py has the counts). The times are bench.hostile's (no timed
assertion here).
"""

import logging
import os
import socket
import struct
import tracemalloc

import pytest

import avatar_hw
from avatar_hw.devices import gpu as g
from avatar_hw.devices import gpu_resources as gr
from avatar_hw.devices.balloon import BalloonDevice
from avatar_hw.devices.block import BlockDevice
from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.devices.gpu import GpuDevice
from avatar_hw.devices.net import NetDevice
from avatar_hw.devices.p9 import P9Device
from avatar_hw.devices.rng import RngDevice
from avatar_hw.devices.vsock import VsockDevice
from avatar_hw.testing.hostile import DESC, internal_errors
from avatar_hw.testing.virtio import RAM_BASE, VirtioBench
from avatar_hw.virtio import constants as c
from avatar_hw.virtio import queue as virtqueue
from test_console import loop  # noqa: F401 (fixture)

RAM = 4 << 20
KINDS = ("console", "block", "rng", "net", "balloon", "9p", "vsock", "gpu", "fs")
LOUD_LINES = 400            # warning lines a whole test may log (20 per kind and device)


class Target:
    """One VM with one device of ``kind``, every queue set up, on ``loop``."""

    def __init__(self, kind, tmp_path, loop):
        self.kind, self.loop, self.closers = kind, loop, []
        if kind == "fs":
            from avatar_hw.devices import fs
            from test_vhost_user import FileBench
            if not os.path.isfile(fs.VIRTIOFSD):
                pytest.skip(f"{fs.VIRTIOFSD} missing (qemu-system-common)")
            (tmp_path / "share").mkdir()
            self.bench = FileBench(tmp_path, fs.FsDevice(tag="t", shared_dir=tmp_path / "share"))
            self.loop = self.bench.loop         # the back-end's eventfds are on it
            self.closers.append(self.bench.close)
        else:
            self.bench = VirtioBench(self._device(kind, tmp_path), loop=loop, ram_size=RAM)
            self.closers.append(self.bench.subsystem.close)
        self.device = self.bench.device
        self.queues = self.bench.driver.init(range(len(self.device.queues)), buf_size=0,
                                             size=16)
        self.ram = self.bench.ram
        self.scratch = self.ram.alloc(64 << 10, 4096)

    def _device(self, kind, tmp_path):
        if kind == "console":
            return ConsoleDevice(f"file:{tmp_path / 'out.log'}", ports={"p": None})
        if kind == "block":
            (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
            return BlockDevice(tmp_path / "disk.img")
        if kind == "rng":
            return RngDevice()
        if kind == "net":
            return NetDevice(f"switch:{tmp_path / 'switch.sock'}")
        if kind == "balloon":
            return BalloonDevice(stats_interval=1)
        if kind == "9p":
            (tmp_path / "share").mkdir()
            return P9Device(tmp_path / "share", tag="t")
        if kind == "vsock":
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(f"{tmp_path / 'v.sock'}_5000")
            listener.listen(8)
            self.closers.append(listener.close)
            return VsockDevice(3, str(tmp_path / "v.sock"))
        return GpuDevice()

    def spin(self, turns=30):
        for _ in range(turns):
            self.loop.run_once(0)

    def check(self):
        if hasattr(self.bench, "check_guards"):
            self.bench.check_guards()
        for queue in self.device.queues:
            assert not queue.ready or queue.in_flight <= queue.size, queue.index

    def close(self):
        for close in reversed(self.closers):
            close()


@pytest.fixture
def target(request, tmp_path, loop, caplog):  # noqa: F811
    """A Target of each kind; at the end: no internal error, few loud lines, guards intact."""
    caplog.set_level(logging.DEBUG, logger="avatar_hw")
    t = Target(request.param, tmp_path, loop)
    try:
        with internal_errors() as records:
            yield t
            t.spin()
        t.check()
        assert records == []
    finally:
        t.close()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) <= LOUD_LINES, len(loud)


every_kind = pytest.mark.parametrize("target", KINDS, indirect=True)


def served_per_turn(loop, queue, count):
    """How many of ``count`` notified requests ``queue`` gets back at the notify, then in
    each turn of the loop."""
    served = [len(queue.get_used())]
    while sum(served) < count:
        loop.run_once(0)
        served.append(len(queue.get_used()))
    return served


def chain_everywhere(t, descriptors, *, table=None):
    """On every queue: the ring's descriptors ``descriptors`` [(addr, len, flags, next)]
    (and, with ``table``, the same entries written as an indirect table at ``table``),
    head 0 made available, then a notify."""
    for q in t.queues:
        for i, desc in enumerate(descriptors):
            q.write_desc(i, *desc)
        if table is not None:
            t.ram.write(table, b"".join(DESC.pack(*d) for d in descriptors))
        q.make_available(0)
        q.notify()
    t.spin()


def data(t, n=0):
    return t.scratch + 512 * n


def assert_refused(t):
    """The bad chains reached the device model and were refused there (a vhost-user
    device's queues are walked by its back-end process instead)."""
    if t.kind != "fs":
        assert sum(q.bad_chains for q in t.device.queues) > 0


@every_kind
def test_descriptor_loops(target):
    t = target
    chain_everywhere(t, [(data(t), 64, c.DESC_F_NEXT, 1), (data(t, 1), 64, c.DESC_F_NEXT, 0)])
    chain_everywhere(t, [(data(t), 64, c.DESC_F_NEXT | c.DESC_F_WRITE, 0)])     # to itself
    table = data(t, 8)
    chain_everywhere(t, [(table, 32, c.DESC_F_INDIRECT, 0)])
    t.ram.write(table, DESC.pack(data(t), 16, c.DESC_F_NEXT, 1)
                + DESC.pack(data(t, 1), 16, c.DESC_F_NEXT, 0))            # loop in the table
    assert_refused(t)


@every_kind
def test_addresses_outside_the_ram(target):
    t = target
    end = RAM_BASE + t.ram.size
    for addr, length in ((0, 64), (RAM_BASE - 64, 128), (end - 8, 64), (end, 1),
                         (2**64 - 8, 64), (2**63, 4096)):
        for flags in (0, c.DESC_F_WRITE):
            chain_everywhere(t, [(data(t), 48, c.DESC_F_NEXT, 1), (addr, length, flags, 0)])
            chain_everywhere(t, [(addr, length, flags, 0)])
        chain_everywhere(t, [(addr, 16 * 4, c.DESC_F_INDIRECT, 0)])          # the table
    assert_refused(t)


@every_kind
def test_huge_lengths(target):
    t = target
    for length in (0xFFFFFFFF, 0x80000000, RAM):
        chain_everywhere(t, [(data(t), length, 0, 0)])
        chain_everywhere(t, [(data(t), 64, c.DESC_F_NEXT, 1),
                             (data(t, 1), length, c.DESC_F_WRITE, 0)])
        chain_everywhere(t, [(data(t, 8), length & ~15, c.DESC_F_INDIRECT, 0)])
    assert_refused(t)


@every_kind
def test_indirect_tables_inside_indirect_tables(target):
    t = target
    outer, inner = data(t, 8), data(t, 16)
    t.ram.write(inner, DESC.pack(data(t), 64, c.DESC_F_WRITE, 0))
    for entry_flags in (c.DESC_F_INDIRECT, c.DESC_F_INDIRECT | c.DESC_F_NEXT,
                        c.DESC_F_INDIRECT | c.DESC_F_WRITE):
        chain_everywhere(t, [(outer, 32, c.DESC_F_INDIRECT, 0)])
        t.ram.write(outer, DESC.pack(data(t, 1), 24, c.DESC_F_NEXT, 1)
                    + DESC.pack(inner, 16, entry_flags, 0))
        t.queues[0].notify()
        t.spin()
    # an indirect descriptor with NEXT, a table of 17 bytes, an empty table
    for desc in ((outer, 32, c.DESC_F_INDIRECT | c.DESC_F_NEXT, 1),
                 (outer, 17, c.DESC_F_INDIRECT, 0), (outer, 0, c.DESC_F_INDIRECT, 0)):
        chain_everywhere(t, [desc, (data(t), 16, 0, 0)])
    assert_refused(t)


@every_kind
def test_writable_where_the_device_reads_and_readable_where_it_writes(target):
    """Every queue gets a chain of device-writable descriptors only, then one of read-only
    descriptors only, then read-only after writable (2.7.4.2: the device MUST NOT...)."""
    t = target
    for flags in ((c.DESC_F_WRITE, c.DESC_F_WRITE), (0, 0), (c.DESC_F_WRITE, 0)):
        t.ram.write(data(t), bytes(range(256)) * 4)
        chain_everywhere(t, [(data(t), 512, flags[0] | c.DESC_F_NEXT, 1),
                             (data(t, 1), 512, flags[1], 0)])
    for q in t.queues:
        q.get_used(read_data=False)


@every_kind
def test_notify_storms(target):
    """Thousands of notifies (every queue, indices that do not exist) with a ring whose
    available index runs far ahead of what was posted."""
    t = target
    for q in t.queues:
        q.write_desc(0, data(t), 64, 0, 0)
        q.set_avail_idx(0x8000)
    window = t.bench.transport.window
    for n in range(3000):
        handled, _ = t.bench.subsystem.handle_mmio_trap(window + c.REG_QUEUE_NOTIFY,
                                                          n % (len(t.queues) + 3), True, 4)
        assert handled
        if n % 100 == 0:
            t.loop.run_once(0)


@every_kind
def test_config_writes_at_every_offset_and_width(target):
    t = target
    d = t.bench.driver
    size = len(t.device.config)
    for width in (1, 2, 4, 8):
        for offset in range(0, size + 8):
            for value in (0, 0xFFFFFFFFFFFFFFFF, 0x0123456789ABCDEF):
                d.write_config(offset, value & ((1 << 8 * width) - 1), width)
                d.read_config(offset, width)
    t.spin()
    assert d.read(c.REG_MAGIC_VALUE) == c.MMIO_MAGIC


# -- gpu: work a single request can ask for ----------------------------------------------------

def test_gpu_backing_entries_are_charged_to_the_turn(loop):  # noqa: F811
    """A 64x64 resource backed by 16 384 one-byte entries (each inside RAM, none touching
    the next): its attach, and each transfer that crosses them all, cost ENTRY_COST per
    entry (each is a view of guest RAM made and checked). A transfer costing more than a
    turn's budget is copied over several turns (at most one request answered per turn), not
    a whole queue of them at 20 ms each while every other VM waits."""
    bench = VirtioBench(GpuDevice(), loop=loop, ram_size=8 << 20)
    try:
        ctrl, _ = bench.driver.init([0, 1], buf_size=0, size=16)
        ram = bench.ram
        responses = ram.alloc(16 * 64)
        count = g.MAX_BACKING_ENTRIES
        backing = ram.alloc(2 * count, 4096)
        attach = (g.HEADER.pack(g.CMD_RESOURCE_ATTACH_BACKING, 0, 0, 0, 0)
                  + struct.pack("<II", 1, count)
                  + b"".join(g.MEM_ENTRY.pack(backing + 2 * i, 1) for i in range(count)))
        requests = ram.alloc(len(attach) + 16 * 512)

        def post(i, body):
            ram.write(requests + 512 * i, body)
            ctrl.add_chain([(requests + 512 * i, len(body), False), (responses + 64 * i, 24, True)])

        post(0, g.HEADER.pack(g.CMD_RESOURCE_CREATE_2D, 0, 0, 0, 0)
             + struct.pack("<IIII", 1, 2, 64, 64))
        ctrl.notify()
        assert len(ctrl.get_used()) == 1
        ram.write(requests + 16 * 512, attach)
        ctrl.add_chain([(requests + 16 * 512, len(attach), False), (responses, 24, True)])
        transfer = g.HEADER.pack(g.CMD_TRANSFER_TO_HOST_2D, 0, 0, 0, 0) + struct.pack(
            "<IIIIQI4x", 0, 0, 64, 64, 0, 1)
        for i in range(1, 5):
            post(i, transfer)
        ctrl.notify()
        served = served_per_turn(loop, ctrl, 5)
        assert max(served) == 1
        assert len(served) >= 1 + 4 * (count * gr.ENTRY_COST // virtqueue.TURN_BYTES)
        assert all(struct.unpack_from("<I", ram.read(responses + 64 * i, 4))[0]
                   == g.RESP_OK_NODATA for i in range(5))
    finally:
        bench.subsystem.close()


def test_a_row_by_row_gpu_transfer_is_charged_to_the_turn(loop, monkeypatch):  # noqa: F811
    """A 1-pixel-wide transfer of 8192 rows copies row by row: it used to cost nothing
    against the turn's budget, so 256 of them (2048 rows each at 2 x 2^22 pixels before the
    side cap) held the daemon for tens of seconds. Now each row costs ROW_COST: one such
    transfer spends a turn, the others wait for the next turns."""
    bench = VirtioBench(GpuDevice(), loop=loop, ram_size=8 << 20)
    try:
        ctrl, _ = bench.driver.init([0, 1], buf_size=0, size=16)
        ram = bench.ram
        requests, responses = ram.alloc(16 * 512), ram.alloc(16 * 64)

        def post(i, kind, fields, extra=b""):
            body = g.HEADER.pack(kind, 0, 0, 0, 0) + fields + extra
            ram.write(requests + 512 * i, body)
            ctrl.add_chain([(requests + 512 * i, len(body), False), (responses + 64 * i, 24, True)])

        def answer(i):
            return struct.unpack_from("<I", ram.read(responses + 64 * i, 4))[0]

        side = g.MAX_RESOURCE_DIMENSION
        post(0, g.CMD_RESOURCE_CREATE_2D, struct.pack("<IIII", 1, 1, 2, side + 1))
        post(1, g.CMD_RESOURCE_CREATE_2D, struct.pack("<IIII", 1, 1, 2, side))
        backing = ram.alloc(2 * 4 * side, 4096)
        post(2, g.CMD_RESOURCE_ATTACH_BACKING, struct.pack("<II", 1, 1),
             g.MEM_ENTRY.pack(backing, 2 * 4 * side))
        ctrl.notify()
        assert len(ctrl.get_used()) == 3
        assert [answer(i) for i in range(3)] == [g.RESP_ERR_OUT_OF_MEMORY, g.RESP_OK_NODATA,
                                                 g.RESP_OK_NODATA]
        transfer = struct.pack("<IIIIQI4x", 0, 0, 1, side, 0, 1)
        for i in range(8):
            post(i, g.CMD_TRANSFER_TO_HOST_2D, transfer)
        ctrl.notify()
        served = served_per_turn(loop, ctrl, 8)
        assert max(served) == 1 and len(served) >= 8
        assert all(answer(i) == g.RESP_OK_NODATA for i in range(8))
    finally:
        bench.subsystem.close()
    bench.check_guards()


@every_kind
def test_memory_held_does_not_grow_with_repeated_attacks(target, monkeypatch):
    """The same bad chains and notifies, round after round: what the daemon holds after
    two rounds does not grow (nothing kept per bad chain, per notify or per log line; the
    records reach no handler that keeps them, as pytest's do)."""
    t = target
    logger = logging.getLogger("avatar_hw")
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "handlers", [])
    window = t.bench.transport.window

    def attack():
        chain_everywhere(t, [(data(t), 64, c.DESC_F_NEXT, 1), (data(t, 1), 64, c.DESC_F_NEXT, 0)])
        chain_everywhere(t, [(2**63, 4096, c.DESC_F_WRITE, 0)])
        chain_everywhere(t, [(data(t, 8), 32, c.DESC_F_INDIRECT, 0)])
        for n in range(300):
            t.bench.subsystem.handle_mmio_trap(window + c.REG_QUEUE_NOTIFY, n % 8, True, 4)
        t.spin()

    def held():
        """Live allocations of the layers a guest drives (not, say, the UART reader thread
        of an emulated board another module keeps running), by line."""
        root = os.path.dirname(avatar_hw.__file__)
        return tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, f"{root}/{layer}/*")
             for layer in ("virtio", "devices", "backends", "vhost_user")]
            + [tracemalloc.Filter(True, f"{root}/ratelimit.py")])
    tracemalloc.start()
    try:
        for _ in range(2):                      # caches and rate limits settle
            attack()
        before = held()
        for _ in range(5):
            attack()
        growth = [stat for stat in held().compare_to(before, "lineno") if stat.size_diff > 0]
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in growth)
    assert grown < 64 << 10, [str(stat) for stat in growth[:5]]