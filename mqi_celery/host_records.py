"""The state store's rows about hosts: circuit breaker and poll health, the System
Curator's latest reading, and the claims beam jobs hold on a host's GPUs and job slots.
(A part of ``store.Store``; kept apart so store.py stays about cases and jobs.)
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from . import db
from .models import JobStatus


class HostRecords:

    def host_row(self, s: Session, name: str) -> db.HostRow:
        """The host's row, locked; created first if new (two processes may race to)."""
        s.execute(db.insert(self.engine, db.HostRow).values(name=name, state="closed", failures=0, updated_at=db.utcnow())
                  .on_conflict_do_nothing())
        return self._lock(s, db.HostRow, db.HostRow.name == name).one()

    def note_poll(self, host: str, error: str | None):
        """Record whether the host's scheduler answered; returns since when it fails (or None)."""
        now = db.utcnow()
        if error is None:  # the usual case, every interval: one UPDATE that matches nothing
            stmt = (update(db.HostRow).where(db.HostRow.name == host, db.HostRow.poll_failing_since.is_not(None))
                    .values(poll_failing_since=None, poll_error=None, updated_at=now))
            with self.session() as s:
                s.execute(stmt.execution_options(synchronize_session=False))
            return None
        with self.session() as s:
            row = self.host_row(s, host)
            row.poll_failing_since = row.poll_failing_since or now
            row.poll_error, row.updated_at = error[:500], now
            return row.poll_failing_since

    def host_states(self) -> dict[str, str]:
        """Each remote host's circuit breaker state."""
        with self.session() as s:
            return dict(s.execute(select(db.HostRow.name, db.HostRow.state)).all())

    # --- the System Curator's readings ------------------------------------------------
    def save_reading(self, host: str, reading: dict[str, Any]) -> None:
        with self.session() as s:
            row = self.host_row(s, host)
            row.reading, row.read_at = reading, db.utcnow()

    def hosts(self) -> list[dict[str, Any]]:
        """Every known host: breaker, poll health and latest reading."""
        with self.session() as s:
            rows = s.scalars(select(db.HostRow).order_by(db.HostRow.name))
            return [{"host": r.name, "breaker": r.state, "breaker_error": r.last_error, "poll_error": r.poll_error,
                     "reading": r.reading, "read_at": r.read_at} for r in rows]

    # --- claims -------------------------------------------------------------------------
    def claim(self, host: str, case_id: str, beam: int, resources: list[str]) -> str | None:
        """The first of ``resources`` nobody holds, now held by the beam's job (or the one
        of them it holds already: a redelivered submit keeps its GPU). None: all taken."""
        with self.session() as s:
            held = s.scalar(select(db.ClaimRow.resource).where(
                db.ClaimRow.host == host, db.ClaimRow.case_id == case_id, db.ClaimRow.beam == beam,
                db.ClaimRow.resource.in_(resources)))
            if held is not None:
                return held
        for resource in resources:
            stmt = (db.insert(self.engine, db.ClaimRow).values(host=host, resource=resource, case_id=case_id, beam=beam,
                                                       claimed_at=db.utcnow()).on_conflict_do_nothing())
            with self.session() as s:  # one statement each: the primary key decides, atomically
                if s.execute(stmt).rowcount == 1:
                    return resource
        return None

    def release_claims(self, case_id: str, beam: int, *, keep: str | None = None, s: Session | None = None) -> None:
        where = [db.ClaimRow.case_id == case_id, db.ClaimRow.beam == beam]
        if keep is not None:
            where.append(db.ClaimRow.resource != keep)
        if s is not None:
            s.execute(delete(db.ClaimRow).where(*where))
            return
        with self.session() as s:
            s.execute(delete(db.ClaimRow).where(*where))

    def reclaim_claims(self, grace_seconds: float) -> list[tuple[str, str, int]]:
        """Claims older than the grace period whose job holds no run (crashed between the
        claim and the submit, or its job is gone): released; returns what was."""
        old = db.utcnow() - timedelta(seconds=grace_seconds)
        with self.session() as s:
            rows = s.execute(select(db.ClaimRow.host, db.ClaimRow.resource, db.ClaimRow.case_id, db.ClaimRow.beam)
                             .outerjoin(db.JobRow, (db.JobRow.case_id == db.ClaimRow.case_id)
                                        & (db.JobRow.beam == db.ClaimRow.beam))
                             .where(db.ClaimRow.claimed_at < old,
                                    (db.JobRow.id.is_(None)) | (db.JobRow.status != JobStatus.RUNNING.value))).all()
            for host, resource, _, _ in rows:
                s.execute(delete(db.ClaimRow).where(db.ClaimRow.host == host, db.ClaimRow.resource == resource))
        return [(h, r, c) for h, r, c, _ in rows]
