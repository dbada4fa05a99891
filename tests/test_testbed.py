"""Self-test of the Slurm + sshd testbed (tests/testbed). Needs root and
tests/testbed/install.sh; run: .venv/bin/python -m pytest tests/test_testbed.py"""

from __future__ import annotations

import re
import subprocess

import paramiko
import pytest

from tests.conftest import poll_until


pytestmark = pytest.mark.slurm


def wait_job(tb, job_id: str, final: set[str], timeout: float = 30) -> dict[str, str]:
    """Poll `scontrol show job -o` over ssh until JobState is in `final`."""
    def fields():
        f = dict(re.findall(r"(\w+)=(\S*)", tb.ssh(f"scontrol show job -o {job_id}").stdout))
        return f if f.get("JobState") in final else None
    return poll_until(fields, timeout, 0.1, f"job {job_id} to reach {final}")


def submit(tb, args: str) -> str:
    # cd first: sbatch writes slurm-JOBID.out into the cwd, which is /root for an ssh session
    r = tb.ssh(f"cd {tb.remote_root} && sbatch --parsable {args}")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_failed_job_exit_code_and_command_log(slurm_testbed):
    tb = slurm_testbed
    job = submit(tb, "--wrap 'exit 3'")
    fields = wait_job(tb, job, {"FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"})
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "3:0")
    calls = tb.scheduler_calls()
    assert r"sbatch --parsable --wrap exit\ 3" in calls
    assert f"scontrol show job -o {job}" in calls


def test_gpu_job_sees_cuda_visible_devices(slurm_testbed):
    tb = slurm_testbed
    job = submit(tb, "--gres=gpu:1 --wrap 'echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES'")
    assert wait_job(tb, job, {"COMPLETED", "FAILED"})["JobState"] == "COMPLETED"
    out = (tb.remote_root / f"slurm-{job}.out").read_text()
    assert re.fullmatch(r"CUDA_VISIBLE_DEVICES=[01]\n", out), out


def test_accepted_logins_grow(slurm_testbed):
    before = slurm_testbed.accepted_ssh_logins()
    assert slurm_testbed.ssh("true").returncode == 0
    assert slurm_testbed.accepted_ssh_logins() == before + 1


def test_session_environment_exec_channels(slurm_testbed):
    """Shims first on PATH and SLURM_CONF set, for the ssh CLI and for paramiko."""
    tb = slurm_testbed
    probe = 'echo "$PATH|$SLURM_CONF|$(command -v sbatch)"'
    expected = (str(tb.shims), str(tb.slurm_conf), str(tb.shims / "sbatch"))

    out = tb.ssh(probe).stdout.strip()
    path, conf, sbatch = out.split("|")
    assert (path.split(":")[0], conf, sbatch) == expected, out

    client = paramiko.SSHClient()
    client.load_host_keys(str(tb.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(tb.host, tb.ssh_port, username=tb.user, key_filename=str(tb.client_key),
                   allow_agent=False, look_for_keys=False, timeout=10)
    try:
        _, stdout, _ = client.exec_command(probe, timeout=30)
        out = stdout.read().decode().strip()
    finally:
        client.close()
    path, conf, sbatch = out.split("|")
    assert (path.split(":")[0], conf, sbatch) == expected, out


def _plain_ssh(tb, known_hosts, *extra):
    # deliberately no ssh_config file: only the attributes a client would be given
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(tb.ssh_port), "-i", str(tb.client_key),
         "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
         *extra, f"{tb.user}@{tb.host}", "echo ok"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def test_known_hosts_strict_checking(slurm_testbed, tmp_path):
    tb = slurm_testbed
    r = _plain_ssh(tb, tb.known_hosts)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    empty = tmp_path / "empty_known_hosts"
    empty.touch()
    r = _plain_ssh(tb, empty)
    assert r.returncode == 255 and "Host key verification failed" in r.stderr
    printed = subprocess.run(["ssh-keygen", "-lf", str(tb.known_hosts)],
                             capture_output=True, text=True, check=True).stdout
    assert printed.split()[1] == tb.host_key_fingerprint.strip()
    assert tb.host_key_fingerprint.startswith("SHA256:")


def test_sftp_batch_put(slurm_testbed, tmp_path):
    tb = slurm_testbed
    src = tmp_path / "plan.txt"
    src.write_text("hello sftp\n")
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} {tb.remote_root}/uploaded.txt\n")
    r = subprocess.run(["sftp", "-F", str(tb.ssh_config), "-b", str(batch), "testbed"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tb.remote_root / "uploaded.txt").read_text() == "hello sftp\n"
