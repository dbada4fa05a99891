"""Remote Executor (queue ``execute``): per beam, write the MOQUI input, submit the job,
and wait until it is over; plus the batched poller that asks each host once per interval
about all its active jobs and writes what it learns to the database.

``wait_for_job`` learns about its job from the database (the poller writes it); it judges
the finished run, kills one past its deadline and resubmits after a node failure. Its
polling (``self.retry`` with the poll interval) is kept apart from error retries so
polling never eats the error budget.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pydicom

from . import engine, faults, messages, runtime
from .celery_app import app
from .db import utcnow
from .errors import MQIError
from .models import CaseStatus, JobStatus
from .naming import remote_input_dir, remote_job_dir, remote_output_dir
from .schedulers import JobSpec
from .tasks import PipelineTask

log = logging.getLogger(__name__)


def _active_case(case_id: str):
    case = runtime.store().get_case(case_id)
    return case if case and case.status is CaseStatus.PROCESSING else None


def _gpu_for(beam_index: int) -> int:
    gpus = runtime.settings().engine.gpu_ids
    return gpus[beam_index % len(gpus)]


@app.task(name="mqi.prepare_input", base=PipelineTask, bind=True)
def prepare_input(self, case_id: str, beam: int) -> str:
    case = _active_case(case_id)
    if case is None:
        return "skipped: case no longer active"
    job = next(j for j in case.jobs if j.beam == beam)
    if job.status is not JobStatus.PENDING:
        return "skipped: already submitted"
    settings, host = runtime.settings(), runtime.host()
    plan = next(Path(case.path).glob("RP*.dcm"))
    machine = str(pydicom.dcmread(plan, stop_before_pixels=True).IonBeamSequence[0].get("TreatmentMachineName", ""))
    job_dir = remote_job_dir(host.root, case_id, beam)
    text = engine.render_input(settings.engine, case_id=case_id, beam=beam,
                               input_dir=remote_input_dir(host.root, case_id), delivery_dir=job.delivery_dir,
                               output_dir=remote_output_dir(host.root, case_id, beam),
                               gantry=engine.gantry_number(machine, settings.engine.gantry_num))
    host.remove_tree(job_dir)  # a rerun starts clean: no old log, exit code or output
    host.write_text(job_dir / "moqui_tps.in", text)
    runtime.store().update_job(case_id, beam, step="input written",
                               gpu_id=_gpu_for([j.beam for j in case.jobs].index(beam)))
    return "prepared"


@app.task(name="mqi.submit_job", base=PipelineTask, bind=True)
def submit_job(self, case_id: str, beam: int) -> str:
    if _active_case(case_id) is None:
        return "skipped: case no longer active"
    job = runtime.store().get_job(case_id, beam)
    if job.status is not JobStatus.PENDING:  # a redelivered submit must not start a second run
        return f"skipped: job is {job.status.value}"
    return _submit(case_id, beam, job.gpu_id, status=JobStatus.RUNNING)


def _submit(case_id: str, beam: int, gpu_id: int | None, **fields) -> str:
    settings, host, scheduler = runtime.settings(), runtime.host(), runtime.scheduler()
    case, job = runtime.store().get_case(case_id), runtime.store().get_job(case_id, beam)
    job_dir = remote_job_dir(host.root, case_id, beam)
    # Derived from state that only changes after a successful submit (case retries, node-
    # fault resubmits): a redelivery of this submit computes the same token and adopts.
    token = f"{case.trace_id[:12]}.{case.attempts}.{fields.get('resubmits', job.resubmits)}"
    spec = JobSpec(name=f"mqi-{case_id}-{beam}", workdir=job_dir,
                   command=engine.command_line(settings.engine, input_file=job_dir / "moqui_tps.in",
                                               job_dir=job_dir),
                   gpu_id=gpu_id, time_limit_seconds=settings.engine.timeout_seconds, token=token)
    remote_id = scheduler.submit(spec)  # adopts a live job of this name instead of a 2nd submit
    faults.point("after_submit")  # crash tests: die between the submit and the database write
    recorded = runtime.store().update_job(
        case_id, beam, only_from={JobStatus.PENDING, JobStatus.RUNNING}, step="submitted", scheduler=scheduler.kind,
        remote_id=remote_id, remote_state=None, exit_code=None, submitted_at=utcnow(), started_at=None,
        finished_at=None, error=None, **fields)
    if recorded is None:  # cancelled while sbatch ran: the run must not keep its GPU
        scheduler.cancel(remote_id, job_dir)
        return "cancelled"
    runtime.store().update_case(case_id, step="running")
    messages.emit("execution_started", {"beam": beam, "scheduler": scheduler.kind, "remote_id": remote_id,
                                        "host": host.name, "gpu": gpu_id}, case_id=case_id)
    return remote_id


def _overdue(job, scheduler, settings) -> str | None:
    """Why the job must be stopped now, if it must. The engine's time counts from its start
    (queue time is not its fault); where the scheduler enforces the limit itself, ours is a
    backstop a little later. Waiting in the queue has its own, longer limit."""
    now, limit = utcnow(), settings.engine.timeout_seconds
    if job.started_at is None and scheduler.enforces_time_limit:
        queued = settings.scheduler.max_queue_seconds
        if job.submitted_at and now - job.submitted_at > timedelta(seconds=queued):
            return f"job waited in the scheduler's queue longer than {queued:g} s without starting; job cancelled"
        return None
    start = job.started_at or job.submitted_at
    if scheduler.enforces_time_limit:
        limit += 60 + 2 * settings.scheduler.poll_interval_seconds
    if start and now - start > timedelta(seconds=limit):
        return f"engine did not finish within {settings.engine.timeout_seconds:g} s (timeout); job killed"
    return None


@app.task(name="mqi.wait_for_job", base=PipelineTask, bind=True, max_retries=None, polling=True)
def wait_for_job(self, case_id: str, beam: int) -> str:
    """Returns the beam's final JobStatus; never raises for an engine failure, so the other
    beams of the chord and the download of their results go on."""
    store, settings, scheduler = runtime.store(), runtime.settings(), runtime.scheduler()
    job = store.get_job(case_id, beam)
    if job.status in (JobStatus.COMPLETED, JobStatus.FAILED) or _active_case(case_id) is None:
        return job.status.value
    host = runtime.host()
    job_dir = remote_job_dir(host.root, case_id, beam)
    if job.finished_at is None:
        overdue = _overdue(job, scheduler, settings)
        if overdue is None:
            raise self.retry(countdown=settings.scheduler.poll_interval_seconds, max_retries=None)
        # Past the deadline: ask once more (the poller may just not have come by), then kill.
        state = scheduler.poll({job.remote_id: job_dir}).get(job.remote_id)
        if state is None or not state.finished:
            scheduler.cancel(job.remote_id, job_dir)
            return _finish(case_id, beam, overdue)
        job = store.update_job(case_id, beam, remote_state=state.state, exit_code=state.exit_code,
                               finished_at=utcnow())
    if job.remote_state in scheduler.transient_states and job.resubmits < settings.retry.max_retries:
        log.warning("beam %s of %s ended %s (not the engine's fault); submitting again", beam, case_id,
                    job.remote_state)
        _submit(case_id, beam, job.gpu_id, resubmits=job.resubmits + 1)
        raise self.retry(countdown=settings.scheduler.poll_interval_seconds, max_retries=None)
    log_tail = host.read_tail(job_dir / "job.log")
    outputs = host.list_files(remote_output_dir(host.root, case_id, beam))
    return _finish(case_id, beam, engine.outcome(job.exit_code, log_tail, outputs, settings.engine.output_format,
                                                 scheduler.reason_for(job.remote_state or "", job.exit_code)))


def _finish(case_id: str, beam: int, failure: str | None) -> str:
    status = JobStatus.FAILED if failure else JobStatus.COMPLETED
    job = runtime.store().update_job(case_id, beam, status=status, error=failure, step="finished",
                                     only_from={JobStatus.RUNNING})
    if job is None:  # cancelled meanwhile
        return runtime.store().get_job(case_id, beam).status.value
    if failure:
        messages.emit("execution_failed", {"beam": beam, "reason": failure, "exit_code": job.exit_code},
                      case_id=case_id)
    else:
        messages.emit("execution_success", {"beam": beam, "exit_code": job.exit_code}, case_id=case_id)
    return status.value


@app.task(name="mqi.poll_jobs", ignore_result=True)
def poll_jobs() -> int:
    """One scheduler query for all active jobs of the host; records finished ones."""
    store, host, scheduler = runtime.store(), runtime.host(), runtime.scheduler()
    active = [j for j in store.active_jobs() if j.scheduler == scheduler.kind]
    if not active:
        return 0
    try:
        states = scheduler.poll({j.remote_id: remote_job_dir(host.root, j.case_id, j.beam) for j in active})
    except MQIError as exc:
        log.warning("polling %d job(s) on %s failed: %s", len(active), host.name, exc)
        return 0
    for job in active:
        state = states.get(job.remote_id)
        if state is None:
            continue
        fields = {"remote_state": state.state}
        if job.started_at is None and (state.state == "RUNNING" or state.finished):
            fields["started_at"] = utcnow()
        if state.finished:
            fields.update(exit_code=state.exit_code, finished_at=utcnow())
        store.update_job(job.case_id, job.beam, only_from={JobStatus.RUNNING}, if_remote_id=job.remote_id,
                         **fields)
    return len(active)
