"""Pacing (avatar_hw/pace.py) of a VM flooding idle traps, in process: two VMs' entropy
devices behind a real trap page, the stand-in stub's side of it in the same process and
the Pacer's periods counted by hand, so nothing here depends on the machine's speed.
The daemon-level test of pacing for guest errors is in tests/test_daemon.py."""

import mmap

import pytest

from avatar_hw.devices import console
from avatar_hw.devices.balloon import BalloonDevice
from avatar_hw.devices.gpu import GpuDevice
from avatar_hw.loop import EventLoop

from avatar_hw import abi
from avatar_hw.devices.rng import RngDevice
from avatar_hw.hw.region import Region
from avatar_hw.layout import Layout
from avatar_hw.pace import CALM_PERIODS, IDLE_TRAPS_PER_PERIOD, PACE_CEILING_US, PACE_US, Pacer
from avatar_hw.testing.driver import VirtioDriver
from avatar_hw.testing.standin_stub import StubPage
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.trap import TrapPage
from avatar_hw.virtio import constants as c
from avatar_hw.virtio import transport

NOTIFIES = IDLE_TRAPS_PER_PERIOD + 50        # per VM and period: above the threshold


class Periods:
    """The event loop's side the Pacer uses; ``next()`` ends the period under way."""

    def __init__(self):
        self.due = None

    def call_later(self, delay, callback):
        self.due = callback
        return callback

    def cancel(self, handle):
        self.due = None

    def next(self):
        due, self.due = self.due, None
        due()


@pytest.fixture
def two_vms():
    """VM 0 and VM 1 with an entropy device each, their drivers trapping through one page
    (vCPU n is VM n's) that is served at once; a Pacer on it."""
    region = Region(mmap.mmap(-1, abi.PAGE_SIZE), name="test trap page")
    stub = StubPage(region)
    stub.initialise(2)
    trap = TrapPage(region, Layout())
    trap.attach()
    benches = [VirtioBench(RngDevice())]
    benches.append(VirtioBench(RngDevice(), vm_id=1, subsystem=benches[0].subsystem))
    subsystem = benches[0].subsystem

    def through_the_page(vm):
        def mmio(addr, value, is_write, size):
            stub.begin(vm, vm, addr, size, is_write, value)
            trap.scan_once(subsystem.dispatch)
            status, data = stub.finish(vm)
            return status == abi.STATUS_OK, data
        return mmio

    queues = [VirtioDriver(through_the_page(vm), b.transport.window, b.ram).init([0], size=8)[0]
              for vm, b in enumerate(benches)]
    periods = Periods()
    pacer = Pacer(trap, subsystem, periods)
    pacer.start()
    yield queues, pacer, periods, stub
    pacer.stop()
    trap.detach(subsystem.dispatch)
    subsystem.close()


def test_a_vm_flooding_notifies_of_an_empty_queue_is_paced_and_one_doing_io_is_not(two_vms):
    """VM 1 notifies its request queue with nothing new in it, VM 0 as often with a new
    request each time (served: the used length is the bytes given): the same traps, no
    guest error from either. VM 1 is paced for its idle traps within one period, VM 0
    never; once VM 1 stops, CALM_PERIODS end its pacing."""
    (work, flood), pacer, periods, stub = two_vms
    for period in range(2):
        for _ in range(NOTIFIES):
            work.post(writable=[16])
            work.notify()
            assert [used.length for used in work.get_used()] == [16]
            flood.notify()
        periods.next()                          # paced, then its pace doubled
        assert (stub.slots[0].pace_us, stub.slots[1].pace_us) == (0, PACE_US << period)
    vm0, vm1 = pacer.info(0), pacer.info(1)
    assert vm1["paced"] and vm1["paced_for"] == "idle traps" and vm1["paced_periods"] == 2
    assert vm1["idle_traps_peak"] >= NOTIFIES and vm1["idle_traps"] >= 2 * NOTIFIES
    assert not vm0["paced"] and vm0["paced_periods"] == 0
    assert vm0["idle_traps_peak"] == 0          # its probe's were before the Pacer started
    assert pacer.subsystem.guest_mistakes(0) == pacer.subsystem.guest_mistakes(1) == 0
    assert pacer.subsystem.device(0, 0).counters["requests"] >= 2 * NOTIFIES

    for period in range(CALM_PERIODS):          # VM 1 stopped; VM 0 works on
        assert stub.slots[1].pace_us == 2 * PACE_US, period     # calm: not doubled again
        for _ in range(NOTIFIES):
            work.post(writable=[16])
            work.notify()
            work.get_used()
        periods.next()
    assert (stub.slots[0].pace_us, stub.slots[1].pace_us) == (0, 0)
    assert not pacer.info(1)["paced"] and not pacer.info(0)["paced_periods"]


def test_an_idle_daemon_stops_counting_until_traps_come_again(two_vms):
    """A period with no trap and no VM paced leaves no timer (an idle daemon sleeps,
    instead of waking 10 times a second); the daemon's next served trap wakes the count
    (``Pacer.wake``), and a flood is paced as before."""
    (_, flood), pacer, periods, stub = two_vms
    periods.next()                              # the drivers' setup was before start()
    assert periods.due is None
    for _ in range(NOTIFIES):
        flood.notify()
    pacer.wake()                                # what the daemon does after serving
    pacer.wake()                                # at most one timer
    periods.next()
    assert stub.slots[1].pace_us == PACE_US and periods.due is not None
    for _ in range(CALM_PERIODS):               # paced: counted even with no trap
        periods.next()
    assert stub.slots[1].pace_us == 0 and not pacer.info(1)["paced"]
    assert periods.due is None                  # the count that ended it saw no trap


def test_a_paced_vm_still_flooding_at_its_paced_rate_stays_paced(two_vms):
    """Paced, a vCPU makes at most one access per PACE_US: 100 a period, below the idle
    threshold. A period is calm only under CALM_IDLE_TRAPS, so the flood, slowed, keeps
    its pacing, and each period of it doubles the pace, up to PACE_CEILING_US."""
    (_, flood), pacer, periods, stub = two_vms
    for _ in range(NOTIFIES):
        flood.notify()
    periods.next()
    for _ in range(2 * CALM_PERIODS):
        for _ in range(int(pacer.period * 1e6 / PACE_US)):
            flood.notify()
        periods.next()
    assert stub.slots[1].pace_us == PACE_CEILING_US and pacer.info(1)["paced"]
    assert pacer.info(1)["pace_us"] == PACE_CEILING_US and pacer.info(0)["pace_us"] == 0


def test_a_vm_trapping_where_no_device_answers_is_paced(two_vms):
    """Accesses answered UNHANDLED — a window of its own with no device, a misaligned
    one — reach no device to count them: the trap page counts them per VM
    (``vm_unhandled``), as idle traps. Its probe of the empty windows (one read each at
    boot) is far below the threshold; a flood of them is paced, and only that VM."""
    _, pacer, periods, stub = two_vms
    layout = Layout()
    empty, misaligned = layout.window(1, 5), layout.window(1, 0) + 2
    for n in range(NOTIFIES):
        stub.begin(1, 1, misaligned if n % 2 else empty, 4, False)
        pacer.trap.scan_once(pacer.subsystem.dispatch)
        assert stub.finish(1) == (abi.STATUS_UNHANDLED, 0)
    periods.next()
    assert (stub.slots[0].pace_us, stub.slots[1].pace_us) == (0, PACE_US)
    vm0, vm1 = pacer.info(0), pacer.info(1)
    assert vm1["paced_for"] == "idle traps" and vm1["idle_traps"] >= NOTIFIES
    assert pacer.trap.vm_counters(1)["traps_unhandled"] == NOTIFIES
    assert not vm0["paced"] and pacer.trap.vm_counters(0)["traps_unhandled"] == 0


def test_a_vm_looping_reset_and_setup_is_paced(two_vms, monkeypatch):
    """Past RESETS_PER_SECOND resets of a device within a second, each write of its next
    setups is an idle trap (avatar_hw/virtio/transport.py): a guest looping them is paced
    as a notify flood is; VM 0's setup, once, is not."""
    (work, flood), pacer, periods, stub = two_vms
    monkeypatch.setattr(transport, "monotonic_ns", lambda: 10 * transport._SECOND_NS)
    driver = flood.driver
    for _ in range(transport.RESETS_PER_SECOND + 30):
        driver.ram.reset_alloc()
        driver.init([0], size=8)
    periods.next()
    assert pacer.info(1)["paced"] and pacer.info(1)["paced_for"] == "idle traps"
    assert stub.slots[1].pace_us == PACE_US and stub.slots[0].pace_us == 0
    assert pacer.subsystem.guest_mistakes(1) == 0


def test_a_configuration_write_that_changes_nothing_is_an_idle_trap(tmp_path, monkeypatch):
    """virtio-gpu's events_clear of events not set, virtio-balloon's ``actual`` written
    again, an emergency console byte dropped (the port holds too many): each completes
    nothing, so a guest repeating it is paced like one flooding empty notifies; the same
    writes that do something are not idle."""
    def idle(bench):
        return bench.transport.context.idle_traps

    gpu = VirtioBench(GpuDevice(width=64, height=64))
    gpu.driver.init([0, 1], size=8)
    before = idle(gpu)
    gpu.driver.write_config(4, 1)                       # no event is set
    assert idle(gpu) == before + 1
    gpu.device.update_config(0, (1).to_bytes(4, "little"))
    gpu.driver.write_config(4, 1)                       # clears the display event
    assert idle(gpu) == before + 1 and gpu.driver.read_config(0) == 0

    balloon = VirtioBench(BalloonDevice(stats_interval=0))
    balloon.driver.init([0, 1], size=8)
    before = idle(balloon)
    balloon.driver.write_config(4, 256)
    balloon.driver.write_config(4, 256)
    assert idle(balloon) == before + 1 and balloon.driver.read_config(4) == 256

    loop = EventLoop()
    con = VirtioBench(console.ConsoleDevice(f"file:{tmp_path}/out"), loop=loop)
    con.driver.init([0, 1], size=8)
    before = idle(con)
    con.driver.write_config(console.EMERG_WR_OFFSET, ord("a"))
    monkeypatch.setattr(console, "EMERG_LIMIT", 0)      # the port holds too many
    con.driver.write_config(console.EMERG_WR_OFFSET, ord("b"))
    assert idle(con) == before + 1
    con.device.detach()
    loop.close()


def test_a_vms_totals_keep_what_a_destroyed_device_counted(two_vms):
    """Destroying a device (the API's hot-unplug) does not take its idle traps and guest
    errors out of its VM's totals: the Pacer counts differences of the totals, and a drop
    would read as a calm period, or hide a flood made through the device in its last one."""
    (work, flood), pacer, periods, stub = two_vms
    for _ in range(NOTIFIES):
        flood.notify()
    subsystem = pacer.subsystem
    for _ in range(3):
        subsystem.device(1, 0).context.guest_error("a refused register write")
    before = subsystem.idle_traps(1), subsystem.guest_mistakes(1)
    assert before[0] >= NOTIFIES
    subsystem.destroy_device(1, 0)
    assert (subsystem.idle_traps(1), subsystem.guest_mistakes(1)) == before
    periods.next()
    assert pacer.info(1)["paced"] and pacer.info(1)["paced_for"] == "idle traps"
    subsystem.vm_destroy(1)                                # the VM gone: its totals too
    assert (subsystem.idle_traps(1), subsystem.guest_mistakes(1)) == (0, 0)
