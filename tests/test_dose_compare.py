"""The gamma wiring against cases with a known answer (a ramp shifted along one axis, a
uniform field scaled), the files' geometry read from their headers, and the real MOQUI
output with its quirks."""
from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_celery.demo_engine import build_rtdose
from mqi_celery.dose_compare import FAIL, PASS, REVIEW, Criteria, compare, worst
from mqi_celery.dose_grid import DoseFileError, DoseGrid, read_dose
from tests.casegen import REAL_CASE
from tests.qa_refs import independent_pass_rate, write_reference

MOQUI = Path(__file__).with_name("fixtures") / "moqui" / "1S070_2_Dose.dcm"
PLAN = next(REAL_CASE.glob("RP*.dcm"))


def plane(dose: np.ndarray, spacing: float = 1.0) -> DoseGrid:
    y = spacing * np.arange(dose.shape[0], dtype=float)
    x = spacing * np.arange(dose.shape[1], dtype=float)
    return DoseGrid(dose[None].astype(float), np.zeros(1), y, x, True, np.zeros((1, *dose.shape), bool), [], "synthetic")


def ramp_field(along: str, gradient: float = 5.0, size: int = 80) -> np.ndarray:
    """100 % plateau with a linear ramp of ``gradient`` %/mm across the middle, along x or y."""
    coord = np.arange(size, dtype=float)
    profile = np.clip(20 + gradient * (coord - 30), 20, 100)
    return np.tile(profile, (size, 1)) if along == "x" else np.tile(profile[:, None], (1, size))


def analytic_ramp_gamma(shift: float, gradient: float, dose: float = 3.0, distance: float = 2.0) -> float:
    """Global gamma on a linear ramp shifted by ``shift`` mm: δ·G / sqrt(ΔD² + (G·DTA)²)."""
    return shift * gradient / math.sqrt(dose ** 2 + (gradient * distance) ** 2)


@pytest.mark.parametrize("shift,along", [(2.0, "x"), (3.0, "x"), (3.0, "y")])
def test_a_shifted_ramp_has_the_analytic_gamma_on_the_ramp(shift, along):
    field = ramp_field(along)
    ref = plane(field)
    moved = replace(ref, x=ref.x + shift) if along == "x" else replace(ref, y=ref.y + shift)
    result = compare(ref, moved, Criteria(max_gamma=3))
    gamma = result.planes["gamma"]
    ramp = (slice(10, 70), slice(40, 44)) if along == "x" else (slice(40, 44), slice(10, 70))
    expected = analytic_ramp_gamma(shift, 5.0)
    assert np.nanmedian(gamma[ramp]) == pytest.approx(expected, abs=0.03)
    # Moved across the ramp instead: the dose does not change that way, gamma is 0.
    across = replace(ref, y=ref.y + shift) if along == "x" else replace(ref, x=ref.x + shift)
    assert np.nanmax(compare(ref, across, Criteria()).planes["gamma"][ramp]) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("scale,rate,verdict", [(1.02, (100.0, 100.0), PASS), (1.04, (5.0, 15.0), FAIL)])
def test_a_uniform_scale_error_is_its_dose_difference_over_the_criterion(scale, rate, verdict):
    field = np.zeros((60, 60))
    field[10:50, 10:50] = 100.0
    ref = plane(field)
    result = compare(ref, replace(ref, dose=ref.dose * scale))
    # Inside, gamma is ΔD/3 %; on the field's edge the recomputed step passes through the
    # reference dose within 1 mm (the edge ring: 156 of 1,600 points).
    assert rate[0] <= result.pass_rate <= rate[1] and result.verdict == verdict
    inner = result.planes["gamma"][14:46, 14:46]
    assert np.nanmax(np.abs(inner - (scale - 1) * 100 / 3)) < 1e-6
    assert result.dose_difference["mean_percent"] == pytest.approx((scale - 1) * 100, abs=1e-6)


def test_local_gamma_judges_each_point_by_its_own_dose():
    field = np.full((80, 80), 100.0)
    field[:, :40] = 20.0  # half the field at 20 % of the maximum
    ref = plane(field)
    low_off = replace(ref, dose=ref.dose + 2.5)  # 2.5 % of the maximum: fine globally, 12.5 % of 20 % locally
    assert compare(ref, low_off, Criteria()).pass_rate == 100.0
    assert 50.0 <= compare(ref, low_off, Criteria(local=True)).pass_rate <= 55.0  # the high half, and its edge


def test_verdict_levels_and_the_worst_beam():
    assert [compare(plane(np.full((30, 30), 100.0)), plane(np.full((30, 30), 100.0 * s))).verdict
            for s in (1.0, 1.04)] == [PASS, FAIL]
    c = Criteria()
    from mqi_celery.dose_compare import verdict_of
    assert (verdict_of(95.0, c), verdict_of(94.99, c), verdict_of(90.0, c), verdict_of(89.9, c)) == (
        PASS, REVIEW, REVIEW, FAIL)
    assert worst([PASS, REVIEW, PASS]) == REVIEW and worst([PASS, FAIL, REVIEW]) == FAIL


def test_criteria_text():
    assert Criteria().with_text("2%/2mm").label == "2%/2mm global, 10% low-dose threshold"
    assert Criteria().with_text("3 % / 3 mm local").local
    with pytest.raises(ValueError, match="DOSE%/DISTANCEmm"):
        Criteria().with_text("3/2")


@pytest.mark.parametrize("beam,changes", [
    (2, {}), (2, {"scale": 1.02}), (3, {"scale": 1.05}), (2, {"shift": (1, 0, 0)}), (3, {"shift": (0, 4, 0)}),
    (4, {"spacing": 2.0, "offset": 0.5}), (4, {"flip_rows": True}), (2, {"planes": 9, "shift": (0, 0, 4)})])
def test_files_are_placed_by_their_headers_as_pymedphys_on_its_own_would(tmp_path, beam, changes):
    evaluated = tmp_path / "recomputed.dcm"
    build_rtdose(pydicom.dcmread(PLAN), beam).save_as(evaluated, enforce_file_format=True)
    reference = write_reference(tmp_path, PLAN, beam, **changes)
    result = compare(read_dose(reference), read_dose(evaluated))
    assert result.pass_rate == pytest.approx(independent_pass_rate(reference, evaluated), abs=0.5)
    if changes.get("flip_rows"):
        assert result.pass_rate == 100.0 and "runs backwards" in " ".join(result.notes)


def test_the_real_moqui_output_is_read_as_moqui_writes_it():
    grid = read_dose(MOQUI)
    assert grid.dose.shape == (3, 400, 400) and not grid.absolute
    assert list(grid.z) == pytest.approx([-19.0, -19.0 + 2 / 3, -19.0 + 4 / 3], abs=1e-4)
    assert grid.x[0] == -199.5 and grid.x[-1] == 199.5
    assert int(grid.unjudgeable.sum()) == int((grid.dose == 65535).sum()) >= 1
    text = " ".join(grid.notes)
    for said in ("declares 1 frame(s) but the pixel data holds 3", "no dose scaling (DoseGridScaling 0)",
                 "65535, the 16-bit maximum", "no GridFrameOffsetVector"):
        assert said in text


@pytest.mark.parametrize("change,verdict,low,high", [
    ({}, PASS, 100.0, 100.0), ({"scale": 1.02}, PASS, 99.9, 100.0), ({"scale": 1.05}, PASS, 99.0, 100.0),
    ({"shift": 1.0}, PASS, 99.0, 100.0), ({"shift": 4.0}, FAIL, 40.0, 70.0)])
def test_the_real_moqui_output_against_copies_of_itself(change, verdict, low, high):
    grid = read_dose(MOQUI)
    evaluated = replace(grid, dose=grid.dose * change.get("scale", 1.0), x=grid.x + change.get("shift", 0.0))
    result = compare(grid, evaluated)
    assert result.verdict == verdict and low <= result.pass_rate <= high
    assert result.left_out > 0  # the clipped point and what lies within 2 mm of it are not judged
    assert any("clipped" in note for note in result.notes)


def test_a_relative_and_an_absolute_dose_are_compared_normalised_and_say_so(tmp_path):
    evaluated = tmp_path / "recomputed.dcm"
    ds = build_rtdose(pydicom.dcmread(PLAN), 2)
    ds.save_as(evaluated, enforce_file_format=True)
    relative = tmp_path / "relative.dcm"
    ds.DoseGridScaling = "0"
    ds.save_as(relative, enforce_file_format=True)
    result = compare(read_dose(relative), read_dose(evaluated))
    assert result.pass_rate == 100.0 and any("normalised to its own" in n for n in result.notes)


def test_files_that_cannot_be_placed_are_refused_naming_them(tmp_path):
    ds = build_rtdose(pydicom.dcmread(PLAN), 2)
    ds.ImageOrientationPatient = [0.8, 0.6, 0, 0, 0, 1]
    ds.save_as(tmp_path / "oblique.dcm", enforce_file_format=True)
    with pytest.raises(DoseFileError, match="oblique.dcm: its row direction .* is oblique"):
        read_dose(tmp_path / "oblique.dcm")
    shutil.copyfile(PLAN, tmp_path / "plan.dcm")
    with pytest.raises(DoseFileError, match="plan.dcm is RTPLAN, not RTDOSE"):
        read_dose(tmp_path / "plan.dcm")


def test_the_plan_s_dose_is_compared_with_the_sum_of_the_beams_on_one_grid():
    from mqi_celery.qa_evaluator import summed

    a = plane(np.tile(np.linspace(0, 50, 40), (40, 1)))
    b = plane(np.full((40, 40), 10.0))
    coarse = plane(np.full((21, 21), 10.0), spacing=2.0)  # another grid (0…40 mm): interpolated onto the first
    total = summed([a, b, coarse])
    inner = total.dose[0, 2:37, 2:37]
    assert np.allclose(inner, a.dose[0, 2:37, 2:37] + 20.0)
    assert "sum of the 3 recomputed beams" in " ".join(total.notes)
    plan_dose = replace(a, dose=a.dose + 20.0)
    assert compare(plan_dose, total).pass_rate == 100.0
