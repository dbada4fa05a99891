"""A production-shaped installation for operations tests: `mqi up` as a real process on the
machine's RabbitMQ and PostgreSQL (a fresh vhost and database), the engine run locally by
the direct scheduler, the metrics endpoint on a free port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from mqi_celery import context
from tests.conftest import write_config
from tests.polling import poll_until
from tests.services import postgres_database, rabbitmq_vhost

MQI = [sys.executable, "-m", "mqi_celery.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """The endpoint's samples: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class Installation:
    """`mqi up` with a configuration of its own; ``stop`` sends SIGTERM like systemd."""

    def __init__(self, folder: Path, broker: str, database: str, monkeypatch, **sections):
        self.folder, self.metrics_port, self.broker = folder, free_port(), broker
        base = {"broker": {"url": broker, "result_backend": "db+" + database}, "database": {"url": database},
                "metrics": {"port": self.metrics_port, "address": "127.0.0.1"},
                "processes": {"ping_interval_seconds": 1, "ping_deadline_seconds": 15, "stop_grace_seconds": 60,
                              "workers": [{"name": "core", "queues": ["scan", "conductor", "curator"],
                                           "concurrency": 2},
                                          {"name": "transfer", "queues": ["transfer"], "concurrency": 2},
                                          {"name": "execute", "queues": ["execute"], "concurrency": 2},
                                          {"name": "control", "queues": ["control"], "pool": "solo",
                                           "concurrency": 1},
                                          {"name": "qa", "queues": ["qa"], "concurrency": 1}]}}
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        self.config = write_config(folder, **base)
        self.env = {**os.environ, "MQI_CONFIG": str(self.config)}
        monkeypatch.setenv("MQI_CONFIG", str(self.config))  # this process reads the same store
        context.reset(keep_settings=False)
        self.proc: subprocess.Popen | None = None

    @property
    def inbox(self) -> Path:
        return self.folder / "inbox"

    def start(self) -> "Installation":
        self.out = open(self.folder / "up.out", "ab")
        self.proc = subprocess.Popen([*MQI, "up"], cwd=self.folder, env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def output(self) -> str:
        return (self.folder / "up.out").read_text()

    def pid_of(self, name: str) -> int:
        """The pid of process ``name`` as `mqi up` last reported starting it."""
        lines = [line for line in self.output().splitlines() if line.startswith(f"started {name} (pid ")]
        return int(lines[-1].split("(pid ")[1].split(")")[0]) if lines else 0

    def workers_answering(self) -> set[str]:
        # Its own client: this process's Celery app read some earlier test's broker.
        from celery import Celery

        client = Celery(broker=self.broker)
        try:
            return {node.split("@")[0] for reply in client.control.ping(timeout=2.0) for node in reply}
        finally:
            client.close()

    def stop(self, timeout: float = 120) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        if self.proc:
            self.out.close()
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def installation(tmp_path, monkeypatch):
    """Factory: ``installation(**sections)`` -> a started `mqi up`; stopped at test end."""
    made: list[Installation] = []
    with rabbitmq_vhost() as broker, postgres_database() as database:
        def make(start: bool = True, **sections) -> Installation:
            inst = Installation(tmp_path, broker, database, monkeypatch, **sections)
            made.append(inst)
            return inst.start() if start else inst

        try:
            yield make
        finally:
            for inst in made:
                inst.stop()
            context.reset(keep_settings=False)


def wait_answering(inst: Installation, names: set[str], timeout: float = 120) -> None:
    poll_until(lambda: names <= inst.workers_answering(), timeout, interval=1, what=f"workers {names} to answer")
