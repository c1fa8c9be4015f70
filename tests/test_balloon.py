"""virtio-balloon through the driver-side harness: the target and ``actual``, inflate and
deflate with their checks, host memory really released from a shared RAM file, and the
statistics queue."""

import json
import mmap
import os
import struct
import subprocess
import sys
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avatar_hw import control
from avatar_hw.config import load_config
from avatar_hw.devices import balloon as bl
from avatar_hw.devices.balloon import BalloonDevice
from avatar_hw.errors import ConfigError
from avatar_hw.hw.region import Region
from avatar_hw.testing.driver import GuestRam, VirtioDriver
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
from avatar_hw.testing.virtio import RAM_BASE, IrqRecorder, VirtioBench
from avatar_hw.virtio import constants as c
from avatar_hw.virtio.memory import GuestMemory
from avatar_hw.virtio.subsystem import Subsystem
from test_console import loop  # noqa: F401 (fixture)
from test_daemon import Served, console_config
from test_devices_fuzz import post, split
from test_fuzz import FUZZ, no_internal_errors

RAM = 32 << 20
PAGE = 4096
DATA = RAM_BASE + (2 << 20)          # pages the tests balloon (the rings are below)


def pfns(*numbers):
    return struct.pack(f"<{len(numbers)}I", *numbers)


def page_pfn(gpa):
    return gpa // PAGE


@pytest.fixture
def bench(loop):
    made = []

    def make(**kw):
        b = VirtioBench(BalloonDevice(**kw), loop=loop, ram_size=RAM)
        b.inflate, b.deflate, b.stats = b.driver.init([0, 1, 2], size=16)
        made.append(b)
        return b
    yield make
    for b in made:
        b.subsystem.close()
        b.check_guards()


class FileBench:
    """The balloon in a VM whose RAM is a shared file mapping (as QEMU's on the emulated
    board); the driver writes through a second mapping of the same file."""

    def __init__(self, loop, path):
        self.path = path
        with open(path, "wb") as f:
            f.truncate(RAM)
        self.region = Region.map_file(path, RAM)
        self.subsystem = Subsystem(interrupt_line=IrqRecorder(), loop=loop)
        self.subsystem.vm_init(0, GuestMemory(self.region, RAM_BASE))
        self.device = BalloonDevice()
        transport = self.subsystem.create_device(0, self.device)
        fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(fd, RAM, mmap.MAP_SHARED)
        os.close(fd)
        self.ram = GuestRam(self.map, RAM_BASE)
        self.driver = VirtioDriver(self.subsystem.handle_mmio_trap, transport.window, self.ram)
        self.inflate, self.deflate, self.stats = self.driver.init([0, 1, 2], size=16)

    def blocks(self):
        return os.stat(self.path).st_blocks

    def close(self):
        self.subsystem.close()
        self.region.close()
        self.ram._mv.release()
        self.map.close()
        os.unlink(self.path)


@pytest.fixture
def file_bench(loop, tmp_path):
    directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp_path
    b = FileBench(loop, os.path.join(directory, f"avatar-test-balloon-{uuid.uuid4().hex}"))
    yield b
    b.close()


def test_identity_features_and_config(bench):
    b = bench()
    assert b.driver.read(c.REG_DEVICE_ID) == c.ID_BALLOON == 5
    features = b.driver.device_features()
    assert features & 0xFF == (1 << bl.F_STATS_VQ) | (1 << bl.F_DEFLATE_ON_OOM)
    assert [b.driver.read_config(0), b.driver.read_config(4)] == [0, 0]
    plain = bench(stats_interval=0, deflate_on_oom=False)
    assert plain.driver.device_features() & 0xFF == 0


def test_set_target_sets_num_pages_and_interrupts(bench):
    b = bench()
    b.irq.take()
    generation = b.driver.read(c.REG_CONFIG_GENERATION)
    info = b.device.set_target(RAM - (1 << 20))           # 1 MiB into the balloon
    assert b.driver.read_config(0) == 256
    assert info["balloon_target"] == 1 << 20 and info["target"] == RAM - (1 << 20)
    assert b.driver.interrupt_status() & c.INT_CONFIG_CHANGE and b.irq.take()
    assert b.driver.read(c.REG_CONFIG_GENERATION) != generation
    b.device.set_target(10 * RAM)                         # more than the RAM: empty balloon
    assert b.driver.read_config(0) == 0
    b.device.set_target(1)                                # everything but a page's worth
    assert b.driver.read_config(0) == RAM // PAGE - 1
    with pytest.raises(ValueError, match="positive"):
        b.device.set_target(0)
    assert b.device.set_target("16M")["target"] == 16 << 20         # as the command takes it
    for bad in (1.5e6, True, "lots", None, "\uff11\uff16M"):     # full-width digits too
        with pytest.raises(ValueError, match="give bytes"):
            b.device.set_target(bad)


def test_the_same_target_again_interrupts_again(bench):
    """As QEMU's: each target set is told, changed or not, so a guest that deflated on OOM
    below it (``actual`` < ``num_pages``) reads it again and inflates back."""
    b = bench()
    for _ in range(2):
        generation = b.driver.read(c.REG_CONFIG_GENERATION)
        b.device.set_target(RAM // 2)
        assert b.driver.read(c.REG_CONFIG_GENERATION) != generation
        assert b.driver.interrupt_status() & c.INT_CONFIG_CHANGE and b.irq.take()
        b.driver.write(c.REG_INTERRUPT_ACK, c.INT_CONFIG_CHANGE)


def test_actual_is_the_drivers_and_num_pages_is_the_devices(bench):
    b = bench()
    b.device.set_target(RAM // 2)
    b.driver.write_config(4, 17)
    assert b.device.actual == 17 and b.device.balloon_info()["balloon"] == 17 * PAGE
    b.driver.write_config(0, 5)                           # the device's field: ignored
    assert b.driver.read_config(0) == RAM // 2 // PAGE
    b.driver.write_config(4, RAM // PAGE + 1)             # more pages than the VM has
    assert b.device.balloon_info()["balloon"] is None
    assert b.device.info()["guest_errors"] == 2
    b.driver.write_config(4, 3, size=1)                   # byte writes build the value
    b.driver.write_config(5, 0, size=1)
    b.driver.write_config(6, 0, size=2)
    assert b.device.actual == 3
    b.driver.reset()
    assert b.device.actual == 0 and b.driver.read_config(0) == RAM // 2 // PAGE


def test_inflate_and_deflate_count_pages_and_return_the_buffers(bench):
    b = bench()
    first = page_pfn(DATA)
    b.inflate.post(readable=[pfns(*range(first, first + 8), first + 3)])   # one twice
    b.inflate.notify()
    assert [u.length for u in b.inflate.get_used()] == [0]
    assert b.driver.interrupt_status() & c.INT_USED_BUFFER
    assert b.device.counters["pages_inflated"] == 8
    b.deflate.post(readable=[pfns(first, first + 1)])
    b.deflate.notify()
    assert [u.length for u in b.deflate.get_used()] == [0]
    assert b.device.counters["pages_deflated"] == 2
    assert b.device.counters["bytes_from_guest"] == 4 * (9 + 2)     # the frames read
    # a bytearray's RAM cannot be given back: counted, not released
    assert b.device.counters["bytes_released"] == 0
    assert b.device.balloon_info()["release"].startswith("none")
    assert b.device.info()["guest_errors"] == 0


def test_frames_outside_ram_are_ignored_and_counted(bench, caplog):
    b = bench()
    below, past = page_pfn(RAM_BASE) - 1, page_pfn(RAM_BASE + RAM)
    for _ in range(30):
        b.inflate.post(readable=[pfns(0, below, past, 0xFFFFFFFF, page_pfn(DATA))])
        b.inflate.notify()
        assert [u.length for u in b.inflate.get_used()] == [0]
    assert b.device.counters["pfns_ignored"] == 4 * 30
    assert b.device.counters["pages_inflated"] == 30
    info = b.device.info()
    assert info["guest_errors"] == 30
    assert info["log_lines_suppressed"] == 10        # 20 warnings, then rate-limited
    assert len([r for r in caplog.records if "outside the VM's RAM" in r.getMessage()]) == 20


def test_huge_and_ragged_frame_arrays_are_bounded(bench, loop):
    b = bench()
    n = bl.MAX_PFNS + 1000
    array = b.ram.alloc(4 * n + 3, 16)
    first = page_pfn(RAM_BASE)
    b.ram.write(array, pfns(*(first + i % (RAM // PAGE) for i in range(n))) + b"\1\2\3")
    b.inflate.add_chain([(array, 4 * n + 3, False)])
    b.inflate.notify()
    assert [u.length for u in b.inflate.get_used()] == [0]
    assert b.device.counters["pfns_ignored"] == 1000 + 1        # and the 3-byte tail
    assert b.device.counters["pages_inflated"] == bl.MAX_PFNS
    # more frames than a turn takes: the rest waits for the loop's next turn
    b.device.counters["pages_inflated"] = 0
    heads = 6
    for _ in range(heads):
        b.inflate.add_chain([(array, 4 * bl.MAX_PFNS, False)])
    b.inflate.notify()
    done = len(b.inflate.get_used())
    assert done == bl.PFNS_PER_TURN // bl.MAX_PFNS < heads
    deadline = time.monotonic() + 60
    while done < heads and time.monotonic() < deadline:
        loop.run_once(0.01)
        done += len(b.inflate.get_used())
    assert done == heads and b.device.counters["pages_inflated"] == heads * bl.MAX_PFNS


def test_inflate_releases_host_memory_of_a_shared_ram_file(file_bench):
    b = file_bench
    size = 1 << 20
    b.ram.write(DATA, b"\x5a" * size)                    # the guest used these pages
    used = b.blocks()
    assert used * 512 >= size
    first = page_pfn(DATA)
    for start in range(first, first + size // PAGE, 256):          # as Linux: 256 per request
        b.inflate.post(readable=[pfns(*reversed(range(start, start + 256)))])
    b.inflate.notify()
    assert len(b.inflate.get_used()) == size // PAGE // 256
    assert b.blocks() <= used - size // 512                        # the file has a hole
    assert b.ram.read(DATA, size) == bytes(size)                   # every mapping reads zeros
    assert b.device.counters["bytes_released"] == size
    assert b.device.balloon_info()["release"] == "madvise(MADV_REMOVE)"
    # deflate: the guest takes the pages back and uses them again
    b.deflate.post(readable=[pfns(first, first + 1)])
    b.deflate.notify()
    assert len(b.deflate.get_used()) == 1
    b.ram.write(DATA, b"\x33" * PAGE)
    assert b.ram.read(DATA, PAGE) == b"\x33" * PAGE
    assert b.device.counters["pages_deflated"] == 2
    # pages inflated again are not released again (nothing more is freed)
    for _ in range(3):
        b.inflate.post(readable=[pfns(*range(first + 2, first + 256))])
        b.inflate.notify()
    assert len(b.inflate.get_used()) == 3 and b.device.counters["bytes_released"] == size
    b.inflate.post(readable=[pfns(first + 1, first, first + 2)])     # two of them deflated
    b.inflate.notify()
    assert len(b.inflate.get_used()) == 1
    assert b.device.counters["bytes_released"] == size + 2 * PAGE


def stats_buffer(**values):
    tags = {name: tag for tag, name in enumerate(bl.STAT_NAMES)}
    return b"".join(bl.STAT.pack(tags[name], value) for name, value in values.items())


def test_statistics_are_read_kept_and_requested_again(bench, loop):
    b = bench(stats_interval=0.05)
    posted = time.time()
    b.stats.post(readable=[stats_buffer(free_memory=100 << 20, total_memory=500 << 20,
                                        available_memory=200 << 20) + bl.STAT.pack(99, 1)])
    b.stats.notify()
    assert b.stats.get_used() == []                      # kept until the host asks
    info = b.device.info()["balloon"]
    assert info["stats"] == {"free_memory": 100 << 20, "total_memory": 500 << 20,
                             "available_memory": 200 << 20}
    assert 0 <= info["stats_age"] <= time.time() - posted + 0.1    # rounded to 0.1 s
    deadline = time.monotonic() + 60
    used = []
    while not used and time.monotonic() < deadline:
        loop.run_once(0.01)
        used = b.stats.get_used()
    assert [u.length for u in used] == [0]               # the request for fresh statistics
    b.stats.post(readable=[stats_buffer(free_memory=50 << 20)])
    b.stats.notify()
    assert b.device.balloon_info()["stats"] == {"free_memory": 50 << 20}


def test_a_statistics_buffer_notified_before_driver_ok_is_taken_at_driver_ok(loop):
    """Linux's probe posts and kicks its first statistics buffer before DRIVER_OK."""
    b = VirtioBench(BalloonDevice(), loop=loop, ram_size=RAM)
    b.driver.negotiate()
    _, _, stats = [b.driver.setup_queue(i, 16) for i in range(3)]
    stats.post(readable=[stats_buffer(total_memory=1 << 30)])
    stats.notify()                                       # ignored: no DRIVER_OK yet
    assert b.device.stats == {}
    b.driver.driver_ok()
    assert b.device.stats == {"total_memory": 1 << 30}
    b.subsystem.close()


def test_a_statistics_buffer_without_the_feature_is_kept_not_read(bench, loop):
    """stats_interval = 0 offers no VIRTIO_BALLOON_F_STATS_VQ; the queue exists (as
    QEMU's), and a buffer a driver posts there anyway is kept until a reset, not read and
    not returned (a driver looping on it would make the loop spin)."""
    b = bench(stats_interval=0)
    for _ in range(3):
        b.stats.post(readable=[stats_buffer(free_memory=1)])
        b.stats.notify()
        for _ in range(5):
            loop.run_once(0.01)
    assert len(b.stats.get_used()) == 2                  # each new one returns the older
    assert b.device.stats == {} and b.device._timer is None
    b.driver.reset()
    assert b.device._stats_chain is None


def test_bad_statistics_buffers(bench, loop):
    b = bench(stats_interval=3600)
    b.stats.post(readable=[b"\0" * 15])                  # not whole 10-byte entries
    b.stats.notify()
    assert b.device.info()["guest_errors"] == 1 and b.device.stats == {}
    big = b.ram.alloc(10 * (bl.MAX_STATS + 1), 16)
    b.stats.add_chain([(big, 10 * (bl.MAX_STATS + 1), False)])
    b.stats.notify()                                     # too long: not read; the older
    assert [u.length for u in b.stats.get_used()] == [0]          # buffer comes back
    assert b.device.info()["guest_errors"] == 3 and b.device.stats == {}
    b.driver.reset()                                     # drops the held buffer and timer
    assert b.device._stats_chain is None and b.device._timer is None


def test_config_keys(tmp_path):
    path = tmp_path / "vms.toml"
    path.write_text("[vm.0]\nballoon = { stats_interval = 2.5, deflate_on_oom = false }\n")
    config = load_config(path)
    device = config.build_device(config.vms[0].devices[0])
    assert isinstance(device, BalloonDevice) and device.stats_interval == 2.5
    assert not device.features & (1 << bl.F_DEFLATE_ON_OOM)
    path.write_text("[vm.0]\nballoon = { stats_interval = -1 }\n")
    with pytest.raises(ConfigError, match=r"vm\.0\.balloon\.stats_interval: must be 0"):
        load_config(path)
    path.write_text('[vm.0]\nballoon = { deflate_on_oom = "yes" }\n')
    with pytest.raises(ConfigError, match="deflate_on_oom: must be true or false"):
        load_config(path)


def test_balloon_command_and_control_socket_on_a_uio_board(tmp_path):
    """``avatar-hw balloon`` against a served daemon whose RAM is a UIO map (the fake
    board's): the guest sees the new num_pages, pages are counted but not released."""
    board = FakeBoard(tmp_path / "board")
    stub = StandinStub(board)
    daemon = Served(board, console_config(board, extra="balloon = { stats_interval = 1 }\n",
                                          vms=(0,)))
    try:
        stub.page.wait_attached()
        ram = board.ram_size
        state = json_cli(daemon, "balloon", "0", f"{ram // 4 >> 20}M", "--json")
        assert state["target"] == ram // 4 and state["balloon_target"] == ram - ram // 4
        assert state["release"].startswith("none")
        mmio = stub.page.mmio(0)
        window = 0x0a001000                                    # vm0 slot 1
        assert mmio(window + c.REG_DEVICE_ID, 0, False, 4) == (True, c.ID_BALLOON)
        assert mmio(window + c.REG_CONFIG, 0, False, 4) == (True, (ram - ram // 4) // PAGE)
        text = daemon.cli("balloon", "0")
        assert text.startswith("vm0 balloon: keep 4.0 MiB of 16.0 MiB")
        assert "balloon: keep" in daemon.cli("info")
        assert control.request("balloon", str(board.control), vm=0, size="1G")[
            "balloon_target"] == 0
        failed = subprocess.run([sys.executable, "-m", "avatar_hw", "balloon", "1", "8M",
                                 "--control", str(board.control)], capture_output=True,
                                text=True, timeout=30)
        assert failed.returncode == 2
        assert failed.stderr.strip() == ("avatar-hw: daemon: bad request: VM 1 has no balloon "
                                         "device (add balloon = {} to its VMs config)")
        assert daemon.stop() == 0
    finally:
        daemon.close()
        stub.close()


def json_cli(daemon, *args):
    return json.loads(daemon.cli(*args))


FUZZ_RAM = 4 << 20
PFN_WORDS = st.lists(st.one_of(st.integers(0, 2**32 - 1),
                               st.integers(RAM_BASE // PAGE - 2,
                                           (RAM_BASE + FUZZ_RAM) // PAGE + 2)),
                     max_size=300)


@FUZZ
@given(requests=st.lists(st.tuples(st.integers(0, 2), PFN_WORDS, st.integers(0, 3),
                                   st.lists(st.integers(0, 1300), max_size=3),
                                   st.lists(st.integers(0, 64), max_size=2)),
                         min_size=1, max_size=8),
       config=st.lists(st.tuples(st.sampled_from([0, 1, 2, 4, 5, 6]), st.sampled_from([1, 2, 4]),
                                 st.integers(0, 2**32 - 1)), max_size=4))
def test_random_balloon_requests(requests, config):
    """Random frame arrays (ragged, split over descriptors, with writable parts) on every
    queue and random config writes: no internal error, nothing outside the VM touched, every
    inflate/deflate chain returned with length 0, the device still counts a good request."""
    bench = VirtioBench(BalloonDevice(stats_interval=3600), ram_size=FUZZ_RAM)
    try:
        with no_internal_errors():
            queues = bench.driver.init([0, 1, 2], buf_size=0, size=16)
            scratch = bench.ram.alloc(64 << 10, 4096)
            for offset, size, value in config:
                if offset % size == 0:
                    bench.driver.write_config(offset, value & ((1 << 8 * size) - 1), size)
            for index, words, tail, points, writable in requests:
                data = pfns(*words) + bytes(tail)
                head = post(queues[index], bench.ram, scratch, split(data, points), writable)
                if head is None:
                    continue
                queues[index].notify()
                used = queues[index].get_used()
                if index != bl.STATS:
                    assert [(u.head, u.length) for u in used] == [(head, 0)]
            before = bench.device.counters["pages_inflated"]
            queues[0].get_used()
            post(queues[0], bench.ram, scratch, [pfns(page_pfn(RAM_BASE + FUZZ_RAM - PAGE))], [])
            queues[0].notify()
            assert len(queues[0].get_used()) == 1
            assert bench.device.counters["pages_inflated"] == before + 1
            bench.device.info()
    finally:
        bench.subsystem.close()
    bench.check_guards()


def test_a_host_page_larger_than_4k_is_freed_only_when_wholly_inflated(file_bench, monkeypatch):
    """With 16 KiB host pages (Linux arm64 16K kernels; simulated), three of a host page's
    four balloon pages free nothing; the whole page is freed when one request covers it."""
    monkeypatch.setattr(mmap, "PAGESIZE", 16384)
    b = file_bench
    first = page_pfn(DATA)                                  # DATA is 16 KiB aligned
    b.ram.write(DATA, b"\x5a" * 16384)
    b.inflate.post(readable=[pfns(first, first + 1, first + 2)])
    b.inflate.notify()
    assert len(b.inflate.get_used()) == 1
    assert b.device.counters["bytes_released"] == 0 and b.ram.read(DATA, 4) == b"\x5a" * 4
    b.inflate.post(readable=[pfns(first + 3, first + 2, first + 1, first)])
    b.inflate.notify()
    assert len(b.inflate.get_used()) == 1
    assert b.device.counters["bytes_released"] == 16384
    assert b.ram.read(DATA, 16384) == bytes(16384)
