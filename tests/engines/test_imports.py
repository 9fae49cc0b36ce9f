"""The engines package imports cleanly: each module on its own in a fresh interpreter, and no
two modules import each other (not even from inside a function)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sidecar.engines

PACKAGE = Path(sidecar.engines.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imported_engines_modules(path: Path) -> set[str]:
    """The sidecar.engines modules a file imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "sidecar.engines":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("sidecar.engines."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[2] for alias in node.names
                         if alias.name.startswith("sidecar.engines."))
    return found & set(MODULES)


def test_no_two_engine_modules_import_each_other() -> None:
    graph = {name: imported_engines_modules(PACKAGE / f"{name}.py") for name in MODULES}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for c in map(cycle_from, MODULES) if c]
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name", MODULES)
def test_each_module_imports_on_its_own(name: str) -> None:
    done = subprocess.run([sys.executable, "-W", "error", "-c",
                           f"import sidecar.engines.{name}"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
