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
