"""The avatar_uio kernel driver (boards/linux) cross-builds against Debian's arm64 headers
for the emulated board's kernel ABI (fetched once into the avatar-hw cache, like the guest),
and works when loaded into that kernel running on QEMU's virt board."""

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from avatar_hw.emulated.assets import guest_assets
from avatar_hw.emulated.initramfs import write_newc
from avatar_hw.emulated.kmod import build_kmod, modinfo, module_dir
from avatar_hw.errors import AvatarError

pytestmark = pytest.mark.skipif(
    not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("make")),
    reason="needs gcc-aarch64-linux-gnu and make (scripts/setup)")

EM_AARCH64 = 183


def test_kmod_cross_builds_an_aarch64_module_for_the_guest_kernel():
    ko = build_kmod()
    header = ko.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2 and header[5] == 1   # ELF64, little endian
    assert int.from_bytes(header[18:20], "little") == EM_AARCH64
    info = modinfo(ko)
    assert info["license"] == ["GPL"]
    assert info["name"] == ["avatar_uio"]
    assert "of:N*T*Cavatar,uio" in info["alias"]
    assert info["vermagic"][0].split()[0] == guest_assets().release
    assert info["depends"] == ["uio"]        # not uio_pdrv_genirq: Debian's arm64 kernel lacks it


def test_kmod_build_is_cached():
    assert build_kmod() == build_kmod()


@pytest.mark.parametrize("change, error", [
    (("remap_pfn_range(", "remap_pfn_rnage("), "remap_pfn_rnage"),          # no such function
    (("\tint irq, ret;\n", "\tint irq, ret, unused;\n"), "unused variable"),  # a warning
])
def test_kmod_build_failure_names_the_error(tmp_path, change, error):
    for source in module_dir().iterdir():
        shutil.copy(source, tmp_path)
    driver = tmp_path / "avatar_uio.c"
    assert change[0] in driver.read_text()
    driver.write_text(driver.read_text().replace(*change))
    with pytest.raises(AvatarError, match=error):
        build_kmod(source_dir=tmp_path)


# -- the driver in a running arm64 Linux: the guest kernel on QEMU's virt board ------------------

DOORBELL_SPI = 100              # free on QEMU virt; INTID 132
# QEMU virt's root has #address-cells = #size-cells = <2>; RAM at 0x40000000, GICD at 0x08000000.
# 496 MiB of RAM end at 0x5f000000, inside the 128 MiB sparsemem section 0x58000000-0x5fffffff
# (arm64, 4 KiB pages: SECTION_SIZE_BITS 27), as the Pi 4's RAM ends at 0xfbffffff inside the
# section of its distributor at 0xff841000: avatar-past-ram must probe (pfn_valid() is true for
# the whole section, so a driver taking it for "RAM" refuses it), the RAM beside it must not.
RAM_MIB = 496
NODES = """
	reserved-memory {
		#address-cells = <2>;
		#size-cells = <2>;
		ranges;
		trap_mem: avatar-trap-mem@50000000 { reg = <0 0x50000000 0 0x10000>; no-map; };
		vm0_mem: avatar-vm0-mem@50100000 { reg = <0 0x50100000 0 0x100000>; no-map; };
		mapped_mem: mapped@50200000 { reg = <0 0x50200000 0 0x10000>; };
	};
	avatar-trap {
		compatible = "avatar,uio";
		memory-region = <&trap_mem>;
		interrupts = <0 %d 1>;
	};
	avatar-vm0-ram { compatible = "avatar,uio"; memory-region = <&vm0_mem>; };
	avatar-gicd@8000000 { compatible = "avatar,uio"; reg = <0 0x8000000 0 0x1000>; };
	avatar-misaligned@8000800 { compatible = "avatar,uio"; reg = <0 0x8000800 0 0x800>; };
	avatar-mapped { compatible = "avatar,uio"; memory-region = <&mapped_mem>; };
	avatar-ram-by-reg@48000000 { compatible = "avatar,uio"; reg = <0 0x48000000 0 0x1000>; };
	avatar-carveout-by-reg@50100000 {
		compatible = "avatar,uio";
		reg = <0 0x50100000 0 0x1000>;
	};
	avatar-past-ram@5f000000 { compatible = "avatar,uio"; reg = <0 0x5f000000 0 0x1000>; };
	avatar-bad-irq {
		compatible = "avatar,uio";
		memory-region = <&trap_mem>;
		interrupts = <0 %d>;
	};
""" % (DOORBELL_SPI, DOORBELL_SPI)
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
insmod /uio.ko && insmod /avatar_uio.ko dyndbg=+p
/uio_probe %d
dmesg | grep 'avatar_uio '
poweroff -f
""" % (DOORBELL_SPI + 32)
MACHINE = ("-M", "virt,gic-version=2", "-cpu", "cortex-a72", "-m", str(RAM_MIB), "-nographic",
           "-net", "none", "-no-reboot")


def _guest_dtb(tmp_path):
    virt = tmp_path / "virt.dtb"
    subprocess.run(["qemu-system-aarch64", *MACHINE, "-M", f"virt,dumpdtb={virt}"],
                   check=True, capture_output=True, timeout=60)
    source = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(virt)], check=True,
                            capture_output=True, text=True, timeout=60).stdout
    dts = tmp_path / "guest.dts"
    dts.write_text(source[:source.rindex("};")] + NODES + "};\n")
    dtb = tmp_path / "guest.dtb"
    subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", str(dtb), str(dts)], check=True,
                   timeout=60)
    return dtb


def _guest_initrd(tmp_path):
    assets = guest_assets()
    probe = tmp_path / "uio_probe"
    subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror",
                    "-o", str(probe), str(Path(__file__).parent / "kmod_guest" / "uio_probe.c")],
                   check=True, timeout=120)
    files = {"init": INIT.encode(), "bin/busybox": assets.busybox.read_bytes(),
             "uio.ko": (assets.modules / "kernel" / "drivers" / "uio" / "uio.ko").read_bytes(),
             "avatar_uio.ko": build_kmod().read_bytes(), "uio_probe": probe.read_bytes()}
    entries = [(d, stat.S_IFDIR | 0o755, b"", 0) for d in ("bin", "dev", "proc", "sys")]
    entries += [(name, stat.S_IFREG | 0o755, data, 0) for name, data in files.items()]
    initrd = tmp_path / "initrd.cpio"
    write_newc(initrd, entries)
    return initrd


@pytest.mark.emulated
@pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None or shutil.which("dtc") is None,
                    reason="needs qemu-system-arm and device-tree-compiler (scripts/setup)")
def test_kmod_maps_refuses_and_rings_in_the_guest_kernel(tmp_path):
    """avatar_uio loaded into the emulated board's Debian kernel (QEMU virt, no hypervisor):
    one line per map with its attributes, the memory type each mmap gets, bad nodes refused
    (misaligned, RAM without no-map, RAM or the carve-out by reg, an interrupt that cannot be
    had), registers just past the end of RAM mapped, userspace's bad maps refused (too long,
    absent, private, executable),
    and the doorbell masked by the handler, held while masked, delivered on unmask."""
    initrd, dtb = _guest_initrd(tmp_path), _guest_dtb(tmp_path)
    run = subprocess.run(["qemu-system-aarch64", *MACHINE, "-kernel", str(guest_assets().kernel),
                          "-initrd", str(initrd), "-dtb", str(dtb),
                          "-append", "console=ttyAMA0 loglevel=3"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    out = run.stdout
    for line in (
            "avatar-trap: map 0: 0x0000000050000000-0x000000005000ffff (64 KiB) cacheable "
            "(Normal write-back)",
            "avatar-vm0-ram: map 0: 0x0000000050100000-0x00000000501fffff (1024 KiB) cacheable",
            "avatar-gicd: map 0: 0x0000000008000000-0x0000000008000fff (4 KiB) uncached "
            "(Device-nGnRE)",
            "/avatar-misaligned@8000800: reg 0x0000000008000800 size 0x0000000000000800 is not "
            "page aligned",
            "/avatar-mapped: memory-region 0 (/reserved-memory/mapped@50200000) lacks no-map",
            "/avatar-ram-by-reg@48000000: reg [mem 0x48000000-0x48000fff] is RAM: give RAM by "
            "memory-region",
            "/avatar-carveout-by-reg@50100000: reg [mem 0x50100000-0x50100fff] is RAM",
            "avatar-past-ram: map 0: 0x000000005f000000-0x000000005f000fff (4 KiB) uncached",
            "/avatar-bad-irq: its interrupt cannot be had: check the specifier"):
        assert line in out, out[-3000:]
    assert "FAIL" not in out and "uio_probe: done" in out, out[-3000:]
    assert out.count("\nok ") >= 16
    # The memory type each mmap really gave (decoded from the VMA's protection at mmap, so
    # guest RAM mapped Device, or the distributor Device-nGnRnE, fails here although the
    # probe lines above, which only say what the node asked for, would not).
    mmaps = {}
    for line in out.splitlines():
        name, sep, rest = line.partition(": mmap of map 0: ")
        if sep:
            mmaps.setdefault(name.rsplit(" ", 1)[-1], set()).add(rest.strip())
    assert mmaps == {
        "avatar-trap": {"0x10000 bytes, MT_NORMAL (Normal write-back)",
                        "0x1000 bytes, MT_NORMAL (Normal write-back)"},    # the read-only map
        "avatar-vm0-ram": {"0x100000 bytes, MT_NORMAL (Normal write-back)"},
        "avatar-gicd": {"0x1000 bytes, MT_DEVICE_nGnRE (Device-nGnRE)"}}, out[-3000:]
