"""What a device holds of its transport: ``DeviceContext``, made once per transport.

Firecracker hands a device its guest memory and interrupt object at
``activate(mem, interrupt)``; the device never sees its transport. Here the
transport makes one ``DeviceContext`` and hands it to the device when the
device is plugged in (``VirtioDevice.bind``): configuration writes and resets
before DRIVER_OK log through it too. Nothing in it refers back to the
transport or the device, so the two never form a reference cycle.

The context holds the state both sides need: the device status byte (the
transport's state machine writes it, ``active`` reads it), the negotiated
features, InterruptStatus and ConfigGeneration, and the rate-limited,
counted logs of what the guest caused. The device calls:

- ``signal_used(queue)``: InterruptStatus bit 0, unless the driver suppressed it;
- ``signal_config_change(notify=True)``: a new ConfigGeneration, and bit 1 once
  DRIVER_OK (``notify=False``: the generation only);
- ``fail(reason)``: DEVICE_NEEDS_RESET (VirtIO 1.2 section 2.1.2);
- ``guest_error(fmt, ...)`` / ``error(fmt, ...)``: the logs.

``faults``: the device's ``avatar_hw.faults.FaultPlan`` while a test has faults
armed on it, else None (the hooks test that and nothing more).

The guest's interrupt is raised through the ``InterruptLine`` seam
(``avatar_hw.interrupts``) when an InterruptStatus bit goes from clear to set.
"""

import logging

from ..ratelimit import RateLimitedLog
from . import constants as c

log = logging.getLogger("avatar_hw.virtio.transport")

_MASK32 = 0xFFFFFFFF
WORDS = 64              # a device's hot 32-bit words kept outside the process (``words``)


class DeviceContext:
    """One device's memory, interrupt and status, for the VM whose RAM is ``memory``.

    ``interrupt_line.raise_intid(intid)`` interrupts the guest (None: no line,
    interrupts are only counted in ``counters["interrupts"]``). ``label`` names
    the device in log lines (``vm0 console@irq48``). ``before_interrupt()``, if
    given, runs before an InterruptStatus bit is set (the daemon serves the
    guests' posted InterruptACKs there: docs/trap-abi.md, section 7).
    ``registers_changed()``, if set, runs after Status or ConfigGeneration changed, and
    ``interrupt_status_changed()`` after InterruptStatus did, before the guest is
    interrupted (the daemon republishes the device's register shadow there: section 14).
    """

    def __init__(self, memory, *, interrupt_line, intid, legacy, counters, label,
                 before_interrupt=None):
        self.memory = memory
        self.before_interrupt = before_interrupt
        self.registers_changed = None
        self.interrupt_status_changed = None
        self.interrupt_line = interrupt_line
        self.intid = intid
        self.legacy = legacy
        self.counters = counters
        self.label = label
        self.status = 0
        self.driver_features = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.faults = None
        # Traps that completed nothing for the guest (``MmioTransport``, "Idle traps"):
        # ``avatar_hw.pace`` paces a VM that makes very many.
        self.idle_traps = 0
        # Kept outside the process when the daemon has a state file (avatar_hw.state):
        # ``words``, 32-bit values a device stores its hot progress in, and
        # ``keep_state()``, which stores the device's ``saved_state()``.
        self.words = [0] * WORDS
        self.keep_state = None
        self._guest_error_log = RateLimitedLog(log)
        self._error_log = RateLimitedLog(log, level=logging.ERROR)

    # -- status and features ------------------------------------------------------------

    @property
    def active(self):
        """True between DRIVER_OK and the next reset, unless the device needs a reset."""
        return (self.status & (c.STATUS_DRIVER_OK | c.STATUS_DEVICE_NEEDS_RESET)
                == c.STATUS_DRIVER_OK)

    @property
    def negotiated_features(self):
        """The features in force (0 until FEATURES_OK, or DRIVER_OK for legacy)."""
        final = c.STATUS_DRIVER_OK if self.legacy else c.STATUS_FEATURES_OK
        return self.driver_features if self.status & final else 0

    def has_feature(self, feature_bit):
        return bool(self.negotiated_features >> feature_bit & 1)

    # -- interrupts -----------------------------------------------------------------------

    def interrupt(self, bits):
        """Set InterruptStatus ``bits``; the guest is interrupted when one was clear.

        The guest's acknowledgements so far are applied first (``before_interrupt``): a bit
        it acknowledged is clear, so setting it again interrupts (and an injected fault
        sees it as the new interrupt it is)."""
        if self.before_interrupt is not None:
            self.before_interrupt()
        if (self.faults is not None and bits & ~self.interrupt_status
                and self.faults.interrupt(self, bits, self._deliver_late)):
            return                    # an injected fault dropped or delayed it
        self._set_interrupt(bits)

    def _deliver_late(self, bits):
        """A delayed interrupt, when its delay is over."""
        if self.before_interrupt is not None:
            self.before_interrupt()
        self._set_interrupt(bits)

    def _set_interrupt(self, bits):
        old = self.interrupt_status
        self.interrupt_status = old | bits
        if bits & ~old:
            if self.interrupt_status_changed is not None:
                self.interrupt_status_changed()
            self.counters["interrupts"] += 1
            if self.interrupt_line is not None:
                self.interrupt_line.raise_intid(self.intid)

    def signal_used(self, queue):
        """Interrupt the driver for new used buffers of ``queue`` unless it suppressed that."""
        if queue.needs_notification():
            self.interrupt(c.INT_USED_BUFFER)

    def signal_config_change(self, notify=True):
        """The configuration changed: new ConfigGeneration; with ``notify``, interrupt once
        DRIVER_OK."""
        self.config_generation = (self.config_generation + 1) & _MASK32
        if self.registers_changed is not None:
            self.registers_changed()
        if notify and self.status & c.STATUS_DRIVER_OK:
            self.interrupt(c.INT_CONFIG_CHANGE)

    def fail(self, reason):
        """The device met an error it cannot recover from: DEVICE_NEEDS_RESET (2.1.2)."""
        self.counters["errors"] += 1
        if self.status & c.STATUS_DEVICE_NEEDS_RESET:
            return
        self._error_log("%s: %s; setting DEVICE_NEEDS_RESET", self.label, reason)
        self.status |= c.STATUS_DEVICE_NEEDS_RESET
        if self.registers_changed is not None:
            self.registers_changed()
        if self.status & c.STATUS_DRIVER_OK:
            self.interrupt(c.INT_CONFIG_CHANGE)

    # -- logs ---------------------------------------------------------------------------------

    def guest_error(self, fmt, *args):
        """Log a guest mistake: the first ones as warnings, then every 1000th (a guest
        must not be able to flood the log), all counted in ``guest_errors``."""
        self._guest_error_log("%s: " + fmt, self.label, *args)

    def error(self, fmt, *args, exc_info=False):
        """Log an error the guest can repeat at will (an internal error it triggers, a host
        I/O error of its requests): ERROR level, rate-limited and counted like
        ``guest_error``."""
        self._error_log("%s: " + fmt, self.label, *args, exc_info=exc_info)

    @property
    def guest_errors(self):
        return self._guest_error_log.count

    @property
    def logged_errors(self):
        """``fail`` and ``error`` events, each counted whether its line went out or not."""
        return self._error_log.count

    @property
    def log_lines_suppressed(self):
        """Lines of these logs sent to debug by the rate limit (the queues count theirs)."""
        return self._guest_error_log.suppressed + self._error_log.suppressed
