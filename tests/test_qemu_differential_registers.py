"""Register-level differential: every register of the virtio-mmio layout, in the modern
(Version 2) and legacy (Version 1) transport, against QEMU's virtio-mmio (through qtest), and
the configuration space of every device QEMU also has at every offset and width.

``register_sweep`` reads every offset below 0x100 at every width (8 to 64 bits, aligned
or not), writes read-only registers and reads write-only ones, selects feature windows
and queues out of range, sets QueueNum above QueueNumMax, toggles QueueReady, writes the
status in wrong orders, resets, and reads the SHM registers (0xac..0xbc) and
ConfigGeneration. Every key is compared; the accepted differences are in ``DIFFERENCES``
with both values, each one listed with its reason in docs/devices.md ("Register-level
differences from QEMU"). Device-specific values (features, QueueNumMax, the vendor) are
compared by ``device_facts``.
"""

import os
import re

import pytest

from avatar_hw.devices.balloon import BalloonDevice
from avatar_hw.devices.block import BlockDevice
from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.devices.gpu import GpuDevice
from avatar_hw.devices.net import NetDevice
from avatar_hw.devices.p9 import P9Device
from avatar_hw.devices.rng import RngDevice
from avatar_hw.devices.vsock import VsockDevice
from avatar_hw.emulated.machine import qemu_value
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.transport import pieces
from test_qemu_differential import RngShaped, qemu, qemu_driver, wait_used  # noqa: F401

pytestmark = pytest.mark.qemu

_S = c.STATUS_ACKNOWLEDGE, c.STATUS_DRIVER, c.STATUS_FEATURES_OK, c.STATUS_DRIVER_OK
ACK, DRIVER, FEATURES_OK, DRIVER_OK = _S
STATUS_SEQUENCES = ([DRIVER_OK], [FEATURES_OK], [DRIVER], [ACK, DRIVER_OK],
                    [ACK, DRIVER, DRIVER_OK], [ACK, DRIVER, FEATURES_OK, DRIVER_OK],
                    [c.STATUS_FAILED], [ACK, c.STATUS_DEVICE_NEEDS_RESET], [0xFF],
                    [ACK, DRIVER, FEATURES_OK, c.STATUS_FAILED])
READ_ONLY = (c.REG_MAGIC_VALUE, c.REG_VERSION, c.REG_DEVICE_ID, c.REG_VENDOR_ID,
             c.REG_DEVICE_FEATURES, c.REG_QUEUE_NUM_MAX, c.REG_INTERRUPT_STATUS,
             c.REG_SHM_LEN_LOW, c.REG_SHM_LEN_HIGH, c.REG_SHM_BASE_LOW, c.REG_SHM_BASE_HIGH,
             c.REG_CONFIG_GENERATION)
WRITE_ONLY = (c.REG_DEVICE_FEATURES_SEL, c.REG_DRIVER_FEATURES, c.REG_DRIVER_FEATURES_SEL,
              c.REG_QUEUE_SEL, c.REG_QUEUE_NUM, c.REG_QUEUE_NOTIFY, c.REG_INTERRUPT_ACK,
              c.REG_QUEUE_DESC_LOW, c.REG_QUEUE_DESC_HIGH, c.REG_QUEUE_DRIVER_LOW,
              c.REG_QUEUE_DRIVER_HIGH, c.REG_QUEUE_DEVICE_LOW, c.REG_QUEUE_DEVICE_HIGH,
              c.REG_SHM_SEL)
QUEUE_SELECTIONS = (0, 1, 2, 7, 8, 1023, 1024, 0xFFFF, 0xFFFFFFFF)
# every width at every offset below the configuration (QEMU's pieces: 2 + 4 + 2 bytes for an
# 8-byte read at 0x6e)
ACCESSES = [(offset, size) for offset in range(c.REG_CONFIG) for size in (1, 2, 4, 8)
            if offset + size <= c.REG_CONFIG]


def all_registers(o, d, label):
    for offset in range(0, c.REG_CONFIG, 4):
        o[f"{label} r32@{offset:#x}"] = d.read(offset)


def accept_all_features(d):
    for sel in (0, 1):
        d.write(c.REG_DEVICE_FEATURES_SEL, sel)
        d.write(c.REG_DRIVER_FEATURES_SEL, sel)
        d.write(c.REG_DRIVER_FEATURES, d.read(c.REG_DEVICE_FEATURES))


def program_rings(d, size):
    base = d.ram.alloc(0x10000, 4096)
    d.write(c.REG_QUEUE_NUM, size)
    for reg, addr in ((c.REG_QUEUE_DESC_LOW, base), (c.REG_QUEUE_DRIVER_LOW, base + 0x8000),
                      (c.REG_QUEUE_DEVICE_LOW, base + 0xC000)):
        d.write(reg, addr & 0xFFFFFFFF)
        d.write(reg + 4, addr >> 32)


def register_sweep(d, legacy):
    """{key: value read} for one driver-side sequence of register accesses."""
    o = {}
    all_registers(o, d, "initial")
    for offset, size in ACCESSES:
        o[f"r{8 * size}@{offset:#x}"] = d.read(offset, size)
    for size in (1, 2):
        d.write(c.REG_STATUS, ACK, size)
        o[f"status after a {8 * size}-bit write"] = d.read(c.REG_STATUS)
    d.write(c.REG_STATUS, ACK << 32, 8)          # 0x6c, then Status
    o["status after a 64-bit write at 0x6c"] = d.read(c.REG_STATUS)
    d.write(c.REG_STATUS, 0)
    d.write(0x6e, ACK << 16, 8)                  # 2 bytes at 0x6e, Status, 2 at 0x74
    o["status after a 64-bit write at 0x6e"] = d.read(c.REG_STATUS)
    d.write(c.REG_STATUS, 0)
    for offset in READ_ONLY:
        d.write(offset, 0xFFFFFFFF)
    all_registers(o, d, "after writes to read-only registers")
    for offset in WRITE_ONLY:
        d.write(offset, 3)
        o[f"write-only {offset:#x} read back"] = d.read(offset)
    d.write(c.REG_QUEUE_SEL, 0)
    for sel in (0, 1, 2, 3, 0xFFFFFFFF):
        d.write(c.REG_DEVICE_FEATURES_SEL, sel)
        o[f"device features, window {sel:#x}"] = d.read(c.REG_DEVICE_FEATURES)
    d.write(c.REG_DEVICE_FEATURES_SEL, 0)
    for sel in QUEUE_SELECTIONS:
        d.write(c.REG_QUEUE_SEL, sel)
        o[f"queue {sel:#x} QueueNumMax"] = d.read(c.REG_QUEUE_NUM_MAX)
        o[f"queue {sel:#x} QueueReady"] = d.read(c.REG_QUEUE_READY)
        o[f"queue {sel:#x} QueuePFN"] = d.read(c.REG_QUEUE_PFN)
    d.write(c.REG_QUEUE_SEL, 0)
    for sequence in STATUS_SEQUENCES:
        d.write(c.REG_STATUS, 0)
        for value in sequence:
            d.write(c.REG_STATUS, value if value == 0xFF else value | d.read(c.REG_STATUS))
        o[f"status after {[hex(v) for v in sequence]}"] = d.read(c.REG_STATUS)
    d.write(c.REG_STATUS, 0)
    # driver features: windows 2 and 3 do not exist
    d.write(c.REG_STATUS, ACK)
    d.write(c.REG_STATUS, ACK | DRIVER)
    for sel in (2, 3):
        d.write(c.REG_DRIVER_FEATURES_SEL, sel)
        d.write(c.REG_DRIVER_FEATURES, 1)
    accept_all_features(d)
    d.write(c.REG_STATUS, ACK | DRIVER | FEATURES_OK)
    o["status: FEATURES_OK after writes to driver feature windows 2, 3"] = d.read(c.REG_STATUS)
    (legacy_queue_sweep if legacy else modern_queue_sweep)(o, d)
    d.write(c.REG_STATUS, 0)
    all_registers(o, d, "after reset")
    selectors_across_reset(o, d)
    for sel in (0, 1, 0xFF):
        d.write(c.REG_SHM_SEL, sel)
        for offset in range(c.REG_SHM_LEN_LOW, c.REG_SHM_BASE_HIGH + 4, 4):
            o[f"shm {sel:#x} r32@{offset:#x}"] = d.read(offset)
    return o


def selectors_across_reset(o, d):
    """DeviceFeaturesSel and DriverFeaturesSel 1 set before a reset, used after it."""
    d.write(c.REG_DEVICE_FEATURES_SEL, 1)
    d.write(c.REG_DRIVER_FEATURES_SEL, 1)
    word1 = d.read(c.REG_DEVICE_FEATURES)
    d.write(c.REG_STATUS, 0)
    o["a reset keeps DeviceFeaturesSel"] = d.read(c.REG_DEVICE_FEATURES) == word1
    d.write(c.REG_STATUS, ACK)
    d.write(c.REG_STATUS, ACK | DRIVER)
    d.write(c.REG_DRIVER_FEATURES, 1)            # VERSION_1 if DriverFeaturesSel is still 1
    d.write(c.REG_STATUS, ACK | DRIVER | FEATURES_OK)
    o["a reset keeps DriverFeaturesSel: status after FEATURES_OK"] = d.read(c.REG_STATUS)
    d.write(c.REG_STATUS, 0)
    d.write(c.REG_DEVICE_FEATURES_SEL, 0)
    d.write(c.REG_DRIVER_FEATURES_SEL, 0)


def modern_queue_sweep(o, d):
    """QueueNum above QueueNumMax, 0 and not a power of two; QueueReady toggles."""
    d.write(c.REG_QUEUE_SEL, 0)
    maximum = d.read(c.REG_QUEUE_NUM_MAX)
    for label, size in (("above QueueNumMax", maximum + 1), ("3", 3), ("0", 0)):
        program_rings(d, size)
        d.write(c.REG_QUEUE_READY, 1)
        o[f"QueueNum {label}: QueueReady"] = d.read(c.REG_QUEUE_READY)
        o[f"QueueNum {label}: status"] = d.read(c.REG_STATUS)
        d.write(c.REG_QUEUE_READY, 0)
    d.write(c.REG_STATUS, 0)
    d.write(c.REG_STATUS, ACK)
    d.write(c.REG_STATUS, ACK | DRIVER)
    accept_all_features(d)
    d.write(c.REG_STATUS, ACK | DRIVER | FEATURES_OK)
    d.write(c.REG_QUEUE_SEL, 0)
    program_rings(d, 8)
    for step, value in enumerate((1, 0, 1, 2)):
        d.write(c.REG_QUEUE_READY, value)
        o[f"QueueReady toggle {step}: wrote {value}, reads"] = d.read(c.REG_QUEUE_READY)
    d.write(c.REG_QUEUE_READY, 1)
    d.write(c.REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    o["status after DRIVER_OK"] = d.read(c.REG_STATUS)
    o["ConfigGeneration after DRIVER_OK"] = d.read(c.REG_CONFIG_GENERATION)
    d.write(c.REG_QUEUE_READY, 0)
    o["QueueReady 0 after DRIVER_OK"] = d.read(c.REG_QUEUE_READY)
    d.write(c.REG_QUEUE_READY, 1)
    o["QueueReady 1 again after DRIVER_OK"] = d.read(c.REG_QUEUE_READY)
    d.write(c.REG_STATUS, ACK | DRIVER | DRIVER_OK)
    o["status after clearing FEATURES_OK"] = d.read(c.REG_STATUS)
    all_registers(o, d, "running")
    d.write(c.REG_STATUS, 0)                  # a reset; the queue is not programmed again
    for status in (ACK, ACK | DRIVER):
        d.write(c.REG_STATUS, status)
    accept_all_features(d)
    d.write(c.REG_STATUS, ACK | DRIVER | FEATURES_OK)
    d.write(c.REG_QUEUE_SEL, 0)
    d.write(c.REG_QUEUE_READY, 1)
    o["QueueReady 1 after a reset, the queue not programmed again"] = d.read(c.REG_QUEUE_READY)
    o["status after QueueReady 1 of a queue not programmed again"] = d.read(c.REG_STATUS)
    d.write(c.REG_QUEUE_SEL, 7)               # a queue no device of the sweep has
    d.write(c.REG_QUEUE_READY, 1)
    o["QueueReady 1 of a queue the device does not have"] = d.read(c.REG_QUEUE_READY)
    d.write(c.REG_QUEUE_SEL, 0)


def legacy_queue_sweep(o, d):
    """GuestPageSize, QueueAlign, QueuePFN: set, read back, bad page size, PFN 0, QueueNum
    above QueueNumMax."""
    d.write(c.REG_STATUS, 0)
    d.write(c.REG_STATUS, ACK | DRIVER)
    d.write(c.REG_GUEST_PAGE_SIZE, 4096)
    d.write(c.REG_QUEUE_SEL, 0)
    d.write(c.REG_QUEUE_NUM, 8)
    d.write(c.REG_QUEUE_ALIGN, 4096)
    base = d.ram.alloc(0x4000, 4096)
    d.write(c.REG_QUEUE_PFN, base >> 12)
    o["QueuePFN reads the page written"] = d.read(c.REG_QUEUE_PFN) == base >> 12
    d.write(c.REG_GUEST_PAGE_SIZE, 8192)
    o["QueuePFN in 8 KiB pages"] = d.read(c.REG_QUEUE_PFN) == base >> 13
    d.write(c.REG_GUEST_PAGE_SIZE, 3)
    o["QueuePFN after GuestPageSize 3"] = d.read(c.REG_QUEUE_PFN) == base >> 13
    d.write(c.REG_GUEST_PAGE_SIZE, 4096)
    d.write(c.REG_STATUS, ACK | DRIVER | DRIVER_OK)
    o["status after DRIVER_OK"] = d.read(c.REG_STATUS)
    d.write(c.REG_QUEUE_PFN, 0)
    o["status after QueuePFN 0"] = d.read(c.REG_STATUS)
    o["QueuePFN after QueuePFN 0"] = d.read(c.REG_QUEUE_PFN)
    d.write(c.REG_STATUS, 0)
    d.write(c.REG_STATUS, ACK | DRIVER)
    d.write(c.REG_QUEUE_NUM, 1 << 16)
    d.write(c.REG_QUEUE_PFN, base >> 12)
    o["QueueNum above QueueNumMax: QueuePFN"] = d.read(c.REG_QUEUE_PFN) == base >> 12
    o["QueueNum above QueueNumMax: status"] = d.read(c.REG_STATUS)


# Keys whose values are the device's (features, queue sizes, vendor): device_facts.
DEVICE_REGISTERS = (c.REG_VENDOR_ID, c.REG_DEVICE_FEATURES, c.REG_QUEUE_NUM_MAX)
ACCESS = re.compile(r"r(\d+)@(0x[0-9a-f]+)$")


def device_specific(key):
    access = ACCESS.search(key)
    if access:                # a read with a 32-bit piece at one of DEVICE_REGISTERS
        return any(n == 4 and at in DEVICE_REGISTERS
                   for at, n, _ in pieces(int(access[2], 16), int(access[1]) // 8))
    return (key.endswith("QueueNumMax") or key.startswith("device features")
            or (key.startswith("queue ") and key.endswith("QueuePFN")))


# key: (QEMU's value, ours). docs/devices.md, "Register-level differences from QEMU", gives
# the spec's word on each.
def legacy_shm_len(offset, size):
    """QEMU's Version 1 answer to a read covering 0xb0/0xb4 (SHMLenLow/High in Version 2):
    all ones in those 32-bit pieces, 0 elsewhere."""
    return sum(0xFFFFFFFF << shift for at, n, shift in pieces(offset, size)
               if n == 4 and at in (c.REG_SHM_LEN_LOW, c.REG_SHM_LEN_HIGH))


_STATUS_ORDER = {
    "status after ['0x4']": (0x04, 0),
    "status after ['0x8']": (0x08, 0),
    "status after ['0x2']": (0x02, 0),
    "status after ['0x1', '0x4']": (0x05, 0x01),
    "status after ['0x1', '0x40']": (0x41, 0x01),
}
DIFFERENCES = {
    **_STATUS_ORDER,
    "status after ['0x1', '0x2', '0x4']": (0x07, 0x03),
    # the driver accepted no feature: no VERSION_1
    "status after ['0x1', '0x2', '0x8', '0x4']": (0x0F, 0x03),
    "status after ['0xff']": (0xFF, 0x03),
    "status after ['0x1', '0x2', '0x8', '0x80']": (0x8B, 0x83),
    "QueueNum above QueueNumMax: QueueReady": (1, 0),
    "QueueNum above QueueNumMax: status": (0x0B, 0x4B),
    "QueueNum 3: QueueReady": (1, 0),
    "QueueNum 3: status": (0x0B, 0x4B),
    "QueueNum 0: QueueReady": (1, 0),
    "QueueNum 0: status": (0x0B, 0x4B),
    "QueueReady toggle 3: wrote 2, reads": (1, 0),
    "QueueReady 1 again after DRIVER_OK": (1, 0),
    # a reset clears the queue's QueueNum and addresses here, QEMU keeps them
    "QueueReady 1 after a reset, the queue not programmed again": (1, 0),
    "status after QueueReady 1 of a queue not programmed again": (0x0B, 0x4B),
    "QueueReady 1 of a queue the device does not have": (1, 0),
    "status after clearing FEATURES_OK": (0x07, 0x0F),
    "running r32@0x44": (1, 0),
    "running r32@0x70": (0x07, 0x0F),
}
LEGACY_DIFFERENCES = {
    **_STATUS_ORDER,
    "status after ['0xff']": (0xFF, 0x8F),
    "QueuePFN after GuestPageSize 3": (False, True),
    "status after QueuePFN 0": (0, 0x07),
    "QueueNum above QueueNumMax: QueuePFN": (True, False),
    "QueueNum above QueueNumMax: status": (0x03, 0x43),
    **{f"{label} r32@{offset:#x}": (0xFFFFFFFF, 0)
       for label in ("initial", "after writes to read-only registers", "after reset",
                     *(f"shm {sel:#x}" for sel in (0, 1, 0xFF)))
       for offset in (c.REG_SHM_LEN_LOW, c.REG_SHM_LEN_HIGH)},
    **{f"r{8 * size}@{offset:#x}": (value, 0) for offset, size in ACCESSES
       if (value := legacy_shm_len(offset, size))},
}


def compare(theirs, ours, differences):
    assert theirs.keys() == ours.keys()
    for key in theirs:
        if device_specific(key):
            continue
        expected = differences.get(key, (theirs[key], theirs[key]))
        assert (theirs[key], ours[key]) == expected, (key, theirs[key], ours[key])


def ours(device, observe, legacy=False):
    bench = VirtioBench(device, ram_size=1 << 20, legacy=legacy)
    try:
        return observe(bench.driver)
    finally:
        bench.subsystem.close()
        bench.check_guards()


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
def test_every_register_matches_qemu(qemu, legacy):  # noqa: F811
    theirs = register_sweep(qemu_driver(qemu("-device", "virtio-rng-device", legacy=legacy)),
                            legacy)
    mine = ours(RngShaped(), lambda d: register_sweep(d, legacy), legacy)
    # checked on QEMU's side: the sweep reached the states it names
    assert theirs["initial r32@0x0"] == c.MMIO_MAGIC
    assert theirs["status after DRIVER_OK"] == (0x07 if legacy else 0x0F)
    assert legacy or theirs["QueueReady toggle 2: wrote 1, reads"] == 1
    assert not legacy or theirs["QueuePFN in 8 KiB pages"]
    compare(theirs, mine, LEGACY_DIFFERENCES if legacy else DIFFERENCES)
    # QEMU's QueueNumMax is 1024 for every queue it has, so is RngShaped's
    assert theirs["queue 0x0 QueueNumMax"] == mine["queue 0x0 QueueNumMax"] == 1024
    # device features window >= 2: 0 (4.2.2, bits sel*32..sel*32+31); QEMU shifts a 64-bit
    # value by 64 or more (undefined in C) and answers a word of its features
    assert [mine[f"device features, window {sel:#x}"] for sel in (2, 3, 0xFFFFFFFF)] == [0] * 3
    # selecting a queue out of range: QueueNumMax 0 (4.2.2: "0x0 if the queue is not
    # available"); QEMU ignores a QueueSel >= 1024 and answers for the queue selected before
    # (1023 here, which it does not have either)
    assert [mine[f"queue {s:#x} QueueNumMax"] for s in QUEUE_SELECTIONS[1:]] == [0] * 8


# -- every device QEMU also has: identity, queues and the configuration space -----------------

CONFIG_SPAN = 0xF8        # config offsets swept at every width: all of QEMU's 0x100 bytes


def device_facts(d):
    o = {"device_id": d.read(c.REG_DEVICE_ID), "queues": []}
    for index in range(8):
        d.write(c.REG_QUEUE_SEL, index)
        if d.read(c.REG_QUEUE_NUM_MAX):
            o["queues"].append(index)
    o["config"] = {(offset, size): d.read_config(offset, size)
                   for size in (1, 2, 4, 8) for offset in range(CONFIG_SPAN)}
    d.init([])                      # DRIVER_OK: some fields are writable only now
    written = {}
    for size in (1, 2, 4):
        for offset in range(0, CONFIG_SPAN, size):
            d.write_config(offset, (1 << 8 * size) - 1, size)
            written[offset, size] = d.read_config(offset, size)
    o["config after writes"] = written
    return o


def config_bytes(facts):
    return bytes(facts["config"][offset, 1] for offset in range(CONFIG_SPAN))


def _net(tmp):
    return NetDevice(f"switch:{tmp}/switch.sock", mac="52:54:00:12:34:56")


# kind: (QEMU's arguments, our device, the config bytes both define alike, accepted
# differences of the facts {key: (QEMU's, ours)})
DEVICES = {
    "console": (["-device", "virtio-serial-device,max_ports=1"],
                lambda tmp: ConsoleDevice("file:/dev/null"), 4,
                # QEMU's virtio-serial is always multiport (queues 2, 3: control)
                {"queues": ([0, 1, 2, 3], [0, 1])}),
    "console-multiport": (["-device", "virtio-serial-device,max_ports=2"],
                          lambda tmp: ConsoleDevice(ports={"a": None}), 12,
                          {"queues": ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])}),
    "block": (["-drive", "file={image},if=none,format=raw,id=d0",
               "-device", "virtio-blk-device,drive=d0"],
              lambda tmp: BlockDevice(f"{tmp}/disk.img"), 8, {}),
    "net": (["-netdev", "user,id=n0",
             "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"],
            _net, 8,
            # QEMU offers VIRTIO_NET_F_CTRL_VQ (queue 2), we do not
            {"queues": ([0, 1, 2], [0, 1])}),
    "balloon": (["-device", "virtio-balloon-device"], lambda tmp: BalloonDevice(), 8, {}),
    "9p": (["-fsdev", "local,id=f0,path={share},security_model=none",
            "-device", "virtio-9p-device,fsdev=f0,mount_tag=share"],
           lambda tmp: P9Device(f"{tmp}/share", tag="share"), 7, {}),
    "gpu": (["-device", "virtio-gpu-device"], lambda tmp: GpuDevice(), 16, {}),
    "rng": (["-device", "virtio-rng-device"], lambda tmp: RngDevice(), 0, {}),
}


@pytest.mark.parametrize("kind", sorted(DEVICES))
def test_every_device_matches_qemu_register_and_config_space(qemu, tmp_path, kind):  # noqa: F811
    """The register sweep on each device QEMU also has, then its identity, its queues and
    its configuration space at every offset and width: the bytes both define alike are
    equal at every width; beyond each side's config every access reads all ones."""
    args, make, common, accepted = DEVICES[kind]
    (tmp_path / "share").mkdir()
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    # A copy for QEMU: each side locks its image against the other (block.py, Images).
    (tmp_path / "qemu-disk.img").write_bytes(bytes(1 << 20))
    args = [a.format(image=qemu_value(tmp_path / "qemu-disk.img"),
                     share=qemu_value(tmp_path / "share")) for a in args]
    q = qemu(*args)
    theirs_sweep = register_sweep(qemu_driver(q), False)
    theirs = device_facts(qemu_driver(q))
    mine_sweep, mine = ours(make(tmp_path), lambda d: (register_sweep(d, False),
                                                       device_facts(d)))
    compare(theirs_sweep, mine_sweep, DIFFERENCES)
    for key in ("device_id", "queues"):
        assert (theirs[key], mine[key]) == accepted.get(key, (theirs[key], theirs[key])), key
    assert config_bytes(theirs)[:common] == config_bytes(mine)[:common]
    for (offset, size), value in theirs["config after writes"].items():
        if offset + size <= common:
            assert value == mine["config after writes"][offset, size], (offset, size)
    ends = [config_bytes(f).rstrip(b"\xff") for f in (theirs, mine)]
    same_length = len(ends[0]) == len(ends[1]) == common
    for offset, size in theirs["config"]:
        values = [f["config"][offset, size] for f in (theirs, mine)]
        if offset + size <= common or same_length:      # then across the end too
            assert values[0] == values[1], (offset, size)
        for value, facts, end in zip(values, (theirs, mine), ends):
            if offset >= len(end) and size < 8:
                assert value == (1 << 8 * size) - 1, (offset, size)


def test_vsock_matches_qemu_vhost_vsock(qemu, tmp_path):  # noqa: F811
    """QEMU 7.2's only vsock model is vhost-vsock-device: the host kernel's /dev/vhost-vsock
    serves its queues, so it is compared only where that exists."""
    if not os.path.exists("/dev/vhost-vsock"):
        pytest.skip("QEMU 7.2 has vhost-vsock-device only, which needs the host's "
                    "/dev/vhost-vsock (modprobe vhost_vsock); no virtio-mmio vsock model")
    q = qemu("-device", "vhost-vsock-device,guest-cid=3")
    theirs = register_sweep(qemu_driver(q), False)
    mine = ours(VsockDevice(3, str(tmp_path / "v.sock")), lambda d: register_sweep(d, False))
    compare(theirs, mine, DIFFERENCES)


def test_fs_matches_qemu_vhost_user_fs(qemu, tmp_path):  # noqa: F811
    """virtio-fs: QEMU's vhost-user-fs-device and ours, each with its own virtiofsd."""
    from avatar_hw.devices import fs
    from test_vhost_user import FileBench
    if not os.path.isfile(fs.VIRTIOFSD):
        pytest.skip(f"{fs.VIRTIOFSD} missing (qemu-system-common)")
    share = tmp_path / "share"
    share.mkdir()
    sock = str(tmp_path / "qemu-fs.sock")
    virtiofsd = fs.start_virtiofsd(str(share), sock)
    try:
        q = qemu("-object", "memory-backend-memfd,id=mem,size=128M,share=on",
                 "-machine", "memory-backend=mem",
                 "-chardev", f"socket,id=fs0,path={qemu_value(sock)}",
                 "-device", "vhost-user-fs-device,chardev=fs0,tag=share")
        theirs_sweep = register_sweep(qemu_driver(q), False)
        theirs = device_facts(qemu_driver(q))
    finally:
        fs.stop(virtiofsd)
    bench = FileBench(tmp_path, fs.FsDevice(tag="share", shared_dir=share))
    try:
        mine_sweep, mine = register_sweep(bench.driver, False), device_facts(bench.driver)
    finally:
        bench.close()
    compare(theirs_sweep, mine_sweep, DIFFERENCES)
    assert theirs["device_id"] == mine["device_id"] == fs.ID_FS
    assert theirs["queues"] == mine["queues"] == [0, 1]
    assert config_bytes(theirs)[:40] == config_bytes(mine)[:40]


def notify_sequence(d):
    """Buffers posted and notified before DRIVER_OK, QueueNotify values that are no queue,
    an InterruptACK of a bit never set, a reset with a buffer outstanding."""
    o = {}
    d.negotiate()
    q = d.setup_queue(0, 8, buf_size=64)
    q.post(writable=[64])
    q.notify()
    o["used before DRIVER_OK"] = q.used_idx()
    o["interrupt before DRIVER_OK"] = d.interrupt_status()
    d.driver_ok()
    o["used at DRIVER_OK"] = [u.length for u in wait_used(q)]
    o["interrupt at DRIVER_OK"] = d.interrupt_status()
    d.ack_interrupt()
    q.post(writable=[64])
    for value in (0x10000, 0x12340000, 0xFFFFFFFF, 1, 1023):
        d.write(c.REG_QUEUE_NOTIFY, value)
    o["used after notifies of no queue"] = q.used_idx()
    q.notify()
    o["used after notify 0"] = [u.length for u in wait_used(q)]
    d.ack_interrupt()
    d.write(c.REG_INTERRUPT_ACK, 0x4)
    o["interrupt after acking bit 2"] = d.interrupt_status()
    q.post(writable=[64])
    d.write(c.REG_STATUS, 0)
    o["after reset with a buffer out"] = [d.read(reg) for reg in (
        c.REG_STATUS, c.REG_INTERRUPT_STATUS, c.REG_QUEUE_READY)]
    return o


def test_notifies_match_qemu(qemu):  # noqa: F811
    theirs = notify_sequence(qemu_driver(qemu("-device", "virtio-rng-device")))
    mine = ours(RngShaped(), notify_sequence)
    assert theirs["used at DRIVER_OK"] == [64]
    assert theirs == mine
