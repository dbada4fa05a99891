"""Big downloads through OpenSSH's own client, when the machine has one.

paramiko decrypts in Python: a 1 GiB download costs it about as much CPU as the two other
parties together (sshd encrypting, our process writing), which on a 2-core machine is
0.8-0.9x of ``scp``. OpenSSH's ``ssh`` decrypts in C. Only files from ``FROM_BYTES`` go
this way: each costs a login (~0.15 s), which pays off from a few hundred MB.

The trust decisions are the same as ``ssh_pool``'s: the same key, the same known_hosts
file with ``StrictHostKeyChecking=yes`` (an unknown or changed host key refuses), the same
ciphers, no user or system ``ssh_config``. The remote command is the caller's, quoted as
for paramiko. ssh writes the file itself; the caller compares its size with the one the
host announced (a full local disk leaves it short), and a file that stops growing is a stall.
"""
from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SSHSettings

FROM_BYTES = 256 << 20
LOGIN_FAILED = 255  # ssh's own exit code: it could not connect, verify or log in


@functools.cache  # not a PATH search per download
def available() -> bool:
    return shutil.which("ssh") is not None


def argv(s: "SSHSettings", command: str) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-T", "-x", "-p", str(s.port), "-l", s.user,
            "-i", str(s.key_file), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={s.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"Ciphers={','.join(s.ciphers)}",
            "-o", f"ConnectTimeout={max(1, round(s.connect_timeout))}",
            "-o", f"ServerAliveInterval={s.keepalive_seconds}", "-o", "LogLevel=ERROR",
            "--", s.host, command]


def grow_pipe(pipe) -> None:
    # a 64 KiB pipe wakes the reader 16 times per MiB; Linux allows 1 MiB without privileges
    try:
        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:
        pass


class Stalled(Exception):
    """No byte arrived for the allowed silence; the ssh process was killed."""


def fetch(s: "SSHSettings", command: str, sink_fd: int) -> tuple[int, int, bytes]:
    """Run ``command`` on the host, its stdout straight into ``sink_fd`` (a file opened for
    writing: ssh writes it itself, as scp does; a pipe through this process cost 5-20 %).
    Returns (exit code, size of the file, stderr). ``Stalled`` when the file did not grow for
    ``op_timeout`` seconds (ssh is killed)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: stderr can never block ssh
        proc = subprocess.Popen(argv(s, command), stdin=subprocess.DEVNULL, stdout=sink_fd, stderr=err)
        try:
            size, grew = -1, time.monotonic()
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    now = os.fstat(sink_fd).st_size
                    if now != size:
                        size, grew = now, time.monotonic()
                    elif time.monotonic() - grew > s.op_timeout:
                        raise Stalled(f"no data for {s.op_timeout:g} s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return rc, os.fstat(sink_fd).st_size, err.read()
