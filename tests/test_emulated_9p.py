"""virtio-9p used by a real arm64 Linux guest on the emulated board (marker ``emulated``; one
booted guest for the module): the guest mounts the host folder with v9fs, files move both
ways with the same sha256, and escape attempts from inside the guest stay inside.

Throughput is measured by bench/board.py, not here.
"""

import hashlib
import os
import re
import socket

import pytest

from avatar_hw.emulated.session import EmulatedBoard
from test_emulated_devices import run
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)

TAG = "hostshare"
HOST_DATA = bytes((i * 7 + (i >> 11)) % 256 for i in range(3 << 20))   # 3 MiB, by the host
SECRET = "avatar-9p-secret-outside-the-share"


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    base = tmp_path_factory.mktemp("p9")
    share = base / "share"
    share.mkdir()
    (share / "from-host.bin").write_bytes(HOST_DATA)
    (base / "secret").write_text(SECRET + "\n")
    os.symlink(base / "secret", share / "abs-link")         # host-absolute
    os.symlink("../secret", share / "rel-link")             # climbs out of the share
    board = EmulatedBoard(devices=f'9p = {{ tag = "{TAG}", path = "{share}" }}\n').start()
    try:
        board.guest = board.shell(timeout=120)
        board.share = share
        run(board, f"mkdir -p /mnt && mount -t 9p -o trans=virtio,version=9p2000.L {TAG} /mnt")
        yield board
    finally:
        board.stop()


def status_of(board, command, timeout=60):
    return board.guest.run(command, timeout)


def device(board):
    return next(t.device for t in board.daemon.subsystem._devices.values()
                if t.device.name == "9p")


def test_guest_binds_virtio_9p_and_mounts_the_tag(board):
    assert re.search(r"virtio virtio\d+ device 0x0009 driver 9pnet_virtio", board.guest.banner), \
        board.guest.banner
    assert f"{TAG} /mnt 9p" in run(board, "cat /proc/mounts")
    listing = run(board, "ls /mnt").split()
    assert {"from-host.bin", "abs-link", "rel-link"} <= set(listing)


def test_guest_reads_what_the_host_wrote(board):
    out = run(board, "sha256sum /mnt/from-host.bin")
    assert out.split()[0] == hashlib.sha256(HOST_DATA).hexdigest()


def test_guest_writes_reach_the_host_folder(board):
    run(board, "dd if=/dev/urandom of=/tmp/pattern bs=64k count=40 2>/dev/null")
    guest_sum = run(board, "sha256sum /tmp/pattern").split()[0]
    run(board, "mkdir /mnt/dir && cp /tmp/pattern /mnt/dir/from-guest.bin && sync")
    host = (board.share / "dir" / "from-guest.bin").read_bytes()
    assert len(host) == 40 * 64 * 1024
    assert hashlib.sha256(host).hexdigest() == guest_sum
    run(board, "mv /mnt/dir/from-guest.bin /mnt/dir/renamed && ln -s renamed /mnt/dir/link")
    assert os.readlink(board.share / "dir" / "link") == "renamed"
    assert run(board, "sha256sum /mnt/dir/link").split()[0] == guest_sum
    run(board, "rm /mnt/dir/link /mnt/dir/renamed && rmdir /mnt/dir")
    assert not (board.share / "dir").exists()
    assert device(board).counters["bytes_from_guest"] >= len(host)


def test_metadata_work_from_the_guest(board):
    """chmod, hard links, stat, truncate, statfs, a directory listing: what ``ls -l``,
    ``df`` and a build tree do."""
    out = run(board, "cd /mnt && echo hello > meta && chmod 640 meta && ln meta hard && "
                     "truncate -s 3 meta && stat -c '%a %h %s' meta && df /mnt | tail -1 && "
                     "mkdir -p t/a/b && touch t/a/b/f1 t/a/f2 && find t | sort | tr '\\n' ' '")
    lines = out.strip().splitlines()
    assert lines[0].split() == ["640", "2", "3"], out
    assert lines[-1].split() == ["t", "t/a", "t/a/b", "t/a/b/f1", "t/a/f2"], out
    st = os.stat(board.share / "meta")
    assert (st.st_mode & 0o777, st.st_nlink, st.st_size) == (0o640, 2, 3)
    assert (board.share / "hard").read_bytes() == b"hel"
    run(board, "cd /mnt && rm -r t meta hard")
    assert not (board.share / "t").exists()


def test_escapes_from_inside_the_guest_stay_inside(board):
    """Symlinks resolve in the guest (a link to / is the guest's /), never on the host; ``..``
    of the mount is the guest's; host links out of the share lead nowhere."""
    run(board, "ln -s / /mnt/x")
    assert os.readlink(board.share / "x") == "/"
    output, status = status_of(board, "cat /mnt/x/etc/hostname")    # the guest has none
    assert status != 0 and socket.gethostname() not in output.replace("hostname", ""), output
    assert "init" in run(board, "ls /mnt/x/").split()                # the guest's own root
    for path in ("/mnt/abs-link", "/mnt/rel-link", "/mnt/../secret", "/mnt/x/../secret"):
        output, status = status_of(board, f"cat {path}")
        assert status != 0 and SECRET not in output, (path, output)
    output, _ = status_of(board, "ls -a /mnt/.. /mnt/../.. && cat /mnt/x/proc/self/mounts")
    assert SECRET not in output
    run(board, "rm /mnt/x")
    assert device(board).counters["fids"] <= 4096
