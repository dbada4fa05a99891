"""A private RabbitMQ node and a private PostgreSQL cluster that a test may stop and start
(the machine's shared ones are never touched). Both run as their service users from the
Debian packages already installed for the shared ones."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.polling import poll_until
from tests.testbed.cluster import free_ports, listening

PG_BIN = next(Path("/usr/lib/postgresql").glob("*/bin"), Path("/usr/lib/postgresql/15/bin"))


class PrivateRabbitMQ:
    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="mqi-rabbit-"))
        self.port, self.dist_port = free_ports(2)
        self.node = f"mqitest{self.port}@localhost"
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        shutil.chown(self.base, "rabbitmq")
        for f in self.base.iterdir():
            shutil.chown(f, "rabbitmq")
        self.proc: subprocess.Popen | None = None
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        env = {"PATH": os.environ["PATH"], "HOME": "/var/lib/rabbitmq", "RABBITMQ_NODENAME": self.node,
               "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
               "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"), "RABBITMQ_LOG_BASE": str(self.base / "log"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
               "RABBITMQ_PID_FILE": str(self.base / "pid")}
        out = open(self.base / "server.out", "ab")
        self.proc = subprocess.Popen(["runuser", "-u", "rabbitmq", "--", "env", *(f"{k}={v}" for k, v in env.items()),
                                      "/usr/lib/rabbitmq/bin/rabbitmq-server"], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        poll_until(lambda: listening(self.port), 120, 0.5, f"private RabbitMQ on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        poll_until(lambda: not listening(self.port), 30, 0.5, "private RabbitMQ to stop")

    def queues(self) -> str:
        """name, ready, unacknowledged, consumers of every queue (for a failing test's message)."""
        out = subprocess.run(["runuser", "-u", "rabbitmq", "--", "env", "HOME=/var/lib/rabbitmq",
                              "/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node, "-q", "list_queues", "name",
                              "messages_ready", "messages_unacknowledged", "consumers"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        subprocess.run(["pkill", "-KILL", "-f", self.node], capture_output=True)  # epmd-registered beam
        shutil.rmtree(self.base, ignore_errors=True)


class PrivatePostgres:
    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="mqi-pg-"))
        shutil.chown(self.base, "postgres")
        [self.port] = free_ports(1)
        self.data = self.base / "data"
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args], check=True,
                       capture_output=True, cwd=self.base)

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-w", "start", "-o",
                 f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off")

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data),
                        "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
