"""The emulated board's UART link (avatar_hw/emulated/machine.py): the stub's log lines and
doorbell bytes, split by the link's reader thread, over a real socket pair standing for
QEMU's UART socket."""

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
    assert list(link.lines) == ["stub: hello", "second line"]
    assert rings(link.doorbell, 3) == 3


def test_every_byte_before_eof_is_read(link):
    qemu, link = link
    qemu.sendall(RING * 250 + b"last words\n")
    qemu.close()
    link.wait_closed(10)
    assert link.closed and list(link.lines) == ["last words"]
    assert rings(link.doorbell, 250) == 250


def test_ringing_the_stub_of_a_qemu_that_is_gone_raises_nothing():
    """The daemon rings from its interrupt path: QEMU gone (its end closed, the socket
    broken) leaves no stub to wake, and nothing to raise into a device's code."""
    qemu, ours = socket.socketpair()
    qemu.close()
    with ours:
        ring_uart(ours)
        ring_uart(ours)


def test_the_vms_the_stub_says_powered_off_are_kept(link):
    """With two VMs or more, one powering off leaves QEMU running: the stub's line is the
    only sign of it. A guest's own line (``guest: ...``) saying the same counts for nothing."""
    qemu, link = link
    qemu.sendall(b"avatar-stub: vm0: guest: avatar-stub: vm1: guest powered off; 0 VM(s)\n"
                 b"avatar-stub: vm2: guest powered off; 1 VM(s) still running\n")
    assert link.wait_for_line("vm2: guest powered off", 10)
    assert link.powered_off == {2}
