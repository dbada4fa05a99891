"""How the domain's work reaches the broker (``context.Sender``, implemented with Celery)."""
from __future__ import annotations

from collections.abc import Iterable

from celery import chain, group

from ..lifecycle import Stage
from ..models import JobStatus


def workflow(app, case):
    """The canvas that carries a case on from the stage it is in (by task name):

        upload ─► submit (one task per beam) ─► run (no task: the poller watches) ─► collect
        collect: download ─► verify ─► evaluate (QA, queue qa) ─► finalize
    """
    cid, n = case.case_id, case.dispatch

    def step(task: str, *args):
        return app.signature(task, args=(cid, *args), kwargs={"dispatch": n}, immutable=True)
    upload = step("mqi.upload_case")
    pending = [step("mqi.submit_beam", j.beam) for j in case.jobs if j.status is JobStatus.PENDING]
    submit = group(pending) if pending else None
    collect = chain(step("mqi.download_results"), step("mqi.verify_results"), step("mqi.evaluate_case"),
                    step("mqi.finalize_case"))
    return {Stage.UPLOAD: chain(upload, submit) if submit else upload,
            Stage.SUBMIT: submit,
            Stage.RUN: None,
            Stage.COLLECT: collect}[case.stage]


class CelerySender:
    def __init__(self, app=None):
        if app is None:
            from ..celery_app import app
        self.app = app

    def send(self, task: str, *args, **options) -> None:
        self.app.send_task(task, args, **options)

    def send_stage(self, case) -> bool:
        canvas = workflow(self.app, case)
        if canvas is None:
            return False
        canvas.apply_async()
        return True

    def publish(self, exchange: str, routing_key: str, message: dict) -> None:
        from kombu import Exchange

        topic = Exchange(exchange, type="topic", durable=True)
        with self.app.producer_or_acquire() as producer:
            producer.publish(message, exchange=topic, routing_key=routing_key, declare=[topic],
                             serializer="json", retry=True, retry_policy={"max_retries": 2})

    def queue_depths(self, queues: Iterable[str], *, timeout: float = 2.0) -> dict[str, int | None]:
        from ..celery_app import queue_depths

        return queue_depths(queues, timeout=timeout)
