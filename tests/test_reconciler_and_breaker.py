"""Reconciler and circuit breaker on a real database (SQLite). The broker is replaced by a
recorder here (this process's Celery app keeps the first broker it was configured with);
tests/test_faults.py and tests/test_embedded_faults.py reconcile through real brokers."""
from __future__ import annotations

from datetime import timedelta

import pytest

from mqi_celery import context, db, reconciler
from mqi_celery.breaker import Breaker, HostUnavailable
from mqi_celery.models import CaseStatus
from mqi_celery.reconciler import reconcile_once
from mqi_celery.store import NewJob


class Broker:
    """A fake sender (``context.Sender``): records the stages sent, and says which queues
    hold waiting messages."""

    def __init__(self):
        self.sent, self.busy, self.refuse = [], set(), None

    def send_stage(self, case) -> bool:
        if self.refuse:
            raise self.refuse
        self.sent.append((case.case_id, case.stage, case.dispatch))
        return True

    def send(self, task, *args, **options):
        pass

    def publish(self, exchange, routing_key, message):
        pass

    def queue_depths(self, queues, *, timeout=2.0):
        return {q: int(q in self.busy) for q in queues}


@pytest.fixture(autouse=True)
def broker(config_file):
    fake = Broker()
    context.use(context.Context(context.current().settings, sender=fake))
    return fake


def _case_with_lost_work(store, case_id="lost", reconciles=0, stage="upload"):
    store.register_case(case_id, f"/inbox/{case_id}")
    store.add_jobs(case_id, [NewJob(2, "b2", "d2")])
    store.update_case(case_id, status=CaseStatus.QUEUED, stage=stage, reconciles=reconciles)
    store.start_dispatch(case_id, -1)  # its lease ran out: nothing of it is alive


def test_an_expired_lease_is_dispatched_again_with_an_event(ctx, broker):
    store = context.current().store
    _case_with_lost_work(store)
    summary = reconcile_once(ctx)
    assert summary["reconciled"] == 1
    case = store.get_case("lost")
    assert case.dispatch == 2 and case.reconciles == 1 and case.lease_until > db.utcnow()
    [event] = [e for e in store.events("lost") if e["command"] == "case_reconciled"]
    assert event["payload"]["stage"] == "upload" and "dispatched again" in event["payload"]["reason"]
    assert broker.sent == [("lost", "upload", 2)]  # the upload, sent again
    assert reconcile_once(ctx)["reconciled"] == 0  # a live lease is left alone
    # Expired again while its upload still waits in the transfer queue (no worker here):
    # it may simply be in line behind others, so it is looked at again next run (no new
    # lease, nothing counted), and dispatched again once the line is empty.
    broker.busy = {"transfer"}
    store.update_case("lost", lease_until=db.utcnow() - timedelta(seconds=1))
    assert reconcile_once(ctx)["postponed"] == 1
    case = store.get_case("lost")
    assert case.dispatch == 2 and case.reconciles == 1 and case.lease_until < db.utcnow()
    assert len(broker.sent) == 1  # nothing sent twice
    broker.busy = set()
    assert reconcile_once(ctx)["reconciled"] == 1 and broker.sent[-1] == ("lost", "upload", 3)


def test_at_start_up_every_leased_case_is_dispatched_again_at_once(ctx, broker):
    """After a restart nothing that held a lease is alive: messages still waiting in a
    queue do not make the reconciler wait (the new dispatch supersedes them)."""
    store = context.current().store
    _case_with_lost_work(store, stage="submit")
    store.update_case("lost", status=CaseStatus.PROCESSING, lease_until=db.utcnow() + timedelta(seconds=600))
    broker.busy = {"execute", "transfer"}
    assert reconciler.on_startup(ctx) == 1
    # A task of the old dispatch still queued (one beam's submit, while its sibling's message
    # died with the crash) finds itself superseded: it cannot hold the case back.
    assert store.hold_lease("lost", 1, 600) is None
    assert reconcile_once(ctx, startup=True)["reconciled"] == 1
    assert broker.sent == [("lost", "submit", 3)]


def test_a_dispatch_the_broker_refuses_waits_for_the_next_run_not_the_lease(ctx, broker, monkeypatch):
    store = context.current().store
    _case_with_lost_work(store)

    broker.refuse = ConnectionRefusedError("[Errno 111] Connection refused")
    assert reconcile_once(ctx)["reconciled"] == 1
    case = store.get_case("lost")
    assert case.lease_until is None and "the broker did not take the case's upload step" in case.wait_reason
    waiting = [e for e in store.events("lost") if e["command"] == "case_waiting"]
    assert "Connection refused" in waiting[0]["payload"]["reason"]
    broker.refuse = None  # the broker is back
    assert reconcile_once(ctx)["resumed"] == 1  # the next run sends it on, without counting
    assert broker.sent == [("lost", "upload", 3)] and store.get_case("lost").wait_reason is None


def test_reconciliations_are_bounded_then_the_case_fails_with_the_reason(ctx, broker):
    store = context.current().store
    _case_with_lost_work(store, reconciles=context.current().settings.reconciler.max_reconciles, stage="submit")
    assert reconcile_once(ctx)["failed"] == 1
    case = store.get_case("lost")
    assert case.status is CaseStatus.FAILED and "no progress in stage 'submit'" in case.error
    assert "mqi cases retry" in case.error


def test_breaker_opens_after_n_failures_allows_one_probe_and_closes(ctx, broker):
    store = context.current().store
    breaker = Breaker(store, "cluster", failures_to_open=3, cooldown_seconds=30)
    _case_with_lost_work(store, "waiting")
    for _ in range(2):
        breaker.before_connect()
        breaker.failed("connection refused")
    assert breaker.state()[0] == "closed"
    breaker.failed("connection refused")
    state, since, error = breaker.state()
    assert state == "open" and error == "connection refused"
    assert "host cluster unreachable since" in store.get_case("waiting").wait_reason
    with pytest.raises(HostUnavailable, match="host cluster unreachable since"):
        breaker.before_connect()
    with store.session() as s:  # the cool-down is over
        s.get(db.HostRow, "cluster").probe_at = db.utcnow() - timedelta(seconds=1)
    breaker.before_connect()  # this caller is the probe ...
    with pytest.raises(HostUnavailable):
        breaker.before_connect()  # ... and the only one
    breaker.succeeded()
    assert breaker.state()[0] == "closed"
    commands = [e["command"] for e in store.events("waiting", with_hosts=True)]
    assert commands[-2:] == ["host_unreachable", "host_reachable"]
    # Parked cases resume without counting a reconciliation.
    assert reconcile_once(ctx)["resumed"] == 1
    case = store.get_case("waiting")
    assert case.wait_reason is None and case.reconciles == 0
    assert "case_resumed" in [e["command"] for e in store.events("waiting")]


def test_a_redelivered_admission_sends_the_upload_its_cut_off_delivery_may_have_lost(ctx, broker):
    """The conductor's worker lost RabbitMQ after validating a case, perhaps before its
    upload got out; the admission is delivered again: the case goes on now, not when its
    lease (600 s shipped) runs out. A plain duplicate, or a case already uploading, sends
    nothing."""
    from mqi_celery.conductor import admit_registered

    store = context.current().store
    store.register_case("cut", "/inbox/cut")
    store.add_jobs("cut", [NewJob(2, "b2", "d2")])
    store.update_case("cut", status=CaseStatus.QUEUED, stage="upload")
    store.start_dispatch("cut", 600)  # dispatch 1, its lease still running
    assert admit_registered(ctx, "cut") is False and broker.sent == []
    assert admit_registered(ctx, "cut", redelivered=True) is True
    assert broker.sent == [("cut", "upload", 2)]  # dispatch 1's message, if it got out, skips itself
    store.update_case("cut", status=CaseStatus.PROCESSING)
    assert admit_registered(ctx, "cut", redelivered=True) is False and len(broker.sent) == 1
