"""The QA record of a case, ``report.pdf`` beside ``report.json``: the page a physicist signs.

Page one names the patient, plan and delivery, the criteria and each beam's verdict; then a
page per comparison (the reference plane, the recomputed plane, the gamma map with its
colour scale turning at 1, a dose profile through the maximum along each axis, the pass
rate, the verdict and what was assumed); the last page is the audit trail (engine command,
host and its key fingerprint, job ids, SHA-256 of every input and result, software
version). Patient identifiers belong here (this is the clinical record), never in logs.
Text from the case is drawn as text, never as markup (no mathtext).
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

NAME = "report.pdf"
A4 = (8.27, 11.69)


def software_version() -> str:
    try:
        return f"mqi-celery {version('mqi-celery')}"
    except PackageNotFoundError:
        return "mqi-celery (not installed)"


def write(ctx, case, comparisons: dict, target: Path) -> Path:
    """Write the record atomically (a reader never sees half a PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_pdf import PdfPages

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    identity = _identity(case)
    with PdfPages(partial, metadata={"Title": f"QA record of case {case.case_id}", "Creator": software_version()}) as pdf:
        pdf.savefig(_summary_page(case, identity), dpi=100)
        for key, result in comparisons.items():
            if result.planes is not None:
                pdf.savefig(_beam_page(case, key, result, identity), dpi=100)
        pdf.savefig(_audit_page(ctx, case), dpi=100)
    partial.replace(target)
    return target


def _figure():
    import matplotlib.pyplot as plt

    plt.close("all")
    return plt.figure(figsize=A4)


def _text(fig, x: float, y: float, value, **kw):
    """Case text is data: drawn as it is (no mathtext), whatever it holds."""
    return fig.text(x, y, str(value), parse_math=False, **kw)


def _identity(case) -> dict[str, str]:
    """Patient, plan and delivery identifiers, from the plan (read now; '?' where absent)."""
    import pydicom

    from .case_reader import plan_file

    out = {"patient": "?", "patient_id": "?", "plan": "?", "plan_date": "?", "delivered": "?"}
    try:
        plan = pydicom.dcmread(Path(case.path) / plan_file(case.manifest), stop_before_pixels=True)
        out.update(patient=str(plan.get("PatientName", "") or "?"), patient_id=str(plan.get("PatientID", "") or "?"),
                   plan=str(plan.get("RTPlanLabel", "") or plan.get("RTPlanName", "") or "?"),
                   plan_date=str(plan.get("RTPlanDate", "") or "?"))
    except Exception:  # noqa: BLE001 - the record is still written, saying what it could not read
        out["plan"] = "the RT plan could not be read when this record was written"
    stamps = sorted(j.delivery_dir for j in case.jobs if re.fullmatch(r"\d{14,16}", j.delivery_dir or ""))
    if stamps:
        out["delivered"] = datetime.strptime(stamps[0][:14], "%Y%m%d%H%M%S").strftime("%Y-%m-%d %H:%M")
    return out


def _summary_page(case, who: dict):
    fig = _figure()
    qa = case.qa or {}
    _text(fig, 0.07, 0.95, "Patient-specific QA: recomputed delivered dose vs planned dose", fontsize=14,
          weight="bold")
    rows = [("Patient", f"{who['patient']} (ID {who['patient_id']})"), ("Plan", f"{who['plan']} ({who['plan_date']})"),
            ("Delivered", who["delivered"]), ("Case", case.case_id), ("Study", case.study_uid or "?"),
            ("Criteria", (qa.get("criteria") or {}).get("label", "?")),
            ("Levels", _levels(qa.get("criteria") or {})), ("Evaluated", qa.get("evaluated_at", "?")),
            ("Verdict", case.verdict or "not evaluated")]
    y = 0.9
    for key, value in rows:
        _text(fig, 0.07, y, key, fontsize=10, weight="bold")
        _text(fig, 0.25, y, value, fontsize=10, color=_colour(value) if key == "Verdict" else "black")
        y -= 0.03
    y -= 0.02
    _text(fig, 0.07, y, "Beam", fontsize=10, weight="bold")
    for x, title in ((0.3, "Verdict"), (0.5, "Passing"), (0.65, "γ mean"), (0.78, "γ 95th pct")):
        _text(fig, x, y, title, fontsize=10, weight="bold")
    for entry in qa.get("beams", []) + ([{**qa["plan"], "beam": "plan", "beam_name": "sum"}] if qa.get("plan") else []):
        y -= 0.025
        _text(fig, 0.07, y, f"{entry['beam']} {entry.get('beam_name', '')}", fontsize=9)
        _text(fig, 0.3, y, entry.get("verdict", "?"), fontsize=9, color=_colour(entry.get("verdict")))
        _text(fig, 0.5, y, _percent(entry.get("pass_rate")), fontsize=9)
        _text(fig, 0.65, y, _number(entry.get("gamma_mean")), fontsize=9)
        _text(fig, 0.78, y, _number(entry.get("gamma_p95")), fontsize=9)
    notes = list(dict.fromkeys([*qa.get("notes", []), *(n for e in qa.get("beams", []) for n in e.get("notes", []))]))
    if notes:
        y -= 0.04
        _text(fig, 0.07, y, "Assumed, and not judged", fontsize=10, weight="bold")
        for note in notes[:14]:
            for line in _wrap(note, 105):
                y -= 0.02
                _text(fig, 0.07, y, line, fontsize=7.5)
    y = min(y, 0.12) - 0.05
    _text(fig, 0.07, 0.07, "Reviewed by: ____________________    Date: ____________    Signature: ____________________",
          fontsize=10)
    return fig


def _beam_page(case, key, result, who: dict):
    from matplotlib.colors import TwoSlopeNorm

    fig = _figure()
    p = result.planes
    title = f"Beam {key}" + (f" ({_beam_name(case, key)})" if key != "plan" else " — the plan's dose vs the sum")
    _text(fig, 0.07, 0.96, f"{title}: {result.verdict}", fontsize=13, weight="bold", color=_colour(result.verdict))
    _text(fig, 0.07, 0.935, f"{who['patient']} (ID {who['patient_id']}) · plan {who['plan']} · case {case.case_id}",
          fontsize=8)
    _text(fig, 0.07, 0.915, f"{result.criteria.label} · {result.geometry} · passing {_percent(result.pass_rate)} of "
          f"{result.points} points · γ mean {_number(result.gamma_mean)}, 95th pct {_number(result.gamma_p95)}",
          fontsize=8)
    extent = [p["x"][0], p["x"][-1], p["y"][-1], p["y"][0]]
    top = float(np.nanmax(p["reference"])) or 1.0
    for i, (label, plane) in enumerate((("Reference (planned)", p["reference"]), ("Recomputed", p["evaluated"]))):
        ax = fig.add_axes([0.08 + i * 0.48, 0.58, 0.34, 0.3])
        image = ax.imshow(plane, extent=extent, cmap="viridis", vmin=0, vmax=top)
        ax.set_title(f"{label}, z = {p['z']:g} mm", fontsize=9)
        ax.set_xlabel("x (mm)", fontsize=8)
        ax.set_ylabel("y (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046).set_label("Gy" if p["absolute"] else "relative dose", fontsize=7)
    ax = fig.add_axes([0.08, 0.2, 0.34, 0.3])
    gmax = result.criteria.max_gamma
    image = ax.imshow(p["gamma"], extent=extent, cmap="RdYlGn_r", norm=TwoSlopeNorm(vmin=0, vcenter=1, vmax=gmax))
    ax.set_title("Gamma (green ≤ 1 < red; blank: not judged)", fontsize=9)
    ax.set_xlabel("x (mm)", fontsize=8)
    ax.set_ylabel("y (mm)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)
    iy, ix = np.unravel_index(np.nanargmax(p["reference"]), p["reference"].shape)
    for i, (axis, label, ref, ev) in enumerate(((p["x"], "x", p["reference"][iy], p["evaluated"][iy]),
                                                (p["y"], "y", p["reference"][:, ix], p["evaluated"][:, ix]))):
        ax = fig.add_axes([0.58, 0.38 - i * 0.18, 0.36, 0.13])
        ax.plot(axis, ref, label="reference", lw=1)
        ax.plot(axis, ev, label="recomputed", lw=1, ls="--")
        ax.set_title(f"Profile along {label} through the maximum", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    y = 0.12
    for note in result.notes[:6]:
        for line in _wrap(note, 120):
            _text(fig, 0.07, y, line, fontsize=6.5)
            y -= 0.014
    return fig


def _audit_page(ctx, case):
    fig = _figure()
    _text(fig, 0.07, 0.95, f"Audit trail of case {case.case_id}", fontsize=13, weight="bold")
    s = ctx.settings
    lines = [f"Software: {software_version()}", f"Record written: {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC",
             f"Engine command: {s.engine.command}", f"Host: {ctx.host_name} ({s.transport.kind}, scheduler "
             f"{s.scheduler.kind})"]
    if s.transport.kind == "ssh":
        lines.append(f"Host key (verified on every connection): {_trusted_key(s.transport.ssh)}")
    lines += [f"Beam {j.beam} ({j.beam_name}): job {j.remote_id or '-'} on {j.scheduler or '-'}, GPU "
              f"{j.gpu_id if j.gpu_id is not None else '-'}, {j.status.value}" for j in case.jobs]
    lines.append("Inputs (SHA-256):")
    lines += [f"  {sha}  {name}" for name, sha in sorted(case.manifest.items())][:60]
    lines.append("Results (SHA-256):")
    lines += [f"  {sha}  {name}" for j in case.jobs for name, sha in sorted(j.results.items())]
    y = 0.91
    for line in lines:
        for part in _wrap(line, 130):
            if y < 0.04:
                break
            _text(fig, 0.05, y, part, fontsize=6.5, family="monospace")
            y -= 0.0135
    return fig


def _trusted_key(ssh) -> str:
    try:
        import paramiko

        from .ssh_pool import _known_name, fingerprint

        keys = paramiko.HostKeys(str(ssh.known_hosts)).lookup(_known_name(ssh)) or {}
        return ", ".join(f"{name} {fingerprint(key)}" for name, key in keys.items()) or "none trusted"
    except Exception as exc:  # noqa: BLE001 - said, not hidden
        return f"could not be read ({type(exc).__name__})"


def _beam_name(case, beam) -> str:
    return next((j.beam_name for j in case.jobs if j.beam == beam), "")


def _levels(criteria: dict) -> str:
    if not criteria:
        return "?"
    return (f"PASS ≥ {criteria['tolerance_percent']:g} %, REVIEW ≥ {criteria['action_percent']:g} %, FAIL below "
            "(AAPM TG-218 tolerance and action levels)")


def _colour(verdict) -> str:
    return {"PASS": "green", "REVIEW": "darkorange", "FAIL": "red"}.get(str(verdict), "black")


def _percent(value) -> str:
    return "—" if value is None else f"{value:.2f} %"


def _number(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(str(text), width) or [""]
