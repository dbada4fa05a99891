"""Faults of the host's resources hold cases and never fail them; each case goes on within
a minute of the fault's end, with the shipped retry and reconciler settings (lease 600 s).
On the real test cluster (RabbitMQ, PostgreSQL, sshd, Slurm or a direct GPU host):

- the remote disk fills during an upload, then room is made; the results disk fills during
  a download, then room is made;
- nvidia-smi hangs for 60 s on a direct GPU host;
- another user's process appears on a GPU one of our beams holds.

Each test prints a FAULT-REPORT line with its figures (`pytest -s`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqi_celery import context
from mqi_celery.models import CaseStatus
from tests.casegen import make_case
from tests.pipeline_cluster import shipped_retry
from tests.polling import poll_until
from tests.recovery import Recovery, status_seconds
from tests.test_faults import assert_exactly_once, assert_nothing_left, report, wait_all

pytestmark = [pytest.mark.slurm, pytest.mark.integration]
ENGINE = Path(sys.executable).parent / "mqi-demo-engine"


def recovery_of(case_ids) -> Recovery:
    store = context.current().store
    return Recovery(case_ids, store.events, lambda c: (case := store.get_case(c)) and case.status.value)


def frozen(config) -> int | None:
    """The worker process a fault point froze (SIGSTOP), if any."""
    from tests.conftest import installation_pids

    found = installation_pids(config, state="T")
    return found[0] if found else None


def fill(folder: Path, leave: int) -> Path:
    """Someone else's file taking all but ``leave`` bytes of the disk under ``folder``."""
    filler = folder / "someone-elses-data"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        for _ in range(max(0, free - leave) >> 20):
            f.write(chunk)
    return filler


def mount_tmpfs(folder: Path, size_mib: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "mqi-test-disk", str(folder)], check=True)


@pytest.mark.timeout(900)
def test_full_disks_hold_cases_until_room_returns(tmp_path, cluster):
    """10 cases of 10 MB: the remote disk fills while one is being uploaded (its partial
    copy is removed, it waits with the curator's reason), and later the results disk fills
    while one is being downloaded (its .part is removed, the reason names the local folder);
    room is made each time and every case completes, each beam run once."""
    remote, results = cluster.remote_root, tmp_path / "results"
    mount_tmpfs(remote, 200)
    mount_tmpfs(results, 64)
    up_flag, down_flag = tmp_path / "freeze-upload", tmp_path / "freeze-download"
    try:
        procs = cluster.configure(retry=shipped_retry(), curator={"disk_margin": "4MiB"},
                                  engine={"command": f"{ENGINE} --delay 0.5 {{input_file}}", "timeout_seconds": 300})
        procs.env.update(MQI_FAULT_INJECT=f"upload_start:{up_flag},download_start:{down_flag}",
                         MQI_FAULT_ACTION="stop")
        up_flag.touch()
        cluster.start()
        ids = [f"full{i}" for i in range(10)]
        for case_id in ids:
            make_case(tmp_path / "inbox", case_id, marker=True, rows_per_layer=6000)  # 10 MB each
        store, config = context.current().store, procs.env["MQI_CONFIG"]
        recovery = recovery_of(ids)

        # 1. The remote disk fills during an upload.
        pid = poll_until(lambda: not up_flag.exists() and frozen(config), 120, what="an upload about to send")
        filler = fill(remote, leave=5 << 20)
        os.kill(pid, signal.SIGCONT)

        def held_for_room():
            return [c for c in ids if (case := store.get_case(c)) and "the remote disk" in (case.wait_reason or "")]
        held = poll_until(lambda: [c for c in held_for_room() if store.get_case(c).status is CaseStatus.PROCESSING],
                          120, what="the case whose upload hit the full disk to wait")
        reason = store.get_case(held[0]).wait_reason
        # The disk's figures ("has 5.1 MiB free; this case needs …"), or, if room came back
        # meanwhile (other partial copies removed too), that it ran full.
        assert "free; this case needs" in reason or "ran full during the upload" in reason, reason
        assert "goes on by itself once there is room" in reason, reason
        # Every partial upload goes from the full disk (another case's may still be failing).
        poll_until(lambda: not list(remote.glob("*/input.staging")), 60, what="the partial uploads to be removed")
        remote_status_s, status = status_seconds(procs.env, tmp_path)
        assert not [c for c in ids if store.get_case(c).status is CaseStatus.FAILED]
        filler.unlink()
        recovery.fault_ended("remote disk full mid-upload, then freed")

        # 2. The results disk fills during a download.
        down_flag.touch()
        pid = poll_until(lambda: not down_flag.exists() and frozen(config), 300, what="a download about to fetch")
        filler = fill(results, leave=100 << 10)
        os.kill(pid, signal.SIGCONT)
        held = poll_until(lambda: [c for c in ids if (case := store.get_case(c))
                                   and f"the results folder {results}" in (case.wait_reason or "")], 120,
                          what="a case whose download hit the full results disk to wait")
        assert "goes on by itself once there is room" in store.get_case(held[0]).wait_reason
        assert not list(results.glob("*/.*.part")), "a half-downloaded file stays on the full disk"
        results_status_s, status = status_seconds(procs.env, tmp_path)
        assert status["accepting_work"] is False and str(results) in status["reason"], status
        assert not [c for c in ids if store.get_case(c).status is CaseStatus.FAILED]
        filler.unlink()
        recovery.fault_ended("results disk full mid-download, then freed")

        cases = wait_all(ids, 600)
        figures = recovery.assert_bounded()
        report("full-disks", cases=10, completed=sum(c.status is CaseStatus.COMPLETED for c in cases),
               recovery=figures, status_s={"remote full": remote_status_s, "results full": results_status_s})
        assert_exactly_once(cluster, cases)
        assert_nothing_left(cluster)
    finally:
        if cluster.procs:
            cluster.procs.stop()
        for folder in (remote, results):
            subprocess.run(["umount", "-l", str(folder)], check=False)


# A fake nvidia-smi on the direct host: two GPUs, each listing the processes registered in
# STATE/<gpu>/<pid> (content: MiB) that are alive; it hangs, ignoring SIGTERM, while
# STATE/hang exists.
FAKE_NVIDIA_SMI = """#!/bin/sh
state={state}
if [ -e $state/hang ]; then trap '' TERM; while [ -e $state/hang ]; do sleep 0.5; done; fi
procs() {{ for f in $state/$1/*; do [ -e "$f" ] && kill -0 "${{f##*/}}" 2>/dev/null && echo "${{f##*/}} $(cat "$f")"; done; }}
case "$*" in
  *--query-gpu=*) for i in 0 1; do
      used=$(procs $i | awk '{{s += $2}} END {{print s + 0}}')
      echo "$i, GPU-000$i, Fake GPU, 0, $used, 16384, $((16384 - used)), 30, 50.0"; done ;;
  *--query-compute-apps=*) for i in 0 1; do procs $i | while read pid mib; do
      echo "GPU-000$i, $pid, proc, $mib"; done; done ;;
  *) exit 2 ;;
esac
"""

# The engine, wrapped: it registers its process on the GPU it was given (as a GPU process of
# its run's session), notes its GPU and times, and, while STATE/hold exists, keeps GPU 1.
RECORDING_ENGINE = """#!/bin/sh
gpu=${{CUDA_VISIBLE_DEVICES:-none}}
mkdir -p {state}/$gpu && echo 2000 > {state}/$gpu/$$
start=$(date +%s.%N)
{engine} --delay {delay} "$1"; rc=$?
while [ "$gpu" = 1 ] && [ -e {state}/hold ]; do sleep 0.2; done
echo "$gpu $start $(date +%s.%N)" >> {runs}
rm -f {state}/$gpu/$$
exit $rc
"""


@pytest.fixture
def fake_gpus(tmp_path, slurm_testbed):
    state = tmp_path / "gpu-state"
    for gpu in ("0", "1"):
        (state / gpu).mkdir(parents=True)
    shim = slurm_testbed.shims / "nvidia-smi"  # first on the remote PATH
    shim.write_text(FAKE_NVIDIA_SMI.format(state=state))
    shim.chmod(0o755)
    yield state
    shim.unlink()


def direct_host(cluster, tmp_path, state: Path, delay: float, **sections):
    runs = tmp_path / "gpu-runs.log"
    engine = tmp_path / "recording-engine"
    engine.write_text(RECORDING_ENGINE.format(state=state, engine=ENGINE, delay=delay, runs=runs))
    engine.chmod(0o755)
    procs = cluster.configure(retry=shipped_retry(), scheduler={"kind": "direct", "poll_interval_seconds": 2.0},
                              engine={"command": f"{engine} {{input_file}}", "timeout_seconds": 300}, **sections)
    cluster.start()
    return procs, runs


def gpu_runs(runs: Path) -> list[tuple[str, float, float]]:
    if not runs.exists():
        return []
    return sorted((gpu, float(start), float(end)) for gpu, start, end in
                  (line.split() for line in runs.read_text().splitlines()))


def host_processes(pattern: str) -> list[str]:
    p = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return [line for line in p.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.timeout(900)
def test_nvidia_smi_hanging_for_a_minute_holds_beams_and_leaves_nothing_on_the_host(tmp_path, cluster, fake_gpus):
    procs, runs = direct_host(cluster, tmp_path, fake_gpus, delay=1.0)
    ids = [f"hang{i}" for i in range(10)]
    for case_id in ids:
        make_case(tmp_path / "inbox", case_id, marker=True, rows_per_layer=2)
    store = context.current().store
    recovery = recovery_of(ids)
    poll_until(lambda: len(gpu_runs(runs)) >= 3, 300, what="beams running on the fake GPUs")
    (fake_gpus / "hang").touch()
    hung, hung_at = time.monotonic(), time.time()

    def judged_unreadable():
        return [c for c in ids if (case := store.get_case(c)) and "cannot be judged" in (case.wait_reason or "")]
    waiting = poll_until(judged_unreadable, 120, what="beams to wait for GPUs that cannot be read")
    reason = store.get_case(waiting[0]).wait_reason
    assert "nvidia-smi did not answer within" in reason and "(stopped on the host)" in reason, reason
    timings = []
    while time.monotonic() - hung < 60:  # the hang lasts a minute; mqi status answers all along
        seconds, status = status_seconds(procs.env, tmp_path)
        timings.append(seconds)
        time.sleep(5)
    assert status["accepting_work"] is False and "cannot be judged" in status["reason"], status
    # A reading taken before the hang may still start a beam: one up to
    # curator.gpu_reading_max_age_seconds (15 s) old, or the answer to the poller's request.
    started_during = [r for r in gpu_runs(runs) if r[1] > hung_at + 30]
    (fake_gpus / "hang").unlink()
    recovery.fault_ended("nvidia-smi hanging 60 s")
    cases = wait_all(ids, 600)
    figures = recovery.assert_bounded()
    leftovers = host_processes(str(cluster.tb.shims / "nvidia-smi"))
    report("nvidia-smi-hang", cases=10, completed=sum(c.status is CaseStatus.COMPLETED for c in cases),
           recovery=figures, status_s_max=max(timings), status_calls=len(timings), leftovers=leftovers)
    assert [c.status for c in cases] == [CaseStatus.COMPLETED] * 10, [c.error for c in cases]
    assert not started_during, started_during  # nothing was started on GPUs nobody could read
    assert not leftovers, leftovers  # every hung nvidia-smi was killed on the host
    # Never waits on the host: a reading that did would take its 30 s timeout (a new process
    # on a loaded machine may take a few seconds to start).
    assert max(timings) < 20, timings
    started = [e["payload"]["beam"] for c in ids for e in store.events(c) if e["command"] == "execution_started"]
    assert len(started) == 30  # one run per beam


@pytest.mark.timeout(900)
def test_a_foreign_process_on_a_gpu_we_hold_keeps_new_beams_off_it(tmp_path, cluster, fake_gpus):
    """3 cases x 3 beams on 2 GPUs. While our beam holds GPU 1, another user's process
    (12 GB) appears there: our beam runs on, the GPU shows as shared, an event says so, and
    no new beam of ours starts on GPU 1 until the process is gone."""
    (fake_gpus / "hold").touch()  # the first beam on GPU 1 runs until the test lets it end
    procs, runs = direct_host(cluster, tmp_path, fake_gpus, delay=1.0,
                              curator={"interval_seconds": 2.0, "gpu_reading_max_age_seconds": 1.0})
    ids = ["share_a", "share_b", "share_c"]
    for case_id in ids:
        make_case(tmp_path / "inbox", case_id, marker=True, rows_per_layer=2)
    store = context.current().store
    poll_until(lambda: any((fake_gpus / "1").iterdir()), 300, what="a beam of ours on GPU 1")
    foreign = subprocess.Popen(["sleep", "600"], start_new_session=True)  # someone else's, in its own session
    (fake_gpus / "1" / str(foreign.pid)).write_text("12000")
    appeared = time.time()
    try:
        status = poll_until(lambda: next((s for s in [status_seconds(procs.env, tmp_path)[1]]
                                          if s and s["gpus"] and s["gpus"][1]["state"] == "shared"), None),
                            120, 1.0, "mqi status to show GPU 1 shared")
        pids = [p["pid"] for p in status["gpus"][1]["processes"]]
        assert foreign.pid in pids and len(pids) == 2 and status["gpus"][1]["claimed_by"] is not None
        holder = status["gpus"][1]["claimed_by"]
        shared = poll_until(lambda: [e for e in store.events(holder["case_id"]) if e["command"] == "gpu_shared"], 60,
                            what="the gpu_shared event")
        assert shared[0]["payload"]["processes"] == [foreign.pid]
        assert "no new beam starts there until it is gone" in shared[0]["payload"]["reason"]
        (fake_gpus / "hold").unlink()  # our beam on GPU 1 ends; others run on GPU 0 meanwhile
        busy = f"GPU 1 is busy with another user's work (process {foreign.pid}, 12000 MiB)"
        poll_until(lambda: [c for c in ids if busy in ((x := store.get_case(c)) and x.wait_reason or "")], 120,
                   what="a waiting beam to say GPU 1 is busy with another user's work")
        poll_until(lambda: len([r for r in gpu_runs(runs) if r[1] > appeared]) >= 2, 300,
                   what="two more beams of ours to start while the process stays")
    finally:
        foreign.kill()
        foreign.wait()
    gone = time.time()
    cases = [poll_until(lambda c=c: (x := store.get_case(c)) and x.status in (CaseStatus.COMPLETED, CaseStatus.FAILED)
                        and x, 300, what=f"case {c} to finish") for c in ids]
    assert [c.status for c in cases] == [CaseStatus.COMPLETED] * 3, [c.error for c in cases]
    on_gpu1 = [start for gpu, start, _ in gpu_runs(runs) if gpu == "1"]
    report("foreign-gpu-process", runs=len(gpu_runs(runs)), foreign_seconds=round(gone - appeared, 1),
           starts_on_gpu1=[round(s - appeared, 1) for s in on_gpu1])
    assert len(gpu_runs(runs)) == 9 and {gpu for gpu, *_ in gpu_runs(runs)} <= {"0", "1"}
    # The first run on GPU 1 started before the process appeared; none started while it stayed.
    assert not [s for s in on_gpu1 if appeared < s < gone], (on_gpu1, appeared, gone)
    events = [json.dumps(e) for c in ids for e in store.events(c) if e["command"] == "gpu_shared"]
    assert len(events) == 1, events  # announced once, not at every reading
