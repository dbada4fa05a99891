"""The package's shape, checked: its imports form a one-way graph (no module imports, even
lazily inside a function or for type checking, a module that imports it back); Celery stays
in its corner (``celery_app``, ``workers``, and the commands that start or call it); only the
lifecycle module changes a state."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mqi_celery"


def module_name(path: Path) -> str:
    """``conductor``, ``workers.conductor``, ``workers`` (its ``__init__``)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """The package's modules that the module ``name`` (by default: at ``path``) imports."""
    name = name or module_name(path)
    here = name.split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = package[:len(package) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [f"{target}.{a.name}" if target else a.name for a in node.names]
            found.update(n for n in [target, *names] if n in MODULES)
    return found - {name}


def test_no_module_imports_itself_back():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
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


# Where Celery may be imported: the app and its task modules, and the commands that start
# workers or send to them. ``context`` is the composition root: it builds the sender.
CELERY_SIDE = {"__init__", "celery_app", "cli", "cli_common", "cli_qa", "cli_services", "process_manager", "context",
               "metrics_endpoint"}


def celery_imports(path: Path, name: str | None = None) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        found += [f"{path.name}:{node.lineno} import {n}" for n in names if n.split(".")[0] == "celery"]
    return found + [f"{path.name} imports {m}" for m in sorted(imports_of(path, name))
                    if m == "celery_app" or m.startswith("workers") or m == "context"]


def test_domain_modules_import_no_celery_and_take_their_context_as_an_argument():
    domain = [p for name, p in sorted(MODULES.items()) if name not in CELERY_SIDE and not name.startswith("workers")]
    assert len(domain) > 30
    found = [line for p in domain for line in celery_imports(p)]
    assert found == [], "Celery, or this process's context, reached from a domain module:\n" + "\n".join(found)


def test_the_celery_check_sees_each_kind_of_import(tmp_path):
    sample = tmp_path / "scanner.py"
    sample.write_text("from celery import signals\nimport celery.exceptions\nfrom .celery_app import app\n"
                      "def f():\n    from .workers.sending import CelerySender\n    from . import context\n")
    assert [line.split(" ", 1)[1] for line in celery_imports(sample, "scanner")] == [
        "import celery", "import celery.exceptions", "imports celery_app", "imports context",
        "imports workers.sending"]
