"""``avatar-hw serve``: the device model daemon.

It loads the board file and the VMs config, maps the trap page and each VM's
RAM (``Board.open_region``: UIO maps on a board, file windows on the emulated
board), builds the ``Subsystem`` and the configured devices, attaches to the
trap page and serves traps in one ``EventLoop`` over the doorbell, every
backend fd and the control socket. Under systemd (``Type=notify``,
boards/linux/avatar-hw.service) it sends READY=1 once serving and STOPPING=1
when it stops. SIGINT/SIGTERM: stop reading the doorbell, detach (DETACHED),
close, exit 0. Console output still in flight at exit was never acknowledged
to the guest (a transmit buffer is returned only once its bytes are in every
attached endpoint's fd), so there is nothing to flush: exiting, like dying,
loses nothing acknowledged.

Python API (the emulated board launcher and tests)::

    daemon = Daemon(board, config, doorbell=..., interrupt_line=...)
    daemon.open()             # map, build, attach; errors are AvatarError
    daemon.run()              # until stop() (any thread) or a signal (main thread)
    # or: thread = daemon.start_thread()  ...  daemon.stop(); thread.join()

Seams, chosen by the board or handed in:

- the doorbell (``avatar_hw.doorbell``): ``doorbell=`` an object, or a spec
  string ``"uio"`` (the trap page's UIO interrupt; the default for a UIO trap
  region) or ``"fifo:PATH[,STUB_PATH]"``; with ``busy_poll=True`` none is used;
- the interrupt line (``raise_spi(intid)``): ``interrupt_line=`` an object or a
  callable ``(trap_region) -> line``; else ``INTERRUPT_LINES[board.interrupts]``
  is called as ``factory(daemon)`` (``"gic"``: the board's distributor through
  ``Board.interrupt_line``, which raises each guest INTID's board SPI and is
  configured once the devices exist; ``"stub"``: ``virq_pending`` requests
  plus the doorbell's ``ring_stub``).

``--user``: everything that needs root or the checkout is done first (devices
mapped and built, the trap page's lock taken, the doorbell and control socket
open, every module imported), then the privileges are dropped.
"""

import gc
import logging
import os
import pwd
import signal
import socket
import threading
import time
from pathlib import Path

from . import abi
from .board import Board, BoardInterruptLine, board_path, load_board
from .config import Config, load_config
from .control import ControlServer, default_control_path
from .doorbell import FifoDoorbell, UioDoorbell
from .errors import AvatarError
from .hw.uio import find_uio
from .layout import address
from .loop import EventLoop
from .trap import TrapPage
from .virtio import constants as vc
from .virtio.memory import GuestMemory
from .virtio.subsystem import Subsystem

log = logging.getLogger(__name__)
trace_log = logging.getLogger("avatar_hw.trace")

REGISTER_NAMES = {value: "".join(part.capitalize() for part in name[4:].split("_"))
                  for name, value in vars(vc).items()
                  if name.startswith("REG_") and name != "REG_CONFIG"}


def _gic_line(daemon):
    return daemon.board.interrupt_line(**daemon.roots)


def _stub_line(daemon):
    from .emulated.machine import StubInterruptLine
    ring = getattr(daemon.doorbell, "ring_stub", None)
    if ring is None:
        raise AvatarError(f"{daemon.board.path}: interrupts.kind = \"stub\" needs a doorbell "
                          "towards the stub (the emulated board's, or --doorbell "
                          "fifo:PATH,STUB_PATH)")
    return StubInterruptLine(daemon.trap_region, ring)


INTERRUPT_LINES = {"gic": _gic_line, "stub": _stub_line}


class Daemon:
    """One device model serving every configured VM of one board.

    ``board`` and ``config`` are objects or paths. ``sysfs_root``/``dev_root``
    point UIO discovery at another tree (tests). ``user``: drop root to this
    user after everything is mapped and opened.
    """

    def __init__(self, board, config, *, doorbell=None, interrupt_line=None, busy_poll=False,
                 trace=False, control_path=None, user=None, wait_stub=10.0,
                 sysfs_root="/sys", dev_root="/dev"):
        self.board = board if isinstance(board, Board) else load_board(board_path(board))
        self.config = config if isinstance(config, Config) else load_config(
            config, max_vms=self.board.layout.max_vms,
            devices_per_vm=self.board.layout.devices_per_vm)
        self.roots = {"sysfs_root": sysfs_root, "dev_root": dev_root}
        self.doorbell = doorbell
        self._interrupt_line = interrupt_line
        self.busy_poll = busy_poll
        self.trace = trace
        self.control_path = control_path
        self.user = user
        self.wait_stub = wait_stub
        self.loop = EventLoop()
        self.regions = []
        self.trap_region = self.trap = self.subsystem = self.control = None
        self.started = None
        self._running = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._old_signals = {}
        self._signal = None
        self._closed = False
        self._own_doorbell = False

    # -- building -----------------------------------------------------------------------------

    def _open_region(self, spec, vm=None):
        region = self.board.open_region(spec, vm, **self.roots)
        self.regions.append(region)
        return region

    def open(self):
        """Map and build everything, then attach to the trap page."""
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self):
        board = self.board
        log.debug("board file %s, VMs config %s", board.path, self.config.path)
        self.trap_region = self._open_region(board.trap)
        self.trap = TrapPage(self.trap_region, board.layout,
                             trace=self._trace if self.trace else None,
                             lock=self._trap_lock_path())
        self._own_doorbell = self.doorbell is None or isinstance(self.doorbell, str)
        self.doorbell = self._make_doorbell()
        line = self._interrupt_line
        if line is None:
            line = INTERRUPT_LINES[board.interrupts](self)
        elif callable(line) and not hasattr(line, "raise_spi"):
            line = line(self.trap_region)
        self.subsystem = Subsystem(board.layout, irq_line=line, loop=self.loop)
        for vm_id, vm in self.config.vms.items():
            ram = self._open_region(board.ram, vm_id)
            self.subsystem.vm_init(vm_id, GuestMemory(ram, board.ram_guest_base, vm_id=vm_id))
            for device in vm.devices:
                self.subsystem.create_device(vm_id, self.config.build_device(device))
        self._configure_board_spis(line)
        self.control = ControlServer(self.control_path or default_control_path(), self)
        self.control.attach(self.loop)
        self.trap.take_lock()               # before the drop: --user need not open the node
        if self.user:
            drop_privileges(self.user, [self.control.path])
        self.trap.wait_ready(self.wait_stub)
        self.trap.attach(wanted=self._wanted_features(), busy_poll=self.busy_poll)
        if self.doorbell is not None and not self.busy_poll:
            self.loop.add_reader(self.doorbell, self._on_doorbell)
        self.loop.add_reader(self._wake_r, self._on_wake)
        self.started = time.time()
        self._service()                                      # whatever was posted before

    def _configure_board_spis(self, line):
        """Enable, make edge-triggered, prioritise and target the devices' board SPIs."""
        if not isinstance(line, BoardInterruptLine):
            return                               # the stub's line, or one handed in
        if not line.configurable:
            log.info("board SPIs go through a GICv2m frame: the distributor's owner "
                     "configures them")
            return
        configured = line.configure(sorted(entry["irq"]
                                           for entry in self.subsystem.device_info()))
        for intid, settings in configured.items():
            log.info("board SPI %d: %s", intid, ", ".join(settings.phrases().values()))

    def _trap_lock_path(self):
        """The trap page's file or UIO device node (the serving model flocks it)."""
        spec = self.board.trap
        if spec.uio is None:
            return spec.name_for()
        return find_uio(spec.name_for(), **self.roots).dev_path

    def _wanted_features(self):
        """Virtual-interrupt requests only where the board's interrupts go through the stub."""
        if self.board.interrupts != "stub":
            return abi.SUPPORTED_FEATURES & ~abi.F_VIRQ_REQUEST
        if not self.trap.header.stub_features & abi.F_VIRQ_REQUEST:
            raise abi.AbiMismatch(
                f"{self.board.path}: interrupts.kind = \"stub\" but the stub does not offer "
                "AVT_F_VIRQ_REQUEST: use a board file with the GIC ([gic]) for this hypervisor")
        return abi.SUPPORTED_FEATURES

    def _make_doorbell(self):
        spec = self.doorbell
        if spec is None and self.busy_poll:
            return None
        if spec is not None and not isinstance(spec, str):
            return spec                                  # handed in (the emulated board's)
        spec = spec or "uio"
        if spec == "uio":
            if self.board.trap.uio is None:
                raise AvatarError(
                    f"{self.board.path}: the trap page is a file, so there is no UIO interrupt: "
                    "pass the board's doorbell (the emulated board launcher does), "
                    "--doorbell fifo:PATH, or --busy-poll")
            return UioDoorbell(find_uio(self.board.trap.name_for(), **self.roots))
        if spec.startswith("fifo:"):
            return FifoDoorbell.from_spec(spec)
        raise AvatarError(f"--doorbell {spec}: expected uio or fifo:PATH[,STUB_PATH]")

    # -- running -------------------------------------------------------------------------------

    def _on_doorbell(self):
        self.doorbell.ack()
        self._service()

    def _service(self):
        """Serve posted traps; with a backlog, again after the loop's other events."""
        if self.trap is None:
            return
        self.trap.service(self.subsystem.handle_mmio_trap)
        if self.trap.backlog:
            self.loop.call_later(0, self._service)

    def _on_wake(self):
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass
        if self._signal is not None:
            log.info("%s: stopping", signal.Signals(self._signal).name)
        self._running = False

    def run(self):
        """Serve until ``stop()`` or SIGINT/SIGTERM; then detach and close."""
        if self.trap is None:
            self.open()
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old_signals[signum] = signal.signal(signum, self._on_signal)
        self._running = True
        self._log_endpoints()
        sd_notify(f"READY=1\nSTATUS=serving {len(self.config.vms)} VM(s), control socket "
                  f"{self.control.path}\nMAINPID={os.getpid()}")
        try:
            if self.busy_poll:
                self._busy_poll()
            else:
                while self._running:
                    self.loop.run_once()
        finally:
            self.close()            # a second signal meanwhile only asks to stop again
            for signum, old in self._old_signals.items():
                signal.signal(signum, old)
            self._old_signals.clear()

    def _busy_poll(self):
        # Its own frame: the bound methods held here must be gone before close() unmaps
        # the regions their views point into.
        handler, service = self.subsystem.handle_mmio_trap, self.trap.service
        while self._running:
            self.loop.run_once(0)
            service(handler)

    def _log_endpoints(self):
        """Where to reach it: the control socket and every console port's endpoints."""
        log.info("serving %d VM(s) on board %s (%s); control socket %s", len(self.config.vms),
                 self.board.name, "busy-poll" if self.busy_poll else "doorbell",
                 self.control.path)
        for entry in self.subsystem.device_info():
            ports = self.subsystem.debug_device(entry["vm"], entry["slot"]).get("ports", ())
            for port in ports:
                log.info("vm%d console port %s: %s", entry["vm"], port["name"] or port["id"],
                         ", ".join(port["endpoints"]) or "no endpoint")

    def _on_signal(self, signum, frame):
        # Only the wake-up here: a handler may interrupt the main thread anywhere,
        # including inside a log call writing to the same stream.
        self._signal = signum
        self.stop()

    def stop(self):
        """Ask ``run`` to return (safe from any thread or a signal handler)."""
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def start_thread(self):
        """``open()`` here, then ``run()`` in a thread; returns the thread."""
        if self.trap is None:
            self.open()
        thread = threading.Thread(target=self.run, name="avatar-hw", daemon=True)
        thread.start()
        return thread

    def close(self):
        """Stop the doorbell, detach from the trap page, close devices, unmap (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.started is not None:
            sd_notify("STOPPING=1")
        if self.doorbell is not None and not self.busy_poll and self.trap is not None:
            self.loop.remove_reader(self.doorbell)      # nothing serves after DETACHED
        if self.trap is not None and self.trap.slots and self.subsystem is not None:
            if self.trap.header.model_pid == os.getpid():
                self.trap.detach(self.subsystem.handle_mmio_trap)
        if self.trap is not None:
            self.trap.release_lock()
        if self.subsystem is not None:
            self.subsystem.close()
        if self.control is not None:
            self.control.close()
        if self._own_doorbell and self.doorbell is not None:
            self.doorbell.close()
        self.trap = self.subsystem = self.control = None
        gc.collect()        # devices and transports refer to each other; free their RAM views
        for region in reversed(self.regions):
            try:
                region.close()
            except BufferError:
                log.warning("%s is still in use; it is unmapped when the process ends", region)
        self.regions.clear()
        self.loop.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- introspection and tracing ------------------------------------------------------------------

    def _trace(self, vm_id, vcpu, gpa, size, is_write, value, status, latency_ns):
        where = self.board.layout.locate(gpa)
        if where is None:
            device, register = "-", f"0x{gpa:x}"
        else:
            _, slot, offset = where
            try:
                device = f"{self.subsystem.device(vm_id, slot).name}{slot}"
            except ValueError:
                device = f"slot{slot}"
            register = (REGISTER_NAMES.get(offset) if offset < vc.REG_CONFIG
                        else f"Config+0x{offset - vc.REG_CONFIG:x}") or f"0x{offset:03x}"
        trace_log.info("vm%d cpu%d %-9s %s %-18s %d 0x%x%s %.1f us", vm_id, vcpu, device,
                       "W" if is_write else "R", register, size, value,
                       "" if status == abi.STATUS_OK else " UNHANDLED", latency_ns / 1000)

    def list_devices(self):
        """What ``avatar-hw list --json`` shows."""
        return [_addressed(entry) for entry in self.subsystem.list_all_devices()]

    def debug_device(self, vm_id, slot):
        """What ``avatar-hw debug --json`` shows."""
        return _addressed(self.subsystem.debug_device(vm_id, slot))

    def info(self):
        """What ``avatar-hw info --json`` shows."""
        vms = []
        for vm_id, memory in self.subsystem.vms.items():
            devices = [{**entry, **self.debug_device(vm_id, entry["slot"])}
                       for entry in self.subsystem.device_info() if entry["vm"] == vm_id]
            vms.append({"vm": vm_id, "ram": {"base": address(memory.base), "size": memory.size},
                        "window": [address(a) for a in self.board.layout.vm_window(vm_id)],
                        "devices": devices})
        return {"pid": os.getpid(), "board": self.board.name, "board_file": str(self.board.path),
                "config": str(self.config.path), "uptime": round(time.time() - self.started, 3),
                "mode": "busy-poll" if self.busy_poll else "doorbell",
                "trap": self.trap.info(), "vms": vms}


def sd_notify(state):
    """Tell systemd (``Type=notify`` units) ``state``: one datagram to $NOTIFY_SOCKET, as
    sd_notify(3) does; nothing without it. A failure is logged, never raised."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]                       # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), path)
    except OSError as err:
        log.warning("NOTIFY_SOCKET %s: %s", os.environ["NOTIFY_SOCKET"], err)
        return False
    return True


def _addressed(entry):
    """``entry`` with its window ``base`` in the one address format (``layout.address``)."""
    return {**entry, "base": address(int(entry["base"], 16))}


def drop_privileges(user, owned_paths=()):
    """Become ``user`` (with its groups); ``owned_paths`` are given to it first."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise AvatarError(f"--user {user}: no such user") from None
    if os.geteuid() != 0:
        if os.geteuid() == entry.pw_uid:
            return
        raise AvatarError(f"--user {user}: only root can change user (running as UID "
                          f"{os.geteuid()})")
    try:
        for path in owned_paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.initgroups(user, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as err:
        raise AvatarError(f"--user {user}: cannot become UID {entry.pw_uid}: {err}") from None
    log.info("running as %s (UID %d)", user, entry.pw_uid)


# -- the command ------------------------------------------------------------------------------------

def _serve(args):
    if args.trace:
        trace_log.setLevel(logging.INFO)
    daemon = Daemon(args.board, args.config, doorbell=args.doorbell, busy_poll=args.busy_poll,
                    trace=args.trace, control_path=args.control, user=args.user,
                    wait_stub=args.wait_stub, sysfs_root=args.sysfs_root, dev_root=args.dev_root)
    daemon.run()
    return 0


def add_parser(subparsers, parents=()):
    parser = subparsers.add_parser(
        "serve", parents=parents, help="run the device model daemon",
        description="Map the trap page and the guests' RAM, build the VMs' devices from the "
                    "config, attach to the trap page and serve traps until SIGINT/SIGTERM.")
    parser.add_argument("--board", required=True,
                        help="board file, or the name of a shipped board (e.g. rpi4)")
    parser.add_argument("--config", required=True, type=Path, help="VMs config (VMS.toml)")
    parser.add_argument("--trace", action="store_true", help="log every trap")
    parser.add_argument("--busy-poll", action="store_true",
                        help="spin on the trap slots instead of sleeping on the doorbell "
                             "(lowest latency; uses a whole core)")
    parser.add_argument("--user", help="drop root to this user after mapping the devices")
    parser.add_argument("--control", help="control socket path (default: "
                                          f"{default_control_path()})")
    parser.add_argument("--doorbell", help="uio (default), or fifo:PATH[,STUB_PATH]")
    parser.add_argument("--wait-stub", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for the stub to initialise the trap page")
    parser.add_argument("--sysfs-root", default="/sys",
                        help="where UIO devices are looked up (default /sys; tests use a tree)")
    parser.add_argument("--dev-root", default="/dev", help="where /dev/uioN nodes are")
    parser.set_defaults(func=_serve, verbosity=1)        # info by default: what it serves
