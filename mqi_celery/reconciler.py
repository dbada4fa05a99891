"""Reconciler (celery beat and start-up, queue ``control``): no case is left behind.

A case's stage is leased to the dispatch that carries it (see ``conductor``). When a lease
runs out with no task of that dispatch alive, because a message was lost, a worker was
killed or the broker restarted, the case is dispatched again from its stage, with an event
saying why. Each case gets ``reconciler.max_reconciles`` such second chances between two
steps that finish; then it fails with the reason. Cases parked while their host was down
resume (without counting) once its breaker closes; the reconciler also sends the breaker's
probe, since nothing else connects to a host everybody waits for.

Its cost follows what is active: the queries select expired leases and parked cases only.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from . import admission, logs, messages
from .conductor import admit, dispatch, fail_case, request_admission
from .db import utcnow
from .lifecycle import Stage
from .models import CaseStatus

log = logging.getLogger(__name__)

# Where the first task of each stage waits: a case may still be queued there, not lost.
STAGE_QUEUE = {Stage.UPLOAD: "transfer", Stage.SUBMIT: "execute", Stage.COLLECT: "transfer"}


def reconcile_once(ctx, limit: int = 200, *, startup: bool = False) -> dict:
    """``startup``: the installation has just (re)started, so no task of a leased case is
    alive; each is dispatched again at once, even with messages waiting in its queue."""
    settings, store = ctx.settings, ctx.store
    summary = {"probed": _probe(ctx), "resumed": resume_parked(ctx), "reconciled": 0, "failed": 0, "postponed": 0}
    expired = store.expired_leases(limit)
    busy = _busy_queues(ctx) if expired and not startup else set()
    for case_id in expired:
        case = store.get_case(case_id)
        with logs.bound(case.trace_id):
            if case.status is not CaseStatus.NEW and STAGE_QUEUE.get(case.stage) in busy:
                # Its task may be waiting in line behind other cases: looked at again at the
                # next run, dispatched again once the line is empty (no count, no new lease).
                summary["postponed"] += 1
                continue
            if case.reconciles >= settings.reconciler.max_reconciles:
                fail_case(ctx, case_id, f"no progress in stage '{case.stage}' after {case.reconciles} re-dispatches "
                                   f"(lost messages or crashing workers); see the worker logs, then `mqi cases retry`")
                summary["failed"] += 1
                continue
            reason = _why(case)
            messages.emit(ctx, "case_reconciled", {"stage": case.stage, "status": case.status.value,
                                              "dispatch": case.dispatch, "reason": reason}, case_id=case_id)
            log.warning("case %s reconciled: %s", case_id, reason)
            if case.status is CaseStatus.NEW:  # a new lease first: if validation dies too, we come back
                store.update_case(case_id, reconciles=case.reconciles + 1,
                                  lease_until=utcnow() + timedelta(seconds=settings.reconciler.lease_seconds))
                admit(ctx, case_id)
            else:
                dispatch(ctx, case_id, reconcile=True)
            summary["reconciled"] += 1
    return summary


def _why(case) -> str:
    expired = f"its lease ran out at {case.lease_until:%H:%M:%S} UTC" if case.lease_until else "at start-up"
    if case.status is CaseStatus.NEW:
        return f"registered but never validated ({expired}); validating again"
    return (f"no sign of life from dispatch {case.dispatch} in stage '{case.stage}' ({expired}, or the "
            f"installation restarted); dispatched again")


def resume_parked(ctx) -> int:
    """Cases that waited for their host go on where they were once it is reachable (its
    breaker closed) and admits them again (room on its disk, its partition up)."""
    store, breaker = ctx.store, ctx.breaker
    if breaker is not None and breaker.state()[0] != "closed":
        return 0
    resumed, budget = 0, admission.TransferBudget(ctx)
    for case_id in store.parked_cases():
        case = store.get_case(case_id)
        with logs.bound(case.trace_id):
            hold = admission.still_held(ctx, case, budget)
            if hold is not None:
                if hold != case.wait_reason:
                    store.update_case(case_id, wait_reason=hold)
                continue
            messages.emit(ctx, "case_resumed", {"stage": case.stage, "waited_for": case.wait_reason}, case_id=case_id)
            live = case.lease_until is not None and case.lease_until > utcnow()
            if case.status is CaseStatus.NEW:  # its validation was never sent
                store.update_case(case_id, wait_reason=None,
                                  lease_until=utcnow() + timedelta(seconds=ctx.settings.reconciler.lease_seconds))
                request_admission(ctx, case_id)
            elif live:  # a live task still carries it: only the note goes
                store.update_case(case_id, wait_reason=None)
            else:  # a new dispatch clears the note (the poller's stage: it simply polls again)
                dispatch(ctx, case_id, resume=True)  # unless another resume run was first
        resumed += 1
    return resumed


def _probe(ctx) -> bool:
    """Once the breaker's cool-down is over, one light command tells whether the host is back."""
    breaker = ctx.breaker
    if breaker is None or breaker.state()[0] == "closed":
        return False
    breaker.probe_soon(ctx.settings.reconciler.interval_seconds / 2)
    try:
        ctx.host.run("true", timeout=30)
    except Exception as exc:  # noqa: BLE001 - refused by the breaker or failed: it recorded why
        log.info("host probe: %s", exc)
        return False
    breaker.succeeded()  # also when this process's pooled connection answered (no new handshake)
    return True


def _busy_queues(ctx) -> set[str]:
    """Queues that hold waiting messages (their depth, asked of the broker once per run);
    a depth the broker does not tell counts as waiting: never re-dispatch blindly."""
    return {queue for queue, depth in ctx.sender.queue_depths(set(STAGE_QUEUE.values())).items() if depth != 0}


def on_startup(ctx) -> int:
    """Start-up of a whole installation (``mqi run``): no task of an earlier run is alive,
    so every lease is void and the first reconcile run picks every active case up."""
    return ctx.store.void_leases()
