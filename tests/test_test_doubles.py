"""Test doubles (``avatar_hw.testing``) stay out of shipped code: only tests/ and bench/ use
them."""

import ast
from pathlib import Path

import avatar_hw

PACKAGE = Path(avatar_hw.__file__).resolve().parent
TESTING = "avatar_hw.testing"


def module_name(path, root):
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path, root=PACKAGE.parent):
    """Every module ``path`` imports (relative imports resolved), and every string constant
    naming a module of avatar_hw (``importlib.import_module``, ``python -m``, ``find_spec``)."""
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith("avatar_hw."):
                yield node.value


def uses_testing(name):
    return name == TESTING or name.startswith(TESTING + ".")


def test_shipped_modules_import_no_test_double():
    shipped = [p for p in sorted(PACKAGE.rglob("*.py")) if "testing" not in
               p.relative_to(PACKAGE).parts[:1]]
    assert len(shipped) > 20
    offenders = {str(p.relative_to(PACKAGE.parent)): name for p in shipped
                 for name in imported_names(p) if uses_testing(name)}
    assert offenders == {}


def test_the_check_sees_every_form_of_import(tmp_path):
    forms = {"absolute": "import avatar_hw.testing.driver",
             "from": "from avatar_hw.testing import fake_uio",
             "relative": "from .testing.console import x",
             "relative package": "from . import testing",
             "parent": "from ..testing import qtest",
             "by name": "importlib.import_module('avatar_hw.testing.qtest')"}
    for form, line in forms.items():
        sub = tmp_path / "avatar_hw" / ("hil" if form == "parent" else "")
        sub.mkdir(parents=True, exist_ok=True)
        module = sub / "m.py"
        module.write_text(line + "\n")
        assert any(uses_testing(n) for n in imported_names(module, tmp_path)), form
        module.unlink()
    clean = tmp_path / "avatar_hw" / "m.py"
    clean.write_text("from .hil import console\nfrom . import errors\n")
    assert not any(uses_testing(n) for n in imported_names(clean, tmp_path))
