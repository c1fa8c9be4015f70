"""scripts/avatar-rpi4-overlay.dts compiles with ``dtc -@``, applies (``fdtoverlay``) to a
base tree with the BCM2711's reserved-memory, CMA pool and GIC labels, and gives the avatar_uio
driver what it needs: memory regions reserved no-map, above 1 GiB, clear of CMA and of the
firmware's GPU memory, inside the RAM of 2, 4 and 8 GiB boards, mappable with 4, 16 and 64 KiB
pages; the distributor by ``reg``, at the board file's address."""

import shutil
import subprocess
from pathlib import Path

import pytest

from avatar_hw.board import load_board
from avatar_hw.emulated import memory_map as mm

ROOT = Path(__file__).resolve().parent.parent
OVERLAY = ROOT / "scripts" / "avatar-rpi4-overlay.dts"

pytestmark = pytest.mark.skipif(
    not (shutil.which("dtc") and shutil.which("fdtoverlay") and shutil.which("fdtget")),
    reason="needs dtc, fdtoverlay and fdtget (Debian package device-tree-compiler; scripts/setup)")

# What the overlay meets on a Pi 4 (docs/board-setup.md cites the sources): bcm2711.dtsi gives
# /reserved-memory #address-cells = <2> (#size-cells = <1> from bcm283x.dtsi) and the CMA pool
# alloc-ranges 0x0-0x3fffffff; vc4-kms-v3d-pi4 asks for (512-4) MiB of it.
BASE = """/dts-v1/;
/ {
	compatible = "raspberrypi,4-model-b", "brcm,bcm2711";
	#address-cells = <2>;
	#size-cells = <1>;
	rmem: reserved-memory {
		#address-cells = <2>;
		#size-cells = <1>;
		ranges;
		cma: linux,cma {
			compatible = "shared-dma-pool";
			size = <0x1fc00000>;
			reusable;
			linux,cma-default;
			alloc-ranges = <0x0 0x00000000 0x40000000>;
		};
	};
	soc {
		#address-cells = <1>;
		#size-cells = <1>;
		ranges = <0x40000000 0x0 0xff800000 0x00800000>;
		gicv2: interrupt-controller@40041000 {
			interrupt-controller;
			#interrupt-cells = <3>;
			compatible = "arm,gic-400";
			reg = <0x40041000 0x1000>, <0x40042000 0x2000>;
		};
	};
};
"""
CMA = (0x0, 0x40000000)
GPU_MEMORY = (0x3b400000, 0x40000000)    # the firmware's, with the default gpu_mem=76
# ARM-visible RAM the firmware reports, low-peripheral mode (dmesg "Early memory node ranges").
BOARD_RAM = {
    "2GiB": [(0x0, 0x3b400000), (0x40000000, 0x80000000)],
    "4GiB": [(0x0, 0x3b400000), (0x40000000, 0xfc000000), (0x100000000, 0x104000000)],
    "8GiB": [(0x0, 0x3b400000), (0x40000000, 0xfc000000), (0x100000000, 0x200000000)],
}
LARGEST_PAGE = 0x10000
TRAP_REGION_SIZE = mm.TRAP_REGION_SIZE   # the trap page, a free page, 128 shadow pages


def _cells(dtb, node, prop):
    result = subprocess.run(["fdtget", "-t", "x", str(dtb), node, prop], capture_output=True,
                            text=True, timeout=30)
    return [int(word, 16) for word in result.stdout.split()] if result.returncode == 0 else None


def _has(dtb, node, prop):
    return subprocess.run(["fdtget", str(dtb), node, prop], capture_output=True,
                          timeout=30).returncode == 0


def _children(dtb, node):
    return subprocess.run(["fdtget", "-l", str(dtb), node], capture_output=True, text=True,
                          check=True, timeout=30).stdout.split()


def _reg(dtb, node):
    """(start, end) pairs from a reg with 2 address cells and 1 size cell."""
    words = _cells(dtb, node, "reg")
    return [((hi << 32) | lo, ((hi << 32) | lo) + size)
            for hi, lo, size in zip(words[0::3], words[1::3], words[2::3])]


def _overlaps(a, b):
    return a[0] < b[1] and b[0] < a[1]


def _merge(tmp, overlay_source):
    """Compile ``overlay_source`` (no dtc warning allowed) and apply it to ``BASE``."""
    dts, dtbo, out = tmp / "overlay.dts", tmp / "overlay.dtbo", tmp / "merged.dtb"
    base = tmp / "base.dts"
    dts.write_text(overlay_source)
    built = subprocess.run(["dtc", "-@", "-I", "dts", "-O", "dtb", "-o", str(dtbo), str(dts)],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0 and not built.stderr, built.stderr
    base.write_text(BASE)
    subprocess.run(["dtc", "-@", "-q", "-I", "dts", "-O", "dtb", "-o",
                    str(base.with_suffix(".dtb")), str(base)], check=True, timeout=60)
    subprocess.run(["fdtoverlay", "-i", str(base.with_suffix(".dtb")), "-o", str(out), str(dtbo)],
                   check=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return _merge(tmp_path_factory.mktemp("overlay"), OVERLAY.read_text())


def _avatar_nodes(dtb):
    return {name: "/" + name for name in _children(dtb, "/")
            if subprocess.run(["fdtget", str(dtb), "/" + name, "compatible"], capture_output=True,
                              text=True, timeout=30).stdout.strip() == "avatar,uio"}


def _memory_region(dtb, node):
    """The reserved-memory node a node's memory-region points at (by phandle)."""
    (phandle,) = _cells(dtb, node, "memory-region")
    for child in _children(dtb, "/reserved-memory"):
        if _cells(dtb, f"/reserved-memory/{child}", "phandle") == [phandle]:
            return f"/reserved-memory/{child}"
    raise AssertionError(f"{node}: memory-region phandle {phandle} is no reserved-memory node")


def test_overlay_nodes_are_the_board_files_uio_devices(merged):
    board = load_board(ROOT / "boards" / "rpi4.toml")
    nodes = _avatar_nodes(merged)
    # The UIO name is the node name without unit address (boards/linux/avatar_uio.c).
    assert {name.split("@")[0] for name in nodes} == {
        board.trap.uio, board.ram.name_for(0), board.ram.name_for(1), board.gic.region.uio}
    gicd = next(path for name, path in nodes.items() if name.startswith(board.gic.region.uio))
    assert _reg(merged, gicd) == [(board.gic.distributor, board.gic.distributor + 0x1000)]
    assert not _has(merged, gicd, "memory-region")          # registers: Device memory, by reg
    assert _has(merged, "/" + board.trap.uio, "interrupts")  # the doorbell
    assert _cells(merged, "/" + board.trap.uio, "interrupt-parent") == \
        _cells(merged, "/soc/interrupt-controller@40041000", "phandle")


def _shared_memory_problems(dtb):
    """What is wrong with the shared-memory nodes of a merged tree, one line each."""
    problems, regions = [], []
    for name, path in _avatar_nodes(dtb).items():
        if name.startswith("avatar-gicd"):
            continue
        if _has(dtb, path, "reg"):
            problems.append(f"{name}: shared RAM given by reg, not memory-region")
            continue
        reserved = _memory_region(dtb, path)
        if not _has(dtb, reserved, "no-map") or _has(dtb, reserved, "reusable"):
            problems.append(f"{reserved}: not no-map")
        (region,) = _reg(dtb, reserved)
        if region[0] % LARGEST_PAGE or region[1] % LARGEST_PAGE:
            problems.append(f"{reserved}: not 64 KiB aligned")
        if region[0] < 0x40000000 or _overlaps(region, CMA) or _overlaps(region, GPU_MEMORY):
            problems.append(f"{reserved}: below 1 GiB, in CMA or the firmware's GPU memory")
        for ram, ranges in BOARD_RAM.items():
            if not any(lo <= region[0] and region[1] <= hi for lo, hi in ranges):
                problems.append(f"{reserved}: not in the RAM of a {ram} board")
        if any(_overlaps(region, other) for other in regions):
            problems.append(f"{reserved}: overlaps another region")
        if name == "avatar-trap" and region[1] - region[0] < TRAP_REGION_SIZE:
            problems.append(f"{reserved}: smaller than the trap page and its shadow pages "
                            f"(0x{TRAP_REGION_SIZE:x} bytes, docs/trap-abi.md section 14)")
        regions.append(region)
    if len(regions) != 3:
        problems.append(f"{len(regions)} shared-memory nodes, expected trap + 2 VMs")
    return problems


def test_shared_memory_is_reserved_no_map_above_cma_and_the_firmware(merged):
    assert _shared_memory_problems(merged) == []


def test_the_checks_refuse_the_old_carve_out(tmp_path):
    """The checks are live: RAM in CMA (the old 0x20000000 carve-out), a region Linux may use."""
    source = OVERLAY.read_text().replace("0x0 0x40000000 0x90000", "0x0 0x20000000 0x90000")
    source = source.replace("0x8000000>;\t// 128 MiB (placeholder)\n\t\t\t\tno-map;",
                            "0x8000000>;\t// 128 MiB (placeholder)", 1)
    problems = _shared_memory_problems(_merge(tmp_path, source))
    assert any("avatar-trap-mem@" in p and "in CMA" in p for p in problems), problems
    assert any("avatar-vm0-mem@" in p and "not no-map" in p for p in problems), problems
