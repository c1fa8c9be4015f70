"""The C header the hypervisor compiles and the Python ABI module describe the same bytes.

A small C program generated from ``avatar_hw.abi`` includes
``boards/abi/avatar_trap.h`` and prints offsetof/sizeof of every field and the
value of every constant; the test compares them with the ctypes structures.
Every ``AVT_`` macro of the header must have a Python twin and the other way
round, so a field or constant added on one side only fails here.
"""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from avatar_hw import abi

HEADER = Path(__file__).resolve().parents[1] / "boards" / "abi" / "avatar_trap.h"
STRUCTS = {"avt_header": abi.Header, "avt_slot": abi.Slot, "avt_shadow": abi.Shadow}
# Python-only names: the model's own choice, and field offsets derived from the structs.
PYTHON_ONLY = {"SUPPORTED_FEATURES", "STATE_OFFSET", "MODEL_STATE_OFFSET", "STUB_STATE_OFFSET",
               "MODEL_SLEEPING_OFFSET", "VIRQ_PENDING_OFFSET", "VIRQ_POLLING_OFFSET",
               "RINGS_TAKEN_OFFSET",
               "SHADOW_SEQ_OFFSET", "SHADOW_ACKS_OFFSET"}


def python_constants():
    return {f"AVT_{name}": value for name, value in vars(abi).items()
            if name.isupper() and isinstance(value, int) and name not in PYTHON_ONLY}


def header_macros():
    """Names of the value macros the header defines (not the include guard)."""
    names = re.findall(r"^#define\s+(AVT_\w+)\s+\S", HEADER.read_text(), re.MULTILINE)
    return set(names)


def layout_lines():
    """``(label, C expression, expected value)`` for every field, struct and constant."""
    lines = []
    for cname, struct in STRUCTS.items():
        lines.append((f"sizeof {cname}", f"sizeof(struct {cname})", ctypes.sizeof(struct)))
        for field, ctype in struct._fields_:
            descriptor = getattr(struct, field)
            lines.append((f"offsetof {cname}.{field}",
                          f"offsetof(struct {cname}, {field})", descriptor.offset))
            lines.append((f"sizeof {cname}.{field}",
                          f"sizeof(((struct {cname} *)0)->{field})", descriptor.size))
    for name, value in sorted(python_constants().items()):
        lines.append((name, f"(unsigned long long)({name})", value))
    return lines


def c_program(lines):
    body = "\n".join(
        f'    printf("%s %llu\\n", "{label}", (unsigned long long)({expr}));'
        for label, expr, _ in lines)
    return ("#include <stddef.h>\n#include <stdio.h>\n"
            f'#include "{HEADER}"\n\nint main(void)\n{{\n{body}\n    return 0;\n}}\n')


def static_checks(lines):
    """The same facts as compile-time checks, for compilers whose programs cannot run here."""
    checks = "\n".join(
        f"typedef char check_{i}[(({expr}) == {value}ull) ? 1 : -1];"
        for i, (_, expr, value) in enumerate(lines))
    return f'#include <stddef.h>\n#include "{HEADER}"\n{checks}\n'


def test_every_header_macro_has_a_python_twin_and_back():
    assert header_macros() == set(python_constants())


def test_host_compiled_header_matches_python_layout(tmp_path):
    lines = layout_lines()
    src = tmp_path / "layout.c"
    src.write_text(c_program(lines))
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic",
                    "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    printed = dict(line.rsplit(" ", 1) for line in out.splitlines())
    expected = {label: str(value) for label, _, value in lines}
    assert printed == expected


def test_header_is_freestanding_c99(tmp_path):
    """The EL2 stub has no libc: the header must compile with no system headers at all."""
    src = tmp_path / "only.c"
    src.write_text(f'#include "{HEADER}"\nstruct avt_slot slot;\nstruct avt_header header;\n')
    subprocess.run(["gcc", "-std=c99", "-ffreestanding", "-nostdinc", "-Wall", "-Wextra",
                    "-Werror", "-pedantic", "-fsyntax-only", str(src)],
                   check=True, capture_output=True, text=True)


def test_aarch64_compiled_header_matches_python_layout(tmp_path):
    """The stub is built for arm64: check the layout with the cross compiler too."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("aarch64-linux-gnu-gcc not installed (scripts/setup installs it)")
    src = tmp_path / "checks.c"
    src.write_text(static_checks(layout_lines()))
    result = subprocess.run([cc, "-std=c99", "-ffreestanding", "-Wall", "-Werror",
                             "-fsyntax-only", str(src)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_static_checks_catch_a_wrong_offset(tmp_path):
    """The compile-time check fails when the header and Python disagree."""
    lines = [("bad", "offsetof(struct avt_slot, gpa)", abi.Slot.gpa.offset + 8)]
    src = tmp_path / "bad.c"
    src.write_text(static_checks(lines))
    result = subprocess.run(["gcc", "-std=c99", "-fsyntax-only", str(src)],
                            capture_output=True, text=True)
    assert result.returncode != 0
