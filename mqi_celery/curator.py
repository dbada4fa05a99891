"""System Curator (celery beat, queue ``curator``): every ``curator.interval_seconds`` it
reads the host (GPUs, disk, Slurm nodes: one command, see ``readings``), stores the
reading, releases claims whose job is gone, resumes cases that waited for the host once it
admits them, and publishes the interpreted picture as ``system_status_update``.
``mqi status`` shows the same picture.
"""
from __future__ import annotations

import logging

from . import messages
from .reconciler import resume_parked
from .status_view import system_status

log = logging.getLogger(__name__)


def report_system_status(ctx) -> dict:
    """Release claims whose job is gone, resume what waited for the host (the reconciler's
    own rule), and publish the picture."""
    settings, store = ctx.settings, ctx.store
    for host, resource, case_id in store.reclaim_claims(settings.curator.claim_grace_seconds):
        log.warning("released %s on %s: its job (case %s) holds no run after %.0f s", resource, host, case_id,
                    settings.curator.claim_grace_seconds)
        messages.emit(ctx, "claim_released", {"host": host, "resource": resource}, case_id=case_id)
    status = system_status(ctx, store)
    resume_parked(ctx)
    return messages.emit(ctx, "system_status_update", status)
