"""virtio-9p through the driver-side harness: hand-built 9P2000.L messages, normal work,
escape attempts (``..``, symlinks, a directory swapped for a symlink, absolute and long
names), malformed messages and the security models."""

import contextlib
import errno
import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
import time

import pytest

from avatar_hw.backends import p9fs as p
from avatar_hw.backends.p9wire import DOTL_APPEND, DOTL_CREATE, DOTL_EXCL, DOTL_TRUNC
from avatar_hw.config import load_config
from avatar_hw.devices.p9 import F_MOUNT_TAG, P9Device
from avatar_hw.errors import ConfigError
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import constants as c
from test_console import loop  # noqa: F401 (fixture)
from patching import this_thread_only

SLOT = 64 << 10
ROOT_FID = 1
LEASE_HOLDER = """
import fcntl, os, signal, sys, time
signal.signal(signal.SIGIO, signal.SIG_IGN)             # told of the break, never gives it back
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
except OSError as err:
    print(err.strerror, flush=True)
    sys.exit()
print("lease", flush=True)
time.sleep(600)
"""


class Rlerror(Exception):
    def __init__(self, code):
        super().__init__(os.strerror(code))
        self.errno = code


def s(value):
    value = value.encode() if isinstance(value, str) else value
    return struct.pack("<H", len(value)) + value


class Client:
    """A 9P2000.L client speaking through a VirtioBench's driver queue."""

    def __init__(self, bench):
        self.b, self.q, self.tag = bench, bench.q, 0

    def raw(self, message, reply=SLOT, *, reply_slots=1):
        chunks = [message[i:i + SLOT] for i in range(0, len(message), SLOT)] or [b""]
        self.q.post(readable=chunks, writable=[reply] * reply_slots)
        self.q.notify()
        [used] = self.q.get_used()
        return used

    def rpc(self, kind, body=b"", **kw):
        self.tag = (self.tag + 1) % 0xFFFF
        used = self.raw(struct.pack("<IBH", 7 + len(body), kind, self.tag) + body, **kw)
        size, rkind, tag = struct.unpack_from("<IBH", used.data)
        assert size == used.length and tag == self.tag
        if rkind == p.TLERROR + 1:
            raise Rlerror(struct.unpack_from("<I", used.data, 7)[0])
        assert rkind == kind + 1
        return used.data[7:]

    def version(self, msize=1 << 20, version="9P2000.L"):
        out = self.rpc(p.TVERSION, struct.pack("<I", msize) + s(version))
        return struct.unpack_from("<I", out)[0], out[6:].decode()

    def attach(self, fid=ROOT_FID, uid=1000):
        return self.rpc(p.TATTACH, struct.pack("<II", fid, 0xFFFFFFFF) + s("u") + s("")
                        + struct.pack("<I", uid))

    def walk(self, fid, newfid, *names):
        out = self.rpc(p.TWALK, struct.pack("<IIH", fid, newfid, len(names))
                       + b"".join(s(n) for n in names))
        n = struct.unpack_from("<H", out)[0]
        return [p.QID.unpack_from(out, 2 + 13 * i) for i in range(n)]

    def lopen(self, fid, flags=0):
        return self.rpc(p.TLOPEN, struct.pack("<II", fid, flags))

    def lcreate(self, fid, name, flags=2, mode=0o644, gid=100):
        return self.rpc(p.TLCREATE, struct.pack("<I", fid) + s(name)
                        + struct.pack("<III", flags, mode, gid))

    def read(self, fid, offset, count, **kw):
        out = self.rpc(p.TREAD, struct.pack("<IQI", fid, offset, count), **kw)
        n = struct.unpack_from("<I", out)[0]
        assert len(out) == 4 + n
        return out[4:]

    def write(self, fid, offset, data):
        out = self.rpc(p.TWRITE, struct.pack("<IQI", fid, offset, len(data)) + data)
        return struct.unpack("<I", out)[0]

    def clunk(self, fid):
        self.rpc(p.TCLUNK, struct.pack("<I", fid))

    def getattr(self, fid):
        v = p.GETATTR.unpack(self.rpc(p.TGETATTR, struct.pack("<IQ", fid, 0x3FFF)))
        return {"qid": p.QID.unpack(v[1]), "mode": v[2], "uid": v[3], "gid": v[4],
                "size": v[7], "atime": v[10:12], "mtime": v[12:14]}

    def setattr(self, fid, valid, mode=0, uid=0, gid=0, size=0):
        self.rpc(p.TSETATTR, struct.pack("<IIIIIQQQQQ", fid, valid, mode, uid, gid, size,
                                         0, 0, 0, 0))

    def mkdir(self, fid, name, mode=0o755, gid=100):
        return self.rpc(p.TMKDIR, struct.pack("<I", fid) + s(name) + struct.pack("<II", mode, gid))

    def symlink(self, fid, name, target):
        return self.rpc(p.TSYMLINK, struct.pack("<I", fid) + s(name) + s(target)
                        + struct.pack("<I", 0))

    def readlink(self, fid):
        out = self.rpc(p.TREADLINK, struct.pack("<I", fid))
        return out[2:].decode()

    def unlinkat(self, fid, name, flags=0):
        self.rpc(p.TUNLINKAT, struct.pack("<I", fid) + s(name) + struct.pack("<I", flags))

    def renameat(self, old, oldname, new, newname):
        self.rpc(p.TRENAMEAT, struct.pack("<I", old) + s(oldname) + struct.pack("<I", new)
                 + s(newname))

    def readdir(self, fid, offset=0, count=8192):
        out = self.rpc(p.TREADDIR, struct.pack("<IQI", fid, offset, count))
        n, pos, entries = struct.unpack_from("<I", out)[0], 4, []
        while pos < 4 + n:
            qid = p.QID.unpack_from(out, pos)
            off, _type, length = struct.unpack_from("<QBH", out, pos + 13)
            name = out[pos + 24:pos + 24 + length].decode()
            entries.append((name, off, qid))
            pos += 24 + length
        return entries

    def listdir(self, fid, count=8192):
        names, offset = [], 0
        while entries := self.readdir(fid, offset, count):
            names += [e[0] for e in entries]
            offset = entries[-1][1]
        return names


@pytest.fixture
def share(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello from the host\n")
    (root / "sub").mkdir()
    (tmp_path / "secret").write_text("outside the share\n")
    return root


@pytest.fixture
def make(loop, share):
    made = []

    def make(root=share, **kw):
        kw.setdefault("tag", "hostshare")
        b = VirtioBench(P9Device(root, **kw), loop=loop, ram_size=16 << 20)
        b.q, = b.driver.init([0], buf_size=SLOT, size=64)
        client = Client(b)
        made.append(b)
        return client
    yield make
    for b in made:
        b.subsystem.close()
        b.check_guards()


@pytest.fixture
def fs(make):
    client = make()
    assert client.version() == (p.MSIZE_MAX, "9P2000.L")
    client.attach()
    return client


def errno_of(call, *args, **kw):
    with pytest.raises(Rlerror) as err:
        call(*args, **kw)
    return err.value.errno


# -- identity and session ---------------------------------------------------------------------

def test_identity_mount_tag_and_version(make):
    client = make(tag="hostshare")
    d = client.b.driver
    assert d.read(c.REG_DEVICE_ID) == c.ID_9P
    assert d.device_features() & (1 << F_MOUNT_TAG)
    assert d.read_config(0, 2) == len("hostshare")
    assert bytes(d.read_config(2 + i, 1) for i in range(9)) == b"hostshare"
    assert client.version(8192) == (8192, "9P2000.L")
    assert client.version(1 << 30) == (p.MSIZE_MAX, "9P2000.L")        # bounded
    assert client.version(8192, "9P2000.u") == (8192, "unknown")
    assert errno_of(client.version, 100) == errno.EINVAL


def test_reading_and_writing_files(fs, share):
    fs.walk(ROOT_FID, 2, "hello.txt")
    fs.lopen(2)
    assert fs.read(2, 0, 1 << 20) == b"hello from the host\n"
    assert fs.read(2, 6, 4) == b"from"
    assert fs.read(2, 1000, 10) == b""
    assert fs.getattr(2)["size"] == 20
    fs.clunk(2)
    fs.walk(ROOT_FID, 3, "sub")
    fs.lcreate(3, "new.bin", flags=2, mode=0o640)
    data = bytes(random.Random(1).randrange(256) for _ in range(200000))
    done = 0
    while done < len(data):                   # 60000-byte writes, as a client within msize
        done += fs.write(3, done, data[done:done + 60000])
    fs.rpc(p.TFSYNC, struct.pack("<II", 3, 0))
    fs.clunk(3)
    host = (share / "sub" / "new.bin").read_bytes()
    assert hashlib.sha256(host).digest() == hashlib.sha256(data).digest()
    assert (share / "sub" / "new.bin").stat().st_mode & 0o777 == 0o640
    fs.walk(ROOT_FID, 4, "sub", "new.bin")
    fs.lopen(4)
    back = b"".join(fs.read(4, off, SLOT - 11) for off in range(0, len(data), SLOT - 11))
    assert back == data
    fs.clunk(4)


def test_a_read_moves_into_several_guest_buffers(fs, share):
    (share / "big").write_bytes(bytes(range(256)) * 1024)        # 256 KiB
    fs.walk(ROOT_FID, 2, "big")
    fs.lopen(2)
    used = fs.raw(struct.pack("<IBHIQI", 23, p.TREAD, 9, 2, 0, 200000), reply=SLOT,
                  reply_slots=4)
    assert used.length == 11 + 200000
    assert used.data[11:] == ((bytes(range(256)) * 1024)[:200000])


def test_directories_links_and_renames(fs, share):
    fs.mkdir(ROOT_FID, "d", 0o700)
    assert (share / "d").is_dir()
    fs.walk(ROOT_FID, 2, "d")
    fs.lcreate(2, "f", mode=0o600)
    fs.write(2, 0, b"x")
    fs.clunk(2)
    fs.symlink(ROOT_FID, "link", "d/f")
    assert os.readlink(share / "link") == "d/f"
    fs.walk(ROOT_FID, 3, "link")
    assert fs.getattr(3)["qid"][0] == p.QTSYMLINK
    assert fs.readlink(3) == "d/f"
    fs.walk(ROOT_FID, 4, "d", "f")
    fs.rpc(p.TLINK, struct.pack("<II", ROOT_FID, 4) + s("hard"))
    assert (share / "hard").read_bytes() == b"x"
    fs.renameat(ROOT_FID, "hard", ROOT_FID, "hard2")
    assert sorted(os.listdir(share)) == ["d", "hard2", "hello.txt", "link", "sub"]
    fs.walk(ROOT_FID, 5, "d")
    fs.lopen(5)
    assert sorted(fs.listdir(5)) == [".", "..", "f"]
    fs.unlinkat(ROOT_FID, "hard2")
    assert errno_of(fs.unlinkat, ROOT_FID, "d", p.AT_REMOVEDIR_DOTL) == errno.ENOTEMPTY
    fs.unlinkat(ROOT_FID, "link")
    assert not (share / "link").exists()
    st = fs.rpc(p.TSTATFS, struct.pack("<I", ROOT_FID))
    assert struct.unpack_from("<I", st)[0] == p.V9FS_MAGIC
    assert fs.rpc(p.TLOCK, struct.pack("<IBIQQI", 5, 0, 0, 0, 0, 1) + s("c")) == b"\0"


def test_tremove_and_trename_act_on_what_the_fid_stands_for(fs, share):
    """9P2000.L's fid-based remove and rename (Linux falls back to them when Tunlinkat or
    Trenameat is refused; QEMU serves both): Tremove clunks the fid even when it fails."""
    fs.walk(ROOT_FID, 2, "hello.txt")
    fs.walk(ROOT_FID, 3, "sub")
    fs.rpc(p.TRENAME, struct.pack("<II", 2, 3) + s("moved"))
    assert not (share / "hello.txt").exists()
    assert (share / "sub" / "moved").read_bytes() == b"hello from the host\n"
    fs.rpc(p.TREMOVE, struct.pack("<I", 2))                 # found again at its new name
    assert not (share / "sub" / "moved").exists()
    assert errno_of(fs.getattr, 2) == errno.EBADF
    (share / "sub" / "f").write_text("f")
    assert errno_of(fs.rpc, p.TREMOVE, struct.pack("<I", 3)) == errno.ENOTEMPTY
    assert errno_of(fs.getattr, 3) == errno.EBADF           # clunked all the same
    fs.walk(ROOT_FID, 4, "sub", "f")
    fs.rpc(p.TREMOVE, struct.pack("<I", 4))
    fs.walk(ROOT_FID, 5, "sub")
    fs.rpc(p.TREMOVE, struct.pack("<I", 5))
    assert sorted(os.listdir(share)) == []
    fs.walk(ROOT_FID, 6)
    assert errno_of(fs.rpc, p.TREMOVE, struct.pack("<I", 6)) == errno.EBUSY   # the root
    assert errno_of(fs.rpc, p.TRENAME, struct.pack("<II", ROOT_FID, ROOT_FID) + s("r")) \
        == errno.EBUSY
    for name in ("..", "a/b", ""):
        assert errno_of(fs.rpc, p.TRENAME, struct.pack("<II", ROOT_FID, ROOT_FID) + s(name)) \
            == errno.EINVAL


def test_tremove_and_trename_never_reach_outside_the_share(fs, share, tmp_path, monkeypatch):
    """The fid is found again from the root by its current path: a file the host moved out,
    one unlinked and replaced, or a directory swapped for a symlink while it is looked up
    leave what lies outside alone."""
    (share / "sub" / "inner").write_text("inner\n")
    fs.walk(ROOT_FID, 2, "sub", "inner")
    os.rename(share / "sub" / "inner", tmp_path / "inner")          # the host moves it out
    assert errno_of(fs.rpc, p.TRENAME, struct.pack("<II", 2, ROOT_FID) + s("back")) \
        == errno.ENOENT
    assert errno_of(fs.rpc, p.TREMOVE, struct.pack("<I", 2)) == errno.ENOENT
    assert (tmp_path / "inner").exists() and not (share / "back").exists()
    fs.walk(ROOT_FID, 3, "hello.txt")                               # unlinked, name reused
    os.unlink(share / "hello.txt")
    (share / "hello.txt").write_text("another file\n")
    assert errno_of(fs.rpc, p.TREMOVE, struct.pack("<I", 3)) == errno.ENOENT
    assert (share / "hello.txt").read_text() == "another file\n"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("victim\n")
    (share / "sub" / "victim").write_text("in the share\n")
    fs.walk(ROOT_FID, 4, "sub", "victim")
    real_readlink, races = os.readlink, []

    def racing_readlink(path, *a, **kw):            # the swap lands after the path is read
        result = real_readlink(path, *a, **kw)
        if races and result.endswith(races[0][0]):
            races.pop(0)[1]()
        return result

    def swap_dir():
        os.rename(share / "sub", share / "sub.old")
        os.symlink(outside, share / "sub")
    monkeypatch.setattr(p.os, "readlink", this_thread_only(real_readlink, racing_readlink))
    races.append((b"/sub/victim", swap_dir))
    assert errno_of(fs.rpc, p.TREMOVE, struct.pack("<I", 4)) == errno.ENOENT
    assert (outside / "victim").read_text() == "victim\n"
    (share / "other").write_text("other\n")
    fs.walk(ROOT_FID, 5, "other")
    races.append((b"/other", lambda: os.replace(share / "hello.txt", share / "other")))
    assert errno_of(fs.rpc, p.TREMOVE, struct.pack("<I", 5)) == errno.ENOENT
    assert (share / "other").read_text() == "another file\n"
    assert (share / "sub.old" / "victim").exists()


def test_qid_paths_tell_apart_files_of_two_devices_with_one_inode_number(fs, share,
                                                                        monkeypatch):
    """Linux keys its inodes by the qid path: a file system mounted inside the folder must
    not alias the folder's files (QEMU's multidevs=remap does the same)."""
    server = fs.b.device.server
    root = os.stat(share)
    assert p.QID.unpack(fs.attach(fid=9))[2] == root.st_ino          # the folder's own: as is
    assert fs.getattr(ROOT_FID)["qid"][2] == root.st_ino
    assert server.qid_path(root.st_dev, 7) == 7
    other = server.qid_path(root.st_dev + 1, 7)
    assert other != 7 and other & ((1 << p.QID_INO_BITS) - 1) == 7
    assert server.qid_path(root.st_dev + 1, 7) == other               # stable
    assert server.qid_path(root.st_dev, 1 << 50) not in (1 << 50 & ((1 << 48) - 1), 7, other)
    monkeypatch.setattr(p, "QID_PREFIXES_MAX", len(server.prefixes))
    assert server.qid_path(root.st_dev + 1, 8) & ((1 << p.QID_INO_BITS) - 1) == 8
    with pytest.raises(p.P9Error) as err:
        server.qid_path(root.st_dev + 2, 7)                           # the table is bounded
    assert err.value.errno == errno.ENFILE


def test_readdir_in_small_pages_lists_every_name_once(fs, share):
    names = {f"file-{i:04d}-{'x' * (i % 40)}" for i in range(300)}
    for name in names:
        (share / "sub" / name).touch()
    fs.walk(ROOT_FID, 2, "sub")
    fs.lopen(2)
    listed = fs.listdir(2, count=600)
    assert len(listed) == len(set(listed)) == 302
    assert set(listed) - {".", ".."} == names


def test_readdir_entries_across_small_buffers_are_the_ones_of_one_buffer(fs, share):
    """Rreaddir goes straight into the guest's buffers: with 37-byte buffers its entries
    straddle two or three of them, and the reply is byte for byte the one-buffer reply."""
    names = {f"entry-{i:02d}-{'y' * i}" for i in range(40)}
    for name in names:
        (share / "sub" / name).touch()
    fs.walk(ROOT_FID, 2, "sub")
    fs.lopen(2)
    body = struct.pack("<IQI", 2, 0, 2000)
    whole = fs.rpc(p.TREADDIR, body)
    assert fs.rpc(p.TREADDIR, body, reply=37, reply_slots=60) == whole
    assert 1900 < struct.unpack_from("<I", whole)[0] <= 2000            # within count
    listed = fs.listdir(2, count=2000)
    assert set(listed) == names | {".", ".."} and len(listed) == 42
    entries = {name: qid for name, _, qid in fs.readdir(2, count=8192)}
    assert entries["."][0] == p.QTDIR and entries["entry-00-"][0] == p.QTFILE
    assert entries["entry-00-"][2] == os.stat(share / "sub" / "entry-00-").st_ino


def test_readdir_with_a_count_below_the_first_entry_lists_nothing(fs, share):
    """A count too small for the next entry is an empty Rreaddir, as QEMU answers, not the
    EINVAL getdents64 gives for a buffer below one record; the next offset still lists it."""
    (share / "sub" / ("n" * 200)).touch()
    fs.walk(ROOT_FID, 2, "sub")
    fs.lopen(2)
    for count in (0, 4, 24):                      # the shortest, ".", needs 24 + 1
        assert fs.readdir(2, 0, count) == []
    assert [e[0] for e in fs.readdir(2, 0, 24 + 1)] == ["."]     # exactly fits: sent (QEMU)
    assert set(fs.listdir(2, count=24 + 200)) == {".", "..", "n" * 200}


def test_readdir_reply_larger_than_the_buffers_is_erange(fs, share):
    """A Treaddir whose entries would not fit the chain's buffers gets ERANGE; one whose
    count fits them is answered; a short message is EPROTO, trailing bytes are ignored."""
    for i in range(10):
        (share / "sub" / f"f{i}").touch()
    fs.walk(ROOT_FID, 2, "sub")
    fs.lopen(2)
    body = struct.pack("<IQI", 2, 0, 8192)
    assert errno_of(fs.rpc, p.TREADDIR, body, reply=64) == errno.ERANGE
    out = fs.rpc(p.TREADDIR, struct.pack("<IQI", 2, 0, 64 - 7), reply=64)
    assert 0 < struct.unpack_from("<I", out)[0] <= 64 - 11
    assert errno_of(fs.rpc, p.TREADDIR, body[:-1]) == errno.EPROTO
    assert fs.rpc(p.TREADDIR, body + b"junk") == fs.rpc(p.TREADDIR, body)


def test_setattr_truncates_and_changes_mode_and_times(fs, share):
    fs.walk(ROOT_FID, 2, "hello.txt")
    fs.setattr(2, p.SA_SIZE, size=5)
    assert (share / "hello.txt").read_bytes() == b"hello"
    fs.setattr(2, p.SA_MODE, mode=0o600)
    assert (share / "hello.txt").stat().st_mode & 0o777 == 0o600
    fs.rpc(p.TSETATTR, struct.pack("<IIIIIQQQQQ", 2, p.SA_MTIME | p.SA_MTIME_SET, 0, 0, 0, 0,
                                   0, 0, 1000000, 5))
    assert (share / "hello.txt").stat().st_mtime_ns == 1000000 * 10**9 + 5


@contextlib.contextmanager
def without_root(folder):
    """The daemon without root's rights (file permissions apply to it) while inside: as
    nobody, the owner of ``folder``, if it runs as root."""
    if os.geteuid() != 0:
        yield
        return
    os.chown(folder, 65534, 65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_setattr_times_of_a_symlink_are_its_own(fs, share, tmp_path):
    """utimensat(AT_SYMLINK_NOFOLLOW) in the guest: the link's times change (as QEMU), and
    never those of its target, here outside the share (they were once left alone and the
    request answered OK)."""
    outside = tmp_path / "secret"
    outside.write_text("outside\n")
    before = outside.stat().st_mtime_ns
    os.symlink(outside, share / "link")
    fs.walk(ROOT_FID, 2, "link")
    fs.rpc(p.TSETATTR, struct.pack("<IIIIIQQQQQ", 2, p.SA_MTIME | p.SA_MTIME_SET, 0, 0, 0, 0,
                                   0, 0, 1000000, 5))
    assert os.lstat(share / "link").st_mtime_ns == 1000000 * 10**9 + 5
    assert outside.stat().st_mtime_ns == before


def test_setattr_size_of_a_fid_open_for_writing_truncates_its_own_descriptor(fs, share):
    """ftruncate(fd) in the guest (Linux sends Tsetattr on the open file's fid) of a file
    whose mode does not let the daemon open it for writing (open(O_CREAT | O_WRONLY, 0444))
    or that is unlinked: the fid's own descriptor is truncated, as on a local disk (a reopening
    for writing was EACCES)."""
    fs.walk(ROOT_FID, 2)
    with without_root(share):
        fs.lcreate(2, "ro", flags=os.O_WRONLY, mode=0o444)
        fs.write(2, 0, b"x" * 100)
        fs.setattr(2, p.SA_SIZE, size=10)
        assert fs.getattr(2)["size"] == 10
        fs.unlinkat(ROOT_FID, "ro")
        fs.setattr(2, p.SA_SIZE, size=0)
        assert fs.getattr(2)["size"] == 0
        fs.walk(ROOT_FID, 3)
        fs.lcreate(3, "w", flags=os.O_RDONLY, mode=0o444)
        assert errno_of(fs.setattr, 3, p.SA_SIZE, size=1) == errno.EACCES


def test_setattr_nanoseconds_out_of_range_are_einval(fs, share):
    """A time given with 10^9 nanoseconds or more is EINVAL, as utimensat answers (QEMU
    passes them to it), not folded into the seconds; nothing of the request is done. The
    nanoseconds of a time not given (set to now, or left) are not looked at."""
    fs.walk(ROOT_FID, 2, "hello.txt")
    before = (share / "hello.txt").stat()
    for valid, atime_ns, mtime_ns in ((p.SA_MTIME | p.SA_MTIME_SET, 0, 5 * 10**9),
                                      (p.SA_ATIME | p.SA_ATIME_SET, 10**9, 0)):
        body = struct.pack("<IIIIIQqQqQ", 2, valid | p.SA_SIZE, 0, 0, 0, 1, 0, atime_ns, 100,
                           mtime_ns)
        assert errno_of(fs.rpc, p.TSETATTR, body) == errno.EINVAL
    after = (share / "hello.txt").stat()
    assert (after.st_size, after.st_mtime_ns, after.st_atime_ns) == \
        (before.st_size, before.st_mtime_ns, before.st_atime_ns)
    os.utime(share / "hello.txt", ns=(0, 0))
    fs.rpc(p.TSETATTR, struct.pack("<IIIIIQqQqQ", 2, p.SA_MTIME, 0, 0, 0, 0, 0, 0, 0, 10**12))
    assert (share / "hello.txt").stat().st_mtime_ns > 10**18                  # now

def test_times_before_1970_go_both_ways(fs, share):
    """9P2000.L's seconds are u64 that Linux reads and writes as a signed time64_t: a host
    file from before 1970 is reported in two's complement (not an internal error), and a
    guest's ``touch -d 1960-01-01`` sets it (as QEMU does)."""
    os.utime(share / "hello.txt", ns=(-100 * 10**9 - 250, -1))
    fs.walk(ROOT_FID, 2, "hello.txt")
    attr = fs.getattr(2)
    assert (attr["atime"], attr["mtime"]) == ((2**64 - 101, 10**9 - 250), (2**64 - 1, 10**9 - 1))
    fs.rpc(p.TSETATTR, struct.pack("<IIIIIQqQqQ", 2, p.SA_MTIME | p.SA_MTIME_SET, 0, 0, 0, 0,
                                   0, 0, -315619200, 5))
    assert (share / "hello.txt").stat().st_mtime_ns == -315619200 * 10**9 + 5


def test_user_xattrs_round_trip(fs, share):
    fs.walk(ROOT_FID, 2, "hello.txt")
    fs.rpc(p.TXATTRCREATE, struct.pack("<I", 2) + s("user.note") + struct.pack("<QI", 3, 0))
    fs.write(2, 0, b"abc")
    fs.clunk(2)
    assert os.getxattr(share / "hello.txt", "user.note") == b"abc"
    fs.walk(ROOT_FID, 3, "hello.txt")
    out = fs.rpc(p.TXATTRWALK, struct.pack("<II", 3, 4) + s("user.note"))
    assert struct.unpack("<Q", out)[0] == 3 and fs.read(4, 0, 100) == b"abc"
    assert errno_of(fs.rpc, p.TXATTRWALK, struct.pack("<II", 3, 5) + s("user.none")) == \
        errno.ENODATA


def test_xattr_names_too_long_or_empty_are_erange_as_on_linux(fs, share):
    fs.walk(ROOT_FID, 2, "hello.txt")
    long = "user." + "n" * 251
    with pytest.raises(OSError) as linux:
        os.setxattr(share / "hello.txt", long, b"x")
    assert linux.value.errno == errno.ERANGE
    assert errno_of(fs.rpc, p.TXATTRWALK, struct.pack("<II", 2, 3) + s(long)) == errno.ERANGE
    for name in (long, ""):
        assert errno_of(fs.rpc, p.TXATTRCREATE, struct.pack("<I", 2) + s(name)
                        + struct.pack("<QI", 1, 0)) == errno.ERANGE
    fs.rpc(p.TXATTRCREATE, struct.pack("<I", 2) + s(long[:-1]) + struct.pack("<QI", 1, 0))


def test_an_xattr_written_with_size_0_is_removed(fs, share):
    """Linux's removexattr(2) is Txattrcreate of size 0 with XATTR_REPLACE, then Tclunk:
    the xattr is removed (it was left there, empty), whatever the flags, as QEMU's
    v9fs_xattr_fid_clunk does; a missing one is ENODATA, as removexattr(2) answers, and
    the fid is clunked all the same."""
    for flags in (2, 0):                                   # XATTR_REPLACE, none
        os.setxattr(share / "hello.txt", "user.note", b"abc")
        fs.walk(ROOT_FID, 2, "hello.txt")
        fs.rpc(p.TXATTRCREATE, struct.pack("<I", 2) + s("user.note") + struct.pack("<QI", 0,
                                                                                     flags))
        fs.clunk(2)
        assert "user.note" not in os.listxattr(share / "hello.txt")
    fs.walk(ROOT_FID, 3, "hello.txt")
    fs.rpc(p.TXATTRCREATE, struct.pack("<I", 3) + s("user.note") + struct.pack("<QI", 0, 2))
    assert errno_of(fs.clunk, 3) == errno.ENODATA
    assert errno_of(fs.getattr, 3) == errno.EBADF


@pytest.mark.parametrize("model", ["none", "mapped-xattr"])
def test_only_user_xattrs_and_mapped_acls_reach_the_host(make, share, model):
    """security.* and trusted.* are never the guest's (a file capability on a file of a daemon
    running as root is a setuid root file): EOPNOTSUPP, as QEMU's tables for these models.
    POSIX ACLs are refused under none, and kept in user.virtfs.* under mapped-xattr, where
    on the host they would change the permissions of the daemon's own files."""
    client = make(security_model=model)
    client.version()
    client.attach()
    client.walk(ROOT_FID, 2, "hello.txt")
    for name in ("security.capability", "trusted.overlay.opaque", "system.nfs4_acl", "os2.x"):
        create = struct.pack("<I", 2) + s(name) + struct.pack("<QI", 4, 0)
        assert errno_of(client.rpc, p.TXATTRCREATE, create) == errno.EOPNOTSUPP
        walk = struct.pack("<II", 2, 3) + s(name)
        assert errno_of(client.rpc, p.TXATTRWALK, walk) == errno.EOPNOTSUPP
    acl = "system.posix_acl_access"
    create = struct.pack("<I", 2) + s(acl) + struct.pack("<QI", 12, 0)
    mode = os.stat(share / "hello.txt").st_mode
    if model == "none":
        assert errno_of(client.rpc, p.TXATTRCREATE, create) == errno.EOPNOTSUPP
        return
    client.rpc(p.TXATTRCREATE, create)
    client.write(2, 0, b"\x02\0\0\0\x01\0\x07\0\xff\xff\xff\xff")
    client.clunk(2)
    assert os.getxattr(share / "hello.txt", "user.virtfs." + acl) == \
        b"\x02\0\0\0\x01\0\x07\0\xff\xff\xff\xff"
    assert acl not in os.listxattr(share / "hello.txt")
    assert os.stat(share / "hello.txt").st_mode == mode
    client.walk(ROOT_FID, 4, "hello.txt")
    out = client.rpc(p.TXATTRWALK, struct.pack("<II", 4, 5) + s(""))
    assert client.read(5, 0, struct.unpack("<Q", out)[0]).split(b"\0")[:-1] == [acl.encode()]
    out = client.rpc(p.TXATTRWALK, struct.pack("<II", 4, 6) + s(acl))
    assert struct.unpack("<Q", out)[0] == 12


def test_a_walk_up_from_a_path_too_long_to_check_leaks_no_descriptor(fs, share):
    """``..`` below the root is checked by the directory's path, which the kernel refuses to
    give (ENAMETOOLONG) at PATH_MAX and more: the walk stops there, and the parent it opened
    is closed (it was not: each such walk left the daemon one more descriptor, for ever).
    Here the walk's fid lies 16 names deep, under 4000 bytes; 2 more names pass 4096."""
    name = "d" * ((4000 - len(os.fsencode(share))) // 16 - 1)
    fd = os.open(share, os.O_PATH)
    for _ in range(18):
        os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, os.O_PATH, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    fs.walk(ROOT_FID, 2, *[name] * 16)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert len(fs.walk(2, 3, name, name, "..")) == 2            # stopped at the ".."
    assert len(os.listdir("/proc/self/fd")) < before + 10


@pytest.mark.parametrize("kind", ["lcreate", "mkdir", "symlink"])
def test_a_create_whose_owner_cannot_be_recorded_leaves_nothing(make, share, kind):
    """mapped-xattr on a file system without user xattrs: Tlcreate, Tmkdir and Tsymlink fail,
    and what they made is removed again (QEMU's do the same)."""
    client = make(security_model="mapped-xattr")
    client.version()
    client.attach()

    def refuse(*args):
        raise OSError(errno.EOPNOTSUPP, "no user xattrs")
    client.b.device.server.folder.owned = refuse
    make_it = {"lcreate": lambda: client.lcreate(ROOT_FID, "new"),
               "mkdir": lambda: client.mkdir(ROOT_FID, "new"),
               "symlink": lambda: client.symlink(ROOT_FID, "new", "target")}[kind]
    assert errno_of(make_it) == errno.EOPNOTSUPP
    assert not os.path.lexists(share / "new")


def test_path_components_opened_count_against_the_turn(make, share, loop):  # noqa: F811
    """A Twalk of 16 names is a few bytes of chain but 16 openat: each is charged to the
    queue's turn (p9.STEP_COST), so a queue of them is served a few per turn, and the
    other devices and VMs between turns; none is lost."""
    from avatar_hw.devices.p9 import STEP_COST
    from avatar_hw.virtio.queue import TURN_BYTES
    fs = make()
    fs.version()
    fs.attach()
    names = "abcdefghijklmnop"
    os.makedirs(share / "/".join(names))
    for i in range(20):
        message = struct.pack("<IIH", ROOT_FID, 100 + i, 16) + b"".join(map(s, names))
        fs.q.post(readable=[struct.pack("<IBH", 7 + len(message), p.TWALK, i) + message],
                  writable=[SLOT])
    fs.q.notify()
    first = len(fs.q.get_used())
    assert first <= TURN_BYTES // (16 * STEP_COST) + 1
    done = first
    for _ in range(20):
        loop.run_once(0)
        done += len(fs.q.get_used())
    assert done == 20


# -- escape attempts --------------------------------------------------------------------------

def test_dotdot_at_the_root_stays_at_the_root(fs, share):
    root_ino = os.stat(share).st_ino
    qids = fs.walk(ROOT_FID, 2, "..", "..", "..")
    assert [q[2] for q in qids] == [root_ino] * 3
    assert fs.walk(2, 3, "sub", "..", "..")[-1][2] == root_ino
    fs.lopen(3)
    assert "secret" not in fs.listdir(3)
    assert "hello.txt" in fs.listdir(3)


def test_readdir_of_the_root_shows_no_inode_above_it(fs, share):
    """The root's ``..`` entry is the root itself, as on a disk's root: it showed the inode
    of the host folder above the share (and with the share's device, a qid that could be
    another file's)."""
    root_ino, parent_ino = os.stat(share).st_ino, os.stat(share.parent).st_ino
    fs.walk(ROOT_FID, 2)
    fs.lopen(2)
    qids = {name: qid[2] for name, _, qid in fs.readdir(2)}
    assert qids["."] == qids[".."] == root_ino
    assert parent_ino not in qids.values()
    fs.walk(ROOT_FID, 3, "sub")
    fs.lopen(3)
    assert {name: qid[2] for name, _, qid in fs.readdir(3)}[".."] == root_ino


@pytest.mark.parametrize("name", ["/etc", "../secret", "sub/..", "a\0b", ""])
def test_names_that_are_not_one_component_are_refused(fs, name):
    assert errno_of(fs.walk, ROOT_FID, 2, name) == errno.EINVAL
    assert errno_of(fs.lcreate, ROOT_FID, name) == errno.EINVAL
    assert errno_of(fs.mkdir, ROOT_FID, name) == errno.EINVAL


def test_dot_names_cannot_be_created_or_removed(fs):
    for name in (".", ".."):
        assert errno_of(fs.mkdir, ROOT_FID, name) == errno.EINVAL
        assert errno_of(fs.unlinkat, ROOT_FID, name, p.AT_REMOVEDIR_DOTL) == errno.EINVAL
        assert errno_of(fs.renameat, ROOT_FID, "sub", ROOT_FID, name) == errno.EINVAL


def test_long_names_are_refused(fs):
    assert errno_of(fs.walk, ROOT_FID, 2, "x" * 256) == errno.ENAMETOOLONG
    assert errno_of(fs.lcreate, ROOT_FID, "x" * 4000) == errno.ENAMETOOLONG
    assert errno_of(fs.symlink, ROOT_FID, "l", "x" * 4096) == errno.ENAMETOOLONG  # symlink(2)'s
    assert errno_of(fs.symlink, ROOT_FID, "l", "") == errno.ENOENT                # answers
    fs.symlink(ROOT_FID, "l", "x" * 4095)


def test_symlinks_are_never_followed_by_the_server(fs, share, tmp_path):
    os.symlink("/", share / "root")
    os.symlink(tmp_path / "secret", share / "abs")
    os.symlink("../secret", share / "rel")
    os.symlink("/nonexistent/x", share / "dangling")
    for link in ("abs", "rel", "dangling"):
        fs.walk(ROOT_FID, 2, link)
        assert fs.getattr(2)["qid"][0] == p.QTSYMLINK
        assert errno_of(fs.lopen, 2) == errno.ELOOP
        assert errno_of(fs.rpc, p.TSETATTR, struct.pack("<IIIIIQQQQQ", 2, p.SA_SIZE, 0, 0, 0,
                                                        0, 0, 0, 0, 0)) == errno.EINVAL
        fs.clunk(2)
    # through the link to / : the walk stops at the link (partial walk, no new fid)
    assert len(fs.walk(ROOT_FID, 3, "root", "etc", "hostname")) == 1
    assert errno_of(fs.getattr, 3) == errno.EBADF
    fs.walk(ROOT_FID, 4, "root")
    assert errno_of(fs.walk, 4, 5, "etc") == errno.ENOTDIR
    assert errno_of(fs.lcreate, 4, "x") == errno.ENOTDIR
    # links are made by name, never through the target
    fs.walk(ROOT_FID, 6, "abs")
    assert errno_of(fs.rpc, p.TLINK, struct.pack("<II", ROOT_FID, 6) + s("h")) == errno.EPERM
    assert (tmp_path / "secret").read_text() == "outside the share\n"


def test_a_directory_swapped_for_a_symlink_after_the_walk_is_not_followed(fs, share, tmp_path):
    """The fid pins the directory it walked to: replacing it by a symlink to / between the
    walk and the next request changes nothing the guest can reach."""
    (share / "sub" / "inner").write_text("inner\n")
    fs.walk(ROOT_FID, 2, "sub")
    os.rename(share / "sub", share / "sub.old")
    os.symlink("/etc", share / "sub")
    assert errno_of(fs.walk, 2, 3, "hostname") == errno.ENOENT      # not /etc/hostname
    fs.walk(2, 3, "inner")
    fs.lopen(3)
    assert fs.read(3, 0, 100) == b"inner\n"
    fs.lcreate(2, "made")
    assert (share / "sub.old" / "made").exists() and not os.path.exists("/etc/made")
    fs.walk(ROOT_FID, 4, "sub")                                      # a new walk sees the link
    assert fs.getattr(4)["qid"][0] == p.QTSYMLINK
    assert errno_of(fs.walk, 4, 5, "hostname") == errno.ENOTDIR


def test_a_file_swapped_for_a_symlink_between_walk_and_open_opens_the_walked_file(fs, share,
                                                                               tmp_path):
    fs.walk(ROOT_FID, 2, "hello.txt")
    os.rename(share / "hello.txt", share / "hello.old")
    os.symlink(tmp_path / "secret", share / "hello.txt")
    fs.lopen(2)
    assert fs.read(2, 0, 100) == b"hello from the host\n"
    fs.walk(ROOT_FID, 3, "hello.txt")
    assert errno_of(fs.lopen, 3) == errno.ELOOP


def test_a_directory_moved_out_of_the_share_cannot_be_left_upwards(fs, share, tmp_path):
    (share / "sub" / "deep").mkdir()
    fs.walk(ROOT_FID, 2, "sub", "deep")
    os.rename(share / "sub", tmp_path / "moved")                    # the host moves it out
    assert errno_of(fs.walk, 2, 3, "..") == errno.EACCES
    assert errno_of(fs.walk, 2, 3, "..", "..", "secret") == errno.EACCES


def test_names_never_change_in_a_directory_moved_out_of_the_share(fs, share, tmp_path):
    """A fid still pins a directory the host moved out: nothing can be looked up, created,
    linked, renamed or removed there, nor moved between it and the share (no write outside);
    a file pinned before stays usable, like an open file."""
    (share / "sub" / "inner").write_text("inner\n")
    (share / "keep").write_text("keep\n")
    fs.walk(ROOT_FID, 2, "sub")
    fs.walk(ROOT_FID, 3, "sub", "inner")
    fs.walk(ROOT_FID, 4, "keep")
    os.rename(share / "sub", tmp_path / "moved")                    # the host moves it out
    refused = [
        (fs.lcreate, 2, "new"), (fs.mkdir, 2, "d"), (fs.symlink, 2, "l", "/"),
        (fs.unlinkat, 2, "inner"), (fs.renameat, 2, "inner", ROOT_FID, "in"),
        (fs.renameat, ROOT_FID, "keep", 2, "out"),
        (fs.rpc, p.TLINK, struct.pack("<II", 2, 4) + s("out")),          # share -> moved
        (fs.rpc, p.TLINK, struct.pack("<II", ROOT_FID, 3) + s("in")),    # moved -> share
        (fs.rpc, p.TRENAME, struct.pack("<II", 4, 2) + s("out")),
        (fs.rpc, p.TRENAME, struct.pack("<II", 3, ROOT_FID) + s("in")),
    ]
    for call, *args in refused:
        assert errno_of(call, *args) in (errno.EACCES, errno.ENOENT), (call, args)
    assert sorted(os.listdir(tmp_path / "moved")) == ["inner"]
    assert sorted(os.listdir(share)) == ["hello.txt", "keep"]
    assert errno_of(fs.walk, 2, 5, "inner") == errno.EACCES          # nor looked up
    fs.lopen(3)                                                      # pinned before: usable
    assert fs.read(3, 0, 100) == b"inner\n"


def test_symlink_targets_are_stored_not_resolved(fs, share):
    fs.symlink(ROOT_FID, "escape", "/etc/hostname")
    fs.walk(ROOT_FID, 2, "escape")
    assert fs.readlink(2) == "/etc/hostname"
    assert errno_of(fs.lopen, 2) == errno.ELOOP


def test_special_files_are_not_created_or_opened(fs, share):
    assert errno_of(fs.rpc, p.TMKNOD, struct.pack("<I", ROOT_FID) + s("null")
                    + struct.pack("<IIII", 0o20666, 1, 3, 0)) == errno.EPERM
    os.mkfifo(share / "fifo")
    fs.walk(ROOT_FID, 2, "fifo")
    assert errno_of(fs.lopen, 2) == errno.EACCES                     # would block the daemon


def test_lcreate_without_excl_opens_the_regular_file_already_there(fs, share):
    """Linux sends Tlcreate without P9_DOTL_EXCL for open(O_CREAT) over a name it thinks
    missing (a cached negative dentry): a regular file the host made there since is opened,
    as QEMU does (a guest's ``echo >> file`` appends), and keeps its mode; with DOTL_EXCL it
    is EEXIST. A directory is EISDIR, a symlink ELOOP, a FIFO EACCES (never opened)."""
    (share / "log.txt").write_text("host line\n")
    os.chmod(share / "log.txt", 0o640)
    assert errno_of(fs.lcreate, ROOT_FID, "log.txt", flags=2 | DOTL_CREATE | DOTL_EXCL) \
        == errno.EEXIST
    fs.walk(ROOT_FID, 2)
    fs.lcreate(2, "log.txt", flags=2 | DOTL_APPEND | DOTL_CREATE, mode=0o600)
    fs.write(2, 0, b"guest line\n")
    assert (share / "log.txt").read_text() == "host line\nguest line\n"
    assert (share / "log.txt").stat().st_mode & 0o7777 == 0o640
    assert fs.getattr(2)["qid"][2] == (share / "log.txt").stat().st_ino
    os.mkfifo(share / "fifo")
    os.symlink("log.txt", share / "link")
    for name, code in (("sub", errno.EISDIR), ("link", errno.ELOOP), ("fifo", errno.EACCES)):
        fs.walk(ROOT_FID, 3)
        assert errno_of(fs.lcreate, 3, name, flags=DOTL_CREATE) == code, name
        fs.clunk(3)


@contextlib.contextmanager
def read_lease(path):
    """Another process holding a read lease on ``path`` (F_SETLEASE, as Samba's kernel
    oplocks take) that it never gives back; skipped where leases cannot be taken."""
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        said = holder.stdout.readline().strip()
        if said != "lease":
            pytest.skip(f"no file lease on {path}: {said or 'the holder died'}")
        yield
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_host_lease_never_blocks_the_daemon(fs, share):
    """A file under a host process's lease is opened for writing or truncated only once the
    lease is broken: the kernel would hold the daemon, and every VM, for the lease-break-time
    (45 s). The request is answered EAGAIN at once, as QEMU's (O_NONBLOCK); the file is left
    as it was, and reading (which breaks no read lease) works."""
    fs.walk(ROOT_FID, 2, "hello.txt")
    with read_lease(share / "hello.txt"):
        start = time.monotonic()
        assert errno_of(fs.lopen, 2, 1) == errno.EAGAIN
        assert errno_of(fs.lopen, 2, 2 | DOTL_TRUNC) == errno.EAGAIN
        assert errno_of(fs.setattr, 2, p.SA_SIZE, size=3) == errno.EAGAIN
        fs.walk(ROOT_FID, 3)
        assert errno_of(fs.lcreate, 3, "hello.txt", flags=1 | DOTL_CREATE) == errno.EAGAIN
        assert time.monotonic() - start < 10                  # not the lease-break-time
        fs.lopen(2)
        assert fs.read(2, 0, 100) == b"hello from the host\n"


# -- malformed messages and bounds ------------------------------------------------------------

def test_malformed_messages_get_rlerror(fs):
    bad = [
        (struct.pack("<IBH", 100, p.TGETATTR, 1) + bytes(5), errno.EPROTO),    # size > chain
        (struct.pack("<IBH", 7, p.TGETATTR, 1), errno.EPROTO),                  # body missing
        (struct.pack("<IBHIIH", 17, p.TWALK, 1, ROOT_FID, 2, 1) + b"\xff\xff", errno.EPROTO),
        (struct.pack("<IBHIIH", 17, p.TWALK, 1, ROOT_FID, 2, 17) + bytes(4), errno.EINVAL),
        (struct.pack("<IBHIQI", 23, p.TWRITE, 1, ROOT_FID, 0, 1 << 30), errno.EPROTO),
        (struct.pack("<IBHIQ", 19, p.TREAD, 1, ROOT_FID, 0), errno.EPROTO),
        (struct.pack("<IBH", 7, 250, 1), errno.EOPNOTSUPP),
        (struct.pack("<IBHI", 11, p.TCLUNK, 1, 999), errno.EBADF),
    ]
    for message, code in bad:
        used = fs.raw(message)
        assert used.length == 11 and used.data[4] == p.TLERROR + 1, message
        assert struct.unpack_from("<I", used.data, 7)[0] == code, message


def test_huge_counts_are_clipped_to_msize_and_the_buffers(fs, share):
    (share / "big").write_bytes(b"z" * (1 << 20))
    fs.version(16384)
    fs.attach()
    fs.walk(ROOT_FID, 2, "big")
    fs.lopen(2)
    assert len(fs.read(2, 0, 0xFFFFFFFF)) == 16384 - 11
    used = fs.raw(struct.pack("<IBHIQI", 23, p.TREAD, 3, 2, 0, 0xFFFFFFFF), reply=100)
    assert used.length == 100
    assert len(fs.read(2, 2**62, 10)) == 0
    assert errno_of(fs.read, 2, 2**64 - 1, 10) == errno.EINVAL


def test_a_reply_that_cannot_fit_is_erange_before_the_request_acts(fs, share):
    """A chain whose writable bytes cannot hold its request's largest reply gets Rlerror
    ERANGE and the request is not done (it was, and the guest was told it failed): no file
    or directory made, the Tlcreate's fid still the directory, no fid walked, no fid
    clunked by Tversion. Exactly the largest reply's room is enough: an Rwalk's is a qid
    per name, all Linux gives it."""
    def answer(kind, body, room):
        used = fs.raw(struct.pack("<IBH", 7 + len(body), kind, 9) + body, reply=room)
        return used.data[4], struct.unpack_from("<I", used.data, 7)[0]
    erange = (p.TLERROR + 1, errno.ERANGE)
    fs.walk(ROOT_FID, 2)
    lcreate = struct.pack("<I", 2) + s("made") + struct.pack("<III", 2, 0o644, 0)
    assert answer(p.TLCREATE, lcreate, 7 + 13 + 4 - 1) == erange
    assert answer(p.TMKDIR, struct.pack("<I", 2) + s("dd") + struct.pack("<II", 0o755, 0),
                  16) == erange
    walk = struct.pack("<IIH", ROOT_FID, 3, 1) + s("sub")
    assert answer(p.TWALK, walk, 7 + 2 + 13 - 1) == erange
    assert answer(p.TVERSION, struct.pack("<I", 8192) + s("9P2000.L"), 16) == erange
    assert sorted(os.listdir(share)) == ["hello.txt", "sub"]
    assert errno_of(fs.getattr, 3) == errno.EBADF
    assert fs.getattr(2)["qid"][0] == p.QTDIR
    assert answer(p.TLCREATE, lcreate, 7 + 13 + 4)[0] == p.TLCREATE + 1
    assert (share / "made").is_file()
    assert answer(p.TWALK, walk, 7 + 2 + 13)[0] == p.TWALK + 1       # Linux's room for it
    assert fs.getattr(3)["qid"][0] == p.QTDIR

def test_chains_too_short_for_a_reply_are_returned_empty(fs):
    assert fs.raw(b"\x07\x00").length == 0
    assert fs.raw(struct.pack("<IBHI", 11, p.TCLUNK, 1, 999), reply=8).length == 0
    assert fs.b.transport.guest_errors >= 2


def test_fids_are_bounded(make):
    client = make(max_fids=4)
    client.version()
    client.attach()
    for fid in (2, 3, 4):
        client.walk(ROOT_FID, fid)
    assert errno_of(client.walk, ROOT_FID, 5) == errno.ENFILE
    assert errno_of(client.walk, ROOT_FID, 2) == errno.EBADF          # in use
    client.clunk(4)
    client.walk(ROOT_FID, 5)
    client.version()                                                   # a new session clunks all
    assert errno_of(client.getattr, ROOT_FID) == errno.EBADF


def test_the_open_files_limit_is_raised_for_the_fids(make):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 512), hard))
        make(max_fids=1000)
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == min(hard, 512) if hard <= 512 else raised >= 2000
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_random_messages_never_break_the_device(fs, share):
    rng = random.Random(17)
    kinds = sorted(fs.b.device.server.handlers) + [p.TREAD, p.TWRITE]
    for _ in range(1500):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60)))
        for i in range(0, len(body) - 3, 4):                      # keep some fids plausible
            if rng.random() < 0.3:
                body = body[:i] + struct.pack("<I", rng.choice([ROOT_FID, 2, 3])) + body[i + 4:]
        kind = rng.choice(kinds)
        size = 7 + len(body) if rng.random() < 0.9 else rng.randrange(1 << 32)
        used = fs.raw(struct.pack("<IBH", size, kind, 1) + body)
        assert used.length >= 7 or used.length == 0
        if kind == p.TVERSION or rng.random() < 0.02:
            fs.version()
            fs.attach()
    assert fs.b.driver.status & c.STATUS_DEVICE_NEEDS_RESET == 0
    assert sorted(os.listdir(share.parent)) == ["secret", "share"]


def test_xattr_values_held_by_fids_are_bounded(fs):
    create = struct.pack("<I", ROOT_FID) + s("user.big") + struct.pack("<QI", p.XATTR_MAX, 0)
    assert errno_of(fs.rpc, p.TXATTRCREATE, create[:-12] + struct.pack("<QI", p.XATTR_MAX + 1,
                                                                        0)) == errno.EINVAL
    fids = range(10, 10 + p.XATTR_HELD_MAX // p.XATTR_MAX)
    for fid in fids:
        fs.walk(ROOT_FID, fid)
        fs.rpc(p.TXATTRCREATE, struct.pack("<I", fid) + create[4:])
    fs.walk(ROOT_FID, 99)
    assert errno_of(fs.rpc, p.TXATTRCREATE, struct.pack("<I", 99) + create[4:]) == errno.ENOMEM
    assert errno_of(fs.clunk, 10) == errno.EINVAL          # clunked, value never written
    fs.rpc(p.TXATTRCREATE, struct.pack("<I", 99) + create[4:])


# -- read-only and security models -----------------------------------------------------------

def test_readonly_share_refuses_every_change(make, share):
    client = make(readonly=True)
    client.version()
    client.attach()
    assert errno_of(client.lcreate, ROOT_FID, "x") == errno.EROFS
    assert errno_of(client.mkdir, ROOT_FID, "x") == errno.EROFS
    assert errno_of(client.unlinkat, ROOT_FID, "hello.txt") == errno.EROFS
    client.walk(ROOT_FID, 2, "hello.txt")
    assert errno_of(client.lopen, 2, 1) == errno.EROFS
    assert errno_of(client.setattr, 2, p.SA_SIZE) == errno.EROFS
    client.lopen(2, 0)
    assert client.read(2, 0, 5) == b"hello"
    assert sorted(os.listdir(share)) == ["hello.txt", "sub"]


def test_mapped_xattr_keeps_the_guests_owner_and_mode_in_xattrs(make, share):
    client = make(security_model="mapped-xattr")
    client.version()
    client.attach(uid=1234)
    client.lcreate(ROOT_FID, "f", mode=0o4755, gid=4321)
    attr = client.getattr(ROOT_FID)        # the fid is now the new file
    assert (attr["uid"], attr["gid"], attr["mode"] & 0o7777) == (1234, 4321, 0o4755)
    st = os.stat(share / "f")
    assert (st.st_uid, st.st_mode & 0o7777) == (os.geteuid(), 0o600)    # the daemon's own
    client.setattr(ROOT_FID, p.SA_UID | p.SA_GID | p.SA_MODE, mode=0o640, uid=7, gid=8)
    attr = client.getattr(ROOT_FID)
    assert (attr["uid"], attr["gid"], attr["mode"] & 0o7777) == (7, 8, 0o640)
    assert os.stat(share / "f").st_uid == os.geteuid()
    client.attach(fid=9)
    client.walk(9, 10, "f")
    out = client.rpc(p.TXATTRWALK, struct.pack("<II", 10, 11) + s(""))
    assert b"virtfs" not in client.read(11, 0, struct.unpack("<Q", out)[0] + 1)
    assert errno_of(client.rpc, p.TXATTRWALK, struct.pack("<II", 10, 12)
                    + s("user.virtfs.uid")) == errno.EACCES


def test_none_ignores_ownership_changes(make, share):
    client = make(security_model="none")
    client.version()
    client.attach()
    client.walk(ROOT_FID, 2, "hello.txt")
    before = os.stat(share / "hello.txt")
    client.setattr(2, p.SA_UID | p.SA_GID, uid=4242, gid=4242)
    after = os.stat(share / "hello.txt")
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)


def test_none_never_makes_setuid_files_of_the_daemon(make, share):
    client = make(security_model="none")
    client.version()
    client.attach()
    client.lcreate(ROOT_FID, "f", mode=0o6755)
    assert os.stat(share / "f").st_mode & 0o7777 == 0o755
    client.setattr(ROOT_FID, p.SA_MODE, mode=0o4711)
    assert os.stat(share / "f").st_mode & 0o7777 == 0o711


@pytest.mark.parametrize("model", [
    "none", "mapped-xattr",
    pytest.param("passthrough", marks=pytest.mark.skipif(
        os.geteuid() != 0, reason="passthrough chowns files: needs root"))])
def test_the_daemons_umask_never_cuts_a_new_files_mode(make, share, model):
    """A new file or directory gets the guest's mode (the guest applied its own umask),
    set again after it is created, as QEMU does: not less the daemon's umask (mkdir -m 777
    gave 0755); mapped-xattr's host modes are 0600 and 0700 whatever the umask."""
    client = make(security_model=model)
    client.version()
    client.attach(uid=os.geteuid())
    umask = os.umask(0o277)
    try:
        client.mkdir(ROOT_FID, "d", mode=0o777, gid=os.getegid())
        client.walk(ROOT_FID, 2)
        client.lcreate(2, "f", mode=0o666, gid=os.getegid())
    finally:
        os.umask(umask)
    host = (0o700, 0o600) if model == "mapped-xattr" else (0o777, 0o666)
    assert tuple((share / name).stat().st_mode & 0o7777 for name in ("d", "f")) == host
    client.walk(ROOT_FID, 3, "d")
    assert (client.getattr(3)["mode"] & 0o7777, client.getattr(2)["mode"] & 0o7777) == \
        (0o777, 0o666)


@pytest.mark.skipif(os.geteuid() != 0, reason="passthrough chowns files: needs root")
@pytest.mark.parametrize("mode", [0o640, 0o6755])
def test_passthrough_chowns_as_the_guest_says(make, share, mode):
    """Owner and mode as the guest gives them: the mode is set again after the chown, which
    clears setuid and setgid (as QEMU does): the guest's root makes setuid files here."""
    client = make(security_model="passthrough")
    client.version()
    client.attach(uid=4242)
    client.lcreate(ROOT_FID, "f", mode=mode, gid=4343)
    st = os.stat(share / "f")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4242, 4343, mode)
    client.setattr(ROOT_FID, p.SA_UID, uid=5)
    assert os.stat(share / "f").st_uid == 5


# -- config ------------------------------------------------------------------------------------

def test_config_builds_the_device_and_names_mistakes(tmp_path, share):
    path = tmp_path / "vms.toml"
    path.write_text(f'[vm.0]\n9p = {{ tag = "host", path = "{share}", readonly = true }}\n')
    config = load_config(path)
    device = config.build_device(config.vms[0].devices[0])
    try:
        assert (device.tag, device.server.readonly, device.server.model) == ("host", True, "none")
        assert device.info()["path"] == str(share)
    finally:
        device.detach()
    for table, problem in [
            (f'{{ tag = "h", path = "{share}", security_model = "mapped" }}',
             "vm.0.9p.security_model: must be one of passthrough, mapped-xattr, none"),
            (f'{{ tag = "{"t" * 65}", path = "{share}" }}', "vm.0.9p.tag: must be 1 to 64"),
            ('{ tag = "h" }', "vm.0.9p.path: missing"),
            ('{ tag = "h", path = "/nonexistent-share" }', "no such folder to share"),
            ('{ tag = "h", path = "/nonexistent-parent/share", create = true }',
             "cannot create the folder to share: No such file or directory")]:
        path.write_text(f"[vm.0]\n9p = {table}\n")
        with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
            config = load_config(path)
            config.build_device(config.vms[0].devices[0])


BUILD_SHARE = """
import sys
from avatar_hw.config import load_config
from avatar_hw.errors import ConfigError
config = load_config(sys.argv[1])
try:
    config.build_device(config.vms[0].devices[0]).detach()
except ConfigError as err:
    print(err)
"""


@pytest.mark.parametrize("mode", [0o000, 0o300, 0o500, 0o600])
def test_a_share_the_daemon_cannot_read_or_search_is_refused_at_start(tmp_path, mode):
    """O_PATH opens a folder with no permission on it, so such a share was served and each
    of the guest's walks or reads failed (EACCES). As root the build runs without
    CAP_DAC_OVERRIDE (setpriv), so the folder's permissions apply to it."""
    share = tmp_path / "share"
    share.mkdir(mode=mode)
    path = tmp_path / "vms.toml"
    path.write_text(f'[vm.0]\n9p = {{ tag = "host", path = "{share}" }}\n')
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE as root")
        prefix = ["setpriv", "--inh-caps=-all",
                  "--bounding-set=-dac_override,-dac_read_search", "--"]
    try:
        done = subprocess.run(prefix + [sys.executable, "-c", BUILD_SHARE, str(path)],
                              capture_output=True, text=True, timeout=60)
    finally:
        share.chmod(0o700)
    readable = mode & 0o500 == 0o500
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == ("" if readable else (
        f"{path}: vm.0.9p: {share}: the folder shared as 'host' cannot be read or searched "
        "(Permission denied): give the daemon's user r and x on it\n"))


def test_create_makes_a_missing_folder_and_keeps_an_existing_one(tmp_path):
    path = tmp_path / "vms.toml"
    for _ in range(2):                           # made the first time, used as it is after
        path.write_text(f'[vm.0]\n9p = {{ tag = "h", path = "{tmp_path}/new", create = true }}\n')
        config = load_config(path)
        device = config.build_device(config.vms[0].devices[0])
        device.detach()
        assert (tmp_path / "new").is_dir() and (tmp_path / "new").stat().st_mode & 0o777 == 0o700
        (tmp_path / "new" / "kept").write_text("x")
    assert (tmp_path / "new" / "kept").read_text() == "x"


def test_avatar_hw_info_shows_the_share(make, share):
    from avatar_hw.commands.query import format_device, format_list
    client = make(tag="hostshare", security_model="mapped-xattr")
    client.version()
    client.attach()
    subsystem = client.b.subsystem
    entry = {**subsystem.device_info()[0], **subsystem.debug_device(0, 0)}
    text = format_device(entry)
    assert (f"9p: fids 1; tag hostshare; path {share}; readonly False; security_model "
            f"mapped-xattr; msize {p.MSIZE_MAX}") in text
    assert " 9p " in format_list(subsystem.list_all_devices())


def test_a_server_bug_answers_eio_and_the_device_carries_on(fs, monkeypatch):
    monkeypatch.setitem(fs.b.device.server.handlers, p.TSTATFS, lambda r: 1 / 0)
    assert errno_of(fs.rpc, p.TSTATFS, struct.pack("<I", ROOT_FID)) == errno.EIO
    assert fs.b.device.server.bug is None and fs.b.device.counters["errors"] == 1
    assert fs.getattr(ROOT_FID)["qid"][0] == p.QTDIR
