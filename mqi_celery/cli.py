"""``mqi``: run the embedded pipeline, look at cases, retry or cancel them, check config."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live

from . import runtime
from .config import masked
from .errors import ConfigError, MQIError
from .case_view import case_dict, cases_table, inbox_table, overview
from .models import Case

app = typer.Typer(help="mqi-celery: proton delivery logs recomputed by MOQUI, unattended.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
cases_app = typer.Typer(help="Look at cases, retry or cancel them.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
deploy_app = typer.Typer(help="Write deployment files for this host.", no_args_is_help=True)
db_app = typer.Typer(help="The state database: schema upgrades and backups.", no_args_is_help=True)
app.add_typer(cases_app, name="cases")
app.add_typer(config_app, name="config")
app.add_typer(deploy_app, name="deploy")
app.add_typer(db_app, name="db")
console = Console()
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")


@app.callback()
def _global(config: Optional[Path] = typer.Option(None, "--config", "-c", envvar="MQI_CONFIG",
                                                  help="YAML configuration file (default: built-in embedded setup).")):
    if config is not None:
        os.environ["MQI_CONFIG"] = str(config.resolve())  # children (workers) read the same file
    runtime.reset(keep_settings=False)


def _fail(message: str, code: int = 1):
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _settings():
    try:
        return runtime.settings()
    except ConfigError as exc:
        _fail(str(exc), 2)


def _store():
    _settings()
    return runtime.store()


def _reads():
    """Reads for a listing: straight from the database where it can, without importing
    SQLAlchemy (see ``reads``); else through the Store."""
    from .reads import direct_reads

    return direct_reads(_settings().database.url) or _store()


def _case_or_exit(case_id: str, reads=None) -> Case:
    case = (reads or _reads()).get_case(case_id)
    if case is None:
        _fail(f"no case {case_id!r}; `mqi cases list` shows the known ones")
    return case


@app.command("inbox")
def inbox(as_json: bool = JsonOpt):
    """What the inbox holds that is not (yet) a case, and why: links, loose files, empty
    folders, names that are not UTF-8, cases nested too deep. Updated by every scan."""
    problems = _store().inbox_problem_rows()
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
    from .curator import system_status
    from .status_view import queue_depths, status_view

    store = _store()
    try:
        reading, _ = store.reading(runtime.host().name)
        s = system_status(refresh=refresh or reading is None)
    except MQIError as exc:
        _fail(str(exc))
    s["queues"] = queue_depths()
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
    console.print(f"path: {case.path}", highlight=False)
    if case.wait_reason:
        console.print(f"[yellow]waiting: {case.wait_reason}[/yellow]", highlight=False)
    for j in d["jobs"]:
        step = f" ({j['step']})" if j["step"] == "waiting" else ""
        console.print(f"beam {j['beam']} ({j['beam_name']}): {j['status']}{step} {j['error'] or ''}", highlight=False)
    for e in d["events"]:
        console.print(f"{e['timestamp']} {e['command']} {json.dumps(e['payload'])}", highlight=False)


@cases_app.command("retry")
def cases_retry(case_id: str, as_json: bool = JsonOpt):
    """Run a FAILED (or COMPLETED) case again; failed beams rerun, completed beams are kept."""
    from .conductor import retry_case

    _case_or_exit(case_id)
    try:
        case = retry_case(case_id)
    except MQIError as exc:
        _fail(str(exc))
    print(json.dumps(case_dict(case), indent=2)) if as_json else console.print(
        f"case {case_id} queued again ({case.status.value})")


@cases_app.command("cancel")
def cases_cancel(case_id: str, as_json: bool = JsonOpt):
    """Stop a case: kill its running jobs; the case ends FAILED with the reason 'cancelled'."""
    from .conductor import cancel_case

    _case_or_exit(case_id)
    changed = cancel_case(case_id)
    case = _store().get_case(case_id)
    if as_json:
        print(json.dumps(case_dict(case), indent=2))
    elif changed:
        console.print(f"case {case_id} cancelled")
    else:
        console.print(f"case {case_id} was already {case.status.value}; nothing to cancel")


@config_app.command("check")
def config_check(as_json: bool = JsonOpt):
    """Validate the configuration and print the effective settings (secrets masked)."""
    settings = _settings()
    dump = masked(settings.model_dump(mode="json"))
    if as_json:
        print(json.dumps(dump, indent=2))
        return
    import yaml

    console.print(f"# configuration OK ({settings.source})", highlight=False)
    console.print(yaml.safe_dump(dump, sort_keys=False), highlight=False, markup=False)


@app.command("scan")
def scan():
    """Scan the inbox once now (normally celery beat does it every few seconds)."""
    from .scanner import scan_once

    store = _store()
    for case_id in scan_once():
        console.print(f"registered {case_id}")
    problems = store.inbox_problem_rows()
    if problems:
        console.print(inbox_table(problems))


def _interrupt(*_):
    raise KeyboardInterrupt


@app.command("run")
def run(live: bool = typer.Option(True, help="Live table of cases (off: one line per change).")):
    """The embedded all-in-one: workers for every queue with beat, and a live view of cases."""
    from .process_manager import Supervised, control_worker_command, worker_command
    from .reconciler import on_startup

    settings = _settings()
    store = runtime.store()  # creates/migrates the database before the worker starts
    for folder in (settings.paths.inbox, settings.paths.results, settings.paths.work, settings.paths.logs):
        folder.mkdir(parents=True, exist_ok=True)
    # This process group is the whole installation: nothing of an earlier run is alive, so
    # the reconciler picks up every unfinished case at once (not after its leases expire).
    on_startup()
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
                while True:
                    for note in filter(None, (w.check() for w in workers)):
                        console.print(f"[yellow]{note}[/yellow]")
                    view.update(overview(store))
                    time.sleep(1)
        else:
            from .db import utcnow

            seen: dict = {}
            since = datetime(1970, 1, 1)
            while True:
                for note in filter(None, (w.check() for w in workers)):
                    print(note, flush=True)
                now = utcnow()
                changed, since = store.changed_cases(since), now - timedelta(seconds=5)  # overlap: commits in flight
                for c in changed:
                    state = (c.status.value, c.step, tuple(j.status.value for j in c.jobs))
                    if seen.get(c.case_id) != state:
                        seen[c.case_id] = state
                        print(f"{c.case_id}: {c.status.value} ({c.step}) "
                              f"{' '.join(f'beam {j.beam} {j.status.value}' for j in c.jobs)}"
                              f"{' - ' + c.error if c.error else ''}", flush=True)
                for p in store.inbox_problem_rows():
                    if seen.get(("inbox", p["entry"])) != p["reason"]:
                        seen[("inbox", p["entry"])] = p["reason"]
                        print(f"inbox entry {p['entry']} is not a case: {p['reason']}", flush=True)
                time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping (letting running tasks finish)…")
    finally:
        for worker in workers:
            worker.stop()
    console.print("stopped.")


def _only(only: Optional[str]) -> set[str] | None:
    return {name.strip() for name in only.split(",") if name.strip()} if only else None


@app.command("up")
def up(dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands, start nothing."),
       only: Optional[str] = typer.Option(None, help="Only these processes (comma-separated names), e.g. "
                                                     "core,metrics in a container.")):
    """Production: run this host's processes (`processes` in the configuration), restart
    what exits, replace a worker that stops answering pings; SIGTERM stops all warmly."""
    from .process_manager import topology, up as run_up

    settings = _settings()
    programs = topology(settings, _only(only))
    if dry_run:
        print(f"# mqi up on this host ({settings.source}); environment: MQI_CONFIG, "
              f"PROMETHEUS_MULTIPROC_DIR={settings.metrics.multiproc_dir}")
        for prog in programs:
            print(f"{prog.name}: {shlex.join(prog.command)}")
        return
    runtime.store()  # creates/migrates the database once, before the processes race to
    for folder in (settings.paths.logs, settings.paths.work):
        folder.mkdir(parents=True, exist_ok=True)
    run_up(settings, programs, say=lambda line: print(line, flush=True))


@app.command("beat")
def beat():
    """celery beat, exactly once per installation: it first takes the database's beat lock
    (a second `mqi beat` waits, ready to take over)."""
    settings = _settings()
    from .db import beat_lock

    settings.paths.work.mkdir(parents=True, exist_ok=True)
    with beat_lock(runtime.store().engine, on_wait=lambda: print("another beat holds the lock; waiting", flush=True)):
        from .celery_app import app as celery

        celery.Beat(loglevel=settings.worker.log_level,
                    schedule=str(settings.paths.work / "celerybeat-schedule")).run()


@app.command("flower")
def flower():
    """Flower, the Celery web UI, with the configured basic authentication (it refuses to
    start without unless flower.trusted_network is true). Needs `pip install mqi-celery[flower]`."""
    from .process_manager import flower_command, flower_env

    settings = _settings()
    extra = flower_env(settings)
    import importlib.util

    if importlib.util.find_spec("flower") is None:
        _fail("Flower is not installed: pip install 'mqi-celery[flower]'")
    command = flower_command(settings)
    os.execve(command[0], command, {**os.environ, **extra})


@app.command("metrics")
def metrics():
    """This host's Prometheus endpoint (metrics.port): every local process's samples plus
    the database's gauges. `mqi up` runs it; this is for systemd or a container."""
    settings = _settings()
    if settings.metrics.port is None:
        _fail("metrics.port is not set: choose the port of this host's endpoint (e.g. 9808)", 2)
    from . import metrics_endpoint

    metrics_endpoint.serve(settings.metrics.port, settings.metrics.address)
    print(f"metrics on http://{settings.metrics.address}:{settings.metrics.port}/metrics", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass


@deploy_app.command("systemd")
def deploy_systemd(output: Path = typer.Option(Path("systemd"), help="Folder to write the unit files into."),
                   user: str = typer.Option("mqi", help="The account the services run as.")):
    """Write systemd units equivalent to `mqi up` (one per process, plus mqi.target)."""
    from .process_manager import systemd_units, topology

    settings = _settings()
    config = Path(os.environ["MQI_CONFIG"]) if os.environ.get("MQI_CONFIG") else None
    if config is None:
        _fail("name the configuration the services will read: mqi --config /etc/mqi/mqi.yaml deploy systemd", 2)
    output.mkdir(parents=True, exist_ok=True)
    for name, text in systemd_units(settings, topology(settings), config=config, user=user).items():
        (output / name).write_text(text)
        console.print(f"wrote {output / name}", highlight=False)
    console.print(f"install: cp {output}/*.service {output}/mqi.target /etc/systemd/system/ && "
                  "systemctl daemon-reload && systemctl enable --now mqi.target", highlight=False)


@db_app.command("upgrade")
def db_upgrade():
    """Bring the database schema to this version's (Alembic; every process also does this
    at start). Run it once after installing a new version, before starting the processes."""
    from . import db

    engine = db.make_engine(_settings().database.url)
    db.migrate(engine)
    console.print(f"database schema at revision {db.current_revision(engine)}", highlight=False)


@db_app.command("backup")
def db_backup(target: Path = typer.Argument(..., help="File to write (SQLite: a copy; PostgreSQL: pg_dump custom format).")):
    """A consistent copy of the state database, taken while the pipeline runs."""
    from . import db

    url = _settings().database.url
    try:
        db.backup(url, target)
    except (OSError, subprocess.CalledProcessError) as exc:
        _fail(f"backup to {target} failed: {exc}")
    console.print(f"wrote {target} ({target.stat().st_size} bytes)", highlight=False)


def _send_reconcile() -> None:
    from .celery_app import app as celery

    try:
        celery.send_task("mqi.reconcile")
    except Exception as exc:  # noqa: BLE001 - beat sends it on schedule anyway
        console.print(f"[yellow]could not start a reconcile run now ({exc}); beat will[/yellow]")


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
