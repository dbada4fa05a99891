"""SSH connections for ``SSHHost``: one verified, authenticated transport per remote
account and process, shared by the process's threads, never across ``fork``.

Not ``paramiko.SSHClient``: it cannot set TCP_NODELAY (each small round trip then waits
~40 ms for a delayed ACK) and its host-key policies make trusting a key by accident easy.
Here the socket is ours, the host key is checked against known_hosts before we even
authenticate, and an unknown or changed key is a ``ConfigError`` for the operator.
"""
from __future__ import annotations

import base64
import logging
import errno
import hashlib
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol

import paramiko

from . import metrics
from .errors import ConfigError, ConnectionError_, MQIError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .config import SSHSettings

WINDOW = 8 << 20  # per-channel receive window: keeps a fast download from stalling on ACKs
MAX_PACKET = 256 << 10  # largest packet we accept; OpenSSH sends up to what we allow

# paramiko re-keys every 2**29 bytes (a limit meant for 64-bit-block ciphers), and a re-key
# that meets the server closing an exec channel hangs the transport (paramiko #822). We only
# allow AES (128-bit blocks), for which OpenSSH itself re-keys after 2**32 blocks = 64 GiB
# (RFC 4344); we use that limit and retire a connection once it has moved 32 GiB, so paramiko
# never starts a re-key and any single transfer below 32 GiB is safe on exec channels too.
AES_REKEY_BYTES = 1 << 36
RETIRE_AFTER_BYTES = 1 << 35
# sshd allows MaxSessions (default 10) channels per connection. Exec and SFTP channels are
# checked out from bounded pools that together stay below it, however many threads share
# the connection; a thread that finds none free waits instead of being refused.
EXEC_CHANNELS = 5
SFTP_CHANNELS = 3  # 5 + 3 = 8: sshd frees a slot only a moment after its channel closed


@dataclass
class Stats:
    handshakes: int = 0  # connections opened (TCP + key exchange + auth) by this process
    reconnects: int = 0  # of those, replacements for a dropped connection
    retired: int = 0  # of those, replacements for a connection that moved RETIRE_AFTER_BYTES


stats = Stats()


class Dropped(Exception):
    """No channel could be opened: nothing was sent, so a new connection may retry."""


class Connection:
    def __init__(self, transport: paramiko.Transport, settings: "SSHSettings"):
        self.transport = transport
        self.settings = settings
        self.moved = 0  # payload bytes through this transport, for retirement
        self.users = 0
        self.retired = False
        self._exec_slots = threading.BoundedSemaphore(EXEC_CHANNELS)
        # SFTPClient is not thread-safe: each is lent to one thread at a time.
        self._sftp_slots = threading.BoundedSemaphore(SFTP_CHANNELS)
        self._sftp_idle: list[paramiko.SFTPClient] = []
        self._sftp_lock = threading.Lock()

    def alive(self) -> bool:
        return self.transport.is_active()

    @contextmanager
    def session(self) -> Iterator[paramiko.Channel]:
        """An exec channel, closed on exit."""
        if not self._exec_slots.acquire(timeout=self.settings.op_timeout):
            raise Dropped(f"all {EXEC_CHANNELS} channels stayed busy for {self.settings.op_timeout} s")
        try:
            chan = self._open(lambda: self.transport.open_session(
                window_size=WINDOW, max_packet_size=MAX_PACKET, timeout=self.settings.connect_timeout))
            chan.settimeout(self.settings.op_timeout)  # a stalled transfer fails, never hangs
            with chan:
                yield chan
        finally:
            self._exec_slots.release()

    @contextmanager
    def sftp(self) -> Iterator[paramiko.SFTPClient]:
        """An SFTP client for this thread alone until the block ends; reused afterwards."""
        if not self._sftp_slots.acquire(timeout=self.settings.op_timeout):
            raise Dropped(f"all {SFTP_CHANNELS} SFTP channels stayed busy for {self.settings.op_timeout} s")
        client = None
        try:
            with self._sftp_lock:
                client = self._sftp_idle.pop() if self._sftp_idle else None
            if client is None or client.sock.closed:
                client = self._open(lambda: paramiko.SFTPClient.from_transport(
                    self.transport, window_size=WINDOW, max_packet_size=MAX_PACKET))
                client.get_channel().settimeout(self.settings.op_timeout)
            yield client
        except (FileNotFoundError, MQIError):
            raise  # an answer from the server (or our own verdict): the client is fine
        except BaseException:
            if client is not None:
                client.close()  # state unknown after a failure mid-request: do not lend it again
                client = None
            raise
        finally:
            if client is not None and not client.sock.closed:
                with self._sftp_lock:
                    self._sftp_idle.append(client)
            self._sftp_slots.release()

    def _open(self, opener):
        # sshd frees a session slot only some time after its channel closed: a refused
        # channel on a live connection means "wait", not "reconnect" (that would cost a
        # handshake and gain nothing).
        deadline = time.monotonic() + self.settings.op_timeout
        delay = 0.05
        while True:
            try:
                return opener()
            except paramiko.ChannelException as exc:
                if not self.alive():
                    raise Dropped(f"cannot open a channel: {exc}") from exc
                if time.monotonic() > deadline:
                    raise ConnectionError_(f"{self.settings.host} refused new channels for "
                                           f"{self.settings.op_timeout:g} s: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise Dropped(f"cannot open a channel: {exc or type(exc).__name__}") from exc

    def is_drop(self, exc: BaseException) -> bool:
        """True when ``exc`` means the connection is gone (not a remote-side error)."""
        if isinstance(exc, (Dropped, EOFError, ConnectionError)) or not self.alive():
            return True
        return isinstance(exc, OSError) and exc.errno in (errno.EBADF, errno.ENOTCONN)


# ---------------------------------------------------------------- the per-process pool
_lock = threading.Lock()
_pool: dict[tuple, Connection] = {}
_key_locks: dict[tuple, threading.Lock] = {}
_orphans: list = []


def _forget_after_fork() -> None:
    # The child shares the parent's sockets: using them would interleave two SSH streams,
    # and even garbage-collecting a Channel writes a CLOSE into the parent's session. Keep
    # the objects alive forever and start empty.
    global _lock, _pool, _key_locks
    _orphans.append(_pool)
    _lock, _pool, _key_locks = threading.Lock(), {}, {}
    stats.handshakes = stats.reconnects = stats.retired = 0


os.register_at_fork(after_in_child=_forget_after_fork)


def pool_key(s: "SSHSettings") -> tuple:
    # Not just (host, port, user): another known_hosts file or key is another trust
    # decision, other timeouts another channel setup.
    return tuple(value for _name, value in s)


class Guard(Protocol):
    """Told about every attempt to open a connection (the host's circuit breaker)."""

    def before_connect(self) -> None: ...  # raises to refuse the attempt
    def succeeded(self) -> None: ...
    def failed(self, error: str) -> None: ...


@contextmanager
def lease(settings: "SSHSettings", nbytes: int = 0, guard: Guard | None = None) -> Iterator[Connection]:
    """A live connection for one operation expected to move about ``nbytes``."""
    conn = _acquire(settings, nbytes, guard)
    try:
        yield conn
    finally:
        with _lock:
            conn.users -= 1
            close = conn.retired and conn.users == 0
        if close:
            conn.transport.close()


def _acquire(settings: "SSHSettings", nbytes: int, guard: Guard | None = None) -> Connection:
    key = pool_key(settings)
    with _lock:
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:  # one handshake per key even when threads race for it
        conn = _pool.get(key)
        if conn is not None and not conn.alive():
            discard(conn)
            conn = None
        elif conn is not None and conn.moved and conn.moved + nbytes > RETIRE_AFTER_BYTES:
            stats.retired += 1
            _retire(conn)
            conn = None
        if conn is None:
            conn = Connection(_guarded_connect(settings, guard), settings)
            with _lock:
                _pool[key] = conn
        with _lock:
            conn.users += 1
            conn.moved += nbytes
        return conn


def _guarded_connect(settings: "SSHSettings", guard: Guard | None) -> paramiko.Transport:
    if guard is None:
        return connect(settings)
    guard.before_connect()
    try:
        transport = connect(settings)
    except ConnectionError_ as exc:
        guard.failed(str(exc))
        raise
    guard.succeeded()
    return transport


def discard(conn: Connection) -> None:
    """Forget a dropped connection; the next lease opens a new one (counted)."""
    with _lock:
        if conn.retired:
            return
        stats.reconnects += 1
    log.warning("SSH connection to %s:%s dropped; the next operation reconnects",
                conn.settings.host, conn.settings.port)
    _retire(conn)


def _retire(conn: Connection) -> None:
    with _lock:
        conn.retired = True
        if _pool.get(pool_key(conn.settings)) is conn:
            del _pool[pool_key(conn.settings)]
        close = conn.users == 0 or not conn.alive()
    if close:
        conn.transport.close()


def current(settings: "SSHSettings") -> Connection | None:
    """The pooled connection for these settings, if any (for tests and diagnostics)."""
    with _lock:
        return _pool.get(pool_key(settings))


def close_all() -> None:
    """Close every pooled connection (tests, benchmarks, shutdown)."""
    with _lock:
        conns = list(_pool.values())
        _pool.clear()
    for conn in conns:
        conn.retired = True
        conn.transport.close()


# ---------------------------------------------------------------- connecting
def connect(s: "SSHSettings") -> paramiko.Transport:
    where = f"{s.host}:{s.port}"
    known = _load_known_hosts(s)
    pkey = _load_key(s)
    try:
        sock = socket.create_connection((s.host, s.port), timeout=s.connect_timeout)
    except OSError as exc:
        raise ConnectionError_(f"cannot reach {where}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = paramiko.Transport(sock, default_window_size=WINDOW, default_max_packet_size=MAX_PACKET)
    try:
        t.banner_timeout = t.handshake_timeout = t.auth_timeout = s.connect_timeout
        opts = t.get_security_options()
        opts.ciphers = [c for c in s.ciphers if c in opts.ciphers] or _no_cipher(s, opts.ciphers)
        # ask first for the key types known_hosts has for this server, like OpenSSH does
        known_types = {_key_family(k) for k in (known.lookup(_known_name(s)) or {})}
        opts.key_types = sorted(opts.key_types, key=lambda k: _key_family(k) not in known_types)
        t.start_client(timeout=s.connect_timeout)
        verify_host_key(s, t.get_remote_server_key(), known)  # before anything is sent
        t.auth_publickey(s.user, pkey)
        t.packetizer.REKEY_BYTES = AES_REKEY_BYTES  # see above: only AES ciphers are allowed
        t.set_keepalive(s.keepalive_seconds)
    except ConfigError:
        t.close()
        raise
    except paramiko.AuthenticationException as exc:
        t.close()
        raise ConnectionError_(f"{s.user}@{where} did not accept the key {s.key_file}: {exc}") from exc
    except (paramiko.SSHException, EOFError, OSError) as exc:
        t.close()
        raise ConnectionError_(f"SSH handshake with {where} failed: {exc or type(exc).__name__}") from exc
    stats.handshakes += 1
    metrics.SSH_CONNECTIONS.labels(host=s.host).inc()
    return t


def _no_cipher(s: "SSHSettings", supported) -> list[str]:
    raise ConfigError(f"none of the ciphers {list(s.ciphers)} is supported; choose from {list(supported)}")


def _load_known_hosts(s: "SSHSettings") -> paramiko.HostKeys:
    try:
        return paramiko.HostKeys(str(s.known_hosts))
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise ConfigError(f"cannot read known_hosts file {s.known_hosts}: {exc}") from exc


def _load_key(s: "SSHSettings") -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(s.key_file)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise ConfigError(f"cannot load the SSH key {s.key_file} (unencrypted Ed25519, ECDSA or "
                          f"RSA key expected): {exc or type(exc).__name__}") from exc


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's format, as printed by ``ssh-keygen -lf``."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _known_name(s: "SSHSettings") -> str:
    return s.host if s.port == 22 else f"[{s.host}]:{s.port}"


def _key_family(key_type: str) -> str:
    # "rsa-sha2-512" is a signature algorithm for an "ssh-rsa" key
    return "ssh-rsa" if key_type.startswith("rsa-sha2-") else key_type


def verify_host_key(s: "SSHSettings", key: paramiko.PKey, known: paramiko.HostKeys) -> None:
    name, offered = _known_name(s), f"{key.get_name()} key {fingerprint(key)}"
    keyscan = (f"ssh-keyscan -p {s.port} -t {_keyscan_type(key.get_name())} {s.host} "
               f">> {s.known_hosts}")
    entries = known.lookup(name)
    if not entries:
        raise ConfigError(
            f"SSH host key of {s.host}:{s.port} is not trusted: the server offered the "
            f"{offered}, which is not in {s.known_hosts}. Check that fingerprint with the "
            f"cluster administrator, then trust it with: {keyscan}")
    ours = entries.get(key.get_name())
    if ours is None or ours.asbytes() != key.asbytes():
        have = ", ".join(f"{k.get_name()} {fingerprint(k)}" for k in entries.values())
        raise ConfigError(
            f"SSH host key of {s.host}:{s.port} has CHANGED (or someone is intercepting the "
            f"connection): the server offered the {offered}, but {s.known_hosts} has {have}. "
            f"Nothing was sent. Only if the cluster administrator confirms the new fingerprint: "
            f"ssh-keygen -R '{name}' -f {s.known_hosts} && {keyscan}")


def _keyscan_type(key_type: str) -> str:
    return {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(key_type, "ecdsa")
