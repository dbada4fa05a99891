"""MOQUI input and outcome rules; the direct scheduler on a real local process; transfers
against LocalHost (the SSH host passes the same contract in test_ssh_host.py)."""
import os
import re
from pathlib import Path, PurePosixPath

import pytest

from mqi_celery import engine, moqui_input
from mqi_celery.config import Engine
from mqi_celery.errors import TransferError, ValidationError
from mqi_celery.file_transfer import download_verified, upload_verified
from mqi_celery.case_reader import manifest
from mqi_celery.hosts import LocalHost
from mqi_celery.direct_scheduler import DirectScheduler, parse_direct_poll
from mqi_celery.schedulers import JobSpec
from tests.casegen import make_case
from tests.conftest import group_alive, poll_until

FIXTURES = Path(__file__).with_name("fixtures")


def test_rendered_input_has_the_keys_of_a_real_moqui_input():
    real = moqui_input.parse((FIXTURES / "moqui_tps.in").read_text())
    ours = moqui_input.parse(engine.render_input(
        Engine(), case_id="c", beam=3, input_dir=PurePosixPath("/r/c/input"), delivery_dir="2025",
        output_dir=PurePosixPath("/r/c/beam_3/output"), gantry=2))
    assert set(real) <= set(ours)
    assert ours["BeamNumbers"] == "3" and ours["GantryNum"] == "2" and ours["OutputFormat"] == "dcm"
    assert ours["logFilePath"] == "/r/c/input/2025" and ours["DicomDir"] == "/r/c/input"
    assert ours["UseAbsolutePath"] == "true"


def test_gantry_number_from_machine_name_or_config():
    assert engine.gantry_number("G2", None) == 2
    assert engine.gantry_number("G2", 1) == 1


def test_command_line_quotes_every_word():
    cmd = engine.command_line(Engine(command="moqui --in {input_file}"),
                              input_file=PurePosixPath("/r/x'; rm -rf /;'/in"), job_dir=PurePosixPath("/r"))
    assert cmd == "moqui --in '/r/x'\"'\"'; rm -rf /;'\"'\"'/in'"


@pytest.mark.parametrize("code, log, outputs, reason", [
    (0, "Total execution time: 12 ms", ["b_2_Dose.dcm"], None),
    (3, "Generating\nERROR: simulated failure\n", [], "engine exited with code 3: ERROR: simulated failure"),
    (139, "Segmentation fault (core dumped)", [], "engine exited with code 139: Segmentation fault (core dumped)"),
    (0, "Total execution time: 12 ms", [], "engine exited 0 but wrote no .dcm output"),
    (0, "FATAL ERROR: no plan", ["a.dcm"], "engine reported an error: FATAL ERROR: no plan"),
    (0, "Generating particles", ["a.dcm"], "the run did not finish"),
    (None, "", [], "engine stopped without an exit code"),
    (127, "sh: 1: moqui: not found", [], "engine exited with code 127: sh: 1: moqui: not found"),
])
def test_outcome(code, log, outputs, reason):
    result = engine.outcome(code, log, outputs, "dcm")
    assert result == reason if reason is None else reason in result


def test_parse_direct_poll():
    states = parse_direct_poll("EXITED 3 /r/a\nRUNNING - /r/b c\nLOST - /r/d\nSTARTING - /r/e\n")
    assert states["/r/a"].finished and states["/r/a"].exit_code == 3
    assert not states["/r/b c"].finished
    assert states["/r/d"].finished and states["/r/d"].exit_code is None
    assert not states["/r/e"].finished


def test_direct_scheduler_runs_polls_and_kills_real_processes(tmp_path):
    host = LocalHost(tmp_path)
    sched = DirectScheduler(host)
    quick = JobSpec("mqi-c-2", PurePosixPath(tmp_path / "quick"), "echo hi; exit 3", 1, 60)
    slow = JobSpec("mqi-c-3", PurePosixPath(tmp_path / "slow dir"), "sleep 300", None, 60)
    ids = {sched.submit(quick): quick.workdir, sched.submit(slow): slow.workdir}
    quick_id, slow_id = list(ids)
    done = poll_until(lambda: (s := sched.poll(ids))[quick_id].finished and s, 10, what="quick job")
    assert done[quick_id].exit_code == 3 and not done[slow_id].finished
    assert (tmp_path / "quick" / "job.log").read_text() == "hi\n"
    sched.cancel(slow_id, slow.workdir)
    # The whole group got the signal, the wrapper too: it never wrote an exit code.
    stopped = poll_until(lambda: (s := sched.poll({slow_id: slow.workdir})[slow_id]).finished and s, 10,
                         what="killed job to stop")
    assert stopped.state == "LOST" and stopped.exit_code is None
    poll_until(lambda: not group_alive(int(slow_id)), 10, what="the job's own processes to stop")


def test_direct_job_sees_its_gpu(tmp_path):
    sched = DirectScheduler(LocalHost(tmp_path))
    spec = JobSpec("g", PurePosixPath(tmp_path / "g"), 'echo "gpu=$CUDA_VISIBLE_DEVICES"', 1, 60)
    rid = sched.submit(spec)
    poll_until(lambda: sched.poll({rid: spec.workdir})[rid].finished, 10, what="gpu job")
    assert (tmp_path / "g" / "job.log").read_text() == "gpu=1\n"


def test_upload_is_verified_and_resends_only_differences(tmp_path):
    case = make_case(tmp_path / "local")
    files = manifest(case, "_CASE_READY")
    host = LocalHost(tmp_path / "remote")
    dest = PurePosixPath(tmp_path / "remote" / "c" / "input")
    assert upload_verified(host, case, dest, files)["files"] == len(files)
    assert upload_verified(host, case, dest, files) == {"files": 0, "bytes": 0}
    victim = sorted(files)[5]
    Path(dest / victim).write_bytes(b"corrupted")
    os.remove(dest / sorted(files)[6])
    sent = upload_verified(host, case, dest, files)
    assert sent["files"] == 2 and not Path(str(dest) + ".staging").exists()
    assert host.sha256(dest, sorted(files)) == files
    Path(dest / "FAIL_MODE").write_text("left by an earlier export")  # the engine must never see it
    assert upload_verified(host, case, dest, files)["files"] == len(files)
    assert host.list_files(dest) == sorted(files)


def test_a_case_changed_after_validation_fails_its_upload_saying_so(tmp_path):
    case = make_case(tmp_path / "local")
    files = manifest(case, "_CASE_READY")
    changed = sorted(files)[0]
    (case / changed).write_bytes(b"a newer export")
    with pytest.raises(ValidationError, match=f"^{re.escape(changed)} changed in the case folder after the case"):
        upload_verified(LocalHost(tmp_path / "remote"), case, PurePosixPath(tmp_path / "remote" / "in"), files)


def test_download_verified_places_files_atomically(tmp_path):
    host = LocalHost(tmp_path / "remote")
    out = tmp_path / "remote" / "out"
    out.mkdir(parents=True)
    (out / "a_2_Dose.dcm").write_bytes(b"dose")
    got = download_verified(host, PurePosixPath(out), tmp_path / "results")
    assert list(got) == ["a_2_Dose.dcm"] and (tmp_path / "results" / "a_2_Dose.dcm").read_bytes() == b"dose"
    assert not list((tmp_path / "results").glob(".*.part"))


def test_local_host_refuses_paths_outside_its_root(tmp_path):
    host = LocalHost(tmp_path / "remote")
    with pytest.raises(TransferError, match="outside the remote root"):
        host.write_text(PurePosixPath(tmp_path / "remote" / ".." / "escape.txt"), "x")
    assert not (tmp_path / "escape.txt").exists()


def test_direct_submit_adopts_the_run_of_the_same_token(tmp_path):
    sched = DirectScheduler(LocalHost(tmp_path))
    spec = JobSpec("mqi-c-2", PurePosixPath(tmp_path / "j"), "sleep 300", None, 60, token="t.0.0")
    first = sched.submit(spec)
    assert sched.submit(spec) == first  # redelivered submit: same process, not a second one
    sched.cancel(first, spec.workdir)
    poll_until(lambda: sched.poll({first: spec.workdir})[first].finished, 10, what="the run to stop")
    assert sched.submit(spec) != first  # killed without an exit code: nothing to adopt
    quick = JobSpec("mqi-c-3", PurePosixPath(tmp_path / "q"), "true", None, 60, token="t.0.0")
    done = sched.submit(quick)
    poll_until(lambda: sched.poll({done: quick.workdir})[done].state == "EXITED", 10, what="quick run")
    assert sched.submit(quick) == done  # finished with an exit code: adopted, not run again
    retried = JobSpec("mqi-c-3", quick.workdir, "true", None, 60, token="t.1.0")
    assert sched.submit(retried) != done  # a retry of the case has a new token: runs again


def test_embedded_broker_never_shows_a_half_written_message(tmp_path):
    """kombu's folder transport exposes message files while writing them; ours renames
    a complete file into the queue folder."""
    import threading

    from kombu import Connection

    folder = str(tmp_path)
    opts = {"data_folder_in": folder, "data_folder_out": folder}
    seen_partial = []

    with Connection(transport="mqi_celery.embedded_broker:Transport", transport_options=opts) as conn:
        channel = conn.default_channel
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                for name in os.listdir(folder):
                    if name.endswith(".q.msg"):
                        try:
                            if os.path.getsize(os.path.join(folder, name)) == 0:
                                seen_partial.append(name)
                        except FileNotFoundError:
                            pass
        t = threading.Thread(target=watch)
        t.start()
        try:
            for i in range(300):
                channel._put("q", {"body": "x" * 5000, "i": i})
        finally:
            stop.set()
            t.join()
        got = [channel._get("q")["i"] for _ in range(300)]
    assert seen_partial == [] and sorted(got) == list(range(300))


def test_deadlines_count_engine_time_and_queue_time_apart():
    from datetime import timedelta
    from types import SimpleNamespace

    from mqi_celery.config import Settings
    from mqi_celery.db import utcnow
    from mqi_celery.remote_executor import overdue as _overdue

    s = Settings.model_validate({"engine": {"timeout_seconds": 100}, "scheduler": {"max_queue_seconds": 1000}})
    slurm, direct = SimpleNamespace(enforces_time_limit=True), SimpleNamespace(enforces_time_limit=False)
    ago = lambda sec: utcnow() - timedelta(seconds=sec)  # noqa: E731
    queued = SimpleNamespace(submitted_at=ago(500), started_at=None)
    assert _overdue(queued, slurm, s) is None  # queue time is not the engine's
    assert "queue longer than 1000 s" in _overdue(SimpleNamespace(submitted_at=ago(2000), started_at=None), slurm, s)
    running = SimpleNamespace(submitted_at=ago(500), started_at=ago(150))
    assert _overdue(running, slurm, s) is None  # Slurm's own TIMEOUT comes first
    assert "within 100 s (timeout)" in _overdue(running, direct, s)
