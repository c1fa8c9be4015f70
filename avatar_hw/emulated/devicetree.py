"""The guest's device tree: what the guest sees of the emulated board.

Memory (guest RAM only: the stub and trap page lie above it, outside the
memory node, so the guest never maps them), one Cortex-A72, PSCI by SMC
(trapped by the stub, HCR_EL2.TSC), the architected timer, a GICv2 whose CPU
interface address is backed by GICV, and one virtio-mmio node per device
slot of the VM's window (SPI = INTID - 32, edge rising, dma-coherent, as in
QEMU's own virt tree). Compiled with dtc, cached by content.
"""

import hashlib
import shutil
import subprocess

from ..errors import AvatarError
from . import memory_map as mm
from .build import cache_dir, cached, prune, replacing

DEFAULT_BOOTARGS = "console=hvc0 loglevel=3 rdinit=/init"

# One Cortex-A72 with PSCI by SMC and the architected timer: what the guest and the board
# Linux both see of their CPU (each gets only its own).
CPU_NODES = """    cpus {
        #address-cells = <1>;
        #size-cells = <0>;
        cpu@0 {
            device_type = "cpu";
            compatible = "arm,cortex-a72";
            reg = <0>;
            enable-method = "psci";
        };
    };

    psci {
        compatible = "arm,psci-1.0", "arm,psci-0.2";
        method = "smc";
    };

    timer {
        compatible = "arm,armv8-timer";
        interrupts = <1 13 0x104>, <1 14 0x104>, <1 11 0x104>, <1 10 0x104>;
        always-on;
    };"""


def _cells(value):
    return f"0x{value >> 32:x} 0x{value & 0xffffffff:x}"


def device_tree_source(*, initrd_size, bootargs=DEFAULT_BOOTARGS, layout=mm.LAYOUT, vm_id=mm.VM_ID):
    virtio = []
    for index in range(layout.devices_per_vm):
        base = layout.window(vm_id, index)
        virtio.append(f"""
    virtio_mmio@{base:x} {{
        compatible = "virtio,mmio";
        reg = <{_cells(base)} {_cells(layout.device_size)}>;
        interrupts = <0 {layout.intid(vm_id, index) - 32} 1>;
        dma-coherent;
    }};""")
    initrd_start = mm.INITRD_ADDR
    return f"""/dts-v1/;
/ {{
    compatible = "linux,dummy-virt";
    model = "avatar-hw emulated board";
    #address-cells = <2>;
    #size-cells = <2>;
    interrupt-parent = <&gic>;

    chosen {{
        bootargs = "{bootargs}";
        linux,initrd-start = <{_cells(initrd_start)}>;
        linux,initrd-end = <{_cells(initrd_start + initrd_size)}>;
    }};

    memory@{mm.RAM_BASE:x} {{
        device_type = "memory";
        reg = <{_cells(mm.RAM_BASE)} {_cells(mm.GUEST_RAM_SIZE)}>;
    }};

{CPU_NODES}

    gic: interrupt-controller@8000000 {{
        compatible = "arm,cortex-a15-gic";
        #interrupt-cells = <3>;
        interrupt-controller;
        reg = <0x0 0x8000000 0x0 0x10000>, <0x0 0x8010000 0x0 0x10000>;
    }};
{"".join(virtio)}
}};
"""


def build_dtb(**kwargs):
    """Compile the device tree (``device_tree_source`` arguments); returns the cached .dtb."""
    source = device_tree_source(**kwargs)
    out = cache_dir() / f"guest-{hashlib.sha256(source.encode()).hexdigest()[:16]}.dtb"
    if cached(out):
        return out
    if shutil.which("dtc") is None:
        raise AvatarError("dtc not found: the emulated board's device tree needs it "
                          "(apt-get install device-tree-compiler, or run scripts/setup)")
    with replacing(out) as tmp:
        result = subprocess.run(["dtc", "-I", "dts", "-O", "dtb", "-o", str(tmp), "-"],
                                input=source.encode(), capture_output=True)
        if result.returncode != 0:
            raise AvatarError("dtc failed on the guest device tree: "
                              f"{result.stderr.decode().strip()}")
        if tmp.stat().st_size > mm.DTB_MAX:
            raise AvatarError(f"guest device tree is larger than {mm.DTB_MAX} bytes")
    prune(out.parent, "guest-*.dtb")
    return out
