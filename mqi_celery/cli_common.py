"""What every ``mqi`` command shares: the Typer app and its groups, the console, failing
with one line, the settings and store, the stop flag, and what a fault outside the program
says. The commands are in ``cli`` (people's: cases, inbox, status, run) and
``cli_services`` (the operator's: up, beat, flower, metrics, exporter, deploy, db)."""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import context
from .errors import ConfigError
from .terminal import data

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
    context.reset(keep_settings=False)


def _fail(message: str, code: int = 1):
    console.print("[red]error:[/red] ", data(message, lines=True), highlight=False, sep="")
    raise typer.Exit(code)


def _settings():
    try:
        return context.current().settings
    except ConfigError as exc:
        _fail(str(exc), 2)


def _store():
    _settings()
    return context.current().store


_stop = threading.Event()


def _interrupt(*_):
    """SIGTERM or Ctrl-C: noted, acted on by the loop (an exception raised here could land
    in the middle of an import, where Python drops it)."""
    _stop.set()


def outside_fault(exc: BaseException) -> str | None:
    """What an operator can fix, for a fault outside the program (a service down, a folder
    missing or not permitted); None for anything else (a bug: its traceback helps)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, (OperationalError, InterfaceError)):
        where = _settings().database.url.split("@")[-1]
        return f"the database ({where}) cannot be reached: {first}; is it running, and is database.url right?"
    if isinstance(exc, subprocess.CalledProcessError):
        detail = (exc.stderr or b"").decode(errors="replace").strip() if isinstance(exc.stderr, bytes) else exc.stderr
        return f"{exc.cmd[0]} failed (exit {exc.returncode}): {' '.join((detail or first).split())}"
    from kombu.exceptions import OperationalError as BrokerError

    if isinstance(exc, BrokerError) or type(exc).__module__.startswith("amqp"):
        where = _settings().broker.url.split("@")[-1]
        return f"the broker ({where}) cannot be reached: {first}; is RabbitMQ running, and is broker.url right?"
    if isinstance(exc, OSError):
        return f"{exc.strerror or first}: {exc.filename}" if exc.filename else first
    return None
