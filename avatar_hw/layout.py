"""Where devices live: virtio-mmio windows and SPIs per VM.

The seed's map: windows from 0x0a000000, 64 KiB per VM, 4 KiB per device;
SPIs from INTID 48, 8 per VM. Device k of VM v sits at
``base + v * vm_size + k * device_size`` with INTID ``irq_base + v * irqs_per_vm + k``.
"""

from dataclasses import dataclass


def address(value):
    """How avatar-hw prints a guest-physical address everywhere: ``0x0a000000``
    (at least 8 digits, so 32-bit addresses line up)."""
    return f"0x{value:08x}"


@dataclass(frozen=True)
class Layout:
    base: int = 0x0A000000
    vm_size: int = 0x10000
    device_size: int = 0x1000
    irq_base: int = 48
    irqs_per_vm: int = 8
    max_vms: int = 8

    @property
    def devices_per_vm(self):
        """Slots per VM: bounded by the window and by the IRQs."""
        return min(self.vm_size // self.device_size, self.irqs_per_vm)

    @property
    def windows_per_vm(self):
        """Device-sized windows in one VM's window (slots past ``devices_per_vm`` hold none)."""
        return self.vm_size // self.device_size

    @property
    def window_count(self):
        """Device-sized windows in the whole layout: the range of a *window number*."""
        return self.max_vms * self.windows_per_vm

    def window_number(self, vm_id, index):
        """The window number of device ``index`` of VM ``vm_id`` (what the trap path decodes
        an address to: ``(addr - base) // device_size``)."""
        self._check(vm_id, index)
        return vm_id * self.windows_per_vm + index

    @property
    def last_intid(self):
        """The INTID of the last device slot of the last VM."""
        return self.irq_base + self.irqs_per_vm * self.max_vms - 1

    def window(self, vm_id, index):
        """Guest-physical base address of device ``index`` of VM ``vm_id``."""
        self._check(vm_id, index)
        return self.base + vm_id * self.vm_size + index * self.device_size

    def intid(self, vm_id, index):
        """INTID of device ``index`` of VM ``vm_id``."""
        self._check(vm_id, index)
        return self.irq_base + vm_id * self.irqs_per_vm + index

    def vm_window(self, vm_id):
        """(first, last) guest-physical address of VM ``vm_id``'s virtio window."""
        start = self.base + vm_id * self.vm_size
        return start, start + self.vm_size - 1

    def _check(self, vm_id, index):
        if not 0 <= vm_id < self.max_vms:
            raise ValueError(f"VM {vm_id} is outside the layout (0..{self.max_vms - 1})")
        if not 0 <= index < self.devices_per_vm:
            raise ValueError(f"device slot {index} is outside the layout "
                             f"(0..{self.devices_per_vm - 1} per VM)")
