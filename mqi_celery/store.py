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

from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, delete, exists, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from . import db, db_reads
from .host_records import HostRecords
from .lifecycle import POLLER_RESUMES, POLLER_STARTS, CaseStep, Stage
from .models import ACTIVE_CASE, TERMINAL_JOB, Case, CaseStatus, Job, JobStatus, check_transition

_ACTIVE = [s.value for s in ACTIVE_CASE]
_LIVE_JOB = [JobStatus.PENDING.value, JobStatus.RUNNING.value]
_POLLER_STARTS = [step.value for step in POLLER_STARTS]
_POLLER_RESUMES = [step.value for step in POLLER_RESUMES]


@dataclass(frozen=True)
class NewJob:
    beam: int
    beam_name: str
    delivery_dir: str


def _case(row: db.CaseRow) -> Case:
    return db_reads.case_of({c: getattr(row, c) for c in db_reads.CASE_COLUMNS})


def _epoch(when: datetime) -> float:
    return when.replace(tzinfo=timezone.utc).timestamp()  # stored naive, in UTC


def _job(row: db.JobRow) -> Job:
    return db_reads.job_of({c: getattr(row, c) for c in db_reads.JOB_COLUMNS})


class Store(HostRecords, db_reads.CaseReads):
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

    @contextmanager
    def _reading(self):
        """Plain SQL on a pooled connection (see ``db_reads``); returned to the pool after.
        The driver's own errors come out as SQLAlchemy's, as on every other path, so a
        database that does not answer is told from a wrong query the same way everywhere."""
        dialect, conn = self.engine.dialect, None
        try:
            conn = self.engine.raw_connection()
            with db_reads.reading(conn, sqlite=not db.is_postgres(self.engine)) as q:
                yield q
        except dialect.loaded_dbapi.Error as exc:
            lost = conn is not None and dialect.is_disconnect(exc, conn.dbapi_connection, None)
            if lost:
                conn.invalidate()  # never handed out again
            raise DBAPIError.instance(None, None, exc, dialect.loaded_dbapi.Error,
                                      connection_invalidated=lost, dialect=dialect) from exc
        finally:
            if conn is not None:
                conn.close()

    def _lock(self, s: Session, model, *where):
        stmt = select(model).where(*where)
        if db.is_postgres(self.engine):
            stmt = stmt.with_for_update()
        return s.scalars(stmt)

    # --- cases -------------------------------------------------------------------------
    def register_case(self, case_id: str, path: str, *, status: CaseStatus = CaseStatus.NEW,
                      error: str | None = None, study_uid: str | None = None,
                      lease_seconds: float | None = None) -> bool:
        """Insert the case unless its path is known. True only for the one caller that won.
        With a lease, a case whose validation never ran (a crash right after) is found again."""
        now = db.utcnow()
        stmt = db.insert(self.engine, db.CaseRow).values(
            case_id=case_id, path=path, status=status.value, error=error, study_uid=study_uid,
            trace_id=uuid.uuid4().hex, manifest={}, attempts=0, created_at=now, updated_at=now,
            stage=Stage.UPLOAD.value, dispatch=0, reconciles=0,
            lease_until=None if lease_seconds is None else now + timedelta(seconds=lease_seconds),
        ).on_conflict_do_nothing()
        with self.session() as s:
            return s.execute(stmt).rowcount == 1

    def known_paths(self, since: datetime | None = None) -> set[str]:
        """Paths of the registered cases (those registered since ``since``: indexed)."""
        with self.session() as s:
            stmt = select(db.CaseRow.path)
            if since is not None:
                stmt = stmt.where(db.CaseRow.created_at >= since)
            return set(s.scalars(stmt))

    def copy_of(self, case_id: str, study_uid: str, manifest: dict[str, str]) -> str | None:
        """Another case of the same study whose files are the same as ``manifest``: the same
        delivery dropped twice (under another folder name)."""
        with self.session() as s:
            rows = s.execute(select(db.CaseRow.case_id, db.CaseRow.manifest).where(
                db.CaseRow.study_uid == study_uid, db.CaseRow.case_id != case_id))
            return next((other for other, files in rows if files == manifest), None)

    # --- a case folder's content against what was validated (scanner.look_again) ------
    def checked_since(self, since: datetime | None = None) -> dict[str, float]:
        """Path -> when its content was last known to be what was validated (seconds since
        the epoch), for the cases changed since ``since`` (indexed; all when None)."""
        with self.session() as s:
            stmt = select(db.CaseRow.path, db.CaseRow.checked_at).where(db.CaseRow.checked_at.is_not(None))
            if since is not None:
                stmt = stmt.where(db.CaseRow.updated_at >= since)
            return {path: _epoch(when) for path, when in s.execute(stmt)}

    def content_check(self, path: str) -> tuple[Case, float, list[str]] | None:
        """The case registered at ``path``, when its content was last checked and the files
        left out of it (None when it was never validated: nothing to compare with)."""
        with self.session() as s:
            row = s.scalars(select(db.CaseRow).where(db.CaseRow.path == path)).one_or_none()
            if row is None or row.checked_at is None:
                return None
            return _case(row), _epoch(row.checked_at), list(row.left_out or ())

    def active_checked_paths(self) -> list[str]:
        """Folders of the validated cases still in the pipeline (their files must stay as
        they were), and of those failed because they changed (they run again once settled)."""
        with self.session() as s:
            return list(s.scalars(select(db.CaseRow.path).where(
                or_(db.CaseRow.status.in_([CaseStatus.QUEUED.value, CaseStatus.PROCESSING.value]),
                    (db.CaseRow.status == CaseStatus.FAILED.value) & (db.CaseRow.step == CaseStep.FOLDER_CHANGED.value)),
                db.CaseRow.checked_at.is_not(None))))

    def new_run(self, case_id: str, lease_seconds: float, event: dict[str, Any]) -> Case | None:
        """A finished case starts again from validation (its folder holds other content now):
        its beams are forgotten (the new content says which there are), its run counted, and
        ``event`` (``messages.prepare``) recorded with it. None unless it was COMPLETED or FAILED."""
        with self.session() as s:
            row = self._lock(s, db.CaseRow, db.CaseRow.case_id == case_id).one_or_none()
            if row is None or row.status not in (CaseStatus.COMPLETED.value, CaseStatus.FAILED.value):
                return None
            check_transition("case", CaseStatus(row.status), CaseStatus.NEW)
            s.execute(delete(db.JobRow).where(db.JobRow.case_id == case_id))
            for name, value in dict(status=CaseStatus.NEW.value, step=None, error=None, stage=None, manifest={},
                                    study_uid=None, attempts=row.attempts + 1, reconciles=0, wait_reason=None,
                                    checked_at=None, left_out=[],
                                    lease_until=db.utcnow() + timedelta(seconds=lease_seconds),
                                    updated_at=db.utcnow()).items():
                setattr(row, name, value)
            s.add(db.EventRow(case_id=case_id, command=event["command"], payload=event["payload"],
                              correlation_id=event["correlation_id"]))
            s.flush()
            return _case(row)

    def settling_cases(self) -> list[tuple[str, str]]:
        """(case id, path) of cases whose validation waits for their folder to settle."""
        with self.session() as s:
            return list(s.execute(select(db.CaseRow.case_id, db.CaseRow.path).where(
                db.CaseRow.status == CaseStatus.NEW.value, db.CaseRow.step == CaseStep.SETTLING.value)))

    def validation_failures(self) -> dict[str, tuple[str, Any]]:
        """Cases that failed validation, by path: (case id, when)."""
        with self.session() as s:
            rows = s.execute(select(db.CaseRow.path, db.CaseRow.case_id, db.CaseRow.updated_at).where(
                db.CaseRow.status == CaseStatus.FAILED.value, db.CaseRow.step == CaseStep.VALIDATION.value))
            return {path: (case_id, when) for path, case_id, when in rows}

    def case_id_taken(self, case_id: str) -> bool:
        with self.session() as s:
            return s.get(db.CaseRow, case_id) is not None

    def update_case(self, case_id: str, *, status: CaseStatus | None = None,
                    only_from: Iterable[CaseStatus] | None = None, events: Iterable[dict[str, Any]] = (),
                    **fields: Any) -> Case | None:
        """Change a case; with ``only_from`` it is a no-op (None) unless the case is in one of
        those statuses — the way idempotent steps skip work that is already done. ``events``
        (``messages.prepare``): recorded in the same transaction as the change."""
        def after(s: Session, row: db.CaseRow) -> None:
            for event in events:
                s.add(db.EventRow(case_id=case_id, command=event["command"], payload=event["payload"],
                                  correlation_id=event["correlation_id"]))
        row = self._update(db.CaseRow, (db.CaseRow.case_id == case_id,), "case", CaseStatus, status,
                           only_from, fields, after=after)
        return None if row is None else _case(row)

    def _update(self, model, where, kind, status_type, status, only_from, fields, after=None):
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
            if after is not None:
                after(s, row)
            s.flush()
            return row

    # --- leases (see conductor and reconciler) -----------------------------------------
    def _change_case(self, case_id: str, change) -> Case | None:
        """Lock the case row, let ``change(row)`` edit it; None if absent or it said False."""
        with self.session() as s:
            row = self._lock(s, db.CaseRow, db.CaseRow.case_id == case_id).one_or_none()
            if row is None or change(row) is False:
                return None
            row.updated_at = db.utcnow()
            s.flush()
            return _case(row)

    def start_dispatch(self, case_id: str, lease_seconds: float, *, stage: str | None = None,
                       reconcile: bool = False, resume: bool = False) -> Case | None:
        """A new dispatch owns the case's current (or given) stage: tasks of older dispatches
        skip themselves from now on. None when the case is over or the poller owns it;
        ``resume``: None too unless it still waits, parked (another resume was first)."""
        def change(row):
            if row.status not in (CaseStatus.QUEUED.value, CaseStatus.PROCESSING.value):
                return False
            if (reconcile or resume) and row.lease_until is not None and row.lease_until >= db.utcnow():
                return False  # a task renewed the lease since the reconciler looked: alive after all
            if resume and row.wait_reason is None:
                return False
            row.stage = stage or row.stage or Stage.UPLOAD.value
            if row.stage == Stage.RUN.value:
                row.wait_reason = None
                return False
            row.dispatch = (row.dispatch or 0) + 1
            row.lease_until = db.utcnow() + timedelta(seconds=lease_seconds)
            row.wait_reason = None
            if reconcile:
                row.reconciles = (row.reconciles or 0) + 1
        return self._change_case(case_id, change)

    def hold_lease(self, case_id: str, dispatch: int, lease_seconds: float) -> Case | None:
        """A task of ``dispatch`` starts (or schedules its retry): extend the lease. None
        when a later dispatch took over or the case is over."""
        def change(row):
            if row.dispatch != dispatch or row.status not in _ACTIVE:
                return False
            if row.stage != Stage.RUN.value:
                row.lease_until = db.utcnow() + timedelta(seconds=lease_seconds)
        return self._change_case(case_id, change)

    def advance_stage(self, case_id: str, frm: str, to: str, lease_seconds: float | None = None) -> Case | None:
        """Move the case from stage ``frm`` to ``to`` (a finished step); None if it was not
        in ``frm`` (someone else moved it: the caller must not act twice)."""
        def change(row):
            if row.stage != frm or row.status not in _ACTIVE:
                return False
            row.stage, row.reconciles = to, 0
            row.lease_until = None if lease_seconds is None else db.utcnow() + timedelta(seconds=lease_seconds)
        return self._change_case(case_id, change)

    def finish_submits(self, case_id: str) -> bool:
        """Once no beam is left to submit, the case is the poller's (stage "run"); beams
        waiting for their host (a GPU, a slot, a drained partition) or whose submit was
        lost are the poller's too."""
        pending = exists().where(db.JobRow.case_id == db.CaseRow.case_id, db.JobRow.status == JobStatus.PENDING.value,
                                 or_(db.JobRow.step.is_(None), db.JobRow.step.not_in(_POLLER_STARTS)))
        stmt = (update(db.CaseRow).where(db.CaseRow.case_id == case_id, db.CaseRow.stage == Stage.SUBMIT.value,
                                         db.CaseRow.status == CaseStatus.PROCESSING.value, ~pending)
                .values(stage=Stage.RUN.value, lease_until=None, reconciles=0, updated_at=db.utcnow()))
        with self.session() as s:
            return s.execute(stmt.execution_options(synchronize_session=False)).rowcount == 1

    def park(self, case_id: str, dispatch: int | None, reason: str) -> Case | None:
        """The case waits for an outside condition (a host outage): no lease, the reason shown."""
        def change(row):
            if row.status not in _ACTIVE or (dispatch is not None and row.dispatch != dispatch):
                return False
            row.wait_reason, row.lease_until = reason, None
        return self._change_case(case_id, change)

    def park_active(self, reason: str) -> int:
        """Show the reason on every active case that is not already waiting."""
        stmt = (update(db.CaseRow).where(db.CaseRow.status.in_((CaseStatus.QUEUED.value, CaseStatus.PROCESSING.value)),
                                         db.CaseRow.wait_reason.is_(None))
                .values(wait_reason=reason, updated_at=db.utcnow()))
        with self.session() as s:
            return s.execute(stmt.execution_options(synchronize_session=False)).rowcount

    def expired_leases(self, limit: int = 100) -> list[str]:
        """Active cases whose dispatch is presumed dead (its lease ran out). A parked case
        holds no lease; one with a reason shown but a lease (its beams wait for a GPU while
        others are being submitted) is still its dispatch's, and can be lost with it."""
        with self.session() as s:
            return list(s.scalars(select(db.CaseRow.case_id).where(
                db.CaseRow.status.in_(_ACTIVE), db.CaseRow.lease_until < db.utcnow())
                .order_by(db.CaseRow.lease_until).limit(limit)))

    def parked_cases(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(db.CaseRow.case_id).where(
                db.CaseRow.status.in_(_ACTIVE), db.CaseRow.wait_reason.is_not(None))))

    def void_leases(self) -> int:
        """At start-up of a whole installation no task can be alive: every lease is void, and
        so is its dispatch. A task of it still queued must not take the lease again (one beam's
        submit would hold the case while its sibling's message died with the crash): it finds
        itself superseded, and the reconciler dispatches the case again."""
        stmt = (update(db.CaseRow).where(db.CaseRow.status.in_(_ACTIVE), db.CaseRow.lease_until.is_not(None))
                .values(lease_until=db.utcnow() - timedelta(seconds=1), dispatch=db.CaseRow.dispatch + 1))
        with self.session() as s:
            return s.execute(stmt.execution_options(synchronize_session=False)).rowcount

    def cases_to_collect(self) -> list[str]:
        """Cases in the poller's stage whose every beam is over: their results can come down."""
        live = exists().where(db.JobRow.case_id == db.CaseRow.case_id, db.JobRow.status.in_(_LIVE_JOB))
        with self.session() as s:
            return list(s.scalars(select(db.CaseRow.case_id).where(
                db.CaseRow.status == CaseStatus.PROCESSING.value, db.CaseRow.stage == Stage.RUN.value, ~live)))

    def replace_inbox_problems(self, current: dict[str, str], recorded: dict[str, str]) -> list[str]:
        """Make the stored problems ``current`` (``recorded``: what the caller read before);
        returns the entries that are new or have a new reason. Of two scans racing, the
        loser changes nothing (the next scan catches up)."""
        from sqlalchemy.exc import IntegrityError

        changed = [e for e, r in current.items() if recorded.get(e) != r]
        try:
            with self.session() as s:
                gone = [e for e in recorded if e not in current or e in changed]
                if gone:
                    s.execute(delete(db.InboxProblemRow).where(db.InboxProblemRow.entry.in_(gone)))
                s.add_all(db.InboxProblemRow(entry=e, reason=current[e], seen_at=db.utcnow()) for e in changed)
        except IntegrityError:
            return []
        return changed

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
                   event: dict[str, Any] | None = None, **fields: Any) -> Job | None:
        """``if_remote_id``: change nothing (None) unless the job is still that run — a
        resubmit in between must not receive the old run's outcome. ``event`` (a message of
        ``messages.prepare``): recorded in the same transaction as the change, so a crash
        can never keep one without the other."""
        where = (db.JobRow.case_id == case_id, db.JobRow.beam == beam)
        if if_remote_id is not None:
            where += (db.JobRow.remote_id == if_remote_id,)

        def after(s: Session, row: db.JobRow) -> None:
            if status in TERMINAL_JOB:
                self._release_if_over(s, row)
            if event is not None:
                s.add(db.EventRow(case_id=case_id, command=event["command"], payload=event["payload"],
                                  correlation_id=event["correlation_id"]))
        row = self._update(db.JobRow, where, "job", JobStatus, status, only_from, fields, after=after)
        return None if row is None else _job(row)

    def _release_if_over(self, s: Session, row: db.JobRow) -> None:
        """A job that ended gives its GPU and slot back in the same transaction: no path
        (finished, failed, cancelled, verification failed) can leave them held."""
        self.release_claims(row.case_id, row.beam, s=s)

    def waiting_jobs(self, limit: int = 500) -> list[Job]:
        """Beams ready to run that wait for their host (or whose start a dying poll cut
        off: ``lifecycle.POLLER_RESUMES``), oldest case first."""
        with self.session() as s:
            rows = s.scalars(select(db.JobRow).join(db.CaseRow, db.CaseRow.case_id == db.JobRow.case_id).where(
                db.JobRow.status == JobStatus.PENDING.value, db.JobRow.step.in_(_POLLER_RESUMES),
                db.CaseRow.status == CaseStatus.PROCESSING.value, db.CaseRow.stage == Stage.RUN.value)
                .order_by(db.CaseRow.created_at, db.JobRow.case_id, db.JobRow.beam).limit(limit))
            return [_job(r) for r in rows]

    def runs_since(self, since) -> list[Job]:
        """Jobs handed to a scheduler that are running or changed since ``since`` (one that
        started and ended while a reading was taken is among them)."""
        with self.session() as s:
            rows = s.scalars(select(db.JobRow).where(db.JobRow.remote_id.is_not(None), or_(
                db.JobRow.status == JobStatus.RUNNING.value, db.JobRow.updated_at >= since)))
            return [_job(r) for r in rows]

    def active_jobs(self) -> list[Job]:
        """Jobs handed to a scheduler and not yet judged: what the poller looks after
        (``finished_at`` set: seen to end, the verdict still to be written)."""
        with self.session() as s:
            rows = s.scalars(select(db.JobRow).where(db.JobRow.status == JobStatus.RUNNING.value,
                                                     db.JobRow.remote_id.is_not(None)))
            return [_job(r) for r in rows]

    # --- events ------------------------------------------------------------------------
    def last_event(self, case_id: str, commands: Iterable[str]) -> str | None:
        """The latest of these events of the case (its command), if any."""
        with self.session() as s:
            return s.scalar(select(db.EventRow.command).where(db.EventRow.case_id == case_id,
                                                              db.EventRow.command.in_(list(commands)))
                            .order_by(db.EventRow.id.desc()).limit(1))

    def add_event(self, command: str, payload: dict[str, Any], *, case_id: str | None,
                  correlation_id: str | None) -> None:
        with self.session() as s:
            s.add(db.EventRow(case_id=case_id, command=command, payload=payload,
                              correlation_id=correlation_id))
