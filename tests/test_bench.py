"""A tiny run of every benchmark scenario (bench/run.py --smoke), so the harness of
`make bench` cannot rot: each figure it reports is computed and written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.timeout(1800)
def test_every_benchmark_scenario_runs_tiny_and_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    report = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## 1. Transfer", "## 2. Orchestration overhead", "## 3. Throughput", "## 4. Login-node economy",
                    "## 5. A year of cases: 60 finished cases on sqlite", "on postgresql", "## 6. Footprint",
                    "## 7. QA: gamma analysis"):
        assert heading in report, heading
    assert (tmp_path / "benchmarks-timeline.png").read_bytes()[:4] == b"\x89PNG"
    pipeline = results["pipeline"]
    assert pipeline["statuses"] == {"COMPLETED": 2} and len(pipeline["timeline"]) == 2
    assert pipeline["sbatch_calls"] == 6 and results["shell_loop"]["jobs"] == 6
    assert results["burst"]["statuses"] == {"COMPLETED": 2}
    for row in pipeline["timeline"]:  # every milestone of the chain, in order
        assert row["ready"] <= row["registered"] <= row["upload"][1] <= row["sbatch"] <= row["finalized"]
        assert 0 <= row["overhead"] < row["end_to_end"] and len(row["engine"]) == 3
    for kind in ("sqlite", "postgresql"):
        assert results[f"year_{kind}"]["registered_new"] == 10
    assert all(results["year_rss_mb"][name] for name in ("core", "transfer", "execute", "control", "qa"))
    qa = results["qa"]
    assert qa["plane"]["pass_rate"] == 100.0 and qa["plane"]["cold"] > 0
    assert qa["grid"]["gaussian"]["points"] > 0 and qa["grid"]["broad"]["points"] == 2_000
    assert results["size"]["cases"] == 2
