"""Guest assets for the emulated board: Debian's arm64 kernel and busybox, fetched once.

They come from the host's own apt sources with a cross-architecture apt
(``-oAPT::Architecture=arm64`` and private list/cache directories under the
avatar-hw cache), so no root and no change to the host's apt state. Each .deb
is checked against the SHA256 in apt's index, unpacked with ``dpkg-deb -x``,
and recorded in ``guest-assets.json``; later runs use the cache without any
network access. The kernel is the generic ``linux-image-<abi>-arm64`` that
``linux-image-arm64`` depends on (virtio core built in; 9p available).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import AvatarError
from .build import cache_dir

KERNEL_META = "linux-image-arm64"
BUSYBOX = "busybox-static"
MANIFEST = "guest-assets.json"


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path          # uncompressed arm64 Image
    modules: Path         # /lib/modules/<release>
    release: str          # kernel release, e.g. 6.1.0-56-arm64
    busybox: Path         # static arm64 busybox


def _progress(message):
    print(f"avatar-hw: {message}", file=sys.stderr, flush=True)


class _Apt:
    """apt-get / apt-cache for arm64 with private state in ``root``."""

    def __init__(self, root):
        self.root = root
        lists = root / "lists"
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        self.options = ["-oAPT::Architecture=arm64", "-oAPT::Architectures=arm64",
                        f"-oDir::State::Lists={lists}", f"-oDir::Cache={root / 'cache'}",
                        "-oAPT::Sandbox::User=root", "-qq"]

    def run(self, tool, *args, cwd=None):
        if shutil.which(tool) is None:
            raise AvatarError(f"{tool} not found: fetching the emulated board's guest needs a "
                              f"Debian host with apt")
        result = subprocess.run([tool, *self.options, *args], cwd=cwd, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise AvatarError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()[-800:]}")
        return result.stdout

    def update(self):
        self.run("apt-get", "update")

    def field(self, package, name):
        """A field of the candidate version's record (``apt-cache show``)."""
        version = self.candidate(package)
        for line in self.run("apt-cache", "show", f"{package}={version}").splitlines():
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
        raise AvatarError(f"apt has no {name} for {package} {version}")

    def candidate(self, package):
        for line in self.run("apt-cache", "policy", package).splitlines():
            if line.strip().startswith("Candidate:"):
                version = line.split(":", 1)[1].strip()
                if version and version != "(none)":
                    return version
        raise AvatarError(f"apt knows no arm64 package {package}: the host's apt sources must "
                          f"be a Debian archive that carries arm64 (see docs/emulated-board.md)")

    def fetch(self, package, dest):
        """Download ``package`` (arm64) into ``dest``, check its SHA256 against the index."""
        version = self.candidate(package)
        sha256 = self.field(package, "SHA256")
        size = int(self.field(package, "Size"))
        _progress(f"downloading {package} {version} ({size / 1e6:.1f} MB)")
        before = set(dest.glob(f"{package}_*.deb"))
        self.run("apt-get", "download", f"{package}={version}", cwd=dest)
        debs = set(dest.glob(f"{package}_*.deb")) - before or set(dest.glob(f"{package}_*.deb"))
        deb = max(debs, key=lambda p: p.stat().st_mtime)
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        if digest != sha256:
            deb.unlink()
            raise AvatarError(f"{deb.name}: SHA256 {digest} does not match apt's index "
                              f"({sha256}); removed, try again")
        return deb, version, sha256


def _unpack(deb, dest):
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)


def _from_manifest(root):
    try:
        data = json.loads((root / MANIFEST).read_text())
        assets = GuestAssets(kernel=Path(data["kernel"]), modules=Path(data["modules"]),
                             release=data["release"], busybox=Path(data["busybox"]))
    except (OSError, ValueError, KeyError):
        return None
    if all(p.exists() for p in (assets.kernel, assets.modules, assets.busybox)):
        return assets
    return None


def guest_assets():
    """The cached kernel, modules and busybox; fetched (with progress) on first use."""
    root = cache_dir() / "guest"
    cached = _from_manifest(root)
    if cached is not None:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    apt = _Apt(root / "apt")
    _progress("fetching the emulated board's guest (Debian arm64 kernel and busybox), once")
    apt.update()
    depends = apt.run("apt-cache", "depends", KERNEL_META)
    kernel_package = next((line.split(":", 1)[1].strip() for line in depends.splitlines()
                           if line.strip().startswith("Depends: linux-image-")), None)
    if kernel_package is None:
        raise AvatarError(f"apt-cache depends {KERNEL_META} names no kernel image package")
    debs = root / "debs"
    debs.mkdir(exist_ok=True)
    record = {}
    for package, subdir in ((kernel_package, "kernel"), (BUSYBOX, "busybox")):
        deb, version, sha256 = apt.fetch(package, debs)
        _progress(f"unpacking {deb.name}")
        _unpack(deb, root / subdir)
        deb.unlink()
        record[package] = {"version": version, "sha256": sha256}
    release = kernel_package.removeprefix("linux-image-")
    assets = GuestAssets(kernel=root / "kernel" / "boot" / f"vmlinuz-{release}",
                         modules=root / "kernel" / "lib" / "modules" / release,
                         release=release, busybox=root / "busybox" / "bin" / "busybox")
    manifest = {"kernel": str(assets.kernel), "modules": str(assets.modules),
                "release": release, "busybox": str(assets.busybox), "packages": record}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, root / MANIFEST)
    _progress(f"guest assets cached in {root}")
    return assets


if __name__ == "__main__":
    try:
        print(guest_assets())
    except AvatarError as err:
        print(f"avatar-hw: {err}", file=sys.stderr)
        sys.exit(2)
