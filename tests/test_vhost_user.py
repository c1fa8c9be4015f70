"""The vhost-user front end against the real virtiofsd (Debian's qemu-system-common) and
against a scripted, misbehaving back-end.

Guest RAM is a shared mapping of a temporary file (as QEMU's RAM file is in
host mode) or of a fake UIO node (board mode; a regular file stands in for
/dev/uioN), so its fd goes to the back-end by SCM_RIGHTS; a driver played
from the host side negotiates, sets up the queues and sends FUSE requests,
which virtiofsd answers straight into guest RAM. ``ScriptedBackend`` breaks
the protocol in the ways a hostile or broken back-end could: late, trickled,
oversized or malformed replies, file descriptors nobody asked for.
"""

import array
import mmap
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from avatar_hw.config import parse_config
from avatar_hw.devices import fs
from avatar_hw.devices.vhost_user import UNSUPPORTED, VhostUserDevice
from avatar_hw.errors import ConfigError
from avatar_hw.hw.region import Region
from avatar_hw.loop import EventLoop
from avatar_hw.hw.uio import find_uio
from avatar_hw.testing.driver import GuestRam, VirtioDriver
from avatar_hw.testing.fake_uio import make_tree
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
from avatar_hw.testing.virtio import IrqRecorder
from avatar_hw.vhost_user import Frontend, VhostUserError
from avatar_hw.vhost_user import frontend as vu
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.memory import GuestMemory
from avatar_hw.virtio.subsystem import Subsystem
from test_daemon import private_copy_of_the_package, proc_ids, user_nobody, wait_used

needs_virtiofsd = pytest.mark.skipif(not os.path.isfile(fs.VIRTIOFSD),
                                     reason=f"{fs.VIRTIOFSD} missing (qemu-system-common)")

RAM_BASE = 0x40000000
RAM_SIZE = 4 << 20
FUSE_INIT, FUSE_LOOKUP, FUSE_GETATTR = 26, 1, 3
FUSE_ROOT_ID = 1


class FileBench:
    """A VM whose RAM is a shared file mapping (or ``region``), one device, an event loop,
    a driver."""

    def __init__(self, tmp_path, device, region=None):
        if region is None:
            ram_file = tmp_path / "ram"
            with open(ram_file, "wb") as f:
                f.truncate(RAM_SIZE)
            region = Region.map_file(ram_file, RAM_SIZE, name="test RAM")
        self.region = region
        self.loop = EventLoop()
        self.irq = IrqRecorder()
        self.subsystem = Subsystem(interrupt_line=self.irq, loop=self.loop)
        self.memory = self.subsystem.vm_init(0, GuestMemory(self.region, RAM_BASE))
        self.device = device
        self.transport = self.subsystem.create_device(0, device)
        self.ram = GuestRam(self.region.view(0, self.region.size), RAM_BASE)
        self.driver = VirtioDriver(self.subsystem.handle_mmio_trap, self.transport.window,
                                   self.ram)

    def wait_used(self, queue, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.loop.run_once(0.05)
            used = queue.get_used()
            if used:
                return used
        raise AssertionError("the back-end answered nothing")

    def run_until(self, predicate, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, what
            self.loop.run_once(0.05)

    def close(self):
        self.transport.close()
        self.memory.release()
        self.loop.close()


def fuse_request(opcode, unique, nodeid, body):
    return struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, 0, 0, 1, 0,
                       0) + body


def init_body(minor=31):
    return struct.pack("<IIII", 7, minor, 0, 0) + bytes(48)   # fuse_init_in (64 bytes)


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    (d / "hello.txt").write_bytes(b"hello from the host\n")
    return d


@pytest.fixture
def bench(tmp_path, share):
    b = FileBench(tmp_path, fs.FsDevice(tag="hostshare", shared_dir=share))
    yield b
    b.close()


@needs_virtiofsd
def test_vhost_user_fs_answers_fuse_init_in_guest_memory(bench):
    dev = bench.device
    assert bench.driver.read(c.REG_DEVICE_ID) == fs.ID_FS
    assert bytes(dev.config[:9]) == b"hostshare"
    assert struct.unpack_from("<I", dev.config, 36) == (1,)
    _, req = bench.driver.init([0, 1], size=64)
    assert dev.info()["rings_started"] == [0, 1]

    req.post(readable=[fuse_request(FUSE_INIT, 7, 0, init_body())], writable=[16 + 256])
    req.notify()
    (used,) = bench.wait_used(req)
    length, error, unique = struct.unpack_from("<IiQ", used.data)
    assert (error, unique) == (0, 7) and length == used.length
    major, minor = struct.unpack_from("<II", used.data, 16)
    assert major == 7 and minor >= 31
    assert bench.irq.take(), "the call eventfd raised no interrupt"
    assert bench.driver.interrupt_status() & c.INT_USED_BUFFER

    # A lookup of a file virtiofsd sees in the shared folder: its size comes back.
    req.post(readable=[fuse_request(FUSE_LOOKUP, 8, FUSE_ROOT_ID, b"hello.txt\0")],
             writable=[16 + 128])
    req.notify()
    (used,) = bench.wait_used(req)
    _, error, unique = struct.unpack_from("<IiQ", used.data)
    assert (error, unique) == (0, 8)
    size, = struct.unpack_from("<Q", used.data, 16 + 40 + 8)   # entry_out.attr.size
    assert size == len(b"hello from the host\n")


@needs_virtiofsd
def test_vhost_user_requests_past_a_queues_worth_are_not_idle_traps(bench):
    """The back-end pops the rings, never the daemon: a driver's available index far past
    the daemon's ``last_avail_idx`` is its progress, not a scribble, so a correct guest's
    notifies are not idle traps (avatar_hw.pace would pace it); a repeated one still is."""
    _, req = bench.driver.init([0, 1], size=16)
    req.post(readable=[fuse_request(FUSE_INIT, 1, 0, init_body())], writable=[16 + 256])
    req.notify()
    bench.wait_used(req)
    setup = bench.transport.context.idle_traps                # the driver's setup (selectors)
    for unique in range(2, 2 + 3 * 16):                       # three queues' worth
        req.post(readable=[fuse_request(FUSE_GETATTR, unique, FUSE_ROOT_ID, bytes(16))],
                 writable=[16 + 104])
        req.notify()
        (used,) = bench.wait_used(req)
        assert struct.unpack_from("<iQ", used.data, 4) == (0, unique)
    assert bench.transport.context.idle_traps == setup
    req.notify()                                              # nothing new
    assert bench.transport.context.idle_traps == setup + 1


@needs_virtiofsd
def test_vhost_user_reset_stops_rings_and_reactivates(bench, monkeypatch):
    bench.driver.init([0, 1], size=64)
    started = bench.device.info()["rings_started"]
    assert started
    frontend, stopped = bench.device.frontend, []
    get_vring_base = frontend.get_vring_base
    monkeypatch.setattr(frontend, "get_vring_base",
                        lambda index: stopped.append(index) or get_vring_base(index))
    bench.driver.reset()
    assert bench.device.info()["rings_started"] == []
    assert sorted(stopped) == sorted(started)        # the back-end was told, ring by ring
    _, req = bench.driver.init([0, 1], size=64)
    req.post(readable=[fuse_request(FUSE_INIT, 9, 0, init_body())], writable=[16 + 256])
    req.notify()
    (used,) = bench.wait_used(req)
    assert struct.unpack_from("<IiQ", used.data)[1:] == (0, 9)


@needs_virtiofsd
def test_vhost_user_dead_backend_sets_needs_reset(bench, caplog):
    _, req = bench.driver.init([0, 1], size=64)
    bench.device.process.kill()
    bench.device.process.wait()
    deadline = time.monotonic() + 60
    while not bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET:
        assert time.monotonic() < deadline, "a dead back-end left the device running"
        bench.loop.run_once(0.05)
    assert bench.driver.interrupt_status() & c.INT_CONFIG_CHANGE
    assert sum("closed the connection" in r.getMessage() for r in caplog.records) == 1
    # The guest's reset and re-initialisation meet NEEDS_RESET again, at once.
    bench.driver.reset()
    bench.driver.init([0, 1], size=64)
    assert bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET


def test_vhost_user_silent_backend_times_out(tmp_path):
    path = tmp_path / "mute.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(VhostUserError, match="timed out"):
            VhostUserDevice(socket=path, device_id=26, queue_sizes=[8], timeout=0.2)
        assert time.monotonic() - start >= 0.2    # no upper bound: the machine may be loaded
    finally:
        server.close()


def test_vhost_user_malformed_reply_is_refused(tmp_path):
    path = tmp_path / "bad.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        conn.recv(12)
        conn.sendall(struct.pack("<III", 2, 0x5, 8) + bytes(8))   # wrong request code
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    try:
        front = Frontend(path, timeout=2)
        with pytest.raises(VhostUserError, match="has request 2"):
            front.handshake()
        assert front.closed
    finally:
        t.join()
        server.close()


def test_vhost_user_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="vm.0.fs.tag"):
        parse_config("v.toml", {"vm": {"0": {"fs": {"tag": "x" * 37, "shared_dir": "."}}}})
    for queues in ([3], [8] * 65):
        with pytest.raises(ConfigError, match="vm.0.vhost_user.queues: must list 1 to 64"):
            parse_config("v.toml", {"vm": {"0": {"vhost_user": {
                "socket": "s", "device_id": 26, "queues": queues}}}})
    cfg = parse_config("v.toml", {"vm": {"0": {"vhost_user": {
        "socket": str(tmp_path / "none.sock"), "device_id": 26, "queues": [8]}}}})
    with pytest.raises(ConfigError, match="cannot connect"):
        cfg.build_device(cfg.vms[0].devices[0])


def test_vhost_user_config_size_without_the_backends_config_is_one_config_error(
        backend_path):
    backend = scripted(backend_path, features=1 << 32 | 1 << vu.F_PROTOCOL_FEATURES)
    try:
        cfg = parse_config("v.toml", {"vm": {"0": {"vhost_user": {
            "socket": str(backend_path), "device_id": 41, "queues": [8], "config_size": 8}}}})
        with pytest.raises(ConfigError, match=r"vm\.0\.vhost_user: config_size = 8: the "
                                              r"back-end .* does not offer VHOST_USER_PROTOCOL"
                                              r"_F_CONFIG; remove config_size"):
            cfg.build_device(cfg.vms[0].devices[0])
    finally:
        backend.close()


def test_vhost_user_backend_with_a_full_backlog_is_one_config_error(tmp_path):
    """A back-end that listens but never accepts, its backlog full: connect must not block
    (without a timeout it did until the back-end accepted; the timer ends that here)."""
    path = tmp_path / "busy.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(str(path))                   # the one connection the backlog holds
    unblock = threading.Timer(10, server.close)
    unblock.start()
    try:
        cfg = parse_config("v.toml", {"vm": {"0": {"vhost_user": {
            "socket": str(path), "device_id": 26, "queues": [8]}}}})
        with pytest.raises(ConfigError, match=r"vm\.0\.vhost_user: cannot connect to .*busy"
                                              r"\.sock: its listen backlog is full"):
            cfg.build_device(cfg.vms[0].devices[0])
    finally:
        unblock.cancel()
        filler.close()
        server.close()


@needs_virtiofsd
def test_vhost_user_more_queues_than_the_backend_serves_is_refused(tmp_path, share):
    proc = fs.start_virtiofsd(str(share), str(tmp_path / "fs.sock"))
    try:
        with pytest.raises(VhostUserError, match="at most 2 queues, not 3"):
            VhostUserDevice(socket=tmp_path / "fs.sock", device_id=fs.ID_FS,
                            queue_sizes=[64, 64, 64])
    finally:
        fs.stop(proc)


# -- a hostile or broken back-end: a scripted one in a thread ----------------------------------

class ScriptedBackend:
    """A vhost-user back-end on ``path`` in a thread: answers what a back-end must
    (features, protocol features, queue count, ring bases, REPLY_ACK acks) unless
    ``override[request](backend, flags, payload)`` answers instead; records each request
    as (request, payload, fds received)."""

    def __init__(self, path, *, features=1 << 32, protocol_features=0, override=None):
        self.features, self.protocol_features = features, protocol_features
        self.override = override or {}
        self.requests = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, n, fds=None):
        data = b""
        while len(data) < n:
            chunk, ancdata, _, _ = self.conn.recvmsg(n - len(data), socket.CMSG_SPACE(32))
            if not chunk:
                raise EOFError
            for _, _, raw in ancdata:
                fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
            data += chunk
        return data

    def _serve(self):
        self.conn, _ = self.server.accept()
        try:
            while True:
                fds = []
                request, flags, size = struct.unpack("<III", self._recv(12, fds))
                payload = self._recv(size, fds) if size else b""
                self.requests.append((request, payload, fds))
                if request in self.override:
                    self.override[request](self, flags, payload)
                else:
                    self._answer(request, flags, payload)
        except (EOFError, OSError):
            pass

    def _answer(self, request, flags, payload):
        u64 = {vu.GET_FEATURES: self.features, vu.GET_PROTOCOL_FEATURES: self.protocol_features,
               vu.GET_QUEUE_NUM: 8}
        if request in u64:
            self.reply(request, struct.pack("<Q", u64[request]))
        elif request == vu.GET_VRING_BASE:
            self.reply(request, payload[:4] + bytes(4))
        elif flags & vu.FLAG_NEED_REPLY:
            self.reply(request, bytes(8))

    def reply(self, request, payload, fds=(), size=None):
        header = struct.pack("<III", request, vu.VERSION | vu.FLAG_REPLY,
                             len(payload) if size is None else size)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.conn.sendmsg([header + payload], anc)

    def sent(self, request):
        return [r for r in self.requests if r[0] == request]

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.server.close()
        self.thread.join(10)
        for _, _, fds in self.requests:
            while fds:
                os.close(fds.pop())


@pytest.fixture
def backend_path(tmp_path):
    return tmp_path / "backend.sock"


def scripted(path, **options):
    return ScriptedBackend(path, **options)


def pipe_closed_everywhere(read_end):
    """True when no write end of the pipe is open any more (in any process)."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False


def test_vhost_user_trickling_backend_times_out_on_one_deadline(backend_path):
    """A back-end sending its reply one byte at a time, each within the socket timeout, is
    still cut off: the request and its reply share one deadline."""
    def trickle(backend, flags, payload):
        reply = struct.pack("<III", vu.GET_FEATURES, vu.VERSION | vu.FLAG_REPLY, 8) + bytes(8)
        for byte in reply:
            backend.conn.send(bytes([byte]))
            time.sleep(0.15)
    backend = scripted(backend_path, override={vu.GET_FEATURES: trickle})
    try:
        front = Frontend(backend_path, timeout=0.5)   # 20 bytes x 0.15 s: 3 s in all
        with pytest.raises(VhostUserError, match="timed out"):
            front.handshake()
        assert front.closed
        with pytest.raises(VhostUserError, match="lost earlier and is not reopened"):
            front.set_features(0)
    finally:
        backend.close()


@pytest.mark.parametrize("size, expected", [
    (1 << 30, "has a 1073741824-byte payload"),      # oversized: refused before reading it
    (4, "has a 4-byte payload, not 8"),
])
def test_vhost_user_reply_of_the_wrong_size_is_refused(backend_path, size, expected):
    backend = scripted(backend_path, override={
        vu.GET_FEATURES: lambda b, flags, payload: b.reply(vu.GET_FEATURES, bytes(8), size=size)})
    try:
        front = Frontend(backend_path, timeout=5)
        with pytest.raises(VhostUserError, match=expected):
            front.handshake()
    finally:
        backend.close()


def test_vhost_user_reply_without_the_reply_flag_or_version_is_refused(backend_path):
    def bad(backend, flags, payload):
        backend.conn.sendall(struct.pack("<III", vu.GET_FEATURES, 0x2, 8) + bytes(8))
    backend = scripted(backend_path, override={vu.GET_FEATURES: bad})
    try:
        with pytest.raises(VhostUserError, match="flags 0x2"):
            Frontend(backend_path, timeout=5).handshake()
    finally:
        backend.close()


def test_vhost_user_fds_in_a_reply_are_closed_not_kept(backend_path):
    read_end, write_end = os.pipe()
    backend = scripted(backend_path, override={
        vu.GET_FEATURES: lambda b, flags, payload: b.reply(vu.GET_FEATURES, bytes(8),
                                                           fds=[write_end])})
    try:
        before = set(os.listdir("/proc/self/fd"))
        front = Frontend(backend_path, timeout=5)
        with pytest.raises(VhostUserError, match="carries file descriptors"):
            front.handshake()
        os.close(write_end)                       # the test's copy; the back-end's was sent
        backend.close()
        assert pipe_closed_everywhere(read_end), "the front end kept the fd it was sent"
        assert set(os.listdir("/proc/self/fd")) <= before
    finally:
        backend.close()
        os.close(read_end)


def test_vhost_user_unsolicited_message_with_an_fd_fails_the_device_and_closes_it(
        tmp_path, backend_path, caplog):
    backend = scripted(backend_path)
    bench = FileBench(tmp_path, VhostUserDevice(socket=backend_path, device_id=26,
                                                queue_sizes=[8], timeout=5))
    read_end, write_end = os.pipe()
    socket_fd = bench.device.frontend.fileno()
    try:
        bench.driver.init([0], size=8)
        backend.reply(vu.GET_FEATURES, bytes(8), fds=[write_end])   # nothing asked for it
        os.close(write_end)
        bench.run_until(lambda: bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET,
                        "an unsolicited message left the device running")
        assert sum("sent a message with no request in flight" in r.getMessage()
                   for r in caplog.records) == 1
        assert bench.device.frontend.closed and not bench.loop.watches(socket_fd)
        backend.close()
        assert pipe_closed_everywhere(read_end), "the peeked fd was kept"
    finally:
        bench.close()
        backend.close()
        os.close(read_end)


def test_vhost_user_backend_features_the_front_end_cannot_honour_are_not_offered(
        tmp_path, backend_path):
    offered = (1 << 0 | 1 << c.F_VERSION_1 | 1 << c.F_RING_EVENT_IDX | 1 << 26
               | 1 << c.F_ACCESS_PLATFORM | 1 << c.F_RING_PACKED | 1 << c.F_RING_RESET
               | 1 << c.F_NOTIFICATION_DATA | 1 << 45 | 1 << 52)
    backend = scripted(backend_path, features=offered)
    try:
        device = VhostUserDevice(socket=backend_path, device_id=26, queue_sizes=[8])
        assert device.features == (1 << 0 | 1 << c.F_VERSION_1 | 1 << c.F_RING_EVENT_IDX
                                   | 1 << 52)
        assert not device.features & UNSUPPORTED
        device.frontend.close()
    finally:
        backend.close()


def test_vhost_user_stalled_backend_at_driver_ok_sets_needs_reset_once(
        tmp_path, backend_path, caplog):
    """REPLY_ACK negotiated, then SET_MEM_TABLE never acked: DRIVER_OK costs the timeout
    once, the device needs a reset, later kicks do not wait again."""
    backend = scripted(backend_path, features=1 << 32 | 1 << vu.F_PROTOCOL_FEATURES,
                       protocol_features=1 << vu.PROTOCOL_F_REPLY_ACK,
                       override={vu.SET_MEM_TABLE: lambda b, flags, payload: None})
    bench = FileBench(tmp_path, VhostUserDevice(socket=backend_path, device_id=26,
                                                queue_sizes=[8], timeout=0.3))
    socket_fd = bench.device.frontend.fileno()
    try:
        (queue,) = bench.driver.init([0], size=8)
        assert bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
        assert sum("timed out" in r.getMessage() for r in caplog.records) == 1
        assert not bench.loop.watches(socket_fd), "the closed socket's fd stays in the loop"
        queue.notify()                              # no wait, no second log line
        assert sum("timed out" in r.getMessage() for r in caplog.records) == 1
        bench.driver.reset()                        # the guest's recovery: NEEDS_RESET at once,
        bench.driver.init([0], size=8)              # its line naming the socket
        assert bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
        last = caplog.records[-1].getMessage()
        assert str(backend_path) in last and "lost earlier" in last, last
    finally:
        bench.close()
        backend.close()


def slowly(request, seconds=0.3):
    """An override answering ``request`` after ``seconds`` (each within the timeout)."""
    def answer(backend, flags, payload):
        time.sleep(seconds)
        backend.reply(request, payload[:4] + bytes(4) if request == vu.GET_VRING_BASE
                      else bytes(8))
    return answer


@pytest.mark.parametrize("slow, queues", [
    ((vu.SET_FEATURES, vu.SET_MEM_TABLE, vu.SET_VRING_NUM, vu.SET_VRING_ADDR,
      vu.SET_VRING_BASE, vu.SET_VRING_CALL, vu.SET_VRING_ERR, vu.SET_VRING_KICK), 1),
    ((vu.GET_VRING_BASE,), 8),
])
def test_vhost_user_activation_and_reset_share_one_deadline(tmp_path, backend_path, slow,
                                                            queues):
    """Each acknowledgement (or ring base) comes 0.3 s late, well within the 1 s timeout,
    but the whole DRIVER_OK (8 acks) or reset (8 rings) is cut off at 1 s: a slow back-end
    holds the daemon for one timeout per sequence, not one per request."""
    backend = scripted(backend_path, features=1 << 32 | 1 << vu.F_PROTOCOL_FEATURES,
                       protocol_features=1 << vu.PROTOCOL_F_REPLY_ACK,
                       override={request: slowly(request) for request in slow})
    bench = FileBench(tmp_path, VhostUserDevice(socket=backend_path, device_id=26,
                                                queue_sizes=[8] * queues, timeout=1.0))
    try:
        bench.driver.init(list(range(queues)), size=8)
        if vu.GET_VRING_BASE in slow:
            assert not bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
            bench.driver.reset()
            bench.driver.init(list(range(queues)), size=8)
        assert bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
        assert bench.device.frontend.closed
    finally:
        bench.close()
        backend.close()


@pytest.mark.parametrize("applies", [False, True])
def test_vhost_user_config_write_reads_back_what_the_backend_keeps(tmp_path, backend_path,
                                                                   applies):
    """SET_CONFIG acknowledged, then the guest reads what GET_CONFIG says: the old bytes
    when the back-end kept them (a read-only field; ConfigGeneration unchanged), the new
    ones when it took them."""
    config = bytearray(range(8))

    def get_config(backend, flags, payload):
        offset, size, _ = struct.unpack_from("<III", payload)
        backend.reply(vu.GET_CONFIG, payload[:12] + bytes(config[offset:offset + size]))

    def set_config(backend, flags, payload):
        offset, size, _ = struct.unpack_from("<III", payload)
        if applies:
            config[offset:offset + size] = payload[12:12 + size]
        backend.reply(vu.SET_CONFIG, bytes(8))

    backend = scripted(backend_path, features=1 << 32 | 1 << vu.F_PROTOCOL_FEATURES,
                       protocol_features=1 << vu.PROTOCOL_F_REPLY_ACK | 1 << vu.PROTOCOL_F_CONFIG,
                       override={vu.GET_CONFIG: get_config, vu.SET_CONFIG: set_config})
    bench = FileBench(tmp_path, VhostUserDevice(socket=backend_path, device_id=41,
                                                queue_sizes=[8], config_size=8, timeout=5))
    try:
        bench.driver.init([0], size=8)
        generation = bench.driver.read(c.REG_CONFIG_GENERATION)
        bench.driver.write_config(0, 0xDEADBEEF, 4)
        expected = 0xDEADBEEF if applies else 0x03020100
        assert bench.driver.read_config(0, 4) == expected
        assert (bench.driver.read(c.REG_CONFIG_GENERATION) != generation) == applies
        assert not bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
    finally:
        bench.close()
        backend.close()


# -- board mode: guest RAM is a UIO map ------------------------------------------------------------

def uio_ram(tmp_path, maps):
    """A fake UIO node (a regular file stands in for /dev/uioN) whose maps are ``maps``."""
    roots = make_tree(tmp_path / "uio", {0: ("avatar-vm0-ram", maps)})
    return find_uio("avatar-vm0-ram", **roots)


def test_vhost_user_board_ram_is_uio_map_0_passed_whole_from_offset_0(tmp_path, backend_path):
    """The back-end gets the UIO node's fd, mmap_offset 0 and the map's whole size, and
    what it maps from that fd at offset 0 is the guest's RAM."""
    uio = uio_ram(tmp_path, [(0x20000000, RAM_SIZE, 0, "ram")])
    backend = scripted(backend_path)
    bench = FileBench(tmp_path, VhostUserDevice(socket=backend_path, device_id=26,
                                                queue_sizes=[8], timeout=5),
                      region=uio.map(0))
    try:
        bench.driver.init([0], size=8)
        assert not bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
        deadline = time.monotonic() + 10
        while not backend.sent(vu.SET_VRING_KICK):
            assert time.monotonic() < deadline, "the rings never reached the back-end"
            time.sleep(0.01)
        (_, payload, fds), = backend.sent(vu.SET_MEM_TABLE)
        assert struct.unpack_from("<II", payload) == (1, 0) and len(fds) == 1
        gpa, size, uaddr, mmap_offset = struct.unpack_from("<QQQQ", payload, 8)
        assert (gpa, size, uaddr, mmap_offset) == (RAM_BASE, RAM_SIZE, bench.region.address, 0)
        assert os.fstat(fds[0]).st_ino == os.stat(uio.dev_path).st_ino
        with mmap.mmap(fds[0], size, mmap.MAP_SHARED, offset=mmap_offset) as theirs:
            bench.region.write64(0x1230, 0x1122334455667788)
            assert theirs[0x1230:0x1238] == (0x1122334455667788).to_bytes(8, "little")
        assert [r[0] for r in backend.requests[-6:]] == [
            vu.SET_VRING_NUM, vu.SET_VRING_ADDR, vu.SET_VRING_BASE, vu.SET_VRING_CALL,
            vu.SET_VRING_ERR, vu.SET_VRING_KICK]
    finally:
        bench.close()
        backend.close()


def test_vhost_user_board_ram_in_another_uio_map_is_refused_with_the_fix(
        tmp_path, backend_path, caplog):
    page = os.sysconf("SC_PAGE_SIZE")
    uio = uio_ram(tmp_path, [(0x10000000, page, 0, "other"), (0x20000000, RAM_SIZE, 0, "ram")])
    backend = scripted(backend_path)
    bench = FileBench(tmp_path, VhostUserDevice(socket=backend_path, device_id=26,
                                                queue_sizes=[8], timeout=5),
                      region=uio.map(1))
    try:
        assert any("make the VM's RAM map 0" in r.getMessage() for r in caplog.records)
        bench.driver.init([0], size=8)
        assert bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
        assert not backend.sent(vu.SET_MEM_TABLE)
    finally:
        bench.close()
        backend.close()


# -- the daemon with --user: virtiofsd started by root, RAM fd opened before the drop ---------

@needs_virtiofsd
def test_vhost_user_fs_under_serve_user_in_board_mode(tmp_path, share):
    """``avatar-hw serve --user nobody`` on a (fake) board whose RAM nodes only root may open:
    the daemon starts virtiofsd as root, removes its socket once connected, passes the RAM
    node's fd (map 0, offset 0) after the drop, FUSE_INIT is answered in guest RAM; at
    SIGTERM virtiofsd exits with the connection and nothing is left behind."""
    nobody = user_nobody()
    board = FakeBoard(tmp_path / "board", vms=1)
    stub = StandinStub(board)
    private, env = private_copy_of_the_package(tmp_path)
    for node in (tmp_path / "board" / "dev").iterdir():
        node.chmod(0o600)                       # as without the udev rules: root only
    config = tmp_path / "vms.toml"
    config.write_text(f'[vm.0]\nfs = {{ tag = "hostshare", shared_dir = "{share}" }}\n')
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(board.serve_argv(config, "--user", "nobody"), env=env,
                                  cwd=private, stdout=log, stderr=subprocess.STDOUT)
    try:
        stub.page.wait_attached()
        assert proc_ids(daemon.pid, "Uid") == [nobody.pw_uid] * 4
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        [backend] = [int(pid) for pid in children
                     if Path(f"/proc/{pid}/exe").resolve() == Path(fs.VIRTIOFSD).resolve()]
        assert proc_ids(backend, "Uid")[0] == 0
        argv = Path(f"/proc/{backend}/cmdline").read_bytes().split(b"\0")
        [socket_path] = [a.split(b"=", 1)[1] for a in argv if a.startswith(b"--socket-path=")]
        assert not os.path.exists(os.fsdecode(socket_path)), "the socket outlives the connection"
        assert not os.path.exists(os.path.dirname(os.fsdecode(socket_path)))

        driver = stub.driver(0)
        assert driver.read(c.REG_DEVICE_ID) == fs.ID_FS
        _, req = driver.init([0, 1], size=64)
        assert not driver.status & c.STATUS_DEVICE_NEEDS_RESET, log_path.read_text()
        req.post(readable=[fuse_request(FUSE_INIT, 7, 0, init_body())], writable=[16 + 256])
        req.notify()
        (used,) = wait_used(stub, driver, req, 1)
        assert struct.unpack_from("<IiQ", used.data)[1:] == (0, 7)

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0, log_path.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        stub.close()
    output = log_path.read_text()
    assert "running as nobody" in output and "Traceback" not in output, output
    assert "did not exit" not in output, output
    state = Path(f"/proc/{backend}/stat")
    assert not state.exists() or state.read_text().split(") ")[1][0] in "ZX", \
        "virtiofsd outlived the daemon"


def test_vhost_user_virtiofsd_that_fails_to_start_is_one_line(tmp_path, share, monkeypatch):
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\necho 'fuse: cannot set up the sandbox' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(fs, "VIRTIOFSD", str(fake))
    with pytest.raises(ValueError, match=f"{fake} did not start: fuse: cannot set up"):
        fs.FsDevice(tag="t", shared_dir=share)
