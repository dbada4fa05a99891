"""The Celery application. Task modules are one per component (see ``tasks.TASK_MODULES``)."""
import os
import time
from datetime import datetime

from celery import Celery, signals

from . import logs, metrics, runtime
from .tasks import TASK_MODULES

app = Celery("mqi_celery", include=TASK_MODULES)
app.config_from_object("celeryconfig")


@signals.setup_logging.connect
def _json_logging(**_):
    # Connecting here stops Celery from installing its own handlers: every line is JSON.
    s = runtime.settings()
    logs.configure(s.logging.level, s.logging.file)


@signals.worker_process_init.connect
def _fresh_connections(**_):
    runtime.reset()
    metrics.count_worker(app.amqp.queues.consume_from)  # a prefork child (or a solo worker) executes tasks


@signals.worker_ready.connect
def _count_threads(sender=None, **_):
    pool = sender.pool if sender is not None else None
    if pool is not None and type(pool).__module__.endswith("thread"):  # no worker_process_init there
        metrics.count_worker(app.amqp.queues.consume_from, pool.limit)


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _worker_gone(**_):
    metrics.process_gone(os.getpid())


# --- per-step durations and queue waits -----------------------------------------------------
_started: dict[str, float] = {}


@signals.before_task_publish.connect
def _stamp(headers=None, **_):
    if headers is not None:
        headers["mqi_sent_at"] = time.time()


@signals.task_prerun.connect
def _task_started(task_id=None, task=None, **_):
    _started[task_id] = time.monotonic()
    sent = getattr(task.request, "mqi_sent_at", None)
    if sent is None:
        return
    eta = task.request.eta
    due = max(sent, datetime.fromisoformat(eta).timestamp()) if isinstance(eta, str) else sent
    queue = (task.request.delivery_info or {}).get("routing_key") or "unknown"
    metrics.QUEUE_WAIT.labels(queue=queue).observe(max(0.0, time.time() - due))


@signals.task_postrun.connect
def _task_finished(task_id=None, task=None, **_):
    started = _started.pop(task_id, None)
    step = metrics.TASK_STEPS.get(getattr(task, "name", ""))
    if started is not None and step:
        metrics.STEP.labels(step=step).observe(time.monotonic() - started)
