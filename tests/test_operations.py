"""Operations on a production-shaped installation (`mqi up` on RabbitMQ + PostgreSQL): the
metrics endpoint counts what ran, Flower demands credentials and retries a case, and the
process manager replaces dead and stuck workers and stops cleanly."""
from __future__ import annotations

import json
from pathlib import Path
import os
import signal
import subprocess
import sys
import time

import pytest

from mqi_celery import context, demo_engine
from mqi_celery.models import CaseStatus
from tests.casegen import make_case
from tests.operations import free_port, installation, sample, scrape, wait_answering  # noqa: F401
from tests.pipeline_cluster import wait_finished
from tests.polling import poll_until

pytestmark = pytest.mark.integration

GROUPS = {"core": ("scan", "conductor", "curator"), "transfer": ("transfer",), "execute": ("execute",),
          "control": ("control",), "qa": ("qa",)}


def drop(inbox, name, fail_mode: str | None = None):
    case = make_case(inbox, name)
    if fail_mode:
        (case / "FAIL_MODE").write_text(fail_mode)
    (case / "_CASE_READY").touch()
    return case


@pytest.mark.timeout(600)
def test_the_metrics_endpoint_counts_what_ran(installation, failing_engine):
    script, _flags = failing_engine
    inst = installation(engine={"command": f"sh {script} {{input_file}} {{job_dir}}"})
    wait_answering(inst, set(GROUPS))
    drop(inst.inbox, "good")
    drop(inst.inbox, "bad", fail_mode="exit")  # beam 3's engine fails: the case fails
    assert wait_finished("good", 300).status is CaseStatus.COMPLETED
    assert wait_finished("bad", 300).status is CaseStatus.FAILED

    def scraped():
        # Beat's scan and the poller keep running; what the cases did is final once both finished.
        samples = scrape(inst.metrics_port)
        return samples if sample(samples, "mqi_cases_total", status="FAILED") == 1 else None
    samples = poll_until(scraped, 60, interval=1, what="the endpoint to count both cases")
    assert sample(samples, "mqi_cases_total", status="COMPLETED") == 1
    assert sample(samples, "mqi_processing_duration_seconds_count") == 2
    assert 0 < sample(samples, "mqi_processing_duration_seconds_sum") < 600
    assert sample(samples, "mqi_case_failures_total", step="finished") == 1
    # Per step: two uploads, six submits and runs (3 beams each), two of each collect step.
    for step, count in {"upload": 2, "submit": 6, "run": 6, "download": 2, "verify": 2, "finalize": 2}.items():
        assert sample(samples, "mqi_step_duration_seconds_count", step=step) == count, step
    assert sample(samples, "mqi_step_duration_seconds_count", step="poll") > 0
    assert sample(samples, "mqi_queue_wait_seconds_count", queue="transfer") >= 4  # uploads + downloads
    assert sample(samples, "mqi_transfer_bytes_total", direction="up") > 2 * 200_000
    assert sample(samples, "mqi_transfer_bytes_total", direction="down") > 0
    # Prefork children count: two per prefork group, one solo control worker.
    for queue in ("scan", "conductor", "curator", "transfer", "execute"):
        assert sample(samples, "mqi_active_workers", queue=queue) == 2, queue
    assert sample(samples, "mqi_active_workers", queue="control") == 1
    # From the database at scrape time.
    assert sample(samples, "mqi_cases_by_status", status="COMPLETED") == 1
    assert sample(samples, "mqi_cases_by_status", status="FAILED") == 1
    assert sample(samples, "mqi_jobs_by_status", status="COMPLETED") == 5
    assert sample(samples, "mqi_database_up") == 1
    assert sample(samples, "mqi_disk_free_bytes", host="local", path="results") > 0
    labels = {label for (_name, pairs) in samples for label, _ in pairs}
    assert not labels & {"case_id", "case"}, "a case id must never be a label"


@pytest.mark.timeout(600)
def test_mqi_up_replaces_a_killed_and_a_stuck_worker_and_stops_without_losing_work(installation):
    inst = installation(engine={"command": "mqi-demo-engine --delay 1 {input_file}"})
    wait_answering(inst, set(GROUPS))

    # SIGKILL a whole worker (main process and children): a new one serves its queue within 10 s.
    killed = inst.pid_of("transfer")
    os.killpg(killed, signal.SIGKILL)
    gone = time.monotonic()
    poll_until(lambda: inst.pid_of("transfer") != killed and "transfer" in inst.workers_answering(), 10,
               interval=0.5, what="a new transfer worker to answer")
    back = time.monotonic() - gone
    assert back < 10

    # SIGSTOP: alive but silent. Replaced once it missed pings for the deadline (15 s here).
    stuck = inst.pid_of("execute")
    os.kill(stuck, signal.SIGSTOP)
    stopped = time.monotonic()
    poll_until(lambda: inst.pid_of("execute") != stuck, 15 + 30, interval=0.5, what="the stuck worker's replacement")
    replaced = time.monotonic() - stopped
    assert 15 <= replaced < 15 + 30
    assert "execute answered no ping for" in inst.output()
    wait_answering(inst, {"execute"})

    # SIGTERM while a case is in flight: every process exits, and the case completes after
    # the next start.
    drop(inst.inbox, "in_flight")
    poll_until(lambda: (c := context.current().store.get_case("in_flight")) and c.status is CaseStatus.PROCESSING, 120,
               what="the case to be in work")
    children = _descendants(inst.proc.pid)
    assert inst.stop() == 0
    assert [pid for pid in children if _alive(pid)] == []
    assert context.current().store.get_case("in_flight").status in (CaseStatus.QUEUED, CaseStatus.PROCESSING)
    inst.start()
    assert wait_finished("in_flight", 300).status is CaseStatus.COMPLETED
    print(f"OPS-REPORT mqi up: SIGKILLed worker answering again after {back:.1f} s; SIGSTOPped worker replaced "
          f"after {replaced:.1f} s (deadline 15 s); SIGTERM stopped {len(children)} processes, case completed")


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    pairs = list(zip(map(int, out[::2]), map(int, out[1::2])))
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in pairs if pp == parent]
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(600)
def test_flower_demands_credentials_and_retries_a_failed_case(installation, failing_engine):
    import requests

    script, flags = failing_engine
    port = free_port()
    inst = installation(engine={"command": f"sh {script} {{input_file}} {{job_dir}}"},
                        flower={"port": port, "address": "127.0.0.1"}, processes={"flower": True},
                        start=False)
    inst.env["MQI_FLOWER__BASIC_AUTH"] = "physicist:correct-horse"
    inst.start()
    wait_answering(inst, set(GROUPS))
    drop(inst.inbox, "to_retry", fail_mode="exit")
    assert wait_finished("to_retry", 300).status is CaseStatus.FAILED

    url = f"http://127.0.0.1:{port}"
    poll_until(lambda: _answers(url), 60, interval=1, what="Flower to listen")
    for path in ("/", "/workers", "/api/workers", "/api/tasks"):
        assert requests.get(url + path, timeout=10).status_code == 401, path
    assert requests.post(f"{url}/api/task/send-task/mqi.retry_case", json={"args": ["to_retry"]},
                         timeout=10).status_code == 401
    assert context.current().store.get_case("to_retry").status is CaseStatus.FAILED
    assert requests.get(url + "/", auth=("physicist", "wrong"), timeout=10).status_code == 401

    (flags / "exit").unlink()  # the engine is fixed; the physicist retries from Flower
    reply = requests.post(f"{url}/api/task/send-task/mqi.retry_case", json={"args": ["to_retry"]},
                          auth=("physicist", "correct-horse"), timeout=10)
    assert reply.status_code == 200, reply.text
    assert "task-id" in reply.json()
    case = poll_until(lambda: (c := context.current().store.get_case("to_retry")) and c.status is CaseStatus.COMPLETED and c,
                      300, interval=1, what="the retried case to complete")
    assert case.attempts == 1
    assert "correct-horse" not in inst.output()  # the secret is not on a command line or in a log


def _answers(url: str) -> bool:
    import requests

    try:
        requests.get(url, timeout=2)
        return True
    except requests.ConnectionError:
        return False


def test_flower_refuses_to_start_without_credentials(tmp_path):
    from tests.conftest import write_config

    config = write_config(tmp_path)
    env = {**os.environ, "MQI_CONFIG": str(config)}
    done = subprocess.run([sys.executable, "-m", "mqi_celery.cli", "flower"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "Flower refuses to start without credentials" in done.stdout + done.stderr
    assert "MQI_FLOWER__BASIC_AUTH" in done.stdout + done.stderr


def test_dry_run_prints_the_topology_and_systemd_units_match_it(tmp_path):
    from tests.conftest import write_config

    config = write_config(tmp_path, metrics={"port": 9808}, processes={"flower": True},
                          flower={"basic_auth": "admin:s3cret"})
    env = {**os.environ, "MQI_CONFIG": str(config)}
    mqi = [sys.executable, "-m", "mqi_celery.cli"]
    dry = subprocess.run([*mqi, "up", "--dry-run"], env=env, capture_output=True, text=True, timeout=60, check=True)
    commands = dict(line.split(": ", 1) for line in dry.stdout.splitlines() if not line.startswith("#"))
    assert list(commands) == ["core", "transfer", "execute", "control", "qa", "beat", "flower", "metrics"]
    assert "--pool solo" in commands["control"] and "-Q scan,conductor,curator" in commands["core"]
    assert "s3cret" not in dry.stdout
    subprocess.run([*mqi, "deploy", "systemd", "--output", str(tmp_path / "units"), "--user", "mqi"], env=env,
                   capture_output=True, text=True, timeout=60, check=True)
    units = sorted(p.name for p in (tmp_path / "units").iterdir())
    assert units == sorted([f"mqi-{name}.service" for name in commands] + ["mqi.target"])
    for name, command in commands.items():
        text = (tmp_path / "units" / f"mqi-{name}.service").read_text()
        assert f"ExecStart={command.replace('%', '%%')}\n" in text and f"Environment=MQI_CONFIG={config}\n" in text
        assert "Restart=always" in text and "s3cret" not in text
    target = (tmp_path / "units" / "mqi.target").read_text()
    assert all(f"mqi-{name}.service" in target for name in commands)
    assert json.loads(json.dumps(commands))  # printable as is


# --- Prometheus and the Grafana dashboard -------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
EXPORTER = ROOT / ".cache" / "celery-exporter" / "bin" / "python"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "mqi-celery.json"


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def prometheus_query(port: int, expr: str) -> list:
    import requests

    reply = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def scrape_config(exporter_port: int, metrics_port: int) -> dict:
    """The project's own docker/prometheus/prometheus.yml, its targets pointed at this test."""
    import yaml

    conf = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    assert {job["job_name"] for job in conf["scrape_configs"]} == {"mqi", "celery"}
    conf["global"].update(scrape_interval="2s", scrape_timeout="2s", evaluation_interval="2s")
    targets = {"mqi": f"127.0.0.1:{metrics_port}", "celery": f"127.0.0.1:{exporter_port}"}
    for job in conf["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        if "scrape_timeout" in job:  # the exporter's scrapes take seconds: fewer, not shorter
            job.update(scrape_interval="5s", scrape_timeout="5s")
    return conf


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_prometheus_scrapes_a_run_and_every_dashboard_query_returns_data(installation, slurm_testbed, tmp_path):
    import yaml

    tb = slurm_testbed
    exporter_port, prometheus_port = free_port(), free_port()
    # celery-exporter is one of the processes `mqi up` runs (from its own environment).
    inst = installation(
        transport={"kind": "ssh", "remote_root": str(tb.remote_root / tmp_path.name),
                   "ssh": {"host": tb.host, "port": tb.ssh_port, "user": tb.user, "key_file": str(tb.client_key),
                           "known_hosts": str(tb.known_hosts)}},
        scheduler={"kind": "slurm", "poll_interval_seconds": 0.5, "slurm": {"gres": "gpu:1"}},
        engine={"command": f"{Path(sys.executable).parent / 'mqi-demo-engine'} {{input_file}}"},
        processes={"exporter": True},
        metrics={"celery_exporter": {"python": str(EXPORTER), "port": exporter_port, "address": "127.0.0.1"}})
    log = open(tmp_path / "prometheus.log", "ab")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(exporter_port, inst.metrics_port)))
    side = [subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                              f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                              f"--web.listen-address=127.0.0.1:{prometheus_port}"], stdout=log, stderr=log)]
    try:
        wait_answering(inst, set(GROUPS))
        try:
            poll_until(lambda: len(prometheus_query(prometheus_port, "up == 1")) == 2, 120, interval=1,
                       what="Prometheus to scrape both targets")
        except AssertionError:
            import requests

            targets = requests.get(f"http://127.0.0.1:{prometheus_port}/api/v1/targets", timeout=10).json()
            raise AssertionError([(t["scrapeUrl"], t["health"], t["lastError"])
                                  for t in targets["data"]["activeTargets"]]) from None
        good = make_case(inst.inbox, "good")
        assert demo_engine.main(["--planned-dose", str(good)]) == 0  # its planned doses: the QA judges it
        (good / "_CASE_READY").touch()
        bad = make_case(inst.inbox, "bad")
        for plan in bad.glob("RP*.dcm"):
            plan.unlink()
        (bad / "_CASE_READY").touch()
        assert wait_finished("good", 300).status is CaseStatus.COMPLETED
        assert wait_finished("bad", 300).status is CaseStatus.FAILED

        # GPU panels read nvidia-smi on direct hosts; on a Slurm host the GPUs are Slurm's and
        # no reading has them (their samples are checked in tests/test_admission.py).
        queries = [q for q in dashboard_queries() if "mqi_gpu_" not in q]
        assert len(queries) >= 15

        def empty_ones():
            return [q for q in queries if not prometheus_query(prometheus_port, q)]
        try:
            poll_until(lambda: not empty_ones(), 120, interval=2, what="every dashboard query to return data")
        except AssertionError:
            raise AssertionError(f"no data for: {empty_ones()}") from None
        def finished():  # as of Prometheus's latest scrape, which may predate the last finalize
            rows = prometheus_query(prometheus_port, 'sum by (status) (mqi_cases_total)')
            return {r["metric"]["status"]: float(r["value"][1]) for r in rows}
        try:
            poll_until(lambda: finished() == {"COMPLETED": 1.0, "FAILED": 1.0}, 120, interval=2,
                       what="Prometheus to count one completed and one failed case")
        except AssertionError:
            raise AssertionError(f"cases counted: {finished()}") from None
        assert prometheus_query(prometheus_port, 'max(celery_queue_length{queue_name="transfer"})')
        # The QA panel: the three beams of "good" passed 100 % (its planned dose is the engine's own).
        median = prometheus_query(prometheus_port, next(q for q in dashboard_queries() if q.startswith(
            "histogram_quantile(0.5, sum by (le) (increase(mqi_qa_gamma_pass_rate_bucket")))
        assert float(median[0]["value"][1]) > 99.0, median
        verdicts = prometheus_query(prometheus_port, 'sum by (verdict) (mqi_qa_verdicts_total)')
        assert {r["metric"]["verdict"]: float(r["value"][1]) for r in verdicts} == {"PASS": 1.0}
        # The workers panel counts nodes (4 here, on one host), not hosts as celery-exporter does.
        nodes = prometheus_query(prometheus_port, "sum(mqi_worker_nodes)")
        assert float(nodes[0]["value"][1]) == len(GROUPS), nodes
        assert "exporter" in {line.split()[1] for line in inst.output().splitlines() if line.startswith("started ")}
    finally:
        for proc in side:
            proc.terminate()
            proc.wait(30)
        log.close()
        tb.ssh("scancel --user=root")
