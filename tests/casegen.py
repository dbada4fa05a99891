"""Builds case folders for tests from the real plan and delivery-log text files in
tests/fixtures, with small generated layer files (the real ones are 45 MB)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

FIXTURES = Path(__file__).with_name("fixtures")
REAL_CASE = FIXTURES / "cases" / "shi_log" / "1.2.840.113854.19.1.19271.1"
STUDY_UID = REAL_CASE.name
BEAMS = {2: "2025042401440800", 3: "2025042401501400", 4: "2025042401552900"}


def make_case(parent: Path, name: str = STUDY_UID, *, rows_per_layer: int = 8, marker: bool = False) -> Path:
    """A valid case like the real one (3 beams, 34/32/42 layers) under ``parent/name``."""
    case = parent / name
    case.mkdir(parents=True)
    for plan in REAL_CASE.glob("RP*.dcm"):
        shutil.copyfile(plan, case / plan.name)
    for folder in BEAMS.values():
        src, dst = REAL_CASE / folder, case / folder
        dst.mkdir()
        for text in ("PlanInfo.txt", "PlanRange.txt"):
            shutil.copyfile(src / text, dst / text)
        with open(src / "PlanRange.txt", newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                # .ptn: 16-byte rows; .mgn: opaque. Content differs per layer so hashes do.
                (dst / row["SCAN_OUT_FL_NM"]).write_bytes(bytes([i % 256]) * 16 * rows_per_layer)
                (dst / row["PLAN_SCAN_OUT_FL_NM"]).write_bytes(f"mgn {folder} {i}".encode())
    if marker:
        (case / "_CASE_READY").touch()
    return case
