"""virtio-blk and virtio-rng used by a real arm64 Linux guest on the emulated board (marker
``emulated``; one booted guest for the module).

The block image holds a pattern written by the host before boot; the guest
reads it and writes its own data with O_DIRECT and fsync, and both sides
compare sha256 sums of the same ranges; a guest discard becomes a hole in
the image. Throughput is measured by bench/board.py, not here.
"""

import hashlib
import os
import re
from pathlib import Path

import pytest

from avatar_hw.devices import block as blk
from avatar_hw.emulated.session import EmulatedBoard
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)


MIB = 1 << 20
IMAGE_SIZE = 8 * MIB
HOST_PATTERN = bytes((i * 131 + (i >> 9)) % 256 for i in range(MIB))   # in MiB 0, by the host
GUEST_OFFSET_MIB = 4                                                    # the guest writes here
DISCARD_OFFSET_MIB = 6                                                  # and discards here
SERIAL = "avatar-e2e"


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    image = tmp_path_factory.mktemp("blk") / "disk.img"
    with open(image, "wb") as f:
        f.write(HOST_PATTERN)
        f.truncate(IMAGE_SIZE)
    devices = (f'block = {{ image = "{image}", serial = "{SERIAL}" }}\n'
               "rng = { max_bytes = 256 }\n")
    board = EmulatedBoard(devices=devices).start()
    shm = board.machine.shm_path
    try:
        board.guest = board.shell(timeout=120)
        board.image = image
        yield board
    finally:
        board.stop()
    assert board.machine.process.returncode is not None
    assert not Path(shm).exists()
    assert board.guest.sock.fileno() == -1          # the shell's socket too: no ResourceWarning


def run(board, command, timeout=60):
    output, status = board.guest.run(command, timeout)
    assert status == 0, (command, output)
    return output


def device(board, name):
    return next(t.device for t in board.daemon.subsystem._devices.values()
                if t.device.name == name)


def test_guest_binds_virtio_blk_and_virtio_rng(board):
    banner = board.guest.banner
    assert re.search(r"virtio virtio\d+ device 0x0002 driver virtio_blk", banner), banner
    assert re.search(r"virtio virtio\d+ device 0x0004 driver virtio_rng", banner), banner
    assert run(board, "cat /sys/block/vda/size").strip() == str(IMAGE_SIZE // 512)
    assert run(board, "cat /sys/block/vda/serial").strip() == SERIAL
    assert sorted(run(board, "ls /dev/vda /dev/hwrng").split()) == ["/dev/hwrng", "/dev/vda"]


def test_guest_reads_what_the_host_wrote(board):
    out = run(board, "dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | sha256sum")
    assert out.split()[0] == hashlib.sha256(HOST_PATTERN).hexdigest()


def test_guest_writes_reach_the_host_image(board):
    run(board, "dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null")
    guest_sum = run(board, "sha256sum /tmp/pattern").split()[0]
    run(board, f"dd if=/tmp/pattern of=/dev/vda bs=64k seek={GUEST_OFFSET_MIB * 16} "
               "oflag=direct conv=fsync 2>/dev/null")
    with open(board.image, "rb") as f:                  # the host's copy, from the file
        f.seek(GUEST_OFFSET_MIB * MIB)
        assert hashlib.sha256(f.read(MIB)).hexdigest() == guest_sum
    readback = run(board, f"dd if=/dev/vda bs=64k skip={GUEST_OFFSET_MIB * 16} count=16 "
                          "iflag=direct 2>/dev/null | sha256sum")
    assert readback.split()[0] == guest_sum
    counters = device(board, "block").counters
    assert counters["bytes_from_guest"] >= MIB and counters["flushes"] >= 1
    assert counters["errors"] == 0


def test_guest_discard_punches_a_hole_in_the_image(board):
    """Linux takes the discard and write-zeroes limits from the config space; its
    blkdiscard on a range the host filled leaves a hole in the image (zeros, blocks freed)."""
    queue = "/sys/block/vda/queue/"
    limits = run(board, f"cat {queue}discard_max_bytes {queue}write_zeroes_max_bytes "
                        f"{queue}discard_granularity").split()
    assert limits == [str(blk.MAX_DISCARD_SECTORS * 512),
                      str(blk.MAX_WRITE_ZEROES_SECTORS * 512),
                      str(os.statvfs(board.image).f_bsize)]
    offset = DISCARD_OFFSET_MIB * MIB
    with open(board.image, "r+b") as f:
        f.seek(offset)
        f.write(b"\x77" * MIB)
        os.fsync(f.fileno())
    blocks = os.stat(board.image).st_blocks
    run(board, f"blkdiscard -o {offset} -l {MIB} /dev/vda")
    with open(board.image, "rb") as f:
        f.seek(offset)
        assert f.read(MIB) == bytes(MIB)
    assert os.stat(board.image).st_blocks <= blocks - MIB // 512
    assert device(board, "block").counters["discards"] >= 1
    assert run(board, f"dd if=/dev/vda bs=64k skip={DISCARD_OFFSET_MIB * 16} count=16 "
                      "iflag=direct 2>/dev/null | sha256sum").split()[0] == \
        hashlib.sha256(bytes(MIB)).hexdigest()


def test_hwrng_reads_random_bytes_from_virtio_rng(board):
    assert run(board, "cat /sys/devices/virtual/misc/hw_random/rng_current").startswith(
        "virtio_rng")
    before = device(board, "rng").counters["bytes_to_guest"]
    out = run(board, "dd if=/dev/hwrng bs=64 count=16 2>/dev/null | od -An -v -tx1")
    data = bytes.fromhex("".join(out.split()))
    assert len(data) == 1024
    assert len(set(data)) > 128 and data[:64] != data[64:128]
    assert device(board, "rng").counters["bytes_to_guest"] >= before + 1024
