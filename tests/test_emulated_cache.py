"""The emulated board's build cache (avatar_hw/emulated/build.py and its users): launchers
sharing a cache build the same file at once, and neither fails nor reads half a file; each
build prunes the older artifacts of its kind. No QEMU; the cross compiler and dtc only for
the builds that use them."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avatar_hw.emulated import board_linux, build, devicetree, initramfs, kmod
from avatar_hw.emulated.assets import GuestAssets
from avatar_hw.emulated.build import cached, prune, replacing


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


HOUR = 3600


def aged(path, hours):
    """``path`` (made if missing) last used ``hours`` ago."""
    path.touch()
    then = time.time() - hours * HOUR
    os.utime(path, (then, then))
    return path


def test_a_prune_keeps_the_most_recently_used_and_any_used_within_the_hour(tmp_path):
    """The 4th to 6th by last use go when unused for over an hour (UNUSED_FOR); the 4th used
    20 minutes ago stays; other kinds, and files named like the kind without its dash, stay."""
    ages = {"stub-a.elf": 0.01, "stub-b.elf": 2, "stub-c.elf": 3, "stub-d.elf": 4,
            "stub-e.elf": 5, "stubby-f.elf": 9, "stub-g.bin": 9, "xstub-h.elf": 9}
    for name, hours in ages.items():
        aged(tmp_path / name, hours)
    prune(tmp_path, "stub-*.elf")
    assert sorted(os.listdir(tmp_path)) == ["stub-a.elf", "stub-b.elf", "stub-c.elf",
                                            "stub-g.bin", "stubby-f.elf", "xstub-h.elf"]
    for name, hours in {"stub-i.elf": 0.01, "stub-j.elf": 0.02, "stub-k.elf": 0.3}.items():
        aged(tmp_path / name, hours)
    prune(tmp_path, "stub-*.elf")
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("stub-") and
                  n.endswith(".elf")) == ["stub-a.elf", "stub-i.elf", "stub-j.elf", "stub-k.elf"]


def test_a_prune_removes_the_temporaries_a_killed_writer_left_once_an_hour_old(tmp_path):
    """``replacing``'s temporary survives a SIGKILL; the next build of its kind removes it
    once unwritten for UNUSED_FOR, never one being written now, nor another kind's."""
    old = aged(tmp_path / ".stub-a.elf.12-0123abcd.tmp", 2)
    new = aged(tmp_path / ".stub-b.elf.13-4567cdef.tmp", 0)
    other = aged(tmp_path / ".guest-a.dtb.12-0123abcd.tmp", 2)
    prune(tmp_path, "stub-*.elf")
    assert not old.exists() and new.exists() and other.exists()


def test_a_cache_hit_marks_the_artifact_used_so_that_no_prune_takes_it(tmp_path):
    """A launcher that chose a cached file opens it later: a build meanwhile by another one
    must not remove it, however old the file was."""
    for hours in range(2, 7):
        aged(tmp_path / f"guest-{hours}.dtb", hours)
    oldest = tmp_path / "guest-6.dtb"
    assert cached(oldest) and time.time() - oldest.stat().st_mtime < HOUR
    prune(tmp_path, "guest-*.dtb", keep=1)
    assert os.listdir(tmp_path) == ["guest-6.dtb"]
    assert not cached(tmp_path / "guest-7.dtb")
    assert not cached(tmp_path / "missing" / "guest-1.dtb")


def _fake_assets(tmp_path):
    (tmp_path / "modules").mkdir(exist_ok=True)
    (tmp_path / "busybox").write_bytes(b"\x7fELF busybox")
    return GuestAssets(kernel=tmp_path / "Image", modules=tmp_path / "modules",
                       release="6.1.0-56-arm64", busybox=tmp_path / "busybox")


def _needs(*tools):
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup)")


def _initramfs(tmp_path, monkeypatch, variant):
    return initramfs.pack_initramfs(_fake_assets(tmp_path), f"#!/bin/sh\n# {variant}\n", [])


def _guest_dtb(tmp_path, monkeypatch, variant):
    _needs("dtc")
    return devicetree.build_dtb(initrd_size=4096 + variant)


def _board_dtb(tmp_path, monkeypatch, variant):
    _needs("dtc", "fdtoverlay")
    return board_linux.build_board_dtb(initrd_size=4096 + variant)


def _stub(tmp_path, monkeypatch, variant):
    _needs(build.CROSS + "gcc")
    return build.build_stub(defines=[f"STUB_CACHE_TEST={variant}"])


def _kmod(tmp_path, monkeypatch, variant):
    """The kernel's make faked (no headers fetched): it writes the .ko from the source."""
    def make(argv, **kwargs):
        work = Path(next(a for a in argv if a.startswith("M="))[2:])
        (work / "avatar_uio.ko").write_bytes((work / "avatar_uio.c").read_bytes())
        return subprocess.CompletedProcess(argv, 0, "", "")
    monkeypatch.setattr(kmod, "cross_compiler", lambda: None)
    monkeypatch.setattr(kmod, "kernel_headers", lambda release: tmp_path)
    monkeypatch.setattr(kmod.subprocess, "run", make)
    source = tmp_path / "src"
    source.mkdir(exist_ok=True)
    (source / "Kbuild").write_text("obj-m := avatar_uio.o\n")
    (source / "avatar_uio.c").write_text(f"/* {variant} */\n")
    return kmod.build_kmod("6.1.0-56-arm64", source)


@pytest.mark.parametrize("build_variant", [_initramfs, _guest_dtb, _board_dtb, _stub, _kmod],
                         ids=["initramfs", "guest dtb", "board dtb", "stub", "kmod"])
def test_each_build_prunes_the_older_artifacts_of_its_own_kind(tmp_path, monkeypatch,
                                                                build_variant):
    """Each content-hashed artifact (one file per change to the checkout: 85 MB for board
    mode's initramfs) grew the cache without limit. Real builds in a temporary cache: a new
    one keeps the 3 most recently used of its kind, a hit touches its file."""
    monkeypatch.setenv("AVATAR_HW_CACHE", str(tmp_path / "cache"))
    first = build_variant(tmp_path, monkeypatch, 1)
    digest = re.search(r"[0-9a-f]{16}", first.name).group()
    stale = [aged(first.with_name(first.name.replace(digest, f"{n:016x}")), n + 1)
             for n in range(1, 5)]
    other_kind = aged(first.with_name("x" + first.name), 9)
    aged(first, 5)
    assert build_variant(tmp_path, monkeypatch, 1) == first
    assert time.time() - first.stat().st_mtime < HOUR                  # used: touched
    second = build_variant(tmp_path, monkeypatch, 2)
    assert second != first
    assert sorted(os.listdir(first.parent)) == sorted(
        p.name for p in (second, first, stale[0], other_kind))


def test_board_modes_pyc_of_sources_no_longer_used_go(tmp_path, monkeypatch):
    """One .pyc per source file of the board's userland and of this checkout: those of
    sources changed or gone more than an hour ago are removed at the next board build."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip("board mode compiles .pyc only with the board's Python, 3.11")
    monkeypatch.setenv("AVATAR_HW_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "m.py").write_text("x = 1\n")
    board_linux._add_tree({}, tree, "p/")
    [used] = os.listdir(board_linux.pyc_dir())
    aged(board_linux.pyc_dir() / used, 5)
    stale = [aged(board_linux.pyc_dir() / f"{n:064x}.pyc", hours) for n, hours in
             ((1, 2), (2, 0.2))]
    files = {}
    board_linux._add_tree(files, tree, "p/")
    assert sorted(os.listdir(board_linux.pyc_dir())) == sorted([used, stale[1].name])
    assert files["p/__pycache__/m.cpython-311.pyc"][0] == (board_linux.pyc_dir() /
                                                           used).read_bytes()
