"""Pacing: a VM that keeps making mistakes, or traps to no effect, waits before each of
its accesses.

A broken or hostile guest can post invalid register writes and notifies of rings it
scribbled as fast as its vCPU runs. Each is refused cheaply (a counted, rate-limited
guest-error line, DEVICE_NEEDS_RESET, a used entry of length 0), but each is still a
trap: the stub's doorbell, the daemon's scan and dispatch, and on the emulated board a
byte through QEMU's main loop under its global lock, with the vCPU's host thread
spinning meanwhile. Beside such a guest another VM's console ran at a third of its
speed on a 2-core host (docs/performance.md, "Two guests"). The same holds for valid
accesses that complete nothing: a notify of a queue with nothing new in it, an
InterruptACK of clear bits, a selector written again and again (*idle traps*,
``MmioTransport``'s docstring), which make no mistake.

So every ``PERIOD_S`` while traps come (a period with none, and no VM paced, stops the
count until the next trap: an idle daemon sleeps) the daemon counts each VM's mistakes
(its devices' guest errors and bad chains, ``Subsystem.guest_mistakes``) and idle traps
(``Subsystem.idle_traps``);
a VM with more than ``MISTAKES_PER_PERIOD`` mistakes or ``IDLE_TRAPS_PER_PERIOD`` idle
traps is *paced*: the stub waits ``PACE_US`` before each access of its vCPUs, asleep
(``AVT_F_PACE``, docs/trap-abi.md section 16), so that VM neither traps nor spins faster
than one access per ``PACE_US``; each period it goes on erring (or trapping to no effect)
doubles its pace, up to ``PACE_CEILING_US``: a paced VM's accesses still cost the host a
trap each (on the emulated board a UART byte under QEMU's global lock), and a guest that
goes on is slowed further. ``CALM_PERIODS`` in a row without a mistake and with at
most ``CALM_IDLE_TRAPS`` idle traps end it: a paced vCPU makes at most 100 accesses a
period, so a guest still flooding stays paced, and a hostile one computes between its
floods (bench/guest/avhostile.c scribbles its rings for 100 ms and more); left after one
calm period, it flooded unpaced ~1000 accesses before the next count, dozens of times a
run. A correct driver makes no mistake, so it is never paced for them; a VM being paced
still gets every access answered, only later.

A correct driver's idle traps are few: one to three per device while it probes it (QueueSel
0, already selected; virtio-balloon's statistics notify before DRIVER_OK; virtio-gpu's
shared-memory probe), none after. Measured with the Linux guests of the emulated board
(2026-12-02, load average 3-6, counted per period): the emulated tests of console, block,
rng, net, 9p, vsock, balloon and two guests (VM0 moving 64 MiB through its console and
block device beside the hostile VM1, then VM1's drivers reloaded), and one ``python -m
bench --only board --runs 1`` (randread, rng, 9p, console, every device probed): no
period above 3, and no idle notify at all from a correct driver (a notify of entries
already served counts only if the driver added none since its previous notify, which
Linux with VIRTIO_F_RING_EVENT_IDX never does). VM1's hostile program
(bench/guest/avhostile.c) made up to 592 in a period. ``IDLE_TRAPS_PER_PERIOD`` is ~70
times the correct drivers' most, and a fifth of what an unpaced hostile guest trapped
(~11 000 traps a second, docs/performance.md "Two guests").
"""

import logging

from . import abi
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

PERIOD_S = 0.1
MISTAKES_PER_PERIOD = 20        # 200 a second
IDLE_TRAPS_PER_PERIOD = 200     # 2000 a second (correct drivers: at most 3, see above)
CALM_IDLE_TRAPS = 20            # at most this many, and no mistake: a calm period
CALM_PERIODS = 10               # calm periods in a row end a VM's pacing
PACE_US = 1000                  # a VM's first pace; doubled each period it is not calm,
PACE_CEILING_US = 16_000        # up to this: ~60 accesses a second from a VM that keeps on


class Pacer:
    """Paces the VMs of ``subsystem`` through ``trap`` (a ``TrapPage``), every ``period``
    seconds on ``loop`` once ``start``-ed. ``periods[vm]``: the periods VM ``vm`` was
    paced; ``idle_peaks[vm]``: the most idle traps it made in one period (``avatar-hw
    info``)."""

    def __init__(self, trap, subsystem, loop, *, period=PERIOD_S,
                 mistakes=MISTAKES_PER_PERIOD, idle=IDLE_TRAPS_PER_PERIOD, pace_us=PACE_US):
        self.trap, self.subsystem, self.loop = trap, subsystem, loop
        self.period, self.mistakes, self.idle, self.pace_us = period, mistakes, idle, pace_us
        self.periods = {}
        self.idle_peaks = {}
        self._seen = {}                 # vm -> (its mistakes, its idle traps) at the last count
        self._paced = {}                # vm -> [its calm periods in a row, its pace (µs)]
        self._why = {}                  # vm -> what it was last paced for
        self._handle = None             # the next count's timer; None: not counting
        self._counting = False          # started: counts while traps come or a VM is paced
        self._served = 0                # the trap page's answered traps at the last count
        self._log = RateLimitedLog(log)  # a guest can start and end its pacing at will
        self._end_log = RateLimitedLog(log, level=logging.INFO)

    def start(self):
        """Count from now on, if the stub paces (``AVT_F_PACE`` accepted)."""
        if not self.trap.features & abi.F_PACE:
            return
        for vm in self.subsystem.vms:
            self._seen[vm] = self._totals(vm)
        self._counting = True
        self._served = self.trap.stats.served
        self._handle = self.loop.call_later(self.period, self._count)

    def wake(self):
        """Traps were served: count again if it had stopped (``_count``: a period with no
        trap and no VM paced leaves the daemon asleep until the next trap)."""
        if self._handle is None and self._counting:
            self._handle = self.loop.call_later(self.period, self._count)

    def stop(self):
        self._counting = False
        if self._handle is not None:
            self.loop.cancel(self._handle)
            self._handle = None

    def _totals(self, vm):
        """VM ``vm``'s mistakes and idle traps so far: its devices' counts, and its accesses
        that reached no device (``TrapPage.vm_unhandled``: an empty window of its own, a
        malformed access), which no device counts."""
        return (self.subsystem.guest_mistakes(vm),
                self.subsystem.idle_traps(vm) + self.trap.vm_unhandled[vm])

    def _count(self):
        for vm in self.subsystem.vms:
            mistakes, idle = totals = self._totals(vm)
            seen_mistakes, seen_idle = self._seen.get(vm, totals)
            made, idled = mistakes - seen_mistakes, idle - seen_idle
            self._seen[vm] = totals
            if idled > self.idle_peaks.get(vm, 0):
                self.idle_peaks[vm] = idled
            if vm not in self._paced and (made > self.mistakes or idled > self.idle):
                why = self._why[vm] = ("guest errors" if made > self.mistakes
                                       else "idle traps")
                self._log("vm%d: %d %s in %g s: each of its accesses now waits %d µs, until "
                          "%g s of calm", vm, made if made > self.mistakes else idled, why,
                          self.period, self.pace_us, self.period * CALM_PERIODS)
                self._paced[vm] = [0, self.pace_us]
            elif vm in self._paced:
                paced = self._paced[vm]
                if not made and idled <= CALM_IDLE_TRAPS:
                    paced[0] += 1
                else:
                    paced[:] = 0, min(2 * paced[1], PACE_CEILING_US)
                if paced[0] >= CALM_PERIODS:
                    del self._paced[vm]
                    self.trap.pace(vm, 0)
                    self._end_log("vm%d: no longer paced", vm)
            if vm in self._paced:
                self.trap.pace(vm, self._paced[vm][1])   # also its vCPUs that trapped since
                self.periods[vm] = self.periods.get(vm, 0) + 1
        served, self._served = self._served, self.trap.stats.served
        if self._paced or served != self._served:
            self._handle = self.loop.call_later(self.period, self._count)
        else:
            self._handle = None         # nothing came: ``wake`` starts again

    def info(self, vm):
        return {"paced": vm in self._paced, "pace_us": self._paced.get(vm, (0, 0))[1],
                "paced_periods": self.periods.get(vm, 0),
                "paced_for": self._why.get(vm), "idle_traps": self._totals(vm)[1],
                "idle_traps_peak": self.idle_peaks.get(vm, 0)}
