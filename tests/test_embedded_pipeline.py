"""End to end on the embedded default: `mqi run` (worker with beat, filesystem broker,
SQLite, LocalHost, DirectScheduler, demo engine), cases dropped into the inbox."""
from __future__ import annotations

import hashlib
import json

import pydicom
import pytest

from tests.casegen import STUDY_UID, make_case
from tests.conftest import group_alive as _group_alive, poll_until

pytestmark = pytest.mark.processes

PATIENT_NAME = "ANONYMIZED"  # the plan's patient name: must never reach a log or an event


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_completed_with_results(run, case: dict) -> None:
    assert case["status"] == "COMPLETED", case["error"]
    assert case["error"] is None
    assert [(j["beam"], j["status"]) for j in case["jobs"]] == [(2, "COMPLETED"), (3, "COMPLETED"), (4, "COMPLETED")]
    results = run.folder / "results" / case["case_id"]
    doses = sorted(results.glob("*.dcm"))
    assert len(doses) == 3
    for dose in doses:
        beam = next(j for j in case["jobs"] if dose.name in j["results"])
        written = run.folder / "remote" / case["case_id"] / f"beam_{beam['beam']}" / "output" / dose.name
        assert sha256(dose) == sha256(written) == beam["results"][dose.name]
        assert pydicom.dcmread(dose).Modality == "RTDOSE"


def test_case_with_marker_completes(embedded):
    run = embedded()
    stale = run.folder / "results" / STUDY_UID / "beam_9_old_dose.dcm"  # left by an earlier run of this id
    stale.parent.mkdir(parents=True)
    stale.write_text("an earlier run's dose")
    make_case(run.inbox, marker=True)
    case = run.wait_case(STUDY_UID, timeout=60)
    assert_completed_with_results(run, case)
    # The results folder holds what the report lists; the earlier file is moved aside, kept.
    moved = json.loads((stale.parent / "report.json").read_text())["moved_aside"]
    assert moved["folder"].startswith("earlier/") and moved["files"] == [stale.name]
    assert not stale.exists() and (stale.parent / moved["folder"] / stale.name).read_text() == "an earlier run's dose"
    assert case["path"] == str(run.inbox / STUDY_UID)
    commands = [e["command"] for e in case["events"]]
    for expected in ("new_case_found", "upload_success", "execution_started", "execution_success",
                     "download_success", "case_completed"):
        assert expected in commands
    listed = run.mqi_json("cases", "list")
    assert [c["case_id"] for c in listed] == [STUDY_UID] and listed[0]["status"] == "COMPLETED"

    # Logs: JSON lines with the agreed fields; the case's lines carry its correlation id,
    # Celery's own task lines included; no patient name anywhere.
    lines = run.log_lines()
    assert lines and all({"timestamp", "level", "module", "correlation_id", "message"} <= set(line)
                         for line in lines)
    trace = case["correlation_id"]
    succeeded = [line for line in lines if "mqi.upload_case[" in line["message"] and "succeeded" in line["message"]]
    assert succeeded and all(line["correlation_id"] == trace for line in succeeded)
    # Every line that names the case once it is registered, in either worker's processes
    # (Celery's "received" lines in the main processes included), carries its id.
    registered = next(e["timestamp"] for e in case["events"] if e["command"] == "new_case_found")
    named = [line for line in lines if STUDY_UID in json.dumps({k: v for k, v in line.items() if k != "correlation_id"})
             and line["timestamp"] >= registered.replace("Z", "+00:00")]
    assert any("received" in line["message"] for line in named)
    assert named and [line for line in named if line["correlation_id"] != trace] == []
    assert f"correlation id: {trace}" in run.mqi("cases", "show", STUDY_UID).stdout  # what to grep the logs for
    assert all(e["correlation_id"] == trace for e in case["events"])
    assert PATIENT_NAME not in (run.folder / "log" / "mqi.jsonl").read_text()
    assert PATIENT_NAME not in json.dumps(case)
    assert run.stop() == 0  # Ctrl-C stops cleanly


def test_a_dropped_case_starts_without_waiting_for_the_periodic_scan(embedded):
    """The inbox watch wakes the scanner: with an hour between periodic scans, cases
    dropped into a running installation are still registered at once."""
    run = embedded(scanner={"interval_seconds": 3600})
    first = run.wait_case(make_case(run.inbox, "study_1", marker=True).name, timeout=120)  # found at start-up
    second = make_case(run.inbox, "study_2")  # after the start-up scan: only the watch can see it
    (second / "_CASE_READY").touch()
    assert first["status"] == run.wait_case("study_2", timeout=120)["status"] == "COMPLETED"
    assert run.stop() == 0


def test_case_without_marker_completes_after_settling(embedded):
    run = embedded(scanner={"settle_seconds": 2})
    make_case(run.inbox / "G2" / "55061194")  # nested <room>/<patient>/<study>
    case = run.wait_case(STUDY_UID, timeout=60)
    assert_completed_with_results(run, case)
    assert case["path"] == str(run.inbox / "G2" / "55061194" / STUDY_UID)


def test_engine_failures_fail_the_beam_keep_other_results_and_retry(embedded, failing_engine):
    script, flags = failing_engine
    run = embedded(engine={"command": f"sh {script} {{input_file}} {{job_dir}}", "timeout_seconds": 20})
    for mode in ("exit", "segfault", "no-output", "hang"):
        case = make_case(run.inbox, f"fail_{mode}")
        (case / "FAIL_MODE").write_text(mode)
        (case / "_CASE_READY").touch()

    expected = {
        "exit": "engine exited with code 3: ERROR: simulated failure",
        "segfault": "engine exited with code 139: Segmentation fault",
        "no-output": "engine exited 0 but wrote no .dcm output",
        "hang": "engine did not finish within 20 s (timeout); job killed",
    }
    for mode, reason in expected.items():
        case = run.wait_case(f"fail_{mode}", timeout=90)
        assert case["status"] == "FAILED"
        jobs = {j["beam"]: j for j in case["jobs"]}
        assert jobs[3]["status"] == "FAILED" and reason in jobs[3]["error"], jobs[3]["error"]
        assert f"beam 3 (2G225:TX): {reason}" in case["error"]
        # The beams that ran well keep their verified results.
        assert jobs[2]["status"] == jobs[4]["status"] == "COMPLETED"
        results = run.folder / "results" / case["case_id"]
        assert {p.name for p in results.glob("*.dcm")} == {*jobs[2]["results"], *jobs[4]["results"]}
        report = json.loads((results / "report.json").read_text())
        assert [j["status"] for j in report["jobs"]] == ["COMPLETED", "FAILED", "COMPLETED"]
        if mode == "hang":  # the timeout killed the engine itself, not only its wrapper
            hung = int(jobs[3]["remote_id"])
            poll_until(lambda: not _group_alive(hung), 15, what="the hung engine to be killed")

    # Fixed engine: retry runs the failed beam again and the case completes.
    (flags / "exit").unlink()
    retried = run.mqi_json("cases", "retry", "fail_exit")
    assert retried["status"] == "QUEUED"
    case = run.wait_case("fail_exit", statuses=("COMPLETED",), timeout=60)
    assert_completed_with_results(run, case)
    assert [e["command"] for e in case["events"]].count("case_retried") == 1
    assert {e["correlation_id"] for e in case["events"]} == {case["correlation_id"]}


def test_cancel_stops_a_running_case(embedded, failing_engine):
    script, _flags = failing_engine
    run = embedded(engine={"command": f"sh {script} {{input_file}} {{job_dir}}", "timeout_seconds": 300})
    case_dir = make_case(run.inbox, "to_cancel")
    (case_dir / "FAIL_MODE").write_text("hang")
    (case_dir / "_CASE_READY").touch()
    run.wait_case("to_cancel", statuses=("PROCESSING",), timeout=60)

    poll_until(lambda: next(j for j in run.mqi_json("cases", "show", "to_cancel")["jobs"]
                            if j["beam"] == 3)["status"] == "RUNNING", 30, what="beam 3 running")
    cancelled = run.mqi_json("cases", "cancel", "to_cancel")
    assert cancelled["status"] == "FAILED" and cancelled["error"] == "cancelled"
    assert run.mqi_json("cases", "show", "to_cancel")["events"][-1]["correlation_id"] == cancelled["correlation_id"]
    case = run.wait_case("to_cancel", timeout=30)
    assert case["status"] == "FAILED" and case["error"] == "cancelled"
    hung = next(j for j in case["jobs"] if j["beam"] == 3)
    assert hung["status"] == "FAILED" and hung["error"] == "cancelled"
    pgid = int(hung["remote_id"])
    poll_until(lambda: not _group_alive(pgid), 15, what="the hung engine and its wrapper to be killed")


def test_a_case_folder_replaced_while_its_case_runs_stops_it_then_runs_the_new_content(embedded, failing_engine,
                                                                                        tmp_path):
    """A copy without beam 4 replaces the folder while beam 4 runs: the run stops saying what
    changed (never completing beam 4 from the old content), and the new content is
    validated and computed as the case's next run."""
    import shutil

    from tests.casegen import BEAMS

    script, _flags = failing_engine
    run = embedded(engine={"command": f"sh {script} {{input_file}} {{job_dir}}", "timeout_seconds": 300})
    case_dir = make_case(run.inbox, "replaced")
    (case_dir / "FAIL_MODE").write_text("hang")
    (case_dir / "_CASE_READY").touch()
    run.wait_case("replaced", statuses=("PROCESSING",), timeout=60)
    poll_until(lambda: any(j["status"] == "RUNNING" for j in run.mqi_json("cases", "show", "replaced")["jobs"]),
               60, what="a beam running")
    new_copy = make_case(tmp_path / "staging", "replaced", marker=True)  # the new export, without beam 4
    shutil.rmtree(new_copy / BEAMS[4])
    case_dir.rename(tmp_path / "staging" / "old")  # swapped by two renames: never missing for long
    new_copy.rename(case_dir)
    case = run.wait_case("replaced", statuses=("COMPLETED",), timeout=120)  # failed in between: below
    assert [(j["beam"], j["status"]) for j in case["jobs"]] == [(2, "COMPLETED"), (3, "COMPLETED")]
    failed = next(e["payload"]["reason"] for e in case["events"] if e["command"] == "case_failed")
    assert failed.startswith("its folder changed while the case ran"), failed
    [again] = [e["payload"] for e in case["events"] if e["command"] == "case_dropped_again"]
    assert again["run"] == 2, again
    first_run = []
    for e in case["events"]:
        if e["command"] == "case_failed":
            break
        if e["command"] == "execution_started":
            first_run.append(int(e["payload"]["remote_id"]))
    assert first_run  # the hung one among them: stopped with the run, never left on the host
    poll_until(lambda: not any(_group_alive(g) for g in first_run), 30, what="the first run's engines to be killed")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_stops_the_worker_too(embedded):
    import signal

    run = embedded()
    worker_pid = poll_until(lambda: _child_pids(run.proc.pid), 30, what="the worker to start")[0]
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(60) == 0
    poll_until(lambda: not _alive(worker_pid), 30, what="the worker to stop")
    assert "stopped." in (run.folder / "run.out").read_text()


def _child_pids(pid: int) -> list[int]:
    import pathlib

    return [int(p) for p in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_step_that_fails_for_good_fails_the_case_with_its_reason(embedded, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("the remote root cannot be created below a file")
    run = embedded(transport={"remote_root": str(blocker / "remote")})
    make_case(run.inbox, "blocked", marker=True)
    case = run.wait_case("blocked", timeout=60)
    assert case["status"] == "FAILED"
    assert case["error"] == "upload: not a directory (remote); fix it, then retry the case"
    assert all(j["status"] == "FAILED" for j in case["jobs"])
    assert [e["command"] for e in case["events"]][-1] == "case_failed"


def test_the_embedded_run_serves_metrics_when_asked(embedded):
    from tests.operations import free_port, sample, scrape

    port = free_port()
    run = embedded(metrics={"port": port, "address": "127.0.0.1"})
    make_case(run.inbox, "measured", marker=True)
    assert run.wait_case("measured", timeout=120)["status"] == "COMPLETED"
    samples = poll_until(lambda: (s := scrape(port)) and sample(s, "mqi_cases_total", status="COMPLETED") == 1 and s,
                         60, what="the endpoint to count the case")
    assert sample(samples, "mqi_step_duration_seconds_count", step="run") == 3
    assert sample(samples, "mqi_active_workers", queue="transfer") == 3  # worker.concurrency prefork children
    assert sample(samples, "mqi_active_workers", queue="control") == 1
