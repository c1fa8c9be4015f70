"""The guest's initramfs: busybox, the virtio modules and an /init with a shell on hvc0.

Written as a newc cpio by ``write_newc`` (no cpio tool needed) and cached by
the hash of its inputs. The modules get a ``modules.dep`` made from their own
``depends=`` fields (what depmod computes for this subset), so busybox
``modprobe`` works in the guest. /init loads them in order, mounts proc, sys
and dev, lists the virtio devices (ID, driver), prints ``READY_MARKER`` on /dev/hvc0 and
runs an interactive shell there (powering off when it exits); without a console it powers
the board off, so a run never hangs.
"""

import hashlib
import os
import stat
from pathlib import Path

from .assets import guest_assets
from .build import cache_dir, cached, prune, replacing

# Load order (generic Debian kernel: virtio and virtio_ring are built in).
MODULES = ("virtio_mmio", "virtio_console", "virtio_blk", "virtio-rng",
           "failover", "net_failover", "virtio_net", "virtio_balloon", "9pnet_virtio", "9p",
           "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
           "virtio-gpu", "virtiofs")
READY_MARKER = "avatar-guest: ready"
HVC_WAIT_SECONDS = 10
HVC_RELOAD_SECONDS = 60
DIRS = ("proc", "sys", "dev", "tmp", "root", "etc", "mnt")  # in every initramfs (/mnt: mounts)

# The interactive shell on hvc0 (the guest's, the board Linux's), run by /init in the
# foreground: a shell started with & would ignore SIGINT for good (a non-interactive shell's
# background job), so Ctrl-C on the console would stop nothing. In its own session, hvc0 its
# controlling tty; the ready marker comes from its own open hvc0, just before its prompt (a
# separate `echo >/dev/hvc0` raced the shell's open of the tty). Its exit status is /init's $?.
SHELL_ON_HVC0 = ("""setsid sh -c 'exec </dev/hvc0 >/dev/hvc0 2>&1; echo "{marker}"; exec sh -i' """
                 """</dev/null >/dev/null 2>&1""")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do modprobe "$m" || echo "avatar-guest: modprobe $m failed"; done
n=0
if grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null; then
    while [ ! -e /dev/hvc0 ] && [ $n -lt {hvc_wait_tenths} ]; do sleep 0.1; n=$((n + 1)); done
fi
if [ ! -e /dev/hvc0 ]; then
    echo "avatar-guest: no /dev/hvc0 (no virtio console served): powering off"
    poweroff -f
fi
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] || continue
    drv=none; [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "avatar-guest: virtio $(basename "$d") device $(cat "$d/device") driver $drv" >/dev/hvc0
done
cd /root
while :; do
    {shell}
    [ $? -eq 129 ] || break
    # SIGHUP: hvc0 went away (its virtio driver was unbound); a new shell once it is back
    n=0
    until (echo -n >/dev/hvc0) 2>/dev/null || [ $n -ge {hvc_reload_tenths} ]; do
        sleep 0.1; n=$((n + 1))
    done
done
poweroff -f
"""


def _modinfo_depends(path):
    """Module names in a .ko's ``depends=`` modinfo field."""
    data = path.read_bytes()
    start = data.find(b"\0depends=")
    if start < 0:
        return []
    end = data.index(b"\0", start + 1)
    value = data[start + len(b"\0depends="):end].decode()
    return [name for name in value.split(",") if name]


def _find_modules(modules_dir):
    """{name: path relative to modules_dir} for every .ko in the tree."""
    found = {}
    for root, _, files in os.walk(modules_dir):
        for f in files:
            if f.endswith(".ko"):
                found[f[:-3]] = Path(root, f).relative_to(modules_dir)
    return found


def _closure(wanted, index, modules_dir):
    """The wanted modules and everything they depend on: {name: [deps]}."""
    deps, todo = {}, list(wanted)
    while todo:
        name = todo.pop()
        if name in deps:
            continue
        key = name if name in index else name.replace("_", "-")
        deps[name] = [d for d in _modinfo_depends(modules_dir / index[key])]
        todo.extend(deps[name])
    return deps


def _modules_dep(deps, index):
    """modules.dep lines: a module, then every module it needs, each listed before the ones
    it needs itself (modprobe loads the list from its end: with drm_shmem_helper and
    drm_kms_helper both needing drm, drm comes last and loads first), as depmod orders them."""
    def load_order(name, seen):
        out = []
        for d in deps[name]:
            if d not in seen:
                seen.add(d)
                out += load_order(d, seen) + [d]
        return out
    return "".join(f"{index[n]}: "
                   f"{' '.join(str(index[d]) for d in reversed(load_order(n, set())))}\n"
                   for n in sorted(deps))


def write_newc(path, entries):
    """Write a newc cpio archive; ``entries`` are (name, mode, data-bytes, rdev)."""
    with open(path, "wb") as out:
        for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
            encoded = name.encode() + b"\0"
            fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0,
                      os.major(rdev), os.minor(rdev), len(encoded), 0)
            header = b"070701" + b"".join(b"%08X" % f for f in fields)
            out.write(header + encoded)
            out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
            out.write(data)
            out.write(b"\0" * (-len(data) % 4))


def build_initramfs(assets=None):
    """The cached initramfs for the guest assets; returns its path."""
    assets = assets or guest_assets()
    init = INIT.format(modules=" ".join(MODULES), hvc_wait_tenths=HVC_WAIT_SECONDS * 10,
                       hvc_reload_tenths=HVC_RELOAD_SECONDS * 10,
                       shell=SHELL_ON_HVC0.format(marker=READY_MARKER))
    return pack_initramfs(assets, init, MODULES)


def _file_mode(mode):
    """A regular file's permission bits, or a full mode with its type (S_IFLNK: a symlink
    whose data is the target)."""
    return mode if stat.S_IFMT(mode) else stat.S_IFREG | mode


def pack_initramfs(assets, init, modules, files=None, *, name="initramfs"):
    """A cached newc initramfs: busybox, ``init`` (/init), the kernel's ``modules`` with
    their dependencies and a modules.dep, and ``files`` ({path: bytes or (bytes, mode)});
    returns its path."""
    index = _find_modules(assets.modules)
    deps = _closure(modules, index, assets.modules)
    modbase = f"lib/modules/{assets.release}"
    modes = {"init": 0o755, "bin/busybox": 0o755}
    contents = {"init": init.encode(), "bin/busybox": assets.busybox.read_bytes(),
                f"{modbase}/modules.dep": _modules_dep(deps, index).encode()}
    for module in deps:
        key = module if module in index else module.replace("_", "-")
        contents[f"{modbase}/{index[key]}"] = (assets.modules / index[key]).read_bytes()
    for path, value in (files or {}).items():
        data, mode = value if isinstance(value, tuple) else (value, 0o644)
        contents[path], modes[path] = data, mode
    digest = hashlib.sha256()
    for path in sorted(contents):
        digest.update(path.encode() + b"\0" + oct(modes.get(path, 0o644)).encode() + b"\0" +
                      contents[path])
    digest.update(" ".join(DIRS).encode())
    out = cache_dir() / f"{name}-{assets.release}-{digest.hexdigest()[:16]}.cpio"
    if cached(out):
        return out
    dirs = set()
    for path in contents:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    dirs.update(DIRS)
    entries = [(d, stat.S_IFDIR | 0o755, b"", 0) for d in sorted(dirs)]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)))
    entries += [(path, _file_mode(modes.get(path, 0o644)), data, 0)
                for path, data in sorted(contents.items())]
    with replacing(out) as tmp:
        write_newc(tmp, entries)
    prune(out.parent, f"{name}-*.cpio")         # the older ones, of any kernel release
    return out
