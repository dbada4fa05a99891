"""The physicist's QA commands: ``mqi qa compare`` (any two dose files), ``mqi cases
evaluate`` (a completed case again, other criteria) and ``mqi report`` (its PDF again)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import context
from .cli_common import JsonOpt, _fail, _settings, app, cases_app, console
from .terminal import data

qa_app = typer.Typer(help="Dose comparison (gamma analysis), as the pipeline runs it.", no_args_is_help=True)
app.add_typer(qa_app, name="qa")

CriteriaOpt = typer.Option(None, "--criteria", help="DOSE%/DISTANCEmm, e.g. 2%/2mm (default: the qa: section).")
LocalOpt = typer.Option(None, "--local/--global", help="Local or global gamma (default: the qa: section).")


def criteria_from(text: str | None, local: bool | None, cutoff: float | None = None):
    """The configured criteria (``qa:``), with what the command line changes."""
    from dataclasses import replace

    from .qa_evaluator import configured_criteria

    try:
        criteria = configured_criteria(_settings().qa).with_text(text)
    except ValueError as exc:
        _fail(str(exc), 2)
    if local is not None:
        criteria = replace(criteria, local=local)
    if cutoff is not None:
        criteria = replace(criteria, cutoff_percent=cutoff)
    return criteria


def comparison_table(title: str, rows: list[tuple[str, object]]) -> Table:
    from .case_view import VERDICT_STYLE

    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in rows:
        table.add_row(key, data(value, style=VERDICT_STYLE.get(str(value), "") if key == "verdict" else ""))
    return table


@qa_app.command("compare")
def qa_compare(reference: Path = typer.Argument(..., exists=True, dir_okay=False, help="The reference (planned) RTDOSE."),
               evaluated: Path = typer.Argument(..., exists=True, dir_okay=False, help="The RTDOSE to judge."),
               criteria: Optional[str] = CriteriaOpt, local: Optional[bool] = LocalOpt,
               cutoff: Optional[float] = typer.Option(None, "--cutoff", help="Low-dose threshold, % of the "
                                                      "reference maximum."),
               as_json: bool = JsonOpt):
    """Gamma of EVALUATED against REFERENCE, with the pipeline's own code: the pass rate, mean
    and 95th-percentile gamma, the dose difference where the dose is high, the verdict, and
    what was assumed about each file."""
    from .dose_compare import compare
    from .dose_grid import DoseFileError, read_dose

    chosen = criteria_from(criteria, local, cutoff)
    try:
        result = compare(read_dose(reference), read_dose(evaluated), chosen)
    except DoseFileError as exc:
        _fail(str(exc))
    summary = result.summary()
    if as_json:
        print(json.dumps({"reference": str(reference), "evaluated": str(evaluated), **summary}, indent=2))
        return
    console.print(comparison_table(f"{evaluated.name} against {reference.name}", result_rows(summary)))
    for note in summary["notes"]:
        console.print(data(f"note: {note}"))


def result_rows(summary: dict) -> list[tuple[str, object]]:
    diff = summary.get("dose_difference") or {}
    rows = [("verdict", summary["verdict"]), ("criteria", summary["criteria"]["label"]),
            ("geometry", summary["geometry"])]
    if summary.get("pass_rate") is not None:
        rows += [("passing (γ ≤ 1)", f"{summary['pass_rate']:.2f} % of {summary['points']} points"),
                 ("γ mean / 95th percentile", f"{summary['gamma_mean']:.3f} / {summary['gamma_p95']:.3f}")]
    if diff:
        rows.append((f"dose difference ({diff['region']})", f"mean {diff['mean_percent']:+.2f} %, "
                     f"sd {diff['sd_percent']:.2f} %, max |Δ| {diff['max_abs_percent']:.2f} %"))
    if summary.get("left_out"):
        rows.append(("not judged", f"{summary['left_out']} points near a clipped value"))
    return rows


@cases_app.command("evaluate")
def cases_evaluate(case_id: str, criteria: Optional[str] = CriteriaOpt, local: Optional[bool] = LocalOpt,
                   as_json: bool = JsonOpt):
    """Judge a COMPLETED case again with other criteria (its doses are not recomputed); the
    new evaluation replaces the stored one, and its report.pdf is written again."""
    from .errors import MQIError
    from .qa_evaluator import evaluate_again

    chosen = criteria_from(criteria, local)
    ctx = context.current()
    try:
        verdict = evaluate_again(ctx, case_id, chosen)
    except KeyError:
        _fail(f"no case {case_id}; `mqi cases list --all` lists them")
    except MQIError as exc:
        _fail(str(exc))
    case = ctx.store.get_case(case_id)
    if as_json:
        print(json.dumps({"case_id": case_id, "verdict": verdict, "qa": case.qa}, indent=2))
        return
    for beam in case.qa["beams"] + ([case.qa["plan"]] if case.qa.get("plan") else []):
        console.print(comparison_table(f"case {case_id}, beam {beam.get('beam', 'plan')}", result_rows(beam | {
            "criteria": case.qa["criteria"]})))
    console.print(data(f"case {case_id}: {verdict} at {chosen.label}"))


@app.command("report")
def report(case_id: str):
    """Write a case's QA record (report.pdf beside its results) again, from its stored criteria."""
    from .dose_compare import Criteria
    from .qa_evaluator import judge
    from .qa_report import NAME, write

    ctx = context.current()
    case = ctx.store.get_case(case_id)
    if case is None:
        _fail(f"no case {case_id}; `mqi cases list --all` lists them")
    if not case.qa:
        _fail(f"case {case_id} has not been evaluated (it is {case.status.value}); nothing to report yet")
    stored = {k: v for k, v in case.qa["criteria"].items() if k != "label"}
    results = _settings().paths.results / case_id
    _, comparisons = judge(ctx, case, results, Criteria(**stored))
    console.print(data(f"wrote {write(ctx, case, comparisons, results / NAME)}"))
