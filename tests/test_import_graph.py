"""The package's imports form a one-way graph: no module imports, even lazily inside a
function or for type checking, a module that (transitively) imports it back."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mqi_celery"


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_no_module_imports_itself_back():
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py")}
    cycles = []

    def visit(node, path):
        for nxt in graph.get(node, ()):
            if nxt == path[0]:
                cycles.append(" -> ".join(path + [nxt]))
            elif nxt not in path and len(path) < 12:
                visit(nxt, path + [nxt])
    for module in graph:
        visit(module, [module])
    assert not cycles, "\n".join(sorted(set(cycles))[:20])
