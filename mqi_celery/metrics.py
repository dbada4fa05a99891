"""Metrics for Prometheus (prometheus-client).

Every process of a host records into its own files under ``metrics.multiproc_dir``
(prometheus-client's multiprocess mode, so prefork children count); ``metrics_endpoint``
serves them as the host's one endpoint. Labels are bounded sets (statuses, steps, queues,
hosts): never a case id.
"""
from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from .config_loading import load_settings
from .errors import ConfigError


def _multiproc_dir() -> str | None:
    """Where this process's samples go; set before prometheus_client is imported, which
    reads it once. Off (samples stay in memory, unseen) unless an endpoint is configured."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        settings = load_settings()
    except ConfigError:  # reported where the configuration is used; metrics stay in memory
        return None
    if settings.metrics.port is None and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return None
    folder = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(settings.metrics.multiproc_dir))
    os.makedirs(folder, exist_ok=True)
    return folder


_multiproc_dir()
from prometheus_client import Counter, Gauge, Histogram  # noqa: E402 - after the directory is set

_CASE_BUCKETS = (30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 7200, 14400, 28800)
_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

CASES = Counter("mqi_cases", "Cases that reached a final status", ["status"])
ACTIVE_WORKERS = Gauge("mqi_active_workers", "Worker processes executing the tasks of each queue", ["queue"],
                       multiprocess_mode="livesum")
WORKER_NODES = Gauge("mqi_worker_nodes", "Celery worker nodes running (one per `celery worker`, its pool included)",
                     multiprocess_mode="livesum")
PROCESSING = Histogram("mqi_processing_duration_seconds", "A case from registration to its final status",
                       buckets=_CASE_BUCKETS)
STEP = Histogram("mqi_step_duration_seconds", "One step of a case: a task, or a beam's run on the cluster",
                 ["step"], buckets=_STEP_BUCKETS)
FAILURES = Counter("mqi_case_failures", "Cases that failed, by the step they failed in", ["step"])
QUEUE_WAIT = Histogram("mqi_queue_wait_seconds", "Time a task waited in its queue before a worker took it",
                       ["queue"], buckets=_STEP_BUCKETS)
TRANSFER_BYTES = Counter("mqi_transfer_bytes", "Bytes sent to (up) or received from (down) the cluster",
                         ["direction"])
TRANSFER_SECONDS = Counter("mqi_transfer_seconds", "Time spent sending or receiving case files", ["direction"])
SSH_CONNECTIONS = Counter("mqi_ssh_connections_opened", "SSH connections opened (handshakes with a host)",
                          ["host"])
SCHEDULER_QUERIES = Counter("mqi_scheduler_queries", "Commands sent to a host's scheduler", ["host", "command"])
QA_PASS_RATE = Histogram("mqi_qa_gamma_pass_rate", "Gamma passing rate (%) of each evaluated beam (or plan dose)",
                         buckets=(50, 80, 85, 90, 92.5, 95, 97, 98, 99, 99.5, 100))
QA_VERDICTS = Counter("mqi_qa_verdicts", "Cases evaluated, by their QA verdict", ["verdict"])

for _status in ("COMPLETED", "FAILED"):  # both series exist from the start (rates need them)
    CASES.labels(status=_status)

# The step names a failure is counted under (anything else: "other").
FAILURE_STEPS = ("validation", "queued", "uploading", "uploaded", "submitting", "submitted", "input written",
                 "running", "finished", "downloading", "verifying", "evaluating", "stopped")
TASK_STEPS = {"mqi.upload_case": "upload", "mqi.submit_beam": "submit", "mqi.download_results": "download",
              "mqi.verify_results": "verify", "mqi.evaluate_case": "evaluate", "mqi.finalize_case": "finalize",
              "mqi.poll_jobs": "poll",
              "mqi.scan_inbox": "scan", "mqi.reconcile": "reconcile"}


def case_finished(status: str, created_at: datetime | None, step: str | None) -> None:
    """A case reached COMPLETED or FAILED (``step``: where it was when it failed)."""
    from .db import utcnow

    CASES.labels(status=status).inc()
    if created_at is not None:
        PROCESSING.observe(max(0.0, (utcnow() - created_at).total_seconds()))
    if status == "FAILED":
        FAILURES.labels(step=step if step in FAILURE_STEPS else "other").inc()


def count_worker(queues, processes: int = 1) -> None:
    """This process executes tasks of these queues (a prefork child, or a solo worker)."""
    for queue in queues:
        ACTIVE_WORKERS.labels(queue=queue).inc(processes)


def process_gone(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def reset_directory(folder: Path) -> None:
    """Start a host's run with no samples of an earlier one (their processes are gone)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
