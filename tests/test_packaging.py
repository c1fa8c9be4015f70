"""``pip install avatar-hw`` from a wheel (not editable) runs everything, demo included: the
wheel carries the board files, the emulated board's stub sources and the trap ABI header,
and an installed avatar-hw finds them away from any checkout."""

import json
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_NEEDS = ["emulated.toml", "rpi4.toml", "emulated/start.S", "emulated/main.c",
              "emulated/trap.c", "emulated/vgic.c", "emulated/log.c", "emulated/idle.c",
              "emulated/stub.h",
              "emulated/link.ld", "abi/avatar_trap.h", "linux/avatar_uio.c", "linux/Kbuild"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=240)
    [built] = out.glob("avatar_hw-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed; its dependencies come from this venv."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], check=True, capture_output=True, text=True)
    (Path(purelib.stdout.strip()) / "deps.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n")       # pyserial, pyudev; no editable finder
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=240)
    return env


def test_the_wheel_carries_what_demo_needs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    data = "avatar_hw-0.1.0.data/data/share/avatar-hw/boards/"
    assert [n for n in DEMO_NEEDS if data + n not in names] == []
    assert "avatar_hw/emulated/session.py" in names
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in metadata


def run_installed(prefix, *argv, **kwargs):
    return subprocess.run([prefix / "bin" / argv[0], *argv[1:]], capture_output=True, text=True,
                          cwd=prefix, timeout=120, **kwargs)


def test_an_installed_avatar_hw_finds_boards_and_stub_sources(installed, tmp_path):
    where = run_installed(installed, "python", "-c", """if True:
        import json, avatar_hw
        from avatar_hw.shipped import board_path, shipped_boards, shipped_file
        print(json.dumps([avatar_hw.__file__, str(board_path("emulated")),
                          str(shipped_file("emulated/start.S")), shipped_boards()]))""")
    assert where.returncode == 0, where.stderr
    module, board, start, boards = json.loads(where.stdout)
    share = installed / "share" / "avatar-hw" / "boards"
    assert module.startswith(str(installed)) and not module.startswith(str(REPO))
    assert (board, start) == (str(share / "emulated.toml"), str(share / "emulated" / "start.S"))
    assert boards == ["emulated", "emulated-board-linux", "qemu-virt", "rpi4", "rpi4-high-peri"]
    layout = run_installed(installed, "avatar-hw", "layout", "--board", "emulated", "--vms", "1")
    assert layout.returncode == 0 and "0x0a000000" in layout.stdout, layout.stderr


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="needs aarch64-linux-gnu-gcc (scripts/setup)")
def test_an_installed_avatar_hw_builds_the_stub(installed, tmp_path):
    built = run_installed(installed, "python", "-m", "avatar_hw.emulated.build",
                          env={"AVATAR_HW_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert built.returncode == 0, built.stderr
    assert Path(built.stdout.strip()).parent == tmp_path


@pytest.mark.emulated
def test_an_installed_avatar_hw_runs_the_demo_with_the_shipped_example_away_from_the_checkout(
        installed, tmp_path):
    """The newcomer's path: the wheel in a fresh venv, `avatar-hw demo --config vms-example`
    (the example VMs config it installed), run from a directory outside any checkout."""
    from avatar_hw.hil.target import emulated_board_missing
    if emulated_board_missing() is not None:
        pytest.skip(str(emulated_board_missing()))
    done = subprocess.run([installed / "bin" / "avatar-hw", "demo", "--config", "vms-example",
                           "--run", "uname -m; ls /sys/bus/virtio/devices | wc -w"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["aarch64", "8"]
    example = installed / "share" / "avatar-hw" / "boards" / "vms-example.toml"
    assert f"{example}: the emulated board runs one guest" in done.stderr
    assert str(REPO) not in done.stderr and list(tmp_path.iterdir()) == []
