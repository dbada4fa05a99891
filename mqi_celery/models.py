"""The domain vocabulary: statuses, their legal transitions, and immutable views of rows.

Status names are the original design's and are part of the public interface (CLI JSON,
events, dashboards). A case's stage and the finer steps shown beside the status are in
``lifecycle``, which is also the only module that changes any of them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class CaseStatus(str, enum.Enum):
    NEW = "NEW"
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class JobStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


CASE_TRANSITIONS: dict[CaseStatus, frozenset[CaseStatus]] = {
    CaseStatus.NEW: frozenset({CaseStatus.QUEUED, CaseStatus.FAILED}),
    CaseStatus.QUEUED: frozenset({CaseStatus.PROCESSING, CaseStatus.FAILED}),
    CaseStatus.PROCESSING: frozenset({CaseStatus.COMPLETED, CaseStatus.FAILED}),
    # A finished case can be run again on request (``mqi cases retry``), or from validation
    # when its folder holds other content (``conductor.run_again``).
    CaseStatus.COMPLETED: frozenset({CaseStatus.QUEUED, CaseStatus.NEW}),
    CaseStatus.FAILED: frozenset({CaseStatus.QUEUED, CaseStatus.NEW}),
}

JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.RUNNING, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED}),
    # COMPLETED -> FAILED: its results did not verify after download.
    JobStatus.COMPLETED: frozenset({JobStatus.PENDING, JobStatus.FAILED}),
    JobStatus.FAILED: frozenset({JobStatus.PENDING}),
}

ACTIVE_CASE = frozenset({CaseStatus.NEW, CaseStatus.QUEUED, CaseStatus.PROCESSING})
TERMINAL_CASE = frozenset({CaseStatus.COMPLETED, CaseStatus.FAILED})
TERMINAL_JOB = frozenset({JobStatus.COMPLETED, JobStatus.FAILED})


class IllegalTransition(ValueError):
    """A status change the lifecycle does not allow (a bug or a race lost)."""


def check_transition(kind: str, current, target) -> None:
    table = CASE_TRANSITIONS if kind == "case" else JOB_TRANSITIONS
    if current == target:
        return
    if target not in table[current]:
        raise IllegalTransition(f"{kind} cannot go from {current.value} to {target.value}")


@dataclass(frozen=True)
class Job:
    id: int
    case_id: str
    beam: int
    beam_name: str
    delivery_dir: str
    status: JobStatus
    step: str | None = None
    error: str | None = None
    scheduler: str | None = None
    remote_id: str | None = None
    remote_state: str | None = None
    exit_code: int | None = None
    gpu_id: int | None = None
    results: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    resubmits: int = 0
    judge_attempts: int = 0
    finished_at: datetime | None = None


@dataclass(frozen=True)
class Case:
    case_id: str
    path: str
    status: CaseStatus
    step: str | None = None
    error: str | None = None
    trace_id: str = ""
    study_uid: str | None = None
    attempts: int = 0
    stage: str | None = None
    dispatch: int = 0
    lease_until: datetime | None = None
    reconciles: int = 0
    wait_reason: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    manifest: dict[str, str] = field(default_factory=dict)
    verdict: str | None = None  # the QA verdict (dose_compare): its worst beam's
    qa: dict | None = None  # the QA evaluation: criteria, per-beam results, assumptions
    jobs: tuple[Job, ...] = ()
