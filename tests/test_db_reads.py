"""The reads in plain SQL: the Store and a command-line call without SQLAlchemy see the same
cases, jobs, events and counts (SQLite and PostgreSQL)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest

from mqi_celery import db_reads
from mqi_celery.errors import ConnectionError_
from mqi_celery.db import utcnow
from mqi_celery.models import CaseStatus, JobStatus
from mqi_celery.store import NewJob, Store
from tests.test_migrations import database

BOTH = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


def _fill(store: Store) -> None:
    for i in range(5):
        store.register_case(f"done{i}", f"/inbox/done{i}")
        store.add_jobs(f"done{i}", [NewJob(2, "b2", "d2"), NewJob(1, "b1", "d1")])
        store.update_job(f"done{i}", 1, status=JobStatus.RUNNING, remote_id="7", results={"dose.dcm": "ab"})
        store.update_case(f"done{i}", status=CaseStatus.FAILED, error=f"reason {i}", manifest={"a": "1"})
    store.register_case("active", "/inbox/active")
    store.update_case("active", status=CaseStatus.QUEUED, wait_reason="waiting for a GPU")
    store.add_event("case_registered", {"case_id": "active", "n": 1}, case_id="active", correlation_id="c1")
    store.add_event("host_unreachable", {"host": "gpu1"}, case_id=None, correlation_id=None)
    store.add_event("host_reachable", {"host": "gpu1"}, case_id=None, correlation_id=None)
    store.replace_inbox_problems({"loose.zip": "a file, not a case folder"}, {})


@pytest.mark.parametrize("kind", BOTH)
def test_a_direct_read_sees_what_the_store_sees(kind, tmp_path):
    with database(kind, tmp_path) as url:
        store = Store.from_url(url)
        _fill(store)
        direct = db_reads.direct_reads(url)
        assert direct is not None, "a database at the head is read directly"
        since = utcnow() - timedelta(minutes=5)
        for name, args, kwargs in [("recent_cases", (), {"limit": 2}), ("recent_cases", (), {"limit": None}),
                                   ("recent_cases", (), {"status": CaseStatus.FAILED, "since": since}),
                                   ("list_cases", (), {}), ("changed_cases", (since,), {}),
                                   ("get_case", ("done3",), {}), ("get_case", ("nothing",), {}),
                                   ("events", ("active",), {"with_hosts": True}), ("count_by_status", (), {}),
                                   ("inbox_problem_rows", (), {})]:
            assert getattr(direct, name)(*args, **kwargs) == getattr(store, name)(*args, **kwargs), name

        case = direct.get_case("done3")
        assert [j.beam for j in case.jobs] == [1, 2] and case.jobs[0].results == {"dose.dcm": "ab"}
        assert case.manifest == {"a": "1"} and case.created_at <= case.updated_at
        assert [c.case_id for c in direct.recent_cases(limit=2)] == ["done3", "done4", "active"]
        assert [e["command"] for e in direct.events("active", with_hosts=True)] == [
            "case_registered", "host_unreachable", "host_reachable"]
        assert direct.count_by_status() == ({"FAILED": 5, "QUEUED": 1}, {"PENDING": 5, "RUNNING": 5})
        store.engine.dispose()


def test_a_new_or_unknown_database_is_left_to_the_store(tmp_path):
    assert db_reads.direct_reads(f"sqlite:///{tmp_path}/none.db") is None
    assert not (tmp_path / "none.db").exists(), "a direct read creates nothing"
    assert db_reads.direct_reads("mysql://somewhere/db") is None
    with pytest.raises(ConnectionError_, match=r"the database \(127.0.0.1:1/none\) cannot be reached: .*refused"):
        db_reads.direct_reads("postgresql+psycopg2://nobody:secret@127.0.0.1:1/none")  # said at once, no password
    store = Store.from_url(f"sqlite:///{tmp_path}/old.db")
    with store.session() as s:
        from sqlalchemy import text

        s.execute(text("UPDATE alembic_version SET version_num = '0005'"))
    assert db_reads.direct_reads(f"sqlite:///{tmp_path}/old.db") is None, "an older schema is migrated by the Store"


@pytest.mark.parametrize("kind", BOTH)
def test_listing_and_showing_a_case_import_no_sqlalchemy(kind, tmp_path, config_file):
    with database(kind, tmp_path) as url:
        config = config_file(database={"url": url})
        store = Store.from_url(url)
        _fill(store)
        store.engine.dispose()
        probe = ("import json, sys\n"
                 "from mqi_celery.cli import main\n"
                 "try:\n    main()\nexcept SystemExit:\n    pass\n"
                 "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
                 "('sqlalchemy', 'alembic', 'celery', 'kombu', 'paramiko'))))\n")
        env = {**os.environ, "MQI_CONFIG": str(config)}
        for argv in (["cases", "list", "--json"], ["cases", "list"], ["cases", "show", "active", "--json"]):
            out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env,
                                 check=True, cwd=tmp_path).stdout
            assert "active" in out, out
            assert json.loads(out.strip().splitlines()[-1]) == [], f"mqi {' '.join(argv)} imported heavy modules"
        # `mqi status` asks the broker for its queues (Celery), but reads the database without SQLAlchemy
        out = subprocess.run([sys.executable, "-c", probe, "status", "--json"], capture_output=True, text=True,
                             env=env, check=True, cwd=tmp_path).stdout
        heavy = json.loads(out.strip().splitlines()[-1])
        assert not [m for m in heavy if m.split(".")[0] in ("sqlalchemy", "alembic")], heavy
