"""Configuration Manager, the schema: every setting, its type, default and checks.

Every section forbids unknown keys: a misspelt key is an error naming the key and the
file, never silently ignored. With no file the built-in defaults are the embedded
single-machine setup, documented in conf/default.yaml. Reading a file and the
environment into these settings is ``config_loading``.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from string import Template
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    inbox: Path = Path("var/inbox")
    results: Path = Path("var/results")
    work: Path = Path("var/work")  # beat schedule and other local state
    logs: Path = Path("var/log")


class Database(Section):
    url: str = "sqlite:///var/mqi.db"


class Broker(Section):
    url: str = "filesystem://"
    folder: Path = Path("var/broker")  # only for filesystem://
    result_backend: str = "db+sqlite:///var/celery-results.db"
    events_exchange: str = "mqi.events"
    # Publish events to a topic exchange: "auto" = when the broker is AMQP.
    publish_events: Literal["auto", "always", "never"] = "auto"

    @property
    def amqp(self) -> bool:
        """RabbitMQ: quorum queues, broker-side delayed retries, the events exchange."""
        return self.url.startswith(("amqp", "pyamqp"))


class Scanner(Section):
    interval_seconds: float = Field(2.0, gt=0)
    settle_seconds: float = Field(10.0, ge=0)
    marker: str = "_CASE_READY"
    max_depth: int = Field(3, ge=1, le=6)  # <room>/<patient>/<study> is depth 3
    # Scan as soon as a case (or its marker) appears, beside the periodic scan (see inbox_watch).
    watch: bool = True


class Retry(Section):
    max_retries: int = Field(5, ge=0)
    backoff_seconds: float = Field(2.0, ge=0)
    backoff_max_seconds: float = Field(120.0, ge=0)
    jitter: bool = True


class Worker(Section):
    """The embedded all-in-one worker of ``mqi run`` (``mqi up`` runs ``processes.workers``)."""
    pool: Literal["prefork", "threads", "solo"] = "prefork"
    concurrency: int = Field(4, ge=1)


class SSHSettings(Section):
    host: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    user: str = Field(min_length=1)
    key_file: Path
    known_hosts: Path  # required: host keys are verified, never accepted blindly
    connect_timeout: float = Field(10.0, gt=0)
    op_timeout: float = Field(300.0, gt=0)  # longest silence tolerated inside one transfer
    keepalive_seconds: int = Field(30, ge=0)
    # AES only: GCM first, the fastest in paramiko (it has no chacha20).
    ciphers: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")

    @field_validator("ciphers")
    @classmethod
    def _aes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not c.startswith("aes") for c in value):
            raise ValueError("must list AES ciphers only, e.g. aes128-gcm@openssh.com")
        return value


class Transport(Section):
    kind: Literal["local", "ssh"] = "local"
    # local: a folder on this machine (relative paths allowed). ssh: an absolute path on
    # the cluster; one folder per case is made below it.
    remote_root: Path = Path("var/remote")
    ssh: SSHSettings | None = None  # required when kind is ssh
    # At most this many uploads and downloads with the host at once, across every worker
    # (None: as many as the transfer workers run); the others wait, QUEUED, in line.
    max_transfers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ssh_complete(self) -> "Transport":
        if self.kind == "ssh":
            if self.ssh is None:
                raise ValueError("kind 'ssh' needs an 'ssh' section (host, user, key_file, known_hosts)")
            root = PurePosixPath(self.remote_root)
            if not root.is_absolute() or ".." in root.parts or root == PurePosixPath("/"):
                raise ValueError(f"remote_root {str(root)!r} must be an absolute path on the cluster, not '/'")
        return self


# Values arrive shell-quoted; $partition_line and $extra_sbatch are whole "#SBATCH ..." lines
# or nothing. --output must stay <workdir>/job.log: the pipeline judges the run from it.
DEFAULT_TEMPLATE = """\
#!/bin/bash
#SBATCH --job-name=$job_name
#SBATCH --output=$workdir/job.log
#SBATCH --chdir=$workdir
#SBATCH --gres=$gres
#SBATCH --time=$time_limit
$partition_line$extra_sbatch
# One MOQUI run for one treatment beam, written by mqi_celery.
$setup
$command
exit $$?
"""
TEMPLATE_FIELDS = {"job_name", "workdir", "partition_line", "extra_sbatch", "gres", "time_limit",
                   "setup", "command"}

# Options the scheduler sets itself: overriding them would break adoption or log reading.
_RESERVED_OPTIONS = ("-J", "--job-name", "-o", "--output", "-e", "--error", "-D", "--chdir",
                     "--wrap", "--parsable")


SafeWord = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:,/+=-]+$")]  # no spaces, no shell syntax
# One sbatch option; sbatch's #SBATCH parser treats backslashes unlike a shell, so none.
SbatchArg = Annotated[str, Field(pattern=r"^-[^\n\r\x00\\]+$")]
OneLine = Annotated[str, Field(pattern=r"^[^\n\r\x00]*$")]


class SlurmSettings(Section):
    """The ``scheduler.slurm`` section. ``setup_lines`` (e.g. ``module load cuda``) go into
    every batch script verbatim: they are trusted operator configuration, never case data."""

    partition: SafeWord | None = None
    gres: SafeWord = "gpu:1"
    # None: the engine timeout (engine.timeout_seconds) rounded up to whole minutes.
    time_limit_minutes: int | None = Field(None, gt=0)
    extra_sbatch_args: tuple[SbatchArg, ...] = ()  # e.g. "--account=proton", "--mem=16G"
    setup_lines: tuple[OneLine, ...] = ()
    # auto: sacct, falling back to scontrol for good once sacct says accounting is disabled.
    state_source: Literal["sacct", "scontrol", "auto"] = "auto"
    script_template: str = DEFAULT_TEMPLATE
    command_timeout_seconds: float = Field(60.0, gt=0)

    @field_validator("extra_sbatch_args")
    @classmethod
    def _not_reserved(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        for arg in args:
            if arg.split("=", 1)[0] in _RESERVED_OPTIONS:
                raise ValueError(f"{arg!r}: the scheduler sets this option itself")
        return args

    @model_validator(mode="after")
    def _template_fits(self) -> "SlurmSettings":
        template = Template(self.script_template)
        names = set(template.get_identifiers())
        if not template.is_valid() or names - TEMPLATE_FIELDS:
            raise ValueError(f"script_template: only ${', $'.join(sorted(TEMPLATE_FIELDS))} are known "
                             "(write $$ for a literal $)")
        needed = {"command", "job_name", "workdir"} | {name for field, name in (
            ("extra_sbatch_args", "extra_sbatch"), ("setup_lines", "setup"), ("partition", "partition_line"))
            if getattr(self, field)}
        if missing := needed - names:
            raise ValueError(f"script_template lacks ${', $'.join(sorted(missing))}")
        return self


class Scheduler(Section):
    kind: Literal["direct", "slurm"] = "direct"
    poll_interval_seconds: float = Field(2.0, gt=0)
    # A job that never starts (no node can ever satisfy it) fails after this long.
    max_queue_seconds: float = Field(86400.0, gt=0)
    # The scheduler keeps failing to answer (not a host outage: the breaker owns those):
    # past this long its active jobs fail with the last error.
    max_poll_failure_seconds: float = Field(3600.0, gt=0)
    # A finished job whose log or outputs cannot be read: judged again at each poll, this
    # many times at most, then the beam fails with the last error.
    max_judge_attempts: int = Field(10, ge=1)
    # At most this many beam jobs of this installation on the host at once (None: no cap
    # of ours; direct hosts are capped by their free GPUs anyway).
    max_active_jobs: int | None = Field(None, ge=1)
    slurm: SlurmSettings = SlurmSettings()  # used when kind is slurm


class Reconciler(Section):
    """Leases: a stage that holds no lease for this long with no progress is dispatched
    again from its last finished step (a lost message, a crashed worker)."""
    interval_seconds: float = Field(30.0, gt=0)
    lease_seconds: float = Field(600.0, gt=0)
    max_reconciles: int = Field(5, ge=1)  # per case, between two steps that finished


class Breaker(Section):
    """Per remote host, shared by every process through the database."""
    failures_to_open: int = Field(3, ge=1)  # consecutive connection failures
    cooldown_seconds: float = Field(30.0, gt=0)  # open -> one probe after this long


class Phantom(Section):
    using_phantom_geo: bool = True
    two_centimeter_mode: bool = True
    dim: tuple[int, int, int] = (300, 400, 300)
    unit: tuple[float, float, float] = (1.0, 1.0, 1.0)
    position: tuple[float, float, float] = (-150.0, -200.0, -280.0)


class Engine(Section):
    # {input_file} and {job_dir} are substituted per beam; each is quoted for the shell.
    command: str = "mqi-demo-engine {input_file}"
    timeout_seconds: float = Field(900.0, gt=0)
    # Direct hosts: the GPUs beams may claim (one each, as CUDA_VISIBLE_DEVICES). None: every
    # GPU nvidia-smi lists; none listed (no nvidia-smi) = beams run with no GPU assigned.
    gpu_ids: tuple[int, ...] | None = None
    scorer: str = "Dose"
    output_format: Literal["dcm", "raw", "mhd", "mha", "npz"] = "dcm"
    # Gantry room; None = read from the plan's TreatmentMachineName (e.g. "G2" -> 2).
    gantry_num: int | None = None
    phantom: Phantom = Phantom()

    @field_validator("command")
    @classmethod
    def _has_input(cls, value: str) -> str:
        if "{input_file}" not in value:
            raise ValueError("must contain {input_file} where the MOQUI input file goes")
        try:
            value.format(input_file="x", job_dir="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{input_file}} and {{job_dir}} may stand in braces (write {{{{ }}}} for "
                             f"a literal brace): {exc!r}") from None
        return value


class Curator(Section):
    """The System Curator: periodic readings of the host (GPUs, disk, Slurm nodes) and the
    admission rules built on them."""
    interval_seconds: float = Field(30.0, gt=0)
    reading_timeout_seconds: float = Field(30.0, gt=0)
    # Room a case needs on the remote disk beyond its own size (its results, logs).
    disk_margin: ByteSize = ByteSize(2 * 1024**3)
    # A GPU no beam of ours holds is someone else's while it has a compute process, or
    # uses at least this much memory (containers may hide the processes).
    gpu_busy_memory_mib: int = Field(1024, ge=0)
    # Direct hosts: a GPU reading older than this is taken again before a GPU is claimed.
    gpu_reading_max_age_seconds: float = Field(15.0, gt=0)
    # A claim whose job holds no run this long after it was made is released.
    claim_grace_seconds: float = Field(300.0, gt=0)


class QA(Section):
    """Each beam's recomputed dose against the planned dose (gamma). Defaults: AAPM TG-218."""
    dose_percent: float = Field(3.0, gt=0)
    distance_mm: float = Field(2.0, gt=0)
    cutoff_percent: float = Field(10.0, ge=0, lt=100)  # low-dose threshold, % of the reference maximum
    local: bool = False  # local gamma (ΔD of each point's own reference dose) instead of global
    tolerance_percent: float = Field(95.0, gt=0, le=100)  # passing at or above it: PASS
    action_percent: float = Field(90.0, gt=0, le=100)  # passing below it: FAIL; between: REVIEW
    max_gamma: float = Field(2.0, gt=1)  # the search stops there (faster); gammas above read as it
    random_subset_3d: int | None = Field(None, ge=1000)  # 3D grids: judge this many random points
    require_reference: bool = False  # a case without a reference dose fails validation
    reference_files: str = "RD*.dcm"  # the planned dose(s) in the case folder; never uploaded

    @model_validator(mode="after")
    def _levels(self) -> "QA":
        if self.action_percent > self.tolerance_percent:
            raise ValueError(f"action_percent ({self.action_percent:g}) must not exceed tolerance_percent "
                             f"({self.tolerance_percent:g})")
        return self


class Logging(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = Path("var/log/mqi.jsonl")


class CeleryExporter(Section):
    """celery-exporter (prometheus-exporter-celery): Celery's own samples (queue lengths, task
    events, workers sending heartbeats). It pins old libraries, so it runs from an environment
    of its own: ``python`` is that environment's interpreter (see docs/operations.md)."""
    python: Path = Path("/opt/celery-exporter/bin/python")
    port: int = Field(9809, ge=1, le=65535)  # beside this host's endpoint (metrics.port, e.g. 9808)
    address: str = "0.0.0.0"


class Metrics(Section):
    """This host's Prometheus endpoint. Every process of the host writes its samples into
    ``multiproc_dir`` (prometheus-client multiprocess mode, prefork children included); one
    endpoint serves them all, with the database's gauges (cases by status, breakers)."""
    port: int | None = Field(None, ge=1, le=65535)  # None: no endpoint
    address: str = "0.0.0.0"
    multiproc_dir: Path | None = None  # default: <paths.work>/metrics
    celery_exporter: CeleryExporter = CeleryExporter()  # run by `mqi up` where processes.exporter is true


class Flower(Section):
    """Flower, the Celery web UI (``pip install mqi-celery[flower]``). It can revoke tasks
    and stop workers, so it runs only with credentials unless told it is on a trusted network."""
    port: int = Field(5555, ge=1, le=65535)
    address: str = "127.0.0.1"
    basic_auth: str = ""  # "user:password" (several: comma-separated); better via MQI_FLOWER__BASIC_AUTH
    trusted_network: bool = False  # true: no authentication at all (only where everyone may stop workers)

    @field_validator("basic_auth")
    @classmethod
    def _pairs(cls, value: str) -> str:
        if value and not all(re.fullmatch(r"[^:,\s]+:[^,\s]+", pair) for pair in value.split(",")):
            raise ValueError("must be user:password (several: comma-separated, no spaces)")
        return value


class WorkerGroup(Section):
    """One worker process (and its pool) consuming a group of queues."""
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,30}$")]
    queues: tuple[str, ...] = Field(min_length=1)
    concurrency: int = Field(2, ge=1)
    pool: Literal["prefork", "threads", "solo"] = "prefork"


DEFAULT_GROUPS = (
    WorkerGroup(name="core", queues=("scan", "conductor", "curator")),
    WorkerGroup(name="transfer", queues=("transfer",)),
    WorkerGroup(name="execute", queues=("execute",)),
    # The control loop (poller, reconciler): one task at a time, never behind transfers.
    WorkerGroup(name="control", queues=("control",), pool="solo", concurrency=1),
    # The QA (gamma): CPU work, one at a time, never in the way of transfers or the poller.
    WorkerGroup(name="qa", queues=("qa",), concurrency=1),
)


class Processes(Section):
    """What ``mqi up`` runs on this host (``mqi deploy systemd`` writes the same as units)."""
    workers: tuple[WorkerGroup, ...] = DEFAULT_GROUPS
    beat: bool = True  # exactly one host of an installation runs beat (a database lock makes sure)
    flower: bool = False
    metrics: bool = True  # the endpoint, when metrics.port is set
    exporter: bool = False  # celery-exporter (metrics.celery_exporter): on one host of an installation
    ping_interval_seconds: float = Field(10.0, gt=0)
    # A worker that answers no ping for this long (alive but stuck) is replaced.
    ping_deadline_seconds: float = Field(60.0, gt=0)
    stop_grace_seconds: float = Field(60.0, gt=0)  # warm shutdown: running tasks may finish
    restart_backoff_max_seconds: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> "Processes":
        names = [g.name for g in self.workers]
        if len(set(names)) != len(names):
            raise ValueError(f"worker group names must be unique: {', '.join(names)}")
        return self


class Settings(Section):
    paths: Paths = Paths()
    database: Database = Database()
    broker: Broker = Broker()
    scanner: Scanner = Scanner()
    retry: Retry = Retry()
    reconciler: Reconciler = Reconciler()
    breaker: Breaker = Breaker()
    worker: Worker = Worker()
    transport: Transport = Transport()
    scheduler: Scheduler = Scheduler()
    engine: Engine = Engine()
    curator: Curator = Curator()
    qa: QA = QA()
    logging: Logging = Logging()
    metrics: Metrics = Metrics()
    flower: Flower = Flower()
    processes: Processes = Processes()
    source: str = Field("built-in defaults", exclude=True)

    def resolved(self, base: Path) -> "Settings":
        """Relative paths (including sqlite files) become absolute, anchored at ``base``."""
        def absolute(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p).resolve())

        def sqlite_abs(url: str) -> str:
            m = re.match(r"^((?:db\+)?sqlite(?:\+\w+)?:///)(?!/)(.+)$", url)
            return f"{m.group(1)}{absolute(Path(m.group(2)))}" if m else url

        p = self.paths
        return self.model_copy(update={
            "paths": p.model_copy(update={k: absolute(getattr(p, k)) for k in ("inbox", "results", "work", "logs")}),
            "database": self.database.model_copy(update={"url": sqlite_abs(self.database.url)}),
            "broker": self.broker.model_copy(update={
                "folder": absolute(self.broker.folder),
                "result_backend": sqlite_abs(self.broker.result_backend)}),
            "transport": self._resolved_transport(absolute),
            "logging": self.logging.model_copy(update={"file": absolute(self.logging.file)}),
            "metrics": self.metrics.model_copy(update={
                "multiproc_dir": absolute(self.metrics.multiproc_dir or p.work / "metrics")}),
        })


    def _resolved_transport(self, absolute) -> Transport:
        t = self.transport
        if t.kind == "ssh":  # remote_root is a path on the cluster: left as written
            return t.model_copy(update={"ssh": t.ssh.model_copy(update={
                "key_file": absolute(t.ssh.key_file), "known_hosts": absolute(t.ssh.known_hosts)})})
        return t.model_copy(update={"remote_root": absolute(t.remote_root)})


SECRET_KEY = re.compile(r"password|secret|token|passphrase|basic_auth", re.I)


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def masked(value: Any, key: str = "") -> Any:
    """A printable copy of a settings dump with passwords in URLs and secret keys hidden."""
    if isinstance(value, dict):
        return {k: masked(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v, key) for v in value]
    if isinstance(value, str):
        return "***" if SECRET_KEY.search(key) and value else mask_url(value) if "://" in value else value
    return value
