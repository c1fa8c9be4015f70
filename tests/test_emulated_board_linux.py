"""Board mode (slow: marker ``emulated``): the emulated board runs the board's own Linux.

One board for the module (``EmulatedBoard(board_linux=True)``): the stub enters the
board Linux on CPU0 with the GIC its own and the guest (VM 1) on CPU1. In the board
Linux the avatar nodes (avatar_hw/overlay.py, the template of
scripts/avatar-rpi4-overlay.dts) are bound to avatar_uio; tests/board_linux/trap_doorbell.c,
the smallest device-model loop, attaches to the trap page through /dev/uioN, sleeps in
read() and answers the guest's traps, woken by the trap SPI that the stub on CPU1 raises
in the distributor.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest

from avatar_hw import abi
from avatar_hw.emulated import board_linux
from avatar_hw.emulated.session import EmulatedBoard
from avatar_hw.hil.target import EmulatedTarget
from avatar_hw.overlay import RPI4, render
from test_emulated_linux import ctrl_c_stops_a_command, pytestmark  # noqa: F401 (emulated, tools)

ROOT = Path(__file__).resolve().parent.parent
TRAPS = 4


@pytest.fixture(scope="module")
def target():
    """The pytest plugin's board-mode target (``--avatar-board-linux``): the board Linux with
    its userland (udev, Python, the daemon serving VM 1) and the guest's shell answering."""
    t = EmulatedTarget(board_linux=True).start()
    yield t
    t.close()


@pytest.fixture(scope="module")
def served(target):
    """The target's EmulatedBoard, its board Linux's shell (``shell_``) and the guest's
    console (``guest``: run, and ``banner``, what the guest's init printed)."""
    b = target.emulated
    b.shell_ = target.board_shell
    b.guest = target.console(target.guest_vm)
    b.guest.banner = target.guest_banner
    return b


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    probe = tmp_path_factory.mktemp("board") / "trap_doorbell"
    subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror",
                    "-o", str(probe), str(ROOT / "tests" / "board_linux" / "trap_doorbell.c")],
                   check=True, timeout=120)
    with EmulatedBoard(board_linux=True, board_userland=False,
                       board_files={"bin/trap_doorbell": (probe.read_bytes(), 0o755)}) as b:
        b.shell_ = b.board_shell()
        yield b


def test_board_linux_overlay_is_the_template_of_the_rpi4_overlay():
    """scripts/avatar-rpi4-overlay.dts is render(RPI4): the Pi's nodes and the emulated
    board's come from one template and cannot drift."""
    assert (ROOT / "scripts" / "avatar-rpi4-overlay.dts").read_text() == render(RPI4)
    emulated = board_linux.board_overlay()
    for node in ("avatar-trap {", "avatar-vm1-ram {", "avatar-gicd@8000000 {",
                 'compatible = "avatar,uio";', "memory-region = <&avatar_trap_mem>;",
                 "interrupts = <0 240 1>;", "no-map;"):
        assert node in emulated


def test_board_linux_binds_avatar_uio_to_the_overlay_nodes(board):
    names, status = board.shell_.run("cat /sys/class/uio/uio*/name | sort")
    assert status == 0 and names.split() == ["avatar-gicd", "avatar-trap", "avatar-vm1-ram"]
    dmesg, _ = board.shell_.run("dmesg | grep 'avatar_uio '")
    # the trap page and the register shadow pages (memory_map.TRAP_REGION_SIZE)
    assert "avatar-trap: map 0: 0x000000005ff00000-0x000000005ff81fff (520 KiB) cacheable" in dmesg
    assert "avatar-vm1-ram: map 0: 0x0000000060000000-0x000000007fdfffff" in dmesg
    assert "avatar-gicd: map 0: 0x0000000008000000-0x0000000008000fff (4 KiB) uncached" in dmesg
    cpus, _ = board.shell_.run("grep -c ^processor /proc/cpuinfo")
    assert cpus.strip() == "1"          # CPU1 is the guest's: the board Linux never starts it


def test_board_linux_trap_doorbell_wakes_the_model_in_read(board):
    """The guest on CPU1 waits for a model; trap_doorbell attaches through /dev/uioN, and each
    trap the guest posts rings the trap SPI (INTID 272) that wakes its read()."""
    out, status = board.shell_.run(f"trap_doorbell {TRAPS}", timeout=120)
    assert status == 0, out
    traps, wakeups = (int(w) for w in out.split()[1:5:2])
    assert traps >= TRAPS and wakeups >= 1, out
    assert "slots 2, vcpu 1, first gpa 0xa010" in out, out   # VM 1's window, CPU1's slot
    interrupts, _ = board.shell_.run("grep avatar-trap /proc/interrupts")
    fields = interrupts.split()
    assert fields[2:5] == ["GIC-0", "272", "Edge"] and int(fields[1]) >= wakeups, interrupts


def test_board_linux_ctrl_c_on_its_console_stops_the_command(board):
    """The board Linux's shell (its hvc0, what socat attaches) takes Ctrl-C as the guest's does."""
    ctrl_c_stops_a_command(board.shell_)


def test_board_linux_udev_rules_own_the_uio_devices(served):
    out, status = served.shell_.run("stat -c '%U %G %a %N' /dev/uio* /dev/avatar/*")
    lines = out.splitlines()
    assert status == 0 and len(lines) == 6, out
    assert all(line.startswith("root avatar 660 ") for line in lines[:3]), out
    assert sorted(line.split("'")[1] for line in lines[3:]) == [
        "/dev/avatar/avatar-gicd", "/dev/avatar/avatar-trap", "/dev/avatar/avatar-vm1-ram"]


def test_board_linux_daemon_runs_unprivileged_from_the_unit(served):
    out, _ = served.shell_.run("ps -o user,args | grep '[a]vatar-hw serve'")
    assert out.split()[0] == "avatar", out
    assert ("--board emulated-board-linux --config /etc/avatar-hw/vms.toml "
            "--state /var/lib/avatar-hw/state --user avatar") in out
    log, _ = served.shell_.run("cat /var/log/avatar/daemon.log")
    assert "running as avatar (UID 999)" in log and "attached to avatar-trap" in log, log


def test_board_linux_list_json_shows_the_guests_devices(served):
    out, status = served.shell_.run("avatar-hw list --json", timeout=120)
    assert status == 0, out
    devices = json.loads(out)
    assert [(d["vm"], d["name"], d["irq"]) for d in devices] == [
        (1, "console", 56), (1, "block", 57), (1, "rng", 58), (1, "net", 59)]


def test_board_linux_guest_binds_its_virtio_drivers(served):
    for driver in ("virtio_console", "virtio_blk", "virtio_rng", "virtio_net"):
        assert f"driver {driver}" in served.guest.banner, served.guest.banner


def test_board_linux_block_sha256_equal_in_guest_and_board(served):
    guest, status = served.guest.run("sha256sum /dev/vda", timeout=180)
    assert status == 0, guest
    board, _ = served.shell_.run("sha256sum /var/lib/avatar-hw/disk.img", timeout=180)
    assert guest.split()[0] == board.split()[0]


def test_board_linux_console_round_trip_and_interrupt_counts(served):
    out, status = served.guest.run("echo round-$((20 + 22))-trip")
    assert status == 0 and "round-42-trip" in out
    guest, _ = served.guest.run("grep -E ' (56|57) ' /proc/interrupts")
    counts = {line.split()[3]: int(line.split()[1]) for line in guest.splitlines()}
    assert counts.get("56", 0) > 0 and counts.get("57", 0) > 0, guest
    board, _ = served.shell_.run("grep avatar-trap /proc/interrupts")
    assert int(board.split()[1]) > 0, board


def test_board_linux_register_shadows_and_posted_writes(target, served):
    """The board Linux's carve-out holds the register shadow pages too, so the stub offers
    posted writes, register shadows and its own InterruptACK in board mode and the daemon
    takes them: the guest's block reads post their QueueNotify, read InterruptStatus from
    the shadow page and have their InterruptACK taken by the stub, with no round trip
    through the daemon."""
    before = target.devices(1, "block")[0]
    out, status = served.guest.run("dd if=/dev/vda of=/dev/null bs=4k count=32 iflag=direct",
                                   timeout=180)
    assert status == 0, out
    info = target.info()
    assert info["trap"]["model_features"] == (abi.F_POSTED_WRITES | abi.F_REGISTER_SHADOW
                                              | abi.F_STUB_ACK | abi.F_PACE), info
    block = target.devices(1, "block")[0]
    assert block["posted_writes"] - before["posted_writes"] >= 32, block
    assert block["stub_acks"] - before["stub_acks"] >= 32, block
    assert block["shadow_reads"] - before["shadow_reads"] >= 32, block


def test_board_linux_target_runs_commands_and_requests_in_the_board(target, served):
    """What the pytest plugin offers in board mode: ``board_run`` in the board Linux, the
    daemon's control requests through it, the guest console of VM 1."""
    assert target.board_run("id -u avatar; exit 3") == ("999\n", 3)
    assert [vm["vm"] for vm in target.info()["vms"]] == [1]
    assert target.devices(1, "block")[0]["irq"] == 57
    report = target.diagnose_interrupts(1)
    assert "vm1 console0 IRQ 56" in report and "board mode" in report, report
    assert target.console_url(1) == f"unix://{served.console_path}"
    assert served.guest.check("uname -m") == "aarch64\n"


def test_board_linux_restart_under_guest_block_exact_and_no_reset(served):
    """Last in the module (it restarts the board's daemon): while the guest writes its disk,
    ``kill -9`` the daemon in the board Linux and run the unit's start script again; the
    new daemon restores the devices from /var/lib/avatar-hw/state, the write is exact and
    the guest's drivers never reset."""
    guest, board = served.guest, served.shell_

    def ok(shell, command, timeout=120):
        out, status = shell.run(command, timeout)
        assert status == 0, (command, out)
        return out

    ok(guest, "dd if=/dev/urandom of=/tmp/src bs=64k count=8 2>/dev/null")
    source_sum = ok(guest, "sha256sum /tmp/src").split()[0]
    statuses = ok(guest, "cat /sys/bus/virtio/devices/*/status")
    dmesg_lines = int(ok(guest, "dmesg | wc -l"))
    ok(guest, "(for i in 1 2 3 4 5 6; do dd if=/tmp/src of=/dev/vda bs=4k oflag=direct "
              "2>/dev/null; done; touch /tmp/blk.done) >/dev/null 2>&1 & true")
    ok(board, "pid=$(ps -o pid,args | grep '[a]vatar-hw serve' | awk '{print $1}'); "
              "kill -9 $pid; while kill -0 $pid 2>/dev/null; do sleep 0.1; done")
    ok(board, "/usr/lib/avatar-hw/start-unit >>/var/log/avatar/daemon.log 2>&1 & n=0; "
              "until [ $(grep -c 'serving 1 VM' /var/log/avatar/daemon.log) -ge 2 ] || "
              "[ $n -ge 300 ]; do sleep 1; n=$((n + 1)); done", timeout=330)
    log = ok(board, "cat /var/log/avatar/daemon.log")
    assert "block restored" in log and "console restored" in log, log

    ok(guest, "n=0; until [ -e /tmp/blk.done ] || [ $n -ge 300 ]; do sleep 1; "
              "n=$((n + 1)); done; [ -e /tmp/blk.done ]", timeout=330)
    written = ok(guest, "dd if=/dev/vda bs=64k count=8 iflag=direct 2>/dev/null | sha256sum")
    assert written.split()[0] == source_sum
    on_board = ok(board, "head -c 524288 /var/lib/avatar-hw/disk.img | sha256sum")
    assert on_board.split()[0] == source_sum
    assert ok(guest, "cat /sys/bus/virtio/devices/*/status") == statuses
    new_lines = ok(guest, f"dmesg | tail -n +{dmesg_lines + 1}")
    assert not re.search(r"virtio|vd[a-z]|hvc|I/O error|reset", new_lines), new_lines
    block = ok(board, "avatar-hw info --json | python3 -c 'import json, sys; print(*next("
                      "(d[\"status\"], d[\"requests\"]) for vm in json.load(sys.stdin)[\"vms\"] "
                      "for d in vm[\"devices\"] if d[\"name\"] == \"block\"))'", timeout=120)
    status, requests = block.split()
    assert status == "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK"
    assert int(requests) > 0            # the new daemon wrote: the kill was mid-transfer
