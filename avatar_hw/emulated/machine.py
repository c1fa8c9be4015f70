"""Run the emulated board: QEMU (virt, GICv2, EL2) with our stub, RAM in a shared file.

Seams this module provides for the daemon (see docs/emulated-board.md):

- ``UartLink``: the host end of the PL011 that the stub owns. A reader thread
  drains it continuously (QEMU stalls with its global lock held if nobody
  reads) and splits the byte stream: 0x00 is the stub's doorbell ("a trap was
  posted while you slept"), other bytes are the stub's log lines. ``ring()``
  sends a byte the other way, which raises the UART's RX interrupt at EL2.
  Its doorbell is an ``avatar_hw.doorbell.StubDoorbell`` and the board's
  interrupt line an ``avatar_hw.interrupts.StubInterruptLine`` (``raise_intid``
  sets the INTID's bit in the trap page's ``virq_pending`` and rings the stub,
  which injects it through a GICH list register).
- ``EmulatedMachine``: creates the RAM file in /dev/shm and unlinks it at once
  (QEMU, the daemon and tests open it as ``ram_path``, /proc/PID/fd/N of the
  fd this process keeps: the memory goes when its last user does, even after a
  SIGKILL), starts QEMU so that it dies with this process, even by a SIGKILL
  (``processes.start_tied``), connects the UART before the CPU runs
  (``wait=on``), and on ``stop()`` kills QEMU by its own PID and removes the
  temp directory. A temp directory left by a killed process is removed by the
  next start.
"""

import collections
import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid

from ..doorbell import StubDoorbell
from ..errors import AvatarError
from ..hw.region import Region
from ..interrupts import StubInterruptLine
from ..processes import end_process, make_workdir, start_tied
from ..unixsock import connect_unix
from . import memory_map as mm

log = logging.getLogger(__name__)

QEMU = "qemu-system-aarch64"
DOORBELL_BYTE = 0x00
KEPT_LINES = 10000          # the stub's last log lines kept (a guest can make them for ever)
# boards/emulated/main.c, vm_stop(): a VM that powered off while others run on (the last one
# powers the board off). Its own line: a guest's are "avatar-stub: vmN: guest: ...".
POWERED_OFF = re.compile(r"avatar-stub: vm(\d+): guest powered off;")


class UartLink:
    """The host end of the stub's PL011: log lines in (the last ``KEPT_LINES`` in ``lines``),
    doorbells both ways; ``powered_off``: the VMs the stub said powered off."""

    def __init__(self, sock, *, on_log=None):
        self.sock = sock
        self.doorbell = StubDoorbell(self.ring)
        self.lines = collections.deque(maxlen=KEPT_LINES)
        self.count = 0              # lines read in all
        self.powered_off = set()
        self._on_log = on_log
        self._partial = b""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._reader, name="stub-uart", daemon=True)
        self._thread.start()

    def _reader(self):
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            rings = chunk.count(DOORBELL_BYTE)
            if rings:
                self.doorbell.signal(rings)
                chunk = chunk.replace(bytes((DOORBELL_BYTE,)), b"")
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            if complete:
                with self._changed:
                    for raw in complete:
                        line = raw.decode("ascii", "replace")
                        powered_off = POWERED_OFF.match(line)
                        if powered_off:
                            self.powered_off.add(int(powered_off.group(1)))
                        self.lines.append(line)
                        self.count += 1
                        log.debug("%s", line)
                        if self._on_log is not None:
                            self._on_log(line)
                    self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    closed = False

    def ring(self):
        """Wake the stub (the UART RX interrupt makes it read virq_pending)."""
        ring_uart(self.sock)

    def wait_for_line(self, text, timeout):
        """The first log line containing ``text``; None after ``timeout`` s or at EOF."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                new = min(self.count - seen, len(self.lines))
                for line in itertools.islice(self.lines, len(self.lines) - new, None):
                    if text in line:
                        return line
                seen = self.count
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                self._changed.wait(left)

    def wait_closed(self, timeout):
        """Wait until the reader saw QEMU close the socket (every byte before it is read)."""
        with self._changed:
            self._changed.wait_for(lambda: self.closed, timeout)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=5)
        self.sock.close()
        self.doorbell.release()


def ring_uart(sock):
    """One byte to the stub's UART (a daemon in its own process shares the launcher's
    socket for this; one-byte sends never interleave)."""
    try:
        sock.send(b"\x01", socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass  # bytes are already waiting in the UART: the stub will look anyway
    except OSError:
        pass  # QEMU is gone: there is no stub to wake


def check_vms(vms):
    if not (isinstance(vms, int) and not isinstance(vms, bool) and 1 <= vms <= mm.MAX_VMS):
        raise AvatarError(f"the emulated board runs 1 to {mm.MAX_VMS} VMs (one per CPU), "
                          f"not {vms!r}")


WORKDIR_PREFIX = "avatar-emulated-"


def qemu_value(value):
    """``value`` (a path) as one value in a QEMU option string (``-chardev socket,path=P``,
    ``-device loader,file=P``, ``-drive``, ``-object``, ``-qtest unix:P``): its commas
    doubled, else QEMU reads what follows one as another option (a comma in TMPDIR or in
    the cache's path broke the board)."""
    return str(value).replace(",", ",,")


def _require(tool, package):
    if shutil.which(tool) is None:
        raise AvatarError(f"{tool} not found: the emulated board needs it "
                          f"(apt-get install {package}, or run scripts/setup)")


class EmulatedMachine:
    """One QEMU run of the emulated board.

    ``vms`` guests, VM n on CPU n (``-smp vms``), each with its own copy of
    ``kernel`` at ``memory_map.KERNEL_ADDR`` in its RAM, entered at EL1 by the
    stub, with its device tree (``dtb``: one compiled tree, or a list with one
    per VM, or None) and ``initrd`` (likewise). ``model_wait_ms``: how long the stub waits
    for a device model to attach before entering the guests. ``board_params``: the
    block that puts the stub in board mode (``board_linux.board_params``): VM 0 is
    then the board Linux, entered on CPU0 without waiting for a model.
    """

    def __init__(self, stub, kernel, *, dtb=None, initrd=None, model_wait_ms=0, vms=1,
                 on_log=None, shm_dir="/dev/shm", qemu_args=(), board_params=None):
        _require(QEMU, "qemu-system-arm")
        check_vms(vms)
        dtbs = list(dtb) if isinstance(dtb, (list, tuple)) else [dtb] * vms
        initrds = list(initrd) if isinstance(initrd, (list, tuple)) else [initrd] * vms
        if len(dtbs) != vms or len(initrds) != vms:
            raise AvatarError(f"{len(dtbs)} device trees and {len(initrds)} initrds for {vms} VMs")
        self.stub, self.kernel, self.dtbs, self.initrds = stub, kernel, dtbs, initrds
        self.board_params = board_params
        self.vms = vms
        self.model_wait_ms = model_wait_ms
        self.on_log = on_log
        self.qemu_args = list(qemu_args)   # extra QEMU options (debugging: -d, -monitor)
        self.shm_path = os.path.join(shm_dir,
                                     f"avatar-emulated-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.ram_path = None
        self.workdir = None
        self.process = None
        self.uart = None
        self._ram_fd = -1
        self._regions = []

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout=30):
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout):
        self.workdir = make_workdir(WORKDIR_PREFIX)
        self._ram_fd = os.open(self.shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o600)
        os.unlink(self.shm_path)
        os.ftruncate(self._ram_fd, mm.ram_size(self.vms))
        self.ram_path = f"/proc/{os.getpid()}/fd/{self._ram_fd}"
        params = os.path.join(self.workdir, "boot-params.bin")
        with open(params, "wb") as f:
            for vm, dtb in enumerate(self.dtbs):
                f.seek(vm * mm.BOOT_PARAMS_STRIDE)
                f.write(mm.boot_params(vm=vm, vms=self.vms, kernel_entry=mm.KERNEL_ADDR,
                                       dtb=mm.DTB_ADDR if dtb else 0,
                                       model_wait_ms=self.model_wait_ms))
            if self.board_params is not None:
                f.seek(mm.BOARD_PARAMS - mm.BOOT_PARAMS)
                f.write(self.board_params)
        sock_path = os.path.join(self.workdir, "uart.sock")
        argv = self.command(sock_path, params)
        log.info("starting %s", " ".join(argv))
        self.process = start_tied(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, start_new_session=True,
                                  pass_fds=(self._ram_fd,))
        sock = self._connect(sock_path, timeout)
        self.uart = UartLink(sock, on_log=self.on_log)

    def command(self, sock_path, params):
        loaders = [(params, mm.BOOT_PARAMS)]
        for vm, (dtb, initrd) in enumerate(zip(self.dtbs, self.initrds)):
            loaders.append((self.kernel, mm.vm_ram_phys(vm, mm.KERNEL_ADDR)))
            if dtb:
                loaders.append((dtb, mm.vm_ram_phys(vm, mm.DTB_ADDR)))
            if initrd:
                loaders.append((initrd, mm.vm_ram_phys(vm, mm.INITRD_ADDR)))
        size = mm.ram_size(self.vms) >> 20
        # QEMU's own /proc/self/fd/N: the RAM file it inherits (pass_fds), already unlinked.
        argv = [QEMU,
                "-M", "virt,virtualization=on,gic-version=2,memory-backend=ram",
                "-cpu", "cortex-a72", "-smp", str(self.vms), "-m", f"{size}M",
                "-object", f"memory-backend-file,id=ram,size={size}M,"
                           f"mem-path=/proc/self/fd/{self._ram_fd},share=on",
                "-nodefaults", "-display", "none", "-no-reboot",
                # Threads named "CPU n/TCG": a bench or an engineer can find VM n's vCPU.
                "-name", "avatar-board,debug-threads=on",
                "-chardev", f"socket,id=uart,path={qemu_value(sock_path)},server=on,wait=on",
                "-serial", "chardev:uart", "-kernel", str(self.stub)]
        for path, addr in loaders:
            argv += ["-device", f"loader,file={qemu_value(path)},addr=0x{addr:x},force-raw=on"]
        return argv + self.qemu_args

    def _connect(self, path, timeout):
        """Connect to QEMU's UART socket; QEMU waits for us before running the CPU."""
        try:
            return connect_unix(path, timeout, alive=lambda: self.process.poll() is None)
        except OSError:
            if self.process.poll() is not None:
                raise AvatarError(f"QEMU exited with status {self.process.returncode} before "
                                  f"the board started: {self._stderr()}") from None
            raise AvatarError(f"QEMU did not open its UART socket {path} within {timeout} s") \
                from None

    def _stderr(self):
        try:
            return self.process.stderr.read().decode(errors="replace").strip()[-2000:]
        except (OSError, ValueError):
            return ""

    def wait(self, timeout=None):
        """Wait for QEMU to end (the guest powered off); returns its exit status or None.

        When it ended, the UART's last bytes are read too: ``uart.lines`` ends with them."""
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.uart is not None:
            self.uart.wait_closed(5)
        return status

    def stop(self):
        """Kill QEMU (its own PID), stop the reader, remove the RAM file and temp files."""
        if self.process is not None:
            end_process(self.process, 2)   # SIGKILL: QEMU blocked on a full UART ignores SIGTERM
            if self.process.stderr:
                self.process.stderr.close()
        if self.uart is not None:
            self.uart.close()
            self.uart = None
        for region in self._regions:
            try:
                region.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with its last user
        self._regions.clear()
        if self._ram_fd >= 0:
            os.close(self._ram_fd)
            self._ram_fd = -1
        if os.path.exists(self.shm_path):
            os.unlink(self.shm_path)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- what the daemon uses ---------------------------------------------------------

    def map(self, addr, size, name):
        """A Region over ``size`` bytes of the board's RAM at guest-physical ``addr``."""
        region = Region.map_file(self.ram_path, size, offset=mm.file_offset(addr, self.vms),
                                 name=f"{name} ({self.shm_path})", phys_addr=addr)
        self._regions.append(region)
        return region

    def trap_region(self):
        return self.map(mm.TRAP_PAGE, mm.TRAP_REGION_SIZE, "trap page")

    def interrupt_line(self, trap_region):
        return StubInterruptLine(trap_region, self.uart.ring)
