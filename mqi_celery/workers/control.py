"""Queue ``control``: the poller and the reconciler, on a queue of their own so that
noticing a finished job or a stuck case never waits behind transfers or submissions."""
from .. import context, poller, reconciler
from ..celery_app import app
from .base import PeriodicTask


@app.task(name="mqi.poll_jobs", base=PeriodicTask, ignore_result=True)
def poll_jobs() -> int:
    return poller.poll_jobs(context.current())


@app.task(name="mqi.reconcile", base=PeriodicTask, ignore_result=True)
def reconcile(startup: bool = False) -> dict:
    return reconciler.reconcile_once(context.current(), startup=startup)


@app.task(name="mqi.resume_parked", base=PeriodicTask, ignore_result=True)
def resume_parked() -> int:
    """On request: a transfer ended, or the host is back, and cases wait for it."""
    return reconciler.resume_parked(context.current())
