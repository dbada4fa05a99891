"""The units of `mqi deploy systemd` run as written on a host: systemd-analyze accepts them,
no argument is changed by systemd's specifiers (``%h`` is the user's home to systemd, not
the host name Celery puts into a node name), and Flower reads its credentials from the
environment file the units name; a configuration error stops a unit instead of restarting
it for ever."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import write_config
from tests.operations import free_port
from tests.polling import poll_until

MQI = [sys.executable, "-m", "mqi_celery.cli"]


def fields(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def as_systemd_reads(value: str) -> str:
    """A unit value as systemd passes it on: "%%" is "%", any other "%x" a specifier."""
    specifiers = re.findall(r"%[^%]", value.replace("%%", ""))
    assert not specifiers, f"systemd would replace {specifiers} in: {value}"
    return value.replace("%%", "%")


@pytest.fixture
def units(tmp_path):
    port = free_port()
    config = write_config(tmp_path, broker={"url": "amqp://guest:guest@127.0.0.1:5672//"},
                          metrics={"port": 9808}, processes={"flower": True, "exporter": True},
                          flower={"port": port, "address": "127.0.0.1"})
    env_file = tmp_path / "mqi.env"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQI_")} | {"MQI_CONFIG": str(config)}
    done = subprocess.run([*MQI, "deploy", "systemd", "--output", str(tmp_path / "units"), "--user", "root",
                           "--env-file", str(env_file)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr  # Flower's credentials come at run time
    assert "MQI_FLOWER__BASIC_AUTH" in done.stdout and str(env_file) in done.stdout  # and it says where
    return tmp_path / "units", env_file, port


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units_and_passes_every_argument_unchanged(units):
    folder, env_file, _ = units
    services = sorted(folder.glob("*.service"))
    done = subprocess.run(["systemd-analyze", "verify", *map(str, services)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    nodes = []
    for unit in services:
        f = fields(unit.read_text())
        argv = shlex.split(as_systemd_reads(f["ExecStart"][0]))
        for value in f.get("Environment", []):
            as_systemd_reads(value)
        if "--hostname" in argv:
            nodes.append(argv[argv.index("--hostname") + 1])
        assert f["EnvironmentFile"] == [str(env_file) if unit.name == "mqi-flower.service" else f"-{env_file}"]
        assert "2" in f["RestartPreventExitStatus"][0].split()
    # Celery expands %h itself: every worker a node of its own on every host.
    assert sorted(nodes) == ["control@%h", "core@%h", "execute@%h", "qa@%h", "transfer@%h"]
    # celery-exporter is a unit like every other process (`mqi exporter`).
    assert shlex.split(fields((folder / "mqi-exporter.service").read_text())["ExecStart"][0])[-1] == "exporter"


@pytest.mark.processes
def test_flower_started_as_its_unit_reads_its_credentials(units, tmp_path):
    import requests

    folder, env_file, port = units
    f = fields((folder / "mqi-flower.service").read_text())
    argv = shlex.split(as_systemd_reads(f["ExecStart"][0]))
    env = dict(as_systemd_reads(v).split("=", 1) for v in f["Environment"])
    env["PATH"] = os.environ["PATH"]
    for pre in f["ExecStartPre"]:
        subprocess.run(shlex.split(as_systemd_reads(pre)), check=True, timeout=30)

    def start(credentials: str | None) -> subprocess.Popen:
        env_file.write_text(f"MQI_FLOWER__BASIC_AUTH={credentials}\n" if credentials else "# nothing yet\n")
        loaded = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line and line[0] != "#")
        return subprocess.Popen(argv, env={**env, **loaded}, cwd=f["WorkingDirectory"][0], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    refused = start(None)
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "MQI_FLOWER__BASIC_AUTH" in out, out  # a code systemd does not restart
    flower = start("physicist:correct-horse")
    try:
        url = f"http://127.0.0.1:{port}/"

        def answer():
            try:
                return requests.get(url, timeout=2).status_code
            except requests.ConnectionError:
                assert flower.poll() is None, flower.stdout.read()
                return None
        assert poll_until(answer, 120, interval=1, what="Flower to listen") == 401
        assert requests.get(url, auth=("physicist", "correct-horse"), timeout=10).status_code == 200
    finally:
        flower.terminate()
        flower.wait(timeout=60)
