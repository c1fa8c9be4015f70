"""scripts/install-board, run with DESTDIR (files under a directory, system commands printed):
what it installs, that a second run changes nothing, and its one-line errors."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ("avatar_uio.c", "Kbuild", "Makefile", "dkms.conf")

pytestmark = pytest.mark.skipif(shutil.which("dtc") is None,
                                reason="needs dtc (device-tree-compiler; scripts/setup)")


@pytest.fixture
def checkout(tmp_path):
    """A copy of the files the script uses, so a test can add the systemd unit."""
    copy = tmp_path / "checkout"
    for part in ("scripts", "udev", "boards/linux"):
        shutil.copytree(ROOT / part, copy / part)
    (copy / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "board-setup.md", copy / "docs")
    venv_avatar_hw = copy / ".venv" / "bin" / "avatar-hw"      # what scripts/setup makes
    venv_avatar_hw.parent.mkdir(parents=True)
    venv_avatar_hw.write_text("#!/bin/sh\n")
    venv_avatar_hw.chmod(0o755)
    return copy


@pytest.fixture
def destdir(tmp_path):
    dest = tmp_path / "dest"
    (dest / "boot" / "firmware").mkdir(parents=True)
    (dest / "boot" / "firmware" / "config.txt").write_text("[pi4]\narm_boost=1\n")
    (dest / "etc" / "avatar-hw").mkdir(parents=True)
    shutil.copy(ROOT / "boards" / "vms-example.toml", dest / "etc" / "avatar-hw" / "vms.toml")
    return dest


def install(checkout, destdir, *args):
    return subprocess.run(["bash", str(checkout / "scripts" / "install-board"), *args],
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "DESTDIR": str(destdir)},
                          capture_output=True, text=True, timeout=60)


def test_scripts_parse_and_help_names_every_option():
    for script in ("install-board", "install-udev-rules"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True, timeout=30)
    result = subprocess.run([str(ROOT / "scripts" / "install-board"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in ("--user", "--boot", "--edit-config", "DESTDIR"):
        assert option in result.stdout


def test_installs_driver_rules_overlay_and_prints_the_config_line(checkout, destdir):
    result = install(checkout, destdir, "--user", "alice")
    assert result.returncode == 0, result.stderr
    src = destdir / "usr" / "src" / "avatar-uio-1.0"
    for name in DRIVER:
        assert (src / name).read_bytes() == (ROOT / "boards" / "linux" / name).read_bytes()
    out = result.stdout
    for command in ("dkms add -m avatar-uio -v 1.0", "dkms build -m avatar-uio -v 1.0",
                    "dkms install -m avatar-uio -v 1.0", "groupadd --system avatar",
                    "usermod -aG avatar alice", "udevadm trigger --subsystem-match=uio",
                    "useradd --system --gid avatar"):
        assert f"would run: {command}" in out, command
    assert (destdir / "etc" / "modules-load.d" / "avatar-hw.conf").read_text().splitlines()[-1] \
        == "avatar_uio"
    assert (destdir / "etc" / "udev" / "rules.d" / "99-avatar-hw.rules").read_bytes() == \
        (ROOT / "udev" / "99-avatar-hw.rules").read_bytes()
    dtbo = destdir / "boot" / "firmware" / "overlays" / "avatar-rpi4.dtbo"
    nodes = subprocess.run(["fdtget", "-l", str(dtbo), "/fragment@1/__overlay__"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert "avatar-trap" in nodes
    assert "\ndtoverlay=avatar-rpi4\n" in out
    assert (destdir / "boot" / "firmware" / "config.txt").read_text() == "[pi4]\narm_boost=1\n"
    assert "avatar-hw.service installed and enabled" in out
    again = install(checkout, destdir, "--user", "alice").stdout
    assert "driver sources in" not in again and "installed /boot/firmware/overlays" not in again


def test_edit_config_adds_the_overlay_line_once(checkout, destdir):
    config = destdir / "boot" / "firmware" / "config.txt"
    for _ in range(2):
        assert install(checkout, destdir, "--edit-config").returncode == 0
    text = config.read_text()
    assert text.startswith("[pi4]\narm_boost=1\n") and text.count("dtoverlay=avatar-rpi4") == 1
    assert text.endswith("[all]\n# avatar-hw (scripts/install-board)\ndtoverlay=avatar-rpi4\n")
    assert "loads the overlay" in install(checkout, destdir).stdout


def test_installs_and_enables_the_shipped_systemd_unit(checkout, destdir):
    unit = checkout / "boards" / "linux" / "avatar-hw.service"
    out = install(checkout, destdir).stdout
    assert (destdir / "etc" / "systemd" / "system" / "avatar-hw.service").read_bytes() == \
        unit.read_bytes()
    assert "would run: systemctl daemon-reload" in out
    assert "would run: systemctl enable avatar-hw.service" in out
    documentation = [line.partition("=")[2] for line in unit.read_text().splitlines()
                     if line.startswith("Documentation=")]
    assert documentation and all(url.startswith("file:///") for url in documentation)
    for url in documentation:                    # systemctl help avatar-hw finds them
        assert (destdir / url[len("file:///"):]).read_bytes() == \
            (ROOT / "docs" / Path(url).name).read_bytes()
    unit.unlink()
    assert "no systemd unit installed" in install(checkout, destdir).stdout


DROPIN = Path("etc/systemd/system/avatar-hw.service.d/venv.conf")


def test_the_unit_runs_the_venvs_avatar_hw_unless_systemd_finds_one(checkout, destdir):
    """ExecStart= names avatar-hw bare; scripts/setup installs it only into .venv. The drop-in
    empties ExecStart= first: systemd refuses two for Type=notify."""
    assert install(checkout, destdir).returncode == 0
    [exec_start] = [line for line in (checkout / "boards/linux/avatar-hw.service").read_text()
                    .splitlines() if line.startswith("ExecStart=")]
    assert (destdir / DROPIN).read_text().splitlines()[1:] == [
        "[Service]", "ExecStart=",
        exec_start.replace("=avatar-hw ", f"={checkout}/.venv/bin/avatar-hw ", 1)]
    installed = destdir / "usr" / "local" / "bin" / "avatar-hw"       # e.g. pip install
    installed.parent.mkdir(parents=True)
    shutil.copy(checkout / ".venv" / "bin" / "avatar-hw", installed)
    assert install(checkout, destdir).returncode == 0
    assert not (destdir / DROPIN).exists()


def test_the_unit_is_enabled_only_once_the_vms_config_exists(checkout, destdir):
    (destdir / "etc" / "avatar-hw" / "vms.toml").unlink()
    out = install(checkout, destdir).stdout
    assert "systemctl enable" not in out.replace("sudo systemctl enable avatar-hw", "")
    assert ("avatar-hw.service installed, not enabled: no /etc/avatar-hw/vms.toml yet; create it "
            f"(sudo install -D -m 0644 {checkout}/boards/vms-example.toml /etc/avatar-hw/vms.toml"
            ", then edit it), then run this again or: sudo systemctl enable avatar-hw") in out


def test_no_avatar_hw_for_the_unit_is_one_line_before_anything_changes(checkout, destdir):
    shutil.rmtree(checkout / ".venv")
    result = install(checkout, destdir)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "install-board: no avatar-hw for avatar-hw.service: none in /usr/local/bin, /usr/bin, "
        f"... and no {checkout}/.venv/bin/avatar-hw: run scripts/setup first\n")
    assert not (destdir / "usr").exists()


def test_changed_driver_sources_are_reinstalled(checkout, destdir):
    install(checkout, destdir)
    source = checkout / "boards" / "linux" / "avatar_uio.c"
    source.write_text(source.read_text() + "/* changed */\n")
    assert "driver sources in" in install(checkout, destdir).stdout
    assert (destdir / "usr" / "src" / "avatar-uio-1.0" / "avatar_uio.c").read_text().endswith(
        "/* changed */\n")


@pytest.mark.parametrize("args, message", [
    (("--frobnicate",), "unknown option '--frobnicate'"),
    (("--user",), "--user needs a user name"),
    (("--boot", "/nowhere"), "/nowhere/config.txt not found"),
])
def test_bad_input_is_one_line(checkout, destdir, args, message):
    result = install(checkout, destdir, *args)
    assert result.returncode == 2 and result.stderr.startswith("install-board: ")
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_no_boot_partition_is_one_line(checkout, tmp_path):
    result = install(checkout, tmp_path / "empty")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no config.txt in" in result.stderr and "--boot DIR" in result.stderr


def test_the_old_generic_uio_setup_is_pointed_out(checkout, destdir):
    assert "no longer needed" not in install(checkout, destdir).stdout
    (destdir / "etc" / "modprobe.d").mkdir(parents=True)
    (destdir / "etc" / "modprobe.d" / "avatar-uio.conf").write_text(
        "options uio_pdrv_genirq of_id=generic-uio\n")
    assert "uio_pdrv_genirq.of_id=generic-uio (cmdline.txt or /etc/modprobe.d) is no longer " \
        "needed" in install(checkout, destdir).stdout


def test_not_root_reruns_itself_with_sudo_keeping_the_options(checkout, tmp_path):
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "id").write_text("#!/bin/sh\necho 1000\n")
    (fake / "sudo").write_text('#!/bin/sh\necho "sudo $*"\n')
    for tool in ("id", "sudo"):
        (fake / tool).chmod(0o755)
    result = subprocess.run(["bash", str(checkout / "scripts" / "install-board"), "--user",
                             "daemon", "--edit-config"], env={"PATH": f"{fake}:/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30)
    assert result.stdout == (f"sudo {checkout}/scripts/install-board --user daemon "
                             "--edit-config\n")
    # a user that does not exist: one line before anything runs, sudo included
    result = subprocess.run(["bash", str(checkout / "scripts" / "install-board"), "--user",
                             "no-such-user-avatar"], env={"PATH": f"{fake}:/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("install-board: --user no-such-user-avatar: no such user here; "
                             "create it first\n")
