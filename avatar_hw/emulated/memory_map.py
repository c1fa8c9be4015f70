"""Where things live on the emulated board (QEMU virt, RAM in one shared file).

The same addresses are in boards/emulated/link.ld (the stub), boards/emulated.toml
(the daemon's view of the shared file) and the boot parameters the stub reads.
VM n runs on CPU n; its RAM is 512 MiB of QEMU's RAM from ``vm_ram_phys(n)``,
and every VM sees its own at the same guest-physical ``RAM_BASE`` (stage 2).

    physical        guest-physical (VM n)
    0x40000000      0x40000000  VM 0's RAM (its whole memory node)
                      +0x00200000  Linux Image
                      +0x08000000  device tree, then the initramfs
    0x5fe00000                  the stub (1 MiB, in no VM's RAM or stage 2)
    0x5ff00000                  the trap region: the trap page (one slot per VM), a free
                                page, then at 0x5ff02000 the register shadow pages, one
                                per window of the layout (128 x 4 KiB); board mode's
                                board Linux maps it whole
    0x5ffc0000                  boot parameters, one block per VM (0x100 apart), and
                                board mode's block at +0x800
    0x60000000      0x40000000  VM 1's RAM, laid out like VM 0's; VM n's at
                                0x40000000 + n * 0x20000000
"""

import struct

from ..layout import Layout

RAM_BASE = 0x40000000
VM_RAM_STRIDE = 512 << 20         # QEMU's -m is VM_RAM_STRIDE per VM (the shared file's size)
GUEST_RAM_SIZE = 0x1FE00000       # each VM's; in VM 0's 512 MiB, up to the stub
STUB_BASE = RAM_BASE + GUEST_RAM_SIZE
TRAP_PAGE = 0x5FF00000
BOOT_PARAMS = 0x5FFC0000          # after the trap region (boards/emulated/stub.h)
BOOT_PARAMS_STRIDE = 0x100
SHADOW_OFFSET = 0x2000            # from the trap page (boards/emulated/stub.h)
BOARD_PARAMS = BOOT_PARAMS + 0x800    # board mode's block (boards/emulated/board.c)
KERNEL_ADDR = RAM_BASE + 0x00200000
DTB_ADDR = RAM_BASE + 0x08000000
DTB_MAX = 0x100000
INITRD_ADDR = DTB_ADDR + DTB_MAX
LAYOUT = Layout()                 # the seed's: windows from 0x0a000000, SPIs from 48
SHADOW_COUNT = LAYOUT.window_count
TRAP_REGION_SIZE = SHADOW_OFFSET + SHADOW_COUNT * 0x1000   # the trap page to the last shadow
assert TRAP_PAGE + TRAP_REGION_SIZE <= BOOT_PARAMS < RAM_BASE + VM_RAM_STRIDE - 0x1000
VM_ID = 0
MAX_VMS = 4                       # one per CPU (MAX_VMS in boards/emulated/stub.h)

_BOOT_PARAMS_MAGIC = 0x50425641   # "AVBP", struct boot_params in boards/emulated/stub.h
_BOOT_PARAMS_VERSION = 2
_BOOT_PARAMS = struct.Struct("<IIQQQQQQQIIQIIII")


def ram_size(vms):
    """QEMU's RAM (and the shared file) for ``vms`` VMs."""
    return VM_RAM_STRIDE * vms


def vm_ram_phys(vm, addr=RAM_BASE):
    """The physical address of VM ``vm``'s guest-physical ``addr`` in its RAM."""
    return addr + vm * VM_RAM_STRIDE


def file_offset(addr, vms=1):
    """Offset in the shared RAM file of physical ``addr``."""
    if not RAM_BASE <= addr < RAM_BASE + ram_size(vms):
        raise ValueError(f"0x{addr:x} is not in the emulated board's RAM")
    return addr - RAM_BASE


def boot_params(*, vm=VM_ID, vms=1, kernel_entry, dtb, model_wait_ms):
    """VM ``vm``'s boot parameter block (loaded at ``BOOT_PARAMS + vm * BOOT_PARAMS_STRIDE``)."""
    window, _ = LAYOUT.vm_window(vm)
    return _BOOT_PARAMS.pack(_BOOT_PARAMS_MAGIC, _BOOT_PARAMS_VERSION, kernel_entry, dtb,
                             TRAP_PAGE, RAM_BASE, GUEST_RAM_SIZE, window, LAYOUT.vm_size,
                             model_wait_ms, vm, vm_ram_phys(vm), vms, LAYOUT.intid(vm, 0),
                             LAYOUT.irqs_per_vm, 0)
