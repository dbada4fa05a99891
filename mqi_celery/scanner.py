"""Case Scanner (celery beat, queue ``scan``): finds new cases in the inbox, registers each
exactly once and hands it to the Conductor, which validates and dispatches it.

A case folder is a study folder: it holds an ``RP*.dcm`` plan or delivery folders. It may
sit at ``<inbox>/<study>/`` or nested as ``<inbox>/<room>/<patient>/<study>/``. It is ready
when a ``_CASE_READY`` marker exists in it or in a folder above it (inside the inbox), or
when nothing in it changed for ``scanner.settle_seconds``; until then ``mqi inbox`` lists
it as waiting.

The inbox is a boundary. It is walked without following symbolic links, so every folder
is registered once, by its real path, and nothing outside is read. Whatever the inbox holds
that cannot be a case (a link, a loose file, an empty folder, a name that is not UTF-8, a
case nested too deep) is recorded once as an *inbox problem* with the reason, shown by
``mqi inbox`` until it is fixed or removed. One such entry never stops the scan of others.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Container, Iterator
from datetime import datetime, timedelta, timezone
from dataclasses import dataclass
from pathlib import Path

from . import case_reader, delivery_log, lifecycle, logs, messages
from .conductor import admit, fail_case, request_admission, run_again
from .db import utcnow
from .errors import MQIError, infrastructure_fault
from .lifecycle import CaseStep
from .models import ACTIVE_CASE
from .naming import case_id_for, inbox_fault, is_utf8, shown

log = logging.getLogger(__name__)

WAITING = ("not registered yet: waiting until nothing in it has changed for scanner.settle_seconds "
           "({seconds:g} s), or until a {marker} file is put in it")
UNREADABLE_NAME = "its name is not valid UTF-8 text (shown with \\x escapes); rename it using UTF-8 characters"


# A folder holding more entries than this, none of them a case, is one inbox entry (20,000
# empty folders are one problem to fix, not 20,000 to list and announce).
MANY_PROBLEMS = 100


@dataclass(frozen=True)
class Finding:
    """One thing the inbox holds: a case folder (``problem`` None) or what is wrong with it.
    ``whole``: a folder of many entries that are not cases, judged as one."""
    path: Path
    problem: str | None = None
    whole: bool = False


def survey(inbox: Path, max_depth: int, marker: str = "_CASE_READY", known: Container[str] = (),
           recheck: Container[str] = (), walked: Callable[[Path], None] | None = None,
           changed: Callable[[os.DirEntry], bool] | None = None) -> Iterator[Finding]:
    """Case folders and problems under the inbox, not descending into a case once found.
    ``inbox`` must be a real path (no link in it) for the inside/outside judgement. Folders
    in ``known`` (registered cases) are neither read nor reported, unless in ``recheck``
    or ``changed`` says so: a year of cases in the inbox costs one look at each name (and
    its change time). ``walked`` is told each folder looked into for cases (the inbox and
    the folders between it and the cases)."""
    holds_cases: set[Path] = set()  # folders with a registered case somewhere below: never one entry

    def walk(folder: Path, depth: int) -> Iterator[Finding]:
        if walked is not None:
            walked(folder)
        for entry in _entries(folder, marker):
            if entry.path in known and entry.is_dir(follow_symlinks=False):
                holds_cases.add(folder)
                if entry.path in recheck or (changed is not None and changed(entry)):
                    yield Finding(Path(entry.path))
                continue
            path = Path(entry.path)
            problem = _not_a_folder(entry, inbox)
            if problem:
                yield Finding(path, problem)
                continue
            if not is_utf8(entry.name):
                yield Finding(path, UNREADABLE_NAME)
                continue
            children = _entries(path, marker)
            subfolders = [c for c in children if c.is_dir(follow_symlinks=False)]
            if _looks_like_case(children):
                yield Finding(path)
            elif not children:
                yield Finding(path, "empty folder: nothing to process; copy a case into it or remove it")
            elif not subfolders and delivery_log.looks_like_delivery_folder({c.name for c in children}):
                yield Finding(path, "a beam's delivery log on its own, without its case: put it into its case "
                                    "folder, beside the RP*.dcm plan")
            elif not subfolders:
                yield Finding(path, "not a case: it holds no RT plan (RP*.dcm) and no delivery log folder "
                                    "(with PlanInfo.txt); copy the complete case or remove it")
            elif depth < max_depth:
                found = list(walk(path, depth + 1))
                if path in holds_cases:
                    holds_cases.add(folder)
                problems = [f for f in found if f.problem is not None]
                if len(problems) > MANY_PROBLEMS and len(problems) == len(found) and path not in holds_cases:
                    example = problems[0]
                    yield Finding(path, f"holds {len(problems):,} entries and none of them is a case (e.g. "
                                        f"{shown(example.path.name)}: {example.problem}); move the cases it should "
                                        "hold into the inbox, or remove it", whole=True)
                else:
                    yield from found
            else:
                yield Finding(path, f"holds folders nested deeper than scanner.max_depth ({max_depth}) levels "
                                    "below the inbox and no case folder above that; move the case folder up "
                                    "(<inbox>/<study>/ or <inbox>/<room>/<patient>/<study>/) or raise "
                                    "scanner.max_depth")

    if inbox.is_dir():
        yield from walk(inbox, 1)


def _entries(folder: Path, marker: str) -> list[os.DirEntry]:
    """The folder's entries that matter: hidden ones (``.DS_Store``, partial copies) and
    the ready marker are not content. A folder that vanished holds nothing."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".") and e.name != marker),
                          key=lambda e: os.fsencode(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _not_a_folder(entry: os.DirEntry, inbox: Path) -> str | None:
    """Why a link, a file or a special file cannot be a case; None for a real folder."""
    if entry.is_symlink():
        # Judged by where it points, without reading anything there.
        target = os.path.realpath(entry.path)
        if not (target == str(inbox) or target.startswith(str(inbox) + os.sep)):
            return ("symbolic link to a place outside the inbox; only what is really inside the inbox is read: "
                    "copy the case folder in instead of linking it")
        if not os.path.exists(target):
            return "broken symbolic link; remove it"
        if target == str(inbox):
            return "symbolic link to the inbox itself (a loop); remove the link"
        return (f"symbolic link to {shown(os.path.relpath(target, inbox))} inside the inbox, which is scanned at "
                "its own place; remove the link")
    if entry.is_dir(follow_symlinks=False):
        return None
    if entry.is_file(follow_symlinks=False):
        return "a file, not a case folder: put each case (its RP*.dcm plan and delivery log folders) in a folder"
    return "not a file or folder (a pipe, socket or device); remove it"


def _looks_like_case(entries: list[os.DirEntry]) -> bool:
    """A plan file, or a folder that looks like a beam's delivery log (even an incomplete
    one: validation then says what is missing)."""
    if any(e.name.lower().endswith(".dcm") for e in entries):
        return True
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            try:
                names = set(os.listdir(e.path))
            except OSError:
                continue
            if delivery_log.looks_like_delivery_folder(names):
                return True
    return False


def is_ready(case_dir: Path, inbox: Path, marker: str, settle_seconds: float, now: float | None = None) -> bool:
    """A marker in the case folder or a folder above it below the inbox (one at the top of
    the inbox marks nothing: see ``stray_marker``), or nothing in it changed for
    ``settle_seconds``."""
    folder = case_dir
    while folder != inbox and folder.parent != folder:
        if (folder / marker).exists():
            return True
        folder = folder.parent
    return settled(case_dir, settle_seconds, now)


def settled(case_dir: Path, settle_seconds: float, now: float | None = None) -> bool:
    """Nothing in the folder changed for ``settle_seconds``, marker or not."""
    return (now or time.time()) - case_reader.last_change(case_dir) >= settle_seconds


def _whole_settled(folder: Path, settle_seconds: float) -> bool:
    """A folder of many non-cases is judged by its own change time (an entry added or
    removed): looking into each of its entries again would cost what it holds."""
    return time.time() - os.lstat(folder).st_ctime >= settle_seconds


def stray_marker(inbox: Path, marker: str) -> str | None:
    """Why a marker at the top of the inbox is reported: it would mark every case copied
    in later as ready before its copy ends."""
    if not os.path.lexists(inbox / marker):
        return None
    return (f"a {marker} at the top of the inbox marks no case (a marker applies to its own folder and what is "
            f"below it): remove it, and put one into each case folder once its copy is complete")


class KnownPaths:
    """The registered case folders, kept by this process and topped up each scan with the
    cases registered since the last (an indexed query): a scan costs what is new in the
    inbox, not the year of cases already there. The overlap covers registrations that
    were still committing; one missed anyway only costs a refused second registration."""

    OVERLAP = timedelta(minutes=2)

    def __init__(self):
        self.paths: set[str] = set()
        self.checked: dict[str, float] = {}  # path -> when its content was last checked
        self.since: datetime | None = None

    def refresh(self, store) -> set[str]:
        now = utcnow()
        self.paths |= store.known_paths(self.since)
        self.checked.update(store.checked_since(self.since))
        self.since = now - self.OVERLAP
        return self.paths

    def changed(self, entry: os.DirEntry) -> bool:
        """The validated case folder changed at its top level (a folder added or removed,
        the folder itself replaced) after its content was last checked: one lstat."""
        checked = self.checked.get(entry.path)
        try:
            return checked is not None and entry.stat(follow_symlinks=False).st_ctime > checked
        except OSError:  # gone or unreadable since it was listed: looked at (and said) per folder
            return True


_known: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # per store (tests make several)


def known_paths(store) -> KnownPaths:
    return _known.setdefault(store, KnownPaths())


def register(ctx, case_dir: Path, admit_case=admit) -> str | None:
    """Register one ready case and admit it (``admit_case``). Returns its id, or None when
    another scan registered this folder first."""
    store = ctx.store
    case_id = case_id_for(case_dir.name)
    n = 2
    while store.case_id_taken(case_id):  # the same study dropped twice at different paths
        case_id = f"{case_id_for(case_dir.name)}-{n}"
        n += 1
    if not lifecycle.register(store, case_id, str(case_dir), ctx.settings.reconciler.lease_seconds):
        return None
    admit_case(ctx, case_id)
    return case_id


def _revalidate_if_replaced(ctx, case_dir: Path, case_id: str, failed_at, inbox: Path) -> None:
    """A case that failed validation and was then dropped again (or changed at its top level:
    its folder's change time is later) is validated again by itself once settled."""
    settings = ctx.settings
    changed = datetime.fromtimestamp(os.lstat(case_dir).st_ctime, timezone.utc).replace(tzinfo=None)
    if changed > failed_at and is_ready(case_dir, inbox, settings.scanner.marker, settings.scanner.settle_seconds):
        from .conductor import retry_case

        log.info("case %s changed after it failed validation: validating it again", case_id)
        retry_case(ctx, case_id)


def look_again(ctx, path: Path, inbox: Path, index: KnownPaths, unsettled: dict[str, str], admit_case) -> None:
    """A validated case whose folder changed after its content was last checked. Nothing
    that matters changed (a marker, the same bytes copied again, files only removed from a
    finished case): noted. Its files changed while it runs: it fails saying what changed
    (its results would not be of what was validated). Another export at a finished case's
    path, or a case failed for a change: it runs again from validation once the folder has
    settled (a folder still changing is not read)."""
    settings, store = ctx.settings, ctx.store
    found = store.content_check(str(path))
    if found is None:  # being validated again: nothing to compare with yet
        index.checked.pop(str(path), None)
        return
    case, checked, left_out = found
    marker, settle = settings.scanner.marker, settings.scanner.settle_seconds
    if case.status not in ACTIVE_CASE and not is_ready(path, inbox, marker, settle):
        unsettled[shown(os.path.relpath(path, inbox))] = (
            f"the folder of case {case.case_id} is changing (another export?): looked at again once nothing in it "
            f"changed for scanner.settle_seconds ({settle:g} s)")
        return
    began = time.time()
    change = case_reader.changes_since(path, case.manifest, checked, marker, left_out)
    with logs.bound(case.trace_id):
        if case.status in ACTIVE_CASE and change.what is not None:
            fail_case(ctx, case.case_id, f"its folder changed while the case ran: {change.what}; its results would not "
                                    f"be of what was validated. It runs again from validation once nothing in the "
                                    f"folder changed for scanner.settle_seconds ({settle:g} s)", step=CaseStep.FOLDER_CHANGED)
        elif change.what is not None and (change.new_content or case.step == CaseStep.FOLDER_CHANGED):
            run_again(ctx, case.case_id, change.what, admit_case)
        elif change.touched:  # looked at once: not again until something else changes
            if change.what is not None:
                log.info("case %s is finished; files were only removed from its folder (%s): nothing to compute",
                         case.case_id, change.what)
            store.update_case(case.case_id, checked_at=datetime.fromtimestamp(began, timezone.utc)
                              .replace(tzinfo=None))
            index.checked[str(path)] = began


class InboxError(MQIError):
    def __init__(self, message: str):
        super().__init__(message, transient=False)


def announce_inbox(ctx, fault: str | None) -> None:
    """An event when the inbox goes missing and when it is back (once each, not per scan)."""
    store = ctx.store
    last = store.last_event(None, ("inbox_unavailable", "inbox_available"))
    if fault and last != "inbox_unavailable":
        log.error("%s", fault)
        messages.emit(ctx, "inbox_unavailable", {"reason": fault})
    elif not fault and last == "inbox_unavailable":
        log.info("the inbox is back")
        messages.emit(ctx, "inbox_available", {"inbox": str(ctx.settings.paths.inbox)})


class ScanBusy(MQIError):
    def __init__(self):
        super().__init__("another scan of the inbox is running; what it finds shows in `mqi cases list` and "
                         "`mqi inbox`", transient=True)


def scan_once(ctx, admit_case=admit) -> list[str]:
    """Register every ready new case and admit it (``admit_case``: here, or a message to the
    conductor); record what cannot be a case. Returns the new ids. An inbox that cannot be
    scanned raises ``InboxError`` (and is announced once; its return too). One scan at a time
    (``ScanBusy`` otherwise): an older scan finishing after a newer one would record what the
    newer one had already cleared, and `mqi inbox` would flicker."""
    from . import db

    with db.slot(ctx.store.engine, "scan", 1) as held:
        if held is None:
            raise ScanBusy()
        return _scan(ctx, admit_case)


def _scan(ctx, admit_case) -> list[str]:
    settings, store = ctx.settings, ctx.store
    inbox = Path(os.path.realpath(settings.paths.inbox))
    fault = inbox_fault(inbox)
    announce_inbox(ctx, fault)
    if fault:
        raise InboxError(fault)
    index = known_paths(store)
    known = index.refresh(store)
    invalid = store.validation_failures()
    recorded = store.inbox_problems()
    problems: dict[str, str] = {}
    unsettled: dict[str, str] = {}  # entry -> what to show while it settles
    waiting = WAITING.format(seconds=settings.scanner.settle_seconds, marker=settings.scanner.marker)
    registered = []
    looked: set[str] = set()

    def look(path: Path) -> None:
        looked.add(str(path))
        try:
            if str(path) in invalid:
                _revalidate_if_replaced(ctx, path, *invalid[str(path)], inbox)
            else:
                look_again(ctx, path, inbox, index, unsettled, admit_case)
        except FileNotFoundError:
            pass  # removed while we looked
        except Exception as exc:  # noqa: BLE001 - one folder must not stop the scan of the others
            if infrastructure_fault(exc):
                raise
            # No message of the fault: it may name a file, and a file name may hold the patient id.
            log.warning("case folder %s could not be checked for a new drop (%s%s); looked at again at the next scan",
                        shown(os.path.relpath(path, inbox)), type(exc).__name__,
                        f", {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else "")

    for finding in survey(inbox, settings.scanner.max_depth, settings.scanner.marker, known, recheck=invalid,
                          changed=index.changed):
        if finding.problem is None and str(finding.path) in known:  # most of a year's inbox: keep it cheap
            look(finding.path)
            continue
        where = shown(os.path.relpath(finding.path, inbox))
        try:
            if not (_whole_settled(finding.path, settings.scanner.settle_seconds) if finding.whole else
                    is_ready(finding.path, inbox, settings.scanner.marker, settings.scanner.settle_seconds)):
                # Still being copied, maybe: shown as waiting; a problem seen before stays as it was.
                unsettled[where] = recorded.get(where, waiting) if finding.problem else waiting
                continue
            if finding.problem is not None:
                problems[where] = finding.problem
                continue
            case_id = register(ctx, finding.path, admit_case)
            index.paths.add(str(finding.path))  # registered now, by us or by another scan
            if case_id:
                registered.append(case_id)
        except FileNotFoundError:
            continue  # removed while we looked: nothing left to lose
        except Exception as exc:  # noqa: BLE001 - one folder must not stop the scan of the others
            if infrastructure_fault(exc):
                raise  # the database or broker is down: the whole scan is retried later
            problems[where] = f"could not be scanned: {getattr(exc, 'strerror', None) or 'unexpected fault'} " \
                              "(details in the log); fix it or remove it"
            if recorded.get(where) != problems[where]:  # logged once, not on every scan
                log.warning("inbox entry %s could not be scanned", where, exc_info=True)
    for path in store.active_checked_paths():  # cases at work: their files must stay as validated
        if path not in looked:
            look(Path(path))
    if stray := stray_marker(inbox, settings.scanner.marker):
        problems[settings.scanner.marker] = stray
    _admit_settled(ctx, admit_case, settings.scanner.settle_seconds)
    _record(ctx, {**unsettled, **problems}, recorded, quiet=set(unsettled))
    return registered


def _admit_settled(ctx, admit_case, settle_seconds: float) -> None:
    """Cases whose validation waited for their copy to end are validated again once nothing
    in their folder changed for ``settle_seconds`` (or it is gone: validation says so)."""
    store = ctx.store
    for case_id, path in store.settling_cases():
        try:
            if not settled(Path(path), settle_seconds):
                continue
        except FileNotFoundError:
            pass  # gone: validation says so
        except OSError as exc:  # unreadable now: looked at again at the next scan
            log.warning("case %s could not be checked for settling: %s", case_id, exc.strerror)
            continue
        if lifecycle.settled(store, case_id, ctx.settings.reconciler.lease_seconds):
            log.info("case %s settled: validating it again", case_id)
            admit_case(ctx, case_id)


def _record(ctx, current: dict[str, str], recorded: dict[str, str], quiet: set[str]) -> None:
    """Store what the inbox holds that is not (yet) a case; each new problem is announced
    once (an entry still settling, ``quiet``, is shown, not announced)."""
    if current == recorded:
        return
    for where in ctx.store.replace_inbox_problems(current, recorded):
        if where not in quiet:
            messages.emit(ctx, "inbox_entry_refused", {"entry": where, "reason": current[where]})


def scan_for_admission(ctx) -> int:
    """The periodic scan costs registration only: validating (reading plans, hashing every
    file) is the conductor's work, one message per new case (one the broker does not take
    waits for the reconciler's next run). Returns how many it registered (each is logged
    with its own correlation id; a list of ids in Celery's result line would carry none)."""
    try:
        return len(scan_once(ctx, admit_case=request_admission))
    except InboxError:
        return 0  # said once (event, log, mqi status); the next scan looks again
    except ScanBusy:
        return 0  # the running scan covers this one; the next periodic scan sees what came since


def folders_to_watch(ctx) -> dict[str, bool]:
    """Where a new case can show up (False): the folders the scan looks into for cases; and
    the case folders not registered yet (True: their ready marker)."""
    settings, store = ctx.settings, ctx.store
    inbox = Path(os.path.realpath(settings.paths.inbox))
    walked: list[Path] = []
    known = known_paths(store).refresh(store)
    # Not registered (survey skips the known): a case settling, or a folder that is not one
    # yet (being copied); the watch refuses what is not a real folder.
    pending = [f.path for f in survey(inbox, settings.scanner.max_depth, settings.scanner.marker, known,
                                      walked=walked.append)]
    return {**{str(p): True for p in pending}, **{str(p): False for p in walked}}
