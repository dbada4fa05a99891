"""The Celery application. Its task modules are one per queue (``workers``, ``queues.TASK_MODULES``)."""
import logging
import os
import re
import time
from datetime import datetime

from celery import Celery, signals

from . import logs, metrics
from .queues import TASK_MODULES

app = Celery("mqi_celery", include=TASK_MODULES)
app.config_from_object("celeryconfig")
log = logging.getLogger(__name__)


def _host_back() -> None:
    """The host answers again: its waiting cases go on now, not at the reconciler's next run."""
    try:
        app.send_task("mqi.resume_parked")
    except Exception as exc:  # noqa: BLE001 - the reconciler's next run resumes them
        log.warning("could not ask for the waiting cases to resume: %s", exc)


@signals.worker_init.connect
def _declare_every_queue(**_):
    """On RabbitMQ every queue of the pipeline exists before Celery binds them for delayed
    retries: it binds all of them, also those no worker here consumes, and a missing one
    made it log "Native delayed delivery will not be available" although retries worked."""
    if not app.conf.mqi_amqp:
        return
    try:
        with app.connection_for_write(connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
            channel = conn.default_channel
            for queue in app.amqp.queues.values():
                queue.bind(channel).declare()
    except Exception as exc:  # noqa: BLE001 - the broker is down: the worker connects (and declares) later
        log.info("could not declare the queues at start: %s", exc)


@signals.worker_init.connect
def _resume_when_the_host_is_back(**_):
    # Workers close breakers; a command like `mqi status` imports this module without the
    # breaker's database layer (pool children inherit the hook).
    from .breaker import Breaker

    Breaker.on_close = staticmethod(_host_back)


# RabbitMQ's delayed retries travel with their delay in the routing key ("0.1.0.….transfer").
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


def queue_depths(queues, *, timeout: float = 2.0) -> dict[str, int | None]:
    """Messages waiting in each queue, asked of the broker once; None where it did not say
    (unreachable: one quick attempt, never the workers' endless reconnecting)."""
    depths: dict[str, int | None] = {q: None for q in queues}
    try:
        with app.connection_for_read(connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
            channel = conn.default_channel
            for queue in queues:
                try:
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except Exception:  # noqa: BLE001 - not declared yet: nothing waits in it
                    depths[queue] = 0
                    channel = conn.channel()  # AMQP closed the one that asked
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.info("could not read queue depths: %s", exc)
    return depths


@signals.setup_logging.connect
def _json_logging(**_):
    # Connecting here stops Celery from installing its own handlers: every line is JSON.
    logs.configure(app.conf.mqi_logging["level"], app.conf.mqi_logging["file"])


@signals.worker_process_init.connect
def _fresh_connections(**_):
    # The child's context was dropped at the fork (``context``): it connects anew.
    metrics.count_worker(app.amqp.queues.consume_from)  # a prefork child (or a solo worker) executes tasks


@signals.worker_ready.connect
def _count_threads(sender=None, **_):
    metrics.WORKER_NODES.inc()  # the main process: one per node (celery-exporter counts hosts)
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
    queue = _DELAY_PREFIX.sub("", (task.request.delivery_info or {}).get("routing_key") or "unknown")
    metrics.QUEUE_WAIT.labels(queue=queue).observe(max(0.0, time.time() - due))


@signals.task_postrun.connect
def _task_finished(task_id=None, task=None, **_):
    started = _started.pop(task_id, None)
    step = metrics.TASK_STEPS.get(getattr(task, "name", ""))
    if started is not None and step:
        metrics.STEP.labels(step=step).observe(time.monotonic() - started)
