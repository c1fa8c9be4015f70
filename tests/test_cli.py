"""The ``avatar-hw`` command line as a user meets it: --version, help for every option, -v
with every command, a quiet exit on a closed pipe, one address format, the daemon's start
log (control socket and console endpoints)."""

import argparse
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from avatar_hw import cli, control
from avatar_hw.errors import AvatarError
from avatar_hw.hw import uio
from avatar_hw.shipped import shipped_file
from avatar_hw.testing.fake_uio import make_tree
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
from test_daemon import Served, console_config

AVATAR_HW = [sys.executable, "-m", "avatar_hw"]


def subcommands():
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"avatar-hw {cli.version()}\n"
    assert cli.version()[0].isdigit()


def test_every_option_of_every_command_has_help():
    parser, commands = subcommands()
    assert set(commands) >= {"layout", "serve", "list", "info", "debug", "console", "demo"}
    for name, command in [("", parser), *commands.items()]:
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"avatar-hw {name} {action.option_strings or action.dest}"


@pytest.mark.parametrize("argv, level", [
    (["layout"], logging.WARNING), (["-v", "layout"], logging.INFO),
    (["layout", "-v"], logging.INFO), (["layout", "-vv"], logging.DEBUG),
    (["serve", "--board", "rpi4", "--config", "x"], logging.INFO),
    (["serve", "--board", "rpi4", "--config", "x", "-vv"], logging.DEBUG),
    (["serve", "--board", "rpi4", "--config", "x", "--log-level", "warning"], logging.WARNING),
    (["info", "-vv"], logging.DEBUG), (["console", "0", "-v"], logging.INFO),
    (["demo", "-vv"], logging.DEBUG)])
def test_v_works_with_every_command(argv, level):
    assert cli.log_level(cli.build_parser().parse_args(argv)) == level


def test_every_command_takes_v_and_log_level_after_its_name():
    _, commands = subcommands()
    for name, command in commands.items():
        options = {o for action in command._actions for o in action.option_strings}
        assert {"-v", "--verbose", "--log-level"} <= options, f"avatar-hw {name}"


@pytest.mark.parametrize("argv", [["layout", "--board", "rpi4", "--json"],
                                  ["layout", "--board", "rpi4"], ["--help"], ["serve", "--help"]])
def test_a_closed_pipe_ends_quietly(argv):
    reader = subprocess.Popen(["true"], stdin=subprocess.PIPE)
    reader.wait()                      # the read end is closed before we write anything
    result = subprocess.run(AVATAR_HW + argv, stdout=reader.stdin, stderr=subprocess.PIPE,
                            text=True, timeout=60)
    reader.stdin.close()
    assert result.stderr == ""
    assert result.returncode in (0, 141)


LOADING_INTERRUPTED = """if True:
    import importlib, os, runpy, signal, sys
    load = importlib.import_module
    def interrupted(name):
        if name.startswith("avatar_hw.commands"):
            os.kill(os.getpid(), signal.SIGINT)
        return load(name)
    importlib.import_module = interrupted
    sys.argv = ["avatar-hw", "layout", "--board", "rpi4"]
"""


@pytest.mark.parametrize("entry", ["main()", "python -m avatar_hw"])
def test_a_ctrl_c_while_the_commands_load_ends_quietly(entry):
    """A SIGINT that comes while the commands are imported (a newcomer's early Ctrl-C of
    ``avatar-hw demo``) ends it with status 130 and no traceback; ``python -m avatar_hw``
    imported them before main() (and its handling) ran."""
    run = ("from avatar_hw import cli; sys.exit(cli.main())" if entry == "main()" else
           "runpy.run_module('avatar_hw', run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", f"{LOADING_INTERRUPTED}\n{run}"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "")


def test_a_python_without_a_dependency_says_so_in_one_line():
    code = LOADING_INTERRUPTED.replace("os.kill(os.getpid(), signal.SIGINT)",
                                       "raise ModuleNotFoundError('no', name='serial')")
    result = subprocess.run([sys.executable, "-c", code + "\nrunpy.run_module('avatar_hw', "
                             "run_name='__main__', alter_sys=True)"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, (
        f"avatar-hw: this Python ({sys.executable}) has no module 'serial': run scripts/setup "
        "and use .venv/bin/avatar-hw (or pip install this checkout)\n"))


def test_console_from_a_pipe_says_it_needs_a_terminal():
    """stdin not a terminal: miniterm's termios calls ended in a traceback."""
    done = subprocess.run([sys.executable, "-m", "avatar_hw", "console", "--url",
                           "loop://"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("avatar-hw: console: stdin is not a terminal")


@pytest.mark.parametrize("scheme", ["unix", "socket"])
def test_console_whose_peer_closes_at_once_says_so_in_one_line(tmp_path, scheme):
    """A peer that accepts and closes having sent nothing (a refusal without its line, a
    server that exits): the header, then "read failed", status 1; now one line, status 2."""
    if scheme == "unix":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(tmp_path / "peer.sock"))
        url = f"unix://{tmp_path / 'peer.sock'}"
    else:
        listener = socket.create_server(("127.0.0.1", 0))
        url = f"socket://127.0.0.1:{listener.getsockname()[1]}"
    listener.listen(4)

    def close_each():
        while True:
            try:
                listener.accept()[0].close()
            except OSError:
                return
    threading.Thread(target=close_each, daemon=True).start()
    controller, terminal = os.openpty()
    try:
        done = subprocess.run(AVATAR_HW + ["console", "--url", url], stdin=terminal,
                              stdout=terminal, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)
        listener.close()
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"avatar-hw: console {url}: closed at once, having sent "
                                  "nothing"), done.stderr


def test_console_without_a_vm_says_what_to_give(capsys):
    assert cli.main(["console"]) == 2
    assert capsys.readouterr().err == ("avatar-hw: console: give a VM number (and the daemon's "
                                       "--control socket) or --url URL\n")


@pytest.mark.parametrize("size", ["-5M", "-5", "12Q"])
def test_a_bad_balloon_size_is_one_line_even_with_a_minus(capsys, size):
    """``balloon 0 -5M``: argparse took -5M for an unknown option (usage lines)."""
    assert cli.main(["balloon", "0", size, "--control", "/nonexistent.sock"]) == 2
    assert capsys.readouterr().err == (f"avatar-hw: balloon: size '{size}': give bytes, or a "
                                       "number with K, M, G or T (e.g. 384M)\n")


def test_values_starting_with_a_minus_and_a_digit_reach_their_command(capsys):
    """Sizes, ranges, numbers in any notation: a value, positional or an option's, that its
    command checks; a word like ``-x`` is still an unknown option."""
    parser = cli.build_parser()
    assert parser.parse_args(["inject", "0", "block", "ioerr", "--sectors", "-5-2"]).sectors \
        == "-5-2"
    assert parser.parse_args(["inject", "0", "block", "delay", "--ms", "-1e3"]).ms == "-1e3"
    assert parser.parse_args(["balloon", "-1", "-.5G"]).size == "-.5G"
    for argv, message in (
            (["serve", "--board", "b", "--config", "c", "--record-max-size", "-5M"],
             "size '-5M': give bytes"),
            (["serve", "--board", "b", "--config", "c", "--wait-stub", "-1e3"],
             "'-1e3' is not a number of seconds above 0"),
            (["balloon", "0", "-x"], "unrecognized arguments: -x")):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert message in capsys.readouterr().err


def test_a_vms_config_given_as_board_says_which_option_takes_it(capsys):
    """`layout --board vms-example`: the example VMs config lies beside the board files, but
    it is no board (nor listed among them)."""
    assert cli.main(["layout", "--board", "vms-example"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avatar-hw: ") and err.count("\n") == 1
    assert ("vms-example.toml: a VMs config (for --config), not a board file; shipped boards: "
            in err)
    assert "vms-example" not in err.partition("boards: ")[2]


def test_a_board_file_given_as_config_says_which_option_takes_it(capsys):
    """`layout --config rpi4`: a shipped board's name found as a file, but no VMs config."""
    assert cli.main(["layout", "--config", "rpi4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avatar-hw: ") and err.count("\n") == 1
    assert "rpi4.toml: a board file (for --board), not a VMs config; " in err


@pytest.mark.parametrize("argv", [["layout", "--config", ""], ["info", "--control="],
                                  ["serve", "--board", "rpi4", "--config", "v.toml", "--user", ""],
                                  ["demo", "--config", ""]])
def test_an_empty_option_value_is_refused_not_taken_for_the_default(capsys, argv):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    option = argv[-2] if argv[-1] == "" else argv[-1].rstrip("=")
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"avatar-hw {argv[0]}: error: argument {option}: an empty value: give one, or leave "
        "the option out")


def test_serve_says_the_emulated_board_is_the_demos(capsys, tmp_path):
    """Its board file's RAM file is a placeholder: each demo makes its own."""
    config = tmp_path / "vms.toml"
    config.write_text("[vm.0]\nrng = {}\n")
    assert cli.main(["serve", "--board", "emulated", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"avatar-hw: {shipped_file('emulated.toml')}: the emulated board is served only by "
        "avatar-hw demo (or the EmulatedBoard API: avatar_hw.emulated.session), which gives "
        "each run its own RAM file\n")


def test_serve_on_a_trap_node_without_an_interrupt_is_one_line(capsys, tmp_path, monkeypatch):
    """rpi4 from a fake UIO tree whose trap device has no interrupt: the UIO core answers
    EIO to the unmask (drivers/uio/uio.c), stood in for here as the node is a file."""
    roots = make_tree(tmp_path, {0: ("avatar-trap", [(0x40000000, 0x90000, 0, None)]),
                                 1: ("avatar-vm0-ram", [(0x41000000, 0x100000, 0, None)]),
                                 2: ("avatar-gicd", [(0xff841000, 0x1000, 0, None)])})
    trap_node, write = f"{roots['dev_root']}/uio0", os.write

    def uio_write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == trap_node:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return write(fd, data)
    monkeypatch.setattr(uio.os, "write", uio_write)
    config = tmp_path / "vms.toml"
    config.write_text("[vm.0]\nrng = {}\n")
    assert cli.main(["serve", "--board", "rpi4", "--config", str(config), "--control",
                     str(tmp_path / "control.sock"), "--wait-stub", "0.1",
                     "--sysfs-root", roots["sysfs_root"], "--dev-root", roots["dev_root"]]) == 2
    assert capsys.readouterr().err == (
        f"avatar-hw: {trap_node} (UIO device avatar-trap) has no interrupt (EIO): check the "
        "interrupts of its device-tree node avatar-trap in the overlay, and dmesg | grep "
        "avatar_uio\n")


@pytest.mark.parametrize("command", [["serve", "--board", "rpi4", "--config", "vms.toml"],
                                     ["demo"]], ids=["serve", "demo"])
def test_wait_takes_one_of_three_modes_busy_poll_its_alias(capsys, command):
    parse = cli.build_parser().parse_args
    assert parse(command).wait is None                  # the board file's trap.wait
    assert parse(command + ["--wait", "adaptive"]).wait == "adaptive"
    assert parse(command + ["--busy-poll"]).wait == "busy-poll"
    with pytest.raises(SystemExit) as exit:
        parse(command + ["--wait", "spin"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        f"avatar-hw {command[0]}: error: argument --wait: invalid choice: 'spin' (choose from "
        f"'doorbell', 'adaptive', 'busy-poll'); see avatar-hw {command[0]} --help\n")


@pytest.mark.parametrize("argv, line", [
    (["serve", "--board", "b", "--config", "c", "--record-max-size", "-5M"],
     "avatar-hw serve: error: argument --record-max-size: size '-5M': give bytes, or a number "
     "with K, M, G or T (e.g. 384M)"),
    (["demo", "--vm", "one"],
     "avatar-hw demo: error: argument --vm: invalid int value: 'one'; see avatar-hw demo --help"),
    (["list", "-x"],
     "avatar-hw list: error: unrecognized arguments: -x; see avatar-hw list --help"),
    (["serve", "--board", "b"], "avatar-hw serve: error: the following arguments are required: "
                                "--config; see avatar-hw serve --help"),
    (["demo", "--config"],
     "avatar-hw demo: error: argument --config: expected one argument; see avatar-hw demo --help"),
    (["nosuch"], "avatar-hw: error: argument COMMAND: invalid choice: 'nosuch' (choose from "
                 "'layout', 'serve', 'list', 'info', 'debug', 'balloon', 'screenshot', 'inject', "
                 "'replay', 'console', 'demo'); see avatar-hw --help"),
], ids=["type", "int", "unknown", "missing", "no value", "command"])
def test_a_command_line_argparse_refuses_is_one_line(capsys, argv, line):
    """Not argparse's usage lines first: the error, and --help where argparse's own words do
    not say what to give (an option's type does)."""
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert (exit.value.code, capsys.readouterr().err) == (2, line + "\n")


def refuses(action, value="@bad@"):
    """Does the type of option ``action`` refuse ``value``?"""
    if action.type is None:
        return False
    try:
        action.type(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return True
    return False


def test_every_command_refuses_a_bad_value_or_an_unknown_option_in_one_line(capsys):
    parser, commands = subcommands()
    refused = 0
    for name, command in commands.items():
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--no-such-option"])
        err = capsys.readouterr().err
        assert err.startswith(f"avatar-hw {name}: error: ") and err.count("\n") == 1, err
        assert err.endswith(f"; see avatar-hw {name} --help\n"), err
        for action in command._actions:
            if not action.option_strings or action.choices is None and not refuses(action):
                continue
            option = action.option_strings[0]
            with pytest.raises(SystemExit):
                parser.parse_args([name, option, "@bad@"])
            err = capsys.readouterr().err
            assert err.startswith(f"avatar-hw {name}: error: argument {option}: "), err
            assert err.count("\n") == 1, err
            refused += 1
    assert refused >= 15


def test_a_missing_daemon_names_the_option(capsys, tmp_path):
    assert cli.main(["info", "--control", str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err
    assert "give its control socket with --control" in err and "\n" not in err[:-1]


def test_serve_logs_where_to_reach_it_and_list_info_print_one_address_format(tmp_path):
    board = FakeBoard(tmp_path / "board")
    stub = StandinStub(board)
    daemon = Served(board, console_config(board), "-vv")
    try:
        stub.page.wait_attached()
        listed = json.loads(daemon.cli("list", "--json"))
        assert [d["base"] for d in listed] == ["0x0a000000", "0x0a010000"]
        assert daemon.cli("list").split()[3] == "0x0a000000"
        info = json.loads(daemon.cli("info", "--json"))
        assert info["vms"][1]["window"] == ["0x0a010000", "0x0a01ffff"]
        assert info["vms"][0]["ram"]["base"] == "0x40000000"
        assert info["vms"][0]["devices"][0]["base"] == "0x0a000000"
        assert json.loads(daemon.cli("debug", "1", "0", "--json"))["base"] == "0x0a010000"
        assert daemon.stop() == 0
    finally:
        daemon.close()
        stub.close()
    log = daemon.output()
    assert f"control socket {board.control}" in log
    assert f"vm1 console port 0: unix:{board.root}/vm1.sock, file:{board.root}/vm1.log" in log
    assert " DEBUG " in log                 # -vv after the command


def test_serve_tells_systemd_when_it_is_ready_and_when_it_stops(tmp_path):
    """Type=notify (boards/linux/avatar-hw.service): READY=1 once the control socket answers,
    STOPPING=1 on SIGTERM; a fake $NOTIFY_SOCKET collects the datagrams."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    board = FakeBoard(tmp_path / "board")
    stub = StandinStub(board)
    os.environ["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    try:
        daemon = Served(board, console_config(board))
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        ready = notify.recv(4096).decode().split("\n")
        assert ready[0] == "READY=1" and f"MAINPID={daemon.process.pid}" in ready
        assert stub.page.model_attached()
        assert json.loads(daemon.cli("list", "--json"))          # serving when it said so
        daemon.process.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert daemon.process.wait(20) == 0
    finally:
        daemon.close()
        stub.close()
        notify.close()


@pytest.mark.parametrize("kind", ["file", "directory", "missing"])
def test_list_with_a_control_path_that_is_no_socket_says_so(capsys, tmp_path, kind):
    """A file or a directory there refused the connect as a dead socket does: "no avatar-hw
    daemon at FILE: is 'avatar-hw serve' running?" sent the user to start one."""
    path = tmp_path / "control"
    if kind == "file":
        path.write_text("not a socket\n")
    elif kind == "directory":
        path.mkdir()
    assert cli.main(["list", "--control", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    if kind == "missing":
        assert err.startswith(f"avatar-hw: no avatar-hw daemon at {path}: is 'avatar-hw serve' "
                              "running?")
    else:
        assert err == (f"avatar-hw: {path} is not a socket, so not an avatar-hw daemon's "
                       "control socket: give the daemon's with --control (is 'avatar-hw serve' "
                       "running?)\n")


def test_sd_notify_without_systemd_or_with_an_abstract_socket(monkeypatch):
    from avatar_hw.service import sd_notify
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    name = f"avatar-hw-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1") is True
        assert notify.recv(64) == b"READY=1"
    assert sd_notify("STOPPING=1") is False              # nobody listens: logged, not raised


def test_the_systemd_unit_runs_serve_and_waits_for_its_notification():
    unit = (Path(__file__).resolve().parent.parent / "boards/linux/avatar-hw.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines()
                 if "=" in line and not line.startswith("#"))
    assert lines["Type"] == "notify"
    argv = lines["ExecStart"].split()
    assert argv[:2] == ["avatar-hw", "serve"] and "--board" in argv and "--config" in argv
    args = cli.build_parser().parse_args(
        [a.replace("${AVATAR_BOARD}", "rpi4").replace("${AVATAR_CONFIG}", "/etc/x.toml")
         for a in argv[1:] if a != "$AVATAR_OPTIONS"])
    assert (args.board, str(args.config)) == ("rpi4", "/etc/x.toml")


def test_a_control_socket_path_holding_a_file_is_refused_and_kept(tmp_path):
    """``--control`` at a file: one line, the file kept (a failed connect unlinked it), and a
    socket left by a daemon that died is replaced."""
    path = tmp_path / "notes.txt"
    path.write_text("keep")
    with pytest.raises(AvatarError, match=f"control socket {path} is not a socket: give another "
                                          "--control path"):
        control.ControlServer(str(path), daemon=None)
    assert path.read_text() == "keep"
    dead = tmp_path / "dead.sock"
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(dead))
    left.close()                                    # bound, never listening: nobody serves it
    server = control.ControlServer(str(dead), daemon=None)
    server.close()
