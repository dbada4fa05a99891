"""System Curator (celery beat, queue ``curator``): every ``curator.interval_seconds`` it
reads the host (GPUs, disk, Slurm nodes: one command, see ``readings``), stores the
reading, releases claims whose job is gone, resumes cases that waited for the host once it
admits them, and publishes the interpreted picture as ``system_status_update``.
``mqi status`` shows the same picture.
"""
from __future__ import annotations

import logging

from . import admission, messages, runtime
from .celery_app import app
from .tasks import PeriodicTask
from .status_view import system_status

log = logging.getLogger(__name__)


@app.task(name="mqi.read_host", base=PeriodicTask, ignore_result=True)
def read_host() -> None:
    """A reading on request (the poller's GPUs grew too old to claim one); the curator's
    queue, so no poll ever waits on a host that may hang."""
    admission.take_reading()


@app.task(name="mqi.report_system_status", base=PeriodicTask, ignore_result=True)
def report_system_status() -> dict:
    from .reconciler import resume_parked  # the reconciler's own rule for cases that waited

    settings, store = runtime.settings(), runtime.store()
    for host, resource, case_id in store.reclaim_claims(settings.curator.claim_grace_seconds):
        log.warning("released %s on %s: its job (case %s) holds no run after %.0f s", resource, host, case_id,
                    settings.curator.claim_grace_seconds)
        messages.emit("claim_released", {"host": host, "resource": resource}, case_id=case_id)
    status = system_status(store)
    resume_parked()
    return messages.emit("system_status_update", status)
