"""Board mode: the emulated board runs the board's own Linux on CPU0 (docs/emulated-board.md).

The stub partitions QEMU's virt machine statically (boards/emulated/board.c):
CPU0 runs the *board Linux* (Debian's arm64 kernel, the same assets as the
guest) with the GIC its own, behind a stage 2 that lets it reach the
carve-out (the trap page, the guest's RAM) only as the avatar nodes describe
it; CPU1 runs the guest, VM 1, as in host mode. This module builds what the
board Linux boots with:

- ``build_board_dtb``: a base tree (its RAM, one CPU - Linux's GICv2 driver
  targets every SPI at the boot CPU and must never bring up CPU1 -, PSCI, the
  timer, the GIC labelled ``gicv2``, and QEMU's virtio-mmio transport that
  carries the board's console) with the avatar overlay applied by
  ``fdtoverlay``: ``avatar_hw.overlay.render``, the template that also writes
  scripts/avatar-rpi4-overlay.dts, with this board's addresses;
- ``build_board_initramfs``: busybox, virtio_mmio + virtio_console (its console,
  hvc0), uio + avatar_uio (cross-built by ``kmod.build_kmod``), an /init that
  loads them and runs a shell on hvc0 after ``BOARD_READY_MARKER``;
- ``board_params``: the block that switches the stub to board mode (the trap
  doorbell SPI and the board SPI of each guest INTID, from the board file).

Memory: the board Linux's RAM is VM 0's 510 MiB at 0x40000000 (identity);
the guest's is VM 1's at 0x60000000, a reserved-memory ``no-map`` node
outside the board Linux's memory node, like the trap page at 0x5ff00000.
"""

import dataclasses
import hashlib
import importlib._bootstrap_external
import importlib.util
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

from ..board import load_board
from ..errors import AvatarError
from ..overlay import OverlayBoard, render
from ..shipped import board_path, shipped_file
from . import memory_map as mm
from .assets import board_userland
from .build import cache_dir, cached, prune, replacing
from .devicetree import CPU_NODES
from .initramfs import SHELL_ON_HVC0, pack_initramfs
from .kmod import build_kmod
from .machine import qemu_value

BOARD_FILE = "emulated-board-linux"
GUEST_VM = 1                           # the guest runs as VM 1 on CPU1
BOARD_READY_MARKER = "avatar-board: ready"
BOARD_BOOTARGS = "console=hvc0 loglevel=3 rdinit=/init"
CONSOLE_TRANSPORT = 0x0A003E00         # QEMU virt's top virtio-mmio transport (its first device)
CONSOLE_SPI = 47
_BOARD_PARAMS_MAGIC = 0x4C425641       # "AVBL"
_BOARD_PARAMS = struct.Struct("<IIIIII")
MODULES = ("virtio_mmio", "virtio_console", "uio")

EMULATED = OverlayBoard(
    header="// The emulated board's avatar nodes (board mode; "
           "avatar_hw/emulated/board_linux.py).\n",
    compatible="linux,dummy-virt",
    trap=(mm.TRAP_PAGE, mm.TRAP_REGION_SIZE),   # the trap page and the register shadows
    vm_rams=((GUEST_VM, mm.vm_ram_phys(GUEST_VM), mm.GUEST_RAM_SIZE),),
    doorbell_spi=0,          # from the board file (board_overlay)
    gicd=0x08000000,
)

# With the userland (board_userland: Python, pyserial, pyudev, udev, avatar-hw), /init then
# starts systemd-udevd (applying udev/99-avatar-hw.rules to the UIO devices) and the daemon the
# way docs/board-setup.md starts it on a Pi 4: the installed unit's ExecStart line, run by
# START_UNIT since there is no systemd here (not faithful: no Type=notify, no restart).
USERLAND_INIT = """
export LD_LIBRARY_PATH=/lib/aarch64-linux-gnu:/usr/lib/aarch64-linux-gnu
mkdir -p /run /var/lib/avatar-hw /var/log/avatar && mount -t tmpfs -o mode=0755 run /run
mkdir -p /dev/pts && mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
setsid /lib/systemd/systemd-udevd </dev/null >/var/log/avatar/udevd.log 2>&1 &
n=0
while [ ! -e /run/udev/control ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
udevadm trigger --action=add --subsystem-match=uio >>/var/log/avatar/udevd.log 2>&1
udevadm settle --timeout=60 >>/var/log/avatar/udevd.log 2>&1
dd if=/dev/urandom of=/var/lib/avatar-hw/disk.img bs=1M count={disk_mib} 2>/dev/null
/usr/lib/avatar-hw/start-unit >/var/log/avatar/daemon.log 2>&1 &
# The guest's console: the daemon's pty endpoint, bridged to the board's hvc1 (a QEMU
# virtconsole whose host end is EmulatedBoard.console_path) - a user's serial cable,
# plugged again into the new pty when a daemon is restarted.
(
    stty -F /dev/hvc1 raw -echo -opost -onlcr
    while :; do
        n=0
        while [ ! -e /run/avatar/vm1-console ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n + 1)); done
        stty -F /run/avatar/vm1-console raw -echo -opost -onlcr
        cat /dev/hvc1 >/run/avatar/vm1-console &
        cat /run/avatar/vm1-console >/dev/hvc1        # until that daemon's pty goes
        kill $! 2>/dev/null; wait $!; sleep 0.5
    done
) </dev/null >/dev/null 2>&1 &
"""
START_UNIT = """#!/bin/sh
# Runs avatar-hw.service's ExecStart as systemd would (Environment=, EnvironmentFile=,
# StateDirectory=, RuntimeDirectory=, LogsDirectory=, WorkingDirectory=) on a board Linux
# without systemd: the emulated board's board mode. Not faithful: no sd_notify, no restart.
unit=/etc/systemd/system/avatar-hw.service
eval "$(sed -n 's/^Environment=/export /p' "$unit")"
set -a; [ -r /etc/default/avatar-hw ] && . /etc/default/avatar-hw; set +a
mkdir -p /var/lib/avatar-hw /run/avatar /var/log/avatar
export STATE_DIRECTORY=/var/lib/avatar-hw
cd /var/lib/avatar-hw || exit 1
eval "exec $(sed -n 's/^ExecStart=//p' "$unit")"
"""
DISK_MIB = 8
DAEMON_LOG = "/var/log/avatar/daemon.log"     # (USERLAND_INIT starts the daemon with it)
DAEMON_SERVING = "serving 1 VM"        # the daemon's log line once it serves the guest
MODEL_WAIT_MS = 240000                 # the guest waits for the daemon: the board boots first
GUEST_CONFIG = """[vm.1]
console = {{ endpoints = ["pty:/run/avatar/vm1-console"] }}
block = {{ image = "/var/lib/avatar-hw/disk.img" }}
rng = {{}}
net = {{ switch = "/run/avatar/net.sock" }}
"""
SKIPPED = ("usr/share/doc/", "usr/share/man/", "usr/share/locale/", "usr/share/lintian/",
           "usr/share/info/", "usr/share/zsh/", "usr/share/bash-completion/",
           "usr/lib/python3.11/ensurepip/", "usr/lib/python3.11/idlelib/",
           "usr/lib/python3.11/lib2to3/", "usr/lib/python3.11/turtledemo/",
           "usr/lib/python3.11/pydoc_data/")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/sbin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do modprobe "$m" || echo "avatar-board: modprobe $m failed"; done
insmod /lib/avatar_uio.ko || echo "avatar-board: insmod avatar_uio failed"
[ -x /usr/bin/python3 ] && . /etc/avatar-board-userland
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -e /dev/hvc0 ] || poweroff -f
cd /root
{shell}
poweroff -f
"""


def board_file():
    return load_board(board_path(BOARD_FILE))


def board_overlay(board=None):
    """The avatar overlay's source for the emulated board (``render`` of its addresses)."""
    board = board or board_file()
    return render(dataclasses.replace(EMULATED, doorbell_spi=board.doorbell_intid - 32,
                                      gicd=board.gic.distributor))


def base_tree_source(*, initrd_size, bootargs=BOARD_BOOTARGS):
    initrd = mm.vm_ram_phys(0, mm.INITRD_ADDR)
    return f"""/dts-v1/;
/ {{
    compatible = "linux,dummy-virt";
    model = "avatar-hw emulated board (board mode)";
    #address-cells = <2>;
    #size-cells = <1>;
    interrupt-parent = <&gicv2>;

    chosen {{
        bootargs = "{bootargs}";
        linux,initrd-start = <0x0 0x{initrd:x}>;
        linux,initrd-end = <0x0 0x{initrd + initrd_size:x}>;
    }};

    memory@{mm.RAM_BASE:x} {{
        device_type = "memory";
        reg = <0x0 0x{mm.RAM_BASE:x} 0x{mm.GUEST_RAM_SIZE:x}>;
    }};

    reserved-memory {{
        #address-cells = <2>;
        #size-cells = <1>;
        ranges;
    }};

{CPU_NODES}

    gicv2: interrupt-controller@8000000 {{
        compatible = "arm,cortex-a15-gic";
        #interrupt-cells = <3>;
        interrupt-controller;
        reg = <0x0 0x8000000 0x10000>, <0x0 0x8010000 0x10000>;
    }};

    virtio_mmio@{CONSOLE_TRANSPORT:x} {{
        compatible = "virtio,mmio";
        reg = <0x0 0x{CONSOLE_TRANSPORT:x} 0x200>;
        interrupts = <0 {CONSOLE_SPI} 1>;
        dma-coherent;
    }};
}};
"""


def _dtc(*args, source=None):
    if shutil.which("dtc") is None or shutil.which("fdtoverlay") is None:
        raise AvatarError("dtc or fdtoverlay not found: board mode's device tree needs them "
                          "(apt-get install device-tree-compiler, or run scripts/setup)")
    result = subprocess.run(args, input=source.encode() if source else None, capture_output=True)
    if result.returncode != 0:
        raise AvatarError(f"{args[0]} failed on the board Linux's device tree: "
                          f"{result.stderr.decode().strip()}")


def build_board_dtb(*, initrd_size, bootargs=BOARD_BOOTARGS, board=None):
    """The board Linux's device tree (base tree + the avatar overlay); the cached .dtb."""
    base = base_tree_source(initrd_size=initrd_size, bootargs=bootargs)
    overlay = board_overlay(board)
    key = hashlib.sha256((base + "\0" + overlay).encode()).hexdigest()[:16]
    out = cache_dir() / f"board-{key}.dtb"
    if cached(out):
        return out
    with replacing(out) as tmp:
        base_dtb, dtbo = tmp.with_suffix(".base"), tmp.with_suffix(".dtbo")   # as unique
        try:
            _dtc("dtc", "-q", "-@", "-I", "dts", "-O", "dtb", "-o", str(base_dtb), "-",
                 source=base)
            _dtc("dtc", "-q", "-@", "-I", "dts", "-O", "dtb", "-o", str(dtbo), "-",
                 source=overlay)
            _dtc("fdtoverlay", "-i", str(base_dtb), "-o", str(tmp), str(dtbo))
        finally:
            base_dtb.unlink(missing_ok=True)
            dtbo.unlink(missing_ok=True)
    prune(out.parent, "board-*.dtb")
    return out


def _pyc(source, path):
    """An unchecked-hash .pyc of ``source`` (the board's Python is 3.11, like this one),
    cached by content: compiling the userland's ~800 modules took ~8 s per board start."""
    key = hashlib.sha256(f"{sys.implementation.cache_tag}\0{path}\0".encode() + source)
    out = pyc_dir() / f"{key.hexdigest()}.pyc"
    if cached(out):
        return out.read_bytes()
    code = compile(source, "/" + path, "exec", dont_inherit=True)
    pyc = importlib._bootstrap_external._code_to_hash_pyc(
        code, importlib.util.source_hash(source), checked=False)
    with replacing(out) as tmp:
        tmp.write_bytes(pyc)
    return pyc


def pyc_dir():
    """The cache's board-pyc directory, created."""
    path = cache_dir() / "board-pyc"
    path.mkdir(exist_ok=True)
    return path


def _add_tree(files, root, prefix=""):
    """Every file and symlink under ``root`` (Paths) as initramfs entries under ``prefix``,
    with a .pyc for each .py when this Python is 3.11 (compiling under TCG is slow)."""
    compile_pyc = sys.version_info[:2] == (3, 11)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = prefix + os.path.relpath(full, root)
            if rel.startswith(SKIPPED):
                continue
            if os.path.islink(full):
                files[rel] = (os.readlink(full).encode(), stat.S_IFLNK | 0o777)
                continue
            data = Path(full).read_bytes()
            files[rel] = (data, os.stat(full).st_mode & 0o7777)
            if compile_pyc and name.endswith(".py"):
                try:
                    pyc = _pyc(data, rel)
                except SyntaxError:
                    continue
                cache = f"{os.path.dirname(rel)}/__pycache__/{name[:-3]}.cpython-311.pyc"
                files[cache] = (pyc, 0o644)
    if compile_pyc:     # one .pyc per source, each touched above: those of old sources go
        prune(pyc_dir(), "*.pyc", keep=0)


def userland_files():
    """The board's userland (Debian arm64 Python 3, pyserial, pyudev, udev; avatar-hw from
    this checkout with its board files; the udev rules, the unit, the avatar user) as
    initramfs entries."""
    files = {}
    _add_tree(files, board_userland())
    package = Path(__file__).resolve().parent.parent
    _add_tree(files, package, "usr/lib/python3/dist-packages/avatar_hw/")
    _add_tree(files, shipped_file("emulated.toml").parent, "usr/share/avatar-hw/boards/")
    rules = package.parent / "udev" / "99-avatar-hw.rules"
    files["etc/udev/rules.d/99-avatar-hw.rules"] = (rules.read_bytes(), 0o644)
    files["etc/systemd/system/avatar-hw.service"] = (
        shipped_file("linux/avatar-hw.service").read_bytes(), 0o644)
    files["etc/default/avatar-hw"] = (f"AVATAR_BOARD={BOARD_FILE}\n".encode(), 0o644)
    files["etc/avatar-hw/vms.toml"] = (GUEST_CONFIG.format().encode(), 0o644)
    files["usr/lib/avatar-hw/start-unit"] = (START_UNIT.encode(), 0o755)
    files["usr/bin/python3"] = (b"python3.11", stat.S_IFLNK | 0o777)
    files["usr/bin/avatar-hw"] = (b"#!/usr/bin/python3\nimport sys\n"
                                  b"from avatar_hw.cli import main\nsys.exit(main())\n", 0o755)
    files["etc/passwd"] = (b"root:x:0:0:root:/root:/bin/sh\n"
                           b"avatar:x:999:999:avatar-hw:/nonexistent:/bin/false\n", 0o644)
    files["etc/group"] = (b"root:x:0:\navatar:x:999:\n", 0o644)
    files["etc/avatar-board-userland"] = (USERLAND_INIT.format(disk_mib=DISK_MIB).encode(), 0o644)
    return files


def build_board_initramfs(assets, files=None, *, userland=True):
    """The board Linux's initramfs (module docstring); ``files`` are added to it; without
    ``userland`` only busybox and avatar_uio (no Python, no daemon)."""
    init = INIT.format(modules=" ".join(MODULES),
                       shell=SHELL_ON_HVC0.format(marker=BOARD_READY_MARKER))
    extra = {"lib/avatar_uio.ko": build_kmod(assets.release).read_bytes(),
             **(userland_files() if userland else {}), **(files or {})}
    return pack_initramfs(assets, init, MODULES, extra, name="board-initramfs")


def console_args(path, guest_path):
    """QEMU options for the board Linux's consoles: virtconsoles on QEMU's own virtio-mmio
    transport (CONSOLE_TRANSPORT): hvc0, the board's shell, at Unix socket ``path``, and
    hvc1, bridged to the guest's console in the board, at ``guest_path``. QEMU waits for
    each (``wait=on``: nothing printed before the launcher connects is lost)."""
    return ["-chardev", f"socket,id=boardcon,path={qemu_value(path)},server=on,wait=on",
            "-chardev", f"socket,id=guestcon,path={qemu_value(guest_path)},server=on,wait=on",
            "-device", "virtio-serial-device", "-device", "virtconsole,chardev=boardcon",
            "-device", "virtconsole,chardev=guestcon"]


def board_params(board=None):
    """The stub's board-mode block (loaded at ``memory_map.BOARD_PARAMS``)."""
    board = board or board_file()
    first, count = board.board_intids[0], len(board.board_intids)
    if board.board_intids != tuple(range(first, first + count)) or board.doorbell_intid is None:
        raise AvatarError(f"{board.path}: board mode's stub needs consecutive board_intids "
                          f"and a doorbell_intid")
    return _BOARD_PARAMS.pack(_BOARD_PARAMS_MAGIC, board.doorbell_intid, first,
                              board.layout.irq_base, count, 0)


def wait_serving(shell, timeout=300):
    """Wait in the board Linux's ``shell`` (a GuestShell) until its daemon serves the guest
    (DAEMON_SERVING in DAEMON_LOG); ``AvatarError`` with the log's end if it does not."""
    serving = f"grep -q '{DAEMON_SERVING}' {DAEMON_LOG} 2>/dev/null"
    _, status = shell.run(f"n=0; until {serving} || [ $n -ge {int(timeout)} ]; do sleep 1; "
                          f"n=$((n + 1)); done; {serving}", timeout=timeout + 60)
    if status != 0:
        log, _ = shell.run(f"tail -n 5 {DAEMON_LOG}")
        raise AvatarError(f"the daemon in the board Linux does not serve the guest after "
                          f"{timeout} s; the end of its log ({DAEMON_LOG}):\n{log}")
