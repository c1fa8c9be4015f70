"""The ``avatar-hw`` command line as a user meets it: --version, help for every option, -v
with every command, a quiet exit on a closed pipe, one address format, the daemon's start
log (control socket and console endpoints)."""

import argparse
import json
import logging
import subprocess
import sys

import pytest

from avatar_hw import cli
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


def test_console_without_a_vm_says_what_to_give(capsys):
    assert cli.main(["console"]) == 2
    assert capsys.readouterr().err == ("avatar-hw: console: give a VM number (and the daemon's "
                                       "--control socket) or --url URL\n")


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
