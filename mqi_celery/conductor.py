"""Conductor: the per-case workflow, and the case-level commands (retry, cancel, stop).

A case's work is four stages, each recorded in the database (``cases.stage``):

    upload ─► submit (one task per beam) ─► run (the poller watches) ─► collect

Each dispatch of a stage is numbered and holds a lease; its tasks extend the lease as they
start and skip themselves once a later dispatch took over. The broker only delivers: a
lost message or a killed worker leaves an expired lease, and the reconciler dispatches the
case again from its stage (every step is idempotent: upload sends what is missing, submit
adopts the live job, download re-verifies). During "run" no message exists per case: the
poller asks the scheduler once per interval for every job and moves finished cases on.

A task that fails for good stops the case with its reason (``workers.base.PipelineTask``).
Engine failures do not: they fail their beam's job, and ``finalize`` reports the case
FAILED while keeping the results of the beams that succeeded.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pydicom

from . import case_reader, db, engine, faults, lifecycle, logs, messages, metrics
from .breaker import HostUnavailable
from .errors import MQIError, ValidationError, case_removed, describe, infrastructure_fault
from .hosts import file_sha256
from .lifecycle import CaseStep, JobStep, Stage
from .models import TERMINAL_CASE, Case, CaseStatus, JobStatus
from .naming import remote_job_dir, shown
from .store import NewJob

log = logging.getLogger(__name__)


def dispatch(ctx, case_id: str, *, stage: Stage | None = None, reconcile: bool = False, resume: bool = False) -> bool:
    """Send the case's next canvas under a new lease. False when there is nothing to send
    (the case is over, the poller has it, or its host is down: then it waits, parked)."""
    settings, store = ctx.settings, ctx.store
    breaker = ctx.breaker
    if breaker is not None:
        state, since, error = breaker.state()
        if state != "closed":
            store.park(case_id, None, str(HostUnavailable(breaker.host, since, error)))
            return False
    if lifecycle.start_dispatch(store, case_id, settings.reconciler.lease_seconds, stage=stage, reconcile=reconcile,
                                resume=resume) is None:
        return False
    case = store.get_case(case_id)  # with its jobs
    try:
        if not ctx.sender.send_stage(case):
            lifecycle.to_poller(store, case_id)  # nothing left to submit: the poller takes over
            return False
    except Exception as exc:  # noqa: BLE001 - the broker is down: the case waits for the reconciler's next run
        reason = (f"the broker did not take the case's {case.stage} step ({exc}); it goes on at the reconciler's "
                  "next run")
        log.error("case %s: %s", case_id, reason)
        if store.park(case_id, case.dispatch, reason) is not None:
            messages.emit(ctx, "case_waiting", {"reason": reason}, case_id=case_id)
        return False
    log.info("case %s dispatched: stage %s, dispatch %d", case_id, case.stage, case.dispatch)
    return True


def admit(ctx, case_id: str) -> bool:
    """Validate a NEW case (or one that failed validation and was fixed): QUEUED and
    dispatched when valid, FAILED with the reason when not."""
    settings, store = ctx.settings, ctx.store
    case = store.get_case(case_id)
    case_dir = Path(case.path)
    with logs.bound(case.trace_id):
        began = db.utcnow()  # what changes after this is looked at again (scanner.look_again)
        try:
            info = case_reader.read_case(case_dir, settings.scanner.marker, references=settings.qa.reference_files,
                                         require_reference=settings.qa.require_reference)
            _check_gantries(info, settings.engine.gantry_num)
            planned = [r.file for r in info.references]  # the QA's, never the engine's: not uploaded
            files = case_reader.manifest(case_dir, settings.scanner.marker, leave_out=[*info.unused, *planned])
        except Exception as exc:  # noqa: BLE001 - whatever the folder holds, the case fails with a reason
            if infrastructure_fault(exc):
                raise  # the database is down: the task is retried while it lasts (workers.base.PipelineTask)
            if not isinstance(exc, ValidationError):
                log.warning("case %s: unexpected fault during validation", case_id, exc_info=True)
            elif _still_copying(case_dir, settings.scanner.settle_seconds):
                reason = (f"its files are still changing (a copy in progress?), and half-copied it is not valid yet "
                          f"({exc}); validated again once nothing in it changed for scanner.settle_seconds "
                          f"({settings.scanner.settle_seconds:g} s)")
                lifecycle.settling(store, case_id, reason)
                messages.emit(ctx, "case_waiting", {"reason": reason}, case_id=case_id)
                return False
            reason = describe(exc, "validation")
            events = [messages.prepare("new_case_found", {"valid": False}, case_id=case_id),
                      messages.prepare("case_failed", {"reason": reason, "step": CaseStep.VALIDATION.value},
                                       case_id=case_id)]
            lifecycle.invalid(store, case_id, reason, events)
            metrics.case_finished("FAILED", case.created_at, CaseStep.VALIDATION.value)
            messages.emit_recorded(ctx, events)
            return False
        store.add_jobs(case_id, [NewJob(b.number, b.name, b.folder) for b in info.beams])
        lifecycle.validated(store, case_id, settings.reconciler.lease_seconds, manifest=files,
                            study_uid=info.study_uid, checked_at=began, left_out=[*info.unused, *planned])
        # No path: nested layouts put the patient id in it; events carry case ids only.
        messages.emit(ctx, "new_case_found", {"valid": True, "files": len(files), "beams": [b.number for b in info.beams],
                                              "planned_doses": {r.file: r.beam or "plan" for r in info.references}},
                      case_id=case_id)
        if twin := store.copy_of(case_id, info.study_uid, files):
            messages.emit(ctx, "case_warning", {"copy_of": twin, "reason": (
                f"the same delivery as case {twin} (the same plan and delivery log files, dropped under another "
                f"folder name): it is computed again; cancel one (`mqi cases cancel`) if that was not meant")},
                case_id=case_id)
        if info.unused:
            # Counts and folders, no file names: a .mgn name carries the patient id.
            folders = sorted({rel.rsplit("/", 1)[0] for rel in info.unused})
            messages.emit(ctx, "case_warning", {"unused_files": len(info.unused), "folders": folders, "reason": (
                f"{len(info.unused)} layer file(s) that no PlanRange.txt row names were not uploaded (the engine "
                f"would not read them), in {', '.join(folders)}")}, case_id=case_id)
        dispatch(ctx, case_id)
    return True


def _still_copying(case_dir: Path, settle_seconds: float) -> bool:
    """Something in the case folder changed within ``settle_seconds``: a ready marker put in
    before the copy ended, or a case copied file by file."""
    try:
        return time.time() - case_reader.last_change(case_dir) < settle_seconds
    except OSError:
        return False  # removed meanwhile: validation says so


def admit_registered(ctx, case_id: str, *, redelivered: bool = False) -> bool:
    """``admit`` for a case the scanner registered. A redelivery finds it admitted already:
    the delivery before was cut off (its worker lost the broker, or died) after validating,
    perhaps before its upload reached the broker. A case still QUEUED for upload is then
    dispatched again at once (the new dispatch supersedes a message that did get out), so
    it goes on when the broker is back, not when its lease runs out."""
    case = ctx.store.get_case(case_id)
    if case is None:
        return False
    if case.status is CaseStatus.NEW:
        return admit(ctx, case_id)
    if redelivered and case.status is CaseStatus.QUEUED and case.stage == Stage.UPLOAD:
        with logs.bound(case.trace_id):
            return dispatch(ctx, case_id, stage=Stage.UPLOAD)
    return False


def request_admission(ctx, case_id: str) -> None:
    """Send a registered case to the conductor for validation. If the broker does not take
    the message, the case waits with the reason and the reconciler sends it at its next run."""
    try:
        ctx.sender.send("mqi.admit_case", case_id)
    except Exception as exc:  # noqa: BLE001 - the broker is down: see docstring
        reason = f"the broker did not take the case's validation ({exc}); it is sent at the reconciler's next run"
        log.error("case %s: %s", case_id, reason)
        if ctx.store.park(case_id, None, reason) is not None:
            messages.emit(ctx, "case_waiting", {"reason": reason}, case_id=case_id)


def _check_gantries(info: case_reader.CaseInfo, configured: int | None) -> None:
    """Each beam's input names its gantry room: known before anything is uploaded."""
    for beam in info.beams:
        try:
            engine.gantry_number(beam.machine, configured)
        except ValueError as exc:
            raise ValidationError(f"beam {beam.number}: {exc}") from None


def collect_finished(ctx) -> int:
    """Cases whose every beam is over move to "collect", each exactly once (the stage
    change is the claim); returns how many were sent on."""
    store, moved = ctx.store, 0
    for case_id in store.cases_to_collect():
        with logs.for_case(store, case_id):
            if lifecycle.advance(store, case_id, Stage.RUN, Stage.COLLECT, ctx.settings.reconciler.lease_seconds):
                moved += dispatch(ctx, case_id, stage=Stage.COLLECT)
    return moved


def verify(ctx, case_id: str) -> str:
    """Results on disk are those downloaded (hash) and readable dose files."""
    store = ctx.store
    case = store.get_case(case_id)
    if case is None or case.stage != Stage.COLLECT or lifecycle.begin(store, case_id, CaseStep.VERIFYING) is None:
        return "skipped: case not collecting"
    faults.point("before_verify")
    folder = ctx.settings.paths.results / case_id
    for job in store.get_case(case_id).jobs:
        if job.status is not JobStatus.COMPLETED:
            continue
        problem = _check_results(folder, job.results)
        if problem:
            lifecycle.job_failed(store, case_id, job.beam, f"result verification: {problem}", results={})
    messages.emit(ctx, "results_verified", {"beams": [j.beam for j in store.get_case(case_id).jobs
                                                 if j.status is JobStatus.COMPLETED]}, case_id=case_id)
    return "verified"


def _check_results(folder: Path, results: dict[str, str]) -> str | None:
    if not results:
        return "no result files were downloaded"
    for name, sha in results.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing from {folder}"
        if file_sha256(path) != sha:
            return f"{name} changed after download (SHA-256 mismatch)"
        if path.suffix == ".dcm":
            try:
                modality = pydicom.dcmread(path, stop_before_pixels=True).get("Modality")
            except Exception as exc:  # noqa: BLE001 - any parse failure means "not a dose file"
                return f"{name} is not readable DICOM ({type(exc).__name__})"
            if modality != "RTDOSE":
                return f"{name} is {modality}, not RTDOSE"
    return None


def finalize(ctx, case_id: str) -> str:
    store = ctx.store
    case = store.get_case(case_id)
    if case.status is not CaseStatus.PROCESSING or case.stage != Stage.COLLECT:
        return f"skipped: case is {case.status.value} in stage {case.stage}"
    failed = [j for j in case.jobs if j.status is not JobStatus.COMPLETED]
    faults.point("before_finalize")
    _write_report(ctx, case)
    reasons = [f"beam {j.beam} ({j.beam_name}): {j.error or j.status.value}" for j in failed]
    if not Path(case.path).is_dir():  # withdrawn while it ran: not a result to sign off
        reasons.insert(0, f"{case_removed(shown(Path(case.path).name))} (the results of the beams that ran are kept)")
    if reasons:
        reason = "; ".join(reasons)
        events = [messages.prepare("case_failed", {"reason": reason, "completed_beams": [
            j.beam for j in case.jobs if j not in failed]}, case_id=case_id)]
        if lifecycle.finished(store, case_id, reason, events) is None:
            return "skipped: finalized meanwhile"
        metrics.case_finished("FAILED", case.created_at, CaseStep.FINISHED.value)
        messages.emit_recorded(ctx, events)
        return CaseStatus.FAILED.value
    events = [messages.prepare("case_completed", {"beams": [j.beam for j in case.jobs], "verdict": case.verdict,
                                                   "results": {
        n: s for j in case.jobs for n, s in j.results.items()}}, case_id=case_id)]
    if lifecycle.finished(store, case_id, None, events) is None:
        return "skipped: finalized meanwhile"
    metrics.case_finished("COMPLETED", case.created_at, None)
    messages.emit_recorded(ctx, events)
    return CaseStatus.COMPLETED.value


def _write_report(ctx, case: Case) -> None:
    """A small JSON summary beside the results, for humans and other tools. Files of an
    earlier run that this one did not make are moved aside (``earlier/``): the folder
    holds exactly what the report lists."""
    folder = ctx.settings.paths.results / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    keep = {name for j in case.jobs for name in j.results} | {"report.json", "report.pdf"}  # report.pdf: the QA's
    moved_to, stale = _move_aside(folder, keep=keep)
    report = {"case_id": case.case_id, "study_uid": case.study_uid, "verdict": case.verdict, "qa": case.qa,
              "jobs": [{"beam": j.beam, "beam_name": j.beam_name, "status": j.status.value, "error": j.error,
                        "results": j.results} for j in case.jobs],
              **({"moved_aside": {"folder": str(moved_to.relative_to(folder)), "files": stale}} if stale else {})}
    (folder / "report.json").write_text(json.dumps(report, indent=2))


EARLIER = "earlier"  # results/<case>/earlier/: files of earlier runs, moved out of the way


def _move_aside(folder: Path, keep=frozenset()) -> tuple[Path, list[str]]:
    """Move the results folder's files but ``keep`` to ``earlier/<now>/``; returns where,
    and what moved."""
    stale = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.parts[len(folder.parts)] != EARLIER and str(p.relative_to(folder)) not in keep)
    moved_to = folder / EARLIER / db.utcnow().strftime("%Y%m%dT%H%M%S%fZ")  # each run's its own: none overwritten
    for name in stale:
        target = moved_to / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (folder / name).replace(target)
    return moved_to, stale


def fail_case(ctx, case_id: str, reason: str, step: CaseStep | None = None) -> bool:
    """Stop a case: kill its live jobs, fail what is unfinished (``step``: the step it failed
    in, when not the one it was in). False if already over."""
    store = ctx.store
    case = store.get_case(case_id)
    if case is None or case.status in TERMINAL_CASE:
        return False
    for job in case.jobs:
        _stop_job(ctx, case_id, job, reason)
    events = [messages.prepare("case_failed", {"reason": reason}, case_id=case_id)]
    if lifecycle.failed(store, case_id, reason, step, events) is None:
        return False
    metrics.case_finished("FAILED", case.created_at, case.step)
    messages.emit_recorded(ctx, events)
    return True


def _stop_job(ctx, case_id: str, job, reason: str) -> None:
    """Fail one job; a PENDING one may be submitted meanwhile: then its run is cancelled too."""
    store = ctx.store
    if job.status is JobStatus.PENDING:
        if lifecycle.job_failed(store, case_id, job.beam, reason, step=JobStep.STOPPED,
                                only_from={JobStatus.PENDING}) is not None:
            return
        job = store.get_job(case_id, job.beam)  # submitted in between
    if job.status is JobStatus.RUNNING:
        if job.remote_id and job.finished_at is None:
            _cancel_run(ctx, job, case_id)
        lifecycle.job_failed(store, case_id, job.beam, reason, step=JobStep.STOPPED, only_from={JobStatus.RUNNING})


def _cancel_run(ctx, job, case_id: str) -> None:
    """Best effort: the case fails whether or not the host answers (the host may be the
    very fault that failed it); a run left behind is logged."""
    try:
        host = ctx.host
        metrics.SCHEDULER_QUERIES.labels(host=host.name, command="cancel").inc()
        ctx.scheduler.cancel(job.remote_id, remote_job_dir(host.root, case_id, job.beam))
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.warning("could not cancel beam %s of %s (%s): %s", job.beam, case_id, job.remote_id, exc)


def cancel_case(ctx, case_id: str) -> bool:
    case = ctx.store.get_case(case_id)
    with logs.bound(case.trace_id if case else None):
        return fail_case(ctx, case_id, "cancelled")


def retry_case(ctx, case_id: str) -> Case:
    """Run a finished case again from the step that failed: failed beams are reset and
    submitted again, completed beams keep their results."""
    store = ctx.store
    case = store.get_case(case_id)
    if case is None:
        raise KeyError(case_id)
    if case.status not in TERMINAL_CASE:
        raise MQIError(f"case {case_id} is {case.status.value}; only COMPLETED or FAILED cases can be retried")
    with logs.bound(case.trace_id):
        if case.step == CaseStep.FOLDER_CHANGED:  # its folder holds other content now: a new run of it
            run_again(ctx, case_id, "retried after its folder changed")
            return store.get_case(case_id)
        return _retry(ctx, case)


def _retry(ctx, case: Case) -> Case:
    store, case_id = ctx.store, case.case_id
    readmit = case.step == CaseStep.VALIDATION or not case.jobs or case.stage in (None, Stage.UPLOAD)
    # Claim first: of two retries at once (CLI and Flower), one wins, the other is refused.
    # A case validated again has nothing to compare its folder with until then (scanner.look_again).
    events = [messages.prepare("case_retried", {"attempt": case.attempts + 1}, case_id=case_id)]
    if lifecycle.retried(store, case, ctx.settings.reconciler.lease_seconds, forget_check=readmit,
                         events=events) is None:
        raise MQIError(f"case {case_id} is being retried already")
    messages.emit_recorded(ctx, events)
    failed = [j for j in case.jobs if j.status is JobStatus.FAILED]
    for job in failed:
        lifecycle.job_reset(store, case_id, job.beam)
    if readmit:
        # Nothing uploaded yet, and the folder may have been fixed: validate it again.
        admit(ctx, case_id)
        return store.get_case(case_id)
    # Beams to run again: from the upload (it re-verifies the remote copy, sending only
    # what differs); all beams done: only their results are collected again.
    lifecycle.restage(store, case_id, Stage.UPLOAD if failed or case.stage in (None, Stage.UPLOAD) else Stage.COLLECT)
    dispatch(ctx, case_id)
    return store.get_case(case_id)


def run_again(ctx, case_id: str, changed: str, admit_case=admit) -> bool:
    """A finished case whose folder holds other content now (the next export dropped at the
    same path, or files changed under it while it ran) runs again from validation, shown
    as a new run; the results of the earlier run are moved aside when the new ones come."""
    store = ctx.store
    before = store.get_case(case_id)
    with logs.bound(before.trace_id):
        message = messages.prepare("case_dropped_again", {"changed": changed, "run": before.attempts + 2},
                                   case_id=case_id)
        if lifecycle.new_run(store, case_id, ctx.settings.reconciler.lease_seconds, message) is None:
            return False
        results = ctx.settings.paths.results / case_id
        if results.is_dir():  # the earlier run's doses stay, out of the new run's way
            _move_aside(results)
        messages.emit(ctx, "case_dropped_again", message["payload"], case_id=case_id, recorded=message)
        admit_case(ctx, case_id)
    return True
