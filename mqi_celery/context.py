"""The collaborators a domain function works with, in one explicit object.

``Context`` holds the settings and builds, on first use, the state store, the engine host
(guarded by its circuit breaker), the scheduler and the sender (how work reaches the
broker: the only door to Celery a domain module has). A worker process builds one
(``current()``) and passes it down; a forked child builds its own (a database pool or a
network connection is never shared across a fork). Tests construct one directly from
the settings they want, and may give it fakes.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any, Protocol

from .config import Settings
from .config_loading import load_settings


class Sender(Protocol):
    """Work handed to the broker (implemented by ``workers.sending``)."""

    def send(self, task: str, *args: Any, **options: Any) -> None:
        """One task by name (``options``: Celery's, e.g. ``expires``)."""

    def send_stage(self, case) -> bool:
        """The canvas that carries ``case`` on from its stage; False if the stage has no
        message (the poller watches it)."""

    def publish(self, exchange: str, routing_key: str, message: dict) -> None:
        """An event on the topic exchange subscribers read."""

    def queue_depths(self, queues: Iterable[str], *, timeout: float = 2.0) -> dict[str, int | None]:
        """Messages waiting per queue; None where the broker did not say."""


class Context:
    def __init__(self, settings: Settings, *, store=None, host=None, scheduler=None, sender: Sender | None = None,
                 breaker=None):
        self.settings = settings
        self.trace_ids: dict[str, str] = {}  # case id -> its correlation id for the logs (it never changes)
        for name, given in (("store", store), ("host", host), ("scheduler", scheduler), ("sender", sender),
                            ("breaker", breaker)):
            if given is not None:
                self.__dict__[name] = given  # what cached_property would have built

    @property
    def lease_seconds(self) -> float:
        return self.settings.reconciler.lease_seconds

    @property
    def host_name(self) -> str:
        """The engine host's name, without connecting to it (or importing SSH)."""
        s = self.settings
        return s.transport.ssh.host if s.transport.kind == "ssh" else "localhost"

    @cached_property
    def store(self):
        from .store import Store

        return Store.from_url(self.settings.database.url)

    @cached_property
    def breaker(self):
        """The remote host's circuit breaker (None for the local folder: nothing to guard)."""
        s = self.settings
        if s.transport.kind != "ssh":
            return None
        from .breaker import Breaker

        return Breaker(self.store, s.transport.ssh.host, failures_to_open=s.breaker.failures_to_open,
                       cooldown_seconds=s.breaker.cooldown_seconds)

    @cached_property
    def host(self):
        """The machine that runs the engine: a local folder, or a cluster over SSH."""
        s = self.settings
        if s.transport.kind == "ssh":
            from .ssh_host import SSHHost  # paramiko only where SSH is used

            return SSHHost(s.transport.ssh, PurePosixPath(s.transport.remote_root), guard=self.breaker)
        from .hosts import LocalHost

        return LocalHost(s.transport.remote_root)

    @cached_property
    def scheduler(self):
        s = self.settings
        if s.scheduler.kind == "slurm":
            from .slurm import SlurmScheduler

            return SlurmScheduler(self.host, s.scheduler.slurm, job_dir_root=self.host.root)
        from .direct_scheduler import DirectScheduler

        return DirectScheduler(self.host)

    @cached_property
    def sender(self) -> Sender:
        from .workers.sending import CelerySender  # the composition root: the one place that knows Celery

        return CelerySender()


_current: Context | None = None


def current() -> Context:
    """This process's context, built from ``MQI_*``/YAML settings on first use."""
    global _current
    if _current is None:
        _current = Context(load_settings())
    return _current


def use(ctx: Context | None) -> Context | None:
    """Make ``ctx`` this process's context (None: build a new one on next use); returns
    the one it replaces."""
    global _current
    before, _current = _current, ctx
    return before


def reset(*, keep_settings: bool = True) -> None:
    """Forget connections (after a fork, or in tests after changing ``MQI_*`` variables)."""
    global _current
    if _current is not None:
        _current = Context(_current.settings) if keep_settings else None


os.register_at_fork(after_in_child=reset)
