"""Poller (celery beat, queue ``control``): the one loop that watches running jobs.

Once per poll interval it asks each host's scheduler about every active job in one
command, judges the runs that ended (exit code, log, outputs), resubmits after a node
fault, kills a run past its deadline, and hands cases whose beams are all over to the
Conductor for collection. No message exists per running beam, so broker traffic does not
grow with the work in flight, and this loop has its own queue and worker: noticing a
finished job never waits behind transfers or submissions.
"""
from __future__ import annotations

import logging

from . import engine, lifecycle, logs, messages, metrics
from .conductor import collect_finished
from .db import utcnow
from .errors import ConnectionError_, MQIError
from .models import JobStatus
from .naming import remote_job_dir, remote_output_dir
from .lifecycle import POLLER_STARTS, JobStep
from .remote_executor import finish, overdue, start_or_wait, submit

log = logging.getLogger(__name__)


def poll_jobs(ctx) -> int:
    """The control loop, once per poll interval: one scheduler query for every active job
    of the host, a verdict on each job that ended, and finished cases moved on to collect.
    Its cost follows the jobs that changed, never one message per beam."""
    store, host, scheduler = ctx.store, ctx.host, ctx.scheduler
    active = [j for j in store.active_jobs() if j.scheduler == scheduler.kind]
    watching = {j.remote_id: j for j in active if j.finished_at is None}
    states = _poll(ctx, store, host, scheduler, watching) if watching else {}
    try:
        for job in active:
            with logs.for_case(store, job.case_id):
                try:
                    _look_after(ctx, store, host, scheduler, job, states.get(job.remote_id), job.remote_id in states)
                except Exception:  # noqa: BLE001 - one job's trouble must not stall the others
                    log.exception("beam %s of %s: could not act on its state; trying again next poll",
                                  job.beam, job.case_id)
    finally:
        collect_finished(ctx)
        start_waiting(ctx)
    return len(active)


def start_waiting(ctx) -> int:
    """Beams that waited for their host (a free GPU, a job slot, a partition back up) start
    once it admits them, oldest case first; stops at the first still refused (the same
    host would refuse the next one too)."""
    store, started = ctx.store, 0
    for job in store.waiting_jobs():
        with logs.for_case(store, job.case_id):
            try:
                if not start_or_wait(ctx, job.case_id, job.beam, may_read=False):  # never wait on a hanging host here
                    break
            except MQIError as exc:
                if exc.transient:  # the host did not answer: the beam waits for the next poll
                    log.info("beam %s of %s not started yet: %s", job.beam, job.case_id, exc)
                    break
                lifecycle.job_failed(store, job.case_id, job.beam, f"could not be submitted: {exc}",
                                     step=JobStep.FINISHED, only_from={JobStatus.PENDING})
            started += 1
            case = store.get_case(job.case_id)
            if case.wait_reason and not any(j.step in POLLER_STARTS for j in case.jobs):
                store.update_case(job.case_id, wait_reason=None)
    return started


def _look_after(ctx, store, host, scheduler, job, state, answered: bool) -> None:
    if state is not None:
        job = _record(store, job, state) or job
    if job.finished_at is not None:
        _judge(ctx, job)
    elif answered and (reason := overdue(job, scheduler, ctx.settings)):
        scheduler.cancel(job.remote_id, remote_job_dir(host.root, job.case_id, job.beam))
        finish(ctx, job.case_id, job.beam, reason)


def _poll(ctx, store, host, scheduler, watching: dict) -> dict:
    """States of the watched jobs; {} when the host or its scheduler does not answer (the
    breaker covers a host that is down; a scheduler failing for too long fails its jobs)."""
    settings = ctx.settings
    metrics.SCHEDULER_QUERIES.labels(host=host.name, command="poll").inc()
    try:
        states = scheduler.poll({rid: remote_job_dir(host.root, j.case_id, j.beam) for rid, j in watching.items()})
    except ConnectionError_ as exc:  # the host, not its scheduler: the breaker counts these
        log.info("not polling %d job(s): %s", len(watching), exc)
        return {}
    except MQIError as exc:
        since = store.note_poll(host.name, str(exc))
        failing = (utcnow() - since).total_seconds()
        log.warning("polling %d job(s) on %s failed (for %.0f s): %s", len(watching), host.name, failing, exc)
        if failing > settings.scheduler.max_poll_failure_seconds:
            for job in watching.values():
                with logs.for_case(store, job.case_id):
                        finish(ctx, job.case_id, job.beam, f"the scheduler on {host.name} did not answer for "
                                                   f"{failing:.0f} s; last error: {exc}")
        return {}
    store.note_poll(host.name, None)
    return states


def _record(store, job, state):
    fields = {"remote_state": state.state}
    if job.started_at is None and (state.state == "RUNNING" or state.finished):
        fields["started_at"] = utcnow()
    if state.finished:
        fields.update(exit_code=state.exit_code, finished_at=utcnow())
    return store.update_job(job.case_id, job.beam, only_from={JobStatus.RUNNING}, if_remote_id=job.remote_id,
                            **fields)


def _judge(ctx, job) -> None:
    """The verdict on a run that ended: resubmitted after a node fault, else completed or
    failed from its exit code, log and outputs. Reading them may fail for a while; the
    verdict is tried again at the next poll, a bounded number of times."""
    settings, store, host, scheduler = ctx.settings, ctx.store, ctx.host, ctx.scheduler
    case_id, beam = job.case_id, job.beam
    job_dir = remote_job_dir(host.root, case_id, beam)
    try:
        if job.remote_state in scheduler.transient_states and job.resubmits < settings.retry.max_retries:
            log.warning("beam %s of %s ended %s (not the engine's fault); submitting again", beam, case_id,
                        job.remote_state)
            messages.emit(ctx, "execution_resubmitted", {"beam": beam, "state": job.remote_state,
                                                    "resubmit": job.resubmits + 1}, case_id=case_id)
            submit(ctx, case_id, beam, job.gpu_id, resubmits=job.resubmits + 1)
            return
        log_tail = host.read_tail(job_dir / "job.log")
        outputs = host.list_files(remote_output_dir(host.root, case_id, beam))
    except ConnectionError_:
        return  # the host is unreachable (the breaker counts that): nothing counts against the job
    except MQIError as exc:
        if not exc.transient or job.judge_attempts + 1 >= settings.scheduler.max_judge_attempts:
            finish(ctx, case_id, beam, f"the finished job's log and outputs could not be read "
                                   f"({job.judge_attempts + 1} attempts): {exc}")
        else:
            store.update_job(case_id, beam, judge_attempts=job.judge_attempts + 1, if_remote_id=job.remote_id)
        return
    finish(ctx, case_id, beam, engine.outcome(job.exit_code, log_tail, outputs, settings.engine.output_format,
                                          scheduler.reason_for(job.remote_state or "", job.exit_code)))
