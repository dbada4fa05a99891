"""Queue ``qa``: each beam's recomputed dose against the planned dose (``qa_evaluator``)."""
from .. import context, qa_evaluator
from ..celery_app import app
from .base import PipelineTask


@app.task(name="mqi.evaluate_case", base=PipelineTask)
def evaluate_case(case_id: str) -> str:
    """The verdict (Flower shows it as the task's result)."""
    return qa_evaluator.evaluate_case(context.current(), case_id)
