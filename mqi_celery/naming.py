"""Names that end up in remote paths and shell commands: validated, never trusted.

A case id comes from a folder name someone dropped into the inbox; it is reduced to a
safe alphabet before it names anything on the cluster, and every remote path is built
from validated parts so nothing can climb out of the remote root.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath

SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def case_id_for(folder_name: str) -> str:
    """A safe id from a folder name: unsafe characters become ``_``; empty -> a hash."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", folder_name).strip("._-")[:100]
    if not cleaned or not SAFE_PART.match(cleaned):
        cleaned = "case-" + hashlib.sha1(folder_name.encode()).hexdigest()[:12]
    return cleaned


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
