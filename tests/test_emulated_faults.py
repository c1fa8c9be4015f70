"""Injected faults seen by a real arm64 Linux guest on the emulated board (marker
``emulated``; one booted guest with console, block and net for the module).

Each test arms a fault through the daemon's control socket, as ``avatar-hw inject``
does, watches the guest's drivers react, and clears it.
"""

import time

import pytest

from avatar_hw import control
from avatar_hw.emulated.session import EmulatedBoard
from test_emulated_devices import run
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)
from test_emulated_net import GUEST_IP, GUEST_MAC, HOST_IP, Peer

MIB = 1 << 20


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    image, switch = tmp / "disk.img", str(tmp / "switch.sock")
    with open(image, "wb") as f:
        f.truncate(8 * MIB)
    board = EmulatedBoard(devices=f'block = {{ image = "{image}" }}\n'
                                  f'net = {{ switch = "{switch}", mac = "{GUEST_MAC}" }}\n')
    board.start()
    try:
        board.guest = board.shell(timeout=120)
        board.peer = Peer(switch, str(tmp / "peer.sock"))
        board.peer.start()
        yield board
    finally:
        if getattr(board, "peer", None) is not None:
            board.peer.stop()
        board.stop()


@pytest.fixture
def inject(board):
    path = board.daemon.control.path

    def inject_(device, fault, **options):
        return control.request("inject", path, vm=0, device=device, fault=fault,
                               options=options)
    inject_.fired = lambda: [f["fired"] for d in control.request("faults", path)
                             for f in d["faults"]]
    yield inject_
    control.request("clear", path)


def test_fault_inject_ioerr_is_an_eio_in_the_guests_dd(board, inject):
    inject("block", "ioerr", sectors="2048-2055")             # the 4 KiB at 1 MiB
    output, status = board.guest.run(
        "dd if=/dev/vda of=/dev/null bs=4096 skip=256 count=1", 60)
    assert status != 0 and "Input/output error" in output, output
    run(board, "dd if=/dev/vda of=/dev/null bs=4096 skip=257 count=1")
    assert inject.fired()[0] >= 1       # busybox dd reads through the page cache: readahead,
                                        # then maybe a retry of the one page, both refused
    assert "I/O error, dev vda, sector 2048" in run(board, "dmesg | tail -n 20")


def test_fault_inject_net_drop_loses_every_second_ping_reply(board, inject):
    run(board, f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0")
    run(board, f"ping -c 1 -W 5 {HOST_IP}")             # ARP done before the fault
    inject("net", "drop", every=2, direction="rx")
    output = run(board, f"ping -c 4 -i 0.5 -W 2 {HOST_IP}")   # busybox: 0 if any came
    assert "4 packets transmitted, 2 packets received, 50% packet loss" in output, output
    assert "seq=0 " in output and "seq=1 " not in output and "seq=2 " in output
    assert inject.fired() == [2]


def test_fault_inject_console_stall_delays_output_and_loses_none(board, inject):
    inject("console", "stall", seconds=1.5)
    start = time.monotonic()
    output = run(board, "seq 1 300 | tr '\\n' ' '")
    assert time.monotonic() - start >= 1.5
    assert output.split() == [str(i) for i in range(1, 301)]


def test_fault_inject_daemon_pause_holds_the_guest_then_serves_it(board, inject):
    control.request("pause", board.daemon.control.path, seconds=1.0)
    start = time.monotonic()
    assert run(board, "echo after-pause").strip() == "after-pause"
    assert time.monotonic() - start >= 0.9


def test_fault_inject_delayed_interrupt_completes_the_request_late(board, inject):
    inject("block", "irq-delay", ms=1500, count=1)
    start = time.monotonic()
    run(board, "dd if=/dev/vda of=/dev/null bs=512 skip=300 count=1")
    assert time.monotonic() - start >= 1.5
    assert inject.fired() == [1]


def test_fault_inject_lost_interrupt_hangs_linux_virtio_blk(board, inject):
    """What Linux 6.1 does with a lost interrupt: nothing recovers it. The read whose
    interrupt was lost waits in state D; a flush sent after it (``sync -d``: fsync of
    the disk) reaches the device and is completed, but with VIRTIO_RING_F_EVENT_IDX
    the driver's used_event still points at the lost entry, so the device correctly
    raises no interrupt for it (VirtIO 1.2 2.7.10) and the flush waits too. Last in
    this module: the guest's disk stays hung."""
    path = board.daemon.control.path

    def queue():
        debug = control.request("debug", path, vm=0, device="block")
        return debug["queues"][0]["used_idx"], debug["interrupts"]
    used, interrupts = queue()
    inject("block", "irq-drop", count=1)
    output = run(board, "dd if=/dev/vda of=/dev/null bs=512 skip=100 count=1 2>/dev/null & "
                        "sleep 2; echo state=$(cut -d' ' -f3 /proc/$!/stat)")
    assert "state=D" in output, output
    assert queue() == ((used + 1) & 0xFFFF, interrupts)      # completed, interrupt lost
    output = run(board, "busybox sync -d /dev/vda & sleep 2; "
                        "echo state=$(cut -d' ' -f3 /proc/$!/stat)")
    assert "state=D" in output, output
    assert queue() == ((used + 2) & 0xFFFF, interrupts)      # flush done, none asked for
    assert inject.fired() == [1]
