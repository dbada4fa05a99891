"""Slurm scheduler: one batch job per beam, submitted, polled and cancelled with sbatch,
squeue, sacct/scontrol and scancel run through a ``Host`` (so it works over SSH).

Every Slurm call is split in two: a command builder (a shell string, every interpolated
value quoted) and a pure parser of the command's output, tested on captured real output
(tests/fixtures/slurm). ``SlurmScheduler`` only glues them together.

Where a finished job's exit code comes from: ``sacct`` on clusters with accounting
(durable), else ``scontrol show job`` (only while slurmctld remembers the job, MinJobAge).
"""
from __future__ import annotations

import logging
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath
from string import Template
from typing import TYPE_CHECKING

from .config import SlurmSettings
from .errors import ExecutionError
from .schedulers import JobSpec, RemoteState

if TYPE_CHECKING:
    from .hosts import Host

log = logging.getLogger(__name__)

SCRIPT_NAME = "job.sbatch"

_JOB_ID = re.compile(r"^\d+(?:_\d+)?$")


# ---------------------------------------------------------------- batch script
def _check_text(value: str, what: str, forbidden: str) -> str:
    if not value or any(c in value for c in forbidden):
        raise ExecutionError(f"{what} {value!r} cannot be passed to Slurm (empty or contains one of "
                             f"{forbidden!r})", transient=False)
    return value


def render_batch_script(spec: JobSpec, settings: SlurmSettings) -> str:
    """The batch script for one beam. Values are shell-quoted: sbatch strips quotes from
    #SBATCH lines like a shell; '%' (a filename pattern in --output) and backslashes are refused."""
    name = _check_text(spec.name, "job name", "\n\r\0\\,")  # squeue -n splits at commas
    workdir = _check_text(str(spec.workdir), "job folder", "\n\r\0\\%")
    minutes = settings.time_limit_minutes or max(1, math.ceil(spec.time_limit_seconds / 60))
    extra = "".join(f"#SBATCH {shlex.quote(a)}\n" for a in settings.extra_sbatch_args)
    return Template(settings.script_template).substitute(
        job_name=shlex.quote(name), workdir=shlex.quote(workdir), gres=settings.gres,
        time_limit=str(minutes),
        partition_line=f"#SBATCH --partition={settings.partition}\n" if settings.partition else "",
        extra_sbatch=extra, setup="\n".join(settings.setup_lines),
        command=spec.command,  # already quoted by engine.command_line
    )


_WRITE_FAILED = 97  # the exit code of a submit whose script could not be written (sbatch's are 0 and 1)


def write_script_command(path: PurePosixPath, text: str) -> str:
    tmp = shlex.quote(f"{path}.tmp")
    return (f"mkdir -p {shlex.quote(str(path.parent))} && printf '%s' {shlex.quote(text)} > {tmp} "
            f"&& mv -f {tmp} {shlex.quote(str(path))}")


# ---------------------------------------------------------------- commands and parsers
@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    state: str
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None
    name: str = ""
    comment: str = ""

    def remote(self) -> RemoteState:
        return state_to_remote(self.state, self.exit_code, self.signal)


def _ids(ids: list[str]) -> str:
    bad = [i for i in ids if not _JOB_ID.match(i)]
    if bad or not ids:
        raise ValueError(f"not Slurm job ids: {bad or ids!r}")
    return ",".join(ids)


def _state_word(text: str) -> str:
    # sacct writes "CANCELLED by 1000"; some versions add a "+" to extended states
    return text.split(" ", 1)[0].rstrip("+").upper()


def _exit_pair(text: str) -> tuple[int | None, int | None]:
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def sbatch_command(workdir: PurePosixPath, script_path: PurePosixPath, token: str = "") -> str:
    comment = f" --comment={shlex.quote(token)}" if token else ""
    return f"cd {shlex.quote(str(workdir))} && sbatch --parsable{comment} {shlex.quote(str(script_path))}"


def parse_sbatch(stdout: str) -> str:
    """``123`` or ``123;cluster`` -> ``123``."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    job_id = lines[-1].split(";", 1)[0] if lines else ""
    if not _JOB_ID.match(job_id):
        raise ValueError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return job_id


def squeue_command(ids: list[str]) -> str:
    # -t all: finished jobs stay listed (with their final state) until MinJobAge expires
    return f"squeue -h -t all -j {_ids(ids)} -o '%i|%T|%r'"


def _rows(text: str, fields: int):
    """'|'-separated lines that start with a job id; the last field (a job name) may hold '|'."""
    for line in text.splitlines():
        parts = line.rstrip("\r\n").split("|", fields - 1)
        if len(parts) == fields and _JOB_ID.match(parts[0]):
            yield parts


def parse_squeue(text: str) -> dict[str, SlurmJob]:
    return {p[0]: SlurmJob(p[0], _state_word(p[1]), p[2]) for p in _rows(text, 3)}


def find_by_name_command(name: str) -> str:
    # -t all: a job of this submit (same token in its comment) that already finished is
    # adopted too, as long as slurmctld remembers it (MinJobAge)
    return f"squeue -h --me -t all -n {shlex.quote(name)} -o '%i|%T|%k|%j'"


def parse_find_by_name(text: str, name: str) -> list[SlurmJob]:
    return [SlurmJob(p[0], _state_word(p[1]), name=p[3], comment=p[2]) for p in _rows(text, 4) if p[3] == name]


def sacct_command(ids: list[str]) -> str:
    # JobName last for the same reason as above; -X: the allocation only, not its steps
    return f"sacct -X -n -P -o JobID,State,ExitCode,JobName -j {_ids(ids)}"


def parse_sacct(text: str) -> dict[str, SlurmJob]:
    return {p[0]: SlurmJob(p[0], _state_word(p[1]), "", *_exit_pair(p[2]), p[3]) for p in _rows(text, 4)}


def scontrol_command(job_id: str) -> str:
    return f"scontrol show job -o {shlex.quote(_ids([job_id]))}"


def scontrol_batch_command(ids: list[str]) -> str:
    """One remote command for several jobs (scontrol show job takes a single id)."""
    quoted = " ".join(shlex.quote(i) for i in _ids(ids).split(","))
    return f'for j in {quoted}; do scontrol show job -o "$j"; done'


def parse_scontrol(text: str) -> dict[str, SlurmJob]:
    """``scontrol show job -o`` lines. A job name may contain spaces and 'Key=' text: it is
    taken up to UserId=, and the other fields are searched only after it."""
    jobs = {}
    for line in text.splitlines():
        m = re.match(r"JobId=(\S+) JobName=(.*?) (UserId=.*)", line.strip())
        if m and _JOB_ID.match(m.group(1)):
            def field(key: str, rest=" " + m.group(3)) -> str:
                found = re.search(rf" {key}=(\S*)", rest)
                return found.group(1) if found else ""
            jobs[m.group(1)] = SlurmJob(m.group(1), _state_word(field("JobState")) or "UNKNOWN",
                                        field("Reason"), *_exit_pair(field("ExitCode")), m.group(2))
    return jobs


def scancel_command(job_id: str) -> str:
    return f"scancel {shlex.quote(_ids([job_id]))}"


# ---------------------------------------------------------------- states
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                 "SPECIAL_EXIT", "RESV_DEL_HOLD"}
# Ended through no fault of the case: worth resubmitting.
TRANSIENT_STATES = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}
# Ended for good; resubmitting the same job would end the same way.
PERMANENT_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "DEADLINE",
                    "REVOKED", "MISSING"}
MISSING = RemoteState("MISSING", True, None)


def state_to_remote(state: str, exit_code: int | None = None, signal: int | None = None) -> RemoteState:
    """Slurm's view of a job -> the pipeline's. Only COMPLETED and FAILED carry an exit code:
    after TIMEOUT, CANCELLED, ... the code is Slurm's kill, not the engine's verdict."""
    state = _state_word(state)
    if state in ACTIVE_STATES:
        return RemoteState(state, False)
    if state == "COMPLETED":
        return RemoteState(state, True, 0)
    if state == "FAILED":
        # 0:0 (launch failure) or 0:SIG (script killed) must never read as success
        return RemoteState(state, True, exit_code if exit_code and not signal else None)
    if state in PERMANENT_STATES or state in TRANSIENT_STATES:
        return RemoteState(state, True, None)
    return RemoteState(state, False)  # unknown word: keep polling; the pipeline's timeout is the backstop


_REASONS = {
    "TIMEOUT": "Slurm job hit its time limit (TIMEOUT)",
    "CANCELLED": "Slurm job was cancelled (CANCELLED)",
    "OUT_OF_MEMORY": "Slurm job ran out of memory (OUT_OF_MEMORY)",
    "NODE_FAIL": "the compute node failed during the job (NODE_FAIL)",
    "PREEMPTED": "Slurm job was preempted by another job (PREEMPTED)",
    "BOOT_FAIL": "the compute node failed to boot (BOOT_FAIL)",
    "DEADLINE": "Slurm job missed its deadline (DEADLINE)",
    "MISSING": "Slurm no longer knows the job (MISSING): it was purged or never ran",
}


def reason_for(state: str, exit_code: int | None) -> str:
    """What happened, in words a physicist can act on."""
    state = _state_word(state)
    if state in ("COMPLETED", "FAILED") and exit_code is not None:
        return f"engine exited with code {exit_code} (Slurm {state})"
    if state == "FAILED":
        return "Slurm job failed before the engine could report an exit code (FAILED)"
    return _REASONS.get(state, f"Slurm job ended in state {state}")


# ---------------------------------------------------------------- errors
_TRANSIENT_MARKERS = ("unable to contact slurm controller", "socket timed out", "connection refused",
                      "connection timed out", "connection reset", "connect failure",
                      "zero bytes were transmitted", "temporarily unable", "temporarily unavailable",
                      "backup controller in standby", "communication connection failure",
                      "no route to host", "network is unreachable", "slurmdbd", "ssh:")
_NOT_FOUND_MARKERS = ("invalid job id", "already completing or completed")


def _is_transient(text: str) -> bool:
    return any(m in text.lower() for m in _TRANSIENT_MARKERS)


def _error(what: str, host: str, text: str, transient: bool | None = None) -> ExecutionError:
    text = text.strip()[:300]
    return ExecutionError(f"{what} on {host} failed: {text or 'no output'}",
                          transient=_is_transient(text) if transient is None else transient)


# ---------------------------------------------------------------- scheduler
class SlurmScheduler:
    kind = "slurm"
    enforces_time_limit = True  # the batch script's --time: Slurm reports TIMEOUT itself
    transient_states = frozenset(TRANSIENT_STATES)

    def __init__(self, host: "Host", settings: SlurmSettings | None = None,
                 job_dir_root: PurePosixPath | None = None):
        self.host = host
        self.settings = settings or SlurmSettings()
        self.job_dir_root = PurePosixPath(job_dir_root or host.root)
        self._accounting = self.settings.state_source != "scontrol"  # auto: until sacct says disabled

    @staticmethod
    def reason_for(state: str, exit_code: int | None) -> str:
        return reason_for(state, exit_code)

    def _run(self, command: str):
        return self.host.run(command, timeout=self.settings.command_timeout_seconds)

    def find_job(self, name: str, token: str = "") -> str | None:
        """Our job with exactly this name, oldest first: one carrying ``token`` in any state,
        else (no token) a live one (pending/running)."""
        r = self._run(find_by_name_command(name))
        if r.returncode != 0:
            raise _error("squeue -n", self.host.name, r.stderr or r.stdout, transient=True)
        jobs = [j for j in parse_find_by_name(r.stdout, name)
                if (j.comment == token if token else j.state in ACTIVE_STATES)]
        return min(jobs, key=lambda j: [int(p) for p in j.job_id.split("_")]).job_id if jobs else None

    def submit(self, spec: JobSpec) -> str:
        workdir = PurePosixPath(spec.workdir)
        if not workdir.is_relative_to(self.job_dir_root) or ".." in workdir.parts:
            raise ExecutionError(f"job folder {workdir} is outside {self.job_dir_root}", transient=False)
        script = render_batch_script(spec, self.settings)  # validates name and folder first
        # A retried task must not start a second run of the same beam: adopt the live one.
        if spec.may_exist and (existing := self.find_job(spec.name, spec.token)):
            log.info("adopting Slurm job %s for %s", existing, spec.name)
            return existing
        path = workdir / SCRIPT_NAME
        # One command, one round trip: the script is written, then handed to sbatch.
        r = self._run(f"{{ {write_script_command(path, script)}; }} || exit {_WRITE_FAILED}; "
                      f"{sbatch_command(workdir, path, spec.token)}")
        if r.returncode == _WRITE_FAILED:
            raise _error(f"writing {path}", self.host.name, r.stderr, transient=True)
        if r.returncode != 0:  # transient if slurmctld is unreachable; a rejection is final
            raise _error(f"sbatch {spec.name}", self.host.name, r.stderr or r.stdout)
        try:
            return parse_sbatch(r.stdout)
        except ValueError as exc:  # maybe submitted anyway: a retry adopts it by name
            raise ExecutionError(f"sbatch {spec.name} on {self.host.name}: {exc}", transient=True) from None

    def poll(self, jobs: dict[str, PurePosixPath]) -> dict[str, RemoteState]:
        ids = [i for i in jobs if _JOB_ID.match(i)]
        states = {i: MISSING for i in jobs if i not in ids}  # not a Slurm id: never success
        if not ids:
            return states
        r = self._run(squeue_command(ids))
        out = r.stderr + r.stdout
        if r.returncode != 0 and "invalid job id" not in out.lower():  # a single unknown id -> rc 1
            raise _error("squeue", self.host.name, out, transient=True)
        queued = parse_squeue(r.stdout)
        # squeue shows no exit codes: a FAILED job's code, and the fate of a job squeue has
        # forgotten, come from one batched sacct/scontrol call.
        need = [i for i in ids if i not in queued or queued[i].state == "FAILED"]
        details = self._details(need) if need else {}
        for i in ids:
            if i in details:
                states[i] = details[i].remote()
            elif i in need and i in queued:  # accounting lags behind slurmctld: ask next poll
                states[i] = RemoteState(queued[i].state, False)
            else:
                states[i] = queued[i].remote() if i in queued else MISSING
        return states

    def _details(self, ids: list[str]) -> dict[str, SlurmJob]:
        if self._accounting:
            r = self._run(sacct_command(ids))
            text = r.stderr + r.stdout
            if r.returncode == 0:
                return parse_sacct(r.stdout)
            if self.settings.state_source == "sacct":
                raise _error("sacct", self.host.name, text, transient=True)
            if "accounting storage is disabled" in text.lower():
                log.info("Slurm accounting is disabled on %s: final states come from scontrol", self.host.name)
                self._accounting = False
            else:
                log.warning("sacct on %s failed (%s); asking scontrol", self.host.name, text.strip()[:200])
        r = self._run(scontrol_batch_command(ids))
        if _is_transient(r.stderr):  # rc alone says nothing: it is the last id's, maybe unknown
            raise _error("scontrol show job", self.host.name, r.stderr, transient=True)
        return parse_scontrol(r.stdout)

    def cancel(self, remote_id: str, workdir: PurePosixPath) -> None:
        if not _JOB_ID.match(remote_id):
            raise ExecutionError(f"not a Slurm job id: {remote_id!r}", transient=False)
        r = self._run(scancel_command(remote_id))
        text = r.stderr + r.stdout
        if r.returncode != 0 and not any(m in text.lower() for m in _NOT_FOUND_MARKERS):
            raise _error(f"scancel {remote_id}", self.host.name, text)
