"""The subsystem: windows and IRQs by layout, routing, VM isolation, debugging API."""

import io
import json

import pytest

from avatar_hw import Subsystem
from avatar_hw.hw.region import Region
from avatar_hw.layout import Layout
from avatar_hw.testing.driver import GuestRam, VirtioDriver
from avatar_hw.testing.virtio import IrqRecorder, RecordingDevice, VirtioBench
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.memory import GuestMemory


def make_vm(sub, vm_id, base, size=1 << 20):
    buf = bytearray(size)
    sub.vm_init(vm_id, GuestMemory(Region(buf), base))
    return buf


def test_windows_and_irqs_follow_the_seed_layout():
    sub = Subsystem(interrupt_line=IrqRecorder())
    make_vm(sub, 0, 0x40000000)
    make_vm(sub, 1, 0x80000000)
    t0 = sub.create_device(0, RecordingDevice())
    t1 = sub.create_device(1, RecordingDevice())
    t2 = sub.create_device(1, RecordingDevice(), slot=3)
    assert (t0.window, t0.intid) == (0x0A000000, 48)
    assert (t1.window, t1.intid) == (0x0A010000, 56)
    assert (t2.window, t2.intid) == (0x0A013000, 59)
    assert [(d["vm"], d["slot"], d["base"], d["irq"]) for d in sub.list_all_devices()] == [
        (0, 0, "0x0a000000", 48), (1, 0, "0x0a010000", 56), (1, 3, "0x0a013000", 59)]


def test_custom_layout():
    layout = Layout(base=0x10000000, vm_size=0x4000, device_size=0x1000, irq_base=100,
                    irqs_per_vm=4, max_vms=2)
    sub = Subsystem(layout)
    make_vm(sub, 1, 0)
    t = sub.create_device(1, RecordingDevice())
    assert (t.window, t.intid) == (0x10004000, 104)
    assert sub.handle_mmio_trap(0x10004000, 0, False, 4) == (True, c.MMIO_MAGIC)


def test_unknown_addresses_are_not_handled():
    sub = Subsystem()
    make_vm(sub, 0, 0x40000000)
    sub.create_device(0, RecordingDevice())
    for addr in (0x09FFFFFC, 0x0A001000, 0x0A010000, 0x0A080000, 0, 2**64 - 4):
        assert sub.handle_mmio_trap(addr, 0, False, 4) == (False, 0)
        assert sub.handle_mmio_trap(addr, 1, True, 4) == (False, 0)


def test_slot_errors():
    sub = Subsystem()
    with pytest.raises(ValueError, match="not initialised"):
        sub.create_device(0, RecordingDevice())
    make_vm(sub, 0, 0x40000000)
    sub.create_device(0, RecordingDevice(), slot=2)
    with pytest.raises(ValueError, match="already holds"):
        sub.create_device(0, RecordingDevice(), slot=2)
    with pytest.raises(ValueError):
        sub.create_device(0, RecordingDevice(), slot=8)
    for _ in range(7):
        sub.create_device(0, RecordingDevice())
    with pytest.raises(ValueError, match="no free device slot"):
        sub.create_device(0, RecordingDevice())
    with pytest.raises(ValueError, match="already initialised"):
        make_vm(sub, 0, 0)
    with pytest.raises(ValueError, match="outside the layout"):
        make_vm(sub, 8, 0)


def test_device_reaches_only_its_own_vms_memory():
    irq = IrqRecorder()
    b0 = VirtioBench(RecordingDevice(), vm_id=0, irq=irq)
    sub = b0.subsystem
    b1 = VirtioBench(RecordingDevice(), vm_id=1, subsystem=sub, irq=irq)
    # VM1's RAM sits at the same guest-physical base, in another buffer
    rx1, = b1.driver.init([0])
    rx0, = b0.driver.init([0])
    rx1.post(writable=[16])
    rx1.notify()
    assert [u.data for u in rx1.get_used()] == [b"\x5a" * 16]
    assert b0.ram.read(rx1.slots, 16) == bytes(16)     # VM0's RAM untouched
    b0.check_guards()
    b1.check_guards()


def test_address_of_another_vm_is_outside_ram():
    sub = Subsystem()
    vm0 = make_vm(sub, 0, 0x40000000)
    make_vm(sub, 1, 0x80000000)
    t = sub.create_device(1, RecordingDevice())
    ram1 = GuestRam(memoryview(sub.vms[1].region.view(0, 1 << 20)), 0x80000000)
    drv = VirtioDriver(sub.handle_mmio_trap, t.window, ram1)
    rx, = drv.init([0])
    rx.add_chain([(0x40000000, 64, True)])          # VM0's RAM address
    rx.notify()
    assert [(u.length) for u in rx.get_used()] == [0]
    assert vm0 == bytearray(1 << 20)


def test_device_exception_is_contained():
    class Buggy(RecordingDevice):
        def queue_notify(self, index):
            raise RuntimeError("bug")

    b = VirtioBench(Buggy())
    rx, = b.driver.init([0])
    rx.post(writable=[4])
    assert b.subsystem.handle_mmio_trap(b.transport.window + c.REG_QUEUE_NOTIFY, 0,
                                        True, 4) == (True, 0)
    assert b.driver.status & c.STATUS_DEVICE_NEEDS_RESET
    assert b.device.counters["errors"] == 1


def test_configure_vm_mirrors_the_seed():
    sub = Subsystem()
    make_vm(sub, 0, 0x40000000)
    make_vm(sub, 1, 0x80000000)
    blk = RecordingDevice()
    assert len(sub.configure_vm(0, console=True)) == 1
    assert len(sub.configure_vm(1, console=True, block=blk)) == 2
    names = [(d["vm"], d["slot"], d["name"]) for d in sub.list_all_devices()]
    assert names == [(0, 0, "console"), (1, 0, "console"), (1, 1, "recorder")]
    assert sub.device(1, 1) is blk
    with pytest.raises(ValueError, match="block must be a device object"):
        sub.configure_vm(1, block=True)


def test_info_and_debugging_views():
    b = VirtioBench(RecordingDevice())
    rx, = b.driver.init([0])
    rx.post(readable=[b"abcd"], writable=[4])
    rx.notify()
    sub = b.subsystem
    info = sub.device_info()
    json.dumps(info)
    assert info[0]["status"] == "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK"
    dbg = sub.debug_device(0, 0)
    json.dumps(dbg)
    assert dbg["queues"][0]["last_avail_idx"] == 1 and dbg["queues"][0]["used_idx"] == 1
    assert dbg["interrupts"] == 1
    out = io.StringIO()
    sub.print_device_info(out)
    assert json.loads(out.getvalue())[0]["name"] == "recorder"
    with pytest.raises(ValueError):
        sub.debug_device(0, 5)


def test_vm_destroy_detaches_devices():
    detached = []

    class Dev(RecordingDevice):
        def detach(self):
            detached.append(self)

    sub = Subsystem()
    make_vm(sub, 0, 0x40000000)
    sub.create_device(0, Dev())
    sub.vm_destroy(0)
    assert len(detached) == 1 and sub.list_all_devices() == []
    assert sub.handle_mmio_trap(0x0A000000, 0, False, 4) == (False, 0)
