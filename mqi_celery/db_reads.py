"""What people and periodic work read (cases with their jobs, events, counts), as plain SQL
on a DB-API connection.

The Store reads through here on its pooled connections; ``mqi cases list/show`` reads
through here on a connection of its own, without importing SQLAlchemy: that import alone
takes 0.23 s on a 2-core machine, half of what a person should wait for a listing (see
docs/benchmarks.md). Writes stay in ``store``. Only SQLite (``sqlite3``) and PostgreSQL
(``psycopg2``) are spoken here, the two databases the project supports.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Callable, Iterator

from .db_url import DatabaseURL
from .errors import ConnectionError_
from .models import ACTIVE_CASE, Case, CaseStatus, Job, JobStatus

# The Alembic head: a database at it is read without Alembic (a test keeps them equal).
SCHEMA_REVISION = "0008"
HOST_EVENTS = ("host_unreachable", "host_reachable")
_ACTIVE = tuple(s.value for s in ACTIVE_CASE)
CASE_COLUMNS = ("case_id", "path", "status", "step", "error", "trace_id", "study_uid", "attempts", "stage",
                "dispatch", "lease_until", "reconciles", "wait_reason", "created_at", "updated_at", "manifest",
                "verdict", "qa")
JOB_COLUMNS = ("id", "case_id", "beam", "beam_name", "delivery_dir", "status", "step", "error", "scheduler",
               "remote_id", "remote_state", "exit_code", "gpu_id", "results", "submitted_at", "started_at",
               "resubmits", "judge_attempts", "finished_at")
_CASES = f"SELECT {', '.join(CASE_COLUMNS)} FROM cases"
_JOBS = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"
Query = Callable[..., list]  # query(sql with ? placeholders, *params) -> rows


def _when(value):
    """SQLite hands back the text SQLAlchemy stored ('2026-12-03 01:02:03.000123')."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def case_of(v: dict[str, Any], jobs: list[Job] | tuple[Job, ...] = ()) -> Case:
    """A Case from its column values (a row read here, or an ORM row's attributes)."""
    return Case(case_id=v["case_id"], path=v["path"], status=CaseStatus(v["status"]), step=v["step"],
                error=v["error"], trace_id=v["trace_id"], study_uid=v["study_uid"], attempts=v["attempts"] or 0,
                stage=v["stage"], dispatch=v["dispatch"] or 0, lease_until=_when(v["lease_until"]),
                reconciles=v["reconciles"] or 0, wait_reason=v["wait_reason"], created_at=_when(v["created_at"]),
                updated_at=_when(v["updated_at"]), manifest=_json(v["manifest"]) or {}, verdict=v["verdict"],
                qa=_json(v["qa"]),
                jobs=tuple(sorted(jobs, key=lambda j: j.beam)))


def job_of(v: dict[str, Any]) -> Job:
    return Job(id=v["id"], case_id=v["case_id"], beam=v["beam"], beam_name=v["beam_name"],
               delivery_dir=v["delivery_dir"], status=JobStatus(v["status"]), step=v["step"], error=v["error"],
               scheduler=v["scheduler"], remote_id=v["remote_id"], remote_state=v["remote_state"],
               exit_code=v["exit_code"], gpu_id=v["gpu_id"], results=_json(v["results"]) or {},
               submitted_at=_when(v["submitted_at"]), started_at=_when(v["started_at"]),
               resubmits=v["resubmits"] or 0, judge_attempts=v["judge_attempts"] or 0,
               finished_at=_when(v["finished_at"]))


def _marks(values) -> str:
    return ", ".join("?" for _ in values)


def _by_case_ids(q: Query, select: str, ids: list[str]) -> list:
    """``select`` rows of these cases, in bounded IN lists."""
    rows = []
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        rows += q(f"{select} WHERE case_id IN ({_marks(chunk)})", *chunk)
    return rows


@contextmanager
def reading(conn, *, sqlite: bool) -> Iterator[Query]:
    """Queries on one DB-API connection. On SQLite they share one snapshot (a read
    transaction in WAL mode); SQLite takes ``?`` and datetimes as SQLAlchemy's text,
    psycopg2 takes ``%s`` and datetimes as they are."""
    cur = conn.cursor()

    def query(sql: str, *params) -> list:
        if sqlite:
            params = tuple(p.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(p, datetime) else p for p in params)
        cur.execute(sql if sqlite else sql.replace("?", "%s"), params)
        return cur.fetchall()

    if sqlite:
        cur.execute("BEGIN")
    try:
        yield query
    finally:
        if sqlite:
            cur.execute("COMMIT")
        cur.close()


class CaseReads:
    """Mixin: the reads. A subclass provides ``_reading()``, a context manager yielding a
    ``Query``."""

    def _reading(self):  # pragma: no cover - provided by the subclass
        raise NotImplementedError

    def get_case(self, case_id: str) -> Case | None:
        with self._reading() as q:
            return next(iter(self._with_jobs(q, q(f"{_CASES} WHERE case_id = ?", case_id))), None)

    def list_cases(self, status: CaseStatus | None = None) -> list[Case]:
        """Every case (or every one with ``status``), oldest first: for tests and small
        installations; people and periodic work use ``recent_cases``."""
        return self.recent_cases(status=status, limit=None, active=False)

    def recent_cases(self, *, status: CaseStatus | None = None, since: datetime | None = None,
                     limit: int | None = 50, active: bool = True) -> list[Case]:
        """What a person asks for, filtered and paged by the database: the active cases
        (``active``) plus the ``limit`` most recently changed others (with ``status``, changed
        since ``since``), shown oldest first, with their jobs. Costs what is shown."""
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        elif active:
            where.append(f"status NOT IN ({_marks(_ACTIVE)})")
            params += _ACTIVE
        if since is not None:
            where.append("updated_at >= ?")
            params.append(since)
        sql = _CASES + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY updated_at DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._reading() as q:
            rows = q(sql, *params)
            if active and status is None:
                rows += q(f"{_CASES} WHERE status IN ({_marks(_ACTIVE)})", *_ACTIVE)
            return self._with_jobs(q, rows)

    def changed_cases(self, since: datetime) -> list[Case]:
        """Cases whose row or any job changed since ``since`` (the non-interactive live view)."""
        with self._reading() as q:
            ids = sorted({r[0] for r in q("SELECT case_id FROM cases WHERE updated_at >= ?", since)}
                         | {r[0] for r in q("SELECT case_id FROM jobs WHERE updated_at >= ?", since)})
            return self._with_jobs(q, _by_case_ids(q, _CASES, ids))

    @staticmethod
    def _with_jobs(q: Query, rows: list) -> list[Case]:
        """Cases from rows, with their jobs, oldest first."""
        cases = [dict(zip(CASE_COLUMNS, r)) for r in rows]
        jobs: dict[str, list[Job]] = {}
        for r in _by_case_ids(q, _JOBS, [c["case_id"] for c in cases]):
            job = job_of(dict(zip(JOB_COLUMNS, r)))
            jobs.setdefault(job.case_id, []).append(job)
        found = [case_of(c, jobs.get(c["case_id"], ())) for c in cases]
        return sorted(found, key=lambda c: (c.created_at, c.case_id))

    def count_by_status(self) -> tuple[dict[str, int], dict[str, int]]:
        """Cases and jobs per status, counted by the database."""
        with self._reading() as q:
            return (dict(q("SELECT status, COUNT(*) FROM cases GROUP BY status")),
                    dict(q("SELECT status, COUNT(*) FROM jobs GROUP BY status")))

    def inbox_problem_rows(self) -> list[dict[str, Any]]:
        """What the inbox holds that is not a case, and why, by entry."""
        with self._reading() as q:
            rows = q("SELECT entry, reason, seen_at FROM inbox_problems ORDER BY entry")
        return [{"entry": e, "reason": r, "seen_at": _when(at).isoformat() + "Z"} for e, r, at in rows]

    def inbox_problems(self) -> dict[str, str]:
        return {p["entry"]: p["reason"] for p in self.inbox_problem_rows()}

    def waiting_cases(self, limit: int = 50) -> list[dict[str, Any]]:
        """Active cases that wait for something outside them, and why (oldest first)."""
        with self._reading() as q:
            rows = q(f"SELECT case_id, status, stage, wait_reason FROM cases WHERE status IN ({_marks(_ACTIVE)}) "
                     "AND wait_reason IS NOT NULL ORDER BY created_at LIMIT ?", *_ACTIVE, int(limit))
        return [{"case_id": c, "status": st, "stage": sg, "reason": r} for c, st, sg, r in rows]

    # --- hosts -------------------------------------------------------------------------
    def reading(self, host: str) -> tuple[dict[str, Any] | None, datetime | None]:
        """The host's latest reading and when it was taken (None, None before the first)."""
        with self._reading() as q:
            rows = q("SELECT reading, read_at FROM hosts WHERE name = ?", host)
        return (_json(rows[0][0]), _when(rows[0][1])) if rows else (None, None)

    def claims(self, host: str) -> dict[str, tuple[str, int]]:
        """resource -> (case_id, beam) held on the host."""
        with self._reading() as q:
            return {r: (c, b) for r, c, b in q("SELECT resource, case_id, beam FROM claims WHERE host = ?", host)}

    def breaker_state(self, host: str) -> tuple[str, datetime | None, str | None]:
        """The host's circuit breaker: (closed | open | half_open, open since, last error)."""
        with self._reading() as q:
            rows = q("SELECT state, opened_at, last_error FROM hosts WHERE name = ?", host)
        return ("closed", None, None) if not rows else (rows[0][0], _when(rows[0][1]), rows[0][2])

    def events(self, case_id: str, *, with_hosts: bool = False) -> list[dict[str, Any]]:
        """The case's events; ``with_hosts`` adds host outages seen since it was registered.
        (Two indexed queries: an OR of the two would read the whole events table.)"""
        cols = "SELECT id, command, payload, correlation_id, timestamp FROM events"
        with self._reading() as q:
            rows = q(f"{cols} WHERE case_id = ?", case_id)
            if with_hosts:
                rows += q(f"{cols} WHERE case_id IS NULL AND command IN ({_marks(HOST_EVENTS)}) AND timestamp >= "
                          "(SELECT created_at FROM cases WHERE case_id = ?)", *HOST_EVENTS, case_id)
        return [{"command": c, "payload": _json(p), "correlation_id": cid, "timestamp": _when(t).isoformat() + "Z"}
                for _, c, p, cid, t in sorted(rows, key=lambda r: r[0])]


class DirectReads(CaseReads):
    """The reads on a connection of their own, for one command-line call."""

    def __init__(self, conn, *, sqlite: bool):
        self._conn, self._sqlite = conn, sqlite

    @contextmanager
    def _reading(self):
        with reading(self._conn, sqlite=self._sqlite) as q:
            yield q


def direct_reads(url: str) -> DirectReads | None:
    """Reads for ``url`` without SQLAlchemy; None where the Store must be used instead: a
    URL this module does not speak, or a schema not at ``SCHEMA_REVISION`` (the caller says
    so; a read never migrates). A PostgreSQL server that does not answer raises
    ``ConnectionError_``."""
    parsed = DatabaseURL(url)
    try:
        if url.startswith(("sqlite:///", "sqlite+pysqlite:///")) and not parsed.has_options:
            import sqlite3

            path = parsed.sqlite_path
            if path is None or not path.is_file():  # no database there (the CLI says so before asking)
                return None
            conn, sqlite = sqlite3.connect(path, timeout=30, isolation_level=None), True
        elif url.startswith(("postgresql://", "postgresql+psycopg2://")):
            import psycopg2

            try:
                conn, sqlite = psycopg2.connect(parsed.libpq(), **parsed.connect_args()), False
            except psycopg2.OperationalError as exc:  # said at once, without the Store's imports
                first = (str(exc).strip().splitlines() or ["no answer"])[0]
                raise ConnectionError_(f"the database ({parsed.where}) cannot be reached: {first}") from None
            conn.autocommit = True
        else:
            return None
        with reading(conn, sqlite=sqlite) as q:
            current = q("SELECT version_num FROM alembic_version")
    except ConnectionError_:
        raise
    except Exception:  # noqa: BLE001 - the Store path reports (or repairs) whatever this was
        return None
    if current != [(SCHEMA_REVISION,)]:
        conn.close()
        return None
    return DirectReads(conn, sqlite=sqlite)
