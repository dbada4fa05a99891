"""Statuses, transitions and the state store (SQLite here; PostgreSQL in the integration test)."""
import threading
from dataclasses import FrozenInstanceError

import pytest

from mqi_celery import context
from mqi_celery.models import Case, CaseStatus, IllegalTransition, JobStatus
from mqi_celery.db_url import DatabaseURL
from mqi_celery.store import NewJob


def test_status_names_are_the_designs():
    assert [s.value for s in CaseStatus] == ["NEW", "QUEUED", "PROCESSING", "COMPLETED", "FAILED"]
    assert [s.value for s in JobStatus] == ["PENDING", "RUNNING", "COMPLETED", "FAILED"]


def test_case_is_frozen():
    case = Case(case_id="c", path="/p", status=CaseStatus.NEW)
    with pytest.raises(FrozenInstanceError):
        case.status = CaseStatus.FAILED


def test_illegal_transitions_raise(config_file):
    store = context.current().store
    assert store.register_case("c1", "/inbox/c1")
    with pytest.raises(IllegalTransition, match="case cannot go from NEW to COMPLETED"):
        store.update_case("c1", status=CaseStatus.COMPLETED)
    store.update_case("c1", status=CaseStatus.QUEUED)
    store.add_jobs("c1", [NewJob(2, "1G180:TX", "d2")])
    with pytest.raises(IllegalTransition, match="job cannot go from PENDING to COMPLETED"):
        store.update_job("c1", 2, status=JobStatus.COMPLETED)
    assert store.get_case("c1").status is CaseStatus.QUEUED  # nothing half-written


def test_only_from_makes_steps_idempotent(config_file):
    store = context.current().store
    store.register_case("c1", "/inbox/c1")
    assert store.update_case("c1", status=CaseStatus.FAILED, error="x",
                             only_from={CaseStatus.NEW}).status is CaseStatus.FAILED
    assert store.update_case("c1", status=CaseStatus.QUEUED, only_from={CaseStatus.NEW}) is None


def test_racing_registrations_register_a_case_exactly_once(config_file):
    store = context.current().store
    barrier = threading.Barrier(8)
    wins = []

    def register():
        barrier.wait()
        wins.append(store.register_case("same", "/inbox/same"))

    threads = [threading.Thread(target=register) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1 and len(store.list_cases()) == 1


def test_add_jobs_twice_keeps_one_job_per_beam(config_file):
    store = context.current().store
    store.register_case("c1", "/inbox/c1")
    jobs = [NewJob(2, "a", "d2"), NewJob(3, "b", "d3")]
    store.add_jobs("c1", jobs)
    store.add_jobs("c1", jobs)
    assert [j.beam for j in store.get_case("c1").jobs] == [2, 3]


def test_events_are_recorded_in_order(ctx, config_file):
    from mqi_celery import messages

    store = context.current().store
    store.register_case("c1", "/inbox/c1")
    messages.emit(ctx, "new_case_found", {"valid": True}, case_id="c1")
    messages.emit(ctx, "case_failed", {"reason": "x"}, case_id="c1")
    events = store.events("c1")
    assert [e["command"] for e in events] == ["new_case_found", "case_failed"]
    assert events[0]["payload"] == {"case_id": "c1", "valid": True}


def test_a_completed_job_whose_results_fail_verification_can_fail(config_file):
    store = context.current().store
    store.register_case("c1", "/inbox/c1")
    store.add_jobs("c1", [NewJob(2, "a", "d2")])
    store.update_job("c1", 2, status=JobStatus.RUNNING)
    store.update_job("c1", 2, status=JobStatus.COMPLETED)
    assert store.update_job("c1", 2, status=JobStatus.FAILED, results={}).status is JobStatus.FAILED


def test_the_poller_only_updates_the_run_it_asked_about(config_file):
    store = context.current().store
    store.register_case("c1", "/inbox/c1")
    store.add_jobs("c1", [NewJob(2, "a", "d2")])
    store.update_job("c1", 2, status=JobStatus.RUNNING, remote_id="new")
    assert store.update_job("c1", 2, if_remote_id="old", exit_code=1) is None
    assert store.get_job("c1", 2).exit_code is None


def _queued_case(store, case_id="c1", beams=(2, 3)):
    store.register_case(case_id, f"/inbox/{case_id}")
    store.add_jobs(case_id, [NewJob(b, f"b{b}", f"d{b}") for b in beams])
    store.update_case(case_id, status=CaseStatus.QUEUED, stage="upload")


def test_tasks_of_a_superseded_dispatch_skip_themselves(config_file):
    from mqi_celery.workers.conductor import finalize_case

    store = context.current().store
    _queued_case(store)
    first = store.start_dispatch("c1", 60)
    second = store.start_dispatch("c1", 60)
    assert (first.dispatch, second.dispatch) == (1, 2)
    assert finalize_case("c1", dispatch=1) == "skipped: superseded dispatch"
    assert finalize_case("c1", dispatch=2) == "skipped: case is QUEUED in stage upload"  # the current dispatch runs


def test_a_stage_moves_on_exactly_once(config_file):
    store = context.current().store
    _queued_case(store)
    store.update_case("c1", status=CaseStatus.PROCESSING)
    assert store.advance_stage("c1", "upload", "submit", 60).stage == "submit"
    assert store.advance_stage("c1", "upload", "submit", 60) is None  # a redelivery does nothing
    assert not store.finish_submits("c1")  # beams still wait to be submitted
    for beam in (2, 3):
        store.update_job("c1", beam, status=JobStatus.RUNNING, remote_id=str(beam))
    assert store.finish_submits("c1") and not store.finish_submits("c1")
    case = store.get_case("c1")
    assert case.stage == "run" and case.lease_until is None  # the poller's: no lease to expire
    assert store.cases_to_collect() == []
    for beam in (2, 3):
        store.update_job("c1", beam, status=JobStatus.COMPLETED)
    assert store.cases_to_collect() == ["c1"]


def test_a_beam_whose_start_a_dying_poll_cut_off_is_the_next_poll_s_to_start(config_file):
    """The poller started a waiting beam (step submitting), then its process died: no submit
    task is left to be redelivered and a case at stage run holds no lease, so the next poll
    starts the beam again (adopting its run if it began). At stage submit a beam that is
    submitting is its submit task's, never the poller's."""
    store = context.current().store
    _queued_case(store)
    store.update_case("c1", status=CaseStatus.PROCESSING)
    store.advance_stage("c1", "upload", "submit", 60)
    store.update_job("c1", 2, step="waiting")
    store.update_job("c1", 3, step="submitting")
    assert [j.beam for j in store.waiting_jobs()] == []  # still stage submit: the tasks' beams
    store.update_job("c1", 3, step="waiting")
    assert store.finish_submits("c1")  # every beam waits for its host: the poller's now
    store.update_job("c1", 2, step="submitting")  # a poll started beam 2, then died
    assert [(j.beam, j.step) for j in store.waiting_jobs()] == [(2, "submitting"), (3, "waiting")]


def test_expired_and_void_leases_are_found_parked_cases_are_not(config_file):
    store = context.current().store
    for case_id in ("live", "lost", "parked", "done"):
        _queued_case(store, case_id)
    store.start_dispatch("live", 600)
    store.start_dispatch("lost", -1)
    store.start_dispatch("parked", -1)
    store.park("parked", None, "host h unreachable since 10:00")
    store.update_case("done", status=CaseStatus.FAILED, lease_until=None)
    assert store.expired_leases() == ["lost"]
    assert store.parked_cases() == ["parked"]
    assert store.void_leases() == 2  # live and lost: at start-up nothing is alive
    assert sorted(store.expired_leases()) == ["live", "lost"]


def test_two_retries_at_once_only_one_runs(config_file):
    from mqi_celery.conductor import _retry
    from mqi_celery.errors import MQIError

    store = context.current().store
    _queued_case(store)
    store.update_case("c1", status=CaseStatus.FAILED, step="finished", stage="collect", error="beam 2 failed")
    snapshot = store.get_case("c1")  # what both the CLI and Flower read
    assert _retry(context.current(), snapshot).status is CaseStatus.QUEUED
    with pytest.raises(MQIError, match="being retried already"):
        _retry(context.current(), snapshot)
    assert store.get_case("c1").attempts == 1


def test_listings_show_active_cases_and_the_newest_finished_paged_by_the_database(config_file):
    import json
    import subprocess
    import sys
    from datetime import timedelta
    from pathlib import Path

    from mqi_celery.db import utcnow

    store = context.current().store
    for i in range(12):
        store.register_case(f"done{i:02d}", f"/inbox/done{i:02d}")
        store.update_case(f"done{i:02d}", status=CaseStatus.FAILED, error="x")
    store.register_case("active", "/inbox/active")
    store.update_case("active", status=CaseStatus.QUEUED)
    store.add_jobs("active", [NewJob(1, "b1", "d1")])
    store.update_case("done00", error="touched last")  # the most recently changed finished case

    shown = store.recent_cases(limit=3)
    assert {c.case_id for c in shown} == {"done00", "done10", "done11", "active"}  # newest 3 changed + active
    assert next(c for c in shown if c.case_id == "active").jobs[0].beam == 1
    assert len(store.recent_cases(status=CaseStatus.FAILED, limit=None)) == 12
    assert store.recent_cases(since=utcnow() + timedelta(hours=1), active=False) == []
    assert {c.case_id for c in store.changed_cases(utcnow() - timedelta(minutes=5))} >= {"active", "done00"}

    mqi = Path(sys.executable).parent / "mqi"
    listed = json.loads(subprocess.run([mqi, "cases", "list", "--json", "--limit", "2"], capture_output=True,
                                       text=True, check=True).stdout)
    assert len(listed) == 3 and "active" in [c["case_id"] for c in listed]
    everything = subprocess.run([mqi, "cases", "list", "--all", "--json"], capture_output=True, text=True, check=True)
    assert len(json.loads(everything.stdout)) == 13
    table = subprocess.run([mqi, "cases", "list", "--limit", "2"], capture_output=True, text=True, check=True).stdout
    assert "3 case(s) of 13" in table and "--all" in table


def test_a_job_change_and_its_event_are_written_together_or_not_at_all(config_file):
    """execution_started is recorded in the transaction that records the run: a crash
    between the two can no longer keep the run and lose its event."""
    from mqi_celery import messages

    store = context.current().store
    store.register_case("c1", "/inbox/c1")
    store.add_jobs("c1", [NewJob(1, "b1", "d1")])
    started = messages.prepare("execution_started", {"beam": 1, "remote_id": "42"}, case_id="c1")
    store.update_job("c1", 1, status=JobStatus.RUNNING)  # e.g. another delivery got there first
    assert store.update_job("c1", 1, only_from={JobStatus.PENDING}, remote_id="42", event=started) is None
    assert [e["command"] for e in store.events("c1")] == []  # refused: neither
    store.add_jobs("c1", [NewJob(2, "b2", "d2")])
    assert store.update_job("c1", 2, only_from={JobStatus.PENDING}, remote_id="43", event=started) is not None
    assert [e["command"] for e in store.events("c1")] == ["execution_started"]


@pytest.mark.integration
def test_a_row_held_by_a_frozen_session_fails_the_write_waiting_for_it_as_a_database_fault(monkeypatch):
    """A worker frozen (SIGSTOP, a paused VM) in the middle of a write keeps its row locked:
    a write waiting for that row fails after the lock timeout as a database fault (the step
    waits and is retried) instead of holding its worker, or a command, for ever."""
    import psycopg2
    from sqlalchemy.exc import OperationalError

    from mqi_celery import db, db_url
    from mqi_celery.errors import database_fault
    from mqi_celery.store import Store
    from tests.services import postgres_database

    monkeypatch.setattr(db_url, "LOCK_TIMEOUT_MS", 300)
    with postgres_database() as url:
        store = Store.from_url(url)
        store.register_case("held", "/inbox/held")
        frozen = psycopg2.connect(DatabaseURL(url).libpq())
        try:
            frozen.cursor().execute("SELECT 1 FROM cases WHERE case_id = 'held' FOR UPDATE")
            with pytest.raises(OperationalError) as raised:
                store.update_case("held", status=CaseStatus.QUEUED)
            assert raised.value.orig.pgcode == "55P03" and database_fault(raised.value)
        finally:
            frozen.close()
        store.update_case("held", status=CaseStatus.QUEUED)  # the row free again: the write goes through
        assert store.get_case("held").status is CaseStatus.QUEUED
        # A migration waits for another process's migration however long it takes.
        other = psycopg2.connect(DatabaseURL(url).libpq())
        other.autocommit = True
        other.cursor().execute("SELECT pg_advisory_lock(%s)", (db.MIGRATE_KEY,))
        ends = threading.Timer(1.0, other.close)  # held 1 s: more than three lock timeouts
        ends.start()
        with db._migration_lock(store.engine) as held:
            assert held and other.closed
        ends.join()
