"""Per-process singletons: settings, state store, host connection and scheduler.

Built lazily on first use and dropped in a forked child (``os.register_at_fork``): a
database pool or a network connection must never be shared across a fork.
"""
from __future__ import annotations

import os
from functools import cache
from pathlib import PurePosixPath

from .config import Settings, load_settings


@cache
def settings() -> Settings:
    return load_settings()


@cache
def store():
    from .store import Store

    return Store.from_url(settings().database.url)


@cache
def host():
    """The machine that runs the engine: a local folder, or a cluster over SSH guarded by
    its circuit breaker."""
    s = settings()
    if s.transport.kind == "ssh":
        from .ssh_host import SSHHost  # paramiko only where SSH is used

        return SSHHost(s.transport.ssh, PurePosixPath(s.transport.remote_root), guard=breaker())
    from .hosts import LocalHost

    return LocalHost(s.transport.remote_root)


def host_name() -> str:
    """The engine host's name, without connecting to it (or importing SSH)."""
    s = settings()
    return s.transport.ssh.host if s.transport.kind == "ssh" else "localhost"


@cache
def breaker():
    """The remote host's circuit breaker (None for the local folder: nothing to guard)."""
    s = settings()
    if s.transport.kind != "ssh":
        return None
    from .breaker import Breaker

    return Breaker(store(), s.transport.ssh.host, failures_to_open=s.breaker.failures_to_open,
                   cooldown_seconds=s.breaker.cooldown_seconds)


@cache
def scheduler():
    s = settings()
    if s.scheduler.kind == "slurm":
        from .slurm import SlurmScheduler

        return SlurmScheduler(host(), s.scheduler.slurm, job_dir_root=host().root)
    from .direct_scheduler import DirectScheduler

    return DirectScheduler(host())


def reset(*, keep_settings: bool = True) -> None:
    """Forget connections (after fork, or in tests after changing MQI_* variables)."""
    for f in (store, host, breaker, scheduler):
        f.cache_clear()
    if not keep_settings:
        settings.cache_clear()


os.register_at_fork(after_in_child=reset)
