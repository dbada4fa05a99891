"""Names that end up in remote paths and shell commands: validated, never trusted.

A case id comes from a folder name someone dropped into the inbox; it is reduced to a
safe alphabet before it names anything on the cluster, and every remote path is built
from validated parts so nothing can climb out of the remote root.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath

SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# POSIX's portable file name characters: what the engine's input file, Slurm and the
# cluster's shell all take as they are.
PORTABLE_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
PORTABLE_HINT = "rename it using only letters, digits, '.', '_' and '-'"


def case_id_for(folder_name: str) -> str:
    """A safe id from a folder name: unsafe characters become ``_``; empty -> a hash."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", folder_name).strip("._-")[:100]
    if not cleaned or not SAFE_PART.match(cleaned):
        cleaned = "case-" + hashlib.sha1(folder_name.encode()).hexdigest()[:12]
    return cleaned


def shown(name: str) -> str:
    """A name as it can be printed, stored and logged: bytes that are not UTF-8 (kept by
    Python as lone surrogates) and control characters appear as escapes like ``\\xff``."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def is_utf8(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_problem(name: str) -> str | None:
    """What makes a file or folder name inside a case unfit to travel, or None."""
    if not is_utf8(name):
        return "is not valid UTF-8 text"
    if PORTABLE_NAME.fullmatch(name):
        return None
    if len(name) > 255:
        return "is longer than 255 characters"
    bad = next(c for c in name if not PORTABLE_NAME.fullmatch(c))
    return f"contains {shown(bad)!r}" if bad.isprintable() else f"contains the control character {shown(bad)}"


def check_part(part: str, what: str = "path component") -> str:
    if not SAFE_PART.match(part) or part in (".", ".."):
        raise ValueError(f"unsafe {what} {part!r}: only letters, digits, '.', '_' and '-' are allowed")
    return part


def safe_relpath(rel: str) -> PurePosixPath:
    """A relative path inside a case (from a manifest): no absolute paths, no '..'."""
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("..", ".", "") for part in p.parts):
        raise ValueError(f"unsafe relative path {rel!r}")
    for part in p.parts:
        if "\n" in part or "\0" in part:
            raise ValueError(f"unsafe relative path {rel!r}")
    return p


# Where things live on the cluster side, under the configured remote root.
def remote_case_dir(root: PurePosixPath, case_id: str) -> PurePosixPath:
    return root / check_part(case_id, "case id")


def remote_input_dir(root: PurePosixPath, case_id: str) -> PurePosixPath:
    return remote_case_dir(root, case_id) / "input"


def remote_job_dir(root: PurePosixPath, case_id: str, beam: int) -> PurePosixPath:
    return remote_case_dir(root, case_id) / f"beam_{int(beam)}"


def remote_output_dir(root: PurePosixPath, case_id: str, beam: int) -> PurePosixPath:
    return remote_job_dir(root, case_id, beam) / "output"


def inbox_fault(inbox: Path) -> str | None:
    """Why the inbox cannot be scanned (None: it can), with the fix."""
    if not inbox.exists():
        return f"the inbox {inbox} does not exist: create it (or mount it), or set paths.inbox"
    if not inbox.is_dir():
        return f"the inbox {inbox} is not a folder: set paths.inbox to the folder cases are dropped into"
    if not os.access(inbox, os.R_OK | os.X_OK):
        return f"the inbox {inbox} cannot be read by this account: give it read access"
    return None
