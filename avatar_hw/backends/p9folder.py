"""The shared folder of virtio-9p as a box, and the owners of its files: everything the
file server (``p9fs.P9Server``) does to a host path goes through a ``Folder``.

Confinement:

* every fid holds an ``O_PATH`` file descriptor; a walk opens one component at
  a time with ``openat(dirfd, name, O_PATH | O_NOFOLLOW)`` relative to the fd
  the server already holds (``Folder.step``), so a symlink is never followed (the
  client resolves symlinks itself), and a rename or a swap of a directory for a
  symlink between two requests cannot redirect a later one: it acts on the inode the
  fid pins;
* names are single components: ``/``, NUL, the empty name and (for creation)
  ``.`` and ``..`` are refused; ``..`` at the root stays at the root, and a
  ``..`` elsewhere is checked to lead back up to the root (a directory moved out
  by the host cannot be left through);
* what acts on a fid's own name (Tremove, Trename, Tlink's file) finds it again from
  the root by its current path, one ``step`` at a time, and checks the inode
  (``Folder.locate``); names are looked up and changed only in directories that still
  lead up to the root (``beneath_root``: not in one the host moved out);
* opening for I/O reopens the pinned inode through ``/proc/self/fd`` (what
  virtiofsd does), only for regular files and directories (a symlink, FIFO or
  device node is never opened: EACCES / ELOOP), never waiting (``reopen``);
  ``mknod`` is refused (EPERM).

Ownership (``security_model``, as QEMU's): ``passthrough`` chowns files to the
guest's uid/gid (needs root); ``mapped-xattr`` creates files as the daemon
(0600, directories 0700) and keeps the guest's uid, gid and mode in
``user.virtfs.{uid,gid,mode}`` xattrs, which getattr reports (and the guest
cannot see or set); ``none`` ignores ownership changes and reports what the host has
(and never sets setuid or setgid bits: its files are the daemon's). Extended attributes:
``xattr_name`` (only ``user.*`` and, by model, POSIX ACLs; never ``security.*`` nor
``trusted.*``).
"""

import ctypes
import errno
import fcntl
import os
import platform
import stat
import struct

from ..libc import check, libc
from .p9wire import P9Error, name_ok

MODELS = ("passthrough", "mapped-xattr", "none")
AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW = 0x1000, 0x100
XATTR_UID, XATTR_GID, XATTR_MODE = b"user.virtfs.uid", b"user.virtfs.gid", b"user.virtfs.mode"
XATTR_PREFIX = b"user.virtfs."
ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")

_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "armv7l": 217, "riscv64": 61}.get(
    platform.machine(), 61)


def fchown_empty(fd, uid, gid):
    """fchownat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW): chown what an O_PATH fd pins."""
    check(libc.fchownat(fd, b"", ctypes.c_uint32(uid), ctypes.c_uint32(gid),
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def getdents(fd, buffer, length):
    """getdents64 into the first ``length`` bytes of ``buffer`` (a ctypes buffer); the
    bytes filled (0 at the end)."""
    return check(libc.syscall(_SYS_GETDENTS64, fd, buffer, ctypes.c_size_t(length)))


def proc(fd):
    return f"/proc/self/fd/{fd}"


def reopen(fd, flags):
    """What the O_PATH ``fd`` pins (a regular file or a directory), opened with ``flags``
    without waiting: an open or truncation that must break a host process's lease (Samba's
    kernel oplocks: F_SETLEASE) would block the daemon for the lease-break-time (45 s);
    with O_NONBLOCK it fails at once, EAGAIN (EWOULDBLOCK), and the lease holder is told.
    O_NONBLOCK is cleared once open, as QEMU's ``openat_file`` does."""
    opened = os.open(proc(fd), flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(opened, fcntl.F_SETFL, fcntl.fcntl(opened, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(opened)
        raise
    return opened


class Folder:
    """The host folder ``root``, opened once; ``security_model``: one of ``MODELS``."""

    def __init__(self, root, security_model="none"):
        if security_model not in MODELS:
            raise ValueError(f"security_model {security_model!r}: give one of {', '.join(MODELS)}")
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self.root_fd)
        self.root_id = (st.st_dev, st.st_ino)
        self.model = security_model
        self.steps = 0                  # components opened by ``step`` (the device charges them)

    def close(self):
        if self.root_fd is not None:
            os.close(self.root_fd)
            self.root_fd = None

    # -- paths -----------------------------------------------------------------------------------

    def is_root(self, fd):
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == self.root_id

    def step(self, fd, name):
        """An O_PATH fd for ``name`` under ``fd`` (never following a symlink, never above
        the root)."""
        self.steps += 1
        if name == b".":
            return os.dup(fd)
        if name == b"..":
            if self.is_root(fd):
                return os.dup(fd)
            parent = os.open(b"..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            try:
                if not self.beneath_root(parent):
                    raise P9Error(errno.EACCES)
            except BaseException:       # ENAMETOOLONG from a path of PATH_MAX or more too
                os.close(parent)
                raise
            return parent
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)

    def beneath_root(self, fd):
        """True if ``fd`` is the root or lies under it now (its current path, as the kernel
        knows it, starts with the root's: one readlink each, however deep the tree; a
        directory the host moved out of the share is not under it)."""
        root, path = self._paths(fd)
        return path == root or path.startswith(root.rstrip(b"/") + b"/")

    def _paths(self, fd):
        """The current paths of the root and of ``fd`` (/proc/self/fd links)."""
        return tuple(os.readlink(os.fsencode(proc(f))) for f in (self.root_fd, fd))

    def locate(self, fd):
        """(an O_PATH fd of the parent directory, the name) of what ``fd`` pins, found again
        from the root one component at a time (``step``: no symlink followed, nothing
        above the root) by its current path, and checked to be the same inode: ENOENT if
        it was unlinked or is no longer under the root, EBUSY for the root itself. The
        name is then acted on relative to that parent, which lies inside the folder."""
        root, path = self._paths(fd)
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

    # -- owners ------------------------------------------------------------------------------------

    def owned(self, fd, st, uid, gid, mode):
        """Record a new file's guest owner and mode as the security model says. The mode
        bits are set again after the creation (but a symlink's), as QEMU does: the
        daemon's umask does not cut them, and a chown clears setuid and setgid."""
        if self.model == "passthrough":
            fchown_empty(fd, uid, gid)
        if stat.S_ISLNK(st.st_mode):
            return
        os.chmod(proc(fd), self.create_mode(mode, stat.S_ISDIR(st.st_mode)))
        if self.model == "mapped-xattr":
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

    def set_mode(self, fd, mode):
        """Tsetattr's mode of what ``fd`` pins (not a symlink)."""
        if self.model == "mapped-xattr":
            os.setxattr(proc(fd), XATTR_MODE, struct.pack("<I", mode & 0o7777))
        else:
            os.chmod(proc(fd), self.host_mode(mode))

    def set_owner(self, fd, uid, gid, link):
        """Tsetattr's owner (0xFFFFFFFF: unchanged) of what ``fd`` pins; ``link``: a symlink."""
        if self.model == "passthrough":
            fchown_empty(fd, uid, gid)
        elif self.model == "mapped-xattr" and not link:
            for key, value in ((XATTR_UID, uid), (XATTR_GID, gid)):
                if value != 0xFFFFFFFF:
                    os.setxattr(proc(fd), key, struct.pack("<I", value))

    # -- xattrs -----------------------------------------------------------------------------------

    def xattr_name(self, name):
        """The host name of the guest's xattr ``name`` (bytes), by QEMU's tables for each
        model: ``user.*`` as it is, but the mapping's own ``user.virtfs.*`` under
        mapped-xattr (EACCES); POSIX ACLs (``system.posix_acl_access``, ``_default``) as
        they are under passthrough, kept in ``user.virtfs.system.posix_acl_*`` under
        mapped-xattr (where they would otherwise change the host's permissions of the
        daemon's 0600 files) and refused under none; every other namespace EOPNOTSUPP:
        ``security.*`` and ``trusted.*`` (file capabilities: a daemon running as root
        would give its own files what setuid gives) are never the guest's."""
        if name.startswith(b"user."):
            if self.model == "mapped-xattr" and name.startswith(XATTR_PREFIX):
                raise P9Error(errno.EACCES)
            return name
        if name in ACL_NAMES and self.model != "none":
            return name if self.model == "passthrough" else XATTR_PREFIX + name
        raise P9Error(errno.EOPNOTSUPP)

    def xattr_names(self, host_names):
        """The guest's names (bytes) of the host's xattr ``host_names`` (listxattr's): those
        ``xattr_name`` maps, in the other direction."""
        out = []
        for name in map(os.fsencode, host_names):
            if self.model == "mapped-xattr" and name.startswith(XATTR_PREFIX):
                name = name[len(XATTR_PREFIX):]
                if name in ACL_NAMES:
                    out.append(name)
            elif name.startswith(b"user.") or (name in ACL_NAMES and self.model == "passthrough"):
                out.append(name)
        return out
