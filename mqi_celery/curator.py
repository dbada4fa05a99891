"""System Curator (celery beat, queue ``curator``): a periodic picture of the system —
cases per status, jobs running, free disk where results land — as a
``system_status_update`` message. GPU/disk-aware admission builds on this later."""
from __future__ import annotations

import shutil
from collections import Counter

from . import messages, runtime
from .celery_app import app
from .models import CaseStatus, JobStatus


def system_status() -> dict:
    settings, store = runtime.settings(), runtime.store()
    cases = store.list_cases()
    by_status = Counter(c.status.value for c in cases)
    results = settings.paths.results
    results.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(results)
    return {
        "cases": {s.value: by_status.get(s.value, 0) for s in CaseStatus},
        "jobs_running": sum(1 for c in cases for j in c.jobs if j.status is JobStatus.RUNNING),
        "results_disk_free_bytes": disk.free,
    }


@app.task(name="mqi.report_system_status", ignore_result=True)
def report_system_status() -> dict:
    return messages.emit("system_status_update", system_status())
