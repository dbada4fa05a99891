"""Text from a case is data: markup and terminal escape sequences in every text field the
commands show (case path, error, waiting reason, beam name, job error, event payload, inbox
entry and reason, GPU and process names, a typed case id) are shown literally and never
stop a command, in `mqi cases list`, `show`, `inbox`, `scan`, `status` and the live view
of `mqi run` under a pseudo-terminal."""
from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from mqi_celery import context
from mqi_celery.models import CaseStatus, JobStatus
from mqi_celery.store import NewJob

MQI = [sys.executable, "-m", "mqi_celery.cli"]
MARKUP = "[/] [bold]b[/bold] notes[@click=(].txt"
ESCAPES = "\x1b]0;pwned\x07 \x1b[31mred\x1b[0m"
HOSTILE = f"{MARKUP} {ESCAPES}"
SHOWN_ESCAPES = "\\x1b]0;pwned\\x07 \\x1b[31mred\\x1b[0m"  # how the escape sequences must appear


def assert_literal(text: str) -> None:
    assert MARKUP in text, text
    assert SHOWN_ESCAPES in text, text
    assert "\x1b]0;pwned" not in text and "\x1b[31mred" not in text and "Traceback" not in text


def hostile_database(tmp_path) -> None:
    store = context.current().store
    store.register_case("hostile", f"{tmp_path}/inbox/{HOSTILE}")
    store.update_case("hostile", status=CaseStatus.QUEUED, wait_reason=f"waits for {HOSTILE}")
    store.add_jobs("hostile", [NewJob(1, f"beam {HOSTILE}", "d1")])
    store.update_job("hostile", 1, status=JobStatus.RUNNING, error=f"job error {HOSTILE}")
    store.add_event("case_waiting", {"reason": HOSTILE}, case_id="hostile", correlation_id=None)
    store.register_case("failed", f"{tmp_path}/elsewhere/x", status=CaseStatus.FAILED, error=f"failed: {HOSTILE}")
    gpu = {"index": 0, "uuid": "GPU-0", "name": f"GPU {HOSTILE}", "memory_used_mib": 12000,
           "memory_total_mib": 80000, "utilization_percent": 5, "temperature_c": 40, "power_w": 100,
           "processes": [{"pid": 4242, "name": f"proc {HOSTILE}", "used_memory_mib": 12000, "session": 4242}]}
    store.save_reading(context.current().host_name, {"gpus": {"state": "ok", "devices": [gpu]}, "disk": None})
    # Real inbox entries with markup and an escape sequence in their names.
    (tmp_path / "inbox" / MARKUP.replace("/", "_")).write_text("a loose file")
    (tmp_path / "inbox" / f"loose {ESCAPES}").write_text("a loose file")


@pytest.mark.processes
def test_every_command_shows_text_from_a_case_literally(tmp_path, config_file):
    config = config_file(scanner={"interval_seconds": 0.5, "settle_seconds": 0})
    hostile_database(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQI_")} | {
        "MQI_CONFIG": str(config), "COLUMNS": "2000", "LINES": "200"}

    def mqi(*args):
        done = subprocess.run([*MQI, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr

    for args in (("cases", "list"), ("cases", "show", "hostile"), ("status",)):
        rc, out = mqi(*args)
        assert rc == 0, out
        assert_literal(out)
    rc, out = mqi("cases", "list", "--status", "FAILED")
    assert rc == 0 and f"failed: {MARKUP}" in out, out
    rc, out = mqi("scan")
    assert rc == 0 and "notes[@click=(].txt" in out and "\\x1b[31mred" in out and "\x1b[31m" not in out, out
    rc, out = mqi("inbox")
    assert rc == 0 and "notes[@click=(].txt" in out and "\\x1b[31mred" in out and "\x1b[31m" not in out, out
    rc, out = mqi("cases", "show", "a[/]b")  # a typed id is data too
    assert rc == 1 and "no case 'a[/]b'" in out and "Traceback" not in out, out
    live_view_shows_it_literally(env, tmp_path)


def live_view_shows_it_literally(env: dict, cwd) -> None:
    """`mqi run`'s live table, on a pseudo-terminal, until the hostile rows are drawn; then
    Ctrl-C stops it cleanly."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*MQI, "run"], env=env, cwd=cwd, stdin=follower, stdout=follower, stderr=follower,
                            start_new_session=True)
    os.close(follower)
    out = b""
    try:
        deadline = time.monotonic() + 180
        while b"notes[@click=(].txt" not in out or b"waits for [/]" not in out:
            assert time.monotonic() < deadline and proc.poll() is None, out.decode(errors="replace")[-3000:]
            if select.select([leader], [], [], 1.0)[0]:
                out += os.read(leader, 1 << 16)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    out += os.read(leader, 1 << 16)
                except OSError:  # the terminal closed with the last process
                    break
        assert proc.wait(60) == 0, out.decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(leader)
    text = out.decode(errors="replace")
    assert "\x1b]0;pwned" not in text and "\x1b[31mred" not in text and "Traceback" not in text
    assert SHOWN_ESCAPES.split(" ")[1] in text  # \x1b[31mred\x1b[0m, shown
