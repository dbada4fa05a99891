"""Per-process singletons: settings, state store, host connection and scheduler.

Built lazily on first use and dropped in a forked child (``os.register_at_fork``): a
database pool or a network connection must never be shared across a fork.
"""
from __future__ import annotations

import os
from functools import cache

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
    from .hosts import make_host

    return make_host(settings())


@cache
def scheduler():
    from .schedulers import make_scheduler

    return make_scheduler(settings(), host())


def reset(*, keep_settings: bool = True) -> None:
    """Forget connections (after fork, or in tests after changing MQI_* variables)."""
    for f in (store, host, scheduler):
        f.cache_clear()
    if not keep_settings:
        settings.cache_clear()


os.register_at_fork(after_in_child=reset)
