"""virtio-fs over vhost-user used by a real arm64 Linux guest on the emulated board (marker
``emulated``; one booted guest for the module): the daemon starts virtiofsd on QEMU's
shared RAM file, the guest mounts the tag, files move both ways with the same sha256; a
back-end killed mid-transfer gives that device DEVICE_NEEDS_RESET while the daemon keeps
serving the guest's console.
"""

import hashlib
import re
import time

import pytest

from avatar_hw.emulated.session import EmulatedBoard
from avatar_hw.virtio import constants as c
from test_emulated_devices import run
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)

TAG = "hostfs"
HOST_DATA = bytes((i * 13 + (i >> 9)) % 256 for i in range(3 << 20))   # 3 MiB, by the host


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    base = tmp_path_factory.mktemp("vhost_user_fs")
    share = base / "share"
    share.mkdir()
    (share / "from-host.bin").write_bytes(HOST_DATA)
    board = EmulatedBoard(devices=f'fs = {{ tag = "{TAG}", shared_dir = "{share}" }}\n').start()
    try:
        board.guest = board.shell(timeout=120)
        board.share = share
        run(board, f"mkdir -p /mnt && mount -t virtiofs {TAG} /mnt")
        yield board
    finally:
        board.stop()


def fs_device(board):
    return next(t.device for t in board.daemon.subsystem._devices.values()
                if t.device.name == "fs")


def test_vhost_user_guest_mounts_virtiofs(board):
    assert re.search(r"virtio virtio\d+ device 0x001a driver virtiofs", board.guest.banner), \
        board.guest.banner
    assert f"{TAG} /mnt virtiofs" in run(board, "cat /proc/mounts")


def test_vhost_user_files_move_both_ways_with_the_same_sha256(board):
    out = run(board, "sha256sum /mnt/from-host.bin")
    assert out.split()[0] == hashlib.sha256(HOST_DATA).hexdigest()
    run(board, "dd if=/dev/urandom of=/tmp/pattern bs=64k count=40 2>/dev/null")
    guest_sum = run(board, "sha256sum /tmp/pattern").split()[0]
    run(board, "cp /tmp/pattern /mnt/from-guest.bin && sync")
    host = (board.share / "from-guest.bin").read_bytes()
    assert len(host) == 40 * 64 * 1024
    assert hashlib.sha256(host).hexdigest() == guest_sum
    # 400 files made and removed: thousands of requests, past a queue's worth (1024);
    # virtiofsd pops the ring, so none of their notifies is an idle trap and the guest is
    # never paced (avatar_hw.pace)
    run(board, "mkdir /mnt/many && for i in $(seq 400); do echo $i >/mnt/many/$i; done && "
               "rm -r /mnt/many")
    vm = board.daemon.info()["vms"][0]
    assert vm["paced_periods"] == 0 and fs_device(board).context.idle_traps <= 3, vm


def test_vhost_user_killed_backend_needs_reset_daemon_keeps_serving(board):
    device = fs_device(board)
    run(board, "(while :; do cat /mnt/from-host.bin > /mnt/copy; done) >/dev/null 2>&1 & true")
    deadline = time.monotonic() + 60
    while not (board.share / "copy").exists():      # the guest's copy loop is running
        assert time.monotonic() < deadline, "the guest's copy loop never started"
        time.sleep(0.05)
    device.process.kill()
    deadline = time.monotonic() + 60
    while not device.context.status & c.STATUS_DEVICE_NEEDS_RESET:
        assert time.monotonic() < deadline, "a killed back-end left the device running"
        time.sleep(0.05)
    # The console (another device of the same daemon) still answers.
    assert run(board, "echo still-here").strip().endswith("still-here")
