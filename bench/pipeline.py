"""Scenarios 2, 3, 4 and 6 on the real stack: RabbitMQ + PostgreSQL, ``mqi up`` (the
production process topology), a loopback sshd and a single-node Slurm with 2 fake GPUs.

- 2 Orchestration overhead: N real-shaped cases (3 beams) dropped at once; the stand-in
  engine runs about 1 s per beam and notes its own start and end. Per case, from the
  events: ready → registered → upload → first sbatch → engine start → engine end →
  noticed → downloaded → verified → finalized. Overhead = the time the pipeline itself
  adds: every gap of that chain except the cluster's (sbatch → engine start, and beams
  queued behind other cases' beams for the 2 GPUs), engine and transfer time.
- 3 Throughput: the same number of beam jobs submitted by a plain shell loop of ``sbatch``
  (the baseline) and by the pipeline at saturation: jobs per minute from the engines' own
  times (first start → last end), and the ratio.
- 4 Login-node economy: SSH logins sshd accepted per case, and scheduler commands per
  poll interval, counted on the server side (sshd log, the testbed's command shims).
- 6 Footprint: RSS of each process of the installation after the run.
"""
from __future__ import annotations

import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqi_celery import context  # noqa: E402
from tests.casegen import make_case  # noqa: E402
from tests.conftest import write_config  # noqa: E402
from tests.testbed.cluster import Testbed  # noqa: E402

DEMO = Path(sys.executable).parent / "mqi-demo-engine"
# The engine stand-in: the demo engine (a real RTDOSE out) noting its own start and end.
# The stand-in engine's work varies per beam (0.5 to 1.5 times the mean, seeded by its input
# file, so the baseline's runs of the same inputs take the same time), as real runs vary: at
# one fixed length every run would end at the same point of the poll interval (Slurm starts
# jobs on its own 1 s cycle) and the waits measured would be that point's, not the average.
RECORDER = """#!/bin/sh
start=$(date +%s.%N)
delay=$(printf '%s' "$1" | cksum | awk -v d={delay} '{{srand($1); printf "%.3f", d * (0.5 + rand())}}')
{demo} --batches 5 --delay "$delay" "$1"; rc=$?
echo "$1 $start $(date +%s.%N)" >> {log}
exit $rc
"""


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None)


def engine_runs(log: Path) -> list[tuple[str, float, float]]:
    """(input file, start, end) per engine run, from the engines' own notes."""
    if not log.exists():
        return []
    return [(p, float(s), float(e)) for p, s, e in (line.split() for line in log.read_text().splitlines())]


def union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def shell_loop(tb: Testbed, folder: Path, jobs: int, recorder: Path, inputs: list[str]) -> dict:
    """Scenario 3's baseline: ``for i in ...; do sbatch ...; done`` and wait for all."""
    log = folder / "engine-baseline.log"
    script = recorder.read_text().replace(str(folder / "engine-runs.log"), str(log))
    baseline = folder / "recorder-baseline"
    baseline.write_text(script)
    baseline.chmod(0o755)
    loop = " ".join(shlex.quote(i) for i in (inputs * jobs)[:jobs])
    started = time.time()
    cmd = (f"cd {shlex.quote(str(folder))} && for i in {loop}; do "
           f"sbatch --parsable --gres=gpu:1 -o /dev/null --wrap \"{baseline} $i\" >/dev/null; done")
    assert tb.ssh(cmd, timeout=600).returncode == 0
    deadline = time.time() + 1800
    while len(engine_runs(log)) < jobs and time.time() < deadline:
        time.sleep(0.5)
    runs = engine_runs(log)
    first, last = min(s for _, s, _ in runs), max(e for _, _, e in runs)
    return {"jobs": len(runs), "seconds": round(last - first, 2), "submit_loop_start": started,
            "jobs_per_minute": round(60 * len(runs) / (last - first), 1)}


def run(folder: Path, broker: str, database: str, tb: Testbed, *, cases: int = 50, poll: float = 1.0,
        engine_delay: float = 0.2, pace: float = 0.0) -> dict:
    """``pace``: mean seconds between two drops (0: all at once, the pipeline at saturation).
    The gaps are random (0.5 to 1.5 times the pace, seeded): drops at a fixed period would
    stay in one phase of the scan and poll intervals, and the waits measured would be that
    phase's, not their average."""
    folder.mkdir(parents=True, exist_ok=True)
    runs_log = folder / "engine-runs.log"
    recorder = folder / "recorder"
    recorder.write_text(RECORDER.format(demo=DEMO, delay=engine_delay, log=runs_log))
    recorder.chmod(0o755)
    remote = tb.remote_root / folder.name
    config = write_config(folder, broker={"url": broker, "result_backend": "db+" + database},
                          database={"url": database}, scanner={"interval_seconds": 1.0, "settle_seconds": 3},
                          transport={"kind": "ssh", "remote_root": str(remote),
                                     "ssh": {"host": tb.host, "port": tb.ssh_port, "user": tb.user,
                                             "key_file": str(tb.client_key), "known_hosts": str(tb.known_hosts)}},
                          scheduler={"kind": "slurm", "poll_interval_seconds": poll, "slurm": {"gres": "gpu:1"}},
                          engine={"command": f"{recorder} {{input_file}}", "timeout_seconds": 600},
                          logging={"file": str(folder / "log" / "mqi.jsonl"), "level": "WARNING"})
    os.environ["MQI_CONFIG"] = str(config)
    context.reset(keep_settings=False)
    store = context.current().store
    start_logins = tb.accepted_ssh_logins()
    out = open(folder / "up.out", "ab")
    up = subprocess.Popen([sys.executable, "-m", "mqi_celery.cli", "up"], cwd=folder, stdout=out,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ})
    try:
        _wait(lambda: all(_pid(folder, g) for g in ("core", "transfer", "execute", "control", "qa", "beat")), 120, "mqi up")
        time.sleep(5)  # workers connected: the first scan finds the cases at once
        staging, inbox = folder / "staging", folder / "inbox"
        inbox.mkdir(exist_ok=True)
        # One case first: the processes open their pooled SSH connections as a running
        # installation has them (start-up logins are counted apart).
        make_case(staging, "warmup", marker=True)
        os.rename(staging / "warmup", inbox / "warmup")
        _wait(lambda: (c := store.get_case("warmup")) and c.status.value in ("COMPLETED", "FAILED"), 600, "warm-up")
        logins, calls = tb.accepted_ssh_logins(), len(tb.scheduler_calls())
        dropped, arrivals = {}, random.Random(11)
        for i in range(cases):
            name = f"bench{i:03d}"
            make_case(staging, name, marker=True)
            os.rename(staging / name, inbox / name)
            dropped[name] = time.time()
            time.sleep(pace * arrivals.uniform(0.5, 1.5))  # the arrival rate under test, not a synchronisation
        _wait(lambda: all((c := store.get_case(n)) and c.status.value in ("COMPLETED", "FAILED") for n in dropped),
              3600, "every case to finish")
        rss = {name: _rss_tree(_pid(folder, name)) for name in ("core", "transfer", "execute", "control", "qa", "beat")}
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(180)
        out.close()
    window_calls = tb.scheduler_calls_with_times()[calls:]
    figures = _per_case(store, dropped, engine_runs(runs_log), remote)
    figures["logins"] = tb.accepted_ssh_logins() - logins
    figures["startup_logins"] = logins - start_logins
    figures["rss_mb"] = rss
    measured = [r for r in engine_runs(runs_log) if "/warmup/" not in r[0]]
    first, last = min(s for _, s, _ in measured), max(e for _, _, e in measured)
    figures["pipeline_jobs_per_minute"] = round(60 * len(measured) / (last - first), 1)
    # While jobs were active, the poller's one query per interval (``squeue -t …``); beside
    # it, one ``squeue --me`` per submit (a redelivered submit adopts its job) and the
    # curator's sinfo, counted apart.
    active = [(t, c) for t, c in window_calls if first - 5 <= t <= last + 5]
    intervals = max(1.0, (last - first + 10) / poll)
    figures["poll_queries_per_interval"] = round(sum(1 for _, c in active if c.startswith("squeue -h -t")) / intervals, 2)
    figures["other_commands"] = {kind: sum(1 for _, c in window_calls if c.startswith(kind))
                                 for kind in ("squeue -h --me", "sacct", "scontrol", "sinfo")}
    figures["sbatch_calls"] = sum(1 for _, c in window_calls if c.startswith("sbatch"))
    figures["poll_interval"] = poll
    figures["pace"] = pace
    figures["inputs"] = sorted({p for p, _, _ in measured})
    return figures


def _per_case(store, dropped: dict[str, float], runs, remote: Path) -> dict:
    by_case: dict[str, list[tuple[float, float]]] = {}
    for path, s, e in runs:
        case = PurePosixPath(path).relative_to(remote).parts[0]
        by_case.setdefault(case, []).append((s, e))
    rows, statuses = [], {}
    for name, ready in dropped.items():
        case = store.get_case(name)
        statuses[case.status.value] = statuses.get(case.status.value, 0) + 1
        ev = store.events(name)

        def at(command, pick=min):
            times = [datetime.fromisoformat(e["timestamp"].rstrip("Z")).replace(tzinfo=timezone.utc).timestamp()
                     for e in ev if e["command"] == command]
            return pick(times) if times else None

        upload = next(e for e in ev if e["command"] == "upload_success")
        up_end = at("upload_success")
        up_start = up_end - upload["payload"]["seconds"]
        downloads = [e for e in ev if e["command"] == "download_success"]
        down_secs = sum(e["payload"].get("seconds", 0) for e in downloads)
        down_end = at("download_success", max)
        intervals = by_case.get(name, [])
        engine_end = max(e for _, e in intervals)
        noticed = max(j.finished_at for j in case.jobs).replace(tzinfo=timezone.utc).timestamp()
        registered = case.created_at.replace(tzinfo=timezone.utc).timestamp()
        verified, done = at("results_verified"), at("case_completed") or at("case_failed")
        sbatch = at("execution_started")
        gaps = {"scan": registered - ready, "validate+dispatch": up_start - registered,
                "to first sbatch": sbatch - up_end, "notice": noticed - engine_end,
                "to download": (down_end - down_secs) - noticed, "verify": verified - down_end,
                "finalize": done - verified}
        rows.append({"case": name, "ready": ready, "registered": registered, "upload": (up_start, up_end),
                     "sbatch": sbatch, "engine": intervals, "noticed": noticed, "downloaded": down_end,
                     "verified": verified, "finalized": done, "end_to_end": done - ready,
                     "engine_seconds": union(intervals), "transfer_seconds": upload["payload"]["seconds"] + down_secs,
                     "overhead": sum(gaps.values()), "gaps": gaps, "end_to_verified": verified - engine_end})
    overhead = [r["overhead"] for r in rows]
    to_verified = [r["end_to_verified"] for r in rows]
    return {"cases": len(rows), "statuses": statuses, "timeline": rows,
            "overhead_median": round(statistics.median(overhead), 3), "overhead_p95": round(_p95(overhead), 3),
            "end_to_verified_median": round(statistics.median(to_verified), 3),
            "end_to_verified_p95": round(_p95(to_verified), 3),
            "gap_medians": {k: round(statistics.median(r["gaps"][k] for r in rows), 3) for k in rows[0]["gaps"]},
            "end_to_end_median": round(statistics.median(r["end_to_end"] for r in rows), 2),
            "engine_median": round(statistics.median(r["engine_seconds"] for r in rows), 2),
            "transfer_median": round(statistics.median(r["transfer_seconds"] for r in rows), 3)}


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def _pid(folder: Path, name: str) -> int:
    out = (folder / "up.out").read_text(errors="replace") if (folder / "up.out").exists() else ""
    lines = [line for line in out.splitlines() if line.startswith(f"started {name} (pid ")]
    return int(lines[-1].split("(pid ")[1].split(")")[0]) if lines else 0


def _rss_tree(pid: int) -> list[float]:
    """RSS in MB of the process and each of its children (a prefork pool)."""
    if not pid:
        return []
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [round(_rss(p), 1) for p in [pid, *map(int, kids)] if _rss(p)]


def _rss(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"bench: waited {timeout:g} s for {what}")
        time.sleep(0.5)
