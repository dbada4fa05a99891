"""``mqi``: run the embedded pipeline, look at cases, retry or cancel them, check config.
The operator's commands (up, beat, flower, metrics, exporter, deploy, db) are in
``cli_services``; what both share is in ``cli_common``."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

import typer
from rich.live import Live

from . import context
from .case_view import case_dict, cases_table, inbox_table, overview
from .cli_common import (JsonOpt, _fail, _interrupt, _settings, _stop, _store, app, cases_app, config_app, console,
                         outside_fault)
from .config import masked
from .db_url import DatabaseURL
from .errors import ConfigError, MQIError
from .models import Case
from .terminal import data, literal


def _no_database(settings) -> str | None:
    """Why a read-only command must not go on: its SQLite file does not exist (run from
    another folder, relative paths name another, new database: it would answer "no case")."""
    path = DatabaseURL(settings.database.url).sqlite_path
    if path is None or path.exists():
        return None
    return (f"no database at {path.resolve()} (database.url of {settings.source}, relative to {Path.cwd()}): "
            "nothing has run with this configuration here. Run this from the folder `mqi run` runs in, or set "
            "MQI_CONFIG to the configuration of the installation")


def _reads():
    """Reads for a listing: straight from the database where it can, without importing
    SQLAlchemy (see ``db_reads``); else through the Store. Never creates a database."""
    from .db_reads import direct_reads

    if missing := _no_database(_settings()):
        _fail(missing)
    try:
        return direct_reads(_settings().database.url) or _store_as_it_is()
    except MQIError as exc:
        _fail(str(exc))


def _store_as_it_is():
    """The Store without migrating: a read never takes the migration lock (an upgrade in
    progress would make it wait) nor changes the schema."""
    from . import db
    from .store import Store

    store = Store.from_url(_settings().database.url, migrate=False)
    try:
        revision = db.current_revision(store.engine)
    except Exception as exc:  # noqa: BLE001 - no schema yet; anything else is raised (main says it)
        if "alembic_version" not in str(exc):
            raise
        revision = None
    if note := db.schema_note(revision):
        _fail(note)
    return store


def _case_or_exit(case_id: str, reads=None) -> Case:
    case = (reads or _reads()).get_case(case_id)
    if case is None:
        _fail(f"no case {case_id!r}; `mqi cases list` shows the known ones")
    return case


@app.command("inbox")
def inbox(as_json: bool = JsonOpt):
    """What the inbox holds that is not (yet) a case, and why: links, loose files, empty
    folders, names that are not UTF-8, cases nested too deep. Updated by every scan."""
    from .naming import inbox_fault

    if missing := _no_database(_settings()):
        _fail(missing)
    if fault := inbox_fault(Path(os.path.realpath(_settings().paths.inbox))):
        _fail(fault)
    store = _reads()  # read-only: no migration lock, no SQLAlchemy
    problems = store.inbox_problem_rows()
    if as_json:
        print(json.dumps(problems, indent=2))
    elif problems:
        console.print(inbox_table(problems))
    else:
        console.print("every entry of the inbox is a case (or not settled yet)")


@app.command("status")
def status(as_json: bool = JsonOpt,
           refresh: bool = typer.Option(False, "--refresh", help="Read the host now instead of showing the "
                                                                  "System Curator's latest reading.")):
    """The host as the System Curator last read it: whether it takes work (and why not),
    GPUs (free, ours, someone else's), disk, Slurm nodes; cases, jobs, queue depths and
    the cases that wait, with the reason."""
    from .status_view import queue_depths, status_view, system_status

    try:
        s = system_status(context.current(), _reads(), refresh=refresh)  # never a reading unasked: the host may hang
    except MQIError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the database is down: say so at once
        if "OperationalError" not in type(exc).__name__:
            raise
        _fail(f"the database ({_settings().database.url.split('@')[-1]}) cannot be reached: "
              f"{str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}")
    s["queues"] = queue_depths(context.current())
    if as_json:
        print(json.dumps(s, indent=2))
    else:
        console.print(status_view(s))


@cases_app.command("list")
def cases_list(status: Optional[str] = typer.Option(None, help="Only cases with this status."),
               since: Optional[datetime] = typer.Option(None, help="Only cases changed since (UTC), e.g. 2026-11-01."),
               limit: int = typer.Option(50, min=1, help="At most this many finished (or --status) cases, newest."),
               show_all: bool = typer.Option(False, "--all", help="Every case: no limit."),
               as_json: bool = JsonOpt):
    """The active cases and the most recently finished ones (newest LIMIT), oldest first;
    below them, inbox entries that are not cases (`mqi inbox`)."""
    from .models import CaseStatus

    try:
        wanted = CaseStatus(status.upper()) if status else None
    except ValueError:
        _fail(f"unknown status {status!r}; use one of {', '.join(s.value for s in CaseStatus)}")
    store = _reads()
    cases = store.recent_cases(status=wanted, since=since, limit=None if show_all else limit)
    if as_json:
        print(json.dumps([case_dict(c) for c in cases], indent=2))
        return
    console.print(cases_table(cases, total=store.count_by_status()[0]))
    problems = store.inbox_problem_rows()
    if problems:
        console.print(inbox_table(problems))


@cases_app.command("show")
def cases_show(case_id: str, as_json: bool = JsonOpt):
    """One case with its jobs and events."""
    reads = _reads()  # one connection for the case and its events
    case = _case_or_exit(case_id, reads)
    d = case_dict(case, events=reads.events(case_id, with_hosts=True))
    if as_json:
        print(json.dumps(d, indent=2))
        return
    console.print(cases_table([case]))
    console.print("path: ", data(case.path), highlight=False, sep="")
    console.print(f"correlation id: {case.trace_id} (every log line about this case carries it)", highlight=False,
                  markup=False)
    if case.wait_reason:
        console.print(data(f"waiting: {case.wait_reason}", style="yellow"), highlight=False)
    qa_beams = {b["beam"]: b for b in (case.qa or {}).get("beams", [])}
    for j in d["jobs"]:
        step = f" ({j['step']})" if j["step"] == "waiting" else ""
        qa = qa_beams.get(j["beam"], {})
        judged = (f"  QA {qa['verdict']}" + (f", {qa['pass_rate']:.2f} % passing" if qa.get("pass_rate") is not None
                                              else "")) if qa else ""
        console.print(data(f"beam {j['beam']} ({j['beam_name']}): {j['status']}{step} {j['error'] or ''}{judged}"),
                      highlight=False)
    if case.qa:
        console.print(data(f"QA: {case.verdict} at {case.qa['criteria']['label']}; the record: "
                           f"{_settings().paths.results / case.case_id / 'report.pdf'}"), highlight=False)
    for e in d["events"]:
        console.print(data(f"{e['timestamp']} {e['command']} {json.dumps(e['payload'], ensure_ascii=False)}"),
                      highlight=False)


@cases_app.command("retry")
def cases_retry(case_id: str, as_json: bool = JsonOpt):
    """Run a FAILED (or COMPLETED) case again; failed beams rerun, completed beams are kept."""
    from .conductor import retry_case

    _case_or_exit(case_id)
    try:
        case = retry_case(context.current(), case_id)
    except MQIError as exc:
        _fail(str(exc))
    print(json.dumps(case_dict(case), indent=2)) if as_json else console.print(
        data(f"case {case_id} queued again ({case.status.value})"))


@cases_app.command("cancel")
def cases_cancel(case_id: str, as_json: bool = JsonOpt):
    """Stop a case: kill its running jobs; the case ends FAILED with the reason 'cancelled'."""
    from .conductor import cancel_case

    _case_or_exit(case_id)
    changed = cancel_case(context.current(), case_id)
    case = _store().get_case(case_id)
    if as_json:
        print(json.dumps(case_dict(case), indent=2))
    elif changed:
        console.print(data(f"case {case_id} cancelled"))
    else:
        console.print(data(f"case {case_id} was already {case.status.value}; nothing to cancel"))


@config_app.command("check")
def config_check(offline: bool = typer.Option(False, "--offline", help="Check the file and folders only; "
                                                                       "connect to nothing."),
                 show: bool = typer.Option(False, "--show", help="Also print the effective settings "
                                                                 "(secrets masked)."),
                 as_json: bool = JsonOpt):
    """Whether it is safe to start: the configuration, its folders and files, and (unless
    --offline) the broker, database, SSH login, remote root and scheduler it names.
    Exit code 0: safe to start; 1: something failed (each line says how to fix it)."""
    from . import preflight

    settings = _settings()
    checks = preflight.run(settings, offline=offline)
    ok = all(c.ok for c in checks)
    if as_json:
        print(json.dumps({"ok": ok, "offline": offline, "checks": preflight.as_json(checks),
                          "settings": masked(settings.model_dump(mode="json"))}, indent=2))
    else:
        for c in checks:
            mark = "[green]ok  [/green]" if c.ok else "[red]FAIL[/red]"
            console.print(f"{mark} {c.what:<13} ", data(c.detail, lines=True), highlight=False, sep="")
        verdict = "configuration OK, safe to start" if ok else "not safe to start: fix the lines marked FAIL"
        console.print(f"# {verdict} ({settings.source})" + ("; offline: nothing was connected to" if offline else ""),
                      highlight=False)
        if show:
            import yaml

            console.print(yaml.safe_dump(masked(settings.model_dump(mode="json")), sort_keys=False),
                          highlight=False, markup=False)
    if not ok:
        raise typer.Exit(1)


@app.command("scan")
def scan():
    """Scan the inbox once now (normally celery beat does it every few seconds)."""
    from .scanner import scan_once

    from .scanner import InboxError, ScanBusy

    store = _store()
    deadline = time.monotonic() + 30
    while True:
        try:
            registered = scan_once(context.current())
            break
        except InboxError as exc:
            _fail(str(exc))
        except ScanBusy as exc:  # beat's scan is running: ours follows it
            if time.monotonic() > deadline:
                _fail(str(exc))
            time.sleep(0.2)
    for case_id in registered:
        console.print(data(f"registered {case_id}"))
    problems = store.inbox_problem_rows()
    if problems:
        console.print(inbox_table(problems))


@app.command("run")
def run(live: bool = typer.Option(True, help="Live table of cases (off: one line per change).")):
    """The embedded all-in-one: workers for every queue with beat, and a live view of cases."""
    from .process_manager import Supervised, control_worker_command, worker_command
    from .reconciler import on_startup

    settings = _settings()
    store = context.current().store  # creates/migrates the database before the worker starts
    for folder in (settings.paths.inbox, settings.paths.results, settings.paths.work, settings.paths.logs):
        folder.mkdir(parents=True, exist_ok=True)
    # This process group is the whole installation: nothing of an earlier run is alive, so
    # the reconciler picks up every unfinished case at once (not after its leases expire).
    on_startup(context.current())
    env = dict(os.environ)
    if settings.metrics.port is not None:  # asked for: this host's endpoint, every process counted
        from . import metrics

        metrics.reset_directory(settings.metrics.multiproc_dir)
        env["PROMETHEUS_MULTIPROC_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.metrics.multiproc_dir)
        from . import metrics_endpoint

        metrics_endpoint.serve(settings.metrics.port, settings.metrics.address)
    workers = [Supervised(worker_command(settings), settings.paths.logs / "worker.log", env),
               Supervised(control_worker_command(settings), settings.paths.logs / "control.log", env)]
    # SIGTERM (systemd, `kill`) stops as cleanly as Ctrl-C: the workers must not outlive us.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        for worker in workers:  # inside the try: a SIGTERM between two starts stops the first cleanly
            worker.start()
        _send_reconcile()
        console.print(f"[bold]mqi-celery is running[/bold] ({settings.source}).\n"
                      f"  Drop a case folder into   {settings.paths.inbox}/\n"
                      f"  then create the file      _CASE_READY in it (or wait {settings.scanner.settle_seconds:g} s).\n"
                      f"  Results appear in         {settings.paths.results}/<case_id>/\n"
                      f"  Inspect from another terminal: .venv/bin/mqi cases list\n"
                      f"  Worker logs: {settings.paths.logs}/worker.log, control.log   Ctrl-C stops.", highlight=False)
        if live and console.is_terminal:
            with Live(overview(store), console=console, refresh_per_second=2) as view:
                while not _stop.is_set():
                    for note in _supervise(workers):
                        console.print(data(note, style="yellow"))
                    view.update(overview(store))
                    time.sleep(1)
        else:
            from .db import utcnow

            seen: dict = {}
            since = datetime(1970, 1, 1)
            while not _stop.is_set():
                for note in _supervise(workers):
                    print(literal(note), flush=True)
                now = utcnow()
                changed, since = store.changed_cases(since), now - timedelta(seconds=5)  # overlap: commits in flight
                for c in changed:
                    state = (c.status.value, c.step, tuple(j.status.value for j in c.jobs))
                    if seen.get(c.case_id) != state:
                        seen[c.case_id] = state
                        print(literal(f"{c.case_id}: {c.status.value} ({c.step}) "
                                      f"{' '.join(f'beam {j.beam} {j.status.value}' for j in c.jobs)}"
                                      f"{' - ' + c.error if c.error else ''}"), flush=True)
                for p in store.inbox_problem_rows():
                    if seen.get(("inbox", p["entry"])) != p["reason"]:
                        seen[("inbox", p["entry"])] = p["reason"]
                        print(literal(f"inbox entry {p['entry']} is not a case: {p['reason']}"), flush=True)
                time.sleep(1)
        console.print("stopping (letting running tasks finish)…")
    finally:
        for worker in workers:
            worker.stop()
    console.print("stopped.")


def _supervise(workers) -> list[str]:
    """Restart what exited. The work worker (the first) held every leased task, and the
    folder broker loses the messages a process held: its cases are sent on again at once."""
    from .reconciler import on_startup

    notes = []
    for number, worker in enumerate(workers):
        note = worker.check()
        if note:
            notes.append(note)
            if number == 0:
                on_startup(context.current())
                _send_reconcile()
    return notes


def _send_reconcile() -> None:
    """A reconcile run that dispatches every leased case again at once: nothing that held
    one is alive (the installation, or its one work worker, has just started)."""
    from .celery_app import app as celery

    try:
        celery.send_task("mqi.reconcile", kwargs={"startup": True})
    except Exception as exc:  # noqa: BLE001 - beat sends it on schedule anyway
        console.print(data(f"could not start a reconcile run now ({exc}); beat will", style="yellow"))


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        console.print("[red]error:[/red] ", data(exc, lines=True), highlight=False, sep="")
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - a fault outside the program: one line with the fix, no traceback
        message = outside_fault(exc)
        if message is None:
            raise
        console.print("[red]error:[/red] ", data(message, lines=True), highlight=False, sep="")
        sys.exit(1)


from . import cli_qa, cli_services  # noqa: E402,F401  (the QA's and the operator's commands, listed after these)

if __name__ == "__main__":
    main()
