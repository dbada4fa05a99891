"""Admission and claims: a GPU is never held by two beams (PostgreSQL, threads racing),
a claim is released on every way a job ends and reclaimed once its job is gone, a GPU
with someone else's work is not free, and a drained partition or a full job cap makes a
beam wait with the reason."""
from __future__ import annotations

import subprocess
import sys
import threading
from datetime import datetime

import pytest

from mqi_celery import admission, context
from mqi_celery.conductor import fail_case
from mqi_celery.models import CaseStatus, JobStatus
from mqi_celery.store import NewJob, Store
from tests.casegen import make_case
from tests.polling import poll_until
from tests.services import postgres_database


def case_with_jobs(store, case_id: str, beams=(1, 2, 3)) -> None:
    store.register_case(case_id, f"/inbox/{case_id}")
    store.update_case(case_id, status=CaseStatus.QUEUED)
    store.update_case(case_id, status=CaseStatus.PROCESSING)
    store.add_jobs(case_id, [NewJob(b, f"beam{b}", f"d{b}") for b in beams])


@pytest.mark.integration
def test_racing_workers_never_hold_the_same_gpu_on_postgresql():
    with postgres_database() as url:
        store = Store.from_url(url)
        for c in ("a", "b", "c", "d"):
            case_with_jobs(store, c)
        go, got = threading.Barrier(12), []

        def worker(case_id, beam):
            go.wait()
            got.append((store.claim("gpu-box", case_id, beam, ["gpu:0", "gpu:1"]), case_id, beam))
        threads = [threading.Thread(target=worker, args=(c, b)) for c in ("a", "b", "c", "d") for b in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        held = [r for r, *_ in got if r is not None]
        assert sorted(held) == ["gpu:0", "gpu:1"]  # 12 tried, 2 GPUs: one holder each
        assert set(store.claims("gpu-box")) == {"gpu:0", "gpu:1"}
        store.engine.dispose()


def test_a_claim_is_kept_by_its_job_and_released_on_every_end(ctx, config_file):
    store = context.current().store
    case_with_jobs(store, "c1")
    assert store.claim("h", "c1", 1, ["gpu:0", "gpu:1"]) == "gpu:0"
    assert store.claim("h", "c1", 1, ["gpu:0", "gpu:1"]) == "gpu:0"  # a redelivery keeps its GPU
    assert store.claim("h", "c1", 2, ["gpu:0", "gpu:1"]) == "gpu:1"
    assert store.claim("h", "c1", 3, ["gpu:0", "gpu:1"]) is None
    store.update_job("c1", 1, status=JobStatus.RUNNING, remote_id="11")
    store.update_job("c1", 1, status=JobStatus.COMPLETED)  # ended
    assert set(store.claims("h")) == {"gpu:1"}
    store.update_job("c1", 2, status=JobStatus.RUNNING, remote_id="12")
    fail_case(ctx, "c1", "cancelled")  # cancelled (its run cannot be reached here: the case still fails)
    assert store.claims("h") == {}


def test_a_claim_whose_job_holds_no_run_is_reclaimed_after_the_grace_period(config_file):
    store = context.current().store
    case_with_jobs(store, "c1")
    store.claim("h", "c1", 1, ["gpu:0"])  # its worker died before the submit
    store.claim("h", "c1", 2, ["gpu:1"])
    store.update_job("c1", 2, status=JobStatus.RUNNING, remote_id="7")
    assert store.reclaim_claims(3600) == []  # within the grace period: kept
    assert store.reclaim_claims(0) == [("h", "gpu:0", "c1")]
    assert set(store.claims("h")) == {"gpu:1"}  # a running job keeps its GPU


def reading(*devices, claimed=()):
    return {"gpus": {"state": "ok", "devices": list(devices)}, "claimed": list(claimed)}


def gpu(index, *, processes=(), memory=0, ours=()):
    return {"index": index, "uuid": f"GPU-{index}", "name": "x", "memory_used_mib": memory,
            "processes": [{"pid": p, "name": "p", "used_memory_mib": 100, "session": p, "ours": p in ours}
                          for p in processes]}


def test_someone_elses_work_makes_a_gpu_not_free(ctx, config_file):
    r = reading(gpu(0), gpu(1, processes=[4242]), gpu(2, memory=20000), gpu(3, processes=[99], memory=100, ours=[99]),
                claimed=["gpu:3"])
    # GPU 3's process is ours (its session is our run's); GPU 0 is held by another beam of ours now.
    assert admission.gpu_candidates(ctx, r, {"gpu:0": ("other", 1)}, ("c1", 1)) == [3]
    assert admission.gpu_candidates(ctx, r, {"gpu:0": ("c1", 1)}, ("c1", 1)) == [0, 3]  # its own claim counts as free
    reason = admission.no_free_gpu(ctx, r, {"gpu:0": ("other", 1), "gpu:3": ("c2", 2)})
    assert "GPU 0 runs beam 1 of case other" in reason
    assert "GPU 1 is busy with another user's work (process 4242, 100 MiB)" in reason
    assert "GPU 2 is busy with another user's work (20000 MiB, no process listed)" in reason


def test_a_foreign_process_beside_our_beam_makes_its_gpu_shared_and_taken_by_no_new_beam(ctx, config_file):
    """Ours are the processes in our runs' sessions: anything else on a GPU we hold is
    someone else's, and no new beam of ours starts there until it is gone."""
    shared = gpu(1, processes=[501, 4242], memory=12100, ours=[501])
    r = reading(gpu(0, processes=[500], memory=100, ours=[500]), shared, claimed=["gpu:0", "gpu:1"])
    claims = {"gpu:0": ("c1", 1), "gpu:1": ("c1", 2)}
    assert admission.gpu_state(ctx, shared, r, claims) == "shared" and admission.gpu_state(ctx, r["gpus"]["devices"][0], r,
                                                                                        claims) == "ours"
    assert admission.gpu_candidates(ctx, r, {"gpu:0": ("c1", 1)}, ("c1", 3)) == []  # GPU 1's beam ended: still not free
    reason = admission.no_free_gpu(ctx, r, claims)
    assert "GPU 1 runs beam 2 of case c1 and is shared with another user's work (process 4242, 100 MiB)" in reason
    # Memory beyond what our processes use is someone else's too; the driver's few MiB are not.
    assert admission.gpu_state(ctx, gpu(1, processes=[501], memory=130, ours=[501]), r, {}) == "free"
    assert admission.gpu_state(ctx, gpu(1, processes=[501], memory=9000, ours=[501]), r, {}) == "busy"
    # A process whose session we do not know (gone, or a reading from before sessions) is not ours.
    assert admission.gpu_state(ctx, gpu(1, processes=[777]), r, {}) == "busy"



def test_a_process_on_a_gpu_whose_beam_is_being_started_is_not_taken_for_someone_elses(ctx, config_file):
    """A reading can see a run's process before its pid is recorded (the submit's answer is
    written after the run starts): that GPU's processes count as ours for that reading."""
    from mqi_celery import gpu_use

    r = reading(gpu(0, processes=[600], memory=100), gpu(1, processes=[700], memory=100), claimed=["gpu:0"])
    gpu_use.mark_ours(r, runs=set(), starting={0})
    first, second = r["gpus"]["devices"]
    assert first["processes"][0]["ours"] and admission.gpu_state(ctx, first, r, {"gpu:0": ("c1", 1)}) == "ours"
    assert not second["processes"][0]["ours"] and admission.gpu_state(ctx, second, r, {}) == "busy"
    gpu_use.mark_ours(r, runs=set())  # the next reading, the pid recorded elsewhere: 600 is someone else's
    assert admission.gpu_state(ctx, first, r, {"gpu:0": ("c1", 1)}) == "shared"

def test_gpus_from_configuration_where_the_host_has_no_nvidia_smi(ctx, config_file):
    absent = {"gpus": {"state": "absent", "reason": "nvidia-smi is not installed on the host"}}
    assert admission.gpu_candidates(ctx, absent, {}, ("c", 1)) is None  # the CPU stand-in: no GPU to assign
    config_file(engine={"gpu_ids": [0, 1]})
    ctx = context.current()  # configured again: its new context
    assert admission.gpu_candidates(ctx, absent, {"gpu:0": ("x", 1)}, ("c", 1)) == [1]
    unknown = {"gpus": {"state": "unknown", "reason": "nvidia-smi failed (exit 9): driver mismatch"}}
    assert "cannot be judged: nvidia-smi failed (exit 9)" in admission.gpu_candidates(ctx, unknown, {}, ("c", 1))


def test_a_drained_partition_or_a_full_job_cap_makes_a_beam_wait(ctx, config_file):
    config_file(scheduler={"kind": "slurm", "max_active_jobs": 1})
    ctx = context.current()  # configured again: its new context
    store = context.current().store
    case_with_jobs(store, "c1")
    host = context.current().host.name
    drained = {"nodes": {"state": "ok", "accepting": False, "reason": "no node of Slurm partition debug takes jobs: "
                                                                       "n1 drained (disk)"}}
    store.save_reading(host, drained)
    assert admission.start_beam(ctx, "c1", 1).startswith("no node of Slurm partition debug takes jobs: n1 drained")
    store.save_reading(host, {"nodes": {"state": "ok", "accepting": True, "reason": None}})
    assert admission.start_beam(ctx, "c1", 1) == admission.Grant(None)  # Slurm chooses the GPU
    assert admission.start_beam(ctx, "c1", 2).startswith(f"1 job(s) of ours already on {host}, the cap")
    assert store.claims(host) == {"job:0": ("c1", 1)}


def test_the_endpoint_serves_each_gpu_and_whether_the_host_takes_work(config_file):
    from mqi_celery.metrics_endpoint import DatabaseCollector

    store, host = context.current().store, context.current().host.name
    case_with_jobs(store, "c1")
    store.claim(host, "c1", 1, ["gpu:0"])
    store.save_reading(host, {**reading(gpu(0), gpu(1, processes=[4242], memory=21354)),
                              "disk": {"state": "ok", "free_bytes": 5 * 2**30, "total_bytes": 9 * 2**30, "mount": "/"}})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in DatabaseCollector().collect() for s in family.samples}
    assert samples[("mqi_host_accepting_work", (("host", host),))] == 1
    assert samples[("mqi_disk_free_bytes", (("host", host), ("path", "remote")))] == 5 * 2**30
    assert samples[("mqi_gpu_memory_used_mib", (("gpu", "1"), ("host", host)))] == 21354
    on = {dict(labels)["gpu"]: dict(labels)["state"] for (name, labels), v in samples.items()
          if name == "mqi_gpu_state" and v == 1}
    assert on == {"0": "ours", "1": "busy"}


@pytest.mark.integration
def test_transfer_slots_are_shared_and_a_dead_holder_lets_go(config_file):
    from mqi_celery import db

    with postgres_database() as url:
        store = Store.from_url(url)
        for engine in (context.current().store.engine, store.engine):  # SQLite (file locks), PostgreSQL
            with db.slot(engine, "transfer:h", 2) as first, db.slot(engine, "transfer:h", 2) as second:
                with db.slot(engine, "transfer:h", 2) as third:
                    assert (first, second, third) == (0, 1, None)
                assert db.free_slots(engine, "transfer:h", 2) == 0
            assert db.free_slots(engine, "transfer:h", 2) == 2
        holder = subprocess.Popen([sys.executable, "-c", HOLD_A_SLOT, url], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "0"  # it holds slot 0 of 1
        assert db.free_slots(store.engine, "transfer:h", 1) == 0
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
        poll_until(lambda: db.free_slots(store.engine, "transfer:h", 1) == 1, 60, 0.2, "the dead holder's slot")
        store.engine.dispose()


HOLD_A_SLOT = """
import sys, time
from mqi_celery import db
engine = db.make_engine(sys.argv[1])
with db.slot(engine, "transfer:h", 1) as number:
    print(number, flush=True)
    time.sleep(600)
"""


@pytest.mark.processes
def test_with_max_transfers_one_uploads_run_one_at_a_time_and_every_case_completes(embedded):
    run = embedded(transport={"max_transfers": 1}, worker={"concurrency": 4})
    names = [f"line{i}" for i in range(4)]
    for name in names:
        make_case(run.inbox, name, marker=True)
    cases = [run.wait_case(name, timeout=240) for name in names]
    assert [c["status"] for c in cases] == ["COMPLETED"] * 4, [c["error"] for c in cases]
    uploads = []
    for c in cases:
        done = next(e for e in c["events"] if e["command"] == "upload_success")
        end = datetime.fromisoformat(done["timestamp"].rstrip("Z")).timestamp()
        uploads.append((end - done["payload"]["seconds"], end))
    uploads.sort()
    assert all(b[0] >= a[1] - 0.01 for a, b in zip(uploads, uploads[1:])), uploads
    waited = [e for c in cases for e in c["events"] if e["command"] == "case_waiting"]
    assert waited and all("transport.max_transfers" in e["payload"]["reason"] for e in waited)


def test_disk_admission_counts_only_what_is_still_to_upload(ctx, config_file, tmp_path):
    """A retry whose input is verified on the host already needs no room for a second copy."""
    from mqi_celery import messages

    config_file(curator={"disk_margin": "1MiB"})
    ctx = context.current()  # configured again: its new context
    store = context.current().store
    folder = make_case(tmp_path / "inbox", "again", rows_per_layer=2000)  # about 3 MB
    store.register_case("again", str(folder))
    store.update_case("again", manifest={str(p.relative_to(folder)): "x" for p in folder.rglob("*") if p.is_file()})
    case = store.get_case("again")
    disk = {"state": "ok", "free_bytes": 2 << 20, "total_bytes": 1 << 30, "mount": "/remote"}
    assert "this case needs" in admission.disk_hold(ctx, case, disk)
    messages.emit(ctx, "upload_success", {"files": 0}, case_id="again")
    assert admission.disk_hold(ctx, case, disk) is None


def test_mqi_status_accepting_work_agrees_with_what_admission_holds(ctx, config_file):
    config_file(curator={"disk_margin": "1GiB"})
    ctx = context.current()  # configured again: its new context
    closed = ("closed", None, None)
    roomy = {"state": "ok", "free_bytes": 5 << 30, "total_bytes": 9 << 30, "mount": "/"}
    assert admission.accepting_hold(ctx, {"disk": roomy, **reading(gpu(0))}, closed) is None
    full = {"disk": {**roomy, "free_bytes": 0}}
    assert "the remote disk (/ on localhost) has 0 B free" in admission.accepting_hold(ctx, full, closed)
    unread = {"disk": roomy, "gpus": {"state": "unknown", "reason": "nvidia-smi did not answer within 9 s"}}
    assert "new beams wait: the GPUs of localhost cannot be judged" in admission.accepting_hold(ctx, unread, closed)
    taken = {"disk": roomy, **reading(gpu(0, processes=[4242]))}
    assert "GPU 0 is busy with another user's work" in admission.accepting_hold(ctx, taken, closed)
    ours = {"disk": roomy, **reading(gpu(0, processes=[500], ours=[500]), claimed=["gpu:0"])}
    assert admission.accepting_hold(ctx, ours, closed) is None  # our own beam ends by itself
    assert admission.accepting_hold(ctx, ours, ("open", None, "connection refused")) == \
        "host unreachable (connection refused)"


def test_one_reading_of_a_host_at_a_time_and_unjudged_gpus_asked_again_at_once(ctx, config_file, monkeypatch):
    """A hung host holds one worker slot, not every one that wants a reading; and the
    poller does not keep a reading whose GPUs could not be judged for
    curator.gpu_reading_max_age_seconds: it asks again, so a hang's end is seen soon."""
    from mqi_celery import db
    from mqi_celery.celery_app import app

    store = context.current().store
    with db.slot(store.engine, f"reading:{context.current().host_name}", 1) as held:
        assert held == 0
        assert admission.take_reading(ctx) is None  # another process reads the host now
    assert admission.take_reading(ctx) is not None
    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, *a, **kw: sent.append(name))
    monkeypatch.setattr(admission, "_asked_at", None)
    store.save_reading(context.current().host_name, {"gpus": {"state": "ok", "devices": []}, "disk": None})
    assert admission.latest_reading(ctx, max_age=60, may_read=False) is not None and sent == []
    hung = {"state": "unknown", "reason": "nvidia-smi did not answer within 5 s (stopped on the host)"}
    store.save_reading(context.current().host_name, {"gpus": hung, "disk": None})
    assert admission.latest_reading(ctx, max_age=60, may_read=False) is None and sent == ["mqi.read_host"]
    assert admission.latest_reading(ctx, max_age=60, may_read=False) is None and sent == ["mqi.read_host"]  # one at a time
    store.save_reading(context.current().host_name, {"gpus": hung, "disk": None})  # its answer: used once, then asked again
    assert admission.latest_reading(ctx, max_age=60, may_read=False)["gpus"] == hung
    assert admission.latest_reading(ctx, max_age=60, may_read=False) is None and sent == ["mqi.read_host"] * 2
    # A submit (may_read) keeps a fresh reading, readable or not: it never waits on a hung host.
    assert admission.latest_reading(ctx, max_age=60, may_read=True)["gpus"] == hung


def test_the_curator_s_periodic_run_reads_the_host_resumes_and_publishes(ctx):
    from mqi_celery.curator import report_system_status

    message = report_system_status(ctx)
    assert message["command"] == "system_status_update"
    assert {"accepting_work", "cases", "jobs"} <= set(message["payload"])
