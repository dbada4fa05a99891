"""QA Evaluator (queue ``qa``): each beam's recomputed dose against the planned dose.

After the results are verified, every completed beam's RTDOSE is compared (gamma,
``dose_compare``) with the planned dose the case brought (``reference_dose``): per beam, or
the plan's dose against the sum of the recomputed beams. The case's verdict is its worst
beam's; a FAIL is a clinical finding, not a processing error: the case still COMPLETES,
with verdict FAIL. The evaluation (criteria, results, assumptions) is stored on the case
with its ``qa_evaluated`` event, and the QA record (``report.pdf``) is written beside the
results. It is CPU work on a queue and worker of its own: it never delays a transfer or a
poll. Run again, it gives the same result (the files do not change), so a redelivered
task simply does it again.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import case_reader, faults, lifecycle, messages, metrics, reference_dose
from .dose_compare import NO_REFERENCE, NOT_JUDGED, Comparison, Criteria, compare, worst
from .dose_grid import DoseFileError, DoseGrid, read_dose
from .lifecycle import CaseStep, Stage
from .models import CaseStatus, JobStatus

log = logging.getLogger(__name__)


def configured_criteria(qa) -> Criteria:
    """The ``qa:`` section as gamma criteria."""
    return Criteria(dose_percent=qa.dose_percent, distance_mm=qa.distance_mm, cutoff_percent=qa.cutoff_percent,
                    local=qa.local, tolerance_percent=qa.tolerance_percent, action_percent=qa.action_percent,
                    max_gamma=qa.max_gamma, random_subset=qa.random_subset_3d)


def evaluate_case(ctx, case_id: str) -> str:
    """The pipeline's step (after verify): skipped unless the case is collecting."""
    store = ctx.store
    case = store.get_case(case_id)
    if case is None or case.stage != Stage.COLLECT or lifecycle.begin(store, case_id, CaseStep.EVALUATING) is None:
        return "skipped: case not collecting"
    faults.point("before_evaluate")
    return evaluate(ctx, case_id, configured_criteria(ctx.settings.qa), active=True) or "skipped: finalized meanwhile"


def evaluate(ctx, case_id: str, criteria: Criteria, *, active: bool) -> str | None:
    """Compare, store with its event, write the QA record; returns the verdict (None if the
    case moved on meanwhile). ``active``: in the pipeline; else a finished case evaluated again."""
    from . import qa_report

    case = ctx.store.get_case(case_id)
    results = ctx.settings.paths.results / case_id
    qa, comparisons = judge(ctx, case, results, criteria)
    verdict = qa["verdict"]
    event = messages.prepare("qa_evaluated", {"verdict": verdict, "criteria": criteria.label, "beams": {
        str(b["beam"]): {"verdict": b["verdict"], "pass_rate": b.get("pass_rate")} for b in qa["beams"]}},
        case_id=case_id)
    if lifecycle.evaluated(ctx.store, case_id, verdict, qa, [event], active=active) is None:
        return None
    for entry in qa["beams"] + ([qa["plan"]] if qa.get("plan") else []):
        if entry.get("pass_rate") is not None:
            metrics.QA_PASS_RATE.observe(entry["pass_rate"])
    metrics.QA_VERDICTS.labels(verdict=verdict).inc()
    messages.emit_recorded(ctx, [event])
    try:
        qa_report.write(ctx, ctx.store.get_case(case_id), comparisons, results / qa_report.NAME)
    except Exception:  # noqa: BLE001 - the verdict stands; the record can be written again (mqi report)
        log.exception("case %s: the QA record could not be written; `mqi report %s` writes it again", case_id, case_id)
    return verdict


def judge(ctx, case, results: Path, criteria: Criteria) -> tuple[dict, dict]:
    """The evaluation of ``case`` (stored as ``cases.qa``), and the comparisons behind it
    (by beam number, ``"plan"`` for the plan's dose) for the report."""
    case_dir = Path(case.path)
    done = [j for j in case.jobs if j.status is JobStatus.COMPLETED]
    notes: list[str] = []
    try:
        refs = _references(ctx, case, case_dir)
    except (OSError, Exception) as exc:  # noqa: BLE001 - the planned doses cannot be read now: said, not guessed
        refs, notes = {}, [f"the planned doses could not be read: {exc}"]
    comparisons: dict = {}
    beams = []
    for job in done:
        entry = {"beam": job.beam, "beam_name": job.beam_name, "evaluated": _dose_file(job.results)}
        ref = refs.get(job.beam)
        if ref is None:
            entry["verdict"] = NO_REFERENCE if None not in refs else "PLAN DOSE"
        elif entry["evaluated"] is None:
            entry.update(verdict=NOT_JUDGED, notes=["no RTDOSE among the beam's results"])
        else:
            entry["reference"] = ref
            comparisons[job.beam] = _compared(case_dir / ref, results / entry["evaluated"], criteria)
            entry.update(_summary(comparisons[job.beam]))
        beams.append(entry)
    plan = None
    if None in refs:
        plan = {"reference": refs[None], "evaluated": [b["evaluated"] for b in beams]}
        if len(done) < len(case.jobs) or any(b["evaluated"] is None for b in beams):
            plan.update(verdict=NOT_JUDGED, notes=["not every beam was recomputed: the plan's dose cannot be compared "
                                                   "with an incomplete sum"])
        else:
            comparisons["plan"] = _compared_sum(case_dir / refs[None], [results / b["evaluated"] for b in beams],
                                                criteria)
            plan.update(_summary(comparisons["plan"]))
    judged = [b["verdict"] for b in beams if b["verdict"] != "PLAN DOSE"] + ([plan["verdict"]] if plan else [])
    verdict = worst(judged) or NO_REFERENCE
    if not refs and not notes:
        notes.append("no planned dose in the case folder (RD*.dcm): nothing to compare the recomputed doses with")
    return {"verdict": verdict, "criteria": {**asdict(criteria), "label": criteria.label}, "beams": beams,
            "plan": plan, "notes": notes, "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}, \
        comparisons


def _references(ctx, case, case_dir: Path) -> dict[int | None, str]:
    """The case's planned doses, checked again (the folder is read now, not trusted from before)."""
    import pydicom

    inv = case_reader.inventory(case_dir, ctx.settings.scanner.marker)
    files = reference_dose.find(inv.top_files(), ctx.settings.qa.reference_files)
    if not files:
        return {}
    plan = pydicom.dcmread(case_dir / case_reader.plan_file(case.manifest), stop_before_pixels=True)
    return {r.beam: r.file for r in reference_dose.check(case_dir, files, plan, {j.beam for j in case.jobs})}


def _dose_file(results: dict[str, str]) -> str | None:
    return next((name for name in sorted(results) if name.lower().endswith(".dcm")), None)


def _compared(reference: Path, evaluated: Path, criteria: Criteria) -> Comparison:
    try:
        return compare(read_dose(reference), read_dose(evaluated), criteria)
    except DoseFileError as exc:
        return Comparison(NOT_JUDGED, criteria, notes=[str(exc)])


def _compared_sum(reference: Path, evaluated: list[Path], criteria: Criteria) -> Comparison:
    try:
        grids = [read_dose(p) for p in evaluated]
        return compare(read_dose(reference), summed(grids), criteria)
    except DoseFileError as exc:
        return Comparison(NOT_JUDGED, criteria, notes=[str(exc)])


def summed(grids: list[DoseGrid]) -> DoseGrid:
    """The beams' doses added on the first one's grid (the others interpolated onto it)."""
    from scipy.interpolate import RegularGridInterpolator

    first = grids[0]
    total, clipped = first.dose.copy(), first.unjudgeable.copy()
    for grid in grids[1:]:
        if grid.dose.shape == first.dose.shape and all(np.allclose(a, b) for a, b in zip(grid.axes, first.axes)):
            total += grid.dose
            clipped |= grid.unjudgeable
            continue
        axes = [a for a in grid.axes if a.size > 1]
        values = grid.dose.reshape([a.size for a in grid.axes if a.size > 1])
        onto = np.stack(np.meshgrid(*[a for a, g in zip(first.axes, grid.axes) if g.size > 1], indexing="ij"), -1)
        total += RegularGridInterpolator(axes, values, bounds_error=False, fill_value=0.0)(onto).reshape(total.shape)
    notes = list(dict.fromkeys(n for g in grids for n in g.notes))
    absolute = all(g.absolute for g in grids)
    return replace(first, dose=total, unjudgeable=clipped, absolute=absolute, name=f"the sum of {len(grids)} beams",
                   notes=notes + [f"the plan's dose compared with the sum of the {len(grids)} recomputed beams"])


def _summary(result: Comparison) -> dict:
    s = result.summary()
    return {k: s[k] for k in ("verdict", "pass_rate", "gamma_mean", "gamma_p95", "points", "left_out",
                              "dose_difference", "geometry", "notes")}


def evaluate_again(ctx, case_id: str, criteria: Criteria) -> str:
    """A COMPLETED case judged again with other criteria, without recomputing its dose."""
    from .errors import MQIError

    case = ctx.store.get_case(case_id)
    if case is None:
        raise KeyError(case_id)
    if case.status is not CaseStatus.COMPLETED:
        raise MQIError(f"case {case_id} is {case.status.value}; only a COMPLETED case can be evaluated again")
    verdict = evaluate(ctx, case_id, criteria, active=False)
    if verdict is None:
        raise MQIError(f"case {case_id} changed while it was evaluated; try again")
    return verdict
