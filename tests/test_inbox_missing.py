"""A missing inbox is an error that `mqi scan`, `mqi inbox`, `mqi status` and an event say
(once), and it clears itself when the folder is back."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.casegen import make_case
from tests.conftest import write_config

MQI = [sys.executable, "-m", "mqi_celery.cli"]


@pytest.mark.processes
def test_a_missing_inbox_is_said_everywhere_and_clears_when_it_is_back(tmp_path):
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQI_")} | {"MQI_CONFIG": str(config), "COLUMNS": "400"}

    def mqi(*args):
        return subprocess.run([*MQI, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    inbox = tmp_path / "inbox"
    inbox.rmdir()
    for _ in range(2):
        scan = mqi("scan")
        assert scan.returncode == 1 and f"the inbox {inbox} does not exist" in scan.stdout, scan.stdout + scan.stderr
    listing = mqi("inbox")
    assert listing.returncode == 1 and "does not exist" in listing.stdout and "every entry" not in listing.stdout
    status = json.loads(mqi("status", "--json").stdout)
    assert status["accepting_work"] is False and "does not exist" in status["reason"]

    from mqi_celery.store import Store

    store = Store.from_url(f"sqlite:///{tmp_path}/mqi.db")
    assert store.last_event(None, ("inbox_unavailable", "inbox_available")) == "inbox_unavailable"
    make_case(inbox, "back_again", marker=True)  # the folder is back, with a case in it
    scan = mqi("scan")
    assert scan.returncode == 0 and "registered back_again" in scan.stdout, scan.stdout + scan.stderr
    assert store.last_event(None, ("inbox_unavailable", "inbox_available")) == "inbox_available"
    status = json.loads(mqi("status", "--json").stdout)
    assert "does not exist" not in (status["reason"] or "")
    store.engine.dispose()
