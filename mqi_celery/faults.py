"""Fault injection for crash tests: the process kills itself (SIGKILL) at a named point.

Active only when ``MQI_FAULT_INJECT=<point>:<flag file>`` is set and the flag file exists;
the file is removed first, so the fault fires once and the redelivered task then runs
normally. Production never sets the variable.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


def point(name: str) -> None:
    spec = os.environ.get("MQI_FAULT_INJECT", "")
    wanted, _, flag = spec.partition(":")
    if wanted != name or not flag:
        return
    try:
        Path(flag).unlink()
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
