"""The real services of an installation, for integration tests: a throwaway RabbitMQ
vhost and PostgreSQL database per test, and real `celery` worker/beat processes."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import psycopg2

RABBIT = "127.0.0.1:5672"
POSTGRES = "127.0.0.1:5432"
CELERY = [sys.executable, "-m", "celery", "-A", "mqi_celery"]


@contextmanager
def rabbitmq_vhost():
    """A fresh vhost (so no test sees another's messages); yields the broker URL."""
    vhost = f"mqi_test_{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                   check=True, capture_output=True)
    try:
        yield f"amqp://guest:guest@{RABBIT}/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)


@contextmanager
def postgres_database():
    """A fresh database; yields its SQLAlchemy URL."""
    name = f"mqi_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres@{POSTGRES}/{name}"
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


class CeleryProcesses:
    """Real `celery worker -Q <queue>` processes (one per queue) and one `celery beat`.

    Each runs in its own process group, so a test can SIGKILL a whole worker (main
    process and pool children), as a crash or the OOM killer would, and start it again."""

    def __init__(self, folder: Path, config: Path):
        self.folder, self.env = folder, {**os.environ, "MQI_CONFIG": str(config)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv: dict[str, tuple[str, ...]] = {}

    def start_worker(self, queue: str, *extra: str) -> subprocess.Popen:
        return self._spawn(f"worker-{queue}", "worker", "-Q", queue, "-n", f"{queue}@%h",
                           "--loglevel", "INFO", *extra)

    def start_beat(self) -> subprocess.Popen:
        return self._spawn("beat", "beat", "-s", str(self.folder / "beat-schedule"), "--loglevel", "INFO")

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")
        proc = subprocess.Popen([*CELERY, *args], cwd=self.folder, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name], self.argv[name] = proc, args
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL the whole process (pool children included): no shutdown, no acks."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart(self, name: str) -> subprocess.Popen:
        return self._spawn(name, *self.argv[name])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def received_tasks(log_file: Path) -> Counter:
    """Task messages the workers received, by task name (Celery's "Task X[id] received")."""
    counts: Counter = Counter()
    for line in log_file.read_text().splitlines():
        m = RECEIVED.search(line)
        if m:
            counts[m.group(1)] += 1
    return counts


RECEIVED = re.compile(r'"message": "Task ([\w.]+)\[[0-9a-f-]+\] received"')


class CpuHog:
    """Busy loops holding every core, like a shared CI machine (also a context manager)."""

    def __init__(self, n: int = 2):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def __enter__(self) -> "CpuHog":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
