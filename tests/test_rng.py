"""virtio-rng through the driver-side harness: filling, the per-request bound, the rate limit."""

import errno
import logging
import time

import pytest

from avatar_hw.config import load_config
from avatar_hw.devices import rng as rng_module
from avatar_hw.devices.rng import RngDevice, TokenBucket
from avatar_hw.errors import ConfigError
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import constants as c
from test_console import loop  # noqa: F401 (fixture)


@pytest.fixture
def bench(loop):
    made = []

    def make(**kw):
        b = VirtioBench(RngDevice(**kw), loop=loop, ram_size=4 << 20)
        b.q, = b.driver.init([0], buf_size=8192)
        made.append(b)
        return b
    yield make
    for b in made:
        b.subsystem.close()
        b.check_guards()


def test_identity_and_queue(bench):
    b = bench()
    assert b.driver.read(c.REG_DEVICE_ID) == c.ID_RNG
    assert b.driver.device_features() & 0xFFFFFF == 0          # no device-specific features
    assert b.driver.read(c.REG_QUEUE_NUM_MAX) == rng_module.QUEUE_SIZE


def test_buffers_are_filled_with_random_bytes(bench):
    b = bench()
    b.q.post(writable=[64])
    b.q.post(writable=[1000, 24])
    b.q.notify()
    used = b.q.get_used()
    assert [u.length for u in used] == [64, 1024]
    assert used[0].data != used[1].data[:64]
    assert len(set(used[1].data)) > 100                        # not constant
    assert b.driver.interrupt_status() & c.INT_USED_BUFFER
    assert b.device.counters["bytes_to_guest"] == 1088 and b.device.counters["requests"] == 2


def test_the_device_writes_nothing_past_the_buffers(bench):
    b = bench()
    head = b.q.post(writable=[100])
    gpa = b.q.outstanding[head][1][0][0]
    b.ram.write(gpa + 100, b"\xcc" * 64)
    b.q.notify()
    assert [u.length for u in b.q.get_used()] == [100]
    assert b.ram.read(gpa + 100, 64) == b"\xcc" * 64


def test_bytes_per_request_are_bounded(bench):
    b = bench(max_bytes=100)
    b.q.post(writable=[64, 64])
    b.q.notify()
    [used] = b.q.get_used()
    assert used.length == 100


def test_readable_only_request_is_returned_empty(bench):
    b = bench()
    b.q.post(readable=[b"abc"])
    b.q.post(writable=[8])
    b.q.notify()
    assert [u.length for u in b.q.get_used()] == [0, 8]
    assert b.transport.guest_errors == 1


def test_a_source_that_ends_gives_what_it_had(bench, tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"0123456789")
    b = bench(source=str(short))
    b.q.post(writable=[4, 4, 100])
    b.q.notify()
    [used] = b.q.get_used()
    assert (used.length, used.data) == (10, b"0123456789")


class FailingSource:
    """Gives ``data``, then every read fails with EIO (a hardware RNG that broke)."""

    name = "/dev/hwrng"

    def __init__(self, data):
        self.data = data

    def readinto(self, view):
        if not self.data:
            raise OSError(errno.EIO, "Input/output error")
        n = min(len(view), len(self.data))
        view[:n], self.data = self.data[:n], self.data[n:]
        return n

    def close(self):
        pass


def test_a_failing_source_returns_the_request_with_what_it_read_and_serving_goes_on(bench,
                                                                                    caplog):
    """Old code: the OSError escaped queue_notify (an internal error with a traceback,
    DEVICE_NEEDS_RESET) and the popped request was never returned: Linux waited forever."""
    b = bench()
    b.device.source.close()
    b.device.source = FailingSource(b"0123456789")
    b.q.post(writable=[4, 100])
    b.q.post(writable=[8])
    b.q.notify()
    assert [(u.length, u.data) for u in b.q.get_used()] == [(10, b"0123456789"), (0, b"")]
    assert b.driver.status & c.STATUS_DEVICE_NEEDS_RESET == 0
    assert b.device.queues[0].in_flight == 0 and b.device.counters["errors"] == 2
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == ["vm0 rng@irq48: entropy source /dev/hwrng: Input/output error; request "
                     f"returned with {n} of {w} bytes" for n, w in ((10, 104), (0, 8))]
    assert not any(r.exc_info for r in caplog.records)
    b.device.source.data = b"abcd"                              # the source is back
    b.q.post(writable=[8])
    b.q.notify()
    assert [(u.length, u.data) for u in b.q.get_used()] == [(4, b"abcd")]


def test_rate_limit_delays_requests_in_order_and_never_fails(bench, loop):
    b = bench(rate=2000)
    for _ in range(5):
        b.q.post(writable=[1000])
    start = time.monotonic()
    b.q.notify()
    got = b.q.get_used()
    assert [u.length for u in got] == [1000, 1000]             # the bucket's one second
    while len(got) < 5 and time.monotonic() - start < 60:
        loop.run_once(0.1)
        got += b.q.get_used()
    elapsed = time.monotonic() - start
    assert [u.length for u in got] == [1000] * 5
    assert [u.head for u in got] == sorted(u.head for u in got)
    assert elapsed >= 1.2                                       # 3000 bytes more at 2000/s
    assert b.device.counters["errors"] == 0


def test_reset_drops_the_waiting_request(bench, loop):
    b = bench(rate=100)
    b.q.post(writable=[100])
    b.q.post(writable=[100])
    b.q.notify()
    assert len(b.q.get_used()) == 1
    assert b.device._waiting is not None
    b.driver.reset()
    assert b.device._waiting is None and b.device._timer is None
    loop.run_once(0)


def test_token_bucket():
    now = [0.0]
    bucket = TokenBucket(1000, clock=lambda: now[0])
    assert bucket.take(600) == 600
    assert bucket.take(600) == 0                                # waits for 600, has 400
    assert bucket.delay(600) == pytest.approx(0.2)
    now[0] = 0.2
    assert bucket.take(600) == 600
    now[0] = 10.0
    assert bucket.take(5000) == 1000                            # at most one second's worth


def test_config_builds_rng_and_rejects_bad_numbers(tmp_path):
    path = tmp_path / "vms.toml"
    path.write_text("[vm.0]\nrng = { max_bytes = 64, rate = 1000 }\n")
    config = load_config(path)
    device = config.build_device(config.vms[0].devices[0])
    try:
        assert (device.max_bytes, device.bucket.rate) == (64, 1000)
    finally:
        device.detach()
    path.write_text("[vm.0]\nrng = { max_bytes = 0 }\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: vm.0.rng.max_bytes: must be positive, not 0"
