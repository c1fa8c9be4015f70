"""virtio-vsock used by a real arm64 Linux guest on the emulated board (marker ``emulated``;
one booted guest for the module, with ``bin/avbench`` from bench/guest/avbench.c).

Both directions move ``SIZE`` bytes through an echo and compare SHA-256 sums on both
sides: the host connects to a guest port through the device's socket (``CONNECT``) and
the guest echoes; the guest connects to host CID 2 (the device's ``<socket>_<port>``) and
the host echoes. Throughput is measured by bench/board.py, not here.
"""

import hashlib
import os
import re
import socket
import threading

import pytest

from avatar_hw.emulated.session import EmulatedBoard
from avatar_hw.hil.vsock import connect
from bench.board import build_initrd
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)

MIB = 1 << 20
SIZE = 64 * MIB
CID = 3
GUEST_PORT, HOST_PORT = 5000, 6000
CHUNK = 1 << 20


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


def run(board, command, timeout=60):
    output, status = board.guest.run(command, timeout)
    assert status == 0, (command, output)
    return output


def vsock_device(board):
    return next(t.device for t in board.daemon.subsystem._devices.values()
                if t.device.name == "vsock")


def echo(sock, digest):
    """Send back what arrives until end of stream, hashing it; then half-close."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while n := sock.recv_into(buf):
        digest.update(view[:n])
        sock.sendall(view[:n])
        total += n
    sock.shutdown(socket.SHUT_WR)
    return total


def test_guest_binds_the_virtio_vsock_transport(board):
    assert re.search(r"device 0x0013 driver vmw_vsock_virtio_transport", board.guest.banner), \
        board.guest.banner
    assert run(board, "cat /sys/bus/virtio/devices/*/device").split().count("0x0013") == 1


def test_host_to_guest_echo_moves_the_bytes_both_ways(board):
    run(board, f"avbench vsock-echo {GUEST_PORT} {SIZE} >/tmp/echo.log 2>&1 & true")
    data = os.urandom(SIZE)
    sent = hashlib.sha256(data).hexdigest()
    sock = connect(board.vsock_path, GUEST_PORT, timeout=30)
    sock.settimeout(60)

    def send():
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    back, received = hashlib.sha256(), 0
    buf = bytearray(CHUNK)
    while n := sock.recv_into(buf):
        back.update(memoryview(buf)[:n])
        received += n
    sender.join(60)
    sock.close()
    log = run(board, "wait; cat /tmp/echo.log")
    assert received == SIZE and back.hexdigest() == sent, (log, vsock_device(board).info())
    guest = re.search(r"vsock-echo bytes=(\d+) ns=\d+ sha256=(\w+)", log).groups()
    assert guest == (str(SIZE), sent)
    device = vsock_device(board)
    assert device.counters["bad_packets"] == 0 and device.counters["errors"] == 0


def test_guest_to_host_echo_moves_the_bytes_both_ways(board):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{board.vsock_path}_{HOST_PORT}")
    server.listen(1)
    server.settimeout(60)
    digest, result = hashlib.sha256(), {}

    def serve():
        peer, _ = server.accept()
        peer.settimeout(60)
        result["bytes"] = echo(peer, digest)
        peer.close()

    host = threading.Thread(target=serve, daemon=True)
    host.start()
    out = run(board, f"avbench vsock-send {HOST_PORT} {SIZE}", timeout=120)
    host.join(60)
    server.close()
    os.unlink(f"{board.vsock_path}_{HOST_PORT}")
    sent, received, sent_sum, echo_sum = re.search(
        r"vsock-send bytes=(\d+) received=(\d+) ns=\d+ sha256=(\w+) echo_sha256=(\w+)",
        out).groups()
    assert int(sent) == int(received) == result["bytes"] == SIZE
    assert sent_sum == echo_sum == digest.hexdigest()
    assert not vsock_device(board).conns
