"""The board a HIL test runs against: a real board with a running daemon, or the emulated board.

Both offer the same things, so one bring-up suite runs on either:

- ``info()``: the daemon's ``avatar-hw info`` (over its control socket);
- ``devices(vm)``: that VM's devices (name, slot, IRQ, status, counters);
- ``console(vm, port)``: a ``GuestConsole`` on the guest console;
- ``vsock(port, vm)``: a stream socket to a guest port through the VM's vsock device;
- ``diagnose_interrupts(vm)``: text for a failure report: per device the
  interrupts the daemon raised and, where the distributor can be read, the GIC's
  view of its SPI (``hw.gic`` ``diagnose_spi``);
- ``balloon(vm, size)``: the guest memory VM ``vm`` keeps (virtio-balloon);
- ``reset(vm)``: the guest starts again from power-on; returns the VMs that did
  (the emulated board restarts QEMU and the daemon: all of them; a bench runs
  its ``reset_command``, the hypervisor's VM restart, with ``{vm}`` replaced);
- ``properties()``: board, target kind, guest kernel (when known), avatar-hw's
  version and commit, for test reports.
- ``board_run(command)``: ``(output, status)`` of a shell command in the board's
  Linux, where ``avatar-hw serve`` runs (a real board: here; the emulated board in
  board mode: its board Linux's shell; host mode has none);
- ``guest_vm``: the VM of ``guest_console`` (0; the emulated board in board mode: 1).

``HardwareTarget`` runs next to ``avatar-hw serve`` on the board's Linux (the
control socket and the GIC distributor are local there); its guest console is
any pyserial URL, or the first endpoint of the VM's console that a terminal
can attach to. ``EmulatedTarget`` boots the emulated board
(``avatar_hw.emulated.session.EmulatedBoard``) with a console, and block, rng
and vsock (guest CID 3) devices when this tree has them; ``board_linux=True``:
in board mode, the daemon in the board Linux serving VM 1 its console, block, rng
and net (the board's own VMs config), its control socket reached through the
board Linux's shell (a Python client there: seconds per request under TCG).
"""

import base64
import functools
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from .. import control
from ..board import load_board
from ..errors import AvatarError
from ..shipped import board_path
from . import vsock
from .console import GuestConsole, pyserial_url

EMULATED_TOOLS = {"qemu-system-aarch64": "qemu-system-arm", "dtc": "device-tree-compiler",
                  "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}
EMULATED_DISK_SIZE = 8 << 20


class Target:
    """What tests use; subclasses say where the daemon and the consoles are."""

    kind = None
    board = None            # the avatar_hw.board.Board
    control_path = None
    control_option = "--control"      # what the user calls control_path, for error messages
    last_console = None     # the console tests use (its output goes into failure reports)

    guest_vm = 0            # the VM of guest_console

    def _request(self, command, **arguments):
        """``command`` on the daemon's control socket; its result."""
        return control.request(command, self.control_path, option=self.control_option,
                               **arguments)

    def info(self):
        return self._request("info")

    def screenshot(self, vm=0, device="gpu"):
        """PNG bytes of VM ``vm``'s screen (its gpu's scanout)."""
        return base64.b64decode(self._request("screenshot", vm=vm, device=device)["png"])

    def board_run(self, command, timeout=60):
        """``(output, status)`` of shell ``command`` in the board's Linux."""
        raise AvatarError(f"this target ({self.kind}) has no board Linux to run {command!r} in")

    def vm_info(self, vm=0):
        for entry in self.info()["vms"]:
            if entry["vm"] == vm:
                return entry
        raise AvatarError(f"the daemon serves no VM {vm} (check its VMs config)")

    def devices(self, vm=0, name=None):
        return [d for d in self.vm_info(vm)["devices"] if name is None or d["name"] == name]

    def balloon(self, vm=0, size=None):
        """VM ``vm`` keeps ``size`` of its RAM (bytes, or text such as ``"384M"``; its balloon
        takes the rest), as ``avatar-hw balloon``; returns the balloon's state (None: only
        that)."""
        from ..sizes import parse_size
        arguments = {} if size is None else {"size": parse_size(size)}
        return self._request("balloon", vm=vm, **arguments)

    def console_url(self, vm=0, port=0):
        """The pyserial URL of VM ``vm``'s console port ``port`` (from the daemon's endpoints)."""
        return console_url_from_info(self.info(), vm, port)

    def console(self, vm=0, port=0):
        url = self.console_url(vm, port)
        return GuestConsole.open(url)

    def vsock(self, port, vm=0, timeout=30):
        """A connected stream socket to guest ``port`` through VM ``vm``'s vsock device
        (``avatar_hw.hil.vsock.connect``: retried until the guest listens or ``timeout``)."""
        devices = self.devices(vm, "vsock")
        if not devices:
            raise AvatarError(f"VM {vm} has no vsock device (add vsock = {{ cid = 3, socket = "
                              '"PATH" } to its VMs config)')
        return vsock.connect(devices[0]["socket"], port, timeout)

    def diagnose_interrupts(self, vm=0):
        lines = []
        for device in self.devices(vm):
            lines.append(f"vm{vm} {device['name']}{device['slot']} IRQ {device['irq']}: "
                         f"status {device['status']}, {device['interrupts']} interrupt(s) "
                         f"raised, InterruptStatus {device.get('interrupt_status', '?')}")
            lines.append("  " + self._spi_report(device["irq"]))
        return "\n".join(lines)

    def _spi_report(self, intid):
        return "(no distributor view on this target)"

    def reset(self, vm=0):
        raise AvatarError(f"this target cannot reset VM {vm}")

    faults_armed = False

    def inject(self, vm=0, device=None, fault=None, **options):
        """Arm ``fault`` (avatar_hw.faults: ``ioerr``, ``torn``, ``irq-drop``, ...) with its
        ``options`` on VM ``vm``'s ``device``; the pytest plugin clears it at the test's end.
        ``fault="pause", seconds=S``: the daemon serves no trap for S seconds."""
        self.faults_armed = True
        if fault == "pause":
            return self._request("pause", **options)
        return self._request("inject", vm=vm, device=device, fault=fault, options=options)

    def clear_faults(self):
        """Disarm every injected fault; how many there were."""
        self.faults_armed = False
        return self._request("clear")["cleared"]

    kernel = None               # the guest kernel's release, once known

    def properties(self):
        props = {"avatar_board": self.board.name, "avatar_target": self.kind,
                 "avatar_hw_version": version(), "avatar_hw_commit": source_commit()}
        if self.kernel:
            props["avatar_kernel"] = self.kernel
        return {k: v for k, v in props.items() if v}

    def close(self):
        pass


def version():
    from ..cli import version as cli_version
    return cli_version()


@functools.lru_cache(maxsize=1)
def source_commit():
    """The git commit avatar-hw runs from (a checkout), else None."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def console_url_from_info(info, vm, port):
    """The pyserial URL for a console port, from ``avatar-hw info`` output (``AvatarError``
    naming the VM, the port and the endpoints when there is none a terminal can use)."""
    vms = {entry["vm"]: entry for entry in info["vms"]}
    if vm not in vms:
        raise AvatarError(f"the daemon serves no VM {vm}; it serves "
                          f"{', '.join(f'vm{v}' for v in vms) or 'none'}")
    consoles = [d for d in vms[vm]["devices"] if d["name"] == "console"]
    if not consoles:
        raise AvatarError(f"VM {vm} has no console device (add console = {{ endpoints = [...] }} "
                          "to its VMs config)")
    ports = consoles[0]["ports"]
    chosen = [p for p in ports if str(port) in (str(p["id"]), str(p["name"]))]
    if not chosen:
        raise AvatarError(f"VM {vm}'s console has no port {port!r}; it has "
                          + ", ".join(f"{p['id']} ({p['name'] or 'console'})" for p in ports))
    endpoints = chosen[0]["endpoints"]
    for endpoint in endpoints:
        url = pyserial_url(endpoint)
        if url:
            return url
    raise AvatarError(f"VM {vm} console port {port} has no endpoint a terminal can attach to "
                      f"({', '.join(endpoints) or 'none'}): add a pty:, unix:, tcp: or "
                      "rfc2217: endpoint to its console in the VMs config")


class HardwareTarget(Target):
    """A real board: ``board_file``, the daemon's ``control_path``, optionally ``console_url``
    (any pyserial URL; default: the daemon's endpoint for VM 0's console)."""

    kind = "hw"
    control_option = "--avatar-control"

    def __init__(self, board_file, *, console_url=None, control_path=None, reset_command=None):
        self.board = load_board(board_path(board_file))
        self.control_path = control_path or control.default_control_path()
        self.reset_command = reset_command
        self._console_url = console_url
        self._gic = None

    def reset(self, vm=0):
        if not self.reset_command:
            raise AvatarError(f"no way to reset VM {vm} on this bench: give "
                              "--avatar-reset-command 'CMD' (the hypervisor's VM restart; "
                              "{vm} is replaced by the VM number)")
        command = self.reset_command.replace("{vm}", str(vm))
        done = subprocess.run(command, shell=True, capture_output=True, text=True)
        if done.returncode != 0:
            raise AvatarError(f"--avatar-reset-command {command!r} exited {done.returncode}: "
                              f"{(done.stderr or done.stdout).strip()[-300:]}")
        return [vm]

    def _given_url(self, vm, port):
        """``--avatar-console``'s URL if it is VM ``vm``'s port ``port``, else None."""
        return self._console_url if (vm, port) == (0, 0) else None

    def console_url(self, vm=0, port=0):
        return self._given_url(vm, port) or super().console_url(vm, port)

    def console(self, vm=0, port=0):
        try:
            return super().console(vm, port)
        except AvatarError as err:
            if self._given_url(vm, port) is None:
                raise
            raise AvatarError(f"--avatar-console {self._console_url}: {err} (give the guest "
                              "console's URL, or leave the option out to use the daemon's "
                              "endpoint)") from None

    def board_run(self, command, timeout=60):
        """Here: a HardwareTarget runs in the board's Linux, next to ``avatar-hw serve``."""
        try:
            done = subprocess.run(command, shell=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace",
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AvatarError(f"board Linux: {command!r} did not end within {timeout} s") from None
        return done.stdout, done.returncode

    def _spi_report(self, intid):
        """The board SPI of guest INTID ``intid``, compared with the board file's settings."""
        try:
            if self._gic is None:
                self._gic = self.board.interrupt_line()
            return self._gic.diagnose_spi(intid).explain()
        except (AvatarError, OSError, ValueError) as err:
            return f"GIC distributor not readable here ({err})"

    def close(self):
        if self._gic is not None:
            self._gic.regs.close()
            self._gic = None


def emulated_board_missing():
    """Why the emulated board cannot run here (None: it can)."""
    if importlib.util.find_spec("avatar_hw.emulated.session") is None:
        return "avatar_hw.emulated.session (the emulated board launcher) is not in this tree"
    missing = [package for tool, package in EMULATED_TOOLS.items() if not shutil.which(tool)]
    if missing:
        return f"the emulated board needs {', '.join(missing)} (apt-get install, or scripts/setup)"
    return None


def device_available(kind):
    """Is avatar_hw.devices.<kind> in this tree?"""
    return importlib.util.find_spec(f"avatar_hw.devices.{kind}") is not None


# Board mode: the daemon's control socket is in the board Linux; a request goes through its
# shell to this client there (one line: the request as JSON in argv[1]).
BOARD_CONTROL_CLIENT = ("import json, sys; from avatar_hw import control; "
                        "print(json.dumps(control.request(**json.loads(sys.argv[1]))))")
BOARD_TIMEOUT = 300         # board mode: the board Linux's shell, its daemon, the guest's shell


class EmulatedTarget(Target):
    """The emulated board with a console, and block (a scratch image), rng and gpu when this
    tree has those devices; or with ``board_linux``, board mode (module docstring).
    ``start()`` boots it; ``close()`` leaves nothing behind."""

    kind = "emulated"

    def __init__(self, board_linux=False):
        self.board_linux = board_linux
        self.emulated = None
        self._workdir = None
        self.board_shell = None         # board mode: the board Linux's shell (a GuestShell)
        self.guest_banner = None        # board mode: what the guest's init printed at boot

    def start(self):
        from ..emulated.assets import guest_assets
        self.kernel = guest_assets().release
        if self.board_linux:
            return self._start_board_linux()
        from ..emulated.session import EmulatedBoard
        self._workdir = tempfile.mkdtemp(prefix="avatar-hil-")
        devices = []
        if device_available("block"):
            image = os.path.join(self._workdir, "disk.img")
            with open(image, "wb") as f:
                f.truncate(EMULATED_DISK_SIZE)
            devices.append(f'block = {{ image = "{image}" }}')
        if device_available("rng"):
            devices.append("rng = {}")
        if device_available("balloon"):
            devices.append("balloon = {}")
        if device_available("vsock"):
            devices.append(f'vsock = {{ cid = 3, socket = "{self._workdir}/vsock" }}')
        if device_available("gpu"):
            devices.append("gpu = {}")
        self.emulated = EmulatedBoard(devices="\n".join(devices))
        try:
            self.emulated.start()
        except BaseException:
            self.close()
            raise
        self.board = self.emulated.daemon.board
        self.control_path = self.emulated.daemon.control.path
        return self

    def _start_board_linux(self):
        """Board mode: boot, wait for the board Linux's shell, its daemon serving and the
        guest's shell, then leave the guest's console (QEMU serves one client) to
        ``console()``."""
        from ..emulated import board_linux
        from ..emulated.session import EmulatedBoard
        self.emulated = EmulatedBoard(board_linux=True)
        try:
            self.emulated.start()
            self.board_shell = self.emulated.board_shell(BOARD_TIMEOUT)
            board_linux.wait_serving(self.board_shell, BOARD_TIMEOUT)
            guest = self.emulated.shell(BOARD_TIMEOUT)
            self.guest_banner = guest.banner
            guest.close()
        except BaseException:
            self.close()
            raise
        self.board = board_linux.board_file()
        self.guest_vm = board_linux.GUEST_VM
        return self

    def board_run(self, command, timeout=60):
        if self.board_shell is None:
            return super().board_run(command, timeout)
        return self.board_shell.run(f"({command})", timeout)   # a subshell: `exit` ends it

    def _request(self, command, **arguments):
        if self.board_shell is None:
            return super()._request(command, **arguments)
        request = json.dumps({"command": command, **arguments})
        output, status = self.board_run(
            f"python3 -c {shlex.quote(BOARD_CONTROL_CLIENT)} {shlex.quote(request)} 2>&1",
            timeout=120)
        lines = output.strip().splitlines() or ["no output"]
        if status != 0:
            raise AvatarError(f"board Linux: {lines[-1].removeprefix('avatar_hw.errors.')}")
        return json.loads(lines[-1])

    def console_url(self, vm=0, port=0):
        if self.board_shell is not None and vm == self.guest_vm and str(port) == "0":
            return f"unix://{self.emulated.console_path}"     # hvc1, bridged in the board
        return super().console_url(vm, port)

    def reset(self, vm=0):
        """Power the emulated board off and on (QEMU and the daemon; the disk is kept; in
        board mode the board Linux's disk is a fresh one)."""
        if self.board_linux:
            self.close()
            self.start()
            return [self.guest_vm]
        self.emulated.stop()
        self.emulated.start()
        self.control_path = self.emulated.daemon.control.path
        return list(self.emulated.daemon.config.vms)

    def _spi_report(self, intid):
        if self.board_linux:
            return ("(emulated board, board mode: the daemon in the board Linux raises the "
                    "board SPI through its UIO-mapped distributor; not read from here)")
        return ("(emulated board: the stub injects the SPI through the GIC's list registers; "
                "QEMU's distributor is not mapped here)")

    def close(self):
        if self.board_shell is not None:
            self.board_shell.close()
            self.board_shell = None
        if self.emulated is not None:
            self.emulated.stop()
            self.emulated = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
