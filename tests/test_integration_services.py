"""The same case through RabbitMQ + PostgreSQL, with one real `celery worker` process per
queue and a separate `celery beat`: only the YAML configuration differs from the
embedded default."""
from __future__ import annotations

import json

import pytest
from kombu import Connection, Exchange, Queue

from mqi_celery import context
from mqi_celery.models import CaseStatus, JobStatus
from mqi_celery.queues import QUEUES
from tests.casegen import STUDY_UID, make_case
from tests.pipeline_cluster import wait_finished
from tests.services import CeleryProcesses, postgres_database, rabbitmq_vhost

pytestmark = pytest.mark.integration


@pytest.fixture
def services():
    with rabbitmq_vhost() as broker, postgres_database() as database:
        yield broker, database


def test_case_completes_through_rabbitmq_and_postgres(tmp_path, config_file, services):
    broker, database = services
    config = config_file(broker={"url": broker, "result_backend": "db+" + database, "folder": str(tmp_path / "unused")},
                database={"url": database})
    store = context.current().store  # migrates the fresh database
    events_exchange = Exchange("mqi.events", type="topic", durable=True)
    with Connection(broker) as conn:
        # A subscriber, as another system would bind one: every message of the pipeline.
        subscriber = Queue("test-subscriber", events_exchange, routing_key="#", durable=False)
        subscriber(conn.default_channel).declare()

        procs = CeleryProcesses(tmp_path, config)
        try:
            for queue in QUEUES:
                procs.start_worker(queue, "--pool", "threads", "--concurrency", "4")
            procs.start_beat()
            make_case(tmp_path / "inbox", marker=True)
            case = wait_finished(STUDY_UID, 120)
        finally:
            procs.stop()
        assert case.status is CaseStatus.COMPLETED, case.error
        assert [(j.beam, j.status) for j in case.jobs] == [(b, JobStatus.COMPLETED) for b in (2, 3, 4)]
        assert len(list((tmp_path / "results" / STUDY_UID).glob("*.dcm"))) == 3

        received = []
        q = subscriber(conn.default_channel)
        while (msg := q.get(no_ack=True)) is not None:
            received.append((msg.delivery_info["routing_key"], json.loads(msg.body)))
    keys = {key for key, _ in received}
    for key in ("scanner.new_case_found", "transfer.upload_success", "executor.execution_started",
                "executor.execution_success", "transfer.download_success", "conductor.case_completed"):
        assert key in keys, keys
    for _, body in received:
        assert set(body) == {"command", "payload", "timestamp", "correlation_id"}
        if body["command"] != "system_status_update":
            assert body["correlation_id"] == case.trace_id
    # The database, not the broker, is the record: every published message is an event row.
    recorded = [e["command"] for e in store.events(STUDY_UID)]
    assert sorted(recorded) == sorted(b["command"] for _, b in received if b["command"] != "system_status_update")


def test_a_failed_event_publish_never_fails_a_case(tmp_path, config_file, services):
    broker, database = services
    config = config_file(broker={"url": broker, "result_backend": "db+" + database, "folder": str(tmp_path / "unused")},
                         database={"url": database})
    store = context.current().store
    with Connection(broker) as conn:
        # Someone declared the events exchange with another type: every publish is refused
        # by RabbitMQ (PRECONDITION_FAILED).
        Exchange("mqi.events", type="direct", durable=True)(conn.default_channel).declare()
    procs = CeleryProcesses(tmp_path, config)
    try:
        for queue in QUEUES:
            procs.start_worker(queue, "--pool", "threads", "--concurrency", "2")
        procs.start_beat()
        make_case(tmp_path / "inbox", marker=True, rows_per_layer=2)
        case = wait_finished(STUDY_UID, 120)
    finally:
        procs.stop()
    assert case.status is CaseStatus.COMPLETED, case.error
    log = (tmp_path / "log" / "mqi.jsonl").read_text()
    assert "could not publish upload_success" in log and "PRECONDITION_FAILED" in log
    # The record does not depend on the exchange: every event is in the database.
    assert "case_completed" in [e["command"] for e in store.events(STUDY_UID)]
