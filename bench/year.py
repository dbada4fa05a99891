"""Scenario 5, a year of cases: 10,000 finished cases (3 beams, 12 events and a manifest of
the real case's 223 files each) in the database and their folders in the inbox. Times what
runs periodically or interactively, beside the way it was done before (the baseline):

- one scan with 10 new real-shaped cases (before: every registered path read from the
  database and every folder opened, each scan);
- ``mqi cases list``, ``mqi cases list --json``, ``mqi cases show`` as a user times them
  (a new process each, start-up included; before: ``Store.list_cases()`` read every case);
- ``mqi status``, on an idle machine and with both cores busy;
- one curator run; one refresh of the live view of ``mqi run`` (before: every case).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqi_celery import context, db  # noqa: E402
from tests.casegen import make_case  # noqa: E402
from tests.services import CpuHog  # noqa: E402

MQI = Path(sys.executable).parent / "mqi"
FILES_PER_CASE = 223  # the real case: plan, 2 texts per beam, a .ptn and an .mgn per layer (108)


def configure(folder: Path, url: str) -> Path:
    config = folder / "mqi.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {k: str(folder / k) for k in ("inbox", "results", "work", "logs")},
        "database": {"url": url},
        "broker": {"url": "filesystem://", "folder": str(folder / "broker"),
                   "result_backend": f"db+sqlite:///{folder}/results.db"},
        "transport": {"remote_root": str(folder / "remote")},
        "logging": {"file": None}}))
    os.environ["MQI_CONFIG"] = str(config)
    context.reset(keep_settings=False)
    for name in ("inbox", "results", "work", "logs", "broker"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return config


def fill(folder: Path, cases: int, seed: int = 7) -> list[str]:
    """``cases`` finished cases spread over a year, their jobs and events, their folders."""
    rng, store = random.Random(seed), context.current().store
    start = db.utcnow() - timedelta(days=365)
    inbox = context.current().settings.paths.inbox
    ids = []
    for chunk in range(0, cases, 1000):
        case_rows, job_rows, event_rows = [], [], []
        for i in range(chunk, min(cases, chunk + 1000)):
            case_id = f"1.2.840.113854.19.1.{10000 + i}.1"
            ids.append(case_id)
            made = start + timedelta(seconds=i * 365 * 86400 / cases)
            failed = rng.random() < 0.08
            path = inbox / case_id
            path.mkdir()
            (path / "RP.plan.dcm").write_bytes(b"")
            manifest = {f"2025042401{b}0800/layer{n:03d}.ptn": hashlib.sha256(f"{i}{b}{n}".encode()).hexdigest()
                        for b in range(3) for n in range(FILES_PER_CASE // 3)}
            case_rows.append(dict(case_id=case_id, path=str(path), status="FAILED" if failed else "COMPLETED",
                                  step="finished", error="beam 3 (G2): engine exited with code 3" if failed else None,
                                  trace_id=hashlib.md5(case_id.encode()).hexdigest(), study_uid=case_id,
                                  manifest=manifest, attempts=0, stage="collect", dispatch=1, reconciles=0,
                                  created_at=made, updated_at=made + timedelta(minutes=9),
                                  checked_at=db.utcnow()))  # its folder, just written, is what was validated
            for beam in (2, 3, 4):
                job_rows.append(dict(case_id=case_id, beam=beam, beam_name=f"G2:{beam}", delivery_dir=f"d{beam}",
                                     status="FAILED" if failed and beam == 3 else "COMPLETED", step="finished",
                                     scheduler="slurm", remote_id=str(100000 + 3 * i + beam), exit_code=0,
                                     results={} if failed and beam == 3 else
                                     {f"{case_id}_beam{beam}.dcm": hashlib.sha256(case_id.encode()).hexdigest()},
                                     resubmits=0, judge_attempts=0, submitted_at=made, started_at=made,
                                     finished_at=made + timedelta(minutes=7), updated_at=made + timedelta(minutes=8)))
            for command in ("new_case_found", "upload_success", *["execution_started"] * 3,
                            *["execution_success"] * 3, *["download_success"] * 3,
                            "case_failed" if failed else "case_completed"):
                event_rows.append(dict(case_id=case_id, command=command, payload={"case_id": case_id},
                                       correlation_id=None, timestamp=made + timedelta(minutes=5)))
        with store.session() as s:
            s.execute(db.CaseRow.__table__.insert(), case_rows)
            s.execute(db.JobRow.__table__.insert(), job_rows)
            s.execute(db.EventRow.__table__.insert(), event_rows)
    return ids


def timed(action, runs: int = 3) -> float:
    """The median of ``runs`` timings of ``action()``, in seconds."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def as_a_user(*args: str) -> None:
    subprocess.run([str(MQI), *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "COLUMNS": "160"})


def run(folder: Path, url: str, cases: int, new: int = 10) -> dict:
    """Build the year and time each figure against its baseline; returns the figures."""
    from rich.console import Console

    from mqi_celery import case_view, curator, scanner

    configure(folder, url)
    started = time.perf_counter()
    ids = fill(folder, cases)
    built = time.perf_counter() - started
    ctx = context.current()
    store, inbox = ctx.store, ctx.settings.paths.inbox
    scanner.scan_once(ctx)  # the scanner process's index, as after its first scan
    for i in range(new):
        make_case(inbox, f"new_{i:02d}", marker=True)
    figures = {"cases": cases, "build_seconds": round(built, 1)}
    figures["scan_new"] = timed(lambda: scanner.scan_for_admission(ctx), runs=1)  # beat's: validation is the conductor's
    figures["scan_nothing_new"] = timed(lambda: scanner.scan_for_admission(ctx))
    # Before: every registered path read from the database and every folder opened, each scan.
    figures["scan_baseline"] = timed(lambda: (store.known_paths(), list(scanner.survey(inbox, 3))), runs=1)
    figures["list"] = timed(lambda: as_a_user("cases", "list"))
    figures["list_json"] = timed(lambda: as_a_user("cases", "list", "--json"))
    figures["show"] = timed(lambda: as_a_user("cases", "show", ids[len(ids) // 2]))
    figures["help"] = timed(lambda: as_a_user("--help"))
    figures["status"] = timed(lambda: as_a_user("status"))
    with CpuHog(2):  # other work running: it must still answer within a second
        figures["status_loaded"] = timed(lambda: as_a_user("status"))
    figures["list_baseline"] = timed(lambda: store.list_cases(), runs=1)  # before: every case, every job
    figures["curator"] = timed(lambda: curator.report_system_status(ctx))
    sink = Console(file=io.StringIO(), width=160)
    figures["live_refresh"] = timed(lambda: sink.print(case_view.overview(store)))
    figures["registered_new"] = sum(1 for c in store.recent_cases(limit=None) if c.case_id.startswith("new_"))
    return figures


def footprint(folder: Path, seconds: float = 20.0) -> dict[str, list[float]]:
    """Scenario 6 after scenario 5: ``mqi up`` on the year's database for ``seconds`` (beat
    scans the 10,000 folders, the curator reads the host), then each process's RSS."""
    sys.path.insert(0, str(ROOT / "bench"))
    from pipeline import _pid, _rss_tree

    with open(folder / "up.out", "ab") as out:
        up = subprocess.Popen([sys.executable, "-m", "mqi_celery.cli", "up"], cwd=folder, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ})
        try:
            time.sleep(seconds)  # a measured period of ordinary running, not a synchronisation
            return {name: _rss_tree(_pid(folder, name)) for name in ("core", "transfer", "execute", "control", "qa", "beat")}
        finally:
            up.terminate()
            up.wait(120)
