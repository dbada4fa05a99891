"""The QA verdict through the embedded pipeline: cases whose planned doses are the stand-in
engine's own dose, identical or perturbed (tests/qa_refs.py), each beam's pass rate checked
against pymedphys run on the same two files on its own; a wrong-beam reference refused at
validation; a case without one completed with "no reference dose"; the QA record a PDF a
real reader opens."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.casegen import make_case
from tests.qa_refs import independent_pass_rate, write_reference

pytestmark = pytest.mark.processes

# case -> beam -> (the reference's perturbation, the verdict at 3 %/2 mm global)
PERTURBED = {
    "qa_pass": {2: ({}, "PASS"), 3: ({"scale": 1.02}, "PASS"), 4: ({"shift": (1, 0, 0)}, "PASS")},
    "qa_review": {2: ({"scale": 1.05}, "REVIEW"), 3: ({"shift": (0, 1, 0)}, "PASS"),
                  4: ({"spacing": 2.0, "offset": 0.5}, "PASS")},
    "qa_fail": {2: ({"shift": (4, 0, 0)}, "FAIL"), 3: ({"shift": (0, 4, 0)}, "FAIL"), 4: ({"flip_rows": True}, "PASS")},
    "qa_depth": {2: ({"planes": 9, "shift": (0, 0, 1)}, "PASS"), 3: ({"planes": 9, "shift": (0, 0, 4)}, "PASS"),
                 4: ({"planes": 9}, "PASS")},
}
CASE_VERDICT = {"qa_pass": "PASS", "qa_review": "REVIEW", "qa_fail": "FAIL", "qa_depth": "PASS"}


def test_perturbed_references_give_the_library_s_pass_rates_and_every_verdict(embedded, tmp_path):
    run = embedded()
    staging = tmp_path / "staging"
    for name, beams in PERTURBED.items():
        case = make_case(staging, name)
        plan = next(case.glob("RP*.dcm"))
        for beam, (changes, _) in beams.items():
            write_reference(case, plan, beam, **changes)
    wrong = make_case(staging, "qa_wrong_beam")
    write_reference(wrong, next(wrong.glob("RP*.dcm")), 2, of_beam=9)
    make_case(staging, "qa_none")
    for folder in sorted(staging.iterdir()):
        shutil.move(folder, run.inbox / folder.name)
        (run.inbox / folder.name / "_CASE_READY").touch()

    refused = run.wait_case("qa_wrong_beam", timeout=120)
    assert refused["status"] == "FAILED" and "RD.beam2.dcm is the planned dose of beam 9, which is not in this case" \
        in refused["error"]
    none = run.wait_case("qa_none", timeout=180)
    assert none["status"] == "COMPLETED" and none["verdict"] == "NO REFERENCE DOSE"
    seen = set()
    for name, beams in PERTURBED.items():
        case = run.wait_case(name, timeout=180)
        assert case["status"] == "COMPLETED" and case["verdict"] == CASE_VERDICT[name], case
        results = run.folder / "results" / name
        for entry in case["qa"]["beams"]:
            changes, verdict = beams[entry["beam"]]
            assert entry["verdict"] == verdict, (name, entry)
            alone = independent_pass_rate(run.inbox / name / entry["reference"], results / entry["evaluated"])
            assert entry["pass_rate"] == pytest.approx(alone, abs=0.5), (name, entry)
            seen.add(entry["verdict"])
            print(f"QA-REPORT {name} beam {entry['beam']} {changes or 'identical'}: pass rate "
                  f"{entry['pass_rate']:.2f} % (pymedphys alone {alone:.2f} %), {entry['verdict']}")
        # Never uploaded: the planned doses are the QA's, not the engine's.
        assert not list((run.folder / "remote" / name / "input").glob("RD*"))
        assert "qa_evaluated" in [e["command"] for e in case["events"]]
    assert seen == {"PASS", "REVIEW", "FAIL"}

    listed = {c["case_id"]: c for c in run.mqi_json("cases", "list")}
    assert listed["qa_fail"]["verdict"] == "FAIL" and listed["qa_review"]["verdict"] == "REVIEW"

    # The record a physicist signs: a real PDF reader renders it and finds the verdict.
    pdf = run.folder / "results" / "qa_fail" / "report.pdf"
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert "FAIL" in text and "3%/2mm global" in text and "Audit trail" in text
    subprocess.run(["pdftoppm", "-png", "-r", "60", "-f", "2", "-l", "2", str(pdf), str(tmp_path / "page")],
                   check=True)
    page = next(tmp_path.glob("page*.png"))
    assert page.stat().st_size > 20_000  # the planes, the gamma map and the profiles are drawn

    # Judged again with other criteria, without recomputing: 5 % scaled at 6 %/2 mm passes.
    again = run.mqi_json("cases", "evaluate", "qa_review", "--criteria", "6%/2mm")
    assert again["verdict"] == "PASS" and again["qa"]["criteria"]["dose_percent"] == 6.0
    assert run.mqi_json("cases", "show", "qa_review")["verdict"] == "PASS"
    refused = run.mqi("cases", "evaluate", "qa_wrong_beam")
    assert refused.returncode == 1 and "only a COMPLETED case can be evaluated again" in " ".join(refused.stdout.split())
    # The record written again from the stored criteria (6 %/2 mm now).
    written = run.folder / "results" / "qa_review" / "report.pdf"
    before = written.stat().st_mtime_ns
    assert run.mqi("report", "qa_review").returncode == 0 and written.stat().st_mtime_ns > before
    text = subprocess.run(["pdftotext", str(written), "-"], capture_output=True, text=True, check=True).stdout
    assert "6%/2mm global" in text


def test_a_worker_killed_while_it_evaluates_leaves_the_verdict_to_its_redelivery(embedded, tmp_path):
    flag = tmp_path / "kill-at-evaluate"
    flag.touch()
    run = embedded({"MQI_FAULT_INJECT": f"before_evaluate:{flag}", "MQI_FAULT_ACTION": "kill"})
    staging = make_case(tmp_path / "staging", "qa_crash")
    plan = next(staging.glob("RP*.dcm"))
    for beam in (2, 3, 4):
        write_reference(staging, plan, beam)
    shutil.move(staging, run.inbox / "qa_crash")
    (run.inbox / "qa_crash" / "_CASE_READY").touch()
    case = run.wait_case("qa_crash", timeout=300)
    assert not flag.exists()  # the worker was killed at the fault point
    assert case["status"] == "COMPLETED" and case["verdict"] == "PASS"
    commands = [e["command"] for e in case["events"]]
    assert commands.count("qa_evaluated") == 1 and commands.count("case_completed") == 1
