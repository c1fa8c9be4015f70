"""The emulated board's launcher API (avatar_hw/emulated/session.py, machine.py) where it
refuses what it cannot honour: checked before anything boots, no QEMU needed."""

import glob
import re
import os
import tempfile
from types import SimpleNamespace

import pytest

from avatar_hw.emulated import board_linux, demo, session
from avatar_hw.emulated.machine import WORKDIR_PREFIX, check_vms
from avatar_hw.emulated.session import EmulatedBoard
from avatar_hw.errors import AvatarError


@pytest.fixture
def built(tmp_path, monkeypatch):
    """Everything a start builds, as empty files: a start goes straight to the machine."""
    files = {name: tmp_path / name for name in ("stub", "Image", "initrd", "board-initrd",
                                                 "guest.dtb", "board.dtb")}
    for path in files.values():
        path.write_bytes(b"x")
    monkeypatch.setattr(session, "guest_assets", lambda: SimpleNamespace(kernel=files["Image"]))
    monkeypatch.setattr(session, "build_stub", lambda: files["stub"])
    monkeypatch.setattr(session, "build_initramfs", lambda assets: files["initrd"])
    monkeypatch.setattr(session, "build_dtb", lambda **kwargs: files["guest.dtb"])
    monkeypatch.setattr(board_linux, "build_board_initramfs",
                        lambda *args, **kwargs: files["board-initrd"])
    monkeypatch.setattr(board_linux, "build_board_dtb", lambda **kwargs: files["board.dtb"])
    return files


def workdirs():
    return glob.glob(os.path.join(tempfile.gettempdir(), f"{WORKDIR_PREFIX}{os.getpid()}-*"))


@pytest.mark.parametrize("vms", [0, 5, -1, "2", 2.0, None, True, False])
def test_vms_is_a_count_of_one_to_four(vms):
    """``vms=True`` was taken for 1 (a bool is an int) and QEMU got ``-smp True``."""
    with pytest.raises(AvatarError, match=r"runs 1 to 4 VMs \(one per CPU\), not "):
        check_vms(vms)
    with pytest.raises(AvatarError):
        EmulatedBoard(vms=vms)


def test_board_modes_console_sockets_reach_qemu_with_their_commas_doubled():
    from avatar_hw.emulated.board_linux import console_args
    args = console_args("/tmp/a,b/board.sock", "/tmp/a,b/guest.sock")
    assert "socket,id=boardcon,path=/tmp/a,,b/board.sock,server=on,wait=on" in args
    assert "socket,id=guestcon,path=/tmp/a,,b/guest.sock,server=on,wait=on" in args


def test_a_board_mode_start_that_fails_before_qemu_leaves_no_directory(built, monkeypatch):
    """QEMU not installed (EmulatedMachine refuses): the consoles' directory went with it."""
    def no_qemu(*args, **kwargs):
        raise AvatarError("qemu-system-aarch64 not found")
    monkeypatch.setattr(session, "EmulatedMachine", no_qemu)
    before = workdirs()
    for _ in range(2):
        with pytest.raises(AvatarError, match="not found"):
            EmulatedBoard(board_linux=True).start()
    assert workdirs() == before


@pytest.mark.parametrize("keywords, named", [
    ({"vms": 2}, "vms="), ({"devices": "rng = {}"}, "devices="),
    ({"devices": ["", "rng = {}"], "vms": 2}, "vms="), ({"config": "vms.toml"}, "config="),
    ({"control_path": "/tmp/c.sock"}, "control_path="), ({"wait": "busy-poll"}, "wait="),
    ({"trace": True}, "trace="), ({"daemon_process": True}, "daemon_process=")])
def test_board_mode_refuses_what_only_host_mode_honours(keywords, named):
    """They were taken and ignored: no daemon of this process ever read them."""
    with pytest.raises(AvatarError) as refused:
        EmulatedBoard(board_linux=True, **keywords)
    assert str(refused.value).startswith(f"{named}: ") and "\n" not in str(refused.value)
    assert str(refused.value).endswith(f"; leave {named} out")


@pytest.mark.parametrize("keywords, vm, message", [
    ({}, 1, "vm=1: the board runs VMs 0..0 (vms=1)"),
    ({}, -1, "vm=-1: the board runs VMs 0..0 (vms=1)"),
    ({"vms": 2}, True, "vm=True: the board runs VMs 0..1 (vms=2)"),
    ({"board_linux": True}, 0, "vm=0: board mode runs one guest, VM 1 (VM 0 is the board "
                               "Linux: board_shell())")])
def test_shell_refuses_a_vm_the_board_does_not_run(keywords, vm, message):
    """vm=1 on a one-VM board was an IndexError, vm=-1 the last VM."""
    with pytest.raises(AvatarError) as refused:
        EmulatedBoard(**keywords).shell(vm=vm)
    assert str(refused.value) == message


@pytest.mark.parametrize("keywords, message", [
    ({}, "the daemon runs in a thread of this process; EmulatedBoard(daemon_process=True) "
         "runs it in its own"),
    ({"board_linux": True}, "in board mode the daemon runs in the board Linux"),
    ({"daemon_process": True}, "the board is not running (start() starts it)")])
@pytest.mark.parametrize("method", ["kill_daemon", "start_daemon"])
def test_the_daemon_process_methods_refuse_a_board_without_one(keywords, message, method):
    """kill_daemon() was an AttributeError; start_daemon() in thread mode started a second
    daemon beside the thread's."""
    with pytest.raises(AvatarError, match=rf"^{method}\(\): {re.escape(message)}"):
        getattr(EmulatedBoard(**keywords), method)()


@pytest.mark.parametrize("vms, said", [
    (1, "the emulated board runs one guest, VM 0: vm.2 left out (--vms 3 boots it); vm.5, "
        "vm.7 left out: VMs above 3 cannot run on the emulated board (one per CPU, 4 at most)"),
    (4, "the emulated board runs 4 guests, VMs 0..3: vm.5, vm.7 left out: VMs above 3 cannot "
        "run on the emulated board (one per CPU, 4 at most)")])
def test_vms_beyond_the_boards_cpus_are_left_out_saying_they_cannot_run(tmp_path, caplog,
                                                                       vms, said):
    """vm.5 was "left out (--vms 6 boots it)", though --vms takes 4 at most, and the demo
    refused the config ("the board has VMs 0..3") that EmulatedBoard took."""
    config = tmp_path / "vms.toml"
    config.write_text("[vm.0]\nrng = {}\n[vm.2]\nrng = {}\n[vm.5]\nrng = {}\n[vm.7]\nrng = {}\n")
    demo._check_config_has_vm(config, 0, vms)            # the demo boots it too
    paths = [tmp_path / f"c{vm}.sock" for vm in range(vms)]
    kept = session.vms_config(config, [""] * vms, vms, paths, tmp_path).vms
    assert sorted(kept) == [vm for vm in (0, 2) if vm < vms]
    assert [r.getMessage() for r in caplog.records] == [f"{config}: {said}"]


def test_a_config_of_vms_the_board_cannot_run_suggests_none_of_them(tmp_path):
    config = tmp_path / "vms.toml"
    config.write_text("[vm.5]\nrng = {}\n")
    with pytest.raises(AvatarError) as refused:
        demo._check_config_has_vm(config, 0, 1)
    assert str(refused.value) == (f"{config}: no [vm.0], the VM this terminal (or --run) talks "
                                  "to; add [vm.0]")
