"""The machine that runs the engine, as seen by File Transfer and the Remote Executor.

A ``Host`` offers exactly what the pipeline needs: run a shell command, move files in
and out, hash files where they lie. ``LocalHost`` is the embedded default: the "remote"
root is a local folder and commands run as local processes; ``ssh_host.SSHHost`` offers
the same interface over SSH, so transfers and schedulers are written once.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from .errors import NO_SPACE_ERRNOS, ExecutionError, NoSpace, TransferError, ValidationError, case_removed
from .naming import safe_relpath


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class Host(Protocol):
    name: str
    root: PurePosixPath

    def run(self, command: str, *, timeout: float = 60) -> CommandResult: ...
    def exists(self, remote_path: PurePosixPath) -> bool: ...
    def put_tree(self, local_dir: Path, remote_dir: PurePosixPath, files: list[str]) -> int: ...
    def sha256(self, remote_dir: PurePosixPath, files: list[str]) -> dict[str, str | None]: ...
    def list_files(self, remote_dir: PurePosixPath) -> list[str]: ...
    def get(self, remote_path: PurePosixPath, local_path: Path) -> int: ...
    def write_text(self, remote_path: PurePosixPath, text: str) -> None: ...
    def read_tail(self, remote_path: PurePosixPath, max_bytes: int = 65536) -> str: ...
    def remove_tree(self, remote_dir: PurePosixPath) -> None: ...
    def rename(self, src: PurePosixPath, dst: PurePosixPath) -> None: ...


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256(f)


def _sha256(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def open_case_file(folder: Path, rel: str):
    """A file of a case, opened for reading without following a symbolic link anywhere
    below ``folder`` (one swapped in after validation must not make us read, or upload,
    anything outside the inbox) and without blocking on a pipe."""
    parts = PurePosixPath(rel).parts
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise case_removed(folder.name) from None
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as exc:
        if not os.path.isdir(folder):
            raise case_removed(folder.name) from None
        if exc.errno == errno.ENOENT:
            raise ValidationError(f"{rel} disappeared from the case folder after the case was validated; put it "
                                  "back, then retry the case") from None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ValidationError(f"{rel} became a symbolic link after the case was validated; links are never "
                                  "followed: copy the real file into the case, then retry the case") from None
        raise
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise ValidationError(f"{rel} is no longer a regular file; put the real file back, then retry the case")
    return os.fdopen(file_fd, "rb")


def local_disk_full(path: Path, exc: OSError) -> NoSpace:
    return NoSpace(f"the disk of {Path(path).parent} ran full ({exc.strerror})", where="local")


def case_file_sha256(folder: Path, rel: str) -> str:
    with open_case_file(folder, rel) as f:
        return _sha256(f)


class LocalHost:
    """The cluster side is a folder on this machine (the embedded default, and tests)."""

    def __init__(self, root: Path):
        self.name = "localhost"  # Context.host_name says the same without building one
        self.root = PurePosixPath(root)
        Path(root).mkdir(parents=True, exist_ok=True)
        # Commands find this installation's tools (mqi-demo-engine) even outside an
        # activated virtualenv.
        self._env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _local(self, remote: PurePosixPath) -> Path:
        path = Path(remote)
        if not path.resolve().is_relative_to(Path(self.root).resolve()):
            raise TransferError(f"{remote} is outside the remote root {self.root}", transient=False)
        return path

    def run(self, command: str, *, timeout: float = 60) -> CommandResult:
        # Its own process group: a command that times out goes with everything it started.
        with subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, env=self._env, start_new_session=True) as p:
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                raise ExecutionError(f"command on {self.name} timed out after {timeout:g} s", transient=True) from None
        return CommandResult(p.returncode, out, err)

    def exists(self, remote_path: PurePosixPath) -> bool:
        return self._local(remote_path).exists()

    def put_tree(self, local_dir: Path, remote_dir: PurePosixPath, files: list[str]) -> int:
        sent = 0
        for rel in files:
            dst = self._local(remote_dir / safe_relpath(rel))
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open_case_file(local_dir, rel) as src, open(dst, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except OSError as exc:
                if exc.errno in NO_SPACE_ERRNOS:
                    raise NoSpace(f"the disk under {remote_dir} ran full ({exc.strerror})", where="remote") from exc
                raise
            sent += dst.stat().st_size
        return sent

    def sha256(self, remote_dir: PurePosixPath, files: list[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for rel in files:
            path = self._local(remote_dir / safe_relpath(rel))
            out[rel] = file_sha256(path) if path.is_file() else None
        return out

    def list_files(self, remote_dir: PurePosixPath) -> list[str]:
        base = self._local(remote_dir)
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def get(self, remote_path: PurePosixPath, local_path: Path) -> int:
        src = self._local(remote_path)
        try:
            shutil.copyfile(src, local_path)
        except FileNotFoundError:
            raise TransferError(f"{remote_path} does not exist on {self.name}", transient=False) from None
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                Path(local_path).unlink(missing_ok=True)
                raise local_disk_full(local_path, exc) from exc
            raise
        return local_path.stat().st_size

    def write_text(self, remote_path: PurePosixPath, text: str) -> None:
        path = self._local(remote_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def read_tail(self, remote_path: PurePosixPath, max_bytes: int = 65536) -> str:
        path = self._local(remote_path)
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            return f.read().decode("utf-8", "replace")

    def remove_tree(self, remote_dir: PurePosixPath) -> None:
        shutil.rmtree(self._local(remote_dir), ignore_errors=True)

    def rename(self, src: PurePosixPath, dst: PurePosixPath) -> None:
        os.replace(self._local(src), self._local(dst))
