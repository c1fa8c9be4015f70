"""The virtio-mmio transport, register by register, through handle_mmio_trap."""

import pytest

from avatar_hw.testing.virtio import RecordingDevice, VirtioBench
from avatar_hw.virtio import constants as c
from avatar_hw.virtio import transport
from avatar_hw.virtio.constants import bit
from avatar_hw.virtio.device import TRANSPORT_FEATURES

DEVICE_FEATURE = bit(3)


@pytest.fixture
def bench():
    config = bytes(range(1, 13))
    return VirtioBench(RecordingDevice(features=DEVICE_FEATURE, config=config))


@pytest.fixture
def legacy():
    return VirtioBench(RecordingDevice(features=DEVICE_FEATURE), legacy=True)


def ready(bench, **kw):
    return bench.driver.init([0, 1], **kw)


# -- identity -----------------------------------------------------------------------------------

def test_identity_registers(bench):
    d = bench.driver
    assert d.read(c.REG_MAGIC_VALUE) == 0x74726976
    assert d.read(c.REG_VERSION) == 2
    assert d.read(c.REG_DEVICE_ID) == RecordingDevice.device_id
    assert d.read(c.REG_VENDOR_ID) == c.VENDOR_ID


def test_device_features_by_select(bench):
    d = bench.driver
    offered = DEVICE_FEATURE | TRANSPORT_FEATURES
    assert d.device_features() == offered
    d.write(c.REG_DEVICE_FEATURES_SEL, 2)
    assert d.read(c.REG_DEVICE_FEATURES) == 0


def test_identity_registers_are_read_only(bench):
    d = bench.driver
    d.write(c.REG_DEVICE_ID, 9)
    d.write(c.REG_MAGIC_VALUE, 0)
    assert d.read(c.REG_DEVICE_ID) == RecordingDevice.device_id
    assert d.read(c.REG_MAGIC_VALUE) == c.MMIO_MAGIC


@pytest.mark.parametrize("reg", [c.REG_DEVICE_FEATURES_SEL, c.REG_DRIVER_FEATURES,
                                 c.REG_QUEUE_SEL, c.REG_QUEUE_NUM, c.REG_QUEUE_NOTIFY,
                                 c.REG_INTERRUPT_ACK, c.REG_QUEUE_DESC_LOW, c.REG_SHM_SEL])
def test_write_only_registers_read_zero(bench, reg):
    bench.driver.write(c.REG_QUEUE_SEL, 0)
    bench.driver.write(c.REG_DEVICE_FEATURES_SEL, 1)
    assert bench.driver.read(reg) == 0


@pytest.mark.parametrize("size", [1, 2])
def test_registers_below_0x100_take_only_32_bit(bench, size):
    d = bench.driver
    assert d.read(c.REG_MAGIC_VALUE, size) == 0
    d.write(c.REG_STATUS, c.STATUS_ACKNOWLEDGE, size)
    assert d.status == 0


def test_a_64_bit_register_access_is_two_32_bit_ones_as_in_qemu(bench):
    """QEMU's memory core splits a 64-bit access to virtio-mmio into two 32-bit ones (the
    differential in test_qemu_differential_registers compares the values)."""
    d = bench.driver
    assert d.read(c.REG_MAGIC_VALUE, 8) == c.MMIO_MAGIC | 2 << 32
    assert d.read(c.REG_VERSION, 8) == 2 | RecordingDevice.device_id << 32
    assert d.read(c.REG_CONFIG_GENERATION, 8) == 0x04030201 << 32
    d.write(c.REG_STATUS - 4, c.STATUS_ACKNOWLEDGE << 32, 8)     # 0x6c: nothing; 0x70
    assert d.status == c.STATUS_ACKNOWLEDGE
    d.write(c.REG_STATUS + 2, c.STATUS_DRIVER, 8)                 # unaligned halves
    assert d.status == c.STATUS_ACKNOWLEDGE


def test_unaligned_register_access_is_refused(bench):
    assert bench.driver.read(c.REG_MAGIC_VALUE + 2) == 0
    bench.driver.write(c.REG_STATUS + 1, 1)
    assert bench.driver.status == 0


def test_unknown_register_reads_zero(bench):
    assert bench.driver.read(0x0F8) == 0
    bench.driver.write(0x0F8, 1)


# -- status state machine --------------------------------------------------------------------------

def test_normal_initialisation_sequence(bench):
    d = bench.driver
    ok, features = d.negotiate()
    assert ok and d.status == c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK
    d.setup_queue(0)
    d.driver_ok()
    assert d.status == 0x0F
    assert bench.device.activations == 1
    assert bench.transport.negotiated_features == features


@pytest.mark.parametrize("bit_, needs", [
    (c.STATUS_DRIVER, 0),
    (c.STATUS_FEATURES_OK, c.STATUS_ACKNOWLEDGE),
    (c.STATUS_DRIVER_OK, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER),
])
def test_status_bit_without_prerequisites_is_ignored(bench, bit_, needs):
    d = bench.driver
    d.write_driver_features(TRANSPORT_FEATURES)
    if needs:
        d.write(c.REG_STATUS, needs)
    d.write(c.REG_STATUS, needs | bit_)
    assert d.status == needs


def test_several_bits_in_one_write_apply_in_order(bench):
    bench.driver.write(c.REG_STATUS, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    assert bench.driver.status == 3


def test_features_ok_refused_for_features_not_offered(bench):
    ok, _ = bench.driver.negotiate(TRANSPORT_FEATURES | bit(5))
    assert not ok
    assert not bench.driver.status & c.STATUS_FEATURES_OK
    assert bench.transport.negotiated_features == 0


def test_features_ok_refused_without_version_1(bench):
    ok, _ = bench.driver.negotiate(DEVICE_FEATURE)
    assert not ok
    # ... and then DRIVER_OK cannot be set either.
    assert bench.driver.driver_ok() & c.STATUS_DRIVER_OK == 0


def test_features_ok_accepts_a_subset(bench):
    ok, _ = bench.driver.negotiate(bit(c.F_VERSION_1))
    assert ok and bench.transport.negotiated_features == bit(c.F_VERSION_1)


def test_driver_features_frozen_after_features_ok(bench):
    d = bench.driver
    d.negotiate(bit(c.F_VERSION_1))
    d.write_driver_features(TRANSPORT_FEATURES)
    assert bench.transport.driver_features == bit(c.F_VERSION_1)


def test_driver_features_select_beyond_1_ignored(bench):
    d = bench.driver
    d.write(c.REG_DRIVER_FEATURES_SEL, 2)
    d.write(c.REG_DRIVER_FEATURES, 0xFFFFFFFF)
    assert bench.transport.driver_features == 0


def test_clearing_status_bits_without_reset_is_ignored(bench):
    ready(bench)
    bench.driver.write(c.REG_STATUS, c.STATUS_ACKNOWLEDGE)
    assert bench.driver.status == 0x0F


def test_failed_can_be_set_any_time(bench):
    bench.driver.write(c.REG_STATUS, c.STATUS_ACKNOWLEDGE)
    bench.driver.write(c.REG_STATUS, c.STATUS_ACKNOWLEDGE | c.STATUS_FAILED)
    assert bench.driver.status == c.STATUS_ACKNOWLEDGE | c.STATUS_FAILED


def test_driver_cannot_set_needs_reset(bench):
    bench.driver.write(c.REG_STATUS, c.STATUS_ACKNOWLEDGE | c.STATUS_DEVICE_NEEDS_RESET)
    assert bench.driver.status == c.STATUS_ACKNOWLEDGE


def test_status_zero_resets_everything(bench):
    rx, _ = ready(bench)
    bench.device.hold = True
    rx.post(writable=[8])
    rx.notify()
    resets = bench.device.resets
    bench.driver.write(c.REG_STATUS, 0)
    t = bench.transport
    assert t.status == 0 and t.driver_features == 0 and t.interrupt_status == 0
    assert not any(q.ready for q in bench.device.queues)
    assert bench.device.resets == resets + 1 and bench.device.held == []
    bench.driver.write(c.REG_QUEUE_SEL, 0)
    assert bench.driver.read(c.REG_QUEUE_READY) == 0


def test_a_reset_keeps_the_feature_selectors(bench):
    """As QEMU's virtio-mmio (test_qemu_differential_registers.py compares them)."""
    d = bench.driver
    d.write(c.REG_DEVICE_FEATURES_SEL, 1)
    d.write(c.REG_DRIVER_FEATURES_SEL, 1)
    d.write(c.REG_STATUS, 0)
    assert d.read(c.REG_DEVICE_FEATURES) == TRANSPORT_FEATURES >> 32
    d.write(c.REG_DRIVER_FEATURES, 1)
    assert bench.transport.driver_features == bit(c.F_VERSION_1)


def test_needs_reset_sets_bit_and_config_interrupt(bench):
    ready(bench)
    bench.irq.take()
    bench.device.fail("test")
    assert bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
    assert bench.driver.interrupt_status() == c.INT_CONFIG_CHANGE
    assert bench.irq.take() == [bench.transport.intid]
    # notifications are ignored while the device needs a reset; a reset clears it
    rx = bench.driver.queues[0]
    rx.post(writable=[4])
    rx.notify()
    assert bench.device.chains == []
    bench.driver.write(c.REG_STATUS, 0)
    assert bench.driver.status == 0


def test_needs_reset_before_driver_ok_has_no_interrupt(bench):
    bench.device.fail("test")
    assert bench.driver.status == c.STATUS_DEVICE_NEEDS_RESET
    assert bench.irq.take() == [] and bench.driver.interrupt_status() == 0


# -- queue registers ------------------------------------------------------------------------------

def test_queue_num_max_per_queue(bench):
    d = bench.driver
    for index, expected in ((0, 8), (1, 8), (2, 0), (0xFFFF, 0)):
        d.write(c.REG_QUEUE_SEL, index)
        assert d.read(c.REG_QUEUE_NUM_MAX) == expected


def test_queue_registers_frozen_while_ready(bench):
    d = bench.driver
    d.negotiate()
    q = d.setup_queue(0, 4)
    d.write(c.REG_QUEUE_NUM, 8)
    d.write(c.REG_QUEUE_DESC_LOW, 0x1000)
    queue = bench.device.queues[0]
    assert queue.size == 4 and queue.desc_addr == q.desc


def test_queue_registers_frozen_after_driver_ok(bench):
    d = bench.driver
    d.init([0])
    d.write(c.REG_QUEUE_SEL, 1)
    d.write(c.REG_QUEUE_NUM, 4)
    d.write(c.REG_QUEUE_DESC_LOW, 0x40001000)
    d.write(c.REG_QUEUE_READY, 1)
    queue = bench.device.queues[1]
    assert queue.size == 8 and queue.desc_addr == 0 and not queue.ready


def test_queue_ready_write_zero_disables(bench):
    d = bench.driver
    d.negotiate()
    d.setup_queue(0)
    assert d.read(c.REG_QUEUE_READY) == 1
    d.write(c.REG_QUEUE_READY, 0)
    assert d.read(c.REG_QUEUE_READY) == 0 and bench.device.queue_resets == 1


def test_queue_registers_of_missing_queue_ignored(bench):
    d = bench.driver
    d.write(c.REG_QUEUE_SEL, 5)
    d.write(c.REG_QUEUE_NUM, 4)
    d.write(c.REG_QUEUE_READY, 1)
    assert d.read(c.REG_QUEUE_READY) == 0


@pytest.mark.parametrize("bad", ["size3", "size16", "size0", "desc", "avail", "used", "outside"])
def test_bad_queue_layout_leaves_queue_off_and_needs_reset(bench, bad):
    d = bench.driver
    d.negotiate()
    d.write(c.REG_QUEUE_SEL, 0)
    size = {"size3": 3, "size16": 16, "size0": 0}.get(bad, 8)
    addrs = {c.REG_QUEUE_DESC_LOW: 0x40000000, c.REG_QUEUE_DRIVER_LOW: 0x40001000,
             c.REG_QUEUE_DEVICE_LOW: 0x40002000}
    if bad == "desc":
        addrs[c.REG_QUEUE_DESC_LOW] += 8
    elif bad == "avail":
        addrs[c.REG_QUEUE_DRIVER_LOW] += 1
    elif bad == "used":
        addrs[c.REG_QUEUE_DEVICE_LOW] += 2
    elif bad == "outside":
        addrs[c.REG_QUEUE_DEVICE_LOW] = 0x40000000 + (1 << 20) - 8
    d.write(c.REG_QUEUE_NUM, size)
    for reg, value in addrs.items():
        d.write(reg, value)
        d.write(reg + 4, 0)
    d.write(c.REG_QUEUE_READY, 1)
    assert d.read(c.REG_QUEUE_READY) == 0
    assert d.status & c.STATUS_DEVICE_NEEDS_RESET


def test_queue_high_address_word_outside_ram(bench):
    d = bench.driver
    d.negotiate()
    d.write(c.REG_QUEUE_SEL, 0)
    d.write(c.REG_QUEUE_DESC_LOW, 0x40000000)
    d.write(c.REG_QUEUE_DESC_HIGH, 1)
    d.write(c.REG_QUEUE_READY, 1)
    assert d.read(c.REG_QUEUE_READY) == 0


def test_buffers_made_available_before_driver_ok_are_served_at_driver_ok(bench):
    """2.1.2: nothing is consumed before DRIVER_OK, so the notify is ignored; 3.1.1 step 7
    lets the driver populate its queues before DRIVER_OK, so DRIVER_OK serves every ready
    queue (as QEMU's ioeventfd start kicks them; test_qemu_differential_registers)."""
    d = bench.driver
    d.negotiate()
    q = d.setup_queue(0)
    q.post(writable=[4])
    q.notify()
    assert bench.device.notified == [] and q.used_idx() == 0
    # Linux's virtio_balloon does this with its statistics queue: not a guest error to warn
    # about on every boot (it is logged at debug level).
    assert bench.transport.context.guest_errors == 0
    d.driver_ok()
    assert bench.device.notified == [0] and [u.length for u in q.get_used()] == [4]
    assert d.interrupt_status() & c.INT_USED_BUFFER


def test_queue_notify_value_is_the_queue_index(bench):
    """Without VIRTIO_F_NOTIFICATION_DATA the value written is the queue index (4.2.2):
    0x10000 is no queue (it used to be taken as queue 0)."""
    d = bench.driver
    q, _ = d.init([0, 1])
    q.post(writable=[4])
    d.write(c.REG_QUEUE_NOTIFY, 0x10000)
    assert bench.device.notified == [0, 1]             # DRIVER_OK's; nothing since
    q.notify()
    assert bench.device.notified == [0, 1, 0]


def test_queue_notify_of_missing_or_unready_queue_is_ignored(bench):
    d = bench.driver
    d.init([0])
    d.write(c.REG_QUEUE_NOTIFY, 1)
    d.write(c.REG_QUEUE_NOTIFY, 7)
    assert bench.device.notified == [0]                # DRIVER_OK's only


# -- idle traps (MmioTransport's docstring; avatar_hw.pace paces a VM making very many) ----------

def idle(bench, access, *args):
    """The idle traps ``access(*args)`` counted."""
    before = bench.transport.context.idle_traps
    access(*args)
    return bench.transport.context.idle_traps - before


def test_idle_traps_are_the_accesses_that_complete_nothing(bench):
    d = bench.driver
    bench.device.hold = True                   # the request waits, as a receive buffer does
    d.negotiate()
    selected = bench.transport.device_features_sel
    assert idle(bench, d.write, c.REG_DEVICE_FEATURES_SEL, 1 - selected) == 0   # setting up
    assert idle(bench, d.write, c.REG_DEVICE_FEATURES_SEL, 1 - selected) == 1   # again
    q = d.setup_queue(0)
    q.post(writable=[4])
    assert idle(bench, q.notify) == 1          # before DRIVER_OK: served at DRIVER_OK
    d.driver_ok()
    q.post(writable=[4])
    assert idle(bench, q.notify) == 0          # a new entry
    assert idle(bench, q.notify) == 1          # nothing new since: the held one waits on
    assert idle(bench, q.notify) == 1
    assert d.interrupt_status() == 0
    assert idle(bench, d.write, c.REG_INTERRUPT_ACK, c.INT_USED_BUFFER) == 1
    for reg in (c.REG_QUEUE_SEL, c.REG_DEVICE_FEATURES_SEL, c.REG_DRIVER_FEATURES_SEL,
                c.REG_SHM_SEL):
        assert [idle(bench, d.write, reg, value) for value in (1, 0)] == [1, 1], hex(reg)
    assert idle(bench, d.write, c.REG_STATUS, d.status) == 1
    d.write(c.REG_QUEUE_SEL, 1)                # set up, not ready
    assert idle(bench, d.write, c.REG_QUEUE_READY, 0) == 1
    assert idle(bench, d.write, c.REG_QUEUE_RESET, 0) == 1
    for reg in (c.REG_SHM_LEN_LOW, c.REG_SHM_BASE_HIGH, c.REG_QUEUE_RESET):
        assert idle(bench, d.read, reg) == 1, hex(reg)                  # never mirrored
    assert idle(bench, d.read, c.REG_MAGIC_VALUE, 8) == 1               # one trap, two halves
    for reg in (c.REG_INTERRUPT_STATUS, c.REG_STATUS, c.REG_QUEUE_READY):
        assert idle(bench, d.read, reg) == 0, hex(reg)                  # shadowed: not the guest's
    assert bench.transport.context.guest_errors == 0
    assert bench.device.info()["idle_traps"] == bench.transport.context.idle_traps

    bench.device.hold = False                  # what does something is not idle
    q.post(writable=[4])
    assert idle(bench, q.notify) == 0
    assert d.interrupt_status() == c.INT_USED_BUFFER
    assert idle(bench, d.write, c.REG_INTERRUPT_ACK, c.INT_USED_BUFFER) == 0
    assert idle(bench, d.write, c.REG_STATUS, d.status | c.STATUS_FAILED) == 0
    assert idle(bench, d.write, c.REG_STATUS, 0) == 0                     # a reset


def test_a_notify_of_an_available_index_moved_past_a_queue_s_worth_is_idle(bench):
    """A receive queue with nothing to receive is not popped, so the device would never
    see a guest move its available index by one at each notify, past all it offered."""
    q, _ = ready(bench)
    bench.device.queue_notify = lambda index: None          # pops nothing, as such a queue
    for _ in range(q.size):
        q.set_avail_idx(q.avail_idx + 1)
        assert idle(bench, q.notify) == 0
    for _ in range(3):
        q.set_avail_idx(q.avail_idx + 1)
        assert idle(bench, q.notify) == 1


def test_the_setups_of_a_guest_looping_reset_and_setup_are_idle(bench, monkeypatch):
    """Up to RESETS_PER_SECOND resets within a second a setup is the driver's business;
    past them, each write of a setup before DRIVER_OK is idle, until a window of a second
    ends with no more than that."""
    clock = [10 * transport._SECOND_NS]
    monkeypatch.setattr(transport, "monotonic_ns", lambda: clock[0])
    d = bench.driver
    queues = []

    def setup():                                # one reset (negotiate's) and a setup
        d.ram.reset_alloc()
        queues[:] = d.init([0, 1])

    writes = []
    counting = bench.driver.write
    monkeypatch.setattr(d, "write", lambda *a, **k: (writes.append(a), counting(*a, **k))[1])
    setup()                                     # each setup after it finds the selectors
    once = idle(bench, setup)                   # where the one before left them
    for _ in range(transport.RESETS_PER_SECOND - 2):
        assert idle(bench, setup) == once
    writes.clear()
    looping = idle(bench, setup)
    before_driver_ok = len(writes) - 1          # the DRIVER_OK write itself comes before it
    assert looping == once + before_driver_ok
    assert d.status & c.STATUS_DRIVER_OK        # set up: its I/O is not idle
    queues[0].post(writable=[4])
    assert idle(bench, queues[0].notify) == 0
    clock[0] += transport._SECOND_NS            # a new window, one reset in it
    assert idle(bench, setup) == once
    assert bench.transport.context.guest_errors == 0


def test_a_guest_looping_queue_reset_and_setup_after_driver_ok_is_idle(bench, monkeypatch):
    """QueueReset, the ring addresses and QueueReady again, in a loop after DRIVER_OK:
    11 000 accesses in 3 s and never paced. Past RESETS_PER_SECOND queue resets within a
    second each write of that setup is idle, as a device's reset loop before DRIVER_OK."""
    clock = [10 * transport._SECOND_NS]
    monkeypatch.setattr(transport, "monotonic_ns", lambda: clock[0])
    ready(bench)                                # its reset is in this window
    clock[0] += transport._SECOND_NS
    d = bench.driver

    def reset_and_set_up():
        d.write(c.REG_QUEUE_SEL, 0)             # idle after DRIVER_OK anyway
        d.write(c.REG_QUEUE_RESET, 1)
        d.ram.reset_alloc()
        d.setup_queue(0, 4)
    once = idle(bench, reset_and_set_up)
    for _ in range(transport.RESETS_PER_SECOND - 1):
        assert idle(bench, reset_and_set_up) == once
    assert idle(bench, reset_and_set_up) > once + 6       # QueueReset, addresses, ready
    clock[0] += transport._SECOND_NS
    assert idle(bench, reset_and_set_up) == once
    assert bench.transport.context.guest_errors == 0


# -- interrupts -----------------------------------------------------------------------------------

def test_interrupt_status_and_ack(bench):
    rx, _ = ready(bench)
    rx.post(writable=[4])
    rx.notify()
    assert bench.driver.interrupt_status() == c.INT_USED_BUFFER
    assert bench.irq.take() == [bench.transport.intid]
    # a second completion while the bit is still set raises no new SPI
    rx.get_used()
    rx.post(writable=[4])
    rx.notify()
    assert bench.irq.take() == []
    bench.driver.ack_interrupt(c.INT_USED_BUFFER)
    assert bench.driver.interrupt_status() == 0
    rx.get_used()
    rx.post(writable=[4])
    rx.notify()
    assert bench.irq.take() == [bench.transport.intid]


def test_interrupt_ack_clears_only_given_bits(bench):
    ready(bench)
    bench.device.signal_config_change()
    bench.transport.signal_used(bench.device.queues[0])  # nothing used: no bit
    assert bench.driver.interrupt_status() == c.INT_CONFIG_CHANGE
    bench.driver.ack_interrupt(c.INT_USED_BUFFER)
    assert bench.driver.interrupt_status() == c.INT_CONFIG_CHANGE


# -- configuration space ---------------------------------------------------------------------------

@pytest.mark.parametrize("offset,size,expected", [
    (0, 1, 0x01), (1, 1, 0x02), (2, 2, 0x0403), (4, 4, 0x08070605), (8, 4, 0x0C0B0A09)])
def test_config_reads(bench, offset, size, expected):
    assert bench.driver.read_config(offset, size) == expected


@pytest.mark.parametrize("offset,size,expected", [
    (1, 2, 0x0302), (2, 4, 0x06050403), (0, 8, 0x0807060504030201),
    (12, 1, 0xFF), (10, 4, 0xFFFF0C0B), (11, 2, 0xFF0C), (0x400, 4, 0xFFFFFFFF),
    (8, 8, 0xFFFFFFFF_0C0B0A09), (9, 4, 0xFF0C0B0A)])
def test_config_reads_of_any_width_and_outside_the_config_as_qemu(bench, offset, size,
                                                                  expected):
    """Misaligned and 64-bit reads as QEMU answers them (4.2.2.2 leaves them undefined): in
    pieces aligned to their size, at most 4 bytes (``transport.pieces``); a piece beyond the
    config reads all ones (the 12-byte config here ends at 12)."""
    assert bench.driver.read_config(offset, size) == expected


def test_config_64_bit_field_as_two_halves(bench):
    bench.device.update_config(0, (0x1122334455667788).to_bytes(8, "little"))
    d = bench.driver
    assert d.read_config(4) << 32 | d.read_config(0) == 0x1122334455667788


def test_config_write_goes_to_the_device_hook(bench):
    bench.driver.write_config(4, 0xAABB, 2)
    assert bench.device.config_writes == [(4, b"\xbb\xaa")]
    bench.driver.write_config(3, 0xAABB, 2)       # misaligned: as QEMU, a byte at a time
    bench.driver.write_config(11, 0xAABB, 2)      # the byte past the end is ignored
    bench.driver.write_config(0, 0x11223344_55667788, 8)   # two 32-bit halves
    assert bench.device.config_writes == [(4, b"\xbb\xaa"), (3, b"\xbb"), (4, b"\xaa"),
                                          (11, b"\xbb"), (0, b"\x88\x77\x66\x55"),
                                          (4, b"\x44\x33\x22\x11")]


def test_config_generation_changes_with_config(bench):
    d = bench.driver
    ready(bench)
    gen = d.read(c.REG_CONFIG_GENERATION)
    bench.device.update_config(0, b"\x99")
    assert d.read(c.REG_CONFIG_GENERATION) != gen
    assert d.interrupt_status() & c.INT_CONFIG_CHANGE
    gen = d.read(c.REG_CONFIG_GENERATION)
    d.write_config(0, 0x42, 1)                      # driver write that changes bytes
    assert d.read(c.REG_CONFIG_GENERATION) != gen
    gen = d.read(c.REG_CONFIG_GENERATION)
    bench.device.update_config(0, b"\x42")          # no change: same generation
    assert d.read(c.REG_CONFIG_GENERATION) == gen


# -- shared memory, queue reset --------------------------------------------------------------------

def test_no_shared_memory_regions(bench):
    d = bench.driver
    for sel in (0, 1, 255):
        d.write(c.REG_SHM_SEL, sel)
        assert d.read(c.REG_SHM_LEN_LOW) == 0xFFFFFFFF
        assert d.read(c.REG_SHM_LEN_HIGH) == 0xFFFFFFFF
        assert d.read(c.REG_SHM_BASE_LOW) == 0 and d.read(c.REG_SHM_BASE_HIGH) == 0


def test_queue_reset_with_ring_reset(bench):
    rx, tx = ready(bench)
    d = bench.driver
    bench.device.hold = True
    rx.post(writable=[4])
    rx.notify()
    assert len(bench.device.held) == 1
    d.write(c.REG_QUEUE_SEL, 0)
    assert d.read(c.REG_QUEUE_RESET) == 0
    d.write(c.REG_QUEUE_RESET, 1)
    # reset complete: 0 in both QueueReset and QueueReady (VirtIO 1.2 4.2.2.2)
    assert d.read(c.REG_QUEUE_RESET) == 0 and d.read(c.REG_QUEUE_READY) == 0
    assert bench.device.held == []
    # after DRIVER_OK, a reset queue may be programmed and enabled again
    bench.device.hold = False
    q = d.setup_queue(0, 4)
    assert d.read(c.REG_QUEUE_RESET) == 0 and d.read(c.REG_QUEUE_READY) == 1
    q.post(writable=[4])
    q.notify()
    assert [u.length for u in q.get_used()] == [4]


def test_queue_reset_without_feature_is_ignored(bench):
    d = bench.driver
    d.init([0], drop=bit(c.F_RING_RESET))
    d.write(c.REG_QUEUE_SEL, 0)
    d.write(c.REG_QUEUE_RESET, 1)
    assert d.read(c.REG_QUEUE_RESET) == 0 and d.read(c.REG_QUEUE_READY) == 1


# -- legacy (Version 1) ----------------------------------------------------------------------------

def test_legacy_identity_and_features(legacy):
    d = legacy.driver
    assert d.read(c.REG_VERSION) == 1
    assert d.device_features() == (DEVICE_FEATURE | TRANSPORT_FEATURES) & 0xFFFFFFFF
    assert not d.device_features() & bit(c.F_VERSION_1)


def test_legacy_queue_and_driver_ok_without_features_ok(legacy):
    d = legacy.driver
    d.reset()
    d.set_status(c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    d.write_driver_features(bit(c.F_RING_INDIRECT_DESC))
    q = d.setup_legacy_queue(0, 8)
    d.write(c.REG_QUEUE_SEL, 0)
    assert d.read(c.REG_QUEUE_PFN) == q.desc // 4096
    assert d.driver_ok() == c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_DRIVER_OK
    assert legacy.transport.has_feature(c.F_RING_INDIRECT_DESC)
    q.post(writable=[16], indirect=True)
    q.notify()
    assert [u.data for u in q.get_used()] == [b"\x5a" * 16]
    assert d.interrupt_status() == c.INT_USED_BUFFER


def test_legacy_features_never_offered_are_masked_at_driver_ok(legacy):
    d = legacy.driver
    d.reset()
    d.set_status(c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    d.write(c.REG_DRIVER_FEATURES_SEL, 0)
    d.write(c.REG_DRIVER_FEATURES, 0xFFFFFFFF)
    d.driver_ok()
    offered = legacy.transport.offered_features
    assert offered != 0xFFFFFFFF
    assert legacy.transport.negotiated_features == offered
    assert legacy.transport.guest_errors == 1


def test_legacy_has_no_modern_registers(legacy):
    d = legacy.driver
    assert d.read(c.REG_QUEUE_READY) == 0
    assert d.read(c.REG_CONFIG_GENERATION) == 0
    d.write(c.REG_QUEUE_SEL, 0)
    d.write(c.REG_QUEUE_READY, 1)
    assert not legacy.device.queues[0].ready


def test_legacy_queue_pfn_zero_disables(legacy):
    d = legacy.driver
    d.set_status(c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    d.setup_legacy_queue(0, 8)
    d.write(c.REG_QUEUE_PFN, 0)
    assert d.read(c.REG_QUEUE_PFN) == 0 and not legacy.device.queues[0].ready


def test_legacy_bad_page_size_and_align_ignored(legacy):
    d = legacy.driver
    d.write(c.REG_GUEST_PAGE_SIZE, 3000)
    d.write(c.REG_QUEUE_SEL, 0)
    d.write(c.REG_QUEUE_ALIGN, 100)
    assert legacy.transport.page_size == 4096


class Consumer(RecordingDevice):
    """Consumes queue 0 (``VirtioDevice.consume``), keeping a chain while ``busy``."""

    busy = False

    def queue_notify(self, index):
        self.consume(self.queues[index], self._handle)

    def _handle(self, chain):
        self.chains.append(chain.head)
        if self.busy:
            self.held.append(chain)
        return self.busy


def test_consume_returns_each_chain_and_stops_at_one_the_handler_keeps():
    """``consume``: every chain used with length 0 and one interrupt; a chain the handler
    keeps (True: a busy backend) ends the loop unused, the chains behind it stay available."""
    bench = VirtioBench(Consumer())
    q, _ = bench.driver.init([0, 1])
    device = bench.device
    bench.irq.take()
    first, second = q.post(readable=[b"a"]), q.post(readable=[b"b"])
    device.busy = True
    q.notify()
    assert device.chains == [first] and q.get_used() == [] and bench.irq.take() == []
    device.busy = False
    q.notify()
    assert device.chains == [first, second]
    assert [(u.head, u.length) for u in q.get_used()] == [(second, 0)]
    assert bench.irq.take() == [bench.transport.intid]
