"""The device base: what every virtio device (console, block, rng, net) shares.

A device is the seed's ``virtio_device_t`` in Python: a device ID, offered
features, configuration bytes with a write hook, queues with their maximum
sizes and the ``queue_notify`` / ``reset`` callbacks. It talks to the guest
only through the ``DeviceContext`` its transport hands it (``bind``; see
avatar_hw.virtio.context: ``signal_used``, ``signal_config_change``, ``fail``,
the guest's memory), never through the transport itself, and to the host
through the event loop (``attach``).

Writing a device (one small file under ``avatar_hw/devices``)::

    class RngDevice(VirtioDevice):
        device_id = ID_RNG
        name = "rng"

        def __init__(self):
            super().__init__(queue_sizes=[256])
            self.source = open("/dev/urandom", "rb", buffering=0)

        def queue_notify(self, index):
            queue = self.queues[index]
            for chain in queue:                 # every guest value already checked
                n = buffers.fill_from(self.source.readinto, chain.writable,
                                      chain.writable_len)
                queue.add_used(chain, n)
                self.count(bytes_to_guest=n)
            self.signal_used(queue)              # interrupt unless suppressed

Hooks a device overrides (all optional except ``queue_notify``):
``queue_notify(index)``, ``activate()`` (DRIVER_OK: negotiated features are
known), ``reset()`` (drop every held chain and pending request),
``queue_reset(index)`` (the same for one queue), ``write_config(offset, data)``,
``attach(loop)`` / ``detach()`` (register / unregister backend fds).

Turns: ``queue.pop`` stops once the queue's turn budget is spent (see
``avatar_hw.virtio.queue``); the base class then calls ``queue_notify(index)``
again from the event loop's next turn, behind what is already due, so every
device and VM gets its turn. A device needs nothing for this but to treat
``pop() -> None`` as "nothing more now" and to be able to continue from
``queue_notify``.

Event-loop callbacks: register fds and timers through ``self.loop`` (set by
``VirtioDevice.attach``; hand it to backends too), never the raw loop. It is
a ``DeviceLoop``: an exception escaping a callback (a device or backend bug)
is logged, the fd's registration that raised is removed (no busy loop of
failures) and the device gets ``fail()`` (DEVICE_NEEDS_RESET), the same
contract as the trap path; the daemon and the other devices carry on.
``self.guarded(callback)`` wraps a callback the same way for other uses.
"""

import logging

from .constants import (F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_RESET, F_VERSION_1,
                        STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
                        STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, bit)
from .queue import Virtqueue

log = logging.getLogger(__name__)

# Offered by every device: the transport and ring features this package implements.
TRANSPORT_FEATURES = (bit(F_VERSION_1) | bit(F_RING_INDIRECT_DESC) | bit(F_RING_EVENT_IDX)
                      | bit(F_RING_RESET))

_STATUS_NAMES = ((STATUS_ACKNOWLEDGE, "ACKNOWLEDGE"), (STATUS_DRIVER, "DRIVER"),
                 (STATUS_FEATURES_OK, "FEATURES_OK"), (STATUS_DRIVER_OK, "DRIVER_OK"),
                 (STATUS_DEVICE_NEEDS_RESET, "DEVICE_NEEDS_RESET"), (STATUS_FAILED, "FAILED"))


def status_names(status):
    """``'ACKNOWLEDGE|DRIVER|...'`` for a status byte (``'0'`` when clear)."""
    return "|".join(name for flag, name in _STATUS_NAMES if status & flag) or "0"


class DeviceLoop:
    """``loop`` as one device sees it: the same interface, with every callback guarded
    (see the module docstring)."""

    def __init__(self, loop, device):
        self._loop, self._device = loop, device

    def add_reader(self, fd, callback):
        self._loop.add_reader(fd, self._device.guarded(
            callback, lambda: self._loop.remove_reader(fd)))

    def add_writer(self, fd, callback):
        self._loop.add_writer(fd, self._device.guarded(
            callback, lambda: self._loop.remove_writer(fd)))

    def add_hangup(self, fd, callback):
        self._loop.add_hangup(fd, self._device.guarded(
            callback, lambda: self._loop.remove_hangup(fd)))

    def remove_reader(self, fd):
        self._loop.remove_reader(fd)

    def remove_writer(self, fd):
        self._loop.remove_writer(fd)

    def remove_hangup(self, fd):
        self._loop.remove_hangup(fd)

    def call_later(self, delay, callback):
        return self._loop.call_later(delay, self._device.guarded(callback))

    def cancel(self, handle):
        self._loop.cancel(handle)


class VirtioDevice:
    """Base class. ``queue_sizes``: maximum size of each queue (QueueNumMax);
    ``features``: device-specific feature bits (the transport ones are added);
    ``config``: initial configuration space bytes."""

    device_id = 0
    name = "virtio"
    restartable = False     # its state can be restored under a running guest (avatar_hw.state)

    def __init__(self, *, queue_sizes, features=0, config=b""):
        self.features = features | TRANSPORT_FEATURES
        self.config = bytearray(config)
        self.queues = [Virtqueue(i, size, on_error=self.fail, on_used=self.signal_used,
                                 on_yield=self._resume_later)
                       for i, size in enumerate(queue_sizes)]
        self._resuming = set()              # queues with a resume on the loop
        self.context = None                 # the DeviceContext, once bound to a transport
        self.loop = None
        # bytes_from_guest: read from device-readable buffers; bytes_to_guest: written
        # into device-writable ones.
        self.counters = {"requests": 0, "bytes_from_guest": 0, "bytes_to_guest": 0,
                         "errors": 0, "interrupts": 0}

    # -- hooks ----------------------------------------------------------------------------------

    def queue_notify(self, index):
        """The driver notified queue ``index`` (it is ready and DRIVER_OK is set)."""

    def activate(self):
        """DRIVER_OK: negotiated features are final."""

    def reset(self):
        """Device reset: drop every held chain and pending request (queues are reset)."""

    def queue_reset(self, index):
        """Queue ``index`` was reset or disabled: drop chains held from it."""

    def write_config(self, offset, data):
        """The driver wrote ``data`` at ``offset`` of the configuration space."""
        self.guest_error("write to read-only config offset 0x%x; ignored", offset)

    def saved_state(self):
        """JSON-able state a restarted daemon needs beyond the transport's and the queues'
        (``avatar_hw.state``); only devices that hold such state override it."""
        return {}

    def restore_state(self, saved, words, live):
        """Take back ``saved_state()`` and the context's ``words`` after a restart. ``live``:
        the registers and queues are restored (``activate`` and ``queue_notify`` follow);
        False when the device starts afresh (the guest had reset it, or its restore failed
        and it needs a reset): take back only what outlives a reset. Raise ValueError for a
        value that makes no sense: the device then needs a reset."""

    def keep_state(self):
        """Store ``saved_state()`` now (when the daemon keeps a state file)."""
        if self.context is not None and self.context.keep_state is not None:
            self.context.keep_state()

    def bind(self, context):
        """Plugged into a transport: ``context`` (a ``DeviceContext``) is how this device
        reaches its guest from now on."""
        self.context = context

    def attach(self, loop):
        """Register backend fds with ``loop`` (an ``avatar_hw.loop.EventLoop``) through
        ``self.loop``, its guarded view (overriders call this first)."""
        self.loop = DeviceLoop(loop, self)

    def detach(self):
        """Unregister from the loop and release host resources."""
        self.loop = None

    def check_access(self):
        """Raise ``ConfigError`` if the daemon's user cannot use what the device was given;
        run when the device is built and again once ``--user`` has changed the user."""

    # -- services for subclasses --------------------------------------------------------------

    def guarded(self, callback, on_failure=None):
        """``callback`` for the event loop: an exception is logged, ``on_failure()`` runs
        and the device fails (DEVICE_NEEDS_RESET) instead of the daemon stopping."""
        def call():
            try:
                callback()
            except Exception as err:     # a device bug must not stop every VM's devices
                if self.context is not None:
                    self.context.error("internal error in an event-loop callback",
                                       exc_info=True)
                else:
                    log.exception("%s: internal error in an event-loop callback", self.name)
                try:
                    if on_failure is not None:
                        on_failure()
                    self.fail(f"internal error: {err!r}")
                except Exception:
                    if self.context is not None:     # rate-limited, as above
                        self.context.error("failing the device failed too", exc_info=True)
                    else:
                        log.exception("%s: failing the device failed too", self.name)
        return call

    @property
    def memory(self):
        """The VM's ``GuestMemory`` (None until the device is bound to a transport)."""
        return None if self.context is None else self.context.memory

    @property
    def active(self):
        """True between DRIVER_OK and the next reset, unless the device needs a reset."""
        return self.context is not None and self.context.active

    def has_feature(self, feature_bit):
        """True if ``feature_bit`` was negotiated."""
        return self.context is not None and self.context.has_feature(feature_bit)

    def signal_used(self, queue):
        """Interrupt the driver for ``queue``'s new used buffers (unless it suppressed that)."""
        if self.context is not None:
            self.context.signal_used(queue)

    def consume(self, queue, handle):
        """Give every available chain of ``queue`` to ``handle(chain)`` and return it with
        used length 0 (a driver -> device queue: nothing is written back); one interrupt.
        ``handle`` returns True to keep the chain (it waits for a busy backend): the
        loop stops there and the chain is not returned."""
        completed = False
        for chain in queue:
            if handle(chain):
                break
            queue.add_used(chain, 0)
            completed = True
        if completed:
            self.signal_used(queue)

    def signal_config_change(self):
        if self.context is not None:
            self.context.signal_config_change()

    def update_config(self, offset, data, *, notify=True):
        """Change configuration bytes: ConfigGeneration moves; ``notify`` interrupts."""
        if self.config[offset:offset + len(data)] == data:
            return
        self.config[offset:offset + len(data)] = data
        if self.context is not None:
            self.context.signal_config_change(notify)

    def _resume_later(self, queue):
        """``queue`` spent its turn (``Virtqueue.pop``): serve it again on the loop's next
        turn, behind every callback already due (other devices and VMs go first)."""
        if self.loop is None or queue.index in self._resuming:
            return
        self._resuming.add(queue.index)
        self.loop.call_later(0, lambda: self._resume(queue))

    def _resume(self, queue):
        self._resuming.discard(queue.index)
        queue.new_turn()
        if self.active and queue.ready:
            self.queue_notify(queue.index)

    def fail(self, reason):
        """An error the device cannot recover from: DEVICE_NEEDS_RESET."""
        if self.context is None:
            self.counters["errors"] += 1
            log.error("%s: %s", self.name, reason)
        else:
            self.context.fail(reason)

    def guest_error(self, fmt, *args):
        """Log a guest mistake through the context's rate-limited, counted log."""
        if self.context is not None:
            self.context.guest_error(fmt, *args)
        else:
            log.warning("%s: " + fmt, self.name, *args)

    def idle_trap(self):
        """The guest's access completed nothing: a configuration write that changes nothing
        (an *idle trap*, ``MmioTransport``'s docstring; ``avatar_hw.pace`` paces a VM that
        makes very many)."""
        if self.context is not None:
            self.context.idle_traps += 1

    def error(self, fmt, *args):
        """Log a host error the guest's requests can repeat (ERROR, rate-limited, counted)."""
        if self.context is not None:
            self.context.error(fmt, *args)
        else:
            log.error("%s: " + fmt, self.name, *args)

    def count(self, requests=1, *, bytes_from_guest=0, bytes_to_guest=0):
        c = self.counters
        c["requests"] += requests
        c["bytes_from_guest"] += bytes_from_guest
        c["bytes_to_guest"] += bytes_to_guest

    # -- introspection ------------------------------------------------------------------------

    def info(self):
        """JSON-able summary: identity and counters."""
        ctx = self.context
        return {"name": self.name, "device_id": self.device_id,
                "status": status_names(ctx.status) if ctx else "detached",
                **self.counters,
                # what the guest caused: logged (rate-limited) and counted
                "guest_errors": ctx.guest_errors if ctx else 0,
                "idle_traps": ctx.idle_traps if ctx else 0,
                "logged_errors": ctx.logged_errors if ctx else 0,
                "log_lines_suppressed": ctx.log_lines_suppressed + sum(
                    q.log_lines_suppressed for q in self.queues) if ctx else 0}

    def describe(self):
        """JSON-able debugging view: status bits, features, every queue's state."""
        ctx = self.context
        legacy = bool(ctx and ctx.legacy)
        out = self.info()
        out.update({
            "offered_features": hex(self.features & 0xFFFFFFFF if legacy else self.features),
            "driver_features": hex(ctx.driver_features) if ctx else "0x0",
            "negotiated_features": hex(ctx.negotiated_features) if ctx else "0x0",
            "interrupt_status": ctx.interrupt_status if ctx else 0,
            "config_generation": ctx.config_generation if ctx else 0,
            "legacy": legacy,
            "queues": [q.describe() for q in self.queues],
        })
        return out
