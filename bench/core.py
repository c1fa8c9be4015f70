"""The VirtIO core in process: what the device model itself costs.

The ``trap`` part measures a trap end to end (trap page, doorbell, daemon);
this isolates the Python it calls, with the driver-side harness
(``VirtioBench``) in the same process:

- trap page: µs per trap for register reads (DeviceID) posted by the Python
  stand-in stub into all 4 slots of a trap page in this process and answered
  by ``TrapPage.serve_until_idle`` -> ``scan_once`` -> ``complete_slot`` ->
  ``Subsystem.dispatch`` (no doorbell, no second process; best of 5 rounds);
- register dispatch: µs per ``handle_mmio_trap`` for a register read
  (InterruptStatus) and a register write (InterruptACK);
- notify path: µs per chain for one QueueNotify that pops, completes and
  signals a queue's worth of 4 KiB chains (the ring is pre-filled, the driver's
  work is not timed; the device touches no data): the queue machinery alone.
"""

import mmap
import struct
import time

from avatar_hw import abi
from avatar_hw.hw.region import Region
from avatar_hw.layout import Layout
from avatar_hw.testing.standin_stub import StubPage
from avatar_hw.testing.virtio import RecordingDevice, VirtioBench
from avatar_hw.trap import TrapPage
from avatar_hw.virtio import constants as c

from .common import table

QUEUE_SIZE = 256


def per_call_us(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def trap_page(traps, slots=4, rounds=5):
    bench = VirtioBench(RecordingDevice())
    page = mmap.mmap(-1, abi.PAGE_SIZE)
    region = Region(page, name="bench trap page")
    stub = StubPage(region)
    stub.initialise(slots)
    trap = TrapPage(region, Layout())
    trap.attach(busy_poll=True)
    states = [abi.SLOTS_OFFSET + i * abi.SLOT_SIZE + abi.STATE_OFFSET for i in range(slots)]
    for vcpu, slot in enumerate(stub.slots):
        slot.gpa = bench.transport.window + c.REG_DEVICE_ID
        slot.size, slot.direction = 4, abi.DIR_READ
        slot.data = slot.flags = slot.vm_id = 0
        slot.vcpu_id = vcpu
    best = None
    for _ in range(rounds):
        total = 0
        for _ in range(traps // slots):
            for state in states:
                region.store_release32(state, abi.SLOT_POSTED)
            start = time.perf_counter_ns()
            trap.serve_until_idle(bench.subsystem.dispatch)
            total += time.perf_counter_ns() - start
        best = total if best is None else min(best, total)
    answered = all(s.status == abi.STATUS_OK and s.data == bench.device.device_id
                   for s in stub.slots)
    trap.detach(bench.subsystem.dispatch)
    count = traps // slots * slots
    return {"traps": count, "us_per_trap": best / 1000 / count, "all_answered": answered}


def register_dispatch(calls):
    bench = VirtioBench(RecordingDevice())
    bench.driver.init([0])
    trap = bench.subsystem.handle_mmio_trap
    addr = bench.transport.window
    return {"calls": calls,
            "read_us": per_call_us(lambda: trap(addr + c.REG_INTERRUPT_STATUS, 0, False, 4), calls),
            "write_us": per_call_us(lambda: trap(addr + c.REG_INTERRUPT_ACK, 0, True, 4), calls)}


class Completer(RecordingDevice):
    """Pops and completes every chain (no data touched): the queue machinery alone."""

    def queue_notify(self, index):
        queue = self.queues[index]
        for chain in queue:
            queue.add_used(chain.head, chain.writable_len)
        self.signal_used(queue)


def notify_path(rounds, size=QUEUE_SIZE):
    bench = VirtioBench(Completer(queue_sizes=(size,)), ram_size=4 << 20)
    q, = bench.driver.init([0], buf_size=4096, size=size)
    for i in range(size):                    # one 4 KiB writable descriptor per entry
        q.write_desc(i, q.slots + 4096 * i, 4096, c.DESC_F_WRITE)
    bench.ram.write(q.avail + 4, struct.pack(f"<{size}H", *range(size)))
    trap = bench.subsystem.handle_mmio_trap
    notify = bench.transport.window + c.REG_QUEUE_NOTIFY
    idx, total = 0, 0.0
    for _ in range(rounds):
        idx = (idx + size) & 0xFFFF
        bench.ram.write(q.avail + 2, struct.pack("<H", idx))
        start = time.perf_counter()
        trap(notify, 0, True, 4)
        total += time.perf_counter() - start
    return {"chains_per_notify": size, "notifies": rounds,
            "us_per_chain": total / (rounds * size) * 1e6,
            "all_completed": q.used_idx() == idx}      # every notify completed its chains


def run(quick=False):
    out = {"trap_page": trap_page(4_000 if quick else 40_000),
           "dispatch": register_dispatch(20_000 if quick else 200_000),
           "notify": notify_path(20 if quick else 200)}
    t, d, n = out["trap_page"], out["dispatch"], out["notify"]
    table("VirtIO core in process", ["operation", "count", "µs"], [
        ["register read through the trap page (serve_until_idle)", t["traps"],
         f"{t['us_per_trap']:.2f}"],
        ["register read (handle_mmio_trap)", d["calls"], f"{d['read_us']:.2f}"],
        ["register write (handle_mmio_trap)", d["calls"], f"{d['write_us']:.2f}"],
        [f"QueueNotify, per 4 KiB chain ({n['chains_per_notify']} per notify)",
         n["notifies"] * n["chains_per_notify"], f"{n['us_per_chain']:.2f}"]])
    return out
