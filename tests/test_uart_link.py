"""The emulated board's UART link (avatar_hw/emulated/machine.py): the stub's log lines and
doorbell bytes, split by the link's reader thread, over a real socket pair standing for
QEMU's UART socket."""

import select
import socket
import time

import pytest

from avatar_hw.emulated.machine import DOORBELL_BYTE, UartLink, ring_uart

RING = bytes([DOORBELL_BYTE])


@pytest.fixture
def link():
    qemu, ours = socket.socketpair()
    link = UartLink(ours)
    yield qemu, link
    qemu.close()
    link.close()


def rings(doorbell, expected, timeout=10):
    """The rings ``doorbell`` counts until ``expected`` came or ``timeout`` s passed."""
    got, deadline = 0, time.monotonic() + timeout
    while got < expected and time.monotonic() < deadline:
        got += doorbell.wait(0.05)
    return got


def test_the_reader_keeps_log_lines_and_counts_doorbell_bytes(link):
    qemu, link = link
    qemu.sendall(b"stub: hel" + RING + b"lo\nsecond" + RING * 2)
    qemu.sendall(b" line\n")
    assert link.wait_for_line("second line", 10) == "second line"
    assert link.lines == ["stub: hello", "second line"]
    assert rings(link.doorbell, 3) == 3


def test_every_byte_before_eof_is_read(link):
    qemu, link = link
    qemu.sendall(RING * 250 + b"last words\n")
    qemu.close()
    link.wait_closed(10)
    assert link.closed and link.lines == ["last words"]
    assert rings(link.doorbell, 250) == 250


def test_ringing_the_stub_of_a_qemu_that_is_gone_raises_nothing():
    """The daemon rings from its interrupt path: QEMU gone (its end closed, the socket
    broken) leaves no stub to wake, and nothing to raise into a device's code."""
    qemu, ours = socket.socketpair()
    qemu.close()
    with ours:
        ring_uart(ours)
        ring_uart(ours)


def readable(fd, timeout=10):
    return bool(select.select([fd], [], [], timeout)[0])


def test_a_lent_uart_is_the_daemons_doorbell_and_still_keeps_the_log(link):
    """lend(): the reader thread parks; the doorbell it returns is the socket itself,
    readable on the stub's byte, and its ack counts the rings and keeps the log lines the
    reader would have; nothing reaches the reader's eventfd meanwhile."""
    qemu, link = link
    doorbell = link.lend()
    qemu.sendall(b"stub: lent" + RING + b"\n" + RING)
    assert readable(doorbell)
    got = 0
    while got < 2:
        assert readable(doorbell)
        got += doorbell.ack()
    assert got == 2 and link.lines == ["stub: lent"]
    assert doorbell.ack() == 0 and rings(link.doorbell, 1, timeout=0.2) == 0
    link.give_back()                        # the reader thread drains and signals again
    qemu.sendall(RING + b"back\n")
    assert rings(link.doorbell, 1) == 1 and link.wait_for_line("back", 10) == "back"


def test_a_lent_uart_at_eof_says_so_and_the_link_sees_it(link):
    qemu, link = link
    doorbell = link.lend()
    qemu.sendall(b"bye\n")
    qemu.close()
    assert readable(doorbell)
    while (count := doorbell.ack()) is not None:
        assert count == 0 and readable(doorbell)
    assert link.closed and link.lines == ["bye"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_daemon_thread_that_ends_gives_the_uart_back(link):
    """The emulated board lends the UART to its daemon's thread and has it given back
    however the thread ends (``Daemon.start_thread(on_exit=...)``): else nobody would
    read the UART any more and QEMU, its socket full, would stop with its lock held."""
    from avatar_hw.daemon import Daemon

    qemu, link = link
    link.lend()
    daemon = Daemon.__new__(Daemon)         # only the thread: run() fails at once
    daemon.trap = object()
    daemon.run = lambda: 1 / 0
    thread = daemon.start_thread(on_exit=link.give_back)
    thread.join(10)
    qemu.sendall(RING * 3)
    assert rings(link.doorbell, 3) == 3
