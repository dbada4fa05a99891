"""State store: every read and write of case, job and event rows goes through here.

Status changes are checked against the lifecycle in ``models`` inside the same
transaction that reads the current value (row lock on PostgreSQL), so two workers racing
cannot both move a case.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from . import db
from .models import Case, CaseStatus, Job, JobStatus, check_transition


@dataclass(frozen=True)
class NewJob:
    beam: int
    beam_name: str
    delivery_dir: str


def _case(row: db.CaseRow, jobs: Iterable[db.JobRow] = ()) -> Case:
    return Case(case_id=row.case_id, path=row.path, status=CaseStatus(row.status), step=row.step,
                error=row.error, trace_id=row.trace_id, study_uid=row.study_uid, attempts=row.attempts,
                created_at=row.created_at, updated_at=row.updated_at, manifest=row.manifest or {},
                jobs=tuple(_job(j) for j in sorted(jobs, key=lambda j: j.beam)))


def _job(row: db.JobRow) -> Job:
    return Job(id=row.id, case_id=row.case_id, beam=row.beam, beam_name=row.beam_name, delivery_dir=row.delivery_dir,
               status=JobStatus(row.status), step=row.step, error=row.error, scheduler=row.scheduler,
               remote_id=row.remote_id, remote_state=row.remote_state, exit_code=row.exit_code,
               gpu_id=row.gpu_id, results=row.results or {},
               submitted_at=row.submitted_at, started_at=row.started_at, resubmits=row.resubmits or 0,
               finished_at=row.finished_at)


class Store:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = db.session_factory(engine)

    @classmethod
    def from_url(cls, url: str, *, migrate: bool = True) -> "Store":
        engine = db.make_engine(url)
        if migrate:
            db.migrate(engine)
        return cls(engine)

    @contextmanager
    def session(self):
        with self._sessions.begin() as s:
            yield s

    def _lock(self, s: Session, model, *where):
        stmt = select(model).where(*where)
        if self.engine.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        return s.scalars(stmt)

    # --- cases -------------------------------------------------------------------------
    def register_case(self, case_id: str, path: str, *, status: CaseStatus = CaseStatus.NEW,
                      error: str | None = None, study_uid: str | None = None) -> bool:
        """Insert the case unless its path is known. True only for the one caller that won."""
        insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        now = db.utcnow()
        stmt = insert(db.CaseRow).values(
            case_id=case_id, path=path, status=status.value, error=error, study_uid=study_uid,
            trace_id=uuid.uuid4().hex, manifest={}, attempts=0, created_at=now, updated_at=now,
        ).on_conflict_do_nothing()
        with self.session() as s:
            return s.execute(stmt).rowcount == 1

    def known_paths(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(db.CaseRow.path)))

    def case_id_taken(self, case_id: str) -> bool:
        with self.session() as s:
            return s.get(db.CaseRow, case_id) is not None

    def get_case(self, case_id: str) -> Case | None:
        with self.session() as s:
            row = s.get(db.CaseRow, case_id)
            if row is None:
                return None
            jobs = s.scalars(select(db.JobRow).where(db.JobRow.case_id == case_id)).all()
            return _case(row, jobs)

    def list_cases(self, status: CaseStatus | None = None) -> list[Case]:
        with self.session() as s:
            stmt = select(db.CaseRow).order_by(db.CaseRow.created_at)
            if status is not None:
                stmt = stmt.where(db.CaseRow.status == status.value)
            rows = s.scalars(stmt).all()
            jobs: dict[str, list[db.JobRow]] = {}
            for j in s.scalars(select(db.JobRow)):
                jobs.setdefault(j.case_id, []).append(j)
            return [_case(r, jobs.get(r.case_id, ())) for r in rows]

    def update_case(self, case_id: str, *, status: CaseStatus | None = None,
                    only_from: Iterable[CaseStatus] | None = None, **fields: Any) -> Case | None:
        """Change a case; with ``only_from`` it is a no-op (None) unless the case is in one of
        those statuses — the way idempotent steps skip work that is already done."""
        row = self._update(db.CaseRow, (db.CaseRow.case_id == case_id,), "case", CaseStatus, status,
                           only_from, fields)
        return None if row is None else _case(row)

    def begin_step(self, case_id: str, step: str) -> Case | None:
        """Record the step a PROCESSING case is in; None if the case stopped meanwhile."""
        return self.update_case(case_id, step=step, only_from={CaseStatus.PROCESSING})

    def _update(self, model, where, kind, status_type, status, only_from, fields):
        with self.session() as s:
            row = self._lock(s, model, *where).one_or_none()
            if row is None:
                return None
            current = status_type(row.status)
            if only_from is not None and current not in set(only_from):
                return None
            if status is not None:
                check_transition(kind, current, status)
                row.status = status.value
            for key, value in fields.items():
                setattr(row, key, value)
            row.updated_at = db.utcnow()
            s.flush()
            return row

    # --- jobs --------------------------------------------------------------------------
    def add_jobs(self, case_id: str, jobs: Iterable[NewJob]) -> None:
        """Create the per-beam jobs once; a repeated call keeps existing rows."""
        with self.session() as s:
            existing = set(s.scalars(select(db.JobRow.beam).where(db.JobRow.case_id == case_id)))
            for j in jobs:
                if j.beam not in existing:
                    s.add(db.JobRow(case_id=case_id, beam=j.beam, beam_name=j.beam_name,
                                    delivery_dir=j.delivery_dir, status=JobStatus.PENDING.value,
                                    results={}))

    def get_job(self, case_id: str, beam: int) -> Job:
        with self.session() as s:
            return _job(s.scalars(select(db.JobRow).where(db.JobRow.case_id == case_id,
                                                          db.JobRow.beam == beam)).one())

    def update_job(self, case_id: str, beam: int, *, status: JobStatus | None = None,
                   only_from: Iterable[JobStatus] | None = None, if_remote_id: str | None = None,
                   **fields: Any) -> Job | None:
        """``if_remote_id``: change nothing (None) unless the job is still that run — a
        resubmit in between must not receive the old run's outcome."""
        where = (db.JobRow.case_id == case_id, db.JobRow.beam == beam)
        if if_remote_id is not None:
            where += (db.JobRow.remote_id == if_remote_id,)
        row = self._update(db.JobRow, where, "job", JobStatus, status, only_from, fields)
        return None if row is None else _job(row)

    def active_jobs(self) -> list[Job]:
        """Jobs handed to a scheduler and not yet seen to finish: what the poller asks about."""
        with self.session() as s:
            rows = s.scalars(select(db.JobRow).where(db.JobRow.status == JobStatus.RUNNING.value,
                                                     db.JobRow.remote_id.is_not(None),
                                                     db.JobRow.finished_at.is_(None)))
            return [_job(r) for r in rows]

    # --- events ------------------------------------------------------------------------
    def add_event(self, command: str, payload: dict[str, Any], *, case_id: str | None,
                  correlation_id: str | None) -> None:
        with self.session() as s:
            s.add(db.EventRow(case_id=case_id, command=command, payload=payload,
                              correlation_id=correlation_id))

    def events(self, case_id: str) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(db.EventRow).where(db.EventRow.case_id == case_id).order_by(db.EventRow.id))
            return [{"command": r.command, "payload": r.payload, "correlation_id": r.correlation_id,
                     "timestamp": r.timestamp.isoformat() + "Z"} for r in rows]
