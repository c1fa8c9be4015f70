"""The 9P2000.L file server behind virtio-9p: a host folder, served so that no path leaves it.

``P9Server.handle(request, writable)`` answers one message: ``request`` is the
chain's device-readable views (size[4] type[1] tag[2] body), ``writable`` its
device-writable views; it returns the bytes written (the used length). Every
field is checked; a malformed message gets ``Rlerror`` (EPROTO for a bad frame,
EINVAL for a bad field) and nothing escapes as an exception.

Confinement and ownership (the security models) are the ``Folder``'s
(``p9folder``): the server never names a host path itself. The messages' layouts are
``p9wire``'s; the handlers of open files and xattr fids are ``p9io.OpenFiles``'.

Bounds: ``msize`` ≤ ``MSIZE_MAX``; ``max_fids`` fids (ENFILE beyond); a walk of
at most 16 names of at most 255 bytes; xattr values ≤ 64 KiB (1 MiB held by all
fids); readdir reads the directory with ``getdents64`` at the kernel's offsets (no listing kept).
Reads and writes move with ``preadv``/``pwritev`` straight on guest memory.
"""

import errno
import os
import stat
import struct
import time

from ..virtio.buffers import gather, scatter
from .p9folder import MODELS, Folder, proc, reopen  # noqa: F401 (MODELS: the device's)
from .p9io import OpenFiles
from .p9wire import (AT_REMOVEDIR_DOTL, GETATTR, GETATTR_BASIC, HEADER, MAX_WALK, MSIZE_MAX,
                     MSIZE_MIN, QID, QTDIR, QTFILE, QTSYMLINK, REQUEST_MAX, SA_ATIME,
                     SA_ATIME_SET, SA_GID, SA_MODE, SA_MTIME, SA_MTIME_SET, SA_SIZE, SA_UID,
                     STATFS, TATTACH, TCLUNK, TFLUSH, TFSYNC, TGETATTR, TGETLOCK, TLCREATE,
                     TLERROR, TLINK, TLOCK, TLOPEN, TMKDIR, TMKNOD, TREAD, TREADDIR, TREADLINK,
                     TREMOVE, TRENAME, TRENAMEAT, TSETATTR, TSTATFS, TSYMLINK, TUNLINKAT,
                     TVERSION, TWALK, TWRITE, TXATTRCREATE, TXATTRWALK, V9FS_MAGIC,
                     WRITE_HEADER, P9Error, Reader, name_ok, pstr, reply_max, wire_time)
from .p9wire import XATTR_HELD_MAX, XATTR_MAX  # noqa: F401 (the limits, named with the server)

QID_INO_BITS = 48              # a qid path: 16-bit prefix per (device, inode >> 48), 48 inode bits
QID_PREFIXES_MAX = 1 << 16


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


class P9Server(OpenFiles):
    def __init__(self, root, *, readonly=False, security_model="none", max_fids=4096):
        super().__init__()
        self.folder = Folder(root, security_model)
        st = os.fstat(self.folder.root_fd)
        self.prefixes = {(st.st_dev, st.st_ino >> QID_INO_BITS): 0}   # qid path prefixes
        self.readonly, self.max_fids = readonly, max_fids
        self.fids = {}
        self.bug = None                # the last unexpected exception (the device logs it)
        self.msize = 8192
        self._request = bytearray(REQUEST_MAX)
        self.handlers = {
            TVERSION: self.version, TATTACH: self.attach, TWALK: self.walk, TCLUNK: self.clunk,
            TGETATTR: self.getattr, TSETATTR: self.setattr, TLOPEN: self.lopen,
            TLCREATE: self.lcreate, TMKDIR: self.mkdir,
            TUNLINKAT: self.unlinkat, TRENAMEAT: self.renameat, TSYMLINK: self.symlink,
            TREADLINK: self.readlink, TLINK: self.link, TMKNOD: self.mknod,
            TSTATFS: self.statfs, TFSYNC: self.fsync, TFLUSH: self.flush,
            TXATTRWALK: self.xattrwalk, TXATTRCREATE: self.xattrcreate, TLOCK: self.lock,
            TGETLOCK: self.getlock, TRENAME: self.rename, TREMOVE: self.remove,
        }

    @property
    def model(self):
        """The security model (the folder's)."""
        return self.folder.model

    def close(self):
        self.clunk_all()
        self.folder.close()

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
            if kind == TREADDIR:
                return self.readdir(head, size, tag, writable, writable_len), 0
            if kind == TWRITE:
                reply = self.write(head, size, readable)
            else:
                if size > REQUEST_MAX:
                    raise P9Error(errno.EPROTO)
                message = memoryview(head)[:size]
                gather(readable, message)
                if writable_len < reply_max(kind, message):
                    raise P9Error(errno.ERANGE)                # refused before it acts
                handler = self.handlers.get(kind, self.unsupported)
                reply = handler(Reader(message[HEADER.size:]))
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
        if len(out) > writable_len:                 # Rreadlink, Rgetlock: they acted on nothing
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

    def under_root(self, *dirs):
        """Each of these directory fids still leads up to the root: EACCES for one the host
        moved out of the folder (nothing is looked up, created, linked, renamed or removed
        there, nor moved out to it; what a fid already pins stays usable, like an open
        file)."""
        for fid in dirs:
            if not self.folder.beneath_root(fid.path_fd):
                raise P9Error(errno.EACCES)

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

    def stat_of(self, fid):
        return os.fstat(fid.path_fd)

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
        self.new_fid(fid, os.dup(self.folder.root_fd), uid)
        return self.qid(os.fstat(self.folder.root_fd))

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
            parent, name = self.folder.locate(fid.path_fd)
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
        self.under_root(newdir)
        parent, oldname = self.folder.locate(fid.path_fd)
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
        if names:
            self.under_root(fid)
        cur, qids = os.dup(fid.path_fd), []
        try:
            for i, name in enumerate(names):
                try:
                    if not stat.S_ISDIR(os.fstat(cur).st_mode):
                        raise P9Error(errno.ENOTDIR)
                    nxt = self.folder.step(cur, name)
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
        """The qid of what Tmkdir or Tsymlink just made, given its owner; if that fails, it
        is removed again (a failed request leaves nothing, as QEMU's)."""
        fd = None
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            st = os.fstat(fd)
            self.folder.owned(fd, st, uid, gid, mode)
            return self.qid(st)
        except BaseException:
            try:
                os.rmdir(name, dir_fd=dirfd)
            except NotADirectoryError:
                os.unlink(name, dir_fd=dirfd)
            except FileNotFoundError:
                pass                                  # gone already: the first error stands
            raise
        finally:
            if fd is not None:
                os.close(fd)

    def mkdir(self, r):
        dfid, name, mode, gid = r.take("I"), r.string(), *r.take("II")
        fid = self.fid(dfid)
        name_ok(name)
        self.writes()
        self.under_root(fid)
        os.mkdir(name, self.folder.create_mode(mode, True), dir_fd=fid.path_fd)
        return self._created(fid.path_fd, name, fid.uid, gid, mode)

    def symlink(self, r):
        dfid, name, target, gid = r.take("I"), r.string(), r.string(), r.take("I")
        fid = self.fid(dfid)
        name_ok(name)
        self.writes()
        self.under_root(fid)
        os.symlink(target, name, dir_fd=fid.path_fd)     # stored, never followed here (ENOENT
        # for an empty target, ENAMETOOLONG for one of PATH_MAX bytes or more: symlink(2)'s)
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
        self.under_root(dirf)
        os.close(self.folder.locate(target.path_fd)[0])     # the file itself is inside
        os.link(proc(target.path_fd), name, dst_dir_fd=dirf.path_fd, follow_symlinks=True)
        return b""

    def unlinkat(self, r):
        dfid, name, flags = r.take("I"), r.string(), r.take("I")
        fid = self.fid(dfid)
        name_ok(name)
        self.writes()
        self.under_root(fid)
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
        self.under_root(olddir, newdir)
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
        uid, gid, mode = self.folder.mapped(f.path_fd, st)
        return GETATTR.pack(GETATTR_BASIC, self.qid(st), mode, uid, gid, st.st_nlink, st.st_rdev,
                            st.st_size, st.st_blksize, st.st_blocks, *wire_time(st.st_atime_ns),
                            *wire_time(st.st_mtime_ns), *wire_time(st.st_ctime_ns), 0, 0, 0, 0)

    def setattr(self, r):
        fid_no, valid, mode, uid, gid, size = r.take("IIIIIQ")
        atime_s, atime_ns, mtime_s, mtime_ns = r.take("qQqQ")     # seconds are signed
        fid = self.fid(fid_no)
        self.writes()
        for given, nsec in ((SA_ATIME | SA_ATIME_SET, atime_ns),
                            (SA_MTIME | SA_MTIME_SET, mtime_ns)):
            if valid & given == given and nsec >= 10**9:
                raise P9Error(errno.EINVAL)          # as utimensat, before anything changes
        st = self.stat_of(fid)
        fd, link = fid.path_fd, stat.S_ISLNK(st.st_mode)
        if valid & SA_SIZE:
            if not stat.S_ISREG(st.st_mode):
                raise P9Error(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL)
            self._truncate(fid, size)
        if valid & SA_MODE:
            if link:
                raise P9Error(errno.EOPNOTSUPP)
            self.folder.set_mode(fd, mode)
        if valid & (SA_UID | SA_GID):
            self.folder.set_owner(fd, uid if valid & SA_UID else 0xFFFFFFFF,
                                  gid if valid & SA_GID else 0xFFFFFFFF, link)
        if valid & (SA_ATIME | SA_MTIME):         # a symlink's own (utimensat's NOFOLLOW):
            old = os.fstat(fd)                       # /proc/self/fd/N of its O_PATH fd is it
            atime = ((atime_s * 10**9 + atime_ns) if valid & SA_ATIME_SET else None) \
                if valid & SA_ATIME else old.st_atime_ns
            mtime = ((mtime_s * 10**9 + mtime_ns) if valid & SA_MTIME_SET else None) \
                if valid & SA_MTIME else old.st_mtime_ns
            now = time.time_ns()                     # for the ones set without a time
            atime, mtime = (now if atime is None else atime), (now if mtime is None else mtime)
            os.utime(proc(fd), ns=(atime, mtime))
        return b""

    @staticmethod
    def _truncate(fid, size):
        """Tsetattr's size: on the fid's own descriptor if it is open for writing (the guest's
        ftruncate(fd): the file may be unlinked, or its mode no longer let it be opened for
        writing), else on a reopening (not a path: no wait on a lease)."""
        if fid.writable:
            os.ftruncate(fid.open_fd, size)
            return
        opened = reopen(fid.path_fd, os.O_WRONLY)
        try:
            os.ftruncate(opened, size)
        finally:
            os.close(opened)

    def statfs(self, r):
        fid = self.fid(r.take("I"))
        s = os.fstatvfs(fid.path_fd)
        return STATFS.pack(V9FS_MAGIC, s.f_bsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files,
                           s.f_ffree, s.f_fsid & (2**64 - 1), s.f_namemax)

    # -- locks ---------------------------------------------------------------------------------

    def lock(self, r):
        self.fid(r.take("I"))
        return b"\0"                         # SUCCESS: advisory locks are the guest's own

    def getlock(self, r):
        fid, _type, start, length, proc_id = r.take("IBQQI")
        self.fid(fid)
        client = r.string()
        return struct.pack("<BQQI", 2, start, length, proc_id) + pstr(client)   # F_UNLCK
