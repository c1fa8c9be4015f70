"""docs/api.md stays true: its Python examples run, in order, in one namespace (a later block
uses what an earlier one defined), and every ``avatar_hw...`` name it shows exists; the
docs' claims of the shipped boards' wait modes match the board files; every ``avatar-hw``
command line in the README and docs names a real command and real options."""

import argparse
import importlib
import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "api.md").read_text()


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_api_examples_run(capsys):
    blocks = python_blocks(API)
    assert len(blocks) >= 3
    namespace = {}
    for number, block in enumerate(blocks, 1):
        block = block.replace("tcp:127.0.0.1:4555", "tcp:127.0.0.1:0")   # any free port
        exec(compile(block, f"docs/api.md python block {number}", "exec"), namespace)
    assert "'name': 'console'" in capsys.readouterr().out
    assert namespace["used"].length == 64 and namespace["bench"].device.counters[
        "bytes_to_guest"] == 64


def resolve(dotted):
    """The object a dotted name names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("dotted", sorted(set(re.findall(r"`(avatar_hw(?:\.\w+)+)[`(]", API))))
def test_api_names_exist(dotted):
    resolve(dotted)


def test_api_subsystem_methods_exist():
    from avatar_hw import Subsystem
    also = re.search(r"^Also (`Subsystem.*?)\.$", API, re.S | re.M).group(1)
    shown = set(re.findall(r"`Subsystem\.(\w+)\(", API) + re.findall(r"`(\w+)\(", also))
    assert len(shown) >= 10
    assert [name for name in sorted(shown) if not hasattr(Subsystem, name)] == []


def test_the_docs_name_each_shipped_boards_wait_mode_as_its_file_does():
    """Every claim in the docs of a shipped board file's ``trap.wait`` ("`emulated.toml`'s
    `trap.wait`, `doorbell`", "- `rpi4.toml`, ...: `adaptive`", "(`boards/X.toml`:
    `doorbell`)") says what the file says."""
    mode = r"`(doorbell|adaptive|busy-poll)`"
    patterns = (rf"`(?:boards/)?([\w.-]+\.toml)`'s `trap\.wait`, {mode}",
                rf"^- ((?:`[\w.-]+\.toml`(?:, )?)+): {mode}",
                rf"`boards/([\w.-]+\.toml)`: {mode}")
    claims = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for pattern in patterns:
            for match in re.finditer(pattern, text, re.MULTILINE):
                for name in re.findall(r"[\w.-]+\.toml", match.group(1)):
                    claims.append((doc.name, name, match.group(2)))
    assert len(claims) >= 5
    for doc, name, claimed in claims:
        with open(ROOT / "boards" / name, "rb") as f:
            actual = tomllib.load(f).get("trap", {}).get("wait", "doorbell")
        assert claimed == actual, f"{doc}: {name}'s trap.wait is {actual}, not {claimed}"


COMMAND_LINE = re.compile(r"(?<![\w/.-])avatar-hw ((?:[a-z]+\|)*[a-z]+)\b([^`;&|)]*)")


def command_snippets(text):
    """The shell lines of a doc's ``sh`` (or untagged) blocks, comments cut, and its inline
    code spans."""
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("", "sh", "console"):
            yield from (re.sub(r"\s#.*", "", line) for line in block.splitlines())
    yield from re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def command_mistakes(text):
    """(command line, mistake) for each ``avatar-hw CMD --option`` in ``text`` whose command
    (``list|info|debug``: each) or option the CLI does not have; and how many it checked."""
    parser = importlib.import_module("avatar_hw.cli").build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    mistakes, checked = [], 0
    for snippet in command_snippets(text):
        for match in COMMAND_LINE.finditer(snippet):
            options = re.findall(r"(?<![\w-])--[a-z][\w-]*",
                                 re.sub(r"'[^']*'|\"[^\"]*\"", "", match.group(2)))
            for name in match.group(1).split("|"):
                checked += 1
                command = sub.choices.get(name)
                if command is None:
                    mistakes.append((snippet, f"no command {name}"))
                    continue
                known = {o for action in command._actions for o in action.option_strings}
                mistakes += [(snippet, f"{name} has no {o}") for o in options if o not in known]
    return mistakes, checked


def test_every_avatar_hw_command_line_in_the_docs_parses_its_command_and_options():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    mistakes, checked = command_mistakes("\n".join(doc.read_text() for doc in docs))
    assert checked >= 100 and mistakes == []
    wrong = "`avatar-hw demo --wiat adaptive` and\n```sh\navatar-hw lst  # x\n```\n"
    assert [m for _, m in command_mistakes(wrong)[0]] == ["no command lst", "demo has no --wiat"]


# -- the other docs' examples --------------------------------------------------------------

def blocks(doc, lang, after=None):
    """The ``lang`` code blocks of ``docs/doc`` (``""``: untagged), from the heading ``after``
    on when given."""
    text = (ROOT / "docs" / doc).read_text()
    if after is not None:
        text = text[text.index(f"\n{after}\n"):]
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_the_board_file_schema_in_boards_md_loads_and_shows_every_key(tmp_path):
    """The annotated example is a board file the loader takes, with every table and key
    the schema has (a renamed or new key shows here)."""
    from avatar_hw.board import BOARD, load_board
    [example] = blocks("boards.md", "toml")
    (tmp_path / "board.toml").write_text(example)
    assert load_board(tmp_path / "board.toml").name == "rpi4"
    shown = {table: sorted(keys) for table, keys in tomllib.loads(example).items()}
    assert shown == {f.name: sorted(f.kind.names()) for f in BOARD.fields}


def run_layout(capsys, *args):
    from avatar_hw import cli
    assert cli.main(["layout", *args]) == 0
    return capsys.readouterr().out


def test_the_layout_text_in_boards_md_is_what_layout_prints(capsys):
    """``avatar-hw layout --vms 2`` (the default board, rpi4), the doc's ``...`` lines
    standing for one or more lines."""
    shown = blocks("boards.md", "", after="## `avatar-hw layout`")[0]
    pattern = "".join(r"(?:.*\n)+?" if line.strip() == "..." else re.escape(line) + r"\n"
                      for line in shown.splitlines())
    out = run_layout(capsys, "--vms", "2")
    assert re.fullmatch(pattern, out), f"docs/boards.md:\n{shown}\navatar-hw layout:\n{out}"


ELIDED = "..."


def shows(shown, actual):
    """Whether ``actual`` (parsed JSON) is what the doc's ``shown`` shows: the same keys and
    values, a list ending in ``...`` standing for one with one or more items more."""
    if isinstance(shown, list) and shown and shown[-1] == ELIDED:
        return (isinstance(actual, list) and len(actual) >= len(shown)
                and all(map(shows, shown[:-1], actual)))
    if isinstance(shown, list):
        return (isinstance(actual, list) and len(actual) == len(shown)
                and all(map(shows, shown, actual)))
    if isinstance(shown, dict):
        return (isinstance(actual, dict) and actual.keys() == shown.keys()
                and all(shows(shown[key], actual[key]) for key in shown))
    return shown == actual


def test_the_layout_json_in_boards_md_is_what_layout_prints(capsys):
    import json
    [shown] = blocks("boards.md", "json", after="## `avatar-hw layout`")
    shown = json.loads(shown.replace(ELIDED, json.dumps(ELIDED)))
    actual = json.loads(run_layout(capsys, "--vms", "2", "--json"))
    assert shows(shown, actual), f"docs/boards.md: {shown}\navatar-hw layout: {actual}"


def test_the_vms_config_in_labgrid_md_loads(tmp_path):
    from avatar_hw.config import load_config
    from avatar_hw.endpoints import SCHEMES
    [example] = blocks("labgrid.md", "toml")
    (tmp_path / "vms.toml").write_text(example)
    config = load_config(tmp_path / "vms.toml")
    assert sorted(config.vms) == [0, 1]
    urls = [url for vm in config.vms.values() for device in vm.devices
            for url in device.options["endpoints"]]
    assert urls and all(url.partition(":")[0] in SCHEMES for url in urls), urls


def test_the_rng_module_in_devices_md_is_the_shipped_ones(monkeypatch):
    """The abridged avatar_hw/devices/rng.py, run in that module's namespace: the same
    SCHEMA, and a from_config making the device as the shipped one does."""
    from avatar_hw import config
    from avatar_hw.devices import rng
    [example] = [b for b in blocks("devices.md", "python") if "devices/rng.py" in b]
    namespace = dict(vars(rng))
    exec(compile(example, "docs/devices.md rng block", "exec"), namespace)
    assert namespace["SCHEMA"] == rng.SCHEMA
    def made(**arguments):
        return arguments

    namespace["RngDevice"] = made
    monkeypatch.setattr(rng, "RngDevice", made)
    for options in ({}, {"max_bytes": 16}, {"rate": 1024, "max_bytes": 8}):
        assert namespace["from_config"](options) == rng.from_config(options)
    assert config.DEVICES["rng"] == "avatar_hw.devices.rng"
