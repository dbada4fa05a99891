"""Queue ``transfer``: a case up to the host, its results down (``file_transfer``)."""
from .. import context, file_transfer
from ..celery_app import app
from .base import PipelineTask


@app.task(name="mqi.upload_case", base=PipelineTask, bind=True)
def upload_case(self, case_id: str) -> str:
    return file_transfer.upload_case(context.current(), case_id, attempt=self.request.retries)


@app.task(name="mqi.download_results", base=PipelineTask)
def download_results(case_id: str) -> str:
    """Fetch the results of every beam that completed (failed beams have none)."""
    return file_transfer.download_results(context.current(), case_id)
