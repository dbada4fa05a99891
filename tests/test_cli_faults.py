"""No `mqi` command prints a traceback for a fault outside the program: with the database
down, each says in one line what cannot be reached and how to fix it, and exits non-zero."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import write_config
from tests.operations import free_port

COMMANDS = ["status", "status --json", "cases list", "cases list --json", "cases show some_case",
            "cases retry some_case", "cases cancel some_case", "scan", "inbox", "db upgrade",
            "db backup state.dump", "run --no-live", "beat"]


@pytest.mark.processes
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_with_the_database_down_says_so_in_one_line(tmp_path, command):
    closed = free_port()  # nothing listens there: PostgreSQL is down
    (tmp_path / "inbox").mkdir()
    config = write_config(tmp_path, database={"url": f"postgresql+psycopg2://mqi:s3cret@127.0.0.1:{closed}/mqi"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQI_")} | {"MQI_CONFIG": str(config)}
    done = subprocess.run([sys.executable, "-m", "mqi_celery.cli", *command.split()], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "Traceback" not in out and "s3cret" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors and str(closed) in out and ("cannot be reached" in out or "failed" in errors[0]), out


@pytest.mark.parametrize("command", ["cases list", "cases show some_case", "status", "inbox"])
def test_a_read_from_another_folder_creates_no_database(tmp_path, command):
    """The built-in configuration's paths are relative: from another folder a listing would
    make a new, empty database and answer "no case". It says where it looked instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQI_")} | {"COLUMNS": "300"}
    done = subprocess.run([sys.executable, "-m", "mqi_celery.cli", *command.split()], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"no database at {tmp_path}/var/mqi.db" in done.stdout, done.stdout + done.stderr
    assert "set MQI_CONFIG" in done.stdout and not (tmp_path / "var" / "mqi.db").exists()


@pytest.mark.processes
@pytest.mark.parametrize("command", ["cases list", "status", "inbox"])
def test_a_read_never_waits_for_the_migration_lock(tmp_path, command):
    """While an upgrade holds the migration lock (the schema not at this version's revision),
    a listing says so at once instead of waiting to migrate."""
    import fcntl
    import sqlite3

    from mqi_celery.store import Store

    config = write_config(tmp_path)
    Store.from_url(f"sqlite:///{tmp_path}/mqi.db")  # at this version's revision
    with sqlite3.connect(tmp_path / "mqi.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0005'")  # an upgrade still to come
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQI_")} | {"MQI_CONFIG": str(config)}
    fd = os.open(tmp_path / "mqi.db.migrate.lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # an upgrade in progress elsewhere
    try:
        done = subprocess.run([sys.executable, "-m", "mqi_celery.cli", *command.split()], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert done.returncode == 1 and "schema is at revision 0005" in done.stdout, done.stdout + done.stderr
    assert "mqi db upgrade" in done.stdout
