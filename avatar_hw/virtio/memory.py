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

Ordering (arm64): ``address`` gives the host address of an aligned ring
index, which the virtqueue reads and writes with ``avatar_hw.hw.ordering``:
the available index with a load-acquire before the ring entries it covers,
the used index with a store-release after the used elements, and a fence
between publishing the used index and reading ``used_event`` / the avail
flags (VirtIO 2.7.7.2 and 2.7.10 notification suppression), and between
writing ``avail_event`` and re-reading the available index.
"""


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

    def discard(self, gpa, length):
        """Give the host back the memory of a checked range (``Region.discard``: whole host
        pages only); the bytes freed (0 where the mapping cannot)."""
        return self.region.discard(self.offset(gpa, length), length)

    def address(self, gpa, width):
        """Host address of a checked, aligned ``width``-byte field (for ``ordering``)."""
        return self._address + self._aligned(gpa, width)
