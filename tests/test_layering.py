"""The package's layers import in one direction: the core never imports the emulated board,
and no shipped module imports the test doubles (avatar_hw.testing).

Parsed with ``ast`` (nothing is imported): every ``import``/``from`` of the core
modules is resolved to an absolute module name and checked.
"""

import ast
from pathlib import Path

import avatar_hw

PACKAGE = Path(avatar_hw.__file__).parent
OUTSIDE_THE_CORE = ("emulated", "testing", "hil")     # may import the core, not the reverse


def imported_modules(path):
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    module = ".".join(("avatar_hw",) + path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = f"{base}.{node.module}" if node.level and node.module else (
                base if node.level else node.module)
            yield name
            yield from (f"{name}.{alias.name}" for alias in node.names)


def core_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] not in OUTSIDE_THE_CORE:
            yield path


def importers(files, package):
    """``file imports name`` for every import of ``package`` or a module in it."""
    return sorted(f"{path.relative_to(PACKAGE)} imports {name}"
                  for path in files for name in imported_modules(path)
                  if name == package or name.startswith(package + "."))


def test_core_never_imports_the_emulated_board():
    files = list(core_files())
    assert PACKAGE / "daemon.py" in files and PACKAGE / "virtio" / "subsystem.py" in files
    assert PACKAGE / "commands" / "serve.py" in files
    assert importers(files, "avatar_hw.emulated") == []


def test_shipped_code_never_imports_the_test_doubles():
    """avatar_hw.testing is for tests/ and bench/: nothing else in the package (the CLI, the
    emulated board, the HIL plugin) imports it."""
    files = [path for path in sorted(PACKAGE.rglob("*.py"))
             if path.relative_to(PACKAGE).parts[0] != "testing"]
    assert PACKAGE / "terminal.py" in files and PACKAGE / "hil" / "pytest_plugin.py" in files
    assert PACKAGE / "emulated" / "session.py" in files
    assert importers(files, "avatar_hw.testing") == []
    assert importers([PACKAGE / "testing" / "virtio.py"], "avatar_hw.testing")   # it can see one


def test_the_check_sees_relative_imports(tmp_path):
    """The resolver itself: ``from ..emulated import machine`` in a subpackage is caught."""
    names = set(imported_modules(PACKAGE / "emulated" / "session.py"))
    assert "avatar_hw.daemon.Daemon" in names            # the one allowed direction
    assert "avatar_hw.emulated.machine.EmulatedMachine" in names
