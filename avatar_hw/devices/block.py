"""virtio-blk (device ID 2, VirtIO 1.2 section 5.2) over a raw image file or a block device.

A request is a chain: a 16-byte header (type, reserved, sector) in the
device-readable part, then the data (readable for writes, writable for
reads), and the status byte, the last device-writable byte. Framing is free
(VIRTIO_F_VERSION_1 implies any layout): the header is gathered from
however many descriptors hold it; data moves with ``os.preadv`` /
``os.pwritev`` straight between the image and the chain's memoryviews of
guest RAM (batches of at most IOV_MAX views, short transfers looped).

Used length: the bytes written from the first device-writable byte on (VirtIO 1.2
2.7.8.2), and the status is the last one, so the part of the data area a request did not
fill (a failed read, GET_ID's buffer past the serial, writable bytes an error leaves) is
zeroed and the length is every writable byte, QEMU's too. A data area of more than
``MAX_REQUEST_BYTES`` is not zeroed (that would bound no request's work): its length is the
bytes written before the first one left (0 for an error), the status beyond it.

Answers (the request is always completed and the device keeps serving):

* OK: the data moved; a write only after ``pwritev`` returned for every byte,
  a flush only after ``os.fdatasync`` (without VIRTIO_BLK_F_FLUSH negotiated
  the device is write-through: every write and write zeroes is followed by
  ``fdatasync``).
* IOERR: header shorter than 16 bytes; data not a multiple of 512 bytes;
  sectors past the capacity; more than ``MAX_REQUEST_BYTES`` of data; extra
  device-writable bytes in a request whose only writable byte is the status
  (write, flush, discard, write zeroes); any write on a read-only device;
  discard / write-zeroes segments not whole, 0 or more than the limit, a
  range past the capacity or longer than the limit; an I/O error of the host; a read
  that ends early (an image shortened under the daemon: the rest is not there; zeros
  said OK would be data the guest never wrote); every flush and write-through write
  once an ``fdatasync`` failed (Linux marks the pages it could not write clean and
  clears the error, so the next one would succeed over lost writes: QEMU's
  ``page_cache_inconsistent``), until the device is started afresh (a daemon restarted
  under the running guest keeps it: ``saved_state``).
* UNSUPP: an unknown type, or one whose feature was not negotiated; a
  discard with the unmap flag, or any flag bit other than unmap.
* a chain with no device-writable byte cannot hold a status: it is returned
  with used length 0 (a logged guest error).

Discard punches a hole in a file (``fallocate(PUNCH_HOLE | KEEP_SIZE)``) and is a
``BLKDISCARD`` on a block device (as QEMU: there PUNCH_HOLE is a write of zeros,
REQ_OP_WRITE_ZEROES); a host that cannot, or a range not aligned to the block device's
logical block, is ignored: discard is advisory. Write zeroes punches a hole
when the unmap flag allows it (``write_zeroes_may_unmap`` = 1), else
``fallocate(ZERO_RANGE | KEEP_SIZE)``, falling back to writing zeros, which count against
the queue's turn budget (``Virtqueue.charge``); one write-zeroes segment per request (32 MiB).
A write zeroes or discard costs the turn its length however it was done (a zero range on
a block device is written by the kernel), an ``fdatasync`` ``SYNC_COST``.

I/O is synchronous: a request runs to completion inside ``queue_notify``,
which the trap path calls, so while one request's I/O runs no other trap or
device of the daemon is served. A notify serves one turn of the queue (the
turn budget of ``avatar_hw.virtio.queue``; the request that crosses it is
finished); the rest is served on the event loop's next turns.

Images: opened ``O_RDWR`` (``O_RDONLY`` with ``readonly``), ``flock``-ed (exclusive, shared
when read-only: older avatar-hw takes only that) and locked as QEMU locks its images (OFD
byte-range locks, ``_lock_like_qemu``; ``flock`` and those never conflict on Linux), so
neither another daemon nor a QEMU can write an image served, and a QEMU writing it keeps
ours off; within one process a second device on the same file or block device is refused.
"""

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import weakref

from ..errors import ConfigError, os_reason
from ..libc import check, libc
from ..schema import REQUIRED, Field, Schema, under
from ..virtio.buffers import fill_zeros, gather, scatter, skip, transfer, truncate, zeros
from ..virtio.constants import ID_BLOCK, bit
from ..virtio.device import VirtioDevice

log = logging.getLogger(__name__)

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2                 # header and status take a descriptor each
SIZE_MAX = 128 << 10                     # bytes per data segment
MAX_REQUEST_BYTES = SEG_MAX * SIZE_MAX   # data bytes per request (bounds a request's stall)
MAX_DISCARD_SECTORS = 1 << 21            # 1 GiB per segment
MAX_WRITE_ZEROES_SECTORS = 1 << 16       # 32 MiB per segment (the fallback writes them)
MAX_DWZ_SEGMENTS = 16                    # discard segments per request
MAX_WRITE_ZEROES_SEGMENTS = 1            # as QEMU: at most 32 MiB of zeros per request
MAX_QUEUES = 16
SYNC_COST = 2 << 20                      # an fdatasync against the turn (a disk's cache flush)
SERIAL_BYTES = 20

# feature bits (5.2.3)
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_MQ = 1, 2, 5, 6, 9, 12
F_DISCARD, F_WRITE_ZEROES = 13, 14

# request types and status (5.2.6)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
# the request types served -> the feature they need (None: always)
REQUEST_FEATURES = {T_IN: None, T_OUT: None, T_GET_ID: None, T_FLUSH: F_FLUSH,
                    T_DISCARD: F_DISCARD, T_WRITE_ZEROES: F_WRITE_ZEROES}
DWZ_F_UNMAP = 1

HEADER = struct.Struct("<IIQ")           # type, reserved, sector
SEGMENT = struct.Struct("<QII")          # sector, num_sectors, flags
# capacity, size_max, seg_max, geometry, blk_size, topology, writeback, unused0, num_queues,
# max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
# max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3]
CONFIG = struct.Struct("<QII4xI8xBxHIIIIIB3x")

# QEMU's image locks (block/file-posix.c, raw_apply_lock_bytes / raw_check_lock_bytes): byte
# 100 + n is read-locked by each user holding permission n (0 consistent read, 1 write), byte
# 200 + n by each user that does not share it. We take them as QEMU's virtio-blk without
# share-rw: consistent read, write unless read-only, everything shared but write.
QEMU_PERM_BYTE, QEMU_UNSHARED_BYTE = 100, 200
PERM_READ, PERM_WRITE = 0, 1
FLOCK = struct.Struct("hhqqi4x")         # struct flock: l_type, l_whence, l_start, l_len, l_pid

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
BLKSSZGET, BLKDISCARD = 0x1268, 0x1277    # linux/fs.h: logical block size; discard a range
BLK_RANGE = struct.Struct("QQ")          # BLKDISCARD's argument: offset, length
# errors of a host that cannot do a fallocate mode or BLKDISCARD (or not on that range)
UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)
libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)

# Images served by this process: identity -> device (two devices on one image refused).
_open_images = weakref.WeakValueDictionary()


def fallocate(fd, mode, offset, length):
    """fallocate(2) through libc (``os`` has only posix_fallocate); raises OSError."""
    check(libc.fallocate(fd, mode, offset, length))


def _lock_like_qemu(fd, readonly):
    """Take QEMU's lock bytes on ``fd``, then, as QEMU, whether nobody else holds a
    conflicting one: the unshared byte of a permission we need, the permission byte of one we
    do not share (closing ``fd`` releases them). BlockingIOError: a conflicting write lock."""
    needed = (PERM_READ,) if readonly else (PERM_READ, PERM_WRITE)
    taken = [QEMU_PERM_BYTE + p for p in needed] + [QEMU_UNSHARED_BYTE + PERM_WRITE]
    for byte in taken:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
    for byte in [QEMU_UNSHARED_BYTE + p for p in needed] + [QEMU_PERM_BYTE + PERM_WRITE]:
        held = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                           FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        if FLOCK.unpack(held)[0] != fcntl.F_UNLCK:
            return False
    return True


def _without_last_byte(views):
    """``views`` minus their last byte (the status) and that byte's one-byte view."""
    out = list(views)
    while not len(out[-1]):
        out.pop()
    last = out.pop()
    if len(last) > 1:
        out.append(last[:-1])
    return out, last[-1:]


def check_serial(serial):
    """The GET_ID string fits its 20 bytes (NUL-padded; no NUL when it fills them)."""
    if len(serial.encode()) > SERIAL_BYTES:
        raise ValueError(f"is longer than {SERIAL_BYTES} bytes")


class BlockDevice(VirtioDevice):
    """A virtio block device serving ``image`` (a raw image file or a block device).

    ``readonly``: open read-only and offer VIRTIO_BLK_F_RO; ``serial``: the GET_ID
    string (at most 20 bytes); ``queues``: offer VIRTIO_BLK_F_MQ with that many
    request queues (None: one queue, no MQ).
    """

    device_id = ID_BLOCK
    name = "block"
    restartable = True

    def __init__(self, image, *, readonly=False, serial=None, queues=None):
        check_serial(serial or "")
        if queues is not None:
            check_queues(queues)
        self.image, self.readonly = str(image), readonly
        self.fd = self._open_image()
        try:
            st = os.fstat(self.fd)
            size = os.lseek(self.fd, 0, os.SEEK_END)
            self.capacity = size // SECTOR
            if not self.capacity:
                raise ConfigError(self.image, None, f"{size} bytes is less than one "
                                                    f"{SECTOR}-byte sector")
            self._block_device = stat.S_ISBLK(st.st_mode)
            alignment = max(1, self._discard_granule(st) // SECTOR)
        except BaseException:
            self._close_image()
            raise
        features = bit(F_SIZE_MAX) | bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_FLUSH)
        features |= bit(F_RO) if readonly else bit(F_DISCARD) | bit(F_WRITE_ZEROES)
        if queues is not None:
            features |= bit(F_MQ)
        config = CONFIG.pack(self.capacity, SIZE_MAX, SEG_MAX, SECTOR, 0, queues or 1,
                             MAX_DISCARD_SECTORS, MAX_DWZ_SEGMENTS, alignment,
                             MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEGMENTS, 1)
        super().__init__(queue_sizes=[QUEUE_SIZE] * (queues or 1), features=features,
                         config=config)
        self.counters.update(flushes=0, discards=0, write_zeroes=0)
        self.serial = (serial or "").encode().ljust(SERIAL_BYTES, b"\0")
        self._header = bytearray(HEADER.size)
        self._segments = bytearray(SEGMENT.size * MAX_DWZ_SEGMENTS + 1)   # +1: one too many
        self._status = bytearray(1)
        self._work = 0                           # the request's work beyond its chain's bytes
        self._sync_failed = False                # an fdatasync failed: no flush is OK again

    # -- the image ---------------------------------------------------------------------------

    def _open_image(self):
        try:
            fd = os.open(self.image, (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(self.image, None, "no such image file or block device") from None
        except IsADirectoryError:
            raise ConfigError(self.image, None, "is a directory, not an image") from None
        except PermissionError:
            if self.readonly:
                raise ConfigError(self.image, None, "not readable by this user") from None
            raise ConfigError(self.image, None, "not writable: set readonly = true, or make it "
                                                "writable by this user") from None
        except OSError as err:
            if err.errno == errno.EROFS and not self.readonly:
                raise ConfigError(self.image, None, "on a read-only file system: set readonly "
                                                    "= true") from None
            raise ConfigError(self.image, None, f"cannot open: {err.strerror}") from None
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(fd)
            raise ConfigError(self.image, None, "is neither a regular file nor a block device")
        self._identity = (("blk", st.st_rdev) if stat.S_ISBLK(st.st_mode)
                          else (st.st_dev, st.st_ino))
        if self._identity in _open_images:
            os.close(fd)
            raise ConfigError(self.image, None, "already the image of another block device: "
                                                "two devices cannot share one image")
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            free = _lock_like_qemu(fd, self.readonly)
        except (BlockingIOError, PermissionError):     # EAGAIN, or EACCES from F_OFD_SETLK
            free = False
        except OSError as err:
            os.close(fd)
            raise ConfigError(self.image, None, f"cannot lock: {os_reason(err)}") from None
        if not free:
            os.close(fd)
            raise ConfigError(self.image, None, "in use by another process (locked): stop it "
                                                "or give another image")
        _open_images[self._identity] = self
        return fd

    def _close_image(self):
        if self.fd is not None:
            if _open_images.get(self._identity) is self:
                del _open_images[self._identity]
            os.close(self.fd)
            self.fd = None

    def detach(self):
        self._close_image()
        super().detach()

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            self._close_image()

    # -- requests ------------------------------------------------------------------------------

    def queue_notify(self, index):
        """Serve the queue's requests of this turn."""
        queue = self.queues[index]
        served = False
        while self.fd is not None and (chain := queue.pop()) is not None:
            self._serve(queue, chain)
            served = True
        if served:
            self.signal_used(queue)

    def _serve(self, queue, chain):
        if not chain.writable_len:
            self.guest_error("request with no device-writable byte for the status; returned "
                             "with length 0")
            self.counters["errors"] += 1
            queue.add_used(chain, 0)
            return
        data_out, status = _without_last_byte(chain.writable)
        self._work = 0
        try:
            status_code, written = self._execute(chain, data_out)
        except OSError as err:
            self.error("%s: %s", self.image, err)
            status_code, written = S_IOERR, 0
        queue.charge(self._work)             # syncs, zeroed and discarded ranges
        if status_code != S_OK:
            self.counters["errors"] += 1
        data_len = chain.writable_len - 1
        if written < data_len <= MAX_REQUEST_BYTES:   # these bytes count in the turn (pop)
            fill_zeros(skip(data_out, written))
            written = data_len
        self._status[0] = status_code
        status[:] = self._status
        queue.add_used(chain, written + 1 if written == data_len else written)

    def _execute(self, chain, data_out):
        """Do one request: (status, bytes written into the chain before the status)."""
        if gather(chain.readable, self._header) < HEADER.size:
            self.guest_error("request header of %d bytes (16 needed)", chain.readable_len)
            return S_IOERR, 0
        kind, _reserved, sector = HEADER.unpack(self._header)
        feature = REQUEST_FEATURES.get(kind, -1)
        if feature == -1 or (feature is not None and not self.has_feature(feature)):
            self.guest_error("request type %d is not supported or not negotiated", kind)
            return S_UNSUPP, 0
        data_in_len = chain.readable_len - HEADER.size
        out_len = chain.writable_len - 1
        faults = self.context.faults
        if faults is not None and kind in (T_IN, T_OUT):
            fault = faults.block_request(kind == T_OUT, sector,
                                         data_in_len if kind == T_OUT else out_len)
            if fault is not None:
                return self._injected(fault, sector, chain.readable, data_in_len), 0
        if kind == T_IN:
            return self._read(sector, data_out, out_len)
        if kind == T_GET_ID:
            n = scatter(self.serial, data_out)
            self.count(bytes_to_guest=n)
            return S_OK, n
        if out_len:
            self.guest_error("type %d request with %d device-writable bytes before the status",
                             kind, out_len)
            return S_IOERR, 0
        if kind == T_OUT:
            return self._write(sector, chain.readable, data_in_len), 0
        if kind == T_FLUSH:
            if not self.readonly:
                self._sync()
            self.count()
            self.counters["flushes"] += 1
            return S_OK, 0
        return self._discard_write_zeroes(chain, data_in_len, zeroes=kind == T_WRITE_ZEROES), 0

    def _range_ok(self, sector, length):
        if length % SECTOR:
            self.guest_error("request of %d bytes is not a multiple of %d", length, SECTOR)
            return False
        if length > MAX_REQUEST_BYTES:
            self.guest_error("request of %d bytes is more than %d", length, MAX_REQUEST_BYTES)
            return False
        if sector + length // SECTOR > self.capacity:
            self.guest_error("sectors %d+%d are past the capacity of %d", sector,
                             length // SECTOR, self.capacity)
            return False
        return True

    def _read(self, sector, views, length):
        if not self._range_ok(sector, length):
            return S_IOERR, 0
        n = transfer(os.preadv, self.fd, views, sector * SECTOR)
        if n < length:                        # past the end of a file shortened meanwhile
            self.error("%s: read of %d bytes at sector %d ended after %d: the image is "
                       "shorter than its capacity (changed under the daemon?)", self.image,
                       length, sector, n)
            return S_IOERR, n
        self.count(bytes_to_guest=length)
        return S_OK, length

    def _write(self, sector, readable, length):
        if self.readonly:
            self.guest_error("write to a read-only device")
            return S_IOERR
        if not self._range_ok(sector, length):
            return S_IOERR
        n = transfer(os.pwritev, self.fd, skip(readable, HEADER.size), sector * SECTOR)
        if n < length:
            raise OSError(errno.EIO, f"wrote {n} of {length} bytes")
        if not self.has_feature(F_FLUSH):
            self._sync()                      # no flush command: write-through
        self.count(bytes_from_guest=length)
        return S_OK

    def _sync(self):
        """``fdatasync`` the image, or OSError: this one failed, or an earlier one did (then
        every later one is refused: the module docstring, IOERR)."""
        if self._sync_failed:
            raise OSError(errno.EIO, "an earlier fdatasync failed: writes acknowledged before "
                          "it may be lost; no flush succeeds until the device is started afresh")
        self._work += SYNC_COST
        try:
            os.fdatasync(self.fd)
        except OSError:
            self._sync_failed = True
            self.keep_state()                 # a restarted daemon must refuse them too
            raise

    # -- a restart under a running guest (avatar_hw.state) ---------------------------------------

    def saved_state(self):
        """A failed ``fdatasync``: the image a restarted daemon opens again does not say."""
        return {"sync_failed": True} if self._sync_failed else {}

    def restore_state(self, saved, words, live):
        self._sync_failed = bool(saved.get("sync_failed"))

    def _injected(self, fault, sector, readable, length):
        """An injected fault (avatar_hw.faults) answers the request: IOERR; a ``torn`` write
        first writes its first ``keep`` bytes (at most the request's) to the image."""
        if fault.name == "torn" and not self.readonly and self._range_ok(sector, length):
            keep = min(fault.options["keep"], length)
            transfer(os.pwritev, self.fd, truncate(skip(readable, HEADER.size), keep),
                     sector * SECTOR)
        return S_IOERR

    def _discard_write_zeroes(self, chain, length, *, zeroes):
        segments = self._segments
        if self.readonly:
            self.guest_error("discard or write zeroes on a read-only device")
            return S_IOERR
        count, rest = divmod(length, SEGMENT.size)
        most = MAX_WRITE_ZEROES_SEGMENTS if zeroes else MAX_DWZ_SEGMENTS
        if rest or not 0 < count <= most:
            self.guest_error("%d bytes of %s segments (1 to %d of 16 bytes)", length,
                             "write-zeroes" if zeroes else "discard", most)
            return S_IOERR
        gather(skip(chain.readable, HEADER.size), segments)
        limit = MAX_WRITE_ZEROES_SECTORS if zeroes else MAX_DISCARD_SECTORS
        parsed = [SEGMENT.unpack_from(segments, i * SEGMENT.size) for i in range(count)]
        for sector, num, flags in parsed:      # every segment checked before any is done
            if flags & ~DWZ_F_UNMAP or (flags and not zeroes):
                self.guest_error("segment flags 0x%x not supported", flags)
                return S_UNSUPP
            if num > limit or sector + num > self.capacity:
                self.guest_error("segment sectors %d+%d past the capacity %d or the limit %d",
                                 sector, num, self.capacity, limit)
                return S_IOERR
        for sector, num, flags in parsed:
            if num:
                self._work += num * SECTOR
                if zeroes:
                    self._write_zeroes(sector * SECTOR, num * SECTOR, unmap=flags & DWZ_F_UNMAP)
                else:
                    self._discard(sector * SECTOR, num * SECTOR)
        if zeroes and not self.has_feature(F_FLUSH):
            self._sync()                      # write-through, as a write
        self.count()
        self.counters["write_zeroes" if zeroes else "discards"] += 1
        return S_OK

    def _write_zeroes(self, offset, length, *, unmap):
        modes = [FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE] if unmap else [FALLOC_FL_ZERO_RANGE]
        for mode in modes:
            try:
                fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as err:
                if err.errno not in UNSUPPORTED:
                    raise
        if transfer(os.pwritev, self.fd, zeros(length), offset) < length:
            raise OSError(errno.EIO, "short write of zeros")   # no fallocate mode here

    def _discard(self, offset, length):
        """Discard is advisory: what the host cannot do is not done (QEMU too)."""
        try:
            if self._block_device:
                fcntl.ioctl(self.fd, BLKDISCARD, BLK_RANGE.pack(offset, length))
            else:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            if err.errno not in UNSUPPORTED:
                raise

    def _discard_granule(self, st):
        """The bytes a discard is best aligned to: the file system's block, the block
        device's logical block (BLKDISCARD refuses less)."""
        if not self._block_device:
            return st.st_blksize
        return struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, bytes(4)))[0]

    # -- introspection ------------------------------------------------------------------------

    def info(self):
        out = super().info()
        out.update(image=self.image, readonly=self.readonly, capacity=self.capacity)
        return out


def check_queues(queues):
    """The request queues offered with VIRTIO_BLK_F_MQ."""
    if not 1 <= queues <= MAX_QUEUES:
        raise ValueError(f"queues = {queues}: give 1 to {MAX_QUEUES} request queues")


def check_size(size):
    """``size`` of an image to create: whole sectors, at least one."""
    if not SECTOR <= size < 1 << 63 or size % SECTOR:
        raise ValueError(f"must be a multiple of {SECTOR} bytes (at least {SECTOR}, below "
                         f"2**63), not {size}")


SCHEMA = Schema("block", (
    Field("image", str, REQUIRED, "the path of a raw image or block device", path=under),
    Field("size", int, None, "an integer number of bytes, a multiple of 512: the size of the "
          "image created (sparse) if it does not exist", check_size),
    Field("readonly", bool, False),
    Field("serial", str, None, f"a string (up to {SERIAL_BYTES} bytes)", check_serial),
    Field("queues", int, None, f"the number of request queues (1 to {MAX_QUEUES})",
          check_queues),
))


def from_config(options):
    """The VMs config's ``block = { image, readonly, serial, queues, size }``; ``size``
    creates a missing image, sparse (an existing one is used as it is); an image it created
    is removed again when the device cannot be made, so the next start creates it anew."""
    created = options.get("size") is not None and _create(options["image"], options["size"])
    try:
        return BlockDevice(options["image"], readonly=options.get("readonly", False),
                           serial=options.get("serial"), queues=options.get("queues"))
    except BaseException:
        if created:
            os.unlink(options["image"])
        raise


def _create(image, size):
    """Create ``image`` of ``size`` bytes (sparse) unless it exists; whether it did."""
    try:
        f = open(image, "xb")
    except FileExistsError:
        return False
    with f:
        try:
            f.truncate(size)
        except OSError as err:
            os.unlink(image)
            raise ValueError(f"size = {size}: cannot make {image} that large "
                             f"({os_reason(err)})") from None
    return True
