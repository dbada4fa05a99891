"""Builds the malformed-case corpus (tests/fixtures/bad_cases/corpus.yaml) into an inbox.

Each entry is the valid real-shaped case (or nothing) changed by a few declared steps, so
the corpus stays small and readable; see the YAML's header for the vocabulary.
"""
from __future__ import annotations

import codecs
import csv
import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import yaml

from tests.casegen import BEAMS, REAL_CASE, make_case

CORPUS = Path(__file__).with_name("fixtures") / "bad_cases" / "corpus.yaml"
PLAN = next(REAL_CASE.glob("RP*.dcm")).name
NAMES = {"B2": BEAMS[2], "B3": BEAMS[3], "B4": BEAMS[4], "PLAN": PLAN}


def fs_path(text: str) -> str:
    """A path from the corpus: {B2}-style names filled in, \\xHH escapes made raw bytes
    (so a name may be anything a file system holds, UTF-8 or not)."""
    raw = codecs.escape_decode(text.format(**NAMES).encode("utf-8"))[0]
    return os.fsdecode(raw)


@dataclass(frozen=True)
class BadCase:
    name: str
    why: str
    decided_by: str
    expect: dict
    at: str = ""
    entry: str = ""
    make: str = "case"
    steps: tuple = field(default=())

    @property
    def path(self) -> str:
        """Where it sits below the inbox (may hold bytes that are not UTF-8)."""
        return fs_path(self.at or self.name)

    @property
    def registers(self) -> bool:
        return "status" in self.expect

    def reason_parts(self) -> list[str]:
        return [part.format(**NAMES) for part in self.expect.get("reason") or self.expect.get("inbox") or []]

    def build(self, inbox: Path) -> Path:
        outside = inbox.parent / "outside"
        if not outside.exists():
            make_case(outside, "case")
            (outside / "secret.txt").write_text("outside the inbox: must never be read")
        target = inbox / self.path
        if self.make == "case":
            make_case(target.parent, target.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
        for step in self.steps:
            apply(step, target, inbox, outside)
        return target


def load() -> list[BadCase]:
    entries = yaml.safe_load(CORPUS.read_text())
    return [BadCase(**{**e, "steps": tuple(e.get("steps", ()))}) for e in entries]


def apply(step: dict, case: Path, inbox: Path, outside: Path) -> None:
    """One declared change; paths are relative to the case (``.`` is the case itself)."""
    verb = next(iter(step))
    path = case / fs_path(step[verb]) if isinstance(step[verb], str) else case
    if verb == "remove":
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    elif verb == "mkdir":
        path.mkdir(parents=True, exist_ok=True)
    elif verb == "write":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes.fromhex(step["hex"]) if "hex" in step else step["text"].encode())
    elif verb == "truncate":
        size = step.get("size", int(path.stat().st_size * step.get("fraction", 1)))
        os.truncate(path, size)
    elif verb == "copy":
        shutil.copyfile(path, case / fs_path(step["to"]))
    elif verb == "rename":
        path.rename(case / fs_path(step["to"]))
    elif verb == "symlink":
        where, to = step["target"].split("/", 1) if "/" in step["target"] else (step["target"], "")
        base = {"@outside": outside, "@inbox": inbox}[where]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(base / fs_path(to) if to else base)
    elif verb == "hardlink":
        where, to = step["target"].split("/", 1)
        path.unlink(missing_ok=True)
        os.link({"@outside": outside, "@inbox": inbox}[where] / fs_path(to), path)
    elif verb == "repeat_rows":  # PlanRange.txt with its first row repeated up to ``rows`` rows
        lines = path.joinpath("PlanRange.txt").read_text().splitlines(keepends=True)
        with open(path / "PlanRange.txt", "w") as f:
            f.write(lines[0])
            for _ in range(step["rows"]):
                f.write(lines[1])
    elif verb == "empty_folders":  # ``count`` empty folders inside
        for i in range(step["count"]):
            (path / f"d{i:05d}").mkdir(parents=True)
    elif verb == "fifo":
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
    elif verb == "plan_info":
        _edit_plan_info(path / "PlanInfo.txt", step)
    elif verb == "recode":
        path.write_bytes(path.read_text().encode(step["encoding"]))
    elif verb == "plan_range":
        _edit_plan_range(path / "PlanRange.txt", step)
    elif verb == "plan":
        _edit_plan(case / PLAN, step["plan"])
    else:
        raise ValueError(f"unknown corpus step {verb!r}")


def _edit_plan_info(info: Path, step: dict) -> None:
    """Set (or with value null remove) one key; ``append``: add a second line for it;
    ``first``: put it on the first line; ``bom``: start the file with a byte order mark."""
    key, value = step["key"], step["value"]
    lines = info.read_text().splitlines()
    if not step.get("append"):
        lines = [line for line in lines if not line.startswith(key + ",")]
    if value is not None:
        lines.insert(0 if step.get("first") else len(lines) if step.get("append") else 2, f"{key},{value}")
    info.write_text(("\ufeff" if step.get("bom") else "") + "\r\n".join(lines) + "\r\n")


def _edit_plan_range(ranges: Path, step: dict) -> None:
    rows = list(csv.reader(io.StringIO(ranges.read_text())))
    header, body = rows[0], rows[1:]
    if "keep_rows" in step:
        body = body[:step["keep_rows"]]
    if "row" in step:
        body[step["row"] - 1][header.index(step["column"])] = step["value"]
    if "first_column" in step:
        i = header.index(step["first_column"])
        header, body = [header[i], *header[:i], *header[i + 1:]], [[r[i], *r[:i], *r[i + 1:]] for r in body]
    out = io.StringIO()
    csv.writer(out, lineterminator=step.get("line_end", "\r\n")).writerows([header, *body])
    ranges.write_text(("\ufeff" if step.get("bom") else "") + out.getvalue(), newline="")


def _edit_plan(plan: Path, change: dict) -> None:
    ds = pydicom.dcmread(plan)
    if "beam" in change:
        beam = ds.IonBeamSequence[change["beam"] - 1]
        if "delete" in change:
            delattr(beam, change["delete"])
        else:
            setattr(beam, change["set"], change["value"])
    else:
        setattr(ds, change["set"], change["value"])
    ds.save_as(plan)
