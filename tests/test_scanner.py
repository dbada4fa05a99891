import os
import time

from mqi_celery import runtime
from mqi_celery.models import CaseStatus
from mqi_celery.scanner import is_ready, scan_once, survey
from tests.casegen import make_case


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
    case = make_case(tmp_path)
    now = time.time()
    assert not is_ready(case, tmp_path, "_CASE_READY", settle_seconds=60, now=now)
    old = now - 120
    for root, dirs, files in os.walk(case):
        for name in dirs + files + [""]:
            os.utime(os.path.join(root, name), (old, old))
    assert is_ready(case, tmp_path, "_CASE_READY", settle_seconds=60, now=now)
    (case / "late_file.txt").write_text("still copying")
    assert not is_ready(case, tmp_path, "_CASE_READY", settle_seconds=60, now=now)


def test_scan_registers_each_case_once_and_fails_invalid_ones(config_file, monkeypatch):
    dispatched = []
    monkeypatch.setattr("mqi_celery.conductor.dispatch", dispatched.append)
    inbox = runtime.settings().paths.inbox
    make_case(inbox, "good", marker=True)
    bad = make_case(inbox, "bad", marker=True)
    for plan in bad.glob("RP*.dcm"):
        plan.unlink()
    make_case(inbox, "not_ready_yet")
    assert sorted(scan_once()) == ["bad", "good"]
    assert scan_once() == []
    store = runtime.store()
    assert store.get_case("good").status is CaseStatus.QUEUED and dispatched == ["good"]
    assert store.get_case("bad").status is CaseStatus.FAILED and "no RT plan" in store.get_case("bad").error
    assert store.get_case("not_ready_yet") is None


def test_hostile_folder_names_get_safe_ids(config_file, monkeypatch):
    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda cid: None)
    inbox = runtime.settings().paths.inbox
    make_case(inbox, "x'; touch pwned; '$(id)", marker=True)
    [case_id] = scan_once()
    assert case_id == "x___touch_pwned_____id"


def test_retry_validates_a_fixed_case_again(config_file, monkeypatch):
    from mqi_celery.conductor import retry_case

    dispatched = []
    monkeypatch.setattr("mqi_celery.conductor.dispatch", dispatched.append)
    inbox = runtime.settings().paths.inbox
    case = make_case(inbox, "fixable", marker=True)
    plan = next(case.glob("RP*.dcm"))
    saved = plan.read_bytes()
    plan.unlink()
    scan_once()
    assert runtime.store().get_case("fixable").status is CaseStatus.FAILED
    plan.write_bytes(saved)  # the physicist puts the plan back
    fixed = retry_case("fixable")
    assert fixed.status is CaseStatus.QUEUED and fixed.error is None and dispatched == ["fixable"]
    assert [j.beam for j in fixed.jobs] == [2, 3, 4]


def test_an_unreadable_case_fails_with_a_reason_instead_of_staying_new(config_file, monkeypatch):
    def broken(path, _marker):
        raise PermissionError(13, "Permission denied", str(path / "RP.plan.dcm"))
    monkeypatch.setattr("mqi_celery.case_reader.read_case", broken)
    make_case(runtime.settings().paths.inbox, "locked", marker=True)
    assert scan_once() == ["locked"]
    case = runtime.store().get_case("locked")
    assert case.status is CaseStatus.FAILED
    assert case.error == ("validation: RP.plan.dcm cannot be read (permission denied); let the mqi user read it, "
                          "then retry the case")


def test_a_scan_reads_only_what_is_new_not_the_cases_already_registered(config_file, monkeypatch):
    """The scanner keeps an index of registered folders: the cases of a year stay in the
    inbox, and a scan neither reads them again nor asks the database for all of them."""
    import mqi_celery.scanner as scanner

    monkeypatch.setattr("mqi_celery.conductor.dispatch", lambda case_id: None)
    inbox = runtime.settings().paths.inbox
    for i in range(20):
        (inbox / f"old{i:02d}").mkdir(parents=True)
        (inbox / f"old{i:02d}" / "RP.plan.dcm").write_bytes(b"not read by the scanner")
        (inbox / f"old{i:02d}" / "_CASE_READY").touch()
    assert len(scan_once()) == 20  # they fail validation: registered all the same
    read, asked = [], []
    real_entries, real_known = scanner._entries, runtime.store().known_paths
    monkeypatch.setattr(scanner, "_entries", lambda folder, marker: read.append(folder) or real_entries(folder, marker))
    monkeypatch.setattr(runtime.store(), "known_paths", lambda since=None: asked.append(since) or real_known(since))
    make_case(inbox, "new_one", marker=True)
    assert scan_once() == ["new_one"]
    assert any(p.name == "new_one" for p in read)
    assert not any(p.name.startswith("old") for p in read)  # 20 registered folders: not opened
    assert asked and all(since is not None for since in asked)  # only what was registered lately


def test_the_inbox_watch_wakes_a_scan_when_a_case_or_its_marker_appears(config_file):
    from mqi_celery import inbox_watch
    from mqi_celery.scanner import folders_to_watch
    from tests.polling import poll_until

    inbox = runtime.settings().paths.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    registered = make_case(inbox, "registered", marker=True)
    assert scan_once(admit_case=lambda case_id: None)
    wakes = []
    watch = inbox_watch.start(folders_to_watch, lambda: wakes.append(time.monotonic()), "_CASE_READY",
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
        assert scan_once(admit_case=lambda case_id: None), "the woken scan registers it"
        (inbox / "poke").mkdir()  # any event: the watch refreshes and lets go of the registered case
        poll_until(lambda: os.path.realpath(pending) not in watch.watched(), 60, 0.05, "the watch to be dropped")
        poll_until(lambda: len(wakes) >= seen + 2, 60, 0.05, "a wake-up for the new folder")
        assert len(wakes) == seen + 2, "woken by the marker and the new folder, not by the file copied in"
    finally:
        watch.close()
