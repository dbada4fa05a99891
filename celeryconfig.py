"""Celery settings, derived from the mqi YAML configuration.

Operators edit conf/*.yaml, never this file: broker, result backend and intervals come
from there (``MQI_CONFIG``). What stays fixed here are the delivery guarantees the
pipeline relies on.
"""
from kombu import Exchange, Queue

from mqi_celery import context
from mqi_celery.queues import QUEUES, ROUTES

_settings = context.current().settings

broker_url = _settings.broker.url
# No task waits on another's result (no chords): results are not stored, so a database
# outage cannot fail a task that did its work. The backend stays for tools that ask.
result_backend = _settings.broker.result_backend
task_ignore_result = True
# The broker may restart at any time (a RabbitMQ upgrade): workers reconnect for ever.
broker_connection_retry_on_startup = True
broker_connection_max_retries = None
_amqp = _settings.broker.amqp
# Read by mqi_celery.celery_app's signal handlers (the app imports no settings of its own).
mqi_amqp = _amqp
mqi_logging = {"level": _settings.logging.level, "file": _settings.logging.file}
if broker_url.startswith("filesystem"):
    # The embedded broker: message files in a folder (written atomically, see
    # mqi_celery.embedded_broker); control_folder enables ping/inspect.
    broker_transport = "mqi_celery.embedded_broker:Transport"
    _folder = _settings.broker.folder
    for _sub in ("queue", "processed", "control"):
        (_folder / _sub).mkdir(parents=True, exist_ok=True)
    broker_transport_options = {
        "data_folder_in": str(_folder / "queue"),
        "data_folder_out": str(_folder / "queue"),
        "processed_folder": str(_folder / "processed"),
        "store_processed": False,
        "control_folder": str(_folder / "control"),
    }

# Explicit queues and exchange: routing never depends on implicit declarations. On RabbitMQ
# the queues are quorum queues (replicated, durable; delayed retries are held by the broker,
# not in a worker, so a countdown never trips RabbitMQ's consumer_timeout). They need an
# explicit topic exchange for Celery's broker-side delayed delivery, and publisher confirms:
# a publish returns only once RabbitMQ has the message.
_exchange = Exchange("mqi", type="topic" if _amqp else "direct", durable=True)
_queue_args = {"x-queue-type": "quorum"} if _amqp else None
task_queues = [Queue(q, _exchange, routing_key=q, durable=True, queue_arguments=_queue_args) for q in QUEUES]
if _amqp:
    broker_transport_options = {"confirm_publish": True}
task_routes = ROUTES
task_default_queue = "conductor"

task_serializer = result_serializer = "json"
accept_content = ["json"]

# A task is acknowledged only when it finished; a lost worker means redelivery, so every
# step is idempotent (it checks the database before acting).
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_cancel_long_running_tasks_on_connection_loss = True
result_extended = True
# Retry countdowns (retry.backoff_max_seconds, at most a few minutes) stay far below
# RabbitMQ's consumer_timeout (30 min): the pipeline never schedules anything far ahead;
# what must happen later is found again by the reconciler from the database.

# Flower and the Prometheus exporter need task events.
worker_send_task_events = True
task_send_sent_event = True

# Our JSON logger owns the root logger (see mqi_celery.logs).
worker_hijack_root_logger = False
worker_redirect_stdouts = False

beat_schedule_filename = str(_settings.paths.work / "celerybeat-schedule")
beat_schedule = {
    "scan-inbox": {"task": "mqi.scan_inbox", "schedule": _settings.scanner.interval_seconds,
                   "options": {"expires": _settings.scanner.interval_seconds}},
    "poll-jobs": {"task": "mqi.poll_jobs", "schedule": _settings.scheduler.poll_interval_seconds,
                  "options": {"expires": _settings.scheduler.poll_interval_seconds}},
    "reconcile": {"task": "mqi.reconcile", "schedule": _settings.reconciler.interval_seconds,
                  "options": {"expires": _settings.reconciler.interval_seconds}},
    "system-status": {"task": "mqi.report_system_status", "schedule": _settings.curator.interval_seconds,
                      "options": {"expires": _settings.curator.interval_seconds}},
}
