"""No two engine modules import each other, not even from inside a function (that each module
imports on its own is tests/test_layout.py's check, for the whole package)."""

from __future__ import annotations

import ast
from pathlib import Path

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
