"""virtio-gpu 2D through the driver-side harness: commands, transfers, screenshots, and every
malformed request answered with its error (never an exception, never outside the VM)."""

import base64
import json
import socket
import struct
import subprocess
import sys
import threading
import zlib
from xml.etree import ElementTree

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avatar_hw import png
from avatar_hw.config import load_config
from avatar_hw.control import ControlServer
from avatar_hw.devices import gpu as g
from avatar_hw.devices import gpu_resources as g_res
from avatar_hw.devices.gpu import GpuDevice
from avatar_hw.errors import ConfigError
from avatar_hw.testing.virtio import RAM_BASE, VirtioBench
from avatar_hw.virtio import constants as c
from test_console import loop  # noqa: F401 (fixture)
from test_control import replies
from test_fuzz import FUZZ, no_internal_errors

RAM_SIZE = 8 << 20
pytest_plugins = ["pytester"]
PAGE = 4096
BUF_SIZE = 8192                 # each driver buffer's
MAX_TURNS = 64                  # event-loop turns a request may take in these tests


def decode_png(data):
    """(width, height, rgb) of a PNG as png.encode writes it (filter 0 rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc, = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    row = width * 3
    assert all(raw[y * (row + 1)] == 0 for y in range(height))
    return width, height, b"".join(raw[y * (row + 1) + 1:(y + 1) * (row + 1)]
                                   for y in range(height))


class Gpu:
    """A GPU device in a VM with its two queues set up, and the requests a driver sends."""

    def __init__(self, loop, **kw):
        self.loop = loop
        self.bench = VirtioBench(GpuDevice(**kw), loop=loop, ram_size=RAM_SIZE)
        self.device, self.ram = self.bench.device, self.bench.ram
        self.ctrl, self.cursorq = self.bench.driver.init([0, 1], buf_size=BUF_SIZE)

    def post(self, kind, fmt="", *fields, extra=b"", resp=None, flags=0, fence=0, ctx=7,
             queue=None, cut=None):
        """Make one request available, not notified (one larger than a driver buffer, an
        attach of many entries, is read straight from RAM)."""
        body = g.HEADER.pack(kind, flags, fence, ctx, 0) + struct.pack("<" + fmt, *fields) + extra
        if cut is not None:
            body = body[:cut]
        queue = queue or self.ctrl
        writable = [] if queue is self.cursorq else [resp or g.RESPONSE_SIZE.get(kind, 24)]
        if len(body) > BUF_SIZE:
            at = self.ram.alloc(len(body) + sum(writable))
            self.ram.write(at, body)
            queue.add_chain([(at, len(body), False)]
                            + [(at + len(body), w, True) for w in writable])
        else:
            queue.post(readable=[body], writable=[w for w in writable if w])

    def request(self, kind, fmt="", *fields, queue=None, **kw):
        """Post one request and run the loop's turns until it is answered (an attach of
        many entries takes several); (response type, flags, fence_id, whole used data)."""
        queue = queue or self.ctrl
        self.post(kind, fmt, *fields, queue=queue, **kw)
        queue.notify()
        used, = self.answers(queue)
        if queue is self.cursorq or used.length < 24:
            return None, None, None, used
        kind, flags, fence, _ctx, _ = g.HEADER.unpack_from(used.data)
        return kind, flags, fence, used

    def answers(self, queue):
        """The used entries of ``queue``, after the loop's turns it takes for one to come."""
        answers = queue.get_used()
        for _ in range(MAX_TURNS):
            if answers:
                break
            self.loop.run_once(0)
            answers = queue.get_used()
        return answers

    def ok(self, kind, fmt="", *fields, **kw):
        answer = self.request(kind, fmt, *fields, **kw)
        assert answer[0] in (g.RESP_OK_NODATA, g.RESP_OK_DISPLAY_INFO, g.RESP_OK_EDID), \
            hex(answer[0])
        return answer[3]

    def err(self, kind, fmt="", *fields, **kw):
        return self.request(kind, fmt, *fields, **kw)[0]

    def create(self, rid, width, height, fmt=2):
        return self.err(g.CMD_RESOURCE_CREATE_2D, "IIII", rid, fmt, width, height)

    def attach(self, rid, entries):
        return self.err(g.CMD_RESOURCE_ATTACH_BACKING, "II", rid, len(entries),
                        extra=backing(entries))

    def transfer(self, rid, x, y, w, h, offset=0):
        return self.err(g.CMD_TRANSFER_TO_HOST_2D, "IIIIQI4x", x, y, w, h, offset, rid)

    def scanout(self, rid, x=0, y=0, w=None, h=None, scanout=0):
        return self.err(g.CMD_SET_SCANOUT, "IIIIII", x, y, w, h, scanout, rid)

    def flush(self, rid, x, y, w, h):
        return self.err(g.CMD_RESOURCE_FLUSH, "IIIII4x", x, y, w, h, rid)

    def framebuffer(self, rid, width, height, fmt=2, *, scattered=True):
        """A resource with a backing of single pages in reverse order (scattered), shown."""
        size = width * height * 4
        pages = -(-size // PAGE)
        base = self.ram.alloc(pages * PAGE, PAGE)
        order = range(pages - 1, -1, -1) if scattered else range(pages)
        entries = [(base + i * PAGE, PAGE) for i in order]
        assert self.create(rid, width, height, fmt) == g.RESP_OK_NODATA
        assert self.attach(rid, entries) == g.RESP_OK_NODATA
        return entries

    def write_backing(self, entries, data):
        """Write ``data`` into the backing ``entries`` (the guest's view of its buffer)."""
        pos = 0
        for gpa, length in entries:
            part = data[pos:pos + length]
            self.ram.write(gpa, part)
            pos += len(part)


def backing(entries):
    """An attach's entries ((gpa, length) pairs) as the request carries them."""
    return b"".join(g.MEM_ENTRY.pack(gpa, length) for gpa, length in entries)


def calls(monkeypatch, memory, name):
    """A list that gets an item at each call of ``memory``'s method ``name``."""
    made, real = [], getattr(memory, name)
    monkeypatch.setattr(memory, name, lambda *args: made.append(1) or real(*args))
    return made


@pytest.fixture
def gpu(loop):
    made = []

    def make(**kw):
        made.append(Gpu(loop, **kw))
        return made[-1]
    yield make
    for made_gpu in made:
        made_gpu.bench.subsystem.close()
        made_gpu.bench.check_guards()


def pattern(width, height, seed=0):
    return bytes((i * 7 + (i >> 10) * 13 + seed) & 0xFF for i in range(width * height * 4))


def rgb_of(bgrx, fmt_offsets=(2, 1, 0)):
    out = bytearray(len(bgrx) // 4 * 3)
    for channel, at in enumerate(fmt_offsets):
        out[channel::3] = bgrx[at::4]
    return bytes(out)


def test_identity_features_and_config(gpu):
    dev = gpu()
    drv = dev.bench.driver
    assert drv.read(c.REG_DEVICE_ID) == c.ID_GPU
    assert drv.device_features() & (1 << g.F_EDID)
    assert [drv.read_config(off) for off in (0, 4, 8, 12)] == [0, 0, 1, 0]
    drv.write(c.REG_QUEUE_SEL, 1)
    assert drv.read(c.REG_QUEUE_NUM_MAX) == 16
    dev.device.update_config(0, (3).to_bytes(4, "little"))        # events_read: 3
    drv.write_config(4, 1)                                        # events_clear: 1
    assert [drv.read_config(0), drv.read_config(4)] == [2, 0]


def test_display_info_and_edid(gpu):
    dev = gpu(width=800, height=600)
    used = dev.ok(g.CMD_GET_DISPLAY_INFO)
    assert used.length == g.DISPLAY_INFO_SIZE
    assert struct.unpack_from("<6I", used.data, 24) == (0, 0, 800, 600, 1, 0)
    assert used.data[48:] == bytes(len(used.data) - 48)      # the other 15 modes: off
    used = dev.ok(g.CMD_GET_EDID, "I4x", 0)
    size, = struct.unpack_from("<I", used.data, 24)
    block = used.data[32:32 + size]
    assert size == 128 and block[:8] == b"\x00\xff\xff\xff\xff\xff\xff\x00"
    assert sum(block) % 256 == 0 and block[18:20] == b"\x01\x04"
    dtd = block[54:72]
    assert dtd[2] | (dtd[4] >> 4) << 8 == 800 and dtd[5] | (dtd[7] >> 4) << 8 == 600
    assert dev.err(g.CMD_GET_EDID, "I4x", 1) == g.RESP_ERR_INVALID_PARAMETER


@pytest.mark.parametrize("fmt", sorted(g.FORMATS))
def test_transfer_flush_screenshot_equals_what_was_written(gpu, fmt):
    dev = gpu()
    w, h = 40, 30
    entries = dev.framebuffer(5, w, h, fmt)
    data = pattern(w, h, fmt)
    dev.write_backing(entries, data)
    assert dev.transfer(5, 0, 0, w, h) == g.RESP_OK_NODATA
    assert dev.scanout(5, 0, 0, w, h) == g.RESP_OK_NODATA
    assert dev.flush(5, 0, 0, w, h) == g.RESP_OK_NODATA
    shot = dev.device.screenshot()
    width, height, rgb = decode_png(png.encode(shot.width, shot.height, shot.rgb_rows()))
    assert (width, height) == (w, h)
    assert rgb == rgb_of(data, g.FORMATS[fmt])


def test_partial_transfers_copy_only_their_rectangle(gpu):
    dev = gpu()
    w, h = 64, 48
    entries = dev.framebuffer(1, w, h)
    first, second = pattern(w, h, 1), pattern(w, h, 99)
    dev.write_backing(entries, first)
    assert dev.transfer(1, 0, 0, w, h) == g.RESP_OK_NODATA
    dev.write_backing(entries, second)
    x, y, rw, rh = 5, 7, 20, 9                          # Linux: offset of the first pixel
    assert dev.transfer(1, x, y, rw, rh, offset=y * w * 4 + x * 4) == g.RESP_OK_NODATA
    expect = bytearray(first)
    for row in range(y, y + rh):
        start = row * w * 4 + x * 4
        expect[start:start + rw * 4] = second[start:start + rw * 4]
    assert bytes(dev.device.resources[1].pixels) == expect
    assert dev.scanout(1, 16, 16, 32, 16) == g.RESP_OK_NODATA      # a window of it
    rgb = dev.device.screenshot().rgb()
    crop = b"".join(expect[(16 + r) * w * 4 + 64:(16 + r) * w * 4 + 64 + 128] for r in range(16))
    assert rgb == rgb_of(crop)


def test_fence_is_answered_with_the_same_id(gpu):
    dev = gpu()
    kind, flags, fence, _ = dev.request(g.CMD_RESOURCE_CREATE_2D, "IIII", 1, 2, 16, 16,
                                        flags=g.FLAG_FENCE, fence=0x1122334455)
    assert (kind, flags, fence) == (g.RESP_OK_NODATA, g.FLAG_FENCE, 0x1122334455)
    kind, flags, fence, _ = dev.request(g.CMD_RESOURCE_UNREF, "I4x", 9, flags=g.FLAG_FENCE,
                                        fence=3)
    assert (kind, flags, fence) == (g.RESP_ERR_INVALID_RESOURCE_ID, g.FLAG_FENCE, 3)
    assert dev.request(g.CMD_RESOURCE_UNREF, "I4x", 1, fence=5)[1:3] == (0, 0)   # no flag
    for kind, fmt, fields in ((0xDEAD, "", ()), (g.CMD_RESOURCE_CREATE_2D, "I", (2,))):
        answer = dev.request(kind, fmt, *fields, flags=g.FLAG_FENCE | 2, fence=11)[:3]
        assert answer[1:] == (g.FLAG_FENCE, 11), answer      # unknown, short: fenced too


def test_unref_detach_and_memory_is_given_back(gpu):
    dev = gpu(width=64, height=64, max_memory=64 * 64 * 4 * 2, max_resources=3)
    dev.framebuffer(1, 64, 64)
    assert dev.create(2, 64, 64) == g.RESP_OK_NODATA
    assert dev.create(3, 1, 1) == g.RESP_ERR_OUT_OF_MEMORY              # bytes
    assert dev.scanout(1, 0, 0, 64, 64) == g.RESP_OK_NODATA
    assert dev.err(g.CMD_RESOURCE_DETACH_BACKING, "I4x", 1) == g.RESP_OK_NODATA
    assert dev.err(g.CMD_RESOURCE_DETACH_BACKING, "I4x", 1) == g.RESP_ERR_UNSPEC  # as QEMU
    assert dev.transfer(1, 0, 0, 1, 1) == g.RESP_ERR_UNSPEC              # no backing
    assert dev.scanout(1, 0, 0, 64, 64) == g.RESP_ERR_UNSPEC
    assert dev.err(g.CMD_RESOURCE_UNREF, "I4x", 1) == g.RESP_OK_NODATA
    assert dev.device.screenshot() is None                               # scanout went with it
    assert dev.device.memory_used == 64 * 64 * 4
    assert dev.create(3, 64, 64) == g.RESP_OK_NODATA
    assert dev.create(4, 1, 1) == g.RESP_ERR_OUT_OF_MEMORY
    assert dev.err(g.CMD_RESOURCE_UNREF, "I4x", 3) == g.RESP_OK_NODATA
    assert dev.create(4, 1, 1) == g.RESP_OK_NODATA
    assert dev.create(5, 1, 1) == g.RESP_OK_NODATA
    assert dev.create(6, 1, 1) == g.RESP_ERR_OUT_OF_MEMORY              # max_resources
    assert dev.device.info()["resources"] == 3
    dev.bench.driver.reset()                                             # reset frees all
    assert dev.device.resources == {} and dev.device.memory_used == 0
    assert dev.device.info()["resources"] == 0


def test_backing_entries_held_by_all_resources_are_bounded(gpu):
    """Each backing entry is kept in host memory: 1024 tiny resources with 16384 scattered
    entries each would hold 16 million; all resources together hold at most one entry per
    page of ``max_memory`` and one per resource (what Linux's page-backed buffers need)."""
    dev = gpu(width=64, height=64, max_memory=64 * 64 * 4 * 4, max_resources=8)
    limit = dev.device.max_backing_entries
    assert limit == 64 * 64 * 4 * 4 // 4096 + 8 == 24
    base = dev.ram.alloc(64 * PAGE, PAGE)
    scattered = [(base + 2 * i * PAGE, 16) for i in range(20)]           # none touch
    for rid in (1, 2):
        assert dev.create(rid, 1, 1) == g.RESP_OK_NODATA
    assert dev.attach(1, scattered) == g.RESP_OK_NODATA
    assert dev.attach(2, scattered) == g.RESP_ERR_OUT_OF_MEMORY          # 40 > 24
    assert dev.device.resources[2].backing is None                       # nothing kept
    assert dev.attach(2, scattered[:4]) == g.RESP_OK_NODATA              # 24: fits
    assert dev.err(g.CMD_RESOURCE_DETACH_BACKING, "I4x", 1) == g.RESP_OK_NODATA
    assert dev.attach(2, scattered) == g.RESP_ERR_UNSPEC                 # already backed
    touching = [(base + i * PAGE, PAGE) for i in range(64)]              # merged into one
    assert dev.attach(1, touching) == g.RESP_OK_NODATA
    assert len(dev.device.resources[1].backing) == 1


def test_cursor_queue(gpu):
    dev = gpu()
    entries = dev.framebuffer(9, 64, 64)
    image = pattern(64, 64, 5)
    dev.write_backing(entries, image)
    assert dev.transfer(9, 0, 0, 64, 64) == g.RESP_OK_NODATA
    cursor = g.CMD_UPDATE_CURSOR
    dev.request(cursor, "III4xIII4x", 0, 10, 20, 9, 3, 4, queue=dev.cursorq)
    assert dev.device.info()["cursor"] == {"resource_id": 9, "hot_x": 3, "hot_y": 4, "x": 10,
                                           "y": 20}
    assert dev.device.cursor["image"] == image              # the pixels as transferred
    dev.write_backing(entries, pattern(64, 64, 6))
    assert dev.transfer(9, 0, 0, 64, 64) == g.RESP_OK_NODATA
    assert dev.device.cursor["image"] == image              # a copy: kept until the next update
    dev.request(g.CMD_MOVE_CURSOR, "III4xIII4x", 0, 50, 60, 0, 0, 0, queue=dev.cursorq)
    assert dev.device.cursor["x"] == 50 and dev.device.cursor["y"] == 60
    errors = dev.device.counters["errors"]
    for bad in ((cursor, 0, 0, 0, 77, 0, 0), (cursor, 1, 0, 0, 9, 0, 0)):   # no resource, scanout
        _, _, _, used = dev.request(bad[0], "III4xIII4x", *bad[1:], queue=dev.cursorq)
        assert used.length == 0
    assert dev.device.counters["errors"] == errors + 2
    assert dev.create(10, 32, 32) == g.RESP_OK_NODATA
    dev.request(cursor, "III4xIII4x", 0, 0, 0, 10, 0, 0, queue=dev.cursorq)   # not 64x64
    assert dev.device.cursor["resource_id"] == 9 and dev.device.cursor["image"] == image
    dev.request(cursor, "III4xIII4x", 0, 1, 2, 9, 0, 0, queue=dev.cursorq)    # again: new copy
    assert dev.device.cursor["image"] == pattern(64, 64, 6)
    dev.request(cursor, "III4xIII4x", 0, 0, 0, 0, 0, 0, queue=dev.cursorq)    # hide
    assert dev.device.cursor is None
    assert dev.err(cursor, "III4xIII4x", 0, 0, 0, 9, 0, 0) == g.RESP_ERR_UNSPEC  # on controlq


def test_malformed_requests_get_their_errors(gpu):
    dev = gpu(max_memory=8 << 20, max_resources=8)
    ram_end = RAM_BASE + RAM_SIZE
    entries = dev.framebuffer(1, 64, 64)
    E = g
    cases = [
        # create
        (dev.create(0, 16, 16), E.RESP_ERR_INVALID_RESOURCE_ID),
        (dev.create(1, 16, 16), E.RESP_ERR_INVALID_RESOURCE_ID),          # in use
        (dev.create(2, 16, 16, fmt=5), E.RESP_ERR_INVALID_PARAMETER),     # no such format
        (dev.create(5, 0, 16), E.RESP_OK_NODATA),                          # QEMU's: empty
        (dev.create(2, 0xFFFFFFFF, 0xFFFFFFFF), E.RESP_ERR_OUT_OF_MEMORY),  # huge: no alloc
        (dev.create(2, 2049, 1024), E.RESP_ERR_OUT_OF_MEMORY),            # just over budget
        # unknown resources
        (dev.err(E.CMD_RESOURCE_UNREF, "I4x", 2), E.RESP_ERR_INVALID_RESOURCE_ID),
        (dev.attach(2, [(RAM_BASE, 4096)]), E.RESP_ERR_INVALID_RESOURCE_ID),
        (dev.transfer(2, 0, 0, 1, 1), E.RESP_ERR_INVALID_RESOURCE_ID),
        (dev.flush(2, 0, 0, 1, 1), E.RESP_ERR_INVALID_RESOURCE_ID),
        (dev.scanout(2, 0, 0, 16, 16), E.RESP_ERR_INVALID_RESOURCE_ID),
        (dev.err(E.CMD_RESOURCE_DETACH_BACKING, "I4x", 2), E.RESP_ERR_INVALID_RESOURCE_ID),
        # rectangles
        (dev.transfer(1, 60, 0, 5, 1), E.RESP_ERR_INVALID_PARAMETER),
        (dev.transfer(1, 0, 64, 1, 1), E.RESP_ERR_INVALID_PARAMETER),
        (dev.transfer(1, 0xFFFFFFFF, 0, 2, 1), E.RESP_ERR_INVALID_PARAMETER),  # x + w wraps
        (dev.transfer(1, 0, 0, 64, 64, offset=4), E.RESP_ERR_INVALID_PARAMETER),  # past backing
        (dev.transfer(1, 0, 0, 1, 1, offset=1 << 63), E.RESP_ERR_INVALID_PARAMETER),
        (dev.flush(1, 0, 0, 65, 1), E.RESP_ERR_INVALID_PARAMETER),
        (dev.scanout(1, 0, 0, 15, 64), E.RESP_ERR_INVALID_PARAMETER),     # below 16x16
        (dev.scanout(1, 1, 0, 64, 64), E.RESP_ERR_INVALID_PARAMETER),
        (dev.scanout(1, 0, 0, 64, 64, scanout=1), E.RESP_ERR_INVALID_SCANOUT_ID),
        # backing
        (dev.attach(1, [(RAM_BASE, 4096)]), E.RESP_ERR_UNSPEC),           # already backed
    ]
    assert dev.create(3, 16, 16) == E.RESP_OK_NODATA
    cases += [
        (dev.attach(3, [(ram_end - 4096, 4097)]), E.RESP_ERR_UNSPEC),     # crosses the end
        (dev.attach(3, [(RAM_BASE - 4096, 4096)]), E.RESP_ERR_UNSPEC),    # below the RAM
        (dev.attach(3, [(RAM_BASE, 4096), (0xFFFFFFFFFFFFF000, 0x2000)]), E.RESP_ERR_UNSPEC),
        (dev.err(E.CMD_RESOURCE_ATTACH_BACKING, "II", 3, 100000), E.RESP_ERR_UNSPEC),
        (dev.err(E.CMD_RESOURCE_ATTACH_BACKING, "II", 3, 2,
                 extra=bytes(16)), E.RESP_ERR_UNSPEC),                     # 1 of 2 entries
        (dev.attach(3, [(RAM_BASE, 16), (RAM_BASE + 64, 0)]), E.RESP_ERR_UNSPEC),  # empty
        (dev.attach(3, [(RAM_BASE, 16)]), E.RESP_OK_NODATA),              # too short for...
        (dev.transfer(3, 0, 0, 16, 16), E.RESP_ERR_INVALID_PARAMETER),    # ...a transfer
        # short and unknown requests
        (dev.err(E.CMD_RESOURCE_CREATE_2D, "III", 4, 2, 16), E.RESP_ERR_INVALID_PARAMETER),
        (dev.err(E.CMD_GET_DISPLAY_INFO, cut=20), E.RESP_ERR_UNSPEC),
        (dev.err(0x0200), E.RESP_ERR_UNSPEC),                              # 3D: not offered
        (dev.err(0x010C), E.RESP_ERR_INVALID_PARAMETER),                   # blob: as QEMU
        (dev.err(0x010D), E.RESP_ERR_INVALID_PARAMETER),
        (dev.err(0xDEAD), E.RESP_ERR_UNSPEC),
        (dev.err(E.CMD_GET_DISPLAY_INFO, resp=24), E.RESP_ERR_UNSPEC),    # no room for it
    ]
    for got, expected in cases:
        assert got == expected, [(hex(a), hex(b)) for a, b in cases]
    assert 4 not in dev.device.resources
    assert dev.device.memory_used == 64 * 64 * 4 + 16 * 16 * 4
    assert dev.device.counters["errors"] == len(cases) - 2
    # a response with no room for a header: used length 0, still no exception
    assert dev.request(g.CMD_GET_DISPLAY_INFO, resp=10)[3].length == 0
    dev.ctrl.post(readable=[b"\0" * 24])
    dev.ctrl.notify()
    assert [u.length for u in dev.ctrl.get_used()] == [0]
    assert dev.bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET == 0
    # the good resource still works
    dev.write_backing(entries, pattern(64, 64))
    assert dev.transfer(1, 0, 0, 64, 64) == g.RESP_OK_NODATA


def test_backing_entries_may_be_any_size_and_order(gpu):
    dev = gpu()
    w, h = 33, 17                                           # rows cross entries
    size = w * h * 4
    pieces = [100, 1, 4096, 7, 0, size]                     # the last one longer than needed
    entries = [(dev.ram.alloc(n + 8, 8), n) for n in pieces]
    assert dev.create(2, w, h, fmt=67) == g.RESP_OK_NODATA
    assert dev.attach(2, entries) == g.RESP_ERR_UNSPEC      # QEMU's: an empty piece
    entries = [(gpa, n) for gpa, n in entries if n]
    assert dev.attach(2, entries) == g.RESP_OK_NODATA
    data = pattern(w, h, 5)
    dev.write_backing(entries, data)
    assert dev.transfer(2, 0, 0, w, h) == g.RESP_OK_NODATA
    assert bytes(dev.device.resources[2].pixels) == data
    pixels = dev.device.resources[2].pixels
    pixels[:] = bytes(len(pixels))                          # the partial one must copy
    assert dev.transfer(2, 1, 1, w - 1, h - 1, offset=w * 4 + 4) == g.RESP_OK_NODATA
    rows = [data[y * w * 4:(y + 1) * w * 4] for y in range(h)]
    expected = b"".join(bytes(w * 4) if y == 0 else bytes(4) + row[4:]
                        for y, row in enumerate(rows))
    assert bytes(dev.device.resources[2].pixels) == expected


def test_transfers_count_against_the_turn_budget(gpu, loop):
    """A queue of large transfers is served 8 MiB (TURN_BYTES) per turn, the rest on the
    event loop's next turns: one notify cannot hold the daemon for a whole queue of them.
    The chains' own bytes count too, so the 8th frame is cut short and finished first in
    the next turn."""
    from avatar_hw.virtio.queue import TURN_BYTES
    dev = gpu(max_memory=16 << 20)
    side = 512                                              # 1 MiB a frame
    base = dev.ram.alloc(side * side * 4, PAGE)
    assert dev.create(1, side, side) == g.RESP_OK_NODATA
    assert dev.attach(1, [(base, side * side * 4)]) == g.RESP_OK_NODATA
    for _ in range(10):
        dev.ctrl.post(readable=[g.HEADER.pack(g.CMD_TRANSFER_TO_HOST_2D, 0, 0, 0, 0)
                                + struct.pack("<IIIIQI4x", 0, 0, side, side, 0, 1)],
                      writable=[24])
    dev.ctrl.notify()
    assert len(dev.ctrl.get_used()) == TURN_BYTES // (side * side * 4) - 1
    loop.run_once(0)
    assert len(dev.ctrl.get_used()) == 3


def test_attach_of_no_entries_leaves_the_resource_without_backing(gpu):
    """QEMU 7.2: ATTACH_BACKING with nr_entries 0 answers OK and the resource stays
    unbacked (scanout, transfer and detach: ERR_UNSPEC; a second attach: OK)."""
    dev = gpu()
    assert dev.create(1, 16, 16) == g.RESP_OK_NODATA
    assert dev.attach(1, []) == g.RESP_OK_NODATA
    assert dev.scanout(1, 0, 0, 16, 16) == g.RESP_ERR_UNSPEC
    assert dev.transfer(1, 0, 0, 16, 16) == g.RESP_ERR_UNSPEC
    assert dev.err(g.CMD_RESOURCE_DETACH_BACKING, "I4x", 1) == g.RESP_ERR_UNSPEC
    assert dev.attach(1, [(dev.ram.alloc(1024, PAGE), 1024)]) == g.RESP_OK_NODATA


def one_byte_pieces(dev, entries=g.MAX_BACKING_ENTRIES):
    """``entries`` one-byte backing pieces in the VM's RAM, none touching."""
    base = dev.ram.alloc(2 * entries, 16)
    return [(base + 2 * i, 1) for i in range(entries)]


def fragmented(dev, rid, entries=16384):
    """A 64x64 resource over ``entries`` one-byte backing pieces, none touching."""
    pieces = one_byte_pieces(dev, entries)
    assert dev.create(rid, 64, 64) == g.RESP_OK_NODATA
    assert dev.attach(rid, pieces) == g.RESP_OK_NODATA
    return pieces


def test_a_transfer_over_a_fragmented_backing_stops_at_the_turn_budget(gpu, loop,
                                                                         monkeypatch):
    """A transfer over 16384 one-byte entries made 16384 views (~2 us each) in one turn,
    charged after the work: 26-54 ms held. Each turn now does what its budget pays for
    (counted: the views it makes), the transfer goes on in the next turns, its pixels right."""
    from avatar_hw.virtio.queue import TURN_BYTES
    dev = gpu()
    pieces = fragmented(dev, 1)
    data = pattern(64, 64, 3)
    dev.write_backing(pieces, data)
    made = calls(monkeypatch, dev.device.memory, "view")
    for rows in (30, 64):                        # the first one leaves little of the budget
        dev.post(g.CMD_TRANSFER_TO_HOST_2D, "IIIIQI4x", 0, 0, 64, rows, 0, 1)
    dev.ctrl.notify()
    answers, turns = dev.ctrl.get_used(), 0
    while len(answers) < 2:
        assert len(made) <= TURN_BYTES // g_res.ENTRY_COST + 1
        made.clear()
        loop.run_once(0)
        answers += dev.ctrl.get_used()
        turns += 1
    assert turns >= (30 + 64) * 64 * 4 * g_res.ENTRY_COST // TURN_BYTES
    assert [struct.unpack_from("<I", u.data)[0] for u in answers] == [g.RESP_OK_NODATA] * 2
    assert bytes(dev.device.resources[1].pixels) == data
    assert dev.device.counters["transfers"] == 2


def test_an_attach_behind_a_transfer_reads_what_the_turn_has_left(gpu, loop, monkeypatch):
    """An attach's entries are charged as they are read: behind a transfer that took half
    the turn, it reads what the turn has left and the rest in the next turn."""
    from avatar_hw.virtio.queue import TURN_BYTES
    dev = gpu(max_memory=32 << 20)
    width, height = 1024, TURN_BYTES // 2 // 4096             # 4 MiB: a full-width copy
    base = dev.ram.alloc(width * height * 4, PAGE)
    assert dev.create(1, width, height) == g.RESP_OK_NODATA
    assert dev.attach(1, [(base, width * height * 4)]) == g.RESP_OK_NODATA
    assert dev.create(2, 64, 64) == g.RESP_OK_NODATA
    count = TURN_BYTES * 5 // 8 // g_res.ENTRY_COST           # more than the turn has left
    dev.post(g.CMD_TRANSFER_TO_HOST_2D, "IIIIQI4x", 0, 0, width, height, 0, 1)
    dev.post(g.CMD_RESOURCE_ATTACH_BACKING, "II", 2, count,
             extra=backing(one_byte_pieces(dev, count)))
    read = calls(monkeypatch, dev.device.memory, "contains")
    dev.ctrl.notify()
    assert len(dev.ctrl.get_used()) == 1
    assert 0 < len(read) < count and dev.device.resources[2].backing is None
    loop.run_once(0)
    assert [struct.unpack_from("<I", u.data)[0] for u in dev.ctrl.get_used()] == [
        g.RESP_OK_NODATA]
    assert len(read) == count and len(dev.device.resources[2].backing) == count


def test_an_attach_of_many_entries_is_read_over_several_turns(gpu, loop, monkeypatch):
    """16384 entries cost four turns' budget (ENTRY_COST each) and were read in one turn.
    Each turn now reads what its budget pays for and holds the request (the resource
    without backing, the requests behind it waiting); the answer, with its fence, comes
    once all are read. Meanwhile another device's attach goes on in the same turns and the
    cursorq is served."""
    from avatar_hw.virtio.queue import TURN_BYTES
    devs, reads, pieces = [gpu(), gpu()], [], []
    for n, dev in enumerate(devs):
        pieces.append(one_byte_pieces(dev))
        assert dev.create(1, 64, 64) == g.RESP_OK_NODATA
        dev.post(g.CMD_RESOURCE_ATTACH_BACKING, "II", 1, len(pieces[n]),
                 extra=backing(pieces[n]), flags=g.FLAG_FENCE, fence=100 + n)
        dev.post(g.CMD_RESOURCE_FLUSH, "IIIII4x", 0, 0, 64, 64, 1)      # waits behind it
        reads.append(calls(monkeypatch, dev.device.memory, "contains"))
        dev.ctrl.notify()
    per_turn = TURN_BYTES // g_res.ENTRY_COST
    first = devs[0]
    first.request(g.CMD_MOVE_CURSOR, "III4xIII4x", 0, 5, 6, 0, 0, 0, queue=first.cursorq)
    turns, answers = 0, [[], []]
    while not all(answers):
        assert all(0 < len(read) <= per_turn for read in reads), [len(r) for r in reads]
        assert all(dev.device.resources[1].backing is None for dev in devs)
        for read in reads:
            read.clear()
        loop.run_once(0)
        turns += 1
        for n, dev in enumerate(devs):
            answers[n] += dev.ctrl.get_used()
    assert turns == -(-g.MAX_BACKING_ENTRIES * g_res.ENTRY_COST // TURN_BYTES)
    for n, dev in enumerate(devs):
        assert [g.HEADER.unpack_from(u.data)[:4] for u in answers[n]] == [
            (g.RESP_OK_NODATA, g.FLAG_FENCE, 100 + n, 7), (g.RESP_OK_NODATA, 0, 0, 0)]
        assert dev.device.resources[1].backing == pieces[n]


def test_a_held_request_that_fails_answers_its_own_fence(gpu, loop):
    """An attach whose last entry lies outside the RAM fails turns after it was read: its
    error answers its own fence and context, though the cursorq read another request
    (another header) into the device's buffer meanwhile (the error took that one's); nothing
    is kept."""
    dev = gpu()
    pieces = one_byte_pieces(dev)
    pieces[-1] = (RAM_BASE + RAM_SIZE, 1)
    assert dev.create(1, 64, 64) == g.RESP_OK_NODATA
    dev.post(g.CMD_RESOURCE_ATTACH_BACKING, "II", 1, len(pieces), extra=backing(pieces),
             flags=g.FLAG_FENCE, fence=0xABC, ctx=3)
    dev.ctrl.notify()
    assert dev.ctrl.get_used() == []
    dev.request(g.CMD_MOVE_CURSOR, "III4xIII4x", 0, 5, 6, 0, 0, 0, queue=dev.cursorq, ctx=9)
    used, = dev.answers(dev.ctrl)
    assert g.HEADER.unpack_from(used.data)[:4] == (g.RESP_ERR_UNSPEC, g.FLAG_FENCE, 0xABC, 3)
    assert dev.device.resources[1].backing is None
    assert dev.attach(1, [(dev.ram.alloc(64 * 64 * 4, PAGE), 64 * 64 * 4)]) == g.RESP_OK_NODATA


def test_config_keys(tmp_path):
    path = tmp_path / "vms.toml"
    path.write_text("[vm.0]\ngpu = { width = 640, height = 480, max_memory = 4194304 }\n")
    device = load_config(path).build_device(load_config(path).vms[0].devices[0])
    assert (device.width, device.height, device.max_memory) == (640, 480, 4 << 20)
    for table, key in (("width = 8", "vm.0.gpu.width"), ("height = 5000", "vm.0.gpu.height"),
                       ("max_memory = 0", "vm.0.gpu.max_memory"),
                       ("colour = 1", "vm.0.gpu.colour")):
        path.write_text(f"[vm.0]\ngpu = {{ {table} }}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(path)
    path.write_text("[vm.0]\ngpu = { max_memory = 1000 }\n")
    config = load_config(path)
    with pytest.raises(ConfigError, match="cannot hold one 1024x768 frame"):
        config.build_device(config.vms[0].devices[0])


def test_edid_is_valid_for_every_size():
    for width, height in ((16, 16), (1024, 768), (1920, 1080), (4095, 4095)):
        block = g.edid(width, height)
        assert len(block) == 128 and sum(block) % 256 == 0
        dtd = block[54:72]
        assert struct.unpack_from("<H", dtd)[0] > 0
        assert dtd[2] | (dtd[4] >> 4) << 8 == width and dtd[5] | (dtd[7] >> 4) << 8 == height


IDS = st.integers(0, 3)
SMALL = st.one_of(st.integers(0, 80), st.sampled_from([0xFFFFFFFF, 0x80000000, 1 << 16]))
ADDRESS = st.one_of(st.integers(RAM_BASE - PAGE, RAM_BASE + RAM_SIZE),
                    st.integers(0, 2**64 - 1), st.just(RAM_BASE + (1 << 20)))
COMMAND = st.one_of(
    st.tuples(st.just(g.CMD_RESOURCE_CREATE_2D), st.tuples(IDS, st.sampled_from([1, 2, 67, 5]),
                                                           SMALL, SMALL)),
    st.tuples(st.just(g.CMD_RESOURCE_ATTACH_BACKING),
              st.tuples(IDS, st.lists(st.tuples(ADDRESS, st.integers(0, 3 * PAGE)),
                                      max_size=4))),
    st.tuples(st.sampled_from([g.CMD_TRANSFER_TO_HOST_2D]),
              st.tuples(SMALL, SMALL, SMALL, SMALL, st.integers(0, 2**64 - 1), IDS)),
    st.tuples(st.sampled_from([g.CMD_SET_SCANOUT, g.CMD_RESOURCE_FLUSH]),
              st.tuples(SMALL, SMALL, SMALL, SMALL, st.integers(0, 1), IDS)),
    st.tuples(st.sampled_from([g.CMD_RESOURCE_UNREF, g.CMD_RESOURCE_DETACH_BACKING,
                               g.CMD_GET_EDID, g.CMD_GET_DISPLAY_INFO, g.CMD_UPDATE_CURSOR,
                               0x0200, 0]), st.tuples(IDS)),
)


def _body(kind, fields):
    if kind == g.CMD_RESOURCE_ATTACH_BACKING:
        rid, entries = fields
        return struct.pack("<II", rid, len(entries)) + b"".join(
            struct.pack("<QI4x", gpa, length) for gpa, length in entries)
    if kind == g.CMD_TRANSFER_TO_HOST_2D:
        return struct.pack("<IIIIQI4x", *fields)
    if kind in (g.CMD_SET_SCANOUT, g.CMD_RESOURCE_FLUSH):
        x, y, w, h, scanout, rid = fields
        return struct.pack("<IIIIII", x, y, w, h, scanout, rid)
    return b"".join(struct.pack("<I", v) for v in fields).ljust(32, b"\0")


@FUZZ
@given(commands=st.lists(st.tuples(COMMAND, st.integers(0, 80), st.sampled_from(
    [0, 10, 24, 408, 1056, 2000]), st.booleans()), min_size=1, max_size=12))
def test_random_commands(commands):
    bench = VirtioBench(GpuDevice(width=64, height=64, max_memory=1 << 20, max_resources=3),
                        ram_size=RAM_SIZE)
    try:
        with no_internal_errors():
            ctrl, cursorq = bench.driver.init([0, 1], buf_size=8192, size=16)
            for (kind, fields), cut, room, on_cursor in commands:
                body = g.HEADER.pack(kind, 1, 9, 0, 0) + _body(kind, fields)
                body = body[:max(cut, len(body) - cut)]
                queue = cursorq if on_cursor else ctrl
                queue.post(readable=[body], writable=[room] if room else [])
                queue.notify()
                [used] = queue.get_used()
                assert used.length <= room and (used.length == 0 or used.length >= 24)
                assert bench.device.memory_used <= 1 << 20
            assert not bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
            bench.device.screenshot()
    finally:
        bench.subsystem.close()
    bench.check_guards()


def draw(driver, width, height):
    """Set up the gpu behind ``driver`` and show a pattern on it; the pattern (B8G8R8X8)."""
    ctrl, _ = driver.init([0, 1], buf_size=8192)
    base = driver.ram.alloc(width * height * 4, PAGE)
    data = pattern(width, height, 3)
    driver.ram.write(base, data)
    for kind, body in (
            (g.CMD_RESOURCE_CREATE_2D, struct.pack("<IIII", 1, 2, width, height)),
            (g.CMD_RESOURCE_ATTACH_BACKING, struct.pack("<IIQI4x", 1, 1, base, len(data))),
            (g.CMD_TRANSFER_TO_HOST_2D, struct.pack("<IIIIQI4x", 0, 0, width, height, 0, 1)),
            (g.CMD_SET_SCANOUT, struct.pack("<IIIIII", 0, 0, width, height, 0, 1))):
        ctrl.post(readable=[g.HEADER.pack(kind, 0, 0, 0, 0) + body], writable=[24])
        ctrl.notify()
        used, = ctrl.get_used()
        assert g.HEADER.unpack_from(used.data)[0] == g.RESP_OK_NODATA
    return data


@pytest.fixture
def served_gpu(tmp_path):
    """``avatar-hw serve`` (stand-in stub) with VMs 0 and 1, each a console and a 64x32 gpu."""
    from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
    from test_daemon import Served, console_config

    board = FakeBoard(tmp_path / "board")
    stub = StandinStub(board)
    daemon = Served(board, console_config(board, extra="gpu = { width = 64, height = 32 }\n"))
    try:
        stub.page.wait_attached()
        yield board, stub, daemon
    finally:
        daemon.close()
        stub.close()


def screenshot(board, *args):
    return subprocess.run([sys.executable, "-m", "avatar_hw", "screenshot", *args,
                           "--control", str(board.control)], capture_output=True,
                          text=True, timeout=30)


def test_screenshot_command_through_a_served_daemon(served_gpu, tmp_path):
    """``avatar-hw screenshot`` against ``avatar-hw serve``: a driver behind the stand-in
    stub draws; the PNG file holds exactly its pixels; no scanout and no gpu are one-line
    errors."""
    board, stub, daemon = served_gpu
    out = tmp_path / "screen.png"
    failed = screenshot(board, "0", str(out))
    assert failed.returncode == 2 and "gpu shows nothing" in failed.stderr
    assert failed.stderr.count("\n") == 1
    failed = screenshot(board, "1", str(out), "--device", "console")
    assert failed.returncode == 2 and "is a console, not a gpu" in failed.stderr
    data = draw(stub.driver(0, 1), 64, 32)
    done = screenshot(board, "0", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{out}: 64x32"
    assert decode_png(out.read_bytes()) == (64, 32, rgb_of(data))
    assert daemon.stop() == 0


FAILING_TEST = """
import pytest

pytestmark = pytest.mark.hw

def test_fails(avatar_board):
    assert False, "on purpose"
"""


def test_a_failed_test_gets_a_png_of_the_screen(served_gpu, pytester, monkeypatch, tmp_path):
    """The plugin saves each gpu VM's screen beside the console logs and names it in the
    report and in JUnit's system-out as ``[[ATTACHMENT|path]]``."""
    board, stub, _ = served_gpu
    data = draw(stub.driver(0, 1), 64, 32)
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:labgrid")
    pytester.makepyfile(FAILING_TEST)
    logs, junit = tmp_path / "logs", tmp_path / "junit.xml"
    result = pytester.runpytest(f"--avatar-board={board.board_file}",
                                f"--avatar-control={board.control}", f"--avatar-log-dir={logs}",
                                f"--junitxml={junit}", "-o", "junit_logging=system-out")
    result.assert_outcomes(failed=1)
    saved = logs / "test_a_failed_test_gets_a_png_of_the_screen.py_test_fails.vm0.png"
    assert decode_png(saved.read_bytes()) == (64, 32, rgb_of(data))
    result.stdout.fnmatch_lines([f"avatar-hw vm0 screen: {saved}", f"[[ATTACHMENT|{saved}]]"])
    out = ElementTree.parse(junit).find(".//testcase/system-out").text
    assert f"[[ATTACHMENT|{saved}]]" in out
    assert "avatar-hw vm1 screen: no screenshot: daemon: bad request: VM 1's gpu shows " \
           "nothing" in out                         # its guest never set a scanout


def test_modules_dep_lists_a_shared_dependency_last():
    """busybox modprobe loads a module's modules.dep list from its end: drm, which both
    helpers need, must come last (the guest's virtio-gpu failed to load before)."""
    from avatar_hw.emulated.initramfs import _modules_dep
    deps = {"virtio-gpu": ["drm_kms_helper", "drm", "drm_shmem_helper", "virtio_dma_buf"],
            "drm_kms_helper": ["drm"], "drm_shmem_helper": ["drm"], "drm": [],
            "virtio_dma_buf": []}
    lines = dict(line.split(": ") for line in _modules_dep(deps, {n: n for n in deps})
                 .strip().splitlines() if ": " in line)
    order = lines["virtio-gpu"].split()
    assert sorted(order) == sorted(deps["virtio-gpu"]) and order[-1] == "drm"
    for i, name in enumerate(order):                 # every module before what it needs
        assert all(order.index(d) > i for d in deps[name])


class HeldScreen:
    """What the control server needs of a daemon: VM 0 slot 0 is ``gpu``, whose captures
    are not converted until ``release`` is set."""

    def __init__(self, gpu_device):
        self.gpu, self.release, self.taken = gpu_device, threading.Event(), 0

    def list_devices(self):
        return [{"vm": 0, "slot": 0, "name": "gpu"}]

    def screenshot(self, vm, slot):
        shot, release = self.gpu.screenshot(), self.release
        self.taken += 1

        class Held(type(shot)):
            def rgb_rows(self):
                release.wait(30)
                return super().rgb_rows()
        shot.__class__ = Held
        return shot


def test_a_screenshot_is_encoded_off_the_event_loop(gpu, loop, tmp_path):
    """While a screenshot is encoded the control server answers other clients; the asking
    client's later requests are answered after it, in order; a client that leaves while its
    screenshot is encoded leaves nothing behind, and the next screenshot is taken."""
    dev = gpu()
    w, h = 40, 30
    data = pattern(w, h)
    dev.write_backing(dev.framebuffer(5, w, h, 2), data)
    assert dev.transfer(5, 0, 0, w, h) == g.RESP_OK_NODATA
    assert dev.scanout(5, 0, 0, w, h) == g.RESP_OK_NODATA
    daemon = HeldScreen(dev.device)
    server = ControlServer(tmp_path / "control.sock", daemon)
    server.attach(loop)

    def connect(*commands):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(server.path)
        sock.sendall(b"".join(json.dumps(cmd).encode() + b"\n" for cmd in commands))
        sock.setblocking(False)
        return sock

    shot = {"command": "screenshot", "vm": 0, "device": "0"}
    try:
        asking = connect(shot, {"command": "list"})
        other = connect({"command": "list"})
        assert replies(loop, other, 1) == [{"ok": True, "result": daemon.list_devices()}]
        with pytest.raises(BlockingIOError):
            asking.recv(1)                                  # still encoding
        leaving = connect(shot)
        daemon.release.set()
        first, then = replies(loop, asking, 2)
        assert first["ok"] and then == {"ok": True, "result": daemon.list_devices()}
        assert decode_png(base64.b64decode(first["result"]["png"])) == (w, h, rgb_of(data))
        leaving.close()                                     # its screenshot was waiting
        again = connect(shot)
        assert replies(loop, again, 1)[0]["result"]["png"] == first["result"]["png"]
        assert daemon.taken == 2 or daemon.taken == 3       # the leaver's only if begun
    finally:
        server.close()
