"""The package's shape: every module imports on its own (no import cycle hides behind import
order), says what it is for, and stays small enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"
MODULES = sorted(
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
)

# Each module is imported first, in a process where no other module of ours was imported yet:
# a cycle between two modules fails whichever is imported first.
_IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "sidecar" or m.startswith("sidecar.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-2))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own() -> None:
    assert len(MODULES) > 40  # the walk found the package
    libraries = [m for m in MODULES if m != "sidecar.__main__"]  # that one runs the CLI
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *libraries],
                            capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", MODULES)
def test_module_has_a_purpose_docstring_and_stays_small(name: str) -> None:
    path = PACKAGE.parent.joinpath(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    text = path.read_text(encoding="utf-8")
    assert ast.get_docstring(ast.parse(text)), f"{name} says nothing of what it is for"
    assert len(text.splitlines()) <= 400, f"{name} has grown past 400 lines"
