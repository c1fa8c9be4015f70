"""The emulated board's UART link (avatar_hw/emulated/machine.py): the stub's log lines and
doorbell bytes, read by the link's thread or by a daemon's direct doorbell, over a real
socket pair standing for QEMU's UART socket."""

import select
import socket
import time

import pytest

from avatar_hw.emulated.machine import DOORBELL_BYTE, UartLink

RING = bytes([DOORBELL_BYTE])


@pytest.fixture
def link():
    qemu, ours = socket.socketpair()
    link = UartLink(ours)
    yield qemu, link
    qemu.close()
    link.close()


def until(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def rings_through(doorbell, expected, timeout=10):
    """Ack ``doorbell`` whenever it is readable until ``expected`` rings came; returns them."""
    got, deadline = 0, time.monotonic() + timeout
    while got < expected and time.monotonic() < deadline:
        if select.select([doorbell], [], [], 0.05)[0]:
            got += doorbell.ack()
    return got


def test_the_reader_keeps_log_lines_and_counts_doorbell_bytes(link):
    qemu, link = link
    qemu.sendall(b"stub: hel" + RING + b"lo\nsecond" + RING * 2)
    qemu.sendall(b" line\n")
    assert link.wait_for_line("second line", 10) == "second line"
    assert link.lines == ["stub: hello", "second line"]
    assert rings_through(link.doorbell, 3) == 3


def test_a_direct_doorbell_gets_every_ring_and_the_log_keeps_its_order(link):
    qemu, link = link
    doorbell = link.direct_doorbell()
    try:
        for n in range(200):
            qemu.sendall(RING + f"line {n}\n".encode() if n % 2 else RING)
        assert rings_through(doorbell, 200) == 200
        until(lambda: len(link.lines) == 100)
        assert link.lines == [f"line {n}" for n in range(1, 200, 2)]
        assert not select.select([doorbell], [], [], 0)[0]
    finally:
        doorbell.close()


def test_bytes_a_direct_doorbell_leaves_unread_are_drained_and_their_rings_kept(link):
    """QEMU stalls on a full UART: what a daemon does not read, the reader drains (every
    WATCH_S), and those rings wait on the doorbell for the daemon."""
    qemu, link = link
    doorbell = link.direct_doorbell()
    try:
        qemu.sendall(RING * 5 + b"while the daemon is away\n")
        assert link.wait_for_line("while the daemon is away", 10)
        until(lambda: not select.select([link.sock], [], [], 0)[0])
        assert rings_through(doorbell, 5) == 5
    finally:
        doorbell.close()


def test_closing_the_direct_doorbell_gives_the_reading_back_to_the_reader(link):
    qemu, link = link
    link.direct_doorbell().close()
    qemu.sendall(RING * 2 + b"back\n")
    assert link.wait_for_line("back", 10) == "back"
    assert rings_through(link.doorbell, 2) == 2


def test_at_eof_the_direct_doorbell_stops_being_readable(link):
    qemu, link = link
    doorbell = link.direct_doorbell()
    try:
        qemu.sendall(RING + b"last words\n")
        qemu.close()
        until(lambda: select.select([doorbell], [], [], 0)[0] and (doorbell.ack() or True)
              and link.closed)
        doorbell.ack()
        assert link.lines == ["last words"]
        assert not select.select([doorbell], [], [], 0.2)[0]      # no busy loop at EOF
        link.wait_closed(1)
    finally:
        doorbell.close()
