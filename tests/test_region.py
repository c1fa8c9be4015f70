"""Region: exact-width access, its checks, views, ordered access, and the no-tearing rule."""

import math
import mmap
import os
import subprocess
import sys
import textwrap

import pytest

from avatar_hw.errors import AvatarError, RegionAccessError
from avatar_hw.hw import ordering
from avatar_hw.hw.region import Region

WIDTHS = (1, 2, 4, 8)


@pytest.fixture
def region():
    return Region(bytearray(64), name="regs", phys_addr=0xFF841000)


@pytest.mark.parametrize("width", WIDTHS)
def test_every_width_is_one_little_endian_value(region, width):
    value = int.from_bytes(bytes(range(1, width + 1)), "little") | (0x80 << 8 * (width - 1))
    getattr(region, f"write{width * 8}")(8, value)
    assert getattr(region, f"read{width * 8}")(8) == value
    assert bytes(region.view(8, width)) == value.to_bytes(width, "little")
    assert region.read(8, width) == value
    region.write(16, width, (1 << 8 * width) - 1)
    assert region.read(16, width) == (1 << 8 * width) - 1
    assert region.read8(16 + width) == 0           # nothing written past the width


@pytest.mark.parametrize("width", WIDTHS)
def test_out_of_range_accesses_name_the_region(region, width):
    bits = width * 8
    for offset in (-width, 65 - width, 64, 1 << 40):    # before, straddling, at and past the end
        with pytest.raises(RegionAccessError, match=rf"^regs: {bits}-bit access at offset .* "
                                                   r"is outside the region \(size 0x40\)$"):
            getattr(region, f"read{bits}")(offset)
        with pytest.raises(RegionAccessError):
            getattr(region, f"write{bits}")(offset, 0)
    assert getattr(region, f"read{bits}")(64 - width) == 0     # the last one fits


@pytest.mark.parametrize("width", (2, 4, 8))
def test_misaligned_accesses_are_refused(region, width):
    bits = width * 8
    for offset in range(1, width):
        with pytest.raises(RegionAccessError,
                           match=rf"^regs: {bits}-bit access at offset 0x{offset:x} is not "
                                 rf"{width}-byte aligned$"):
            getattr(region, f"read{bits}")(offset)
        with pytest.raises(RegionAccessError):
            region.write(offset, width, 0)
    assert bytes(region.view(0, 64)) == bytes(64)


def test_other_widths_are_refused(region):
    for width in (0, 3, 16):
        with pytest.raises(RegionAccessError, match=f"access width {width} is not 1, 2, 4 or 8"):
            region.read(0, width)
        with pytest.raises(RegionAccessError):
            region.write(0, width, 0)


def test_errors_are_avatar_and_value_errors(region):
    with pytest.raises(AvatarError):
        region.read32(2)
    with pytest.raises(ValueError):
        region.read32(64)


def test_view_is_a_bounded_writable_window_without_copy(region):
    view = region.view(4, 8)
    view[:4] = b"\x78\x56\x34\x12"
    assert region.read32(4) == 0x12345678
    region.write32(8, 0xAABBCCDD)
    assert bytes(view[4:]) == b"\xdd\xcc\xbb\xaa"
    assert len(region.view(0, 64)) == 64 and len(region.view(64, 0)) == 0
    for offset, length in ((60, 8), (-1, 2), (0, -1), (65, 0)):
        with pytest.raises(RegionAccessError, match="regs: range .* is outside the region"):
            region.view(offset, length)


def test_acquire_release_access_the_same_words(region):
    region.store_release32(8, 0xDEADBEEF)
    assert region.read32(8) == 0xDEADBEEF
    region.store_release16(2, 0xBEEF)
    assert region.read16(2) == 0xBEEF
    region.write32(12, 7)
    assert region.load_acquire32(12) == 7
    assert region.load_acquire16(2) == 0xBEEF
    for call in (lambda: region.load_acquire32(2), lambda: region.store_release32(64, 0),
                 lambda: region.load_acquire16(1), lambda: region.store_release16(63, 0)):
        with pytest.raises(RegionAccessError):
            call()


def test_map_file_shares_the_file_and_closes(tmp_path):
    path = tmp_path / "shared"
    path.write_bytes(bytes(2 * mmap.PAGESIZE))
    with Region.map_file(path, mmap.PAGESIZE, offset=mmap.PAGESIZE, phys_addr=0x1000) as shared:
        assert (shared.size, shared.name, shared.phys_addr) == (mmap.PAGESIZE, str(path), 0x1000)
        shared.write64(8, 0x0102030405060708)
    assert path.read_bytes()[mmap.PAGESIZE + 8:mmap.PAGESIZE + 16] == bytes(range(8, 0, -1))


# -- exact width: a 64-bit word changed by another process is never read torn -----------

PATTERNS = (0x5555555555555555, 0xAAAAAAAAAAAAAAAA)
STOP = 8      # offset of the word that tells the writer to stop
WRITER = textwrap.dedent("""
    import sys
    from avatar_hw.hw.region import Region
    shared = Region.map_file(sys.argv[1], 4096)
    a, b = {patterns}
    shared.write32(12, 1)                   # running
    while not shared.read32({stop}):
        for _ in range(1000):
            shared.write64(0, a)
            shared.write64(0, b)
""").format(patterns=PATTERNS, stop=STOP)
MAX_READS = 2_000_000     # bounds the loops when the writer hardly gets a CPU
EXPECTED = 10             # torn reads a tearing read64 would have shown


def bytewise_read64(region, offset):
    """A deliberately wrong 64-bit read, one byte at a time (as slicing may do)."""
    return sum(region.read8(offset + i) << 8 * i for i in range(8))


def observe(read, enough_torn, enough_changes):
    """Read until ``enough_torn`` torn values or ``enough_changes`` changes were seen (or
    MAX_READS); return (torn values, changes seen)."""
    torn = changes = 0
    last = read()
    for _ in range(MAX_READS):
        value = read()
        torn += value not in PATTERNS
        changes += value != last
        last = value
        if torn >= enough_torn or changes >= enough_changes:
            break
    return torn, changes


def test_read64_is_never_torn_while_another_process_flips_the_word(tmp_path):
    path = tmp_path / "word"
    path.write_bytes(bytes(4096))
    shared = Region.map_file(path, 4096)
    shared.write64(0, PATTERNS[0])
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    try:
        while not shared.read32(12):
            assert writer.poll() is None, "writer died"
            os.sched_yield()
        # Evidence that this set-up shows tearing: a byte-by-byte read tears, at some
        # rate per change of the word (high on two free cores, lower when loaded).
        torn_bytewise, changes_bytewise = observe(lambda: bytewise_read64(shared, 0), 20,
                                                  MAX_READS)
        tear_rate = torn_bytewise / max(changes_bytewise, 1)
        # read64 while the word changes often enough that a read tearing at that rate
        # would have torn about EXPECTED times.
        needed = math.ceil(EXPECTED / tear_rate) if tear_rate else MAX_READS
        torn, changes = observe(lambda: shared.read64(0), 1, needed)
    finally:
        shared.write32(STOP, 1)
        try:
            writer.wait(timeout=10)
        finally:
            writer.kill()
            writer.wait()
            shared.close()
    assert torn_bytewise > 0, "no torn byte-wise read: the writer never ran alongside"
    assert torn == 0, f"{torn} torn read64 value(s)"
    assert changes * tear_rate >= EXPECTED, (
        f"the word changed only {changes} times during the read64 reads "
        f"(byte-wise tear rate {tear_rate:.3f} per change)")


@pytest.mark.parametrize("tso", [True, False], ids=["plain-on-tso", "libatomic"])
def test_ordered_accesses_move_whole_words_and_nothing_beside(tso):
    """The ordering module's calls (no ctypes ``argtypes``: addresses as pointers, values
    as ints) and its bound 16-bit reader and writer, on both branches: the one a TSO host
    takes and the one arm64 takes. Full-width values, their neighbours untouched."""
    region = Region(bytearray(32), name="words")
    base = region.address
    ordering.store_release32(base + 8, 0xFFFFFFFF)
    ordering.store_release16(base + 4, 0xFFFF)
    assert region.read32(8) == 0xFFFFFFFF and ordering.load_acquire32(base + 8) == 0xFFFFFFFF
    assert region.read16(4) == 0xFFFF and region.read16(2) == region.read16(6) == 0
    assert ordering.fetch_or32(base + 16, 1 << 31) == 0
    assert ordering.fetch_add32(base + 16, 0xFFFFFFFF) == 1 << 31      # wraps
    assert ordering.fetch_and32(base + 16, 0xF0) == (1 << 31) - 1
    assert region.read32(16) == 0xF0 and region.read32(20) == 0
    words = region.view(0, 32).cast("H")
    read = ordering.acquire_reader16(words, 6, base + 12, tso)
    write = ordering.release_writer16(words, 6, base + 12, tso)
    write(0xBEEF)
    assert read() == 0xBEEF == region.read16(12) and region.read16(14) == 0
    write32 = ordering.release_writer32(region.view(0, 32).cast("I"), 7, base + 28, tso)
    write32(0xFFFFFFFF)
    assert region.read32(28) == 0xFFFFFFFF and region.read32(24) == 0
    del read, write, words, write32
