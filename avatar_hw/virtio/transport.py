"""The virtio-mmio transport (VirtIO 1.2 section 4.2.2), register by register.

``MmioTransport`` answers one device window: the guest's register accesses
arrive as ``read(offset, size)`` / ``write(offset, size, value)``, each looked
up in the register table (``avatar_hw.virtio.registers``): offsets to the
transport's register methods, ``read_<register>()`` / ``write_<register>(value)``.
It owns the device status state machine (``STATUS_PREREQUISITES``, the one
table of allowed transitions), feature negotiation, the queue registers and the
interrupt status; the device behind it only sees ``queue_notify``,
``activate``, ``reset``, ``queue_reset`` and ``write_config``.

Rules (each logged at warning level when the guest breaks it):

* a 64-bit access is two 32-bit ones (offset, offset + 4), as QEMU's memory
  core splits it for virtio-mmio. Registers below 0x100 take only aligned
  32-bit accesses; others read 0 and writes are ignored. Write-only
  registers read 0, read-only ones ignore writes. The configuration space
  (0x100..) takes 8/16/32-bit accesses at any offset, as QEMU's virtio-mmio
  does (VirtIO 1.2 4.2.2.2 leaves all but natural-width accesses undefined);
  an access not wholly inside the device's configuration reads all ones
  (QEMU's answer) and its write is ignored. Differences from QEMU:
  docs/devices.md, "Register-level differences from QEMU".
* status: writing 0 resets the device (DeviceFeaturesSel and DriverFeaturesSel
  keep their values, as QEMU's: 4.2.2.1 asks QueueReady and InterruptStatus
  cleared, no more); otherwise the driver may only add bits, each one only when
  its prerequisites are set (table below).
  FEATURES_OK stays clear when the driver accepted a feature the device did
  not offer or, in modern mode, did not accept VIRTIO_F_VERSION_1.
  DEVICE_NEEDS_RESET is set only by the device (``fail``), with a
  configuration-change interrupt once DRIVER_OK is set.
* driver features change only before FEATURES_OK; queue registers change
  only while the selected queue is not ready and before DRIVER_OK (or after
  a QueueReset of that queue, with VIRTIO_F_RING_RESET; the reset completes
  within the write, so QueueReset reads 0).
* DRIVER_OK serves every ready queue once (buffers made available before it, whose
  notifies were ignored); a QueueNotify value is the queue index (its low 16 bits with
  VIRTIO_F_NOTIFICATION_DATA).
* QueueReady = 1 validates the layout (``Virtqueue.set_up``); an unusable
  layout leaves the queue not ready and sets DEVICE_NEEDS_RESET.
* interrupts: InterruptStatus bits are set by ``signal_used`` (bit 0, only
  when the driver's suppression allows) and ``signal_config_change`` (bit 1),
  both the ``DeviceContext``'s (avatar_hw.virtio.context), which the device
  holds instead of the transport; the guest INTID is raised when a bit goes
  from clear to set (the guest reads the
  status and the rings after that, so nothing is missed).

Idle traps (``DeviceContext.idle_traps``; ``avatar_hw.pace`` paces a VM that makes
very many): accesses that complete nothing for the guest, which a guest can repeat at
trap rate without one guest error, each still a trap that costs the other VMs:

* a QueueNotify of a ready queue whose available index has not moved since its
  previous notify (``Virtqueue.notified``: a request queue already served, receive
  buffers already offered), or one made before DRIVER_OK (served at DRIVER_OK);
* a selector write (QueueSel, DeviceFeaturesSel, DriverFeaturesSel, ShmSel) after
  DRIVER_OK, or of the value it holds: a selector only picks the register a later
  access reaches, and once the device is set up nothing needs one but a queue's
  reset or removal (so a guest alternating two values counts too);
* a write that changes nothing: an InterruptACK of clear bits, a Status write with no
  new bit, QueueReady (legacy: QueuePFN) 0 of a queue not ready, QueueReset without bit
  0 or of no queue;
* a read no register shadow mirrors (8 bytes wide, or of a register outside
  ``SHADOWED``): the stub sends it to the model whatever it holds; a shadowed
  register's read traps only when the stub could not answer it (no shadows, a page
  being rewritten), which is not the guest's doing;
* a write while the guest loops reset and setup: a device (or one of its queues,
  QueueReset) reset more than ``RESETS_PER_SECOND`` times within a second (a driver
  resets it when it probes and when it lets it go; one reloaded in a shell loop, a few
  times a second). For the rest of that second, each write of its setups before
  DRIVER_OK is idle, and after DRIVER_OK
  each write of a queue's setup (QueueSel, QueueNum, its ring addresses, QueueReady,
  QueueReset).

A correct driver makes one or two while it probes a device (Linux selects queue 0,
already selected) and, now and then, a notify finds nothing new: the entries it was for
were taken when an earlier one was served (figures: pace.py). Not counted: writes while
a driver sets a device up once (before DRIVER_OK a ring address, QueueNum or
DriverFeatures written again, or a selector alternating two values, is setup to the
model; a guest stuck in setup is left to the fair order). Configuration-space writes
are the device's business: a read-only field's is a guest error, one that changes
nothing an idle trap (``VirtioDevice.idle_trap``: virtio-gpu's ``events_clear`` of
clear events, virtio-balloon's ``actual`` written again, an emergency console byte
dropped because the port holds too many already).

Legacy (Version 1, ``legacy=True``): GuestPageSize, QueueAlign and QueuePFN
replace QueueReady and the 64-bit ring addresses; features are 32 bits and
VERSION_1 is never offered; FEATURES_OK is optional; features the device did
not offer are masked off at DRIVER_OK (a guest error).
"""

import logging
from time import monotonic_ns

from . import constants as c
from .constants import bit
from .context import DeviceContext
from .legacy import LegacyRegisters
from .queue import QueueError
from .registers import SHADOWED, register_tables

log = logging.getLogger(__name__)

_ACK, _DRIVER, _FEATURES_OK, _DRIVER_OK, _FAILED, _NEEDS_RESET = (
    c.STATUS_ACKNOWLEDGE, c.STATUS_DRIVER, c.STATUS_FEATURES_OK, c.STATUS_DRIVER_OK,
    c.STATUS_FAILED, c.STATUS_DEVICE_NEEDS_RESET)

# The status state machine: bit the driver sets -> bits that must already be set.
# Bits are applied in this order, so one write may set several in sequence.
STATUS_PREREQUISITES = {
    _ACK: 0,
    _DRIVER: _ACK,
    _FEATURES_OK: _ACK | _DRIVER,
    _DRIVER_OK: _ACK | _DRIVER | _FEATURES_OK,
    _FAILED: 0,
}
# Legacy drivers never set FEATURES_OK (features are final at DRIVER_OK).
LEGACY_STATUS_PREREQUISITES = {
    flag: (_ACK | _DRIVER if flag == _DRIVER_OK else need)
    for flag, need in STATUS_PREREQUISITES.items()}
_DRIVER_BITS = _ACK | _DRIVER | _FEATURES_OK | _DRIVER_OK | _FAILED

_MASK32 = 0xFFFFFFFF

RESETS_PER_SECOND = 20          # more, and the guest loops reset and setup (idle traps)
_SECOND_NS = 1_000_000_000
_QUEUE_SETUP = frozenset((c.REG_QUEUE_SEL, c.REG_QUEUE_NUM, c.REG_QUEUE_READY,
                          c.REG_QUEUE_RESET, c.REG_QUEUE_DESC_LOW, c.REG_QUEUE_DESC_HIGH,
                          c.REG_QUEUE_DRIVER_LOW, c.REG_QUEUE_DRIVER_HIGH,
                          c.REG_QUEUE_DEVICE_LOW, c.REG_QUEUE_DEVICE_HIGH))


def pieces(offset, size):
    """The accesses QEMU's memory core makes of an 8-byte or unaligned one to a device that
    takes 1 to 4 bytes at a time (physmem.c, ``memory_access_size``): each at most 4
    bytes and aligned to its own size, in address order, as ``(offset, size, shift)`` (the
    piece's place in the whole value). A qtest ``readq`` at 0x6e reads 2, 4 and 2 bytes:
    Status in bits 16..47. An Arm guest's unaligned access to Device memory faults before
    it traps, so only 8-byte ones at 8-byte boundaries come from a real guest."""
    out, shift = [], 0
    while size:
        n = min(4, offset & -offset or 4, 1 << (size.bit_length() - 1))
        out.append((offset, n, shift))
        offset, size, shift = offset + n, size - n, shift + 8 * n
    return out


class MmioTransport(LegacyRegisters):
    """One virtio-mmio window for ``device`` of the VM whose RAM is ``memory``.

    ``interrupt_line.raise_intid(intid)`` is called to interrupt the guest (None: no line,
    interrupts are only counted). The device gets the transport's ``DeviceContext``
    (``device.bind``), never the transport itself.
    """

    def __init__(self, device, memory, *, interrupt_line=None, intid=0, legacy=False,
                 before_interrupt=None):
        self.device = device
        self.memory = memory
        self.intid = intid
        self.legacy = legacy
        self.context = DeviceContext(memory, interrupt_line=interrupt_line, intid=intid,
                                     legacy=legacy, counters=device.counters,
                                     label=f"vm{memory.vm_id} {device.name}@irq{intid}",
                                     before_interrupt=before_interrupt)
        self.status_prerequisites = LEGACY_STATUS_PREREQUISITES if legacy else STATUS_PREREQUISITES
        self.page_size = 4096
        self.queue_align = [4096] * len(device.queues)
        self.queue_was_reset = [False] * len(device.queues)
        self._reads, self._writes = register_tables(MmioTransport, legacy)
        self.shadowed_registers = tuple(r for r in SHADOWED if r in self._reads)
        self._unmirrored = frozenset(self._reads).difference(SHADOWED)
        self._resets_since = -_SECOND_NS        # the reset window: its start, its count
        self._resets = 0
        self.device_features_sel = 0    # kept across resets (module docstring)
        self.driver_features_sel = 0
        self._clear_registers()
        device.bind(self.context)

    # -- state kept in the device's context -----------------------------------------------

    def _context_field(name):
        return property(lambda self: getattr(self.context, name),
                        lambda self, value: setattr(self.context, name, value))

    status = _context_field("status")
    driver_features = _context_field("driver_features")
    interrupt_status = _context_field("interrupt_status")
    config_generation = _context_field("config_generation")
    del _context_field

    @property
    def interrupt_line(self):
        return self.context.interrupt_line

    def read(self, offset, size):
        """The value the guest reads at ``offset`` with a ``size``-byte access (an idle trap
        when no register shadow mirrors it)."""
        if size == 8 or offset & (size - 1):     # in pieces, as QEMU's memory core
            self.context.idle_traps += 1
            value = 0
            for at, n, shift in pieces(offset, size):
                value |= self._read(at, n) << shift
            return value
        if offset in self._unmirrored:
            self.context.idle_traps += 1
        handler = self._reads.get(offset) if size == 4 else None
        if handler is not None:          # the common case, without ``_read``'s checks
            return handler(self)
        return self._read(offset, size)

    def _read(self, offset, size):
        if offset >= c.REG_CONFIG:
            return self._read_config(offset - c.REG_CONFIG, size)
        if size != 4 or offset & 3:
            self.guest_error("%d-byte read at 0x%03x: registers take aligned 32-bit "
                              "accesses; reads 0", size, offset)
            return 0
        handler = self._reads.get(offset)
        if handler is None:
            self.guest_error("read of 0x%03x (no such register, or write-only); reads 0", offset)
            return 0
        return handler(self)

    def write(self, offset, size, value):
        """The guest writes ``value`` at ``offset`` with a ``size``-byte access."""
        if size == 8 or offset & (size - 1):
            for at, n, shift in pieces(offset, size):
                self.write(at, n, value >> shift & ((1 << 8 * n) - 1))
            return
        if offset >= c.REG_CONFIG:
            self._write_config(offset - c.REG_CONFIG, size, value)
            return
        if size != 4 or offset & 3:
            self.guest_error("%d-byte write at 0x%03x: registers take aligned 32-bit "
                              "accesses; ignored", size, offset)
            return
        handler = self._writes.get(offset)
        if handler is None:
            self.guest_error("write of 0x%x to 0x%03x (no such register, or read-only); "
                              "ignored", value, offset)
            return
        if self._resets > RESETS_PER_SECOND and (not self.status & _DRIVER_OK
                                                  or offset in _QUEUE_SETUP) \
                and monotonic_ns() - self._resets_since < _SECOND_NS:
            self.context.idle_traps += 1
        handler(self, value & _MASK32)

    def __str__(self):
        return self.context.label

    def guest_error(self, fmt, *args):
        """Log a guest mistake (``DeviceContext.guest_error``: rate-limited, counted)."""
        self.context.guest_error(fmt, *args)

    def error(self, fmt, *args, exc_info=False):
        """Log an error the guest can repeat at will (``DeviceContext.error``)."""
        self.context.error(fmt, *args, exc_info=exc_info)

    @property
    def guest_errors(self):
        return self.context.guest_errors

    @property
    def log_lines_suppressed(self):
        """Lines about this device's guest sent to debug by the rate limit."""
        return (self.context.log_lines_suppressed
                + sum(q.log_lines_suppressed for q in self.device.queues))

    # -- status and reset ------------------------------------------------------------------

    def _clear_registers(self):
        self.status = 0
        self.interrupt_status = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0

    def reset(self):
        """Device reset (status 0 written): registers, queues and the device's own state."""
        self._clear_registers()
        for queue in self.device.queues:
            queue.reset()
        self.queue_was_reset = [False] * len(self.device.queues)
        self.device.reset()
        if self.context.registers_changed is not None:   # a reset from outside a trap too
            self.context.registers_changed()

    def _count_reset(self):
        """A guest's reset, counted in its window of a second (a reset a second or more
        after the window began starts a new one): past RESETS_PER_SECOND, the setups that
        follow are a loop (idle traps, the docstring above)."""
        now = monotonic_ns()
        if now - self._resets_since >= _SECOND_NS:
            self._resets_since, self._resets = now, 0
        self._resets += 1

    def close(self):
        """Reset the device (it drops the chains it held), detach it from the event loop
        and drop the queues' views of guest RAM."""
        self.reset()
        self.device.detach()

    def write_status(self, value):
        value &= 0xFF
        if value == 0:
            self._count_reset()
            self.reset()
            return
        old = self.status & ~_NEEDS_RESET
        if old & ~value:
            self.guest_error("status 0x%02x would clear bits of 0x%02x without a reset; "
                              "ignored", value, self.status)
            return
        added = value & ~old & ~_NEEDS_RESET
        if not added:
            self.context.idle_traps += 1
            return
        if added & ~_DRIVER_BITS:
            self.guest_error("status bits 0x%02x are not driver bits; ignored",
                              added & ~_DRIVER_BITS)
        for flag, needed in self.status_prerequisites.items():
            if not added & flag:
                continue
            if self.status & needed != needed:
                self.guest_error("status bit 0x%02x needs 0x%02x first (status 0x%02x); "
                                  "ignored", flag, needed, self.status)
                break
            if flag == _FEATURES_OK and not self._features_acceptable():
                continue
            if flag == _DRIVER_OK and self.legacy:
                self._drop_unoffered_legacy_features()
            self.status |= flag
            if flag == _DRIVER_OK:
                self.activate()

    def _features_acceptable(self):
        unknown = self.driver_features & ~self.offered_features
        if unknown:
            self.guest_error("driver accepted features 0x%x the device does not offer; "
                              "FEATURES_OK stays clear", unknown)
            return False
        if not self.legacy and not self.driver_features & bit(c.F_VERSION_1):
            self.guest_error("driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK stays "
                              "clear")
            return False
        return True

    def activate(self):
        """DRIVER_OK (or a restart under it): the negotiated ring features to the queues,
        the device activated, every ready queue served."""
        for queue in self.device.queues:
            queue.use_features(self.negotiated_features)
        self.device.activate()
        # Buffers made available before DRIVER_OK (3.1.1 step 7, "population of
        # virtqueues") are served now: the notifies that came with them were ignored
        # (2.1.2), as QEMU's ioeventfd start kicks every queue.
        for queue in self.device.queues:
            if queue.ready and self.status & _DRIVER_OK and not self.status & _NEEDS_RESET:
                queue.new_turn()
                self.device.queue_notify(queue.index)

    def fail(self, reason):
        """The device met an error it cannot recover from: DEVICE_NEEDS_RESET (2.1.2)."""
        self.context.fail(reason)

    # -- features ----------------------------------------------------------------------------

    @property
    def offered_features(self):
        if self.legacy:
            return self.device.features & _MASK32
        return self.device.features

    @property
    def negotiated_features(self):
        """The features in force (0 until FEATURES_OK, or DRIVER_OK for legacy)."""
        return self.context.negotiated_features

    def has_feature(self, feature_bit):
        return self.context.has_feature(feature_bit)

    def read_device_features(self):
        if self.device_features_sel > 1 or (self.legacy and self.device_features_sel):
            return 0
        return self.offered_features >> (32 * self.device_features_sel) & _MASK32

    def _select(self, name, value):
        """Selector ``name`` := ``value``; an idle trap after DRIVER_OK or when it holds
        ``value`` already (module docstring, "Idle traps")."""
        if self.status & _DRIVER_OK or getattr(self, name) == value:
            self.context.idle_traps += 1
        setattr(self, name, value)

    def write_device_features_sel(self, value):
        self._select("device_features_sel", value)

    def write_driver_features_sel(self, value):
        self._select("driver_features_sel", value)

    def write_driver_features(self, value):
        sel = self.driver_features_sel
        if self.status & (_FEATURES_OK | _DRIVER_OK):
            self.guest_error("driver features written after FEATURES_OK/DRIVER_OK; ignored")
            return
        if sel > 1 or (self.legacy and sel):
            if value:     # Linux writes 0 to word 1 of a legacy device: harmless
                self.guest_error("driver features word %d does not exist; ignored", sel)
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(_MASK32 << shift)) | (value << shift)

    # -- queues ------------------------------------------------------------------------------

    def _selected_queue(self):
        if self.queue_sel < len(self.device.queues):
            return self.device.queues[self.queue_sel]
        return None

    def _configurable_queue(self, what):
        """The selected queue if its registers may change now, else None (logged)."""
        queue = self._selected_queue()
        if queue is None:
            self.guest_error("%s for queue %d, which does not exist; ignored", what,
                              self.queue_sel)
        elif queue.ready:
            self.guest_error("%s for queue %d while it is ready; ignored", what, queue.index)
        elif self.status & _DRIVER_OK and not self.queue_was_reset[queue.index]:
            self.guest_error("%s for queue %d after DRIVER_OK; ignored", what, queue.index)
        else:
            return queue
        return None

    def write_queue_sel(self, value):
        self._select("queue_sel", value)

    def read_queue_num_max(self):
        queue = self._selected_queue()
        return 0 if queue is None else queue.max_size

    def write_queue_num(self, value):
        queue = self._configurable_queue("QueueNum")
        if queue is not None:
            queue.size = value

    @staticmethod
    def ring_address_writer(attr, shift):
        """The write method of one 32-bit half (``shift`` 0 or 32) of a queue's ring
        address ``attr`` (QueueDescLow/High, QueueDriver..., QueueDevice...)."""
        def write(self, value):
            queue = self._configurable_queue(attr)
            if queue is not None:
                old = getattr(queue, attr)
                setattr(queue, attr, (old & ~(_MASK32 << shift)) | (value << shift))
        return write

    def read_queue_ready(self):
        queue = self._selected_queue()
        return int(queue is not None and queue.ready)

    def write_queue_ready(self, value):
        if value & 1:
            queue = self._configurable_queue("QueueReady")
            if queue is not None:
                self._enable_queue(queue)
            return
        queue = self._selected_queue()
        if queue is not None and queue.ready:
            self._disable_queue(queue)
        else:
            self.context.idle_traps += 1

    def _enable_queue(self, queue):
        queue.use_features(self.driver_features)
        try:
            queue.set_up(self.memory)
        except QueueError as err:
            self.fail(str(err))
            return
        self.queue_was_reset[queue.index] = False

    def _disable_queue(self, queue):
        queue.disable()
        self.device.queue_reset(queue.index)

    def write_queue_notify(self, value):
        # 4.2.2: the value is the queue index, unless VIRTIO_F_NOTIFICATION_DATA makes its
        # low 16 bits the index (0x12340000 is no queue: QEMU ignores it too)
        index = value & 0xFFFF if self.has_feature(c.F_NOTIFICATION_DATA) else value
        if self.status & (_DRIVER_OK | _FEATURES_OK) == _FEATURES_OK:
            # Early, against VirtIO 1.2 3.1.1, but routine (Linux's virtio_balloon kicks its
            # statistics queue before DRIVER_OK): its buffers are served at DRIVER_OK.
            log.debug("%s: notify of queue %d before DRIVER_OK; served at DRIVER_OK",
                      self.context.label, index)
            self.context.idle_traps += 1
            return
        if not self.status & _DRIVER_OK or self.status & _NEEDS_RESET:
            self.guest_error("notify of queue %d with status 0x%02x; ignored", index, self.status)
            return
        if index >= len(self.device.queues) or not self.device.queues[index].ready:
            self.guest_error("notify of queue %d, which is not ready; ignored", index)
            return
        if not self.device.queues[index].notified():
            self.context.idle_traps += 1
        self.device.queue_notify(index)

    def write_queue_reset(self, value):
        queue = self._selected_queue()
        if not value & 1 or queue is None:
            self.context.idle_traps += 1
            return
        if not self.has_feature(c.F_RING_RESET):
            self.guest_error("QueueReset without VIRTIO_F_RING_RESET; ignored")
            return
        self._count_reset()
        queue.reset()
        self.queue_was_reset[queue.index] = True
        self.device.queue_reset(queue.index)

    def write_shm_sel(self, value):
        self._select("shm_sel", value)

    # -- interrupts ---------------------------------------------------------------------------

    def write_interrupt_ack(self, value):
        context = self.context
        if not value & context.interrupt_status:
            context.idle_traps += 1
        context.interrupt_status &= ~value

    def signal_used(self, queue):
        """Interrupt the driver for new used buffers of ``queue`` unless it suppressed that."""
        self.context.signal_used(queue)

    def signal_config_change(self):
        """The configuration changed: new ConfigGeneration, interrupt once DRIVER_OK."""
        self.context.signal_config_change()

    # -- configuration space -----------------------------------------------------------------

    def _config_range_ok(self, offset, size, what):
        if offset + size > len(self.device.config):
            self.guest_error("%d-byte config %s at 0x%x, outside the %d-byte config; %s",
                             size, what, offset, len(self.device.config),
                             "reads all ones" if what == "read" else "ignored")
            return False
        return True

    def _read_config(self, offset, size):
        if not self._config_range_ok(offset, size, "read"):
            return (1 << 8 * size) - 1
        return int.from_bytes(self.device.config[offset:offset + size], "little")

    def _write_config(self, offset, size, value):
        if self._config_range_ok(offset, size, "write"):
            data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            self.device.write_config(offset, data)
