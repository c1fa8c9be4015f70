"""virtio-balloon (device ID 5, VirtIO 1.2 section 5.5): the host asks a guest for memory back.

The host sets ``num_pages`` in the configuration space (``set_target``: the guest memory
it wants the VM to keep, as QEMU's ``balloon`` monitor command takes it) and raises a
configuration-change interrupt, also when the target did not change (as QEMU does: a guest
that deflated on OOM inflates again); the guest's driver inflates (gives pages: their frame
numbers on the inflate queue) or deflates (takes them back, deflate queue) towards it and
writes ``actual``, the pages it holds in the balloon. Both outlive a restart of the daemon
(``saved_state``); the target also outlives a device reset.

Frame numbers are 32-bit (little-endian), in 4096-byte units whatever the page size of
either side (5.5.6). Each is checked against the VM's RAM; one outside it is ignored and
counted (``pfns_ignored``), with a rate-limited warning. Inflated pages are given back to
the host where the RAM mapping allows it (``GuestMemory.discard``: ``madvise(MADV_REMOVE)``
on a shared file mapping punches a hole in the file): a request's frames are sorted and
merged into runs, and each run's whole host pages are discarded (a host page bigger than
4 KiB is freed only when one request covers all of it, as QEMU's partially-ballooned-page
tracking does within a request). A UIO map cannot be discarded: the pages are counted,
not freed (docs/devices.md). Deflated frames are checked and counted; the host has
nothing to do (a discarded page reads zeros and is allocated again when the guest
touches it). Which pages are in the balloon is tracked (one byte per page of RAM): a page
inflated again is neither discarded nor counted again (``bytes_released`` counts memory
given back, not madvise calls), a deflate or a device reset takes pages out.

Bounds a guest cannot exceed: ``MAX_PFNS`` frames per request are looked at (Linux sends
256; the rest are ignored and counted), ``PFNS_PER_TURN`` per queue and turn (then the
queue is resumed on the loop's next turn, like every device's).

The statistics queue (VIRTIO_BALLOON_F_STATS_VQ, offered when ``stats_interval`` > 0):
the driver posts one buffer of ``struct virtio_balloon_stat { le16 tag; le64 val; }``
entries; the device reads them and keeps the buffer, and ``stats_interval`` seconds later
returns it (used length 0) to ask for fresh ones (5.5.6.3). A buffer that is not a whole
number of 10-byte entries, or longer than ``MAX_STATS`` entries, is kept but not read (a
counted guest error). A second buffer while one is kept returns the older one, as QEMU does.
Without the feature negotiated a buffer on that queue is kept, not read, until a reset (as
QEMU keeps it with polling off).

VIRTIO_BALLOON_F_DEFLATE_ON_OOM (``deflate_on_oom``, default on): the guest may take pages
back from the balloon when it runs out of memory, without the host's target changing.
"""

import mmap
import struct
import time

from ..schema import Field, Schema
from ..sizes import parse_size
from ..virtio.buffers import gather
from ..virtio.constants import ID_BALLOON, bit
from ..virtio.device import VirtioDevice

F_MUST_TELL_HOST, F_STATS_VQ, F_DEFLATE_ON_OOM = 0, 1, 2
INFLATE, DEFLATE, STATS = 0, 1, 2
QUEUE_SIZE = 128
PAGE = 4096                         # the balloon's unit, whatever the page sizes
MAX_PFNS = 1024                     # frames looked at per request (Linux sends 256)
PFNS_PER_TURN = 1024                # frames per queue per turn (each a madvise at worst:
                                    # 4096 scattered ones held the loop 90 ms on CI)
STAT = struct.Struct("<HQ")
MAX_STATS = 64                      # entries per statistics buffer (Linux 6.12 has 16 tags)
DEFAULT_STATS_INTERVAL = 5
# VirtIO 1.2 5.5.6.3 tags (and Linux's later ones), as QEMU names them without "stat-".
STAT_NAMES = ("swap_in", "swap_out", "major_faults", "minor_faults", "free_memory",
              "total_memory", "available_memory", "disk_caches", "hugetlb_allocations",
              "hugetlb_failures", "oom_kills", "alloc_stalls", "async_scans", "direct_scans",
              "async_reclaims", "direct_reclaims")


def _newly_freed(start, end, before):
    """Bytes of the whole host pages inside frames ``start .. end - 1`` that were not wholly
    in the balloon ``before`` (``before[i]``: frame ``start + i`` was): what discarding the
    frames gave back to the host."""
    per = max(1, mmap.PAGESIZE // PAGE)
    pages = range(-(-start // per) * per, end // per * per, per)
    return sum(per * PAGE for page in pages if 0 in before[page - start:page - start + per])


def stats_interval_ok(value):
    if not 0 <= value <= 3600:
        raise ValueError(f"must be 0 (no statistics queue) to 3600 seconds, not {value}")


class BalloonDevice(VirtioDevice):
    """A memory balloon; ``stats_interval`` seconds between statistics requests (0: no
    statistics queue), ``deflate_on_oom`` offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM."""

    device_id = ID_BALLOON
    name = "balloon"
    restartable = True

    def __init__(self, *, stats_interval=DEFAULT_STATS_INTERVAL, deflate_on_oom=True):
        stats_interval_ok(stats_interval)
        features = ((bit(F_STATS_VQ) if stats_interval else 0)
                    | (bit(F_DEFLATE_ON_OOM) if deflate_on_oom else 0))
        super().__init__(queue_sizes=[QUEUE_SIZE] * 3, features=features, config=bytes(8))
        self.stats_interval = stats_interval
        self._pfn_bytes = bytearray(4 * MAX_PFNS)
        self._pfns = memoryview(self._pfn_bytes).cast("I")      # le32 on arm64 and x86-64
        self._stats_bytes = bytearray(STAT.size * MAX_STATS)
        self._stats_chain = None        # the driver's statistics buffer, kept until asked
        self._timer = None
        self.stats, self.stats_time = {}, None
        self.counters.update(pages_inflated=0, pages_deflated=0, bytes_released=0,
                             pfns_ignored=0)
        self._release_error = None      # why discarding stopped (the kernel refused)
        self._held = None               # one byte per page of RAM: 1 while in the balloon

    # -- the host's side ------------------------------------------------------------------------

    @property
    def ram_pages(self):
        return self.memory.size // PAGE if self.memory is not None else 0

    @property
    def num_pages(self):
        """The host's target: pages the guest should hold in the balloon."""
        return int.from_bytes(self.config[0:4], "little")

    @property
    def actual(self):
        """The pages the guest says it holds (``actual`` as written by the driver)."""
        return int.from_bytes(self.config[4:8], "little")

    def set_target(self, guest_bytes):
        """Ask the guest to keep ``guest_bytes`` of its RAM (bytes, or text such as
        ``"384M"``: ``parse_size``; more than its RAM: all of it, an empty balloon):
        ``num_pages`` = (RAM - target) / 4096, and a configuration-change interrupt.
        Returns ``balloon_info()``."""
        if self.memory is None:
            raise ValueError("the balloon is not plugged into a VM")
        guest_bytes = parse_size(guest_bytes)
        if guest_bytes <= 0:
            raise ValueError(f"target guest memory must be positive, not {guest_bytes}")
        pages = (self.memory.size - min(guest_bytes, self.memory.size)) // PAGE
        self.config[0:4] = pages.to_bytes(4, "little")
        self.signal_config_change()        # also when unchanged: the driver reads it again
        self.keep_state()
        return self.balloon_info()

    def saved_state(self):
        return {"num_pages": self.num_pages, "actual": self.actual}

    def restore_state(self, saved, words, live):
        """The target (the host's, at most the VM's pages) outlives a reset; ``actual`` is
        the live driver's: any 32-bit value it wrote (``write_config`` takes every one)."""
        fields = (("num_pages", 0, self.ram_pages), ("actual", 4, 0xFFFFFFFF))
        for key, offset, most in fields if live else fields[:1]:
            value = saved.get(key, 0)
            if type(value) is not int or not 0 <= value <= most:
                raise ValueError(f"balloon {key} {value!r} is not an integer from 0 to {most}")
            self.config[offset:offset + 4] = value.to_bytes(4, "little")

    # -- the guest's side ------------------------------------------------------------------------

    def write_config(self, offset, data):
        if offset < 4:
            self.guest_error("write to num_pages (config offset 0x%x), the device's field; "
                             "ignored", offset)
            return
        if self.config[offset:offset + len(data)] == data:
            self.idle_trap()                    # ``actual`` written again, unchanged
            return
        self.config[offset:offset + len(data)] = data
        self.keep_state()
        if self.actual > self.ram_pages:
            self.guest_error("actual = %d pages, more than the VM's %d pages of RAM",
                             self.actual, self.ram_pages)

    def queue_notify(self, index):
        if index == STATS:
            self._take_stats()
        else:
            self._serve_pages(index)

    def reset(self):
        self._drop_stats()
        self.config[4:8] = bytes(4)       # a new driver starts with an empty balloon
        self._held = None
        self.keep_state()

    def queue_reset(self, index):
        if index == STATS:
            self._drop_stats()

    def detach(self):
        self._drop_stats()
        super().detach()

    def _serve_pages(self, index):
        queue = self.queues[index]
        spent = 0
        completed = False
        while (chain := queue.pop()) is not None:
            spent += self._pages(chain, index == INFLATE)
            queue.add_used(chain, 0)
            completed = True
            if spent >= PFNS_PER_TURN:
                self._resume_later(queue)
                break
        if completed:
            self.signal_used(queue)

    def _pages(self, chain, inflate):
        """Check (and on inflate discard) one request's frames; how many were looked at."""
        what = "inflate" if inflate else "deflate"
        length = chain.readable_len
        count = min(length // 4, MAX_PFNS)
        if length % 4 or length // 4 > MAX_PFNS:
            self.guest_error("%s request of %d bytes: frame numbers past %d whole ones "
                             "ignored", what, length, count)
            self.counters["pfns_ignored"] += -(-length // 4) - count
        gather(chain.readable, memoryview(self._pfn_bytes)[:4 * count])
        lowest, end = -(-self.memory.base // PAGE), self.memory.end // PAGE
        outside = valid = 0
        run_start = run_end = None
        for pfn in sorted(self._pfns[:count]):
            if not lowest <= pfn < end:
                outside += 1
            elif run_end is not None and pfn < run_end:
                continue                                # the same frame twice
            elif pfn == run_end:
                run_end += 1
            else:
                if run_start is not None:
                    valid += self._run(run_start, run_end, inflate)
                run_start, run_end = pfn, pfn + 1
        if run_start is not None:
            valid += self._run(run_start, run_end, inflate)
        if outside:
            self.counters["pfns_ignored"] += outside
            self.guest_error("%s request: %d of %d frame numbers outside the VM's RAM "
                             "(0x%x..0x%x); ignored", what, outside, count,
                             self.memory.base, self.memory.end - 1)
        self.count(bytes_from_guest=4 * count)
        self.counters["pages_inflated" if inflate else "pages_deflated"] += valid
        return count

    def _run(self, start, end, inflate):
        """Frames ``start .. end - 1`` (inside RAM, distinct): into the balloon and released
        on inflate (unless all were in it already), out of it on deflate."""
        base = self.memory.base // PAGE
        if self._held is None:
            self._held = bytearray(self.memory.end // PAGE - base)
        first = start - base
        before = self._held[first:first + end - start]          # a copy
        self._held[first:first + end - start] = (b"\1" if inflate else b"\0") * (end - start)
        if inflate and 0 in before and self._release_error is None:
            try:
                if self.memory.discard(start * PAGE, (end - start) * PAGE):
                    self.counters["bytes_released"] += _newly_freed(start, end, before)
            except OSError as err:
                self._release_error = f"madvise(MADV_REMOVE) failed: {err.strerror}"
                self.error("%s; balloon pages are no longer released on the host",
                           self._release_error)
        return end - start

    # -- statistics ------------------------------------------------------------------------------

    def _take_stats(self):
        queue = self.queues[STATS]
        returned = False
        wanted = self.has_feature(F_STATS_VQ)
        while (chain := queue.pop()) is not None:
            if self._stats_chain is not None:
                self.guest_error("a second statistics buffer while one is held; the older "
                                 "one is returned")
                queue.add_used(self._stats_chain, 0)
                returned = True
            self._stats_chain = chain
            if wanted:
                self._read_stats(chain)
            else:
                self.guest_error("statistics buffer without VIRTIO_BALLOON_F_STATS_VQ "
                                 "negotiated; kept, not read")
        if returned:
            self.signal_used(queue)
        if (wanted and self._stats_chain is not None and self._timer is None
                and self.loop is not None):
            self._timer = self.loop.call_later(self.stats_interval, self._request_stats)

    def _read_stats(self, chain):
        length = chain.readable_len
        if length % STAT.size or length > len(self._stats_bytes):
            self.guest_error("statistics buffer of %d bytes: not whole 10-byte entries, or "
                             "more than %d; not read", length, MAX_STATS)
            return
        view = memoryview(self._stats_bytes)[:length]
        gather(chain.readable, view)
        stats = {}
        for tag, value in STAT.iter_unpack(view):
            if tag < len(STAT_NAMES):       # unknown tags are skipped (newer drivers)
                stats[STAT_NAMES[tag]] = value
        self.stats, self.stats_time = stats, time.time()
        self.count(bytes_from_guest=length)

    def _request_stats(self):
        """Give the statistics buffer back: the driver refills and posts it again."""
        self._timer = None
        chain, self._stats_chain = self._stats_chain, None
        if chain is not None and self.active:
            queue = self.queues[STATS]
            queue.add_used(chain, 0)
            self.signal_used(queue)

    def _drop_stats(self):
        self._stats_chain = None
        if self._timer is not None and self.loop is not None:
            self.loop.cancel(self._timer)
        self._timer = None

    # -- introspection ---------------------------------------------------------------------------

    def balloon_info(self):
        """The balloon's state: sizes in bytes, the guest's last statistics."""
        ram = self.memory.size if self.memory is not None else 0
        actual = self.actual if self.actual <= self.ram_pages else None
        return {"ram": ram, "target": ram - self.num_pages * PAGE,
                "balloon_target": self.num_pages * PAGE,
                "balloon": None if actual is None else actual * PAGE,
                "release": self._release_mode(), "stats": self.stats,
                "stats_age": (None if self.stats_time is None
                              else round(time.time() - self.stats_time, 1))}

    def _release_mode(self):
        if self.memory is None or not self.memory.region.discardable:
            return "none (the RAM mapping cannot give memory back)"
        return self._release_error or "madvise(MADV_REMOVE)"

    def info(self):
        out = super().info()
        out.update(stats_interval=self.stats_interval, balloon=self.balloon_info())
        return out


SCHEMA = Schema("balloon", (
    Field("stats_interval", (int, float), None,
          "seconds between statistics requests, 0 to 3600 (0: no statistics queue)",
          stats_interval_ok),
    Field("deflate_on_oom", bool, None, "true or false"),
))


ONE_PER_VM = "the daemon sizes a VM's RAM through one"


def from_config(options):
    """The VMs config's ``balloon = { stats_interval, deflate_on_oom }``."""
    return BalloonDevice(stats_interval=options.get("stats_interval", DEFAULT_STATS_INTERVAL),
                         deflate_on_oom=options.get("deflate_on_oom", True))
