"""Lifecycle: the one place where a case or a beam's job changes state.

A case has a status (NEW ─► QUEUED ─► PROCESSING ─► COMPLETED | FAILED, ``models``), a stage
of its work and a step shown to people; a job has a status and a step. Every change of any
of them is a function here, named after what happened. Each checks the move (statuses
against ``models.CASE_TRANSITIONS``/``JOB_TRANSITIONS``, stages against ``STAGE_MOVES``) and
writes it in one transaction through the Store, with the events that describe it when it
has any (``messages.prepare``; the caller logs and publishes them afterwards). Nothing else
writes a status, a stage or a step (tests/test_import_graph.py checks).

    stage:  upload ─► submit ─► run (the poller's: no lease) ─► collect
"""
from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Iterable

from .models import ACTIVE_CASE, TERMINAL_CASE, Case, CaseStatus, Job, JobStatus

Store = Any  # a store.Store, passed in: the store imports this module (its queries name stages and steps)


class Stage(StrEnum):
    UPLOAD = "upload"
    SUBMIT = "submit"
    RUN = "run"
    COLLECT = "collect"


# The forward moves; ``restage`` (a retry) puts a finished case back at upload or collect.
STAGE_MOVES: dict[Stage, frozenset[Stage]] = {
    Stage.UPLOAD: frozenset({Stage.SUBMIT}),
    Stage.SUBMIT: frozenset({Stage.RUN}),
    Stage.RUN: frozenset({Stage.COLLECT}),
    Stage.COLLECT: frozenset(),
}


class CaseStep(StrEnum):
    SETTLING = "settling"  # NEW, validation waits until its files stop changing (a copy in progress)
    VALIDATION = "validation"  # FAILED there
    QUEUED = "queued"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    SUBMITTING = "submitting"
    RUNNING = "running"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    EVALUATING = "evaluating"  # the QA: each beam's dose against the planned dose
    FINISHED = "finished"
    FOLDER_CHANGED = "folder changed"  # FAILED: its folder changed while it ran; runs again once settled


class JobStep(StrEnum):
    WAITING = "waiting"  # PENDING: its host cannot take it yet (a GPU, a slot, a partition)
    UNSENT = "unsent"  # PENDING: the broker did not take its submit
    UNSENT_SUBMITTED = "unsent, submitted"  # … after its scheduler was asked: a run may exist
    INPUT_WRITTEN = "input written"
    SUBMITTING = "submitting"  # its scheduler is being asked to start it
    SUBMITTED = "submitted"
    FINISHED = "finished"
    STOPPED = "stopped"  # its case was stopped
    DOWNLOADED = "downloaded"


# PENDING jobs the poller starts (not a submit task), and steps after which a run may exist
# (a redelivered submit adopts it, never doubles it).
POLLER_STARTS = (JobStep.WAITING, JobStep.UNSENT, JobStep.UNSENT_SUBMITTED)
MAY_HAVE_RUN = (JobStep.SUBMITTING, JobStep.UNSENT_SUBMITTED)
# Once a case is the poller's (stage run) only the poller submits: a beam found SUBMITTING
# there was being started by a poll whose process died. The next poll starts it again,
# adopting the run if it began (no submit task is left to be redelivered, no lease runs).
POLLER_RESUMES = (*POLLER_STARTS, JobStep.SUBMITTING)


class IllegalStageMove(ValueError):
    """A stage change the lifecycle does not allow (a bug)."""


def check_stage_move(current: str | None, target: Stage) -> None:
    if current is not None and current != target and target not in STAGE_MOVES[Stage(current)]:
        raise IllegalStageMove(f"case cannot go from stage {current} to {target}")


def _lease(seconds: float | None) -> datetime | None:
    from .db import utcnow  # not at import: `mqi status` reads the stage names without SQLAlchemy

    return None if seconds is None else utcnow() + timedelta(seconds=seconds)


# ---------------------------------------------------------------- a case
def register(store: Store, case_id: str, path: str, lease_seconds: float) -> bool:
    """NEW, at stage upload: True only for the one caller that registered the path."""
    return store.register_case(case_id, path, lease_seconds=lease_seconds)


def settling(store: Store, case_id: str, reason: str) -> None:
    store.update_case(case_id, step=CaseStep.SETTLING.value, wait_reason=reason, lease_until=None)


def settled(store: Store, case_id: str, lease_seconds: float) -> Case | None:
    """Validated again now (None unless still NEW)."""
    return store.update_case(case_id, only_from={CaseStatus.NEW}, step=None, wait_reason=None,
                             lease_until=_lease(lease_seconds))


def invalid(store: Store, case_id: str, reason: str, events: list[dict[str, Any]]) -> None:
    store.update_case(case_id, status=CaseStatus.FAILED, step=CaseStep.VALIDATION.value, error=reason,
                      lease_until=None, events=events)


def validated(store: Store, case_id: str, lease_seconds: float, **what: Any) -> None:
    """QUEUED at stage upload with what validation found (manifest, study, …)."""
    store.update_case(case_id, status=CaseStatus.QUEUED, step=CaseStep.QUEUED.value, error=None,
                      stage=Stage.UPLOAD.value, lease_until=_lease(lease_seconds), **what)


def begin(store: Store, case_id: str, step: CaseStep) -> Case | None:
    """An active case is in ``step`` now (a QUEUED one starts PROCESSING); None if it stopped."""
    return store.update_case(case_id, status=CaseStatus.PROCESSING, step=CaseStep(step).value,
                             only_from={CaseStatus.QUEUED, CaseStatus.PROCESSING})


def start_dispatch(store: Store, case_id: str, lease_seconds: float, *, stage: Stage | None = None,
                   reconcile: bool = False, resume: bool = False) -> Case | None:
    """A new dispatch owns the case's current (or given) stage (see ``Store.start_dispatch``)."""
    return store.start_dispatch(case_id, lease_seconds, stage=None if stage is None else stage.value,
                                reconcile=reconcile, resume=resume)


def advance(store: Store, case_id: str, frm: Stage, to: Stage, lease_seconds: float | None) -> Case | None:
    """``frm`` is done: the case moves to ``to``. None if it was not in ``frm`` (someone
    else moved it: the caller must not act twice)."""
    check_stage_move(frm, to)
    return store.advance_stage(case_id, frm.value, to.value, lease_seconds)


def uploaded(store: Store, case_id: str, lease_seconds: float) -> None:
    store.update_case(case_id, step=CaseStep.UPLOADED.value)
    advance(store, case_id, Stage.UPLOAD, Stage.SUBMIT, lease_seconds)
    to_poller(store, case_id)  # no beam left to run: straight to the poller


def to_poller(store: Store, case_id: str, *, running: bool = False) -> bool:
    """Stage submit → run once no beam is left to submit; ``running``: shown so."""
    moved = store.finish_submits(case_id)
    if moved and running:
        store.update_case(case_id, step=CaseStep.RUNNING.value)
    return moved


def evaluated(store: Store, case_id: str, verdict: str, qa: dict[str, Any], events: list[dict[str, Any]],
              *, active: bool = True) -> Case | None:
    """The QA evaluation is stored with its event (``active``: in the pipeline, only while
    the case is PROCESSING; a completed case evaluated again keeps its status)."""
    return store.update_case(case_id, verdict=verdict, qa=qa, events=events,
                             only_from={CaseStatus.PROCESSING} if active else TERMINAL_CASE)


def finished(store: Store, case_id: str, failure: str | None, events: list[dict[str, Any]]) -> Case | None:
    """COMPLETED, or FAILED with ``failure``; None if it was not PROCESSING any more."""
    status = CaseStatus.FAILED if failure else CaseStatus.COMPLETED
    return store.update_case(case_id, status=status, step=CaseStep.FINISHED.value, error=failure, lease_until=None,
                             only_from={CaseStatus.PROCESSING}, events=events)


def failed(store: Store, case_id: str, reason: str, step: CaseStep | None,
           events: list[dict[str, Any]]) -> Case | None:
    """Stopped with ``reason`` (``step``: the step it failed in, when not the one it was in);
    None if it was over already."""
    return store.update_case(case_id, status=CaseStatus.FAILED, error=reason, lease_until=None, wait_reason=None,
                             **({"step": CaseStep(step).value} if step else {}), only_from=ACTIVE_CASE, events=events)


def retried(store: Store, case: Case, lease_seconds: float, *, forget_check: bool,
            events: list[dict[str, Any]]) -> Case | None:
    """A finished case QUEUED again (None when another retry was first)."""
    return store.update_case(case.case_id, status=CaseStatus.QUEUED, step=CaseStep.QUEUED.value, error=None,
                             attempts=case.attempts + 1, reconciles=0, wait_reason=None,
                             lease_until=_lease(lease_seconds), **({"checked_at": None} if forget_check else {}),
                             only_from=TERMINAL_CASE, events=events)


def restage(store: Store, case_id: str, stage: Stage) -> None:
    """A retried case goes on from ``stage`` (upload: beams to run again; collect: results)."""
    store.update_case(case_id, stage=stage.value)


def new_run(store: Store, case_id: str, lease_seconds: float, event: dict[str, Any]) -> Case | None:
    """A finished case starts again from validation (see ``Store.new_run``)."""
    return store.new_run(case_id, lease_seconds, event)


# ---------------------------------------------------------------- a beam's job
def job_step(store: Store, case_id: str, beam: int, step: JobStep, *,
             only_from: Iterable[JobStatus] | None = None, **fields: Any) -> Job | None:
    return store.update_job(case_id, beam, step=JobStep(step).value, only_from=only_from, **fields)


def job_submitted(store: Store, case_id: str, beam: int, event: dict[str, Any], **fields: Any) -> Job | None:
    """Its scheduler took it: RUNNING (a resubmit after a node fault stays so); None if it
    was stopped meanwhile."""
    return store.update_job(case_id, beam, status=JobStatus.RUNNING, only_from={JobStatus.PENDING, JobStatus.RUNNING},
                            step=JobStep.SUBMITTED.value, event=event, **fields)


def job_finished(store: Store, case_id: str, beam: int, failure: str | None) -> Job | None:
    """Its run ended: COMPLETED, or FAILED with ``failure`` (None unless it was RUNNING)."""
    status = JobStatus.FAILED if failure else JobStatus.COMPLETED
    return store.update_job(case_id, beam, status=status, error=failure, step=JobStep.FINISHED.value,
                            only_from={JobStatus.RUNNING})


def job_failed(store: Store, case_id: str, beam: int, reason: str, *, step: JobStep | None = None,
               only_from: Iterable[JobStatus] | None = None, **fields: Any) -> Job | None:
    return store.update_job(case_id, beam, status=JobStatus.FAILED, error=reason, only_from=only_from,
                            **({"step": JobStep(step).value} if step else {}), **fields)


def job_reset(store: Store, case_id: str, beam: int) -> None:
    """A failed beam of a retried case starts over."""
    store.update_job(case_id, beam, status=JobStatus.PENDING, error=None, step=None, remote_id=None,
                     remote_state=None, exit_code=None, submitted_at=None, started_at=None,
                     finished_at=None, resubmits=0, judge_attempts=0, results={})
