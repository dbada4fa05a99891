"""``DirectScheduler``: the engine as a detached process on the host (a GPU workstation
without Slurm), its pid and exit code in files beside the job, so any process can poll or
kill it, in one batched command per host.
"""
from __future__ import annotations

import shlex
import uuid
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from .errors import ExecutionError
from .schedulers import JobSpec, RemoteState

if TYPE_CHECKING:
    from .hosts import Host


# Written beside each direct job: survives the session that started it (setsid/nohup) and
# leaves its pid and exit code in files any process can read later.
_DIRECT_WRAPPER = ('echo $$ > job.pid; {env}( {command}\n) > job.log 2>&1; '
                   'echo $? > job.exit.tmp; mv job.exit.tmp job.exit')

# The exit file is checked again after the liveness test: a job may finish in between.
_DIRECT_POLL = r'''for d in "$@"; do
  if [ -f "$d/job.exit" ]; then echo "EXITED $(cat "$d/job.exit") $d"
  elif [ -f "$d/job.pid" ] && kill -0 "$(cat "$d/job.pid")" 2>/dev/null; then echo "RUNNING - $d"
  elif [ -f "$d/job.exit" ]; then echo "EXITED $(cat "$d/job.exit") $d"
  elif [ -f "$d/job.pid" ]; then echo "LOST - $d"
  else echo "STARTING - $d"; fi
done'''


class DirectScheduler:
    """Runs the engine as a plain process on the host (a GPU workstation without Slurm)."""

    kind = "direct"
    enforces_time_limit = False
    transient_states: frozenset[str] = frozenset()

    def __init__(self, host: Host):
        self.host = host

    def reason_for(self, state: str, exit_code: int | None) -> str:
        if exit_code is not None:
            return f"engine exited with code {exit_code}"
        return "engine stopped without an exit code (killed, or the host restarted)"

    def submit(self, spec: JobSpec) -> str:
        env = f"export CUDA_VISIBLE_DEVICES={int(spec.gpu_id)}; " if spec.gpu_id is not None else ""
        inner = _DIRECT_WRAPPER.format(env=env, command=spec.command)
        wd = shlex.quote(str(spec.workdir))
        # The run of an earlier delivery of this submit (same token) is adopted, live or done.
        token = shlex.quote(spec.token or uuid.uuid4().hex)  # no token: never adopt
        script = (f"mkdir -p {wd} && cd {wd} && if [ -s job.pid ] && [ \"$(cat job.token 2>/dev/null)\" = {token} ]"
                  f" && {{ [ -f job.exit ] || kill -0 \"$(cat job.pid)\" 2>/dev/null; }}; then cat job.pid; exit 0; fi; "
                  f"rm -f job.exit job.pid && printf '%s\\n' {token} > job.token && "
                  f"(setsid nohup sh -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null &) && "
                  f"for i in $(seq 100); do [ -s job.pid ] && break; sleep 0.05; done; cat job.pid")
        result = self.host.run(script, timeout=30)
        pid = result.stdout.strip()
        if result.returncode != 0 or not pid.isdigit():
            raise ExecutionError(f"could not start {spec.name} on {self.host.name}: "
                                 f"{(result.stderr or result.stdout).strip()[:300]}", transient=True)
        return pid

    def poll(self, jobs: dict[str, PurePosixPath]) -> dict[str, RemoteState]:
        if not jobs:
            return {}
        by_dir = {str(d): rid for rid, d in jobs.items()}
        script = f"sh -c {shlex.quote(_DIRECT_POLL)} poll " + " ".join(shlex.quote(d) for d in by_dir)
        result = self.host.run(script, timeout=60)
        if result.returncode != 0:
            raise ExecutionError(f"polling jobs on {self.host.name} failed: {result.stderr.strip()[:300]}",
                                 transient=True)
        return {by_dir[d]: s for d, s in parse_direct_poll(result.stdout).items() if d in by_dir}

    def cancel(self, remote_id: str, workdir: PurePosixPath) -> None:
        if not remote_id.isdigit():
            raise ExecutionError(f"not a process id: {remote_id!r}")
        # The wrapper leads its own process group: signal the whole group (the engine too),
        # and SIGKILL it 10 s later in case the engine ignores SIGTERM. (dash's kill takes
        # no "--": `kill -TERM -PGID`.)
        escalate = shlex.quote(f"sleep 10; kill -KILL -{remote_id} 2>/dev/null")
        self.host.run(f"kill -TERM -{remote_id} 2>/dev/null || kill -TERM {remote_id} 2>/dev/null; "
                      f"(setsid nohup sh -c {escalate} > /dev/null 2>&1 < /dev/null &); true")


def parse_direct_poll(text: str) -> dict[str, RemoteState]:
    """``EXITED 3 /dir`` / ``RUNNING - /dir`` lines -> state per job folder."""
    states = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3:
            continue
        word, code, folder = parts
        if word == "EXITED":
            states[folder] = RemoteState("EXITED", True, int(code) if code.lstrip("-").isdigit() else None)
        elif word == "LOST":
            states[folder] = RemoteState("LOST", True, None)
        else:
            states[folder] = RemoteState(word, False)
    return states
