"""Remote Executor's schedulers: how a beam's engine run is started, watched and killed.

A scheduler turns a ``JobSpec`` into shell commands run on a ``Host`` (so the same code
works locally and over SSH) and parses what comes back. ``poll`` takes every active job
of a host at once: one command per host per poll, whatever the number of jobs. One module
per kind: ``direct_scheduler`` (a plain process on the host) and ``slurm``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import ClassVar, Protocol



@dataclass(frozen=True)
class JobSpec:
    name: str  # mqi-<case>-<beam>
    workdir: PurePosixPath
    command: str  # already quoted
    gpu_id: int | None
    time_limit_seconds: float
    # The same for every delivery of one submit, new for each retry of the beam: a
    # redelivered submit adopts the run carrying its token (running or already finished)
    # instead of starting a second one.
    token: str = ""
    # False when no earlier delivery of this submit reached the scheduler (the database says
    # so): there is no run to adopt, and no need to ask for one.
    may_exist: bool = True


@dataclass(frozen=True)
class RemoteState:
    state: str  # scheduler's word: RUNNING, EXITED, LOST, ...
    finished: bool
    exit_code: int | None = None


class Scheduler(Protocol):
    kind: str
    #: The scheduler kills a run at its time limit itself (then our deadline is a backstop).
    enforces_time_limit: ClassVar[bool]
    #: Final states worth submitting again (the node failed, not the engine).
    transient_states: ClassVar[frozenset[str]]

    def reason_for(self, state: str, exit_code: int | None) -> str: ...

    def submit(self, spec: JobSpec) -> str: ...
    def poll(self, jobs: dict[str, PurePosixPath]) -> dict[str, RemoteState]: ...
    def cancel(self, remote_id: str, workdir: PurePosixPath) -> None: ...
