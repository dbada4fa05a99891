"""Retries the broker keeps: on RabbitMQ (quorum queues, broker-side delayed delivery) a
countdown below one second is refused by kombu and Celery drops the retry. With the
shipped policy (jitter on, backoff 2 s: first delays drawn from [0, 2) s before this was
fixed), 300 retries of three task types on three queues each run again, within their
delay, none rejected and none left for a lease to expire."""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.polling import poll_until
from tests.services import CELERY, rabbitmq_vhost

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
KINDS = {"upload": "transfer", "submit": "execute", "download": "conductor"}


def test_three_hundred_jittered_retries_all_run_again_on_rabbitmq(tmp_path, config_file):
    import subprocess

    probe_log = tmp_path / "runs.log"
    probe_log.touch()
    with rabbitmq_vhost() as broker:
        config = config_file(broker={"url": broker, "folder": str(tmp_path / "unused")},
                             retry={"max_retries": 5, "backoff_seconds": 2.0, "backoff_max_seconds": 120.0,
                                    "jitter": True})
        env = {**os.environ, "MQI_CONFIG": str(config), "MQI_PROBE_LOG": str(probe_log),
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        worker_log = tmp_path / "worker.log"
        with open(worker_log, "ab") as out:
            worker = subprocess.Popen([*CELERY, "worker", "-I", "tests.retry_probe", "-Q", ",".join(KINDS.values()),
                                       "-n", "probe@%h", "--pool", "threads", "--concurrency", "8", "--loglevel", "INFO"],
                                      cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        try:
            sender = subprocess.run([sys.executable, "-c", SEND], cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=300)
            assert sender.returncode == 0, sender.stderr

            def runs():
                seen = defaultdict(list)
                for line in probe_log.read_text().splitlines():
                    kind, case_id, retries, at = line.split()
                    seen[(kind, case_id)].append((int(retries), float(at)))
                return seen
            try:
                poll_until(lambda: sum(len(r) >= 2 for r in runs().values()) == 300, 300, 1.0,
                           "every probe task to run a second time")
            except AssertionError as exc:
                seen, lines = runs(), worker_log.read_text().splitlines()
                odd = [line for line in lines if '"levelname": "INFO"' not in line][-20:]
                raise AssertionError(f"{exc}: {len(seen)} ran once, {sum(len(r) >= 2 for r in seen.values())} twice; "
                                     "the worker's last lines other than INFO:\n" + "\n".join(odd)) from None
        finally:
            worker.terminate()
            worker.wait(60)
    seen = runs()
    assert len(seen) == 300 and {kind for kind, _ in seen} == set(KINDS)
    delays = sorted(second - first for (_, first), (_, second) in (sorted(r)[:2] for r in seen.values()))
    text = worker_log.read_text()
    print(f"FAULT-REPORT retries on RabbitMQ: 300 retried, 300 ran again, delay min {delays[0]:.2f} s, "
          f"max {delays[-1]:.2f} s, rejected {text.count('reject requeue=False')}")
    assert all(sorted(r)[:2][0][0] == 0 and sorted(r)[:2][1][0] == 1 for r in seen.values())
    assert "reject requeue=False" not in text and "countdown must be a positive number" not in text
    # Every queue exists before Celery binds them all for delayed delivery (also those this
    # worker does not consume): no "will not be available" line to mislead an operator.
    assert "Failed to bind queue" not in text and "will not be available" not in text
    assert "handed to the reconciler" not in text and "goes back to the broker" not in text
    # Whole seconds of at least one (the transport's floor), never a lease's wait.
    assert delays[0] >= 0.9 and delays[-1] < 60, (delays[0], delays[-1])


SEND = f"""
from mqi_celery.celery_app import app
for n in range(100):
    for kind, queue in {KINDS!r}.items():
        app.send_task(f"mqi.probe_{{kind}}", (f"probe{{n:03d}}",), queue=queue)
"""
