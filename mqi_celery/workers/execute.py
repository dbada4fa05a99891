"""Queue ``execute``: a beam's MOQUI input written and its run submitted (``remote_executor``)."""
import logging

from celery.exceptions import Reject

from .. import context, remote_executor
from ..celery_app import app
from .base import PipelineTask

log = logging.getLogger(__name__)


class SubmitTask(PipelineTask):
    def hand_over(self, case_id, args, dispatch, reason) -> None:
        """A submit the broker did not take goes to the poller (its siblings may still run,
        so the case is not dispatched again); without the database either, the broker
        keeps the message."""
        try:
            remote_executor.hand_to_poller(context.current(), case_id, args[1], reason)
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.error("submit of beam %s of %s: %s; the message goes back to the broker (%s)", args[1], case_id,
                      reason, exc)
            raise Reject(reason, requeue=True) from exc


@app.task(name="mqi.submit_beam", base=SubmitTask)
def submit_beam(case_id: str, beam: int) -> str:
    return remote_executor.submit_beam(context.current(), case_id, beam)
