"""``avatar-hw serve --trace``: one log line per answered trap, on logger ``avatar_hw.trace``.

``TrapTracer(layout, subsystem)`` is the ``TrapPage`` trace callback: it
names the device and the register from the window number and offset the trap
page already decoded (nothing is decoded again).
"""

import logging

from . import abi
from .virtio import constants as vc

trace_log = logging.getLogger("avatar_hw.trace")

REGISTER_NAMES = {value: "".join(part.capitalize() for part in name[4:].split("_"))
                  for name, value in vars(vc).items()
                  if name.startswith("REG_") and name != "REG_CONFIG"}


class TrapTracer:
    """Logs each trap as ``vm0 cpu1 console0 W QueueNotify 4 0x0 2.1 us``."""

    def __init__(self, layout, subsystem):
        self.windows_per_vm = layout.windows_per_vm
        self.subsystem = subsystem

    def __call__(self, vm_id, vcpu, gpa, size, is_write, value, status, latency_ns, window,
                 offset):
        if window < 0:
            device, register = "-", f"0x{gpa:x}"
        else:
            slot = window % self.windows_per_vm
            transport = self.subsystem.transport_at(window)
            device = f"{transport.device.name}{slot}" if transport else f"slot{slot}"
            register = (REGISTER_NAMES.get(offset) if offset < vc.REG_CONFIG
                        else f"Config+0x{offset - vc.REG_CONFIG:x}") or f"0x{offset:03x}"
        trace_log.info("vm%d cpu%d %-9s %s %-18s %d 0x%x%s %.1f us", vm_id, vcpu, device,
                       "W" if is_write else "R", register, size, value,
                       "" if status == abi.STATUS_OK else " UNHANDLED", latency_ns / 1000)
