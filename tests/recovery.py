"""How long a fault holds work after it ends, for the cases unfinished when it ends: the
first sign of progress after it (an event other than a note that a case still waits), the
longest time after it with no progress at all while some of those cases were unfinished,
and when the last of them finished. And what `mqi status` costs while a fault lasts.

Work standing still is what a fault leaves behind; a case in line for a GPU moves when the
one before it does, so its own first step may come later than a minute after the fault
without anything being stuck (one that never moves, or moves only after the others are
done and a minute of nothing, is stuck)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

MQI = Path(sys.executable).parent / "mqi"
# Notes that a case still waits are not progress.
WAITING_NOTES = {"case_waiting", "execution_waiting", "gpu_shared"}
# Goal of issue 18: work held by a fault moves on within a minute of its end, and never
# stands still longer than that until every held case is done.
WITHIN_SECONDS = 60


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _when(event: dict) -> datetime:
    return datetime.fromisoformat(event["timestamp"].rstrip("Z"))


class Recovery:
    """``events(case_id)`` -> the case's events as `mqi cases show --json` gives them;
    ``status(case_id)`` -> its status."""

    def __init__(self, case_ids, events, status):
        self.case_ids, self.events, self.status = list(case_ids), events, status
        self.faults: list[dict] = []

    def fault_ended(self, name: str) -> None:
        unfinished = [c for c in self.case_ids if self.status(c) not in ("COMPLETED", "FAILED")]
        self.faults.append({"fault": name, "ended": now(), "unfinished": unfinished})

    def figures(self) -> list[dict]:
        """Per fault: seconds from its end to the first progress of a case it held, the
        longest stretch without progress until the last of them was done, and to the last
        one finished."""
        out = []
        for f in self.faults:
            progress = {c: sorted(_when(e) for e in self.events(c)
                                  if _when(e) > f["ended"] and e["command"] not in WAITING_NOTES)
                        for c in f["unfinished"]}
            every = sorted(t for times in progress.values() for t in times)
            finished = max((times[-1] for times in progress.values() if times), default=f["ended"])
            marks = [f["ended"], *(t for t in every if t <= finished)]
            seconds = lambda t: round((t - f["ended"]).total_seconds(), 1)  # noqa: E731
            slowest = max(f["unfinished"], key=lambda c: progress[c][0] if progress[c] else datetime.max, default=None)
            out.append({"fault": f["fault"], "cases_unfinished": len(f["unfinished"]),
                        "never_moved": sum(not times for times in progress.values()),
                        "first_progress_s": seconds(every[0]) if every else 0.0,
                        "longest_still_s": round(max((b - a).total_seconds() for a, b in zip(marks, marks[1:]))
                                                 if len(marks) > 1 else 0.0, 1),
                        "slowest_case_first_s": seconds(progress[slowest][0]) if slowest and progress[slowest] else 0.0,
                        "last_finished_s": seconds(finished),
                        "slowest": slowest, "its_events": self._timeline(slowest, f["ended"])})
        return out

    def _timeline(self, case_id: str | None, ended: datetime) -> list[str]:
        """The slowest case's events around the fault's end (seconds from it): why it took long."""
        return [f"{(_when(e) - ended).total_seconds():+.1f} {e['command']} {json.dumps(e.get('payload'))[:160]}"
                for e in (self.events(case_id) if case_id else ()) if (_when(e) - ended).total_seconds() > -90]

    def assert_bounded(self) -> list[dict]:
        figures = self.figures()
        for f in figures:
            assert f["never_moved"] == 0 and f["first_progress_s"] <= WITHIN_SECONDS, f
            assert f["longest_still_s"] <= WITHIN_SECONDS, f
        return [{k: v for k, v in f.items() if k != "its_events"} for f in figures]


def status_seconds(env: dict | None = None, cwd: Path | None = None) -> tuple[float, dict | None]:
    """One `mqi status --json` as an operator runs it: its wall time and what it said
    (None when it failed, e.g. with the database down: it must still answer at once)."""
    started = time.monotonic()
    p = subprocess.run([str(MQI), "status", "--json"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})}, cwd=cwd)
    seconds = time.monotonic() - started
    return round(seconds, 2), (json.loads(p.stdout) if p.returncode == 0 else None)
