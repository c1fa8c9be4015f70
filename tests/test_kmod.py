"""The avatar_uio kernel driver (boards/linux) cross-builds against Debian's arm64 headers
for the emulated board's kernel ABI (fetched once into the avatar-hw cache, like the guest)."""

import shutil

import pytest

from avatar_hw.emulated.assets import guest_assets
from avatar_hw.emulated.kmod import MODULE_DIR, build_kmod, modinfo
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


def test_kmod_build_failure_names_the_error(tmp_path):
    for source in MODULE_DIR.iterdir():
        shutil.copy(source, tmp_path)
    driver = tmp_path / "avatar_uio.c"
    driver.write_text(driver.read_text().replace("remap_pfn_range(", "remap_pfn_rnage("))
    with pytest.raises(AvatarError, match="remap_pfn_rnage"):
        build_kmod(source_dir=tmp_path)
