"""``mqi cases`` and the live view of ``mqi run``: cases and inbox problems for people
(rich tables) and for tools (JSON dicts)."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table

from .models import Case
from .terminal import data


def case_dict(case: Case, *, events: list | None = None, with_jobs: bool = True) -> dict:
    d = {"case_id": case.case_id, "path": case.path, "status": case.status.value, "step": case.step,
         "error": case.error, "waiting_for": case.wait_reason, "stage": case.stage, "verdict": case.verdict,
         "attempts": case.attempts, "correlation_id": case.trace_id,
         "created_at": case.created_at.isoformat() + "Z" if case.created_at else None,
         "updated_at": case.updated_at.isoformat() + "Z" if case.updated_at else None}
    if with_jobs:
        d["jobs"] = [{"beam": j.beam, "beam_name": j.beam_name, "status": j.status.value, "step": j.step,
                      "error": j.error, "scheduler": j.scheduler, "remote_id": j.remote_id, "gpu": j.gpu_id,
                      "exit_code": j.exit_code, "results": j.results} for j in case.jobs]
        d["qa"] = case.qa
    if events is not None:
        d["events"] = events
    return d


# A FAIL is a clinical finding: it stands out wherever a case is shown.
VERDICT_STYLE = {"PASS": "green", "REVIEW": "bold yellow", "FAIL": "bold white on red"}


def verdict_cell(case: Case):
    qa = case.qa or {}
    rates = [b["pass_rate"] for b in qa.get("beams", []) if b.get("pass_rate") is not None]
    shown = case.verdict or ""
    if rates:
        shown += f" (min {min(rates):.1f} %)"
    return data(shown, style=VERDICT_STYLE.get(case.verdict or "", "white"))


def cases_table(cases: list[Case], total: dict[str, int] | None = None) -> Table:
    title = f"{len(cases)} case(s)"
    if total and sum(total.values()) > len(cases):
        title += f" of {sum(total.values())} (" + ", ".join(f"{n} {s}" for s, n in sorted(total.items())) + \
            "); --all or --status/--since/--limit for others"
    table = Table(title=title, expand=True)
    for col in ("case", "status", "step", "beams", "QA verdict", "error"):
        table.add_column(col, overflow="fold")
    colors = {"COMPLETED": "green", "FAILED": "red", "PROCESSING": "cyan", "QUEUED": "yellow"}
    for c in cases:
        beams = " ".join(f"{j.beam}:{j.status.value[0]}" for j in c.jobs)
        color = colors.get(c.status.value, "white")
        table.add_row(data(c.case_id), data(c.status.value, style=color), data(c.step), beams, verdict_cell(c),
                      data(c.error or (f"waiting: {c.wait_reason}" if c.wait_reason else "")))
    return table


def inbox_table(problems: list[dict]) -> Table:
    table = Table(title=f"{len(problems)} inbox entr{'y' if len(problems) == 1 else 'ies'} not registered as a case",
                  expand=True, title_style="yellow")
    table.add_column("entry (in the inbox)", overflow="fold")
    table.add_column("why, and what to do", overflow="fold")
    for p in problems:
        table.add_row(data(p["entry"]), data(p["reason"]))
    return table


def overview(store) -> Group:
    """Cases, then what the inbox holds that is not a case (if anything)."""
    problems = store.inbox_problem_rows()
    return Group(cases_table(store.recent_cases(limit=20), total=store.count_by_status()[0]),
                 *([inbox_table(problems)] if problems else []))
