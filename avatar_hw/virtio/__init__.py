"""VirtIO core: guest memory, split virtqueues, the virtio-mmio transport, the device base
and the subsystem that routes MMIO traps to devices."""

from .chain import DescriptorChain
from .device import VirtioDevice
from .memory import GuestMemory, GuestMemoryError
from .queue import QueueError, Virtqueue
from .subsystem import Subsystem
from .transport import MmioTransport

__all__ = ["DescriptorChain", "GuestMemory", "GuestMemoryError", "MmioTransport", "QueueError",
           "Subsystem", "VirtioDevice", "Virtqueue"]
