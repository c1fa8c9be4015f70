"""One run of the emulated board with the avatar-hw daemon serving its guest.

``EmulatedBoard`` builds or reuses everything (stub, guest assets, initramfs,
device tree), starts QEMU (``machine.EmulatedMachine``), runs the daemon
in this process (``Daemon`` in a thread, with the board's UART doorbell and
``virq_pending`` interrupt line) and offers the guest's console (hvc0, the
daemon's ``unix:`` console backend) through ``GuestShell``::

    with EmulatedBoard() as board:
        shell = board.shell()
        output, status = shell.run("ls /sys/bus/virtio/devices")

Devices beyond the console: ``devices`` is TOML for the ``[vm.0]`` table of
the VMs config (e.g. ``'block = { image = "/tmp/disk.img" }'``), or ``config``
is a VMs config file (the daemon's format; relative paths land in the
board's temporary directory). Either way VM 0's console gets one more
endpoint, the launcher's own (``console_path``, last, so ``avatar-hw console``
and ``Target.console_url`` pick another one): a client of the others never
takes ``shell()``'s connection away. Without a config the others are one
``unix:`` socket (``vm0-console.sock`` in the temporary directory).

``vms=2`` runs two guests, VM n on CPU n, each with its own devices
(``devices`` may be a list with one TOML string per VM) and console
(``shell(vm=1)``, ``console_paths[1]``: the launcher's endpoint for VM 1)::

    with EmulatedBoard(vms=2) as board:
        output, status = board.shell(vm=1).run("cat /proc/cmdline")

``daemon_process=True`` runs the daemon in its own process instead (``python -m
avatar_hw.emulated.session``, the same ``Daemon``): the launcher keeps QEMU's UART
and its reader, the child inherits the doorbell's eventfd (signalled by that
reader) and the UART socket (it rings the stub with one-byte sends of its own).
The daemon keeps its devices' state in ``state_path`` (``avatar_hw.state``), so
``kill_daemon()`` (SIGKILL) and ``start_daemon()`` restart it under the running
guest::

    with EmulatedBoard(daemon_process=True) as board:
        board.kill_daemon()
        board.start_daemon()        # the guest carries on, no reset
"""

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..board import load_board
from ..config import DeviceConfig, load_config
from ..daemon import Daemon
from ..doorbell import StubDoorbell
from ..errors import AvatarError, ConfigError
from ..processes import end_process, start_tied
from ..shipped import board_path
from ..unixsock import connect_unix
from . import board_linux
from .assets import guest_assets
from .build import build_stub
from .devicetree import DEFAULT_BOOTARGS, build_dtb
from .initramfs import READY_MARKER, build_initramfs
from .machine import WORKDIR_PREFIX, EmulatedMachine, check_vms, ring_uart
from .memory_map import MAX_VMS

log = logging.getLogger(__name__)

MODEL_WAIT_MS = 30000


class ConsoleTimeout(AvatarError):
    """What a guest shell awaited did not come in time; ``output``: what came meanwhile."""

    def __init__(self, message, output):
        super().__init__(message)
        self.output = output


class GuestGone(AvatarError):
    """The guest a shell talked to is gone (``reason``): it powered off (``powered_off``)
    or QEMU died; ``output``: what came before."""

    def __init__(self, gone, output):
        super().__init__(f"{gone.reason}; last output: {output[-300:]!r}")
        self.reason, self.powered_off, self.output = gone.reason, gone.powered_off, output


Gone = collections.namedtuple("Gone", "reason powered_off")


class GuestShell:
    """The guest's shell on hvc0, over the console backend's Unix socket."""

    def __init__(self, sock, gone=None):
        self.sock = sock
        self.gone = gone                # () -> None while the guest runs, else a Gone
        self._buffer = b""

    def read_until(self, pattern, timeout):
        """Read until ``pattern`` (bytes regex) matches; returns the match, consumes through it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self._buffer)
            if match:
                self._buffer = self._buffer[match.end():]
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConsoleTimeout(f"guest console: no {pattern!r} within {timeout} s; "
                                     f"last output: {self._buffer[-300:]!r}", self._buffer)
            self.sock.settimeout(min(left, 0.5))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                gone = self.gone and self.gone()
                if gone:
                    raise GuestGone(gone, self._buffer) from None
                continue
            if not chunk:
                raise AvatarError(f"guest console closed; last output: {self._buffer[-300:]!r}")
            self._buffer += chunk

    def wait_ready(self, timeout=60, marker=READY_MARKER):
        """Wait for the guest's ready ``marker`` (``banner``: what init printed before it)
        and the shell's first prompt."""
        deadline = time.monotonic() + timeout
        marker = re.escape(marker.encode())
        self.banner = self.read_until(b"(?s)^(.*)" + marker, timeout).group(1).decode(
            errors="replace")
        self.read_until(rb"# ", max(0.1, deadline - time.monotonic()))

    def run(self, command, timeout=60):
        """Run one shell command line in the guest; returns (output str, exit status).

        The markers are computed by the shell ($((N + 0))), so the terminal's echo
        of the typed line never matches them.
        """
        tag = int.from_bytes(os.urandom(4), "little")
        self.sock.sendall(f"echo b-$(({tag} + 0)); {command}; echo e-$(({tag} + 0))-$?\n".encode())
        self.read_until(f"b-{tag}\r*\n".encode(), timeout)   # \r\r\n: through board mode's bridge
        match = self.read_until(rb"(?s)(.*?)e-" + str(tag).encode() + rb"-(\d+)\r*\n", timeout)
        output = re.sub(rb"\r+\n", b"\n", match.group(1)).decode(errors="replace")
        return output, int(match.group(2))

    def close(self):
        self.sock.close()


_ONE_GUEST = ("board mode runs one guest, VM 1, with the board Linux's own VMs config "
              "(/etc/avatar-hw/vms.toml there) and control socket")
_ITS_UNIT = ("in board mode the daemon runs in the board Linux as its unit starts it "
             "(avatar-hw.service) and waits as its board file says (trap.wait in "
             "boards/emulated-board-linux.toml)")
HOST_MODE_ONLY = {"vms": _ONE_GUEST, "vm": _ONE_GUEST, "devices": _ONE_GUEST,
                  "config": _ONE_GUEST, "control": _ONE_GUEST, "wait": _ITS_UNIT,
                  "trace": _ITS_UNIT, "daemon_process": _ITS_UNIT}


def refuse_host_mode_options(given, spell):
    """Board mode honours none of ``HOST_MODE_ONLY``: ``given`` are the ones given (its keys),
    ``spell(key)`` how the caller names one (the demo ``--config``, ``EmulatedBoard``
    ``config=``). The first is refused in one line."""
    for key in given:
        name = spell(key)
        raise AvatarError(f"{name}: {HOST_MODE_ONLY[key]}; leave {name} out")


def _connect_unix(path, timeout):
    """A stream socket connected to ``path``, retried until it exists (``timeout`` s)."""
    try:
        return connect_unix(path, timeout, poll=0.05)
    except OSError:
        raise AvatarError(f"console socket {path} never appeared") from None


class EmulatedBoard:
    """QEMU + stub + guest + in-process daemon; ``stop()`` leaves nothing behind."""

    def __init__(self, *, vms=1, devices="", config=None, control_path=None,
                 bootargs=DEFAULT_BOOTARGS, on_log=None, wait=None, trace=False,
                 qemu_args=(), initrd=None, board_linux=False, board_files=None,
                 board_userland=True, daemon_process=False):
        check_vms(vms)
        if board_linux:
            given = {"vms": vms != 1, "devices": any([devices] if isinstance(devices, str)
                                                     else devices),
                     "config": config is not None, "control": control_path is not None,
                     "wait": wait is not None, "trace": trace, "daemon_process": daemon_process}
            refuse_host_mode_options([key for key, value in given.items() if value],
                                     lambda key: "control_path=" if key == "control"
                                     else f"{key}=")
        self.board_linux = board_linux   # board mode: CPU0 runs the board Linux (board_linux.py)
        self.board_files = board_files   # board mode: {path: bytes or (bytes, mode)} added to
                                         # the board Linux's initramfs
        self.board_userland = board_userland   # board mode: Python, udev and the daemon
        self.vms = vms
        self.devices = [devices] if isinstance(devices, str) else list(devices)
        if len(self.devices) > vms:
            raise AvatarError(f"devices for {len(self.devices)} VMs, but the board runs {vms}")
        self.devices += [""] * (vms - len(self.devices))
        self.config = config
        self._control = control_path    # None: control.sock in the machine's workdir
        self.qemu_args = qemu_args
        self.trace = trace
        self.bootargs = bootargs
        self.on_log = on_log
        self.wait = wait                # the daemon's wait mode; None: the board file's
        self.initrd = initrd            # a prebuilt initramfs (default: build_initramfs())
        self.daemon_process = daemon_process
        self.machine = self.daemon = self._thread = self.process = None
        self.state_path = None
        self._sockets = []              # the consoles it connected (its shells'): stop closes them

    def start(self):
        if self.board_linux:
            return self._start_board_linux()
        if self.config is not None:         # before the boot: not a minute later
            refuse_stdio(load_vms_config(self.config), self.vms)
        assets = guest_assets()
        initrd = self.initrd or build_initramfs(assets)
        dtbs = [build_dtb(initrd_size=initrd.stat().st_size, bootargs=self.bootargs, vm_id=vm)
                for vm in range(self.vms)]
        self.machine = EmulatedMachine(build_stub(), assets.kernel, dtb=dtbs, initrd=initrd,
                                       vms=self.vms, model_wait_ms=MODEL_WAIT_MS,
                                       on_log=self.on_log, qemu_args=self.qemu_args)
        try:
            self.machine.start()
            self._start_daemon()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_board_linux(self):
        """Board mode: the board Linux on CPU0 (its console ``board_console_path``), the
        guest as VM 1 on CPU1, which waits up to board_linux.MODEL_WAIT_MS for a model in the
        board Linux to attach; no daemon in this process."""
        assets = guest_assets()
        board_initrd = board_linux.build_board_initramfs(assets, self.board_files,
                                                         userland=self.board_userland)
        initrd = self.initrd or build_initramfs(assets)
        dtbs = [board_linux.build_board_dtb(initrd_size=board_initrd.stat().st_size),
                build_dtb(initrd_size=initrd.stat().st_size, bootargs=self.bootargs,
                          vm_id=board_linux.GUEST_VM)]
        # Named like the machine's workdir, so the next start removes it after a SIGKILL.
        self._board_console_dir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-board-")
        workdir = Path(self._board_console_dir)
        self.board_console_path = workdir / "board-console.sock"
        self.console_paths = [workdir / "guest-console.sock"]
        self.console_path = self.console_paths[0]
        try:
            self.machine = EmulatedMachine(
                build_stub(), assets.kernel, dtb=dtbs, initrd=[board_initrd, initrd], vms=2,
                model_wait_ms=board_linux.MODEL_WAIT_MS, board_params=board_linux.board_params(),
                on_log=self.on_log,
                qemu_args=[*board_linux.console_args(self.board_console_path, self.console_path),
                           *self.qemu_args])
            self.machine.start()
            self._board_sock = _connect_unix(self.board_console_path, 30)
            self._guest_sock = _connect_unix(self.console_path, 30)
            self._sockets += [self._board_sock, self._guest_sock]
        except BaseException:
            self.stop()
            raise
        return self

    def board_shell(self, timeout=120):
        """The board Linux's shell on its console (hvc0 of the board), once it is ready."""
        shell = GuestShell(self._board_sock, gone=self.gone)
        shell.wait_ready(timeout, marker=board_linux.BOARD_READY_MARKER)
        return shell

    def _start_daemon(self):
        workdir = Path(self.machine.workdir)
        self.console_paths = [workdir / ("console.sock" if vm == 0 else f"console{vm}.sock")
                              for vm in range(self.vms)]
        self.console_path = self.console_paths[0]
        if self.daemon_process:
            self.state_path = workdir / "state"
            self.start_daemon()
            return
        self.daemon = Daemon(_board(self.machine.ram_path), self._vms_config(workdir),
                             doorbell=self.machine.uart.doorbell, wait=self.wait,
                             trace=self.trace, control_path=self.control_path)
        self._thread = self.daemon.start_thread()

    @property
    def control_path(self):
        """The daemon's control socket (``avatar-hw info --control``), in either mode: the
        one given, else control.sock in the machine's workdir."""
        return self._control or str(Path(self.machine.workdir) / "control.sock")

    def daemon_alive(self):
        """Is the daemon still there (its thread, or with ``daemon_process`` its process)?"""
        if self.daemon_process:
            return self.process is not None and self.process.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def start_daemon(self, timeout=60):
        """``daemon_process``: start the daemon's process (again: it restores the devices
        from ``state_path``) and wait until it serves (its READY=1, as under systemd)."""
        self._check_daemon_process("start_daemon")
        if self.process is not None and self.process.poll() is None:
            raise AvatarError(f"the daemon (PID {self.process.pid}) is still running")
        workdir = Path(self.machine.workdir)
        notify_path = workdir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        uart = self.machine.uart
        spec = {"ram": self.machine.ram_path, "workdir": str(workdir), "config": self.config and
                str(self.config), "devices": self.devices, "vms": self.vms,
                "console_paths": [str(p) for p in self.console_paths],
                "control": self.control_path, "state": str(self.state_path),
                "wait": self.wait, "trace": self.trace,
                "doorbell_fd": uart.doorbell.fileno(), "uart_fd": uart.sock.fileno()}
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path),
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify, \
                open(workdir / "daemon.log", "ab") as log_file:
            notify.bind(str(notify_path))
            self.process = start_tied(
                [sys.executable, "-m", "avatar_hw.emulated.session", json.dumps(spec)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                pass_fds=(spec["doorbell_fd"], spec["uart_fd"]), env=env)
            deadline = time.monotonic() + timeout
            while True:
                notify.settimeout(0.5)
                try:
                    if b"READY=1" in notify.recv(4096):
                        return self.process.pid
                except socket.timeout:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = (workdir / "daemon.log").read_text(errors="replace")[-1500:]
                    raise AvatarError(f"the daemon process did not start serving "
                                      f"(status {self.process.poll()}): {tail}")

    def kill_daemon(self):
        """``daemon_process``: SIGKILL the daemon's process (a crash: nothing is detached,
        nothing flushed) and reap it."""
        self._check_daemon_process("kill_daemon")
        if self.process is None:
            raise AvatarError("kill_daemon(): no daemon process to kill (start_daemon() "
                              "starts one)")
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def _check_daemon_process(self, method):
        """``method`` works on the daemon's own process, of a running board."""
        if self.board_linux:
            raise AvatarError(f"{method}(): in board mode the daemon runs in the board Linux "
                              "(systemctl there, through board_shell(), restarts it)")
        if not self.daemon_process:
            raise AvatarError(f"{method}(): the daemon runs in a thread of this process; "
                              "EmulatedBoard(daemon_process=True) runs it in its own")
        if self.machine is None or self.machine.workdir is None:
            raise AvatarError(f"{method}(): the board is not running (start() starts it)")

    def alive(self):
        """Is the guest still there (QEMU running)?"""
        return self.gone() is None

    def gone(self, vm=None):
        """None while the guest ``vm`` runs (None: while QEMU does), else a ``Gone``: why
        (``reason``, a line to show) and whether that is a power-off (QEMU's exit status 0:
        the last VM powered off; or the stub said VM ``vm`` did, the others running on) or
        not (QEMU died: a signal, an error)."""
        status = None if self.machine is None else self.machine.process.poll()
        if status is None:
            if self.machine is None:
                return Gone("the board is not running", False)
            uart = self.machine.uart
            if vm is not None and uart is not None and vm in uart.powered_off:
                return Gone(f"the guest (VM {vm}) powered off; QEMU runs the other VMs on",
                            True)
            return None
        if status == 0:
            return Gone(f"the {'board' if vm is None and self.board_linux else 'guest'} "
                        "powered off", True)
        how = f"signal {-status}" if status < 0 else f"exit status {status}"
        return Gone(f"QEMU died ({how})", False)

    def shell(self, timeout=60, vm=None, wait_ready=True):
        """Connect to VM ``vm``'s console (default: VM 0, in board mode the guest's, VM 1)
        and wait for its shell (``wait_ready=False``: for the prompt of a shell already
        there, after ``start_daemon``); ``stop()`` closes it."""
        deadline = time.monotonic() + timeout
        vm = self._check_vm(vm)
        if self.board_linux:     # the guest's console through the board (hvc1), connected at start
            sock, self._guest_sock = self._guest_sock, None
            if sock is None:
                raise AvatarError("board mode: the guest's console is already taken by a shell")
        else:
            sock = _connect_unix(self.console_paths[vm], timeout)
            self._sockets.append(sock)
        shell = GuestShell(sock, gone=lambda: self.gone(vm))
        if wait_ready:
            shell.wait_ready(max(1, deadline - time.monotonic()))
        return shell

    def _check_vm(self, vm):
        """``vm`` (None: the default one) if the board runs that guest, else one line."""
        guests = [board_linux.GUEST_VM] if self.board_linux else list(range(self.vms))
        if vm is None:
            return guests[0]
        if not isinstance(vm, int) or isinstance(vm, bool) or vm not in guests:
            runs = (f"board mode runs one guest, VM {guests[0]} (VM 0 is the board Linux: "
                    "board_shell())" if self.board_linux else
                    f"the board runs VMs 0..{self.vms - 1} (vms={self.vms})")
            raise AvatarError(f"vm={vm!r}: {runs}")
        return vm

    def _stop(self):
        if self.daemon is not None:
            self.daemon.stop()
            if self._thread is not None:
                self._thread.join(10)
            else:
                self.daemon.close()
            self.daemon = self._thread = None
        if self.machine is not None:
            self.machine.stop()
        if self.board_linux and getattr(self, "_board_console_dir", None):
            shutil.rmtree(self._board_console_dir, ignore_errors=True)
            self._board_console_dir = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def _vms_config(self, workdir):
        return vms_config(self.config, self.devices, self.vms, self.console_paths, workdir)

    def stop(self):
        if self.process is not None:
            end_process(self.process, 10)
            self.process = None
        self._stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _board(ram_path):
    """The emulated board file with this run's RAM file."""
    board = load_board(board_path("emulated"))
    return dataclasses.replace(board, trap=dataclasses.replace(board.trap, file=ram_path),
                               ram=dataclasses.replace(board.ram, file=ram_path))


def load_vms_config(path, base=None):
    """The VMs config at ``path`` within the emulated board file's bounds (its layout has
    windows for VMs the board has no CPU for: ``left_out``)."""
    layout = load_board(board_path("emulated")).layout
    return load_config(path, max_vms=layout.max_vms, devices_per_vm=layout.devices_per_vm,
                       base=base)


def left_out(vms):
    """What to say of the config's VMs ``vms`` that the board does not boot."""
    def names(ids):
        return ", ".join(f"vm.{n}" for n in ids) + " left out"
    bootable, never = [n for n in vms if n < MAX_VMS], [n for n in vms if n >= MAX_VMS]
    said = []
    if bootable:
        said.append(f"{names(bootable)} (--vms {max(bootable) + 1} boots "
                    f"{'it' if len(bootable) == 1 else 'them'})")
    if never:
        said.append(f"{names(never)}: VMs above {MAX_VMS - 1} cannot run on the emulated "
                    f"board (one per CPU, {MAX_VMS} at most)")
    return "; ".join(said)


def vms_config(path, devices, vms, console_paths, workdir):
    """The VMs config (``path``, or one made of ``devices``, a TOML string per VM) with the
    launcher's console endpoint (``console_paths``) added to each VM's console."""
    if path is None:
        path = workdir / "vms.toml"
        path.write_text("".join(
            f'[vm.{vm}]\nconsole = {{ endpoints = ["unix:vm{vm}-console.sock"] }}\n{devices}\n'
            for vm, devices in enumerate(devices)))
    config = load_vms_config(path, base=workdir)
    others = sorted(set(config.vms) - set(range(vms)))
    if others:
        runs = "one guest, VM 0" if vms == 1 else f"{vms} guests, VMs 0..{vms - 1}"
        log.warning("%s: the emulated board runs %s: %s", path, runs, left_out(others))
        for vm_id in others:
            del config.vms[vm_id]
    refuse_stdio(config)
    for vm, console_path in enumerate(console_paths):
        if vm not in config.vms:
            continue
        vm_devices = config.vms[vm].devices
        mine = f"unix:{console_path}"
        consoles = [d for d in vm_devices if d.kind == "console"]
        if consoles:
            endpoints = consoles[0].options["endpoints"]
            endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
            consoles[0].options["endpoints"] = [*endpoints, mine]
        else:
            vm_devices.insert(0, DeviceConfig("console", f"vm.{vm}.console", {
                "endpoints": [f"unix:{workdir / f'vm{vm}-console.sock'}", mine]}))
    return config


def refuse_stdio(config, vms=None):
    """A ``ConfigError`` for a console endpoint ``stdio`` of the config's VMs (those below
    ``vms``): the daemon runs in the launcher's process, whose terminal the demo already puts
    on the console: the guest's output came twice, the typing was read twice, and
    ``--run``'s marker lines reached stdout (``daemon_process``: its daemon.log and
    /dev/null, no better)."""
    for vm_id in sorted(n for n in config.vms if vms is None or n < vms):
        for device in config.vms[vm_id].devices:
            if device.kind != "console":
                continue
            ports = device.options.get("ports") or {}
            for key, urls in (("endpoints", device.options["endpoints"]),
                              *((f"ports.{name}", urls) for name, urls in ports.items())):
                if "stdio" in ([urls] if isinstance(urls, str) else urls):
                    raise ConfigError(config.path, f"{device.key}.{key}",
                                      "'stdio' is the demo's own terminal on the emulated "
                                      "board; use pty:PATH or unix:PATH")


def _serve(spec):
    """The daemon's process (``EmulatedBoard(daemon_process=True)``): ``spec`` as the
    launcher wrote it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    uart = socket.socket(fileno=spec["uart_fd"])
    workdir = Path(spec["workdir"])
    config = vms_config(spec["config"] and Path(spec["config"]), spec["devices"], spec["vms"],
                        [Path(p) for p in spec["console_paths"]], workdir)
    daemon = Daemon(_board(spec["ram"]), config, wait=spec["wait"],
                    doorbell=StubDoorbell(lambda: ring_uart(uart), fd=spec["doorbell_fd"]),
                    trace=spec["trace"], control_path=spec["control"], state=spec["state"])
    daemon.run()


if __name__ == "__main__":
    try:
        _serve(json.loads(sys.argv[1]))
    except AvatarError as err:
        sys.exit(f"avatar-hw daemon: {err}")
