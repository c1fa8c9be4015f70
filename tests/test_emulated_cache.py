"""The emulated board's build cache (avatar_hw/emulated/build.py and its users): launchers
sharing a cache build the same file at once, and neither fails nor reads half a file. No
QEMU or cross compiler needed."""

import os

import pytest

from avatar_hw.emulated import initramfs
from avatar_hw.emulated.assets import GuestAssets
from avatar_hw.emulated.build import replacing


def test_overlapping_writers_of_one_path_each_replace_it_whole(tmp_path):
    out = tmp_path / "f"
    with replacing(out) as first:
        first.write_bytes(b"first")
        with replacing(out) as second:
            assert second != first and second.parent == tmp_path
            second.write_bytes(b"second")
        assert out.read_bytes() == b"second" and first.read_bytes() == b"first"
    assert out.read_bytes() == b"first" and os.listdir(tmp_path) == ["f"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "f"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the build failed")
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_a_second_launcher_packing_the_same_initramfs_meanwhile_fails_neither(
        tmp_path, monkeypatch):
    """The second launcher writes and renames its archive while the first is writing its
    own: with the fixed name ``<out>.tmp`` the first's rename found no file."""
    monkeypatch.setenv("AVATAR_HW_CACHE", str(tmp_path / "cache"))
    (tmp_path / "modules").mkdir()
    (tmp_path / "busybox").write_bytes(b"\x7fELF busybox")
    assets = GuestAssets(kernel=tmp_path / "Image", modules=tmp_path / "modules",
                         release="6.1.0-56-arm64", busybox=tmp_path / "busybox")
    write_newc, inner = initramfs.write_newc, []

    def write_then_let_the_other_launcher_pack(path, entries):
        write_newc(path, entries)
        if not inner:
            inner.append(None)
            inner[0] = initramfs.pack_initramfs(assets, "#!/bin/sh\n", [])

    monkeypatch.setattr(initramfs, "write_newc", write_then_let_the_other_launcher_pack)
    out = initramfs.pack_initramfs(assets, "#!/bin/sh\n", [])
    assert inner == [out] and b"bin/busybox" in out.read_bytes()
    assert sorted(os.listdir(out.parent)) == [out.name]
