"""A real arm64 Linux guest on the emulated board, served by avatar-hw (slow: marker ``emulated``).

One booted board is shared by the module. The first run fetches the guest
(Debian's arm64 kernel and busybox, cached under ~/.cache/avatar-hw).
Devices for the shared guest are listed in ``DEVICES`` (TOML for [vm.0]).
"""

import shutil
from pathlib import Path

import pytest

from avatar_hw.emulated.assets import guest_assets
from avatar_hw.emulated.build import build_stub
from avatar_hw.emulated.devicetree import build_dtb
from avatar_hw.emulated.initramfs import build_initramfs
from avatar_hw.emulated.machine import EmulatedMachine
from avatar_hw.emulated.session import EmulatedBoard

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(not (shutil.which("qemu-system-aarch64") and shutil.which("dtc")
                            and shutil.which("aarch64-linux-gnu-gcc")),
                       reason="needs qemu-system-arm, device-tree-compiler and "
                              "gcc-aarch64-linux-gnu (scripts/setup)"),
]

DEVICES = ""          # more devices for the shared guest, e.g. 'rng = {}'
CONSOLE_ID = "0x0003"


@pytest.fixture(scope="module")
def board():
    board = EmulatedBoard(devices=DEVICES).start()
    shm = board.machine.shm_path
    try:
        board.guest = board.shell(timeout=120)
        yield board
    finally:
        board.stop()
    assert board.machine.process.returncode is not None
    assert not Path(shm).exists()


def test_linux_boots_without_a_model_and_powers_off():
    """No daemon: virtio probes read zero, /init finds no console and powers off via PSCI."""
    assets = guest_assets()
    initrd = build_initramfs(assets)
    dtb = build_dtb(initrd_size=initrd.stat().st_size)
    with EmulatedMachine(build_stub(), assets.kernel, dtb=dtb, initrd=initrd) as machine:
        assert machine.wait(120) == 0, machine.uart.lines
        # the UART reader may still be reading QEMU's last lines after it exited
        assert machine.uart.wait_for_line("no device model attached", 10), machine.uart.lines
        assert machine.uart.wait_for_line("guest: PSCI SYSTEM_OFF", 10), machine.uart.lines
        shm = machine.shm_path
    assert not Path(shm).exists()


def test_guest_binds_the_virtio_console_driver(board):
    assert f"virtio virtio0 device {CONSOLE_ID} driver virtio_console" in board.guest.banner
    output, status = board.guest.run("cat /sys/bus/virtio/devices/virtio0/device")
    assert (output.strip(), status) == (CONSOLE_ID, 0)
    output, status = board.guest.run("basename $(readlink /sys/bus/virtio/devices/virtio0/driver)")
    assert (output.strip(), status) == ("virtio_console", 0)


def test_shell_round_trip_over_hvc0(board):
    output, status = board.guest.run("echo avatar; echo $((40 + 2))")
    assert (output, status) == ("avatar\n42\n", 0)
    output, status = board.guest.run("exit_with() { return $1; }; exit_with 7")
    assert status == 7
    output, status = board.guest.run("tty")
    assert output.strip() == "/dev/hvc0"


def ctrl_c_stops_a_command(shell):
    """Ctrl-C typed on ``shell``'s console interrupts its foreground command (status 130)."""
    shell.sock.sendall(b"sh -c 'echo started-$((6 * 7)); exec sleep 600'\n")
    shell.read_until(rb"started-42\r*\n", 30)       # sleep runs, in the foreground
    shell.sock.sendall(b"\x03")
    shell.read_until(rb"# ", 30)                    # the shell's prompt: sleep has ended
    shell.sock.sendall(b"echo status-$?\n")
    assert shell.read_until(rb"status-(\d+)\r*\n", 30).group(1) == b"130"
    assert shell.run("echo $((1 + 1))") == ("2\n", 0)


def test_ctrl_c_on_the_console_stops_the_guests_command(board):
    """Ctrl-C typed on the console (the demo's terminal) interrupts the guest's foreground
    command: the shell's controlling tty is hvc0 and its commands do not ignore SIGINT (a
    shell started by /init with ``&`` made them ignore it, so Ctrl-C stopped nothing)."""
    ctrl_c_stops_a_command(board.guest)


def test_demo_run_prints_output_and_exits_with_the_status():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "avatar_hw", "demo", "--run",
                           "ls /sys/bus/virtio/devices; exit 3"],
                          capture_output=True, text=True, timeout=240)
    assert (done.stdout, done.returncode) == ("virtio0\n", 3), done.stderr


def test_a_shell_whose_qemu_died_says_so_and_no_power_off():
    """QEMU SIGKILLed (the OOM killer, a crash) under a running command: the shell says how
    it died (it said "the guest powered off", and the demo exited 0)."""
    import os
    import signal
    from avatar_hw.emulated.session import GuestGone
    with EmulatedBoard() as board:
        shell = board.shell(timeout=120)
        shell.sock.sendall(b"echo started-$((6 * 7)); sleep 600\n")
        shell.read_until(rb"started-42", 60)
        os.kill(board.machine.process.pid, signal.SIGKILL)
        with pytest.raises(GuestGone) as gone:
            shell.read_until(rb"never", 120)
        assert (gone.value.reason, gone.value.powered_off) == ("QEMU died (signal 9)", False)
        assert (board.alive(), board.gone(0)) == (False, (gone.value.reason, False))
