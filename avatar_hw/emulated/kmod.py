"""Cross-build the avatar_uio kernel module (boards/linux) for the guest kernel.

``build_kmod()`` copies the driver's sources into the avatar-hw cache and runs
the kernel's own build (``make -C TREE M=DIR ARCH=arm64
CROSS_COMPILE=aarch64-linux-gnu- KCFLAGS=-Werror modules``: a warning fails the
test build, not a user's DKMS build on a newer kernel) against the Debian headers that
``assets.kernel_headers()`` fetched for the emulated board's kernel release;
the .ko is cached by a hash of the sources and the release, so a second call
costs nothing. ``modinfo(ko)`` reads a module's ``.modinfo`` section without
the host's kmod tools. ``python -m avatar_hw.emulated.kmod`` prints the path.
"""

import os
import shutil
import subprocess
import tempfile

from ..errors import AvatarError
from ..shipped import shipped_file
from .assets import guest_assets, kernel_headers
from .build import CROSS, build_digest, cache_dir, cached, cross_compiler, main, prune

MODULE = "avatar_uio"
SOURCES = ("avatar_uio.c", "Kbuild")


def module_dir():
    """The driver's sources: the checkout's boards/linux or the installed copy."""
    return shipped_file("linux/avatar_uio.c").parent


def build_kmod(release=None, source_dir=None):
    """The cached ``avatar_uio.ko`` for ``release`` (default: the guest kernel's),
    built from ``source_dir`` (default ``module_dir()``); ``AvatarError`` with the
    compiler's output if it fails."""
    release = release or guest_assets().release
    source_dir = source_dir or module_dir()
    cross_compiler()
    if shutil.which("make") is None:
        raise AvatarError("make not found: building the kernel module needs it "
                          "(apt-get install make, or run scripts/setup)")
    sources = [source_dir / name for name in SOURCES]
    digest = build_digest(sources, [release, "Werror"])
    out = cache_dir() / "kmod" / f"{MODULE}-{release}-{digest}.ko"
    if cached(out):
        return out
    tree = kernel_headers(release)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        for source in sources:
            shutil.copy(source, work)
        result = subprocess.run(
            ["make", "-C", str(tree), f"M={work}", "ARCH=arm64", f"CROSS_COMPILE={CROSS}",
             "KCFLAGS=-Werror", "modules"], capture_output=True, text=True)
        if result.returncode != 0:
            raise AvatarError(f"building {MODULE}.ko for {release} failed:\n"
                              f"{(result.stdout + result.stderr).strip()[-3000:]}")
        os.replace(os.path.join(work, f"{MODULE}.ko"), out)
    prune(out.parent, f"{MODULE}-*.ko")
    return out


def modinfo(ko):
    """A module's ``.modinfo`` as {key: [values]} (``alias`` and others repeat)."""
    objcopy = shutil.which(CROSS + "objcopy") or "objcopy"
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "modinfo")
        result = subprocess.run([objcopy, f"--dump-section=.modinfo={dump}", str(ko),
                                 os.path.join(tmp, "scratch")], capture_output=True, text=True)
        if result.returncode != 0:
            raise AvatarError(f"{ko}: no .modinfo section: {result.stderr.strip()}")
        with open(dump, "rb") as f:
            data = f.read()
    info = {}
    for entry in data.split(b"\0"):
        key, sep, value = entry.decode().partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


if __name__ == "__main__":
    main(build_kmod)
