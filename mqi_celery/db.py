"""Tables, engine and schema migrations. The database is the single source of truth:
every status a user sees is read from here, and the broker only delivers work."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import zlib
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (JSON, DateTime, Engine, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint, create_engine, event, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from .db_reads import SCHEMA_REVISION
from .db_url import DatabaseURL

MIGRATIONS = Path(__file__).with_name("migrations")


def utcnow() -> datetime:
    """Naive UTC: the same representation in SQLite and PostgreSQL."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class CaseRow(Base):
    __tablename__ = "cases"
    case_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    step: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    trace_id: Mapped[str] = mapped_column(String(32))
    study_uid: Mapped[str | None] = mapped_column(String(128))
    manifest: Mapped[dict] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Leases (see conductor): the stage the case is in, the dispatch that owns it, and
    # until when that dispatch is presumed alive. stage "run" has no lease: the poller owns it.
    stage: Mapped[str | None] = mapped_column(String(16))
    dispatch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    reconciles: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    wait_reason: Mapped[str | None] = mapped_column(Text)  # why an active case is not moving
    # When the folder's content was last known to be what was validated (the manifest):
    # the scanner looks again at a folder changed after it (scanner.look_again).
    checked_at: Mapped[datetime | None] = mapped_column(DateTime)
    left_out: Mapped[list | None] = mapped_column(JSON)  # there at validation, not part of the case
    # The QA evaluation (qa_evaluator): the verdict, and what it was reached with.
    verdict: Mapped[str | None] = mapped_column(String(24))
    qa: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow, index=True)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("case_id", "beam"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.case_id", ondelete="CASCADE"), index=True)
    beam: Mapped[int] = mapped_column(Integer)
    beam_name: Mapped[str] = mapped_column(String(64))
    delivery_dir: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), index=True)
    step: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    scheduler: Mapped[str | None] = mapped_column(String(16))
    remote_id: Mapped[str | None] = mapped_column(String(64))
    remote_state: Mapped[str | None] = mapped_column(String(32))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    gpu_id: Mapped[int | None] = mapped_column(Integer)
    results: Mapped[dict] = mapped_column(JSON, default=dict)  # file name -> sha256
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    resubmits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    judge_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow, index=True)


class HostRow(Base):
    """Per remote host: its circuit breaker and how its scheduler answers, shared by all
    processes."""
    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="closed")  # closed | open | half_open
    failures: Mapped[int] = mapped_column(Integer, default=0)  # consecutive connection failures
    opened_at: Mapped[datetime | None] = mapped_column(DateTime)
    probe_at: Mapped[datetime | None] = mapped_column(DateTime)  # open: next probe; half_open: probe deadline
    last_error: Mapped[str | None] = mapped_column(Text)
    poll_failing_since: Mapped[datetime | None] = mapped_column(DateTime)
    poll_error: Mapped[str | None] = mapped_column(Text)
    reading: Mapped[dict | None] = mapped_column(JSON)  # the System Curator's latest (see readings)
    read_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class ClaimRow(Base):
    """A resource of a host held by one beam job: ``gpu:N`` on direct hosts, ``job:N`` (a
    slot of scheduler.max_active_jobs). The primary key makes a claim atomic: two
    workers can never hold the same one. Released when the job ends (see store)."""
    __tablename__ = "claims"
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    resource: Mapped[str] = mapped_column(String(32), primary_key=True)
    case_id: Mapped[str] = mapped_column(String(128))
    beam: Mapped[int] = mapped_column(Integer)
    claimed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (Index("ix_claims_job", "case_id", "beam"),)


class InboxProblemRow(Base):
    """Something in the inbox that is not a case, and why (see scanner); kept until the
    entry is fixed or removed."""
    __tablename__ = "inbox_problems"
    entry: Mapped[str] = mapped_column(Text, primary_key=True)  # relative to the inbox, escaped
    reason: Mapped[str] = mapped_column(Text)
    seen_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    case_id: Mapped[str | None] = mapped_column(String(128), index=True)
    command: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    correlation_id: Mapped[str | None] = mapped_column(String(32))
    timestamp: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def make_engine(url: str) -> Engine:
    parsed = DatabaseURL(url)
    if parsed.kind == "sqlite":
        if parsed.sqlite_path is not None:
            parsed.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL lets the CLI read while workers write; busy_timeout rides out short locks.
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            # The status guards read, check and write in one transaction: take SQLite's
            # write lock at BEGIN, so two worker processes cannot both pass a guard (what
            # SELECT ... FOR UPDATE does on PostgreSQL).
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(parsed.for_sqlalchemy(), pool_pre_ping=True, connect_args=parsed.connect_args())


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def is_postgres(engine: Engine) -> bool:
    """The one dialect switch: PostgreSQL, or else the embedded SQLite."""
    return engine.dialect.name == "postgresql"


def insert(engine: Engine, table):
    """``INSERT`` with the dialect's ``ON CONFLICT`` clauses."""
    if is_postgres(engine):
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(table)


MIGRATE_KEY, BEAT_KEY = 474747, 474748  # advisory lock keys (slots: _slot_key, apart from these)


@contextlib.contextmanager
def _lock(engine: Engine, key: int, name: str, *, block: bool):
    """The one lock helper: a PostgreSQL session advisory lock on ``key``, or with SQLite a
    file lock beside the database file (``name`` in its file name). Yields True once held;
    without ``block``, False at once when another process holds it. Either goes with the
    process that holds it: a crash never leaks one."""
    if is_postgres(engine):
        with engine.connect() as conn:
            if block:  # waits as long as the holder works (a migration): no lock timeout here
                conn.execute(text("SET LOCAL lock_timeout = 0"))
            held = conn.execute(text("SELECT pg_advisory_lock(:k)" if block else "SELECT pg_try_advisory_lock(:k)"),
                                {"k": key}).scalar() is not False
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        return
    path = f"{engine.url.database or 'mqi'}.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        yield held
    finally:
        os.close(fd)


def _migration_lock(engine: Engine):
    """Workers, beat and the CLI may all start at once; only one migrates at a time."""
    return _lock(engine, MIGRATE_KEY, "migrate", block=True)


def _slot_key(name: str, number: int) -> int:
    return zlib.crc32(f"{name}#{number}".encode()) + (1 << 32)  # apart from the fixed keys above


@contextlib.contextmanager
def slot(engine: Engine, name: str, count: int):
    """Hold one of ``count`` slots called ``name`` while the block runs; yields its number,
    or None when all are held (a crash never leaks one: ``_lock``)."""
    for number in range(count):
        with _lock(engine, _slot_key(name, number), f"{name}.{number}", block=False) as held:
            if held:
                yield number
                return
    yield None


def free_slots(engine: Engine, name: str, count: int) -> int:
    """How many of the slots nobody holds now (taken together, let go at once)."""
    with contextlib.ExitStack() as held:
        free = 0
        while free < count and held.enter_context(slot(engine, name, count)) is not None:
            free += 1
    return free


@contextlib.contextmanager
def beat_lock(engine: Engine, on_wait=None, poll_seconds: float = 5.0):
    """Held while this process runs celery beat: an installation has exactly one, however
    many hosts are told to run it (the others wait, ready to take over)."""
    import time

    while True:
        with _lock(engine, BEAT_KEY, "beat", block=False) as held:
            if held:
                yield
                return
        if on_wait:
            on_wait()
            on_wait = None
        time.sleep(poll_seconds)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent)."""
    try:
        # A database already at the head is not handed to Alembic, whose import alone costs
        # a command-line call more than its whole work.
        if current_revision(engine) == SCHEMA_REVISION:
            return
    except Exception:  # noqa: BLE001 - no alembic_version table yet (a new database): Alembic makes it
        pass
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with _migration_lock(engine), engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def schema_behind(revision: str | None) -> bool:
    """An older schema (or none yet): the workers bring it up to date at start."""
    return revision is None or revision < SCHEMA_REVISION


def schema_note(revision: str | None) -> str | None:
    """What a schema not at this version's revision means and how to fix it (None: it is)."""
    if revision == SCHEMA_REVISION:
        return None
    if schema_behind(revision):
        return (f"the database's schema is at revision {revision or 'none'}, this version's is {SCHEMA_REVISION}: "
                "the workers bring it up to date at start, or run `mqi db upgrade`")
    return (f"the database's schema is at revision {revision}, newer than this version's ({SCHEMA_REVISION}): "
            "a newer mqi-celery wrote it; install that version here")


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def backup(url: str, target: Path) -> None:
    """SQLite: the online backup API (consistent while others write). PostgreSQL: pg_dump."""
    import sqlite3
    import subprocess

    parsed = DatabaseURL(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    if parsed.kind == "sqlite":
        source, copy = sqlite3.connect(parsed.sqlite_path), sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            copy.close()
            source.close()
        return
    # The password through the environment: never on a command line (ps) or in an error.
    libpq = parsed.libpq(password=False)
    env = {**os.environ, **({"PGPASSWORD": parsed.password} if parsed.password else {})}
    subprocess.run(["pg_dump", "--format=custom", f"--file={target}", libpq], check=True, capture_output=True, env=env)
