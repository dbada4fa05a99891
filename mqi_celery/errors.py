"""One error hierarchy that says whether a fault is worth retrying.

Tasks never guess from bare ``OSError``s: every fault the pipeline knows about is an
``MQIError`` whose ``transient`` flag decides between "retry with backoff" and "fail the
case with this reason". ``is_transient`` extends the rule to the library errors that mean
"the other side is down for a moment" (broker, database, network).
"""
from __future__ import annotations

import errno
import os


class MQIError(Exception):
    """Base of every error the pipeline raises on purpose."""

    transient_default = False

    def __init__(self, message: str, *, transient: bool | None = None):
        super().__init__(message)
        self.message = message
        self.transient = self.transient_default if transient is None else transient

    def __str__(self) -> str:
        return self.message


class ConnectionError_(MQIError):
    """Could not reach a host, the broker or the database. Retried."""

    transient_default = True


class ResourceError(MQIError):
    """A resource is exhausted for now (disk full, no GPU free). Retried."""

    transient_default = True


class Held(MQIError):
    """The host cannot take the case now (no room, partition drained): the case waits with
    this reason and goes on by itself once the host can (see admission)."""


class NoSpace(MQIError):
    """A disk ran full during a transfer: ``where`` is "remote" (the host's) or "local" (the
    results folder here). File Transfer turns it into a wait (``Held``), never a failure."""

    transient_default = True

    def __init__(self, message: str, *, where: str):
        super().__init__(message)
        self.where = where


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")


def error_line(text: str, fallback: str = "no error output") -> str:
    """The line of a tool's error output worth quoting (the one that names the problem,
    else the last), never the whole output: "tar: x.ptn: Cannot write: No space left on device"."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if any(word in line for word in NO_SPACE_WORDS)]
    line = (named or lines or [fallback])[0 if named else -1]
    return line if len(line) <= 300 else line[:297] + "..."


class TransferError(MQIError):
    """A copy failed or did not verify. Retried: a re-upload usually cures it."""

    transient_default = True


class ExecutionError(MQIError):
    """The engine or the scheduler reported a failure. Permanent unless stated."""


class ValidationError(MQIError):
    """The case itself is wrong; a physicist must fix it. Never retried."""


class ConfigError(MQIError):
    """The configuration is wrong; the operator must fix it. Never retried."""


def case_removed(folder_name: str) -> ValidationError:
    return ValidationError(f"the case folder {folder_name} was removed (or renamed) from the inbox; put it back "
                           "where it was, then retry the case")


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same step later can reasonably succeed."""
    if isinstance(exc, MQIError):
        return exc.transient
    from sqlalchemy.exc import OperationalError, DisconnectionError  # lazy: import cost

    if isinstance(exc, (OperationalError, DisconnectionError)):
        return True
    # Network-level faults (refused, reset, timed out) are transient; a missing local
    # file or a permission problem is not.
    return isinstance(exc, (ConnectionError, TimeoutError))


def describe(exc: BaseException, step: str) -> str:
    """The reason shown to a user for a fault during ``step`` ("upload", "validation", ...):
    what happened to which file and what to do, never raw exception text (the traceback
    goes to the log, under the case's correlation id)."""
    if isinstance(exc, MQIError):
        return exc.message
    name = os.path.basename(str(exc.filename)) if isinstance(exc, OSError) and exc.filename else None
    if isinstance(exc, FileNotFoundError) and name:
        return f"{step}: {name} is missing (removed while the case was in work?); put it back, then retry the case"
    if isinstance(exc, PermissionError) and name:
        return f"{step}: {name} cannot be read (permission denied); let the mqi user read it, then retry the case"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({name})" if name else ""
        return f"{step}: {exc.strerror.lower()}{where}; fix it, then retry the case"
    return (f"{step} failed unexpectedly (details in the log, under the case's correlation id); "
            "retry the case once fixed")


def infrastructure_fault(exc: BaseException) -> bool:
    """The database or the broker failed, not the case's work."""
    from kombu.exceptions import OperationalError as BrokerError

    return isinstance(exc, BrokerError) or database_fault(exc)


# What a database that does not answer says (a query that is wrong says something else).
_UNREACHABLE = ("could not connect", "connection refused", "connection to server", "server closed the connection",
                "terminating connection", "connection already closed", "ssl connection has been closed",
                "the database system is", "could not translate host name", "database is locked")


def database_fault(exc: BaseException) -> bool:
    """The database is down, restarting or lost the connection: not a wrong query (e.g.
    "no such table"), which is retried within the budget and then fails."""
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

    if isinstance(exc, DisconnectionError):
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "pgcode", None)
    if code:  # PostgreSQL: connection exception, the server shutting down, a row held past lock_timeout
        return code.startswith(("08", "57P")) or code == "55P03"
    return any(words in str(exc.orig).lower() for words in _UNREACHABLE)
