"""virtio-fs on the emulated board: avatar-hw's vhost-user front end against QEMU's own
``vhost-user-fs-device``, both served by the same virtiofsd.

Both sides boot the guest of bench/board.py (same kernel, initramfs with
``avbench``, bootargs) and get one virtio-fs device whose back-end is
``/usr/lib/qemu/virtiofsd`` started by ``avatar_hw.devices.fs.start_virtiofsd``
(same options: ``cache=auto``, its default sandbox) on the same host folder:

- ours: the emulated board with ``fs = { tag, shared_dir }`` (the daemon starts
  virtiofsd and hands it QEMU's shared RAM file; QueueNotify traps to the
  daemon, which writes the kick eventfd; the call eventfd raises the guest's
  interrupt through the stub);
- QEMU: ``virt`` with its guest RAM a shared memfd
  (``memory-backend-memfd,share=on``, which vhost-user needs) and
  ``vhost-user-fs-device`` on virtiofsd's socket (kick and call go through
  KVM-less TCG's ioeventfd/irqfd emulation in QEMU itself).

Runs alternate (ours, QEMU, ...). In each, the guest mounts the tag and runs:
1 MiB sequential reads of a file the host wrote (buffered: virtiofs refuses
O_DIRECT with ``cache=auto``; each run mounts afresh, so the guest's page
cache is cold and every byte comes through virtiofsd), 1 MiB writes of a new
file then fsync (write-through: no FUSE writeback cache), and ``avbench meta``: small files created
(512 bytes written each), then after sync and drop_caches stat'ed (so every
lookup reaches virtiofsd), then unlinked.
"""

import shutil
import tempfile
import time
from pathlib import Path

from avatar_hw.devices import fs
from avatar_hw.emulated import memory_map as mm
from avatar_hw.emulated.machine import qemu_value
from avatar_hw.emulated.session import EmulatedBoard
from avatar_hw.errors import AvatarError

from .board import (MIB, alternate, build_initrd, connect, qemu_base, qemu_guest, report,
                    summarise)
from .common import data_workdir, where, write_synced

TAG = "benchfs"
SIZES = {  # full run, --quick
    "read": (128 * MIB, 16 * MIB), "write": (64 * MIB, 8 * MIB), "meta": (2000, 200),
}
FIGURES = [  # key, label, unit, higher is better
    ("boot_s", "boot to shell", "s", False),
    ("fsread_MBps", "virtio-fs seq read of a file, 1 MiB, cold cache", "MB/s", True),
    ("fswrite_MBps", "virtio-fs seq write of a file, 1 MiB + fsync", "MB/s", True),
    ("create_per_s", "virtio-fs create + 512 B write + close", "files/s", True),
    ("stat_per_s", "virtio-fs stat, cold dentry cache", "files/s", True),
    ("unlink_per_s", "virtio-fs unlink", "files/s", True),
]


def measure_fs(shell, quick):
    """The figures of one booted guest whose virtio-fs device has tag TAG."""
    pick = 1 if quick else 0
    shell.result(f"mkdir -p /mnt && mount -t virtiofs {TAG} /mnt && echo mounted",
                 r"(mounted)")
    done, ns = shell.result(f"avbench seqread /mnt/fsread {SIZES['read'][pick]} buffered",
                            r"bytes=(\d+) ns=(\d+)")
    out = {"fsread_MBps": done / ns * 1e3}
    done, ns = shell.result(f"touch /mnt/fswrite && avbench seqwrite /mnt/fswrite "
                            f"{SIZES['write'][pick]} buffered", r"bytes=(\d+) ns=(\d+)")
    out["fswrite_MBps"] = done / ns * 1e3
    files, create, stat, unlink = shell.result(
        f"rm /mnt/fswrite && mkdir /mnt/meta && avbench meta /mnt/meta {SIZES['meta'][pick]}",
        r"files=(\d+) create_ns=(\d+) stat_ns=(\d+) unlink_ns=(\d+)")
    out.update(create_per_s=files / create * 1e9, stat_per_s=files / stat * 1e9,
               unlink_per_s=files / unlink * 1e9)
    shell.result("rmdir /mnt/meta && umount /mnt && echo unmounted", r"(unmounted)")
    return out


def run_ours(initrd, share, quick):
    start = time.perf_counter()
    with EmulatedBoard(initrd=Path(initrd),
                       devices=f'fs = {{ tag = "{TAG}", shared_dir = "{share}" }}') as board:
        shell = connect(board.console_path)
        try:
            shell.wait_ready(120)
            boot = time.perf_counter() - start
            return {"boot_s": boot, **measure_fs(shell, quick)}
        finally:
            shell.close()


def qemu_fs_command(initrd, console, socket):
    size = f"{mm.GUEST_RAM_SIZE >> 20}M"
    return qemu_base(initrd, console, machine="virt,gic-version=2,memory-backend=ram",
                     memory=("-object", f"memory-backend-memfd,id=ram,size={size},share=on")) + [
        "-chardev", f"socket,id=fs,path={qemu_value(socket)}",
        "-device", f"vhost-user-fs-device,chardev=fs,tag={TAG}"]


def run_qemu(initrd, share, quick):
    workdir = Path(tempfile.mkdtemp(prefix="avatar-bench-fs-"))
    console, socket = workdir / "console.sock", workdir / "virtiofsd.sock"
    try:
        try:
            backend = fs.start_virtiofsd(str(share), str(socket))
        except ValueError as err:
            raise AvatarError(str(err)) from None
        try:
            with qemu_guest(qemu_fs_command(initrd, console, socket), console) as (shell, boot, _):
                return {"boot_s": boot, **measure_fs(shell, quick)}
        finally:
            fs.stop(backend)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(quick=False, runs=3):
    runs = 1 if quick else runs
    out = {"runs": runs, "sizes": {k: v[1 if quick else 0] for k, v in SIZES.items()},
           "raw": {"ours": [], "qemu": []}}
    workdir = data_workdir("avatar-bench-fs-", 2 * SIZES["read"][0])
    out["data"] = where(workdir)
    try:
        initrd = build_initrd(workdir)
        share = workdir / "share"
        share.mkdir()
        write_synced(share / "fsread",
                     [bytes(range(256)) * (MIB // 256)] * (SIZES["read"][0] // MIB))
        alternate(runs, (("ours", lambda: run_ours(initrd, share, quick)),
                         ("qemu", lambda: run_qemu(initrd, share, quick))), out["raw"], "fs")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["figures"] = summarise(out["raw"], FIGURES)
    report(out, title="virtio-fs on the emulated board (same virtiofsd)",
           qemu="QEMU vhost-user-fs-device", note=None)
    return out
