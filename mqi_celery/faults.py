"""Fault injection for crash tests: the process dies (or freezes) at a named point.

``MQI_FAULT_INJECT=<point>:<flag file>[,<point>:<flag file>...]`` arms points; each fires
once, when its flag file exists (the file is removed first, so the redelivered task then
runs normally). ``MQI_FAULT_ACTION`` says what happens: ``kill`` (SIGKILL this process,
the default), ``kill-group`` (SIGKILL its whole process group: a worker with its pool) or
``stop`` (SIGSTOP: the test acts while the task is frozen, then resumes or kills it).
Production never sets these variables.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


def point(name: str) -> None:
    spec = os.environ.get("MQI_FAULT_INJECT", "")
    if not spec:
        return
    for item in spec.split(","):
        wanted, _, flag = item.partition(":")
        if wanted != name or not flag:
            continue
        try:
            Path(flag).unlink()
        except FileNotFoundError:
            return
        action = os.environ.get("MQI_FAULT_ACTION", "kill")
        if action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "kill-group":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
        return
