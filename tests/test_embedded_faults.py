"""Faults on the embedded default (`mqi run`: folder broker, SQLite, local host, direct
scheduler). The folder broker loses a message in flight when its process dies, so a crash
is survived only through the database: leases, and the reconciler at start-up."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.casegen import make_case
from tests.conftest import Embedded, installation_pids, kill_installation, poll_until
from tests.recovery import Recovery

pytestmark = pytest.mark.processes

ENGINE = f"{Path(sys.executable).parent / 'mqi-demo-engine'} --delay 0.5 {{input_file}}"


def case_state(run: Embedded, case_id: str) -> dict | None:
    p = run.mqi("cases", "show", case_id, "--json")
    return json.loads(p.stdout) if p.returncode == 0 else None


def test_whole_installation_sigkilled_four_times_every_case_completes_once(embedded, tmp_path):
    """The embedded default killed whole at upload, at submit, with engines running and at
    download, then started again: with the shipped lease (600 s) every case goes on within
    a minute of each restart, completes once, and each beam runs once."""
    upload_flag, submit_flag, download_flag = (tmp_path / f"stop-{p}" for p in ("upload", "submit", "download"))
    upload_flag.touch()
    env = {"MQI_FAULT_INJECT": f"upload_sent:{upload_flag},after_submit:{submit_flag},download_part:{download_flag}",
           "MQI_FAULT_ACTION": "stop"}
    run = embedded(env, engine={"command": ENGINE, "gpu_ids": [0, 1]})
    ids = ("crash0", "crash1")
    for name in ids:
        make_case(run.inbox, name, marker=True, rows_per_layer=2)
    moments = []
    recovery = Recovery(ids, lambda c: (case_state(run, c) or {}).get("events", []),
                        lambda c: (case_state(run, c) or {}).get("status"))

    def crash_and_restart(moment: str) -> Embedded:
        moments.append((moment, kill_installation(run.config)))
        started = Embedded(tmp_path, run.config, env).start()
        recovery.fault_ended(f"killed whole {moment}")
        poll_until(lambda: len(installation_pids(run.config)) >= 3, 60, what="mqi run and its two workers")
        return started

    # 1. Upload: a transfer task froze between sending the files and verifying them.
    poll_until(lambda: not upload_flag.exists() and installation_pids(run.config, state="T"), 120,
               what="an upload to reach the fault point")
    submit_flag.touch()
    run = crash_and_restart("at upload")
    # 2. Submit: a beam's run started, the database not yet told.
    poll_until(lambda: not submit_flag.exists() and installation_pids(run.config, state="T"), 120,
               what="a submit to reach the fault point")
    run = crash_and_restart("at submit")
    # 3. Engines running (they belong to the host, and outlive the pipeline's crash).
    poll_until(lambda: (c := case_state(run, "crash0")) and any(j["status"] == "RUNNING" for j in c["jobs"]),
               120, what="an engine of crash0 running")
    download_flag.touch()
    run = crash_and_restart("with engines running")
    # 4. Download: a results file half fetched.
    poll_until(lambda: not download_flag.exists() and installation_pids(run.config, state="T"), 180,
               what="a download to reach the fault point")
    run = crash_and_restart("at download")
    try:
        cases = [run.wait_case(c, timeout=240) for c in ids]
    finally:
        run.stop()
    figures = recovery.assert_bounded()
    for case in cases:
        assert case["status"] == "COMPLETED", case["error"]
        commands = [e["command"] for e in case["events"]]
        assert commands.count("case_completed") == 1
        # One engine run per beam: the crashed pipeline adopted the runs, never started twice.
        started = [e["payload"]["beam"] for e in case["events"] if e["command"] == "execution_started"]
        assert sorted(started) == [2, 3, 4], started
        assert "case_reconciled" in commands or case["case_id"] == "crash1"
        for job in case["jobs"]:
            [(name, digest)] = job["results"].items()
            assert hashlib.sha256((tmp_path / "results" / case["case_id"] / name).read_bytes()).hexdigest() == digest
    assert [m for m, _ in moments] == ["at upload", "at submit", "with engines running", "at download"]
    assert all(n >= 3 for _, n in moments)  # mqi run and its two workers, at least
    assert not list((tmp_path / "results").glob("*/.*.part"))
    print(f"FAULT-REPORT {json.dumps({'test': 'embedded-crashes', 'moments': moments, 'recovery': figures})}")


def test_a_result_whose_hash_does_not_verify_fails_its_beam(embedded, tmp_path):
    flag = tmp_path / "stop-verify"
    flag.touch()
    run = embedded({"MQI_FAULT_INJECT": f"before_verify:{flag}", "MQI_FAULT_ACTION": "stop"})
    make_case(run.inbox, "tampered", marker=True, rows_per_layer=2)
    [frozen] = poll_until(lambda: not flag.exists() and installation_pids(run.config, state="T"), 120,
                          what="verification to reach the fault point")
    dose = sorted((tmp_path / "results" / "tampered").glob("*.dcm"))[0]
    with open(dose, "ab") as f:  # the file changes on disk after its hash was recorded
        f.write(b"\0")
    os.kill(frozen, signal.SIGCONT)
    case = run.wait_case("tampered", timeout=60)
    assert case["status"] == "FAILED"
    failed = [j for j in case["jobs"] if j["status"] == "FAILED"]
    assert len(failed) == 1 and "SHA-256 mismatch" in failed[0]["error"] and dose.name in failed[0]["error"]
    assert all(j["results"] for j in case["jobs"] if j["status"] == "COMPLETED")
