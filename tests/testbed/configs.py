"""Config file texts for the testbed (pure functions, no side effects).

Lessons carried over from /work/shared/testbed/slurm-testbed.sh are kept as comments.
"""

from __future__ import annotations

from pathlib import Path

# Scheduler commands logged when called through ssh (see shim_script).
SCHEDULER_COMMANDS = ("sbatch", "squeue", "sacct", "scontrol", "scancel")

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def slurm_conf(base: Path, ctld_port: int, slurmd_port: int, cpus: int, mem_mb: int,
               ngpu: int, min_job_age: int, dbd_port: int | None = None) -> str:
    gres = "GresTypes=gpu\n" if ngpu else ""
    node_gres = f" Gres=gpu:{ngpu}" if ngpu else ""
    if dbd_port:  # real accounting: sacct answers from slurmdbd (MariaDB)
        # AccountingStoragePass names the munge socket slurmctld uses to reach slurmdbd.
        accounting = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
                      f"AccountingStoragePort={dbd_port}\nAccountingStoragePass={base}/munge/munge.sock\n")
    else:
        # No slurmdbd: plain sacct only says "accounting storage is disabled";
        # 'sacct -c' reads this job-completion file (but drops the signal of ExitCode).
        accounting = "AccountingStorageType=accounting_storage/none\n"
    return f"""\
ClusterName=testbed
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.sock
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/pids/slurmctld.pidfile
SlurmdPidFile={base}/pids/slurmd.pidfile
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
{accounting}JobCompType=jobcomp/filetxt
JobCompLoc={base}/log/jobcomp.log
# finished jobs stay visible to 'scontrol show job' (our source of final state/exit code)
MinJobAge={min_job_age}
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# default batch_sched_delay=3 makes every job wait ~3 s before it starts
SchedulerParameters=batch_sched_delay=0
# default 10 s makes client commands hang ~9 s while slurmctld is down
MessageTimeout=2
# Jobs of partition "urgent" preempt (cancel) jobs of "debug": PREEMPTED for real.
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
{gres}NodeName=localhost CPUs={cpus} RealMemory={mem_mb}{node_gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def slurmdbd_conf(base: Path, dbd_port: int, database: str) -> str:
    # MariaDB of the machine (127.0.0.1:3306, root without password); a database per testbed.
    return f"""\
AuthType=auth/munge
AuthInfo=socket={base}/munge/munge.sock
DbdHost=localhost
DbdPort={dbd_port}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=root
StorageLoc={database}
PidFile={base}/pids/slurmdbd.pidfile
LogFile={base}/log/slurmdbd.log
"""


def gres_conf(devices: list[Path]) -> str:
    # slurmd 22.05 drops a gpu GRES without File= ("Removing file-less GPU"), and File=
    # must be a character device: ours are mknod'ed with /dev/null's numbers (1:3).
    return "".join(f"Name=gpu File={d}\n" for d in devices)


def sshd_config(base: Path, port: int, shims: Path) -> str:
    env = {
        # shims first, so scheduler calls made through ssh are logged
        "PATH": f"{shims}:{SYSTEM_PATH}",
        "SLURM_CONF": f"{base}/etc/slurm.conf",
        # sshd runs commands as `bash -c CMD`; Debian's bash then sources ~/.bashrc
        # (SSH_SOURCE_BASHRC) when SHLVL < 2, and root's .bashrc here prepends pyenv/cargo
        # to PATH and costs time per call. SHLVL=1 (bash makes it 2) skips it for exec and
        # for the sftp subsystem alike, unlike ForceCommand which would break sftp.
        "SHLVL": "1",
    }
    setenv = " ".join(f"{k}={v}" for k, v in env.items())  # one line: sshd keeps the first SetEnv
    return f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {base}/ssh/host_ed25519
PidFile {base}/pids/sshd.pidfile
AuthorizedKeysFile {base}/ssh/authorized_keys
# StrictModes yes rejects keys under /tmp: "bad ownership or modes for directory /tmp"
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitUserEnvironment no
SetEnv {setenv}
Subsystem sftp /usr/lib/openssh/sftp-server
# VERBOSE logs "Accepted publickey for root ..." (counted by accepted_ssh_logins)
LogLevel VERBOSE
"""


def ssh_config(base: Path, host: str, port: int, user: str) -> str:
    return f"""\
Host testbed
  HostName {host}
  Port {port}
  User {user}
  IdentityFile {base}/ssh/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile {base}/ssh/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 5
  ControlMaster no
"""


def shim_script(name: str, log: Path) -> str:
    # One line per call: epoch time, TAB, name and %q-quoted args (newlines stay on one line).
    return f"""\
#!/bin/bash
# testbed shim: log this call, then run the real command
line="$EPOCHREALTIME	{name}"
for a in "$@"; do printf -v line '%s %q' "$line" "$a"; done
printf '%s\\n' "$line" >> {log}
exec /usr/bin/{name} "$@"
"""
