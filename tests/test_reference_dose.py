"""Planned doses in a case folder are checked at validation (before anything is uploaded),
and the same comparison is a command: ``mqi qa compare`` on the real MOQUI output and copies
of it, saying what it assumed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from mqi_celery import demo_engine
from mqi_celery.case_reader import read_case
from mqi_celery.cli import app
from mqi_celery.errors import ValidationError
from tests.casegen import make_case
from tests.qa_refs import write_reference

MOQUI = Path(__file__).with_name("fixtures") / "moqui" / "1S070_2_Dose.dcm"


def _plan(case: Path) -> Path:
    return next(case.glob("RP*.dcm"))


def test_per_beam_and_plan_doses_are_found_and_left_out_of_the_upload(tmp_path):
    case = make_case(tmp_path, "c")
    write_reference(case, _plan(case), 2)
    ds = pydicom.dcmread(write_reference(case, _plan(case), 3, name="RD.sum.dcm"))
    ds.DoseSummationType = "PLAN"
    ds.save_as(case / "RD.sum.dcm")
    info = read_case(case)
    assert [(r.file, r.beam) for r in info.references] == [("RD.beam2.dcm", 2), ("RD.sum.dcm", None)]


@pytest.mark.parametrize("change,said", [
    (lambda ds: setattr(ds.ReferencedRTPlanSequence[0], "ReferencedSOPInstanceUID", "1.2.3"),
     "RD.beam2.dcm is the dose of another RT plan"),
    (lambda ds: setattr(ds, "StudyInstanceUID", "1.2.3.4"), "RD.beam2.dcm is of another study than the RT plan"),
    (lambda ds: setattr(ds, "PatientID", "SOMEONE-ELSE"), "RD.beam2.dcm is of another patient than the RT plan"),
    (lambda ds: setattr(ds.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence[0].ReferencedBeamSequence[0],
                        "ReferencedBeamNumber", 9), "RD.beam2.dcm is the planned dose of beam 9, which is not in "
                                                    "this case (beams 2, 3, 4)"),
    (lambda ds: setattr(ds, "Modality", "RTPLAN"), "RD.beam2.dcm is RTPLAN, not an RTDOSE"),
    (lambda ds: delattr(ds, "ImagePositionPatient"), "RD.beam2.dcm has no ImagePositionPatient"),
])
def test_a_planned_dose_that_is_not_this_case_s_fails_validation_naming_the_file(tmp_path, change, said):
    case = make_case(tmp_path, "c")
    path = write_reference(case, _plan(case), 2)
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)
    with pytest.raises(ValidationError, match=said.replace("(", r"\(").replace(")", r"\)")):
        read_case(case)
    assert "ANONYMIZED" not in said  # the patient is compared, never named


def test_a_reference_can_be_required(tmp_path):
    case = make_case(tmp_path, "c")
    assert read_case(case).references == ()
    with pytest.raises(ValidationError, match=r"no planned dose \(RD\*\.dcm\) in the case folder"):
        read_case(case, require_reference=True)


def test_the_demo_engine_dose_follows_the_delivered_log_and_writes_planned_doses(tmp_path):
    case = make_case(tmp_path, "c")
    plan = pydicom.dcmread(_plan(case))
    beam = next(b for b in plan.IonBeamSequence if int(b.BeamNumber) == 2)
    folder = case / "2025042401440800"
    assert demo_engine.delivered_fraction(beam, folder) == 1.0
    cut = tmp_path / "cut_short"
    cut.mkdir()
    rows = (folder / "PlanRange.txt").read_text().splitlines()
    (cut / "PlanRange.txt").write_text("\n".join(rows[:18]) + "\n")  # 17 of 34 layers delivered
    assert demo_engine.delivered_fraction(beam, cut) == pytest.approx(0.5)
    assert demo_engine.dose_plane(2, 0.5).max() == pytest.approx(demo_engine.dose_plane(2).max() / 2)
    assert demo_engine.main(["--planned-dose", str(case)]) == 0
    written = sorted(p.name for p in case.glob("RD.*.dcm"))
    assert written == ["RD.2.dcm", "RD.3.dcm", "RD.4.dcm"]
    assert [(r.file, r.beam) for r in read_case(case).references] == [("RD.2.dcm", 2), ("RD.3.dcm", 3),
                                                                      ("RD.4.dcm", 4)]


def _moqui_copy(tmp_path: Path, name: str, *, scale: float = 1.0, shift_x: float = 0.0) -> Path:
    """The real MOQUI file, its values scaled (16-bit, clipped as MOQUI would) or moved along x."""
    ds = pydicom.dcmread(MOQUI)
    values = np.frombuffer(ds.PixelData, "<u2").astype(float) * scale
    ds.PixelData = np.clip(np.rint(values), 0, 65535).astype("<u2").tobytes()
    position = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [position[0] + shift_x, *position[1:]]
    ds.save_as(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("change,verdict,low,high", [
    ({}, "PASS", 100.0, 100.0), ({"scale": 1.02}, "PASS", 99.9, 100.0), ({"scale": 1.05}, "PASS", 99.0, 100.0),
    ({"shift_x": 1.0}, "PASS", 99.0, 100.0), ({"shift_x": 4.0}, "FAIL", 40.0, 70.0)])
def test_mqi_qa_compare_on_the_real_moqui_output_and_copies_of_it(tmp_path, change, verdict, low, high):
    copy = _moqui_copy(tmp_path, "copy.dcm", **change)
    result = CliRunner().invoke(app, ["qa", "compare", str(MOQUI), str(copy), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["verdict"] == verdict and low <= out["pass_rate"] <= high
    said = " ".join(out["notes"])
    for assumption in ("relative dose", "declares 1 frame(s) but the pixel data holds 3", "16-bit maximum",
                       "no GridFrameOffsetVector", "not judged"):
        assert assumption in said


def test_mqi_qa_compare_with_other_criteria_and_a_file_it_cannot_read(tmp_path):
    copy = _moqui_copy(tmp_path, "copy.dcm", shift_x=4.0)
    strict = json.loads(CliRunner().invoke(app, ["qa", "compare", str(MOQUI), str(copy), "--json"]).output)
    loose = json.loads(CliRunner().invoke(app, ["qa", "compare", str(MOQUI), str(copy), "--criteria", "3%/5mm",
                                                "--json"]).output)
    assert loose["criteria"]["distance_mm"] == 5.0 and loose["pass_rate"] > strict["pass_rate"]
    bad = CliRunner().invoke(app, ["qa", "compare", str(MOQUI), str(copy), "--criteria", "3 percent"])
    assert bad.exit_code == 2 and "DOSE%/DISTANCEmm" in bad.output
    (tmp_path / "notes.dcm").write_text("not DICOM")
    unread = CliRunner().invoke(app, ["qa", "compare", str(MOQUI), str(tmp_path / "notes.dcm")])
    assert unread.exit_code == 1 and "notes.dcm is not readable DICOM" in unread.output


def test_the_qa_record_of_the_real_moqui_output_states_what_was_assumed(ctx, tmp_path):
    import subprocess

    from mqi_celery import qa_report
    from mqi_celery.dose_compare import compare
    from mqi_celery.dose_grid import read_dose
    from mqi_celery.models import Case, CaseStatus

    result = compare(read_dose(MOQUI), read_dose(_moqui_copy(tmp_path, "copy.dcm", scale=1.05)))
    summary = result.summary()
    case = Case(case_id="moqui_1S070", path=str(tmp_path / "gone"), status=CaseStatus.COMPLETED,
                verdict=result.verdict, qa={"verdict": result.verdict, "criteria": summary["criteria"],
                                            "beams": [{"beam": 2, "beam_name": "1S070", **summary}], "notes": []})
    pdf = qa_report.write(ctx, case, {2: result}, tmp_path / "report.pdf")
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    flat = " ".join(text.split())
    for said in ("no dose scaling", "relative dose", "pixel data holds 3", "16-bit maximum", "the RT plan could not "
                 "be read", "PASS"):
        assert said in flat, said
