"""The one reading of ``database.url``: which database, where its file is, and the address
a PostgreSQL driver or tool is given. No SQLAlchemy here: the command line's fast read path
(``db_reads``) uses it too.

    sqlite:///var/mqi.db                          the embedded default (a file)
    postgresql://mqi:secret@db.hospital/mqi       (or postgresql+psycopg2://…)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

CONNECT_TIMEOUT = 10  # seconds: a host that drops packets fails a connection instead of holding a worker
# A row held longer than this by another session (a frozen or cut-off worker in the middle of
# a write) fails the waiting statement instead of holding it for ever; the step is retried as
# a database fault. SQLite's busy timeout (db.py) is the same 30 s.
LOCK_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class DatabaseURL:
    url: str

    @property
    def kind(self) -> str:
        """"sqlite", "postgresql", or the scheme of another database."""
        return self.url.split("://", 1)[0].split("+", 1)[0]

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file (None for another database or an in-memory one)."""
        if self.kind != "sqlite" or ":///" not in self.url:
            return None
        path = self.url.split(":///", 1)[1].split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None

    @property
    def has_options(self) -> bool:
        return "?" in self.url

    def for_sqlalchemy(self) -> str:
        """PostgreSQL through psycopg2, the driver we install (SQLAlchemy 2.1 would look for
        psycopg 3 behind a plain ``postgresql://``)."""
        if self.url.startswith("postgresql://"):
            return "postgresql+psycopg2://" + self.url.split("://", 1)[1]
        return self.url

    def connect_args(self) -> dict:
        """What SQLAlchemy passes to the driver: for psycopg2 a connect timeout and a lock
        timeout, each unless the URL sets its own (``connect_timeout``, ``options``)."""
        if self.kind != "postgresql" or not self.for_sqlalchemy().startswith("postgresql+psycopg2://"):
            return {}
        query, args = parse_qs(urlsplit(self.url).query), {}
        if "connect_timeout" not in query:
            args["connect_timeout"] = CONNECT_TIMEOUT
        if "options" not in query:
            args["options"] = f"-c lock_timeout={LOCK_TIMEOUT_MS}"
        return args

    def libpq(self, *, password: bool = True) -> str:
        """The address psycopg2 and pg_dump take (``postgresql://``, no driver name);
        without ``password``, the password left out (give it through PGPASSWORD)."""
        parts = urlsplit("postgresql://" + self.url.split("://", 1)[1])
        if not password and parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host)
        return urlunsplit(parts)

    @property
    def password(self) -> str | None:
        password = urlsplit(self.url).password
        return None if password is None else unquote(password)

    @property
    def where(self) -> str:
        """Host and database, for messages (never the password)."""
        return self.url.split("@")[-1] if "@" in self.url else self.url.split("://", 1)[-1]
