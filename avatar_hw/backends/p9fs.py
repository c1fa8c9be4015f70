"""The 9P2000.L file server behind virtio-9p: a host folder, served so that no path leaves it.

``P9Server.handle(request, writable)`` answers one message: ``request`` is the
chain's device-readable views (size[4] type[1] tag[2] body), ``writable`` its
device-writable views; it returns the bytes written (the used length). Every
field is checked; a malformed message gets ``Rlerror`` (EPROTO for a bad frame,
EINVAL for a bad field) and nothing escapes as an exception.

Confinement (the folder is the box):

* every fid holds an ``O_PATH`` file descriptor; a walk opens one component at
  a time with ``openat(dirfd, name, O_PATH | O_NOFOLLOW)`` relative to the fd
  the server already holds, so a symlink is never followed (the client resolves
  symlinks itself), and a rename or a swap of a directory for a symlink between
  two requests cannot redirect a later one: it acts on the inode the fid pins;
* names are single components: ``/``, NUL, the empty name and (for creation)
  ``.`` and ``..`` are refused; ``..`` at the root stays at the root, and a
  ``..`` elsewhere is checked to lead back up to the root (a directory moved out
  by the host cannot be left through);
* opening for I/O reopens the pinned inode through ``/proc/self/fd`` (what
  virtiofsd does), only for regular files and directories (a symlink, FIFO or
  device node is never opened: EACCES / ELOOP); ``mknod`` is refused (EPERM).

Ownership (``security_model``, as QEMU's): ``passthrough`` chowns files to the
guest's uid/gid (needs root); ``mapped-xattr`` creates files as the daemon
(0600, directories 0700) and keeps the guest's uid, gid and mode in
``user.virtfs.{uid,gid,mode}`` xattrs, which getattr reports (and the guest
cannot see or set); ``none`` ignores ownership changes and reports what the host has
(and never sets setuid or setgid bits: its files are the daemon's).

Bounds: ``msize`` ≤ ``MSIZE_MAX``; ``max_fids`` fids (ENFILE beyond); a walk of
at most 16 names of at most 255 bytes; xattr values ≤ 64 KiB (1 MiB held by all
fids); readdir reads the directory with ``getdents64`` at the kernel's offsets (no listing kept).
Reads and writes move with ``preadv``/``pwritev`` straight on guest memory.
"""

import ctypes
import ctypes.util
import errno
import os
import platform
import stat
import struct
import time

from ..virtio.buffers import gather, scatter, skip, transfer, truncate

MSIZE_MAX = 512 << 10
MSIZE_MIN = 4096
MAX_WALK = 16                  # MAXWELEM
NAME_MAX = 255
XATTR_MAX = 64 << 10
XATTR_HELD_MAX = 1 << 20       # xattr values held by all fids together
REQUEST_MAX = 64 << 10         # a request other than Twrite (names, paths, walks)
IOHDR = 24                     # P9_IOHDRSZ
MODELS = ("passthrough", "mapped-xattr", "none")

# message types (9P2000.L)
TLERROR, TSTATFS, TLOPEN, TLCREATE, TSYMLINK, TMKNOD = 6, 8, 12, 14, 16, 18
TRENAME, TREADLINK = 20, 22
TGETATTR, TSETATTR, TXATTRWALK, TXATTRCREATE, TREADDIR, TFSYNC, TLOCK = 24, 26, 30, 32, 40, 50, 52
TGETLOCK, TLINK, TMKDIR, TRENAMEAT, TUNLINKAT = 54, 70, 72, 74, 76
TVERSION, TATTACH, TFLUSH, TWALK = 100, 104, 108, 110
TREAD, TWRITE, TCLUNK, TREMOVE = 116, 118, 120, 122

QTDIR, QTSYMLINK, QTFILE = 0x80, 0x02, 0x00
QID_INO_BITS = 48              # a qid path: 16-bit prefix per (device, inode >> 48), 48 inode bits
QID_PREFIXES_MAX = 1 << 16
HEADER = struct.Struct("<IBH")
WRITE_HEADER = struct.Struct("<IBHIQI")          # ... fid, offset, count
READ_REPLY = struct.Struct("<IBHI")
QID = struct.Struct("<BIQ")
GETATTR = struct.Struct("<Q13sIII" + "Q" * 15)   # nlink .. blocks, 4 times, gen, data_version
STATFS = struct.Struct("<IIQQQQQQI")
DIRENT64 = struct.Struct("<QqHB")
V9FS_MAGIC = 0x01021997
GETATTR_BASIC = 0x7FF

# Tsetattr valid bits
SA_MODE, SA_UID, SA_GID, SA_SIZE, SA_ATIME, SA_MTIME = 1, 2, 4, 8, 0x10, 0x20
SA_ATIME_SET, SA_MTIME_SET = 0x80, 0x100
# Tlopen / Tlcreate flags (P9_DOTL_*: Linux's generic values, not the host's)
DOTL_ACCMODE, DOTL_CREATE, DOTL_EXCL, DOTL_TRUNC, DOTL_APPEND = 3, 0o100, 0o200, 0o1000, 0o2000
DOTL_DSYNC, DOTL_SYNC = 0o10000, 0o4000000
AT_REMOVEDIR_DOTL = 0x200
AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW = 0x1000, 0x100

XATTR_UID, XATTR_GID, XATTR_MODE = b"user.virtfs.uid", b"user.virtfs.gid", b"user.virtfs.mode"
XATTR_PREFIX = "user.virtfs."

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "armv7l": 217, "riscv64": 61}.get(
    platform.machine(), 61)


def _check(result):
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def fchown_empty(fd, uid, gid):
    """fchownat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW): chown what an O_PATH fd pins."""
    _check(_libc.fchownat(fd, b"", ctypes.c_uint32(uid), ctypes.c_uint32(gid),
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def getdents(fd, buffer, length):
    """getdents64 into the first ``length`` bytes of ``buffer`` (a ctypes buffer); the
    bytes filled (0 at the end)."""
    return _check(_libc.syscall(_SYS_GETDENTS64, fd, buffer, ctypes.c_size_t(length)))


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


def pstr(value):
    return struct.pack("<H", len(value)) + value


def name_ok(name, *, dots=False):
    """``name`` is one path component (``.``/``..`` only when ``dots``); else EINVAL or
    ENAMETOOLONG."""
    if not name or b"/" in name or b"\0" in name or (not dots and name in (b".", b"..")):
        raise P9Error(errno.EINVAL)
    if len(name) > NAME_MAX:
        raise P9Error(errno.ENAMETOOLONG)
    return name


def proc(fd):
    return f"/proc/self/fd/{fd}"


class Fid:
    __slots__ = ("path_fd", "uid", "open_fd", "writable", "xattr", "xattr_name", "xattr_size",
                 "xattr_flags")

    def __init__(self, path_fd, uid):
        self.path_fd, self.uid = path_fd, uid
        self.open_fd, self.writable = None, False
        self.xattr = None                  # bytearray: an xattr fid (walked or being created)
        self.xattr_name, self.xattr_size, self.xattr_flags = None, 0, 0

    def close(self):
        for fd in (self.path_fd, self.open_fd):
            if fd is not None:
                os.close(fd)
        self.path_fd = self.open_fd = None


class P9Server:
    def __init__(self, root, *, readonly=False, security_model="none", max_fids=4096):
        if security_model not in MODELS:
            raise ValueError(f"security_model {security_model!r}: give one of {', '.join(MODELS)}")
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self.root_fd)
        self.root_id = (st.st_dev, st.st_ino)
        self.prefixes = {(st.st_dev, st.st_ino >> QID_INO_BITS): 0}   # qid path prefixes
        self.readonly, self.model, self.max_fids = readonly, security_model, max_fids
        self.fids = {}
        self.bug = None                # the last unexpected exception (the device logs it)
        self.msize = 8192
        self._request = bytearray(REQUEST_MAX)
        self._dents = ctypes.create_string_buffer(MSIZE_MAX)
        self.handlers = {
            TVERSION: self.version, TATTACH: self.attach, TWALK: self.walk, TCLUNK: self.clunk,
            TGETATTR: self.getattr, TSETATTR: self.setattr, TLOPEN: self.lopen,
            TLCREATE: self.lcreate, TREADDIR: self.readdir, TMKDIR: self.mkdir,
            TUNLINKAT: self.unlinkat, TRENAMEAT: self.renameat, TSYMLINK: self.symlink,
            TREADLINK: self.readlink, TLINK: self.link, TMKNOD: self.mknod,
            TSTATFS: self.statfs, TFSYNC: self.fsync, TFLUSH: self.flush,
            TXATTRWALK: self.xattrwalk, TXATTRCREATE: self.xattrcreate, TLOCK: self.lock,
            TGETLOCK: self.getlock, TRENAME: self.rename, TREMOVE: self.remove,
        }

    def close(self):
        self.clunk_all()
        if self.root_fd is not None:
            os.close(self.root_fd)
            self.root_fd = None

    def clunk_all(self):
        for fid in self.fids.values():
            fid.close()
        self.fids.clear()

    # -- one message ---------------------------------------------------------------------------

    def handle(self, readable, readable_len, writable, writable_len):
        """Answer the message in ``readable``; returns (bytes written, errno or 0)."""
        head = self._request
        n = gather(readable, memoryview(head)[:WRITE_HEADER.size])
        if n < HEADER.size or writable_len < HEADER.size + 4:
            return 0, errno.EPROTO
        size, kind, tag = HEADER.unpack_from(head)
        if not HEADER.size <= size <= min(readable_len, self.msize if kind != TVERSION
                                          else MSIZE_MAX):
            return self._reply_error(writable, tag, errno.EPROTO), errno.EPROTO
        try:
            if kind == TREAD:
                return self.read(head, size, tag, writable, writable_len), 0
            if kind == TWRITE:
                reply = self.write(head, size, readable)
            else:
                if size > REQUEST_MAX:
                    raise P9Error(errno.EPROTO)
                gather(readable, memoryview(head)[:size])
                handler = self.handlers.get(kind, self.unsupported)
                reply = handler(Reader(memoryview(head)[HEADER.size:size]))
        except P9Error as err:
            return self._reply_error(writable, tag, err.errno), err.errno
        except OSError as err:
            code = err.errno or errno.EIO
            return self._reply_error(writable, tag, code), code
        except (ValueError, OverflowError):        # NUL in a name, an out-of-range number
            return self._reply_error(writable, tag, errno.EINVAL), errno.EINVAL
        except Exception as err:                   # a server bug: this request fails, no more
            self.bug = err
            return self._reply_error(writable, tag, errno.EIO), errno.EIO
        out = HEADER.pack(HEADER.size + len(reply), kind + 1, tag) + reply
        if len(out) > writable_len:
            return self._reply_error(writable, tag, errno.ERANGE), errno.ERANGE
        return scatter(out, writable), 0

    def _reply_error(self, writable, tag, code):
        return scatter(HEADER.pack(HEADER.size + 4, TLERROR + 1, tag) + struct.pack("<I", code),
                       writable)

    # -- fids ----------------------------------------------------------------------------------

    def fid(self, number):
        try:
            return self.fids[number]
        except KeyError:
            raise P9Error(errno.EBADF) from None

    def new_fid(self, number, path_fd, uid, *, replace=None):
        """Put ``path_fd`` (owned) under fid ``number``; ``replace``: the fid it may reuse."""
        if number in self.fids and number != replace:
            os.close(path_fd)
            raise P9Error(errno.EBADF)
        if number not in self.fids and len(self.fids) >= self.max_fids:
            os.close(path_fd)
            raise P9Error(errno.ENFILE)
        old = self.fids.get(number)
        self.fids[number] = Fid(path_fd, uid)
        if old is not None:
            old.close()

    def writes(self):
        if self.readonly:
            raise P9Error(errno.EROFS)

    def qid(self, st):
        kind = (QTDIR if stat.S_ISDIR(st.st_mode) else
                QTSYMLINK if stat.S_ISLNK(st.st_mode) else QTFILE)
        return QID.pack(kind, 0, self.qid_path(st.st_dev, st.st_ino))

    def qid_path(self, dev, ino):
        """The file's identity for the guest, unique across the file systems mounted inside
        the folder (QEMU's ``multidevs=remap``): Linux keys its inodes by the qid path
        alone, so the inode number by itself would make two files of two devices one."""
        key = (dev, ino >> QID_INO_BITS)
        prefix = self.prefixes.get(key)
        if prefix is None:
            if len(self.prefixes) >= QID_PREFIXES_MAX:
                raise P9Error(errno.ENFILE)
            prefix = self.prefixes[key] = len(self.prefixes)
        return prefix << QID_INO_BITS | (ino & ((1 << QID_INO_BITS) - 1))

    def is_root(self, fd):
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == self.root_id

    def step(self, fd, name):
        """An O_PATH fd for ``name`` under ``fd`` (never following a symlink, never above
        the root)."""
        if name == b".":
            return os.dup(fd)
        if name == b"..":
            if self.is_root(fd):
                return os.dup(fd)
            parent = os.open(b"..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            if not self.beneath_root(parent):
                os.close(parent)
                raise P9Error(errno.EACCES)
            return parent
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)

    def beneath_root(self, fd):
        """True if going up from directory ``fd`` reaches the root (at most 4096 levels)."""
        cur = os.dup(fd)
        try:
            for _ in range(4096):
                st = os.fstat(cur)
                if (st.st_dev, st.st_ino) == self.root_id:
                    return True
                up = os.open(b"..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
                same = os.path.samestat(os.fstat(up), st)
                os.close(cur)
                cur = up
                if same:
                    return False              # the file system's root, not ours
            return False
        finally:
            os.close(cur)

    def locate(self, fd):
        """(an O_PATH fd of the parent directory, the name) of what ``fd`` pins, found again
        from the root one component at a time (``step``: no symlink followed, nothing
        above the root) by its current path, and checked to be the same inode: ENOENT if
        it was unlinked or is no longer under the root, EBUSY for the root itself. The
        name is then acted on relative to that parent, which lies inside the folder."""
        root, path = (os.readlink(os.fsencode(proc(f))) for f in (self.root_fd, fd))
        if path == root:
            raise P9Error(errno.EBUSY)
        prefix = root.rstrip(b"/") + b"/"
        if not path.startswith(prefix):
            raise P9Error(errno.ENOENT)
        *dirs, name = path[len(prefix):].split(b"/")
        parent = os.dup(self.root_fd)
        try:
            for part in dirs:
                nxt = self.step(parent, name_ok(part, dots=True))
                os.close(parent)
                parent = nxt
                if not stat.S_ISDIR(os.fstat(parent).st_mode):
                    raise P9Error(errno.ENOENT)
            name_ok(name)
            if not os.path.samestat(os.stat(name, dir_fd=parent, follow_symlinks=False),
                                    os.fstat(fd)):
                raise P9Error(errno.ENOENT)
        except BaseException:
            os.close(parent)
            raise
        return parent, name

    def stat_of(self, fid):
        return os.fstat(fid.path_fd)

    # -- ownership -----------------------------------------------------------------------------

    def owned(self, fd, st, uid, gid, mode):
        """Record a new file's guest owner and mode as the security model says."""
        if self.model == "passthrough":
            fchown_empty(fd, uid, gid)
        elif self.model == "mapped-xattr" and not stat.S_ISLNK(st.st_mode):
            for key, value in ((XATTR_UID, uid), (XATTR_GID, gid), (XATTR_MODE, mode & 0o7777)):
                os.setxattr(proc(fd), key, struct.pack("<I", value))

    def mapped(self, fd, st):
        """(uid, gid, mode) as the guest sees them."""
        uid, gid, mode = st.st_uid, st.st_gid, st.st_mode
        if self.model == "mapped-xattr" and not stat.S_ISLNK(st.st_mode):
            for key in (XATTR_UID, XATTR_GID, XATTR_MODE):
                try:
                    value = struct.unpack("<I", os.getxattr(proc(fd), key)[:4].ljust(4, b"\0"))[0]
                except OSError:
                    continue
                if key == XATTR_UID:
                    uid = value
                elif key == XATTR_GID:
                    gid = value
                else:
                    mode = stat.S_IFMT(mode) | (value & 0o7777)
        return uid, gid, mode

    def create_mode(self, mode, directory):
        if self.model == "mapped-xattr":
            return 0o700 if directory else 0o600
        return self.host_mode(mode)

    def host_mode(self, mode):
        """Mode bits a file of the folder may get: the guest's, without setuid and setgid
        unless the model is passthrough (files are the daemon's own under none)."""
        return mode & (0o7777 if self.model == "passthrough" else 0o1777)

    # -- session -------------------------------------------------------------------------------

    def version(self, r):
        msize, version = r.take("I"), r.string()
        self.clunk_all()
        if msize < MSIZE_MIN:
            raise P9Error(errno.EINVAL)
        self.msize = min(msize, MSIZE_MAX)
        return struct.pack("<I", self.msize) + pstr(b"9P2000.L" if version.startswith(b"9P2000.L")
                                                    else b"unknown")

    def attach(self, r):
        fid, _afid = r.take("II")
        _uname, _aname, uid = r.string(), r.string(), r.take("I")
        self.new_fid(fid, os.dup(self.root_fd), uid)
        return self.qid(os.fstat(self.root_fd))

    def flush(self, r):
        r.take("H")                      # every request is answered before the next is read
        return b""

    def clunk(self, r):
        fid = self.fids.pop(r.take("I"), None)
        if fid is None:
            raise P9Error(errno.EBADF)
        try:
            if fid.xattr_name is not None:
                self._commit_xattr(fid)
        finally:
            fid.close()
        return b""

    def remove(self, r):
        """Tremove: unlink what the fid stands for; the fid is clunked even when it fails.
        (Linux sends it only when Tunlinkat is refused; QEMU serves both.)"""
        number = r.take("I")
        fid = self.fid(number)
        try:
            self.writes()
            parent, name = self.locate(fid.path_fd)
            try:
                if stat.S_ISDIR(self.stat_of(fid).st_mode):
                    os.rmdir(name, dir_fd=parent)
                else:
                    os.unlink(name, dir_fd=parent)
            finally:
                os.close(parent)
        finally:
            del self.fids[number]
            fid.close()
        return b""

    def rename(self, r):
        """Trename: move what the fid stands for to ``name`` in directory ``dfid``
        (Linux's fallback when Trenameat is refused)."""
        fid_no, dfid, name = r.take("II") + (r.string(),)
        fid, newdir = self.fid(fid_no), self.fid(dfid)
        name_ok(name)
        self.writes()
        parent, oldname = self.locate(fid.path_fd)
        try:
            os.rename(oldname, name, src_dir_fd=parent, dst_dir_fd=newdir.path_fd)
        finally:
            os.close(parent)
        return b""

    def unsupported(self, r):
        raise P9Error(errno.EOPNOTSUPP)

    # -- names ---------------------------------------------------------------------------------

    def walk(self, r):
        fid_no, newfid, count = r.take("IIH")
        if count > MAX_WALK:
            raise P9Error(errno.EINVAL)
        names = [name_ok(r.string(), dots=True) for _ in range(count)]
        fid = self.fid(fid_no)
        if fid.xattr is not None:
            raise P9Error(errno.EBADF)
        if newfid != fid_no and newfid in self.fids:
            raise P9Error(errno.EBADF)
        if newfid == fid_no and not names:
            return struct.pack("<H", 0)            # a clone onto itself changes nothing
        cur, qids = os.dup(fid.path_fd), []
        try:
            for i, name in enumerate(names):
                try:
                    if not stat.S_ISDIR(os.fstat(cur).st_mode):
                        raise P9Error(errno.ENOTDIR)
                    nxt = self.step(cur, name)
                except (OSError, P9Error):
                    if i == 0:
                        raise
                    break
                os.close(cur)
                cur = nxt
                qids.append(self.qid(os.fstat(cur)))
        except BaseException:
            os.close(cur)
            raise
        if len(qids) < len(names):
            os.close(cur)
        else:
            self.new_fid(newfid, cur, fid.uid, replace=fid_no)
        return struct.pack("<H", len(qids)) + b"".join(qids)

    def _created(self, dirfd, name, uid, gid, mode):
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            st = os.fstat(fd)
            self.owned(fd, st, uid, gid, mode)
            return self.qid(st)
        finally:
            os.close(fd)

    def mkdir(self, r):
        dfid, name, mode, gid = r.take("I"), r.string(), *r.take("II")
        fid = self.fid(dfid)
        name_ok(name)
        self.writes()
        os.mkdir(name, self.create_mode(mode, True), dir_fd=fid.path_fd)
        return self._created(fid.path_fd, name, fid.uid, gid, mode)

    def symlink(self, r):
        dfid, name, target, gid = r.take("I"), r.string(), r.string(), r.take("I")
        fid = self.fid(dfid)
        name_ok(name)
        if not target or len(target) > 4095:
            raise P9Error(errno.EINVAL)
        self.writes()
        os.symlink(target, name, dir_fd=fid.path_fd)     # stored, never followed here
        return self._created(fid.path_fd, name, fid.uid, gid, 0o777)

    def mknod(self, r):
        self.fid(r.take("I"))
        self.writes()
        raise P9Error(errno.EPERM)        # no device nodes, FIFOs or sockets in the folder

    def link(self, r):
        dfid, fid_no, name = r.take("II") + (r.string(),)
        dirf, target = self.fid(dfid), self.fid(fid_no)
        name_ok(name)
        self.writes()
        if not stat.S_ISREG(self.stat_of(target).st_mode):
            raise P9Error(errno.EPERM)
        os.link(proc(target.path_fd), name, dst_dir_fd=dirf.path_fd, follow_symlinks=True)
        return b""

    def unlinkat(self, r):
        dfid, name, flags = r.take("I"), r.string(), r.take("I")
        fid = self.fid(dfid)
        name_ok(name)
        self.writes()
        if flags & AT_REMOVEDIR_DOTL:
            os.rmdir(name, dir_fd=fid.path_fd)
        else:
            os.unlink(name, dir_fd=fid.path_fd)
        return b""

    def renameat(self, r):
        old, oldname, new, newname = r.take("I"), r.string(), r.take("I"), r.string()
        olddir, newdir = self.fid(old), self.fid(new)
        name_ok(oldname)
        name_ok(newname)
        self.writes()
        os.rename(oldname, newname, src_dir_fd=olddir.path_fd, dst_dir_fd=newdir.path_fd)
        return b""

    def readlink(self, r):
        fid = self.fid(r.take("I"))
        return pstr(os.fsencode(os.readlink(b"", dir_fd=fid.path_fd)))

    # -- attributes ----------------------------------------------------------------------------

    def getattr(self, r):
        fid, _mask = r.take("IQ")
        f = self.fid(fid)
        st = self.stat_of(f)
        uid, gid, mode = self.mapped(f.path_fd, st)
        return GETATTR.pack(GETATTR_BASIC, self.qid(st), mode, uid, gid, st.st_nlink, st.st_rdev,
                            st.st_size, st.st_blksize, st.st_blocks,
                            int(st.st_atime), st.st_atime_ns % 10**9,
                            int(st.st_mtime), st.st_mtime_ns % 10**9,
                            int(st.st_ctime), st.st_ctime_ns % 10**9, 0, 0, 0, 0)

    def setattr(self, r):
        fid_no, valid, mode, uid, gid, size = r.take("IIIIIQ")
        atime_s, atime_ns, mtime_s, mtime_ns = r.take("QQQQ")
        fid = self.fid(fid_no)
        self.writes()
        st = self.stat_of(fid)
        fd, link = fid.path_fd, stat.S_ISLNK(st.st_mode)
        if valid & SA_SIZE:
            if not stat.S_ISREG(st.st_mode):
                raise P9Error(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL)
            os.truncate(proc(fd), size)
        if valid & SA_MODE:
            if link:
                raise P9Error(errno.EOPNOTSUPP)
            if self.model == "mapped-xattr":
                os.setxattr(proc(fd), XATTR_MODE, struct.pack("<I", mode & 0o7777))
            else:
                os.chmod(proc(fd), self.host_mode(mode))
        if valid & (SA_UID | SA_GID):
            new_uid = uid if valid & SA_UID else 0xFFFFFFFF
            new_gid = gid if valid & SA_GID else 0xFFFFFFFF
            if self.model == "passthrough":
                fchown_empty(fd, new_uid, new_gid)
            elif self.model == "mapped-xattr" and not link:
                for key, value in ((XATTR_UID, new_uid), (XATTR_GID, new_gid)):
                    if value != 0xFFFFFFFF:
                        os.setxattr(proc(fd), key, struct.pack("<I", value))
        if valid & (SA_ATIME | SA_MTIME) and not link:
            old = os.fstat(fd)
            atime = ((atime_s * 10**9 + atime_ns) if valid & SA_ATIME_SET else None) \
                if valid & SA_ATIME else old.st_atime_ns
            mtime = ((mtime_s * 10**9 + mtime_ns) if valid & SA_MTIME_SET else None) \
                if valid & SA_MTIME else old.st_mtime_ns
            now = time.time_ns()                     # for the ones set without a time
            atime, mtime = (now if atime is None else atime), (now if mtime is None else mtime)
            os.utime(proc(fd), ns=(atime, mtime))
        return b""

    def statfs(self, r):
        fid = self.fid(r.take("I"))
        s = os.fstatvfs(fid.path_fd)
        return STATFS.pack(V9FS_MAGIC, s.f_bsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files,
                           s.f_ffree, s.f_fsid & (2**64 - 1), s.f_namemax)

    # -- open files ----------------------------------------------------------------------------

    def _open_flags(self, flags):
        acc = flags & DOTL_ACCMODE
        if acc == 3:
            raise P9Error(errno.EINVAL)
        if acc != os.O_RDONLY or flags & DOTL_TRUNC:
            self.writes()
        host = acc | os.O_CLOEXEC
        for dotl, bit in ((DOTL_TRUNC, os.O_TRUNC), (DOTL_APPEND, os.O_APPEND),
                          (DOTL_DSYNC, os.O_DSYNC), (DOTL_SYNC, os.O_SYNC)):
            if flags & dotl:
                host |= bit
        return host, acc != os.O_RDONLY

    def lopen(self, r):
        fid_no, flags = r.take("II")
        fid = self.fid(fid_no)
        if fid.open_fd is not None or fid.xattr is not None:
            raise P9Error(errno.EBADF)
        st = self.stat_of(fid)
        host, writable = self._open_flags(flags)
        if stat.S_ISDIR(st.st_mode):
            if writable:
                raise P9Error(errno.EISDIR)
            host = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        elif stat.S_ISLNK(st.st_mode):
            raise P9Error(errno.ELOOP)
        elif not stat.S_ISREG(st.st_mode):
            raise P9Error(errno.EACCES)      # FIFOs and device nodes are not served
        fd = os.open(proc(fid.path_fd), host)
        if not os.path.samestat(os.fstat(fd), st):
            os.close(fd)
            raise P9Error(errno.EAGAIN)
        fid.open_fd, fid.writable = fd, writable
        return self.qid(st) + struct.pack("<I", 0)

    def lcreate(self, r):
        fid_no, name, flags, mode, gid = r.take("I"), r.string(), *r.take("III")
        fid = self.fid(fid_no)
        name_ok(name)
        if fid.open_fd is not None or fid.xattr is not None:
            raise P9Error(errno.EBADF)
        self.writes()
        host, writable = self._open_flags(flags)
        fd = os.open(name, host | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     self.create_mode(mode, False),
                     dir_fd=fid.path_fd)
        try:
            path_fd = os.open(proc(fd), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        try:
            self.owned(path_fd, st, fid.uid, gid, mode)
        except BaseException:
            os.close(fd)
            os.close(path_fd)
            raise
        os.close(fid.path_fd)                 # the fid now stands for the new, open file
        fid.path_fd, fid.open_fd, fid.writable = path_fd, fd, writable
        return self.qid(st) + struct.pack("<I", 0)

    def open_fid(self, number):
        fid = self.fid(number)
        if fid.open_fd is None and fid.xattr is None:
            raise P9Error(errno.EBADF)
        return fid

    def read(self, head, size, tag, writable, writable_len):
        """Tread: the data goes with preadv straight into the guest's buffers after the header."""
        if size != WRITE_HEADER.size:
            raise P9Error(errno.EPROTO)
        _, _, _, fid_no, offset, count = WRITE_HEADER.unpack_from(head)
        fid = self.open_fid(fid_no)
        count = min(count, self.msize - READ_REPLY.size, writable_len - READ_REPLY.size)
        if fid.xattr is not None:
            data = bytes(fid.xattr[offset:offset + count]) if offset < len(fid.xattr) else b""
            n = scatter(data, skip(writable, READ_REPLY.size))
        else:
            if offset >= 2**63:
                raise P9Error(errno.EINVAL)
            n = transfer(os.preadv, fid.open_fd, truncate(skip(writable, READ_REPLY.size), count),
                         offset) if count > 0 else 0
        scatter(READ_REPLY.pack(READ_REPLY.size + n, TREAD + 1, tag, n), writable)
        return READ_REPLY.size + n

    def write(self, head, size, readable):
        """Twrite: the data goes with pwritev straight from the guest's buffers."""
        _, _, _, fid_no, offset, count = WRITE_HEADER.unpack_from(head)
        if size < WRITE_HEADER.size or size != WRITE_HEADER.size + count:
            raise P9Error(errno.EPROTO)
        fid = self.open_fid(fid_no)
        data = truncate(skip(readable, WRITE_HEADER.size), count)
        if fid.xattr is not None:
            if fid.xattr_name is None or offset != len(fid.xattr) or \
                    offset + count > fid.xattr_size:
                raise P9Error(errno.EINVAL)
            for view in data:
                fid.xattr += view
            return struct.pack("<I", count)
        if not fid.writable:
            raise P9Error(errno.EBADF)
        if offset >= 2**63:
            raise P9Error(errno.EINVAL)
        return struct.pack("<I", transfer(os.pwritev, fid.open_fd, data, offset))

    def fsync(self, r):
        fid_no, datasync = r.take("II")
        fid = self.open_fid(fid_no)
        if fid.open_fd is not None:
            (os.fdatasync if datasync else os.fsync)(fid.open_fd)
        return b""

    def readdir(self, r):
        fid_no, offset, count = r.take("IQI")
        fid = self.open_fid(fid_no)
        if fid.open_fd is None or not stat.S_ISDIR(self.stat_of(fid).st_mode):
            raise P9Error(errno.ENOTDIR)
        count = min(count, self.msize - IOHDR)
        if offset >= 2**63:
            raise P9Error(errno.EINVAL)
        os.lseek(fid.open_fd, offset, os.SEEK_SET)
        dev = os.fstat(fid.open_fd).st_dev          # a mount point's entry has its own below
        out = bytearray()
        buf = self._dents
        n = getdents(fid.open_fd, buf, min(count, len(buf)))
        raw = ctypes.string_at(buf, n)
        pos = 0
        while pos < n:
            ino, d_off, reclen, d_type = DIRENT64.unpack_from(raw, pos)
            name = raw[pos + DIRENT64.size:pos + reclen].split(b"\0", 1)[0]
            pos += reclen
            kind = QTDIR if d_type == 4 else QTSYMLINK if d_type == 10 else QTFILE
            entry = QID.pack(kind, 0, self.qid_path(dev, ino)) + struct.pack("<QB", d_off, d_type) + pstr(name)
            if len(out) + len(entry) > count - 4:
                break
            out += entry
        return struct.pack("<I", len(out)) + out

    # -- xattrs and locks ----------------------------------------------------------------------

    def _xattr_room(self, size):
        held = sum(max(len(f.xattr), f.xattr_size) for f in self.fids.values()
                   if f.xattr is not None)
        if held + size > XATTR_HELD_MAX:
            raise P9Error(errno.ENOMEM)

    def _xattr_name(self, name):
        if len(name) > NAME_MAX or b"\0" in name:
            raise P9Error(errno.EINVAL)
        if self.model == "mapped-xattr" and name.startswith(XATTR_PREFIX.encode()):
            raise P9Error(errno.EACCES)      # the mapping's own attributes
        return name

    def xattrwalk(self, r):
        fid_no, newfid, name = r.take("II") + (r.string(),)
        fid = self.fid(fid_no)
        st = self.stat_of(fid)
        if stat.S_ISLNK(st.st_mode):
            raise P9Error(errno.ENODATA if name else errno.EOPNOTSUPP)
        if name:
            value = os.getxattr(proc(fid.path_fd), self._xattr_name(name))
        else:
            names = [n for n in os.listxattr(proc(fid.path_fd))
                     if not (self.model == "mapped-xattr" and n.startswith(XATTR_PREFIX))]
            value = b"".join(os.fsencode(n) + b"\0" for n in names)
        if len(value) > XATTR_MAX:
            raise P9Error(errno.E2BIG)
        self._xattr_room(len(value))
        self.new_fid(newfid, os.dup(fid.path_fd), fid.uid, replace=fid_no)
        self.fids[newfid].xattr = bytearray(value)
        return struct.pack("<Q", len(value))

    def xattrcreate(self, r):
        fid_no, name, size, flags = r.take("I"), r.string(), *r.take("QI")
        fid = self.fid(fid_no)
        self.writes()
        if size > XATTR_MAX or flags & ~3 or fid.open_fd is not None or fid.xattr is not None:
            raise P9Error(errno.EINVAL)
        self._xattr_room(size)
        fid.xattr_name, fid.xattr_size, fid.xattr_flags = self._xattr_name(name), size, flags
        fid.xattr = bytearray()
        return b""

    def _commit_xattr(self, fid):
        if len(fid.xattr) != fid.xattr_size:
            raise P9Error(errno.EINVAL)
        if stat.S_ISLNK(os.fstat(fid.path_fd).st_mode):
            raise P9Error(errno.EPERM)
        if fid.xattr_size == 0 and fid.xattr_flags == 0:
            try:
                os.removexattr(proc(fid.path_fd), fid.xattr_name)
            except OSError as err:
                if err.errno != errno.ENODATA:
                    raise
            return
        os.setxattr(proc(fid.path_fd), fid.xattr_name, bytes(fid.xattr), fid.xattr_flags)

    def lock(self, r):
        self.fid(r.take("I"))
        return b"\0"                         # SUCCESS: advisory locks are the guest's own

    def getlock(self, r):
        fid, _type, start, length, proc_id = r.take("IBQQI")
        self.fid(fid)
        client = r.string()
        return struct.pack("<BQQI", 2, start, length, proc_id) + pstr(client)   # F_UNLCK
