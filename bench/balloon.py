"""How fast a Linux guest inflates and deflates its balloon: avatar-hw's against QEMU's.

    .venv/bin/python -m bench.balloon [--runs N] [--mib 128]

Both sides boot the emulated board's kernel and initramfs (virtio_balloon loaded);
ours is the emulated board with ``balloon = { stats_interval = 0 }`` (the target set
through the control socket, ``actual`` polled there), QEMU's is ``virt`` with
``virtio-balloon-device`` (set with the monitor's ``balloon`` command, polled with
``info balloon``). The guest first writes and deletes 192 MiB in its tmpfs, so the
pages it gives back were really allocated on the host. A figure is MiB of guest memory
per second from setting the target to the guest's ``actual`` reaching it (polled every
10 ms: the figures are good to about ±1%); Linux moves 256 pages (1 MiB) per request,
so this is request latency: a trap, a notify and an interrupt per MiB.
"""

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from avatar_hw import control
from avatar_hw.emulated import memory_map as mm
from avatar_hw.emulated.initramfs import build_initramfs
from avatar_hw.emulated.machine import qemu_value
from avatar_hw.emulated.session import EmulatedBoard
from avatar_hw.errors import AvatarError
from avatar_hw.unixsock import connect_unix

from .board import connect, qemu_base
from .common import Child

MIB = 1 << 20
POLL = 0.01
TIMEOUT = 120
TOUCH = "dd if=/dev/zero of=/tmp/fill bs=1M count=192 2>/dev/null; rm /tmp/fill"


def timed(set_target, balloon_mib, wanted):
    start = time.perf_counter()
    set_target()
    deadline = time.monotonic() + TIMEOUT
    while balloon_mib() != wanted:
        if time.monotonic() > deadline:
            raise AvatarError(f"the balloon did not reach {wanted} MiB within {TIMEOUT} s")
        time.sleep(POLL)
    return time.perf_counter() - start


def ours(initrd, mib):
    with EmulatedBoard(initrd=Path(initrd), devices="balloon = { stats_interval = 0 }") as board:
        shell = connect(board.console_path)
        try:
            shell.wait_ready(120)
            shell.run(TOUCH)
            path = board.control_path
            ram = control.request("balloon", path, vm=0)["ram"]

            def state():
                return (control.request("balloon", path, vm=0)["balloon"] or 0) // MIB
            inflate = timed(lambda: control.request("balloon", path, vm=0,
                                                    size=ram - mib * MIB), state, mib)
            deflate = timed(lambda: control.request("balloon", path, vm=0, size=ram), state, 0)
            return inflate, deflate
        finally:
            shell.close()


class Monitor:
    """QEMU's human monitor on a Unix socket."""

    def __init__(self, path):
        try:
            self.sock = connect_unix(path, 30, poll=0.05)
        except OSError:
            raise AvatarError(f"QEMU monitor {path} never accepted a connection") from None
        self.sock.settimeout(10)
        self._until(b"(qemu) ")

    def _until(self, marker):
        data = b""
        while not data.endswith(marker):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AvatarError("QEMU monitor closed")
            data += chunk
        return data.decode(errors="replace")

    def command(self, line):
        self.sock.sendall(line.encode() + b"\n")
        return self._until(b"(qemu) ")


def qemu(initrd, mib, workdir):
    console, monitor_path = workdir / "console.sock", workdir / "monitor.sock"
    argv = qemu_base(initrd, console) + [
        "-device", "virtio-balloon-device",
        "-monitor", f"unix:{qemu_value(monitor_path)},server=on,wait=off"]
    with Child(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL, start_new_session=True):
        shell = connect(console, timeout=30)
        try:
            shell.wait_ready(120)
            shell.run(TOUCH)
            return measure_qemu(Monitor(monitor_path), mib)
        finally:
            shell.close()


def measure_qemu(monitor, mib):
    ram = mm.GUEST_RAM_SIZE // MIB                      # qemu_base's -m

    def state():
        actual = int(re.search(r"actual=(\d+)", monitor.command("info balloon")).group(1))
        return ram - actual
    inflate = timed(lambda: monitor.command(f"balloon {ram - mib}"), state, mib)
    deflate = timed(lambda: monitor.command(f"balloon {ram}"), state, 0)
    return inflate, deflate


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.balloon", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=128, help="balloon size (MiB)")
    args = parser.parse_args(argv)
    initrd = build_initramfs()
    results = {"ours": [], "qemu": []}
    workdir = Path(tempfile.mkdtemp(prefix="avatar-bench-balloon-"))
    try:
        for n in range(args.runs):
            results["ours"].append(ours(initrd, args.mib))
            results["qemu"].append(qemu(initrd, args.mib, workdir))
            print(f"run {n + 1}: ours inflate/deflate {results['ours'][-1][0]:.2f}/"
                  f"{results['ours'][-1][1]:.2f} s, QEMU {results['qemu'][-1][0]:.2f}/"
                  f"{results['qemu'][-1][1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for side, label in (("ours", "avatar-hw"), ("qemu", "QEMU virtio-balloon-device")):
        for i, what in enumerate(("inflate", "deflate")):
            rates = [args.mib / run[i] for run in results[side]]
            print(f"{label:28} {what} {args.mib} MiB: median {statistics.median(rates):.0f} "
                  f"MiB/s (min {min(rates):.0f}, max {max(rates):.0f})")


if __name__ == "__main__":
    main()
