"""``avatar-hw demo`` as a user runs it (a subprocess): the devices of a VMs config, the CLI
against a running demo, several console clients, and every way of ending it leaving no
process, no /dev/shm file and no temporary directory (marker ``emulated``)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from avatar_hw.emulated import machine
from avatar_hw.endpoints import pyserial_url
from avatar_hw.hil.console import GuestConsole
from avatar_hw.processes import remove_stale_workdirs
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)
from test_pytest_plugin import SIGINT_IGNORED, OnPty

REPO = Path(__file__).resolve().parent.parent
AVATAR_HW = [sys.executable, "-m", "avatar_hw"]


def leftovers(pid):
    """What a demo with PID ``pid`` could leave: processes, RAM files, temp directories."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat.rpartition(")")[2].split()
        cmdline = Path(f"/proc/{entry}/cmdline").read_bytes() if entry.isdigit() else b""
        if fields and fields[1] == str(pid) or f"avatar-emulated-{pid}-".encode() in cmdline:
            if fields[0] != "Z":
                children.append(entry)
    shm = [n for n in os.listdir("/dev/shm") if n.startswith(f"avatar-emulated-{pid}-")]
    tmp = [n for n in os.listdir(tempfile.gettempdir())
           if n.startswith(f"{machine.WORKDIR_PREFIX}{pid}-")]
    return children, shm, tmp


def qemu_of(pid):
    children, _, _ = leftovers(pid)
    [qemu] = [c for c in children if b"qemu-system-aarch64" in
              Path(f"/proc/{c}/cmdline").read_bytes()]
    return int(qemu)


def avatar_hw(sigint_ignored=False):
    return SIGINT_IGNORED if sigint_ignored else AVATAR_HW


class Demo:
    """An interactive ``avatar-hw demo`` (stdin a pipe) and what it printed."""

    def __init__(self, *argv, sigint_ignored=False):
        self.process = subprocess.Popen(avatar_hw(sigint_ignored) + ["demo", *argv],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self.err = b""
        line = self.read_err_until(rb"control socket (\S+)\n")
        self.control = line.group(1).decode()
        self.read_err_until(rb"guest console \(hvc0\)")
        self.qemu = qemu_of(self.process.pid)

    def read_err_until(self, pattern, timeout=180):
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.err):
            assert time.monotonic() < deadline and self.process.poll() is None, self.err
            chunk = os.read(self.process.stderr.fileno(), 4096)
            assert chunk, self.err
            self.err += chunk
        return re.search(pattern, self.err)

    def cli(self, *argv):
        done = subprocess.run(AVATAR_HW + [*argv, "--control", self.control],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def end(self, timeout=30):
        status = self.process.wait(timeout)
        self.err += self.process.stderr.read()
        return status

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_demo_config_gives_the_guest_every_device_of_the_example():
    """boards/vms-example.toml as it is: VM 0's eight devices (VM 1 is left out, saying so)."""
    done = subprocess.run(AVATAR_HW + [
        "demo", "--config", str(REPO / "boards" / "vms-example.toml"), "--run",
        "ls /sys/bus/virtio/devices; cat /sys/block/vda/size; head -c 16 /dev/hwrng | wc -c; "
        "cat /sys/class/net/eth0/address; cat /sys/bus/virtio/devices/virtio6/device; "
        "basename $(readlink /sys/bus/virtio/devices/virtio4/driver); "
        "basename $(readlink /sys/bus/virtio/devices/virtio5/driver); "
        "basename $(readlink /sys/bus/virtio/devices/virtio6/driver); ls /dev/fb0; "
        "mkdir -p /mnt/share && mount -t 9p -o trans=virtio,version=9p2000.L share /mnt/share "
        "&& echo shared >/mnt/share/f && cat /mnt/share/f"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["virtio0", "virtio1", "virtio2", "virtio3", "virtio4",
                                   "virtio5", "virtio6", "virtio7", "131072", "16",
                                   "52:54:00:a7:00:00", "0x0013", "virtio_balloon",
                                   "9pnet_virtio", "vmw_vsock_virtio_transport", "/dev/fb0",
                                   "shared"]
    assert "the emulated board runs one guest, VM 0: vm.1 left out (--vms 2 boots it)" in \
        done.stderr
    assert re.search(r"vm0 slot3 net +0x0a003000 IRQ 51", done.stderr)
    pid = re.search(r"avatar-emulated-(\d+)-", done.stderr).group(1)
    assert leftovers(pid) == ([], [], [])


def test_input_from_a_pipe_runs_then_the_demo_exits_with_the_last_status():
    """``echo CMDS | avatar-hw demo``: the guest runs every line, its output is printed (a
    long one whole, the ending's own line never), then the demo exits with the last
    command's status, as ``sh <script`` would. More input than the console takes at once
    neither blocks the guest's output nor is lost."""
    filler = "".join(f": {i:05d} {'y' * 90}\n" for i in range(1000))      # 100 KB of input
    script = (f"echo $((6 * 7))-seen\n{filler}head -c 20000 /dev/zero | tr '\\0' x; echo\n"
              "seq 1 20000 | tail -n 1\nfalse\n")
    done = subprocess.run(AVATAR_HW + ["demo"], input=script.encode(), capture_output=True,
                          timeout=300)
    out = done.stdout.replace(b"\r\n", b"\n")
    assert done.returncode == 1, done.stderr[-2000:]
    assert b"\n42-seen\n" in out and b"\n" + b"x" * 20000 + b"\n" in out
    assert b"\n20000\n" in out and b": 00999 y" in out
    assert out.endswith(b"# false\n")                 # the ending's line and prompt left out
    assert b"e-" not in out.replace(b"seen", b"")
    pid = re.search(rb"avatar-emulated-(\d+)-", done.stderr).group(1).decode()
    assert leftovers(pid) == ([], [], [])


def test_input_whose_last_line_has_no_newline_still_ends():
    """``printf 'echo a\nfalse' | avatar-hw demo`` (a file an editor or printf wrote): the
    ending's command was glued to the unended last line, never ran, and the demo waited
    for ever."""
    done = subprocess.run(AVATAR_HW + ["demo"], input=b"echo $((6 * 7))-seen\nfalse",
                          capture_output=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert b"\n42-seen" in done.stdout.replace(b"\r\n", b"\n")


def test_config_takes_a_path_or_the_shipped_examples_name(tmp_path, monkeypatch):
    from avatar_hw.shipped import shipped_file
    from avatar_hw.config import config_path
    assert config_path("vms-example") == str(shipped_file("vms-example.toml"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vms-example").write_text("")               # a file of that name wins
    assert [config_path(c) for c in ("vms-example", "my.toml", "a/b", "nosuch", None)] == [
        "vms-example", "my.toml", "a/b", "nosuch", None]


def test_the_cli_and_several_console_clients_on_a_running_demo():
    demo = Demo()
    try:
        assert "vm0 slot0 console  0x0a000000 IRQ 48" in demo.cli("list")
        info = json.loads(demo.cli("info", "--json"))
        assert info["pid"] == demo.process.pid and info["board"] == "emulated"
        assert "DRIVER_OK" in json.loads(demo.cli("debug", "0", "console", "--json"))["status"]
        # `avatar-hw console 0 --control` uses the endpoints other than the demo's own.
        url = re.search(rb"vm0 console port 0: unix:(\S+)", demo.err).group(1).decode()
        first = GuestConsole.open(f"unix://{url}")
        first.wait_shell(60)
        assert first.run("echo $((6 * 7))") == ("42\n", 0)
        demo.process.stdin.write(b"echo from-the-demo-$((1 + 1))\n")
        demo.process.stdin.flush()
        first.expect("from-the-demo-2", timeout=30)          # the demo's typing, seen here
        with socket.socket(socket.AF_UNIX) as refused:      # one client at a time
            refused.settimeout(30)
            refused.connect(url)
            assert b"already has a client" in refused.recv(4096)
        assert first.run("echo still-first") == ("still-first\n", 0)
        first.close()
        second = GuestConsole.open(f"unix://{url}")        # free again
        second.wait_shell(60)
        assert second.run("echo second") == ("second\n", 0)
        second.close()
        term = OnPty("0", "--control", demo.control)         # the command a user types
        try:
            term.type("echo via-$((5 + 5))\n")
            term.expect("via-10", 60)
            term.type("\x1d")
            assert term.process.wait(10) == 0
        finally:
            term.close()
        assert demo.process.poll() is None                   # never the demo's death
        demo.process.stdin.write(b"\x1d")                    # Ctrl-]
        demo.process.stdin.flush()
        assert demo.end() == 0
    finally:
        demo.kill()
    assert leftovers(demo.process.pid) == ([], [], [])


def _signal(sig):
    def end(demo):
        os.kill(demo.process.pid, sig)
    return end


def _twice(sig):
    def end(demo):              # as timeout(1) does: the demo, then its whole process group
        os.kill(demo.process.pid, sig)
        time.sleep(0.02)
        os.kill(demo.process.pid, sig)
    return end


def _poweroff(demo):
    demo.process.stdin.write(b"poweroff -f\n")
    demo.process.stdin.flush()


def _kill_qemu(demo):           # the OOM killer, a crash
    os.kill(demo.qemu, signal.SIGKILL)


ENDINGS = {
    "SIGINT": (_signal(signal.SIGINT), 130),
    "SIGINT inherited as ignored": (_signal(signal.SIGINT), 130),
    "SIGTERM": (_signal(signal.SIGTERM), 128 + signal.SIGTERM),
    "SIGHUP": (_signal(signal.SIGHUP), 128 + signal.SIGHUP),
    "SIGTERM twice": (_twice(signal.SIGTERM), 128 + signal.SIGTERM),
    "SIGINT twice": (_twice(signal.SIGINT), 130),
    "guest poweroff": (_poweroff, 0),
    "QEMU killed": (_kill_qemu, 1),
}


@pytest.mark.parametrize("ending", ENDINGS)
def test_every_ending_leaves_nothing_behind(ending):
    end, status = ENDINGS[ending]
    demo = Demo(sigint_ignored="ignored" in ending)
    try:
        assert leftovers(demo.process.pid)[1] == []           # the RAM file is never named
        end(demo)
        assert demo.end() == status, demo.err
    finally:
        demo.kill()
    assert leftovers(demo.process.pid) == ([], [], [])
    assert b"Traceback" not in demo.err
    if ending == "guest poweroff":
        assert b"the guest powered off" in demo.err
    if ending == "QEMU killed":         # was "the guest powered off", status 0
        assert demo.err.splitlines()[-1].endswith(b"QEMU died (signal 9)")


@pytest.mark.parametrize("how", ["stdin", "--run"])
def test_with_two_vms_the_demo_ends_when_its_vm_powers_off(how):
    """VM 0 powers off and VM 1 keeps QEMU running: the demo waited for ever (stdin), or
    said the command did not finish within --timeout (--run)."""
    argv = ["demo", "--vms", "2"] + (["--run", "echo before; poweroff -f", "--timeout", "120"]
                                     if how == "--run" else [])
    done = subprocess.run(AVATAR_HW + argv, input=b"echo before; poweroff -f\n",
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"before\n" in done.stdout.replace(b"\r\n", b"\n")
    assert done.stderr.splitlines()[-1].endswith(
        b"the guest (VM 0) powered off; QEMU runs the other VMs on"), done.stderr[-2000:]
    pid = re.search(rb"avatar-emulated-(\d+)-", done.stderr).group(1).decode()
    assert leftovers(pid) == ([], [], [])


def test_the_hint_for_another_terminal_names_the_vm_the_demo_talks_to(tmp_path):
    """With --vms 2 --vm 1 and a config giving only VM 1 it named VM 0, which has no console:
    the command as printed now gets a terminal on VM 1's."""
    config = tmp_path / "vms.toml"
    config.write_text('[vm.1]\nconsole = { endpoints = ["unix:c.sock"] }\n')
    demo = Demo("--vms", "2", "--vm", "1", "--config", str(config))
    try:
        hint = demo.read_err_until(rb"another terminal: avatar-hw console (.+?)  \(").group(1)
        term = OnPty(*hint.decode().split())
        try:
            term.type("echo via-$((5 + 5))\n")
            term.expect("via-10", 60)
            demo.process.stdin.write(b"echo from-the-demo-$((1 + 1))\n")
            demo.process.stdin.flush()
            term.expect("from-the-demo-2", 60)              # the demo's console: VM 1's
            term.type("\x1d")
            assert term.process.wait(10) == 0
        finally:
            term.close()
        demo.process.stdin.write(b"\x1d")
        demo.process.stdin.flush()
        assert demo.end() == 0
    finally:
        demo.kill()


CRASHING_DEMO = """if True:
    import sys
    from avatar_hw import cli, control
    def crash(self, line):
        raise RuntimeError("simulated crash of the device model")
    control.ControlServer.answer = crash
    sys.exit(cli.main(["demo"]))
"""


def test_a_crash_of_the_daemon_ends_the_demo_and_leaves_nothing():
    """An exception out of the daemon's loop (here: from the control socket) stops it; the
    demo sees its console close, says so and cleans up."""
    demo = Demo.__new__(Demo)
    demo.process = subprocess.Popen([sys.executable, "-c", CRASHING_DEMO], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    demo.err = b""
    try:
        demo.control = demo.read_err_until(rb"control socket (\S+)\n").group(1).decode()
        demo.read_err_until(rb"guest console \(hvc0\)")
        subprocess.run(AVATAR_HW + ["list", "--control", demo.control], capture_output=True,
                       timeout=60)
        assert demo.end() == 1
    finally:
        demo.kill()
    assert b"the device model stopped" in demo.err
    assert leftovers(demo.process.pid) == ([], [], [])


def test_sigkill_of_the_demo_takes_qemu_and_the_ram_with_it():
    """Nothing runs at a SIGKILL: QEMU dies with its parent (PR_SET_PDEATHSIG), the RAM file
    was unlinked from the start, and the next start removes the temporary directory."""
    demo = Demo()
    demo.kill()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{demo.qemu}").exists() and b"Z" not in Path(
            f"/proc/{demo.qemu}/stat").read_bytes().rpartition(b")")[2][:3]:
        assert time.monotonic() < deadline, "QEMU outlived its parent"
        time.sleep(0.1)
    children, shm, tmp = leftovers(demo.process.pid)
    assert shm == [] and len(tmp) == 1
    remove_stale_workdirs(machine.WORKDIR_PREFIX)
    assert leftovers(demo.process.pid) == ([], [], [])


# -- board mode (--board-linux): one boot for the module, the signals before the board is up ----

def board_demo(*argv, sigint_ignored=False):
    """``avatar-hw demo --board-linux ARGV`` once its QEMU runs (a Demo: process, err)."""
    demo = Demo.__new__(Demo)
    demo.process = subprocess.Popen(avatar_hw(sigint_ignored) + ["demo", "--board-linux", *argv],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
    demo.err = b""
    try:
        demo.read_err_until(rb"board mode: the board Linux boots")
        demo.qemu = qemu_of(demo.process.pid)
    except BaseException:
        demo.kill()
        raise
    return demo


def test_board_linux_demo_runs_a_command_in_the_board_linux_then_in_the_guest():
    """--run-board in the board Linux (the daemon there, from the unit, as avatar), then --run
    in the guest it serves; the exit status is the guest command's; nothing is left."""
    demo = board_demo("--run-board", "avatar-hw list --json; ps -o user,args | grep '[a]vatar-hw "
                      "serve'", "--run", "grep virtio /proc/interrupts; exit 3",
                      "--timeout", "180")
    try:
        status = demo.end(timeout=900)
        out = demo.process.stdout.read().decode()
    finally:
        demo.kill()
    assert status == 3, demo.err
    devices, end = json.JSONDecoder().raw_decode(out)
    assert [(d["vm"], d["name"]) for d in devices] == [
        (1, "console"), (1, "block"), (1, "rng"), (1, "net")]
    board, guest = out[end:].strip().split("\n", 1)
    assert board.split()[0] == "avatar", board
    assert "avatar-hw serve --board emulated-board-linux" in board
    assert re.search(r"GIC-0 +56 Edge +virtio0", guest), guest
    assert b"the daemon serves VM 1" in demo.err and b"Traceback" not in demo.err
    assert leftovers(demo.process.pid) == ([], [], [])


@pytest.mark.parametrize("ending", ["SIGINT", "SIGINT inherited as ignored", "SIGTERM",
                                    "SIGHUP"])
def test_board_linux_demo_ends_on_a_signal_leaving_nothing(ending):
    """A signal while the board Linux boots stops QEMU and removes the consoles' directory."""
    demo = board_demo(sigint_ignored="ignored" in ending)
    try:
        assert leftovers(demo.process.pid)[2] != []          # the consoles' directory
        demo.process.send_signal(getattr(signal, ending.split()[0]))
        assert demo.end() == ENDINGS[ending][1], demo.err
    finally:
        demo.kill()
    assert leftovers(demo.process.pid) == ([], [], [])
    assert b"Traceback" not in demo.err


def test_a_run_that_outlasts_its_timeout_prints_its_output_and_names_the_option():
    done = subprocess.run(AVATAR_HW + ["demo", "--run", "echo started; sleep 600",
                                       "--timeout", "10"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 2 and done.stdout == "started\n", done.stderr
    assert done.stderr.splitlines()[-1] == (
        "avatar-hw: --run 'echo started; sleep 600' did not finish within 10 s: give it "
        "longer with --timeout SECONDS")
    pid = re.search(r"avatar-emulated-(\d+)-", done.stderr).group(1)
    assert leftovers(pid) == ([], [], [])


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_timeout_takes_seconds_above_zero(value):
    done = subprocess.run(AVATAR_HW + ["demo", "--run", "true", "--timeout", value],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (f"avatar-hw demo: error: argument --timeout: "
                                            f"{value!r} is not a number of seconds above 0")


def test_board_linux_demo_refuses_host_mode_options_in_one_line():
    for argv, message in ((["--board-linux", "--vms", "2"], "avatar-hw: --vms: board mode runs"),
                          (["--run-board", "true"], "avatar-hw: --run-board needs --board-linux"),
                          (["--board-linux", "--vm", "1"], "avatar-hw: --vm: board mode runs one "
                                                           "guest, VM 1"),
                          (["--board-linux", "--wait", "adaptive"],
                           "avatar-hw: --wait: in board mode the daemon runs in the board Linux "
                           "as its unit starts it")):
        done = subprocess.run(AVATAR_HW + ["demo", *argv], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
        assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("argv, fix", [([], "--vms 2 --vm 1"), (["--vms", "2"], "--vm 1")])
def test_a_config_without_the_vm_talked_to_is_refused_before_the_boot(tmp_path, argv, fix):
    """That VM would boot with no device: the console never appeared, 120 s later."""
    config = tmp_path / "vms.toml"
    config.write_text("[vm.1]\nrng = {}\n")
    done = subprocess.run(AVATAR_HW + ["demo", "--config", str(config), "--run", "true", *argv],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (2, (
        f"avatar-hw: {config}: no [vm.0], the VM this terminal (or --run) talks to; add [vm.0] "
        f"or use {fix}\n"))


@pytest.mark.parametrize("console", ['endpoints = ["stdio"]',
                                     'endpoints = "unix:c.sock", ports = { log = "stdio" }'])
def test_a_stdio_console_endpoint_is_refused_before_the_boot(tmp_path, console):
    """The demo's terminal already is the console's: the guest's output came twice, the typing
    was read twice and --run's marker line reached stdout."""
    config = tmp_path / "vms.toml"
    config.write_text(f"[vm.0]\nconsole = {{ {console} }}\n")
    done = subprocess.run(AVATAR_HW + ["demo", "--config", str(config), "--run", "true"],
                          capture_output=True, text=True, timeout=60)
    key = "ports.log" if "ports" in console else "endpoints"
    assert (done.returncode, done.stdout, done.stderr) == (2, "", (
        f"avatar-hw: {config}: vm.0.console.{key}: 'stdio' is the demo's own terminal on the "
        "emulated board; use pty:PATH or unix:PATH\n"))


@pytest.mark.parametrize("endpoint", ["unix", "pty"])
def test_a_guest_printing_with_no_client_never_waits_and_the_next_client_gets_its_output(
        endpoint, tmp_path):
    """A real guest: once the last client of its console left (only sockets without a client:
    here the user's endpoint and the launcher's; or a pty nobody holds beside the launcher's),
    what it prints goes to the port's unattached log at once, without the guest spinning in
    hvc for its buffers; a client attaching later receives it first (docs/devices.md,
    console)."""
    from avatar_hw.emulated.session import EmulatedBoard
    config = None
    if endpoint == "pty":
        config = tmp_path / "vms.toml"
        config.write_text(f'[vm.0]\nconsole = {{ endpoints = ["pty:{tmp_path}/vm0-console"] }}\n')
    with EmulatedBoard(config=config) as board:
        shell = board.shell(timeout=120)
        shell.run("(sleep 1; i=0; while [ $i -lt 1500 ]; do echo unattached-$i; i=$((i + 1)); "
                  "done; echo all-printed-$((40 + 2))) & true")
        shell.close()                                   # nobody attached from here on
        deadline = time.monotonic() + 180
        while True:                                     # the guest printed it all, unread
            [port] = board.daemon.debug_device(0, 0)["ports"]
            if port["log"] >= 1500 * len("unattached-NNN\r\n"):
                break
            assert time.monotonic() < deadline, port
            time.sleep(0.2)
        url = [e for e in port["endpoints"] if e != f"unix:{board.console_path}"][0]
        with GuestConsole.open(pyserial_url(url)) as later:
            later.expect(r"unattached-0\r?\n", timeout=60)
            later.expect(r"unattached-1499\r?\nall-printed-42", timeout=60)
            assert later.run("echo $((6 * 7))") == ("42\n", 0)
