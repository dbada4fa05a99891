"""Queue ``curator``: readings of the host and the system picture (``curator``)."""
from .. import admission, context, curator
from ..celery_app import app
from .base import PeriodicTask


@app.task(name="mqi.read_host", base=PeriodicTask, ignore_result=True)
def read_host() -> None:
    """A reading on request (the poller's GPUs grew too old to claim one); the curator's
    queue, so no poll ever waits on a host that may hang."""
    admission.take_reading(context.current())


@app.task(name="mqi.report_system_status", base=PeriodicTask, ignore_result=True)
def report_system_status() -> dict:
    return curator.report_system_status(context.current())
