"""docs/api.md stays true: its Python examples run, in order, in one namespace (a later block
uses what an earlier one defined), and every ``avatar_hw...`` name it shows exists; the
docs' claims of the shipped boards' wait modes match the board files."""

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
