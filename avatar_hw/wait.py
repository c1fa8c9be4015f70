"""How the daemon waits for traps: the *wait mode* (board file ``trap.wait``, ``--wait``).

- ``doorbell``: after serving, arm the doorbell (``model_sleeping = 1``, fence,
  re-scan) and sleep in the event loop until the stub rings. No CPU when idle;
  every trap after a pause pays the doorbell's round trip.
- ``adaptive``: after serving, keep scanning (``model_sleeping`` stays 0, so
  the stub does not ring) for a window sized by ``PollWindow``, then arm the
  doorbell and sleep as ``doorbell`` does; no window at all while the host has
  no core to spare (``SpareCores``). Busy-poll's latency while the guest does
  I/O on a host with a core free, the doorbell's otherwise, nothing when idle.
- ``busy-poll``: never arm the doorbell; scan between non-blocking turns of
  the event loop. Lowest latency; a whole core, always.

In every mode the event loop (control socket, backends, timers) keeps running:
polling, it is polled without blocking between batches of scans.
"""

import os
import resource
import threading

DOORBELL, ADAPTIVE, BUSY_POLL = "doorbell", "adaptive", "busy-poll"
MODES = (DOORBELL, ADAPTIVE, BUSY_POLL)

# The window's sizes, after Linux KVM's halt-polling (Documentation/virt/kvm/halt-polling.rst,
# virt/kvm/kvm_main.c: halt_poll_ns, halt_poll_ns_grow, halt_poll_ns_grow_start,
# halt_poll_ns_shrink). KVM polls at most 200 us on x86; here the ceiling is larger because a
# 4 KiB read's cycle on the emulated board (interrupt through QEMU's UART, the guest's handler,
# the next request) takes 300-600 us between two traps.
POLL_MAX_NS = 1_000_000       # the window never grows past this
POLL_START_NS = 10_000        # the first window (KVM's halt_poll_ns_grow_start)
POLL_GROW = 2                 # a wait the window just missed doubles it
POLL_SHRINK = 2               # a wait longer than the ceiling halves it (below the start: 0)
POLL_HOLD_NS = 10_000_000     # preempted while polling: no window for this long
POLL_CONTENDED_NS = 200_000   # waited this long for a CPU since the last find: preempted
SPARE_SAMPLE_NS = 250_000_000  # how often the host's spare CPU is measured (SpareCores)
SPARE_CORES_MIN = 0.6         # no window while less than this much of a core is spare


class PollWindow:
    """The ``adaptive`` mode's polling window, grown and shrunk as KVM sizes halt-polling.

    ``found(now)`` is told each time a scan found traps (``now``: ``time.monotonic_ns()``);
    the wait since the previous find sizes the window: within the window, it stays
    (the poll caught the trap); longer than ``max_ns``, it shrinks (polling was wasted:
    the guest is idle); in between, it grows (a longer poll would have caught it).
    ``over(now)``: stop polling and arm the doorbell, because the window since the last
    find has passed, or because no core is free: KVM polls only while
    ``single_task_running()``, which userspace cannot ask. What it can see is how long
    this thread waited, runnable, for a CPU (``run_delay`` of /proc/thread-self/schedstat):
    more than ``POLL_CONTENDED_NS`` in all since the last find means another task keeps
    wanting this core (on a loaded machine, likely the guest's vCPU that would post the
    next trap), not a short wake-up of QEMU's main loop. Then the window is 0 and does
    not grow for ``POLL_HOLD_NS``: the CPU is given back. That rule notices contention
    only after a poll has held a core for a while; so, every ``SPARE_SAMPLE_NS``,
    ``SpareCores`` also measures whether the host has a core to spare at all, and while
    it has not the window stays 0: the doorbell's behaviour, with nothing spent finding
    out again after each trap. (Before that measure, the hold doubled with each give-up
    in a row, up to 1 s, so that a host with no core free saw one short poll a second;
    on a quiet 2-core host, where QEMU's main loop and the guest's vCPU preempt a poll now
    and then, the doubled holds halved the 4 KiB reads: docs/performance.md, "A core to
    spare".)
    """

    def __init__(self, now, *, max_ns=POLL_MAX_NS, start_ns=POLL_START_NS):
        self.max_ns = max_ns
        self.start_ns = start_ns
        self.ns = 0                     # the window now; 0: arm at once
        self.last = now                 # when traps were last found
        self.hold_until = now           # no window before this (preempted while polling)
        self.grown = self.shrunk = self.preempted = 0   # counters for ``avatar-hw info``
        self._delay_base = None         # run_delay at the first look since the last find
        self._schedstat = None          # (thread id, fd of its schedstat), opened by over()
        self.spare = SpareCores()
        self._spare_at = now            # when to measure the spare CPU next
        self._spare_ok = True           # whether a core was spare at the last measure

    def found(self, now):
        """Traps were found at ``now``: resize; returns whether to poll from now on."""
        waited = now - self.last
        self.last = now
        self._delay_base = None
        if not self._core_spare(now):
            self.ns = 0
        elif waited <= self.ns:
            pass
        elif waited > self.max_ns:
            if self.ns:
                self._shrink()
                self.shrunk += 1
        elif self.ns < self.max_ns and now >= self.hold_until:
            self.ns = min(max(self.ns * POLL_GROW, self.start_ns), self.max_ns)
            self.grown += 1
        return self.ns > 0

    def expired(self, now):
        return now - self.last > self.ns

    def over(self, now):
        """Whether to stop polling now (the caller then arms the doorbell)."""
        if not self._core_spare(now):
            self.ns = 0
            return True
        delay = self._thread_times()[1]
        if self._delay_base is None:
            self._delay_base = delay
        elif delay - self._delay_base > POLL_CONTENDED_NS:
            self._delay_base = None
            self.ns = 0
            self.hold_until = now + POLL_HOLD_NS
            self.preempted += 1
            return True
        return self.expired(now)

    def _shrink(self):
        """Halve the window; below ``start_ns`` it is 0 (as KVM's shrink_halt_poll_ns): a
        window too short to catch anything would still cost a batch of scans."""
        self.ns //= POLL_SHRINK
        if self.ns < self.start_ns:
            self.ns = 0

    def _core_spare(self, now):
        """Whether the host had a core to spare at the last measure (taken now if due)."""
        if now >= self._spare_at:
            self._spare_at = now + SPARE_SAMPLE_NS
            cores = self.spare.measure(now, *self._thread_times())
            self._spare_ok = cores is None or cores >= SPARE_CORES_MIN
        return self._spare_ok

    def _thread_times(self):
        """(time on a CPU, time waited runnable for one) of the calling thread, ns:
        schedstat's first two fields. Without schedstat (a kernel without
        CONFIG_SCHED_INFO): the thread's CPU time, and each involuntary context switch
        counted as a wait of ``POLL_CONTENDED_NS``."""
        tid = threading.get_native_id()
        if self._schedstat is None or self._schedstat[0] != tid:
            self.close()
            try:
                fd = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = -1
            self._schedstat = tid, fd
        fd = self._schedstat[1]
        if fd >= 0:
            try:
                on_cpu, delay = os.pread(fd, 64, 0).split()[:2]
                return int(on_cpu), int(delay)
            except (OSError, ValueError):
                pass
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        return (int((usage.ru_utime + usage.ru_stime) * 1e9),
                usage.ru_nivcsw * POLL_CONTENDED_NS)

    def close(self):
        """Close the files it reads (the trap page's ``detach``)."""
        if self._schedstat is not None and self._schedstat[1] >= 0:
            os.close(self._schedstat[1])
        self._schedstat = None
        self.spare.close()

    def info(self):
        return {"poll_window_ns": self.ns, "poll_grown": self.grown,
                "poll_shrunk": self.shrunk, "poll_preempted": self.preempted,
                **self.spare.info()}


class SpareCores:
    """How much of a core the host could give the daemon's poll, measured between two calls.

    ``measure(now, on_cpu, delay)`` (``now``: ``time.monotonic_ns()``; ``on_cpu``,
    ``delay``: the polling thread's schedstat times, ns) returns, in cores over the time
    since the previous call, the time every CPU was idle or ran tasks of a positive nice
    (``stat``: /proc/stat's first line, idle + iowait + nice) plus the time this thread
    ran, minus the time it waited runnable for a CPU; None the first time or when ``stat``
    cannot be read. A niced task yields the core (against nice 0, nice 19 gets 1.5 % of it:
    kernel/sched/core.c, sched_prio_to_weight), so a background build leaves a core spare.
    Its own run counts as spare because a poll would give it back (unless it is niced
    itself: then that time is in the nice column already); its wait counts against,
    because a poll kept waiting shares a core with another task. Polling on a quiet host,
    it runs nearly all the time and hardly waits: about 1. Beside another busy task on 2
    cores, the host's three CPU-bound threads (that task, the guest's vCPU, this poll) get
    two thirds of a core each: about 0.3; sleeping on the doorbell there, idle time and its
    own short runs give about the same. Measured on the emulated board's 2-core host,
    polling always, every 250 ms while a guest did 4 KiB reads and then read its rng
    (docs/performance.md, "A core to spare"): quiet 0.71-1.17 (medians 0.93-0.99), one
    core busy -0.03-0.54 (medians 0.24-0.33); ``SPARE_CORES_MIN`` lies between."""

    def __init__(self, stat="/proc/stat"):
        self.stat = stat
        self.cores = None               # the last measure (``avatar-hw info``)
        self.short = 0                  # measures below SPARE_CORES_MIN
        self._fd = None
        self._tick_ns = 1e9 / os.sysconf("SC_CLK_TCK")
        self._last = None               # (now, idle ns, on_cpu, delay) at the last call

    def measure(self, now, on_cpu, delay):
        idle = self._idle_ns()
        last, self._last = self._last, (None if idle is None else (now, idle, on_cpu, delay))
        if last is None or idle is None or now <= last[0]:
            return None
        own = on_cpu - last[2] if os.getpriority(os.PRIO_PROCESS, 0) <= 0 else 0
        spare = idle - last[1] + own - (delay - last[3])
        self.cores = spare / (now - last[0])
        self.short += self.cores < SPARE_CORES_MIN
        return self.cores

    def _idle_ns(self):
        """All CPUs' idle + iowait + nice time so far (ns), or None."""
        try:
            if self._fd is None:
                self._fd = os.open(self.stat, os.O_RDONLY | os.O_CLOEXEC)
            fields = os.pread(self._fd, 256, 0).split(b"\n", 1)[0].split()
            return (int(fields[2]) + int(fields[4]) + int(fields[5])) * self._tick_ns
        except (OSError, IndexError, ValueError):
            return None

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def info(self):
        return {"poll_spare_cores": None if self.cores is None else round(self.cores, 2),
                "poll_no_spare_core": self.short}
