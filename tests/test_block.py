"""virtio-blk through the driver-side harness: requests, features, every bad input, config
errors."""

import errno
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from avatar_hw.config import load_config
from avatar_hw.devices import block as blk
from avatar_hw.devices.block import BlockDevice
from avatar_hw.errors import ConfigError
from avatar_hw.loop import EventLoop
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import queue as virtqueue
from avatar_hw.virtio.constants import bit
from patching import this_thread_only

SECTORS = 2048                                      # 1 MiB image
PATTERN = bytes((i * 7 + i // 512) % 256 for i in range(SECTORS * 512))


def header(kind, sector=0, reserved=0):
    return blk.HEADER.pack(kind, reserved, sector)


class Blk:
    """A block device on an image file in a VM; ``request`` plays one request."""

    def __init__(self, image, *, features=None, drop=0, queues_used=(0,), loop=None, size=None,
                 **kw):
        self.image = image
        self.device = BlockDevice(image, **kw)
        self.bench = VirtioBench(self.device, ram_size=16 << 20, loop=loop)
        self.driver = self.bench.driver
        self.queues = self.driver.init(list(queues_used), features, drop=drop, buf_size=0,
                                       size=size)
        self.ram = self.bench.ram
        self.scratch = self.ram.alloc(8 << 20, 4096)

    def chain(self, segments, queue=0, indirect=False):
        """segments: (bytes to place, device-readable) or (size, writable): placed in scratch."""
        out, at = [], self.scratch
        for item, writable in segments:
            size = item if writable else len(item)
            if writable:
                self.ram.write(at, b"\xee" * size)          # poison: what the device left
            else:
                self.ram.write(at, item)
            out.append((at, size, writable))
            at += (size + 15) & ~15
        q = self.queues[queue]
        q.add_chain(out, indirect=indirect)
        q.notify()
        [used] = q.get_used()
        return used

    def request(self, kind, sector=0, data=b"", read=0, queue=0, status_extra=0):
        """One request in Linux's layout: (status, used length, data read)."""
        segs = [(header(kind, sector), False)]
        if data:
            segs.append((data, False))
        if read:
            segs.append((read, True))
        segs.append((1 + status_extra, True))
        used = self.chain(segs, queue)
        return self.status_of(used), used.length, used.data[:read]

    def status_of(self, used):
        gpa, size, _ = used.segments[-1]
        return self.ram.read(gpa + size - 1, 1)[0]

    def dwz(self, kind, segments):
        """Discard / write zeroes with (sector, num, flags) segments: the status."""
        body = b"".join(blk.SEGMENT.pack(*s) for s in segments)
        used = self.chain([(header(kind), False), (body, False), (1, True)])
        assert used.length == 1
        return self.status_of(used)

    def disk(self):
        return self.image.read_bytes()

    def close(self):
        self.bench.subsystem.close()
        self.bench.check_guards()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(PATTERN)
    return path


@pytest.fixture
def make(image):
    made = []

    def make_(**kw):
        dev = Blk(kw.pop("path", image), **kw)
        made.append(dev)
        return dev
    yield make_
    for dev in made:
        dev.close()


# -- configuration space and features -------------------------------------------------------------

def test_config_space_and_features(make):
    b = make()
    d = b.driver
    assert d.read(0x008) == 2
    assert d.read_config(0, 4) | d.read_config(4, 4) << 32 == SECTORS
    assert d.read_config(8) == blk.SIZE_MAX
    assert d.read_config(12) == blk.QUEUE_SIZE - 2 == blk.SEG_MAX
    assert d.read_config(20) == 512
    assert d.read_config(34, 2) == 1
    assert d.read_config(36) == blk.MAX_DISCARD_SECTORS
    assert d.read_config(40) == blk.MAX_DWZ_SEGMENTS
    assert d.read_config(52) == blk.MAX_WRITE_ZEROES_SEGMENTS == 1
    assert d.read_config(44) == os.stat(b.image).st_blksize // 512
    assert d.read_config(48) == blk.MAX_WRITE_ZEROES_SECTORS
    assert d.read_config(56, 1) == 1
    features = d.device_features()
    for f in (blk.F_SIZE_MAX, blk.F_SEG_MAX, blk.F_BLK_SIZE, blk.F_FLUSH, blk.F_DISCARD,
              blk.F_WRITE_ZEROES):
        assert features & bit(f), f
    assert not features & (bit(blk.F_RO) | bit(blk.F_MQ))
    assert d.read(0x034) == blk.QUEUE_SIZE                # QueueNumMax of queue 0


def test_capacity_ignores_a_partial_last_sector(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(512 * 3 + 100))
    dev = BlockDevice(path)
    try:
        assert dev.capacity == 3
    finally:
        dev.detach()


# -- data -----------------------------------------------------------------------------------------

def test_reads_come_from_the_image(make):
    b = make()
    status, length, data = b.request(blk.T_IN, sector=3, read=4096)
    assert (status, length, data) == (blk.S_OK, 4097, PATTERN[3 * 512:3 * 512 + 4096])
    assert b.device.counters["bytes_to_guest"] == 4096


def test_write_flush_and_the_bytes_are_in_the_file_on_disk(make, monkeypatch):
    b = make()
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(blk.os, "fdatasync",
                        this_thread_only(real, lambda fd: (synced.append(fd), real(fd))))
    data = hashlib.sha256(b"x").digest() * 256           # 8 KiB
    assert b.request(blk.T_OUT, sector=100, data=data)[:2] == (blk.S_OK, 1)
    assert not synced                                    # FLUSH negotiated: write-back
    assert b.request(blk.T_FLUSH)[:2] == (blk.S_OK, 1)
    assert synced == [b.device.fd]
    with open(b.image, "rb") as f:                       # a separate open: what is on disk
        f.seek(100 * 512)
        assert f.read(len(data)) == data
    disk = b.disk()
    assert disk[:100 * 512] == PATTERN[:100 * 512]
    assert disk[100 * 512 + len(data):] == PATTERN[100 * 512 + len(data):]
    assert b.request(blk.T_IN, sector=100, read=len(data))[2] == data
    c = b.device.counters
    assert (c["requests"], c["bytes_from_guest"], c["flushes"], c["errors"]) == (3, 8192, 1, 0)


def test_flush_status_is_written_only_after_fdatasync(make, monkeypatch):
    b = make()
    seen = []
    real = os.fdatasync

    def fdatasync(fd):
        gpa, size, _ = b.queues[0].outstanding[next(iter(b.queues[0].outstanding))][1][-1]
        seen.append(b.ram.read(gpa + size - 1, 1))       # the status byte as fdatasync starts
        real(fd)
    monkeypatch.setattr(blk.os, "fdatasync", this_thread_only(real, fdatasync))
    assert b.request(blk.T_FLUSH)[0] == blk.S_OK
    assert seen == [b"\xee"]


def test_without_flush_negotiated_writes_are_write_through_and_flush_is_unsupported(make,
                                                                                    monkeypatch):
    b = make(drop=bit(blk.F_FLUSH))
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(blk.os, "fdatasync",
                        this_thread_only(real, lambda fd: (synced.append(fd), real(fd))))
    assert b.request(blk.T_OUT, sector=0, data=bytes(512))[0] == blk.S_OK
    assert synced == [b.device.fd]
    assert b.request(blk.T_FLUSH)[0] == blk.S_UNSUPP


def test_any_layout_header_split_status_sharing_the_data_descriptor_and_indirect(make):
    b = make()
    hdr = header(blk.T_IN, sector=8)
    used = b.chain([(hdr[:5], False), (hdr[5:], False), (700, True), (1024 - 700 + 1, True)])
    assert used.length == 1025 and b.status_of(used) == blk.S_OK
    assert used.data[:1024] == PATTERN[8 * 512:8 * 512 + 1024]
    data = bytes(range(256)) * 4
    used = b.chain([(header(blk.T_OUT, sector=20) + data[:100], False), (data[100:], False),
                    (1, True)], indirect=True)
    assert (used.length, b.status_of(used)) == (1, blk.S_OK)
    assert b.disk()[20 * 512:21 * 512 + 512] == data


def test_get_id_is_the_serial_nul_padded_to_20_bytes(make):
    b = make(serial="avatar-disk-0")
    status, length, data = b.request(blk.T_GET_ID, read=20)
    assert (status, length, data) == (blk.S_OK, 21, b"avatar-disk-0".ljust(20, b"\0"))
    status, length, data = b.request(blk.T_GET_ID, read=8)
    assert (status, length, data) == (blk.S_OK, 9, b"avatar-d")


def test_used_length_is_every_writable_byte_the_rest_of_the_data_area_zeroed(make, monkeypatch):
    """The used length counts bytes written from the first writable one on (VirtIO 1.2
    2.7.8.2) and the status is the last: what a request leaves of its data area is zeroed
    (the buffers are poisoned first); a data area over MAX_REQUEST_BYTES is not, and its
    length stops where the written bytes stop, the status beyond it."""
    b = make(serial="abc")
    assert b.request(blk.T_GET_ID, read=512) == (blk.S_OK, 513, b"abc".ljust(512, b"\0"))
    assert b.request(blk.T_IN, sector=SECTORS, read=512) == (blk.S_IOERR, 513, bytes(512))
    monkeypatch.setattr(blk, "MAX_REQUEST_BYTES", 1024)
    status, length, _ = b.request(blk.T_GET_ID, read=1536)
    assert (status, length) == (blk.S_OK, 20)
    assert b.request(blk.T_IN, read=1536)[:2] == (blk.S_IOERR, 0)


def test_holes_read_as_zeros_and_a_read_past_a_shortened_image_is_an_error(tmp_path, make):
    """A sparse image's holes are zeros; an image shortened under the device ends a read
    early: IOERR (zeros said OK would be data the guest never wrote); the bytes that were
    there are read, the rest zeroed, so the used length is the whole chain."""
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)                               # sparse: no data blocks
    b = make(path=path)
    assert b.request(blk.T_IN, sector=0, read=4096)[2] == bytes(4096)
    assert b.request(blk.T_OUT, sector=0, data=b"\x11" * 1024)[0] == blk.S_OK
    os.truncate(path, 512)                                # shortened under the device
    status, length, data = b.request(blk.T_IN, sector=0, read=1024)
    assert (status, length, data) == (blk.S_IOERR, 1025, b"\x11" * 512 + bytes(512))


def test_after_a_failed_fdatasync_no_flush_is_ok_again(make, monkeypatch):
    """Linux marks the pages an fdatasync could not write clean and clears the error: the
    next one succeeds over lost writes. So one failure answers every later flush, and
    write-through write, IOERR (QEMU's page_cache_inconsistent), reads still work."""
    b = make()
    real, fail = os.fdatasync, [True]

    def fdatasync(fd):
        if fail.pop() if fail else False:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
    monkeypatch.setattr(blk.os, "fdatasync", this_thread_only(real, fdatasync))
    assert b.request(blk.T_OUT, sector=0, data=bytes(512))[0] == blk.S_OK
    assert b.request(blk.T_FLUSH)[0] == blk.S_IOERR
    assert b.request(blk.T_FLUSH)[0] == blk.S_IOERR          # fdatasync would succeed now
    assert b.request(blk.T_IN, sector=0, read=512)[0] == blk.S_OK


def test_write_zeroes_are_write_through_too(make, monkeypatch):
    """Without VIRTIO_BLK_F_FLUSH every write is synced before it is acknowledged: a write
    zeroes as well (it was acknowledged after fallocate alone)."""
    b = make(drop=bit(blk.F_FLUSH))
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(blk.os, "fdatasync",
                        this_thread_only(real, lambda fd: (synced.append(fd), real(fd))))
    segment = struct.pack("<QII", 0, 8, 0)
    assert b.request(blk.T_WRITE_ZEROES, data=segment)[0] == blk.S_OK
    assert synced == [b.device.fd]


def test_syncs_count_against_the_turn(make):
    """64 flushes in one notify were 64 fdatasync in one trap (each a disk's cache flush on a
    real disk, every VM waiting): each costs the turn SYNC_COST, so a turn does a few."""
    loop = EventLoop()
    try:
        b = make(loop=loop)
        q = b.queues[0]
        for n in range(64):
            b.ram.write(b.scratch + 32 * n, header(blk.T_FLUSH))
            q.add_chain([(b.scratch + 32 * n, 16, False), (b.scratch + 32 * n + 16, 1, True)])
        q.notify()
        served = len(q.get_used())
        assert served <= virtqueue.TURN_BYTES // blk.SYNC_COST + 1
        for _ in range(64):
            loop.run_once(0)
            served += len(q.get_used())
        assert served == 64
    finally:
        loop.close()


def test_multiqueue_offers_num_queues_and_serves_each_queue(make):
    b = make(queues=3, queues_used=(0, 1, 2))
    assert b.driver.device_features() & bit(blk.F_MQ)
    assert b.driver.read_config(34, 2) == 3
    for q in range(3):
        assert b.request(blk.T_OUT, sector=q, data=bytes([q + 1]) * 512, queue=q)[0] == blk.S_OK
    assert b.request(blk.T_IN, sector=0, read=1536, queue=2)[2] == (
        b"\x01" * 512 + b"\x02" * 512 + b"\x03" * 512)


# -- bad requests: the request completes, the device keeps serving --------------------------------

BAD_REQUESTS = [
    ("read past the capacity", dict(kind=blk.T_IN, sector=SECTORS - 1, read=1024), blk.S_IOERR,
     1025),
    ("read starting past the capacity", dict(kind=blk.T_IN, sector=1 << 40, read=512),
     blk.S_IOERR, 513),
    ("write past the capacity", dict(kind=blk.T_OUT, sector=SECTORS, data=bytes(512)),
     blk.S_IOERR, 1),
    ("read not a multiple of 512", dict(kind=blk.T_IN, sector=0, read=100), blk.S_IOERR, 101),
    ("write not a multiple of 512", dict(kind=blk.T_OUT, sector=0, data=bytes(600)),
     blk.S_IOERR, 1),
    ("unknown type", dict(kind=99), blk.S_UNSUPP, 1),
    ("GET_LIFETIME not offered", dict(kind=10, read=16), blk.S_UNSUPP, 17),
    ("secure erase not offered", dict(kind=14, data=bytes(16)), blk.S_UNSUPP, 1),
    ("write with writable bytes before the status", dict(kind=blk.T_OUT, data=bytes(512),
                                                         status_extra=4), blk.S_IOERR, 5),
    ("flush with writable bytes before the status", dict(kind=blk.T_FLUSH, status_extra=1),
     blk.S_IOERR, 2),
]


@pytest.mark.parametrize("what, req, status, length", BAD_REQUESTS,
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_is_answered_and_the_device_keeps_serving(make, what, req, status,
                                                              length):
    b = make()
    req = dict(req)
    kind = req.pop("kind")
    got = b.request(kind, **req)
    assert got == (status, length, bytes(req.get("read", 0)))    # the data area zeroed
    assert b.disk() == PATTERN                            # nothing written
    assert b.device.counters["errors"] == 1
    assert b.bench.transport.guest_errors >= 1
    assert b.request(blk.T_IN, sector=SECTORS - 1, read=512)[:3] == (
        blk.S_OK, 513, PATTERN[-512:])
    assert b.driver.status & 0x40 == 0                    # no DEVICE_NEEDS_RESET


def test_short_or_missing_header_is_ioerr(make):
    b = make()
    used = b.chain([(header(blk.T_IN)[:8], False), (512, True), (1, True)])
    assert (used.length, used.data) == (513, bytes(512) + bytes([blk.S_IOERR]))
    used = b.chain([(16, True), (1, True)])               # header not device-readable
    assert (b.status_of(used), used.length) == (blk.S_IOERR, 17)
    assert b.request(blk.T_IN, read=512)[0] == blk.S_OK


def test_a_chain_without_a_writable_byte_is_returned_empty(make):
    b = make()
    used = b.chain([(header(blk.T_OUT) + bytes(512), False)])
    assert used.length == 0
    assert b.disk() == PATTERN and b.device.counters["errors"] == 1
    assert b.request(blk.T_IN, read=512)[0] == blk.S_OK


def test_oversized_request_is_ioerr(make, monkeypatch):
    monkeypatch.setattr(blk, "MAX_REQUEST_BYTES", 1024)
    b = make()
    assert b.request(blk.T_IN, read=1536)[:2] == (blk.S_IOERR, 0)    # not zeroed
    assert b.request(blk.T_IN, read=1024)[:2] == (blk.S_OK, 1025)


def test_host_io_error_is_ioerr(make, monkeypatch):
    b = make()

    def failing(*args):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(blk.os, "pwritev", this_thread_only(os.pwritev, failing))
    assert b.request(blk.T_OUT, data=bytes(512))[:2] == (blk.S_IOERR, 1)
    monkeypatch.undo()
    assert b.request(blk.T_OUT, data=bytes(512))[:2] == (blk.S_OK, 1)


# -- read-only ------------------------------------------------------------------------------------

def test_read_only_device(make, image):
    b = make(readonly=True)
    features = b.driver.device_features()
    assert features & bit(blk.F_RO)
    assert not features & (bit(blk.F_DISCARD) | bit(blk.F_WRITE_ZEROES))
    flags = fcntl.fcntl(b.device.fd, fcntl.F_GETFL)
    assert flags & os.O_ACCMODE == os.O_RDONLY
    assert b.request(blk.T_OUT, sector=0, data=b"\xff" * 512)[:2] == (blk.S_IOERR, 1)
    assert b.request(blk.T_DISCARD)[:2] == (blk.S_UNSUPP, 1)
    assert b.request(blk.T_FLUSH)[:2] == (blk.S_OK, 1)
    assert b.request(blk.T_IN, sector=0, read=512)[2] == PATTERN[:512]
    assert b.disk() == PATTERN


# -- discard and write zeroes ---------------------------------------------------------------------

def test_discard_punches_holes(make):
    b = make()
    before = os.stat(b.image).st_blocks
    assert b.dwz(blk.T_DISCARD, [(0, 1024, 0), (1024, 512, 0)]) == blk.S_OK
    after = os.stat(b.image).st_blocks
    assert after < before
    assert os.path.getsize(b.image) == len(PATTERN)       # KEEP_SIZE
    assert b.disk()[:1536 * 512] == bytes(1536 * 512)
    assert b.disk()[1536 * 512:] == PATTERN[1536 * 512:]
    assert b.device.counters["discards"] == 1


@pytest.mark.parametrize("unmap", [0, blk.DWZ_F_UNMAP])
def test_write_zeroes_reads_back_zeros(make, unmap):
    b = make()
    assert b.dwz(blk.T_WRITE_ZEROES, [(3, 5, unmap)]) == blk.S_OK
    assert b.dwz(blk.T_WRITE_ZEROES, [(100, 1, unmap)]) == blk.S_OK
    disk = b.disk()
    assert disk[3 * 512:8 * 512] == bytes(5 * 512) and disk[100 * 512:101 * 512] == bytes(512)
    assert disk[:3 * 512] == PATTERN[:3 * 512] and disk[8 * 512:100 * 512] == PATTERN[
        8 * 512:100 * 512]


def test_write_zeroes_falls_back_to_writing_zeros(make, monkeypatch):
    def unsupported(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported")
    monkeypatch.setattr(blk, "fallocate", unsupported)
    b = make()
    assert b.dwz(blk.T_WRITE_ZEROES, [(1, 300, 0)]) == blk.S_OK       # > one zero buffer
    assert b.disk()[512:301 * 512] == bytes(300 * 512)
    assert b.dwz(blk.T_DISCARD, [(400, 8, 0)]) == blk.S_OK           # advisory: nothing done
    assert b.disk()[400 * 512:408 * 512] == PATTERN[400 * 512:408 * 512]


def test_zeros_written_by_hand_end_the_turn(make, monkeypatch):
    """Where the file system has no ZERO_RANGE (tmpfs) the zeros are written: a queue of
    32 MiB write-zeroes requests used to hold the loop 0.4 s per request (16 segments
    each); now each request has one segment and its zeros count against the turn's 8 MiB."""
    def unsupported(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not supported")
    monkeypatch.setattr(blk, "fallocate", unsupported)
    b = make()
    q = b.queues[0]
    at = b.ram.alloc(4096)
    b.ram.write(at, blk.HEADER.pack(blk.T_WRITE_ZEROES, 0, 0)
                + blk.SEGMENT.pack(0, SECTORS, 0))                   # 1 MiB of zeros
    for _ in range(12):
        q.add_chain([(at, 32, False), (at + 1024, 1, True)])
    q.notify()
    assert [u.data for u in q.get_used()] == [bytes([blk.S_OK])] * 8  # 8 MiB: the turn's
    q.notify()
    assert len(q.get_used()) == 4
    assert b.dwz(blk.T_WRITE_ZEROES, [(0, 1, 0), (1, 1, 0)]) == blk.S_IOERR   # one segment


@pytest.fixture
def loop_device(tmp_path):
    """``make_(sector_size)``: a loop device over a copy of PATTERN (root only)."""
    made = []

    def make_(sector_size=512):
        backing = tmp_path / f"backing{len(made)}.img"
        backing.write_bytes(PATTERN)
        try:
            dev = subprocess.run(["losetup", "--find", "--show", "--sector-size",
                                  str(sector_size), str(backing)], capture_output=True,
                                 text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as err:
            pytest.skip(f"no loop device: {err}")
        made.append(dev)
        return Path(dev)
    yield make_
    for dev in made:
        subprocess.run(["losetup", "--detach", dev], check=True)


def discards_done(device):
    """The discard requests the kernel completed on ``device`` (/sys/block/*/stat; they
    go on counting over the loop device's earlier backing files)."""
    return int(Path(f"/sys/block/{device.name}/stat").read_text().split()[11])


def test_discard_on_a_block_device_is_blkdiscard_not_a_write_of_zeros(make, loop_device):
    """fallocate(PUNCH_HOLE) on a block device writes zeros (REQ_OP_WRITE_ZEROES), a
    long write on a disk without unmap, and nothing where there is no write zeroes."""
    dev = loop_device()
    b, before = make(path=dev), discards_done(dev)
    assert b.dwz(blk.T_DISCARD, [(0, 1024, 0)]) == blk.S_OK
    assert discards_done(dev) == before + 1 and b.device.counters["discards"] == 1


def test_a_4k_block_device_asks_for_aligned_discards_and_ignores_others(make, loop_device):
    dev = loop_device(4096)
    b, before = make(path=dev), discards_done(dev)
    assert b.driver.read_config(44, 4) == 8               # discard_sector_alignment
    assert b.dwz(blk.T_DISCARD, [(1, 8, 0)]) == blk.S_OK    # not aligned: advisory, not done
    assert discards_done(dev) == before
    assert b.dwz(blk.T_WRITE_ZEROES, [(1, 3, 0)]) == blk.S_OK   # zeros written by hand
    assert b.dwz(blk.T_WRITE_ZEROES, [(9, 3, blk.DWZ_F_UNMAP)]) == blk.S_OK
    assert b.request(blk.T_OUT, sector=20, data=b"\x5a" * 512)[0] == blk.S_OK
    assert b.request(blk.T_FLUSH)[0] == blk.S_OK
    disk = b.disk()
    assert disk[512:4 * 512] == bytes(3 * 512) and disk[9 * 512:12 * 512] == bytes(3 * 512)
    assert disk[20 * 512:21 * 512] == b"\x5a" * 512
    assert disk[:512] == PATTERN[:512] and disk[4 * 512:9 * 512] == PATTERN[4 * 512:9 * 512]
    assert disk[21 * 512:] == PATTERN[21 * 512:]


BAD_SEGMENTS = [
    ("discard with unmap", blk.T_DISCARD, [(0, 8, blk.DWZ_F_UNMAP)], blk.S_UNSUPP),
    ("reserved flag bits", blk.T_WRITE_ZEROES, [(0, 8, 2)], blk.S_UNSUPP),
    ("reserved flag bits on discard", blk.T_DISCARD, [(0, 8, 0x80000000)], blk.S_UNSUPP),
    ("past the capacity", blk.T_DISCARD, [(SECTORS - 4, 8, 0)], blk.S_IOERR),
    ("huge sector", blk.T_WRITE_ZEROES, [((1 << 64) - 1, 1, 0)], blk.S_IOERR),
    ("second segment bad", blk.T_DISCARD, [(0, 8, 0), (SECTORS, 1, 0)], blk.S_IOERR),
    ("two write-zeroes segments", blk.T_WRITE_ZEROES, [(0, 8, 0), (8, 1, 0)], blk.S_IOERR),
    ("more than max sectors", blk.T_WRITE_ZEROES, [(0, blk.MAX_WRITE_ZEROES_SECTORS + 1, 0)],
     blk.S_IOERR),
    ("no segment", blk.T_DISCARD, [], blk.S_IOERR),
    ("too many segments", blk.T_DISCARD, [(i, 1, 0) for i in range(blk.MAX_DWZ_SEGMENTS + 1)],
     blk.S_IOERR),
]


@pytest.mark.parametrize("what, kind, segments, status", BAD_SEGMENTS,
                         ids=[s[0] for s in BAD_SEGMENTS])
def test_bad_discard_or_write_zeroes_segments_change_nothing(make, what, kind, segments, status):
    b = make()
    if segments:
        assert b.dwz(kind, segments) == status
    else:
        used = b.chain([(header(kind), False), (1, True)])
        assert (b.status_of(used), used.length) == (status, 1)
    assert b.disk() == PATTERN


def test_partial_segment_is_ioerr(make):
    b = make()
    used = b.chain([(header(blk.T_DISCARD) + blk.SEGMENT.pack(0, 8, 0)[:12], False), (1, True)])
    assert b.status_of(used) == blk.S_IOERR and b.disk() == PATTERN


# -- counters, info -------------------------------------------------------------------------------

def test_info_shows_counters(make):
    b = make()
    b.request(blk.T_IN, read=1024)
    b.request(blk.T_OUT, data=bytes(512))
    b.request(99)
    info = b.device.info()
    assert (info["requests"], info["bytes_to_guest"], info["bytes_from_guest"],
            info["errors"]) == (2, 1024, 512, 1)
    assert info["capacity"] == SECTORS and info["image"] == str(b.image)


def test_a_busy_queue_is_served_a_queue_size_at_a_time_then_after_the_loop(make):
    """A driver that keeps adding while the device serves does not hold the trap path:
    one notify serves at most a queue's worth, the rest comes after the loop's events."""
    loop = EventLoop()
    try:
        b = make(loop=loop, size=8)
        q, served, added = b.queues[0], [], [0]
        b.ram.write(b.scratch, header(blk.T_GET_ID))       # a request that costs nothing
        real = b.device._serve

        def post():
            q.add_chain([(b.scratch, 16, False), (b.scratch + 512, 21, True)])
            added[0] += 1

        def serve(queue, chain):                          # a second vCPU refills meanwhile
            real(queue, chain)
            served.append(chain.head)
            q.get_used()
            if added[0] < 30:
                post()
        b.device._serve = serve
        for _ in range(4):
            post()
        q.notify()
        assert len(served) == 8
        for _ in range(10):
            loop.run_once(0)
        assert len(served) == 30 and b.device.counters["requests"] == 30
    finally:
        loop.close()


def test_a_notify_moves_about_turn_bytes_then_the_rest_after_the_loop(make, monkeypatch):
    """Many large requests in one notify (indirect tables make 256 x 32 MiB possible) do not
    hold the trap path for all of them: after the queue's TURN_BYTES the rest waits for the
    loop, a turn at a time."""
    monkeypatch.setattr(virtqueue, "TURN_BYTES", 8192)
    loop = EventLoop()
    try:
        b = make(loop=loop)
        q = b.queues[0]
        for n in range(5):
            b.ram.write(b.scratch + n * 8192, header(blk.T_IN, sector=8 * n))
            q.add_chain([(b.scratch + n * 8192, 16, False),
                         (b.scratch + n * 8192 + 512, 4096, True),
                         (b.scratch + n * 8192 + 4608, 1, True)])
        q.notify()
        assert len(q.get_used()) == 2                    # 8 KiB moved: the turn is over
        loop.run_once(0)
        assert len(q.get_used()) == 2
        loop.run_once(0)
        used = q.get_used()
        assert len(used) == 1 and used[0].data[:4096] == PATTERN[4 * 4096:5 * 4096]
        loop.run_once(0)
        assert q.get_used() == [] and b.device.counters["requests"] == 5
    finally:
        loop.close()


def test_block_stall_bench_runs_every_case(tmp_path):
    """bench/block_stall.py (the event-loop stall figures in docs/devices.md) runs; no time
    is asserted."""
    result = subprocess.run([sys.executable, "-m", "bench.block_stall", "--runs", "1",
                             "--dir", str(tmp_path)], cwd=Path(__file__).parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("read", "write",
                                                                            "flush", "discard"))]
    assert len(rows) == 13 and not list(tmp_path.iterdir())


# -- config errors: one line naming the file, key and problem -------------------------------------

def build(tmp_path, text):
    path = tmp_path / "vms.toml"
    path.write_text(text)
    config = load_config(path)
    devices = []
    try:
        for device in config.vms[0].devices:
            devices.append(config.build_device(device))
    finally:
        for device in devices:
            device.detach()
    return path


def config_error(tmp_path, text):
    with pytest.raises(ConfigError) as err:
        build(tmp_path, text)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "vms.toml") + ": vm.0.block")
    return message


def test_config_builds_a_block_device(tmp_path, image):
    build(tmp_path, f"[vm.0]\nblock = {{ image = '{image}', serial = 's1', queues = 2 }}\n")


def test_config_error_image_missing(tmp_path):
    msg = config_error(tmp_path, f"[vm.0]\nblock = {{ image = '{tmp_path}/nope.img' }}\n")
    assert f"{tmp_path}/nope.img: no such image file" in msg


def test_config_error_image_is_a_directory_or_empty(tmp_path):
    assert "is a directory" in config_error(
        tmp_path, f"[vm.0]\nblock = {{ image = '{tmp_path}' }}\n")
    (tmp_path / "empty.img").write_bytes(b"x" * 100)
    assert "less than one 512-byte sector" in config_error(
        tmp_path, f"[vm.0]\nblock = {{ image = '{tmp_path}/empty.img' }}\n")


def test_config_error_two_devices_on_one_image(tmp_path, image):
    link = tmp_path / "link.img"
    os.link(image, link)                                  # another name, the same inode
    msg = config_error(tmp_path, f"[vm.0]\nblock = [{{ image = '{image}' }}, "
                                 f"{{ image = '{link}', readonly = true }}]\n")
    assert msg.startswith(f"{tmp_path}/vms.toml: vm.0.block[1]: {link}: already the image of "
                          "another block device")
    build(tmp_path, f"[vm.0]\nblock = {{ image = '{link}' }}\n")   # released by detach


def test_config_error_image_locked_by_another_process(tmp_path, image):
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl,sys; f=open('{image}'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"1\n"
        msg = config_error(tmp_path, f"[vm.0]\nblock = {{ image = '{image}' }}\n")
        assert "in use by another process" in msg
    finally:
        holder.kill()
        holder.wait()


def test_config_error_bad_numbers(tmp_path, image):
    assert "give 1 to 16 request queues" in config_error(
        tmp_path, f"[vm.0]\nblock = {{ image = '{image}', queues = 17 }}\n")
    with pytest.raises(ConfigError, match="vm.0.block.queues: queues = 0: give 1 to 16"):
        build(tmp_path, f"[vm.0]\nblock = {{ image = '{image}', queues = 0 }}\n")
    with pytest.raises(ConfigError, match="vm.0.block.serial: is longer than 20 bytes"):
        build(tmp_path, f"[vm.0]\nblock = {{ image = '{image}', serial = '{'x' * 21}' }}\n")


def test_config_error_image_not_writable(tmp_path):
    """As a user who may read but not write the image (root writes anything: run as nobody)."""
    work = tempfile.mkdtemp(prefix="avatar-blk-")
    try:
        os.chmod(work, 0o755)
        img = os.path.join(work, "ro.img")
        with open(img, "wb") as f:
            f.write(bytes(4096))
        os.chmod(img, 0o444)
        # imports first, then (as root) become nobody: only the image's open is unprivileged
        code = ("import os; from avatar_hw.devices.block import BlockDevice\n"
                "from avatar_hw.errors import ConfigError\n"
                "if os.geteuid() == 0:\n    os.setgid(65534); os.setuid(65534)\n"
                f"try:\n    BlockDevice({img!r})\nexcept ConfigError as e:\n    print(e)\n"
                f"BlockDevice({img!r}, readonly=True).detach(); print('ro ok')\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=30)
        assert done.stdout == (f"{img}: not writable: set readonly = true, or make it writable "
                               "by this user\nro ok\n"), done.stderr
    finally:
        shutil.rmtree(work)


def test_constructor_checks(image):
    with pytest.raises(ValueError, match="longer than 20 bytes"):
        BlockDevice(image, serial="é" * 11)


# -- a crash loses nothing acknowledged -----------------------------------------------------------

def test_sigkill_of_the_daemon_after_a_flush_loses_no_acknowledged_write(tmp_path):
    """``avatar-hw serve`` as a subprocess against the stand-in stub; the guest writes 16 KiB
    chunks (a flush before every 8th), then a burst of writes and flushes with posted
    notifies, and the daemon is SIGKILLed while they are in flight. Every write in the used
    ring (acknowledged), and everything before the last completed flush, is in the image."""
    from avatar_hw.testing.standin_stub import FakeBoard, StandinStub

    board = FakeBoard(tmp_path / "board", vms=1)
    image = tmp_path / "crash.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    config = tmp_path / "vms.toml"
    config.write_text(f'[vm.0]\nblock = {{ image = "{image}" }}\n')
    stub = StandinStub(board)
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen(board.serve_argv(config), stdout=log, stderr=subprocess.STDOUT)
    try:
        stub.page.wait_attached()
        driver = stub.driver(0, posted_writes=True, timeout=30)    # a flush is an fdatasync
        q, = driver.init([0], buf_size=4096)
        chunk = 16 << 10
        requests, acked, flushed_upto = {}, [], -1
        written = 0

        def data(i):
            return hashlib.sha256(i.to_bytes(4, "little")).digest() * (chunk // 32)

        def collect():
            nonlocal flushed_upto
            for used in q.get_used():
                kind, index = requests.pop(used.head)
                assert used.data == b"\0", used
                if kind == blk.T_FLUSH:
                    flushed_upto = max(flushed_upto, index)
                else:
                    acked.append(index)

        def post_write():
            nonlocal written
            if written % 8 == 0 and written:
                head = q.post(readable=[header(blk.T_FLUSH)], writable=[1])
                requests[head] = (blk.T_FLUSH, written - 1)
            d = data(written)
            head = q.post(readable=[header(blk.T_OUT, written * chunk // 512),
                                    *[d[k:k + 4096] for k in range(0, chunk, 4096)]],
                          writable=[1])
            requests[head] = (blk.T_OUT, written)
            written += 1
            q.notify()                                # posted: the guest does not wait

        while written < 200:
            if len(q.free) >= 8:
                post_write()
            else:
                stub.wait_irqs(0.2)
                driver.ack_interrupt()
            collect()
        while len(q.free) >= 8:                       # a burst in flight, then the kill
            post_write()
        daemon.kill()
        daemon.wait()
        collect()                                     # completed just before the kill
        assert daemon.returncode == -9
        assert flushed_upto >= 0 and acked and max(acked) > flushed_upto
        with open(image, "rb") as f:
            disk = f.read()
        for i in acked + list(range(flushed_upto + 1)):
            assert disk[i * chunk:(i + 1) * chunk] == data(i), f"acknowledged chunk {i} lost"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
        stub.close()
