"""The malformed-case corpus (tests/fixtures/bad_cases/corpus.yaml): one test per case at
the level that decides it, a case that vanishes mid-run, and the whole corpus at once
through the embedded pipeline. Every entry ends as a physicist would expect: a failed
case or an inbox entry with a reason that names the file and the fix; nothing outside the
inbox is read; nothing is registered twice; the valid cases beside them go on."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from mqi_celery import context, engine
from mqi_celery.case_reader import manifest, read_case
from mqi_celery.errors import ValidationError
from mqi_celery.models import CaseStatus
from mqi_celery.naming import case_id_for, shown
from mqi_celery.scanner import scan_once
from tests.bad_cases import BadCase, load
from tests.casegen import make_case
from tests.conftest import poll_until

pytestmark = pytest.mark.processes

CORPUS = load()
VALID = next(b for b in CORPUS if b.name == "valid_flat")
# What a reason must never show: raw exception text.
RAW_EXCEPTION = re.compile(r"internal error|Traceback|\b[A-Za-z]*(Error|Exception)\b|Errno")

# Every file or folder this process opens or lists while recording (audit hooks cannot be
# removed, so one hook serves every test and records only when asked).
_reads: list | None = None


def _audit(event: str, args: tuple) -> None:
    if _reads is not None and event in ("open", "os.scandir", "os.listdir") and args and \
            isinstance(args[0], (str, bytes, os.PathLike)):
        _reads.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def read_outside(inbox: Path, action) -> list[str]:
    """Runs ``action``; returns every path it opened or listed that lies outside the inbox
    folder (links resolved), ignoring what the pipeline owns (database, results, logs)."""
    global _reads
    _reads = []
    try:
        action()
        reads, _reads = _reads, None
    finally:
        _reads = None
    outside = Path(os.path.realpath(inbox.parent / "outside"))
    return sorted({r for r in reads if Path(os.path.realpath(r)).is_relative_to(outside)})


def assert_reason(reason: str | None, bad: BadCase) -> None:
    assert reason, f"{bad.name}: no reason given"
    for part in bad.reason_parts():
        assert part in reason, f"{bad.name}: {part!r} not in {reason!r}"
    assert not RAW_EXCEPTION.search(reason), f"{bad.name}: raw exception text in {reason!r}"


def validation_of(case_dir: Path) -> ValidationError | None:
    """What the validator says of a case folder (None: valid), as the conductor asks it."""
    try:
        read_case(case_dir, "_CASE_READY")
        manifest(case_dir, "_CASE_READY")
    except ValidationError as exc:
        return exc
    return None


@pytest.mark.parametrize("bad", CORPUS, ids=lambda b: b.name)
def test_each_corpus_case_ends_as_expected(bad, config_file, monkeypatch):
    """The validator's verdict on its own (for validator-level entries), then a scan (which
    validates what it registers) of the entry beside a valid case."""
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    config_file(scanner={"settle_seconds": 0})  # every entry copied in completely: ready at once
    store, inbox = context.current().store, context.current().settings.paths.inbox
    for entry in ([bad] if bad is VALID else [bad, VALID]):
        entry.build(inbox)
    if bad.decided_by == "validator":
        verdict: list = []
        assert read_outside(inbox, lambda: verdict.append(validation_of(inbox / bad.path))) == []
        if bad.expect["status"] == "FAILED":
            assert_reason(str(verdict[0]), bad)
        else:
            assert verdict == [None]
            if "unused" in bad.expect:  # reported and left out of the upload
                assert len(read_case(inbox / bad.path).unused) == bad.expect["unused"]
            if "gantry" in bad.expect:  # each beam's own machine says its room
                info = read_case(inbox / bad.path)
                assert {engine.gantry_number(b.machine, None) for b in info.beams} == {bad.expect["gantry"]}

    registered: list[str] = []
    assert read_outside(inbox, lambda: registered.extend(scan_once(context.current()))) == []
    assert read_outside(inbox, lambda: registered.extend(scan_once(context.current()))) == []  # a second scan adds nothing

    cases = store.list_cases()
    assert len({c.path for c in cases}) == len(cases) == len(registered) == (2 if bad.registers and bad is not VALID
                                                                              else 1)
    assert store.get_case("valid_flat").status is CaseStatus.QUEUED
    refused = store.inbox_problems()
    if bad.registers:
        case = store.get_case(case_id_for(Path(bad.path).name))
        assert case.status.value == {"FAILED": "FAILED", "COMPLETED": "QUEUED"}[bad.expect["status"]]
        if bad.expect["status"] == "FAILED":
            assert_reason(case.error, bad)
        if "unused" in bad.expect:
            warning = [e for e in store.events(case.case_id) if e["command"] == "case_warning"]
            assert len(warning) == 1 and warning[0]["payload"]["unused_files"] == bad.expect["unused"], warning
            assert "no PlanRange.txt row names were not uploaded" in warning[0]["payload"]["reason"]
            assert "55061194" not in str(warning[0]["payload"])  # no file names: a .mgn name holds the patient id
            assert not set(read_case(Path(case.path)).unused) & set(case.manifest)
        assert refused == {}
    else:
        entry = shown(bad.entry or bad.path)
        assert list(refused) == [entry]
        assert_reason(refused[entry], bad)
        announced = [e for e in _inbox_events(store) if e["entry"] == entry]
        assert len(announced) == 1, "an inbox problem is announced once, not on every scan"


def _inbox_events(store) -> list[dict]:
    from sqlalchemy import select

    from mqi_celery import db

    with store.session() as s:
        return [r.payload for r in s.scalars(select(db.EventRow).where(db.EventRow.command == "inbox_entry_refused"))]


def test_a_fixed_inbox_entry_is_no_longer_reported(ctx, config_file, monkeypatch):
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    config_file(scanner={"settle_seconds": 0})
    ctx = context.current()  # configured again: its new context
    store, inbox = context.current().store, context.current().settings.paths.inbox
    (inbox / "late_case").mkdir(parents=True)
    scan_once(ctx)
    assert list(store.inbox_problems()) == ["late_case"]
    shutil.rmtree(inbox / "late_case")
    make_case(inbox, "late_case")  # the copy arrives
    assert scan_once(ctx) == ["late_case"]
    assert store.inbox_problems() == {}


def test_one_entry_that_breaks_the_scan_is_recorded_once_and_the_others_go_on(ctx, config_file, monkeypatch, caplog):
    import mqi_celery.scanner as scanner

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    real_is_ready = scanner.is_ready

    def is_ready(path, *args, **kwargs):
        if path.name == "a_cursed":
            raise RuntimeError("a fault nobody foresaw")
        return real_is_ready(path, *args, **kwargs)

    monkeypatch.setattr(scanner, "is_ready", is_ready)
    inbox = context.current().settings.paths.inbox
    make_case(inbox, "a_cursed", marker=True)
    make_case(inbox, "b_fine", marker=True)
    with caplog.at_level("WARNING", logger="mqi_celery.scanner"):
        assert scan_once(ctx) == ["b_fine"]
        assert scan_once(ctx) == []
    problems = context.current().store.inbox_problems()
    assert problems == {"a_cursed": "could not be scanned: unexpected fault (details in the log); fix it or remove it"}
    assert [r.message for r in caplog.records] == ["inbox entry a_cursed could not be scanned"]  # once, not per scan


def test_a_case_still_settling_is_listed_as_waiting_and_not_announced(ctx, config_file, monkeypatch):
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    config_file(scanner={"settle_seconds": 3600})
    ctx = context.current()  # configured again: its new context
    store, inbox = context.current().store, context.current().settings.paths.inbox
    make_case(inbox, "copying")
    assert scan_once(ctx) == []
    assert store.inbox_problems() == {"copying": "not registered yet: waiting until nothing in it has changed for "
                                                 "scanner.settle_seconds (3600 s), or until a _CASE_READY file is "
                                                 "put in it"}
    assert _inbox_events(store) == []
    (inbox / "copying" / "_CASE_READY").touch()
    assert scan_once(ctx) == ["copying"] and store.inbox_problems() == {}


# --- input preparation: a case that vanishes mid-run -----------------------------------------
def _admitted_case(inbox: Path) -> str:
    make_case(inbox, "vanishing", marker=True)
    [case_id] = scan_once(context.current())
    return case_id


def test_a_case_removed_before_upload_fails_saying_so(ctx, config_file, monkeypatch):
    from mqi_celery.file_transfer import upload_case

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    case_id = _admitted_case(context.current().settings.paths.inbox)
    shutil.rmtree(context.current().settings.paths.inbox / "vanishing")
    with pytest.raises(ValidationError) as err:
        upload_case(ctx, case_id)
    assert str(err.value).startswith("the case folder vanishing was removed (or renamed) from the inbox; put it back")


def test_a_case_removed_after_upload_fails_saying_so_when_its_input_is_prepared(ctx, config_file, monkeypatch):
    from mqi_celery.file_transfer import upload_case
    from mqi_celery.remote_executor import submit_beam

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    case_id = _admitted_case(context.current().settings.paths.inbox)
    assert upload_case(ctx, case_id) == "uploaded"
    shutil.rmtree(context.current().settings.paths.inbox / "vanishing")
    with pytest.raises(ValidationError, match="the case folder vanishing was removed"):
        submit_beam(ctx, case_id, 2)
    assert context.current().store.get_job(case_id, 2).remote_id is None  # nothing was submitted


# --- everything at once, as a user would drop it ----------------------------------------------
@pytest.mark.timeout(600)
def test_the_whole_corpus_at_once_through_the_embedded_pipeline(embedded, tmp_path):
    inbox = tmp_path / "inbox"  # the embedded run's inbox: everything is there when it starts
    for bad in CORPUS:
        bad.build(inbox)
    run = embedded(scanner={"interval_seconds": 0.5, "settle_seconds": 0})

    registering = {case_id_for(Path(b.path).name): b for b in CORPUS if b.registers}
    refused = {shown(b.entry or b.path): b for b in CORPUS if not b.registers}

    def settled():
        cases = run.mqi_json("cases", "list", "--all")
        done = [c for c in cases if c["status"] in ("COMPLETED", "FAILED")]
        problems = run.mqi_json("inbox")
        return (cases, problems) if len(done) == len(registering) and len(problems) == len(refused) else None

    cases, problems = poll_until(settled, 420, interval=2, what="every corpus case to finish")
    assert len(cases) == len(registering) == len({c["path"] for c in cases})  # nothing registered twice
    outside = str(run.folder / "outside")
    assert not [c for c in cases if c["path"].startswith(outside)]
    by_id = {c["case_id"]: c for c in cases}
    assert set(by_id) == set(registering)
    for case_id, bad in registering.items():
        case = by_id[case_id]
        assert case["status"] == bad.expect["status"], (bad.name, case["error"])
        if case["status"] == "FAILED":
            assert_reason(case["error"], bad)
    assert {p["entry"] for p in problems} == set(refused)
    for p in problems:
        assert_reason(p["reason"], refused[p["entry"]])
    # Nothing from outside the inbox reached the "cluster".
    remote = run.folder / "remote"
    assert "must never be read" not in "".join(
        f.read_text(errors="replace") for f in remote.rglob("*") if f.is_file() and f.stat().st_size < 100)
    listing = run.mqi("cases", "list").stdout
    assert "not registered as a case" in listing and "empty_folder" in listing
    assert run.stop() == 0
    # For the record (the closing note's table): case -> status -> reason, or inbox entry.
    rows = [(b.name, by_id[i]["status"], by_id[i]["error"] or "") for i, b in registering.items()]
    rows += [(refused[p["entry"]].name, "inbox entry", p["reason"]) for p in problems]
    print("\nCORPUS-TABLE", json.dumps(sorted(rows)))


def test_a_case_changed_after_validation_fails_its_upload_and_a_retry_validates_it_again(ctx, config_file, monkeypatch):
    from mqi_celery.conductor import fail_case, retry_case
    from mqi_celery.file_transfer import upload_case

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    inbox = context.current().settings.paths.inbox
    case_id = _admitted_case(inbox)
    (inbox / "vanishing" / "notes.txt").write_text("added after validation")
    plan = next((inbox / "vanishing").glob("RP*.dcm"))
    plan.write_bytes(plan.read_bytes() + b"\0\0")  # re-exported meanwhile
    with pytest.raises(ValidationError) as err:
        upload_case(ctx, case_id)
    assert str(err.value) == (f"{plan.name} changed in the case folder after the case was validated (was it still "
                              "being copied?); retry the case to validate it again")
    fail_case(ctx, case_id, str(err.value))  # what the failed task's stop_case does
    assert retry_case(ctx, case_id).status is CaseStatus.QUEUED
    assert "notes.txt" in context.current().store.get_case(case_id).manifest
    assert upload_case(ctx, case_id) == "uploaded"


@pytest.mark.timeout(300)
def test_a_case_removed_while_its_beams_run_fails_saying_so_and_keeps_its_results(embedded):
    run = embedded(engine={"command": "mqi-demo-engine --delay 1 {input_file}"})
    case_dir = make_case(run.inbox, "withdrawn", marker=True)
    run.wait_case("withdrawn", statuses=("PROCESSING",), timeout=120)
    # Every beam submitted (a beam still to submit would fail the case at its submit instead).
    poll_until(lambda: all(j["status"] == "RUNNING" for j in run.mqi_json("cases", "show", "withdrawn")["jobs"]),
               120, what="every beam of the case to run")
    shutil.rmtree(case_dir)
    case = run.wait_case("withdrawn", timeout=180)
    assert case["status"] == "FAILED"
    assert case["error"].startswith("the case folder withdrawn was removed (or renamed) from the inbox; put it back")
    assert all(j["status"] == "COMPLETED" for j in case["jobs"])  # the beams ran; their doses are kept
    assert len(list((run.folder / "results" / "withdrawn").glob("*.dcm"))) == 3


def test_a_file_swapped_for_a_link_after_validation_is_never_read_or_uploaded(config_file, monkeypatch):
    from mqi_celery.file_transfer import upload_case

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    inbox = context.current().settings.paths.inbox
    case_id = _admitted_case(inbox)
    secret = inbox.parent / "outside" / "secret.ptn"
    secret.parent.mkdir()
    secret.write_bytes(b"outside the inbox: must never be read" * 16)
    victim = next((inbox / "vanishing").glob("*/*.ptn"))
    victim.unlink()
    victim.symlink_to(secret)
    errors: list = []

    def upload():
        try:
            upload_case(context.current(), case_id)
        except ValidationError as exc:
            errors.append(exc)
    assert read_outside(inbox, upload) == []
    rel = f"{victim.parent.name}/{victim.name}"
    assert str(errors[0]).startswith(f"{rel} became a symbolic link after the case was validated")
    remote = Path(context.current().settings.transport.remote_root)
    assert not any(b"must never be read" in f.read_bytes() for f in remote.rglob("*") if f.is_file())
    assert not list(remote.rglob("*.staging"))


def test_a_case_dropped_again_after_it_failed_validation_is_validated_again(ctx, config_file, monkeypatch):
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    store, inbox = context.current().store, context.current().settings.paths.inbox
    broken = make_case(inbox, "redropped", marker=True)
    next(broken.glob("*/*.ptn")).unlink()
    assert scan_once(ctx) == ["redropped"]  # just copied: validated again once settled, then failed for good
    poll_until(lambda: (scan_once(context.current()) or True) and store.get_case("redropped").status is CaseStatus.FAILED, 60, 0.5,
               "the broken case to fail once settled")
    assert scan_once(ctx) == [] and store.get_case("redropped").attempts == 0  # unchanged: left alone
    shutil.rmtree(broken)
    make_case(inbox, "redropped", marker=True)  # the corrected copy, at the same place
    scan_once(ctx)
    case = store.get_case("redropped")
    assert case.status is CaseStatus.QUEUED and case.error is None and case.attempts == 1


def test_a_million_row_plan_range_fails_without_costing_memory(tmp_path):
    """Refused on its size, before it is read: the validating process grows by < 50 MB."""
    import subprocess
    import sys

    bad = next(b for b in CORPUS if b.name == "plan_range_of_a_million_rows")
    case = bad.build(tmp_path / "inbox")
    probe = ("import resource, sys\nfrom pathlib import Path\nfrom mqi_celery.case_reader import read_case\n"
             "from mqi_celery.errors import ValidationError\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "try:\n    read_case(Path(sys.argv[1]))\nexcept ValidationError as exc:\n    print(exc)\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(case)], capture_output=True, text=True, timeout=120)
    reason, grown = done.stdout.splitlines()
    assert "PlanRange.txt is 94." in reason and int(grown) < 50, done.stdout + done.stderr
    print(f"FAULT-REPORT million-row PlanRange.txt: refused, RSS grew {grown} MB")
