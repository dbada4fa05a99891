"""Remote Executor (queue ``execute``): per beam, write the MOQUI input and submit the
job; and the verdicts the poller (``poller``) asks of it: a run's deadline, its outcome.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path


from . import admission, case_reader, engine, faults, lifecycle, messages, metrics
from .db import utcnow
from .models import JobStatus
from .naming import remote_input_dir, remote_job_dir, remote_output_dir
from .schedulers import JobSpec
from .lifecycle import MAY_HAVE_RUN, CaseStep, JobStep, Stage

log = logging.getLogger(__name__)


def hand_to_poller(ctx, case_id: str, beam: int, reason: str) -> None:
    """A beam's submit the broker did not take is the poller's: it writes the beam's input
    if need be and submits it at its next poll (its siblings may still run, so the case is
    not dispatched again)."""
    store = ctx.store
    asked = store.get_job(case_id, beam).step == JobStep.SUBMITTING  # its run may exist: keep that known
    if lifecycle.job_step(store, case_id, beam, JobStep.UNSENT_SUBMITTED if asked else JobStep.UNSENT,
                          only_from={JobStatus.PENDING}) is not None:
        messages.emit(ctx, "execution_waiting", {"beam": beam, "reason": reason}, case_id=case_id)
    lifecycle.to_poller(store, case_id, running=True)


def submit_beam(ctx, case_id: str, beam: int) -> str:
    """Write the beam's MOQUI input and hand the run to the scheduler. A redelivery after a
    crash adopts the run the first delivery started (same token), never a second one."""
    store = ctx.store
    if lifecycle.begin(store, case_id, CaseStep.SUBMITTING) is None:
        return "skipped: case no longer active"
    case = store.get_case(case_id)
    if case.stage != Stage.SUBMIT:  # not uploaded yet (a parked upload), or long past submitting
        return f"skipped: case is in stage {case.stage}"
    job = next(j for j in case.jobs if j.beam == beam)
    if job.status is JobStatus.PENDING:
        start_or_wait(ctx, case_id, beam)
    lifecycle.to_poller(store, case_id, running=True)
    return "submitted"


def start_or_wait(ctx, case_id: str, beam: int, *, may_read: bool = True) -> bool:
    """Submit the beam if its host admits it now (on a direct host: with a GPU of its own),
    its input written first unless it is there; else it waits, with the reason on its case,
    and the poller starts it later (``may_read``: see ``admission.start_beam``)."""
    store = ctx.store
    job = store.get_job(case_id, beam)
    if job.step not in (JobStep.INPUT_WRITTEN, JobStep.WAITING, *MAY_HAVE_RUN):  # past here the folder may hold its run
        _write_input(ctx, store.get_case(case_id), job)
    grant = admission.start_beam(ctx, case_id, beam, may_read=may_read)
    if isinstance(grant, admission.Grant):
        submit(ctx, case_id, beam, grant.gpu)
        return True
    job = store.get_job(case_id, beam)
    if job.step != JobStep.WAITING:
        lifecycle.job_step(store, case_id, beam, JobStep.WAITING, only_from={JobStatus.PENDING})
        messages.emit(ctx, "execution_waiting", {"beam": beam, "reason": grant}, case_id=case_id)
    if store.get_case(case_id).wait_reason != grant:
        store.update_case(case_id, wait_reason=grant)
    return False


def _write_input(ctx, case, job) -> None:
    settings, host = ctx.settings, ctx.host
    case_dir = Path(case.path)
    case_reader.require_folder(case_dir)  # removed mid-run: the case fails saying so
    machine = case_reader.beam_machine(case_dir, case_reader.plan_file(case.manifest), job.beam)
    job_dir = remote_job_dir(host.root, case.case_id, job.beam)
    text = engine.render_input(settings.engine, case_id=case.case_id, beam=job.beam,
                               input_dir=remote_input_dir(host.root, case.case_id), delivery_dir=job.delivery_dir,
                               output_dir=remote_output_dir(host.root, case.case_id, job.beam),
                               gantry=engine.gantry_number(machine, settings.engine.gantry_num))
    host.remove_tree(job_dir)  # a rerun starts clean: no old log, exit code or output
    host.write_text(job_dir / "moqui_tps.in", text)
    lifecycle.job_step(ctx.store, case.case_id, job.beam, JobStep.INPUT_WRITTEN)


def submit(ctx, case_id: str, beam: int, gpu_id: int | None, **fields) -> str:
    settings, host, scheduler = ctx.settings, ctx.host, ctx.scheduler
    case, job = ctx.store.get_case(case_id), ctx.store.get_job(case_id, beam)
    job_dir = remote_job_dir(host.root, case_id, beam)
    # Derived from state that only changes after a successful submit (case retries, node-
    # fault resubmits): a redelivery of this submit computes the same token and adopts.
    token = f"{case.trace_id[:12]}.{case.attempts}.{fields.get('resubmits', job.resubmits)}"
    # Recorded before the scheduler is asked: only a delivery that finds this step (an
    # earlier one got this far, then crashed or lost its answer) looks for a run to adopt.
    may_exist = job.step in MAY_HAVE_RUN
    if not may_exist and lifecycle.job_step(ctx.store, case_id, beam, JobStep.SUBMITTING,
                                            only_from={JobStatus.PENDING, JobStatus.RUNNING}) is None:
        ctx.store.release_claims(case_id, beam)  # cancelled meanwhile: no run, and its GPU back
        return "cancelled"
    spec = JobSpec(name=f"mqi-{case_id}-{beam}", workdir=job_dir,
                   command=engine.command_line(settings.engine, input_file=job_dir / "moqui_tps.in",
                                               job_dir=job_dir),
                   gpu_id=gpu_id, time_limit_seconds=settings.engine.timeout_seconds, token=token,
                   may_exist=may_exist)
    metrics.SCHEDULER_QUERIES.labels(host=host.name, command="submit").inc()
    remote_id = scheduler.submit(spec)  # adopts a live job of this name instead of a 2nd submit
    faults.point("after_submit")  # crash tests: die between the submit and the database write
    started = messages.prepare("execution_started", {"beam": beam, "scheduler": scheduler.kind, "remote_id": remote_id,
                                                     "host": host.name, "gpu": gpu_id}, case_id=case_id)
    recorded = lifecycle.job_submitted(
        ctx.store, case_id, beam, started, scheduler=scheduler.kind, remote_id=remote_id, gpu_id=gpu_id,
        remote_state=None, exit_code=None, submitted_at=utcnow(), started_at=None, finished_at=None, error=None,
        **fields)
    if recorded is None:  # cancelled while sbatch ran: the run must not keep its GPU
        ctx.store.release_claims(case_id, beam)
        metrics.SCHEDULER_QUERIES.labels(host=host.name, command="cancel").inc()
        scheduler.cancel(remote_id, job_dir)
        return "cancelled"
    messages.emit(ctx, "execution_started", started["payload"], case_id=case_id, recorded=started)  # log, publish
    return remote_id


def overdue(job, scheduler, settings) -> str | None:
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


def finish(ctx, case_id: str, beam: int, failure: str | None) -> str:
    status = JobStatus.FAILED if failure else JobStatus.COMPLETED
    job = lifecycle.job_finished(ctx.store, case_id, beam, failure)
    if job is None:  # cancelled meanwhile
        return ctx.store.get_job(case_id, beam).status.value
    start = job.started_at or job.submitted_at
    if start is not None:
        metrics.STEP.labels(step="run").observe(max(0.0, ((job.finished_at or utcnow()) - start).total_seconds()))
    if failure:
        messages.emit(ctx, "execution_failed", {"beam": beam, "reason": failure, "exit_code": job.exit_code},
                      case_id=case_id)
    else:
        messages.emit(ctx, "execution_success", {"beam": beam, "exit_code": job.exit_code}, case_id=case_id)
    return status.value
