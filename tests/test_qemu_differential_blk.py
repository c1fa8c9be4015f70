"""Differential tests: QEMU's virtio-blk-device and virtio-rng-device (through qtest) against
our block and rng devices, the same driver-side sequence on both (helpers from
test_qemu_differential). Spec-allowed differences are in ``DIFFERENCES`` with both values."""

import hashlib

import pytest

from avatar_hw.devices import block as blk
from avatar_hw.devices.block import BlockDevice
from avatar_hw.devices.rng import RngDevice
from avatar_hw.emulated.machine import qemu_value
from avatar_hw.errors import ConfigError
from avatar_hw.testing.qtest import QTestError
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.constants import bit
from test_qemu_differential import (FIRST_TRANSPORT, qemu, qemu_driver,  # noqa: F401 (fixture)
                                    wait_used)

pytestmark = pytest.mark.qemu

SECTORS = 2048
PATTERN = bytes((i * 13 + (i >> 9)) % 256 for i in range(SECTORS * 512))
SERIAL = "diff-serial"
# Features both sides may offer; the rest (QEMU's GEOMETRY, TOPOLOGY, CONFIG_WCE, ...) differ
# by choice.
COMPARED_FEATURES = (bit(blk.F_SEG_MAX) | bit(blk.F_RO) | bit(blk.F_BLK_SIZE) | bit(blk.F_FLUSH)
                     | bit(blk.F_DISCARD) | bit(blk.F_WRITE_ZEROES))


def requests(d, poll=None):
    """One request of each kind, good and bad: {name: (status, used length, data)}."""
    q, = d.init([0], size=16, buf_size=4096)
    o = {}

    def do(name, kind, sector=0, data=(), read=0, segments=None):
        readable = [blk.HEADER.pack(kind, 0, sector), *data]
        if segments is not None:
            readable.append(b"".join(blk.SEGMENT.pack(*s) for s in segments))
        q.post(readable=readable, writable=[*([read] if read else []), 1])
        q.notify()
        [used] = wait_used(q, poll=poll)
        status_gpa, _, _ = used.segments[-1]
        payload = d.ram.read(used.segments[-2][0], read) if read else b""
        o[name] = (d.ram.read(status_gpa, 1)[0], used.length, payload)

    do("read", blk.T_IN, sector=5, read=4096)
    do("write", blk.T_OUT, sector=40, data=[bytes(range(256)) * 16])
    do("read_back", blk.T_IN, sector=40, read=4096)
    do("flush", blk.T_FLUSH)
    do("get_id", blk.T_GET_ID, read=20)
    do("get_id_512_bytes", blk.T_GET_ID, read=512)
    do("read_past_capacity", blk.T_IN, sector=SECTORS - 4, read=4096)
    do("read_starting_past_capacity", blk.T_IN, sector=SECTORS, read=512)
    do("write_past_capacity", blk.T_OUT, sector=SECTORS, data=[bytes(512)])
    do("unknown_type", 0x63)
    do("write_zeroes", blk.T_WRITE_ZEROES, segments=[(40, 2, 0)])
    do("read_zeroed", blk.T_IN, sector=40, read=1024)
    do("write_zeroes_reserved_flag", blk.T_WRITE_ZEROES, segments=[(40, 2, 2)])
    do("discard_with_unmap", blk.T_DISCARD, segments=[(40, 8, blk.DWZ_F_UNMAP)])
    do("discard_past_capacity", blk.T_DISCARD, segments=[(SECTORS, 8, 0)])
    o["interrupt"] = d.interrupt_status() & c.INT_USED_BUFFER
    return o


def observations(d, poll=None):
    o = {"device_id": d.read(c.REG_DEVICE_ID)}
    o["features"] = d.device_features() & COMPARED_FEATURES
    o["capacity"] = d.read_config(0) | d.read_config(4) << 32
    o["blk_size"] = d.read_config(20)
    o["seg_max"] = d.read_config(12)
    o["write_zeroes_may_unmap"] = d.read_config(56, 1)
    o["max_discard_seg"] = d.read_config(40)
    o.update(requests(d, poll))
    return o


# key: (QEMU's value, ours)
DIFFERENCES = {
    # QEMU's seg_max is its queue size - 2 (its default queue size 256); so is ours. QEMU
    # advertises discard one segment at a time; we take up to 16.
    "max_discard_seg": (1, blk.MAX_DWZ_SEGMENTS),
}


def ours(device, observe):
    """``observe(driver)`` on our ``device`` in a VM with guarded RAM; what it returned."""
    bench = VirtioBench(device, ram_size=1 << 20)
    try:
        return observe(bench.driver)
    finally:
        bench.subsystem.close()
        bench.check_guards()


def test_block_matches_qemu_virtio_blk(qemu, tmp_path):
    theirs_image = tmp_path / "theirs.img"
    ours_image = tmp_path / "ours.img"
    theirs_image.write_bytes(PATTERN)
    ours_image.write_bytes(PATTERN)
    q = qemu("-drive", f"file={qemu_value(theirs_image)},if=none,format=raw,id=d0,discard=unmap",
             "-device", f"virtio-blk-device,drive=d0,serial={SERIAL}")
    theirs = observations(qemu_driver(q))
    # Used lengths are QEMU's: every device-writable byte, also of a failed read or a GET_ID
    # buffer longer than the serial. QEMU leaves the data area as it was (zeros here: fresh
    # RAM on both sides); ours zeroes it, so that length counts only bytes written.
    mine = ours(BlockDevice(ours_image, serial=SERIAL), observations)
    assert theirs["read"] == (blk.S_OK, 4097, PATTERN[5 * 512:5 * 512 + 4096])
    assert theirs["read_zeroed"] == (blk.S_OK, 1025, bytes(1024))
    assert theirs["get_id"][2] == SERIAL.encode().ljust(20, b"\0")
    assert theirs["get_id_512_bytes"] == (blk.S_OK, 513, SERIAL.encode().ljust(512, b"\0"))
    assert theirs["read_past_capacity"] == (blk.S_IOERR, 4097, bytes(4096))
    for key in theirs:
        if key in DIFFERENCES:
            assert (theirs[key], mine[key]) == DIFFERENCES[key], key
        else:
            assert theirs[key] == mine[key], (key, theirs[key], mine[key])
    assert (hashlib.sha256(theirs_image.read_bytes()).digest()
            == hashlib.sha256(ours_image.read_bytes()).digest())


def test_read_only_block_matches_qemu(qemu, tmp_path):
    image = tmp_path / "ro.img"
    image.write_bytes(PATTERN)
    q = qemu("-drive", f"file={qemu_value(image)},if=none,format=raw,id=d0,readonly=on",
             "-device", "virtio-blk-device,drive=d0")

    def ro(d):
        q_, = d.init([0], size=8, buf_size=1024)
        q_.post(readable=[blk.HEADER.pack(blk.T_OUT, 0, 0), bytes(512)], writable=[1])
        q_.notify()
        [used] = wait_used(q_)
        return (bool(d.device_features() & bit(blk.F_RO)),
                d.ram.read(used.segments[-1][0], 1)[0], used.length)
    theirs = ro(qemu_driver(q))
    assert theirs == ours(BlockDevice(image, readonly=True), ro) == (True, blk.S_IOERR, 1)
    assert image.read_bytes() == PATTERN


@pytest.mark.parametrize("ours_ro, theirs_ro", [(False, False), (False, True), (True, False),
                                                (True, True)])
def test_image_lock_keeps_qemu_and_ours_off_each_others_image(qemu, tmp_path, ours_ro,
                                                              theirs_ro):
    """Either order, as two QEMUs: only two readers share an image."""
    image = tmp_path / "shared.img"
    image.write_bytes(bytes(SECTORS * 512))
    drive = ("-drive", f"file={qemu_value(image)},if=none,format=raw,id=d0"
             + (",readonly=on" if theirs_ro else ""), "-device", "virtio-blk-device,drive=d0")
    both_read = ours_ro and theirs_ro
    q = qemu(*drive)
    assert q.readl(FIRST_TRANSPORT + c.REG_DEVICE_ID) == c.ID_BLOCK
    if both_read:
        BlockDevice(image, readonly=True).detach()
    else:
        with pytest.raises(ConfigError) as refused:
            BlockDevice(image, readonly=ours_ro)
        assert str(refused.value) == (f"{image}: in use by another process (locked): stop it "
                                      "or give another image")
    q.close()
    device = BlockDevice(image, readonly=ours_ro)
    try:
        if both_read:
            assert qemu(*drive).readl(FIRST_TRANSPORT + c.REG_DEVICE_ID) == c.ID_BLOCK
        else:
            with pytest.raises(QTestError, match='Failed to get (shared )?"write" lock'):
                qemu(*drive).readl(FIRST_TRANSPORT + c.REG_DEVICE_ID)
    finally:
        device.detach()


def rng_observations(d):
    o = {"device_id": d.read(c.REG_DEVICE_ID), "features": d.device_features() & 0xFFFFFF}
    q, = d.init([0], size=8, buf_size=4096)
    for name, sizes in (("one", [64]), ("two_segments", [32, 32]), ("odd", [1000])):
        q.post(writable=sizes)
        q.notify()
        used = wait_used(q)
        o[name] = [u.length for u in used]
        o[name + "_varied"] = len(set(used[0].data)) > 8
    o["interrupt"] = d.interrupt_status() & c.INT_USED_BUFFER
    return o


def test_rng_matches_qemu_virtio_rng(qemu):
    theirs = rng_observations(qemu_driver(qemu("-device", "virtio-rng-device")))
    assert theirs["one"] == [64] and theirs["odd"] == [1000]
    assert theirs == ours(RngDevice(), rng_observations)
