"""System Curator (celery beat, queue ``curator``): every ``curator.interval_seconds`` it
reads the host (GPUs, disk, Slurm nodes: one command, see ``readings``), stores the
reading, releases claims whose job is gone, resumes cases that waited for the host once it
admits them, and publishes the interpreted picture as ``system_status_update``.
``mqi status`` shows the same picture.
"""
from __future__ import annotations

import logging
import shutil

from . import admission, messages, runtime
from .celery_app import app
from .models import CaseStatus, JobStatus

log = logging.getLogger(__name__)


def host_status(reading: dict | None, read_at=None) -> dict:
    """The reading, interpreted: each GPU free, ours or someone else's; whether the host
    takes new work and, if not, why."""
    settings, store, host = runtime.settings(), runtime.store(), runtime.host()
    reading = reading or {}
    claims = store.claims(host.name)
    gpu_part, disk, nodes = reading.get("gpus") or {}, reading.get("disk") or {}, reading.get("nodes") or {}
    gpus = [_gpu(d, reading, claims, settings.engine.gpu_ids) for d in gpu_part.get("devices", ())]
    breaker = runtime.breaker()
    state, _, error = breaker.state() if breaker is not None else ("closed", None, None)
    hold = f"host unreachable ({error})" if state != "closed" else admission.host_hold(reading)
    unknown = [f"{name}: {part['reason']}" for name, part in (("GPUs", gpu_part), ("disk", disk), ("Slurm", nodes))
               if part.get("state") == "unknown"]
    results = settings.paths.results
    results.mkdir(parents=True, exist_ok=True)
    return {
        "host": host.name, "read_at": read_at.isoformat() + "Z" if read_at else None,
        "scheduler": settings.scheduler.kind,
        "gpus": gpus, "gpu_state": gpu_part.get("state"), "gpu_note": gpu_part.get("reason"), "free_gpus": sum(g["state"] == "free" for g in gpus),
        "disk_free": disk.get("free_bytes"), "disk_total": disk.get("total_bytes"), "disk_mount": disk.get("mount"),
        "results_disk_free": shutil.disk_usage(results).free,
        "scheduler_up": (nodes.get("state") == "ok") if settings.scheduler.kind == "slurm" else
        (None if not reading or disk.get("state") == "unknown" else True),
        "partition": nodes.get("partition"), "nodes": nodes.get("nodes", []),
        "breaker": state, "accepting_work": hold is None, "reason": hold, "unknown": unknown,
        "claims": {resource: {"case_id": c, "beam": b} for resource, (c, b) in sorted(claims.items())},
    }


def _gpu(device: dict, reading: dict, claims: dict, allowed) -> dict:
    holder = claims.get(f"gpu:{device['index']}")
    if allowed is not None and device["index"] not in allowed:
        state = "excluded"
    elif holder:
        state = "ours"
    elif admission.foreign_busy(device, reading):
        state = "busy"
    else:
        state = "free"
    total, used = device.get("memory_total_mib"), device.get("memory_used_mib")
    free = device.get("memory_free_mib")
    return {**device, "memory_free_mib": free if free is not None else (total - used if total and used is not None
                                                                          else None),
            "state": state, "claimed_by": {"case_id": holder[0], "beam": holder[1]} if holder else None}


def system_status(*, refresh: bool = True) -> dict:
    """The host's picture (a new reading unless ``refresh`` is false) and the work in flight."""
    store = runtime.store()
    if refresh:
        admission.take_reading()
    reading, read_at = store.reading(runtime.host().name)
    cases, jobs = store.count_by_status()
    return {**host_status(reading, read_at),
            "cases": {s.value: cases.get(s.value, 0) for s in CaseStatus},
            "jobs": {s.value: jobs.get(s.value, 0) for s in JobStatus},
            "waiting": store.waiting_cases()}


@app.task(name="mqi.report_system_status", ignore_result=True)
def report_system_status() -> dict:
    from .reconciler import resume_parked  # the reconciler's own rule for cases that waited

    settings, store = runtime.settings(), runtime.store()
    for host, resource, case_id in store.reclaim_claims(settings.curator.claim_grace_seconds):
        log.warning("released %s on %s: its job (case %s) holds no run after %.0f s", resource, host, case_id,
                    settings.curator.claim_grace_seconds)
        messages.emit("claim_released", {"host": host, "resource": resource}, case_id=case_id)
    status = system_status()
    resume_parked()
    return messages.emit("system_status_update", status)
