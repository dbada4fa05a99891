"""Slurm scheduler: parsers on captured real output (tests/fixtures/slurm), the batch script
against a golden file, quoting of hostile names, and (marker ``slurm``) the scheduler
against the real single-node Slurm of tests/testbed, reached through ssh."""
from __future__ import annotations

import re
import shlex
import subprocess
import uuid
from pathlib import Path, PurePosixPath

import pytest
from pydantic import ValidationError

from mqi_celery.errors import ExecutionError
from tests.conftest import poll_until
from mqi_celery.hosts import CommandResult
from mqi_celery.schedulers import JobSpec, RemoteState
from mqi_celery.slurm import (TRANSIENT_STATES, SlurmScheduler, SlurmSettings, find_by_name_command,
                              parse_find_by_name, parse_sacct, parse_sbatch, parse_scontrol, parse_squeue,
                              reason_for, render_batch_script, sacct_command, sbatch_command,
                              scontrol_batch_command, scontrol_command, squeue_command, state_to_remote,
                              write_script_command)

FIX = Path(__file__).parent / "fixtures" / "slurm"
HOSTILE_NAME = "mqi-it's $(touch pwned) `id` x|y; \"q\" #c"
HOSTILE_DIR = "/srv/we ird/$(touch pwned) 'q' \"d\" #h;&|*"


def fixture(name: str) -> str:
    return (FIX / name).read_text()


def spec(workdir="/srv/mqi/case-1/beam_2", name="mqi-case-1-2", command="mqi-demo-engine x", limit=900.0):
    return JobSpec(name=name, workdir=PurePosixPath(workdir), command=command, gpu_id=0,
                   time_limit_seconds=limit)


# ---------------------------------------------------------------- parsers on captured text
def test_parse_sbatch():
    assert parse_sbatch(fixture("sbatch_parsable.txt")) == "1"
    assert parse_sbatch("123;cluster\n") == "123"
    with pytest.raises(ValueError):
        parse_sbatch("sbatch: error: something\n")


def test_parse_squeue_all_states():
    jobs = parse_squeue(fixture("squeue_all.txt"))
    assert {i: (j.state, j.reason) for i, j in jobs.items()} == {
        "1": ("COMPLETED", "None"), "2": ("FAILED", "NonZeroExitCode"), "3": ("CANCELLED", "None"),
        "4": ("TIMEOUT", "TimeLimit"), "5": ("RUNNING", "None"), "6": ("RUNNING", "None")}


@pytest.mark.parametrize("name, state, code, sig, remote", [
    ("scontrol_completed.txt", "COMPLETED", 0, 0, RemoteState("COMPLETED", True, 0)),
    ("scontrol_failed_exit3.txt", "FAILED", 3, 0, RemoteState("FAILED", True, 3)),
    ("scontrol_cancelled.txt", "CANCELLED", 0, 15, RemoteState("CANCELLED", True, None)),
    ("scontrol_timeout.txt", "TIMEOUT", 0, 15, RemoteState("TIMEOUT", True, None)),
    ("scontrol_pending.txt", "PENDING", 0, 0, RemoteState("PENDING", False, None)),
])
def test_parse_scontrol_captured(name, state, code, sig, remote):
    (job,) = parse_scontrol(fixture(name)).values()
    assert (job.state, job.exit_code, job.signal, job.name) == (state, code, sig, "wrap")
    assert state_to_remote(job.state, job.exit_code, job.signal) == remote


def test_parse_scontrol_hostile_name_does_not_fool_the_state():
    (job,) = parse_scontrol(fixture("scontrol_running_weird_name.txt")).values()
    assert (job.job_id, job.name, job.state) == ("5", "mqi weird JobState=COMPLETED x|y", "RUNNING")


def test_parse_scontrol_batch_skips_unknown_ids():
    jobs = parse_scontrol(fixture("scontrol_batch.txt"))
    assert {i: (j.state, j.exit_code) for i, j in jobs.items()} == {
        "1": ("COMPLETED", 0), "2": ("FAILED", 3), "3": ("CANCELLED", 0)}
    assert "Invalid job id" in fixture("scontrol_batch.stderr.txt")


def test_parse_find_by_name_matches_exactly():
    (job,) = parse_find_by_name(fixture("squeue_find_by_name.txt"), "mqi weird JobState=COMPLETED x|y")
    assert (job.job_id, job.state) == ("5", "RUNNING")
    assert parse_find_by_name(fixture("squeue_find_by_name.txt"), "mqi weird") == []


def test_parse_sacct_synthetic():
    jobs = parse_sacct(fixture("sacct_synthetic.txt"))
    remote = {i: state_to_remote(j.state, j.exit_code, j.signal) for i, j in jobs.items()}
    assert remote == {"101": RemoteState("COMPLETED", True, 0), "102": RemoteState("FAILED", True, 3),
                      "103": RemoteState("CANCELLED", True, None), "104": RemoteState("TIMEOUT", True, None),
                      "105": RemoteState("RUNNING", False, None), "106": RemoteState("NODE_FAIL", True, None),
                      "107": RemoteState("OUT_OF_MEMORY", True, None)}
    assert jobs["106"].name == "mqi weird|name"


# ---------------------------------------------------------------- states and reasons
@pytest.mark.parametrize("state", ["PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"])
def test_active_states_are_not_finished(state):
    assert state_to_remote(state, 0, 0) == RemoteState(state, False, None)


@pytest.mark.parametrize("state", ["TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                                   "DEADLINE", "CANCELLED", "MISSING"])
def test_abnormal_ends_have_no_exit_code(state):
    assert state_to_remote(state, 0, 0) == RemoteState(state, True, None)


def test_failed_never_reads_as_success():
    assert state_to_remote("FAILED", 0, 0).exit_code is None  # launch failure
    assert state_to_remote("FAILED", 0, 9).exit_code is None  # batch shell killed
    assert state_to_remote("CANCELLED by 1000", 0, 15) == RemoteState("CANCELLED", True, None)
    assert state_to_remote("SOMETHING_NEW").finished is False  # keep polling, never success


def test_reasons_and_transient_states():
    assert reason_for("TIMEOUT", None) == "Slurm job hit its time limit (TIMEOUT)"
    assert reason_for("FAILED", 3) == "engine exited with code 3 (Slurm FAILED)"
    assert "MISSING" in reason_for("MISSING", None)
    assert "OUT_OF_MEMORY" in reason_for("OUT_OF_MEMORY", None)
    assert TRANSIENT_STATES == {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}


# ---------------------------------------------------------------- batch script and quoting
GOLDEN_SETTINGS = SlurmSettings(partition="gpu", gres="gpu:1", extra_sbatch_args=["--account=proton", "--mem=16G"],
                                setup_lines=["module load cuda/12.2", "export OMP_NUM_THREADS=4"])


def test_batch_script_golden():
    text = render_batch_script(spec(command="/opt/moqui/tps_env '/srv/mqi/case-1/beam_2/moqui_tps.in'", limit=901),
                               GOLDEN_SETTINGS)
    assert text == (FIX / "batch_script.golden.sh").read_text()


def test_default_time_limit_and_minimal_script():
    text = render_batch_script(spec(limit=60), SlurmSettings())
    assert "#SBATCH --time=1\n" in text and "--partition" not in text
    assert text.rstrip().endswith("mqi-demo-engine x\nexit $?")
    assert "#SBATCH --time=7\n" in render_batch_script(spec(), SlurmSettings(time_limit_minutes=7))


def test_hostile_names_and_folders_round_trip_through_the_shell():
    wd = PurePosixPath(HOSTILE_DIR)
    assert shlex.split(find_by_name_command(HOSTILE_NAME)) == ["squeue", "-h", "--me", "-t", "all", "-n",
                                                               HOSTILE_NAME, "-o", "%i|%T|%k|%j"]
    assert shlex.split(sbatch_command(wd, wd / "job.sbatch")) == ["cd", HOSTILE_DIR, "&&", "sbatch",
                                                                  "--parsable", f"{HOSTILE_DIR}/job.sbatch"]
    script = render_batch_script(spec(HOSTILE_DIR, HOSTILE_NAME), SlurmSettings())
    words = shlex.split(write_script_command(wd / "job.sbatch", script))
    assert words[:3] == ["mkdir", "-p", HOSTILE_DIR] and words[6] == script
    directives = dict(shlex.split(line)[1].split("=", 1) for line in script.splitlines()
                      if line.startswith("#SBATCH"))
    assert directives["--job-name"] == HOSTILE_NAME
    assert directives["--chdir"] == HOSTILE_DIR and directives["--output"] == f"{HOSTILE_DIR}/job.log"


@pytest.mark.parametrize("name, workdir", [("a,b", "/srv/x"), ("a\nb", "/srv/x"), ("a", "/srv/50%"),
                                           ("a", "/srv/x\\y"), ("", "/srv/x")])
def test_unrepresentable_names_are_refused(name, workdir):
    with pytest.raises(ExecutionError) as err:
        render_batch_script(spec(workdir, name), SlurmSettings())
    assert not err.value.transient


def test_id_lists_are_validated():
    assert squeue_command(["1", "2", "3_4"]) == "squeue -h -t all -j 1,2,3_4 -o '%i|%T|%r'"
    assert sacct_command(["7"]) == "sacct -X -n -P -o JobID,State,ExitCode,JobName -j 7"
    assert scontrol_command("7") == "scontrol show job -o 7"
    assert scontrol_batch_command(["1", "2"]) == 'for j in 1 2; do scontrol show job -o "$j"; done'
    for bad in (["1; rm -rf /"], [], ["$(x)"]):
        with pytest.raises(ValueError):
            squeue_command(bad)


@pytest.mark.parametrize("values", [
    {"partition": "gpu; rm -rf /"}, {"gres": "gpu:1 --wrap=x"}, {"extra_sbatch_args": ["account=x"]},
    {"extra_sbatch_args": ["--output=/tmp/x"]}, {"extra_sbatch_args": ["-J", "x"]},
    {"extra_sbatch_args": ["--comment=a\nb"]}, {"script_template": "$command $nope"},
    {"script_template": "#!/bin/sh\n$job_name $workdir\n"}, {"state_source": "db"}, {"time_limit_minutes": 0},
    {"unknown_key": 1}, {"script_template": "$job_name $workdir $command", "setup_lines": ["module load x"]},
])
def test_settings_validation(values):
    with pytest.raises(ValidationError):
        SlurmSettings(**values)


def test_settings_frozen():
    with pytest.raises(ValidationError):
        SlurmSettings().gres = "gpu:2"


# ---------------------------------------------------------------- scheduler logic on a scripted host
class ScriptedHost:
    """Answers commands by their first word from canned (returncode, stdout, stderr) lists."""

    name, root = "scripted", PurePosixPath("/srv")

    def __init__(self, **answers):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.commands: list[str] = []

    def run(self, command: str, *, timeout: float = 60) -> CommandResult:
        self.commands.append(command)
        word = command.split()[0]
        # A submit writes its script and calls sbatch in one command ("{ mkdir ...; } ... sbatch").
        return CommandResult(*self.answers[{"{": "sbatch", "for": "scontrol"}.get(word, word)].pop(0))


def test_poll_falls_back_to_scontrol_once_when_accounting_is_disabled():
    host = ScriptedHost(
        squeue=[(0, "2|FAILED|NonZeroExitCode\n5|RUNNING|None\n", "")] * 2,
        sacct=[(1, "", fixture("sacct_disabled.stderr.txt"))],
        scontrol=[(1, fixture("scontrol_batch.txt"), fixture("scontrol_batch.stderr.txt"))] * 2)
    sched = SlurmScheduler(host, SlurmSettings(state_source="auto"))
    jobs = {"2": PurePosixPath("/srv/a"), "5": PurePosixPath("/srv/b"), "999": PurePosixPath("/srv/c"),
            "not-an-id": PurePosixPath("/srv/d")}
    expected = {"2": RemoteState("FAILED", True, 3), "5": RemoteState("RUNNING", False),
                "999": RemoteState("MISSING", True, None), "not-an-id": RemoteState("MISSING", True, None)}
    assert sched.poll(jobs) == expected
    assert sched.poll(jobs) == expected
    assert [c.split()[0] for c in host.commands] == ["squeue", "sacct", "for", "squeue", "for"]


def test_poll_waits_when_accounting_lags_behind_squeue():
    host = ScriptedHost(squeue=[(0, "2|FAILED|NonZeroExitCode\n", "")], sacct=[(0, "", "")])
    assert SlurmScheduler(host, SlurmSettings(state_source="sacct")).poll({"2": PurePosixPath("/srv/a")}) == {
        "2": RemoteState("FAILED", False)}


def test_single_unknown_id_is_missing_not_an_error():
    host = ScriptedHost(squeue=[(1, "", fixture("squeue_invalid_id.stderr.txt"))],
                        scontrol=[(1, "", "slurm_load_jobs error: Invalid job id specified\n")])
    sched = SlurmScheduler(host, SlurmSettings(state_source="scontrol"))
    assert sched.poll({"999": PurePosixPath("/srv/a")}) == {"999": RemoteState("MISSING", True, None)}


@pytest.mark.parametrize("call, answers", [
    ("poll", {"squeue": [(1, "", fixture("controller_down_squeue.stderr.txt"))]}),
    ("submit", {"squeue": [(1, "", fixture("controller_down_squeue.stderr.txt"))]}),
    ("submit", {"squeue": [(0, "", "")], "sbatch": [(1, "", fixture("controller_down_sbatch.stderr.txt"))]}),
    ("submit", {"squeue": [(0, "", "")], "sbatch": [(0, "garbage\n", "")]}),
    ("submit", {"squeue": [(0, "", "")], "sbatch": [(97, "", "mkdir: cannot create directory: No space left")]}),
    ("cancel", {"scancel": [(8, "", fixture("controller_down_scancel.stderr.txt"))]}),
])
def test_unreachable_controller_is_transient(call, answers):
    sched = SlurmScheduler(ScriptedHost(**answers))
    with pytest.raises(ExecutionError) as err:
        {"poll": lambda: sched.poll({"1": PurePosixPath("/srv/a")}), "submit": lambda: sched.submit(spec()),
         "cancel": lambda: sched.cancel("1", PurePosixPath("/srv/a"))}[call]()
    assert err.value.transient, err.value


@pytest.mark.parametrize("stderr", ["sbatch_invalid_partition.stderr.txt", "sbatch_invalid_gres.stderr.txt",
                                    "sbatch_too_many_gpus.stderr.txt"])
def test_sbatch_rejection_is_permanent(stderr):
    host = ScriptedHost(squeue=[(0, "", "")], sbatch=[(1, "", fixture(stderr))])
    with pytest.raises(ExecutionError) as err:
        SlurmScheduler(host).submit(spec())
    assert not err.value.transient and "sbatch" in str(err.value)


def test_submit_refuses_folders_outside_the_job_root():
    with pytest.raises(ExecutionError):
        SlurmScheduler(ScriptedHost(), job_dir_root=PurePosixPath("/srv/mqi")).submit(spec("/etc/x"))


# ---------------------------------------------------------------- against the real testbed
class SshTestbedHost:
    """The slice of Host the scheduler uses, over the testbed's real ssh client."""

    def __init__(self, tb, root: Path, prefix: str = ""):
        self.tb, self.name, self.root, self.prefix = tb, "testbed", PurePosixPath(root), prefix
        self.calls = 0

    def run(self, command: str, *, timeout: float = 60) -> CommandResult:
        self.calls += 1
        try:
            p = self.tb.ssh(self.prefix + command, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ExecutionError(f"ssh command timed out after {timeout} s", transient=True) from None
        return CommandResult(p.returncode, p.stdout, p.stderr)


class Bed:
    def __init__(self, tb, **settings):
        self.tb, self.tag = tb, uuid.uuid4().hex[:8]
        self.root = tb.remote_root / self.tag
        self.host = SshTestbedHost(tb, self.root)
        self.sched = SlurmScheduler(self.host, SlurmSettings(**settings))

    def spec(self, beam: int, shell: str, limit: float = 600, name: str | None = None) -> JobSpec:
        return JobSpec(name=name or f"mqi-{self.tag}-{beam}", workdir=PurePosixPath(self.root / f"beam_{beam}"),
                       command=shlex.join(["sh", "-c", shell]), gpu_id=None, time_limit_seconds=limit)

    def wait(self, jobs: dict[str, PurePosixPath], done, timeout: float = 60) -> dict[str, RemoteState]:
        return poll_until(lambda: (s := self.sched.poll(jobs)) and all(done(x) for x in s.values()) and s,
                          timeout, 0.2, f"jobs {list(jobs)} to reach the wanted state")

    def live_ids(self) -> list[str]:
        out = self.tb.ssh("squeue -h -o '%i|%j'").stdout
        return [i for i, _, name in (line.partition("|") for line in out.splitlines()) if self.tag in name]

    def cleanup(self) -> None:
        def gone() -> bool:
            if ids := self.live_ids():
                self.tb.ssh("scancel " + " ".join(ids))
            return not ids
        poll_until(gone, 30, 0.2, "this test's jobs to leave squeue after scancel")


@pytest.fixture
def bed(slurm_testbed):
    beds = []

    def make(**settings) -> Bed:
        beds.append(Bed(slurm_testbed, **settings))
        return beds[-1]

    yield make
    for b in beds:
        b.cleanup()


finished = lambda s: s.finished  # noqa: E731
running = lambda s: s.state == "RUNNING"  # noqa: E731


@pytest.mark.slurm
def test_exit_codes_and_log_file(bed, slurm_testbed):
    b = bed()  # state_source auto: sacct says disabled, scontrol answers
    ok = b.spec(1, "echo Total execution time 1 s")
    bad = b.spec(2, "echo 'ERROR: no dose grid'; exit 3")
    jobs = {b.sched.submit(ok): ok.workdir, b.sched.submit(bad): bad.workdir}
    states = b.wait(jobs, finished)
    assert sorted(states.values(), key=lambda s: s.state) == [RemoteState("COMPLETED", True, 0),
                                                              RemoteState("FAILED", True, 3)]
    assert (Path(bad.workdir) / "job.log").read_text() == "ERROR: no dose grid\n"
    assert (Path(ok.workdir) / "job.log").read_text() == "Total execution time 1 s\n"
    assert reason_for("FAILED", 3) == "engine exited with code 3 (Slurm FAILED)"
    before = len(slurm_testbed.scheduler_calls())
    assert b.sched.poll(jobs) == states  # accounting known to be off now: no second sacct
    assert [c.split()[0] for c in slurm_testbed.scheduler_calls()[before:]] == ["squeue", "scontrol"]


@pytest.mark.slurm
def test_scancel_gives_cancelled(bed):
    b = bed()
    s = b.spec(1, "sleep 300")
    jobs = {b.sched.submit(s): s.workdir}
    b.wait(jobs, running)
    b.sched.cancel(next(iter(jobs)), s.workdir)
    assert b.wait(jobs, finished) == {next(iter(jobs)): RemoteState("CANCELLED", True, None)}


@pytest.mark.slurm
def test_time_limit_gives_timeout(bed, slurm_testbed):
    """Slurm limits are whole minutes; moving EndTime to now+1 s makes slurmctld's time-limit
    check (every 30 s) end the job at its next pass: TIMEOUT within ~30 s instead of >= 60 s."""
    b = bed()
    s = b.spec(1, "sleep 300", limit=120)
    job_id = b.sched.submit(s)
    b.wait({job_id: s.workdir}, running)
    assert slurm_testbed.ssh(f"scontrol update JobId={job_id} EndTime=now+1").returncode == 0
    state = b.wait({job_id: s.workdir}, finished, timeout=60)[job_id]
    assert state == RemoteState("TIMEOUT", True, None)
    assert reason_for(state.state, state.exit_code) == "Slurm job hit its time limit (TIMEOUT)"


@pytest.mark.slurm
def test_second_submit_adopts_the_live_job(bed, slurm_testbed):
    b = bed()
    s = b.spec(1, "sleep 300")
    first = b.sched.submit(s)
    assert b.sched.submit(s) == first
    assert b.sched.find_job(s.name) == first
    assert slurm_testbed.ssh(f"squeue -h -n {s.name} -o %i").stdout.split() == [first]
    assert sum(c.startswith("sbatch") and b.tag in c for c in slurm_testbed.scheduler_calls()) == 1


@pytest.mark.slurm
def test_submit_with_the_same_token_adopts_even_a_finished_job(bed, slurm_testbed):
    from dataclasses import replace

    b = bed()
    s = replace(b.spec(1, "true"), token="trace.0.0")
    first = b.sched.submit(s)
    b.wait({first: s.workdir}, finished)
    assert b.sched.submit(s) == first  # the redelivered submit of a job that already ran
    again = b.sched.submit(replace(s, token="trace.1.0"))  # a retry of the case runs anew
    assert again != first
    assert sum(c.startswith("sbatch") and b.tag in c for c in slurm_testbed.scheduler_calls()) == 2


@pytest.mark.slurm
def test_one_squeue_for_thirty_jobs(bed, slurm_testbed):
    b = bed(state_source="scontrol")
    specs = [b.spec(i, "exit 3" if i < 2 else "sleep 300") for i in range(30)]
    jobs = {b.sched.submit(s): s.workdir for s in specs}
    failed = list(jobs)[:2]
    b.wait({i: jobs[i] for i in failed}, finished)  # the two quick ones have failed
    before, calls = len(slurm_testbed.scheduler_calls()), b.host.calls
    states = b.sched.poll(jobs)
    new = [c.split()[0] for c in slurm_testbed.scheduler_calls()[before:]]
    assert new.count("squeue") == 1 and "sacct" not in new
    assert new.count("scontrol") == 2  # one batched remote command, one scontrol per failed job
    assert b.host.calls - calls == 2  # squeue + the batched scontrol loop
    assert [states[i] for i in failed] == [RemoteState("FAILED", True, 3)] * 2
    assert {states[i].state for i in list(jobs)[2:]} <= {"RUNNING", "PENDING"}
    assert not any(states[i].finished for i in list(jobs)[2:])


@pytest.mark.slurm
def test_gpu_job_sees_cuda_visible_devices(bed):
    b = bed(gres="gpu:1")
    s = b.spec(1, 'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"')
    assert b.wait({b.sched.submit(s): s.workdir}, finished).popitem()[1] == RemoteState("COMPLETED", True, 0)
    assert re.fullmatch(r"CUDA_VISIBLE_DEVICES=[01]\n", (Path(s.workdir) / "job.log").read_text())


@pytest.mark.slurm
def test_hostile_name_and_folder_on_real_slurm(bed):
    b = bed()
    b.root = b.root / "we ird $(touch pwned) 'q' #h;&|*"
    s = b.spec(1, "pwd; sleep 300", name=f"mqi-{b.tag}'s $(touch pwned) `id` x|y")
    job_id = b.sched.submit(s)
    b.wait({job_id: s.workdir}, running)
    assert b.sched.submit(s) == job_id  # found again by its hostile name
    b.sched.cancel(job_id, s.workdir)
    assert b.wait({job_id: s.workdir}, finished)[job_id] == RemoteState("CANCELLED", True, None)
    assert (Path(s.workdir) / "job.log").read_text().startswith(f"{s.workdir}\n")
    assert not list(Path(b.tb.remote_root).rglob("pwned")) and not Path("/root/pwned").exists()


@pytest.mark.slurm
def test_invalid_partition_is_permanent(bed):
    b = bed(partition="nosuch")
    with pytest.raises(ExecutionError) as err:
        b.sched.submit(b.spec(1, "true"))
    assert not err.value.transient and "invalid partition" in str(err.value).lower()


@pytest.mark.slurm
def test_unreachable_controller_is_transient_on_real_clients(bed, slurm_testbed):
    b = bed()
    bad_conf = slurm_testbed.base / "etc" / f"unreachable-{b.tag}.conf"
    bad_conf.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=1", slurm_testbed.slurm_conf.read_text()))
    b.host.prefix = f"export SLURM_CONF={shlex.quote(str(bad_conf))}; "
    for call in (lambda: b.sched.poll({"1": PurePosixPath(b.root)}), lambda: b.sched.submit(b.spec(1, "true")),
                 lambda: b.sched.cancel("1", PurePosixPath(b.root))):
        with pytest.raises(ExecutionError) as err:
            call()
        assert err.value.transient and "Unable to contact slurm controller" in str(err.value)
