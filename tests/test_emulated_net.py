"""virtio-net in a real arm64 Linux guest on the emulated board (slow: marker ``emulated``).

The guest's eth0 is on the daemon's datagram switch; this test joins the
switch as a remote port and answers ARP and ICMP echo for 10.0.2.2, so the
guest's pings cross the device both ways.
"""

import socket
import struct
import threading
from pathlib import Path

import pytest

from avatar_hw.emulated.session import EmulatedBoard
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)


GUEST_MAC = "52:54:00:12:34:56"
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"
HOST_MAC = bytes.fromhex("525400abcdef")
ARP, IPV4 = 0x0806, 0x0800


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def answer(frame):
    """The reply of HOST_IP to an ARP request or ICMP echo request, else None."""
    src, ethertype, body = frame[6:12], struct.unpack("!H", frame[12:14])[0], frame[14:]
    host_ip = socket.inet_aton(HOST_IP)
    if ethertype == ARP and len(body) >= 28 and body[6:8] == b"\0\1" and body[24:28] == host_ip:
        arp = body[:6] + b"\0\2" + HOST_MAC + host_ip + body[8:18]
        return src + HOST_MAC + frame[12:14] + arp
    if ethertype == IPV4 and len(body) >= 28 and body[9] == 1 and body[16:20] == host_ip:
        ihl = (body[0] & 15) * 4
        icmp = body[ihl:]
        if icmp[:1] != b"\x08":
            return None
        icmp = b"\0\0\0\0" + icmp[4:]
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        ip = bytearray(body[:ihl])
        ip[8], ip[10:12] = 64, b"\0\0"
        ip[12:16], ip[16:20] = body[16:20], body[12:16]
        ip[10:12] = struct.pack("!H", checksum(bytes(ip)))
        return src + HOST_MAC + frame[12:14] + bytes(ip) + icmp
    return None


class Peer:
    """A remote port of the switch that answers for HOST_IP and records what it saw."""

    def __init__(self, switch_path, own_path):
        self.switch = switch_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(own_path)
        self.sock.settimeout(0.2)
        self.frames = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.sock.sendto(b"", self.switch)                 # join the switch
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65536)
            except socket.timeout:
                continue
            self.frames.append(frame)
            reply = answer(frame)
            if reply is not None:
                self.sock.sendto(reply, self.switch)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("net")
    switch = str(tmp / "switch.sock")
    board = EmulatedBoard(devices=f'net = {{ switch = "{switch}", mac = "{GUEST_MAC}" }}')
    board.start()
    shm = board.machine.shm_path
    try:
        board.guest = board.shell(timeout=120)
        board.peer = Peer(switch, str(tmp / "peer.sock"))
        board.peer.start()
        yield board
    finally:
        peer = getattr(board, "peer", None)
        if peer is not None:
            peer.stop()
        board.stop()
    assert board.machine.process.returncode is not None
    assert not Path(shm).exists() and not Path(switch).exists()


def test_eth0_is_virtio_net_with_our_mac(board):
    output, status = board.guest.run(
        "basename $(readlink /sys/class/net/eth0/device/driver); cat /sys/class/net/eth0/address")
    assert (output.split(), status) == (["virtio_net", GUEST_MAC], 0)
    output, _ = board.guest.run("cat /sys/class/net/eth0/mtu")
    assert output.strip() == "1500"


def test_guest_pings_the_host_side(board):
    output, status = board.guest.run(
        f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && "
        f"ping -c 3 -W 5 {HOST_IP}", timeout=60)
    assert status == 0, output
    assert "3 packets received" in output
    guest_mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    from_guest = [f for f in board.peer.frames if f[6:12] == guest_mac]
    types = {struct.unpack("!H", f[12:14])[0] for f in from_guest}
    assert {ARP, IPV4} <= types
    device = board.daemon.subsystem.device(0, 1)
    assert device.counters["tx_frames"] >= 4 and device.counters["rx_frames"] >= 4
    assert device.counters["tx_malformed"] == 0
