"""Queue ``conductor``: a case's validation, the checks and report after its download, and
the case-level commands (stop, and retry/cancel for Flower's HTTP API)."""
from .. import conductor, context
from ..celery_app import app
from .base import PipelineTask


@app.task(name="mqi.admit_case", base=PipelineTask, ignore_result=True, bind=True)
def admit_case(self, case_id: str) -> bool:
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    return conductor.admit_registered(context.current(), case_id, redelivered=redelivered)


@app.task(name="mqi.verify_results", base=PipelineTask)
def verify_results(case_id: str) -> str:
    return conductor.verify(context.current(), case_id)


@app.task(name="mqi.finalize_case", base=PipelineTask)
def finalize_case(case_id: str) -> str:
    return conductor.finalize(context.current(), case_id)


@app.task(name="mqi.stop_case", base=PipelineTask)
def stop_case(case_id: str, reason: str) -> bool:
    return conductor.fail_case(context.current(), case_id, reason)


@app.task(name="mqi.retry_case")
def retry_case(case_id: str) -> str:
    """``mqi cases retry`` as a task (callable from Flower's HTTP API)."""
    return conductor.retry_case(context.current(), case_id).status.value


@app.task(name="mqi.cancel_case")
def cancel_case(case_id: str) -> bool:
    return conductor.cancel_case(context.current(), case_id)
