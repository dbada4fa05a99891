"""Shared fixtures: an isolated configuration per test, and a real embedded pipeline
(`mqi run` as a subprocess, as a user starts it) for end-to-end tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mqi_celery import context
from mqi_celery.config_loading import load_settings
from tests.pipeline_cluster import cluster  # noqa: F401  (workers + testbed, per test)
from tests.polling import poll_until  # noqa: F401  (tests import it from here)
from tests.testbed.fixtures import slurm_testbed  # noqa: F401  (the real sshd + Slurm, for every test)

BIN = Path(sys.executable).parent
SLOW_LAYERS = ("slurm", "integration", "processes")


def pytest_collection_modifyitems(items):
    """Layers by what a test needs: ``slurm`` for every test that uses the testbed (directly
    or through the ``cluster`` fixture), ``processes`` for every one that starts an
    installation; ``unit`` for those that need no service and start none of the pipeline's
    processes (``make unit``, under a minute)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "slurm_testbed" in fixtures:
            item.add_marker(pytest.mark.slurm)
            # One testbed per run, its tests one after another (`make test` runs the rest
            # beside them, pytest-xdist's loadgroup): fault tests stop and restart its daemons.
            item.add_marker(pytest.mark.xdist_group("testbed"))
        if "embedded" in fixtures or "installation" in fixtures:
            item.add_marker(pytest.mark.processes)
        if not any(item.get_closest_marker(layer) for layer in SLOW_LAYERS):
            item.add_marker(pytest.mark.unit)


def group_alive(pgid: int) -> bool:
    """Any live process in the group (the wrapper shell and the engine under it)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def installation_pids(config: Path, *, state: str | None = None) -> list[int]:
    """The processes of one installation (``mqi run``, its workers and their pool
    children: every `mqi`/`celery` process started with this MQI_CONFIG), optionally only
    those in one /proc state ("T": frozen by a fault point). Engines are not among them:
    they are the cluster's, and outlive a crash of the pipeline."""
    wanted, pids = f"MQI_CONFIG={config}".encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"celery" not in cmdline and b"bin/mqi\0" not in cmdline:
                continue
            if wanted not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if state and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != state:
                continue
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        pids.append(int(proc.name))
    return pids


def kill_installation(config: Path) -> int:
    """SIGKILL every process of the installation at once (a power cut of the pipeline host)."""
    pids = installation_pids(config)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    poll_until(lambda: not installation_pids(config), 30, what="the installation to die")
    return len(pids)


def write_config(folder: Path, **sections) -> Path:
    """A config for tests: everything under ``folder``, fast intervals, overrides merged."""
    base = {
        "paths": {"inbox": str(folder / "inbox"), "results": str(folder / "results"),
                  "work": str(folder / "work"), "logs": str(folder / "log")},
        "database": {"url": f"sqlite:///{folder}/mqi.db"},
        "broker": {"url": "filesystem://", "folder": str(folder / "broker"),
                   "result_backend": f"db+sqlite:///{folder}/results.db"},
        "scanner": {"interval_seconds": 0.5, "settle_seconds": 3},
        "scheduler": {"poll_interval_seconds": 0.5},
        "retry": {"backoff_seconds": 0.2, "backoff_max_seconds": 1},
        "worker": {"concurrency": 3},
        "transport": {"remote_root": str(folder / "remote")},
        "logging": {"file": str(folder / "log" / "mqi.jsonl")},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    (folder / "inbox").mkdir(parents=True, exist_ok=True)  # as an operator does: a missing inbox is a fault
    path = folder / "mqi.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """Point this process (its context) at a fresh per-test configuration."""
    def configure(**sections) -> Path:
        path = write_config(tmp_path, **sections)
        monkeypatch.setenv("MQI_CONFIG", str(path))  # for the processes a test starts
        context.use(context.Context(load_settings(path)))
        return path

    configure()
    yield configure
    context.use(None)


@pytest.fixture
def ctx(config_file) -> context.Context:
    """The test's context (a test that configures again asks ``context.current()``)."""
    return context.current()


class Embedded:
    """`mqi run` in a subprocess plus `mqi cases …` calls, like a user in two terminals."""

    def __init__(self, folder: Path, config: Path, env: dict[str, str] | None = None):
        self.folder, self.config = folder, config
        self.env = {**os.environ, **(env or {}), "MQI_CONFIG": str(config)}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Embedded":
        log = self.folder / "run.out"
        self.out = open(log, "ab")
        before = log.stat().st_size
        self.proc = subprocess.Popen([str(BIN / "mqi"), "run", "--no-live"], cwd=self.folder, env=self.env,
                                     stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # Running once it says so (its database made): a listing before that finds none.
        poll_until(lambda: self.proc.poll() is not None or b"is running" in log.read_bytes()[before:], 120,
                   0.2, "mqi run to start")
        return self

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C does
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        self.out.close()
        return self.proc.returncode

    def mqi(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "mqi"), *args], cwd=self.folder, env=self.env,
                              capture_output=True, text=True, timeout=120)

    def mqi_json(self, *args: str):
        p = self.mqi(*args, "--json")
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(p.stdout)

    def wait_case(self, case_id: str, statuses=("COMPLETED", "FAILED"), timeout: float = 60) -> dict:
        def done():
            p = self.mqi("cases", "show", case_id, "--json")
            if p.returncode != 0:
                return None
            case = json.loads(p.stdout)
            return case if case["status"] in statuses else None
        return poll_until(done, timeout, 0.5, f"case {case_id} to reach {statuses}")

    @property
    def inbox(self) -> Path:
        return self.folder / "inbox"

    def log_lines(self) -> list[dict]:
        path = self.folder / "log" / "mqi.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def embedded(tmp_path):
    """Factory: ``embedded(**config_sections)`` starts `mqi run`; stopped at test end."""
    runs: list[Embedded] = []

    def start(env: dict[str, str] | None = None, **sections) -> Embedded:
        run = Embedded(tmp_path, write_config(tmp_path, **sections), env).start()
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


ENGINE_WRAPPER = """#!/bin/sh
# Test engine: the failure mode comes from the case itself (file FAIL_MODE in the case
# folder); it only applies while the flag file {flags}/<mode> exists.
input="$1"; job_dir="$2"
mode=$(cat "$job_dir/../input/FAIL_MODE" 2>/dev/null)
if [ -n "$mode" ]; then
  exec mqi-demo-engine --fail "$mode" --fail-beams 3 --fail-if-exists "{flags}/$mode" "$input"
fi
exec mqi-demo-engine "$input"
"""


@pytest.fixture
def failing_engine(tmp_path):
    """A test engine whose failure mode a case chooses (file FAIL_MODE), while a flag file exists."""
    flags = tmp_path / "flags"
    flags.mkdir()
    for mode in ("exit", "segfault", "no-output", "hang"):
        (flags / mode).touch()
    script = tmp_path / "engine.sh"
    script.write_text(ENGINE_WRAPPER.format(flags=flags))
    return script, flags
