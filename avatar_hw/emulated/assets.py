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
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import AvatarError
from .build import cache_dir, replacing

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

    def candidates(self, packages):
        """{package: candidate version} of ``packages`` (one ``apt-cache policy``)."""
        found, package = {}, None
        for line in self.run("apt-cache", "policy", *packages).splitlines():
            if not line.startswith(" ") and line.endswith(":"):
                package = line[:-1]
            elif line.strip().startswith("Candidate:") and package is not None:
                version = line.split(":", 1)[1].strip()
                if version and version != "(none)":
                    found[package] = version
        for package in packages:
            name = package.removesuffix(":arm64")
            if package not in found and name in found:
                found[package] = found[name]
        missing = [p for p in packages if p not in found]
        if missing:
            raise AvatarError(f"apt knows no arm64 package {', '.join(missing)}: the host's apt "
                              f"sources must be a Debian archive that carries arm64 (see "
                              f"docs/emulated-board.md)")
        return found

    def candidate(self, package):
        return self.candidates([package])[package]

    def records(self, versions):
        """{package: {field: value}} of the records of ``versions`` ({package: version};
        one ``apt-cache show``; continuation lines are left out)."""
        records, record = {}, None
        wanted = {package.split(":")[0]: package for package in versions}
        text = self.run("apt-cache", "show", *(f"{p}={v}" for p, v in versions.items()))
        for line in text.splitlines() + [""]:
            if not line.strip():
                if record and record.get("Package") in wanted:
                    records.setdefault(wanted[record["Package"]], record)
                record = None
            elif not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                record = record or {}
                record[key] = value.strip()
        missing = [p for p in versions if p not in records]
        if missing:
            raise AvatarError(f"apt-cache show has no record of {', '.join(missing)}")
        return records

    def fetch_all(self, versions, dest):
        """Download ``versions`` ({package: version or None for the candidate}; arm64 unless
        ``NAME:ARCH``) into ``dest`` with one ``apt-get download``, check each .deb's SHA256
        against the index; [(deb, version, sha256)] in the order given."""
        candidates = [p for p, v in versions.items() if v is None]
        versions = {**versions, **(self.candidates(candidates) if candidates else {})}
        records = self.records(versions)
        size = sum(int(r["Size"]) for r in records.values())
        names = ", ".join(f"{p} {v}" for p, v in versions.items())
        _progress(f"downloading {names if len(versions) < 4 else f'{len(versions)} packages'} "
                  f"({size / 1e6:.1f} MB)")
        before = {p: set(dest.glob(f"{p.split(':')[0]}_*.deb")) for p in versions}
        self.run("apt-get", "download", *(f"{p}={v}" for p, v in versions.items()), cwd=dest)
        fetched = []
        for package, version in versions.items():
            debs = set(dest.glob(f"{package.split(':')[0]}_*.deb"))
            deb = max(debs - before[package] or debs, key=lambda p: p.stat().st_mtime)
            sha256 = records[package]["SHA256"]
            digest = hashlib.sha256(deb.read_bytes()).hexdigest()
            if digest != sha256:
                deb.unlink()
                raise AvatarError(f"{deb.name}: SHA256 {digest} does not match apt's index "
                                  f"({sha256}); removed, try again")
            fetched.append((deb, version, sha256))
        return fetched

    def fetch(self, package, dest, version=None):
        """``fetch_all`` of one package."""
        return self.fetch_all({package: version}, dest)[0]


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
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))


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


def _depends(record):
    """A package record's Pre-Depends and Depends: the first alternative of each, no versions."""
    names = []
    for field in ("Pre-Depends", "Depends"):
        for entry in record.get(field, "").split(","):
            first = entry.split("|")[0].strip().split(" ")[0]
            if first:
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
    _progress("fetching board mode's userland (Debian arm64 Python 3, pyserial, pyudev, udev), "
              "once")
    apt.update()
    wanted, level = {}, set(BOARD_PACKAGES) - BOARD_SKIP - set(record)
    while level:                       # the closure a level at a time: two apt-cache calls each
        versions = apt.candidates(sorted(level))
        wanted.update(versions)
        level = {name for found in apt.records(versions).values() for name in _depends(found)}
        level -= BOARD_SKIP | set(record) | set(wanted)
    debs = root / "debs"
    debs.mkdir(exist_ok=True)
    fetched = []
    for package, (deb, version, sha256) in zip(wanted, apt.fetch_all(wanted, debs) if wanted
                                               else ()):
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
