"""The vhost-user front end against the real virtiofsd (Debian's qemu-system-common).

Guest RAM is a shared mapping of a temporary file (as QEMU's RAM file is in
host mode), so its fd goes to virtiofsd by SCM_RIGHTS; a driver played from
the host side negotiates, sets up the queues and sends FUSE requests, which
virtiofsd answers straight into guest RAM.
"""

import os
import struct
import time

import pytest

from avatar_hw.config import parse_config
from avatar_hw.devices import fs
from avatar_hw.devices.vhost_user import VhostUserDevice
from avatar_hw.errors import ConfigError
from avatar_hw.hw.region import Region
from avatar_hw.loop import EventLoop
from avatar_hw.testing.driver import GuestRam, VirtioDriver
from avatar_hw.testing.virtio import IrqRecorder
from avatar_hw.vhost_user import Frontend, VhostUserError
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.memory import GuestMemory
from avatar_hw.virtio.subsystem import Subsystem

pytestmark = pytest.mark.skipif(not os.path.isfile(fs.VIRTIOFSD),
                                reason=f"{fs.VIRTIOFSD} missing (qemu-system-common)")

RAM_BASE = 0x40000000
RAM_SIZE = 4 << 20
FUSE_INIT, FUSE_LOOKUP, FUSE_GETATTR = 26, 1, 3
FUSE_ROOT_ID = 1


class FileBench:
    """A VM whose RAM is a shared file mapping, one device, an event loop, a driver."""

    def __init__(self, tmp_path, device):
        ram_file = tmp_path / "ram"
        with open(ram_file, "wb") as f:
            f.truncate(RAM_SIZE)
        self.region = Region.map_file(ram_file, RAM_SIZE, name="test RAM")
        self.loop = EventLoop()
        self.irq = IrqRecorder()
        self.subsystem = Subsystem(interrupt_line=self.irq, loop=self.loop)
        self.memory = self.subsystem.vm_init(0, GuestMemory(self.region, RAM_BASE))
        self.device = device
        self.transport = self.subsystem.create_device(0, device)
        self.ram = GuestRam(self.region.view(0, RAM_SIZE), RAM_BASE)
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


def test_vhost_user_reset_stops_rings_and_reactivates(bench):
    bench.driver.init([0, 1], size=64)
    bench.driver.reset()
    assert bench.device.info()["rings_started"] == []
    _, req = bench.driver.init([0, 1], size=64)
    req.post(readable=[fuse_request(FUSE_INIT, 9, 0, init_body())], writable=[16 + 256])
    req.notify()
    (used,) = bench.wait_used(req)
    assert struct.unpack_from("<IiQ", used.data)[1:] == (0, 9)


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
    import socket
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
    import socket
    import threading
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
    with pytest.raises(ConfigError, match="vm.0.vhost_user.queues"):
        parse_config("v.toml", {"vm": {"0": {"vhost_user": {
            "socket": "s", "device_id": 26, "queues": [3]}}}})
    cfg = parse_config("v.toml", {"vm": {"0": {"vhost_user": {
        "socket": str(tmp_path / "none.sock"), "device_id": 26, "queues": [8]}}}})
    with pytest.raises(ConfigError, match="cannot connect"):
        cfg.build_device(cfg.vms[0].devices[0])


def test_vhost_user_more_queues_than_the_backend_serves_is_refused(tmp_path, share):
    proc = fs.start_virtiofsd(str(share), str(tmp_path / "fs.sock"))
    try:
        with pytest.raises(VhostUserError, match="at most 2 queues, not 3"):
            VhostUserDevice(socket=tmp_path / "fs.sock", device_id=fs.ID_FS,
                            queue_sizes=[64, 64, 64])
    finally:
        fs.stop(proc)
