"""Build the EL2 stub (and small bare-metal test programs) with Debian's cross compiler.

Outputs are cached under the avatar-hw cache directory by a hash of the
sources and the command, so a rebuild happens only when something changed.
``cached`` and ``prune`` keep every such artifact's kind (this module's programs, the
initramfs, the device trees, the kernel module, board mode's .pyc) from growing without
limit. ``python -m avatar_hw.emulated.build`` builds the stub and prints its path.
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ..errors import AvatarError
from ..shipped import shipped_file

STUB_SOURCES = ("start.S", "main.c", "trap.c", "vgic.c", "log.c", "board.c", "idle.c")
STUB_DEPENDS = ("stub.h", "link.ld", "../abi/avatar_trap.h")
CROSS = "aarch64-linux-gnu-"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-ffreestanding", "-nostdlib", "-nostartfiles",
          "-fno-builtin", "-fno-stack-protector", "-fno-pic", "-no-pie", "-mgeneral-regs-only",
          "-mstrict-align", "-mcpu=cortex-a72", "-Wl,--no-warn-rwx-segments")


def cache_dir():
    """~/.cache/avatar-hw (or $AVATAR_HW_CACHE, or under $XDG_CACHE_HOME), created."""
    path = os.environ.get("AVATAR_HW_CACHE")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        path = os.path.join(base, "avatar-hw")
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


@contextlib.contextmanager
def replacing(path):
    """A temporary name beside ``path``, this process's and this call's only, to write;
    when the block ends without an error it replaces ``path`` (``os.replace``: a reader
    sees the old file or the whole new one), else it is removed. Launchers sharing a cache
    build the same file at once: with a fixed name (``out.tmp``) one truncated or renamed
    away the other's."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


KEEP = 3                # artifacts of each kind a build keeps: the most recently used
UNUSED_FOR = 3600       # seconds: an artifact used (or made) more recently is never removed


@contextlib.contextmanager
def _locked(directory, how):
    """``directory`` flock()ed (``fcntl.LOCK_SH`` or ``LOCK_EX``) for the block."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


def cached(path):
    """Does the cache hold the artifact ``path``? If so it is touched, its mtime now its last
    use, so that ``prune`` keeps it: for UNUSED_FOR seconds, time for the launcher to open it.
    Under its directory's shared lock: a prune removed it before (False: build it again) or
    sees it used."""
    if not path.parent.is_dir():
        return False
    with _locked(path.parent, fcntl.LOCK_SH):
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        except PermissionError:         # someone else's cache, read-only to us: use it
            return path.exists()
    return True


def prune(directory, pattern, keep=KEEP):
    """After a build: remove the artifacts of one kind (``pattern``, a glob in
    ``directory``: one name with another content hash) but the ``keep`` most recently used,
    unless used (``cached``) or made within UNUSED_FOR seconds: a launcher that chose one is
    about to open it. (One already open stays readable after its removal.) The kind's
    temporaries (``replacing``) not written to within UNUSED_FOR go too: a writer killed
    before its ``finally`` left them."""
    with _locked(directory, fcntl.LOCK_EX):
        found = sorted(_ages(directory.glob(pattern)), reverse=True)
        stale = _ages(directory.glob(f".{pattern}.*.tmp"))
        unused_since = time.time() - UNUSED_FOR
        for mtime, path in [*found[keep:], *stale]:
            if mtime < unused_since:
                with contextlib.suppress(OSError):      # housekeeping: never fails a build
                    path.unlink()


def _ages(paths):
    """(mtime, path) of each of ``paths`` still there."""
    found = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            found.append((path.stat().st_mtime, path))
    return found


def cross_compiler():
    """The path of the aarch64 cross gcc (``AvatarError`` when it is not installed)."""
    gcc = shutil.which(CROSS + "gcc")
    if gcc is None:
        raise AvatarError(f"{CROSS}gcc not found: the emulated board's stub needs it "
                          f"(apt-get install gcc-aarch64-linux-gnu, or run scripts/setup)")
    return gcc


def build_digest(paths, command):
    """The cache key of a build: its input files' names and bytes, and its command."""
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.name).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join(command).encode())
    return h.hexdigest()[:16]


def build_program(name, sources, *, extra_inputs=(), link_args=(), raw=False):
    """Compile and link ``sources`` (Paths) into a cached ELF, or if ``raw`` a raw
    binary of the program's ``.text`` (bare programs keep their data there).

    Returns the output path; the build command is part of the cache key.
    """
    gcc = cross_compiler()
    command = [*CFLAGS, *link_args]
    out = cache_dir() / f"{name}-{build_digest([*sources, *extra_inputs], command)}"
    out = out.with_suffix(".bin" if raw else ".elf")
    if cached(out):
        return out
    with replacing(out) as elf:
        result = subprocess.run([gcc, *command, "-o", str(elf), *map(str, sources), "-lgcc"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise AvatarError(f"building {name} failed:\n{result.stderr.strip()}")
        if raw:
            objcopy = shutil.which(CROSS + "objcopy") or "objcopy"
            subprocess.run([objcopy, "-O", "binary", "-j", ".text", str(elf), str(elf)],
                           check=True)
    prune(out.parent, f"{name}-*{out.suffix}")
    return out


def build_stub(defines=()):
    """The EL2 stub ELF (QEMU's ``-kernel``), from boards/emulated (checkout or installed).

    ``defines``: ``-D`` options, for the tests' variants (``STUB_TEST_*`` in the sources)."""
    stub_dir = shipped_file("emulated/start.S").parent
    return build_program(
        "stub", [stub_dir / s for s in STUB_SOURCES],
        extra_inputs=[stub_dir / d for d in STUB_DEPENDS],
        link_args=["-T", str(stub_dir / "link.ld"), *(f"-D{d}" for d in defines)])


def main(build):
    """``python -m``: print the path ``build()`` gives, or its error (exit status 2)."""
    try:
        print(build())
    except AvatarError as err:
        print(f"avatar-hw: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(build_stub)
