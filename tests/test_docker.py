"""docker/ cannot run here (no Docker engine): its files are checked against their schema
and against each other and the code: every command an image runs exists, every scrape
target is a service serving metrics, every dashboard metric is one the code (or the
exporter) exports, provisioning points where the compose file mounts it, and secrets come
from the environment."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCHEMA = ROOT / ".cache" / "compose-spec.json"
EXPORTER_SOURCE = ROOT / ".cache" / "celery-exporter" / "lib"
# What the compose file's ${...} would hold: any value works for the checks.
DUMMY_ENV = {"RABBITMQ_PASSWORD": "pw-rabbit", "POSTGRES_PASSWORD": "pw-postgres",
             "FLOWER_BASIC_AUTH": "admin:pw-flower", "GRAFANA_ADMIN_PASSWORD": "pw-grafana"}


@pytest.fixture(scope="module")
def compose_schema():
    if not SCHEMA.exists():
        pytest.fail(f"{SCHEMA} is missing: run `make test` (it fetches the compose-spec schema with npm)")
    return json.loads(SCHEMA.read_text())


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def mqi_services(compose) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == "mqi-celery:latest"}


def container_env(service: dict) -> dict[str, str]:
    """The service's environment with ${VAR:?...} filled from DUMMY_ENV."""
    def fill(value: str) -> str:
        return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: DUMMY_ENV[m.group(1)], value)
    return {k: fill(str(v)) for k, v in service.get("environment", {}).items()}


def test_compose_file_is_valid(compose_schema, compose):
    jsonschema.Draft201909Validator(compose_schema).validate(compose)
    assert {"rabbitmq", "postgres", "core", "transfer", "execute", "control", "qa", "beat", "flower", "celery-exporter",
            "prometheus", "grafana", "hpc"} <= set(compose["services"])


def test_schema_rejects_a_misspelt_key(compose_schema, compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["core"]["comand"] = ["up"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(compose_schema).validate(broken)


def test_every_mqi_container_runs_processes_its_configuration_has(compose, tmp_path):
    """`mqi up --dry-run` with each container's own command, configuration and environment:
    the command exists, names processes that exist, and together they consume every queue
    once with exactly one beat, one Flower, and a metrics endpoint beside every worker."""
    from mqi_celery.queues import QUEUES

    config = tmp_path / "mqi.yaml"
    config.write_text((DOCKER / "mqi.compose.yaml").read_text())
    run: dict[str, list[str]] = {}
    for name, service in mqi_services(compose).items():
        assert service["command"][:2] == ["up", "--only"], name
        env = {**os.environ, **container_env(service), "MQI_CONFIG": str(config),
               "MQI_METRICS__MULTIPROC_DIR": str(tmp_path / "metrics")}
        done = subprocess.run([sys.executable, "-m", "mqi_celery.cli", *service["command"], "--dry-run"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (name, done.stdout, done.stderr)
        run[name] = [line.split(": ", 1)[0] for line in done.stdout.splitlines() if not line.startswith("#")]
        assert not [pw for pw in DUMMY_ENV.values() if pw.split(":")[-1] in done.stdout], "a secret was printed"
    everything = [p for names in run.values() for p in names]
    assert everything.count("beat") == 1 and everything.count("flower") == 1
    workers = [p for p in everything if p not in ("beat", "flower", "metrics")]
    assert sorted(workers) == sorted(set(workers)) == sorted(n for n in run if n not in ("beat", "flower"))
    assert len(workers) == 5
    assert all("metrics" in run[w] for w in workers)
    from mqi_celery.config_loading import load_settings

    settings = load_settings(config, environ=container_env(compose["services"]["core"]))
    consumed = [q for g in settings.processes.workers if g.name in workers for q in g.queues]
    assert sorted(consumed) == sorted(QUEUES)


def test_prometheus_scrapes_every_metrics_endpoint_of_the_stack(compose):
    from mqi_celery.config_loading import load_settings

    conf = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    port = load_settings(DOCKER / "mqi.compose.yaml", environ={}).metrics.port
    targets = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
               for job in conf["scrape_configs"]}
    serving = {name for name, s in mqi_services(compose).items() if "metrics" in s["command"][2]}
    assert sorted(targets["mqi"]) == sorted(f"{name}:{port}" for name in serving)
    exporter = compose["services"]["celery-exporter"]
    assert targets["celery"] == [f"celery-exporter:{exporter['command'][-1].split('=')[1]}"]
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]


def exported_names() -> set[str]:
    """Every sample name the code exports (ours) and the exporter exports (celery_*)."""
    from mqi_celery import metrics  # noqa: F401 - registers our metrics
    from prometheus_client import REGISTRY

    families = {family.name for family in REGISTRY.collect() if family.name.startswith("mqi_")}
    names = {f"{n}{suffix}" for n in families for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    endpoint = (ROOT / "mqi_celery" / "metrics_endpoint.py").read_text()
    names |= set(re.findall(r'GaugeMetricFamily\("(\w+)"', endpoint))
    sources = list(EXPORTER_SOURCE.glob("python*/site-packages/src/exporter.py"))
    assert sources, "celery-exporter is not installed: run `make test`"
    for base in re.findall(r'f"\{metric_prefix\}(\w+)"', sources[0].read_text()):
        names |= {f"celery_{base}", f"celery_{base}_total", f"celery_{base}_bucket"}
    return names


def test_every_dashboard_query_names_metrics_that_are_exported():
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "mqi-celery.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b((?:mqi|celery)_[a-z_]+)\b", e)}
    assert used and not used - exported_names(), used - exported_names()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("status", "throughput", "step", "failures", "queue depth", "disk", "breaker"):
        assert topic in titles, topic


def test_grafana_provisioning_is_where_compose_mounts_it(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    uid = source["datasources"][0]["uid"]
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "mqi-celery.yaml").read_text())
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "mqi-celery.json").read_text())
    assert {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]} == {uid}


SECRET = re.compile(r"PASS|PASSWORD|SECRET|BASIC_AUTH|TOKEN", re.I)


def test_secrets_come_from_the_environment(compose):
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        for key, value in env.items():
            if SECRET.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key} is not from the environment"
            if "://" in str(value) and "@" in str(value):
                assert re.search(r"://\w+:\$\{\w+", str(value)), f"{name}.{key} holds a literal password"
        assert "password" not in json.dumps(service.get("command", [])).lower().replace("rabbitmq_password", "")
    config = yaml.safe_load((DOCKER / "mqi.compose.yaml").read_text())
    assert ":" not in config["broker"]["url"].split("://")[1].split("@")[0]  # no password in the file
    assert not config.get("flower", {}).get("basic_auth")


def test_dockerfiles_copy_existing_files_and_run_existing_commands():
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "hpc" / "Dockerfile"):
        text = dockerfile.read_text()
        sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
        assert sources and all((ROOT / s).exists() for s in sources), (dockerfile, sources)
    assert re.search(r'^ENTRYPOINT \["mqi"\]', (DOCKER / "Dockerfile").read_text(), re.M)
    entry = DOCKER / "hpc" / "entrypoint.sh"
    assert os.access(entry, os.X_OK)
    subprocess.run(["sh", "-n", str(entry)], check=True)  # parses
    script = entry.read_text()
    for daemon in ("munged", "slurmctld", "slurmd", "/usr/sbin/sshd", "mungekey", "ssh-keygen"):
        assert daemon in script
    packages = re.search(r"install -y --no-install-recommends\s*\\?\s*(.+?)\\?\s*&&",
                         (DOCKER / "hpc" / "Dockerfile").read_text(), re.S).group(1).split()
    assert {"openssh-server", "slurmctld", "slurmd", "munge"} <= set(packages)
    slurm = (DOCKER / "hpc" / "slurm.conf").read_text()
    config = yaml.safe_load((DOCKER / "mqi.compose.yaml").read_text())
    assert f"PartitionName={config['scheduler']['slurm']['partition']} " in slurm
    assert config["transport"]["ssh"]["host"] == "hpc" and "hostname: hpc" in (DOCKER / "compose.yaml").read_text()
