"""virtio-balloon used by a real arm64 Linux guest on the emulated board (marker ``emulated``):
``avatar-hw balloon`` inflates the guest by 128 MiB and deflates it again; the guest's
/proc/meminfo, the device's ``actual``, the guest's statistics in ``avatar-hw info`` and
the host's RAM file (its allocated blocks) all follow. With DEFLATE_ON_OOM (a second
guest), a guest inflated close to its memory takes pages back when it runs out."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from avatar_hw import control
from avatar_hw.emulated.session import EmulatedBoard
from test_emulated_devices import device, run
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)

MIB = 1 << 20
BALLOON = 128 * MIB


def booted(devices):
    """A board with ``devices`` and the guest's shell, stopped after its one test (each
    guest stops before the next one boots)."""
    board = EmulatedBoard(devices=devices)
    board.start()
    try:
        board.guest = board.shell(timeout=120)
        yield board
    finally:
        board.stop()


@pytest.fixture
def board():
    # Without DEFLATE_ON_OOM Linux also takes the balloon out of MemTotal.
    yield from booted("balloon = { stats_interval = 1, deflate_on_oom = false }\n")


def meminfo(board):
    text = run(board, "cat /proc/meminfo")
    return {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


def balloon_cli(board, *args):
    done = subprocess.run([sys.executable, "-m", "avatar_hw", "balloon", "0", *args, "--json",
                           "--control", board.daemon.control.path], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def balloon_state(board):
    return control.request("balloon", board.daemon.control.path, vm=0)


def wait_balloon(board, wanted, timeout=90):
    deadline = time.monotonic() + timeout
    while True:
        state = balloon_state(board)
        if state["balloon"] == wanted or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def settled(board, balloon, inflated, deflated, timeout=30):
    """The balloon's state and the pages it gave back since the counts ``inflated`` and
    ``deflated``, once two looks 0.2 s apart agree: the guest's driver moves ``actual``
    (config space) after the host took the pages (a queue), and inflates again towards the
    target whenever it can, so one look may fall between the two."""
    def look():
        net = ((balloon.counters["pages_deflated"] - deflated)
               - (balloon.counters["pages_inflated"] - inflated))
        return balloon_state(board), net

    deadline = time.monotonic() + timeout
    last = look()
    while True:
        time.sleep(0.2)
        now = look()
        if (now[0]["balloon"], now[1]) == (last[0]["balloon"], last[1]) \
                or time.monotonic() > deadline:
            return now
        last = now


def ram_blocks(board):
    return os.stat(board.machine.ram_path).st_blocks * 512


def test_balloon_inflates_and_deflates_a_linux_guest(board):
    assert re.search(r"virtio virtio\d+ device 0x0005 driver virtio_balloon",
                     board.guest.banner), board.guest.banner
    # the guest uses (then frees) memory, so the RAM file holds pages the balloon can punch
    run(board, "dd if=/dev/zero of=/tmp/fill bs=1M count=160 2>/dev/null; rm /tmp/fill")
    before, blocks = meminfo(board), ram_blocks(board)
    ram = balloon_state(board)["ram"]

    state = balloon_cli(board, f"{(ram - BALLOON) // MIB}M")
    assert state["balloon_target"] == BALLOON and state["release"] == "madvise(MADV_REMOVE)"
    state = wait_balloon(board, BALLOON)
    assert state["balloon"] == BALLOON, state
    inflated = meminfo(board)
    assert before["MemTotal"] - inflated["MemTotal"] == BALLOON
    assert before["MemFree"] - inflated["MemFree"] >= BALLOON - 16 * MIB
    freed = blocks - ram_blocks(board)
    assert freed >= BALLOON * 3 // 4, (blocks, freed)             # host memory given back
    info = control.request("info", board.daemon.control.path)
    [device] = [d for d in info["vms"][0]["devices"] if d["name"] == "balloon"]
    assert device["bytes_released"] == BALLOON and device["pages_inflated"] >= BALLOON // 4096
    assert device["pfns_ignored"] == 0 and device["status"].endswith("DRIVER_OK")
    # Linux notifies the statistics queue once before DRIVER_OK (ignored, counted)
    assert device["guest_errors"] <= 1

    # the guest's statistics arrive every second; they show the inflated guest
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = balloon_state(board)["stats"]
        if stats.get("total_memory") == inflated["MemTotal"]:
            break
        time.sleep(0.5)
    assert stats["total_memory"] == inflated["MemTotal"], stats
    assert 0 < stats["free_memory"] <= stats["total_memory"]
    assert "available_memory" in stats

    balloon_cli(board, "1G")                                    # more than its RAM: empty
    assert wait_balloon(board, 0)["balloon"] == 0
    assert meminfo(board)["MemTotal"] == before["MemTotal"]


@pytest.fixture
def oom_board():
    yield from booted("balloon = { stats_interval = 0, deflate_on_oom = true }\n")


def test_deflate_on_oom_gives_pages_back_and_the_guest_survives(oom_board):
    """With VIRTIO_BALLOON_F_DEFLATE_ON_OOM Linux 6.1 registers an OOM notifier
    (drivers/virtio/virtio_balloon.c, ``virtio_balloon_oom_notify``): each time the
    allocator runs out it leaks 256 pages from the balloon (deflate queue, then
    ``actual``) instead of killing a process. Inflate the guest to ~24 MiB free, make it
    fill a tmpfs (unreclaimable without swap) with 64 MiB: it must succeed, nothing is
    killed, and the device sees ``actual`` fall and the frames deflated."""
    board = oom_board
    run(board, "mkdir -p /oom && mount -t tmpfs -o size=512M tmpfs /oom")
    ram, free = balloon_state(board)["ram"], meminfo(board)["MemFree"]
    size = (free - 24 * MIB) // MIB * MIB
    assert size >= 64 * MIB, free
    balloon_cli(board, f"{(ram - size) // MIB}M")
    assert wait_balloon(board, size)["balloon"] == size
    assert meminfo(board)["MemFree"] < 40 * MIB
    balloon = device(board, "balloon")
    inflated, deflated = balloon.counters["pages_inflated"], balloon.counters["pages_deflated"]

    out = run(board, "dd if=/dev/zero of=/oom/fill bs=1M count=64 2>&1 && "
                     "wc -c < /oom/fill && echo alive", timeout=240)
    assert out.split()[-2:] == [str(64 * MIB), "alive"], out
    state, net = settled(board, balloon, inflated, deflated)
    assert state["balloon_target"] == size                    # the host's wish is unchanged
    assert state["balloon"] <= size - 32 * MIB, state          # the guest took pages back
    assert net * 4096 == size - state["balloon"], (net, balloon.counters, state)
    killed = run(board, "dmesg | grep -c -e 'Killed process' -e 'invoked oom-killer' || true")
    assert killed.split()[-1] == "0", "the OOM killer ran"
    run(board, "rm /oom/fill")
    balloon_cli(board, "4G")
    assert wait_balloon(board, 0)["balloon"] == 0
