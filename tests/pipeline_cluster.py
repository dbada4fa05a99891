"""The pipeline on a real cluster for integration tests: RabbitMQ + PostgreSQL workers as
real processes, a real OpenSSH sshd and a real single-node Slurm (tests/testbed). The
engine (mqi-demo-engine) runs as the Slurm job, on the "cluster" side of SSH."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from mqi_celery import context
from mqi_celery.models import CaseStatus
from mqi_celery.queues import QUEUES
from tests.casegen import STUDY_UID, make_case
from tests.polling import poll_until
from tests.services import CeleryProcesses, postgres_database, rabbitmq_vhost

ENGINE = Path(sys.executable).parent / "mqi-demo-engine"


def drop_case(inbox: Path, name: str = STUDY_UID, *, marker: bool = True, **shape) -> Path:
    """A case of the real shape (the real plan and delivery logs, generated layer files)."""
    return make_case(inbox, name, marker=marker, **shape)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_retry() -> dict:
    """The retry policy as shipped (tests/conftest.write_config shortens it for speed):
    fault tests prove recovery with what clinics run."""
    from mqi_celery.config import Retry

    return Retry().model_dump()


class Cluster:
    """The testbed, a fresh vhost and database, and the celery processes of one test."""

    def __init__(self, tmp_path: Path, config_file, tb, broker: str, database: str):
        self.tmp, self.tb, self.broker, self.database = tmp_path, tb, broker, database
        self.config_file = config_file
        self.remote_root = tb.remote_root / tmp_path.name
        self.procs: CeleryProcesses | None = None

    def configure(self, engine_args: str = "", **sections) -> CeleryProcesses:
        tb = self.tb
        base = dict(
            broker={"url": self.broker, "result_backend": "db+" + self.database},
            database={"url": self.database},
            transport={"kind": "ssh", "remote_root": str(self.remote_root),
                       "ssh": {"host": tb.host, "port": tb.ssh_port, "user": tb.user,
                               "key_file": str(tb.client_key), "known_hosts": str(tb.known_hosts)}},
            scheduler={"kind": "slurm", "poll_interval_seconds": 0.5, "slurm": {"gres": "gpu:1"}},
            engine={"command": f"{ENGINE} {engine_args} {{input_file}}", "timeout_seconds": 120},
        )
        base.update(sections)
        self.procs = CeleryProcesses(self.tmp, self.config_file(**base))
        return self.procs

    def start(self, execute_args=("--pool", "threads", "--concurrency", "4")) -> None:
        for queue in QUEUES:
            args = execute_args if queue == "execute" else ("--pool", "threads", "--concurrency", "4")
            self.procs.start_worker(queue, *args)
        self.procs.start_beat()


@pytest.fixture
def cluster(tmp_path, config_file, slurm_testbed):
    """A fresh vhost and database on the machine's RabbitMQ and PostgreSQL, with the testbed."""
    with rabbitmq_vhost() as broker, postgres_database() as database:
        c = Cluster(tmp_path, config_file, slurm_testbed, broker, database)
        try:
            yield c
        finally:
            if c.procs:
                c.procs.stop()
            slurm_testbed.ssh("scancel --user=root")


def wait_finished(case_id: str, timeout: float = 180):
    store = context.current().store

    def finished():
        case = store.get_case(case_id)
        return case if case and case.status in (CaseStatus.COMPLETED, CaseStatus.FAILED) else None
    return poll_until(finished, timeout, 0.5, f"case {case_id} to finish")


def running_job(case_id: str, beam: int):
    """The job once Slurm runs it (None before the case is even registered)."""
    case = context.current().store.get_case(case_id)
    job = next((j for j in case.jobs if j.beam == beam), None) if case else None
    return job if job and job.remote_state == "RUNNING" else None


