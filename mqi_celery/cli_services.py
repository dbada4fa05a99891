"""``mqi`` commands for the operator: run this host's processes (`mqi up`, or one each for
systemd: beat, flower, metrics, exporter), write its systemd units, upgrade and back up the
state database."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import typer

from . import context
from .cli_common import _fail, _interrupt, _settings, _stop, app, console, db_app, deploy_app, outside_fault


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
    context.current().store  # creates/migrates the database once, before the processes race to
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
    with beat_lock(context.current().store.engine, on_wait=lambda: print("another beat holds the lock; waiting", flush=True)):
        from .celery_app import app as celery

        celery.Beat(loglevel=settings.logging.level,
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
    signal.signal(signal.SIGINT, _interrupt)
    while not _stop.is_set():  # only read here: a handler setting an Event being waited on could block
        time.sleep(1)


@app.command("exporter")
def exporter():
    """celery-exporter (metrics.celery_exporter) for Celery's own samples: queue lengths, task
    events, workers. `mqi up` runs it where processes.exporter is true; this is for systemd."""
    from .process_manager import exporter_command

    command, extra = exporter_command(_settings())
    os.execve(command[0], command, {**os.environ, **extra})


@deploy_app.command("systemd")
def deploy_systemd(output: Path = typer.Option(Path("systemd"), help="Folder to write the unit files into."),
                   user: str = typer.Option("mqi", help="The account the services run as."),
                   env_file: Path = typer.Option(Path("/etc/mqi/mqi.env"), help="The secrets every unit reads "
                                                 "(KEY=value lines, mode 600): MQI_DATABASE__URL, MQI_BROKER__URL, "
                                                 "MQI_FLOWER__BASIC_AUTH.")):
    """Write systemd units equivalent to `mqi up` (one per process, plus mqi.target)."""
    from .process_manager import systemd_units, topology

    settings = _settings()
    config = Path(os.environ["MQI_CONFIG"]) if os.environ.get("MQI_CONFIG") else None
    if config is None:
        _fail("name the configuration the services will read: mqi --config /etc/mqi/mqi.yaml deploy systemd", 2)
    output.mkdir(parents=True, exist_ok=True)
    programs = topology(settings, credentials_now=False)
    for name, text in systemd_units(settings, programs, config=config, user=user, env_file=env_file).items():
        (output / name).write_text(text)
        console.print(f"wrote {output / name}", highlight=False)
    if any(p.name == "flower" for p in programs) and not settings.flower.basic_auth:
        console.print(f"Flower reads its credentials from {env_file}: put MQI_FLOWER__BASIC_AUTH=user:password "
                      "there (mode 600) before starting it", highlight=False)
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
        _fail(f"backup to {target} failed: {outside_fault(exc)}")
    console.print(f"wrote {target} ({target.stat().st_size} bytes)", highlight=False)
