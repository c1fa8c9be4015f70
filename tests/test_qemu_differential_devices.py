"""Differential tests of the devices QEMU also has beyond console, block and rng (those are in
test_qemu_differential*.py): gpu, 9p, balloon and net, the same driver-side requests on QEMU's
virtio-mmio model (through qtest) and on ours, compared answer by answer. Accepted
differences are in each test's ``DIFFERENCES`` with both values."""

import struct
import time

import pytest

from avatar_hw.backends import p9fs
from avatar_hw.devices import gpu as g
from avatar_hw.devices import net
from avatar_hw.devices.balloon import BalloonDevice
from avatar_hw.devices.gpu import GpuDevice
from avatar_hw.devices.net import NetDevice
from avatar_hw.devices.p9 import P9Device
from avatar_hw.emulated.machine import qemu_value
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import constants as c
from test_qemu_differential import qemu, qemu_driver, wait_used  # noqa: F401 (fixture)

pytestmark = pytest.mark.qemu


def ours(device, observe, ram_size=1 << 20):
    bench = VirtioBench(device, ram_size=ram_size)
    try:
        return observe(bench.driver, bench)
    finally:
        bench.subsystem.close()
        bench.check_guards()


# -- gpu: every command's answer, good and bad -------------------------------------------------

def gpu_requests(d, _bench=None):
    """{name: (response type, used length, response bytes after the header)}."""
    ctrl, = d.init([0], buf_size=4096, size=16)
    o = {}

    def do(name, kind, fmt="", *fields, extra=b"", room=4096):
        body = g.HEADER.pack(kind, 0, 0, 0, 0) + struct.pack("<" + fmt, *fields) + extra
        ctrl.post(readable=[body], writable=[room])
        ctrl.notify()
        [used] = wait_used(ctrl)
        kind_, = struct.unpack_from("<I", used.data) if used.length >= 4 else (None,)
        o[name] = (kind_, used.length, used.data[24:used.length])

    backing = d.ram.alloc(64 * 64 * 4, 4096)
    d.ram.write(backing, bytes(range(256)) * 64)
    do("display_info", g.CMD_GET_DISPLAY_INFO)
    do("create", g.CMD_RESOURCE_CREATE_2D, "IIII", 1, 1, 64, 64)
    do("create_again", g.CMD_RESOURCE_CREATE_2D, "IIII", 1, 1, 64, 64)
    do("create_id_0", g.CMD_RESOURCE_CREATE_2D, "IIII", 0, 1, 64, 64)
    do("create_bad_format", g.CMD_RESOURCE_CREATE_2D, "IIII", 2, 5, 64, 64)
    do("create_huge", g.CMD_RESOURCE_CREATE_2D, "IIII", 3, 1, 0xFFFFFFFF, 0xFFFFFFFF)
    do("attach_unknown", g.CMD_RESOURCE_ATTACH_BACKING, "II", 9, 1,
       extra=g.MEM_ENTRY.pack(backing, 4096))
    do("create_4", g.CMD_RESOURCE_CREATE_2D, "IIII", 4, 1, 16, 16)
    do("attach_outside_ram", g.CMD_RESOURCE_ATTACH_BACKING, "II", 4, 1,
       extra=g.MEM_ENTRY.pack(1 << 40, 4096))
    do("create_5", g.CMD_RESOURCE_CREATE_2D, "IIII", 5, 1, 16, 16)
    do("transfer_no_backing", g.CMD_TRANSFER_TO_HOST_2D, "IIIIQI4x", 0, 0, 16, 16, 0, 5)
    do("scanout_no_backing", g.CMD_SET_SCANOUT, "IIIIII", 0, 0, 16, 16, 0, 5)
    do("flush_no_backing", g.CMD_RESOURCE_FLUSH, "IIIII4x", 0, 0, 16, 16, 5)
    do("attach", g.CMD_RESOURCE_ATTACH_BACKING, "II", 1, 1,
       extra=g.MEM_ENTRY.pack(backing, 64 * 64 * 4))
    do("transfer", g.CMD_TRANSFER_TO_HOST_2D, "IIIIQI4x", 0, 0, 64, 64, 0, 1)
    do("transfer_outside", g.CMD_TRANSFER_TO_HOST_2D, "IIIIQI4x", 32, 32, 64, 64, 0, 1)
    do("transfer_unknown", g.CMD_TRANSFER_TO_HOST_2D, "IIIIQI4x", 0, 0, 8, 8, 0, 7)
    do("scanout", g.CMD_SET_SCANOUT, "IIIIII", 0, 0, 64, 64, 0, 1)
    do("scanout_bad_id", g.CMD_SET_SCANOUT, "IIIIII", 0, 0, 64, 64, 5, 1)
    do("scanout_outside", g.CMD_SET_SCANOUT, "IIIIII", 0, 0, 128, 64, 0, 1)
    do("flush", g.CMD_RESOURCE_FLUSH, "IIIII4x", 0, 0, 64, 64, 1)
    do("flush_unknown", g.CMD_RESOURCE_FLUSH, "IIIII4x", 0, 0, 64, 64, 7)
    do("detach", g.CMD_RESOURCE_DETACH_BACKING, "I4x", 1)
    do("detach_again", g.CMD_RESOURCE_DETACH_BACKING, "I4x", 1)
    do("unref", g.CMD_RESOURCE_UNREF, "I4x", 1)
    do("unref_again", g.CMD_RESOURCE_UNREF, "I4x", 1)
    do("unknown_command", 0x0199)
    do("create_blob", 0x010C)                                 # no blob feature
    do("set_scanout_blob", 0x010D)
    do("create_width_0", g.CMD_RESOURCE_CREATE_2D, "IIII", 10, 1, 0, 16)
    do("create_height_0", g.CMD_RESOURCE_CREATE_2D, "IIII", 11, 1, 16, 0)
    do("create_12", g.CMD_RESOURCE_CREATE_2D, "IIII", 12, 1, 16, 16)
    do("attach_no_entries", g.CMD_RESOURCE_ATTACH_BACKING, "II", 12, 0)
    do("scanout_after_no_entries", g.CMD_SET_SCANOUT, "IIIIII", 0, 0, 16, 16, 0, 12)
    do("transfer_after_no_entries", g.CMD_TRANSFER_TO_HOST_2D, "IIIIQI4x", 0, 0, 16, 16, 0, 12)
    do("detach_after_no_entries", g.CMD_RESOURCE_DETACH_BACKING, "I4x", 12)
    do("attach_empty_entry", g.CMD_RESOURCE_ATTACH_BACKING, "II", 12, 1,
       extra=g.MEM_ENTRY.pack(backing, 0))
    do("attach_with_an_empty_entry", g.CMD_RESOURCE_ATTACH_BACKING, "II", 12, 2,
       extra=g.MEM_ENTRY.pack(backing, 1024) + g.MEM_ENTRY.pack(backing + 4096, 0))
    do("attach_after_no_entries", g.CMD_RESOURCE_ATTACH_BACKING, "II", 12, 1,
       extra=g.MEM_ENTRY.pack(backing, 1024))
    o["config"] = [d.read_config(offset) for offset in range(0, 16, 4)]
    return o


# key: (QEMU's, ours)
GPU_DIFFERENCES = {
    # A backing entry outside the RAM: QEMU maps it through a bounce buffer
    # (address_space_map of unassigned memory) and accepts it; we never map outside the VM.
    "attach_outside_ram": ((g.RESP_OK_NODATA, 24, b""), (g.RESP_ERR_UNSPEC, 24, b"")),
}


def test_gpu_matches_qemu_virtio_gpu(qemu):  # noqa: F811
    theirs = gpu_requests(qemu_driver(qemu("-device", "virtio-gpu-device,xres=1280,yres=800")))
    mine = ours(GpuDevice(width=1280, height=800), gpu_requests)
    assert theirs["display_info"][0] == g.RESP_OK_DISPLAY_INFO
    assert theirs["create"][0] == g.RESP_OK_NODATA
    for key in theirs:
        expected = GPU_DIFFERENCES.get(key, (theirs[key], theirs[key]))
        assert (theirs[key], mine[key]) == expected, key


# -- 9p: version, attach, walk, the errors of a bad fid ------------------------------------------

def p9_requests(d, _bench=None):
    q, = d.init([0], buf_size=8192, size=16)
    o, tag = {}, [0]

    def rpc(name, kind, body=b"", room=8192):
        tag[0] += 1
        message = struct.pack("<IBH", 7 + len(body), kind, tag[0]) + body
        q.post(readable=[message], writable=[room])
        q.notify()
        [used] = wait_used(q)
        size, rkind, rtag = struct.unpack_from("<IBH", used.data)
        o[name] = (rkind, rtag == tag[0], size == used.length, used.data[7:used.length]
                   if name not in ATTR_REPLIES else None)

    def s(text):
        return struct.pack("<H", len(text)) + text.encode()
    rpc("version", p9fs.TVERSION, struct.pack("<I", 8192) + s("9P2000.L"))
    rpc("version_unknown", p9fs.TVERSION, struct.pack("<I", 8192) + s("9P2000.x"))
    rpc("version", p9fs.TVERSION, struct.pack("<I", 8192) + s("9P2000.L"))
    rpc("attach", p9fs.TATTACH, struct.pack("<II", 1, 0xFFFFFFFF) + s("") + s("")
        + struct.pack("<I", 0))
    rpc("walk_missing", p9fs.TWALK, struct.pack("<IIH", 1, 2, 1) + s("missing"))
    rpc("walk_dotdot", p9fs.TWALK, struct.pack("<IIH", 1, 3, 1) + s(".."))
    rpc("getattr_bad_fid", p9fs.TGETATTR, struct.pack("<IQ", 77, 0x7FF))
    rpc("clunk_bad_fid", p9fs.TCLUNK, struct.pack("<I", 77))
    rpc("unknown_type", 250)
    o["config"] = [d.read_config(offset, 1) for offset in range(0, 8)]
    return o


ATTR_REPLIES = ("attach", "walk_dotdot")      # qids hold inode numbers: compared by type
# key: (QEMU's, ours). A fid the client never made: QEMU answers ENOENT, we EBADF (9P2000.L
# names no errno for it; EBADF is POSIX's for a descriptor that is not open).
P9_DIFFERENCES = {
    "getattr_bad_fid": ((p9fs.TLERROR + 1, True, True, struct.pack("<I", 2)),
                        (p9fs.TLERROR + 1, True, True, struct.pack("<I", 9))),
    "clunk_bad_fid": ((p9fs.TLERROR + 1, True, True, struct.pack("<I", 2)),
                      (p9fs.TLERROR + 1, True, True, struct.pack("<I", 9))),
}


def test_9p_matches_qemu_virtio_9p(qemu, tmp_path):  # noqa: F811
    (tmp_path / "theirs").mkdir()
    (tmp_path / "mine").mkdir()
    q = qemu("-fsdev", f"local,id=f0,path={qemu_value(tmp_path / 'theirs')},security_model=none",
             "-device", "virtio-9p-device,fsdev=f0,mount_tag=share")
    theirs = p9_requests(qemu_driver(q))
    mine = ours(P9Device(tmp_path / "mine", tag="share"), p9_requests)
    assert theirs["version"][0] == p9fs.TVERSION + 1
    assert theirs["attach"][0] == p9fs.TATTACH + 1
    for key in theirs:
        assert (theirs[key], mine[key]) == P9_DIFFERENCES.get(key, (theirs[key], theirs[key])), key


# -- balloon: the host's target, the guest's actual, the configuration interrupt -----------------

def balloon_observations(d, set_target):
    """``set_target(pages)`` asks for ``pages`` pages in the balloon."""
    o = {}
    d.init([0, 1, 2], size=16)
    generation = d.read(c.REG_CONFIG_GENERATION)
    o["interrupt_before"] = d.interrupt_status()
    set_target(256)
    deadline = time.monotonic() + 5
    while not d.interrupt_status() & c.INT_CONFIG_CHANGE and time.monotonic() < deadline:
        time.sleep(0.005)
    o["interrupt_after_target"] = d.interrupt_status()
    o["num_pages"] = d.read_config(0)
    o["generation_changed"] = d.read(c.REG_CONFIG_GENERATION) != generation
    d.ack_interrupt()
    o["interrupt_after_ack"] = d.interrupt_status()
    d.write_config(4, 256)
    o["actual"] = d.read_config(4)
    d.write_config(0, 5)                    # num_pages is the device's
    o["num_pages_after_driver_write"] = d.read_config(0)
    return o


def test_balloon_matches_qemu_virtio_balloon(tmp_path):
    from test_qemu_differential import wfi_elf
    from avatar_hw.testing.qtest import QTest, require_qemu
    require_qemu()
    elf = tmp_path / "wfi.elf"
    elf.write_bytes(wfi_elf())
    with QTest(["-cpu", "cortex-a57", "-m", "128M", "-kernel", str(elf),
                "-global", "virtio-mmio.force-legacy=false",
                "-device", "virtio-balloon-device"], stopped=False, qmp=True) as q:
        theirs = balloon_observations(qemu_driver(q), lambda pages: q.qmp(
            "balloon", value=(128 << 20) - pages * 4096))
    mine = ours(BalloonDevice(), lambda d, bench: balloon_observations(
        d, lambda pages: bench.device.set_target(bench.memory.size - pages * 4096)),
        ram_size=4 << 20)
    assert theirs["num_pages"] == 256 and theirs["interrupt_after_target"] & 2
    # QEMU's virtio_notify_config sets InterruptStatus 0x3; 4.2.2 gives bit 0 to used
    # buffers only, bit 1 to a configuration change: ours sets bit 1
    assert (theirs.pop("interrupt_after_target"), mine.pop("interrupt_after_target")) == (3, 2)
    assert theirs == mine


# -- net: identity, a transmitted frame ----------------------------------------------------------

def net_observations(d, _bench=None):
    o = {"mac": bytes(d.read_config(i, 1) for i in range(6)), "status": d.read_config(6, 2)}
    rx, tx = d.init([0, 1], size=16, buf_size=2048)
    frame = b"\xff" * 6 + bytes.fromhex("525400123456") + b"\x08\x06" + bytes(46)
    tx.post(readable=[bytes(net.HEADER_LEN) + frame])
    tx.notify()
    o["tx_used"] = [(u.head, u.length) for u in wait_used(tx)]
    o["tx_interrupt"] = d.interrupt_status() & c.INT_USED_BUFFER
    return o


def test_net_matches_qemu_virtio_net(qemu, tmp_path):  # noqa: F811
    q = qemu("-netdev", "user,id=n0,restrict=on",
             "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56")
    theirs = net_observations(qemu_driver(q))
    mine = ours(NetDevice(f"switch:{tmp_path / 'switch.sock'}", mac="52:54:00:12:34:56"),
                net_observations)
    assert theirs["tx_used"] == [(0, 0)] and theirs["status"] == 1
    assert theirs == mine
