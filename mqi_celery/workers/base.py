"""How every pipeline task behaves: the retry policy and the correlation id (queues and
routes: ``queues``).

One place owns the retry rule (transient faults: exponential backoff with jitter, within
the configured budget; permanent faults: fail at once), so no task invents its own.
"""
from __future__ import annotations

import logging
import math
import random
from typing import NoReturn

from celery import Task, signals
from celery.exceptions import Ignore, Reject, Retry

from .. import context, logs, messages
from ..errors import (ConnectionError_, Held, MQIError, database_fault, describe, infrastructure_fault,
                      is_transient)

log = logging.getLogger(__name__)

# How a task's step is named in a reason shown to a user.
STEP_WORDS = {"mqi.upload_case": "upload", "mqi.download_results": "download of the results",
              "mqi.submit_beam": "preparing and submitting a beam", "mqi.verify_results": "verification of the results",
              "mqi.evaluate_case": "QA evaluation",
              "mqi.finalize_case": "finishing the case"}


class PipelineTask(Task):
    """Base of every task that works on one case (first argument: ``case_id``).

    Every such task carries ``dispatch``, the case's dispatch it belongs to: it starts by
    extending that dispatch's lease, and skips itself if a later dispatch took over (the
    reconciler re-dispatched the case, or it was retried). A task that fails for good
    stops the case with the reason; an outage of the host parks the case instead; an
    outage of the database or the broker is waited out (retried without counting)."""

    #: ``dispatch`` and ``outages`` travel in the kwargs (checked here, never passed to ``run``).
    typing = False
    #: Faults we raise on purpose fail the case with their reason; Celery logs them as
    #: expected (one line), not as crashes with a traceback.
    throws = (MQIError,)
    #: Celery's own limit is off: ``retry.max_retries`` is applied here, to the case's own
    #: faults only (an outage of the database or broker is not the case's).
    max_retries = None

    @property
    def step_words(self) -> str:
        return STEP_WORDS.get(self.name, self.name)

    def __call__(self, *args, **kwargs):
        dispatch = kwargs.pop("dispatch", None)
        outages = kwargs.pop("outages", 0)
        case_id = case_id_of(args, kwargs)
        try:
            if dispatch is not None and context.current().store.hold_lease(case_id, dispatch, _lease()) is None:
                log.info("%s: skipped, case %s has moved on from dispatch %s", self.name, case_id, dispatch)
                return "skipped: superseded dispatch"
            return super().__call__(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            try:
                self._fault(exc, case_id, dispatch, outages)
            except (Retry, Ignore, Reject):
                raise
            except Exception as inner:  # the database went while the fault was judged: an outage
                if inner is exc or not infrastructure_fault(inner):
                    raise
                self._fault(inner, case_id, dispatch, outages)

    def _fault(self, exc: Exception, case_id: str | None, dispatch: int | None, outages: int) -> NoReturn:
        """Retry, park or fail: the one rule (raises in every case)."""
        outage = infrastructure_fault(exc)
        if case_id and not outage and (isinstance(exc, Held) or host_down(exc)):
            context.current().store.park(case_id, dispatch, str(exc))
            log.warning("%s: case %s waits: %s", self.name, case_id, exc)
            raise Ignore() from exc  # not a success: the rest of the canvas must not run
        if not outage and not is_transient(exc):
            raise exc
        settings = context.current().settings
        policy, used = settings.retry, self.request.retries - outages  # the case's own retries
        if not outage and used >= policy.max_retries:
            if isinstance(exc, MQIError):
                exc.message = f"{exc.message} (gave up after {policy.max_retries} retries)"
            raise exc
        # An outage is retried for as long as it lasts, at least once per reconciler interval:
        # the case goes on within that interval of its end.
        delay = backoff(outages if outage else used, policy, whole_seconds=settings.broker.amqp,
                        cap=settings.reconciler.interval_seconds if outage else None)
        if outage:
            log.warning("%s: %s unreachable, case %s tried again in %ss: %s", self.name,
                        "database" if database_fault(exc) else "broker", case_id, delay, exc)
        else:
            log.warning("%s: transient fault, retry %d/%d in %ss: %s", self.name, used + 1, policy.max_retries,
                        delay, exc)
            if dispatch is not None:
                context.current().store.hold_lease(case_id, dispatch, _lease() + delay)
        kwargs = {**self.request.kwargs, "outages": outages + outage}
        try:
            raise self.retry(args=self.request.args, kwargs=kwargs, exc=exc, countdown=delay)
        except Reject as refused:  # Celery drops a retry the broker did not take: we keep the case
            self.hand_over(case_id, self.request.args, dispatch,
                           f"the broker did not take the retry of the {self.step_words} "
                           f"({refused.reason}); it goes on at the reconciler's next run")
            raise Ignore() from exc

    def hand_over(self, case_id: str | None, args, dispatch: int | None, reason: str) -> None:
        """A message that carries the case on was lost (the broker did not take it): the
        case waits with the reason and the reconciler sends it on at its next run, not
        when its lease runs out. Without the database either, the broker keeps this
        message (requeued, or redelivered once it is back)."""
        try:
            if case_id is None or dispatch is None:
                raise LookupError("not a step of a case's dispatch")  # a command (stop): it must not be lost
            if context.current().store.park(case_id, dispatch, reason) is not None:
                messages.emit(context.current(), "case_waiting", {"reason": reason}, case_id=case_id)
            log.error("%s: case %s handed to the reconciler: %s", self.name, case_id, reason)
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.error("%s: %s; the message goes back to the broker (%s)", self.name, reason, exc)
            raise Reject(reason, requeue=True) from exc

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        """Failed for good: the case stops with the reason, unless the fault is the
        infrastructure's (the broker refused the next step): then the case waits for the
        reconciler's next run."""
        case_id = case_id_of(args, kwargs)
        if not case_id or self.name == "mqi.stop_case":
            return
        if infrastructure_fault(exc):
            self._hand_over_failed(case_id, args, kwargs, f"the broker did not take the step after the "
                                   f"{self.step_words} ({exc}); it goes on at the reconciler's next run")
            return
        reason = describe(exc, self.step_words)
        try:
            self.app.send_task("mqi.stop_case", (case_id, reason))
        except Exception as send_exc:  # noqa: BLE001 - the step runs again once the broker takes messages
            self._hand_over_failed(case_id, args, kwargs, f"the broker did not take the stop of the case after its "
                                   f"{self.step_words} failed ({send_exc}); the step is tried again at the "
                                   "reconciler's next run")

    def _hand_over_failed(self, case_id: str, args, kwargs, reason: str) -> None:
        try:
            self.hand_over(case_id, args, kwargs.get("dispatch"), reason)
        except Reject:
            pass  # the database is down too: the lease is the last resort


class PeriodicTask(Task):
    """Base of beat's periodic work (scan, poll, reconcile, curator): its next run is its
    retry, so an outage of the database or broker is one warning line per run, not a
    traceback; anything else is a fault to see in full."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if not infrastructure_fault(exc):
                raise
            log.warning("%s: the %s is unreachable; its next run tries again: %s", self.name,
                        "database" if database_fault(exc) else "broker", (str(exc).splitlines() or [type(exc).__name__])[0])
            return None


def _lease() -> float:
    return context.current().lease_seconds


def backoff(retries: int, policy, *, whole_seconds: bool = False, cap: float | None = None) -> float:
    """Exponential, capped, with full jitter when asked. On RabbitMQ a countdown goes
    through native delayed delivery, which takes whole seconds of at least 1 (kombu refuses
    a shorter one, and Celery then drops the retry): there the delay is drawn from whole
    seconds in [1, d]. Elsewhere seconds may be fractional (Celery's helper takes whole ones)."""
    delay = min(policy.backoff_max_seconds, policy.backoff_seconds * 2 ** retries, *([cap] if cap else []))
    if whole_seconds:
        top = max(1, math.floor(delay))
        return float(random.randint(1, top) if policy.jitter else top)
    return round(random.uniform(0, delay) if policy.jitter else delay, 3)


def host_down(exc: BaseException) -> bool:
    """The fault is the host's being unreachable (its breaker is not closed)."""
    from ..breaker import HostUnavailable

    if isinstance(exc, HostUnavailable):
        return True
    breaker = context.current().breaker
    return isinstance(exc, ConnectionError_) and breaker is not None and breaker.state()[0] != "closed"


def _trace_id(case_id: str) -> str | None:
    try:
        return _stored_trace_id(case_id)
    except Exception as exc:  # noqa: BLE001 - the database is down: the line goes without it
        if not infrastructure_fault(exc):
            raise
        return None


def _stored_trace_id(case_id: str) -> str | None:
    ctx = context.current()
    if case_id not in ctx.trace_ids:  # a case's id for the logs never changes: asked once per process
        case = ctx.store.get_case(case_id)
        if case is None:
            return None
        ctx.trace_ids[case_id] = case.trace_id
    return ctx.trace_ids[case_id]


logs.case_resolver = _trace_id  # Celery's own lines about a task (e.g. "received") carry its case's id


def case_id_of(args, kwargs) -> str | None:
    value = kwargs.get("case_id") or (args[0] if args else None)
    return value if isinstance(value, str) else None


@signals.task_prerun.connect
def _bind_correlation(task=None, args=(), kwargs=None, **_):
    # Set here (not in __call__) so Celery's own "succeeded"/"retry" lines carry it too.
    case_id = case_id_of(args or (), kwargs or {})
    logs.correlation_id.set(_trace_id(case_id) if case_id else None)


@signals.task_postrun.connect
def _unbind_correlation(**_):
    logs.correlation_id.set(None)
