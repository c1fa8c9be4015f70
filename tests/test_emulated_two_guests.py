"""Two guests on the emulated board, one of them hostile (slow: marker ``emulated``).

One board for the module: VM n on CPU n (``EmulatedBoard(vms=2)``), each with
its own window, INTIDs, RAM, console, block device, rng and net device on one
switch (bench/two_guests.py builds it, and the bench measures the time these
tests never assert). VM1 runs bench/guest/avhostile.c — its own window
scribbled from /dev/mem, notifies flooded, random registers, frames with VM0's
MAC — while VM0 moves data through its console and its block device with
SHA-256 compared on both sides; then VM1's virtio drivers are reloaded and
VM1 works again.
"""

import hashlib
import subprocess
import sys
import re
from pathlib import Path

import pytest

from avatar_hw.board import load_board
from avatar_hw.control import request
from avatar_hw.shipped import board_path
from bench import two_guests as tg
from bench.board import console_g2h, console_h2g
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)

MIB = 1 << 20
BLOCK_BYTES = 64 * MIB          # VM0 reads them, copies them, reads the copy: 256 MiB moved
# Each way over VM0's hvc0: 64 MiB take 30-50 s per direction under TCG on a loaded 2-core
# machine (bench/two_guests.py moves 64 MiB and prints the rates); the test keeps it shorter.
CONSOLE_BYTES = 16 * MIB
IMAGE_SIZES = (2 * BLOCK_BYTES, 8 * MIB)
HOSTILE_SECONDS = 30            # VM1's attack: about as long as VM0's part takes
IPS = ("10.0.3.1", "10.0.3.2")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    images = [tmp / f"vm{vm}.img" for vm in range(2)]
    board_sums = [tg.write_image(image, size) for image, size in zip(images, IMAGE_SIZES)]
    switch = str(tmp / "switch.sock")
    board = tg.start_board(tg.build_two_guest_initrd(tmp), images, switch)
    shm = board.machine.shm_path
    try:
        board.vm0, board.vm1 = tg.shells(board)
        board.images, board.first_half_sha = images, board_sums
        yield board
    finally:
        board.stop()
    assert board.machine.process.returncode is not None
    assert not Path(shm).exists() and not Path(switch).exists()


def run(shell, command, timeout=120):
    output, status = shell.run(command, timeout)
    assert status == 0, (command, output)
    return output


def sha_of(shell, device, skip_mib, count_mib):
    return run(shell, f"dd if={device} bs=1M skip={skip_mib} count={count_mib} iflag=direct "
                      "2>/dev/null | sha256sum").split()[0]


def file_sha(path, offset=0, size=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size if size is not None else -1
        while left:
            chunk = f.read(MIB if left < 0 else min(MIB, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk) if left > 0 else 0
    return h.hexdigest()


def test_two_guests_each_on_its_own_cpu_window_intids_and_ram(board):
    for vm, shell in enumerate((board.vm0, board.vm1)):
        banner = shell.banner
        for device, driver in (("0x0003", "virtio_console"), ("0x0002", "virtio_blk"),
                               ("0x0004", "virtio_rng"), ("0x0001", "virtio_net")):
            assert re.search(rf"device {device} driver {driver}", banner), (vm, banner)
        window = 0x0a000000 + 0x10000 * vm
        iomem = run(shell, "cat /proc/iomem")
        assert f"{window:08x}-{window + 0xfff:08x} : {window:x}.virtio_mmio" in iomem, iomem
        irqs = sorted(int(m) for m in re.findall(r"GIC-0\s+(\d+) Edge\s+virtio", run(
            shell, "cat /proc/interrupts")))
        assert irqs == [48 + 8 * vm + slot for slot in range(4)]
        assert run(shell, "grep -c ^processor /proc/cpuinfo").strip() == "1"
        # Its own disk: the sums match VM n's image, not the other one's.
        assert sha_of(shell, "/dev/vda", 0, IMAGE_SIZES[vm] // 2 // MIB) == board.first_half_sha[vm]
    # Separate RAM: what VM1 writes into its page cache never shows up in VM0's memory.
    info = board.daemon.info()
    assert [v["vm"] for v in info["vms"]] == [0, 1]
    assert [int(v["window"][0], 16) for v in info["vms"]] == [0x0a000000, 0x0a010000]
    assert board.daemon.trap.info()["slots"] == 2
    # What bench/two_guests.py reads, through the control socket (the daemon in a thread here).
    assert board.daemon_alive() and tg.daemon_mode(board) == "thread"
    assert [c["traps_served"] > 0 for c in tg.daemon_counters(board)] == [True, True]
    # One daemon, two guests, in boards/emulated.toml's trap.wait: both served.
    assert info["mode"] == load_board(board_path("emulated")).wait


def test_two_guests_vm0_data_exact_while_vm1_is_hostile_and_vm1_recovers(board):
    vm0, vm1, daemon = board.vm0, board.vm1, board.daemon
    run(vm0, f"ip link set eth0 up && ip addr add {IPS[0]}/24 dev eth0")
    errors_before = sum(t.guest_errors for t in daemon.subsystem._devices.values()
                        if t.memory.vm_id == 1)
    tg.start_hostile(vm1, HOSTILE_SECONDS)

    # VM0: console both ways, SHA-256 on both ends (these raise on a mismatch) ...
    console_h2g(vm0, CONSOLE_BYTES)
    console_g2h(vm0, CONSOLE_BYTES)
    # ... its disk read, copied to the second half (O_DIRECT, fsync) and read back.
    half = BLOCK_BYTES // MIB
    assert sha_of(vm0, "/dev/vda", 0, half) == board.first_half_sha[0]
    run(vm0, f"dd if=/dev/vda of=/dev/vda bs=1M count={half} seek={half} iflag=direct "
             "oflag=direct conv=fsync 2>/dev/null", timeout=300)
    assert file_sha(board.images[0], BLOCK_BYTES, BLOCK_BYTES) == board.first_half_sha[0]
    assert sha_of(vm0, "/dev/vda", half, half) == board.first_half_sha[0]

    # VM1 was hostile meanwhile and its drivers come back; the daemon served through it all.
    vm1 = tg.wait_reloaded(board, vm1, tg.RELOAD_TIMEOUT + HOSTILE_SECONDS)
    log = run(vm1, "cat /tmp/avhostile.log")
    done = re.search(r"avhostile done writes=(\d+) reads=\d+ notifies=(\d+)", log)
    assert done and int(done.group(2)) > 1000, log
    assert "avhostile exit 0" in log
    assert int(re.search(r"spoofed frames=(\d+)", log).group(1)) > 0, log
    errors_after = sum(t.guest_errors for t in daemon.subsystem._devices.values()
                       if t.memory.vm_id == 1)
    assert errors_after > errors_before
    assert board._thread.is_alive()
    info = request("info", path=daemon.control.path)
    assert [v["vm"] for v in info["vms"]] == [0, 1]
    [vm1_net] = [d for d in info["vms"][1]["devices"] if d["name"] == "net"]
    assert vm1_net["tx_wrong_source"] > 0            # VM0's MAC from VM1: dropped, counted

    # VM1 works again: its disk (which it may have scribbled itself) reads what the host
    # file holds, its rng gives bytes, its net reaches VM0.
    assert sha_of(vm1, "/dev/vda", 0, IMAGE_SIZES[1] // MIB) == file_sha(board.images[1])
    assert run(vm1, "dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c").strip() == "256"
    run(vm1, f"ip link set eth0 up && ip addr add {IPS[1]}/24 dev eth0")
    ping = run(vm1, f"ping -c 2 -W 5 {IPS[0]}", timeout=60)
    assert "2 packets received" in ping
    # And VM0's data path still holds after VM1's recovery.
    assert sha_of(vm0, "/dev/vda", half, half) == board.first_half_sha[0]


def test_two_guests_power_off_one_at_a_time(board):
    """A guest's power-off parks its CPU; the other VM runs on; the last one ends the board."""
    board.vm1.sock.sendall(b"poweroff -f\n")
    line = board.machine.uart.wait_for_line("guest powered off", 60)
    assert line and "vm1: guest powered off; 1 VM(s) still running" in line, line
    assert run(board.vm0, "echo still here").strip() == "still here"
    board.vm0.sock.sendall(b"poweroff -f\n")
    assert board.machine.wait(60) == 0


def test_demo_two_guests_runs_in_the_chosen_vm_and_names_the_other_console():
    argv = [sys.executable, "-m", "avatar_hw", "demo", "--vms", "2"]
    done = subprocess.run([*argv, "--vm", "1", "--run", "grep virtio /proc/interrupts; exit 4"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 4, done.stderr
    assert re.fullmatch(r"\s*\d+:\s+\d+\s+GIC-0\s+56 Edge\s+virtio0\n", done.stdout), done.stdout
    assert re.search(r"vm0 console port \S+: unix:/\S+/vm0-console\.sock", done.stderr), done.stderr
    assert re.search(r"vm1 console port \S+: unix:/\S+/vm1-console\.sock", done.stderr), done.stderr
    wrong = subprocess.run([*argv, "--vm", "2", "--run", "true"], capture_output=True, text=True,
                           timeout=60)
    assert (wrong.returncode, wrong.stderr) == (
        2, "avatar-hw: --vm 2: the board runs VMs 0..1 (--vms)\n")
