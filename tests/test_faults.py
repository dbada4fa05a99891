"""Every case finishes exactly once, under load and under faults, on real processes:
RabbitMQ + PostgreSQL workers (one prefork worker per queue, as in production), a real
sshd and a real Slurm (tests/testbed). Each test prints its figures as one JSON line
("FAULT-REPORT ...") for the record; the asserts are what must hold."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mqi_celery import context
from mqi_celery.models import CaseStatus
from mqi_celery.queues import QUEUES
from tests.casegen import make_case
from tests.polling import poll_until
from tests.pipeline_cluster import shipped_retry, sha256, wait_finished
from tests.recovery import Recovery, status_seconds
from tests.services import CpuHog, received_tasks

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


def start_production(cluster, **sections):
    """One prefork worker per queue (concurrency 2) and one beat, like docs/deployment.md."""
    procs = cluster.configure(**{"retry": shipped_retry(), **sections})
    for queue in QUEUES:
        procs.start_worker(queue, "--pool", "prefork", "--concurrency", "2")
    procs.start_beat()
    return procs


def wait_all(case_ids, timeout: float, procs=None, broker=None):
    """Wait until every case finished; meanwhile restart any worker that died (what
    systemd's Restart=always or `mqi run` does)."""
    store = context.current().store

    def finished():
        if procs is not None:
            for name, proc in list(procs.procs.items()):
                if proc.poll() is not None:
                    procs.restart(name)
        cases = [store.get_case(c) for c in case_ids]
        return cases if all(c and c.status in (CaseStatus.COMPLETED, CaseStatus.FAILED) for c in cases) else None
    try:
        return poll_until(finished, timeout, 1.0, f"{len(case_ids)} cases to finish")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{where_they_stand(case_ids, procs, broker)}") from None


def where_they_stand(case_ids, procs=None, broker=None) -> str:
    """Why cases did not finish: each unfinished case's stage, jobs and last events, the
    queues (when the test owns the broker) and the workers' last errors."""
    store, lines = context.current().store, []
    for case_id in case_ids:
        case = store.get_case(case_id)
        if case is None or case.status in (CaseStatus.COMPLETED, CaseStatus.FAILED):
            continue
        lines.append(f"{case_id}: {case.status.name} stage={case.stage} step={case.step} dispatch={case.dispatch} "
                     f"lease_until={case.lease_until} reconciles={case.reconciles} wait={case.wait_reason}")
        lines += [f"    beam {j.beam}: {j.status.name} step={j.step} remote={j.remote_id}/{j.remote_state}"
                  for j in case.jobs]
        lines += [f"    {e['timestamp']} {e['command']} {json.dumps(e.get('payload'))[:200]}"
                  for e in store.events(case_id)[-8:]]
    if broker is not None:
        lines.append(broker.queues())
    if procs is not None:
        log = procs.folder / "log" / "mqi.jsonl"
        if log.exists():
            bad = [line for line in log.read_text().splitlines() if re.search(r'"level": ?"(ERROR|WARNING)"', line)]
            lines += [line[:400] for line in bad[-30:]]
    return "\n".join(lines)


def sbatch_per_beam(cluster) -> Counter:
    """sbatch calls per beam folder of this test, as the cluster logged them."""
    calls = Counter()
    for call in cluster.tb.scheduler_calls():
        if call.startswith("sbatch") and f"{cluster.remote_root}/" in call:
            calls[next(w for w in call.split() if "/beam_" in w).rsplit("/", 1)[0]] += 1
    return calls


def assert_exactly_once(cluster, cases) -> None:
    """Completed, one Slurm job per beam, every result on disk matching its recorded hash."""
    for case in cases:
        assert case.status is CaseStatus.COMPLETED, (case.case_id, case.error)
        events = [e["command"] for e in context.current().store.events(case.case_id)]
        assert events.count("case_completed") == 1, events
        for job in case.jobs:
            assert job.results, (case.case_id, job.beam)
            for name, digest in job.results.items():
                assert sha256(cluster.tmp / "results" / case.case_id / name) == digest
    per_beam = sbatch_per_beam(cluster)
    beams = {f"{cluster.remote_root}/{c.case_id}/beam_{j.beam}" for c in cases for j in c.jobs}
    assert set(per_beam) == beams and set(per_beam.values()) == {1}, per_beam


def _poll_failing(store, host: str) -> bool:
    from mqi_celery import db

    with store.session() as s:
        row = s.get(db.HostRow, host)
        return row is not None and row.poll_failing_since is not None


def report(name: str, **figures) -> None:
    print(f"FAULT-REPORT {json.dumps({'test': name, **figures})}")


# ---------------------------------------------------------------- 1. under load
def _run_batch(cluster, prefix: str, n: int) -> tuple[list, Counter, float]:
    log = cluster.tmp / "log" / "mqi.jsonl"
    before = received_tasks(log) if log.exists() else Counter()
    for i in range(n):
        make_case(cluster.tmp / "inbox", f"{prefix}{i:02d}", marker=True, rows_per_layer=2)
    t0 = time.monotonic()
    cases = wait_all([f"{prefix}{i:02d}" for i in range(n)], 900)
    elapsed = time.monotonic() - t0
    received = received_tasks(log) - before
    return cases, received, elapsed


@pytest.mark.timeout(1200)
def test_messages_per_beam_do_not_grow_with_the_work_in_flight(cluster):
    start_production(cluster, scheduler={"kind": "slurm", "poll_interval_seconds": 2.0, "slurm": {"gres": "gpu:1"}},
                     scanner={"interval_seconds": 2.0, "settle_seconds": 3})
    hog = CpuHog()
    try:
        small, small_msgs, small_s = _run_batch(cluster, "ten", 10)
        large, large_msgs, large_s = _run_batch(cluster, "thirty", 30)
    finally:
        hog.stop()
    assert_exactly_once(cluster, small + large)
    per_beam_small = sum(small_msgs.values()) / 30
    per_beam_large = sum(large_msgs.values()) / 90
    report("load", beams_small=30, msgs_small=dict(small_msgs), per_beam_small=round(per_beam_small, 2),
           seconds_small=round(small_s), beams_large=90, msgs_large=dict(large_msgs),
           per_beam_large=round(per_beam_large, 2), seconds_large=round(large_s))
    # Work messages are a constant per beam (upload, verify... per case; one submit per
    # beam); the periodic ones (scan, poll, reconcile) follow the clock, not the beams.
    work = ("mqi.upload_case", "mqi.submit_beam", "mqi.download_results", "mqi.verify_results", "mqi.finalize_case")
    assert sum(large_msgs[t] for t in work) == 90 + 4 * 30
    assert per_beam_large <= 12 and per_beam_small <= 12
    assert "celery.chord_unlock" not in large_msgs
    # correlation_id on every log line of the multi-process run; a case's lines carry its own.
    traces = {c.case_id: c.trace_id for c in small + large}
    for line in (cluster.tmp / "log" / "mqi.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert "correlation_id" in record
        case_id = (record.get("payload") or {}).get("case_id")
        if case_id in traces:
            assert record["correlation_id"] == traces[case_id], record


# ---------------------------------------------------------------- 2. worker SIGKILLs
@pytest.mark.timeout(900)
def test_sigkilled_workers_lose_and_duplicate_nothing(cluster, tmp_path):
    procs = cluster.configure()
    flags = {point: tmp_path / f"fault-{point}" for point in ("upload_sent", "after_submit", "before_finalize")}
    for flag in flags.values():
        flag.touch()
    # Each point SIGKILLs the worker that reaches it, pool and all, once.
    procs.env["MQI_FAULT_INJECT"] = ",".join(f"{p}:{f}" for p, f in flags.items())
    procs.env["MQI_FAULT_ACTION"] = "kill-group"
    for queue in QUEUES:
        procs.start_worker(queue, "--pool", "prefork", "--concurrency", "2")
    procs.start_beat()
    ids = [f"kill{i:02d}" for i in range(10)]
    for case_id in ids:
        make_case(tmp_path / "inbox", case_id, marker=True, rows_per_layer=2)
    t0 = time.monotonic()
    cases = wait_all(ids, 600, procs)
    assert not any(f.exists() for f in flags.values())  # every fault fired
    assert_exactly_once(cluster, cases)
    report("worker-sigkills", cases=10, completed=sum(c.status is CaseStatus.COMPLETED for c in cases),
           seconds=round(time.monotonic() - t0))


# ---------------------------------------------------------------- 4. host down
class RefusingListener:
    """Holds the sshd port while sshd is down: accepts and closes each connection (no SSH
    banner), counting every attempt the pipeline makes."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.attempts = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.attempts += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def recovery_of(case_ids) -> Recovery:
    store = context.current().store
    return Recovery(case_ids, store.events, lambda c: (case := store.get_case(c)) and case.status.value)


@pytest.mark.timeout(900)
def test_host_down_for_two_minutes_parks_cases_and_resumes_them(cluster, tmp_path):
    """Shipped retry, breaker and reconciler settings (lease 600 s): the held cases go on
    within a minute of sshd's return, not when a lease runs out."""
    tb = cluster.tb
    start_production(cluster, engine={"command": f"{Path(sys.executable).parent / 'mqi-demo-engine'} --delay 1 "
                                                 "{input_file}", "timeout_seconds": 300})
    ids = [f"down{i}" for i in range(8)]
    for case_id in ids:
        make_case(tmp_path / "inbox", case_id, marker=True, rows_per_layer=2)
    store = context.current().store
    poll_until(lambda: any(j.remote_state == "RUNNING" for c in ids if (case := store.get_case(c))
                           for j in case.jobs), 180, what="a job running")
    for case_id in ("late0", "late1"):  # arrive during the outage: they must wait in QUEUED
        make_case(tmp_path / "inbox", case_id, marker=True, rows_per_layer=2)
    tb.stop_daemon("sshd")  # the daemon and every session with it
    listener = RefusingListener(tb.ssh_port)
    outage = time.monotonic()
    recovery = recovery_of(ids + ["late0", "late1"])
    try:
        poll_until(lambda: [e for e in store.events(ids[0], with_hosts=True)
                                     if e["command"] == "host_unreachable"], 90, what="the breaker to open")
        waiting = poll_until(lambda: [c for c in ids + ["late0", "late1"] if (case := store.get_case(c))
                                      and case.wait_reason and "unreachable since" in case.wait_reason],
                             60, what="cases to show why they wait")
        assert not [c for c in ids if store.get_case(c).status is CaseStatus.FAILED]
        shown = subprocess.run([str(Path(sys.executable).parent / "mqi"), "cases", "show", waiting[0]],
                               capture_output=True, text=True, env={**cluster.procs.env}, cwd=tmp_path)
        assert "unreachable since" in shown.stdout and "host_unreachable" in shown.stdout, shown.stdout
        status_s, status = status_seconds(cluster.procs.env, tmp_path)
        assert status["accepting_work"] is False and "host unreachable" in status["reason"], status
        time.sleep(max(0.0, 120 - (time.monotonic() - outage)))  # the outage itself lasts 2 minutes
    finally:
        listener.close()
        tb.start_daemon("sshd")
    recovery.fault_ended("sshd down 120 s")
    attempts = listener.attempts
    cases = wait_all(ids + ["late0", "late1"], 600)
    figures = recovery.assert_bounded()
    report("host-down", outage_s=120, attempts_during_outage=attempts, cases=len(cases), status_s=status_s,
           completed=sum(c.status is CaseStatus.COMPLETED for c in cases), recovery=figures)
    # 3 failures open the breaker; then one probe per 30 s cool-down (+ a few in flight).
    assert attempts <= 3 + 120 // 30 + 6, attempts
    assert_exactly_once(cluster, cases)
    assert any(e["command"] == "host_reachable" for e in store.events(ids[0], with_hosts=True))
    assert_nothing_left(cluster)


def assert_nothing_left(cluster) -> None:
    """No partial upload on the cluster, no half-downloaded file here."""
    assert not list(cluster.remote_root.glob("*/input.staging")), list(cluster.remote_root.glob("*/input.staging"))
    assert not list((cluster.tmp / "results").glob("*/.*.part"))


# ---------------------------------------------------------------- 5. scheduler restart
@pytest.mark.timeout(900)
def test_slurmctld_restart_and_a_node_failure(cluster, tmp_path):
    tb = cluster.tb
    start_production(cluster, engine={"command": f"{Path(sys.executable).parent / 'mqi-demo-engine'} --delay 1 "
                                                 "{input_file}", "timeout_seconds": 300},
                     scheduler={"kind": "slurm", "poll_interval_seconds": 1.0,
                                "slurm": {"gres": "gpu:1", "extra_sbatch_args": ["--no-requeue"]}})
    store = context.current().store
    make_case(tmp_path / "inbox", "ctld", marker=True, rows_per_layer=2)
    poll_until(lambda: any(j.remote_state == "RUNNING" for j in store.get_case("ctld").jobs)
               if store.get_case("ctld") else None, 180, what="a job running")
    tb.stop_daemon("slurmctld", graceful=True)
    # Bring it back once the pipeline has felt the outage: a poll failed and was recorded.
    poll_until(lambda: _poll_failing(store, tb.host), 60, what="a poll to fail while slurmctld is down")
    tb.start_daemon("slurmctld")
    assert wait_finished("ctld", 300).status is CaseStatus.COMPLETED
    # A node failure under a running job: NODE_FAIL, resubmitted once, completes.
    make_case(tmp_path / "inbox", "nodefail", marker=True, rows_per_layer=2)
    job = poll_until(lambda: next((j for j in store.get_case("nodefail").jobs if j.remote_state == "RUNNING"), None)
                     if store.get_case("nodefail") else None, 180, what="a job running")
    assert tb.ssh("scontrol update nodename=localhost state=down reason=mqi-test").returncode == 0
    poll_until(lambda: store.get_job("nodefail", job.beam).resubmits == 1, 120, what="the resubmission")
    # Back in service: by itself (ReturnToService=2 once slurmd re-registers) or on resume.
    tb.ssh("scontrol update nodename=localhost state=resume")
    poll_until(lambda: "down" not in tb.ssh("sinfo -h -N -o %T").stdout, 60, what="the node back in service")
    case = wait_finished("nodefail", 300)
    assert case.status is CaseStatus.COMPLETED, case.error
    again = store.get_job("nodefail", job.beam)
    assert again.resubmits == 1 and again.remote_id != job.remote_id
    # Every beam running on the node (two GPUs: up to two) failed with it, each resubmitted once.
    events = [(e["payload"]["beam"], e["payload"]["state"]) for e in store.events("nodefail")
              if e["command"] == "execution_resubmitted"]
    assert (job.beam, "NODE_FAIL") in events and {s for _, s in events} == {"NODE_FAIL"}, events
    assert len(events) == len({b for b, _ in events}) == sum(j.resubmits for j in case.jobs)
    report("scheduler", slurmctld_restart="completed", node_fail_resubmitted=events)


# ---------------------------------------------------------------- 7. failure paths
def _frozen(config) -> int:
    from tests.conftest import installation_pids

    [pid] = installation_pids(config, state="T")
    return pid


def test_a_transient_fault_is_retried_with_backoff_then_succeeds(cluster, tmp_path):
    import os
    import signal

    tb, flag = cluster.tb, tmp_path / "stop-upload"
    flag.touch()
    procs = cluster.configure(retry={"max_retries": 5, "backoff_seconds": 1, "backoff_max_seconds": 8, "jitter": False},
                              breaker={"failures_to_open": 100, "cooldown_seconds": 30})
    procs.env.update(MQI_FAULT_INJECT=f"upload_sent:{flag}", MQI_FAULT_ACTION="stop")
    cluster.start()
    make_case(tmp_path / "inbox", "flaky", marker=True, rows_per_layer=2)
    frozen = poll_until(lambda: not flag.exists() and _frozen(procs.env["MQI_CONFIG"]), 120,
                        what="the upload to reach the fault point")
    tb.stop_daemon("sshd")  # the connection drops under the upload
    os.kill(frozen, signal.SIGCONT)
    log = tmp_path / "log" / "mqi.jsonl"
    poll_until(lambda: log.read_text().count("mqi.upload_case: transient fault, retry") >= 2, 60,
               what="two retries of the upload")
    tb.start_daemon("sshd")
    case = wait_finished("flaky", 120)
    assert case.status is CaseStatus.COMPLETED, case.error
    delays = [float(m) for m in re.findall(r"mqi\.upload_case: transient fault, retry \d/5 in ([\d.]+)s",
                                           log.read_text())]
    assert len(delays) >= 2 and delays == [1.0, 2.0, 4.0, 8.0][:len(delays)], delays
    report("transient-retry", retries=len(delays), delays=delays, completed=True)


def waits_for_a_row(database: str) -> bool:
    """Some session of this database waits for a lock another one holds."""
    import psycopg2

    from mqi_celery.db_url import DatabaseURL

    with psycopg2.connect(DatabaseURL(database).libpq()) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'")
        waiting = cur.fetchone()[0] > 0
    conn.close()
    return waiting


def test_cancel_during_submit_kills_the_job_it_started(cluster, tmp_path):
    import os
    import signal

    from mqi_celery.conductor import cancel_case

    flag = tmp_path / "stop-submit"
    flag.touch()
    procs = cluster.configure(engine={"command": f"{Path(sys.executable).parent / 'mqi-demo-engine'} --fail hang "
                                                 "{input_file}", "timeout_seconds": 300})
    procs.env.update(MQI_FAULT_INJECT=f"after_submit:{flag}", MQI_FAULT_ACTION="stop")
    cluster.start()
    make_case(tmp_path / "inbox", "cancelsub", marker=True, rows_per_layer=2)
    frozen = poll_until(lambda: not flag.exists() and _frozen(procs.env["MQI_CONFIG"]), 120,
                        what="a submit frozen right after its sbatch")
    store, tb = context.current().store, cluster.tb
    # Cancelled while the submit's job id is not yet recorded. The worker froze with its other
    # threads wherever they were: one may hold a row the cancel must change, in the middle of
    # its own write, and only the worker going on releases it. So the cancel runs beside the
    # test, and the worker goes on once the cancel is done or waits for such a row.
    with ThreadPoolExecutor(1) as beside:
        cancelling = beside.submit(cancel_case, context.current(), "cancelsub")
        poll_until(lambda: cancelling.done() or waits_for_a_row(cluster.database), 60,
                   what="the cancel to finish or to wait for a row the frozen worker holds")
        os.kill(frozen, signal.SIGCONT)
        assert cancelling.result(timeout=120)

    def every_job_cancelled():
        out = tb.ssh("squeue -h -t all -o '%j %T' -n mqi-cancelsub-2,mqi-cancelsub-3,mqi-cancelsub-4").stdout
        states = [line.split()[1] for line in out.splitlines()]
        return states if states and all(s == "CANCELLED" for s in states) else None
    states = poll_until(every_job_cancelled, 60, what="every job of the cancelled case to be cancelled")
    case = store.get_case("cancelsub")
    assert case.status is CaseStatus.FAILED and case.error == "cancelled"
    report("cancel-during-submit", slurm_states=states)


# ---------------------------------------------------------------- 3. service restarts
@pytest.fixture
def private_cluster(tmp_path, config_file, slurm_testbed):
    """The testbed with a private RabbitMQ node and PostgreSQL cluster this test may restart."""
    from tests.pipeline_cluster import Cluster
    from tests.private_services import PrivatePostgres, PrivateRabbitMQ

    rabbit, pg, c = PrivateRabbitMQ(), PrivatePostgres(), None
    try:
        rabbit.start()
        pg.start()
        c = Cluster(tmp_path, config_file, slurm_testbed, rabbit.url, pg.url)
        c.rabbit, c.pg = rabbit, pg
        yield c
    finally:
        if getattr(c, "procs", None):
            c.procs.stop()
        slurm_testbed.ssh("scancel --user=root")
        rabbit.close()
        pg.close()


@pytest.mark.timeout(900)
def test_rabbitmq_then_postgres_restarted_mid_run(private_cluster, tmp_path):
    """Shipped retry and reconciler settings (lease 600 s): RabbitMQ stopped 15 s, then
    PostgreSQL stopped 15 s; after each, every case in flight goes on within a minute."""
    c = private_cluster
    start_production(c, engine={"command": f"{Path(sys.executable).parent / 'mqi-demo-engine'} --delay 0.5 "
                                           "{input_file}", "timeout_seconds": 300})
    ids = [f"svc{i:02d}" for i in range(10)]
    for case_id in ids:
        make_case(tmp_path / "inbox", case_id, marker=True, rows_per_layer=2)
    store = context.current().store
    poll_until(lambda: sum(bool(case and case.status is CaseStatus.PROCESSING) for case in map(store.get_case, ids))
               >= 3, 180, what="cases in flight")
    log = tmp_path / "log" / "mqi.jsonl"
    recovery = recovery_of(ids)

    def felt(text: str, before: int) -> bool:  # the workers have noticed the outage
        return log.read_text().count(text) > before

    t0 = time.monotonic()
    lost = log.read_text().count("Connection to broker lost")
    c.rabbit.stop()
    down = time.monotonic()
    poll_until(lambda: felt("Connection to broker lost", lost), 120, 1.0, "workers to lose the broker")
    rabbit_status_s, _ = status_seconds(c.procs.env, tmp_path)
    time.sleep(max(0.0, 15 - (time.monotonic() - down)))  # the outage lasts 15 s
    c.rabbit.start()
    recovery.fault_ended("RabbitMQ stopped 15 s")

    def progress() -> int:
        return sum(len(store.events(case_id)) for case_id in ids)
    seen = progress()
    poll_until(lambda: progress() > seen, 300, what="work to go on after the broker restart")
    refused = log.read_text().count("OperationalError")
    c.pg.stop()
    down = time.monotonic()
    poll_until(lambda: felt("OperationalError", refused), 120, 1.0, "workers to lose the database")
    pg_status_s, _ = status_seconds(c.procs.env, tmp_path)
    time.sleep(max(0.0, 15 - (time.monotonic() - down)))
    c.pg.start()
    context.reset()  # this test process's own pool
    recovery.fault_ended("PostgreSQL stopped 15 s")
    cases = wait_all(ids, 600, c.procs, c.rabbit)
    figures = recovery.assert_bounded()
    text = log.read_text()
    report("service-restarts", cases=10, completed=sum(x.status is CaseStatus.COMPLETED for x in cases),
           reconciled=sum("case_reconciled" in [e["command"] for e in store.events(x.case_id)] for x in cases),
           seconds=round(time.monotonic() - t0), recovery=figures, status_s={"rabbitmq": rabbit_status_s,
                                                                            "postgresql": pg_status_s},
           left_to_lease=text.count("is left to the reconciler"), rejected=text.count("reject requeue=False"))
    assert_exactly_once(c, cases)
    assert "reject requeue=False" not in text


def test_a_preempted_job_is_resubmitted_and_completes(cluster, tmp_path):
    tb = cluster.tb
    start_production(cluster, engine={"command": f"{Path(sys.executable).parent / 'mqi-demo-engine'} --delay 1 "
                                                 "{input_file}", "timeout_seconds": 300},
                     scheduler={"kind": "slurm", "poll_interval_seconds": 1.0, "slurm": {"gres": "gpu:1"}})
    store = context.current().store
    make_case(tmp_path / "inbox", "preempt", marker=True, rows_per_layer=2)
    job = poll_until(lambda: next((j for j in store.get_case("preempt").jobs if j.remote_state == "RUNNING"), None)
                     if store.get_case("preempt") else None, 180, what="a job running")
    # A job of the higher-tier partition needs both GPUs: Slurm cancels ours (PREEMPTED).
    urgent = tb.ssh(f"cd {cluster.remote_root} && sbatch --parsable -p urgent --gres=gpu:2 --wrap 'sleep 3'")
    assert urgent.returncode == 0, urgent.stderr
    case = wait_finished("preempt", 300)
    assert case.status is CaseStatus.COMPLETED, case.error
    again = store.get_job("preempt", job.beam)
    assert again.resubmits == 1 and again.remote_id != job.remote_id
    states = [e["payload"]["state"] for e in store.events("preempt") if e["command"] == "execution_resubmitted"]
    assert "PREEMPTED" in states, states
    report("preempted", resubmitted=states)
