"""`mqi config check`: whether it is safe to start, asked of what the configuration names.

One line per check, each failing one with what to fix: the folders (inbox, results, work,
logs), Flower's credentials, the SSH files, and, unless offline, the broker (login and
virtual host), the database (and its schema revision), the SSH login with the remote root
writable, and the scheduler. Nothing here changes state: no schema upgrade, no breaker.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import Settings, mask_url
from .errors import ConfigError

TIMEOUT = 10.0  # seconds per connection: a check answers promptly or says it could not


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str  # what was found, or what is wrong and the fix


def run(settings: Settings, *, offline: bool = False) -> list[Check]:
    checks = [*folders(settings), flower(settings), exporter(settings), *ssh_files(settings)]
    if not offline:
        checks += [broker(settings), database(settings), *ssh_login(settings)]
    return [c for c in checks if c is not None]


def as_json(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]


# --- offline ----------------------------------------------------------------------------
def folders(settings: Settings) -> list[Check]:
    p = settings.paths
    inbox = p.inbox.resolve()
    out = [Check("inbox", True, f"{inbox} readable") if inbox.is_dir() and os.access(inbox, os.R_OK | os.X_OK)
           else Check("inbox", False, f"{inbox} is not a readable folder: create it (or set paths.inbox to the "
                                      "folder where cases are dropped)")]
    for name, folder in (("results", p.results), ("work", p.work), ("logs", p.logs)):
        out.append(_writable(name, folder.resolve()))
    return out


def _writable(name: str, folder: Path) -> Check:
    """The folder, or the nearest existing one above it (it is made at start), writable."""
    existing = next((f for f in (folder, *folder.parents) if f.exists()), Path("/"))
    if not existing.is_dir():
        return Check(name, False, f"{folder}: {existing} is not a folder; set paths.{name} to a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check(name, False, f"{folder}: {existing} is not writable by this account; "
                                  f"chown it to the account the pipeline runs as, or set paths.{name}")
    return Check(name, True, f"{folder} writable" + ("" if existing == folder else " (made at start)"))


def flower(settings: Settings) -> Check | None:
    from .process_manager import flower_env

    return _startable("flower", settings.processes.flower, lambda: flower_env(settings),
                      "credentials set" if settings.flower.basic_auth else "trusted network")


def exporter(settings: Settings) -> Check | None:
    from .process_manager import exporter_command

    e = settings.metrics.celery_exporter
    return _startable("celery-exporter", settings.processes.exporter, lambda: exporter_command(settings),
                      f"{e.python}, port {e.port}")


def _startable(what: str, enabled: bool, prepare, detail: str) -> Check | None:
    """A process `mqi up` runs here: its start-up check (``prepare`` raises ConfigError)."""
    if not enabled:
        return None
    try:
        prepare()
    except ConfigError as exc:
        return Check(what, False, str(exc))
    return Check(what, True, detail)


def ssh_files(settings: Settings) -> list[Check]:
    ssh = settings.transport.ssh if settings.transport.kind == "ssh" else None
    if ssh is None:
        return []
    out = []
    key = Path(ssh.key_file).expanduser()
    out.append(Check("ssh key", True, f"{key} readable") if key.is_file() and os.access(key, os.R_OK) else
               Check("ssh key", False, f"{key} cannot be read: point transport.ssh.key_file at the private key "
                                      f"the cluster account accepts (readable by this account only)"))
    known = Path(ssh.known_hosts).expanduser()
    scan = f"ssh-keyscan -p {ssh.port} {shlex.quote(ssh.host)} >> {shlex.quote(str(known))}"
    if not (known.is_file() and os.access(known, os.R_OK)):
        out.append(Check("ssh host key", False, f"{known} cannot be read: fetch the cluster's host key once "
                                               f"and check its fingerprint with the cluster's admins ({scan})"))
        return out
    import paramiko

    try:
        keys = paramiko.HostKeys(str(known))
    except Exception as exc:  # noqa: BLE001 - a corrupt file: say which
        return [*out, Check("ssh host key", False, f"{known} cannot be parsed: {exc}")]
    name = ssh.host if ssh.port == 22 else f"[{ssh.host}]:{ssh.port}"
    out.append(Check("ssh host key", True, f"{name} is in {known}") if keys.lookup(name) else
               Check("ssh host key", False, f"{known} holds no key for {name}: add it once and check its "
                                           f"fingerprint with the cluster's admins ({scan})"))
    return out


# --- online -----------------------------------------------------------------------------
def broker(settings: Settings) -> Check:
    url = settings.broker.url
    shown = mask_url(url)
    if not settings.broker.amqp:
        return _writable("broker", settings.broker.folder.resolve()) if url.startswith("filesystem") else \
            Check("broker", True, f"{shown} (not checked: only AMQP and filesystem:// are)")
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=TIMEOUT) as conn:
            conn.ensure_connection(max_retries=1, timeout=TIMEOUT)
            conn.default_channel  # opens the virtual host: refused here when it is not allowed
    except Exception as exc:  # noqa: BLE001 - each kind of refusal gets its fix below
        return Check("broker", False, f"{shown}: {_broker_fix(exc)}")
    return Check("broker", True, f"{shown}: logged in")


def _broker_fix(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "ACCESS_REFUSED" in text or "authentication" in text.lower():
        return "login refused: check the user and password in broker.url (or MQI_BROKER__URL)"
    if "NOT_ALLOWED" in text or "vhost" in text.lower():
        return f"the virtual host is refused ({text}): create it (rabbitmqctl add_vhost) and give the user " \
               "permissions on it (rabbitmqctl set_permissions), or fix the path of broker.url"
    return f"cannot connect ({text}): is RabbitMQ running and reachable on that host and port?"


def database(settings: Settings) -> Check:
    from sqlalchemy import create_engine

    from . import db
    from .db_url import DatabaseURL

    url = DatabaseURL(settings.database.url)
    shown = mask_url(url.url)
    args = {"connect_timeout": int(TIMEOUT)} if url.kind == "postgresql" else {}
    engine = create_engine(url.for_sqlalchemy(), connect_args=args)
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - unreachable, unknown database, refused login
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return Check("database", False, f"{shown}: cannot connect ({reason}); check database.url (or "
                                        "MQI_DATABASE__URL) and that the server runs and lets this host in")
    try:
        revision = db.current_revision(engine)
    except Exception:  # noqa: BLE001 - no schema yet
        revision = None
    finally:
        engine.dispose()
    note = db.schema_note(revision)  # behind is fine to start: the workers migrate
    return Check("database", note is None or db.schema_behind(revision),
                 f"{shown}: " + (note or f"schema at revision {revision}"))


def ssh_login(settings: Settings) -> list[Check]:
    """Log in, make and write into the remote root, and ask the scheduler (one command)."""
    from .hosts import LocalHost

    if settings.transport.kind == "ssh":
        from pathlib import PurePosixPath

        from .ssh_host import SSHHost

        host = SSHHost(settings.transport.ssh, PurePosixPath(settings.transport.remote_root))
        where = f"{settings.transport.ssh.user}@{settings.transport.ssh.host}"
    else:
        host, where = LocalHost(settings.transport.remote_root), "this machine"
    root = shlex.quote(str(host.root))
    probe = f"mkdir -p {root} && f={root}/.mqi-check.$$ && : > \"$f\" && rm -f \"$f\""
    slurm = settings.scheduler.kind == "slurm"
    if slurm:
        probe += "; echo rc=$?; squeue -h -u \"$(id -un)\" -o %i >/dev/null"
    try:
        result = host.run(probe, timeout=3 * TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - refused key, unknown host key, unreachable: the message says which
        return [Check("ssh login", False, f"{where}: {exc}")]
    out = [] if settings.transport.kind != "ssh" else [Check("ssh login", True, f"{where}: logged in")]
    root_ok = ("rc=0" in result.stdout) if slurm else result.returncode == 0
    error = (result.stderr.strip().splitlines() or ["no output"])[-1]
    out.append(Check("remote root", True, f"{host.root} writable on {where}") if root_ok else
               Check("remote root", False, f"{host.root} on {where} is not writable ({error}): make it, owned by "
                                           "the account, or set transport.remote_root"))
    if slurm:
        out.append(Check("scheduler", True, f"squeue answers on {where}") if result.returncode == 0 else
                   Check("scheduler", False, f"squeue on {where} failed ({error}): is Slurm's client on the "
                                             "PATH of a non-interactive login, and slurmctld up?"))
    return out
