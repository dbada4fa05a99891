"""How every pipeline task is registered: queues, routes, retry policy, correlation id.

One place owns the retry rule (transient faults: exponential backoff with jitter, within
the configured budget; permanent faults: fail at once), so no task invents its own.
"""
from __future__ import annotations

import logging
from functools import lru_cache

from celery import Task, signals
from celery.exceptions import Retry
from celery.utils.time import get_exponential_backoff_interval

from . import logs, runtime
from .errors import MQIError, is_transient

log = logging.getLogger(__name__)

QUEUES = ("scan", "transfer", "execute", "conductor", "curator")
TASK_MODULES = ["mqi_celery.scanner", "mqi_celery.file_transfer", "mqi_celery.remote_executor",
                "mqi_celery.conductor", "mqi_celery.curator"]
ROUTES = {
    "mqi.scan_inbox": {"queue": "scan"},
    "mqi.upload_case": {"queue": "transfer"},
    "mqi.download_results": {"queue": "transfer"},
    "mqi.prepare_input": {"queue": "execute"},
    "mqi.submit_job": {"queue": "execute"},
    "mqi.wait_for_job": {"queue": "execute"},
    "mqi.poll_jobs": {"queue": "execute"},
    "mqi.verify_results": {"queue": "conductor"},
    "mqi.finalize_case": {"queue": "conductor"},
    "mqi.handle_failure": {"queue": "conductor"},
    "mqi.stop_case": {"queue": "conductor"},
    "mqi.report_system_status": {"queue": "curator"},
}


class PipelineTask(Task):
    """Base of every task that works on one case (first argument: ``case_id``)."""

    #: A polling task retries transient faults at its poll interval, bounded by its own
    #: deadline, because its retry counter already counts polls.
    polling = False
    #: ``attempt`` travels in the kwargs (checked here, never passed to ``run``).
    typing = False

    def __call__(self, *args, **kwargs):
        attempt = kwargs.pop("attempt", None)
        if attempt is not None and _superseded(case_id_of(args, kwargs), attempt):
            # A task of an earlier run of this case (cancelled, then retried) woke up late.
            log.info("%s: skipped, the case has moved on from attempt %s", self.name, attempt)
            return "skipped: superseded attempt"
        try:
            return super().__call__(*args, **kwargs)
        except Retry:
            raise
        except Exception as exc:
            budget = runtime.settings().retry.max_retries
            if not is_transient(exc):
                raise
            if self.polling:
                log.warning("%s: transient fault while polling: %s", self.name, exc)
                raise self.retry(exc=exc, countdown=runtime.settings().scheduler.poll_interval_seconds,
                                 max_retries=None) from exc
            if self.request.retries < budget:
                policy = runtime.settings().retry
                delay = get_exponential_backoff_interval(policy.backoff_seconds, self.request.retries,
                                                         policy.backoff_max_seconds, policy.jitter)
                log.warning("%s: transient fault, retry %d/%d in %ss: %s", self.name,
                            self.request.retries + 1, budget, delay, exc)
                raise self.retry(exc=exc, countdown=delay, max_retries=budget) from exc
            if isinstance(exc, MQIError):
                exc.message = f"{exc.message} (gave up after {budget} retries)"
            raise


def _superseded(case_id: str | None, attempt: int) -> bool:
    case = runtime.store().get_case(case_id) if case_id else None
    return case is not None and case.attempts != attempt


@lru_cache(maxsize=1024)
def _trace_id(case_id: str) -> str | None:
    case = runtime.store().get_case(case_id)
    return case.trace_id if case else None


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
