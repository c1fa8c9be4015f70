"""Register shadow pages (docs/trap-abi.md section 14): the daemon's side against the
stand-in stub's reader, through the real transport."""

import pytest

from avatar_hw import abi
from avatar_hw.hw.region import Region
from avatar_hw.layout import Layout
from avatar_hw.testing.standin_stub import StubPage
from avatar_hw.testing.virtio import IrqRecorder, RecordingDevice, VirtioBench
from avatar_hw.trap import TrapPage
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.subsystem import Subsystem

LAYOUT = Layout()


class ReadingShadowAtInterrupt(IrqRecorder):
    """An interrupt line that reads InterruptStatus from the shadow when it is raised."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.stub = None

    def raise_intid(self, intid):
        super().raise_intid(intid)
        self.seen.append(self.stub.read(LAYOUT.base, c.REG_INTERRUPT_STATUS))


@pytest.fixture
def shadowed():
    region = Region(bytearray(abi.PAGE_SIZE + LAYOUT.window_count * abi.SHADOW_PAGE_SIZE))
    stub = StubPage(region)
    stub.initialise(1, shadow_count=LAYOUT.window_count)
    trap = TrapPage(region, LAYOUT)
    trap.attach()
    assert trap.features & abi.F_REGISTER_SHADOW
    irq = ReadingShadowAtInterrupt()
    subsystem = Subsystem(interrupt_line=irq)
    device = RecordingDevice(features=1 << 40 | 1 << 3, config=bytes(range(1, 7)))
    bench = VirtioBench(device, subsystem=subsystem, irq=irq)
    subsystem.attach_shadows(trap.shadows)
    irq.stub = stub

    def read(offset, size=4):
        return stub.shadow.read(0, offset, size, stub_ack=True)
    stub.read = lambda addr, offset, size=4: read(offset, size)
    return bench, stub, trap, read


def test_identity_and_status_are_answered_from_the_shadow(shadowed):
    bench, stub, trap, read = shadowed
    assert read(c.REG_MAGIC_VALUE) == c.MMIO_MAGIC
    assert read(c.REG_DEVICE_ID) == RecordingDevice.device_id
    assert read(c.REG_STATUS) == 0
    bench.driver.write(c.REG_STATUS, c.STATUS_ACKNOWLEDGE)       # a trapped write republishes
    assert read(c.REG_STATUS) == c.STATUS_ACKNOWLEDGE
    assert stub.shadow.pages[0].hits == 4 and trap.shadows.hits(0) == 4


def test_selector_dependent_registers_follow_the_trapped_selector_write(shadowed):
    bench, stub, trap, read = shadowed
    low = read(c.REG_DEVICE_FEATURES)
    assert low == bench.transport.read(c.REG_DEVICE_FEATURES, 4) and low & 1 << 3
    bench.driver.write(c.REG_DEVICE_FEATURES_SEL, 1)
    assert read(c.REG_DEVICE_FEATURES) == bench.transport.read(c.REG_DEVICE_FEATURES, 4)
    assert read(c.REG_DEVICE_FEATURES) & 1 << 8                  # bit 40
    assert read(c.REG_QUEUE_NUM_MAX) == 8
    bench.driver.write(c.REG_QUEUE_SEL, 5)                       # no such queue
    assert read(c.REG_QUEUE_NUM_MAX) == 0 and read(c.REG_QUEUE_READY) == 0


def test_reads_the_transport_would_refuse_trap(shadowed):
    """Sizes and words the transport answers differently (with a logged guest error)."""
    _, _, _, read = shadowed
    assert read(c.REG_STATUS, 1) is None                        # registers: 32-bit only
    assert read(c.REG_QUEUE_NOTIFY) is None                     # not shadowed
    assert read(0x100, 1) == 1 and read(0x102, 2) == 0x0403       # config bytes 1..6
    assert read(0x104) is None                                   # word past the config's end
    assert read(0x101, 2) is None                                # unaligned


def test_interrupt_status_is_in_the_shadow_before_the_interrupt(shadowed):
    bench, stub, _, read = shadowed
    bench.transport.context.interrupt(c.INT_USED_BUFFER)
    assert bench.irq.seen == [c.INT_USED_BUFFER]
    bench.driver.write(c.REG_INTERRUPT_ACK, c.INT_USED_BUFFER)
    assert read(c.REG_INTERRUPT_STATUS) == 0


def test_config_change_publishes_generation_and_bytes_together(shadowed):
    bench, _, _, read = shadowed
    generation = read(c.REG_CONFIG_GENERATION)
    bench.device.config[0:1] = b"\x99"
    bench.transport.signal_config_change()
    assert read(c.REG_CONFIG_GENERATION) == generation + 1 and read(0x100, 1) == 0x99


def test_an_unfinished_update_makes_the_stub_trap(shadowed):
    """Odd seq (the model is writing) or a seq that moved: the stub traps instead."""
    _, stub, trap, read = shadowed
    page = trap.shadows.pages[0]
    page.seq += 1
    assert read(c.REG_MAGIC_VALUE) is None
    page.seq += 1
    assert read(c.REG_MAGIC_VALUE) == c.MMIO_MAGIC


def test_attach_clears_what_a_previous_model_left(shadowed):
    _, stub, trap, read = shadowed
    assert read(c.REG_MAGIC_VALUE) == c.MMIO_MAGIC
    TrapPage(stub.region, LAYOUT).attach()                       # the next model
    assert read(c.REG_MAGIC_VALUE) is None


def test_a_removed_device_s_page_traps(shadowed):
    bench, _, _, read = shadowed
    bench.subsystem.destroy_device(0, 0)
    assert read(c.REG_MAGIC_VALUE) is None


# -- InterruptACK taken by the stub (AVT_F_STUB_ACK, docs/trap-abi.md section 15) -------------

def test_the_stub_takes_interrupt_ack_and_its_shadowed_read_sees_it(shadowed):
    bench, stub, trap, read = shadowed
    assert trap.features & abi.F_STUB_ACK
    bench.transport.context.interrupt(c.INT_USED_BUFFER | c.INT_CONFIG_CHANGE)
    assert read(c.REG_INTERRUPT_STATUS) == 3
    assert stub.shadow.take_ack(0, c.INT_USED_BUFFER)            # no trap: the stub's count
    assert read(c.REG_INTERRUPT_STATUS) == c.INT_CONFIG_CHANGE    # without the model
    assert bench.transport.context.interrupt_status == 3          # not applied yet
    assert trap.window_counters(0)["stub_acks"] == 1
    # A trapped InterruptStatus read (the page being rewritten, say) applies the counts first,
    # and so do info and debug.
    assert bench.subsystem.dispatch(0, c.REG_INTERRUPT_STATUS, 0, False, 4) == (True, 2)
    bench.transport.context.interrupt(c.INT_USED_BUFFER)
    assert stub.shadow.take_ack(0, c.INT_USED_BUFFER | c.INT_CONFIG_CHANGE)
    assert bench.subsystem.debug_device(0, 0)["interrupt_status"] == 0


def test_a_bit_set_again_after_a_stub_ack_interrupts_again(shadowed):
    """The counts are applied before a bit is set: the guest's acknowledgement of the last
    buffer never swallows the interrupt for the next (it would, if the bit still looked
    set to the model, and a guest waiting for that buffer would wait for ever)."""
    bench, stub, _, read = shadowed
    bench.transport.context.interrupt(c.INT_USED_BUFFER)
    assert stub.shadow.take_ack(0, c.INT_USED_BUFFER)
    assert read(c.REG_INTERRUPT_STATUS) == 0
    bench.transport.context.interrupt(c.INT_USED_BUFFER)          # the next used buffer
    assert bench.irq.seen == [c.INT_USED_BUFFER, c.INT_USED_BUFFER]
    assert len(bench.irq.raised) == 2
    assert read(c.REG_INTERRUPT_STATUS) == c.INT_USED_BUFFER


def test_the_stub_posts_interrupt_ack_when_no_model_publishes_the_window(shadowed):
    bench, stub, trap, read = shadowed
    bench.subsystem.destroy_device(0, 0)
    assert not stub.shadow.take_ack(0, c.INT_USED_BUFFER)
    assert not stub.shadow.take_ack(1, c.INT_USED_BUFFER)         # no device in window 1


def test_acks_nobody_applied_are_dropped_by_the_next_model(shadowed):
    """A new model (a restart) starts from the counts it finds: an acknowledgement the dead
    model never applied can leave a bit set (a spurious interrupt status), never clear one
    the new model sets."""
    bench, stub, trap, read = shadowed
    bench.transport.context.interrupt(c.INT_USED_BUFFER)
    assert stub.shadow.take_ack(0, c.INT_USED_BUFFER)
    successor = TrapPage(stub.region, LAYOUT)
    successor.attach()
    assert successor.shadows.take_acks(0) == 0
    successor.shadows.publish(0, bench.transport)
    assert read(c.REG_INTERRUPT_STATUS) == c.INT_USED_BUFFER


def test_without_the_feature_acks_trap_to_the_model():
    region = Region(bytearray(abi.PAGE_SIZE + LAYOUT.window_count * abi.SHADOW_PAGE_SIZE))
    stub = StubPage(region)
    stub.initialise(1, shadow_count=LAYOUT.window_count,
                    features=abi.SUPPORTED_FEATURES & ~abi.F_STUB_ACK)
    trap = TrapPage(region, LAYOUT)
    trap.attach()
    assert trap.features & abi.F_REGISTER_SHADOW and not trap.features & abi.F_STUB_ACK
    assert not trap.shadows.stub_ack and trap.shadows.take_acks(0) == 0
