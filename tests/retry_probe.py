"""Three pipeline tasks for the retry test (loaded into a real worker with ``-I``): each
fails its first run with a transient fault, so the one retry rule (``workers.base.PipelineTask``)
schedules a retry, and records every run in the file ``MQI_PROBE_LOG``."""
from __future__ import annotations

import os
import time

from mqi_celery.celery_app import app
from mqi_celery.errors import TransferError
from mqi_celery.workers.base import PipelineTask


def _run(kind: str, case_id: str, retries: int) -> str:
    with open(os.environ["MQI_PROBE_LOG"], "a") as log:  # one short line: an atomic append
        log.write(f"{kind} {case_id} {retries} {time.time():.3f}\n")
    if retries == 0:
        raise TransferError(f"probe {kind} {case_id}: transient on its first run")
    return "done"


@app.task(name="mqi.probe_upload", base=PipelineTask, bind=True)
def probe_upload(self, case_id: str) -> str:
    return _run("upload", case_id, self.request.retries)


@app.task(name="mqi.probe_submit", base=PipelineTask, bind=True)
def probe_submit(self, case_id: str) -> str:
    return _run("submit", case_id, self.request.retries)


@app.task(name="mqi.probe_download", base=PipelineTask, bind=True)
def probe_download(self, case_id: str) -> str:
    return _run("download", case_id, self.request.retries)
