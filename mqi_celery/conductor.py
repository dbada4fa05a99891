"""Conductor: the per-case workflow as one Celery canvas, and the case-level commands.

    upload -> chord(per beam: prepare input -> submit -> wait) -> download -> verify -> finalize

Any task that fails for good (a permanent fault, or a transient one past its retry
budget) lands in ``handle_failure`` with the reason. Engine failures do not: they fail
their beam's job, and ``finalize`` reports the case FAILED while keeping the results of
the beams that succeeded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pydicom
from celery import chain, chord

from . import logs, messages, runtime
from .celery_app import app
from .errors import MQIError
from .file_transfer import download_results, upload_case
from .hosts import file_sha256
from .models import TERMINAL_CASE, TERMINAL_JOB, Case, CaseStatus, JobStatus
from .naming import remote_job_dir
from .remote_executor import prepare_input, submit_job, wait_for_job
from .tasks import PipelineTask

log = logging.getLogger(__name__)


def workflow(case: Case):
    cid, n = case.case_id, case.attempts  # every task carries the attempt it belongs to
    beams = [j.beam for j in case.jobs if j.status is not JobStatus.COMPLETED]
    per_beam = [chain(prepare_input.si(cid, b, attempt=n), submit_job.si(cid, b, attempt=n),
                      wait_for_job.si(cid, b, attempt=n)) for b in beams]
    tail = [download_results.si(cid, attempt=n), verify_results.si(cid, attempt=n), finalize_case.si(cid, attempt=n)]
    middle = [chord(per_beam, tail[0]), *tail[1:]] if per_beam else tail
    return chain(upload_case.si(cid, attempt=n), *middle).on_error(handle_failure.s(case_id=cid, attempt=n))


def dispatch(case_id: str) -> None:
    """Send a QUEUED case's canvas to the broker."""
    case = runtime.store().get_case(case_id)
    if case is None or case.status is not CaseStatus.QUEUED:
        return
    workflow(case).apply_async()
    log.info("case %s dispatched (%d beams)", case_id, len(case.jobs))


@app.task(name="mqi.verify_results", base=PipelineTask, bind=True)
def verify_results(self, case_id: str) -> str:
    """Results on disk are those downloaded (hash) and readable dose files."""
    store = runtime.store()
    if store.begin_step(case_id, "verifying") is None:
        return "skipped: case no longer active"
    folder = runtime.settings().paths.results / case_id
    for job in store.get_case(case_id).jobs:
        if job.status is not JobStatus.COMPLETED:
            continue
        problem = _check_results(folder, job.results)
        if problem:
            store.update_job(case_id, job.beam, status=JobStatus.FAILED, results={},
                             error=f"result verification: {problem}")
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


@app.task(name="mqi.finalize_case", base=PipelineTask, bind=True)
def finalize_case(self, case_id: str) -> str:
    store = runtime.store()
    case = store.get_case(case_id)
    if case.status is not CaseStatus.PROCESSING:
        return f"skipped: case is {case.status.value}"
    failed = [j for j in case.jobs if j.status is not JobStatus.COMPLETED]
    _write_report(case)
    if failed:
        reason = "; ".join(f"beam {j.beam} ({j.beam_name}): {j.error or j.status.value}" for j in failed)
        store.update_case(case_id, status=CaseStatus.FAILED, step="finished", error=reason)
        messages.emit("case_failed", {"reason": reason, "completed_beams": [j.beam for j in case.jobs
                                                                          if j not in failed]}, case_id=case_id)
        return CaseStatus.FAILED.value
    store.update_case(case_id, status=CaseStatus.COMPLETED, step="finished", error=None)
    messages.emit("case_completed", {"beams": [j.beam for j in case.jobs],
                                     "results": {n: s for j in case.jobs for n, s in j.results.items()}},
                  case_id=case_id)
    return CaseStatus.COMPLETED.value


def _write_report(case: Case) -> None:
    """A small JSON summary beside the results, for humans and other tools."""
    folder = runtime.settings().paths.results / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    report = {"case_id": case.case_id, "study_uid": case.study_uid,
              "jobs": [{"beam": j.beam, "beam_name": j.beam_name, "status": j.status.value, "error": j.error,
                        "results": j.results} for j in case.jobs]}
    (folder / "report.json").write_text(json.dumps(report, indent=2))


@app.task(name="mqi.handle_failure", base=PipelineTask)
def handle_failure(request, exc, traceback, case_id: str) -> None:
    """Errback of the whole canvas: the case fails with the reason of the failed step.

    Celery runs this inline in the worker whose task failed, where nothing retries it; the
    work itself is a task of its own so that a database blip is retried, not lost."""
    reason = str(exc) if isinstance(exc, MQIError) else f"internal error in {request.task}: " \
                                                       f"{type(exc).__name__}: {exc}"
    stop_case.apply_async((case_id, reason))


@app.task(name="mqi.stop_case", base=PipelineTask)
def stop_case(case_id: str, reason: str) -> bool:
    return fail_case(case_id, reason)


def fail_case(case_id: str, reason: str) -> bool:
    """Stop a case: kill its live jobs, fail what is unfinished. False if already over."""
    store = runtime.store()
    case = store.get_case(case_id)
    if case is None or case.status in TERMINAL_CASE:
        return False
    for job in case.jobs:
        if job.status in TERMINAL_JOB:
            continue
        if job.status is JobStatus.RUNNING and job.remote_id and job.finished_at is None:
            _cancel_run(job, case_id)
        store.update_job(case_id, job.beam, status=JobStatus.FAILED, error=reason, step="stopped")
    if store.update_case(case_id, status=CaseStatus.FAILED, error=reason,
                         only_from={CaseStatus.NEW, CaseStatus.QUEUED, CaseStatus.PROCESSING}) is None:
        return False
    messages.emit("case_failed", {"reason": reason}, case_id=case_id)
    return True


def _cancel_run(job, case_id: str) -> None:
    """Best effort: the case fails whether or not the host answers (the host may be the
    very fault that failed it); a run left behind is logged."""
    try:
        host = runtime.host()
        runtime.scheduler().cancel(job.remote_id, remote_job_dir(host.root, case_id, job.beam))
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.warning("could not cancel beam %s of %s (%s): %s", job.beam, case_id, job.remote_id, exc)


def cancel_case(case_id: str) -> bool:
    case = runtime.store().get_case(case_id)
    with logs.bound(case.trace_id if case else None):
        return fail_case(case_id, "cancelled")


def retry_case(case_id: str) -> Case:
    """Run a finished case again: failed beams are reset, completed beams keep their results."""
    store = runtime.store()
    case = store.get_case(case_id)
    if case is None:
        raise KeyError(case_id)
    if case.status not in TERMINAL_CASE:
        raise MQIError(f"case {case_id} is {case.status.value}; only COMPLETED or FAILED cases can be retried")
    with logs.bound(case.trace_id):
        return _retry(case)


def _retry(case: Case) -> Case:
    store, case_id = runtime.store(), case.case_id
    messages.emit("case_retried", {"attempt": case.attempts + 1}, case_id=case_id)
    if case.step == "validation" or not case.jobs:  # the folder may have been fixed: validate again
        from .scanner import admit

        store.update_case(case_id, attempts=case.attempts + 1)
        admit(case_id)
        return store.get_case(case_id)
    for job in case.jobs:
        if job.status is JobStatus.FAILED:
            store.update_job(case_id, job.beam, status=JobStatus.PENDING, error=None, step=None, remote_id=None,
                             remote_state=None, exit_code=None, submitted_at=None, started_at=None,
                             finished_at=None, resubmits=0, results={})
    store.update_case(case_id, status=CaseStatus.QUEUED, step="queued", error=None, attempts=case.attempts + 1)
    dispatch(case_id)
    return store.get_case(case_id)
