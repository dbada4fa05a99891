"""``make bench``: every scenario beside its baseline, measured in one run, written to
docs/benchmarks.md with a timeline of the pipeline run (docs/benchmarks-timeline.png).

    .venv/bin/python bench/run.py [--smoke] [--out DIR] [--only 1,2,5]

Needs root (it starts its own sshd + Slurm testbed, tests/testbed) and the machine's
RabbitMQ and PostgreSQL. ``--smoke`` runs each scenario tiny, into a temporary folder:
the test suite does, so the harness cannot rot.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# pace: seconds between two cases in scenario 2 (one every 3 s keeps the 2 GPUs of the
# testbed about as busy as they can be without the cases queueing behind each other).
FULL = {"transfer_runs": 3, "big_mib": 1024, "cases": 50, "pace": 3.0, "year": 10_000, "qa_grid": 200,
        "qa_subset": 200_000}
SMOKE = {"transfer_runs": 1, "big_mib": 16, "cases": 2, "pace": 1.0, "year": 60, "qa_grid": 30, "qa_subset": 2_000}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, results into a temporary folder")
    ap.add_argument("--out", type=Path, default=None, help="where benchmarks.md and the PNG go (default: docs/)")
    ap.add_argument("--only", default="1,2,3,4,5,6,7", help="scenarios to run, e.g. 2,5")
    args = ap.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    only = {int(x) for x in args.only.split(",")}
    work = Path(tempfile.mkdtemp(prefix="mqi-bench-", dir="/tmp"))
    work.chmod(0o711)  # munged wants o+x on every parent of its socket
    # This process's own Celery client (the year's scans send admit messages) reads its
    # configuration once, at first use: a folder broker under the work folder, never ./var.
    (work / "bench.yaml").write_text(f"broker: {{url: 'filesystem://', folder: '{work}/broker', "
                                     f"result_backend: 'db+sqlite:///{work}/results.db'}}\nlogging: {{file: null}}\n")
    os.environ["MQI_CONFIG"] = str(work / "bench.yaml")
    import bench_transfer
    import pipeline
    import qa
    import report
    import year
    from tests.casegen import make_case
    from tests.services import postgres_database, rabbitmq_vhost
    from tests.testbed.cluster import Testbed

    out = args.out or (work / "out" if args.smoke else ROOT / "docs")
    results: dict = {"size": size, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    tb = Testbed(work / "tb")
    tb.start()
    try:
        if 1 in only:
            print("scenario 1: transfer", flush=True)
            case = None if not args.smoke else make_case(work / "small", "case", rows_per_layer=2)
            (work / "transfer").mkdir()
            results["transfer"] = bench_transfer.run_all(tb, work / "transfer", Namespace(
                runs=size["transfer_runs"], rekey_control=0, big_mib=size["big_mib"],
                case=case or (bench_transfer.REAL_CASE if bench_transfer.REAL_CASE.is_dir() else None)))
        if only & {2, 4, 6}:
            print(f"scenarios 2, 4, 6: {size['cases']} cases through the stack, one every "
                  f"{size['pace']:g} s on average", flush=True)
            with rabbitmq_vhost() as broker, postgres_database() as database:
                results["pipeline"] = pipeline.run(work / "pipeline", broker, database, tb, cases=size["cases"],
                                                   pace=size["pace"])
        if 3 in only:
            print(f"scenario 3: {size['cases']} cases at once, against a shell loop of sbatch", flush=True)
            with rabbitmq_vhost() as broker, postgres_database() as database:
                burst = pipeline.run(work / "burst", broker, database, tb, cases=size["cases"])
            results["burst"] = burst
            results["shell_loop"] = pipeline.shell_loop(tb, work / "burst", len(burst["inputs"]),
                                                        work / "burst" / "recorder", burst["inputs"])
        if only & {5, 6}:
            for kind in ("sqlite", "postgresql"):
                print(f"scenario 5: a year of cases ({size['year']}) on {kind}", flush=True)
                folder = work / f"year-{kind}"
                folder.mkdir()
                if kind == "sqlite":
                    results[f"year_{kind}"] = year.run(folder, f"sqlite:///{folder}/mqi.db", size["year"])
                    if 6 in only:
                        results["year_rss_mb"] = year.footprint(folder, 5 if args.smoke else 20)
                else:
                    with postgres_database() as url:
                        results[f"year_{kind}"] = year.run(folder, url, size["year"])
        if 7 in only:
            print(f"scenario 7: gamma of a 400 x 400 plane (a new process), and of a {size['qa_grid']}^3 grid",
                  flush=True)
            results["qa"] = qa.run(work / "qa", n=size["qa_grid"], subset=size["qa_subset"])
            if "pipeline" in results:  # the engine's time beside it (the stand-in's, per case)
                results["qa"]["engine_seconds"] = results["pipeline"].get("engine_median")
    finally:
        tb.stop()
    out.mkdir(parents=True, exist_ok=True)
    report.write(results, out)
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"written: {out / 'benchmarks.md'}", flush=True)
    if not args.smoke:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
