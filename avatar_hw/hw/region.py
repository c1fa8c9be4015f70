"""Regions: mapped memory or device registers with exact-width access.

A ``Region`` is the one seam through which avatar-hw touches anything mapped:
a UIO map of a device, a guest's RAM, the trap page, QEMU's shared RAM file,
or a ``bytearray`` in a test. It offers

- ``read8/16/32/64(offset)`` and ``write8/16/32/64(offset, value)``: each is a
  single load or store of exactly that width. They index ctypes arrays made
  once over the buffer (``(c_uintN * n).from_buffer``), whose element access is
  one fixed-size memcpy that the C compiler turns into one LDR/STR. Slicing an
  mmap or ``struct.unpack_from`` on it copies byte by byte or in pieces of the
  library's choosing, which splits or repeats device-register accesses;
  never use them on a register.
- ``load_acquire16/32`` and ``store_release16/32``: the ordered accesses of the
  "data, then state word" publication rule (see ``ordering``).
- ``view(offset, length)``: a bounds-checked ``memoryview`` for bulk data
  (guest buffers), so payloads move with readinto/preadv/pwritev, no copies;
- ``discard(offset, length)``: give the host back the memory behind whole host
  pages (a balloon's pages): ``madvise(MADV_REMOVE)`` on a shared file mapping
  punches a hole in the file (QEMU's shared RAM file on the emulated board), so
  every mapping of it reads zeros there afterwards. A UIO map (reserved no-map
  memory, ``remap_pfn_range``) or a bytearray has nothing to give back.

Offsets are relative to the start of the region; every access is checked for
range and natural alignment and fails with ``RegionAccessError`` naming the
region.
"""

import ctypes
import mmap
import os

from ..errors import RegionAccessError
from . import ordering

_WIDTH_TYPES = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}


class Region:
    """A window of memory with exact-width, checked access.

    ``buffer`` is any writable buffer (an ``mmap``, a ``bytearray``).
    ``phys_addr`` is where the window sits in the physical (or guest-physical)
    address space, for messages and for users that translate addresses.
    """

    def __init__(self, buffer, *, name="region", phys_addr=0, closer=None):
        self.name = name
        self.phys_addr = phys_addr
        self._buffer = buffer
        self._closer = closer
        self.discardable = False            # map_file: a shared, writable file mapping
        self.file = None                    # (path, offset) of the mapping: map_file, UIO maps
        self.uio_map = None                 # UioDevice.map: the map's index (offset = index
                                            # pages selects the map, it is no byte offset)
        self.size = len(memoryview(buffer))
        self._arrays = {
            width: (ctype * (self.size // width)).from_buffer(buffer)
            for width, ctype in _WIDTH_TYPES.items()
        }
        self.address = ctypes.addressof(self._arrays[1])
        # Bound per width so the hot path is one dict-free index.
        self._u8, self._u16, self._u32, self._u64 = (self._arrays[w] for w in (1, 2, 4, 8))

    @classmethod
    def map_file(cls, path, size, *, offset=0, name=None, phys_addr=0, readonly=False):
        """Map ``size`` bytes of a file (or a device node such as /dev/uioN) at ``offset``."""
        flags = os.O_RDONLY if readonly else os.O_RDWR
        fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
        finally:
            os.close(fd)
        region = cls(mapping, name=name or str(path), phys_addr=phys_addr,
                     closer=mapping.close)
        region.discardable = not readonly
        region.file = (os.fspath(path), offset)
        return region

    def close(self):
        """Drop the ctypes views and unmap (when this region owns the mapping)."""
        self._arrays = self._u8 = self._u16 = self._u32 = self._u64 = None
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Region {self.name} phys=0x{self.phys_addr:x} size=0x{self.size:x}>"

    # -- checks ---------------------------------------------------------------

    def check(self, offset, width):
        """Raise ``RegionAccessError`` unless a ``width``-byte access at ``offset`` is valid."""
        if offset < 0 or offset + width > self.size:
            raise RegionAccessError(
                f"{self.name}: {width * 8}-bit access at offset 0x{offset:x} is outside "
                f"the region (size 0x{self.size:x})")
        if offset % width:
            raise RegionAccessError(
                f"{self.name}: {width * 8}-bit access at offset 0x{offset:x} is not "
                f"{width}-byte aligned")

    # -- exact-width access ---------------------------------------------------

    def read8(self, offset):
        self.check(offset, 1)
        return self._u8[offset]

    def read16(self, offset):
        self.check(offset, 2)
        return self._u16[offset >> 1]

    def read32(self, offset):
        self.check(offset, 4)
        return self._u32[offset >> 2]

    def read64(self, offset):
        self.check(offset, 8)
        return self._u64[offset >> 3]

    def write8(self, offset, value):
        self.check(offset, 1)
        self._u8[offset] = value

    def write16(self, offset, value):
        self.check(offset, 2)
        self._u16[offset >> 1] = value

    def write32(self, offset, value):
        self.check(offset, 4)
        self._u32[offset >> 2] = value

    def write64(self, offset, value):
        self.check(offset, 8)
        self._u64[offset >> 3] = value

    def read(self, offset, width):
        """Read of ``width`` bytes (1, 2, 4 or 8) as one access."""
        if width not in _WIDTH_TYPES:
            raise RegionAccessError(f"{self.name}: access width {width} is not 1, 2, 4 or 8")
        self.check(offset, width)
        return self._arrays[width][offset // width]

    def write(self, offset, width, value):
        """Write of ``width`` bytes (1, 2, 4 or 8) as one access."""
        if width not in _WIDTH_TYPES:
            raise RegionAccessError(f"{self.name}: access width {width} is not 1, 2, 4 or 8")
        self.check(offset, width)
        self._arrays[width][offset // width] = value

    # -- ordered access (shared-memory protocols) -----------------------------

    def load_acquire16(self, offset):
        self.check(offset, 2)
        return ordering.load_acquire16(self.address + offset)

    def load_acquire32(self, offset):
        self.check(offset, 4)
        return ordering.load_acquire32(self.address + offset)

    def store_release16(self, offset, value):
        self.check(offset, 2)
        ordering.store_release16(self.address + offset, value)

    def store_release32(self, offset, value):
        self.check(offset, 4)
        ordering.store_release32(self.address + offset, value)

    # -- bulk data --------------------------------------------------------------

    def view(self, offset, length):
        """A writable memoryview of ``length`` bytes at ``offset`` (no copy)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RegionAccessError(
                f"{self.name}: range 0x{offset:x}+0x{length:x} is outside the region "
                f"(size 0x{self.size:x})")
        return memoryview(self._arrays[1]).cast("B")[offset:offset + length]

    def discard(self, offset, length):
        """Free the host memory behind the whole host pages inside ``offset .. offset +
        length`` (``madvise(MADV_REMOVE)``: a hole in the file; reads give zeros after);
        the bytes freed, 0 when this region cannot (not ``discardable``: not a shared file
        mapping). ``OSError`` when the kernel refuses (no hole punching there)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RegionAccessError(
                f"{self.name}: range 0x{offset:x}+0x{length:x} is outside the region "
                f"(size 0x{self.size:x})")
        if not self.discardable:
            return 0
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if end <= start:
            return 0
        self._buffer.madvise(mmap.MADV_REMOVE, start, end - start)
        return end - start
