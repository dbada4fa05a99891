"""The Celery application. Task modules are one per component (see ``tasks.TASK_MODULES``)."""
from celery import Celery, signals

from . import logs, runtime
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
