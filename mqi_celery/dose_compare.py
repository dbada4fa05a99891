"""Gamma analysis of a recomputed dose against a reference (planned) dose, and its verdict.

The gamma index itself is ``pymedphys.gamma`` (Apache-2.0; numba compiles its search on
first use). This module wires it: both doses in patient coordinates (``dose_grid``), a
plane compared with the reference interpolated at that plane, 3D with 3D, the global
normalisation taken from the reference's judgeable maximum, and the points a clipped value
could reach left out. Defaults are AAPM TG-218's: global 3 %/2 mm, 10 % low-dose
threshold, PASS at ≥ 95 % passing, REVIEW below it, FAIL below the action level of 90 %.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .dose_grid import DoseFileError, DoseGrid

PASS, REVIEW, FAIL = "PASS", "REVIEW", "FAIL"
NO_REFERENCE, NOT_JUDGED = "NO REFERENCE DOSE", "NOT JUDGED"
SEVERITY = {PASS: 0, NO_REFERENCE: 1, NOT_JUDGED: 2, REVIEW: 3, FAIL: 4}  # a case's verdict: its worst beam's
# pymedphys's own interpolation is compiled by numba on first use (about 1.5 s per process):
# worth it for a 3D grid, not for a plane, where scipy's (the library's other option) needs no
# compilation and a plane takes well under a second.
INTERPOLATION = {2: "scipy", 3: "pymedphys"}
HIGH_DOSE_PERCENT = 50.0  # the dose difference statistics cover reference doses at or above this share of the maximum


@dataclass(frozen=True)
class Criteria:
    dose_percent: float = 3.0
    distance_mm: float = 2.0
    cutoff_percent: float = 10.0
    local: bool = False
    tolerance_percent: float = 95.0  # passing at or above it: PASS
    action_percent: float = 90.0  # passing below it: FAIL (between the two: REVIEW)
    max_gamma: float = 2.0  # the search stops here: gammas above it read as this value
    random_subset: int | None = None  # 3D grids: evaluate this many random points (None: all)

    @property
    def label(self) -> str:
        return (f"{self.dose_percent:g}%/{self.distance_mm:g}mm {'local' if self.local else 'global'}, "
                f"{self.cutoff_percent:g}% low-dose threshold")

    def with_text(self, text: str | None) -> "Criteria":
        """``3%/2mm`` (optionally ``local``/``global`` after a comma or space) over these."""
        if not text:
            return self
        match = re.fullmatch(r"\s*([0-9.]+)\s*%\s*/\s*([0-9.]+)\s*mm\s*(?:[, ]\s*(local|global))?\s*", text, re.I)
        if not match or float(match[1]) <= 0 or float(match[2]) <= 0:
            raise ValueError(f"criteria {text!r}: write them as DOSE%/DISTANCEmm, e.g. 3%/2mm or 2%/2mm local")
        local = self.local if match[3] is None else match[3].lower() == "local"
        return replace(self, dose_percent=float(match[1]), distance_mm=float(match[2]), local=local)


@dataclass
class Comparison:
    verdict: str
    criteria: Criteria
    pass_rate: float | None = None  # percent of judged points with gamma ≤ 1
    gamma_mean: float | None = None
    gamma_p95: float | None = None
    points: int = 0  # judged points (above the low-dose threshold, not near a clipped value)
    left_out: int = 0  # points above the threshold not judged (a clipped value within reach)
    dose_difference: dict = field(default_factory=dict)
    geometry: str = ""
    notes: list[str] = field(default_factory=list)
    # For the report: the compared plane (through the reference maximum when 3D) and its gamma.
    planes: dict | None = None

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "planes"}
        out["criteria"] = {**asdict(self.criteria), "label": self.criteria.label}
        return out


def verdict_of(pass_rate: float, criteria: Criteria) -> str:
    if pass_rate >= criteria.tolerance_percent:
        return PASS
    return REVIEW if pass_rate >= criteria.action_percent else FAIL


def worst(verdicts) -> str | None:
    verdicts = list(verdicts)
    return max(verdicts, key=SEVERITY.__getitem__) if verdicts else None


def compare(reference: DoseGrid, evaluated: DoseGrid, criteria: Criteria = Criteria()) -> Comparison:
    """Gamma of ``evaluated`` against ``reference`` (evaluated at the reference's points)."""
    notes = list(dict.fromkeys([*reference.notes, *evaluated.notes]))  # a file compared with itself: said once
    ref, ev = _same_units(reference, evaluated, notes)
    ref, ev, geometry = _same_dimensions(ref, ev, notes)
    axes_ref, axes_ev = _axes(ref), _axes(ev)
    d_ref, d_ev = _squeeze(ref, ref.dose), _squeeze(ev, ev.dose)
    top = ref.valid_max()
    if top <= 0:
        return Comparison(NOT_JUDGED, criteria, geometry=geometry, notes=notes + [
            f"{reference.name}: no judgeable dose above 0: nothing to compare with"])
    gamma = _gamma(axes_ref, d_ref, axes_ev, d_ev, criteria, top)
    above = ~np.isnan(gamma)
    reach = _within_reach(ref, ev, criteria.distance_mm)
    judged = above & ~reach
    left_out = int((above & reach).sum())
    if left_out:
        notes.append(f"{left_out} point(s) above the low-dose threshold were not judged: a clipped value lies within "
                     f"{criteria.distance_mm:g} mm of them")
    if criteria.random_subset:
        notes.append(f"3D: {int(above.sum())} random points of the reference grid evaluated (random subset)")
    planes = _planes(ref, ev, gamma, judged, axes_ref, d_ref)
    if not judged.any():
        return Comparison(NOT_JUDGED, criteria, points=0, left_out=left_out, geometry=geometry, notes=notes + [
            "no point above the low-dose threshold could be judged"], planes=planes)
    values = gamma[judged]
    rate = 100.0 * float(np.mean(values <= 1))
    return Comparison(verdict_of(rate, criteria), criteria, pass_rate=round(rate, 2),
                      gamma_mean=round(float(values.mean()), 3), gamma_p95=round(float(np.percentile(values, 95)), 3),
                      points=int(judged.sum()), left_out=left_out,
                      dose_difference=_dose_difference(axes_ref, d_ref, axes_ev, d_ev, ~reach, top),
                      geometry=geometry, notes=notes, planes=planes)


def _same_units(reference: DoseGrid, evaluated: DoseGrid, notes: list[str]) -> tuple[DoseGrid, DoseGrid]:
    if reference.absolute == evaluated.absolute:
        return reference, evaluated
    notes.append("one dose is absolute (Gy), the other relative: each normalised to its own judgeable maximum "
                 "(a uniform scale error cannot be seen)")
    return _normalised(reference), _normalised(evaluated)


def _normalised(grid: DoseGrid) -> DoseGrid:
    top = grid.valid_max() or 1.0
    return replace(grid, dose=grid.dose * (100.0 / top), absolute=False)


def _same_dimensions(ref: DoseGrid, ev: DoseGrid, notes: list[str]) -> tuple[DoseGrid, DoseGrid, str]:
    """A plane is compared with the other dose interpolated at that plane."""
    if ev.planar and not ref.planar:
        return _at_plane(ref, ev.z[0]), ev, f"2D: the recomputed plane z = {ev.z[0]:g} mm, reference interpolated there"
    if ref.planar and not ev.planar:
        return ref, _at_plane(ev, ref.z[0]), f"2D: the reference plane z = {ref.z[0]:g} mm, recomputed dose interpolated there"
    if ref.planar:
        apart = abs(float(ref.z[0] - ev.z[0]))
        if apart > 0.01:
            notes.append(f"the two planes lie {apart:g} mm apart (z {ref.z[0]:g} and {ev.z[0]:g} mm): compared as planes")
        return ref, ev, f"2D: plane z = {ref.z[0]:g} mm"
    return ref, ev, f"3D: {ref.z.size} reference planes, z {ref.z[0]:g}…{ref.z[-1]:g} mm"


def _at_plane(grid: DoseGrid, z: float) -> DoseGrid:
    if not grid.z[0] - 1e-6 <= z <= grid.z[-1] + 1e-6:
        raise DoseFileError(f"the plane z = {z:g} mm lies outside {grid.name}'s planes (z {grid.z[0]:g}…{grid.z[-1]:g} mm)")
    k = int(np.clip(np.searchsorted(grid.z, z) - 1, 0, grid.z.size - 2))
    w = (z - grid.z[k]) / (grid.z[k + 1] - grid.z[k])
    dose = (1 - w) * grid.dose[k] + w * grid.dose[k + 1]
    clipped = (grid.unjudgeable[k] & (w < 1)) | (grid.unjudgeable[k + 1] & (w > 0))
    return replace(grid, dose=dose[None], z=np.array([z]), unjudgeable=clipped[None])


def _axes(grid: DoseGrid):
    return (grid.y, grid.x) if grid.planar else (grid.z, grid.y, grid.x)


def _squeeze(grid: DoseGrid, values: np.ndarray) -> np.ndarray:
    return values[0] if grid.planar else values


def _gamma(axes_ref, d_ref, axes_ev, d_ev, criteria: Criteria, top: float) -> np.ndarray:
    import pymedphys

    # pymedphys logs its progress on the root logger, some lines with values its own format
    # cannot take (a logging error each): not ours to show. The QA runs one gamma at a time
    # per process, so silencing INFO for the call hides nothing else.
    before = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # ``quiet``: the only way to silence its progress
            return pymedphys.gamma(axes_ref, d_ref, axes_ev, d_ev, criteria.dose_percent, criteria.distance_mm,
                               lower_percent_dose_cutoff=criteria.cutoff_percent, local_gamma=criteria.local,
                                   global_normalisation=top, max_gamma=criteria.max_gamma, quiet=True,
                                   random_subset=criteria.random_subset if len(axes_ref) == 3 else None,
                                   interp_algo=INTERPOLATION[len(axes_ref)])
    finally:
        logging.disable(before)


def _within_reach(ref: DoseGrid, ev: DoseGrid, distance_mm: float) -> np.ndarray:
    """Reference points within the distance criterion of a clipped value (of either dose)."""
    shape = _squeeze(ref, ref.dose).shape
    reach = np.zeros(shape, bool)
    for grid in (ref, ev):
        if not grid.unjudgeable.any():
            continue
        points = np.argwhere(_squeeze(grid, grid.unjudgeable))
        coords = [axis[points[:, i]] for i, axis in enumerate(_axes(grid))]
        ref_axes = _axes(ref)
        for where in zip(*coords):
            near = [np.abs(axis - c) <= distance_mm for axis, c in zip(ref_axes, where)]
            reach[np.ix_(*near)] = True
    return reach


def _interpolated(axes_ev, d_ev, axes_ref) -> np.ndarray:
    from scipy.interpolate import RegularGridInterpolator

    points = np.stack(np.meshgrid(*axes_ref, indexing="ij"), axis=-1)
    return RegularGridInterpolator(axes_ev, d_ev, bounds_error=False, fill_value=0.0)(points)


def _dose_difference(axes_ref, d_ref, axes_ev, d_ev, judgeable: np.ndarray, top: float) -> dict:
    """(evaluated − reference) in % of the reference maximum, where the reference is high."""
    high = (d_ref >= HIGH_DOSE_PERCENT / 100 * top) & judgeable
    if not high.any():
        return {}
    diff = 100.0 * (_interpolated(axes_ev, d_ev, axes_ref)[high] - d_ref[high]) / top
    return {"region": f"reference ≥ {HIGH_DOSE_PERCENT:g} % of its maximum", "points": int(high.sum()),
            "mean_percent": round(float(diff.mean()), 2), "sd_percent": round(float(diff.std()), 2),
            "max_abs_percent": round(float(np.abs(diff).max()), 2)}


def _planes(ref: DoseGrid, ev: DoseGrid, gamma: np.ndarray, judged: np.ndarray, axes_ref, d_ref) -> dict:
    """The plane to show: the compared plane, or in 3D the reference plane through its maximum."""
    if len(axes_ref) == 2:
        k, ref_plane, gamma_plane, shown = 0, d_ref, gamma, judged
        ev_plane = _interpolated(_axes(ev), _squeeze(ev, ev.dose), axes_ref)
        z = float(ref.z[0])
    else:
        k = int(np.unravel_index(np.argmax(np.where(ref.unjudgeable, -np.inf, ref.dose)), ref.dose.shape)[0])
        ref_plane, gamma_plane, shown = d_ref[k], gamma[k], judged[k]
        ev_plane = _interpolated(_axes(ev), ev.dose, (ref.z[k:k + 1], ref.y, ref.x))[0]
        z = float(ref.z[k])
    return {"z": z, "y": axes_ref[-2], "x": axes_ref[-1], "reference": ref_plane, "evaluated": ev_plane,
            "gamma": np.where(shown, gamma_plane, np.nan), "absolute": ref.absolute}
