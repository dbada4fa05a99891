"""Logger: JSON lines, each carrying the ``correlation_id`` of the case being worked on.

The id lives in a context variable set around each task (see ``tasks.PipelineTask``), so
every line written while a task works on a case carries it, Celery's own task log lines
included. Patient names never reach a log: log case ids, beams and file names only.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.handlers
import sys
from datetime import datetime, timezone
from pathlib import Path

correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)

# Attributes every LogRecord has; anything else passed via ``extra=`` is emitted as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "module": record.name,
            "correlation_id": getattr(record, "correlation_id", None) or correlation_id.get(),
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k not in line})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


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
