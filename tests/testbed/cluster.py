"""A real single-node Slurm cluster (munged, slurmctld, slurmd, 2 fake GPUs) behind a
private sshd on 127.0.0.1, all state under one base directory. Needs root and the
Debian packages from tests/testbed/install.sh.

    with Testbed(Path("/tmp/x")) as tb:
        tb.ssh("sbatch --parsable --wrap true")
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import uuid
from pathlib import Path

from . import configs

REQUIRED_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol",
                     "scancel", "sinfo", "sacct", "sdiag", "ssh", "sftp", "ssh-keygen")
SSHD = "/usr/sbin/sshd"  # sshd must be started by absolute path (it re-execs itself)


class TestbedError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b, path=configs.SYSTEM_PATH) is None]
    return missing + ([SSHD] if not os.access(SSHD, os.X_OK) else [])


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free right now (the kernel picks them; sockets held
    together so they differ). Bound on all addresses: slurmctld/slurmd listen there."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # daemons get SIGTERM if the test process dies without calling stop()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Testbed:
    __test__ = False  # not a pytest test class despite the name

    host = "127.0.0.1"
    user = "root"
    ngpu = 2
    min_job_age = 86400
    start_timeout = 30.0
    stop_timeout = 15.0

    def __init__(self, base_dir: Path, *, accounting: bool = False):
        self.base = Path(base_dir).resolve()
        self.accounting = accounting  # slurmdbd on the machine's MariaDB: real sacct
        self.dbd_port = 0
        self.dbd_database = f"slurm_acct_{uuid.uuid4().hex[:8]}"
        self.slurm_conf = self.base / "etc" / "slurm.conf"
        self.client_key = self.base / "ssh" / "id_ed25519"
        self.known_hosts = self.base / "ssh" / "known_hosts"
        self.ssh_config = self.base / "ssh" / "ssh_config"
        # a folder jobs may write into; ssh sessions start in /root (HOME), so cd here
        # before sbatch or slurm-JOBID.out lands in /root
        self.remote_root = self.base / "remote"
        self.command_log = self.base / "log" / "scheduler-calls.log"
        self.shims = self.base / "shims"
        self.sshd_log = self.base / "log" / "sshd.log"
        self.ssh_port = self.ctld_port = self.slurmd_port = 0
        self.host_key_fingerprint = ""
        self.startup_seconds = 0.0
        self._procs: dict[str, subprocess.Popen] = {}
        self._argv: dict[str, tuple[str, ...]] = {}

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Testbed":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> None:
        if missing := missing_binaries():
            raise TestbedError(f"missing {missing}: run tests/testbed/install.sh (as root)")
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            # ports are only reserved until we close them; another session may grab one
            # before our daemon binds it, so a failed start is retried on fresh ports
            self.ssh_port, self.ctld_port, self.slurmd_port, self.dbd_port = free_ports(4)
            try:
                self._write_files()
                self._start_daemons()
                break
            except BaseException as exc:  # never leave daemons behind a failed start
                self._stop_daemons()
                if not isinstance(exc, TestbedError) or attempt == attempts:
                    raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        try:
            if self._running("slurmctld"):
                # slurmstepd of running jobs outlive slurmd: cancel jobs first, wait until gone
                jobs = self._slurm("squeue", "-h", "-o", "%i").stdout.split()
                if jobs:
                    self._slurm("scancel", *jobs)
                self._poll("squeue to be empty", self.stop_timeout, raise_=False,
                           ready=lambda: not self._slurm("squeue", "-h", "-o", "%i").stdout.strip())
        finally:
            self._stop_daemons()
            if self.accounting:
                subprocess.run(["mysql", "-h", "127.0.0.1", "-u", "root", "-e",
                                f"DROP DATABASE IF EXISTS {self.dbd_database}"], capture_output=True)

    # ---------------------------------------------------------------- helpers for tests
    def ssh(self, cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run cmd on the 'cluster' through the real ssh client (BatchMode, our key and
        known_hosts, StrictHostKeyChecking=yes, no ~/.ssh/config)."""
        return subprocess.run(["ssh", "-F", str(self.ssh_config), "testbed", cmd],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def scheduler_calls(self) -> list[str]:
        """Scheduler commands run through ssh, oldest first, as 'NAME ARG...' (args
        quoted like bash printf %q); the log file also has a timestamp per line.
        Calls made by job scripts count too (jobs inherit the session's PATH)."""
        if not self.command_log.exists():
            return []
        return [line.split("\t", 1)[1] for line in self.command_log.read_text().splitlines()
                if "\t" in line]

    def scheduler_calls_with_times(self) -> list[tuple[float, str]]:
        """As ``scheduler_calls``, each with its epoch time."""
        if not self.command_log.exists():
            return []
        return [(float(t.replace(",", ".")), call) for t, call in
                (line.split("\t", 1) for line in self.command_log.read_text().splitlines() if "\t" in line)]

    def accepted_ssh_logins(self) -> int:
        if not self.sshd_log.exists():
            return 0
        return self.sshd_log.read_text(errors="replace").count("Accepted publickey")

    def local_env(self) -> dict[str, str]:
        """Environment for running slurm client commands (sinfo, scontrol...) locally."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}

    # ---------------------------------------------------------------- files
    def _write_files(self) -> None:
        b = self.base
        for d in ("etc", "state", "spool", "log", "pids", "dev", "ssh", "munge", "shims", "remote"):
            (b / d).mkdir(parents=True, exist_ok=True)
        for d in ("state", "spool"):  # no jobs recovered from an earlier run or attempt
            shutil.rmtree(b / d)
            (b / d).mkdir()
        # munged refuses a socket dir without o+x on the path ("execute permissions for all")
        for d in (b, b / "munge"):
            d.chmod(0o711)
        key = b / "munge" / "munge.key"
        if not key.exists():
            _run("mungekey", "--create", f"--keyfile={key}")
        key.chmod(0o600)

        gpus = [b / "dev" / f"fakegpu{i}" for i in range(self.ngpu)]
        for dev in gpus:
            if not dev.exists():  # same major:minor as /dev/null
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (b / "etc" / "gres.conf").write_text(configs.gres_conf(gpus))  # read from slurm.conf's dir
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 512
        self.slurm_conf.write_text(configs.slurm_conf(
            b, self.ctld_port, self.slurmd_port, len(os.sched_getaffinity(0)), mem_mb,
            self.ngpu, self.min_job_age, self.dbd_port if self.accounting else None))
        if self.accounting:
            dbd_conf = b / "etc" / "slurmdbd.conf"
            dbd_conf.write_text(configs.slurmdbd_conf(b, self.dbd_port, self.dbd_database))
            dbd_conf.chmod(0o600)  # slurmdbd refuses a readable one

        self._write_ssh_files()
        self.command_log.touch()
        for name in configs.SCHEDULER_COMMANDS:
            shim = self.shims / name
            shim.write_text(configs.shim_script(name, self.command_log))
            shim.chmod(0o755)

    def _write_ssh_files(self) -> None:
        d = self.base / "ssh"
        host_key = d / "host_ed25519"
        for path, comment in ((host_key, "testbed-host"), (self.client_key, "testbed-client")):
            if not path.exists():
                _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path), "-C", comment)
        shutil.copy(self.client_key.with_suffix(".pub"), d / "authorized_keys")
        (d / "authorized_keys").chmod(0o600)
        key_type, key_b64 = (d / "host_ed25519.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[{self.host}]:{self.ssh_port} {key_type} {key_b64}\n")
        # "256 SHA256:... testbed-host (ED25519)"
        self.host_key_fingerprint = _run("ssh-keygen", "-lf", f"{host_key}.pub").stdout.split()[1]
        (d / "sshd_config").write_text(configs.sshd_config(self.base, self.ssh_port, self.shims))
        self.ssh_config.write_text(
            configs.ssh_config(self.base, self.host, self.ssh_port, self.user))

    # ---------------------------------------------------------------- processes
    def _start_daemons(self) -> None:
        b = self.base
        sock = b / "munge" / "munge.sock"
        sock.unlink(missing_ok=True)
        self._spawn("munged", "munged", "-F", f"--socket={sock}", f"--key-file={b}/munge/munge.key",
                    f"--log-file={b}/log/munged.log", f"--pid-file={b}/pids/munged.pidfile",
                    f"--seed-file={b}/munge/munged.seed")
        self._poll("munged socket", 10, ready=sock.exists)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        if self.accounting:
            self._spawn("slurmdbd", "slurmdbd", "-D")  # reads slurmdbd.conf beside SLURM_CONF
            self._poll("slurmdbd port", self.start_timeout, ready=lambda: listening(self.dbd_port))
        self._spawn("slurmctld", "slurmctld", "-D", "-f", str(self.slurm_conf))
        self._spawn("slurmd", "slurmd", "-D", "-N", "localhost", "-f", str(self.slurm_conf))
        self._spawn("sshd", SSHD, "-D", "-f", str(b / "ssh" / "sshd_config"),
                    "-E", str(self.sshd_log))
        # one line per partition the node is in
        self._poll("node idle", self.start_timeout, ready=lambda: set(self._slurm(
            "sinfo", "-h", "-N", "-o", "%T").stdout.split()) == {"idle"})
        # slurmctld parses SchedulerParameters only in its first scheduling cycle, ~3 s
        # after start; until then the default batch_sched_delay=3 applies and the first
        # job waits ~3 s. Waiting here keeps every test's job latency at ~1 s.
        self._poll("first scheduling cycle", self.start_timeout, ready=self._scheduler_ran)
        self._poll("sshd banner", self.start_timeout, ready=self._sshd_answers)

    def stop_daemon(self, name: str, *, graceful: bool = False) -> None:
        """Kill one daemon and everything in its process group (for sshd: every open SSH
        session with it), as a crash would; ``graceful``: SIGTERM, as a service restart."""
        proc = self._procs.pop(name)
        sig = signal.SIGTERM if graceful else signal.SIGKILL
        # sshd's per-connection children call setsid(): find them as descendants.
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        proc.wait(self.stop_timeout)

    def start_daemon(self, name: str) -> None:
        """Start a daemon stopped by ``stop_daemon`` again, and wait until it answers."""
        self._spawn(name, *self._argv[name])
        ready = {"sshd": self._sshd_answers,
                 "slurmctld": lambda: self._slurm("squeue", "-h").returncode == 0}.get(name, lambda: True)
        self._poll(f"{name} back", self.start_timeout, ready=ready)

    def _spawn(self, name: str, *argv: str) -> None:
        self._argv[name] = argv
        out = open(self.base / "log" / f"{name}.stdout", "ab")
        with out:
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.local_env(), start_new_session=True, preexec_fn=_die_with_parent)

    def _running(self, name: str) -> bool:
        p = self._procs.get(name)
        return p is not None and p.poll() is None

    def _poll(self, what: str, timeout: float, ready, raise_: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return True
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead and raise_:
                raise TestbedError(f"{dead} exited while waiting for {what}\n{self._log_tails()}")
            time.sleep(0.05)
        if raise_:
            raise TestbedError(f"timeout ({timeout}s) waiting for {what}\n{self._log_tails()}")
        return False

    def _scheduler_ran(self) -> bool:
        m = re.search(r"Main schedule statistics.*?Total cycles:\s*(\d+)",
                      self._slurm("sdiag").stdout, re.S)
        return bool(m and int(m.group(1)) > 0)

    def _sshd_answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.ssh_port), timeout=1) as s:
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def _stop_daemons(self) -> None:
        # sshd and slurm daemons first, munged last (the others talk to it while exiting)
        for group in (("sshd", "slurmd", "slurmctld"), ("slurmdbd",), ("munged",)):
            procs = [self._procs.pop(n) for n in group if n in self._procs]
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + self.stop_timeout
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()  # only our own child, by its PID
                    p.wait()

    def _slurm(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.local_env(), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)

    def _log_tails(self, lines: int = 8) -> str:
        out = []
        for f in sorted((self.base / "log").glob("*")):
            if f.is_file() and f != self.command_log:
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)


def listening(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(next(line for line in status.read_text().splitlines() if line.startswith("PPid:")).split()[1])
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
        children.setdefault(ppid, []).append(int(status.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
