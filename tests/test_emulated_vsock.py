"""virtio-vsock used by a real arm64 Linux guest on the emulated board (marker ``emulated``;
one booted guest for the module, with ``bin/avbench`` from bench/guest/avbench.c).

Both directions move ``SIZE`` bytes (64 MiB, about 25 s each under TCG) through an
echo and compare SHA-256 sums on both sides, with bench/board.py's own functions: the
host connects to a guest port through the device's socket (``CONNECT``) and the guest
echoes; the guest connects to host CID 2 (the device's ``<socket>_<port>``) and the host
echoes. Throughput is reported by the bench, not checked here.
"""

import re

import pytest

from avatar_hw.emulated.session import EmulatedBoard
from bench.board import build_initrd, vsock_guest_echo, vsock_host_echo
from test_emulated_devices import run
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)

MIB = 1 << 20
SIZE = 64 * MIB
CID = 3


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    work = tmp_path_factory.mktemp("vsock")
    path = work / "v.sock"
    board = EmulatedBoard(devices=f'vsock = {{ cid = {CID}, socket = "{path}" }}\n',
                          initrd=build_initrd(work)).start()
    try:
        board.guest = board.shell(timeout=120)
        board.vsock_path = path
        yield board
    finally:
        board.stop()
    assert not path.exists()


def vsock_device(board):
    return next(t.device for t in board.daemon.subsystem._devices.values()
                if t.device.name == "vsock")


def test_guest_binds_the_virtio_vsock_transport(board):
    assert re.search(r"device 0x0013 driver vmw_vsock_virtio_transport", board.guest.banner), \
        board.guest.banner
    assert run(board, "cat /sys/bus/virtio/devices/*/device").split().count("0x0013") == 1


def test_host_to_guest_echo_moves_the_bytes_both_ways(board):
    """The host connects to the guest's echo: what was sent, what the guest received and
    what came back have the same SHA-256 (``vsock_host_echo`` raises otherwise)."""
    assert vsock_host_echo(board.guest, board.vsock_path, SIZE) > 0
    device = vsock_device(board)
    assert device.counters["bytes_to_guest"] >= SIZE
    assert device.counters["bytes_from_guest"] >= SIZE
    assert device.counters["bad_packets"] == 0 and device.counters["errors"] == 0


def test_guest_to_host_echo_moves_the_bytes_both_ways(board):
    """The guest connects to host port 5000 (``<socket>_5000``), the host echoes; the
    guest's sums of what it sent and got back equal the host's (``vsock_guest_echo``)."""
    assert vsock_guest_echo(board.guest, board.vsock_path, SIZE) > 0
    assert not vsock_device(board).conns
    assert vsock_device(board).counters["bad_packets"] == 0
