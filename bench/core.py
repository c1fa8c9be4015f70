"""The VirtIO core in process: what the device model itself costs.

The ``trap`` part measures a trap end to end (trap page, doorbell, daemon);
this isolates the Python it calls, with the driver-side harness
(``VirtioBench``) in the same process:

- trap page: µs per trap for register reads (DeviceID) posted by the Python
  stand-in stub into all 4 slots of a trap page in this process and answered
  by ``TrapPage.scan_once`` -> ``complete_slot`` -> ``Subsystem.dispatch`` (one
  scan per 4 traps, as when every vCPU posted; no doorbell, no second process;
  best of 5 rounds);
- register dispatch: µs per ``handle_mmio_trap`` for a register read
  (InterruptStatus) and a register write (InterruptACK);
- notify path: µs per chain for one QueueNotify that pops, completes and
  signals a queue's worth of 4 KiB chains (the ring is pre-filled, the driver's
  work is not timed; the device touches no data): the queue machinery alone;
- gpu transfer: ms per TRANSFER_TO_HOST_2D request (QueueNotify to used
  buffer) of a whole 1024x768 B8G8R8X8 frame whose backing is 768 scattered 4 KiB
  pages (the copies a Linux guest's fbdev asks for), and of a 256x256 rectangle in it
  (row by row).
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
from avatar_hw.wait import BUSY_POLL
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
    trap.attach(wait=BUSY_POLL)
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
            trap.scan_once(bench.subsystem.dispatch)
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
            queue.add_used(chain, chain.writable_len)
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


def gpu_transfer(rounds, width=1024, height=768):
    from avatar_hw.devices import gpu
    bench = VirtioBench(gpu.GpuDevice(width=width, height=height), ram_size=16 << 20)
    ctrl, _ = bench.driver.init([0, 1], buf_size=16384, size=16)
    pages = width * height * 4 // 4096
    base = bench.ram.alloc(pages * 4096, 4096)
    entries = b"".join(struct.pack("<QI4x", base + 4096 * (pages - 1 - i), 4096)
                       for i in range(pages))                 # reversed: never coalesced
    trap = bench.subsystem.handle_mmio_trap
    notify = bench.transport.window + c.REG_QUEUE_NOTIFY

    def request(kind, body):
        ctrl.post(readable=[gpu.HEADER.pack(kind, 0, 0, 0, 0) + body], writable=[24])
        start = time.perf_counter()
        trap(notify, 0, True, 4)
        took = time.perf_counter() - start
        used, = ctrl.get_used()
        assert gpu.HEADER.unpack_from(used.data)[0] == gpu.RESP_OK_NODATA
        return took

    request(gpu.CMD_RESOURCE_CREATE_2D, struct.pack("<IIII", 1, 2, width, height))
    request(gpu.CMD_RESOURCE_ATTACH_BACKING, struct.pack("<II", 1, pages) + entries)
    full = sum(request(gpu.CMD_TRANSFER_TO_HOST_2D,
                       struct.pack("<IIIIQI4x", 0, 0, width, height, 0, 1))
               for _ in range(rounds))
    offset = 100 * width * 4 + 100 * 4
    part = sum(request(gpu.CMD_TRANSFER_TO_HOST_2D,
                       struct.pack("<IIIIQI4x", 100, 100, 256, 256, offset, 1))
               for _ in range(rounds))
    frame = width * height * 4
    return {"frame": f"{width}x{height}", "pages": pages, "transfers": rounds,
            "full_ms": full / rounds * 1e3, "full_MBps": frame * rounds / full / 1e6,
            "rect_ms": part / rounds * 1e3}


def run(quick=False):
    out = {"trap_page": trap_page(4_000 if quick else 40_000),
           "dispatch": register_dispatch(20_000 if quick else 200_000),
           "notify": notify_path(20 if quick else 200),
           "gpu_transfer": gpu_transfer(5 if quick else 50)}
    t, d, n, gt = out["trap_page"], out["dispatch"], out["notify"], out["gpu_transfer"]
    table("VirtIO core in process", ["operation", "count", "µs"], [
        ["register read through the trap page (scan_once)", t["traps"],
         f"{t['us_per_trap']:.2f}"],
        ["register read (handle_mmio_trap)", d["calls"], f"{d['read_us']:.2f}"],
        ["register write (handle_mmio_trap)", d["calls"], f"{d['write_us']:.2f}"],
        [f"QueueNotify, per 4 KiB chain ({n['chains_per_notify']} per notify)",
         n["notifies"] * n["chains_per_notify"], f"{n['us_per_chain']:.2f}"],
        [f"gpu transfer, {gt['frame']} frame from {gt['pages']} pages "
         f"({gt['full_MBps']:.0f} MB/s)", gt["transfers"], f"{gt['full_ms'] * 1e3:.0f}"],
        ["gpu transfer, 256x256 rectangle (row by row)", gt["transfers"],
         f"{gt['rect_ms'] * 1e3:.0f}"]])
    return out
