"""The emulated board's launcher API (avatar_hw/emulated/session.py, machine.py) where it
refuses what it cannot honour: checked before anything boots, no QEMU needed."""

import pytest

from avatar_hw.emulated.machine import check_vms
from avatar_hw.emulated.session import EmulatedBoard
from avatar_hw.errors import AvatarError


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
