"""`mqi config check` connects to what the configuration names and says, one line each,
what is wrong and how to fix it; exit code 0 only when it is safe to start. Against the
machine's RabbitMQ and PostgreSQL and the testbed's sshd + Slurm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.operations import free_port
from tests.services import POSTGRES, RABBIT, postgres_database, rabbitmq_vhost
from tests.testbed.fixtures import slurm_testbed  # noqa: F401

MQI = [sys.executable, "-m", "mqi_celery.cli"]

pytestmark = pytest.mark.integration


def check(config: Path, *extra: str) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQI_")}
    done = subprocess.run([*MQI, "--config", str(config), "config", "check", *extra], env=env, capture_output=True,
                          text=True, timeout=180)
    as_json = subprocess.run([*MQI, "--config", str(config), "config", "check", "--json", *extra], env=env,
                             capture_output=True, text=True, timeout=180)
    assert as_json.returncode == done.returncode, (done.stdout, as_json.stdout)
    return done.returncode, json.loads(as_json.stdout), done.stdout + done.stderr


@pytest.fixture
def services():
    with rabbitmq_vhost() as broker, postgres_database() as database:
        yield broker, database


def good(tmp_path: Path, services, **sections) -> dict:
    broker, database = services
    (tmp_path / "inbox").mkdir(exist_ok=True)
    base = {"broker": {"url": broker, "result_backend": "db+" + database}, "database": {"url": database}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


BROKEN = {
    # what is broken: (the sections that break it, the check's name, words of the fix)
    "broker port closed": (lambda t, s: {"broker": {"url": f"amqp://guest:guest@127.0.0.1:{free_port()}//"}},
                           "broker", "is RabbitMQ running"),
    "broker password": (lambda t, s: {"broker": {"url": f"amqp://guest:wrong@{RABBIT}//"}},
                        "broker", "check the user and password in broker.url"),
    "broker vhost": (lambda t, s: {"broker": {"url": f"amqp://guest:guest@{RABBIT}/no_such_vhost"}},
                     "broker", "rabbitmqctl add_vhost"),
    "database host": (lambda t, s: {"database": {"url": "postgresql+psycopg2://mqi@db.invalid:5432/mqi"}},
                      "database", "check database.url"),
    "database name": (lambda t, s: {"database": {"url": f"postgresql+psycopg2://postgres@{POSTGRES}/no_such_db"}},
                      "database", "check database.url"),
    "inbox missing": (lambda t, s: {"paths": {"inbox": str(t / "nowhere")}}, "inbox", "create it"),
    "results not a folder": (lambda t, s: {"paths": {"results": str(t / "a-file" / "results")}},
                             "results", "is not a folder"),
    "flower without credentials": (lambda t, s: {"processes": {"flower": True}}, "flower", "MQI_FLOWER__BASIC_AUTH"),
    "celery-exporter not installed": (lambda t, s: {"processes": {"exporter": True},
                                                    "metrics": {"celery_exporter": {"python": str(t / "no_env/bin/python")}}},
                                      "celery-exporter", "pip install prometheus-exporter-celery"),
    "known_hosts missing": (lambda t, s: {"transport": _ssh(t, known_hosts=t / "no_known_hosts")},
                            "ssh host key", "ssh-keyscan"),
    "key file missing": (lambda t, s: {"transport": _ssh(t, key_file=t / "no_key")}, "ssh key",
                         "transport.ssh.key_file"),
}


def _ssh(tmp_path: Path, **ssh) -> dict:
    known = tmp_path / "known_hosts"
    known.write_text("")
    key = tmp_path / "key"
    key.write_text("")
    return {"kind": "ssh", "remote_root": "/srv/mqi",
            "ssh": {"host": "127.0.0.1", "port": 2222, "user": "mqi", "key_file": str(key), "known_hosts": str(known),
                    **{k: str(v) for k, v in ssh.items()}}}


@pytest.mark.processes
def test_a_good_configuration_is_safe_to_start(tmp_path, services):
    rc, out, text = check(write_config(tmp_path, **good(tmp_path, services)))
    assert rc == 0, text
    assert {c["what"] for c in out["checks"]} >= {"inbox", "results", "broker", "database", "remote root"}
    assert "safe to start" in text and "guest:guest" not in text


@pytest.mark.processes
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_each_broken_setting_is_named_with_its_fix(tmp_path, services, broken):
    (tmp_path / "a-file").write_text("")
    sections, name, fix = BROKEN[broken]
    config = write_config(tmp_path, **good(tmp_path, services, **sections(tmp_path, services)))
    rc, out, text = check(config)
    assert rc == 1, text
    failed = {c["what"]: c["detail"] for c in out["checks"] if not c["ok"]}
    assert name in failed and fix in failed[name], (failed, text)
    assert "not safe to start" in text and "Traceback" not in text
    assert ":wrong@" not in text  # the password is masked
    if broken.startswith("broker"):
        assert set(failed) == {"broker"}  # the others still checked, and fine


@pytest.mark.processes
def test_offline_connects_to_nothing(tmp_path, services):
    sections = good(tmp_path, services, broker={"url": f"amqp://guest:guest@127.0.0.1:{free_port()}//"})
    rc, out, _ = check(write_config(tmp_path, **sections), "--offline")
    assert rc == 0 and "broker" not in {c["what"] for c in out["checks"]}


def test_ssh_login_remote_root_and_slurm_on_the_testbed(tmp_path, services, slurm_testbed):
    tb = slurm_testbed
    ssh = {"host": tb.host, "port": tb.ssh_port, "user": tb.user, "key_file": str(tb.client_key),
           "known_hosts": str(tb.known_hosts)}
    config = write_config(tmp_path, **good(tmp_path, services, scheduler={"kind": "slurm"}, transport={
        "kind": "ssh", "remote_root": str(tb.remote_root / tmp_path.name), "ssh": ssh}))
    rc, out, text = check(config)
    assert rc == 0, text
    assert {c["what"] for c in out["checks"]} >= {"ssh key", "ssh host key", "ssh login", "remote root", "scheduler"}
    # A remote root the account cannot write: named, with the fix.
    config = write_config(tmp_path, **good(tmp_path, services, scheduler={"kind": "slurm"}, transport={
        "kind": "ssh", "remote_root": "/proc/mqi", "ssh": ssh}))
    rc, out, text = check(config)
    failed = {c["what"]: c["detail"] for c in out["checks"] if not c["ok"]}
    assert rc == 1 and set(failed) == {"remote root"} and "transport.remote_root" in failed["remote root"], text
