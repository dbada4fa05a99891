"""Scenario 7: the QA's gamma analysis, as the pipeline runs it.

- One 400 × 400 plane at 1 mm (the stand-in engine's beam against its planned dose moved by
  1 mm): ``mqi qa compare REF EVAL --json`` as a new process, so Python's start-up, the
  imports and numba's compilation of pymedphys's interpolation (an empty NUMBA_CACHE_DIR)
  are all counted; then again with numba's cache warm.
- A 200 × 200 × 200 grid at 2 mm, in process: a Gaussian dose (σ 40 mm; about 4 % of the
  voxels above the 10 % threshold) with every point judged, and a broad field (most voxels
  above the threshold) with ``qa.random_subset_3d`` points judged (pymedphys's
  ``random_subset``); both with ``qa.max_gamma`` 2 (the search stops there).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _plane_files(folder: Path) -> tuple[Path, Path]:
    import pydicom

    from mqi_celery.demo_engine import build_rtdose
    from tests.casegen import REAL_CASE
    from tests.qa_refs import write_reference

    plan_path = next(REAL_CASE.glob("RP*.dcm"))
    evaluated = folder / "recomputed.dcm"
    build_rtdose(pydicom.dcmread(plan_path), 2).save_as(evaluated, enforce_file_format=True)
    return write_reference(folder, plan_path, 2, shift=(1, 0, 0)), evaluated


def plane(folder: Path) -> dict:
    reference, evaluated = _plane_files(folder)
    cache = Path(tempfile.mkdtemp(prefix="numba-", dir=folder))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    runs = {}
    for run in ("cold", "warm"):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mqi_celery.cli", "qa", "compare", str(reference), str(evaluated),
                               "--json"], capture_output=True, text=True, env=env, check=True)
        runs[run] = round(time.perf_counter() - started, 2)
        runs["pass_rate"] = json.loads(done.stdout)["pass_rate"]
    return runs


def grid_3d(n: int, subset: int) -> dict:
    from mqi_celery.dose_compare import Criteria, compare
    from mqi_celery.dose_grid import DoseGrid

    axis = (np.arange(n) - (n - 1) / 2) * 2.0
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij", sparse=True)
    out = {"size": f"{n}³ at 2 mm"}
    fields = {"gaussian": 2.0 * np.exp(-(x ** 2 + y ** 2 + z ** 2) / (2 * 40.0 ** 2)),
              "broad": 2.0 / ((1 + np.exp((np.abs(x) - 0.4 * n * 2) / 3)) * (1 + np.exp((np.abs(y) - 0.4 * n * 2) / 3))
                              * (1 + np.exp((np.abs(z) - 0.4 * n * 2) / 3)))}
    for name, dose in fields.items():
        dose = np.broadcast_to(dose, (n, n, n)).astype(float)
        ref = DoseGrid(dose, axis, axis, axis, True, np.zeros(dose.shape, bool), [], name)
        moved = replace(ref, x=axis + 1.0, dose=dose * 1.02)
        criteria = Criteria(random_subset=subset if name == "broad" else None)
        started = time.perf_counter()
        result = compare(ref, moved, criteria)
        out[name] = {"seconds": round(time.perf_counter() - started, 2), "points": result.points,
                     "above_threshold": int((dose >= 0.1 * dose.max()).sum()), "pass_rate": result.pass_rate,
                     "random_subset": criteria.random_subset}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # this process: its own
    return out


def run(folder: Path, *, n: int = 200, subset: int = 200_000) -> dict:
    """Each part in a process of its own, numba's cache empty: compilation and memory counted."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NUMBA_CACHE_DIR": tempfile.mkdtemp(prefix="numba-", dir=folder)}
    done = subprocess.run([sys.executable, __file__, "grid", str(n), str(subset)], capture_output=True, text=True,
                          env=env, check=True)
    return {"plane": plane(folder), "grid": json.loads(done.stdout)}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["grid"]:
        print(json.dumps(grid_3d(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(json.dumps(run(Path(tempfile.mkdtemp(prefix="mqi-bench-qa-"))), indent=1))
