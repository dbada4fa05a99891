"""``SSHHost``: the ``Host`` protocol over SSH, for a real GPU cluster.

Same semantics as ``LocalHost``; what differs is cost. Every exec channel starts the
remote account's login shell, so each method is one remote command (or one SFTP call on
the thread's long-lived SFTP channel); a case goes up as one tar stream, not file by file.
Remote paths must lie under ``root``; file names travel quoted or as NUL-separated data,
never as shell code. Connections are pooled per process (``ssh_pool``).
"""
from __future__ import annotations

import errno
import os
import re
import select
import shutil
import shlex
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Callable, TypeVar

import paramiko

from . import openssh, ssh_pool
from .config import SSHSettings
from .errors import (NO_SPACE_ERRNOS, NO_SPACE_WORDS, ConnectionError_, ExecutionError, MQIError, NoSpace,
                     TransferError, error_line)
from .hosts import CommandResult, local_disk_full
from .naming import safe_relpath

T = TypeVar("T")
CHUNK = 1 << 20
MISSING = 66  # exit code of our remote commands for "no such file"
BIG = 67  # exit code of ``get``'s command for "a file for OpenSSH's client" (``openssh``)
BIG_FILE = 64 << 20  # files from this size go up on their own (``SSHHost._put_file``)


class SSHHost:
    stats = ssh_pool.stats  # handshakes / reconnects / retired, per process

    def __init__(self, settings: SSHSettings, root: PurePosixPath, guard: ssh_pool.Guard | None = None):
        self.settings = settings
        self.name = settings.host
        self.root = PurePosixPath(root)
        self.guard = guard  # the host's circuit breaker, consulted on every new connection

    # ---------------------------------------------------------------- Host protocol
    def run(self, command: str, *, timeout: float = 60) -> CommandResult:
        # Not retried once sent: running e.g. sbatch twice would submit twice.
        rc, out, err = self._call("command", lambda c: self._exec(c, command, timeout=timeout),
                                  idempotent=False)
        return CommandResult(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def exists(self, remote_path: PurePosixPath) -> bool:
        path = self._path(remote_path)

        def op(conn: ssh_pool.Connection) -> bool:
            with conn.sftp() as sftp:
                try:
                    sftp.stat(str(path))
                except FileNotFoundError:
                    return False
                return True
        return self._call("stat", op)

    def put_tree(self, local_dir: Path, remote_dir: PurePosixPath, files: list[str]) -> int:
        """Small files in one tar stream (GNU tar, local) through one exec channel into
        ``remote_dir``; each big one straight from this process into ``cat`` (no tar and no
        pipe between: on a 2-core host that CPU is what it takes to keep up with scp)."""
        rels = [str(safe_relpath(f)) for f in files]
        dst = self._path(remote_dir)
        sizes = {rel: (Path(local_dir) / rel).lstat().st_size for rel in rels}  # fail before sending; a link by its own
        big = [rel for rel in rels if sizes[rel] >= BIG_FILE]
        small = [rel for rel in rels if sizes[rel] < BIG_FILE]
        if small:
            self._put_tar(local_dir, dst, small, sum(sizes[rel] for rel in small))
        for rel in big:
            self._put_file(local_dir, dst, rel, sizes[rel])
        return sum(sizes.values())

    def _put_tar(self, local_dir: Path, dst: PurePosixPath, rels: list[str], size: int) -> None:
        # Records of 1 MiB (64 KiB for small uploads: the last record is padded) instead of
        # tar's 10 KiB: both tars do far fewer syscalls.
        blocks = "2048" if size >= BIG_FILE else "128"
        remote = (f"mkdir -p -- {shlex.quote(str(dst))} && exec tar -C {shlex.quote(str(dst))} "
                  f"-b {blocks} -B --no-same-owner -xf -")
        with tempfile.NamedTemporaryFile("wb", prefix="mqi-tar-") as names, \
                tempfile.TemporaryFile() as tar_err:
            names.write(b"\0".join(r.encode("utf-8", "surrogateescape") for r in rels))
            names.flush()
            # --null: names verbatim (never options). No --dereference: a link swapped into a
            # validated case is never followed (nothing outside the inbox is read); it fails
            # the upload's verification instead.
            argv = ["tar", "-C", str(local_dir), "--null", "--no-unquote", "--no-recursion",
                    "-T", names.name, "-b", blocks, "-cf", "-"]

            def op(conn: ssh_pool.Connection) -> None:
                tar_err.seek(0)
                tar_err.truncate()
                with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=tar_err) as tar:
                    openssh.grow_pipe(tar.stdout)
                    try:
                        rc, _, err = self._exec(conn, remote, feed=tar.stdout)
                    except BaseException:
                        tar.kill()  # never leave tar blocked on a pipe nobody reads
                        raise
                    if rc != 0:
                        tar.kill()
                if rc == 0 and tar.returncode != 0:
                    tar_err.seek(0)
                    raise TransferError(f"local tar failed: {error_line(tar_err.read().decode(errors='replace'))}")
                self._upload_failed(rc, err, dst, "remote tar")
            self._call("upload", op, nbytes=size)

    def _put_file(self, local_dir: Path, dst: PurePosixPath, rel: str, size: int) -> None:
        """One big file, opened without following a link anywhere below ``local_dir`` (as
        tar archives a link, never its target), written by ``cat`` on the host."""
        from .hosts import open_case_file

        target = dst / rel
        # rm first: a link left in a reused staging folder is replaced, never written through
        remote = (f"mkdir -p -- {shlex.quote(str(target.parent))} && rm -f -- {shlex.quote(str(target))} && "
                  f"exec cat > {shlex.quote(str(target))}")

        def op(conn: ssh_pool.Connection) -> None:
            with open_case_file(Path(local_dir), rel) as source:
                rc, _, err = self._exec(conn, remote, feed=source)
            self._upload_failed(rc, err, dst, f"writing {rel}")
        self._call("upload", op, nbytes=size)

    def _upload_failed(self, rc: int, err: bytes, dst: PurePosixPath, what: str) -> None:
        if rc == 0:
            return
        text = err.decode("utf-8", "replace")
        if any(word in text for word in NO_SPACE_WORDS):
            raise NoSpace(f"the disk under {dst} on {self.name} ran full ({error_line(text)})", where="remote")
        raise TransferError(f"{what} into {dst} failed (exit {rc}): {error_line(text)}")

    def sha256(self, remote_dir: PurePosixPath, files: list[str]) -> dict[str, str | None]:
        base = self._path(remote_dir)
        by_name = {str(safe_relpath(f)): f for f in files}
        out: dict[str, str | None] = {f: None for f in files}
        if not by_name:
            return out
        # names go in as NUL-separated data, so no command line grows with the file count
        q = shlex.quote(str(base))
        cmd = f"[ -d {q} ] || exit 0; cd {q} && xargs -0 sha256sum --"
        names = b"\0".join(n.encode("utf-8", "surrogateescape") for n in by_name)
        rc, text, err = self._call("sha256sum", lambda c: self._exec(c, cmd, feed=names))
        if rc not in (0, 123):  # 123: some file missing or unreadable, left as None
            raise TransferError(f"sha256sum in {base} failed ({rc}): {_tail(err)}")
        for name, digest in parse_sha256sum(text):
            if name in by_name:
                out[by_name[name]] = digest
        return out

    def list_files(self, remote_dir: PurePosixPath) -> list[str]:
        base = shlex.quote(str(self._path(remote_dir)))
        rc, out, err = self._call("find", lambda c: self._exec(
            c, f"[ -d {base} ] || exit 0; cd {base} && find . -type f -print0"))
        if rc != 0:
            raise TransferError(f"listing {remote_dir} failed ({rc}): {_tail(err)}")
        return sorted(n.decode("utf-8", "surrogateescape")[2:] for n in out.split(b"\0") if n)

    def get(self, remote_path: PurePosixPath, local_path: Path) -> int:
        # An exec channel reads ~3x faster than SFTP get(); safe at any size as paramiko
        # never re-keys on our connections (ssh_pool.AES_REKEY_BYTES). A big file comes
        # through OpenSSH's client when there is one (``openssh``: C decrypts faster).
        path = shlex.quote(str(self._path(remote_path)))
        cat = f"[ -f {path} ] || exit {MISSING}; exec cat -- {path}"
        # one command either way: a big file answers BIG at once instead of its bytes
        cmd = (f"[ -f {path} ] && [ \"$(stat -c %s -- {path})\" -ge {openssh.FROM_BYTES} ] && exit {BIG}; {cat}"
               if openssh.available() else cat)
        try:
            with open(local_path, "wb") as sink:  # a read bigger than its buffer is written as it is: no copy
                def op(conn: ssh_pool.Connection) -> tuple[int, bytes]:
                    sink.seek(0)
                    sink.truncate()
                    try:
                        rc, _, err = self._exec(conn, cmd, sink=sink)
                    except OSError as exc:  # the local disk, not the connection: not a drop
                        if exc.errno in NO_SPACE_ERRNOS:
                            raise local_disk_full(local_path, exc) from exc
                        raise
                    if rc == BIG:  # its size on stderr first: a short file is told from a whole one
                        return self._get_with_openssh(
                            f"[ -f {path} ] || exit {MISSING}; printf 'mqi-size %s\\n' \"$(stat -c %s -- {path})\" >&2; "
                            f"exec cat -- {path}", sink)
                    conn.moved += sink.tell()
                    return rc, err
                rc, err = self._call("download", op)
                size = sink.tell()
        except OSError as exc:  # buffered bytes written at close
            Path(local_path).unlink(missing_ok=True)
            if exc.errno in NO_SPACE_ERRNOS:
                raise local_disk_full(local_path, exc) from exc
            raise
        except NoSpace:
            Path(local_path).unlink(missing_ok=True)
            raise
        if rc != 0:
            Path(local_path).unlink(missing_ok=True)
            if rc == MISSING:
                raise TransferError(f"{remote_path} does not exist on {self.name}", transient=False)
            raise TransferError(f"reading {remote_path} failed ({rc}): {_tail(err)}")
        return size

    def _get_with_openssh(self, cmd: str, sink) -> tuple[int, bytes]:
        if self.guard is not None:
            self.guard.before_connect()  # its own login: the breaker decides as for ours
        try:
            rc, size, err = openssh.fetch(self.settings, cmd, sink.fileno())
        except openssh.Stalled as exc:
            raise TransferError(f"download from {self.name} stalled: {exc}", transient=True) from exc
        sink.seek(size)
        announced = re.search(rb"^mqi-size (\d+)$", err, re.M)
        expected = int(announced.group(1)) if announced else None
        if expected is not None and size < expected and shutil.disk_usage(Path(sink.name).parent).free < expected - size:
            raise local_disk_full(Path(sink.name), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        if rc == 0 and size != expected:
            raise TransferError(f"download from {self.name} ended after {size} of {expected} bytes", transient=True)
        if rc == openssh.LOGIN_FAILED:
            if self.guard is not None:
                self.guard.failed(_tail(err))
            raise ConnectionError_(f"OpenSSH could not log in to {self.name}:{self.settings.port} "
                                   f"for a download: {_tail(err)}")
        if self.guard is not None:
            self.guard.succeeded()
        return rc, err

    def write_text(self, remote_path: PurePosixPath, text: str) -> None:
        path = self._path(remote_path, below_root=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")

        def op(conn: ssh_pool.Connection) -> None:
            with conn.sftp() as sftp:
                _sftp_makedirs(sftp, path.parent)
                with sftp.open(str(tmp), "wb") as f:
                    f.write(text.encode())
                sftp.posix_rename(str(tmp), str(path))  # readers see the old or the new text
        self._call("write", op)

    def read_tail(self, remote_path: PurePosixPath, max_bytes: int = 65536) -> str:
        path = self._path(remote_path)

        def op(conn: ssh_pool.Connection) -> str:
            with conn.sftp() as sftp:
                try:
                    f = sftp.open(str(path), "rb")
                except FileNotFoundError:
                    return ""
                with f:
                    st = f.stat()
                    if not stat.S_ISREG(st.st_mode or 0):
                        return ""
                    f.seek(max(0, (st.st_size or 0) - max_bytes))
                    return f.read(max_bytes).decode("utf-8", "replace")
        return self._call("read", op)

    def remove_tree(self, remote_dir: PurePosixPath) -> None:
        path = shlex.quote(str(self._path(remote_dir, below_root=True)))
        rc, _, err = self._call("rm", lambda c: self._exec(c, f"rm -rf -- {path}"))
        if rc != 0:
            raise TransferError(f"removing {remote_dir} failed ({rc}): {_tail(err)}")

    def rename(self, src: PurePosixPath, dst: PurePosixPath) -> None:
        a, b = str(self._path(src, below_root=True)), str(self._path(dst, below_root=True))

        def op(conn: ssh_pool.Connection) -> None:
            with conn.sftp() as sftp:
                try:
                    sftp.posix_rename(a, b)
                except FileNotFoundError:
                    raise TransferError(f"cannot rename {src}: it does not exist on {self.name}",
                                        transient=False) from None
        self._call("rename", op, idempotent=False)

    # ---------------------------------------------------------------- helpers
    def _path(self, remote: PurePosixPath, *, below_root: bool = False) -> PurePosixPath:
        """``remote`` if it lies under root (strictly, for what we delete or move)."""
        p = PurePosixPath(remote)
        inside = p.is_absolute() and ".." not in p.parts and "\0" not in str(p) and (
            p.is_relative_to(self.root) and not (below_root and p == self.root))
        if not inside:
            raise TransferError(f"{remote} is outside the remote root {self.root}", transient=False)
        return p

    def _call(self, what: str, op: Callable[[ssh_pool.Connection], T], *, nbytes: int = 0,
              idempotent: bool = True) -> T:
        """``op`` on a pooled connection; a dropped connection is replaced once."""
        for attempt in (1, 2):
            with ssh_pool.lease(self.settings, nbytes, self.guard) as conn:
                try:
                    return op(conn)
                except MQIError:
                    raise
                except (paramiko.SSHException, EOFError, OSError, ssh_pool.Dropped) as exc:
                    if not conn.is_drop(exc):
                        raise TransferError(f"{what} on {self.name} failed: {exc}") from exc
                    ssh_pool.discard(conn)
                    retry = idempotent or isinstance(exc, ssh_pool.Dropped)
                    if attempt == 2 or not retry:
                        raise ConnectionError_(f"connection to {self.name}:{self.settings.port} "
                                               f"lost during {what}: {exc or type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    def _exec(self, conn: ssh_pool.Connection, command: str, *, timeout: float | None = None,
              feed=None, sink=None) -> tuple[int, bytes, bytes]:
        """Run ``command``; ``feed`` (bytes or a binary pipe) goes to its stdin, its stdout
        into ``sink`` (a binary file) or the returned bytes. ``timeout`` bounds the whole
        command; without it, transfers fail after ``op_timeout`` seconds without progress."""
        watch = _Watch(self.settings.op_timeout if timeout is None else timeout, idle=timeout is None)
        with conn.session() as chan:
            chan.exec_command(command)
            feeder = None if feed is None else _Feeder(chan, feed, watch)
            out = _drain(chan, sink, watch)
            if out is None or not chan.status_event.wait(max(watch.remaining(), 0.1)):
                error = TransferError if watch.idle else ExecutionError
                raise error(f"command on {self.name} timed out after {watch.seconds} s"
                            f"{' without progress' if watch.idle else ''}", transient=True)
            if feeder is not None:
                feeder.check()
            status = chan.recv_exit_status()
            if status == -1 and not conn.alive():  # no exit status: the connection died
                raise EOFError("connection closed before the command finished")
            return status, *out


class _Watch:
    """A command's deadline: fixed (``run``) or pushed back whenever bytes move (transfers)."""

    def __init__(self, seconds: float, idle: bool):
        self.seconds, self.idle, self.last = seconds, idle, time.monotonic()

    def touch(self) -> None:
        if self.idle:
            self.last = time.monotonic()

    def remaining(self) -> float:
        return self.last + self.seconds - time.monotonic()


class _Feeder(threading.Thread):
    """Sends stdin while the caller reads stdout: neither side can block the other."""

    def __init__(self, chan: paramiko.Channel, feed, watch: _Watch):
        super().__init__(daemon=True)
        self.chan, self.feed, self.watch, self.error = chan, feed, watch, None
        self.start()

    def run(self) -> None:
        try:
            # memoryview: Channel.sendall re-slices what is left after every 32 KiB
            # packet, which copies a bytes object each time (quadratic in the chunk size)
            if isinstance(self.feed, bytes):
                self.chan.sendall(memoryview(self.feed))
            else:
                while data := self.feed.read1(CHUNK):
                    self.chan.sendall(memoryview(data))
                    self.watch.touch()
            self.chan.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException) as exc:  # remote ended early: see its exit code
            self.error = exc

    def check(self) -> None:
        self.join()
        if self.error is not None and not self.chan.transport.is_active():
            raise EOFError(f"connection lost while sending: {self.error}")


def _drain(chan: paramiko.Channel, sink, watch: _Watch) -> tuple[bytes, bytes] | None:
    """Read stdout (into ``sink`` if given) and stderr until EOF; None on timeout."""
    out: list[bytes] = []
    err: list[bytes] = []
    while True:
        if chan.recv_stderr_ready():
            err.append(chan.recv_stderr(CHUNK))
        elif sink is not None:
            # All that is buffered, blocking (the channel timeout applies): paramiko's buffer
            # moves what a smaller read leaves behind to its front, up to a window per read.
            data = chan.recv(ssh_pool.WINDOW)
            if not data:
                break
            sink.write(data)
            watch.touch()
        elif chan.recv_ready():
            out.append(chan.recv(CHUNK))
            watch.touch()
        elif chan.eof_received or chan.closed:
            break
        elif (remaining := watch.remaining()) <= 0:
            return None
        else:
            select.select([chan], [], [], min(remaining, 1.0))
    out.append(_rest(chan.recv))  # EOF may have come right after the last readiness check
    err.append(_rest(chan.recv_stderr))
    return b"".join(out), b"".join(err)


def _rest(recv) -> bytes:
    parts = []
    while data := recv(CHUNK):
        parts.append(data)
    return b"".join(parts)


def _sftp_makedirs(sftp: paramiko.SFTPClient, d: PurePosixPath) -> None:
    try:
        sftp.stat(str(d))
        return
    except FileNotFoundError:
        pass
    _sftp_makedirs(sftp, d.parent)
    try:
        sftp.mkdir(str(d))
    except OSError:
        sftp.stat(str(d))  # created meanwhile by someone else is fine; else this raises


_ESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}


def parse_sha256sum(text: bytes) -> list[tuple[str, str]]:
    """(name, digest) pairs from ``sha256sum`` output, undoing its escaping of names with
    a backslash or newline (such lines start with a backslash)."""
    pairs = []
    for line in text.decode("utf-8", "surrogateescape").split("\n"):
        escaped = line.startswith("\\")
        digest, sep, name = line[escaped:].partition(" ")
        if not sep or len(digest) != 64:
            continue
        name = name[1:]  # " " (text mode) or "*" (binary mode) precedes the name
        if escaped:
            name = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), name)
        pairs.append((name, digest))
    return pairs


def _tail(err: bytes) -> str:
    return error_line(err.decode("utf-8", "replace"))
