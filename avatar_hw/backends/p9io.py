"""The open files of virtio-9p's file server (``p9fs.P9Server``): Tlopen, Tlcreate,
Tread, Twrite, Tfsync, Treaddir, and the xattr fids read and written like files
(Txattrwalk, Txattrcreate, committed at Tclunk).

Reads and writes move with ``preadv``/``pwritev`` straight between the file and the
guest's buffers; readdir reads the directory with ``getdents64`` at the kernel's
offsets (no listing kept) and writes its entries straight into the guest's buffers;
xattr values are at most 64 KiB, 1 MiB held by all fids.
"""

import ctypes
import errno
import os
import stat
import struct

from ..virtio.buffers import scatter, scatter_at, skip, transfer, truncate
from .p9folder import getdents, proc, reopen
from .p9wire import (DIRENT, DIRENT64, DIRENT64_MAX, DOTL_ACCMODE, DOTL_APPEND, DOTL_DSYNC,
                     DOTL_EXCL, DOTL_SYNC, DOTL_TRUNC, IOHDR, MSIZE_MAX, NAME_MAX, QTDIR, QTFILE,
                     QTSYMLINK, READ_REPLY, REQUEST_MAX, TREAD, TREADDIR, WRITE_HEADER,
                     XATTR_HELD_MAX, XATTR_MAX, P9Error, name_ok)

_NO_VIEW = memoryview(b"")          # readdir's position past the guest's last buffer


class OpenFiles:
    """``P9Server``'s handlers of open files (a mixin: it uses the server's fids, ``folder``,
    ``msize`` and ``qid``)."""

    def __init__(self):
        self._dents = bytearray(MSIZE_MAX)                      # getdents64's records
        self._dents_c = (ctypes.c_char * MSIZE_MAX).from_buffer(self._dents)
        self._dents_view = memoryview(self._dents)
        self._entry = bytearray(DIRENT.size + 0xFFFF)   # an Rreaddir entry across two buffers
        self._entry_view = memoryview(self._entry)

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

    def _open_pinned(self, path_fd, flags):
        """(descriptor, stat, writable) of what the O_PATH ``path_fd`` pins, opened for
        Tlopen's or Tlcreate's ``flags``: a regular file, or a directory read only; a symlink
        is ELOOP, a FIFO or device node EACCES (never opened, so never waited on)."""
        st = os.fstat(path_fd)
        host, writable = self._open_flags(flags)
        if stat.S_ISDIR(st.st_mode):
            if writable:
                raise P9Error(errno.EISDIR)
            host = os.O_RDONLY | os.O_DIRECTORY
        elif stat.S_ISLNK(st.st_mode):
            raise P9Error(errno.ELOOP)
        elif not stat.S_ISREG(st.st_mode):
            raise P9Error(errno.EACCES)      # FIFOs and device nodes are not served
        fd = reopen(path_fd, host)
        if not os.path.samestat(os.fstat(fd), st):
            os.close(fd)
            raise P9Error(errno.EAGAIN)
        return fd, st, writable

    def lopen(self, r):
        fid_no, flags = r.take("II")
        fid = self.fid(fid_no)
        if fid.open_fd is not None or fid.xattr is not None:
            raise P9Error(errno.EBADF)
        fid.open_fd, st, fid.writable = self._open_pinned(fid.path_fd, flags)
        return self.qid(st) + struct.pack("<I", 0)

    def lcreate(self, r):
        """Tlcreate: create and open ``name``; without P9_DOTL_EXCL (Linux's open(O_CREAT)
        over a name it thought missing) a regular file already there is opened instead."""
        fid_no, name, flags, mode, gid = r.take("I"), r.string(), *r.take("III")
        fid = self.fid(fid_no)
        name_ok(name)
        if fid.open_fd is not None or fid.xattr is not None:
            raise P9Error(errno.EBADF)
        self.writes()
        self.under_root(fid)
        try:
            path_fd, fd, st, writable = self._create(fid, name, flags, mode, gid)
        except FileExistsError:
            if flags & DOTL_EXCL:
                raise
            path_fd, fd, st, writable = self._open_existing(fid, name, flags)
        os.close(fid.path_fd)                 # the fid now stands for the open file
        fid.path_fd, fid.open_fd, fid.writable = path_fd, fd, writable
        return self.qid(st) + struct.pack("<I", 0)

    def _create(self, fid, name, flags, mode, gid):
        """(O_PATH descriptor, open descriptor, stat, writable) of the new file ``name``
        (FileExistsError if the name is taken), owned as the security model says; if that
        fails, the file is removed again (a failed Tlcreate leaves nothing)."""
        host, writable = self._open_flags(flags)
        fd = os.open(name, host | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     self.folder.create_mode(mode, False),
                     dir_fd=fid.path_fd)
        path_fd = None
        try:
            path_fd = os.open(proc(fd), os.O_PATH | os.O_CLOEXEC)
            st = os.fstat(fd)
            self.folder.owned(path_fd, st, fid.uid, gid, mode)
        except BaseException:
            os.close(fd)
            if path_fd is not None:
                os.close(path_fd)
            os.unlink(name, dir_fd=fid.path_fd)
            raise
        return path_fd, fd, st, writable

    def _open_existing(self, fid, name, flags):
        """(O_PATH descriptor, open descriptor, stat, writable) of the regular file ``name``
        already there, as Tlopen opens it (EISDIR for a directory)."""
        path_fd = self.folder.step(fid.path_fd, name)
        try:
            if stat.S_ISDIR(os.fstat(path_fd).st_mode):
                raise P9Error(errno.EISDIR)
            return (path_fd, *self._open_pinned(path_fd, flags))
        except BaseException:
            os.close(path_fd)
            raise

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
            with memoryview(fid.xattr) as value:        # no copy of the value
                n = scatter(value[offset:offset + count], skip(writable, READ_REPLY.size))
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

    def readdir(self, head, size, tag, writable, writable_len):
        """Treaddir: the kernel's entries (getdents64 at the fid's offset) become 9P ones,
        packed straight into the guest's buffers after the reply header; only an entry
        across two of them is put together in ``_entry`` first. Each name is copied once,
        from the getdents buffer: the kernel's records have another layout than 9P's."""
        if not WRITE_HEADER.size <= size <= REQUEST_MAX:
            raise P9Error(errno.EPROTO)
        _, _, _, fid_no, offset, count = WRITE_HEADER.unpack_from(head)
        fid = self.open_fid(fid_no)
        st = None if fid.open_fd is None else os.fstat(fid.open_fd)
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise P9Error(errno.ENOTDIR)
        count = min(count, self.msize - IOHDR)
        if offset >= 2**63:
            raise P9Error(errno.EINVAL)
        os.lseek(fid.open_fd, offset, os.SEEK_SET)
        dev = st.st_dev                             # a mount point's entry has its own below
        top = (dev, st.st_ino) == self.folder.root_id   # its "..": the host's parent, not shown
        dents, names = self._dents, self._dents_view
        # room for one record at least: getdents64 fails (EINVAL) below it; what does not fit
        # ``count`` is left out below, and the guest's next offset reads it again
        n = getdents(fid.open_fd, self._dents_c, max(min(count, len(dents)), DIRENT64_MAX))
        room = writable_len - READ_REPLY.size
        views = skip(writable, READ_REPLY.size)
        index, at, view = 0, 0, views[0] if views else _NO_VIEW   # where the next entry goes
        total = pos = 0
        while pos < n:
            ino, d_off, reclen, d_type = DIRENT64.unpack_from(dents, pos)
            start = pos + DIRENT64.size
            end = dents.find(0, start, pos + reclen)
            end = pos + reclen if end < 0 else end
            pos += reclen
            length = DIRENT.size + end - start
            if total + length > count:
                break
            if total + length > room:
                raise P9Error(errno.ERANGE)
            if top and names[start:end] == b"..":
                ino = st.st_ino                     # the root's ".." is itself, as on a disk's
            kind = QTDIR if d_type == 4 else QTSYMLINK if d_type == 10 else QTFILE
            path = self.qid_path(dev, ino)
            staged = at + length > len(view)
            buffer, base = (self._entry, 0) if staged else (view, at)
            DIRENT.pack_into(buffer, base, kind, 0, path, d_off & 0xFFFFFFFFFFFFFFFF, d_type,
                             end - start)
            buffer[base + DIRENT.size:base + length] = names[start:end]
            if staged:
                index, at = scatter_at(self._entry_view[:length], views, index, at)
                view = views[index] if index < len(views) else _NO_VIEW
            else:
                at += length
            total += length
        scatter(READ_REPLY.pack(READ_REPLY.size + total, TREADDIR + 1, tag, total), writable)
        return READ_REPLY.size + total

    # -- xattr fids ----------------------------------------------------------------------------

    def _xattr_room(self, size):
        held = sum(max(len(f.xattr), f.xattr_size) for f in self.fids.values()
                   if f.xattr is not None)
        if held + size > XATTR_HELD_MAX:
            raise P9Error(errno.ENOMEM)

    def _xattr_name(self, name):
        if not 0 < len(name) <= NAME_MAX:             # as Linux's setxattr(2), getxattr(2)
            raise P9Error(errno.ERANGE)
        if b"\0" in name:
            raise P9Error(errno.EINVAL)
        return self.folder.xattr_name(name)

    def xattrwalk(self, r):
        fid_no, newfid, name = r.take("II") + (r.string(),)
        fid = self.fid(fid_no)
        st = self.stat_of(fid)
        if stat.S_ISLNK(st.st_mode):
            raise P9Error(errno.ENODATA if name else errno.EOPNOTSUPP)
        if name:
            value = os.getxattr(proc(fid.path_fd), self._xattr_name(name))
        else:
            names = self.folder.xattr_names(os.listxattr(proc(fid.path_fd)))
            value = b"".join(name + b"\0" for name in names)
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
        if fid.xattr_size == 0:     # removexattr(2): size 0, XATTR_REPLACE; any flags (QEMU)
            os.removexattr(proc(fid.path_fd), fid.xattr_name)
            return
        os.setxattr(proc(fid.path_fd), fid.xattr_name, bytes(fid.xattr), fid.xattr_flags)
