"""Tests for the MOQUI input format and the stand-in engine ``mqi-demo-engine``."""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RTDoseStorage

from mqi_celery import demo_engine, moqui_input

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parent.parent
PLAN = next((FIXTURES / "cases/shi_log/1.2.840.113854.19.1.19271.1").glob("RP*.dcm"))
PATIENT_NAME = str(pydicom.dcmread(PLAN, stop_before_pixels=True).PatientName)


# --- moqui_input ---------------------------------------------------------------------------

def test_parse_real_moqui_input_file():
    values = moqui_input.parse((FIXTURES / "moqui_tps.in").read_text())
    assert values["GPUID"] == "0"
    assert values["RandomSeed"] == "-1932780356"
    assert values["TotalThreads"] == "-1"  # trailing "#(Integer, ...)" comment dropped
    assert values["ParentDir"] == "../../data/CSV/spotplan"
    assert values["UsingPhantomGeo"] == "true"
    assert values["PhantomPositionZ"] == "-280.0"
    assert values["ScoreToCTGrid"] == "true"  # key right after a "## ..." comment line
    assert values["OutputFormat"] == "dcm"
    assert list(values)[:3] == ["GPUID", "RandomSeed", "UseAbsolutePath"]
    assert list(values)[-1] == "OverwriteResults"
    assert len(values) == 33  # every non-blank, non-comment line


def test_parse_reports_line_without_value():
    with pytest.raises(ValueError, match=r"line 3\b.*Scorer"):
        moqui_input.parse("GPUID 0\n\nScorer   # only a comment here\n")


def test_parse_keeps_spaces_inside_values_and_ignores_crlf():
    assert moqui_input.parse("ROIName  Body Outline \r\n# x\r\n") == {"ROIName": "Body Outline"}


def test_render_parse_round_trip():
    values = {"GPUID": 1, "UseAbsolutePath": True, "OverwriteResults": False,
              "ParticlesPerHistory": 0.001, "ROIName": "Body Outline", "BeamNumbers": "2,3"}
    text = moqui_input.render(values)
    assert text.splitlines()[:3] == ["GPUID 1", "UseAbsolutePath true", "OverwriteResults false"]
    assert moqui_input.parse(text) == {
        "GPUID": "1", "UseAbsolutePath": "true", "OverwriteResults": "false",
        "ParticlesPerHistory": "0.001", "ROIName": "Body Outline", "BeamNumbers": "2,3"}


@pytest.mark.parametrize("key, value", [
    ("OutputDir", "out\nGPUID 3"), ("OutputDir", "out # x"), ("OutputDir", "out\r"),
    ("Out#Dir", "x"), ("Output\nDir", "x"), ("Output Dir", "x"), ("OutputDir", ""),
])
def test_render_refuses_unsafe_keys_and_values(key, value):
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        moqui_input.render({"GPUID": 0, key: value})


# --- demo engine ---------------------------------------------------------------------------

@pytest.fixture
def case(tmp_path):
    """A plan copy at data/plan/, an input at input/moqui_tps.in, output to out/."""
    plan_dir = tmp_path / "data" / "plan"
    plan_dir.mkdir(parents=True)
    shutil.copy(PLAN, plan_dir)
    (tmp_path / "input").mkdir()
    return tmp_path


def write_input(case: Path, **overrides) -> Path:
    # Relative paths on purpose: they must resolve against the input file, not the cwd.
    values = {"GPUID": 0, "UseAbsolutePath": False, "ParentDir": "../data", "DicomDir": "plan",
              "Scorer": "Dose", "BeamNumbers": 2, "OutputDir": "../out", "OutputFormat": "dcm"}
    values.update(overrides)
    path = case / "input" / "moqui_tps.in"
    path.write_text(moqui_input.render(values))
    return path


def run_engine(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run(
        [sys.executable, "-m", "mqi_celery.demo_engine", "--delay", "0", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def outputs(case: Path) -> list[str]:
    out = case / "out"
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def pixel_sha256(path: Path) -> str:
    return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()


def test_main_writes_rtdose_for_the_beam(case, capsys):
    assert demo_engine.main(["--delay", "0", str(write_input(case))]) == 0
    stdout = capsys.readouterr().out

    assert outputs(case) == ["1G180_TX_2_Dose.dcm"]
    ds = pydicom.dcmread(case / "out" / "1G180_TX_2_Dose.dcm")
    plan = pydicom.dcmread(PLAN, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == RTDoseStorage
    assert (ds.Modality, ds.Manufacturer, ds.Rows, ds.Columns) == ("RTDOSE", "Moqui Monte Carlo",
                                                                    400, 400)
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "BEAM")
    assert ds.StudyInstanceUID == plan.StudyInstanceUID
    assert ds.FrameOfReferenceUID == plan.FrameOfReferenceUID
    assert ds.PatientID == plan.PatientID
    plan_ref = ds.ReferencedRTPlanSequence[0]
    assert plan_ref.ReferencedSOPInstanceUID == plan.SOPInstanceUID
    beam_ref = plan_ref.ReferencedFractionGroupSequence[0].ReferencedBeamSequence[0]
    assert beam_ref.ReferencedBeamNumber == 2
    pixels = ds.pixel_array
    assert pixels.shape == (400, 400) and pixels.dtype.name == "uint16"
    assert 1.5 < pixels.max() * float(ds.DoseGridScaling) <= 2.0  # peak dose in Gy

    lines = stdout.splitlines()
    assert lines[0] == 'MOQUI demo engine: beam 2 "1G180:TX" on GPU 0'
    assert lines[1:6] == [f"Generating particles for ({k} of 5 batches)" for k in range(1, 6)]
    assert re.fullmatch(r"Total execution time: \d+ ms", lines[-1])
    assert PATIENT_NAME not in stdout and PATIENT_NAME.split("^")[0] not in stdout


def test_subprocess_several_beams_differ_and_are_deterministic(case, tmp_path):
    input_file = write_input(case, BeamNumbers="3,4", GPUID=1)
    first = run_engine("--batches", 2, input_file, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert 'beam 3 "2G225:TX" on GPU 1' in first.stdout
    assert "Generating particles for (2 of 2 batches)" in first.stdout
    assert PATIENT_NAME.split("^")[0] not in first.stdout + first.stderr
    names = ["2G225_TX_3_Dose.dcm", "3G140_TX_4_Dose.dcm"]
    assert outputs(case) == names
    hashes = [pixel_sha256(case / "out" / name) for name in names]
    assert hashes[0] != hashes[1]
    uid = pydicom.dcmread(case / "out" / names[0]).SOPInstanceUID

    (case / "out" / names[0]).unlink()
    again = run_engine(input_file, cwd=case)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [pixel_sha256(case / "out" / name) for name in names] == hashes
    assert pydicom.dcmread(case / "out" / names[0]).SOPInstanceUID != uid


def test_absolute_paths_and_scorer_in_file_name(case, tmp_path):
    input_file = write_input(case, UseAbsolutePath=True, ParentDir="/nonexistent",
                             DicomDir=case / "data" / "plan", OutputDir=tmp_path / "abs_out",
                             Scorer="LETd")
    assert demo_engine.main(["--delay", "0", str(input_file)]) == 0
    assert [p.name for p in (tmp_path / "abs_out").iterdir()] == ["1G180_TX_2_LETd.dcm"]


@pytest.mark.parametrize("mode, code, text", [
    ("exit", 3, "ERROR: simulated failure"),
    ("segfault", 139, "Segmentation fault (core dumped)"),
    ("no-output", 0, "Total execution time:"),
])
def test_failure_modes(case, mode, code, text):
    result = run_engine("--fail", mode, write_input(case), cwd=case)
    assert result.returncode == code
    assert text in result.stdout
    assert "Generating particles for (1 of 5 batches)" in result.stdout
    assert outputs(case) == []


def test_fail_beams_limits_failure_to_listed_beams(case):
    input_file = write_input(case, BeamNumbers="2,3,4")
    result = run_engine("--fail", "no-output", "--fail-beams", "3", input_file, cwd=case)
    assert result.returncode == 0
    assert outputs(case) == ["1G180_TX_2_Dose.dcm", "3G140_TX_4_Dose.dcm"]

    shutil.rmtree(case / "out")
    result = run_engine("--fail", "exit", "--fail-beams", "3,4", input_file, cwd=case)
    assert result.returncode == 3 and "ERROR: simulated failure" in result.stdout
    assert outputs(case) == ["1G180_TX_2_Dose.dcm"]  # beam 2 finished before beam 3 failed


def test_fail_if_exists_fails_only_while_marker_exists(case):
    marker = case / "fail.marker"
    marker.touch()
    input_file = write_input(case)
    args = ("--fail", "segfault", "--fail-if-exists", marker, input_file)
    assert run_engine(*args, cwd=case).returncode == 139
    assert outputs(case) == []
    marker.unlink()
    retry = run_engine(*args, cwd=case)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert outputs(case) == ["1G180_TX_2_Dose.dcm"]


def test_beam_not_in_plan(case, capsys):
    assert demo_engine.main(["--delay", "0", str(write_input(case, BeamNumbers="2,9"))]) == 1
    assert "ERROR: beam 9 not found in plan" in capsys.readouterr().out
    assert outputs(case) == []


def test_unsupported_output_format(case, capsys):
    assert demo_engine.main([str(write_input(case, OutputFormat="mhd"))]) == 2
    assert "ERROR: OutputFormat mhd not supported" in capsys.readouterr().out


def test_missing_input_file_is_fatal(tmp_path):
    result = run_engine(tmp_path / "nope.in", cwd=tmp_path)
    assert result.returncode == 1
    assert "FATAL ERROR" in result.stderr


def test_unreadable_plan_is_fatal(case, capsys):
    next((case / "data" / "plan").glob("RP*.dcm")).write_bytes(b"not a DICOM file")
    assert demo_engine.main([str(write_input(case))]) == 1
    assert "FATAL ERROR" in capsys.readouterr().err
    assert outputs(case) == []


def test_hang_keeps_running_until_killed(case):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqi_celery.demo_engine", "--fail", "hang", str(write_input(case))],
        cwd=case, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        seen = []
        while not any(line.startswith("Generating particles") for line in seen):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no progress line within 30 s; got {seen}"
            try:
                seen.append(lines.get(timeout=remaining))
            except queue.Empty:
                pass
        assert proc.poll() is None, "engine exited instead of hanging"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=30)
    assert proc.returncode != 0
    assert outputs(case) == []
