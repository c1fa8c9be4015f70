"""Where things live on the emulated board (QEMU virt, 512 MiB of RAM in a shared file).

The same addresses are in boards/emulated/link.ld (the stub), boards/emulated.toml
(the daemon's view of the shared file) and the boot parameters the stub reads.

    0x40000000  guest RAM (the guest's whole memory node)
      +0x00200000  Linux Image
      +0x08000000  device tree, then the initramfs
    0x5fe00000  the stub (1 MiB, not in guest RAM, not mapped by stage 2)
    0x5ff00000  the trap page
    0x5ff01000  boot parameters for the stub
    0x5ff02000  register shadow pages, one per window of the layout (128 x 4 KiB)
"""

import struct

from ..layout import Layout

RAM_BASE = 0x40000000
RAM_SIZE = 512 << 20              # QEMU's -m and the shared file's size
GUEST_RAM_SIZE = 0x1FE00000       # up to the stub
STUB_BASE = RAM_BASE + GUEST_RAM_SIZE
TRAP_PAGE = 0x5FF00000
BOOT_PARAMS = 0x5FF01000
SHADOW_OFFSET = 0x2000            # from the trap page (boards/emulated/stub.h)
KERNEL_ADDR = RAM_BASE + 0x00200000
DTB_ADDR = RAM_BASE + 0x08000000
DTB_MAX = 0x100000
INITRD_ADDR = DTB_ADDR + DTB_MAX
LAYOUT = Layout()                 # the seed's: windows from 0x0a000000, SPIs from 48
SHADOW_COUNT = LAYOUT.window_count
TRAP_REGION_SIZE = SHADOW_OFFSET + SHADOW_COUNT * 0x1000   # the trap page to the last shadow
VM_ID = 0

_BOOT_PARAMS_MAGIC = 0x50425641   # "AVBP", struct boot_params in boards/emulated/stub.h
_BOOT_PARAMS = struct.Struct("<IIQQQQQQQII")


def file_offset(addr):
    """Offset in the shared RAM file of guest-physical ``addr``."""
    if not RAM_BASE <= addr < RAM_BASE + RAM_SIZE:
        raise ValueError(f"0x{addr:x} is not in the emulated board's RAM")
    return addr - RAM_BASE


def boot_params(*, kernel_entry, dtb, model_wait_ms):
    """The stub's boot parameter block (loaded at ``BOOT_PARAMS``)."""
    window, _ = LAYOUT.vm_window(VM_ID)
    return _BOOT_PARAMS.pack(_BOOT_PARAMS_MAGIC, 1, kernel_entry, dtb, TRAP_PAGE, RAM_BASE,
                             GUEST_RAM_SIZE, window, LAYOUT.vm_size, model_wait_ms, VM_ID)
