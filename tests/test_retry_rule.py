"""The one retry rule (``workers.base.PipelineTask``), run eagerly in this process with the broker
replaced where it matters: countdowns RabbitMQ's delayed delivery accepts, outages of the
database waited out without counting, and a retry the broker refuses handed to the
reconciler at once (the case waits with the reason) instead of dropped."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from celery.exceptions import Reject, Retry
from sqlalchemy.exc import OperationalError

from mqi_celery import context
from mqi_celery.celery_app import app
from mqi_celery.errors import TransferError
from mqi_celery.models import CaseStatus
from mqi_celery.store import NewJob
from mqi_celery.workers.base import PipelineTask, backoff

POLICY = SimpleNamespace(backoff_seconds=2.0, backoff_max_seconds=120.0, jitter=True)


def test_on_rabbitmq_every_countdown_is_whole_seconds_of_at_least_one():
    random.seed(7)
    first = [backoff(0, POLICY, whole_seconds=True) for _ in range(2000)]
    assert set(first) == {1.0, 2.0}  # jitter kept above the transport's floor
    later = [backoff(3, POLICY, whole_seconds=True) for _ in range(2000)]
    assert min(later) == 1.0 and max(later) == 16.0 and all(d.is_integer() for d in later)
    assert backoff(20, POLICY, whole_seconds=True, cap=30) <= 30
    tiny = SimpleNamespace(backoff_seconds=0.2, backoff_max_seconds=1.0, jitter=False)
    assert backoff(0, tiny, whole_seconds=True) == 1.0 and backoff(0, tiny) == 0.2  # elsewhere: as configured


FAULTS: list = []


@app.task(name="mqi.test_rule_probe", base=PipelineTask, bind=True)
def probe(self, case_id: str) -> str:
    if FAULTS:
        raise FAULTS.pop(0)
    return "done"


@pytest.fixture
def case(config_file):
    store = context.current().store
    store.register_case("c1", "/inbox/c1")
    store.add_jobs("c1", [NewJob(2, "b2", "d2")])
    store.update_case("c1", status=CaseStatus.QUEUED, stage="upload")
    return store.start_dispatch("c1", 600)


def _retried_with(monkeypatch) -> list:
    calls = []

    def retry(self, args=None, kwargs=None, exc=None, countdown=None, **_):
        calls.append({"kwargs": kwargs, "countdown": countdown})
        raise Retry(exc=exc, when=countdown)
    monkeypatch.setattr(PipelineTask, "retry", retry)
    return calls


def test_a_database_outage_is_retried_without_counting_against_the_case(case, monkeypatch):
    calls = _retried_with(monkeypatch)
    FAULTS.append(OperationalError("SELECT 1", {}, Exception("connection refused")))
    # Already retried 9 times, all for outages: the case's own budget (5) is untouched.
    with pytest.raises(Retry):
        probe.apply(("c1",), {"dispatch": case.dispatch, "outages": 9}, retries=9, throw=True)
    [call] = calls
    assert call["kwargs"]["outages"] == 10 and call["kwargs"]["dispatch"] == case.dispatch
    assert call["countdown"] <= context.current().settings.reconciler.interval_seconds  # back within an interval


def test_the_cases_own_faults_are_counted_and_end_with_gave_up(case, monkeypatch):
    calls = _retried_with(monkeypatch)
    FAULTS.append(TransferError("the link dropped"))
    with pytest.raises(Retry):  # 7 retries, 3 of them for outages: 4 of the case's own, one left
        probe.apply(("c1",), {"dispatch": case.dispatch, "outages": 3}, retries=7, throw=True)
    assert calls[0]["kwargs"]["outages"] == 3  # this one counts against the case
    FAULTS.append(TransferError("the link dropped"))
    result = probe.apply(("c1",), {"dispatch": case.dispatch, "outages": 2}, retries=7)
    assert result.state == "FAILURE" and "gave up after 5 retries" in str(result.result)


def test_a_wrong_query_is_not_an_outage(case, monkeypatch):
    import sqlite3

    calls = _retried_with(monkeypatch)
    FAULTS.append(OperationalError("SELECT x FROM nowhere", {}, sqlite3.OperationalError("no such table: nowhere")))
    with pytest.raises(Retry):
        probe.apply(("c1",), {"dispatch": case.dispatch}, throw=True)
    assert calls[0]["kwargs"]["outages"] == 0  # counted: it fails once the budget is spent


def test_every_path_to_a_database_that_does_not_answer_is_an_outage(tmp_path):
    """Reads on plain SQL (``db_reads``) and writes through the ORM alike: a refused connection
    is an outage (waited out), a missing table is the query's fault (counted)."""
    from mqi_celery.store import Store
    from mqi_celery.errors import infrastructure_fault
    from tests.testbed.cluster import free_ports

    [closed] = free_ports(1)
    gone = Store.from_url(f"postgresql://postgres@127.0.0.1:{closed}/test", migrate=False)
    for read_or_write in (lambda: gone.get_case("c1"), lambda: gone.update_case("c1", attempts=1)):
        with pytest.raises(Exception) as raised:
            read_or_write()
        assert infrastructure_fault(raised.value), repr(raised.value)
    empty = Store.from_url(f"sqlite:///{tmp_path / 'empty.db'}", migrate=False)
    with pytest.raises(OperationalError) as raised:
        empty.get_case("c1")
    assert "no such table" in str(raised.value) and not infrastructure_fault(raised.value)


def test_a_submit_refused_after_its_scheduler_was_asked_adopts_its_run_never_a_second(ctx, case, monkeypatch):
    """The broker refused the retry of a submit that had asked the scheduler already: the
    poller takes the beam over and adopts the run that may exist (same token), keeping its
    input folder (where that run lives)."""
    from mqi_celery import admission, remote_executor
    from mqi_celery.lifecycle import JobStep
    from mqi_celery.workers.execute import submit_beam

    store = context.current().store
    store.update_job("c1", 2, step=JobStep.SUBMITTING.value)
    submit_beam.hand_over("c1", ("c1", 2), case.dispatch, "the broker did not take the retry")
    assert store.get_job("c1", 2).step == JobStep.UNSENT_SUBMITTED
    specs = []
    monkeypatch.setattr(context.current().scheduler, "submit", lambda spec: specs.append(spec) or "4242")
    monkeypatch.setattr(admission, "start_beam", lambda *a, **k: admission.Grant(None))
    monkeypatch.setattr(remote_executor, "_write_input", lambda *a: pytest.fail("the run's folder was rewritten"))
    assert remote_executor.start_or_wait(ctx, "c1", 2, may_read=False)
    assert [s.may_exist for s in specs] == [True] and store.get_job("c1", 2).remote_id == "4242"


def test_a_retry_the_broker_refuses_leaves_the_case_waiting_for_the_reconciler(case, monkeypatch):
    def refused(self, *args, **kwargs):
        raise Reject(ConnectionRefusedError("[Errno 111] Connection refused"), requeue=False)
    monkeypatch.setattr(PipelineTask, "retry", refused)
    FAULTS.append(TransferError("the link dropped"))
    result = probe.apply(("c1",), {"dispatch": case.dispatch})
    assert result.state == "IGNORED"  # acknowledged: the database holds the case, not the message
    waiting = context.current().store.get_case("c1")
    assert waiting.lease_until is None and "the broker did not take the retry" in waiting.wait_reason
    assert "Connection refused" in waiting.wait_reason
    assert [e["command"] for e in context.current().store.events("c1")][-1] == "case_waiting"


def test_without_the_database_either_the_refused_message_goes_back_to_the_broker(case, monkeypatch):
    def refused(self, *args, **kwargs):
        raise Reject(ConnectionRefusedError("[Errno 111] Connection refused"), requeue=False)
    monkeypatch.setattr(PipelineTask, "retry", refused)

    def database_down(*args, **kwargs):
        raise OperationalError("UPDATE cases", {}, Exception("server closed the connection"))
    monkeypatch.setattr(type(context.current().store), "park", database_down)
    FAULTS.append(TransferError("the link dropped"))
    result = probe.apply(("c1",), {"dispatch": case.dispatch})
    assert result.state == "REJECTED" and result.result.requeue is True


def test_periodic_work_meets_an_outage_with_one_line_and_its_next_run(caplog):
    """Beat's tasks run again by themselves: a database outage is a warning line, no
    traceback; a fault of the code still raises."""
    from mqi_celery.workers.base import PeriodicTask

    faults = [OperationalError("SELECT 1", {}, Exception("connection refused")), ValueError("a bug")]

    @app.task(name="mqi.test_periodic_probe", base=PeriodicTask)
    def periodic():
        raise faults.pop(0)

    assert periodic.apply().result is None
    [line] = [r for r in caplog.records if "its next run tries again" in r.getMessage()]
    assert line.getMessage().startswith("mqi.test_periodic_probe: the database is unreachable") and not line.exc_info
    assert not [r for r in caplog.records if r.exc_info]  # no traceback anywhere
    assert periodic.apply().state == "FAILURE"


def test_a_validation_that_meets_a_database_outage_is_retried_not_left_to_the_lease(case, monkeypatch):
    from mqi_celery.workers.conductor import admit_case as admit_case_task

    calls = _retried_with(monkeypatch)
    context.current().store.register_case("c2", "/inbox/c2")
    monkeypatch.setattr("mqi_celery.conductor.admit", lambda ctx, case_id: (_ for _ in ()).throw(
        OperationalError("SELECT 1", {}, Exception("connection refused"))))
    with pytest.raises(Retry):
        admit_case_task.apply(("c2",), throw=True)
    assert calls[0]["kwargs"]["outages"] == 1
