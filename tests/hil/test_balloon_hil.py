"""The pytest plugin's ``avatar_board.balloon``: a bench (or the emulated board) asks a guest
for 32 MiB back and gives it again; the guest's driver follows."""

import re
import time

import pytest

from test_bringup import device_or_skip

pytestmark = [pytest.mark.hw, pytest.mark.emulated]
MIB = 1 << 20


def wait_balloon(board, size, timeout=60):
    deadline = time.monotonic() + timeout
    while (state := board.balloon(0))["balloon"] != size and time.monotonic() < deadline:
        time.sleep(0.1)
    return state


def mem_free(shell):
    return int(re.search(r"MemFree:\s+(\d+) kB", shell.check("cat /proc/meminfo")).group(1))


def test_balloon_takes_memory_and_gives_it_back(avatar_board, guest_shell):
    device_or_skip(avatar_board, "balloon")
    ram = avatar_board.balloon(0)["ram"]
    free = mem_free(guest_shell)
    state = avatar_board.balloon(0, f"{(ram - 32 * MIB) // MIB}M")
    assert state["balloon_target"] == 32 * MIB
    assert wait_balloon(avatar_board, 32 * MIB)["balloon"] == 32 * MIB
    assert free - mem_free(guest_shell) >= 24 * 1024                 # kB
    avatar_board.balloon(0, ram)
    assert wait_balloon(avatar_board, 0)["balloon"] == 0
