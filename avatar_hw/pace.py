"""Pacing: a VM that keeps making mistakes waits before each of its accesses.

A broken or hostile guest can post invalid register writes and notifies of rings it
scribbled as fast as its vCPU runs. Each is refused cheaply (a counted, rate-limited
guest-error line, DEVICE_NEEDS_RESET, a used entry of length 0), but each is still a
trap: the stub's doorbell, the daemon's scan and dispatch, and on the emulated board a
byte through QEMU's main loop under its global lock, with the vCPU's host thread
spinning meanwhile. Beside such a guest another VM's console ran at a third of its
speed on a 2-core host (docs/performance.md, "Two guests").

So every ``PERIOD_S`` the daemon counts each VM's mistakes (its devices' guest errors
and bad chains, ``Subsystem.guest_mistakes``); a VM with more than
``MISTAKES_PER_PERIOD`` is *paced*: the stub waits ``PACE_US`` before each access of
its vCPUs, asleep (``AVT_F_PACE``, docs/trap-abi.md section 16), so that VM neither traps
nor spins faster than one access per ``PACE_US``. ``CALM_PERIODS`` in a row without a
mistake end it: a paced guest makes too few accesses to reach the threshold again, and
a hostile one computes between its floods (bench/guest/avhostile.c scribbles its rings
for 100 ms and more); left after one calm period, it flooded unpaced ~1000 accesses
before the next count, dozens of times a run. A correct driver makes no mistake, so it
is never paced; a VM being paced still gets every access answered, only later.
"""

import logging

from . import abi
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

PERIOD_S = 0.1
MISTAKES_PER_PERIOD = 20        # 200 a second
CALM_PERIODS = 10               # in a row without a mistake end a VM's pacing
PACE_US = 1000


class Pacer:
    """Paces the VMs of ``subsystem`` through ``trap`` (a ``TrapPage``), every ``period``
    seconds on ``loop`` once ``start``-ed. ``periods[vm]``: the periods VM ``vm`` was
    paced (``avatar-hw info``)."""

    def __init__(self, trap, subsystem, loop, *, period=PERIOD_S,
                 mistakes=MISTAKES_PER_PERIOD, pace_us=PACE_US):
        self.trap, self.subsystem, self.loop = trap, subsystem, loop
        self.period, self.mistakes, self.pace_us = period, mistakes, pace_us
        self.periods = {}
        self._seen = {}                 # vm -> its mistakes at the last count
        self._paced = {}                # vm -> its calm periods in a row while paced
        self._handle = None
        self._log = RateLimitedLog(log)  # a guest can start and end its pacing at will
        self._end_log = RateLimitedLog(log, level=logging.INFO)

    def start(self):
        """Count from now on, if the stub paces (``AVT_F_PACE`` accepted)."""
        if not self.trap.features & abi.F_PACE:
            return
        for vm in self.subsystem.vms:
            self._seen[vm] = self.subsystem.guest_mistakes(vm)
        self._handle = self.loop.call_later(self.period, self._count)

    def stop(self):
        if self._handle is not None:
            self.loop.cancel(self._handle)
            self._handle = None

    def _count(self):
        for vm in self.subsystem.vms:
            total = self.subsystem.guest_mistakes(vm)
            made = total - self._seen.get(vm, total)
            self._seen[vm] = total
            if vm not in self._paced and made > self.mistakes:
                self._log("vm%d: %d guest errors in %g s: each of its accesses now waits %d "
                          "µs, until %g s without one", vm, made, self.period, self.pace_us,
                          self.period * CALM_PERIODS)
                self._paced[vm] = 0
            elif vm in self._paced:
                self._paced[vm] = 0 if made else self._paced[vm] + 1
                if self._paced[vm] >= CALM_PERIODS:
                    del self._paced[vm]
                    self.trap.pace(vm, 0)
                    self._end_log("vm%d: no longer paced", vm)
            if vm in self._paced:
                self.trap.pace(vm, self.pace_us)     # also its vCPUs that trapped since
                self.periods[vm] = self.periods.get(vm, 0) + 1
        self._handle = self.loop.call_later(self.period, self._count)

    def info(self, vm):
        return {"paced": vm in self._paced, "paced_periods": self.periods.get(vm, 0)}
