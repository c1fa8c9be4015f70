"""Split virtqueues and guest memory: every bad-input rule of the chain iterator."""

import logging
import random
import struct

import pytest

from avatar_hw.hw import ordering
from avatar_hw.hw.region import Region
from avatar_hw.testing.virtio import RAM_BASE, RecordingDevice, VirtioBench
from avatar_hw.virtio import chain
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.chain import DescriptorTable
from avatar_hw.virtio.constants import bit
from avatar_hw.virtio.memory import GuestMemory, GuestMemoryError
from avatar_hw.virtio.queue import Virtqueue

RAM = 1 << 20
NEXT, WRITE, INDIRECT = c.DESC_F_NEXT, c.DESC_F_WRITE, c.DESC_F_INDIRECT


@pytest.fixture
def bench():
    b = VirtioBench(RecordingDevice(queue_sizes=(8, 8)))
    b.rx, b.tx = b.driver.init([0, 1])
    b.data = b.ram.alloc(4096)
    yield b
    b.check_guards()


def offer(b, descs, *, head=0, table=None):
    """Write descriptors (addr, len, flags, next) at ``head``.. and make ``head`` available."""
    for i, d in enumerate(descs):
        b.rx.write_desc(head + i, *d, table=table)
    if table is None:
        b.rx.make_available(head)
    b.rx.notify()


def used(b):
    q = b.rx
    out = []
    while q.last_used_idx != q.used_idx():
        out.append(q.ram.read(q.used + 4 + 8 * (q.last_used_idx % q.size), 8))
        q.last_used_idx += 1
    return [(int.from_bytes(e[:4], "little"), int.from_bytes(e[4:], "little")) for e in out]


def needs_reset(b):
    return bool(b.driver.status & c.STATUS_DEVICE_NEEDS_RESET)


# -- guest memory ---------------------------------------------------------------------------------

def test_guest_memory_views_and_bounds():
    buf = bytearray(4096)
    mem = GuestMemory(Region(buf), 0x1000, vm_id=3)
    mem.view(0x1000, 4)[:] = b"abcd"
    assert buf[:4] == b"abcd"
    assert mem.view(0x1FFF, 1).nbytes == 1 and mem.view(0x2000, 0).nbytes == 0
    mem.view(0x1010, 4).cast("I")[0] = 0xDEADBEEF
    assert buf[0x10:0x14] == bytes.fromhex("efbeadde")
    assert mem.view(0x1012, 2).cast("H")[0] == 0xDEAD
    ordering.store_release16(mem.address(0x1020, 2), 7)
    assert buf[0x20:0x22] == b"\x07\x00" and ordering.load_acquire16(mem.address(0x1020, 2)) == 7
    for gpa, length in ((0xFFF, 2), (0x1FFF, 2), (0x2000, 1), (0, 1),
                        (0xFFFFFFFFFFFFFFFF, 0x1002), (0x1000, -1)):
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.address(0x1002, 4)      # misaligned
    with pytest.raises(GuestMemoryError):
        mem.address(0x1FFC, 8)
    assert "vm3" in repr(mem)


def test_view_is_not_a_copy():
    buf = bytearray(64)
    mem = GuestMemory(Region(buf), 0)
    view = mem.view(8, 8)
    buf[8] = 0x77
    assert view[0] == 0x77


def test_queue_max_size_must_be_power_of_two():
    with pytest.raises(ValueError):
        Virtqueue(0, 12)


# -- good chains -----------------------------------------------------------------------------------

def test_chain_readable_then_writable(bench):
    b = bench
    b.rx.post(readable=[b"hello", b"world"], writable=[3, 5])
    b.rx.notify()
    (_, head, readable, writable), = b.device.chains
    assert readable == [b"hello", b"world"] and writable == [3, 5]
    assert [(u.head, u.length, u.data) for u in b.rx.get_used()] == [(head, 8, b"\x5a" * 8)]


def test_indirect_chain(bench):
    b = bench
    b.rx.post(readable=[b"abc"], writable=[4, 4], indirect=True)
    b.rx.notify()
    assert b.device.chains[0][2:] == ([b"abc"], [4, 4])
    assert b.rx.get_used()[0].length == 8


def test_direct_descriptors_then_indirect_table(bench):
    b = bench
    table = b.ram.alloc(32)
    b.rx.write_desc(0, b.data, 2, WRITE | NEXT, 1, table=table)
    b.rx.write_desc(1, b.data + 2, 2, WRITE, table=table)
    offer(b, [(b.data + 8, 3, NEXT, 1), (table, 32, INDIRECT, 0)])
    assert b.device.chains[0][2:] == ([bytes(3)], [2, 2])


def test_zero_length_descriptor_is_allowed(bench):
    offer(bench, [(bench.data, 0, WRITE, 0)])
    assert used(bench) == [(0, 0)] and bench.device.chains[0][3] == []   # skipped


def test_each_chain_processed_once(bench):
    b = bench
    b.rx.post(writable=[4])
    b.rx.notify()
    b.rx.notify()
    b.rx.notify()
    assert len(b.device.chains) == 1 and len(used(b)) == 1


def test_ring_wraps_past_65535(bench):
    b = bench
    queue = b.device.queues[0]            # as if 65534 chains had gone through
    queue.last_avail_idx = queue._avail_idx = queue.used_idx = queue._signalled_used = 0xFFFE
    b.rx.set_avail_idx(0xFFFE)
    b.rx.last_used_idx = 0xFFFE
    for _ in range(4):
        b.rx.post(writable=[1])
    b.rx.notify()
    assert len(b.rx.get_used()) == 4 and b.rx.used_idx() == 2


# -- bad chains: completed with length 0 -----------------------------------------------------------

def bad_chain(b, descs, **kw):
    offer(b, descs, **kw)
    assert used(b) == [(kw.get("head", 0), 0)]
    assert b.device.chains == [] and not needs_reset(b)
    assert b.device.queues[0].bad_chains == 1
    # the queue keeps working
    b.rx.free = list(range(1, 8)) if kw.get("head", 0) == 0 else b.rx.free
    b.rx.post(writable=[2])
    b.rx.notify()
    assert len(b.device.chains) == 1


def test_next_index_out_of_range(bench):
    bad_chain(bench, [(bench.data, 4, NEXT, 8)])


def test_loop_bounded_by_queue_size(bench):
    bad_chain(bench, [(bench.data, 4, NEXT, 1), (bench.data, 4, NEXT, 0)])


def test_self_loop(bench):
    bad_chain(bench, [(bench.data, 4, NEXT, 0)])


@pytest.mark.parametrize("addr,length", [
    (RAM_BASE + RAM - 2, 4),            # runs off the end
    (RAM_BASE - 4, 8),                  # starts before RAM
    (0, 16),                            # another VM / nothing
    (0xFFFFFFFFFFFFFFF0, 0x20),         # wraps past 2**64
    (RAM_BASE, 0xFFFFFFFF),             # longer than RAM
])
def test_buffer_outside_ram(bench, addr, length):
    bad_chain(bench, [(addr, length, WRITE, 0)])


def test_readable_after_writable(bench):
    bad_chain(bench, [(bench.data, 4, WRITE | NEXT, 1), (bench.data, 4, 0, 0)])


def test_indirect_with_next(bench):
    table = bench.ram.alloc(16)
    bench.rx.write_desc(0, bench.data, 4, WRITE, table=table)
    bad_chain(bench, [(table, 16, INDIRECT | NEXT, 1), (bench.data, 4, WRITE, 0)])


@pytest.mark.parametrize("length", [0, 8, 24])
def test_indirect_table_length(bench, length):
    table = bench.ram.alloc(64)
    bad_chain(bench, [(table, length, INDIRECT, 0)])


def test_indirect_table_outside_ram(bench):
    bad_chain(bench, [(RAM_BASE + RAM - 16, 32, INDIRECT, 0)])


def test_indirect_inside_indirect(bench):
    table = bench.ram.alloc(32)
    inner = bench.ram.alloc(16)
    bench.rx.write_desc(0, inner, 16, INDIRECT, table=table)
    bad_chain(bench, [(table, 16, INDIRECT, 0)])


def test_indirect_loop_bounded_by_table_size(bench):
    table = bench.ram.alloc(32)
    bench.rx.write_desc(0, bench.data, 4, NEXT, 1, table=table)
    bench.rx.write_desc(1, bench.data, 4, NEXT, 0, table=table)
    bad_chain(bench, [(table, 32, INDIRECT, 0)])


def test_indirect_next_out_of_table(bench):
    table = bench.ram.alloc(32)
    bench.rx.write_desc(0, bench.data, 4, NEXT, 2, table=table)
    bad_chain(bench, [(table, 32, INDIRECT, 0)])


def test_indirect_without_feature():
    b = VirtioBench(RecordingDevice())
    b.rx, = b.driver.init([0], drop=bit(c.F_RING_INDIRECT_DESC))
    b.data = b.ram.alloc(64)
    table = b.ram.alloc(16)
    b.rx.write_desc(0, b.data, 4, WRITE, table=table)
    bad_chain(b, [(table, 16, INDIRECT, 0)])
    b.check_guards()


def test_chain_longer_than_4_gib():
    b = VirtioBench(RecordingDevice(), ram_size=2 << 20)
    b.rx, = b.driver.init([0])
    entries = 4097                                    # 4097 x 1 MiB > 2**32 - 1
    table = b.ram.alloc(16 * entries)
    for i in range(entries):
        b.rx.write_desc(i, RAM_BASE, 1 << 20, WRITE | (NEXT if i < entries - 1 else 0), i + 1,
                        table=table)
    bad_chain(b, [(table, 16 * entries, INDIRECT, 0)])


def test_linux_shaped_indirect_tables_are_read_in_columns_with_the_walks_result(monkeypatch):
    """``linear_table`` (the indirect table as Linux makes it, read a column at a time) gives
    the bytes the entry-by-entry walk gives, buffers adjacent in RAM joined into one view,
    and declines every other table: random tables of that shape, their buffers scattered
    or in runs (like Linux's pages), with one field spoiled (a flag, a next, a length, an
    address)."""
    rng = random.Random(14)
    buf = bytearray(rng.randbytes(1 << 16))
    memory = GuestMemory(Region(buf), 0x10000)
    table = DescriptorTable(memory, 0x10000, 64, generation=1)

    def walks(head):
        fast = table.walk(head, True), table.walked
        with monkeypatch.context() as m:
            m.setattr(chain, "linear_table", lambda *args: None)
            slow = table.walk(head, True), table.walked
        return fast, slow

    taken = joined = 0
    for case in range(400):
        n = rng.randint(1, 40)
        readable = rng.randint(0, n)
        entries, addr = [], 0
        for i in range(n):
            length = rng.randint(1, 0x200)
            if not entries or rng.random() < 0.3:
                addr = 0x10000 + rng.randrange(0x1000, 0xE000)
            entries.append([addr, length, (WRITE if i >= readable else 0)
                            | (NEXT if i < n - 1 else 0), i + 1])
            addr += length
        spoil = rng.randrange(6) if case % 4 else None
        e = entries[rng.randrange(n)]
        if spoil == 0:
            e[2] ^= rng.choice([NEXT, WRITE, INDIRECT, 8])
        elif spoil == 1:
            e[3] = rng.randrange(64)
        elif spoil == 2:
            e[1] = rng.choice([0, 0x10000, 0xFFFFFFFF])
        elif spoil == 3:
            e[0] = rng.choice([0, 0xFFFF, 0x20000 - e[1] + 1, 2**64 - 16])
        for i, (addr, length, flags, nxt) in enumerate(entries):
            struct.pack_into("<QIHH", buf, 0x1000 + 16 * i, addr, length, flags, nxt)
        struct.pack_into("<QIHH", buf, 0, 0x11000, 16 * n, INDIRECT, 0)
        (fast, walked), (slow, slow_walked) = walks(0)
        assert walked == slow_walked and type(fast) is type(slow)
        if isinstance(slow, str):
            assert fast == slow
            continue
        taken += spoil is None
        assert (fast.readable_len, fast.writable_len) == (slow.readable_len, slow.writable_len)
        for a, b in ((fast.readable, slow.readable), (fast.writable, slow.writable)):
            assert b"".join(a) == b"".join(b)
            if a:                                     # views of the guest's RAM, not copies
                a[0][:1] = b"\xff"
                assert b[0][:1] == b"\xff"
        joined += len(fast.readable) + len(fast.writable) < n
    assert taken == 100 and joined > 50
    entries = [(0x11000, 8, NEXT, 1), (0x12000, 8, WRITE, 7)]
    for i, e in enumerate(entries):
        struct.pack_into("<QIHH", buf, 0x1000 + 16 * i, *e)
    assert chain.linear_table(0, memory.view(0x11000, 32), 2, memory.data, memory.base,
                              memory.end, 1) is not None


# -- ring corruption: DEVICE_NEEDS_RESET -----------------------------------------------------------

def test_avail_index_too_far_ahead(bench):
    b = bench
    b.rx.set_avail_idx(9)
    b.rx.notify()
    assert needs_reset(b) and b.device.chains == [] and used(b) == []
    assert b.driver.interrupt_status() & c.INT_CONFIG_CHANGE


def test_head_out_of_range(bench):
    b = bench
    b.rx.make_available(8)
    b.rx.notify()
    assert needs_reset(b) and b.device.chains == [] and used(b) == []


def test_head_offered_twice_while_in_flight(bench):
    b = bench
    b.device.hold = True
    b.rx.write_desc(0, b.data, 4, WRITE)
    b.rx.make_available(0)
    b.rx.make_available(0)
    b.rx.notify()
    assert len(b.device.chains) == 1 and needs_reset(b)


def test_head_reused_after_completion_is_fine(bench):
    b = bench
    for _ in range(3):
        offer(b, [(b.data, 4, WRITE, 0)])
    assert len(b.device.chains) == 3 and used(b) == [(0, 4)] * 3 and not needs_reset(b)


def test_a_chain_returned_twice_or_to_another_queue_is_refused(bench):
    b = bench
    b.device.hold = True
    b.rx.post(writable=[4])
    b.rx.notify()
    (_, chain), = b.device.held
    rxq, txq = b.device.queues
    assert txq.add_used(chain, 4) is False                  # not a chain of this queue
    assert rxq.add_used(chain, 4) is True
    assert rxq.add_used(chain, 4) is False                  # returned already
    assert used(b) == [(chain.head, 4)] and (rxq.refused, txq.refused) == (1, 1)


def test_refused_chains_are_logged_once_then_rate_limited_and_counted(bench, caplog):
    b = bench
    b.device.hold = True
    b.rx.post(writable=[4])
    b.rx.notify()
    (_, chain), = b.device.held
    queue = b.device.queues[0]
    assert queue.add_used(chain, 4)
    for _ in range(500):
        assert queue.add_used(chain, 4) is False
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and "not in flight (returned already" in loud[0].getMessage()
    assert queue.describe()["refused"] == 500 and queue.log_lines_suppressed == 499


@pytest.mark.parametrize("size", [8, 4])
@pytest.mark.parametrize("how", ["device-reset", "queue-reset", "queue-ready"])
def test_a_chain_held_across_a_reset_never_completes_the_new_chain_of_its_head(how, size,
                                                                               caplog):
    """A device that kept a chain across a reset of its queue (forgot to drop it in its
    hook) and returns it once the queue is set up again: refused, since the chain is of an
    older generation, whatever chain now has its head (size 8: a new one, which would be
    completed with the stale length; size 4: none, the head is past the ring)."""
    b = VirtioBench(RecordingDevice(queue_sizes=(8,), hold=True))
    q, = b.driver.init([0])
    for _ in range(8):
        q.post(writable=[4])
    q.notify()
    stale = b.device.held[-1][1]
    assert stale.head == 7
    queue = b.device.queues[0]
    if how == "device-reset":
        b.driver.reset()
        q, = b.driver.init([0], size=size)
    elif how == "queue-reset":
        b.driver.write(c.REG_QUEUE_SEL, 0)
        b.driver.write(c.REG_QUEUE_RESET, 1)
        q = b.driver.setup_queue(0, size)
    else:                          # disabled: refused at once; then reset and set up
        b.driver.write(c.REG_QUEUE_SEL, 0)
        b.driver.write(c.REG_QUEUE_READY, 0)
        assert queue.add_used(stale, 3) is False and q.used_idx() == 0
        b.driver.write(c.REG_QUEUE_RESET, 1)
        q = b.driver.setup_queue(0, size)
    for _ in range(size):
        q.post(writable=[4])
    q.notify()
    assert sorted(ch.head for _, ch in b.device.held) == list(range(size))
    assert queue.add_used(stale, 3) is False
    assert q.get_used(read_data=False) == []
    assert queue.refused == (2 if how == "queue-ready" else 1)
    assert "popped before a reset" in caplog.text
    for _, chain in b.device.held:
        assert queue.add_used(chain, 1)
    assert sorted(u.head for u in q.get_used(read_data=False)) == list(range(size))
    assert b.driver.status & c.STATUS_DEVICE_NEEDS_RESET == 0


# -- notification suppression ----------------------------------------------------------------------

def test_event_idx_used_event_suppresses_interrupts(bench):
    b = bench
    b.rx.set_used_event(5)                   # interrupt only when used idx passes 5
    for n in range(1, 8):
        b.rx.post(writable=[1])
        b.rx.notify()
        want = [b.transport.intid] if n == 6 else []
        assert b.irq.take() == want, n
        b.driver.ack_interrupt()
        b.rx.free = list(range(8))


def test_event_idx_avail_event_tracks_consumption(bench):
    b = bench
    b.rx.post(writable=[1])
    b.rx.post(writable=[1])
    b.rx.notify()
    assert b.rx.avail_event() == 2
    old = b.rx.avail_idx
    b.rx.post(writable=[1])
    assert b.rx.needs_notify(old)


def test_no_interrupt_flag_without_event_idx():
    b = VirtioBench(RecordingDevice())
    rx, = b.driver.init([0], drop=bit(c.F_RING_EVENT_IDX))
    rx.set_avail_flags(c.AVAIL_F_NO_INTERRUPT)
    rx.post(writable=[1])
    rx.notify()
    assert b.irq.take() == [] and b.driver.interrupt_status() == 0
    rx.set_avail_flags(0)
    rx.post(writable=[1])
    rx.notify()
    assert b.irq.take() == [b.transport.intid]


def test_device_side_notification_control():
    b = VirtioBench(RecordingDevice())
    rx, = b.driver.init([0], drop=bit(c.F_RING_EVENT_IDX))
    queue = b.device.queues[0]
    assert queue.set_notification(False) is False
    assert rx.used_flags() == c.USED_F_NO_NOTIFY
    b.device.hold = True
    rx.post(writable=[1])
    assert queue.set_notification(True) is True and rx.used_flags() == 0


def test_queue_describe_is_json_able(bench):
    import json
    json.dumps(bench.device.describe())
    assert bench.device.describe()["queues"][0]["ready"] is True


def test_event_idx_a_turn_that_takes_the_last_buffer_still_asks_for_a_notify(bench):
    """A turn's budget (a queue's worth of chains) ran out just as the ring emptied: the
    device must still set avail_event, or the driver adds buffers without notifying and
    the queue stalls (seen: VM 0's console with posted QueueNotify, where one turn took
    a whole ring of receive buffers)."""
    b = bench
    for _ in range(b.rx.size):
        b.rx.post(writable=[1])
    b.rx.notify()
    assert len(b.device.chains) == b.rx.size         # the whole turn, nothing left
    assert b.rx.avail_event() == b.rx.size
    b.rx.free = list(range(b.rx.size))
    old = b.rx.avail_idx
    b.rx.post(writable=[1])
    assert b.rx.needs_notify(old)
