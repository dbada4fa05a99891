"""docs/operations.md stays true: its `sh` blocks run here against a throwaway installation,
its `sh-static` blocks (systemd, Docker, a real cluster) are checked against the files and
names they use, and every troubleshooting heading is a message the code really emits."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.casegen import make_case
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "operations.md"


def blocks(language: str) -> list[str]:
    text = DOC.read_text()
    return re.findall(rf"^ *```{language}\n(.*?)^ *```", text, re.S | re.M)


def commands(language: str) -> list[str]:
    lines = [line.strip() for block in blocks(language) for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture
def shell_env(tmp_path):
    """A configured installation (embedded broker, SQLite) with one failed case in it, and
    `mqi` on the PATH, as an operator's shell would have."""
    config = write_config(tmp_path, metrics={"port": 9808}, processes={"flower": True}, scanner={"settle_seconds": 0},
                          flower={"basic_auth": "admin:s3cret"})
    env = {**os.environ, "MQI_CONFIG": str(config), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    case = make_case(tmp_path / "inbox", "needs_a_plan", marker=True)
    for plan in case.glob("RP*.dcm"):
        plan.unlink()
    subprocess.run(["mqi", "scan"], env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    return {**env, "CASE_ID": "needs_a_plan"}


@pytest.mark.processes
def test_every_sh_block_runs(shell_env, tmp_path):
    ran = commands("sh")
    assert len(ran) >= 8
    for command in ran:
        done = subprocess.run(command, shell=True, env=shell_env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        assert "s3cret" not in done.stdout + done.stderr, command
    assert (tmp_path / "backup" / "state.dump").stat().st_size > 0
    assert (tmp_path / "units" / "mqi.target").is_file()


def test_every_static_block_names_what_exists():
    from mqi_celery.celery_app import app

    app.loader.import_default_modules()  # the task modules
    units = set()
    for line in commands("sh-static"):
        units |= set(re.findall(r"\bmqi[-.\w]*\.(?:service|target)\b", line))
        for name in re.findall(r"/api/task/send-task/([\w.]+)", line):
            assert name in app.tasks, f"{name} is not a task: {line}"
        for path in re.findall(r"\b(docker/[\w./-]+|units/[*\w.]+)", line):
            if not path.startswith("units/"):
                assert (ROOT / path).exists(), path
        program = shlex.split(line)[0]
        assert program in {"cp", "install", "systemctl", "cd", "printf", "docker", "pip", "pg_restore", "rsync", "cat", "curl",
                           "ssh-keyscan", "ssh-keygen", "/data/mqi/log/mqi.jsonl", "daily", "rotate", "compress",
                           "missingok", "copytruncate", "}", "EOF", "python3"} or program.startswith(("/data/mqi/log/", "/opt/celery-exporter/bin/")), line
    from mqi_celery.config_loading import load_settings
    from mqi_celery.process_manager import systemd_units, topology

    settings = load_settings(ROOT / "conf" / "default.yaml", environ={})
    written = set(systemd_units(settings, topology(settings), config=Path("/etc/mqi/mqi.yaml"), user="mqi"))
    assert units and units <= written, units - written
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    for variable in re.findall(r"^(\w+)=", blocks("sh-static")[1].split("printf '", 1)[1].replace("\\n", "\n"), re.M):
        assert f"${{{variable}:?" in compose, variable
    logs = re.findall(r"/data/mqi/log/(\w+)\.log", DOC.read_text())
    assert sorted(set(logs)) == sorted({"core", "transfer", "execute", "control", "qa", "beat", "flower", "metrics", "exporter"})


def test_every_troubleshooting_heading_is_a_message_the_code_emits():
    source = "\n".join(p.read_text() for p in (ROOT / "mqi_celery").rglob("*.py"))
    headings = re.findall(r"^#### `([^`]+)`", DOC.read_text(), re.M)
    assert len(headings) >= 10
    missing = [h for h in headings if h not in source]
    assert not missing, missing
