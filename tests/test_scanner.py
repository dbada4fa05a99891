import os
import time

from mqi_celery import context
from mqi_celery.models import CaseStatus
from mqi_celery.scanner import is_ready, scan_once, survey
from tests.casegen import make_case
from tests.polling import poll_until


def cases_in(inbox, max_depth):
    return sorted(f.path for f in survey(inbox, max_depth) if f.problem is None)


def test_survey_finds_flat_and_nested_cases(tmp_path):
    flat = make_case(tmp_path, "study_a")
    nested = make_case(tmp_path / "G2" / "12345", "study_b")
    assert cases_in(tmp_path, 3) == sorted([flat, nested])
    assert cases_in(tmp_path, 1) == [flat]


def test_marker_in_case_or_above_makes_it_ready(tmp_path):
    case = make_case(tmp_path / "G2" / "12345")
    assert not is_ready(case, tmp_path, "_CASE_READY", settle_seconds=3600)
    (tmp_path / "G2" / "12345" / "_CASE_READY").touch()
    assert is_ready(case, tmp_path, "_CASE_READY", settle_seconds=3600)


def test_settle_rule_waits_for_the_last_change(tmp_path):
    """Change times count, not modification times: a copy that keeps the source's dates or a
    file dated in the future neither settles a case early nor keeps it waiting."""
    case = make_case(tmp_path)
    now = time.time()
    assert not is_ready(case, tmp_path, "_CASE_READY", settle_seconds=60, now=now)
    assert is_ready(case, tmp_path, "_CASE_READY", settle_seconds=60, now=now + 61)
    old, future = now - 3600, now + 86400
    os.utime(case / "late_file.txt" if (case / "late_file.txt").write_text("copied with cp -p") else case,
             (old, old))
    assert not is_ready(case, tmp_path, "_CASE_READY", settle_seconds=60, now=time.time())
    for root, dirs, files in os.walk(case):
        for name in dirs + files + [""]:
            os.utime(os.path.join(root, name), (future, future))
    assert is_ready(case, tmp_path, "_CASE_READY", settle_seconds=60, now=time.time() + 61)


def test_a_marker_at_the_top_of_the_inbox_marks_nothing_and_is_reported(ctx, config_file, monkeypatch):
    """A stray _CASE_READY at the inbox root would make every case copied in later ready at
    once; it marks nothing and `mqi inbox` says so."""
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    inbox = context.current().settings.paths.inbox
    (inbox / "_CASE_READY").touch()
    make_case(inbox, "copying")
    assert not is_ready(inbox / "copying", inbox, "_CASE_READY", settle_seconds=3600)
    assert scan_once(ctx) == []
    problems = context.current().store.inbox_problems()
    assert "a _CASE_READY at the top of the inbox marks no case" in problems["_CASE_READY"]
    (inbox / "_CASE_READY").unlink()
    scan_once(ctx)
    assert "_CASE_READY" not in context.current().store.inbox_problems()


def test_a_case_marked_ready_before_its_copy_ends_waits_and_is_validated_once_settled(ctx, config_file, monkeypatch):
    """The marker comes first (a common transfer-tool order): the half-copied case is not
    failed for good; it waits, and once nothing changed for settle_seconds it is validated
    again and goes on."""
    dispatched = []
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda ctx, case_id: dispatched.append(case_id))
    config_file(scanner={"settle_seconds": 2})
    ctx = context.current()  # configured again: its new context
    inbox = context.current().settings.paths.inbox
    case = make_case(inbox, "early_marker", marker=True)
    plan = next(case.glob("RP*.dcm"))
    held = plan.read_bytes()
    plan.unlink()  # the plan is still to come
    assert scan_once(ctx) == ["early_marker"]
    waiting = context.current().store.get_case("early_marker")
    assert waiting.status is CaseStatus.NEW and "still changing" in waiting.wait_reason and "no RT plan" in \
        waiting.wait_reason
    plan.write_bytes(held)  # the copy ends
    scan_once(ctx)
    assert context.current().store.get_case("early_marker").status is CaseStatus.NEW  # not settled yet: not read
    case_done = poll_until(lambda: (scan_once(context.current()) or True) and (c := context.current().store.get_case("early_marker"))
                           and c.status is not CaseStatus.NEW and c, 60, 0.5, "the settled case to be validated")
    assert case_done.status is CaseStatus.QUEUED and case_done.wait_reason is None, case_done.error
    assert dispatched == ["early_marker"]


def test_scan_registers_each_case_once_and_fails_invalid_ones(ctx, config_file, monkeypatch):
    dispatched = []
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda ctx, case_id: dispatched.append(case_id))
    inbox = context.current().settings.paths.inbox
    make_case(inbox, "good", marker=True)
    bad = make_case(inbox, "bad", marker=True)
    for plan in bad.glob("RP*.dcm"):
        plan.unlink()
    make_case(inbox, "not_ready_yet")
    assert sorted(scan_once(ctx)) == ["bad", "good"]
    assert scan_once(ctx) == []
    store = context.current().store
    assert store.get_case("good").status is CaseStatus.QUEUED and dispatched == ["good"]
    assert store.get_case("not_ready_yet") is None
    # Just copied: the invalid one waits for its folder to settle, then fails for good.
    failed_for_good(store, "bad")
    assert "no RT plan" in store.get_case("bad").error


def failed_for_good(store, case_id: str):
    """Scans until the case, validated once its folder settled, is FAILED."""
    return poll_until(lambda: (scan_once(context.current()) or True) and store.get_case(case_id).status is CaseStatus.FAILED, 60, 0.5,
                      f"case {case_id} to fail validation once settled")


def test_hostile_folder_names_get_safe_ids(ctx, config_file, monkeypatch):
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda ctx, cid: None)
    inbox = context.current().settings.paths.inbox
    make_case(inbox, "x'; touch pwned; '$(id)", marker=True)
    [case_id] = scan_once(ctx)
    assert case_id == "x___touch_pwned_____id"


def test_retry_validates_a_fixed_case_again(ctx, config_file, monkeypatch):
    from mqi_celery.conductor import retry_case

    dispatched = []
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda ctx, case_id: dispatched.append(case_id))
    inbox = context.current().settings.paths.inbox
    case = make_case(inbox, "fixable", marker=True)
    plan = next(case.glob("RP*.dcm"))
    saved = plan.read_bytes()
    plan.unlink()
    scan_once(ctx)
    failed_for_good(context.current().store, "fixable")
    plan.write_bytes(saved)  # the physicist puts the plan back
    fixed = retry_case(ctx, "fixable")
    assert fixed.status is CaseStatus.QUEUED and fixed.error is None and dispatched == ["fixable"]
    assert [j.beam for j in fixed.jobs] == [2, 3, 4]


def test_an_unreadable_case_fails_with_a_reason_instead_of_staying_new(ctx, config_file, monkeypatch):
    def broken(path, _marker, **_):
        raise PermissionError(13, "Permission denied", str(path / "RP.plan.dcm"))
    monkeypatch.setattr("mqi_celery.case_reader.read_case", broken)
    make_case(context.current().settings.paths.inbox, "locked", marker=True)
    assert scan_once(ctx) == ["locked"]
    case = context.current().store.get_case("locked")
    assert case.status is CaseStatus.FAILED
    assert case.error == ("validation: RP.plan.dcm cannot be read (permission denied); let the mqi user read it, "
                          "then retry the case")


def test_a_scan_reads_only_what_is_new_not_the_cases_already_registered(ctx, config_file, monkeypatch):
    """The scanner keeps an index of registered folders: the cases of a year stay in the
    inbox, and a scan neither reads them again nor asks the database for all of them."""
    import mqi_celery.scanner as scanner

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda ctx, case_id: None)
    inbox = context.current().settings.paths.inbox
    for i in range(20):
        (inbox / f"old{i:02d}").mkdir(parents=True)
        (inbox / f"old{i:02d}" / "RP.plan.dcm").write_bytes(b"not read by the scanner")
        (inbox / f"old{i:02d}" / "_CASE_READY").touch()
    assert len(scan_once(ctx)) == 20  # they fail validation: registered all the same
    read, asked = [], []
    real_entries, real_known = scanner._entries, context.current().store.known_paths
    monkeypatch.setattr(scanner, "_entries", lambda folder, marker: read.append(folder) or real_entries(folder, marker))
    monkeypatch.setattr(context.current().store, "known_paths", lambda since=None: asked.append(since) or real_known(since))
    make_case(inbox, "new_one", marker=True)
    assert scan_once(ctx) == ["new_one"]
    assert any(p.name == "new_one" for p in read)
    assert not any(p.name.startswith("old") for p in read)  # 20 registered folders: not opened
    assert asked and all(since is not None for since in asked)  # only what was registered lately


def test_the_inbox_watch_wakes_a_scan_when_a_case_or_its_marker_appears(ctx, config_file):
    from mqi_celery import inbox_watch
    from mqi_celery.scanner import folders_to_watch
    from tests.polling import poll_until

    inbox = context.current().settings.paths.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    registered = make_case(inbox, "registered", marker=True)
    assert scan_once(ctx, admit_case=lambda ctx, case_id: None)
    wakes = []
    watch = inbox_watch.start(lambda: folders_to_watch(ctx), lambda: wakes.append(time.monotonic()), "_CASE_READY",
                              refresh_seconds=60)
    assert watch is not None, "inotify is available on Linux"
    try:
        poll_until(lambda: wakes, 60, 0.05, "the wake-up at start")
        watched = watch.watched()
        assert os.path.realpath(inbox) in watched
        assert os.path.realpath(registered) not in watched, "a registered case costs no watch"
        pending = make_case(inbox / "G2" / "12345", "study_b")  # nested, no marker yet
        poll_until(lambda: os.path.realpath(pending) in watch.watched(), 60, 0.05, "the new case to be watched")
        seen = len(wakes)
        (pending / "more.txt").write_text("the copy goes on")  # not news: no scan for it
        (pending / "_CASE_READY").touch()
        poll_until(lambda: len(wakes) > seen, 60, 0.05, "a wake-up for the marker")
        assert scan_once(ctx, admit_case=lambda ctx, case_id: None), "the woken scan registers it"
        (inbox / "poke").mkdir()  # any event: the watch refreshes and lets go of the registered case
        poll_until(lambda: os.path.realpath(pending) not in watch.watched(), 60, 0.05, "the watch to be dropped")
        poll_until(lambda: len(wakes) >= seen + 2, 60, 0.05, "a wake-up for the new folder")
        assert len(wakes) == seen + 2, "woken by the marker and the new folder, not by the file copied in"
    finally:
        watch.close()


def test_a_folder_of_twenty_thousand_non_cases_is_one_inbox_entry(ctx, config_file, monkeypatch):
    """20,000 empty folders in one folder are one problem to fix: one entry and one event
    over three scans (their times are printed; the speed goal is met in bench/)."""
    from mqi_celery import db
    from sqlalchemy import func, select

    config_file(scanner={"settle_seconds": 0})
    ctx = context.current()  # configured again: its new context
    inbox = context.current().settings.paths.inbox
    for i in range(20_000):
        (inbox / "junk" / f"d{i:05d}").mkdir(parents=True)
    make_case(inbox, "beside_it", marker=True)
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        registered = scan_once(ctx, admit_case=lambda ctx, case_id: None)
        seconds.append(time.perf_counter() - started)
    problems = context.current().store.inbox_problems()
    assert list(problems) == ["junk"] and "holds 20,000 entries and none of them is a case" in problems["junk"]
    assert "e.g. d00000: empty folder" in problems["junk"]
    with context.current().store.session() as s:
        events = s.scalar(select(func.count()).select_from(db.EventRow).where(
            db.EventRow.command == "inbox_entry_refused"))
    assert events == 1 and context.current().store.get_case("beside_it") is not None and registered == []
    print(f"FAULT-REPORT 20,000 empty folders: 1 entry, 1 event, scans {', '.join(f'{s:.2f}' for s in seconds)} s")


def test_the_same_delivery_under_two_folder_names_is_computed_with_a_notice(ctx, config_file, monkeypatch):
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    inbox = context.current().settings.paths.inbox
    make_case(inbox, "first_copy", marker=True)
    assert scan_once(ctx) == ["first_copy"]
    make_case(inbox, "second_copy", marker=True)
    another_fraction = make_case(inbox, "next_fraction", marker=True)
    (another_fraction / "2025042401440800" / "PlanInfo.txt").write_text(
        (another_fraction / "2025042401440800" / "PlanInfo.txt").read_text() + "NOTE,another delivery\r\n")
    assert sorted(scan_once(ctx)) == ["next_fraction", "second_copy"]
    store = context.current().store
    warned = [e["payload"] for e in store.events("second_copy") if e["command"] == "case_warning"]
    assert [w["copy_of"] for w in warned] == ["first_copy"] and "the same delivery as case first_copy" in \
        warned[0]["reason"]
    assert not [e for e in store.events("next_fraction") if e["command"] == "case_warning"]
    assert store.get_case("second_copy").status is CaseStatus.QUEUED  # computed anyway: a notice, not a refusal


def test_one_scan_at_a_time(ctx, config_file, monkeypatch):
    """An older scan finishing after a newer one would record what the newer one cleared
    (`mqi inbox` entries flickered): a scan that finds another running leaves it the work."""
    from mqi_celery import db
    from mqi_celery.scanner import ScanBusy
    from mqi_celery.workers.scan import scan_inbox

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    inbox = context.current().settings.paths.inbox
    make_case(inbox, "during_a_scan", marker=True)
    with db.slot(context.current().store.engine, "scan", 1) as held:
        assert held == 0
        try:
            scan_once(ctx)
            raise AssertionError("a second scan ran beside the first")
        except ScanBusy:
            pass
        assert scan_inbox() == 0 and context.current().store.get_case("during_a_scan") is None
    assert scan_once(ctx) == ["during_a_scan"]


def test_a_folder_holding_registered_cases_is_never_judged_as_one_entry(ctx, config_file, monkeypatch):
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda *a, **k: True)
    config_file(scanner={"settle_seconds": 0})
    ctx = context.current()  # configured again: its new context
    inbox = context.current().settings.paths.inbox
    make_case(inbox / "G1", "registered_one")
    assert scan_once(ctx, admit_case=lambda ctx, case_id: None) == ["registered_one"]
    for i in range(150):
        (inbox / "G1" / f"left_{i:03d}").mkdir()
    scan_once(ctx, admit_case=lambda ctx, case_id: None)
    problems = context.current().store.inbox_problems()
    assert "G1" not in problems and len(problems) == 150  # each named: the folder is not to be removed


def _finish(case_id: str) -> None:
    store = context.current().store
    store.update_case(case_id, status=CaseStatus.PROCESSING)
    store.update_case(case_id, status=CaseStatus.COMPLETED, stage=None, lease_until=None)


def test_the_next_export_dropped_at_a_finished_cases_path_is_a_new_run_of_it(ctx, config_file, monkeypatch):
    """The case folder has an identity beyond its path: the next fraction's export copied
    to a finished case's path is validated and run again (a new run, said in an event); a
    marker or a hidden file added later is not a new export."""
    import shutil

    import mqi_celery.case_reader as case_reader

    dispatched = []
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda ctx, case_id: dispatched.append(case_id))
    config_file(scanner={"settle_seconds": 1})
    ctx = context.current()  # configured again: its new context
    inbox, store = context.current().settings.paths.inbox, context.current().store
    case = make_case(inbox, "fraction", marker=True)
    assert scan_once(ctx) == ["fraction"]
    first = store.get_case("fraction")
    _finish("fraction")
    (case / ".DS_Store").write_bytes(b"browsed")  # a person looked at it: not a new export
    (case / "_CASE_READY").unlink()
    (case / "_CASE_READY").touch()
    looked = []
    real = case_reader.changes_since
    monkeypatch.setattr(case_reader, "changes_since", lambda *a: looked.append(a[0]) or real(*a))
    scan_once(ctx)
    scan_once(ctx)
    assert looked == [case]  # looked at once, then known unchanged
    assert store.get_case("fraction").status is CaseStatus.COMPLETED

    results = context.current().settings.paths.results / "fraction"
    results.mkdir(parents=True)
    (results / "fraction_beam2_dose.dcm").write_bytes(b"first fraction's dose")
    shutil.rmtree(case)
    make_case(inbox, "fraction", rows_per_layer=3, marker=True)  # the next fraction, same folder name
    case_now = poll_until(lambda: (scan_once(context.current()) or True) and (c := store.get_case("fraction"))
                          and c.status is CaseStatus.QUEUED and c, 60, 0.5, "the new export to be validated")
    assert case_now.attempts == first.attempts + 1 and case_now.manifest != first.manifest
    assert [j.status.name for j in case_now.jobs] == ["PENDING"] * 3 and dispatched == ["fraction", "fraction"]
    [again] = [e for e in store.events("fraction") if e["command"] == "case_dropped_again"]
    assert again["payload"]["run"] == 2 and "changed" in again["payload"]["changed"], again
    [kept] = (results / "earlier").glob("*/fraction_beam2_dose.dcm")  # the first run's dose stays
    assert kept.read_bytes() == b"first fraction's dose" and not (results / "fraction_beam2_dose.dcm").exists()


def test_files_changed_under_a_running_case_fail_it_saying_what_then_it_runs_again(ctx, config_file, monkeypatch):
    """A case folder replaced while its case runs (a copy without beam 4): the run stops,
    saying what changed, instead of completing beam 4 from the old content; once the new
    content has settled it is validated and runs again."""
    import shutil

    from mqi_celery.case_reader import changes_since
    from mqi_celery.lifecycle import CaseStep
    from tests.casegen import BEAMS

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda ctx, case_id: None)
    config_file(scanner={"settle_seconds": 1})
    ctx = context.current()  # configured again: its new context
    inbox, store = context.current().settings.paths.inbox, context.current().store
    case = make_case(inbox, "running", marker=True)
    scan_once(ctx)
    assert store.get_case("running").status is CaseStatus.QUEUED
    assert changes_since(case, store.get_case("running").manifest, time.time() - 3600, "_CASE_READY").what is None
    shutil.rmtree(case / BEAMS[4])
    scan_once(ctx)
    failed = store.get_case("running")
    assert failed.status is CaseStatus.FAILED and failed.step == CaseStep.FOLDER_CHANGED
    assert failed.error.startswith(f"its folder changed while the case ran: 86 file(s) removed (in {BEAMS[4]})"), \
        failed.error
    again = poll_until(lambda: (scan_once(context.current()) or True) and (c := store.get_case("running"))
                       and c.status is CaseStatus.QUEUED and c, 60, 0.5, "the changed case to run again")
    assert [j.beam for j in again.jobs] == [2, 3]


def test_what_changed_in_a_case_folder_is_told_by_content_not_by_dates(tmp_path):
    from mqi_celery.case_reader import changes_since
    from mqi_celery.conductor import case_reader
    from tests.casegen import BEAMS

    case = make_case(tmp_path, "c")
    unused = f"{BEAMS[2]}/unused.ptn"  # there at validation, left out of the case (no row names it)
    (case / unused).write_bytes(b"no row names it")
    files = case_reader.manifest(case, "_CASE_READY", leave_out=[unused])
    checked = time.time() + case_reader.CLOCK_MARGIN_SECONDS  # as if validated that much later
    for path in case.rglob("*"):  # `chmod -R` and `touch`: every change time moves, no byte does
        os.utime(path)
        os.chmod(path, path.stat().st_mode)
    (case / "_CASE_READY").touch()
    same = changes_since(case, files, checked, "_CASE_READY", left_out=[unused])
    assert same.what is None and same.touched and not same.new_content
    assert changes_since(case, files, checked, "_CASE_READY").what.startswith("1 file(s) added")  # were it unknown
    ptn = next((case / BEAMS[2]).glob("*.ptn"))
    ptn.write_bytes(bytes(reversed(ptn.read_bytes())) + b"x")
    (case / "notes").mkdir()
    (case / "notes" / "a.txt").write_text("added")
    changed = changes_since(case, files, checked, "_CASE_READY", left_out=[unused])
    assert changed.what == f"1 file(s) added, 1 file(s) changed (in {BEAMS[2]}, notes)" and changed.new_content


def test_a_retried_case_is_not_compared_with_its_old_content_while_it_is_validated_again(ctx, config_file, monkeypatch):
    """`mqi cases retry` of a case that failed before its upload validates it again: until
    then the scanner has nothing to compare its folder with (it would fail the retry); a
    case failed because its folder changed is retried as a new run of it."""
    from mqi_celery import conductor
    from mqi_celery.lifecycle import CaseStep

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda ctx, case_id: None)
    inbox, store = context.current().settings.paths.inbox, context.current().store
    case = make_case(inbox, "retried", marker=True)
    scan_once(ctx)
    conductor.fail_case(ctx, "retried", "upload failed", step="validation")
    seen = []
    real_admit = conductor.admit
    monkeypatch.setattr(conductor, "admit", lambda ctx, case_id: seen.append(store.content_check(str(case)))
                        or real_admit(ctx, case_id))
    assert conductor.retry_case(ctx, "retried").status is CaseStatus.QUEUED and seen == [None]
    conductor.fail_case(ctx, "retried", "its folder changed while the case ran", step=CaseStep.FOLDER_CHANGED)
    again = conductor.retry_case(ctx, "retried")
    assert again.status is CaseStatus.QUEUED and again.attempts == 2
    assert [e["command"] for e in store.events("retried")].count("case_dropped_again") == 1
