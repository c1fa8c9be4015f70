"""``avatar-hw serve`` as a real subprocess against the stand-in stub in another process.

The daemon runs exactly as on a board (``find_uio`` by name, mmap of the
UIO maps, the trap protocol, the event loop, the control socket) except that
the UIO tree is fake (``FakeBoard``: regular files as maps, FIFOs as the
doorbell). The test process (or a child) plays the hypervisor stub and the
guest drivers (``StandinStub`` + ``VirtioDriver``).

"Acknowledged" console bytes, as the crash tests use the word:

* guest -> host: a byte is acknowledged when the transmit buffer holding it is
  in the used ring (the guest may reuse it). Such a byte must be in the
  console's file endpoint after a SIGKILL of either process.
* host -> guest: a byte is acknowledged when the receive buffer holding it is
  in the used ring. What the guest received must be exactly a prefix of what
  the host sent (no loss, duplication or reordering inside it).
"""

import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from avatar_hw import abi
from avatar_hw.layout import Layout
from avatar_hw.pace import PACE_CEILING_US, PACE_US
from avatar_hw.testing.fake_uio import make_tree
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub, TrapTimeout
from avatar_hw.virtio import constants as vc

LAYOUT = Layout()
PATTERN = bytes(i % 251 for i in range(1 << 20))


def console_config(board, vms=(0, 1), extra=""):
    lines = []
    for vm in vms:
        lines.append(f'[vm.{vm}]\nconsole = {{ endpoints = ["unix:{board.root}/vm{vm}.sock", '
                     f'"file:{board.root}/vm{vm}.log"] }}\n{extra}')
    path = board.root / "vms.toml"
    path.write_text("\n".join(lines))
    return path


class Served:
    """The daemon subprocess; killed by its own PID however the test ends."""

    def __init__(self, board, config, *extra):
        self.log_path = board.root / "daemon.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(board.serve_argv(config, *extra), stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self.board = board

    def output(self):
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self.close()

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def cli(self, *args):
        result = subprocess.run([sys.executable, "-m", "avatar_hw", *args, "--control",
                                 str(self.board.control)], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def board(tmp_path):
    return FakeBoard(tmp_path / "board")


@pytest.fixture
def stub(board):
    stand_in = StandinStub(board)
    yield stand_in
    stand_in.close()


@pytest.fixture
def served(board, stub):
    daemon = Served(board, console_config(board))
    try:
        stub.page.wait_attached()
        yield daemon
    finally:
        daemon.close()


def connect(board, vm):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(board.root / f"vm{vm}.sock"))
    client.settimeout(10)
    return client


def recv_exactly(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"connection closed after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def wait_used(stub, driver, queue, count, timeout=10):
    """Wait for interrupts until ``count`` buffers of ``queue`` are used; returns them."""
    used = []
    deadline = time.monotonic() + timeout
    while len(used) < count:
        assert time.monotonic() < deadline, f"only {len(used)} of {count} buffers used"
        stub.wait_irqs(0.5)
        driver.ack_interrupt()
        used += queue.get_used()
    return used


# -- the done-when: two VMs, info shows both -------------------------------------------------------

def test_daemon_serves_consoles_to_two_vms_and_info_shows_both(board, stub, served):
    drivers, queues = {}, {}
    for vm in (0, 1):
        drivers[vm] = stub.driver(vm)
        queues[vm] = drivers[vm].init([0, 1])
    clients = {vm: connect(board, vm) for vm in (0, 1)}
    for vm in (0, 1):
        rx, tx = queues[vm]
        message = f"hello from vm{vm}\n".encode()
        tx.post(readable=[message])
        tx.notify()
        assert recv_exactly(clients[vm], len(message)) == message
        rx.post(writable=[64])
        rx.notify()
        clients[vm].sendall(f"to vm{vm}".encode())
        [used] = wait_used(stub, drivers[vm], rx, 1)
        assert used.data == f"to vm{vm}".encode()
    for vm in (0, 1):
        assert (board.root / f"vm{vm}.log").read_bytes() == f"hello from vm{vm}\n".encode()

    info = json.loads(served.cli("info", "--json"))
    assert [vm["vm"] for vm in info["vms"]] == [0, 1]
    for vm in info["vms"]:
        [device] = vm["devices"]
        assert device["name"] == "console" and device["irq"] == LAYOUT.intid(vm["vm"], 0)
        assert device["base"] == f"0x{LAYOUT.window(vm['vm'], 0):08x}"
        assert "DRIVER_OK" in device["status"]
        assert device["bytes_from_guest"] == len(f"hello from vm{vm['vm']}\n")
        assert device["bytes_to_guest"] == len(f"to vm{vm['vm']}")
        assert device["interrupts"] >= 1
        assert [q["used_idx"] for q in device["queues"][:2]] == [1, 1]
    assert info["trap"]["unhandled"] == 0 and info["trap"]["served"] > 20
    devices = [vm["devices"][0] for vm in info["vms"]]
    # Every trap counted for its device; identity, feature, status reads answered by the
    # stand-in stub from the register shadows, which the daemon reports from the pages.
    assert info["trap"]["served"] == sum(d["traps_waited"] + d["posted_writes"] for d in devices)
    assert all(d["shadow_reads"] >= 5 for d in devices)
    # ... and for its VM, with the daemon's time spent on it (the fair order's accounts).
    assert [vm["traps_served"] for vm in info["vms"]] == [
        d["traps_waited"] + d["posted_writes"] for d in devices]
    assert all(vm["service_ms"] > 0 and vm["traps_deferred"] >= 0 for vm in info["vms"])
    # ... and what of them completed nothing (the driver's probe, here: avatar_hw/pace.py)
    assert all(0 < vm["idle_traps"] == sum(d["idle_traps"] for d in vm["devices"]) < 10
               for vm in info["vms"])
    assert sum(d["shadow_reads"] for d in devices) == stub.page.shadow_hits
    assert sum(d["stub_acks"] for d in devices) == stub.page.acks_taken > 0
    # The stand-in stub never polls in a WFI (virq_polling stays zero): a request rings
    # unless the last ring is not taken yet (AVT_F_RINGS_TAKEN; the stand-in counts a take
    # when it reads its FIFO).
    interrupts = sum(d["interrupts"] for d in devices)
    rings, skipped = info["trap"]["stub_rings"], info["trap"]["stub_rings_skipped"]
    assert rings >= 1 and rings + skipped == interrupts
    assert rings <= info["trap"]["stub_rings_taken"] + 1
    text = served.cli("info")
    assert "register accesses: waited" in text and "vm1: RAM" in text and "traps served" in text
    assert f"interrupts: stub rung {rings}, not rung {skipped}" in text
    assert "guest WFIs: 0 caught by the stub's poll" in text
    assert "vm1 slot0 console" in served.cli("list")
    debug = served.cli("debug", "1", "console")
    assert "DRIVER_OK" in debug and "q1: size 256/256 ready" in debug
    # debug counts the device's register accesses as info does (it once printed zeros).
    d = devices[1]
    assert (f"register accesses: waited {d['traps_waited']}, posted {d['posted_writes']}, "
            f"shadow {d['shadow_reads']}, acks at the stub {d['stub_acks']}") in debug
    assert d["traps_waited"] > 0

    assert served.stop() == 0
    assert stub.page.header.model_state == abi.MODEL_DETACHED
    assert "detached" in served.output()
    assert not board.control.exists()
    # Detached: the stub answers accesses itself (read-as-zero), nothing is posted.
    assert stub.page.post(0, 0, LAYOUT.window(0, 0), 4, False) == (abi.STATUS_UNHANDLED, 0)


def test_trace_logs_every_trap_with_register_names(board, stub):
    stub.page.initialise(4, shadow_count=0)          # every read traps: no register shadows
    daemon = Served(board, console_config(board, vms=(0,)), "--trace")
    try:
        stub.page.wait_attached()
        driver = stub.driver(0)
        assert driver.read(vc.REG_MAGIC_VALUE) == vc.MMIO_MAGIC
        driver.write(vc.REG_STATUS, 1)
    finally:
        assert daemon.stop() == 0
    out = daemon.output()
    assert "vm0 cpu0 console0  R MagicValue         4 0x74726976" in out
    assert "W Status             4 0x1" in out


# The daemon's process with a thread that, once the control socket exists (the handlers are
# in place), sends SIGTERM to itself: the C-level handler runs there, not in the main thread
# blocked in the event loop, which only the wake-up fd wakes (as for a signal caught just
# before the loop blocks).
SIGNAL_FROM_ANOTHER_THREAD = """
import os, signal, sys, threading, time
from avatar_hw.cli import main
def kill_soon(control):
    while not os.path.exists(control):
        time.sleep(0.01)
    time.sleep(0.2)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
threading.Thread(target=kill_soon, args=(sys.argv[1],), daemon=True).start()
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_caught_outside_the_main_thread_stops_the_daemon(board, stub):
    argv = board.serve_argv(console_config(board, vms=(0,)))
    assert argv[1:4] == ["-m", "avatar_hw", "serve"]
    log_path = board.root / "daemon.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen([sys.executable, "-c", SIGNAL_FROM_ANOTHER_THREAD,
                                   str(board.control), *argv[3:]],
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        assert daemon.wait(60) == 0, log_path.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert "SIGTERM: stopping" in log_path.read_text()
    assert stub.page.header.model_state == abi.MODEL_DETACHED


def test_busy_poll_mode_serves_without_doorbells(board, stub):
    daemon = Served(board, console_config(board, vms=(0,)), "--busy-poll")
    try:
        stub.page.wait_attached()
        assert stub.page.header.model_sleeping == 0
        driver = stub.driver(0)
        for _ in range(50):
            assert driver.read(vc.REG_DEVICE_ID) == vc.ID_CONSOLE
        assert stub.page.rings == 0
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("key, flags, mode", [
    (None, (), "doorbell"),                              # no trap.wait: the doorbell
    ("adaptive", (), "adaptive"),                        # the board file's
    ("adaptive", ("--wait", "doorbell"), "doorbell"),    # the flag wins
    ("doorbell", ("--busy-poll",), "busy-poll"),         # the alias of --wait busy-poll
], ids=["default", "board-file", "flag", "busy-poll-alias"])
def test_the_wait_mode_comes_from_the_board_file_or_the_flag(board, stub, key, flags, mode):
    if key is not None:
        text = board.board_file.read_text()
        trap = 'region = { uio = "avatar-trap" }\n'
        assert trap in text
        board.board_file.write_text(text.replace(trap, f'{trap}wait = "{key}"\n'))
    daemon = Served(board, console_config(board, vms=(0,)), *flags)
    try:
        stub.page.wait_attached()
        driver = stub.driver(0)
        for n in range(40):
            driver.write(vc.REG_QUEUE_SEL, n % 2)       # writes always trap
        info = json.loads(daemon.cli("info", "--json"))
        assert info["mode"] == info["trap"]["wait"] == mode
        assert info["trap"]["busy_poll"] == (mode == "busy-poll")
        assert ("poll_window_ns" in info["trap"]) == (mode == "adaptive")
        assert info["trap"]["served"] >= 40 and info["trap"]["unhandled"] == 0
        assert f", wait {mode}" in daemon.cli("info")
    finally:
        assert daemon.stop() == 0
    assert f"(wait: {mode})" in daemon.output()


# -- malformed traps -------------------------------------------------------------------------------

def test_malformed_traps_get_unhandled_and_the_daemon_keeps_serving(board, stub, served):
    page, vm0, vm1 = stub.page, LAYOUT.window(0, 0), LAYOUT.window(1, 0)
    unhandled = (abi.STATUS_UNHANDLED, 0)
    assert page.post(0, 0, vm0 + 5 * LAYOUT.device_size, 4, False) == unhandled   # empty slot
    assert page.post(0, 0, 0x0900_0000, 4, False) == unhandled                   # no window
    assert page.post(0, 0, vm0 + vc.REG_STATUS, 3, False) == unhandled           # size 3
    assert page.post(0, 0, vm1 + vc.REG_STATUS, 4, True, 0x80) == unhandled     # VM 1's window
    assert page.post(1, 0, vm0 + vc.REG_STATUS + 2, 4, False) == unhandled       # unaligned
    garbage = dict(size=0xA5, direction=0x5A, vm_id=0xFFFF, gpa=0xFFFF_FFFF_FFFF_FFFF,
                   data=0xDEAD_BEEF_DEAD_BEEF)
    assert page.post(2, 0, vm0, 4, False, raw=garbage) == unhandled
    # The daemon is alive and VM 1's device was not touched by VM 0's write.
    assert stub.driver(1).read(vc.REG_STATUS) == 0
    assert stub.driver(0).read(vc.REG_MAGIC_VALUE) == vc.MMIO_MAGIC
    info = json.loads(served.cli("info", "--json"))
    assert info["trap"]["malformed"] == 4 and info["trap"]["unhandled"] == 6
    out = served.output()
    assert "in VM 1's window: answered UNHANDLED" in out and "access size 3" in out
    assert "Traceback" not in out
    assert served.process.poll() is None


def test_a_vm_making_guest_errors_is_paced_until_it_stops(board, stub, served):
    """avatar_hw/pace.py (AVT_F_PACE): VM 1 reads a register that does not exist over and
    over (each a counted guest error); within a period or two its vCPU's slot asks the stub
    to wait PACE_US (doubled each period it goes on) before each access and ``info`` says
    it is paced; VM 0, correct, is
    not. Once VM 1 stops, a period without mistakes ends it."""
    page, vm0, vm1 = stub.page, LAYOUT.window(0, 0), LAYOUT.window(1, 0)
    assert page.post(0, 0, vm0 + vc.REG_MAGIC_VALUE, 4, False) == (abi.STATUS_OK,
                                                                     vc.MMIO_MAGIC)
    stop = threading.Event()

    def mistakes():
        while not stop.is_set():
            page.post(1, 1, vm1 + 0x0f0, 4, False)          # no such register

    hostile = threading.Thread(target=mistakes)
    hostile.start()
    try:
        deadline = time.monotonic() + 60
        while not page.slots[1].pace_us:
            assert time.monotonic() < deadline, "VM 1 was never paced"
            time.sleep(0.02)
        vms = {vm["vm"]: vm for vm in json.loads(served.cli("info", "--json"))["vms"]}
        assert vms[1]["paced"] and vms[1]["paced_periods"] >= 1, vms[1]
        assert not vms[0]["paced"] and vms[0]["paced_periods"] == 0
        assert PACE_US <= page.slots[1].pace_us <= PACE_CEILING_US    # doubled while it errs
        assert vms[1]["pace_us"] >= PACE_US and page.slots[0].pace_us == 0
    finally:
        stop.set()
        hostile.join()
    while page.slots[1].pace_us:
        assert time.monotonic() < deadline, "VM 1 stayed paced after it stopped"
        time.sleep(0.02)
    vms = {vm["vm"]: vm for vm in json.loads(served.cli("info", "--json"))["vms"]}
    assert not vms[1]["paced"]
    text = served.cli("info")
    assert "period(s) for its guest errors" in text.split("vm1:")[1] and \
        "for its guest errors" not in text.split("vm1:")[0]
    assert "vm1: " in served.output() and "guest errors in 0.1 s" in served.output()


# -- crashes lose nothing acknowledged -------------------------------------------------------------

def test_a_request_the_previous_model_did_not_ring_for_is_rung_once_attached(board, stub):
    """A model that died between setting a virq_pending bit and ringing the stub: the next
    daemon rings once it has attached (``raise_intid`` never rings for a bit still set, so
    without that the stub would hear of the request only at the guest's next exit)."""
    intid = LAYOUT.intid(0, 0)
    stub.page.header.virq_pending[intid // 32] |= 1 << (intid % 32)
    served = Served(board, console_config(board))
    try:
        stub.page.wait_attached()
        deadline = time.monotonic() + 30
        while json.loads(served.cli("info", "--json"))["trap"]["stub_rings"] != 1:
            assert time.monotonic() < deadline, "the stub was never rung for the left request"
            time.sleep(0.05)
        assert stub.wait_irqs(0) == [intid]          # still there for the stub to take
    finally:
        served.close()


class GuestStream:
    """Guest -> host: chunks of PATTERN through VM 0's transmit queue, notifications posted."""

    def __init__(self, stub, chunk=1000):
        self.stub = stub
        self.driver = stub.driver(0, posted_writes=True, timeout=30)    # a loaded daemon
        self.rx, self.tx = self.driver.init([0, 1])
        self.chunk = chunk
        self.sent = 0
        self.acked = 0

    def step(self):
        """Post a chunk if a descriptor is free, else collect used buffers."""
        tx = self.tx
        if tx.free and self.sent + self.chunk <= len(PATTERN):
            tx.post(readable=[PATTERN[self.sent:self.sent + self.chunk]])
            self.sent += self.chunk
            tx.notify()
        else:
            self.stub.wait_irqs(0.2)
            self.driver.ack_interrupt()
        self.collect()

    def collect(self):
        """Count what the used ring acknowledges (read straight from guest RAM)."""
        self.acked += sum(seg[1] for used in self.tx.get_used() for seg in used.segments)


def kill_when(daemon, condition, timeout=60):
    """SIGKILL the daemon from a thread of its own once ``condition()`` (a count the test's
    main thread moves: the kill comes at no particular point of its work), or after
    ``timeout`` s (the test's assertions then say what never came); the thread."""
    def kill():
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.001)
        daemon.process.kill()
    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer


def stream_until_killed(daemon, stream, when=None):
    """Stream until the daemon, SIGKILLed once ``when()`` (default: 64 KiB acknowledged),
    stops answering (the trap that waits once its process is gone); count the last used."""
    stream.stub.page.model_alive = lambda: daemon.process.poll() is None
    killer = kill_when(daemon, when or (lambda: stream.acked >= 64 << 10))
    with pytest.raises(TrapTimeout):
        while True:
            stream.step()
    killer.join()
    daemon.process.wait()
    stream.collect()         # buffers used just before the kill


def assert_log_holds(log_path, acked):
    data = log_path.read_bytes()
    assert len(data) >= acked, f"{acked} bytes acknowledged but only {len(data)} logged"
    assert data == PATTERN[:len(data)], "the log is not a prefix of what the guest sent"


def test_sigkill_of_the_daemon_mid_output_loses_no_acknowledged_byte(board, stub):
    # A dead model's register shadows keep answering InterruptStatus (section 14): the
    # stream would poll them for ever instead of timing out on a trap.
    stub.page.initialise(4, shadow_count=0)
    config = board.root / "vms.toml"
    config.write_text(f'[vm.0]\nconsole = {{ endpoints = ["file:{board.root}/vm0.log"] }}\n')
    daemon = Served(board, config)
    try:
        stub.page.wait_attached()
        stream = GuestStream(stub)
        stream_until_killed(daemon, stream)
        assert 0 < stream.acked < len(PATTERN)
        assert_log_holds(board.root / "vm0.log", stream.acked)
    finally:
        daemon.close()


def test_sigkill_with_a_stalled_socket_client_loses_no_acknowledged_byte(board, stub):
    """Acknowledged = in the kernel: a client that reads only after the daemon died
    still gets every byte of every transmit buffer the guest got back."""
    # A dead model's register shadows keep answering InterruptStatus (section 14): the
    # stream would poll them for ever instead of timing out on a trap.
    stub.page.initialise(4, shadow_count=0)
    config = board.root / "vms.toml"
    config.write_text(f'[vm.0]\nconsole = {{ endpoints = ["unix:{board.root}/vm0.sock"] }}\n')
    daemon = Served(board, config)
    try:
        stub.page.wait_attached()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)   # stall soon
        client.connect(str(board.root / "vm0.sock"))
        client.settimeout(10)
        stream = GuestStream(stub)
        # killed once the guest has no transmit buffer left (the client's stall does that)
        stream_until_killed(daemon, stream, lambda: stream.acked and not stream.tx.free)
        assert 0 < stream.acked < stream.sent          # the client stalled the guest
        received = bytearray()
        while chunk := client.recv(1 << 20):           # EOF: the daemon's end is gone
            received += chunk
        client.close()
        assert len(received) >= stream.acked, (
            f"{stream.acked} bytes acknowledged but the client got {len(received)}")
        assert bytes(received) == PATTERN[:len(received)]
    finally:
        daemon.close()


def test_sigkill_of_the_daemon_mid_input_keeps_what_the_guest_got_exact(board, stub):
    daemon = Served(board, console_config(board, vms=(0,)))
    try:
        stub.page.wait_attached()
        driver = stub.driver(0, timeout=30)                  # a loaded daemon
        stub.page.model_alive = lambda: daemon.process.poll() is None   # the kill: at once
        rx, _ = driver.init([0, 1])
        for _ in range(64):
            rx.post(writable=[512])
        rx.notify()
        client = connect(board, 0)
        writer = threading.Thread(target=lambda: _send_until_closed(client), daemon=True)
        writer.start()
        received = bytearray()
        killer = kill_when(daemon, lambda: len(received) >= 32 << 10)
        with pytest.raises(TrapTimeout):
            while True:
                stub.wait_irqs(0.2)
                driver.ack_interrupt()
                for used in rx.get_used():
                    received += used.data
                    rx.post(writable=[512])
                rx.notify()
        killer.join()
        received += b"".join(u.data for u in rx.get_used())
        assert len(received) > 0
        assert bytes(received) == PATTERN[:len(received)]
        client.close()
    finally:
        daemon.close()


def _send_until_closed(client):
    try:
        client.sendall(PATTERN)
    except OSError:
        pass


STANDIN_STREAM = """
import sys
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
sys.path.insert(0, {tests!r})
from test_daemon import GuestStream
stream = GuestStream(StandinStub(FakeBoard({root!r}, create=False), initialise=False))
while True:
    stream.step()
    print(stream.acked, flush=True)
"""


def test_sigkill_of_the_stand_in_mid_output_loses_nothing_and_the_daemon_serves_on(board):
    first = StandinStub(board)                       # initialises the page, then hands over
    config = board.root / "vms.toml"
    config.write_text(f'[vm.0]\nconsole = {{ endpoints = ["file:{board.root}/vm0.log"] }}\n')
    daemon = Served(board, config)
    child = None
    try:
        first.page.wait_attached()
        first.close()
        code = STANDIN_STREAM.format(tests=str(Path(__file__).parent), root=str(board.root))
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        acked = 0
        while acked < 200_000:
            line = child.stdout.readline()
            assert line, child.stderr.read()
            acked = int(line)
        child.kill()
        child.wait()
        # Everything the dead guest saw acknowledged is logged, in order.
        assert_log_holds(board.root / "vm0.log", acked)
        # A restarted stub recovers its slots; the daemon, still running, serves it.
        again = StandinStub(board, initialise=False)     # waits out what the dead one posted
        before = len((board.root / "vm0.log").read_bytes())
        try:
            stream = GuestStream(again)
            while stream.acked < 10_000:
                stream.step()
        finally:
            again.close()
        assert daemon.process.poll() is None
        log = (board.root / "vm0.log").read_bytes()
        assert len(log) - before >= stream.acked
        assert log[before:] == PATTERN[:len(log) - before]
        info = json.loads(daemon.cli("info", "--json"))
        assert info["vms"][0]["devices"][0]["bytes_from_guest"] == len(log)
        assert daemon.stop() == 0
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        daemon.close()


# -- startup errors: one line, non-zero exit -------------------------------------------------------

def run_serve(board, config, *extra):
    result = subprocess.run(board.serve_argv(config, "--wait-stub", "0.2", *extra),
                            capture_output=True, text=True, timeout=30)
    lines = [line for line in result.stderr.splitlines() if line.startswith("avatar-hw:")]
    return result.returncode, lines, result.stderr


def test_missing_uio_device_names_it_and_the_fix(board, stub):
    code, lines, err = run_serve(board, console_config(board, vms=(0, 2)))
    assert code == 2, err
    [line] = lines
    assert "'avatar-vm2-ram' not found" in line and "udev/99-avatar-hw.rules" in line
    assert "Traceback" not in err


def test_config_error_is_one_line(board, stub):
    config = board.root / "vms.toml"
    config.write_text("[vm.0]\nconsole = { endpoints = ['nowhere'] }\n")
    code, lines, err = run_serve(board, config)
    assert code == 2
    assert lines == [f"avatar-hw: {config}: vm.0.console.endpoints: 'nowhere' is not a URL "
                     "(scheme:rest, e.g. file:/var/log/avatar/vm0.log)"]


@pytest.mark.parametrize("init, expected", [
    (dict(magic=0x12345678), "magic 0x12345678 is not 0x50545641"),
    (dict(major=2, minor=0), f"trap ABI 2.0 but avatar-hw speaks 1.{abi.ABI_MINOR}"),
    (dict(features=abi.F_POSTED_WRITES), "does not offer AVT_F_VIRQ_REQUEST"),
])
def test_abi_mismatch_is_refused_with_one_line(board, stub, init, expected):
    stub.page.initialise(4, **init)
    code, lines, err = run_serve(board, console_config(board))
    assert code == 2, err
    assert len(lines) == 1 and expected in lines[0]
    assert stub.page.header.model_state == abi.MODEL_DETACHED


def test_uninitialised_trap_page_is_refused_in_one_line(board):
    code, lines, err = run_serve(board, console_config(board), "--log-level", "warning")
    assert code == 2
    assert err.splitlines() == lines and "has not initialised the trap page" in lines[0]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_signal_ends_the_wait_for_the_stub_at_once(board, sig, status):
    daemon = Served(board, console_config(board), "--wait-stub", "3600")
    try:
        while "vm1 slot 0: console" not in daemon.output():     # built: now it waits
            assert daemon.process.poll() is None, daemon.output()
            time.sleep(0.05)
        assert daemon.stop(sig, timeout=60) == status
        assert "has not initialised" not in daemon.output()
    finally:
        daemon.close()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_wait_stub_takes_finite_seconds_above_zero(board, value):
    code, _, err = run_serve(board, console_config(board), "--wait-stub", value)
    assert code == 2
    assert err.splitlines()[-1] == (f"avatar-hw serve: error: argument --wait-stub: "
                                    f"{value!r} is not a number of seconds above 0")


@pytest.mark.parametrize("spec, message", [
    ("bogus", "--doorbell bogus: expected uio or fifo:PATH[,STUB_PATH]"),
    ("fifo:", "--doorbell fifo:: expected fifo:PATH or fifo:PATH,STUB_PATH"),
    ("fifo:/nonexistent/x", "doorbell FIFO /nonexistent/x: No such file or directory"),
])
def test_a_bad_doorbell_is_one_line(board, spec, message):
    code, lines, err = run_serve(board, console_config(board), "--doorbell", spec)
    assert code == 2 and "Traceback" not in err
    [line] = lines
    assert line.startswith(f"avatar-hw: {message}")


@pytest.mark.parametrize("which", ["to the model", "to the stub"])
def test_a_doorbell_fifo_that_is_a_regular_file_is_one_line(board, which):
    """A regular file opened as the FIFO was taken: the daemon then polled a file that is
    always readable (or rang the stub by appending to it)."""
    plain = board.root / "not-a-fifo"
    plain.write_text("")
    spec = (f"fifo:{plain}" if which == "to the model"
            else f"fifo:{board.doorbell},{plain}")
    code, lines, err = run_serve(board, console_config(board), "--doorbell", spec)
    assert code == 2 and "Traceback" not in err, err
    assert lines == [f"avatar-hw: doorbell FIFO {plain}: a regular file, not a FIFO: give a "
                     "FIFO's path (create one with mkfifo; the stand-in stub makes it)"]
    assert plain.read_text() == ""


def test_permission_problem_is_one_line(board, stub):
    """The UIO nodes belong to someone else, as without the udev rules. As root, the daemon
    runs without CAP_DAC_OVERRIDE (setpriv), so file permissions apply to it."""
    prefix = []
    for node in Path(board.roots["dev_root"]).iterdir():
        node.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(node, 65534, 65534)
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE as root")
        prefix = ["setpriv", "--inh-caps=-all",
                  "--bounding-set=-dac_override,-dac_read_search", "--"]
    argv = prefix + board.serve_argv(console_config(board, vms=(0,)), "--wait-stub", "0.2")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("avatar-hw:")]
    assert len(lines) == 1, result.stderr
    assert "permission denied" in lines[0] and "group 'avatar'" in lines[0]


# -- --user: privileges dropped after everything that needs them ---------------------------

def private_copy_of_the_package(tmp_path):
    """The package in a root-only (0700) directory, as a checkout in a private home: after the
    drop, anything the daemon imported or opened from there late would fail."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    package = Path(__file__).resolve().parent.parent / "avatar_hw"
    shutil.copytree(package, private / "avatar_hw", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(private)}
    where = subprocess.run([sys.executable, "-c", "import avatar_hw; print(avatar_hw.__file__)"],
                           env=env, cwd=private, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(private))
    return private, env


def proc_ids(pid, field):
    """The real, effective, saved and filesystem IDs on the ``field`` line (Uid, Gid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return [int(n) for n in line.split()[1:]]
    raise AssertionError(f"no {field} line in /proc/{pid}/status")


def user_nobody():
    """The passwd entry of 'nobody', for a --user test; skips unless we are root."""
    if os.geteuid() != 0:
        pytest.skip("--user needs root: the suite runs as root in CI")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")


def test_user_drop_keeps_the_lock_and_serves_as_that_user(tmp_path, board, stub):
    """--user nobody (not in group avatar, cannot read the UIO nodes or this checkout): the
    lock is taken and everything opened before the drop, and the daemon serves after it."""
    nobody = user_nobody()
    private, env = private_copy_of_the_package(tmp_path)
    for node in Path(board.roots["dev_root"]).iterdir():
        node.chmod(0o600)                       # as without the udev rules: root only
    log_path = board.root / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(board.serve_argv(console_config(board, vms=(0,)), "--user",
                                                   "nobody"), env=env, cwd=private,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        stub.page.wait_attached()
        assert stub.page.header.model_pid == daemon.pid
        assert proc_ids(daemon.pid, "Uid") == [nobody.pw_uid] * 4
        assert proc_ids(daemon.pid, "Gid") == [nobody.pw_gid] * 4
        with open(board.node("avatar-trap"), "rb") as node:        # the lock is still held
            with pytest.raises(BlockingIOError):
                fcntl.flock(node.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert stub.driver(0).read(vc.REG_DEVICE_ID) == vc.ID_CONSOLE    # served after the drop
        info = subprocess.run([sys.executable, "-m", "avatar_hw", "info", "--json", "--control",
                               str(board.control)], capture_output=True, text=True, timeout=30)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["pid"] == daemon.pid
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(10) == 0, log_path.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    output = log_path.read_text()
    assert "running as nobody" in output and "Traceback" not in output, output
    assert stub.page.header.model_state == abi.MODEL_DETACHED


def test_a_share_only_root_can_read_is_refused_after_the_user_drop(board, stub):
    """The 9p share's check runs again as --user: built as root, it passed, and the guest
    then got EACCES for every walk. A share the user can read is served."""
    user_nobody()
    share = board.root / "share"
    share.mkdir()
    share.chmod(0o700)
    config = console_config(board, vms=(0,), extra=f'9p = {{ tag = "host", path = "{share}" }}\n')
    code, lines, err = run_serve(board, config, "--user", "nobody")
    assert code == 2 and lines == [
        f"avatar-hw: {config}: vm.0.9p: {share}: the folder shared as 'host' cannot be read "
        "or searched (Permission denied): give the daemon's user r and x on it"], err
    assert "Traceback" not in err
    share.chmod(0o755)
    served = Served(board, config, "--user", "nobody")
    try:
        stub.page.wait_attached()
        assert stub.driver(0, 1).read(vc.REG_DEVICE_ID) == vc.ID_9P
        assert served.stop() == 0, served.output()
    finally:
        served.close()


def test_user_that_cannot_be_switched_to_is_one_line(board, stub):
    code, lines, err = run_serve(board, console_config(board, vms=(0,)), "--user", "no-such-user")
    assert code == 2 and lines == ["avatar-hw: --user no-such-user: no such user"], err
    assert "Traceback" not in err


# -- a GIC board: the daemon configures and raises board SPIs, not the guest INTIDs -----------

GIC_BOARD = """\
[board]
name = "fake-gic"

[layout]
base = 0x0a000000
vm_size = 0x10000
device_size = 0x1000
irq_base = 48
irqs_per_vm = 8
max_vms = 2

[interrupts]
board_intids = [[200, 215]]     # VM1 slot 0 (guest INTID 56): 208
reserved_intids = [[48, 199]]
target_cpu = [1, 2]
priority = 0x90

[gic]
version = "v2"
distributor = 0xff841000
lines = 256
region = { uio = "avatar-gicd" }

[trap]
region = { uio = "avatar-trap" }

[ram]
region = { uio = "avatar-vm{vm}-ram" }
guest_base = 0x40000000
"""


def test_gic_board_configures_and_raises_the_board_spi_of_each_device(board, stub):
    from avatar_hw.daemon import Daemon
    make_tree(board.root, {9: ("avatar-gicd", [(0xFF841000, 0x1000, 0, None)])})
    gicd = board.node("avatar-gicd")
    gicd.write_bytes(bytes(0x1000))
    with open(gicd, "r+b") as node:             # GICD_TYPER: 256 lines, 4 CPUs
        os.pwrite(node.fileno(), (7 | 3 << 5).to_bytes(4, "little"), 4)
    board_file = board.root / "gic-board.toml"
    board_file.write_text(GIC_BOARD)
    daemon = Daemon(board_file, console_config(board, vms=(1,)),
                    doorbell=f"fifo:{board.doorbell},{board.doorbell_stub}",
                    control_path=board.control, **board.roots)
    thread = daemon.start_thread()

    def gicd_word(offset):
        with open(gicd, "rb") as node:
            return int.from_bytes(os.pread(node.fileno(), 4, offset), "little")

    def gicd_byte(offset):
        return gicd_word(offset & ~3) >> (8 * (offset & 3)) & 0xFF

    try:
        assert gicd_word(0x118) == 1 << 16          # GICD_ISENABLER6: INTID 208 only
        assert gicd_word(0x198) == 1 << 16          # disabled first (GICD_ICENABLER6)
        assert gicd_word(0xC34) == 0x2              # GICD_ICFGR13: 208 edge-triggered
        assert gicd_byte(0x400 + 208) == 0x90 and gicd_byte(0x800 + 208) == 1 << 2   # VM1: CPU 2
        assert gicd_byte(0x400 + 209) == 0 and gicd_word(0x104) == 0     # nothing else touched
        driver = stub.driver(1)
        rx, tx = driver.init([0, 1])
        tx.post(readable=[b"hi"])
        tx.notify()
        deadline = time.monotonic() + 60
        while gicd_word(0x218) != 1 << 16:          # GICD_ISPENDR6: board SPI 208 raised
            assert time.monotonic() < deadline, "board SPI 208 never raised"
            time.sleep(0.01)
        assert gicd_word(0x204) == 0                # never the guest INTID 56 itself
        report = daemon.subsystem.interrupt_line.diagnose_spi(56)
        assert report.intid == 208 and report.changes() == [] and report.targets == (2,)
    finally:
        daemon.stop()
        thread.join(10)
    assert not thread.is_alive()


# -- the Python API --------------------------------------------------------------------------------

@pytest.mark.parametrize("wait", ["doorbell", "adaptive", "busy-poll"])
def test_python_api_runs_the_daemon_in_a_thread(board, stub, caplog, wait):
    from avatar_hw.daemon import Daemon
    daemon = Daemon(board.board_file, console_config(board, vms=(1,)),
                    doorbell=f"fifo:{board.doorbell},{board.doorbell_stub}",
                    control_path=board.control, wait=wait, **board.roots)
    thread = daemon.start_thread()
    try:
        assert stub.page.model_attached()
        assert stub.driver(1).read(vc.REG_DEVICE_ID) == vc.ID_CONSOLE
        assert stub.page.post(0, 0, LAYOUT.window(0, 0), 4, False)[0] == abi.STATUS_UNHANDLED
    finally:
        daemon.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert stub.page.header.model_state == abi.MODEL_DETACHED
    assert daemon.regions == [] and "still in use" not in caplog.text


# -- serve --state: a restart under a running guest ------------------------------------------------

def wait_served_by(stub, daemon, timeout=30.0):
    deadline = time.monotonic() + timeout
    while stub.page.header.model_pid != daemon.process.pid or not stub.page.model_attached():
        assert daemon.process.poll() is None, daemon.output()
        assert time.monotonic() < deadline, "the new daemon never attached"
        time.sleep(0.01)


def test_restart_under_guest_serve_state_carries_on_after_sigkill(board, stub):
    config = board.root / "vms.toml"
    config.write_text(f'[vm.0]\nconsole = {{ endpoints = ["file:{board.root}/vm0.log"] }}\n')
    state = board.root / "state"
    first = Served(board, config, "--state", str(state))
    try:
        wait_served_by(stub, first)
        driver = stub.driver(0)
        rx, tx = driver.init([0, 1])
        tx.post(readable=[b"before "])
        tx.notify()
        wait_used(stub, driver, tx, 1)
        first.process.kill()
        first.process.wait()
    finally:
        first.close()
    second = Served(board, config, "--state", str(state))
    try:
        wait_served_by(stub, second)
        assert driver.read(vc.REG_STATUS) == 0xF            # no reset: DRIVER_OK still
        tx.post(readable=[b"after"])
        tx.notify()                                          # the same rings, carried on
        wait_used(stub, driver, tx, 1)
        assert (board.root / "vm0.log").read_bytes() == b"before after"
        assert "console restored (status 0x0f" in second.output()
    finally:
        assert second.stop() == 0
    state.write_bytes(b"garbage" * 100)
    third = Served(board, config, "--state", str(state))
    try:
        assert third.process.wait(30) != 0
    finally:
        third.close()
    errors = [line for line in third.output().splitlines() if "state" in line]
    assert errors and "is not an avatar-hw state file" in errors[-1], third.output()
    assert "Traceback" not in third.output()
