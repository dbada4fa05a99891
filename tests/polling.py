"""Waiting on a state with a deadline (never a bare sleep)."""
from __future__ import annotations

import time


def poll_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Return predicate()'s first truthy value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
