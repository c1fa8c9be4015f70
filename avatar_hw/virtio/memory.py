"""One VM's RAM as seen by the device model.

``GuestMemory`` wraps a ``Region`` (the mapping of the VM's RAM: a UIO map on a
board, a window of QEMU's RAM file on the emulated board, a bytearray in
tests) placed at a guest-physical base. Every access takes a guest-physical
address, is checked against the RAM (``gpa + length`` may not leave it, nor
wrap past 2**64) and fails with ``GuestMemoryError`` otherwise, which the
virtqueue layer turns into a defined device behaviour. ``view`` hands out
memoryviews into the mapping so payloads move without copies.

Byte order: VirtIO 1.x rings are little-endian; so are arm64 and x86-64
Linux, so native-order accesses are used.

Ordering (arm64): the available index is read with ``load_acquire16`` before
the ring entries it covers; used elements are written before the used index
is published with ``store_release16``; ``fence()`` orders publishing the used
index before reading ``used_event`` / the avail flags (VirtIO 2.7.7.2 and
2.7.10 notification suppression), and writing ``avail_event`` before
re-reading the available index.
"""

from ..hw import ordering


class GuestMemoryError(Exception):
    """A guest-physical range outside the VM's RAM (a guest error, never the host's)."""


class GuestMemory:
    """RAM of VM ``vm_id``: ``region`` holds guest-physical ``base .. base + size - 1``."""

    def __init__(self, region, base, *, vm_id=0):
        self.region = region
        self.base = base
        self.size = region.size
        self.end = base + region.size          # one past the last byte
        self.vm_id = vm_id
        # The whole RAM as one memoryview, made once; sliced per access (the chain
        # iterator slices it directly after its own range check).
        self.data = region.view(0, region.size)
        self._address = region.address

    def release(self):
        """Drop the view of the whole RAM (the daemon is closing; nothing reads it again)."""
        self.data.release()

    def __repr__(self):
        return f"<GuestMemory vm{self.vm_id} 0x{self.base:x}..0x{self.end - 1:x}>"

    def contains(self, gpa, length):
        """True if ``gpa .. gpa + length - 1`` lies inside the RAM (``length`` may be 0)."""
        return self.base <= gpa and length >= 0 and gpa + length <= self.end

    def offset(self, gpa, length):
        """Offset into the region of a checked range; raises ``GuestMemoryError``."""
        if gpa < self.base or length < 0 or gpa + length > self.end:
            raise GuestMemoryError(
                f"vm{self.vm_id}: guest range 0x{gpa:x}+0x{length:x} is outside RAM "
                f"0x{self.base:x}..0x{self.end - 1:x}")
        return gpa - self.base

    def view(self, gpa, length):
        """A writable memoryview of ``length`` bytes at ``gpa`` (no copy)."""
        off = self.offset(gpa, length)
        return self.data[off:off + length]

    def _aligned(self, gpa, width):
        off = self.offset(gpa, width)
        if off % width:
            raise GuestMemoryError(f"vm{self.vm_id}: {width * 8}-bit access at 0x{gpa:x} "
                                   f"is not {width}-byte aligned")
        return off

    def read16(self, gpa):
        return self.region.read16(self._aligned(gpa, 2))

    def read32(self, gpa):
        return self.region.read32(self._aligned(gpa, 4))

    def read64(self, gpa):
        return self.region.read64(self._aligned(gpa, 8))

    def write16(self, gpa, value):
        self.region.write16(self._aligned(gpa, 2), value)

    def write32(self, gpa, value):
        self.region.write32(self._aligned(gpa, 4), value)

    def address(self, gpa, width):
        """Host address of a checked, aligned ``width``-byte field (for ``ordering``)."""
        return self._address + self._aligned(gpa, width)

    def load_acquire16(self, gpa):
        return ordering.load_acquire16(self.address(gpa, 2))

    def store_release16(self, gpa, value):
        ordering.store_release16(self.address(gpa, 2), value)

    @staticmethod
    def fence():
        ordering.fence()
