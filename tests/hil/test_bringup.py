"""Bring-up suite: the hypervisor runs, guest consoles answer, devices work, interrupts arrive.

On a bench (next to a running ``avatar-hw serve`` on the board's Linux)::

    pytest --avatar-board boards/rpi4.toml --avatar-console /dev/ttyUSB0 tests/hil

Without ``--avatar-board`` the same tests run on the emulated board. A failing
test's report carries the interrupt diagnosis (see avatar_hw/hil/pytest_plugin.py).
"""

import re

import pytest

from avatar_hw.hil.target import device_available

pytestmark = [pytest.mark.hw, pytest.mark.emulated]


def device_or_skip(board, name):
    """VM 0's first device called ``name``, or a skip saying how to get one."""
    found = board.devices(0, name)
    if found:
        return found[0]
    if board.kind == "emulated" and not device_available(name):
        pytest.skip(f"avatar_hw.devices.{name} is not in this tree yet: the emulated board "
                    f"serves no {name} device")
    pytest.skip(f"VM 0 has no {name} device: add one to the VMs config of the daemon")


def guest_interrupts(shell, irq_names):
    """The guest's interrupt counts (summed over CPUs) of /proc/interrupts lines naming one of
    ``irq_names``: {name: count}."""
    output = shell.check("cat /proc/interrupts")
    counts = {}
    for line in output.splitlines()[1:]:
        fields = line.split()
        numbers = [int(f) for f in fields[1:] if f.isdigit()]
        for name in irq_names:
            if name in fields[-1]:
                counts[name] = counts.get(name, 0) + sum(numbers)
    return counts


def test_hypervisor_runs_and_the_model_is_attached(avatar_board, guest_shell):
    """The stub set up the trap page and the guest (its shell answering) went through it."""
    info = avatar_board.info()
    trap = info["trap"]
    assert trap["abi"].startswith("1."), f"trap page ABI {trap['abi']}"
    assert trap["slots"] >= 1, "the stub announced no vCPU slots"
    assert trap["served"] > 0, "no guest access reached the daemon: is the guest running?"
    assert trap["malformed"] == 0


def test_guest_drivers_bound_every_device(avatar_board, guest_shell):
    for device in avatar_board.devices(0):
        assert "DRIVER_OK" in device["status"], (
            f"{device['name']}{device['slot']}: status {device['status']}")
    output = guest_shell.check("for d in /sys/bus/virtio/devices/*; do echo $(cat $d/device) "
                               "$(basename $(readlink $d/driver)); done")
    bound = sorted(tuple(line.split()) for line in output.splitlines())
    expected = sorted((f"0x{d['device_id']:04x}", ) for d in avatar_board.devices(0))
    assert [b[:1] for b in bound] == expected, output
    assert all(len(b) == 2 and b[1] != "none" for b in bound), output


def test_guest_console_answers(guest_shell):
    assert guest_shell.run("echo $((6 * 7))") == ("42\n", 0)
    assert guest_shell.run("uname -m") == ("aarch64\n", 0)
    output, status = guest_shell.run("head -c 3000 /dev/zero | tr '\\0' x; echo")
    assert (output, status) == ("x" * 3000 + "\n", 0)         # more than one buffer's worth


def test_console_interrupts_arrive(avatar_board, guest_shell):
    """Each command round trip needs the guest to take console interrupts: the daemon's count
    and the guest's own count both move."""
    console = device_or_skip(avatar_board, "console")
    before_host = console["interrupts"]
    before_guest = guest_interrupts(guest_shell, ["virtio0"]).get("virtio0", 0)
    for _ in range(3):
        guest_shell.check("true")
    after_host = avatar_board.devices(0, "console")[0]["interrupts"]
    after_guest = guest_interrupts(guest_shell, ["virtio0"]).get("virtio0", 0)
    assert after_host > before_host, "the daemon raised no console interrupt"
    assert after_guest > before_guest, (
        "the guest took no console interrupt (its /proc/interrupts 'virtio0' count did not "
        f"move from {before_guest}):\n{avatar_board.diagnose_interrupts()}")


def test_block_write_then_read_back(avatar_board, guest_shell):
    device_or_skip(avatar_board, "block")
    disk = guest_shell.check("ls /sys/block | grep '^vd' | head -n 1").strip()
    assert disk, "no /dev/vd* in the guest"
    offset = 1024                                    # 512-byte sectors into the disk
    guest_shell.check(f"head -c 65536 /dev/urandom > /tmp/pattern && dd if=/tmp/pattern "
                      f"of=/dev/{disk} bs=512 seek={offset} conv=fsync 2>/dev/null")
    guest_shell.check("echo 3 > /proc/sys/vm/drop_caches")
    written = guest_shell.check("md5sum < /tmp/pattern").split()[0]
    read = guest_shell.check(f"dd if=/dev/{disk} bs=512 skip={offset} count=128 2>/dev/null "
                             "| md5sum").split()[0]
    assert read == written


def test_rng_gives_random_bytes(avatar_board, guest_shell):
    device_or_skip(avatar_board, "rng")
    current = guest_shell.check("cat /sys/class/misc/hw_random/rng_current").strip()
    assert current.startswith("virtio_rng"), current
    samples = [guest_shell.check("head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \\n'").strip()
               for _ in range(2)]
    assert all(re.fullmatch("[0-9a-f]{128}", s) for s in samples), samples
    assert samples[0] != samples[1] and samples[0] != "00" * 64
