"""The device model daemon (``avatar-hw serve``, avatar_hw.commands.serve).

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

``state=PATH`` (``serve --state``): every device's state is kept in PATH as it
changes, and a daemon started with a PATH a previous one left (killed, or stopped)
restores the devices from it and carries on under the running guests
(``avatar_hw.state``).

Seams, chosen by the board or handed in:

- the doorbell (``avatar_hw.doorbell``): ``doorbell=`` an object, or a spec
  string ``"uio"`` (the trap page's UIO interrupt; the default for a UIO trap
  region) or ``"fifo:PATH[,STUB_PATH]"``; with ``wait="busy-poll"`` none is used;
- how it waits for traps (``avatar_hw.wait``): ``wait=`` "doorbell", "adaptive" or
  "busy-poll"; None: the board file's ``trap.wait``;
- the interrupt line (``avatar_hw.interrupts``, ``raise_intid(intid)``):
  ``interrupt_line=`` an object or a
  callable ``(trap_region) -> line``; else ``INTERRUPT_LINES[board.interrupts]``
  is called as ``factory(daemon)`` (``"gic"``: the board's distributor through
  ``Board.interrupt_line``, which raises each guest INTID's board SPI and is
  configured once the devices exist; ``"stub"``: ``virq_pending`` requests
  plus the doorbell's ``ring_stub``).

``--user``: everything that needs root or the checkout is done first (devices
mapped and built, the trap page's lock taken, the doorbell and control socket
open, every module imported), then the privileges are dropped, and each device checks
that the user can use what it was given (``check_access``: a 9p share only root can read).
"""

import logging
import os
import signal
import socket
import threading
import time

from . import abi
from .board import Board, load_board
from .config import Config, load_config
from .control import ControlServer, default_control_path
from .doorbell import FifoDoorbell, UioDoorbell
from .errors import AvatarError
from .faults import FaultInjector
from .hw.uio import find_uio
from .interrupts import BoardInterruptLine, StubInterruptLine
from .layout import address
from .loop import EventLoop
from .pace import Pacer
from .replay import DEFAULT_MAX_SIZE, Recorder
from .service import drop_privileges, sd_notify
from .shipped import board_path
from .state import StateFile
from .tracing import TrapTracer
from .trap import TrapPage
from .virtio.constants import REG_INTERRUPT_ACK
from .virtio.memory import GuestMemory
from .virtio.subsystem import Subsystem
from .wait import BUSY_POLL, MODES

log = logging.getLogger(__name__)

def _gic_line(daemon):
    return daemon.board.interrupt_line(**daemon.roots)


def _stub_line(daemon):
    ring = getattr(daemon.doorbell, "ring_stub", None)
    if ring is None:
        raise AvatarError(f"{daemon.board.path}: interrupts.kind = \"stub\" needs a doorbell "
                          "towards the stub (the emulated board's, or --doorbell "
                          "fifo:PATH,STUB_PATH)")
    return StubInterruptLine(daemon.trap_region, ring)


INTERRUPT_LINES = {"gic": _gic_line, "stub": _stub_line}


class _Stopping(Exception):
    """SIGINT or SIGTERM came while ``open`` waited for the stub."""


class Daemon:
    """One device model serving every configured VM of one board.

    ``board`` and ``config`` are objects or paths. ``sysfs_root``/``dev_root``
    point UIO discovery at another tree (tests). ``user``: drop root to this
    user after everything is mapped and opened.
    """

    def __init__(self, board, config, *, doorbell=None, interrupt_line=None, wait=None,
                 trace=False, control_path=None, user=None, wait_stub=10.0,
                 sysfs_root="/sys", dev_root="/dev", record=None,
                 record_max_size=DEFAULT_MAX_SIZE, state=None):
        self.board = board if isinstance(board, Board) else load_board(board_path(board))
        self.config = config if isinstance(config, Config) else load_config(
            config, max_vms=self.board.layout.max_vms,
            devices_per_vm=self.board.layout.devices_per_vm)
        self.roots = {"sysfs_root": sysfs_root, "dev_root": dev_root}
        self.doorbell = doorbell
        self._interrupt_line = interrupt_line
        self.wait = wait or self.board.wait
        if self.wait not in MODES:
            raise AvatarError(f"wait mode {self.wait!r}: expected one of {', '.join(MODES)}")
        self.trace = trace
        self.control_path = control_path
        self.user = user
        self.wait_stub = wait_stub
        self.loop = EventLoop()
        self.regions = []
        self.trap_region = self.trap = self.subsystem = self.control = None
        self.interrupt_line = None
        self.started = None
        self.faults = None
        self.pacer = None
        self.record = record            # a path: every trap recorded there (avatar_hw.replay)
        self.record_max_size = record_max_size
        self.recorder = None
        self.state_path = state         # a path: device state kept there (avatar_hw.state)
        self.state = None
        self.paused_until = 0.0         # pause(): no trap served before this monotonic time
        self._running = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._old_signals = {}
        self._old_wakeup_fd = -1
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
        self.trap = TrapPage(self.trap_region, board.layout, lock=self._trap_lock_path())
        spec, self.doorbell = self.doorbell, None     # close() sees no doorbell if this fails
        self._own_doorbell = spec is None or isinstance(spec, str)
        self.doorbell = self._make_doorbell(spec)
        line = self._interrupt_line
        if line is None:
            line = INTERRUPT_LINES[board.interrupts](self)
        elif callable(line) and not hasattr(line, "raise_intid"):
            line = line(self.trap_region)
        self.interrupt_line = line
        self.subsystem = Subsystem(board.layout, interrupt_line=line, loop=self.loop,
                                   before_interrupt=self._serve_posted_writes)
        if self.trace:
            self.trap.trace = TrapTracer(board.layout, self.subsystem)
        devices = []                                 # (a DeviceConfig, the device built)
        for vm_id, vm in self.config.vms.items():
            ram = self._open_region(board.ram, vm_id)
            self.subsystem.vm_init(vm_id, GuestMemory(ram, board.ram_guest_base, vm_id=vm_id))
            for entry in vm.devices:
                device = self.config.build_device(entry)
                self.subsystem.create_device(vm_id, device)
                devices.append((entry, device))
        if self.state_path is not None:
            self.state = StateFile(self.state_path, self.subsystem)
            if self.state.restored and self.record is not None:
                raise AvatarError(f"--record {self.record}: --state {self.state_path} holds "
                                  "devices to restore, and replay starts from reset devices; "
                                  "record from a daemon that restores nothing (a new --state "
                                  "file, or none)")
        if self.record is not None:
            self.recorder = Recorder(self.subsystem, self.record, self.record_max_size)
        if self.state is not None:
            self.state.restore()                 # a restart: the devices as they were
            self.state.keep()
            self.subsystem.state = self.state
        self._configure_board_spis(line)
        self.faults = FaultInjector(self.subsystem, self.loop)
        self.control = ControlServer(self.control_path or default_control_path(), self)
        self.control.attach(self.loop)
        self.trap.take_lock()               # before the drop: --user need not open the node
        if self.user:
            drop_privileges(self.user, [self.control.path])
            for entry, device in devices:        # what root could use, the user may not
                self.config.check_access(entry, device)
        if not self.trap.wait_ready(self.wait_stub, stopping=lambda: self._signal is not None):
            raise _Stopping
        self.trap.attach(wanted=self._wanted_features(), wait=self.wait)
        if isinstance(line, StubInterruptLine):
            line.attach(self.trap.features)      # and ring for a request a previous model left
        self.subsystem.attach_shadows(self.trap.shadows)
        self.pacer = Pacer(self.trap, self.subsystem, self.loop)
        self.pacer.start()
        if self.doorbell is not None and self.wait != BUSY_POLL:
            self.loop.add_reader(self.doorbell, self._on_doorbell)
        self.loop.add_reader(self._wake_r, self._on_wake)
        self.started = time.time()
        if self.state is not None:
            self.state.resume()                  # what the restored devices were doing
        self._serve_until_idle()                             # whatever was posted before

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

    def _make_doorbell(self, spec):
        if spec is None and self.wait == BUSY_POLL:
            return None
        if spec is not None and not isinstance(spec, str):
            return spec                                  # handed in (the emulated board's)
        spec = spec or "uio"
        if spec == "uio":
            if self.board.trap.uio is None:
                raise AvatarError(
                    f"{self.board.path}: the trap page is a file, so there is no UIO interrupt: "
                    "pass the board's doorbell (the emulated board launcher does), "
                    "--doorbell fifo:PATH, or --wait busy-poll")
            return UioDoorbell(find_uio(self.board.trap.name_for(), **self.roots))
        if spec.startswith("fifo:"):
            return FifoDoorbell.from_spec(spec)
        raise AvatarError(f"--doorbell {spec}: expected uio or fifo:PATH[,STUB_PATH]")

    # -- running -------------------------------------------------------------------------------

    def _on_doorbell(self):
        self.doorbell.ack()
        self._serve_until_idle()

    def _serve_posted_writes(self):
        self.trap.serve_posted_writes(self.subsystem.dispatch, REG_INTERRUPT_ACK)

    def _serve_until_idle(self):
        """Serve posted traps; when the budget stopped it, again after the loop's other
        events."""
        if self.trap is None:
            return
        if self.paused_until:
            left = self.paused_until - time.monotonic()
            if left > 0:
                return
            self.paused_until = 0.0
        if self.trap.serve_until_idle(self.subsystem.dispatch) and self.pacer is not None:
            self.pacer.wake()
        if self.trap.stopped_at_budget:
            self.loop.call_later(0, self._serve_until_idle)

    def pause(self, seconds):
        """Serve no trap for ``seconds`` (an injected fault: the guest's vCPUs wait on
        their register accesses meanwhile); then serve what was posted."""
        self.paused_until = time.monotonic() + seconds
        self.loop.call_later(seconds, self._end_pause)

    def end_pause(self):
        """End a pause now (a ``clear``): serve what was posted. True if one was on."""
        if not self.paused_until:
            return False
        self.paused_until = 0.0
        self.loop.call_later(0, self._serve_until_idle)
        return True

    def _end_pause(self):
        if self.paused_until and self.paused_until <= time.monotonic():
            self.paused_until = 0.0
            self._serve_until_idle()

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
        """Serve until ``stop()`` or SIGINT/SIGTERM; then detach and close.

        The handlers are in place before ``open`` attaches: a SIGTERM while it does (the
        stub already answers the guest's identity reads from the shadows, so a supervisor
        may take the daemon for ready) stops it once it has attached, detached cleanly,
        instead of killing it with the page left ATTACHED. One that comes while it waits for
        the stub (``wait_stub``) ends the wait at once: SIGTERM returns, SIGINT raises
        ``KeyboardInterrupt``."""
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old_signals[signum] = signal.signal(signum, self._on_signal)
            # Python runs ``_on_signal`` only between bytecodes of this thread: a signal
            # caught just before the loop blocks (or by another thread) would wait for the
            # loop's next event, maybe for ever. The C-level handler writes the wake-up fd
            # whatever this thread is doing, so the loop wakes and the handler runs.
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(),
                                                       warn_on_full_buffer=False)
        if self.trap is None:
            try:
                self.open()
            except BaseException as err:
                self._restore_signals()
                if not isinstance(err, _Stopping):
                    raise
                if self._signal == signal.SIGINT:
                    raise KeyboardInterrupt from None        # the CLI's status 130
                return
        self._running = True
        self._log_endpoints()
        sd_notify(f"READY=1\nSTATUS=serving {len(self.config.vms)} VM(s), control socket "
                  f"{self.control.path}\nMAINPID={os.getpid()}")
        try:
            self._serve()
        finally:
            self.close()            # a second signal meanwhile only asks to stop again
            self._restore_signals()

    def _restore_signals(self):
        if self._old_signals:
            signal.set_wakeup_fd(self._old_wakeup_fd)
        for signum, old in self._old_signals.items():
            signal.signal(signum, old)
        self._old_signals.clear()

    def _serve(self):
        """The event loop; while the trap page polls (``TrapPage.polling``: busy-poll, or
        the adaptive mode's window), turns of it without blocking between batches of scans."""
        # Its own frame: the bound methods held here must be gone before close() unmaps
        # the regions their views point into.
        trap, run_once = self.trap, self.loop.run_once
        dispatch, serve_until_idle = self.subsystem.dispatch, trap.serve_until_idle
        while self._running:
            if trap.polling and not self.paused_until:
                run_once(0)
                if serve_until_idle(dispatch):
                    self.pacer.wake()
            else:
                run_once()

    def _log_endpoints(self):
        """Where to reach it: the control socket and every console port's endpoints."""
        log.info("serving %d VM(s) on board %s (wait: %s); control socket %s",
                 len(self.config.vms), self.board.name, self.wait, self.control.path)
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
        if self.doorbell is not None and self.wait != BUSY_POLL and self.trap is not None:
            self.loop.remove_reader(self.doorbell)      # nothing serves after DETACHED
        if self.pacer is not None:
            self.pacer.stop()
            self.pacer = None               # it holds the trap page's slots
        if self.trap is not None and self.trap.slots and self.subsystem is not None:
            if self.trap.header.model_pid == os.getpid():
                self.trap.detach(self.subsystem.dispatch)
        if self.subsystem is not None:
            self.subsystem.attach_shadows(None)
            self.subsystem.state = None          # the devices' close below is not kept:
        if self.state is not None:               # the next daemon carries on from here
            self.state.close()
            self.state = None
        if self.trap is not None:
            self.trap.close()
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        if self.subsystem is not None:
            self.subsystem.close()
        if self.control is not None:
            self.control.close()
        if self._own_doorbell and self.doorbell is not None:
            self.doorbell.close()
        self.trap = self.subsystem = self.control = None
        for region in reversed(self.regions):
            try:
                region.close()
            except BufferError:
                log.warning("%s is still in use; it is unmapped when the process ends", region)
        self.regions.clear()
        self.loop.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- introspection and tracing -----------------------------------------------------------------

    def list_devices(self):
        """What ``avatar-hw list --json`` shows."""
        return self.subsystem.list_all_devices()

    def debug_device(self, vm_id, slot):
        """What ``avatar-hw debug --json`` shows: the device's state and its window's register
        accesses (waited, posted, shadow reads, acks at the stub)."""
        return {**self.subsystem.debug_device(vm_id, slot),
                **self.trap.window_counters(self.board.layout.window_number(vm_id, slot))}

    def balloon(self, vm_id, size=None):
        """What ``avatar-hw balloon`` does: VM ``vm_id`` keeps ``size`` bytes of its RAM (its
        balloon device takes the rest); None: only the balloon's state."""
        for entry in self.subsystem.list_all_devices():
            if entry["vm"] == vm_id and entry["name"] == "balloon":
                device = self.subsystem.device(vm_id, entry["slot"])
                return device.balloon_info() if size is None else device.set_target(size)
        raise ValueError(f"VM {vm_id} has no balloon device (add balloon = {{}} to its VMs "
                         "config)")

    def screenshot(self, vm_id, slot):
        """A copy of the scanout of the GPU in ``slot`` (``avatar_hw.devices.gpu_resources.
        Capture``): ``avatar-hw screenshot`` gets it as a PNG from the control server."""
        device = self.subsystem.device(vm_id, slot)
        if not hasattr(device, "screenshot"):
            raise ValueError(f"VM {vm_id} slot {slot} is a {device.name}, not a gpu")
        shot = device.screenshot()
        if shot is None:
            raise ValueError(f"VM {vm_id}'s gpu shows nothing: the guest set no scanout")
        return shot

    def info(self):
        """What ``avatar-hw info --json`` shows."""
        vms = []
        for vm_id, memory in self.subsystem.vms.items():
            devices = [{**entry, **self.debug_device(vm_id, entry["slot"])}
                       for entry in self.subsystem.device_info() if entry["vm"] == vm_id]
            vms.append({"vm": vm_id, "ram": {"base": address(memory.base), "size": memory.size},
                        "window": [address(a) for a in self.board.layout.vm_window(vm_id)],
                        **self.trap.vm_counters(vm_id), **self.pacer.info(vm_id),
                        "devices": devices})
        return {"pid": os.getpid(), "board": self.board.name, "board_file": str(self.board.path),
                "config": str(self.config.path), "uptime": round(time.time() - self.started, 3),
                "mode": self.wait,
                "trap": {**self.trap.info(), **self._interrupt_line_info()}, "vms": vms}

    def _interrupt_line_info(self):
        """The interrupt line's counters (the stub's: rings sent and spared), if it has any."""
        info = getattr(self.interrupt_line, "info", None)
        return info() if info is not None else {}
