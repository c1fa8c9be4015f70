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
