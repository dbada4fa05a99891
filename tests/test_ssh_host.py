"""Contract tests for SSHHost: the same checks run against LocalHost (a folder) and SSHHost
(the real OpenSSH sshd of the testbed), plus what only SSH has: host-key checks, one login
per process, reconnect after a dropped connection, fork safety.

Needs root and tests/testbed/install.sh; run: .venv/bin/python -m pytest tests/test_ssh_host.py
"""
from __future__ import annotations

import glob
import multiprocessing
import os
import socket
import subprocess
import threading
import uuid
from pathlib import Path, PurePosixPath

import pytest
from pydantic import ValidationError

from mqi_celery import ssh_pool
from mqi_celery.errors import ConfigError, ConnectionError_, ExecutionError, MQIError, NoSpace, TransferError
from mqi_celery.errors import ValidationError as CaseInvalid
from mqi_celery.file_transfer import download_verified, upload_verified
from mqi_celery.hosts import LocalHost, file_sha256
from mqi_celery.config import SSHSettings
from mqi_celery.ssh_host import SSHHost, parse_sha256sum
from tests.conftest import poll_until

pytestmark = pytest.mark.slurm

HOSTILE = ["a b", "x'; touch /tmp/pwned-$$ #", "$(touch pwned)", "`touch pwned`", "-rf",
           "back\\slash", "quote\"d", "semi;colon|pipe&amp>gt"]


def ssh_settings(tb, **over) -> SSHSettings:
    values = dict(host=tb.host, port=tb.ssh_port, user=tb.user, key_file=tb.client_key,
                  known_hosts=tb.known_hosts)
    return SSHSettings(**{**values, **over})


def ssh_host(tb, **over) -> SSHHost:
    return SSHHost(ssh_settings(tb, **over), tb.remote_root / f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["local", "ssh"])
def host(request, tmp_path):
    if request.param == "local":
        return LocalHost(tmp_path / "remote")
    return ssh_host(request.getfixturevalue("slurm_testbed"))


def on_disk(host) -> Path:
    """The host's root as a local folder (the testbed's 'cluster' is this machine)."""
    return Path(host.root)


def make_tree(base: Path, names: list[str]) -> dict[str, str]:
    for i, name in enumerate(names):
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(i * 7919) + name.encode())
    return {name: file_sha256(base / name) for name in names}


# ---------------------------------------------------------------- contract (both hosts)
def test_tree_round_trip(host, tmp_path):
    names = ["plan.dcm", "empty", "beam_1/PlanInfo.txt", "beam_1/layers/0001.ptn",
             "beam_2/deep/er/big.bin"]
    local = tmp_path / "case"
    make_tree(local, names)
    (local / "empty").write_bytes(b"")
    (local / "beam_2/deep/er/big.bin").write_bytes(os.urandom(5 << 20))  # > one channel window
    hashes = {n: file_sha256(local / n) for n in names}
    dst = host.root / "case1" / "input"

    assert not host.exists(dst)
    sent = host.put_tree(local, dst, names)
    assert sent == sum((local / n).stat().st_size for n in names)
    assert host.exists(dst) and host.exists(dst / "beam_1/PlanInfo.txt")
    assert host.list_files(dst) == sorted(names)
    assert host.list_files(host.root / "nothing-here") == []
    assert host.sha256(dst, names + ["missing.txt"]) == {**hashes, "missing.txt": None}
    assert host.sha256(host.root / "nothing-here", ["a"]) == {"a": None}
    for name in names:
        out = tmp_path / "down" / name.replace("/", "_")
        out.parent.mkdir(exist_ok=True)
        assert host.get(dst / name, out) == (local / name).stat().st_size
        assert file_sha256(out) == hashes[name]
    with pytest.raises(TransferError) as err:
        host.get(dst / "missing.txt", tmp_path / "missing.txt")
    assert not err.value.transient and not (tmp_path / "missing.txt").exists()


def test_a_link_in_a_case_is_never_followed(host, tmp_path):
    local = tmp_path / "case"
    make_tree(local, ["real.txt"])
    secret = tmp_path / "outside.txt"
    secret.write_text("outside the case: never read")
    (local / "link.txt").symlink_to(secret)
    try:
        host.put_tree(local, host.root / "c", ["link.txt"])
    except CaseInvalid:
        pass  # LocalHost refuses it; tar sends the link itself, which then fails verification
    copied = on_disk(host) / "c" / "link.txt"
    assert copied.is_symlink() or not copied.exists()


def test_big_files_go_up_on_their_own_and_never_through_a_link(slurm_testbed, tmp_path, monkeypatch):
    """From ssh_host.BIG_FILE a file goes straight into `cat` on the host, opened without
    following a link (the guarantee tar gives the others)."""
    from mqi_celery import ssh_host as module

    monkeypatch.setattr(module, "BIG_FILE", 1 << 20)
    host = ssh_host(slurm_testbed)
    local = tmp_path / "case"
    hashes = make_tree(local, ["plan.dcm", "beam_1/PlanInfo.txt"])
    (local / "beam_1" / "layers").mkdir()
    (local / "beam_1" / "layers" / "big.ptn").write_bytes(os.urandom(3 << 20))
    hashes["beam_1/layers/big.ptn"] = file_sha256(local / "beam_1" / "layers" / "big.ptn")
    dst = host.root / "big_case" / "input"
    sent_alone = []
    real_put_file = SSHHost._put_file
    monkeypatch.setattr(SSHHost, "_put_file", lambda self, *a: sent_alone.append(a[2]) or real_put_file(self, *a))
    assert host.put_tree(local, dst, sorted(hashes)) == sum((local / n).stat().st_size for n in hashes)
    assert sent_alone == ["beam_1/layers/big.ptn"]  # the small ones went in the tar stream
    assert host.sha256(dst, sorted(hashes)) == hashes
    secret = tmp_path / "outside.bin"
    secret.write_bytes(b"outside the case: never read " * 100_000)
    (local / "beam_1" / "linked.ptn").symlink_to(secret)
    host.put_tree(local, dst, ["beam_1/linked.ptn"])  # sized as a link: the tar stream sends the link itself
    copied = on_disk(host) / "big_case" / "input" / "beam_1" / "linked.ptn"
    assert copied.is_symlink() or b"never read" not in copied.read_bytes()
    # A big file swapped for a link after it was sized is opened without following it.
    with pytest.raises(CaseInvalid, match="became a symbolic link"):
        host._put_file(local, dst, "beam_1/linked.ptn", 3 << 20)


def test_pipeline_upload_and_download_verified(host, tmp_path):
    local = tmp_path / "case"
    manifest = make_tree(local, ["RP.dcm", "b1/a.ptn", "b1/a.mgn", "b2/x.ptn"])
    dst = host.root / "c" / "input"
    assert upload_verified(host, local, dst, manifest)["files"] == 4
    assert upload_verified(host, local, dst, manifest) == {"files": 0, "bytes": 0}  # already there
    (local / "b2/x.ptn").write_bytes(b"changed")
    manifest["b2/x.ptn"] = file_sha256(local / "b2/x.ptn")
    assert upload_verified(host, local, dst, manifest) == {"files": 1, "bytes": 7}  # only the difference
    got = download_verified(host, dst / "b1", tmp_path / "results")
    assert got == {"a.ptn": manifest["b1/a.ptn"], "a.mgn": manifest["b1/a.mgn"]}


def test_write_read_rename_remove(host):
    log = host.root / "case2" / "beam_1" / "engine.log"
    host.write_text(log, "line 1\n" + "x" * 100 + "\nlast line\n")
    assert host.read_tail(log, 10) == "last line\n"
    assert host.read_tail(log).startswith("line 1\n")
    host.write_text(log, "replaced")
    assert host.read_tail(log) == "replaced"
    assert host.read_tail(host.root / "case2" / "no.log") == ""
    assert host.read_tail(host.root / "case2") == ""  # a directory is not a log

    host.rename(host.root / "case2", host.root / "case2.done")
    assert not host.exists(host.root / "case2")
    assert host.read_tail(host.root / "case2.done" / "beam_1" / "engine.log") == "replaced"
    with pytest.raises((OSError, MQIError)):
        host.rename(host.root / "case2", host.root / "case3")  # gone
    host.remove_tree(host.root / "case2.done")
    assert not host.exists(host.root / "case2.done")
    host.remove_tree(host.root / "never-existed")  # no error, like rm -rf


def test_run(host):
    r = host.run("echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    big = host.run("head -c 3000000 /dev/zero | tr '\\0' a; head -c 300000 /dev/zero | tr '\\0' b >&2")
    assert (len(big.stdout), len(big.stderr)) == (3_000_000, 300_000)  # both streams, no deadlock
    with pytest.raises(ExecutionError) as err:
        host.run("sleep 5", timeout=0.5)
    assert err.value.transient


def test_hostile_names_neither_escape_nor_execute(host, tmp_path):
    tmp_before = set(glob.glob("/tmp/pwned*"))
    local = tmp_path / "case"
    hashes = make_tree(local, HOSTILE)
    for case_id in ["$(touch pwned)", "x'; touch pwned #", "-rf"]:
        dst = host.root / case_id / "input"
        host.put_tree(local, dst, HOSTILE)
        assert host.list_files(dst) == sorted(HOSTILE)
        assert host.sha256(dst, HOSTILE) == hashes
        for name in HOSTILE:
            host.get(dst / name, tmp_path / "got")
            assert file_sha256(tmp_path / "got") == hashes[name]
        host.write_text(host.root / case_id / "log $(touch pwned)", "ok")
        assert host.read_tail(host.root / case_id / "log $(touch pwned)") == "ok"
        host.rename(host.root / case_id, host.root / (case_id + " `touch pwned`"))
        host.remove_tree(host.root / (case_id + " `touch pwned`"))
        assert not host.exists(host.root / (case_id + " `touch pwned`"))

    outside = host.root.parent / "escape"
    for call in (lambda: host.put_tree(local, host.root / "c", ["../escape"]),
                 lambda: host.put_tree(local, host.root / "c", ["/etc/passwd"]),
                 lambda: host.sha256(host.root / "c", ["../../etc/passwd"])):
        with pytest.raises(ValueError):  # naming.safe_relpath, before anything is sent
            call()
    for call in (lambda: host.put_tree(local, host.root / ".." / "escape", ["a b"]),
                 lambda: host.write_text(outside, "x"),
                 lambda: host.write_text(host.root / "a" / ".." / ".." / "escape", "x"),
                 lambda: host.get(PurePosixPath("/etc/passwd"), tmp_path / "p"),
                 lambda: host.read_tail(PurePosixPath("/etc/passwd")),
                 lambda: host.list_files(PurePosixPath("/etc")),
                 lambda: host.exists(PurePosixPath("/etc/passwd")),
                 lambda: host.remove_tree(PurePosixPath("/tmp")),
                 lambda: host.remove_tree(host.root / ".."),
                 lambda: host.rename(host.root / "a", outside)):
        with pytest.raises(TransferError) as err:
            call()
        assert "outside the remote root" in str(err.value) and not err.value.transient

    assert not Path(outside).exists()
    assert set(glob.glob("/tmp/pwned*")) == tmp_before
    markers = list(on_disk(host).rglob("pwned")) + [
        p for p in (Path.home(), Path.cwd(), on_disk(host).parent) if (p / "pwned").exists()]
    assert markers == []


# ---------------------------------------------------------------- SSH only: trust
def test_unknown_host_key_refused_before_anything_is_sent(slurm_testbed, tmp_path):
    tb = slurm_testbed
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    host = ssh_host(tb, known_hosts=empty)
    (tmp_path / "f").write_text("data")
    logins = tb.accepted_ssh_logins()
    with pytest.raises(ConfigError) as err:
        host.put_tree(tmp_path, host.root / "c", ["f"])
    message = str(err.value)
    assert f"{tb.host}:{tb.ssh_port}" in message and tb.host_key_fingerprint in message
    assert "ssh-ed25519" in message and f"ssh-keyscan -p {tb.ssh_port}" in message and str(empty) in message
    assert not err.value.transient
    assert not Path(host.root).exists()  # nothing written remotely
    assert tb.accepted_ssh_logins() == logins  # we did not even authenticate


def test_changed_host_key_refused(slurm_testbed, tmp_path):
    tb = slurm_testbed
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[{tb.host}]:{tb.ssh_port} {other[0]} {other[1]}\n")
    host = ssh_host(tb, known_hosts=known)
    with pytest.raises(ConfigError) as err:
        host.write_text(host.root / "x", "secret")
    assert "CHANGED" in str(err.value) and tb.host_key_fingerprint in str(err.value)
    assert not Path(host.root).exists()


def test_missing_known_hosts_or_key_is_a_config_error(slurm_testbed, tmp_path):
    for over in ({"known_hosts": tmp_path / "absent"}, {"key_file": tmp_path / "absent"}):
        with pytest.raises(ConfigError):
            host = ssh_host(slurm_testbed, **over)
            host.exists(host.root)


def test_settings_are_validated():
    base = dict(host="h", user="u", key_file="k", known_hosts="kh")
    assert SSHSettings(**base).ciphers[0] == "aes128-gcm@openssh.com"
    for bad in ({"ciphers": ("3des-cbc",)}, {"password": "x"}, {"port": 0}):
        with pytest.raises(ValidationError):
            SSHSettings(**{**base, **bad})
    with pytest.raises(ValidationError):
        SSHSettings(**{k: v for k, v in base.items() if k != "known_hosts"})


# ---------------------------------------------------------------- SSH only: connections
def test_many_operations_one_login(slurm_testbed, tmp_path):
    tb = slurm_testbed
    ssh_pool.close_all()
    host = ssh_host(tb)
    local = tmp_path / "case"
    make_tree(local, ["a", "d/b"])
    logins, handshakes = tb.accepted_ssh_logins(), SSHHost.stats.handshakes
    for i in range(10):
        dst = host.root / f"case{i}"
        host.put_tree(local, dst, ["a", "d/b"])
        assert host.sha256(dst, ["a"])["a"] == file_sha256(local / "a")
        assert host.list_files(dst) == ["a", "d/b"] and host.exists(dst / "d")
        host.get(dst / "d/b", tmp_path / "b")
        host.write_text(dst / "log", f"run {i}")
        assert host.read_tail(dst / "log") == f"run {i}"
        assert host.run("true").returncode == 0
        host.rename(dst, host.root / f"done{i}")
    poll_until(lambda: tb.accepted_ssh_logins() > logins, 10, 0.02, "the login to be logged")
    assert tb.accepted_ssh_logins() == logins + 1
    assert SSHHost.stats.handshakes == handshakes + 1


@pytest.mark.parametrize("noticed", [True, False], ids=["drop-noticed", "drop-racing"])
def test_dropped_connection_reopened_once(slurm_testbed, noticed):
    host = ssh_host(slurm_testbed)
    host.write_text(host.root / "f", "before")
    conn = ssh_pool.current(host.settings)
    reconnects, logins = SSHHost.stats.reconnects, slurm_testbed.accepted_ssh_logins()

    conn.transport.sock.shutdown(socket.SHUT_RDWR)  # the network drops the connection
    conn.transport.sock.close()
    if noticed:
        poll_until(lambda: not conn.transport.is_active(), 10, 0.02, "paramiko to notice")
    assert host.read_tail(host.root / "f") == "before"  # SFTP on a new connection
    assert SSHHost.stats.reconnects == reconnects + 1
    assert host.run("echo again").stdout == "again\n"
    assert SSHHost.stats.reconnects == reconnects + 1
    poll_until(lambda: slurm_testbed.accepted_ssh_logins() == logins + 1, 10, 0.02, "the new login")


def test_threads_share_one_connection(slurm_testbed, tmp_path):
    ssh_pool.close_all()
    host = ssh_host(slurm_testbed)
    handshakes = SSHHost.stats.handshakes
    local = tmp_path / "case"
    hashes = make_tree(local, ["a", "b/c"])
    errors = []

    def worker(i: int) -> None:
        try:
            for j in range(5):
                dst = host.root / f"w{i}-{j}"
                host.put_tree(local, dst, ["a", "b/c"])
                host.write_text(dst / "log", f"{i} {j}")
                assert host.read_tail(dst / "log") == f"{i} {j}"
                assert host.sha256(dst, ["a", "b/c"]) == hashes
                host.get(dst / "b/c", tmp_path / f"got{i}")
                assert file_sha256(tmp_path / f"got{i}") == hashes["b/c"]
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and SSHHost.stats.handshakes == handshakes + 1


def test_more_commands_than_sshd_max_sessions_wait_for_a_slot(slurm_testbed):
    ssh_pool.close_all()
    host = ssh_host(slurm_testbed)
    handshakes = SSHHost.stats.handshakes
    results = []
    threads = [threading.Thread(target=lambda: results.append(host.run("sleep 0.3; echo ok").stdout))
               for _ in range(14)]  # sshd's MaxSessions is 10 per connection
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["ok\n"] * 14 and SSHHost.stats.handshakes == handshakes + 1


def _child_ops(settings: SSHSettings, root, queue) -> None:
    host = SSHHost(settings, root)
    queue.put((host.run("echo child").stdout, SSHHost.stats.handshakes))


def test_forked_child_opens_its_own_connection(slurm_testbed):
    host = ssh_host(slurm_testbed)
    assert host.run("echo parent").stdout == "parent\n"
    parent_conn, handshakes = ssh_pool.current(host.settings), SSHHost.stats.handshakes
    ctx = multiprocessing.get_context("fork")  # what Celery's prefork pool does
    queue = ctx.Queue()
    child = ctx.Process(target=_child_ops, args=(host.settings, host.root, queue))
    child.start()
    assert queue.get(timeout=30) == ("child\n", 1)  # a new handshake, counted from zero
    child.join(30)
    assert child.exitcode == 0
    assert host.run("echo parent").stdout == "parent\n"  # the parent's session is intact
    assert ssh_pool.current(host.settings) is parent_conn and SSHHost.stats.handshakes == handshakes


def test_connection_retired_before_paramiko_would_rekey(slurm_testbed, tmp_path, monkeypatch):
    host = ssh_host(slurm_testbed)
    host.run("true")
    first = ssh_pool.current(host.settings)
    assert first.transport.packetizer.REKEY_BYTES == ssh_pool.AES_REKEY_BYTES
    monkeypatch.setattr(ssh_pool, "RETIRE_AFTER_BYTES", 1 << 20)
    (tmp_path / "f").write_bytes(os.urandom(700_000))
    retired, handshakes = SSHHost.stats.retired, SSHHost.stats.handshakes
    host.put_tree(tmp_path, host.root / "a", ["f"])
    assert ssh_pool.current(host.settings) is first
    host.put_tree(tmp_path, host.root / "b", ["f"])  # 1.4 MB would pass the budget
    assert ssh_pool.current(host.settings) is not first
    assert (SSHHost.stats.retired, SSHHost.stats.handshakes) == (retired + 1, handshakes + 1)
    assert not first.transport.is_active()  # closed once its last user was done


def test_big_downloads_come_through_openssh_with_the_same_trust(slurm_testbed, tmp_path, monkeypatch):
    """From openssh.FROM_BYTES a download goes through OpenSSH's client (C decryption): the
    bytes are the file's, the host key is checked against our known_hosts only (an unknown
    key refuses and nothing is added to the file), and a full local disk is ``NoSpace``
    with no partial file left."""
    from mqi_celery import openssh

    monkeypatch.setattr(openssh, "FROM_BYTES", 1 << 20)
    host = ssh_host(slurm_testbed)
    remote = on_disk(host)
    remote.mkdir(parents=True)
    (remote / "big.dcm").write_bytes(os.urandom(5 << 20))
    (remote / "small.txt").write_bytes(b"small")
    calls = []
    real_fetch = openssh.fetch
    monkeypatch.setattr(openssh, "fetch", lambda *a: calls.append(a[1]) or real_fetch(*a))
    assert host.get(host.root / "big.dcm", tmp_path / "big.dcm") == 5 << 20
    assert file_sha256(tmp_path / "big.dcm") == file_sha256(remote / "big.dcm")
    assert host.get(host.root / "small.txt", tmp_path / "small.txt") == 5
    assert len(calls) == 1 and "big.dcm" in calls[0]  # the small file stayed on the pooled connection
    with pytest.raises(TransferError, match="does not exist") as missing:
        host.get(host.root / "absent.dcm", tmp_path / "absent.dcm")
    assert not missing.value.transient

    stranger = tmp_path / "known_hosts_other"
    stranger.write_text("")
    rc, written, err = real_fetch(ssh_settings(slurm_testbed, known_hosts=stranger),
                                  f"cat {remote / 'big.dcm'}", os.open(os.devnull, os.O_WRONLY))
    assert (rc, written) == (openssh.LOGIN_FAILED, 0) and b"Host key verification failed" in err
    assert stranger.read_text() == ""

    small_disk = tmp_path / "small_disk"
    small_disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "mqi-test-disk", str(small_disk)], check=True)
    try:
        with pytest.raises(NoSpace, match="ran full"):
            download_verified(host, host.root, small_disk / "results")
        assert not [p for p in (small_disk / "results").iterdir() if p.stat().st_size > 5]
    finally:
        subprocess.run(["umount", "-l", str(small_disk)], check=False)


def test_connect_failure_is_transient(tmp_path, slurm_testbed):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = ssh_host(slurm_testbed, port=port, connect_timeout=2)
    with pytest.raises(ConnectionError_) as err:
        host.exists(host.root)
    assert err.value.transient


def test_parse_sha256sum_escaped_names():
    text = (b"a" * 64 + b"  plain name\n" + b"\\" + b"b" * 64 + b"  back\\\\slash\\nnewline\n"
            + b"c" * 64 + b" *binary\n")
    assert parse_sha256sum(text) == [("plain name", "a" * 64), ("back\\slash\nnewline", "b" * 64),
                                     ("binary", "c" * 64)]
