"""The case on a real cluster: RabbitMQ + PostgreSQL workers, a real OpenSSH sshd and a
real single-node Slurm with fake GPUs (tests/testbed). The engine (mqi-demo-engine) runs
as the Slurm job, on the "cluster" side of the SSH connection."""
from __future__ import annotations

import pytest

from mqi_celery import context
from mqi_celery.models import CaseStatus, JobStatus
from mqi_celery.queues import QUEUES
from tests.casegen import STUDY_UID, make_case
from tests.conftest import poll_until
from tests.pipeline_cluster import ENGINE, drop_case, running_job, sha256, wait_finished

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

def test_real_case_completes_on_slurm_over_ssh(tmp_path, cluster):
    cluster.configure()
    cluster.start()
    drop_case(tmp_path / "inbox")
    case = wait_finished(STUDY_UID)
    assert case.status is CaseStatus.COMPLETED, case.error
    assert [(j.beam, j.status, j.scheduler) for j in case.jobs] == [(b, JobStatus.COMPLETED, "slurm") for b in (2, 3, 4)]
    events = context.current().store.events(STUDY_UID)
    upload = next(e for e in events if e["command"] == "upload_success")
    assert upload["payload"]["verified_files"] == len(case.manifest)
    assert len(case.manifest) == 1 + 3 * 2 + 2 * (34 + 32 + 42)  # plan, txt files, .ptn + .mgn
    remote_case = cluster.remote_root / STUDY_UID
    # The remote copy matches the manifest, file by file.
    for rel, digest in case.manifest.items():
        assert sha256(remote_case / "input" / rel) == digest
    # Results: byte-identical to what the engine wrote on the cluster side, hashes recorded.
    results = tmp_path / "results" / STUDY_UID
    for job in case.jobs:
        [(name, digest)] = job.results.items()
        assert (results / name).read_bytes() == (remote_case / f"beam_{job.beam}" / "output" / name).read_bytes()
        assert sha256(results / name) == digest
        download = next(e for e in events if e["command"] == "download_success" and e["payload"]["beam"] == job.beam)
        assert download["payload"]["files"] == {name: digest}
    sbatch = [c for c in cluster.tb.scheduler_calls() if c.startswith("sbatch") and str(remote_case) in c]
    assert len(sbatch) == 3


def test_exit_code_3_fails_the_beam_with_the_code(tmp_path, cluster):
    cluster.configure(engine_args="--fail exit --fail-beams 3")
    cluster.start()
    drop_case(tmp_path / "inbox", "exit3")
    case = wait_finished("exit3")
    jobs = {j.beam: j for j in case.jobs}
    assert case.status is CaseStatus.FAILED
    assert jobs[3].status is JobStatus.FAILED and jobs[3].remote_state == "FAILED" and jobs[3].exit_code == 3
    assert "engine exited with code 3" in jobs[3].error and "ERROR: simulated failure" in jobs[3].error
    assert jobs[2].status is jobs[4].status is JobStatus.COMPLETED


def test_time_limit_is_reported_as_timeout(tmp_path, cluster):
    cluster.configure(engine_args="--fail hang --fail-beams 3")
    cluster.start()
    drop_case(tmp_path / "inbox", "timeout")
    job = poll_until(lambda: running_job("timeout", 3), 120, what="beam 3 running on Slurm")
    # Slurm's smallest --time is one minute: move the job's end time instead, and Slurm
    # itself ends it with a real TIMEOUT.
    assert cluster.tb.ssh(f"scontrol update JobId={job.remote_id} EndTime=now+1").returncode == 0
    case = wait_finished("timeout", 150)
    hung = next(j for j in case.jobs if j.beam == 3)
    assert hung.status is JobStatus.FAILED and hung.remote_state == "TIMEOUT"
    assert "TIMEOUT" in hung.error and "time limit" in hung.error


def test_cancel_runs_scancel_and_fails_case_and_jobs(tmp_path, cluster):
    from mqi_celery.conductor import cancel_case

    cluster.configure(engine_args="--fail hang")
    cluster.start()
    drop_case(tmp_path / "inbox", "cancelme")
    store = context.current().store
    # Two fake GPUs: two beams run, the third waits in Slurm's queue; all three are cancelled.
    # (Beams are submitted in parallel: which two run first is Slurm's choice.)
    poll_until(lambda: any(running_job("cancelme", b) for b in (2, 3, 4))
               and all(j.remote_id for j in store.get_case("cancelme").jobs),
               120, what="every beam submitted, two running")
    ids = [j.remote_id for j in store.get_case("cancelme").jobs]
    before = len(cluster.tb.scheduler_calls())
    assert cancel_case(context.current(), "cancelme")
    case = store.get_case("cancelme")
    assert case.status is CaseStatus.FAILED and case.error == "cancelled"
    assert all(j.status is JobStatus.FAILED and j.error == "cancelled" for j in case.jobs)
    calls = cluster.tb.scheduler_calls()[before:]
    assert sorted(c for c in calls if c.startswith("scancel")) == sorted(f"scancel {i}" for i in ids)
    poll_until(lambda: all("JobState=CANCELLED" in cluster.tb.ssh(f"scontrol show job -o {i}").stdout for i in ids),
               30, what="Slurm to cancel the jobs")


def test_worker_killed_between_sbatch_and_database_write_submits_once(tmp_path, cluster):
    flag = tmp_path / "kill-once"
    flag.touch()
    procs = cluster.configure()
    procs.env["MQI_FAULT_INJECT"] = f"after_submit:{flag}"
    # prefork: the pool child dies (SIGKILL) right after sbatch; the message is redelivered.
    cluster.start(execute_args=("--pool", "prefork", "--concurrency", "2"))
    drop_case(tmp_path / "inbox", "crash")
    case = wait_finished("crash", 240)
    assert not flag.exists()  # the fault did fire
    assert case.status is CaseStatus.COMPLETED, case.error
    remote_case = cluster.remote_root / "crash"
    for beam in (2, 3, 4):
        sbatch = [c for c in cluster.tb.scheduler_calls()
                  if c.startswith("sbatch") and f"{remote_case}/beam_{beam}" in c]
        assert len(sbatch) == 1, sbatch
        out = cluster.tb.ssh(f"squeue -h -t all -n mqi-crash-{beam} -o %i").stdout.split()
        assert len(out) == 1, out


def test_ten_cases_one_ssh_handshake_per_worker_process(tmp_path, cluster):
    procs = cluster.configure()
    before = cluster.tb.accepted_ssh_logins()
    # Every queue in one worker process (threads): everything it does over SSH shares one
    # connection. Beat does no SSH.
    procs.start_worker(",".join(QUEUES), "--pool", "threads", "--concurrency", "8")
    procs.start_beat()
    inbox = tmp_path / "inbox"
    for i in range(10):
        make_case(inbox, f"case{i:02d}", marker=True, rows_per_layer=2)
    for i in range(10):
        assert wait_finished(f"case{i:02d}", 300).status is CaseStatus.COMPLETED
    log = (tmp_path / "log" / "mqi.jsonl").read_text()
    drops = log.count("dropped; the next operation reconnects")  # each one counted and logged
    assert cluster.tb.accepted_ssh_logins() - before == 1 + drops
    assert drops == 0


def test_thirty_active_jobs_one_scheduler_query_per_poll(tmp_path, cluster):
    from mqi_celery.poller import poll_jobs
    from mqi_celery.schedulers import JobSpec
    from mqi_celery.store import NewJob

    cluster.configure()
    store, scheduler = context.current().store, context.current().scheduler
    for c in range(10):
        store.register_case(f"busy{c}", f"/inbox/busy{c}")
        store.add_jobs(f"busy{c}", [NewJob(b, f"b{b}", "d") for b in (2, 3, 4)])
        for b in (2, 3, 4):
            workdir = cluster.remote_root / f"busy{c}" / f"beam_{b}"
            rid = scheduler.submit(JobSpec(f"mqi-busy{c}-{b}", workdir, "sleep 300", None, 600))
            store.update_job(f"busy{c}", b, status=JobStatus.RUNNING, remote_id=rid, scheduler="slurm")
    assert len(store.active_jobs()) == 30
    before = len(cluster.tb.scheduler_calls())
    assert poll_jobs(context.current()) == 30
    calls = cluster.tb.scheduler_calls()[before:]
    assert [c.split()[0] for c in calls] == ["squeue"], calls


def test_unknown_host_key_fails_the_case_before_any_file_leaves(tmp_path, cluster):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    tb = cluster.tb
    cluster.configure(transport={"kind": "ssh", "remote_root": str(cluster.remote_root),
                                 "ssh": {"host": tb.host, "port": tb.ssh_port, "user": tb.user,
                                         "key_file": str(tb.client_key), "known_hosts": str(empty)}})
    logins = tb.accepted_ssh_logins()
    cluster.start()
    drop_case(tmp_path / "inbox", "untrusted")
    case = wait_finished("untrusted", 60)
    assert case.status is CaseStatus.FAILED
    assert f"{tb.host}" in case.error and str(tb.ssh_port) in case.error
    assert tb.host_key_fingerprint in case.error and "known_hosts" in case.error
    assert not (cluster.remote_root / "untrusted").exists()
    assert tb.accepted_ssh_logins() == logins  # refused before authenticating


def test_direct_scheduler_over_ssh(tmp_path, cluster):
    cluster.configure(scheduler={"kind": "direct", "poll_interval_seconds": 0.5},
                      engine={"command": f"{ENGINE} {{input_file}}", "gpu_ids": [0, 1], "timeout_seconds": 120})
    cluster.start()
    drop_case(tmp_path / "inbox", "workstation")
    case = wait_finished("workstation")
    assert case.status is CaseStatus.COMPLETED, case.error
    assert {j.scheduler for j in case.jobs} == {"direct"}
    # No nvidia-smi on the host: each beam claimed one of the configured GPUs.
    assert {j.gpu_id for j in case.jobs} <= {0, 1} and None not in {j.gpu_id for j in case.jobs}
    remote_case = cluster.remote_root / "workstation"
    for job in case.jobs:
        assert (remote_case / f"beam_{job.beam}" / "job.exit").read_text().strip() == "0"
