"""Installs are reproducible: what is installed is exactly constraints.txt (the versions
`make install`, `make run` and CI install), nothing more, nothing else."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"
NOT_LOCKED = {"mqi-celery", "pip", "setuptools", "wheel"}  # the project itself, and pip's own tools


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_environment_is_exactly_the_lock():
    locked = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            locked[canonical(name)] = version.strip()
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed = {n: v for n, v in installed.items() if n not in NOT_LOCKED}
    assert {n: (v, installed.get(n)) for n, v in locked.items() if installed.get(n) != v} == {}
    assert sorted(set(installed) - set(locked)) == []
