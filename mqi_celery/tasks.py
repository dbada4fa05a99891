"""How every pipeline task is registered: queues, routes, retry policy, correlation id.

One place owns the retry rule (transient faults: exponential backoff with jitter, within
the configured budget; permanent faults: fail at once), so no task invents its own.
"""
from __future__ import annotations

import logging
import random
from functools import lru_cache

from celery import Task, signals
from celery.exceptions import Ignore, Retry

from . import logs, runtime
from .errors import ConnectionError_, Held, MQIError, describe, is_transient

log = logging.getLogger(__name__)

# "control" is the poller and the reconciler: the loop that notices finished jobs and
# stuck cases must never queue behind transfers or engine submissions.
QUEUES = ("scan", "transfer", "execute", "conductor", "curator", "control")
TASK_MODULES = ["mqi_celery.scanner", "mqi_celery.file_transfer", "mqi_celery.remote_executor",
                "mqi_celery.conductor", "mqi_celery.poller", "mqi_celery.curator", "mqi_celery.reconciler"]
ROUTES = {
    "mqi.scan_inbox": {"queue": "scan"},
    "mqi.upload_case": {"queue": "transfer"},
    "mqi.download_results": {"queue": "transfer"},
    "mqi.submit_beam": {"queue": "execute"},
    "mqi.poll_jobs": {"queue": "control"},
    "mqi.reconcile": {"queue": "control"},
    "mqi.resume_parked": {"queue": "control"},
    "mqi.admit_case": {"queue": "conductor"},
    "mqi.verify_results": {"queue": "conductor"},
    "mqi.finalize_case": {"queue": "conductor"},
    "mqi.stop_case": {"queue": "conductor"},
    "mqi.retry_case": {"queue": "conductor"},
    "mqi.cancel_case": {"queue": "conductor"},
    "mqi.report_system_status": {"queue": "curator"},
}

# How a task's step is named in a reason shown to a user.
STEP_WORDS = {"mqi.upload_case": "upload", "mqi.download_results": "download of the results",
              "mqi.submit_beam": "preparing and submitting a beam", "mqi.verify_results": "verification of the results",
              "mqi.finalize_case": "finishing the case"}


class PipelineTask(Task):
    """Base of every task that works on one case (first argument: ``case_id``).

    Every such task carries ``dispatch``, the case's dispatch it belongs to: it starts by
    extending that dispatch's lease, and skips itself if a later dispatch took over (the
    reconciler re-dispatched the case, or it was retried). A task that fails for good
    stops the case with the reason; an outage of the host parks the case instead."""

    #: ``dispatch`` travels in the kwargs (checked here, never passed to ``run``).
    typing = False
    #: Faults we raise on purpose fail the case with their reason; Celery logs them as
    #: expected (one line), not as crashes with a traceback.
    throws = (MQIError,)

    def __call__(self, *args, **kwargs):
        dispatch = kwargs.pop("dispatch", None)
        case_id = case_id_of(args, kwargs)
        lease = runtime.settings().reconciler.lease_seconds
        if dispatch is not None and runtime.store().hold_lease(case_id, dispatch, lease) is None:
            log.info("%s: skipped, case %s has moved on from dispatch %s", self.name, case_id, dispatch)
            return "skipped: superseded dispatch"
        try:
            return super().__call__(*args, **kwargs)
        except (Retry, Ignore):
            raise
        except Exception as exc:
            if case_id and (isinstance(exc, Held) or host_down(exc)):
                runtime.store().park(case_id, dispatch, str(exc))
                log.warning("%s: case %s waits: %s", self.name, case_id, exc)
                raise Ignore() from exc  # not a success: the rest of the canvas must not run
            if not is_transient(exc):
                raise
            policy = runtime.settings().retry
            if self.request.retries < policy.max_retries:
                delay = backoff(self.request.retries, policy)
                log.warning("%s: transient fault, retry %d/%d in %ss: %s", self.name,
                            self.request.retries + 1, policy.max_retries, delay, exc)
                if dispatch is not None:
                    runtime.store().hold_lease(case_id, dispatch, lease + delay)
                raise self.retry(exc=exc, countdown=delay, max_retries=policy.max_retries) from exc
            if isinstance(exc, MQIError):
                exc.message = f"{exc.message} (gave up after {policy.max_retries} retries)"
            raise

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        """Failed for good: the case stops with the reason, unless the fault is the
        infrastructure's (database, broker): then the reconciler resumes it later."""
        case_id = case_id_of(args, kwargs)
        if not case_id or self.name == "mqi.stop_case":
            return
        if infrastructure_fault(exc):
            log.error("%s: %s; case %s is left to the reconciler", self.name, exc, case_id)
            return
        reason = describe(exc, STEP_WORDS.get(self.name, self.name))
        try:
            self.app.send_task("mqi.stop_case", (case_id, reason))
        except Exception as send_exc:  # noqa: BLE001 - the reconciler comes back to the case
            log.error("could not hand case %s to stop_case (%s); the reconciler will", case_id, send_exc)


def backoff(retries: int, policy) -> float:
    """Exponential, capped, with full jitter when asked (seconds may be fractional; Celery's
    own helper takes whole seconds only)."""
    delay = min(policy.backoff_max_seconds, policy.backoff_seconds * 2 ** retries)
    return round(random.uniform(0, delay) if policy.jitter else delay, 3)


def host_down(exc: BaseException) -> bool:
    """The fault is the host's being unreachable (its breaker is not closed)."""
    from .breaker import HostUnavailable

    if isinstance(exc, HostUnavailable):
        return True
    breaker = runtime.breaker()
    return isinstance(exc, ConnectionError_) and breaker is not None and breaker.state()[0] != "closed"


def infrastructure_fault(exc: BaseException) -> bool:
    """The database or the broker failed, not the case's work."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

    return isinstance(exc, (BrokerError, OperationalError, InterfaceError, DisconnectionError))


@lru_cache(maxsize=1024)
def _trace_id(case_id: str) -> str | None:
    case = runtime.store().get_case(case_id)
    return case.trace_id if case else None


def for_case(case_id: str):
    """Log lines and events inside carry the case's correlation id (for loops over cases)."""
    return logs.bound(_trace_id(case_id))


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
