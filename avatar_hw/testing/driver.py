"""A guest driver played from the host side, for tests.

``VirtioDriver`` does what a guest's virtio-mmio driver does, through one
callable with the shape of ``Subsystem.handle_mmio_trap``::

    mmio(addr, value, is_write, size) -> (handled, value)

and a ``ram`` object giving the driver's view of guest RAM
(``read(gpa, length) -> bytes``, ``write(gpa, data)``, ``alloc(size, align)``
-> gpa). ``GuestRam`` is that object over a bytearray; the same harness
drives the daemon through the trap page, or QEMU's devices through qtest,
by passing another callable and RAM adapter.

Typical use::

    ram = GuestRam(bytearray(16 << 20), base=0x40000000)
    drv = VirtioDriver(subsystem.handle_mmio_trap, window=0x0a000000, ram=ram)
    drv.negotiate()                       # reset, ACK, DRIVER, features, FEATURES_OK
    rx = drv.setup_queue(0)               # rings allocated in ram, QueueReady
    drv.driver_ok()
    rx.post(writable=[4096]); rx.notify()
    for used in rx.get_used(): print(used.head, used.length, used.data)
"""

import struct
from dataclasses import dataclass, field

from ..virtio import constants as c
from ..virtio.constants import bit


class GuestRam:
    """Guest RAM seen by the driver: ``buffer`` holds guest-physical ``base ..``.

    ``alloc`` is a bump allocator (``reset_alloc`` starts over).
    """

    def __init__(self, buffer, base, *, alloc_start=0):
        self.buffer = buffer
        self._mv = memoryview(buffer)
        self.base = base
        self.size = len(self._mv)
        self._alloc_start = alloc_start
        self._next = base + alloc_start

    def read(self, gpa, length):
        off = gpa - self.base
        return bytes(self._mv[off:off + length])

    def write(self, gpa, data):
        off = gpa - self.base
        self._mv[off:off + len(data)] = data

    def view(self, gpa, length):
        off = gpa - self.base
        return self._mv[off:off + length]

    def alloc(self, size, align=16):
        gpa = (self._next + align - 1) & ~(align - 1)
        if gpa + size > self.base + self.size:
            raise MemoryError(f"guest RAM exhausted allocating {size} bytes")
        self._next = gpa + size
        return gpa

    def reset_alloc(self):
        self._next = self.base + self._alloc_start


@dataclass
class UsedBuffer:
    head: int
    length: int
    data: bytes = b""          # the first ``length`` bytes of the writable segments
    segments: list = field(default_factory=list)


class DriverQueue:
    """The driver's side of one split virtqueue: descriptor table, avail and used rings.

    Every descriptor ``i`` owns a data slot of ``buf_size`` bytes (used by
    ``post``); ``add_chain`` takes explicit segments for anything else.
    """

    def __init__(self, driver, index, size, *, buf_size=4096, desc=None, avail=None, used=None):
        self.driver, self.ram, self.index, self.size = driver, driver.ram, index, size
        ram = self.ram
        self.desc = desc if desc is not None else ram.alloc(16 * size, 16)
        self.avail = avail if avail is not None else ram.alloc(6 + 2 * size, 2)
        self.used = used if used is not None else ram.alloc(6 + 8 * size, 4)
        self.buf_size = buf_size
        self.slots = ram.alloc(buf_size * size, 16) if buf_size else 0
        self.indirect_tables = ram.alloc(16 * size * 16, 16)   # 16 entries per head
        ram.write(self.desc, bytes(16 * size))
        ram.write(self.avail, bytes(6 + 2 * size))
        ram.write(self.used, bytes(6 + 8 * size))
        self.avail_idx = 0
        self.last_used_idx = 0
        self.free = list(range(size))
        self.outstanding = {}          # head -> (descriptor indices, segments)

    # -- raw ring access (also for making bad rings on purpose) --------------------------------

    def write_desc(self, i, addr, length, flags=0, next_=0, *, table=None):
        base = self.desc if table is None else table
        self.ram.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, next_))

    def make_available(self, head):
        """Put ``head`` in the avail ring and publish the new avail idx."""
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, value):
        self.avail_idx = value & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags):
        self.ram.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, value):
        self.ram.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def used_idx(self):
        return struct.unpack("<H", self.ram.read(self.used + 2, 2))[0]

    def used_flags(self):
        return struct.unpack("<H", self.ram.read(self.used, 2))[0]

    def avail_event(self):
        return struct.unpack("<H", self.ram.read(self.used + 4 + 8 * self.size, 2))[0]

    # -- buffers -----------------------------------------------------------------------------

    def add_chain(self, segments, *, indirect=False):
        """Make a chain of ``segments`` [(gpa, length, device_writable)] available; its head.

        ``indirect=True`` puts the segments in an indirect table (one descriptor
        in the ring).
        """
        if indirect:
            if len(segments) > 16:
                raise ValueError("at most 16 segments per indirect table here")
            head = self.free.pop(0)
            table = self.indirect_tables + 256 * head
            for i, (gpa, length, writable) in enumerate(segments):
                last = i == len(segments) - 1
                flags = (c.DESC_F_WRITE if writable else 0) | (0 if last else c.DESC_F_NEXT)
                self.write_desc(i, gpa, length, flags, i + 1, table=table)
            self.write_desc(head, table, 16 * len(segments), c.DESC_F_INDIRECT)
            used_descs = [head]
        else:
            if len(segments) > len(self.free):
                raise ValueError(f"{len(segments)} segments but {len(self.free)} free descriptors")
            used_descs = [self.free.pop(0) for _ in segments]
            for n, (i, (gpa, length, writable)) in enumerate(zip(used_descs, segments)):
                last = n == len(segments) - 1
                flags = (c.DESC_F_WRITE if writable else 0) | (0 if last else c.DESC_F_NEXT)
                self.write_desc(i, gpa, length, flags, 0 if last else used_descs[n + 1])
            head = used_descs[0]
        self.outstanding[head] = (used_descs, list(segments))
        self.make_available(head)
        return head

    def post(self, readable=(), writable=(), *, indirect=False):
        """Post a chain: ``readable`` byte strings, then ``writable`` sizes; its head.

        Data goes in the per-descriptor slots (each at most ``buf_size``).
        """
        segments = []
        n = len(self.free)
        slot_ids = list(self.free[:len(readable) + len(writable)])
        if len(slot_ids) < len(readable) + len(writable) or not n:
            raise ValueError("not enough free descriptors")
        for data, sid in zip(readable, slot_ids):
            if len(data) > self.buf_size:
                raise ValueError(f"{len(data)} bytes > slot size {self.buf_size}")
            gpa = self.slots + sid * self.buf_size
            self.ram.write(gpa, data)
            segments.append((gpa, len(data), False))
        for size, sid in zip(writable, slot_ids[len(readable):]):
            if size > self.buf_size:
                raise ValueError(f"{size} bytes > slot size {self.buf_size}")
            segments.append((self.slots + sid * self.buf_size, size, True))
        return self.add_chain(segments, indirect=indirect)

    def notify(self):
        """Write QueueNotify for this queue."""
        self.driver.write(c.REG_QUEUE_NOTIFY, self.index)

    def needs_notify(self, old_avail_idx):
        """With EVENT_IDX: would the driver notify after moving avail idx from ``old_avail_idx``?"""
        event = self.avail_event()
        return ((self.avail_idx - event - 1) & 0xFFFF) < ((self.avail_idx - old_avail_idx) & 0xFFFF)

    def get_used(self, *, read_data=True):
        """Used buffers since the last call; their descriptors become free again.

        Also sets used_event to the new used index (the driver wants an
        interrupt for the next one, as Linux does when it re-enables callbacks).
        """
        out = []
        idx = self.used_idx()
        while self.last_used_idx != idx:
            slot = self.last_used_idx % self.size
            head, length = struct.unpack("<II", self.ram.read(self.used + 4 + 8 * slot, 8))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            descs, segments = self.outstanding.pop(head, ([], []))
            self.free.extend(descs)
            data = b""
            if read_data:
                remaining, parts = length, []
                for gpa, seg_len, writable in segments:
                    if writable and remaining > 0:
                        take = min(seg_len, remaining)
                        parts.append(self.ram.read(gpa, take))
                        remaining -= take
                data = b"".join(parts)
            out.append(UsedBuffer(head, length, data, segments))
        self.set_used_event(self.last_used_idx)
        return out


class VirtioDriver:
    """The guest driver of one virtio-mmio device at ``window``."""

    def __init__(self, mmio, window, ram):
        self.mmio, self.window, self.ram = mmio, window, ram
        self.queues = {}

    # -- registers ---------------------------------------------------------------------------

    def read(self, offset, size=4):
        handled, value = self.mmio(self.window + offset, 0, False, size)
        if not handled:
            raise AssertionError(f"read of 0x{self.window + offset:x} was not handled")
        return value

    def write(self, offset, value, size=4):
        handled, _ = self.mmio(self.window + offset, value, True, size)
        if not handled:
            raise AssertionError(f"write of 0x{self.window + offset:x} was not handled")

    def read_config(self, offset, size=4):
        return self.read(c.REG_CONFIG + offset, size)

    def write_config(self, offset, value, size=4):
        self.write(c.REG_CONFIG + offset, value, size)

    @property
    def status(self):
        return self.read(c.REG_STATUS)

    def set_status(self, bits):
        """OR ``bits`` into the status, as a driver does; returns the status read back."""
        self.write(c.REG_STATUS, self.status | bits)
        return self.status

    def reset(self):
        self.write(c.REG_STATUS, 0)
        self.queues.clear()

    def interrupt_status(self):
        return self.read(c.REG_INTERRUPT_STATUS)

    def ack_interrupt(self, bits=None):
        """Acknowledge ``bits`` (default: whatever is set); returns the bits acknowledged."""
        if bits is None:
            bits = self.interrupt_status()
        if bits:
            self.write(c.REG_INTERRUPT_ACK, bits)
        return bits

    # -- initialisation (3.1.1) ------------------------------------------------------------------

    def device_features(self):
        out = 0
        for sel in (0, 1):
            self.write(c.REG_DEVICE_FEATURES_SEL, sel)
            out |= self.read(c.REG_DEVICE_FEATURES) << (32 * sel)
        return out

    def write_driver_features(self, features):
        for sel in (0, 1):
            self.write(c.REG_DRIVER_FEATURES_SEL, sel)
            self.write(c.REG_DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)

    def negotiate(self, features=None, *, drop=0):
        """Reset, ACKNOWLEDGE, DRIVER, accept ``features`` (default: all offered, minus
        ``drop``), FEATURES_OK. Returns (FEATURES_OK accepted, features written)."""
        self.reset()
        self.set_status(c.STATUS_ACKNOWLEDGE)
        self.set_status(c.STATUS_DRIVER)
        if features is None:
            features = self.device_features() & ~drop
        self.features = features
        self.write_driver_features(features)
        ok = bool(self.set_status(c.STATUS_FEATURES_OK) & c.STATUS_FEATURES_OK)
        return ok, features

    def has_feature(self, feature_bit):
        return bool(self.features & bit(feature_bit))

    def setup_queue(self, index, size=None, *, buf_size=4096, **addresses):
        """Allocate rings in RAM, program queue ``index`` and set QueueReady."""
        self.write(c.REG_QUEUE_SEL, index)
        maximum = self.read(c.REG_QUEUE_NUM_MAX)
        if not maximum:
            raise AssertionError(f"queue {index} does not exist")
        size = size or maximum
        queue = DriverQueue(self, index, size, buf_size=buf_size, **addresses)
        self.write(c.REG_QUEUE_NUM, size)
        for reg, addr in ((c.REG_QUEUE_DESC_LOW, queue.desc), (c.REG_QUEUE_DRIVER_LOW, queue.avail),
                          (c.REG_QUEUE_DEVICE_LOW, queue.used)):
            self.write(reg, addr & 0xFFFFFFFF)
            self.write(reg + 4, addr >> 32)
        self.write(c.REG_QUEUE_READY, 1)
        self.queues[index] = queue
        return queue

    def setup_legacy_queue(self, index, size=None, *, page_size=4096, align=4096, buf_size=4096):
        """The Version 1 way: GuestPageSize, QueueAlign, QueuePFN (contiguous rings)."""
        self.write(c.REG_GUEST_PAGE_SIZE, page_size)
        self.write(c.REG_QUEUE_SEL, index)
        size = size or self.read(c.REG_QUEUE_NUM_MAX)
        avail_len = 6 + 2 * size
        used_off = (16 * size + avail_len + align - 1) & ~(align - 1)
        base = self.ram.alloc(used_off + 6 + 8 * size, page_size)
        queue = DriverQueue(self, index, size, buf_size=buf_size, desc=base,
                            avail=base + 16 * size, used=base + used_off)
        self.write(c.REG_QUEUE_NUM, size)
        self.write(c.REG_QUEUE_ALIGN, align)
        self.write(c.REG_QUEUE_PFN, base // page_size)
        self.queues[index] = queue
        return queue

    def driver_ok(self):
        return self.set_status(c.STATUS_DRIVER_OK)

    def init(self, queues, features=None, *, drop=0, buf_size=4096, size=None):
        """negotiate + set up ``queues`` (indices, each of ``size`` entries, default
        QueueNumMax) + DRIVER_OK; returns the DriverQueues."""
        ok, _ = self.negotiate(features, drop=drop)
        if not ok:
            raise AssertionError(f"FEATURES_OK refused (status 0x{self.status:x})")
        out = [self.setup_queue(i, size, buf_size=buf_size) for i in queues]
        self.driver_ok()
        return out
