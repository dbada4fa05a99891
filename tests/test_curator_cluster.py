"""The System Curator and admission on the real test cluster (RabbitMQ, PostgreSQL, sshd,
Slurm): a drained node holds new work and its resumption lets it go on; a fake
nvidia-smi on the remote PATH (2 GPUs, one busy with someone else's process) makes the
direct scheduler run 9 beams one at a time on the one free GPU; a remote disk too small
(a real tmpfs) keeps a case QUEUED until room is made. ``mqi status`` shows each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mqi_celery import context
from mqi_celery.models import CaseStatus
from tests.pipeline_cluster import drop_case, wait_finished
from tests.polling import poll_until

ENGINE = Path(sys.executable).parent / "mqi-demo-engine"
MQI = Path(sys.executable).parent / "mqi"


def mqi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MQI), *args], capture_output=True, text=True, timeout=120)


def mqi_status() -> dict:
    p = mqi("status", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def status_once_there_is_a_schema() -> dict | None:
    """`mqi status --json`, or None while the workers have not made the new database's
    schema yet (a read never makes it: it says so and exits 1)."""
    p = mqi("status", "--json")
    if p.returncode == 1 and "schema is at revision none" in " ".join(p.stdout.split()):
        return None
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def waiting_reason(case_id: str, words: str, timeout: float = 120) -> str:
    """The case's reason for waiting once it contains ``words`` (while it stays QUEUED)."""
    def held():
        case = context.current().store.get_case(case_id)
        if case is not None:
            assert case.status in (CaseStatus.NEW, CaseStatus.QUEUED), (case.status, case.error)
        return case.wait_reason if case is not None and words in (case.wait_reason or "") else None
    return poll_until(held, timeout, 0.5, f"case {case_id} to wait with {words!r}")


def test_a_drained_node_holds_new_cases_and_resuming_it_lets_them_go_on(tmp_path, cluster):
    tb = cluster.tb
    node = tb.ssh("sinfo -h -N -o %N").stdout.split()[0]
    cluster.configure(curator={"interval_seconds": 1.0})
    cluster.start()
    poll_until(lambda: (r := context.current().store.reading(tb.host)[0]) and r.get("nodes", {}).get("accepting"), 120, 0.5,
               "a first reading of the cluster")
    status = mqi_status()
    assert status["scheduler_up"] and status["accepting_work"] and status["partition"] == "debug"
    assert status["disk_free"] > 0 and status["nodes"][0]["node"] == node
    try:
        assert tb.ssh(f"scontrol update nodename={node} state=drain reason=mqi-test-maintenance").returncode == 0
        poll_until(lambda: not mqi_status()["accepting_work"], 120, 1.0, "the curator to see the drained node")
        drop_case(tmp_path / "inbox", "during_drain")
        reason = waiting_reason("during_drain", "drained")
        assert f"no node of Slurm partition debug takes jobs: {node} drained (mqi-test-maintenance)" in reason
        shown = mqi("cases", "show", "during_drain")
        assert "waiting: no node of Slurm partition debug takes jobs" in " ".join(shown.stdout.split())
        status = mqi_status()
        assert status["reason"].startswith("no node of Slurm partition debug") and status["nodes"][0]["state"] == "drained"
        assert [w["case_id"] for w in status["waiting"]] == ["during_drain"]
        assert not any("mqi-during_drain" in call for call in tb.scheduler_calls() if call.startswith("sbatch"))
        assert not (cluster.remote_root / "during_drain").exists()  # not even uploaded
    finally:
        tb.ssh(f"scontrol update nodename={node} state=resume")
    case = wait_finished("during_drain", 180)  # no manual step: the curator sees the node back
    assert case.status is CaseStatus.COMPLETED, case.error
    assert case.wait_reason is None
    commands = [e["command"] for e in context.current().store.events("during_drain")]
    assert "case_waiting" in commands and "case_resumed" in commands


FAKE_NVIDIA_SMI = """#!/bin/sh
# Two GPUs; GPU 1 is busy with someone else's process (pid 4242, 12000 MiB).
case "$*" in
  *--query-gpu=*) printf '0, GPU-0000-free, Fake GPU, 0, 0, 16384, 16384, 30, 50.0\\n'
                  printf '1, GPU-1111-busy, Fake GPU, 97, 12000, 16384, 4384, 70, 250.0\\n' ;;
  *--query-compute-apps=*) printf 'GPU-1111-busy, 4242, someone_else, 12000\\n' ;;
  *) echo "fake nvidia-smi: $*" >&2; exit 2 ;;
esac
"""

# The engine as a wrapper that notes, per run, the GPU it was given and when it ran.
RECORDING_ENGINE = """#!/bin/sh
start=$(date +%s.%N)
{engine} --delay 0.1 "$1"; rc=$?
echo "${{CUDA_VISIBLE_DEVICES:-none}} $start $(date +%s.%N) $1" >> {log}
exit $rc
"""


@pytest.fixture
def fake_nvidia_smi(slurm_testbed):
    shim = slurm_testbed.shims / "nvidia-smi"  # first on the remote PATH
    shim.write_text(FAKE_NVIDIA_SMI)
    shim.chmod(0o755)
    yield
    shim.unlink()


def test_direct_host_runs_beams_one_at_a_time_on_the_one_free_gpu(tmp_path, cluster, fake_nvidia_smi):
    runs = tmp_path / "gpu-runs.log"
    engine = tmp_path / "recording-engine"
    engine.write_text(RECORDING_ENGINE.format(engine=ENGINE, log=runs))
    engine.chmod(0o755)
    cluster.configure(scheduler={"kind": "direct", "poll_interval_seconds": 0.5},
                      engine={"command": f"{engine} {{input_file}}", "timeout_seconds": 120},
                      curator={"interval_seconds": 2.0})
    cluster.start()
    for name in ("gpu_a", "gpu_b", "gpu_c"):
        drop_case(tmp_path / "inbox", name)
    seen_ours = poll_until(lambda: next((s for s in [status_once_there_is_a_schema()]
                                         if s and s["gpus"] and s["gpus"][0]["state"] == "ours"), None),
                           180, 0.5, "mqi status to show a beam on GPU 0")
    cases = [wait_finished(name, 300) for name in ("gpu_a", "gpu_b", "gpu_c")]
    assert [c.status for c in cases] == [CaseStatus.COMPLETED] * 3, [c.error for c in cases]
    lines = [line.split() for line in runs.read_text().splitlines()]
    assert len(lines) == 9 and {gpu for gpu, *_ in lines} == {"0"}  # never GPU 1, never none
    intervals = sorted((float(start), float(end)) for _, start, end, _ in lines)
    overlaps = [(a, b) for a, b in zip(intervals, intervals[1:]) if b[0] < a[1]]
    assert not overlaps, f"two runs at once on GPU 0: {overlaps}"
    assert {j.gpu_id for c in cases for j in c.jobs} == {0}
    # mqi status saw GPU 0 ours, GPU 1 someone else's; now GPU 0 is free again and unclaimed.
    busy = seen_ours["gpus"][1]
    assert busy["state"] == "busy" and busy["processes"][0]["pid"] == 4242 and busy["claimed_by"] is None
    assert seen_ours["gpus"][0]["claimed_by"]["case_id"] in {"gpu_a", "gpu_b", "gpu_c"}
    after = mqi_status()
    assert [g["state"] for g in after["gpus"]] == ["free", "busy"] and after["free_gpus"] == 1
    assert after["claims"] == {}
    table = mqi("status").stdout
    assert "GPU-" not in table and "someone_else" in table and "1 free of 2" in table
    waited = [e for c in ("gpu_a", "gpu_b", "gpu_c") for e in context.current().store.events(c)
              if e["command"] == "execution_waiting"]
    assert waited and all("no free GPU" in e["payload"]["reason"] for e in waited)
    assert all("GPU 1 is busy with another user's work" in e["payload"]["reason"] for e in waited)


def test_a_remote_disk_too_small_keeps_the_case_queued_until_room_is_made(tmp_path, cluster):
    root = cluster.remote_root
    case_dir = drop_case(tmp_path / "staging", "disk_case")
    case_bytes = sum(f.stat().st_size for f in case_dir.rglob("*") if f.is_file())
    root.mkdir(parents=True)
    size = case_bytes + 64 * 2**20
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "mqi-test-disk", str(root)], check=True)
    try:
        filler = root / "someone-elses-data"
        with open(filler, "wb") as f:  # leaves less room than the case plus the margin
            f.truncate(0)
            f.write(b"\0" * (size - case_bytes // 2 - 4 * 2**20))
        cluster.configure(curator={"interval_seconds": 1.0, "disk_margin": "4MiB"})
        cluster.start()
        (tmp_path / "inbox").mkdir(exist_ok=True)
        os.rename(case_dir, tmp_path / "inbox" / "disk_case")  # dropped whole, at once
        reason = waiting_reason("disk_case", "remote disk")
        assert "free; this case needs" in reason and "curator.disk_margin" in reason
        assert not (root / "disk_case").exists()
        assert "remote disk" in mqi_status()["waiting"][0]["reason"]
        filler.unlink()
        case = wait_finished("disk_case", 180)
        assert case.status is CaseStatus.COMPLETED, case.error
    finally:
        if cluster.procs:
            cluster.procs.stop()
        subprocess.run(["umount", "-l", str(root)], check=False)
