"""docs/board-setup.md's check that no Linux driver owns a board SPI runs as written, on a
/proc/interrupts of each GIC chip naming and a layout shaped like ``avatar-hw layout --json``."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = (Path(__file__).resolve().parent.parent / "docs" / "board-setup.md").read_text()
INTERRUPTS = """           CPU0       CPU1       CPU2       CPU3
 11:      12345      23456      34567      45678     {chip}  30 Level     arch_timer
 14:          0          0          0          0     {chip}  48 Level     arm-pmu
 17:          7          0          0          0     {chip}  65 Level     fe00b880.mailbox
 30:          0          0          0          0     {chip} 185 Edge      avatar-trap
 {extra}
IPI0:        10         20         30         40       Rescheduling interrupts
Err:          0
"""


def check_script():
    block = DOC[DOC.index("## 8."):]
    return re.search(r"python3 - <<'EOF'\n(.*?)\nEOF\n", block, re.S).group(1)


@pytest.mark.parametrize("chip", ["GIC-0", "GICv2"])
@pytest.mark.parametrize("extra, verdict", [
    ("", "used by Linux: none"),
    (" 31:  0  0  0  0     {chip} 193 Level     some-driver", "used by Linux: [193]"),
])
def test_board_spi_check_in_the_doc(tmp_path, chip, extra, verdict):
    board_intids = [*range(191, 208), *range(209, 224)]     # boards/rpi4.toml
    layout = {"board": "rpi4", "doorbell_intid": 185, "vms": [
        {"vm": vm, "devices": [{"slot": k, "guest_intid": 48 + 8 * vm + k,
                                "board_intid": board_intids[8 * vm + k]} for k in range(8)]}
        for vm in range(2)]}
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    (tmp_path / "interrupts").write_text(INTERRUPTS.format(chip=chip,
                                                           extra=extra.format(chip=chip)))
    script = check_script().replace("/tmp/layout.json", str(tmp_path / "layout.json")) \
        .replace("/proc/interrupts", str(tmp_path / "interrupts"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert out.strip() == f"board SPIs 191 - 206 {verdict}"


def test_mapping_check_in_the_doc_maps_every_device(tmp_path):
    """Step 7's snippet (map each UIO device once) runs as written against a UIO tree."""
    from avatar_hw.testing.fake_uio import make_tree
    block = DOC[DOC.index("## 7."):DOC.index("## 8.")]
    snippet = re.search(r"\.venv/bin/python -c '\n(.*?)'\n", block, re.S).group(1)
    tree = make_tree(tmp_path, {n: (name, [(0x40000000 + n * 0x100000, 0x10000, 0, None)])
                                for n, name in enumerate(("avatar-trap", "avatar-vm0-ram",
                                                          "avatar-vm1-ram", "avatar-gicd"))})
    assert snippet.count("find_uio(name)") == 1
    snippet = snippet.replace("find_uio(name)", f"find_uio(name, **{tree!r})")
    subprocess.run([sys.executable, "-c", snippet], check=True, timeout=60)
    (tmp_path / "dev" / "uio3").unlink()        # a missing node fails the snippet: it is live
    assert subprocess.run([sys.executable, "-c", snippet], capture_output=True,
                          timeout=60).returncode != 0
