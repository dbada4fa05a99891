"""Process Manager: runs and supervises the Celery processes of a host.

``mqi run`` is the embedded all-in-one: one worker consuming every work queue with beat
inside it, and one worker for the control loop (poller and reconciler) so that noticing a
finished job never waits behind transfers.

``mqi up`` is production (``processes`` in the configuration): one worker per queue group
with its own pool and concurrency, beat (``mqi beat``: it waits for a database lock, so an
installation has exactly one however many hosts are told to run it), Flower and the
metrics endpoint. A process that exits is restarted with backoff; a worker that answers no
Celery ping within ``processes.ping_deadline_seconds`` (alive but stuck) is killed and
replaced; SIGTERM stops everything warmly (running tasks finish; late acks hand back the
rest). ``mqi deploy systemd`` writes the same processes as unit files.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import Settings
from .errors import ConfigError
from .queues import QUEUES

log = logging.getLogger(__name__)

WORK_QUEUES = tuple(q for q in QUEUES if q != "control")
MQI = [sys.executable, "-m", "mqi_celery.cli"]  # `mqi`, with this interpreter


def worker_command(settings: Settings, *, queues=WORK_QUEUES, beat: bool = True, name: str = "mqi-all",
                   pool: str | None = None, concurrency: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "mqi_celery", "worker", "-Q", ",".join(queues),
           "--pool", pool or settings.worker.pool, "--concurrency", str(concurrency or settings.worker.concurrency),
           "--loglevel", settings.logging.level, "--hostname", f"{name}@%h"]
    if beat:
        cmd += ["--beat", "--schedule", str(settings.paths.work / "celerybeat-schedule")]
    return cmd


def control_worker_command(settings: Settings) -> list[str]:
    """The control loop: one process, one task at a time (a poll or a reconcile run)."""
    return worker_command(settings, queues=("control",), beat=False, name="mqi-control", pool="solo",
                          concurrency=1)


@dataclass(frozen=True)
class Program:
    """One process of a host's topology. ``node``: the Celery node name a worker answers
    pings as (None for beat, Flower, the metrics endpoint)."""
    name: str
    command: list[str]
    node: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def topology(settings: Settings, only: set[str] | None = None, *, credentials_now: bool = True) -> list[Program]:
    """What ``mqi up`` runs here, in start order (``only``: these names). Without
    ``credentials_now`` (unit files) Flower's credentials may come later, at its start."""
    p, host = settings.processes, socket.gethostname()
    unknown = {q for g in p.workers for q in g.queues} - set(QUEUES)
    if unknown:
        raise ConfigError(f"processes.workers: unknown queue(s) {', '.join(sorted(unknown))}; "
                          f"the queues are {', '.join(QUEUES)}")
    missing = set(QUEUES) - {q for g in p.workers for q in g.queues}
    if missing and only is None:
        log.warning("no worker on this host consumes %s (another host must)", ", ".join(sorted(missing)))
    programs = [Program(g.name, worker_command(settings, queues=g.queues, beat=False, name=g.name, pool=g.pool,
                                               concurrency=g.concurrency), node=f"{g.name}@{host}")
                for g in p.workers]
    if p.beat:
        programs.append(Program("beat", [*MQI, "beat"]))
    if p.flower:
        programs.append(Program("flower", [*MQI, "flower"]))
    if p.metrics and settings.metrics.port is not None:
        programs.append(Program("metrics", [*MQI, "metrics"]))
    if p.exporter:
        programs.append(Program("exporter", [*MQI, "exporter"]))
    if only is not None:
        names = {prog.name for prog in programs}
        if only - names:
            raise ConfigError(f"--only: no process named {', '.join(sorted(only - names))} here "
                              f"(this host runs {', '.join(sorted(names))})")
        programs = [prog for prog in programs if prog.name in only]
    if credentials_now and any(prog.name == "flower" for prog in programs):
        flower_env(settings)  # refuses to start without credentials: say so now, not in a log
    if credentials_now and any(prog.name == "exporter" for prog in programs):
        exporter_command(settings)  # likewise for an exporter that is not installed
    return programs


def flower_env(settings: Settings) -> dict[str, str]:
    """Flower's settings as its environment (secrets never on a command line)."""
    f = settings.flower
    if f.basic_auth:
        return {"FLOWER_BASIC_AUTH": f.basic_auth}
    if f.trusted_network:
        return {"FLOWER_UNAUTHENTICATED_API": "true"}
    raise ConfigError("Flower refuses to start without credentials: anyone who reaches it can revoke tasks "
                      "and stop workers. Set flower.basic_auth to user:password (e.g. MQI_FLOWER__BASIC_AUTH), "
                      "or flower.trusted_network: true if everyone on its network may do that")


def flower_command(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "mqi_celery", "flower", f"--port={settings.flower.port}",
            f"--address={settings.flower.address}"]


def exporter_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """celery-exporter's command line and environment (the broker URL, with its password,
    goes in the environment: click reads CELERY_EXPORTER_BROKER_URL)."""
    e = settings.metrics.celery_exporter
    if not settings.broker.amqp:
        raise ConfigError("celery-exporter needs RabbitMQ (broker.url amqp://…): the embedded broker sends it "
                          "no events; set processes.exporter: false")
    if not e.python.is_file():
        raise ConfigError(f"metrics.celery_exporter.python: {e.python} does not exist. Install the exporter in "
                          f"an environment of its own: python3 -m venv {e.python.parent.parent} && "
                          f"{e.python.parent / 'pip'} install prometheus-exporter-celery==0.11.2")
    command = [str(e.python), "-c", "from src.cli import cli; cli(auto_envvar_prefix='CELERY_EXPORTER')",
               "--host", e.address, "--port", str(e.port), "--accept-content", "json"]
    return command, {"CELERY_EXPORTER_BROKER_URL": settings.broker.url}


def _die_with_parent() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Supervised:
    """One child process, restarted with backoff when it exits on its own."""

    def __init__(self, command: list[str], log_file: Path, env: dict[str, str], *, name: str = "worker",
                 node: str | None = None, backoff_max: float = 60.0):
        self.command, self.log_file, self.env = command, log_file, env
        self.name, self.node, self.backoff_max = name, node, backoff_max
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = self.last_pong = 0.0
        self._next_start = 0.0

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            # Own session (Ctrl-C reaches us, and we stop it warmly), but it dies with us: a
            # SIGKILLed supervisor must not leave workers behind to race a new one.
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self.started_at = self.last_pong = time.monotonic()

    def check(self) -> str | None:
        """Restart a dead child (at once the first time, then with growing delays; a child
        that ran a minute starts the count again); returns a message when that happened."""
        if self.proc is None or self.proc.poll() is None:
            return None
        now = time.monotonic()
        if now - self.started_at > 60:
            self.restarts = 0
        if self._next_start == 0.0:
            self._next_start = now + (min(self.backoff_max, 2 ** (self.restarts - 1)) if self.restarts else 0)
        if now < self._next_start:
            return None
        code = self.proc.returncode
        self.restarts += 1
        self._next_start = 0.0
        self.start()
        return f"started {self.name} (pid {self.proc.pid}) again: it exited with code {code} (see {self.log_file})"

    def replace(self, why: str) -> str:
        """Kill a child that is alive but useless (a stuck worker); the next check restarts it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._next_start = time.monotonic()  # no backoff: it did not crash, it hung
        return f"{self.name} {why}; killed, restarting"

    def signal_stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown: finish running tasks

    def wait_stopped(self, deadline: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace: float = 30) -> None:
        self.signal_stop()
        self.wait_stopped(time.monotonic() + grace)


def stop_all(children: list[Supervised], grace: float) -> None:
    """Warm shutdown of every child at once, then SIGKILL what is left after ``grace``."""
    for child in children:
        child.signal_stop()
    deadline = time.monotonic() + grace
    for child in children:
        child.wait_stopped(deadline)


# Set by SIGTERM/SIGINT. A flag, not an exception raised from the handler: one raised
# inside a ping would be taken for the broker's fault and the supervisor would run on. The
# loop only reads it (is_set takes no lock) and sleeps: a handler setting an Event the
# main thread is waiting on could block on the Event's own lock.
_stopping = threading.Event()


def _stop(*_):
    _stopping.set()


def up(settings: Settings, programs: list[Program], say=print) -> None:
    """Run ``programs`` until SIGTERM/SIGINT: restart what exits, replace what stops answering."""
    from . import metrics

    p = settings.processes
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(settings.metrics.multiproc_dir)}
    metrics.reset_directory(settings.metrics.multiproc_dir)
    children = [Supervised(prog.command, settings.paths.logs / f"{prog.name}.log", {**env, **prog.env},
                           name=prog.name, node=prog.node, backoff_max=p.restart_backoff_max_seconds)
                for prog in programs]
    _stopping.clear()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    next_ping = 0.0
    try:
        for child in children:
            if _stopping.is_set():
                break
            child.start()
            say(f"started {child.name} (pid {child.proc.pid}): {shlex.join(child.command)}")
        while not _stopping.is_set():
            for note in filter(None, (c.check() for c in children)):
                say(note)
            if time.monotonic() >= next_ping:
                next_ping = time.monotonic() + p.ping_interval_seconds
                for note in _replace_silent(children, p.ping_deadline_seconds):
                    say(note)
            time.sleep(0.5)
        say("stopping: running tasks may finish (warm shutdown)")
    finally:
        stop_all(children, p.stop_grace_seconds)
    say("stopped")


def _replace_silent(children: list[Supervised], deadline: float) -> list[str]:
    """Ping the workers; replace those silent for longer than ``deadline``."""
    workers = [c for c in children if c.node and c.proc is not None and c.proc.poll() is None]
    if not workers:
        return []
    from .celery_app import app

    try:
        replies = app.control.ping(destination=[c.node for c in workers], timeout=2.0)
    except Exception as exc:  # noqa: BLE001 - the broker is down: nobody can be judged now
        log.warning("could not ping the workers: %s", exc)
        for c in workers:
            c.last_pong = time.monotonic()
        return []
    answered = {node for reply in replies for node in reply}
    now, notes = time.monotonic(), []
    for c in workers:
        if c.node in answered:
            c.last_pong = now
        elif now - c.last_pong > deadline:
            notes.append(c.replace(f"answered no ping for {now - c.last_pong:.0f} s"))
    return notes


# --- systemd ------------------------------------------------------------------------------
UNIT = """\
# Written by `mqi deploy systemd`; process "{name}" of `mqi up` ({config}).
[Unit]
Description=mqi-celery {name}
After=network-online.target
Wants=network-online.target
PartOf=mqi.target

[Service]
Type=simple
User={user}
WorkingDirectory={workdir}
Environment=MQI_CONFIG={config}
Environment=PROMETHEUS_MULTIPROC_DIR={multiproc_dir}
# Secrets (MQI_DATABASE__URL, MQI_BROKER__URL, MQI_FLOWER__BASIC_AUTH): mode 600, never in a unit.
EnvironmentFile={env_file}
ExecStartPre=/bin/mkdir -p {multiproc_dir}
ExecStart={command}
# Celery's warm shutdown: running tasks finish, unfinished ones go back to the broker.
KillSignal=SIGTERM
TimeoutStopSec={grace}
Restart=always
RestartSec=2
# Exit code 2 is a configuration error: restarting cannot fix it (systemctl status says what).
RestartPreventExitStatus=2

[Install]
WantedBy=mqi.target
"""

TARGET = """\
# Written by `mqi deploy systemd`: every process of this host (`systemctl start mqi.target`).
[Unit]
Description=mqi-celery (all processes of this host)
Wants={units}

[Install]
WantedBy=multi-user.target
"""


ENV_FILE = Path("/etc/mqi/mqi.env")


def systemd_units(settings: Settings, programs: list[Program], *, config: Path, user: str,
                  env_file: Path = ENV_FILE) -> dict[str, str]:
    """Unit files equivalent to ``mqi up`` (systemd restarts what exits; it does not ping
    workers, so a stuck one is only replaced under ``mqi up``). Every value is escaped for
    systemd: ``%h`` in a command is Celery's host name, not systemd's home directory. Each
    unit reads ``env_file`` if it exists; Flower's needs it (its credentials)."""
    units = {}
    for prog in programs:
        units[f"mqi-{prog.name}.service"] = UNIT.format(
            name=prog.name, config=_escaped(str(config)), user=user, workdir=_escaped(str(Path.cwd())),
            multiproc_dir=_escaped(str(settings.metrics.multiproc_dir)),
            env_file=("" if prog.name == "flower" else "-") + _escaped(str(env_file)),
            command=_escaped(shlex.join(prog.command)), grace=int(settings.processes.stop_grace_seconds) + 10)
    units["mqi.target"] = TARGET.format(units=" ".join(sorted(u for u in units)))
    return units


def _escaped(value: str) -> str:
    """A unit-file value that systemd passes on unchanged ("%" starts a specifier)."""
    return value.replace("%", "%%")
