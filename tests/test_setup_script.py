"""scripts/setup, the README's first command, as a newcomer without root meets it."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_setup_without_root_or_sudo_says_what_to_do_in_one_line(tmp_path):
    """Packages missing, not root, no sudo: one line naming them and what to do, and no apt."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "dirname", "grep"):           # what the script runs before apt
        (tools / tool).symlink_to(shutil.which(tool))
    for name, body in {"id": "echo 1000", "dpkg-query": "exit 1",
                       "apt-get": f"touch {tmp_path}/apt-ran"}.items():
        (tools / name).write_text(f"#!/bin/sh\n{body}\n")
        (tools / name).chmod(0o755)
    result = subprocess.run([str(tools / "bash"), str(ROOT / "scripts" / "setup")],
                            env={"PATH": str(tools)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("setup: installing ")
    assert "qemu-system-arm" in result.stderr and "run scripts/setup as root" in result.stderr
    assert not (tmp_path / "apt-ran").exists()
