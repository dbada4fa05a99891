"""A backup from `mqi db backup` restores, with the command docs/operations.md gives, into a
new empty database (the usual case after losing the old one), and the pipeline's state is
all there."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from mqi_celery import db
from mqi_celery.store import Store
from tests.services import postgres_database

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"

pytestmark = pytest.mark.integration


def test_the_documented_restore_fills_a_new_database(tmp_path):
    line = next(line for line in DOC.read_text().splitlines() if line.startswith("pg_restore "))
    with postgres_database() as source:
        store = Store.from_url(source)
        store.register_case("kept_case", "/inbox/kept_case")
        db.backup(source, tmp_path / "state.dump")
        store.engine.dispose()
    with postgres_database() as fresh:
        libpq = fresh.replace("postgresql+psycopg2://", "postgresql://")
        command = re.sub(r"--dbname=\S+", f"--dbname={libpq}", line).replace("backup/state.dump",
                                                                           str(tmp_path / "state.dump"))
        done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        restored = Store.from_url(fresh)
        assert restored.get_case("kept_case") is not None
        restored.engine.dispose()
