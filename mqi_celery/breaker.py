"""Circuit breaker per remote host, shared by every process through the ``hosts`` table.

    closed ──(failures_to_open consecutive connection failures)──► open
    open ──(cooldown over: exactly one caller claims the probe)──► half_open
    half_open ──(the probe connects)──► closed      half_open ──(it fails)──► open

It is consulted only when a process opens a new SSH connection (rare: connections are
pooled), so it costs nothing while the host is fine. While it is open no process touches
the host: cases park with the reason instead of burning their retry budget, and the
reconciler resumes them once the breaker closes. (It imports only the database layer:
it sits under the SSH connection pool.)
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from . import db
from .errors import ConnectionError_

log = logging.getLogger(__name__)


class HostUnavailable(ConnectionError_):
    """The breaker of the host is open: nobody connects until its probe succeeds."""

    def __init__(self, host: str, since: datetime | None, last_error: str | None):
        self.host, self.since = host, since
        when = f"{since:%Y-%m-%d %H:%M:%S} UTC" if since else "recently"
        super().__init__(f"host {host} unreachable since {when}" + (f" ({last_error})" if last_error else ""))


class Breaker:
    #: Called once the breaker closes: the application sends the waiting cases on at once
    #: (set by ``celery_app``; without it they go on at the reconciler's next run).
    on_close = None

    def __init__(self, store, host: str, *, failures_to_open: int, cooldown_seconds: float):
        self.store, self.host = store, host
        self.failures_to_open, self.cooldown = failures_to_open, timedelta(seconds=cooldown_seconds)

    def _row(self, s):
        return self.store.host_row(s, self.host)

    def _event(self, command: str, payload: dict) -> None:
        """A host event in the events table (shown by `mqi cases show` of the cases it
        touched)."""
        self.store.add_event(command, payload, case_id=None, correlation_id=None)

    def state(self) -> tuple[str, datetime | None, str | None]:
        return self.store.breaker_state(self.host)

    def probe_soon(self, within: float) -> None:
        """A periodic prober whose period equals the cool-down would miss a probe due a
        moment after it runs, and wait a whole period more: one due within ``within``
        seconds is due now."""
        now = db.utcnow()
        with self.store.session() as s:
            row = self._row(s)
            if row.state == "open" and row.probe_at and row.probe_at - now <= timedelta(seconds=within):
                row.probe_at = now

    def before_connect(self) -> None:
        """Raise ``HostUnavailable`` unless this caller may try to connect now."""
        now = db.utcnow()
        with self.store.session() as s:
            row = self._row(s)
            if row.state == "closed":
                return
            if row.probe_at and now >= row.probe_at:  # cool-down over (or a probe died): claim it
                row.state, row.probe_at, row.updated_at = "half_open", now + self.cooldown, now
                log.info("breaker of %s half-open: probing", self.host)
                return
            raise HostUnavailable(self.host, row.opened_at, row.last_error)

    def succeeded(self) -> None:
        with self.store.session() as s:
            row = s.get(db.HostRow, self.host)
            if row is None or (row.state == "closed" and row.failures == 0):
                return
        with self.store.session() as s:
            row = self._row(s)
            was, since = row.state, row.opened_at
            row.state, row.failures, row.opened_at, row.probe_at = "closed", 0, None, None
            row.last_error, row.updated_at = None, db.utcnow()
        if was != "closed":
            log.warning("host %s reachable again; its breaker closed", self.host)
            self._event("host_reachable", {"host": self.host, "down_since": since.isoformat() + "Z"})
            if Breaker.on_close is not None:
                Breaker.on_close()

    def failed(self, error: str) -> None:
        now = db.utcnow()
        with self.store.session() as s:
            row = self._row(s)
            row.failures, row.last_error, row.updated_at = (row.failures or 0) + 1, error[:500], now
            opening = row.state == "closed" and row.failures >= self.failures_to_open
            if opening:
                row.state, row.opened_at = "open", now
            if row.state in ("open", "half_open"):
                row.state, row.probe_at = "open", now + self.cooldown
            since = row.opened_at
        if opening:
            reason = str(HostUnavailable(self.host, since, error))
            log.error("breaker of %s opened after %d connection failures: %s", self.host,
                      self.failures_to_open, error)
            self._event("host_unreachable", {"host": self.host, "since": since.isoformat() + "Z",
                                             "failures": self.failures_to_open, "error": error[:500]})
            self.store.park_active(reason)


