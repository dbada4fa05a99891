"""Case Scanner (celery beat, queue ``scan``): finds new cases in the inbox, registers each
exactly once and hands it to the Conductor, which validates and dispatches it.

A case folder is a study folder: it holds an ``RP*.dcm`` plan or delivery folders. It may
sit at ``<inbox>/<study>/`` or nested as ``<inbox>/<room>/<patient>/<study>/``. It is ready
when a ``_CASE_READY`` marker exists in it or in a folder above it (inside the inbox), or
when nothing in it changed for ``scanner.settle_seconds``.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from . import case_reader, runtime
from .celery_app import app
from .conductor import admit
from .naming import case_id_for

log = logging.getLogger(__name__)


def candidates(inbox: Path, max_depth: int) -> Iterator[Path]:
    """Study folders under the inbox, not descending into a case once found."""
    def walk(folder: Path, depth: int) -> Iterator[Path]:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if looks_like_case(child):
                yield child
            elif depth < max_depth:
                yield from walk(child, depth + 1)

    if inbox.is_dir():
        yield from walk(inbox, 1)


def looks_like_case(folder: Path) -> bool:
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    return any(e.is_file() and e.suffix.lower() == ".dcm" for e in entries) or any(
        e.is_dir() and case_reader.is_delivery_folder(e) for e in entries)


def is_ready(case_dir: Path, inbox: Path, marker: str, settle_seconds: float, now: float | None = None) -> bool:
    folder = case_dir
    while True:
        if (folder / marker).exists():
            return True
        if folder == inbox or folder.parent == folder:
            break
        folder = folder.parent
    newest = max((entry.stat().st_mtime for entry in _walk_entries(case_dir)), default=case_dir.stat().st_mtime)
    return (now or time.time()) - newest >= settle_seconds


def _walk_entries(folder: Path) -> Iterator[Path]:
    yield folder
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            yield Path(root) / name


def register(case_dir: Path) -> str | None:
    """Register one ready case and admit it. Returns its id, or None when another scan
    registered this folder first."""
    store = runtime.store()
    case_id = case_id_for(case_dir.name)
    n = 2
    while store.case_id_taken(case_id):  # the same study dropped twice at different paths
        case_id = f"{case_id_for(case_dir.name)}-{n}"
        n += 1
    if not store.register_case(case_id, str(case_dir), lease_seconds=runtime.settings().reconciler.lease_seconds):
        return None
    admit(case_id)
    return case_id


def scan_once() -> list[str]:
    settings, store = runtime.settings(), runtime.store()
    known = store.known_paths()
    registered = []
    for case_dir in candidates(settings.paths.inbox, settings.scanner.max_depth):
        if str(case_dir) in known:
            continue
        if not is_ready(case_dir, settings.paths.inbox, settings.scanner.marker, settings.scanner.settle_seconds):
            continue
        case_id = register(case_dir)
        if case_id:
            registered.append(case_id)
    return registered


@app.task(name="mqi.scan_inbox", ignore_result=True)
def scan_inbox() -> list[str]:
    return scan_once()
