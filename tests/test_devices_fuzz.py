"""Random request contents and layouts for block, rng, net, 9p and vsock (the ring-level
fuzzing is in test_fuzz): no error escapes into the trap path, no access leaves the VM,
every chain is completed once with a used length inside its writable part, the image
changes only where a successful write or zeroing said so, and the device still serves a
good request afterwards."""

import os
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from avatar_hw.backends import p9fs
from avatar_hw.devices import block as blk
from avatar_hw.devices import net, vsock
from avatar_hw.devices.block import BlockDevice
from avatar_hw.devices.net import NetDevice
from avatar_hw.devices.p9 import P9Device
from avatar_hw.devices.rng import RngDevice
from avatar_hw.devices.vsock import VsockDevice
from avatar_hw.loop import EventLoop
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import constants as c
from test_fuzz import FUZZ, no_internal_errors

SECTORS = 64
TYPES = st.one_of(st.sampled_from([blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID,
                                   blk.T_DISCARD, blk.T_WRITE_ZEROES]),
                  st.integers(0, 0xFFFFFFFF))
SECTOR = st.one_of(st.integers(0, SECTORS + 2), st.integers(0, 2**64 - 1))
SIZES = st.one_of(st.integers(0, 1100), st.sampled_from([0, 1, 15, 16, 17, 512, 513, 1024]))
# a request: header fields, extra readable bytes, readable split points, writable sizes
BODY = st.one_of(st.binary(max_size=1100),          # whole sectors, so that writes succeed
                 st.tuples(st.integers(0, 2), st.integers(0, 255)).map(
                     lambda t: bytes([t[1]]) * (512 * t[0])))
REQUEST = st.tuples(TYPES, SECTOR, st.integers(0, 0xFFFFFFFF), BODY,
                    st.lists(st.integers(0, 1200), max_size=3),
                    st.lists(SIZES, max_size=4))
SEGMENTS = st.lists(st.tuples(SECTOR, st.one_of(st.integers(0, 80), st.integers(0, 2**32 - 1)),
                              st.integers(0, 3)), max_size=3)


def post(q, ram, at, readable, writable):
    """A chain of ``readable`` byte strings then ``writable`` sizes at ``at``; its head."""
    segments = []
    for data in readable:
        ram.write(at, data)
        segments.append((at, len(data), False))
        at += len(data) + 16
    for size in writable:
        segments.append((at, size, True))
        at += size + 16
    return q.add_chain(segments) if segments else None


def split(data, points):
    cuts = sorted({min(p, len(data)) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(cuts, cuts[1:])] or [data]


@FUZZ
@given(requests=st.lists(REQUEST, min_size=1, max_size=6), segments=SEGMENTS,
       readonly=st.booleans(), drop_flush=st.booleans())
def test_block_random_requests(tmp_path_factory, requests, segments, readonly, drop_flush):
    image = tmp_path_factory.mktemp("fuzz") / "disk.img"
    before = bytes((i * 11) % 256 for i in range(SECTORS * 512))
    image.write_bytes(before)
    bench = VirtioBench(BlockDevice(image, readonly=readonly), ram_size=1 << 20)
    try:
        with no_internal_errors():
            q, = bench.driver.init([0], drop=blk.bit(blk.F_FLUSH) if drop_flush else 0,
                                   buf_size=0, size=16)
            scratch = bench.ram.alloc(256 << 10, 4096)
            expected = bytearray(before)
            for kind, sector, reserved, extra, cuts, writable in requests:
                body = extra
                if kind in (blk.T_DISCARD, blk.T_WRITE_ZEROES) and segments:
                    body = b"".join(blk.SEGMENT.pack(*s) for s in segments)
                readable = split(blk.HEADER.pack(kind, reserved, sector) + body, cuts)
                head = post(q, bench.ram, scratch, readable, writable)
                q.notify()
                [used] = q.get_used()
                # every writable byte: what a request does not fill is zeroed
                assert used.head == head and used.length == sum(writable)
                if not sum(writable):
                    assert used.length == 0
                    continue
                last = max(i for i, s in enumerate(writable) if s)
                status = bench.ram.read(used.segments[len(readable) + last][0]
                                        + writable[last] - 1, 1)[0]
                assert status in (blk.S_OK, blk.S_IOERR, blk.S_UNSUPP)
                if status == blk.S_OK and kind == blk.T_OUT:
                    expected[sector * 512:sector * 512 + len(body)] = body
                if status == blk.S_OK and kind == blk.T_WRITE_ZEROES:
                    for start, num, _ in segments:
                        expected[start * 512:(start + num) * 512] = bytes(num * 512)
                if status == blk.S_OK and kind == blk.T_DISCARD:
                    for start, num, _ in segments:      # discarded: any content allowed
                        expected[start * 512:(start + num) * 512] = \
                            image.read_bytes()[start * 512:(start + num) * 512]
            assert image.read_bytes() == bytes(expected)
            # still serving: a good read
            post(q, bench.ram, scratch, [blk.HEADER.pack(blk.T_IN, 0, 1)], [512, 1])
            q.notify()
            [used] = q.get_used()
            assert used.length == 513 and used.data == bytes(expected[512:1024]) + b"\0"
    finally:
        bench.subsystem.close()
    bench.check_guards()


@FUZZ
@given(requests=st.lists(st.tuples(st.lists(st.binary(max_size=64), max_size=2),
                                   st.lists(SIZES, max_size=4)), min_size=1, max_size=8),
       max_bytes=st.integers(1, 2048))
def test_rng_random_requests(requests, max_bytes):
    bench = VirtioBench(RngDevice(max_bytes=max_bytes), ram_size=1 << 20)
    try:
        with no_internal_errors():
            q, = bench.driver.init([0], buf_size=0, size=16)
            scratch = bench.ram.alloc(128 << 10, 4096)
            for readable, writable in requests:
                head = post(q, bench.ram, scratch, readable, writable)
                if head is None:
                    continue
                q.notify()
                [used] = q.get_used()
                assert used.head == head
                assert used.length == min(sum(writable), max_bytes)
    finally:
        bench.subsystem.close()
    bench.check_guards()


FRAME = st.binary(min_size=0, max_size=1600)


@FUZZ
@given(tx=st.lists(st.tuples(st.binary(min_size=0, max_size=14), FRAME, st.lists(
           st.integers(0, 1700), max_size=2)), max_size=6),
       rx_sizes=st.lists(st.one_of(st.integers(0, 2000), st.sampled_from([0, 11, 12, 13])),
                         max_size=10),
       mergeable=st.booleans())
def test_net_random_transmits_and_receive_buffers(tmp_path_factory, tx, rx_sizes, mergeable):
    path = str(tmp_path_factory.mktemp("fuzz") / "switch.sock")
    loop = EventLoop()
    a = VirtioBench(NetDevice(f"switch:{path}", mac="52:54:00:00:00:0a"), loop=loop,
                    ram_size=1 << 20)
    b = VirtioBench(NetDevice(f"switch:{path}", mac="52:54:00:00:00:0b"), loop=loop,
                    ram_size=1 << 20)
    drop = 0 if mergeable else net.bit(net.F_MRG_RXBUF)
    try:
        with no_internal_errors():
            _, a_tx = a.driver.init([net.RX, net.TX], drop=drop, buf_size=0, size=16)
            b_rx, _ = b.driver.init([net.RX, net.TX], drop=drop, buf_size=0, size=16)
            a_scratch = a.ram.alloc(256 << 10, 4096)
            b_scratch = b.ram.alloc(256 << 10, 4096)
            posted = []
            at = b_scratch
            for size in rx_sizes:
                posted.append(post(b_rx, b.ram, at, [], [size]))
                at += size + 16
            b_rx.notify()
            for header, frame, cuts in tx:
                head = post(a_tx, a.ram, a_scratch, split(header + frame, cuts), [])
                a_tx.notify()
                [used] = a_tx.get_used()
                assert used.head == head and used.length == 0
                loop.run_once(0)
            used = b_rx.get_used()
            for u in used:
                size = u.segments[0][1]
                assert u.length <= size
                if u.length:                  # a header, flags 0, then (part of) a frame
                    assert u.length >= 12 and u.data[0] == 0
            assert {u.head for u in used} <= set(posted)
            assert len(used) == len({u.head for u in used})
            counters = a.device.counters
            assert counters["tx_frames"] + counters["tx_malformed"] == len(tx)
    finally:
        a.subsystem.close()
        b.subsystem.close()
        loop.close()
    a.check_guards()
    b.check_guards()


P9_KINDS = st.sampled_from([p9fs.TVERSION, p9fs.TATTACH, p9fs.TWALK, p9fs.TLOPEN,
                            p9fs.TLCREATE, p9fs.TREAD, p9fs.TWRITE, p9fs.TREADDIR,
                            p9fs.TGETATTR, p9fs.TSETATTR, p9fs.TMKDIR, p9fs.TSYMLINK,
                            p9fs.TUNLINKAT, p9fs.TRENAMEAT, p9fs.TXATTRWALK, p9fs.TCLUNK])
P9_FIELD = st.one_of(st.integers(0, 3).map(lambda v: v.to_bytes(4, "little")),   # fids
                     st.sampled_from([b"\x02\x00..", b"\x01\x00/", b"\x03\x00sub",
                                      b"\x01\x00x", b"\x00\x00", b"\xff\xff"]),
                     st.binary(max_size=24))
P9_MESSAGE = st.tuples(P9_KINDS, st.lists(P9_FIELD, max_size=6), st.integers(-2, 2),
                       st.lists(st.integers(0, 200), max_size=3),
                       st.lists(st.sampled_from([0, 1, 7, 11, 30, 600, 5000]), max_size=3))


@FUZZ
@given(messages=st.lists(P9_MESSAGE, min_size=1, max_size=8))
def test_9p_random_messages_and_layouts(tmp_path_factory, messages):
    """Fields, size words, readable splits and reply room at random after a real attach:
    every chain completed within its writable part, nothing created outside the share."""
    base = tmp_path_factory.mktemp("p9fuzz")
    (base / "share" / "sub").mkdir(parents=True)
    bench = VirtioBench(P9Device(base / "share", tag="t"), ram_size=1 << 20)
    q, = bench.driver.init([0], buf_size=0)
    ram = bench.ram
    at = ram.alloc(256 << 10)
    hello = [struct.pack("<BHI", p9fs.TVERSION, 0, 8192) + b"\x08\x009P2000.L",
             struct.pack("<BHII", p9fs.TATTACH, 0, 1, 0xFFFFFFFF) + bytes(4) + b"\xe8\x03\0\0"]
    hello = [struct.pack("<I", 4 + len(m)) + m for m in hello]
    with no_internal_errors():
        for message in hello:
            post(q, ram, at, [message], [100])
            q.notify()
            assert q.get_used()[0].data[4] in (p9fs.TVERSION + 1, p9fs.TATTACH + 1)
        for kind, fields, size_skew, points, writable in messages:
            body = b"".join(fields)
            size = max(0, 7 + len(body) + size_skew)
            message = struct.pack("<IBH", size, kind, 5) + body
            if post(q, ram, at, split(message, points), writable) is None:
                continue
            q.notify()
            [used] = q.get_used()
            assert used.length <= sum(writable)
            assert used.length == 0 or used.data[4] in (kind + 1, p9fs.TLERROR + 1)
        assert bench.device.server.bug is None
    assert sorted(os.listdir(base)) == ["share"]
    bench.subsystem.close()


PORTS = st.one_of(st.sampled_from([0, 1, 5000, 1 << 30]), st.integers(0, 0xFFFFFFFF))
VSOCK_HEADER = st.tuples(
    st.one_of(st.just(3), st.integers(0, 2**64 - 1)),                    # src_cid
    st.one_of(st.just(2), st.integers(0, 2**64 - 1)),                    # dst_cid
    PORTS, PORTS,
    st.one_of(st.integers(0, 100), st.integers(0, 0xFFFFFFFF)),          # len
    st.one_of(st.just(1), st.integers(0, 0xFFFF)),                       # type
    st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),                # op
    st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))


@FUZZ
@given(packets=st.lists(st.tuples(VSOCK_HEADER, st.binary(max_size=100),
                                  st.lists(st.integers(0, 150), max_size=2)), max_size=8),
       rx_sizes=st.lists(st.one_of(st.integers(0, 200), st.sampled_from([43, 44, 45])),
                         max_size=10))
def test_vsock_random_packets(tmp_path_factory, packets, rx_sizes):
    """Any header, split anywhere: every transmit chain is completed with length 0, every
    receive buffer gets a whole header or nothing, and the device still accepts a good
    connection afterwards."""
    path = tmp_path_factory.mktemp("fuzz") / "v.sock"
    loop = EventLoop()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{path}_5000")
    server.listen(16)
    bench = VirtioBench(VsockDevice(3, str(path)), loop=loop, ram_size=1 << 20)
    try:
        with no_internal_errors():
            rx, tx, _ = bench.driver.init([0, 1, 2], buf_size=0, size=16)
            scratch = bench.ram.alloc(64 << 10, 4096)
            at, posted = scratch + (16 << 10), []
            for size in rx_sizes:
                posted.append(post(rx, bench.ram, at, [], [size]))
                at += size + 16
            rx.notify()
            for header, payload, cuts in packets:
                head = post(tx, bench.ram, scratch,
                            split(vsock.HEADER.pack(*header) + payload, cuts), [])
                tx.notify()
                [used] = tx.get_used()
                assert used.head == head and used.length == 0
                loop.run_once(0)
            for u in rx.get_used():
                assert u.head in posted and u.length in (0, *range(vsock.HEADER_LEN,
                                                                   u.segments[0][1] + 1))
            assert bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET == 0
            # still serving: a good REQUEST gets RESPONSE
            rx.add_chain([(at, 64, True)])
            rx.notify()
            post(tx, bench.ram, scratch, [vsock.HEADER.pack(3, 2, 77, 5000, 0, 1,
                                                             vsock.OP_REQUEST, 0, 4096, 0)], [])
            tx.notify()
            loop.run_once(0)
            answers = [vsock.HEADER.unpack(u.data[:vsock.HEADER_LEN])[6]
                       for u in rx.get_used() if u.length]
            assert vsock.OP_RESPONSE in answers or vsock.OP_RST in answers
    finally:
        bench.subsystem.close()
        server.close()
        loop.close()
    bench.check_guards()
