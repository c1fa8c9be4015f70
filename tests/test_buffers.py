"""The guest-buffer helpers (avatar_hw/virtio/buffers.py): empty views never reach a system
call, more than IOV_MAX views are moved in batches, short counts are continued."""

import os

from avatar_hw.virtio import buffers
from avatar_hw.virtio.buffers import IOV_MAX

PATTERN = bytes(range(256)) * 16


def test_transfer_batches_iov_max_views_and_loops_on_short_transfers(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(PATTERN[:3000])
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytearray(3000)
        views = [memoryview(buf)[i:i + 1] for i in range(3000)]   # > IOV_MAX views
        assert buffers.transfer(os.preadv, fd, views, 0) == 3000 and buf == PATTERN[:3000]
        calls = []

        def short_pwritev(fd_, bufs, offset):             # the kernel may write less
            calls.append(len(bufs))
            return os.pwritev(fd_, [bytes(bufs[0])[:7]], offset)
        data = bytearray(b"abcdefghijklmnopqrstuvwxyz")
        assert buffers.transfer(short_pwritev, fd, [memoryview(data)[:10],
                                                    memoryview(data)[10:]], 100) == 26
        assert path.read_bytes()[100:126] == data and len(calls) == 5
    finally:
        os.close(fd)


def test_empty_views_never_reach_a_system_call(tmp_path):
    """IOV_MAX empty views first: a preadv of them would return 0 (taken as end of file)."""
    path = tmp_path / "f"
    path.write_bytes(PATTERN)
    buf = bytearray(100)
    views = [memoryview(buf)[:0]] * (2 * IOV_MAX + 3) + [memoryview(buf)]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert buffers.transfer(os.preadv, fd, views, 0) == 100 and buf == PATTERN[:100]
    finally:
        os.close(fd)
    assert [len(b) for b in buffers.batches(views)] == [1]
    assert buffers.first_batch([memoryview(buf)[:0]] * 5) == []


def test_skip_truncate_copy_fill():
    data = bytearray(b"0123456789")
    views = [memoryview(data)[:3], memoryview(data)[3:3], memoryview(data)[3:]]
    assert [bytes(v) for v in buffers.skip(views, 4)] == [b"456789"]
    assert [bytes(v) for v in buffers.truncate(views, 5)] == [b"012", b"34"]
    out = bytearray(12)
    target = [memoryview(out)[:0]] * 3 + [memoryview(out)[:5], memoryview(out)[5:]]
    assert buffers.copy(views, target) == 10 and out[:10] == data
    assert buffers.copy(views, [memoryview(bytearray(4))]) == 10      # does not fit
    buffers.fill_zeros(target)
    assert out == bytes(12)
    assert sum(len(v) for v in buffers.zeros(200000)) == 200000


def test_scatter_at_writes_on_from_a_position_across_views():
    """``scatter_at``: from byte ``at`` of ``views[index]``, across views (past an empty one),
    returning the position after; a record ending a view leaves the position at the next."""
    buf = bytearray(20)
    whole = memoryview(buf)
    views = [whole[0:10], whole[10:10], whole[10:12], whole[12:20]]
    assert buffers.scatter_at(b"abcdefgh", views, 0, 6) == (3, 2)
    assert buffers.scatter_at(b"ijklmn", views, 3, 2) == (4, 0)
    assert buf == bytes(6) + b"abcdefghijklmn"
    assert buffers.scatter_at(b"", views, 0, 0) == (0, 0)
