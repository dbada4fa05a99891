"""The supervisor of `mqi up` stops on SIGTERM whatever it is doing when the signal comes,
including waiting for the workers' ping replies (a fault handler there once swallowed it)."""
from __future__ import annotations

import os
import signal
import threading

from mqi_celery import context, process_manager
from mqi_celery.process_manager import Program


def test_sigterm_during_a_ping_stops_every_child(config_file, monkeypatch):
    settings = context.current().settings
    pings = []

    def ping_that_fails(children, deadline):
        pings.append(deadline)
        try:  # as a broker fault handler would: every Exception is taken for the broker's
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(0.2)  # the handler runs here, inside the ping
        except Exception:  # noqa: BLE001
            pass
        return []

    monkeypatch.setattr(process_manager, "_replace_silent", ping_that_fails)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    said, done = [], threading.Event()
    try:
        process_manager.up(settings, [Program("sleeper", ["sleep", "600"], node="sleeper@here")], say=said.append)
        done.set()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert done.is_set() and len(pings) == 1
    assert said[-2:] == ["stopping: running tasks may finish (warm shutdown)", "stopped"]
