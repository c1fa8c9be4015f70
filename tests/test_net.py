"""virtio-net through the driver-side harness: the datagram switch, MRG_RXBUF, the backlog,
malformed transmits, link status, config errors, and a TAP in a network namespace."""

import ctypes
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

from avatar_hw.backends import egress, switch
from avatar_hw.config import parse_config
from avatar_hw.devices import net
from avatar_hw.devices.net import NetDevice
from avatar_hw.errors import ConfigError
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.constants import bit
from test_console import loop  # noqa: F401 (fixture)

MAC_A, MAC_B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
BROADCAST = b"\xff" * 6
ETHERTYPE = b"\x88\xb5"               # IEEE local experimental
HDR = bytes(12)


def mac(text):
    return bytes.fromhex(text.replace(":", ""))


def frame(dst, src, payload):
    return dst + src + ETHERTYPE + payload


def num_buffers(data):
    return struct.unpack_from("<H", data, 10)[0]


class Nic:
    """A net device in its own VM, driven from the guest side."""

    def __init__(self, loop, backend, *, mac_=None, features=None, drop=0, rx_size=4096,
                 **kw):
        self.loop = loop
        self.device = NetDevice(backend, mac=mac_, **kw)
        self.bench = VirtioBench(self.device, loop=loop, ram_size=6 << 20)
        self.driver = self.bench.driver
        ok, _ = self.driver.negotiate(features, drop=drop)
        assert ok
        self.rx = self.driver.setup_queue(net.RX, buf_size=rx_size)
        self.tx = self.driver.setup_queue(net.TX, buf_size=4096)
        self.driver.driver_ok()

    def send(self, *frames, header=HDR):
        for f in frames:
            self.tx.post(readable=[header + f])
        self.tx.notify()
        return self.tx.get_used()

    def post_rx(self, n, size=None):
        for _ in range(n):
            self.rx.post(writable=[size or self.rx.buf_size])
        self.rx.notify()

    def received(self, used=None):
        """Frames in the used receive buffers (merged by num_buffers), headers checked."""
        frames, used = [], list(self.rx.get_used() if used is None else used)
        while used:
            first = used.pop(0)
            count = num_buffers(first.data)
            assert first.data[:10] == bytes(10)
            data = first.data[12:] + b"".join(u.data for u in used[:count - 1])
            del used[:count - 1]
            frames.append(data)
        return frames

    def close(self):
        self.bench.subsystem.close()
        self.bench.check_guards()


@pytest.fixture
def pair(tmp_path, loop):
    path = str(tmp_path / "switch.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A)
    b = Nic(loop, f"switch:{path}", mac_=MAC_B)
    yield a, b
    a.close()
    b.close()
    assert not os.path.exists(path)


def spin(loop, rounds=5):
    for _ in range(rounds):
        loop.run_once(0)


# -- features and configuration -------------------------------------------------------------------

def test_features_and_config_space(pair):
    a, _ = pair
    offered = a.driver.device_features()
    for feature in (net.F_MAC, net.F_STATUS, net.F_MTU, net.F_MRG_RXBUF):
        assert offered & bit(feature)
    assert a.driver.read(c.REG_DEVICE_ID) == c.ID_NET
    assert bytes(a.driver.read_config(i, 1) for i in range(6)) == mac(MAC_A)
    assert a.driver.read_config(6, 2) == net.S_LINK_UP
    assert a.driver.read_config(10, 2) == 1500


def test_link_status_change_interrupts(pair):
    a, _ = pair
    a.driver.ack_interrupt()
    generation = a.driver.read(c.REG_CONFIG_GENERATION)
    a.device.set_link(False)
    assert a.driver.read_config(6, 2) == 0
    assert a.driver.interrupt_status() & c.INT_CONFIG_CHANGE
    assert a.driver.read(c.REG_CONFIG_GENERATION) != generation
    a.device.set_link(True)
    assert a.driver.read_config(6, 2) == net.S_LINK_UP


def test_link_down_drops_both_ways(pair, loop):
    a, b = pair
    b.post_rx(4)
    a.device.set_link(False)
    assert len(a.send(frame(mac(MAC_B), mac(MAC_A), b"lost"))) == 1     # completed anyway
    spin(loop)
    assert b.received() == [] and a.device.counters["tx_dropped"] == 1


def test_link_down_drops_the_frames_waiting_for_receive_buffers(pair, loop):
    a, b = pair
    a.send(*[frame(mac(MAC_B), mac(MAC_A), b"old%d" % i) for i in range(3)])
    spin(loop)
    assert b.device.pending_frames == 3            # b gave no receive buffers yet
    b.device.set_link(False)
    b.post_rx(4)
    spin(loop)
    assert b.received() == [] and b.device.counters["rx_dropped"] == 3
    b.device.set_link(True)
    a.send(frame(mac(MAC_B), mac(MAC_A), b"new"))
    spin(loop)
    assert b.received() == [frame(mac(MAC_B), mac(MAC_A), b"new")]


# -- frames between two devices on the switch -----------------------------------------------------

def test_frames_keep_their_order_both_ways(pair, loop):
    a, b = pair
    a.post_rx(200)
    b.post_rx(200)
    to_b = [frame(mac(MAC_B), mac(MAC_A), b"a%04d" % i + bytes(i * 7)) for i in range(150)]
    to_a = [frame(mac(MAC_A), mac(MAC_B), b"b%04d" % i + os.urandom(i)) for i in range(150)]
    got_a, got_b = [], []
    for i in range(0, 150, 30):
        a.send(*to_b[i:i + 30])
        b.send(*to_a[i:i + 30])
        spin(loop)
        got_b += b.received()
        got_a += a.received()
    assert got_b == to_b and got_a == to_a
    assert a.device.counters["tx_frames"] == 150 and b.device.counters["rx_frames"] == 150
    assert a.device.counters["rx_dropped"] == b.device.counters["rx_dropped"] == 0


def test_mergeable_buffers_span_small_receive_buffers(tmp_path, loop):
    path = str(tmp_path / "s.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A)
    b = Nic(loop, f"switch:{path}", mac_=MAC_B, rx_size=256)
    b.post_rx(250)
    frames = [frame(mac(MAC_B), mac(MAC_A), os.urandom(n)) for n in (1500, 60, 1000, 244)]
    a.send(*frames)
    spin(loop)
    used = b.rx.get_used()
    assert num_buffers(used[0].data) == 6         # 12 + 1514 bytes in 256-byte buffers
    assert [u.length for u in used[:6]] == [256] * 5 + [12 + 1514 - 5 * 256]
    assert sum(u.length for u in used) == sum(12 + len(f) for f in frames)
    assert b.received(used) == frames
    a.close()
    b.close()


def test_a_frame_the_whole_ring_cannot_hold_is_dropped_not_waited_for(tmp_path, loop):
    """Every buffer of the receive ring posted, 14 bytes each: a 4 000-byte frame (mtu 9000)
    can never fit, since no more buffers can come while these are held. It is dropped and
    counted, and the next frame is received (it waited for ever behind it)."""
    path = str(tmp_path / "s.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A, mtu=9000)
    b = Nic(loop, f"switch:{path}", mac_=MAC_B, mtu=9000, rx_size=14)
    b.post_rx(b.rx.size)
    big, small = (frame(mac(MAC_B), mac(MAC_A), os.urandom(n)) for n in (4000, 60))
    a.send(big, small)
    spin(loop)
    assert b.received() == [small] and b.device.counters["rx_dropped"] == 1
    a.close()
    b.close()


def test_without_mergeable_buffers_a_frame_fills_one_big_buffer(tmp_path, loop):
    path = str(tmp_path / "s.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A, drop=bit(net.F_MRG_RXBUF))
    b = Nic(loop, f"switch:{path}", mac_=MAC_B, drop=bit(net.F_MRG_RXBUF))
    b.post_rx(8)
    frames = [frame(mac(MAC_B), mac(MAC_A), os.urandom(n)) for n in (1500, 46, 1200)]
    a.send(*frames)
    spin(loop)
    used = b.rx.get_used()
    assert [u.data[12:] for u in used] == frames
    assert all(num_buffers(u.data) == 1 for u in used)
    a.close()
    b.close()


def test_small_buffer_without_mergeable_drops_big_frames_only(tmp_path, loop):
    path = str(tmp_path / "s.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A, drop=bit(net.F_MRG_RXBUF))
    b = Nic(loop, f"switch:{path}", mac_=MAC_B, drop=bit(net.F_MRG_RXBUF), rx_size=512)
    b.post_rx(4)
    big, small = (frame(mac(MAC_B), mac(MAC_A), os.urandom(n)) for n in (1000, 100))
    a.send(big, small)
    spin(loop)
    assert [u.data[12:] for u in b.rx.get_used()] == [small]
    assert b.device.counters["rx_dropped"] == 1
    a.close()
    b.close()


def test_broadcast_floods_and_unicast_is_learned(tmp_path, loop):
    path = str(tmp_path / "s.sock")
    a, b, c_ = (Nic(loop, f"switch:{path}", mac_=f"52:54:00:00:00:0{i}") for i in (1, 2, 3))
    for nic in (a, b, c_):
        nic.post_rx(8)
    hello = frame(BROADCAST, mac("52:54:00:00:00:01"), b"hello")
    a.send(hello)
    spin(loop)
    assert b.received() == [hello] and c_.received() == [hello] and a.received() == []
    reply = frame(mac("52:54:00:00:00:01"), mac("52:54:00:00:00:02"), b"reply")
    b.send(reply)
    spin(loop)
    assert a.received() == [reply] and c_.received() == []     # a's MAC was learned
    for nic in (a, b, c_):
        nic.close()


# -- the bounded receive backlog ------------------------------------------------------------------

def test_frames_before_driver_ok_are_dropped(tmp_path, loop):
    path = str(tmp_path / "s.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A)
    b = NetDevice(f"switch:{path}", mac=MAC_B)
    bench = VirtioBench(b, loop=loop, ram_size=4 << 20)
    a.send(frame(mac(MAC_B), mac(MAC_A), b"early"))
    assert b.counters["rx_dropped"] == 1
    bench.subsystem.close()
    a.close()


def test_reset_drops_held_buffers_and_backlog(pair, loop):
    a, b = pair
    b.post_rx(1)
    a.send(frame(mac(MAC_B), mac(MAC_A), b"x"))
    assert len(b.received()) == 1
    a.send(frame(mac(MAC_B), mac(MAC_A), b"y"))            # no buffer: waits in the backlog
    assert b.device.info()["rx_pending"] == 1
    b.driver.reset()                                         # forgets it
    assert b.device.info()["rx_pending"] == 0
    b.rx, b.tx = b.driver.init([net.RX, net.TX])
    b.post_rx(2)
    a.send(frame(mac(MAC_B), mac(MAC_A), b"z"))
    assert b.received() == [frame(mac(MAC_B), mac(MAC_A), b"z")]


# -- bad guest input ------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", bytes(11), HDR + bytes(13), HDR + bytes(1600)])
def test_malformed_transmit_is_dropped_counted_and_completed(pair, loop, payload):
    a, b = pair
    b.post_rx(2)
    a.tx.post(readable=[payload])
    a.tx.notify()
    assert [u.length for u in a.tx.get_used()] == [0]
    assert a.device.counters["tx_malformed"] == 1
    spin(loop)
    assert b.received() == []
    good = frame(mac(MAC_B), mac(MAC_A), b"still works")
    a.send(good)
    assert b.received() == [good]


def test_transmit_asking_for_offloads_is_dropped(pair):
    a, b = pair
    b.post_rx(2)
    a.send(frame(mac(MAC_B), mac(MAC_A), b"csum"), header=b"\x01" + bytes(11))
    a.send(frame(mac(MAC_B), mac(MAC_A), b"gso"), header=b"\x00\x01" + bytes(10))
    assert a.device.counters["tx_malformed"] == 2 and b.received() == []


def test_header_split_over_descriptors_and_frame_over_many(pair):
    a, b = pair
    b.post_rx(2)
    f = frame(mac(MAC_B), mac(MAC_A), os.urandom(300))
    data = HDR + f
    ram = a.bench.ram
    parts, segments = [data[:5], data[5:20], data[20:100], data[100:]], []
    for part in parts:
        gpa = ram.alloc(len(part))
        ram.write(gpa, part)
        segments.append((gpa, len(part), False))
    a.tx.add_chain(segments)
    a.tx.notify()
    assert b.received() == [f]


def test_receive_buffer_too_small_for_a_header_goes_back_empty(pair):
    a, b = pair
    b.rx.post(writable=[8])
    b.rx.post(readable=[b"r"])
    b.rx.notify()
    assert [u.length for u in b.rx.get_used()] == [0, 0]
    assert b.device.context.guest_errors == 2


def test_bad_chain_in_the_transmit_queue_is_completed(pair):
    a, _ = pair
    a.tx.write_desc(0, 0x10, 64)            # outside the VM's RAM
    a.tx.free.remove(0)
    a.tx.outstanding[0] = ([0], [])
    a.tx.make_available(0)
    a.tx.notify()
    assert [u.length for u in a.tx.get_used()] == [0]
    assert a.device.context.status & c.STATUS_DEVICE_NEEDS_RESET == 0


def test_two_devices_with_one_mac_on_a_switch_are_refused(tmp_path, loop):
    """The second would get the first's traffic (and, when it left, unlock the first's
    address for a remote port to take): one line saying so, naming the switch."""
    path = str(tmp_path / "s.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A)
    with pytest.raises(ConfigError, match=f"switch:{path}: MAC {MAC_A} is already another net "
                       "device's on this switch; give each its own mac"):
        Nic(loop, f"switch:{path}", mac_=MAC_A)
    a.close()


def test_a_default_mac_is_the_same_for_the_device_every_time(tmp_path, loop):
    """Given no mac, a device's is derived from its interrupt number (its VM and slot) and
    the host: a restarted daemon's device keeps the one the guest read (a random one left
    the guest sending from an address its port no longer has: every frame dropped)."""
    def default(vm_id):
        device = NetDevice(f"switch:{tmp_path / f'{vm_id}.sock'}")
        bench = VirtioBench(device, loop=loop, ram_size=1 << 20, vm_id=vm_id)
        try:
            assert bytes(device.config[:6]) == device.mac
            assert bench.driver.read_config(0, 1) == 0x02            # locally administered
            return device.mac
        finally:
            bench.subsystem.close()
    assert default(0) == default(0) != default(1)


# -- remote ports: other processes on the switch socket -------------------------------------------

def test_a_remote_port_joins_and_exchanges_frames(pair, tmp_path, loop):
    a, b = pair
    a.post_rx(4)
    b.post_rx(4)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(str(tmp_path / "peer.sock"))
    peer.settimeout(2)
    switch = str(tmp_path / "switch.sock")
    peer.sendto(b"", switch)                                   # join
    spin(loop)
    hello = frame(BROADCAST, mac(MAC_A), b"anyone?")
    a.send(hello)
    assert peer.recv(2048) == hello
    peer_mac = mac("52:54:00:00:00:ee")
    answers = [frame(mac(MAC_A), peer_mac, b"%d" % i + os.urandom(i)) for i in range(3)]
    for f in answers:
        peer.sendto(f, switch)
    spin(loop)
    assert a.received() == answers
    a.send(frame(peer_mac, mac(MAC_A), b"direct"))             # learned: not flooded to b
    assert peer.recv(2048) == frame(peer_mac, mac(MAC_A), b"direct")
    assert b.received() == [hello]                             # only the broadcast
    peer.sendto(b"x" * (1500 + 18 + 14 + 1), switch)           # too large for a: dropped
    spin(loop)
    assert a.device.info()["switch_dropped"] == 0
    peer.sendto(b"runt", switch)                               # no MAC header: the switch drops it
    peer.sendto(mac(MAC_A) + peer_mac, switch)                 # addresses, no EtherType: too
    peer.sendto(mac(MAC_A) + peer_mac + b"\x08", switch)
    spin(loop)
    assert a.received() == []
    assert a.device.info()["switch_dropped"] == b.device.info()["switch_dropped"] == 3
    peer.close()


def test_a_peer_path_made_a_symlink_to_the_switch_makes_no_loop(pair, tmp_path, loop):
    """A peer joins, closes and leaves a symlink to the switch's socket at its address:
    the switch sent to itself and flooded its own frames for ever; it now sends to the
    socket that joined (gone: the peer is forgotten), and a frame from itself is dropped."""
    a, b = pair
    a.post_rx(8)
    b.post_rx(8)
    switch_path = str(tmp_path / "switch.sock")
    peer_path = str(tmp_path / "peer.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(peer_path)
    peer.sendto(b"", switch_path)
    spin(loop)
    peer.close()
    os.unlink(peer_path)
    os.symlink(switch_path, peer_path)
    one = frame(BROADCAST, mac(MAC_A), b"one broadcast")
    a.send(one)
    spin(loop, 20)
    assert a.received() == [] and b.received() == [one]
    assert a.device.info()["switch_ports"] == 2
    # A datagram from the switch's own socket (another way round to itself) is dropped.
    sock = switch.Switch._hosted[switch_path].sock
    sock.sendto(frame(BROADCAST, mac("52:54:00:00:00:ee"), b"me"), switch_path)
    spin(loop)
    assert b.received() == [] and a.device.info()["switch_dropped"] == 1


def test_a_peer_cannot_join_two_switches_or_join_through_a_symlink(tmp_path, loop):
    """A peer keeps its socket and puts a symlink to another switch of the daemon at its
    address: that switch got the frames and joined the first as a remote port (isolated
    VMs joined); the frames now go to the peer's own socket. A sender whose address is a
    symlink, or a switch's socket, when it joins is refused, its datagrams dropped and
    counted."""
    one, two = str(tmp_path / "one.sock"), str(tmp_path / "two.sock")
    a = Nic(loop, f"switch:{one}", mac_=MAC_A)
    b = Nic(loop, f"switch:{two}", mac_=MAC_B)
    a.post_rx(8)
    b.post_rx(8)
    peer_path = str(tmp_path / "peer.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(peer_path)
    peer.settimeout(10)
    peer.sendto(b"", one)
    spin(loop)
    os.unlink(peer_path)
    os.symlink(two, peer_path)
    hello = frame(BROADCAST, mac(MAC_A), b"hello")
    a.send(hello)
    spin(loop, 20)
    assert peer.recv(2048) == hello and b.received() == []
    assert b.device.info()["switch_ports"] == 1
    answer = frame(mac(MAC_A), mac("52:54:00:00:00:ee"), b"answer")
    peer.sendto(answer, two)
    spin(loop)
    assert b.received() == [] and b.device.info()["switch_dropped"] == 1
    os.unlink(peer_path)                # a hard link to the switch's socket: refused too
    os.link(two, peer_path)
    peer.sendto(answer, two)
    spin(loop)
    assert b.received() == [] and b.device.info()["switch_dropped"] == 2
    assert b.device.info()["switch_ports"] == 1
    peer.close()
    a.close()
    b.close()


def test_a_remote_frame_from_a_vm_mac_or_a_multicast_source_is_dropped(pair, tmp_path, loop):
    """A host process could send to b as a (a's locked MAC as source), or from a multicast
    source; both are dropped and counted, and its own frames still go through."""
    a, b = pair
    b.post_rx(8)
    peer_mac = mac("52:54:00:00:00:ee")
    peer = joined_peer(tmp_path, loop, "peer.sock", peer_mac)
    b.received()
    switch_path = str(tmp_path / "switch.sock")
    honest = frame(mac(MAC_B), peer_mac, b"me")
    for source in (mac(MAC_A), mac("01:00:5e:00:00:01")):
        peer.sendto(frame(mac(MAC_B), source, b"spoofed"), switch_path)
    peer.sendto(honest, switch_path)
    spin(loop)
    assert b.received() == [honest] and b.device.info()["switch_dropped"] == 2
    peer.close()


def test_a_datagram_larger_than_the_switch_takes_is_counted(pair, tmp_path, loop):
    a, b = pair
    b.post_rx(8)
    peer = joined_peer(tmp_path, loop, "peer.sock", mac("52:54:00:00:00:ee"))
    b.received()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    giant = frame(BROADCAST, mac("52:54:00:00:00:ee"), bytes(switch.MAX_DATAGRAM))
    peer.sendto(giant, str(tmp_path / "switch.sock"))
    spin(loop)
    assert b.received() == [] and b.device.info()["switch_dropped"] == 1
    peer.close()


def test_senders_past_the_limit_or_unbound_are_dropped_and_counted(pair, tmp_path, loop):
    """The 65th peer's frames were forwarded, anonymously (no answer could reach it), and
    an unbound sender's too; both are dropped and counted now."""
    a, b = pair
    a.post_rx(8)
    switch_path = str(tmp_path / "switch.sock")
    peers = []
    for i in range(switch.MAX_REMOTES):
        peers.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        peers[-1].bind(str(tmp_path / f"p{i}.sock"))
        peers[-1].sendto(b"", switch_path)
        spin(loop, 1)
    late = joined_peer(tmp_path, loop, "late.sock", mac("52:54:00:00:00:99"))
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unbound.sendto(frame(mac(MAC_A), mac("52:54:00:00:00:98"), b"unbound"), switch_path)
    spin(loop)
    assert a.received() == []
    info = a.device.info()
    assert info["switch_ports"] == 2 + switch.MAX_REMOTES and info["switch_dropped"] == 2
    for sock in (*peers, late, unbound):
        sock.close()


# -- flow control: a remote peer whose socket is full ---------------------------------------------

def joined_peer(tmp_path, loop, name, peer_mac, connected=False):
    """A remote port that joined the switch and made the switch learn ``peer_mac``;
    ``connected``: its socket connected to the switch's (as socat's is)."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(str(tmp_path / name))
    peer.setblocking(False)
    if connected:
        peer.connect(str(tmp_path / "switch.sock"))
    peer.sendto(frame(BROADCAST, peer_mac, b"here"), str(tmp_path / "switch.sock"))
    spin(loop)
    return peer


def drain(peer, into):
    """Every datagram waiting at ``peer``, appended to ``into``."""
    while True:
        try:
            into.append(peer.recv(65536))
        except BlockingIOError:
            return


def until(loop, condition, what, timeout=60):
    """Run the loop until ``condition()``; a generous deadline (a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        loop.run_once(0.01)


def start_flood(nic, count):
    """``count`` broadcasts posted on ``nic``'s transmit queue at once: the frames, and
    the number of chains used at once."""
    flood = [frame(BROADCAST, nic.device.mac, b"%04d" % i) for i in range(count)]
    for f in flood:
        nic.tx.post(readable=[HDR + f])
    nic.tx.notify()
    return flood, len(nic.tx.get_used())


def flood_through(loop, sender, receiver, used, count, what):
    """Run the loop until ``count`` of ``sender``'s transmit chains (``used`` of them
    already) are used; the frames ``receiver`` got meanwhile."""
    got = []
    def done():
        nonlocal used
        used += len(sender.tx.get_used())
        got.extend(receiver.received())
        return used == count
    until(loop, done, what)
    return got


@pytest.fixture
def small_queues(monkeypatch):
    monkeypatch.setattr(egress, "QUEUE_FRAMES", 8)


def test_link_down_completes_the_chains_waiting_for_a_busy_peer(pair, tmp_path, loop,
                                                                small_queues):
    """QEMU drops the transmit queue when the link goes down: the guest gets its buffers."""
    a, _ = pair
    peer_mac = mac("52:54:00:00:00:ee")
    peer = joined_peer(tmp_path, loop, "peer.sock", peer_mac)
    frames = [frame(peer_mac, mac(MAC_A), b"%04d" % i + bytes(1400)) for i in range(200)]
    for f in frames:
        a.tx.post(readable=[HDR + f])
    a.tx.notify()
    used = len(a.tx.get_used())
    assert used < len(frames) and a.device.info()["tx_waiting"]
    sent = a.device.counters["tx_frames"]
    a.device.set_link(False)
    assert used + len(a.tx.get_used()) == len(frames) and not a.device.info()["tx_waiting"]
    assert a.device.counters["tx_frames"] == len(frames)
    assert a.device.counters["tx_dropped"] == len(frames) - sent
    peer.close()


@pytest.mark.parametrize("connected", [False, True], ids=["writability", "retry-timer"])
def test_a_slow_peer_gets_every_frame_in_order(pair, tmp_path, loop, small_queues, connected):
    """A peer connected to the switch cannot be watched for writability (the switch's probe
    socket cannot connect to it): it is retried on a timer; the result is the same."""
    a, b = pair
    b.post_rx(8)
    peer_mac = mac("52:54:00:00:00:ee")
    peer = joined_peer(tmp_path, loop, "peer.sock", peer_mac, connected)
    frames = [frame(peer_mac, mac(MAC_A), b"%04d" % i + bytes(1400)) for i in range(200)]
    for f in frames:
        a.tx.post(readable=[HDR + f])
    a.tx.notify()
    used = len(a.tx.get_used())
    # The peer's socket (net.unix.max_dgram_qlen) and its queue in the switch are full: the
    # rest of the chains wait in the guest's queue, unused; nothing was dropped.
    info = a.device.info()
    assert used < len(frames) and info["tx_waiting"] and info["switch_queued"] == 8
    assert info["tx_dropped"] == info["switch_dropped"] == 0 and info["switch_stalled"] == 0
    got = []
    def done():                                        # the peer reads, slower than sent
        nonlocal used
        drain(peer, got)
        used += len(a.tx.get_used())
        return len(got) >= len(frames) and used == len(frames)
    until(loop, done, "the slow peer's frames")
    assert got == frames                               # all of them, in order, once
    info = a.device.info()
    assert info["tx_frames"] == len(frames) and not info["tx_waiting"]
    assert info["tx_dropped"] == info["switch_dropped"] == info["switch_queued"] == 0
    assert b.received() == [frame(BROADCAST, peer_mac, b"here")]   # not the unicast
    peer.close()


def test_a_guest_that_barely_posts_receive_buffers_holds_its_senders_once(tmp_path, loop,
                                                                          monkeypatch):
    """b's pending frames are full and its guest posts one receive buffer every 0.1 s:
    progress each time, so "took no frame for stall_seconds" never came, and a's broadcasts
    waited for b to reach half its room (seconds each time, for ever), a's frames to c too.
    Now a port that keeps a sender waiting stall_seconds is stalled as well: frames to it
    are dropped and counted, and the others flow."""
    monkeypatch.setattr(switch.Switch, "stall_seconds", 0.2)
    path = str(tmp_path / "switch.sock")
    a = Nic(loop, f"switch:{path}", mac_="52:54:00:00:00:01")
    b = Nic(loop, f"switch:{path}", mac_="52:54:00:00:00:02", rx_pending=4)
    c_ = Nic(loop, f"switch:{path}", mac_="52:54:00:00:00:03")
    c_.post_rx(64)
    flood, used = start_flood(a, 41)
    trickle = time.monotonic()

    def done():
        nonlocal used, trickle
        if time.monotonic() - trickle >= 0.1:
            b.post_rx(1)
            trickle = time.monotonic()
        used += len(a.tx.get_used())
        return used == len(flood)
    until(loop, done, "a's broadcasts past the trickling b", timeout=30)
    assert c_.received() == flood                 # c lost nothing, in order
    assert a.device.info()["switch_stalls"] >= 1
    for nic in (a, b, c_):
        nic.close()


def test_a_peer_that_never_reads_holds_nobody(tmp_path, loop, small_queues, monkeypatch):
    monkeypatch.setattr(switch.Switch, "stall_seconds", 0.2)
    path = str(tmp_path / "switch.sock")
    a, b, c_ = (Nic(loop, f"switch:{path}", mac_=f"52:54:00:00:00:0{i}") for i in (1, 2, 3))
    c_.post_rx(64)
    dead = joined_peer(tmp_path, loop, "dead.sock", mac("52:54:00:00:00:dd"))
    flood, used = start_flood(a, 60)
    assert used < len(flood) and a.device.info()["tx_waiting"]
    # Another VM's traffic (b -> c) does not wait for the dead peer.
    b.send(frame(mac("52:54:00:00:00:03"), mac("52:54:00:00:00:02"), b"meanwhile"))
    spin(loop)
    got = c_.received()
    assert frame(mac("52:54:00:00:00:03"), mac("52:54:00:00:00:02"), b"meanwhile") in got
    # After stall_seconds without progress the peer is stalled: a's flood goes on (to b and
    # c), the frames for the dead peer are dropped and counted, its queue stays bounded.
    got += flood_through(loop, a, c_, used, len(flood), "a's flood past the stalled peer")
    info = a.device.info()
    assert info["switch_stalled"] == 1 and info["switch_queued"] == 8
    assert info["switch_dropped"] > 0 and info["tx_dropped"] == 0
    assert [f for f in got if f in flood] == flood     # c lost nothing, in order
    # The dead peer reads at last: the oldest frames, in order, then it is unstalled.
    arrived = []
    drain(dead, arrived)
    until(loop, lambda: drain(dead, arrived) or a.device.info()["switch_stalled"] == 0,
          "the stalled peer drained")
    drain(dead, arrived)
    assert arrived == flood[:len(arrived)] and len(arrived) > 8
    late = frame(BROADCAST, mac("52:54:00:00:00:01"), b"late")
    a.send(late)
    spin(loop)
    drain(dead, arrived)
    assert arrived[-1] == late
    # A peer that goes away with frames queued is forgotten; its queue too.
    dead.close()
    for f in flood[:40]:
        a.tx.post(readable=[HDR + f])
    a.tx.notify()
    until(loop, lambda: a.device.info()["switch_ports"] == 3 and not a.device.info()["tx_waiting"],
          "the closed peer forgotten")
    for nic in (a, b, c_):
        nic.close()


def test_a_reset_forgets_the_waiting_chain(pair, tmp_path, loop, small_queues):
    a, _ = pair
    peer_mac = mac("52:54:00:00:00:ee")
    peer = joined_peer(tmp_path, loop, "peer.sock", peer_mac)
    for i in range(40):
        a.tx.post(readable=[HDR + frame(peer_mac, mac(MAC_A), b"%04d" % i)])
    a.tx.notify()
    assert a.device.info()["tx_waiting"]
    a.driver.reset()                                   # the chain was never used: forgotten
    assert not a.device.info()["tx_waiting"]
    a.rx, a.tx = a.driver.init([net.RX, net.TX])
    got = []
    until(loop, lambda: drain(peer, got) or a.device.info()["switch_queued"] == 0,
          "the queued frames")                          # the peer's room wakes a: nothing to do
    after = frame(peer_mac, mac(MAC_A), b"after the reset")
    assert len(a.send(after)) == 1
    spin(loop)
    drain(peer, got)
    assert got[-1] == after and got[:-1] == [frame(peer_mac, mac(MAC_A), b"%04d" % i)
                                             for i in range(len(got) - 1)]
    assert a.device.context.status & c.STATUS_DEVICE_NEEDS_RESET == 0
    peer.close()


def send_each(sock, frames, path, loop):
    """Send ``frames`` from a remote port's socket, the loop run after each: never
    refused (BlockingIOError), as the switch reads on whatever the destinations."""
    for f in frames:
        sock.sendto(f, path)
        loop.run_once(0)


def test_a_remote_sender_is_not_held_by_a_slow_remote_receiver(pair, tmp_path, loop,
                                                               small_queues):
    """The switch's one socket is every remote sender's: it is read on, the frames the
    slow receiver's socket and queue cannot take are dropped and counted."""
    a, b = pair
    a.post_rx(64)
    slow_mac, sender_mac = mac("52:54:00:00:00:e1"), mac("52:54:00:00:00:e2")
    slow = joined_peer(tmp_path, loop, "slow.sock", slow_mac)
    sender = joined_peer(tmp_path, loop, "sender.sock", sender_mac)
    a.received()
    drain(slow, [])                     # the sender's joining broadcast
    frames = [frame(slow_mac, sender_mac, b"%04d" % i + bytes(1000)) for i in range(100)]
    send_each(sender, frames, str(tmp_path / "switch.sock"), loop)
    got = []
    until(loop, lambda: drain(slow, got) or a.device.info()["switch_queued"] == 0,
          "the slow receiver's queue")
    drain(slow, got)
    assert 8 < len(got) < len(frames) and got == frames[:len(got)]
    assert a.device.info()["switch_dropped"] == len(frames) - len(got)
    slow.close()
    sender.close()


def test_a_full_vm_port_holds_no_remote_sender(tmp_path, loop, monkeypatch):
    """b's guest posts no receive buffers: p1's frames for b are dropped once b's pending
    frames are full, and p2's frame for c is read at once (the switch stopped reading its
    socket, for every remote sender, until b was stalled)."""
    monkeypatch.setattr(switch.Switch, "stall_seconds", 3600)
    path = str(tmp_path / "switch.sock")
    b = Nic(loop, f"switch:{path}", mac_=MAC_B, rx_pending=4)
    c_ = Nic(loop, f"switch:{path}", mac_="52:54:00:00:00:0c")
    c_.post_rx(8)
    p1 = joined_peer(tmp_path, loop, "p1.sock", mac("52:54:00:00:00:e1"))
    p2 = joined_peer(tmp_path, loop, "p2.sock", mac("52:54:00:00:00:e2"))
    c_.received()
    to_b = [frame(mac(MAC_B), mac("52:54:00:00:00:e1"), b"%03d" % i) for i in range(20)]
    send_each(p1, to_b, path, loop)
    to_c = frame(mac("52:54:00:00:00:0c"), mac("52:54:00:00:00:e2"), b"for c")
    p2.sendto(to_c, path)
    spin(loop)
    assert c_.received() == [to_c]
    info = b.device.info()          # the joins' broadcasts took 2 of b's 4 pending frames
    assert info["rx_pending"] == 4 and info["rx_dropped"] == 2 + len(to_b) - 4
    assert info["switch_stalled"] == 0
    b.post_rx(8)
    spin(loop)
    assert b.received()[2:] == to_b[:2]
    p1.close()
    p2.close()
    b.close()
    c_.close()


def a_sends_to_a_full_b(tmp_path, loop, monkeypatch):
    """a sends 10 frames to b, whose guest posts no receive buffers (4 pending frames) and
    is stalled after 0.2 s: a, b, the frames, and a's chains used at once (4)."""
    monkeypatch.setattr(switch.Switch, "stall_seconds", 0.2)
    path = str(tmp_path / "switch.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A)
    b = Nic(loop, f"switch:{path}", mac_=MAC_B, rx_pending=4)
    frames = [frame(mac(MAC_B), mac(MAC_A), b"%03d" % i) for i in range(10)]
    used = len(a.send(*frames))
    assert used == 4 and a.device.info()["tx_waiting"]
    return a, b, frames, used


def test_a_port_full_again_soon_after_its_stall_is_stalled_at_once(tmp_path, loop,
                                                                   monkeypatch, caplog):
    """b's guest lets its pending frames fill, takes them all, lets them fill again: its
    senders waited stall_seconds the first time only, not every time (hysteresis); the
    warning names b's device and MAC."""
    monkeypatch.setattr(switch.Switch, "sticky_seconds", 3600)
    a, b, frames, used = a_sends_to_a_full_b(tmp_path, loop, monkeypatch)
    flood_through(loop, a, b, used, len(frames), "a's frames past the stalled b")
    b.post_rx(8)
    spin(loop)
    assert b.received() == frames[:4] and b.device.info()["switch_stalled"] == 0
    monkeypatch.setattr(switch.Switch, "stall_seconds", 3600)   # a wait now is for ever
    assert len(a.send(*frames)) == len(frames)    # b is stalled at once: a did not wait
    info = b.device.info()
    assert info["switch_stalled"] == 1 and info["switch_stalls"] == 2
    assert not a.device.info()["tx_waiting"]
    warnings = [r.getMessage() for r in caplog.records if "frames to it are dropped" in r.message]
    assert len(warnings) == 2 and all(f"net@irq{b.device.context.intid} ({MAC_B})" in w
                                      for w in warnings)
    a.close()
    b.close()


# -- flow control: a guest that posts no receive buffers -------------------------------------------

def test_a_guest_that_posts_receive_buffers_late_gets_every_frame_in_order(tmp_path, loop,
                                                                         monkeypatch):
    monkeypatch.setattr(switch.Switch, "stall_seconds", 3600)   # late, not stalled
    path = str(tmp_path / "switch.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A)
    b = Nic(loop, f"switch:{path}", mac_=MAC_B, rx_pending=4)
    frames = [frame(mac(MAC_B), mac(MAC_A), b"%03d" % i) for i in range(40)]
    used = len(a.send(*frames))
    spin(loop)
    # b's pending frames are full: a's chains wait, unused; nothing is dropped.
    assert used == 4 and a.device.info()["tx_waiting"]
    assert b.device.info()["rx_pending"] == 4 and b.device.counters["rx_dropped"] == 0
    got, posted = [], 0
    def done():
        """b's guest posts a few buffers at a time, late (one frame per buffer)."""
        nonlocal used, posted
        used += len(a.tx.get_used())
        got.extend(b.received())
        if posted - len(got) < 6:
            b.post_rx(3)
            posted += 3
        return len(got) == len(frames)
    until(loop, done, "b's late receive buffers filled")
    assert used == len(frames) and got == frames       # every frame, in order, once
    info = b.device.info()
    assert info["rx_dropped"] == info["switch_dropped"] == info["switch_stalled"] == 0
    a.close()
    b.close()


def test_a_guest_that_never_posts_receive_buffers_holds_nobody(tmp_path, loop, monkeypatch):
    monkeypatch.setattr(switch.Switch, "stall_seconds", 0.2)
    path = str(tmp_path / "switch.sock")
    a, b, c_ = (Nic(loop, f"switch:{path}", mac_=f"52:54:00:00:00:0{i}", rx_pending=4)
                for i in (1, 2, 3))
    c_.post_rx(200)
    flood, used = start_flood(a, 60)
    assert used < len(flood) and a.device.info()["tx_waiting"]
    # Other traffic (c -> a) does not wait for b.
    a.post_rx(8)
    c_.send(frame(mac("52:54:00:00:00:01"), mac("52:54:00:00:00:03"), b"meanwhile"))
    spin(loop)
    assert a.received() == [frame(mac("52:54:00:00:00:01"), mac("52:54:00:00:00:03"),
                                  b"meanwhile")]
    # After stall_seconds b is stalled: a's flood goes on, frames for b are dropped and
    # counted, b's memory is its pending frames.
    got = flood_through(loop, a, c_, used, len(flood), "a's flood past the stalled guest")
    info = b.device.info()
    assert info["switch_stalled"] == 1 and info["rx_pending"] == 4
    assert info["rx_dropped"] == len(flood) - 4 and a.device.counters["tx_dropped"] == 0
    assert got == flood                                # c lost nothing, in order
    # A host process sending to the stalled guest is read on (its frames counted) and
    # its frames for c are not held.
    peer_mac = mac("52:54:00:00:00:ee")
    peer = joined_peer(tmp_path, loop, "peer.sock", peer_mac)
    to_b = [frame(mac("52:54:00:00:00:02"), peer_mac, b"b%03d" % i) for i in range(20)]
    to_c = frame(mac("52:54:00:00:00:03"), peer_mac, b"for c")
    send_each(peer, to_b + [to_c], path, loop)
    until(loop, lambda: got.extend(c_.received()) or to_c in got, "the peer's frame for c")
    assert b.device.info()["rx_dropped"] == len(flood) - 4 + 1 + len(to_b)   # + the join
    # b's guest posts buffers at last: its oldest frames, then it is unstalled.
    b.post_rx(8)
    spin(loop)
    assert b.received() == flood[:4]
    assert b.device.info()["switch_stalled"] == 0 and info["switch_stalls"] == 1
    a.send(flood[0])
    spin(loop)
    assert b.received() == [flood[0]]
    peer.close()
    for nic in (a, b, c_):
        nic.close()


def test_a_guest_that_stops_posting_receive_buffers_holds_nobody(tmp_path, loop, monkeypatch):
    """One buffer posted leaves b's pending frames neither full nor drained: a, woken only
    at half of them, still gets past b by the stall rule."""
    a, b, frames, used = a_sends_to_a_full_b(tmp_path, loop, monkeypatch)
    b.post_rx(1)
    spin(loop)
    assert b.received() == frames[:1]
    flood_through(loop, a, b, used, len(frames), "a's frames past the stopped guest")
    assert b.device.info()["switch_stalled"] == 1
    assert b.device.counters["rx_dropped"] == len(frames) - 5
    b.post_rx(8)
    spin(loop)
    assert b.received() == frames[1:5]
    a.close()
    b.close()


def test_stale_switch_socket_file_is_replaced(tmp_path, loop):
    path = tmp_path / "s.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old.bind(str(path))
    old.close()                                              # the file stays
    nic = Nic(loop, f"switch:{path}", mac_=MAC_A)
    nic.close()


def test_switch_path_served_by_someone_else_is_one_line(tmp_path):
    path = tmp_path / "s.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other.bind(str(path))
    with pytest.raises(ConfigError, match="in use") as err:
        NetDevice(f"switch:{path}")
    assert "\n" not in str(err.value)
    other.close()


# -- configuration errors -------------------------------------------------------------------------

def build(tmp_path, table):
    config = parse_config(tmp_path / "vms.toml", {"vm": {"0": {"net": table}}})
    return config.build_device(config.vms[0].devices[0])


@pytest.mark.parametrize("table, message", [
    ({"switch": "/x", "mac": "01:00:5e:00:00:01"}, "multicast"),
    ({"switch": "/x", "mac": "00:00:00:00:00:00"}, "is no address"),
    ({"switch": "/x", "mac": "52:54:00:zz:00:01"}, "not a MAC address"),
    ({"switch": "/x", "mac": "52:54:00:12:34:5 "}, "not a MAC address"),    # int() took these
    ({"switch": "/x", "mac": "+2:54:00:12:34:56"}, "not a MAC address"),
    ({"switch": "/x", "mac": "\uff152:54:00:12:34:56"}, "not a MAC address"),  # full-width 5
    ({"switch": "/x", "mtu": 40}, "mtu: 40 is not an MTU from 68 to 65535"),
    ({"switch": "/nonexistent/dir/s.sock"}, "directory for the switch socket does not exist"),
    ({"tap": "x" * 20}, "is not an interface name"),
])
def test_config_errors_are_one_line(tmp_path, table, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(tmp_path, table)
    assert "\n" not in str(err.value) and "vm.0.net" in str(err.value)


def test_unknown_backend_url_is_one_line():
    with pytest.raises(ConfigError, match=r"unknown net backend 'udp'; use tap: or switch:"):
        NetDevice("udp:1.2.3.4:5")


def test_config_builds_a_switch_device(tmp_path, loop):
    dev = build(tmp_path, {"switch": str(tmp_path / "s.sock"), "mac": MAC_A, "mtu": 9000})
    assert dev.mac == mac(MAC_A) and dev.mtu == 9000 and dev.max_frame == 9018
    dev.detach()


# The "user" case drops to UID 65534 inside the child, after the imports: exec'ing this
# checkout's Python as that user would fail wherever the checkout is not world-readable.
TAP_SCRIPT = """\
import os, sys
from avatar_hw.backends import tap
from avatar_hw.config import parse_config
import avatar_hw.devices.net
c = parse_config('vms.toml', {'vm': {'0': {'net': {'tap': 'avnope0'}}}})
if sys.argv[1] == 'user' and os.geteuid() == 0:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)       # all capabilities go with UID 0
try:
    c.build_device(c.vms[0].devices[0])
except Exception as e:
    print(e)
"""


@pytest.mark.parametrize("drop", ["bounding-set", "user"])
def test_tap_without_cap_net_admin_is_one_line(drop):
    """Root without CAP_NET_ADMIN (setpriv), and an ordinary user."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    argv = [sys.executable, "-c", TAP_SCRIPT, drop]
    if drop == "bounding-set":
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv (util-linux)")
        argv = ["setpriv", "--bounding-set=-net_admin", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if "setpriv" in done.stderr:
        pytest.skip(f"cannot drop privileges: {done.stderr.strip()}")
    assert done.stdout.startswith("vms.toml: vm.0.net: tap:avnope0: "), done.stderr
    assert "CAP_NET_ADMIN" in done.stdout and done.stdout.count("\n") == 1


# -- TAP in a network namespace of its own --------------------------------------------------------

CLONE_NEWNET = 0x40000000


def in_netns(name, function):
    """Run ``function()`` in a thread that entered network namespace ``name`` (fds it opens
    stay in that namespace; this thread's namespace is untouched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = {}

    def run():
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            result["value"] = function()
        except BaseException as err:
            result["error"] = err
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture
def netns():
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    if not shutil.which("ip"):
        pytest.skip("no ip command (iproute2)")
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace and a TAP needs CAP_NET_ADMIN (root)")
    name = f"avtest-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot create a network namespace: {done.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_tap_frames_both_ways_in_a_namespace(netns, loop):
    def make():
        dev = NetDevice("tap:avtap0", mac=MAC_A)
        for cmd in (["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                    ["ip", "link", "set", "avtap0", "up"]):
            subprocess.run(["ip", "netns", "exec", netns, *cmd], check=True)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        sock.bind(("avtap0", 0))
        return dev, sock

    device, raw = in_netns(netns, make)
    nic_bench = VirtioBench(device, loop=loop, ram_size=6 << 20)
    rx, tx = nic_bench.driver.init([net.RX, net.TX])
    raw.settimeout(2)
    try:
        out = frame(BROADCAST, mac(MAC_A), b"from the guest" + bytes(40))
        tx.post(readable=[HDR + out])
        tx.notify()
        assert raw.recv(2048) == out
        rx.post(writable=[4096])
        rx.notify()
        into = frame(mac(MAC_A), mac("52:54:00:00:00:99"), b"from the tap" + bytes(40))
        raw.send(into)
        for _ in range(50):
            loop.run_once(0.05)
            used = rx.get_used()
            if used:
                break
        assert [u.data[12:] for u in used] == [into]
        assert device.counters["rx_frames"] == 1 and device.counters["tx_frames"] == 1
    finally:
        raw.close()
        nic_bench.subsystem.close()
        nic_bench.check_guards()


def test_a_tap_deleted_under_the_daemon_is_left_alone(netns, loop):
    """``ip link del`` of the TAP: its fd stays readable and every read fails (EBADFD); the
    backend stops reading it, once, instead of failing 64 reads at every turn of the loop
    (taken, before, for a frame too big and dropped, for ever)."""
    def make():
        dev = NetDevice("tap:avtap1", mac=MAC_A)
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "avtap1", "up"],
                       check=True)
        return dev

    device = in_netns(netns, make)
    nic_bench = VirtioBench(device, loop=loop, ram_size=6 << 20)
    rx, _ = nic_bench.driver.init([net.RX, net.TX])
    try:
        rx.post(writable=[4096])
        rx.notify()
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "del", "avtap1"], check=True)
        for _ in range(20):
            loop.run_once(0.01)
        assert not loop.watches(device.backend.fd)
        assert device.counters["rx_dropped"] <= 64
    finally:
        nic_bench.subsystem.close()


def test_legacy_driver_without_mergeable_buffers_uses_the_10_byte_header(tmp_path, loop):
    path = str(tmp_path / "s.sock")
    a = Nic(loop, f"switch:{path}", mac_=MAC_A)
    dev = NetDevice(f"switch:{path}", mac=MAC_B)
    bench = VirtioBench(dev, loop=loop, ram_size=6 << 20, legacy=True)
    drv = bench.driver
    drv.reset()
    drv.set_status(c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    drv.features = drv.device_features() & ~bit(net.F_MRG_RXBUF)
    drv.write_driver_features(drv.features)
    rx, tx = drv.setup_legacy_queue(net.RX), drv.setup_legacy_queue(net.TX)
    drv.driver_ok()
    rx.post(writable=[2048])
    rx.notify()
    to_b, to_a = (frame(mac(MAC_B), mac(MAC_A), b"to b"), frame(mac(MAC_A), mac(MAC_B), b"to a"))
    a.post_rx(1)
    a.send(to_b)
    assert [u.data for u in rx.get_used()] == [bytes(10) + to_b]
    tx.post(readable=[bytes(10) + to_a])
    tx.notify()
    assert a.received() == [to_a]
    bench.subsystem.close()
    a.close()
