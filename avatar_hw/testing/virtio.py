"""Test benches for the VirtIO core: a VM with guarded RAM, a subsystem and a driver.

``VirtioBench(device)`` builds what every device test needs: guest RAM inside
a larger buffer with canary guard areas on both sides (``check_guards()``
proves no access left the VM), a ``Subsystem`` with an ``IrqRecorder`` as its
interrupt line, the device in VM ``vm_id`` slot 0, and a ``VirtioDriver``
speaking to it through ``handle_mmio_trap``.
"""

from ..hw.region import Region
from ..virtio.device import VirtioDevice
from ..virtio.memory import GuestMemory
from ..virtio.subsystem import Subsystem
from .driver import GuestRam, VirtioDriver

RAM_BASE = 0x40000000
CANARY = 0xA5


class IrqRecorder:
    """An interrupt line that records every ``raise_intid(intid)``."""

    def __init__(self):
        self.raised = []

    def raise_intid(self, intid):
        self.raised.append(intid)

    def take(self):
        """The INTIDs raised since the last call."""
        out, self.raised = self.raised, []
        return out


class VirtioBench:
    def __init__(self, device, *, ram_size=1 << 20, guard=4096, vm_id=0, legacy=False,
                 loop=None, subsystem=None, irq=None):
        self.guard = guard
        self.buffer = bytearray([CANARY]) * (ram_size + 2 * guard)
        ram = memoryview(self.buffer)[guard:guard + ram_size]
        ram[:] = bytes(ram_size)
        self.irq = irq or IrqRecorder()
        self.subsystem = subsystem or Subsystem(interrupt_line=self.irq, loop=loop)
        self.memory = self.subsystem.vm_init(vm_id, GuestMemory(Region(ram), RAM_BASE))
        self.device = device
        self.transport = self.subsystem.create_device(vm_id, device, legacy=legacy)
        self.ram = GuestRam(ram, RAM_BASE)
        self.driver = VirtioDriver(self.subsystem.handle_mmio_trap, self.transport.window,
                                   self.ram)

    def check_guards(self):
        """Assert the canary areas around the VM's RAM are untouched."""
        g = self.guard
        head, tail = self.buffer[:g], self.buffer[len(self.buffer) - g:]
        assert head == bytes([CANARY]) * g and tail == bytes([CANARY]) * g, \
            "memory outside the VM's RAM was written"


class RecordingDevice(VirtioDevice):
    """A device for core tests: records chains; fills writable buffers with ``fill``
    and completes them, or holds them (``hold=True``) for the test to complete."""

    device_id = 0x7F
    name = "recorder"

    def __init__(self, queue_sizes=(8, 8), *, hold=False, fill=0x5A, features=0, config=b""):
        super().__init__(queue_sizes=list(queue_sizes), features=features, config=config)
        self.hold, self.fill = hold, fill
        self.chains = []
        self.held = []
        self.notified = []
        self.config_writes = []
        self.resets = self.queue_resets = self.activations = 0

    def queue_notify(self, index):
        self.notified.append(index)
        queue = self.queues[index]
        for chain in queue:
            self.chains.append((index, chain.head, [bytes(v) for v in chain.readable],
                                [len(v) for v in chain.writable]))
            if self.hold:
                self.held.append((index, chain))
                continue
            n = 0
            for view in chain.writable:
                view[:] = bytes([self.fill]) * len(view)
                n += len(view)
            queue.add_used(chain, n)
        self.signal_used(queue)

    def activate(self):
        self.activations += 1

    def reset(self):
        self.resets += 1
        self.held.clear()

    def queue_reset(self, index):
        self.queue_resets += 1
        self.held = [(i, ch) for i, ch in self.held if i != index]

    def write_config(self, offset, data):
        self.config_writes.append((offset, bytes(data)))
        self.update_config(offset, data, notify=False)
