"""A Linux guest on the emulated board: avatar-hw's devices against QEMU's own.

Both sides boot the same kernel and the same initramfs (the emulated board's,
plus ``bin/avbench`` built from bench/guest/avbench.c as a second cpio
archive) with the same bootargs, and use the same host image file:

- ours: the emulated board (QEMU + our EL2 stub, ``avatar_hw.emulated``),
  the devices served by avatar-hw through the trap page, the daemon waiting for
  traps as the emulated board file says (``trap.wait``; reported as ``ours_wait``),
  in a thread of the launcher or in its own process (``EmulatedBoard(daemon_process=)``;
  reported as ``ours_daemon``); its counters are read through its control socket,
  as ``avatar-hw info`` reads them, in either;
- QEMU: the guest booted directly on ``virt`` with QEMU's virtio-mmio
  devices (virtio-blk-device, virtio-serial-device + virtconsole,
  virtio-rng-device, ``virtio-mmio.force-legacy=false``) and QEMU's own DT.

Runs alternate (ours, QEMU, ours, ...). In each, from the shell on hvc0:
1 MiB O_DIRECT sequential read and write of /dev/vda, 4 KiB O_DIRECT random
reads at queue depth 1, /dev/hwrng, 64 MiB over hvc0 each way with the
SHA-256 compared on both ends, and 1 MiB sequential reads and writes of a file
on a 9P2000.L mount of one host folder (QEMU: ``-fsdev local,security_model=none``
and virtio-9p-device; ours: ``9p = { security_model = "none" }``). Device
kinds avatar-hw does not have yet are measured on QEMU's side only and
reported as such.

Net: the guest's ``avbench net-tx`` sends broadcast frames (1500-byte payloads, AF_PACKET)
to a host process (bench/netpeer.py) on a Unix datagram socket, one datagram per frame
on both sides: avatar-hw's ``switch:`` backend, which the peer joins, and QEMU's
``virtio-net-device`` with ``-netdev dgram`` (QEMU 7.2). The figure is what arrives,
host clock, first to last frame; the frames lost on the way are reported beside it.

gpu: the guest's ``avgpu frames N`` (bench/guest/avgpu.c) shows a 1024x768 dumb buffer
through the virtio_gpu DRM driver and draws N full frames, each pushed with DIRTYFB
(TRANSFER_TO_HOST_2D + RESOURCE_FLUSH), the clock stopped by a fenced request behind the
last; then N frames pushed without drawing (the guest's memset left out); ours ``gpu = {
width = 1024, height = 768 }``, QEMU's ``virtio-gpu-device,xres=1024,yres=768``
(``-display none``).

vsock (ours only: QEMU offers vhost-vsock, which needs the host kernel's
/dev/vhost-vsock, or vhost-user-vsock with an external daemon): 64 MiB
echoed each way, once from a host connection to the guest's ``avbench
vsock-echo`` and once from the guest's ``avbench vsock-send`` to a host echo
on ``<socket>_<port>``, SHA-256 compared on both sides; after the other rows, so that
the rows both sides measure start as soon after boot on ours as on QEMU's.
"""

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from avatar_hw.control import request
from avatar_hw.errors import AvatarError
from avatar_hw.emulated import memory_map as mm
from avatar_hw.emulated.assets import guest_assets
from avatar_hw.emulated.devicetree import DEFAULT_BOOTARGS
from avatar_hw.emulated.initramfs import build_initramfs, write_newc
from avatar_hw.emulated.machine import QEMU, qemu_value
from avatar_hw.emulated.session import EmulatedBoard, GuestShell
from avatar_hw.hil import vsock
from avatar_hw.hil.target import device_available
from avatar_hw.processes import end_process
from avatar_hw.unixsock import connect_unix

from .common import (compile_c, cpu_seconds, data_workdir, error_text, spread, table, where,
                     write_synced)
from .cost import device_kinds_available

MIB = 1 << 20
SIZES = {  # full run, --quick
    "seqread": (256 * MIB, 16 * MIB), "seqwrite": (128 * MIB, 8 * MIB),
    "randread": ((20000, 5.0), (500, 1.0)), "rng": ((4 * MIB, 5.0), (256 << 10, 1.0)),
    "console": (64 * MIB, 4 * MIB), "p9": (128 * MIB, 16 * MIB), "vsock": (64 * MIB, 8 * MIB),
    "net": (32 * MIB, 4 * MIB), "gpu": (300, 30),           # gpu: full-screen frames
}
NET_MAC = "52:54:00:00:00:30"
P9_TAG = "benchshare"
VSOCK_PORT = 5000
IMAGE_SIZE = 256 * MIB
COMMAND_TIMEOUT = 180
IDLE_TIMEOUT = 15
FIGURES = [  # key, label, unit, higher is better
    ("boot_s", "boot to shell", "s", False),
    ("seqread_MBps", "block seq read 1 MiB O_DIRECT", "MB/s", True),
    ("seqwrite_MBps", "block seq write 1 MiB O_DIRECT", "MB/s", True),
    ("randread_iops", "block 4 KiB rand read QD1", "IOPS", True),
    ("randread_p50_us", "  latency p50", "µs", False),
    ("randread_p99_us", "  latency p99", "µs", False),
    ("randread_sync_traps_per_io", "  traps the vCPU waited for, per read", "traps", False),
    ("randread_host_cpu_us", "  host CPU per read (QEMU, daemon, bench)", "µs", False),
    ("console_g2h_MBps", "console guest->host, sha256 checked", "MB/s", True),
    ("console_h2g_MBps", "console host->guest, sha256 checked", "MB/s", True),
    ("rng_MBps", "rng /dev/hwrng", "MB/s", True),
    ("rng_host_cpu_us_per_KiB", "  host CPU per KiB (QEMU, daemon, bench)", "µs", False),
    ("net_g2h_MBps", "net guest->host, 1500-byte frames, received", "MB/s", True),
    ("net_g2h_lost", "  frames lost of those sent", "fraction", False),
    ("p9read_MBps", "9p seq read of a file, 1 MiB", "MB/s", True),
    ("p9write_MBps", "9p seq write of a file, 1 MiB", "MB/s", True),
    ("vsock_host_echo_MBps", "vsock host->guest echo, each way, sha256 checked", "MB/s", True),
    ("vsock_guest_echo_MBps", "vsock guest->host echo, each way, sha256 checked", "MB/s", True),
    ("gpu_fps", "gpu 1024x768 frames drawn, DIRTYFB (transfer + flush)", "frames/s", True),
    ("gpu_push_fps", "gpu 1024x768 frames pushed only (no drawing)", "frames/s", True),
    ("gpu_push_MBps", "  pixels moved to the host", "MB/s", True),
]
NOT_COMPARED = ("vsock: QEMU has vhost-vsock only (vhost-vsock-device needs the host's "
                "/dev/vhost-vsock, vhost-user-vsock an external daemon): ours alone")


# -- the guest -------------------------------------------------------------------------------------

def build_initrd(workdir, programs=("avbench",), scripts=None):
    """The emulated board's initramfs with ``bin/<program>`` built from each
    bench/guest/<program>.c, and ``bin/<name>`` for each shell script in
    ``scripts`` ({name: text}), appended as a second newc archive."""
    entries = []
    for name in programs:
        tool = compile_c(f"guest/{name}", workdir, cc="aarch64-linux-gnu-gcc",
                         flags=("-O2", "-static"), include=())
        entries.append((f"bin/{name}", stat.S_IFREG | 0o755, tool.read_bytes(), 0))
    for name, text in (scripts or {}).items():
        entries.append((f"bin/{name}", stat.S_IFREG | 0o755, text.encode(), 0))
    extra = Path(workdir) / "guest-tools.cpio"
    write_newc(extra, entries)
    initrd = Path(workdir) / "initramfs.cpio"
    with open(initrd, "wb") as out:
        for part in (build_initramfs(), extra):
            out.write(part.read_bytes())
    return initrd


class BytesLost(AvatarError):
    """A bulk transfer stalled short: ``received`` bytes arrived, the last at ``last``
    (``time.perf_counter()``)."""

    def __init__(self, message, received, last):
        super().__init__(message)
        self.received, self.last = received, last


class BenchShell(GuestShell):
    """The guest shell, plus bulk transfers over the same console."""

    def read_exact(self, count, digest, idle_timeout):
        """Read exactly ``count`` bytes into ``digest`` (hashlib object); AvatarError if
        nothing arrives for ``idle_timeout`` s (bytes lost on the way)."""
        take = self._buffer[:count]
        self._buffer = self._buffer[count:]
        digest.update(take)
        left = count - len(take)
        chunk = bytearray(1 << 20)
        self.sock.settimeout(idle_timeout)
        last = time.perf_counter()
        while left:
            try:
                n = self.sock.recv_into(chunk, min(left, len(chunk)))
            except TimeoutError:
                raise BytesLost(f"guest console: {count - left} of {count} bytes arrived, "
                                f"then nothing for {idle_timeout} s", count - left,
                                last) from None
            last = time.perf_counter()
            if not n:
                raise AvatarError("guest console closed during a transfer")
            digest.update(memoryview(chunk)[:n])
            left -= n

    def result(self, command, pattern, timeout=COMMAND_TIMEOUT):
        """Run ``command``; the groups of ``pattern`` in its output (as ints where numeric)."""
        output, status = self.run(command, timeout)
        match = re.search(pattern, output)
        if status != 0 or not match:
            raise AvatarError(f"guest: {command!r} exited {status}: {output.strip()[-400:]}")
        return [int(g) if g.isdigit() else g for g in match.groups()]


def connect(path, timeout=120):
    try:
        return BenchShell(connect_unix(path, timeout))
    except OSError:
        raise AvatarError(f"console socket {path} never accepted a connection") from None


def measure_guest(shell, kinds, quick, waited_traps=None, net_peer=None, host_pids=()):
    """Every figure the guest can give with device ``kinds``; a dict of floats.

    ``waited_traps()``: how many traps the guest's vCPUs have waited for so far (ours:
    the daemon's count, without posted writes and shadow-answered reads).
    ``host_pids``: the processes that serve the guest besides this one (QEMU, a daemon of
    its own); their CPU time and this process's per small request is what a busy host
    divides its cores by (docs/performance.md section 4, "Where the CPU goes").
    ``net_peer``: the ``NetPeer`` the guest's network device reaches.
    """
    pick = 1 if quick else 0
    out = {}
    pids = (os.getpid(), *host_pids)

    def host_cpu():
        return sum(cpu_seconds(pid) for pid in pids)

    if net_peer is not None:
        out.update(net_g2h(shell, net_peer, SIZES["net"][pick]))
    if "block" in kinds:
        size = SIZES["seqread"][pick]
        done, ns = shell.result(f"avbench seqread /dev/vda {size}", r"bytes=(\d+) ns=(\d+)")
        out["seqread_MBps"] = done / ns * 1e3
        size = SIZES["seqwrite"][pick]
        done, ns = shell.result(f"avbench seqwrite /dev/vda {size}", r"bytes=(\d+) ns=(\d+)")
        out["seqwrite_MBps"] = done / ns * 1e3
        count, seconds = SIZES["randread"][pick]
        before = waited_traps() if waited_traps else 0
        cpu = host_cpu()
        ios, ns, p50, p99 = shell.result(f"avbench randread /dev/vda {count} {seconds}",
                                         r"ios=(\d+) ns=(\d+) p50_ns=(\d+) p99_ns=(\d+)")
        out.update(randread_iops=ios / ns * 1e9, randread_p50_us=p50 / 1e3,
                   randread_p99_us=p99 / 1e3, randread_host_cpu_us=(host_cpu() - cpu) / ios * 1e6)
        if waited_traps:
            out["randread_sync_traps_per_io"] = (waited_traps() - before) / ios
    if "rng" in kinds:
        size, seconds = SIZES["rng"][pick]
        cpu = host_cpu()
        done, ns = shell.result(f"avbench rng {size} {seconds}", r"bytes=(\d+) ns=(\d+)")
        out["rng_MBps"] = done / ns * 1e3
        if done:
            out["rng_host_cpu_us_per_KiB"] = (host_cpu() - cpu) / done * 1024e6
    if "9p" in kinds:
        out.update(measure_9p(shell, SIZES["p9"][pick]))
    if "gpu" in kinds:
        for key, mode in (("gpu", ""), ("gpu_push", " push")):
            frames, size, ns, _, _ = shell.result(
                f"avgpu frames {SIZES['gpu'][pick]}{mode}",
                r"gpu-frames frames=(\d+) bytes=(\d+) ns=(\d+) width=(1024) height=(768)")
            out[key + "_fps"] = frames / ns * 1e9
        out["gpu_push_MBps"] = size / ns * 1e3
    size = SIZES["console"][pick]
    out["console_h2g_MBps"] = console_h2g(shell, size)
    try:                                        # last: a failure leaves the shell unusable
        out["console_g2h_MBps"] = console_g2h(shell, size)
    except BytesLost as err:                    # the rate of what arrived, flagged lossy
        out["console_g2h_MBps"] = err.rate
        out["lossy"] = ["console_g2h_MBps"]
        out["errors"] = [f"console guest->host (lossy, rate of what arrived): {err}"]
    except AvatarError as err:
        out["errors"] = [f"console guest->host: {err}"]
    return out


class NetPeer:
    """bench/netpeer.py in a process of its own, bound at ``path`` (joining ``switch``)."""

    def __init__(self, path, switch=None):
        argv = [sys.executable, "-m", "bench.netpeer", str(path), *([str(switch)] if switch
                                                                      else [])]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=Path(__file__).parent.parent)
        if self.process.stdout.readline().strip() != "ready":
            self.close()
            raise AvatarError(f"net peer at {path} did not start")

    def counts(self, timeout=COMMAND_TIMEOUT):
        """Stop counting (once nothing arrives any more): {frames, bytes, first, last}."""
        out, _ = self.process.communicate("stop\n", timeout)
        return json.loads(out)

    def close(self):
        end_process(self.process, 5)


def net_g2h(shell, peer, size):
    """MB/s of 1500-byte payloads the host receives from the guest (host clock, first to
    last frame), and the fraction of the frames sent that never arrived."""
    sent, frames, _ = shell.result(f"ip link set eth0 up && avbench net-tx eth0 {size}",
                                   r"net-tx bytes=(\d+) frames=(\d+) ns=(\d+)")
    got = peer.counts()
    if got["frames"] < 2:
        raise AvatarError(f"net guest->host: {got['frames']} of {frames} frames arrived")
    return {"net_g2h_MBps": got["bytes"] / (got["last"] - got["first"]) / 1e6,
            "net_g2h_lost": 1 - got["frames"] / frames}


def measure_9p(shell, size):
    """Sequential 1 MiB reads of ``p9read`` (the host wrote it) and writes of a new file,
    on a 9P2000.L mount (msize 512 KiB, cache=none); the written file is removed."""
    shell.result(f"mkdir -p /mnt && mount -t 9p -o trans=virtio,version=9p2000.L,"
                 f"msize={512 << 10} {P9_TAG} /mnt && echo mounted", r"(mounted)")
    done, ns = shell.result(f"avbench seqread /mnt/p9read {size}", r"bytes=(\d+) ns=(\d+)")
    out = {"p9read_MBps": done / ns * 1e3}
    done, ns = shell.result(f"touch /mnt/p9write && avbench seqwrite /mnt/p9write {size}",
                            r"bytes=(\d+) ns=(\d+)")
    out["p9write_MBps"] = done / ns * 1e3
    shell.result("rm /mnt/p9write && umount /mnt && echo unmounted", r"(unmounted)")
    return out


def console_g2h(shell, size):
    """MB/s the host receives, from the start marker to the last byte (host clock)."""
    shell.sock.sendall(f"avbench tx {size}\n".encode())
    shell.read_until(rb"AVB-TX-START\n", COMMAND_TIMEOUT)
    digest = hashlib.sha256()
    start = time.perf_counter()
    try:
        shell.read_exact(size, digest, IDLE_TIMEOUT)
    except BytesLost as err:
        err.rate = err.received / max(err.last - start, 1e-9) / 1e6
        raise
    elapsed = time.perf_counter() - start
    sha = shell.read_until(rb"avbench tx bytes=\d+ ns=\d+ sha256=([0-9a-f]{64})",
                           COMMAND_TIMEOUT).group(1).decode()
    if sha != digest.hexdigest():
        raise AvatarError(f"console guest->host: SHA-256 mismatch over {size} bytes")
    shell.run("true")                                   # back at a prompt
    return size / elapsed / 1e6


def console_h2g(shell, size):
    """MB/s the guest reads, first byte to last (guest clock).

    hvc0 is the kernel's console, whose input takes ^O (0x0f) as the SysRq
    prefix; ^O^O passes one ^O, so every 0x0f goes doubled on the wire.
    """
    data = os.urandom(size)
    shell.sock.sendall(f"avbench rx {size}\n".encode())
    shell.read_until(rb"AVB-RX-GO\r?\n", COMMAND_TIMEOUT)
    shell.sock.settimeout(COMMAND_TIMEOUT)
    shell.sock.sendall(data.replace(b"\x0f", b"\x0f\x0f"))
    match = shell.read_until(rb"avbench rx bytes=(\d+) ns=(\d+) sha256=([0-9a-f]{64})",
                             COMMAND_TIMEOUT)
    if match.group(3).decode() != hashlib.sha256(data).hexdigest():
        raise AvatarError(f"console host->guest: SHA-256 mismatch over {size} bytes")
    shell.run("true")
    return size / int(match.group(2)) * 1e3


def _echo(sock, digest):
    """Send back what arrives on ``sock`` until end of stream, hashing it; then half-close.
    The bytes echoed."""
    buf = bytearray(MIB)
    view = memoryview(buf)
    total = 0
    while n := sock.recv_into(buf):
        digest.update(view[:n])
        sock.sendall(view[:n])
        total += n
    sock.shutdown(socket.SHUT_WR)
    return total


def _guest_line(shell, command, pattern, timeout=COMMAND_TIMEOUT):
    output, status = shell.run(command, timeout)
    match = re.search(pattern, output)
    if status != 0 or not match:
        raise AvatarError(f"guest: {command!r} exited {status}: {output.strip()[-400:]}")
    return match.groups()


def vsock_host_echo(shell, path, size):
    """The host connects (``path``: the vsock device's socket) to the guest's ``avbench
    vsock-echo`` and sends ``size`` random bytes while reading the echo; MB/s each way
    (host clock, first byte sent to last byte back). AvatarError unless the SHA-256 of
    what was sent, what the guest received and what came back agree."""
    _guest_line(shell, f"avbench vsock-echo {VSOCK_PORT} {size} >/tmp/vsock-echo.log 2>&1 "
                       "& true", "")
    data = os.urandom(size)
    sock = vsock.connect(path, VSOCK_PORT)
    sock.settimeout(COMMAND_TIMEOUT)
    sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)),
                              daemon=True)
    start = time.perf_counter()
    sender.start()
    back, received, buf = hashlib.sha256(), 0, bytearray(MIB)
    try:
        while n := sock.recv_into(buf):
            back.update(memoryview(buf)[:n])
            received += n
        elapsed = time.perf_counter() - start
    finally:
        sender.join(COMMAND_TIMEOUT)
        sock.close()
    guest_bytes, guest_sum = _guest_line(shell, "wait; cat /tmp/vsock-echo.log",
                                         r"vsock-echo bytes=(\d+) ns=\d+ sha256=(\w+)")
    sent = hashlib.sha256(data).hexdigest()
    if (received, back.hexdigest(), int(guest_bytes), guest_sum) != (size, sent, size, sent):
        raise AvatarError(f"vsock host->guest echo: {received} of {size} bytes came back, "
                          f"the guest got {guest_bytes}; SHA-256 sent {sent}, guest "
                          f"{guest_sum}, back {back.hexdigest()}")
    return size / elapsed / 1e6


def vsock_guest_echo(shell, path, size):
    """The guest's ``avbench vsock-send`` connects to host CID 2 port VSOCK_PORT (the Unix
    socket ``<path>_<port>``, where the host echoes) and sends ``size`` bytes while reading
    the echo; MB/s each way (guest clock). AvatarError unless the SHA-256 of what the
    guest sent, what the host got and what the guest got back agree."""
    host_path = f"{path}_{VSOCK_PORT}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(host_path)
    server.listen(1)
    server.settimeout(COMMAND_TIMEOUT)
    digest, host = hashlib.sha256(), {}

    def serve():
        peer, _ = server.accept()
        with peer:
            peer.settimeout(COMMAND_TIMEOUT)
            host["bytes"] = _echo(peer, digest)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        sent, received, ns, sent_sum, echo_sum = _guest_line(
            shell, f"avbench vsock-send {VSOCK_PORT} {size}",
            r"vsock-send bytes=(\d+) received=(\d+) ns=(\d+) sha256=(\w+) echo_sha256=(\w+)")
        thread.join(COMMAND_TIMEOUT)
    finally:
        server.close()
        os.unlink(host_path)
    if (int(sent), int(received), host.get("bytes"), echo_sum, digest.hexdigest()) != (
            size, size, size, sent_sum, sent_sum):
        raise AvatarError(f"vsock guest->host echo: the guest sent {sent} and got {received} "
                          f"back, the host echoed {host.get('bytes')}; SHA-256 sent "
                          f"{sent_sum}, host {digest.hexdigest()}, back {echo_sum}")
    return size / int(ns) * 1e3


# -- the two sides -------------------------------------------------------------------------------

DAEMON_MODES = ("thread", "process")     # EmulatedBoard(daemon_process=False / True)


def board_options(daemon=None):
    """EmulatedBoard's keyword arguments for ``daemon`` (one of DAEMON_MODES; None: its
    default)."""
    return {} if daemon is None else {"daemon_process": daemon == "process"}


def daemon_mode(board):
    """Where ``board``'s daemon runs: one of DAEMON_MODES."""
    return DAEMON_MODES[bool(board.daemon_process)]


def host_pids(board):
    """QEMU's PID and, in its own process, the daemon's (beside this process)."""
    return (board.machine.process.pid, *((board.process.pid,) if board.daemon_process else ()))


def daemon_info(board):
    """The daemon's ``info`` (``avatar-hw info --json``) through its control socket: the
    same whether it runs in a thread of this process or in its own."""
    return request("info", board.control_path)


def traps_waited(info):
    """The traps the guests' vCPUs waited for the daemon to answer (posted writes and reads
    the stub answered left out, and so the wait of the access after a posted write for the
    slot it holds), every device of every VM, from ``daemon_info``."""
    return sum(device["traps_waited"] for vm in info["vms"] for device in vm["devices"])


POLL_COUNTERS = ("poll_spare_cores", "poll_no_spare_core", "poll_preempted", "poll_grown")


def run_ours(initrd, image, share, kinds, quick, wait=None, daemon=None):
    """Our side's figures; ``wait``: the daemon's wait mode (None: the board file's);
    ``daemon``: where it runs, one of DAEMON_MODES (None: EmulatedBoard's default)."""
    devices = []
    if "block" in kinds:
        devices.append(f'block = {{ image = "{image}" }}')
    if "rng" in kinds:
        devices.append("rng = { }")
    if "9p" in kinds:
        devices.append(f'9p = {{ tag = "{P9_TAG}", path = "{share}", security_model = "none" }}')
    if "gpu" in kinds:
        devices.append("gpu = { width = 1024, height = 768 }")
    vsock_path = Path(initrd).parent / "vsock.sock"
    if device_available("vsock"):
        devices.append(f'vsock = {{ cid = 3, socket = "{vsock_path}" }}')
    switch = Path(initrd).parent / "net-switch.sock"
    if "net" in kinds:
        devices.append(f'net = {{ switch = "{switch}", mac = "{NET_MAC}" }}')
    start = time.perf_counter()
    with EmulatedBoard(initrd=Path(initrd), devices="\n".join(devices), wait=wait,
                       **board_options(daemon)) as board:
        shell = connect(board.console_path)
        peer = None
        try:
            shell.wait_ready(120)
            boot = time.perf_counter() - start
            figures = {"boot_s": boot, "wait": daemon_info(board)["mode"],
                       "daemon": daemon_mode(board)}
            if "net" in kinds:
                peer = NetPeer(Path(initrd).parent / "net-peer.sock", switch)
            figures.update(measure_guest(
                shell, kinds, quick, waited_traps=lambda: traps_waited(daemon_info(board)),
                net_peer=peer, host_pids=host_pids(board)))
            # vsock last (ours alone): the rows both sides measure start as soon after boot
            # as on QEMU's side; not after a console error (the shell is lost then)
            if device_available("vsock") and not figures.get("errors"):
                size = SIZES["vsock"][1 if quick else 0]
                try:
                    figures["vsock_host_echo_MBps"] = vsock_host_echo(shell, vsock_path, size)
                    figures["vsock_guest_echo_MBps"] = vsock_guest_echo(shell, vsock_path, size)
                except Exception as err:                # the rows measured above stay
                    figures["errors"] = [f"vsock: {error_text(err)}"]
            trap = daemon_info(board)["trap"]      # the adaptive mode's window, at the end
            figures["poll"] = {key: trap[key] for key in POLL_COUNTERS if key in trap}
            return figures
        finally:
            shell.close()
            if peer is not None:
                peer.close()


def qemu_base(initrd, console, machine="virt,gic-version=2", memory=()):
    """QEMU booting the bench guest directly on ``virt``, its shell on a virtconsole at
    ``console``; ``memory``: extra arguments for the guest RAM (a shared backend)."""
    return [QEMU, "-M", machine, "-cpu", "cortex-a72", "-smp", "1",
            "-m", f"{mm.GUEST_RAM_SIZE >> 20}M", *memory, "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", "none", "-kernel", str(guest_assets().kernel),
            "-initrd", str(initrd), "-append", DEFAULT_BOOTARGS,
            "-global", "virtio-mmio.force-legacy=false",
            "-chardev", f"socket,id=con,path={qemu_value(console)},server=on,wait=on",
            "-device", "virtio-serial-device", "-device", "virtconsole,chardev=con"]


def qemu_command(initrd, image, share, console, net=None):
    """QEMU's own devices; ``net``: (its socket, the peer's) for virtio-net on dgram."""
    netdev = [] if net is None else [
        "-netdev", f"dgram,id=net0,local.type=unix,local.path={qemu_value(net[0])},"
                   f"remote.type=unix,remote.path={qemu_value(net[1])}",
        "-device", f"virtio-net-device,netdev=net0,mac={NET_MAC}"]
    return qemu_base(initrd, console) + [
        "-drive", f"file={qemu_value(image)},format=raw,if=none,id=disk",
        "-device", "virtio-blk-device,drive=disk",
        "-device", "virtio-rng-device",
        "-fsdev", f"local,id=share,path={qemu_value(share)},security_model=none",
        "-device", f"virtio-9p-device,fsdev=share,mount_tag={P9_TAG}",
        "-device", "virtio-gpu-device,xres=1024,yres=768", *netdev]


@contextlib.contextmanager
def qemu_guest(command, console):
    """QEMU running ``command`` (its console socket ``console``): yields the ready shell,
    the seconds from start to the shell and QEMU's PID; stops QEMU after."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    shell = None
    try:
        shell = connect(console, timeout=30)
        shell.wait_ready(120)
        yield shell, time.perf_counter() - start, process.pid
    except AvatarError as err:
        if process.poll() is not None:
            raise AvatarError(f"QEMU exited {process.returncode}: "
                              f"{process.stderr.read().decode(errors='replace')[-800:]}") from err
        raise
    finally:
        if shell is not None:
            shell.close()
        end_process(process, 5)
        process.stderr.close()


def run_qemu(initrd, image, share, quick, net=False):
    workdir = Path(tempfile.mkdtemp(prefix="avatar-bench-qemu-"))
    console = workdir / "console.sock"
    peer = NetPeer(workdir / "net-peer.sock") if net else None
    sockets = (workdir / "qemu-net.sock", workdir / "net-peer.sock") if net else None
    try:
        with qemu_guest(qemu_command(initrd, image, share, console, sockets),
                        console) as (shell, boot, pid):
            return {"boot_s": boot, **measure_guest(shell, ("block", "rng", "9p", "gpu"), quick,
                                                     net_peer=peer, host_pids=(pid,))}
    finally:
        if peer is not None:
            peer.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- the part --------------------------------------------------------------------------------------

def run(quick=False, runs=3, wait=None, daemon=None):
    """``wait``: ours' wait mode (None: the emulated board file's ``trap.wait``); ``daemon``:
    where ours' daemon runs, one of DAEMON_MODES (None: EmulatedBoard's default)."""
    kinds = [k for k in device_kinds_available() if k in ("block", "rng", "net")]
    if importlib.util.find_spec("avatar_hw.devices.p9"):
        kinds.append("9p")
    if importlib.util.find_spec("avatar_hw.devices.gpu"):
        kinds.append("gpu")
    runs = 1 if quick else runs
    out = {"ours_device_kinds": ["console", *kinds], "runs": runs, "raw": {"ours": [], "qemu": []}}
    workdir = data_workdir("avatar-bench-board-", IMAGE_SIZE + 2 * SIZES["p9"][0])
    out["data"] = where(workdir)
    try:
        initrd = build_initrd(workdir, programs=("avbench", "avgpu"))
        image = workdir / "disk.img"
        block = os.urandom(MIB)                           # real data, clean in the page cache
        write_synced(image, [block] * (IMAGE_SIZE // MIB))
        share = workdir / "share"                         # the 9p folder, one file to read
        share.mkdir()
        write_synced(share / "p9read", [block] * (SIZES["p9"][0] // MIB))
        alternate(runs, (("ours", lambda: run_ours(initrd, image, share, kinds, quick, wait,
                                                   daemon)),
                         ("qemu", lambda: run_qemu(initrd, image, share, quick,
                                                   net="net" in kinds))),
                  out["raw"], "board")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["figures"] = summarise(out["raw"])
    for key in ("wait", "daemon"):
        out[f"ours_{key}"] = sorted({r[key] for r in out["raw"]["ours"] if key in r})
    report(out)
    return out


def alternate(runs, sides, raw, part):
    """``runs`` rounds of each (side, runner) in turn; each runner's figures (or its error,
    any Exception: the runs after it still run) and wall time appended to ``raw[side]``."""
    for n in range(runs):
        for side, runner in sides:
            start = time.monotonic()
            try:
                figures = runner()
            except Exception as err:
                figures = {"errors": [error_text(err)]}
            figures["wall_s"] = time.monotonic() - start
            raw[side].append(figures)
            print(f"  {part} run {n + 1}/{runs} {side}: {figures['wall_s']:.0f} s"
                  + "".join(f"; {e}" for e in figures.get("errors", ())), flush=True)


def summarise(raw, figure_list=FIGURES):
    figures = {}
    for key, label, unit, higher in figure_list:
        entry = {"label": label, "unit": unit, "higher_is_better": higher}
        for side in ("ours", "qemu"):
            values = [r[key] for r in raw[side] if key in r]
            entry[side] = spread(values) if values else None
            if any(key in r.get("lossy", ()) for r in raw[side]):
                entry[side + "_lossy"] = True
        if entry["ours"] and entry["qemu"] and entry["qemu"]["median"]:
            entry["ratio"] = entry["ours"]["median"] / entry["qemu"]["median"]
        figures[key] = entry
    return figures


def _cell(s, runs):
    if s is None:
        return "not measured"
    fmt = (lambda v: f"{v:,.0f}") if s["median"] >= 100 else (lambda v: f"{v:.3g}")
    missing = "" if len(s["runs"]) == runs else f" [{len(s['runs'])} of {runs} runs]"
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])}){missing}"


def report(out, title="Emulated board", qemu="QEMU virtio-mmio", note=NOT_COMPARED):
    runs = out["runs"]
    rows = [[f"{e['label']} ({e['unit']})",
             _cell(e["ours"], runs) + (" LOSSY" if e.get("ours_lossy") else ""),
             _cell(e["qemu"], runs) + (" LOSSY" if e.get("qemu_lossy") else ""),
             f"{e['ratio']:.3f}" if "ratio" in e else "-"] for e in out["figures"].values()]
    table(f"{title}, median (min-max) of {out['runs']} run(s) each, alternating",
          ["figure", "avatar-hw", qemu, "ours/QEMU"], rows)
    if out.get("ours_wait"):
        print(f"  avatar-hw's daemon waited for traps: {', '.join(out['ours_wait'])} "
              "(docs/boards.md, trap.wait)")
    if out.get("ours_daemon"):
        print(f"  avatar-hw's daemon ran in: {', '.join(out['ours_daemon'])} (--daemon)")
    if out.get("data"):
        print(f"  disk images and shared folders in {out['data']} (bench/common.py, "
              "data_workdir)")
    polls = [r["poll"] for r in out["raw"]["ours"] if r.get("poll")]
    if polls:
        print("  adaptive window per run (spare cores at the last measure, measures without a "
              "spare core, give-ups when preempted): " + "; ".join(
                  f"{p.get('poll_spare_cores')}, {p.get('poll_no_spare_core')}, "
                  f"{p.get('poll_preempted')}" for p in polls))
    if note:
        print(f"  {note}")
    for side in ("ours", "qemu"):
        for n, run in enumerate(out["raw"][side], 1):
            for error in run.get("errors", ()):
                print(f"  {side} run {n}: {error}")
