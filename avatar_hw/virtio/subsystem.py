"""The VirtIO subsystem: VMs, their devices, and the MMIO trap entry point.

The seed's C API in Python::

    virtio_subsystem_init()               Subsystem(layout, interrupt_line=, loop=)
    virtio_vm_init(vm, vm_id)             vm_init(vm_id, memory)
    virtio_configure_vm(id, con, blk, n)  configure_vm(vm_id, console=, block=, net=)
    virtio_create_device(id, base, irq)   create_device(vm_id, device, slot=None)
    virtio_handle_mmio_trap(...)          handle_mmio_trap(addr, value, is_write, size)
    virtio_list_all_devices()             list_all_devices()
    virtio_print_device_info()            print_device_info() / device_info()
    virtio_debug_device(dev)              debug_device(vm_id, slot)

Windows and SPIs come from an ``avatar_hw.layout.Layout`` (the seed's map by
default, or a board's). Each device's transport gets its own VM's
``GuestMemory``, so a device reaches only that VM's RAM.

``handle_mmio_trap`` (and ``dispatch``, the trap page's way in) never raises:
an address outside every device window answers ``(False, 0)``; an exception
escaping a device (a bug) is logged and puts that device in
DEVICE_NEEDS_RESET, and the access completes (reads 0), so the guest and the
daemon carry on.
"""

import json
import logging
import sys

from ..hw import ordering
from ..layout import Layout, address
from .constants import REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS, REG_QUEUE_NOTIFY
from .transport import MmioTransport

log = logging.getLogger(__name__)

_WRITE_DONE = (True, 0)
_NOT_OURS = (False, 0)


class Subsystem:
    """All VMs and devices of one daemon.

    ``interrupt_line.raise_intid(intid)`` (``avatar_hw.interrupts``) interrupts
    guests (the GIC's board SPI on a board, the stub's request on the emulated
    board, a recorder in tests);
    ``loop`` (an ``EventLoop``) is handed to devices so they register their
    backend fds. ``before_interrupt()`` runs before any device sets an
    InterruptStatus bit (the daemon serves posted InterruptACKs there).
    """

    def __init__(self, layout=None, *, interrupt_line=None, loop=None, before_interrupt=None):
        self.layout = layout or Layout()
        size = self.layout.device_size
        if size & (size - 1):
            raise ValueError(f"layout device_size 0x{size:x} is not a power of two")
        self._span = self.layout.window_count * size
        self.interrupt_line = interrupt_line
        self.before_interrupt = before_interrupt
        self.shadows = None      # avatar_hw.shadow.RegisterShadows, once the trap page has them
        self.state = None        # avatar_hw.state.StateFile, when the daemon keeps one
        self.loop = loop
        self.vms = {}            # vm_id -> GuestMemory
        self._devices = {}       # (vm_id, slot) -> MmioTransport
        self._by_window = [None] * self.layout.window_count   # window number -> MmioTransport
        self._destroyed = {}     # vm_id -> [mistakes, idle traps] of its destroyed devices

    # -- VMs and devices ---------------------------------------------------------------------

    def vm_init(self, vm_id, memory):
        """Register VM ``vm_id`` whose RAM is ``memory`` (a ``GuestMemory``)."""
        if not 0 <= vm_id < self.layout.max_vms:
            raise ValueError(f"VM {vm_id} is outside the layout (0..{self.layout.max_vms - 1})")
        if vm_id in self.vms:
            raise ValueError(f"VM {vm_id} is already initialised")
        memory.vm_id = vm_id
        self.vms[vm_id] = memory
        return memory

    def vm_destroy(self, vm_id):
        """Remove VM ``vm_id`` and detach its devices."""
        for (vm, slot) in [key for key in self._devices if key[0] == vm_id]:
            self.destroy_device(vm, slot)
        self.vms.pop(vm_id, None)
        self._destroyed.pop(vm_id, None)

    def create_device(self, vm_id, device, slot=None, *, legacy=False):
        """Put ``device`` in VM ``vm_id``'s window ``slot`` (None: the first free one).

        Returns its ``MmioTransport`` (``.intid``, ``.device``); ``legacy=True``
        gives the Version 1 register interface.
        """
        if vm_id not in self.vms:
            raise ValueError(f"VM {vm_id} is not initialised (call vm_init first)")
        if slot is None:
            slot = next((k for k in range(self.layout.devices_per_vm)
                         if (vm_id, k) not in self._devices), None)
            if slot is None:
                raise ValueError(f"VM {vm_id} has no free device slot "
                                 f"({self.layout.devices_per_vm} in use)")
        elif (vm_id, slot) in self._devices:
            raise ValueError(f"VM {vm_id} slot {slot} already holds "
                             f"{self._devices[vm_id, slot].device.name}")
        window = self.layout.window(vm_id, slot)
        number = self.layout.window_number(vm_id, slot)
        transport = MmioTransport(device, self.vms[vm_id], interrupt_line=self.interrupt_line,
                                  intid=self.layout.intid(vm_id, slot), legacy=legacy,
                                  before_interrupt=lambda: self._before_interrupt(number))
        transport.window = window
        self._devices[vm_id, slot] = transport
        self._by_window[number] = transport
        transport.context.registers_changed = lambda: self.publish(number)
        transport.context.interrupt_status_changed = lambda: self.publish_interrupt_status(number)
        self.publish(number)
        if self.loop is not None:
            device.attach(self.loop)
        log.info("vm%d slot %d: %s at 0x%x, INTID %d", vm_id, slot, device.name, window,
                 transport.intid)
        return transport

    def destroy_device(self, vm_id, slot):
        transport = self._devices.pop((vm_id, slot))
        counts = self._destroyed.setdefault(vm_id, [0, 0])     # the VM's totals keep them
        counts[0] += self._mistakes(transport)
        counts[1] += transport.context.idle_traps
        transport.close()       # reset first: nothing it held (chains, a delayed interrupt)
        number = self.layout.window_number(vm_id, slot)     # outlives it; its shadow
        self._by_window[number] = None                      # page is cleared after that
        if self.shadows is not None:
            self.shadows.clear(number)

    def configure_vm(self, vm_id, console=None, block=None, net=None):
        """The seed's ``virtio_configure_vm``: add the given devices in slot order.

        Each argument is a device object, or for ``console`` also True (a
        console with no host endpoint yet: its output waits in the guest until
        ``device.ports[0].backend.add_endpoint(url)``) or an endpoint URL such
        as ``"pty:/run/avatar/vm0-console"``. Returns the transports created.
        """
        created = []
        for kind, spec in (("console", console), ("block", block), ("net", net)):
            if spec is None or spec is False:
                continue
            if kind == "console" and (spec is True or isinstance(spec, str)):
                from ..devices.console import ConsoleDevice
                spec = ConsoleDevice(backend=None if spec is True else spec)
            elif not hasattr(spec, "queue_notify"):
                raise ValueError(f"configure_vm: {kind} must be a device object, got {spec!r}")
            created.append(self.create_device(vm_id, spec))
        return created

    def transport_at(self, window):
        """The ``MmioTransport`` in window number ``window``, or None."""
        return self._by_window[window]

    def transports(self):
        """Every device's ``MmioTransport``, in (VM, slot) order."""
        return [self._devices[key] for key in sorted(self._devices)]

    def device(self, vm_id, slot):
        """The device in VM ``vm_id``'s slot ``slot``."""
        try:
            return self._devices[vm_id, slot].device
        except KeyError:
            raise ValueError(f"no device in VM {vm_id} slot {slot}") from None

    def close(self):
        """Close every device (backends close their fds) and let go of the VMs' RAM: no
        view into it is left, so its regions can be unmapped at once."""
        for transport in self._devices.values():
            transport.close()
        for memory in self.vms.values():
            memory.release()

    # -- register shadows (docs/trap-abi.md section 14) ------------------------------------

    def attach_shadows(self, shadows):
        """Keep ``shadows`` (``RegisterShadows``, None: none) current from now on."""
        self.shadows = shadows
        for number, transport in enumerate(self._by_window):
            if transport is not None:
                self.publish(number)

    def publish(self, window, registers_only=True):
        """Republish window number ``window``'s register shadow, if there are shadows, and
        keep its state (``registers_only``: not the queues' too)."""
        if self.shadows is not None:
            self.shadows.publish(window, self._by_window[window])
        if self.state is not None:
            self.state.save(window, registers_only=registers_only)

    def publish_interrupt_status(self, window):
        """Republish only window ``window``'s InterruptStatus (after an interrupt)."""
        if self.shadows is not None:
            self.shadows.publish_interrupt_status(
                window, self._by_window[window].context.interrupt_status)
        if self.state is not None:
            self.state.save(window, registers_only=True)

    def take_acks(self, window):
        """Apply the InterruptACKs the stub took for window ``window`` (docs/trap-abi.md
        section 15) to its InterruptStatus."""
        bits = self.shadows.take_acks(window) if self.shadows is not None else 0
        if bits:
            self._by_window[window].context.interrupt_status &= ~bits

    def _before_interrupt(self, window):
        """Before window ``window``'s device sets an InterruptStatus bit: every acknowledgement
        the guest made so far is applied first (the stub's, and posted ones), so none
        clears a bit set for a buffer the guest has not seen (trap-abi.md section 7)."""
        if self.shadows is not None and self.shadows.stub_ack:
            ordering.fence()              # the device's used-ring writes before the counts
            self.take_acks(window)
        if self.before_interrupt is not None:
            self.before_interrupt()

    # -- the trap path -----------------------------------------------------------------------

    def handle_mmio_trap(self, addr, value, is_write, size):
        """Answer one guest access: ``(handled, value read)`` (value 0 for writes).

        The seed's entry point, for callers holding an address (drivers in
        tests); the trap page decodes the address itself and calls ``dispatch``.
        """
        relative = addr - self.layout.base
        if not 0 <= relative < self._span:
            return _NOT_OURS
        device_size = self.layout.device_size
        return self.dispatch(relative // device_size, relative % device_size, value, is_write,
                             size)

    def dispatch(self, window, offset, value, is_write, size):
        """Answer one guest access at ``offset`` of window number ``window``
        (``Layout.window_number``): ``(handled, value read)``, value 0 for writes."""
        transport = self._by_window[window]
        if transport is None:
            return _NOT_OURS
        try:
            if is_write:
                transport.write(offset, size, value)
                if offset != REG_QUEUE_NOTIFY:
                    self.publish(window, registers_only=offset == REG_INTERRUPT_ACK)
                return _WRITE_DONE
            if offset == REG_INTERRUPT_STATUS:
                self.take_acks(window)
            return True, transport.read(offset, size)
        except Exception as err:     # a device bug must not take the daemon down
            transport.error("internal error on %s of 0x%x", "write" if is_write else "read",
                            transport.window + offset, exc_info=True)
            try:
                transport.fail(f"internal error: {err!r}")
            except Exception:        # rate-limited: the guest can repeat the access
                transport.error("failing the device failed too", exc_info=True)
            return _WRITE_DONE

    # -- debugging ---------------------------------------------------------------------------

    def list_all_devices(self):
        """One dict per device: VM, slot, name, device ID, window, INTID."""
        return [{"vm": vm, "slot": slot, "name": t.device.name,
                 "device_id": t.device.device_id, "base": address(t.window), "irq": t.intid,
                 "legacy": t.legacy}
                for (vm, slot), t in sorted(self._devices.items())]

    def guest_mistakes(self, vm_id):
        """What VM ``vm_id``'s guest got wrong so far: its devices' guest errors and bad
        chains (``avatar_hw.pace`` paces a VM that makes many)."""
        return (sum(self._mistakes(transport) for transport in self._vm_transports(vm_id))
                + self._destroyed.get(vm_id, (0, 0))[0])

    def idle_traps(self, vm_id):
        """VM ``vm_id``'s traps that completed nothing so far (``MmioTransport``, "Idle
        traps"; ``avatar_hw.pace`` paces a VM that makes very many)."""
        return (sum(transport.context.idle_traps for transport in self._vm_transports(vm_id))
                + self._destroyed.get(vm_id, (0, 0))[1])

    @staticmethod
    def _mistakes(transport):
        return (transport.context.guest_errors
                + sum(queue.bad_chains for queue in transport.device.queues))

    def _vm_transports(self, vm_id):
        return (transport for (vm, _), transport in self._devices.items() if vm == vm_id)

    def device_info(self):
        """JSON-able info for every device (identity, status, counters)."""
        for number, transport in enumerate(self._by_window):
            if transport is not None:
                self.take_acks(number)          # InterruptStatus as the guest reads it
        return [{**entry, **self._devices[entry["vm"], entry["slot"]].device.info()}
                for entry in self.list_all_devices()]

    def debug_device(self, vm_id, slot):
        """Full debugging view of one device (status bits, features, queues)."""
        transport = self._devices.get((vm_id, slot))
        if transport is None:
            raise ValueError(f"no device in VM {vm_id} slot {slot}")
        self.take_acks(self.layout.window_number(vm_id, slot))
        return {"vm": vm_id, "slot": slot, "base": address(transport.window),
                "irq": transport.intid, **transport.device.describe()}

    def print_device_info(self, file=None):
        json.dump(self.device_info(), file or sys.stdout, indent=2)
        print(file=file or sys.stdout)
