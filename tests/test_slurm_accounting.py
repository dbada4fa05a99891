"""sacct as the state source against a real slurmdbd (storing in the machine's MariaDB):
the final state and exit code of each job come from Slurm's accounting."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from mqi_celery.models import CaseStatus, JobStatus
from tests.casegen import make_case
from tests.pipeline_cluster import Cluster, wait_finished
from tests.services import postgres_database, rabbitmq_vhost
from tests.testbed.cluster import Testbed

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


@pytest.fixture(scope="module")
def accounting_testbed():
    base = Path(tempfile.mkdtemp(prefix="mqi-dbd-testbed-"))
    tb = Testbed(base, accounting=True)
    try:
        tb.start()
        yield tb
    finally:
        tb.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_final_states_and_exit_codes_come_from_sacct(tmp_path, config_file, accounting_testbed):
    tb = accounting_testbed
    answer = tb.ssh("sacct -n -X")
    assert answer.returncode == 0 and "disabled" not in answer.stderr, answer.stderr  # slurmdbd answers
    with rabbitmq_vhost() as broker, postgres_database() as database:
        c = Cluster(tmp_path, config_file, tb, broker, database)
        c.configure(engine_args="--fail exit --fail-beams 3",
                    scheduler={"kind": "slurm", "poll_interval_seconds": 0.5,
                               "slurm": {"gres": "gpu:1", "state_source": "sacct"}})
        try:
            c.start()
            make_case(tmp_path / "inbox", "exit3", marker=True, rows_per_layer=2)
            case = wait_finished("exit3", 240)
        finally:
            c.procs.stop()
    jobs = {j.beam: j for j in case.jobs}
    assert case.status is CaseStatus.FAILED
    assert jobs[3].status is JobStatus.FAILED and jobs[3].exit_code == 3 and jobs[3].remote_state == "FAILED"
    assert jobs[2].status is jobs[4].status is JobStatus.COMPLETED
    calls = [call.split()[0] for call in tb.scheduler_calls()]
    assert "sacct" in calls and "scontrol" not in calls  # scontrol is only the no-accounting fallback
    sacct = tb.ssh(f"sacct -n -X -P -o JobName,State,ExitCode -j {jobs[3].remote_id}").stdout.split()
    assert sacct == ["mqi-exit3-3|FAILED|3:0"], sacct
    assert "engine exited with code 3" in jobs[3].error
