"""Process Manager: runs and supervises the Celery processes of an installation.

``mqi run`` is the embedded all-in-one: one worker consuming every work queue with beat
inside it, and one worker for the control loop (poller and reconciler) so that noticing a
finished job never waits behind transfers; each restarted if it dies, both stopped cleanly
(warm shutdown) on Ctrl-C.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .config import Settings
from .tasks import QUEUES


WORK_QUEUES = tuple(q for q in QUEUES if q != "control")


def worker_command(settings: Settings, *, queues=WORK_QUEUES, beat: bool = True, name: str = "mqi-all",
                   pool: str | None = None, concurrency: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "mqi_celery", "worker", "-Q", ",".join(queues),
           "--pool", pool or settings.worker.pool, "--concurrency", str(concurrency or settings.worker.concurrency),
           "--loglevel", settings.worker.log_level, "--hostname", f"{name}@%h"]
    if beat:
        cmd += ["--beat", "--schedule", str(settings.paths.work / "celerybeat-schedule")]
    return cmd


def control_worker_command(settings: Settings) -> list[str]:
    """The control loop: one process, one task at a time (a poll or a reconcile run)."""
    return worker_command(settings, queues=("control",), beat=False, name="mqi-control", pool="solo",
                          concurrency=1)


def _die_with_parent() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Supervised:
    """One child process, restarted with backoff when it exits on its own."""

    def __init__(self, command: list[str], log_file: Path, env: dict[str, str]):
        self.command, self.log_file, self.env = command, log_file, env
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._next_start = 0.0

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            # Own session (Ctrl-C reaches us, and we stop it warmly), but it dies with us: a
            # SIGKILLed `mqi run` must not leave workers behind to race a new one.
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    def check(self) -> str | None:
        """Restart a dead child; returns a message when that happened."""
        if self.proc is None or self.proc.poll() is None:
            return None
        now = time.monotonic()
        if now < self._next_start:
            return None
        code = self.proc.returncode
        self.restarts += 1
        self._next_start = now + min(60, 2 ** self.restarts)
        self.start()
        return f"worker exited with code {code}; restarted (see {self.log_file})"

    def stop(self, grace: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown: finish running tasks
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
