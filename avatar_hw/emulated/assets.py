"""Guest assets for the emulated board: Debian's arm64 kernel and busybox, fetched once.

They come from the host's own apt sources with a cross-architecture apt
(``-oAPT::Architecture=arm64`` and private list/cache directories under the
avatar-hw cache), so no root and no change to the host's apt state. Each .deb
is checked against the SHA256 in apt's index, unpacked with ``dpkg-deb -x``,
and recorded in ``guest-assets.json``; later runs use the cache without any
network access. The kernel is the generic ``linux-image-<abi>-arm64`` that
``linux-image-arm64`` depends on (virtio core built in; 9p available).

``kernel_headers()`` fetches the same way the build tree for that kernel ABI:
the arm64 ``linux-headers-<abi>-arm64`` and ``-common`` and the host's own
``linux-kbuild-<major.minor>`` of the same version (its ``modpost`` and
``fixdep`` run on the host), all unpacked into one prefix, so that out-of-tree
modules cross-build for the guest's kernel (``avatar_hw.emulated.kmod``).
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
HEADERS_MANIFEST = "kernel-headers.json"


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path          # uncompressed arm64 Image
    modules: Path         # /lib/modules/<release>
    release: str          # kernel release, e.g. 6.1.0-56-arm64
    busybox: Path         # static arm64 busybox


def _progress(message):
    print(f"avatar-hw: {message}", file=sys.stderr, flush=True)


class _Apt:
    """apt-get / apt-cache for arm64 with private state in ``root``; ``foreign``
    architectures are known too (name their packages ``NAME:ARCH``)."""

    def __init__(self, root, foreign=()):
        self.root = root
        lists = root / "lists"
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        architectures = ",".join(("arm64", *foreign))
        self.options = ["-oAPT::Architecture=arm64", f"-oAPT::Architectures={architectures}",
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

    def field(self, package, name, version=None):
        """A field of ``version``'s record (default the candidate; ``apt-cache show``)."""
        version = version or self.candidate(package)
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

    def fetch(self, package, dest, version=None):
        """Download ``package`` (arm64 unless ``NAME:ARCH``; ``version``, default the
        candidate) into ``dest``, check its SHA256 against the index."""
        version = version or self.candidate(package)
        sha256 = self.field(package, "SHA256", version)
        size = int(self.field(package, "Size", version))
        _progress(f"downloading {package} {version} ({size / 1e6:.1f} MB)")
        pattern = f"{package.split(':')[0]}_*.deb"
        before = set(dest.glob(pattern))
        self.run("apt-get", "download", f"{package}={version}", cwd=dest)
        debs = set(dest.glob(pattern)) - before or set(dest.glob(pattern))
        deb = max(debs, key=lambda p: p.stat().st_mtime)
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        if digest != sha256:
            deb.unlink()
            raise AvatarError(f"{deb.name}: SHA256 {digest} does not match apt's index "
                              f"({sha256}); removed, try again")
        return deb, version, sha256


def _unpack(dest, *debs):
    """Unpack ``debs`` into ``dest``, emptied first."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for deb in debs:
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
        _unpack(root / subdir, deb)
        deb.unlink()
        record[package] = {"version": version, "sha256": sha256}
    release = kernel_package.removeprefix("linux-image-")
    assets = GuestAssets(kernel=root / "kernel" / "boot" / f"vmlinuz-{release}",
                         modules=root / "kernel" / "lib" / "modules" / release,
                         release=release, busybox=root / "busybox" / "bin" / "busybox")
    manifest = {"kernel": str(assets.kernel), "modules": str(assets.modules),
                "release": release, "busybox": str(assets.busybox), "packages": record}
    _write_manifest(root / MANIFEST, manifest)
    _progress(f"guest assets cached in {root}")
    return assets


def _write_manifest(path, manifest):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)


def kernel_headers(release=None):
    """The build tree (``.../usr/src/linux-headers-<release>``) for the guest kernel's
    release (or ``release``, e.g. ``6.1.0-57-arm64``); fetched (with progress) on first use."""
    release = release or guest_assets().release
    root = cache_dir() / "headers" / release
    tree = root / "tree" / "usr" / "src" / f"linux-headers-{release}"
    try:
        if json.loads((root / HEADERS_MANIFEST).read_text())["tree"] == str(tree) and \
                (tree / "Makefile").exists():
            return tree
    except (OSError, ValueError, KeyError):
        pass
    abi, _, flavour = release.rpartition("-")
    kbuild = "linux-kbuild-" + ".".join(release.split(".")[:2])
    host = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          text=True).stdout.strip() or "amd64"
    root.mkdir(parents=True, exist_ok=True)
    apt = _Apt(root / "apt", foreign=(host,) if host != "arm64" else ())
    _progress(f"fetching the kernel headers for {release} (to build kernel modules), once")
    apt.update()
    debs = root / "debs"
    debs.mkdir(exist_ok=True)
    headers = f"linux-headers-{release}"
    try:
        version = apt.candidate(headers)
    except AvatarError:
        raise AvatarError(f"apt knows no {headers}: the archive has moved past the cached guest "
                          f"kernel {release}; remove {cache_dir() / 'guest'} to fetch the "
                          f"current kernel, then its headers") from None
    record, fetched = {}, []
    for package in (headers, f"linux-headers-{abi}-common", f"{kbuild}:{host}"):
        deb, _, sha256 = apt.fetch(package, debs, version)
        fetched.append(deb)
        record[package] = {"version": version, "sha256": sha256}
    _progress(f"unpacking {', '.join(deb.name for deb in fetched)}")
    _unpack(root / "tree", *fetched)
    for deb in fetched:
        deb.unlink()
    # The flavour's Makefile includes the common tree by its installed /usr/src path.
    makefile = tree / "Makefile"
    makefile.write_text(makefile.read_text().replace(
        "/usr/src/", str(root / "tree" / "usr" / "src") + "/"))
    _write_manifest(root / HEADERS_MANIFEST, {"tree": str(tree), "release": release,
                                              "flavour": flavour, "packages": record})
    _progress(f"kernel headers cached in {root}")
    return tree


# Board mode's userland (avatar_hw/emulated/board_linux.py): Python 3, pyserial, pyudev and
# systemd-udevd from Debian's arm64 packages. BOARD_SKIP: dependencies the board's initramfs
# does without (account tools, MIME and time-zone tables, debconf, readline's config).
BOARD_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "python3-serial",
                  "python3-pyudev", "udev", "libatomic1")
BOARD_SKIP = frozenset({"adduser", "media-types", "mime-support", "tzdata", "debconf",
                        "readline-common", "python3", "python3:any", "perl-base",
                        "init-system-helpers", "dpkg"})
BOARD_MANIFEST = "board-userland.json"


def _depends(apt, package):
    """``package``'s Depends and Pre-Depends: the first alternative of each, no versions."""
    names = []
    for field in ("Pre-Depends", "Depends"):
        try:
            value = apt.field(package, field)
        except AvatarError:
            continue
        for entry in value.split(","):
            first = entry.split("|")[0].strip().split(" ")[0]
            names.append(first.removesuffix(":any"))
    return names


def board_userland():
    """The unpacked root of BOARD_PACKAGES and their dependency closure (arm64); fetched
    (with progress) on first use, recorded in board-userland.json; a package added to
    BOARD_PACKAGES later is fetched alone."""
    root = cache_dir() / "board-userland"
    tree = root / "tree"
    record = {}
    try:
        data = json.loads((root / BOARD_MANIFEST).read_text())
        if (tree / "usr" / "bin").is_dir():
            if data["wanted"] == list(BOARD_PACKAGES):
                return tree
            record = data["packages"]
    except (OSError, ValueError, KeyError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    apt = _Apt(cache_dir() / "guest" / "apt")
    _progress("fetching board mode's userland (Debian arm64 Python 3, pyserial, pyudev, udev), once")
    apt.update()
    wanted, todo = {}, list(BOARD_PACKAGES)
    while todo:
        package = todo.pop()
        if package in wanted or package in BOARD_SKIP or package in record:
            continue
        wanted[package] = None
        todo.extend(_depends(apt, package))
    debs = root / "debs"
    debs.mkdir(exist_ok=True)
    fetched = []
    for package in sorted(wanted):
        deb, version, sha256 = apt.fetch(package, debs)
        fetched.append(deb)
        record[package] = {"version": version, "sha256": sha256}
    _progress(f"unpacking {len(fetched)} packages")
    if not tree.is_dir():
        tree.mkdir(parents=True)
    for deb in fetched:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    for deb in fetched:
        deb.unlink()
    _write_manifest(root / BOARD_MANIFEST, {"wanted": list(BOARD_PACKAGES), "packages": record})
    return tree


if __name__ == "__main__":
    try:
        print(guest_assets())
        print(kernel_headers())
    except AvatarError as err:
        print(f"avatar-hw: {err}", file=sys.stderr)
        sys.exit(2)
