"""Shared pieces of the benchmarks: C helpers built at run time, child processes, summaries."""

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from avatar_hw.errors import AvatarError
from avatar_hw.processes import end_process, make_workdir

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ABI_INCLUDE = REPO / "boards" / "abi"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RAM_DIR = "/dev/shm"
RAM_DIR_SPARE = 1 << 30         # left free there beside a bench's data (guest RAM files too)


def compile_c(name, outdir, *, cc="gcc", flags=("-O2",), include=(ABI_INCLUDE, BENCH)):
    """Compile ``bench/<name>.c`` into ``outdir`` with ``cc``; returns the executable's path."""
    if shutil.which(cc) is None:
        raise AvatarError(f"{cc} not found: the benchmark builds bench/{name}.c with it "
                          "(run scripts/setup)")
    out = Path(outdir) / Path(name).name
    argv = [cc, *flags, "-Wall", "-Wextra", "-Werror",
            *(f"-I{path}" for path in include), "-o", str(out), str(BENCH / f"{name}.c")]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise AvatarError(f"building bench/{name}.c failed: {result.stderr.strip()[-1500:]}")
    return out


def cpu_seconds(pid):
    """User + system CPU time of process ``pid`` (every thread) so far, from /proc, with
    the kernel's tick resolution."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Child:
    """A child process stopped with SIGTERM (then SIGKILL) on its own PID when done."""

    def __init__(self, argv, **popen):
        self.argv = [str(a) for a in argv]
        self.process = subprocess.Popen(self.argv, **popen)
        self.pid = self.process.pid

    def cpu_seconds(self):
        return cpu_seconds(self.pid)

    def status(self):
        """/proc/PID/status as a dict of the kB-valued fields (VmRSS, RssAnon, ...)."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    out[key] = int(value.split()[0])
        return out

    def rss_outside(self, root):
        """Resident kB of the mappings whose file is not under ``root`` (the guest RAM files
        of a FakeBoard are there; on a board guest RAM is a UIO mapping, not in RSS)."""
        total, skip = 0, False
        with open(f"/proc/{self.pid}/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):        # a mapping's first line
                    parts = line.split()
                    skip = len(parts) > 5 and parts[5].startswith(str(root))
                elif head == "Rss:" and not skip:
                    total += int(line.split()[1])
        return total

    def stop(self, timeout=15):
        """SIGTERM, wait, SIGKILL if needed; returns the exit status."""
        return end_process(self.process, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def spread(values):
    """``{"median", "min", "max", "runs"}`` of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": list(values)}


def data_workdir(prefix, size):
    """A new temporary directory for ``size`` bytes of disk images and shared folders: in
    RAM (``RAM_DIR``) when it has room, so that neither the host's disk nor what its kernel
    keeps of them in the page cache is in the figures (this machine's reclaims page cache on
    its own: minutes after it was written, 70 MiB of a 256 MiB image were left in memory,
    and a guest's first 64 MiB read of it ran at 277-554 MB/s against 1 000-1 600 for the
    next ones, and 1 227 for the first one from /dev/shm: docs/performance.md); else in the
    default temporary directory. ``where(workdir)`` says which, for the results."""
    try:
        ram = os.access(RAM_DIR, os.W_OK) and shutil.disk_usage(RAM_DIR).free > size + RAM_DIR_SPARE
    except OSError:
        ram = False
    return Path(make_workdir(prefix, RAM_DIR if ram else None))   # a killed bench's: removed


def where(path):
    """"RAM" or "disk": where ``data_workdir`` put the directory ``path``."""
    return "RAM" if Path(path).parent == Path(RAM_DIR) else "disk"


def write_synced(path, chunks):
    """Write ``chunks`` (bytes-like) to a new file ``path`` and fsync it. A benchmark's input
    must be clean in the page cache: else the first side's flush (a guest's fsync on a
    disk image) writes the bench's own data out, and the side after finds it clean."""
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AvatarError(f"benchmark: {what} within {timeout} s")
        time.sleep(0.005)


def machine_info():
    """What the numbers were measured on."""
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "loadavg_at_start": os.getloadavg(),
            "kernel": os.uname().release, "machine": os.uname().machine}


def git_state(path=REPO):
    """The commit checked out at ``path`` and whether its tree differs from it (files
    changed or not tracked); {} if ``path`` is not in a git checkout."""
    def git(*argv):
        return subprocess.run(["git", "-C", str(path), *argv], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def error_text(err):
    """An exception as the results record it: its type and its message."""
    return f"{type(err).__name__}: {err}"


def table(title, header, rows):
    """Print a plain-text table."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
