"""9P2000.L on the wire, for virtio-9p's file server (``p9fs``): message types, the
layouts of fixed fields, the reader of a request body and the checks of a name.

Every read past a request's end is EPROTO; a name that is not one path component is
EINVAL (ENAMETOOLONG past 255 bytes). Errors travel as ``P9Error`` (an Rlerror).
"""

import errno
import os
import struct

MSIZE_MAX = 512 << 10
MSIZE_MIN = 4096
MAX_WALK = 16                  # MAXWELEM
NAME_MAX = 255
XATTR_MAX = 64 << 10
XATTR_HELD_MAX = 1 << 20       # xattr values held by all fids together
REQUEST_MAX = 64 << 10         # a request other than Twrite (names, paths, walks)
IOHDR = 24                     # P9_IOHDRSZ

# message types (9P2000.L)
TLERROR, TSTATFS, TLOPEN, TLCREATE, TSYMLINK, TMKNOD = 6, 8, 12, 14, 16, 18
TRENAME, TREADLINK = 20, 22
TGETATTR, TSETATTR, TXATTRWALK, TXATTRCREATE, TREADDIR, TFSYNC, TLOCK = 24, 26, 30, 32, 40, 50, 52
TGETLOCK, TLINK, TMKDIR, TRENAMEAT, TUNLINKAT = 54, 70, 72, 74, 76
TVERSION, TATTACH, TFLUSH, TWALK = 100, 104, 108, 110
TREAD, TWRITE, TCLUNK, TREMOVE = 116, 118, 120, 122

QTDIR, QTSYMLINK, QTFILE = 0x80, 0x02, 0x00
HEADER = struct.Struct("<IBH")
WRITE_HEADER = struct.Struct("<IBHIQI")          # ... fid, offset, count (Tread, Treaddir too)
READ_REPLY = struct.Struct("<IBHI")              # ... count (Rread, Rreaddir)
QID = struct.Struct("<BIQ")
GETATTR = struct.Struct("<Q13sIII" + "Q" * 15)   # nlink .. blocks, 4 times, gen, data_version
STATFS = struct.Struct("<IIQQQQQQI")
DIRENT64 = struct.Struct("<QqHB")                # the kernel's: ino, offset, reclen, type
DIRENT64_MAX = (DIRENT64.size + NAME_MAX + 1 + 7) & ~7   # its longest record (8-aligned)
DIRENT = struct.Struct("<BIQQBH")                # Rreaddir's: qid, offset, type, name length
V9FS_MAGIC = 0x01021997
WALK = struct.Struct("<IBHIIH")                  # Twalk's header: ... fid, newfid, nwname
# The largest reply (header included) of each request whose reply can pass an Rlerror's 11
# bytes, but Rwalk's (``reply_max``). Rread is fitted to the chain's writable bytes;
# Rreaddir, Rreadlink and Rgetlock, sized by their data, change nothing.
REPLY_MAX = {
    TVERSION: HEADER.size + 4 + 2 + len(b"9P2000.L"), TATTACH: HEADER.size + QID.size,
    TGETATTR: HEADER.size + GETATTR.size, TLOPEN: HEADER.size + QID.size + 4,
    TLCREATE: HEADER.size + QID.size + 4, TMKDIR: HEADER.size + QID.size,
    TSYMLINK: HEADER.size + QID.size, TSTATFS: HEADER.size + STATFS.size,
    TXATTRWALK: HEADER.size + 8,
}
GETATTR_BASIC = 0x7FF

# Tsetattr valid bits
SA_MODE, SA_UID, SA_GID, SA_SIZE, SA_ATIME, SA_MTIME = 1, 2, 4, 8, 0x10, 0x20
SA_ATIME_SET, SA_MTIME_SET = 0x80, 0x100
# Tlopen / Tlcreate flags (P9_DOTL_*: Linux's generic values, not the host's)
DOTL_ACCMODE, DOTL_CREATE, DOTL_EXCL, DOTL_TRUNC, DOTL_APPEND = 3, 0o100, 0o200, 0o1000, 0o2000
DOTL_DSYNC, DOTL_SYNC = 0o10000, 0o4000000
AT_REMOVEDIR_DOTL = 0x200


class P9Error(Exception):
    """An answer of Rlerror with ``errno``."""

    def __init__(self, code):
        super().__init__(os.strerror(code))
        self.errno = code


class Reader:
    """Fields of one request body; running past its end is EPROTO."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        try:
            values = struct.unpack_from("<" + fmt, self.data, self.pos)
        except struct.error:
            raise P9Error(errno.EPROTO) from None
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self):
        n = self.take("H")
        if self.pos + n > len(self.data):
            raise P9Error(errno.EPROTO)
        self.pos += n
        return bytes(self.data[self.pos - n:self.pos])


def reply_max(kind, message):
    """The largest reply (header included) to the whole request ``message`` of type
    ``kind``: the chain's writable bytes must hold it before the request acts (ERANGE).
    Rwalk's is a qid per name (up to MAX_WALK): Linux gives it exactly that room."""
    if kind == TWALK and len(message) >= WALK.size:
        return HEADER.size + 2 + min(WALK.unpack_from(message)[-1], MAX_WALK) * QID.size
    return REPLY_MAX.get(kind, 0)


def pstr(value):
    return struct.pack("<H", len(value)) + value


def wire_time(ns):
    """(seconds, nanoseconds) of a time in ns since the epoch, as 9P2000.L's two u64: the
    seconds in two's complement (Linux's v9fs reads them as a signed time64_t), so a time
    before 1970 is sent, not refused."""
    return ns // 10**9 & 0xFFFFFFFFFFFFFFFF, ns % 10**9


def name_ok(name, *, dots=False):
    """``name`` is one path component (``.``/``..`` only when ``dots``); else EINVAL or
    ENAMETOOLONG."""
    if not name or b"/" in name or b"\0" in name or (not dots and name in (b".", b"..")):
        raise P9Error(errno.EINVAL)
    if len(name) > NAME_MAX:
        raise P9Error(errno.ENAMETOOLONG)
    return name
