"""Where each task's messages go: the queues, the task modules and the routes (no Celery
import here: the app, its configuration, the Process Manager and `mqi status` read them)."""

# "control" is the poller and the reconciler: the loop that notices finished jobs and
# stuck cases must never queue behind transfers or engine submissions.
# "qa" is the gamma analysis: CPU work that must never delay a transfer or a poll.
QUEUES = ("scan", "transfer", "execute", "conductor", "curator", "control", "qa")
TASK_MODULES = [f"mqi_celery.workers.{name}" for name in ("scan", "transfer", "execute", "conductor", "control",
                                                          "curator", "qa")]
ROUTES = {
    "mqi.scan_inbox": {"queue": "scan"},
    "mqi.upload_case": {"queue": "transfer"},
    "mqi.download_results": {"queue": "transfer"},
    "mqi.submit_beam": {"queue": "execute"},
    "mqi.poll_jobs": {"queue": "control"},
    "mqi.reconcile": {"queue": "control"},
    "mqi.resume_parked": {"queue": "control"},
    "mqi.admit_case": {"queue": "conductor"},
    "mqi.verify_results": {"queue": "conductor"},
    "mqi.evaluate_case": {"queue": "qa"},
    "mqi.finalize_case": {"queue": "conductor"},
    "mqi.stop_case": {"queue": "conductor"},
    "mqi.retry_case": {"queue": "conductor"},
    "mqi.cancel_case": {"queue": "conductor"},
    "mqi.report_system_status": {"queue": "curator"},
    "mqi.read_host": {"queue": "curator"},
}
