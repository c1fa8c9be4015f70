"""Descriptor chains (VirtIO 1.2 section 2.7.5): the one walk over a queue's descriptor
table, where every guest value in a chain is checked, each guard naming the rule.

``DescriptorTable.walk(head, indirect)`` gives a ``DescriptorChain`` (the chain's
non-empty buffers as memoryviews of guest RAM) or, for a bad chain, the broken rule as
a string, which ``avatar_hw.virtio.queue`` completes with length 0: a ``next`` index >=
the table size; more descriptors than the queue size, counting an indirect table's
entries (2.7.5.3.1; it also ends loops); a buffer outside the VM's RAM; an indirect
descriptor without VIRTIO_F_RING_INDIRECT_DESC, with NEXT set, inside an indirect table,
or whose table is empty, not a multiple of 16 bytes, or outside RAM; a device-readable
descriptor after a device-writable one; more than 2**32 - 1 bytes in all.

Speed: an indirect table of the shape Linux always gives (``linear_table``) is checked a
column at a time in C, not entry by entry (a 512 KiB 9p read is ~127 entries), and its
buffers that follow each other in RAM become one view; any other table goes through the
walk's loop, which names what is wrong.
"""

import struct

from .constants import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE
from .memory import GuestMemoryError

MAX_CHAIN_BYTES = 0xFFFFFFFF
DESCRIPTOR = struct.Struct("<QIHH")       # addr, len, flags, next (2.7.5)


class DescriptorChain:
    """One available buffer: ``readable`` (driver -> device) and ``writable``
    (device -> driver) memoryviews into guest RAM, in descriptor order; ``generation``:
    its queue's generation when it was popped (``Virtqueue.add_used`` refuses a chain
    from before the queue's last reset)."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len",
                 "generation")

    def __init__(self, head, readable, writable, readable_len, writable_len, generation):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.generation = generation

    def __repr__(self):
        return (f"<DescriptorChain head={self.head} readable={self.readable_len} "
                f"writable={self.writable_len}>")


def linear_table(head, table, n, ram, base, end, generation):
    """The chain of an indirect ``table`` of ``n`` entries when it has the shape Linux gives
    every one (entry i links to i + 1, the last has no NEXT, device-readable buffers first,
    none empty, all inside RAM, at most 2**32 - 1 bytes), read a column at a time in C, each
    field once; None for any other table, which the walk then follows entry by entry (and
    finds what is wrong with it). What this accepts, the walk accepts with the same bytes, in
    fewer views where buffers follow each other in RAM."""
    halves = table.cast("H")
    flags = halves[6::8].tolist()
    body = flags[:-1]
    readable = body.count(DESC_F_NEXT)
    if (readable + body.count(DESC_F_NEXT | DESC_F_WRITE) != n - 1
            or body[:readable].count(DESC_F_NEXT) != readable):
        return None
    if flags[-1] == 0 and readable == n - 1:
        readable = n
    elif flags[-1] != DESC_F_WRITE:
        return None
    if halves[7:8 * n - 8:8].tolist() != list(range(1, n)):
        return None
    addrs = table.cast("Q")[::2].tolist()
    lens = table.cast("I")[2::4].tolist()
    if 0 in lens or min(addrs) < base or max(addrs) + max(lens) > end:
        return None                               # (the last test is the walk's, or stricter)
    readable_len, writable_len = sum(lens[:readable]), sum(lens[readable:])
    if readable_len + writable_len > MAX_CHAIN_BYTES:
        return None
    starts = [addr - base for addr in addrs]
    return DescriptorChain(head, runs(ram, starts, lens, 0, readable),
                           runs(ram, starts, lens, readable, n), readable_len, writable_len,
                           generation)


def runs(ram, starts, lens, first, stop):
    """Views of ``ram`` for buffers ``first`` .. ``stop - 1``: one per run of buffers that
    follow each other in RAM (a guest's pages mostly do: 94 % of a Linux 9p read's)."""
    views = []
    i = first
    while i < stop:
        start = starts[i]
        end = start + lens[i]
        i += 1
        while i < stop and starts[i] == end:
            end += lens[i]
            i += 1
        views.append(ram[start:end])
    return views


class DescriptorTable:
    """A ready queue's descriptor table of ``size`` entries at ``addr`` in ``memory``
    (checked inside it by ``Virtqueue.set_up``), the chains of the queue's ``generation``;
    ``walked``: the descriptors the last ``walk`` read, which the queue charges to its
    turn."""

    __slots__ = ("memory", "size", "generation", "walked", "_view")

    def __init__(self, memory, addr, size, generation):
        self.memory, self.size, self.generation, self.walked = memory, size, generation, 0
        self._view = memory.view(addr, DESC_SIZE * size)

    def walk(self, head, indirect):
        """Follow the chain at ``head`` (``indirect``: VIRTIO_F_RING_INDIRECT_DESC was
        negotiated): a DescriptorChain, or the broken rule as a string."""
        memory = self.memory
        ram, base, end = memory.data, memory.base, memory.end
        unpack, table = DESCRIPTOR.unpack_from, self._view     # one read of each descriptor
        readable, writable = [], []
        readable_len = writable_len = 0
        index, table_size, nested, writing = head, self.size, False, False
        budget = self.size                    # descriptors the chain may still have
        try:
            while True:
                if not budget:
                    return (f"more than {self.size} descriptors (2.7.5.3.1: \"A driver MUST "
                            f"NOT create a descriptor chain longer than the Queue Size of the "
                            f"device\"; a loop?)")
                budget -= 1
                # Each field is read once: the guest may change it under our feet.
                addr, length, flags, nxt = unpack(table, index << 4)
                if flags & DESC_F_INDIRECT:
                    if nested:
                        return "indirect descriptor inside an indirect table"
                    if not indirect:
                        return "indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC"
                    if flags & DESC_F_NEXT:
                        return "indirect descriptor with the NEXT flag"
                    if not length or length % DESC_SIZE:
                        return f"indirect table length {length} is not a non-zero multiple of 16"
                    budget += 1                   # the table's entries are the chain
                    if length // DESC_SIZE > budget:
                        return (f"indirect table of {length // DESC_SIZE} entries makes the "
                                f"chain longer than the queue size {self.size} (2.7.5.3.1: "
                                f"\"A driver MUST NOT create a descriptor chain longer than "
                                f"the Queue Size of the device\")")
                    try:
                        table = memory.view(addr, length)
                    except GuestMemoryError:
                        return f"indirect table 0x{addr:x}+0x{length:x} is outside RAM"
                    table_size = length // DESC_SIZE
                    if not readable and not writing:
                        chain = linear_table(head, table, table_size, ram, base, end,
                                             self.generation)
                        if chain is not None:
                            budget -= table_size
                            return chain
                    index, nested = 0, True
                    continue
                if addr < base or addr + length > end:
                    return f"buffer 0x{addr:x}+0x{length:x} is outside RAM"
                if flags & DESC_F_WRITE:
                    writing = True
                    if length:                    # empty descriptors are skipped
                        writable.append(ram[addr - base:addr - base + length])
                        writable_len += length
                elif writing:
                    return "device-readable descriptor after a device-writable one"
                elif length:
                    readable.append(ram[addr - base:addr - base + length])
                    readable_len += length
                if readable_len + writable_len > MAX_CHAIN_BYTES:
                    return "chain longer than 2**32 - 1 bytes"
                if not flags & DESC_F_NEXT:
                    return DescriptorChain(head, readable, writable, readable_len, writable_len,
                                           self.generation)
                if nxt >= table_size:
                    return f"next index {nxt} >= table size {table_size}"
                index = nxt
        finally:
            self.walked = self.size - budget
