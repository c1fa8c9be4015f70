"""virtio-gpu 2D resources (``gpu.GpuDevice``'s): pixels in host memory, a backing of guest
RAM ranges, and the 2D operations on them — TRANSFER_TO_HOST_2D's copy, the RGB of a
rectangle for screenshots — and the EDID of the one mode.

A resource's pixels are anonymous memory of ``width * height * 4`` bytes (the device
checks its budget before making one). Its backing is kept as guest-physical ranges,
merged where they touch; a transfer turns the entries it crosses into views of guest
RAM, checked again (not all of them: a 1-pixel transfer over a backing of 16 384 entries
made 16 384 views). Row ``i`` of a transfer's rectangle comes from backing offset
``offset + stride * i`` (QEMU's rule), copied with memoryview slices, one slice per
backing entry a row crosses (one copy for full-width rectangles). A transfer works up to
the budget it is given and says how far it got: the device goes on from there in the
next turn.
"""

import bisect
import mmap
import struct
from itertools import accumulate

# formats (5.7.6.8): id -> byte offsets of red, green, blue in a pixel (memory order)
FORMATS = {1: (2, 1, 0), 2: (2, 1, 0),          # B8G8R8A8, B8G8R8X8
           3: (1, 2, 3), 4: (1, 2, 3),          # A8R8G8B8, X8R8G8B8
           67: (0, 1, 2), 134: (0, 1, 2),       # R8G8B8A8, R8G8B8X8
           68: (3, 2, 1), 121: (3, 2, 1)}       # X8B8G8R8, A8B8G8R8
BPP = 4

# A side of a resource: Linux's virtio-gpu never makes a framebuffer past 8192 (XRES_MAX,
# YRES_MAX); the cap bounds the rows one transfer copies row by row.
MAX_RESOURCE_DIMENSION = 8192
# The work of a transfer in bytes-equivalent, against the queue's turn budget: each byte
# copied, each row copied on its own ROW_COST more, each backing entry turned into a view
# ENTRY_COST more (an attach charges ENTRY_COST for each of its entries, which cost less).
# Calibrated by measurement, in process: 1-pixel-wide transfers of 8192 rows over one
# entry timed against 64x64 transfers over 16384 one-byte entries, a row took 1.2-1.7 us,
# an entry 2.2 us (1.3-1.9 rows: ENTRY_COST = 2 ROW_COST), an attach's entry 0.9-1.0 us;
# `python -m bench.hostile --heavy` ("gpu rows", "gpu fragmented") then shows turns of
# either about as long (docs/devices.md, "Hostile guests").
ROW_COST = 1024
ENTRY_COST = 2048


def merge(backing, ranges):
    """Append ``ranges`` ((gpa, length) pairs) to ``backing``, each joined to the last entry
    when it starts where that one ends."""
    for gpa, length in ranges:
        if backing and backing[-1][0] + backing[-1][1] == gpa:
            backing[-1] = (backing[-1][0], backing[-1][1] + length)
        else:
            backing.append((gpa, length))


def inside(x, y, w, h, width, height):
    """The rectangle lies inside a ``width`` x ``height`` image."""
    return x + w <= width and y + h <= height


class Resource:
    """A 2D resource: its pixels in host memory and its backing's guest ranges."""

    def __init__(self, resource_id, fmt, width, height):
        self.id, self.format, self.width, self.height = resource_id, fmt, width, height
        self.stride = width * BPP
        # anonymous memory: made at once, zero pages taken from the host as they are
        # written (a bytearray of 64 MiB took the event loop 0.1 s to fill with zeros)
        size = self.stride * height
        self.pixels = mmap.mmap(-1, size) if size else bytearray()   # QEMU makes 0 x h
        self.backing = None                     # [(gpa, length)], coalesced, no empty entry
        self.starts = []                        # offset of each entry in the backing
        self.backing_len = 0

    def attach(self, backing):
        """Back the resource with ``backing``: non-empty (gpa, length) ranges, ``merge``d."""
        ends = list(accumulate(length for _, length in backing))
        self.backing, self.starts = backing, [0, *ends][:-1]
        self.backing_len = ends[-1] if ends else 0

    def detach(self):
        self.backing, self.starts, self.backing_len = None, [], 0

    def copy_in(self, memory, views, src, dst, n, budget):
        """Copy backing bytes ``src ..`` (``n`` of them, inside the backing: checked by the
        caller) to pixel offset ``dst`` until they are copied or the work reaches ``budget``
        (a byte at least); ``views``: entry index -> its view of guest RAM, made (and checked
        against the RAM again by ``memory.view``) when a copy of this transfer's turn first
        crosses it. Returns (bytes copied, work)."""
        i = bisect.bisect_right(self.starts, src) - 1
        copied = work = 0
        while copied < n and work < budget:
            view = views.get(i)
            if view is None:
                view = views[i] = memory.view(*self.backing[i])
                work += ENTRY_COST
            within = src - self.starts[i]
            take = min(len(view) - within, n - copied, max(1, budget - work))
            self.pixels[dst:dst + take] = view[within:within + take]
            src, dst, copied, work = src + take, dst + take, copied + take, work + take
            i += within + take == len(view)
        return copied, work

    def transfer(self, memory, x, y, w, h, offset, done, budget):
        """Copy the rectangle (checked: inside the resource, its last byte inside the
        backing) from the backing at ``offset``, from its byte ``done`` (row by row) on,
        until it is all copied or the work (``ROW_COST``, ``ENTRY_COST``) reaches
        ``budget``. Returns (bytes of the rectangle copied so far, work)."""
        stride, row = self.stride, w * BPP
        dst, total = y * stride + x * BPP, row * h
        views = {}
        if row == stride:                       # full rows: one contiguous range
            copied, work = self.copy_in(memory, views, offset + done, dst + done,
                                        total - done, budget)
            return done + copied, work
        work = 0
        while done < total and work < budget:
            i, within = divmod(done, row)
            if not within:
                work += ROW_COST
            at = stride * i + within
            copied, spent = self.copy_in(memory, views, offset + at, dst + at, row - within,
                                         budget - work)
            done, work = done + copied, work + spent
        return done, work

    def capture(self, x, y, w, h):
        """A copy of the rectangle, taken now (the guest may change the resource after)."""
        stride, row = self.stride, w * BPP
        pixels = bytearray(row * h)
        for i in range(h):
            start = (y + i) * stride + x * BPP
            pixels[i * row:(i + 1) * row] = self.pixels[start:start + row]
        return Capture(w, h, pixels, FORMATS[self.format])


class Capture:
    """A rectangle of pixels copied out of a resource (``channels``: where red, green and
    blue sit in each 4-byte pixel), turned into RGB rows later, off the event loop."""

    def __init__(self, width, height, pixels, channels):
        self.width, self.height = width, height
        self.pixels, self.channels = pixels, channels

    def rgb_rows(self):
        """Each row as RGB bytes, top to bottom (one row at a time: a thread that converts
        a large screen holds the interpreter a row at a time, never the whole screen)."""
        row, out = self.width * BPP, bytearray(self.width * 3)
        for y in range(self.height):
            source = self.pixels[y * row:(y + 1) * row]
            for channel, at in enumerate(self.channels):
                out[channel::3] = source[at::BPP]
            yield bytes(out)

    def rgb(self):
        return b"".join(self.rgb_rows())


def edid(width, height, refresh=60):
    """A 128-byte EDID 1.4 base block whose preferred (detailed) timing is ``width`` x
    ``height`` (at most 4095 each) with reduced blanking, at ``refresh`` Hz or as near as
    the 16-bit pixel clock allows."""
    hblank, hfront, hsync = 160, 48, 32
    vblank, vfront, vsync = max(23, height // 30), 3, 6
    clock = min(0xFFFF, -(-(width + hblank) * (height + vblank) * refresh // 10000))
    mm_w, mm_h = width * 254 // 960, height * 254 // 960          # 96 dots per inch
    dtd = struct.pack("<H16B", clock, width & 0xFF, hblank & 0xFF,
                      (width >> 8) << 4 | hblank >> 8, height & 0xFF, vblank & 0xFF,
                      (height >> 8) << 4 | vblank >> 8, hfront, hsync, vfront << 4 | vsync,
                      0, mm_w & 0xFF, mm_h & 0xFF, (mm_w >> 8) << 4 | mm_h >> 8, 0, 0, 0x1E)
    maker = ((ord("A") - 64) << 10 | (ord("V") - 64) << 5 | (ord("H") - 64)).to_bytes(2, "big")
    block = bytearray(b"\x00\xff\xff\xff\xff\xff\xff\x00" + maker + struct.pack(
        "<HIBBBB", 0x1234, 1, 1, 36, 1, 4))                       # product, serial, 2026, v1.4
    block += bytes((0xA5, max(1, min(255, mm_w // 10)), max(1, min(255, mm_h // 10)),
                    120, 0x06))                                   # digital 8 bpc, 2.2, sRGB
    block += bytes((0xEE, 0x91, 0xA3, 0x54, 0x4C, 0x99, 0x26, 0x0F, 0x50, 0x54))  # sRGB
    block += bytes((0x21, 0x08, 0x00)) + b"\x01\x01" * 8          # 640x480, 800x600, 1024x768
    block += dtd
    block += b"\x00\x00\x00\xfc\x00" + b"avatar-hw\n".ljust(13, b" ")
    block += b"\x00\x00\x00\x10\x00" + bytes(13)
    block += b"\x00\x00\x00\x10\x00" + bytes(13)
    block += b"\x00"                                              # no extension
    block.append(-sum(block) & 0xFF)
    return bytes(block)
