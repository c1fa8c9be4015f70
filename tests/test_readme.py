"""The README's Python example and commands stay true."""

import pathlib
import re
import subprocess
import sys

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def test_readme_python_example_runs(capsys):
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    exec(compile(example.replace("tcp:127.0.0.1:4555", "tcp:127.0.0.1:0"), "README.md", "exec"),
         {})
    assert "'name': 'console'" in capsys.readouterr().out


def test_readme_layout_command_prints_the_seed_map():
    out = subprocess.run([sys.executable, "-m", "avatar_hw", "layout", "--board", "rpi4",
                          "--vms", "2"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"0x0a000000.*0x0a00ffff", out) and re.search(r"0x0a010000.*0x0a01ffff", out)
    assert "48" in out and "63" in out


def test_readme_links_point_at_files():
    root = pathlib.Path(__file__).parent.parent
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert (root / link).exists(), f"README links to missing {link}"


def test_example_vms_config_is_valid():
    from avatar_hw.config import load_config
    config = load_config(pathlib.Path(__file__).parent.parent / "boards" / "vms-example.toml")
    assert [d.kind for d in config.vms[0].devices] == ["console", "block", "rng", "net",
                                                         "balloon", "9p", "vsock", "gpu"]
    assert [d.kind for d in config.vms[1].devices] == ["console", "block", "net"]


def test_docs_name_no_machine_specific_paths():
    root = pathlib.Path(__file__).parent.parent
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        assert "/work/" not in doc.read_text(), f"{doc.name} names a path of one machine"


def test_local_benchmark_results_stay_out_of_git():
    root = pathlib.Path(__file__).parent.parent
    if not (root / ".git").exists():
        return                                     # an unpacked sdist: nothing to check
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/results/20260101-120000.json"],
                             cwd=root)
    tracked = subprocess.run(["git", "check-ignore", "-q", "bench/results/full.json"], cwd=root)
    assert (ignored.returncode, tracked.returncode) == (0, 1)
