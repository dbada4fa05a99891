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


# The Store's methods that write a case's or a job's status, stage or step.
STATE_WRITERS = {"register_case", "begin_step", "advance_stage", "finish_submits", "start_dispatch", "new_run"}
STATE_FIELDS = {"status", "stage", "step"}


def state_writes(path: Path) -> list[str]:
    """Where a module changes a status, stage or step other than through ``lifecycle``:
    a Store writer called, ``update_case``/``update_job`` given one of those fields, or
    one assigned to an attribute."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "lifecycle":
                continue  # the way to do it
            name = node.func.attr
            fields = {k.arg for k in node.keywords} & STATE_FIELDS
            if name in STATE_WRITERS or (name in ("update_case", "update_job") and fields):
                found.append(f"{path.name}:{node.lineno} {name}({', '.join(sorted(fields))})")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in STATE_FIELDS:
                    found.append(f"{path.name}:{node.lineno} .{t.attr} =")
    return found


def test_only_the_lifecycle_module_changes_a_status_stage_or_step():
    # store.py is the persistence lifecycle writes through (its writers are the lifecycle's
    # tools); db.py and migrations define the columns.
    allowed = {"lifecycle", "store", "db"}
    writes = [w for p in sorted(PACKAGE.glob("*.py")) if p.stem not in allowed for w in state_writes(p)]
    assert writes == [], "state changed outside mqi_celery/lifecycle.py:\n" + "\n".join(writes)


def test_the_state_write_check_sees_each_kind_of_write(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("store.update_case(c, status=s)\nstore.update_job(c, b, step='x')\n"
                      "store.advance_stage(c, 'run', 'collect')\nrow.stage = 'run'\n"
                      "store.update_case(c, wait_reason=None)\n")
    assert sorted(w.split(" ", 1)[1] for w in state_writes(sample)) == [
        ".stage =", "advance_stage()", "update_case(status)", "update_job(step)"]
