"""Logger: JSON lines, each carrying the ``correlation_id`` of the case being worked on.

The id lives in a context variable set around each task (see ``tasks.PipelineTask``), so
every line written while a task works on a case carries it, Celery's own task log lines
included. Patient names never reach a log: log case ids, beams and file names only.
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import json
import logging
import logging.handlers
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)
# case id -> its correlation id; set by ``tasks`` (the database is theirs to read). Used for
# lines written about a task outside it, e.g. Celery's "Task … received" in the main process.
case_resolver: Callable[[str], str | None] | None = None

# Attributes every LogRecord has; anything else passed via ``extra=`` is emitted as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "module": record.name,
            "correlation_id": getattr(record, "correlation_id", None) or correlation_id.get() or _of_task(record),
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k not in line})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _of_task(record: logging.LogRecord) -> str | None:
    """The correlation id of the case a Celery line's task is about (its ``data``: the
    task's argument reprs; the case id is the first argument or ``case_id``)."""
    data = getattr(record, "data", None)
    if case_resolver is None or not isinstance(data, dict):
        return None
    for key in ("kwargs", "args"):
        try:
            value = ast.literal_eval(data.get(key) or "None")
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue  # a truncated repr: no id
        value = value.get("case_id") if isinstance(value, dict) else \
            value[0] if isinstance(value, (tuple, list)) and value else None
        if isinstance(value, str):
            try:
                return case_resolver(value)
            except Exception:  # noqa: BLE001 - a log line never fails for its correlation id
                return None
    return None


def configure(level: str = "INFO", file: Path | None = None, stream=sys.stderr) -> None:
    """Route the root logger (and so Celery's loggers) through the JSON formatter."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(stream)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        # Watched: after logrotate moves the file away, the next line goes to a new one.
        handlers.append(logging.handlers.WatchedFileHandler(file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)


@contextlib.contextmanager
def bound(trace_id: str | None):
    """Log lines inside the block carry ``trace_id`` as their correlation_id."""
    token = correlation_id.set(trace_id)
    try:
        yield
    finally:
        correlation_id.reset(token)


def for_case(store, case_id: str):
    """Log lines and events inside carry the case's correlation id (for loops over cases)."""
    case = store.get_case(case_id)
    return bound(case.trace_id if case else None)
