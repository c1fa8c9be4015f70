"""Benchmark of the VirtIO hot path: trap -> register dispatch -> queue -> memoryview I/O.

    .venv/bin/python bench/virtio_core.py

Prints: µs per handle_mmio_trap for a register read and a register write;
µs per QueueNotify that pops, completes and signals one 4 KiB chain (driver
work excluded: the ring is pre-filled); console guest->host MiB/s through a
Unix socket endpoint (64 KiB buffers, the driver harness's own copying included).
"""

import os
import socket
import struct
import time

from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.loop import EventLoop
from avatar_hw.testing.virtio import RecordingDevice, VirtioBench
from avatar_hw.virtio import constants as c


def per_call_us(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def trap_dispatch():
    bench = VirtioBench(RecordingDevice())
    bench.driver.init([0])
    trap = bench.subsystem.handle_mmio_trap
    addr = bench.transport.window
    n = 200_000
    read = per_call_us(lambda: trap(addr + c.REG_INTERRUPT_STATUS, 0, False, 4), n)
    write = per_call_us(lambda: trap(addr + c.REG_INTERRUPT_ACK, 0, True, 4), n)
    print(f"trap dispatch: register read {read:.2f} µs, register write {write:.2f} µs")


class Completer(RecordingDevice):
    """Pops and completes every chain (no data touched): the queue machinery alone."""

    def queue_notify(self, index):
        queue = self.queues[index]
        for chain in queue:
            queue.add_used(chain.head, chain.writable_len)
        self.signal_used(queue)


def notify_path():
    size, rounds = 256, 200
    bench = VirtioBench(Completer(queue_sizes=(size,)), ram_size=4 << 20)
    q, = bench.driver.init([0], buf_size=4096, size=size)
    for i in range(size):                    # one 4 KiB writable descriptor per entry
        q.write_desc(i, q.slots + 4096 * i, 4096, c.DESC_F_WRITE)
    ring = struct.pack(f"<{size}H", *range(size))
    bench.ram.write(q.avail + 4, ring)
    trap = bench.subsystem.handle_mmio_trap
    notify = bench.transport.window + c.REG_QUEUE_NOTIFY
    idx = 0
    total = 0.0
    for _ in range(rounds):
        idx = (idx + size) & 0xFFFF
        bench.ram.write(q.avail + 2, struct.pack("<H", idx))
        start = time.perf_counter()
        trap(notify, 0, True, 4)
        total += time.perf_counter() - start
    per_chain = total / (rounds * size) * 1e6
    print(f"notify path: {per_chain:.2f} µs per 4 KiB chain popped, completed and signalled "
          f"({size} chains per notify)")


def console_stream(total=64 << 20, chunk=64 << 10):
    loop = EventLoop()
    path = f"/tmp/avatar-bench-{os.getpid()}.sock"
    bench = VirtioBench(ConsoleDevice(f"unix:{path}"), loop=loop, ram_size=16 << 20)
    try:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.setblocking(False)
        loop.run_once(0)
        rx, tx = bench.driver.init([0, 1], buf_size=chunk, size=64)
        payload = os.urandom(chunk)
        sent = received = 0
        start = time.perf_counter()
        while received < total:
            while sent < total and tx.free:
                tx.post(readable=[payload])
                sent += chunk
            tx.notify()
            loop.run_once(0)
            while True:
                try:
                    received += len(client.recv(1 << 20))
                except BlockingIOError:
                    break
            tx.get_used(read_data=False)
        elapsed = time.perf_counter() - start
        print(f"console guest->host: {total / elapsed / (1 << 20):.0f} MiB/s "
              f"({total >> 20} MiB in {chunk >> 10} KiB buffers)")
        client.close()
    finally:
        bench.subsystem.close()
        loop.close()


if __name__ == "__main__":
    trap_dispatch()
    notify_path()
    console_stream()
