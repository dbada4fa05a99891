"""Alembic: a database created by the first release upgrades in place, and its unfinished
cases are picked up by the new control loop (SQLite and PostgreSQL)."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text

from mqi_celery import db
from mqi_celery.store import Store
from tests.polling import poll_until
from tests.services import postgres_database

OLD_CASES = [  # case_id, status, step (as the first release left them)
    ("queued", "QUEUED", "queued"),
    ("uploading", "PROCESSING", "uploading"),
    ("running", "PROCESSING", "running"),
    ("halfway", "PROCESSING", "running"),  # the old code said "running" after the first submit
    ("downloading", "PROCESSING", "downloading"),
    ("done", "COMPLETED", "finished"),
]


@contextmanager
def database(kind: str, tmp_path):
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path}/old.db"
    else:
        with postgres_database() as url:
            yield url


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_upgrade_from_the_first_schema_resumes_unfinished_cases(kind, tmp_path):
    with database(kind, tmp_path) as url:
        engine = db.make_engine(url)
        cfg = Config()
        cfg.set_main_option("script_location", str(db.MIGRATIONS))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            for case_id, status, step in OLD_CASES:
                conn.execute(text(
                    "INSERT INTO cases (case_id, path, status, step, trace_id, manifest, attempts, created_at, "
                    "updated_at) VALUES (:c, :p, :s, :st, 't', '{}', 0, '2026-01-01', '2026-01-01')"),
                    {"c": case_id, "p": f"/inbox/{case_id}", "s": status, "st": step})
                for beam, job_status in ((2, "RUNNING"), (3, "PENDING" if case_id == "halfway" else "RUNNING")):
                    conn.execute(text(
                        "INSERT INTO jobs (case_id, beam, beam_name, delivery_dir, status, results, updated_at) "
                        "VALUES (:c, :b, 'b', 'd', :s, '{}', '2026-01-01')"), {"c": case_id, "b": beam, "s": job_status})
        db.migrate(engine)
        tables = inspect(engine).get_table_names()
        assert {"cases", "jobs", "events", "hosts", "inbox_problems", "alembic_version"} <= set(tables)
        store = Store(engine)
        stages = {c: store.get_case(c).stage for c, _, _ in OLD_CASES}
        assert stages == {"queued": "upload", "uploading": "upload", "running": "run", "halfway": "submit",
                          "downloading": "collect", "done": None}
        # Their old messages died with the old code: the reconciler finds them at once;
        # the running one is the poller's, the finished one nobody's.
        assert sorted(store.expired_leases()) == ["downloading", "halfway", "queued", "uploading"]
        job = store.get_job("running", 2)
        assert (job.resubmits, job.judge_attempts) == (0, 0)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == db.SCHEMA_REVISION
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_the_beat_lock_lets_one_beat_run_and_the_next_take_over(kind, tmp_path):
    """`mqi beat` runs celery beat only while it holds this lock: a second one waits."""
    import threading

    with database(kind, tmp_path) as url:
        engine = db.make_engine(url)
        db.migrate(engine)
        events: list[str] = []
        first_holds, release = threading.Event(), threading.Event()

        def first():
            with db.beat_lock(engine):
                events.append("first runs")
                first_holds.set()
                release.wait(60)
            events.append("first stopped")

        def second():
            with db.beat_lock(engine, on_wait=lambda: events.append("second waits"), poll_seconds=0.1):
                events.append("second runs")

        t1 = threading.Thread(target=first)
        t1.start()
        assert first_holds.wait(60)
        t2 = threading.Thread(target=second)
        t2.start()
        poll_until(lambda: "second waits" in events, 60, what="the second beat to wait")
        assert "second runs" not in events
        release.set()
        t1.join(60)
        t2.join(60)
        assert events == ["first runs", "second waits", "first stopped", "second runs"]
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_the_migrations_build_exactly_the_tables_the_code_declares(kind, tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with database(kind, tmp_path) as url:
        engine = db.make_engine(url)
        db.migrate(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
        engine.dispose()
    assert diff == [], diff


def test_the_schema_revision_the_code_expects_is_the_newest_migration():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == db.SCHEMA_REVISION
