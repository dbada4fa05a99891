"""Reads and validates one case folder before anything leaves the machine.

A case (as exported by the treatment-control PC) is a study folder with one RT Ion plan
``RP*.dcm`` and one folder per delivered beam holding ``PlanInfo.txt``, ``PlanRange.txt``
and the per-layer ``*.ptn`` / ``*.mgn`` logs. Every problem is reported in words a
physicist can act on; nothing here reads or returns patient names.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pydicom

from . import delivery_log, reference_dose
from .reference_dose import ReferenceDose
from .errors import ValidationError, case_removed
from .hosts import case_file_sha256, open_case_file
from .naming import PORTABLE_HINT, name_problem, shown

log = logging.getLogger(__name__)
logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings quote values (see _read_plan)

DELIVERY_LOG_FILES = ("PlanInfo.txt", "PlanRange.txt", "*.ptn", "*.mgn")
ARCHIVES = ("*.zip", "*.7z", "*.rar", "*.tar", "*.tgz", "*.tar.*", "*.gz", "*.bz2", "*.xz")
PLAN_PATTERN = "RP*.dcm"
MAX_DEPTH_IN_CASE = 4  # <case>/<delivery>/... deeper than this is not an export
# What no real case comes near (the real one: 3 beams, 217 files, 45 MB; layer files up to
# 1.3 MB, text files 4 KB, the plan 0.7 MB). Checked on sizes and counts before a file is
# read, so an implausible one costs neither memory nor an upload.
MAX_FILES_IN_CASE = 100_000
MAX_SIZE = {"*.ptn": 256 << 20, "*.mgn": 256 << 20, "*.txt": 1 << 20, "*.dcm": 256 << 20}
MAX_OTHER_FILE = 64 << 20


@dataclass(frozen=True)
class DeliveredBeam:
    number: int
    name: str
    folder: str  # delivery folder name, relative to the case
    layers: int
    machine: str = ""  # the plan's TreatmentMachineName for this beam (its gantry room)


@dataclass(frozen=True)
class CaseInfo:
    plan_file: str  # relative to the case folder
    study_uid: str
    machine: str
    beams: tuple[DeliveredBeam, ...]
    unused: tuple[str, ...] = ()  # layer files no PlanRange.txt row names: reported, not uploaded
    references: tuple[ReferenceDose, ...] = ()  # the planned doses (QA): checked, never uploaded


@dataclass(frozen=True)
class Inventory:
    """What a case folder holds, seen without following links: sizes by relative path."""
    files: dict[str, int]
    folders: tuple[str, ...]

    def top_files(self) -> list[str]:
        return [f for f in self.files if "/" not in f]

    def top_folders(self) -> list[str]:
        return [f for f in self.folders if "/" not in f]


def require_folder(case_dir: Path) -> None:
    """The case folder is still there, is a real folder, and no link leads to it."""
    if os.path.islink(case_dir):
        raise ValidationError(f"the case folder {shown(case_dir.name)} is a symbolic link; only folders that "
                              "are really inside the inbox are read: copy the case in instead of linking it")
    if not case_dir.is_dir():
        raise case_removed(shown(case_dir.name))
    if os.path.realpath(case_dir) != os.path.abspath(case_dir):
        raise ValidationError(f"the path of case folder {shown(case_dir.name)} passes through a symbolic link; "
                              "copy the case into the inbox instead of linking it")


def inventory(case_dir: Path, marker: str) -> Inventory:
    """Every file and folder of the case, checked before anything is opened: no symbolic
    link (it could make the worker read and upload any file it can read), no pipe or device
    (reading one blocks), every name portable. Hidden entries (``.DS_Store``) and the
    ready marker are not part of the case."""
    require_folder(case_dir)
    files: dict[str, int] = {}
    folders: list[str] = []
    links: dict[tuple[int, int], list[tuple[str, int]]] = {}

    def walk(folder: Path, rel: PurePosixPath, depth: int) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for entry in entries:
            if entry.name.startswith(".") or (depth == 0 and entry.name == marker):
                continue
            where = shown(str(rel / entry.name))
            if entry.is_symlink():
                raise ValidationError(f"{where} in the case folder is a symbolic link; copy the real file or "
                                      "folder into the case instead (links are never followed)")
            problem = name_problem(entry.name)
            if problem:
                raise ValidationError(f"the name of {where} {problem}; {PORTABLE_HINT}")
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 >= MAX_DEPTH_IN_CASE:
                    raise ValidationError(f"{where} is nested {depth + 1} folders deep inside the case; "
                                          "a case holds its plan and one flat folder per delivered beam")
                folders.append(str(rel / entry.name))
                walk(Path(entry.path), rel / entry.name, depth + 1)
            elif entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                _check_plausible(where, entry.name, info)
                files[str(rel / entry.name)] = info.st_size
                if info.st_nlink > 1:
                    links.setdefault((info.st_dev, info.st_ino), []).append((where, info.st_nlink))
                if len(files) > MAX_FILES_IN_CASE:
                    raise ValidationError(f"the case folder holds more than {MAX_FILES_IN_CASE:,} files, far more "
                                          "than any delivery; copy only the plan and the delivery log folders")
            else:
                raise ValidationError(f"{where} is not a regular file (a pipe, socket or device); remove it "
                                      "from the case folder")

    try:
        walk(case_dir, PurePosixPath(), 0)
    except FileNotFoundError:
        require_folder(case_dir)  # the whole case went: say so
        raise ValidationError("files of the case disappeared while it was being read; wait until the copy is "
                              "complete, then retry the case") from None
    for names in links.values():  # every link of a file inside the case is fine (cp -al within it)
        where, nlink = names[0]
        if nlink > len(names):
            raise ValidationError(f"{where} in the case folder is a hard link to a file that also lies outside the "
                                  "case; copy the real file into the case instead (links are never followed)")
    return Inventory(files=files, folders=tuple(folders))


def _check_plausible(where: str, name: str, info) -> None:
    """A file no delivery holds: refused on its size before it is read or uploaded (a sparse
    one too: its size is what would be read and sent)."""
    limit = next((size for pattern, size in MAX_SIZE.items() if fnmatch.fnmatchcase(name.lower(), pattern)),
                 MAX_OTHER_FILE)
    if info.st_size > limit:
        raise ValidationError(f"{where} is {info.st_size / (1 << 20):,.1f} MiB, far larger than such a file of a "
                              f"delivery can be (at most {limit >> 20} MiB); copy the file the delivery system wrote")



def beam_machine(case_dir: Path, plan: str, beam: int) -> str:
    """The treatment machine (gantry room) of one beam of a validated case's plan."""
    with warnings.catch_warnings(), open_case_file(case_dir, plan) as f:
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(f, stop_before_pixels=True)
    return next(str(b.get("TreatmentMachineName", "")) for b in ds.IonBeamSequence if int(b.BeamNumber) == beam)


def plan_file(files) -> str:
    """The plan's name among a validated case's files (its manifest)."""
    return next(f for f in files if "/" not in f and fnmatch.fnmatchcase(f, PLAN_PATTERN))


def _read_plan(case_dir: Path, inv: Inventory):
    top = inv.top_files()
    plans = [f for f in top if fnmatch.fnmatchcase(f, PLAN_PATTERN)]
    plan_folders = [f for f in inv.top_folders() if fnmatch.fnmatchcase(f, PLAN_PATTERN)]
    if not plans and plan_folders:
        raise ValidationError(f"{plan_folders[0]} is a folder, not the RT plan file; export the RT Ion plan into the "
                              "case folder")
    if not plans:
        other = [f for f in top if f.lower().endswith(".dcm")]
        seen = f" (found {', '.join(other[:3])}, which are not named RP*.dcm)" if other else ""
        raise ValidationError(f"no RT plan: expected one RP*.dcm file in the case folder {shown(case_dir.name)}"
                              f"{seen}; export the RT Ion plan into it")
    if len(plans) > 1:
        raise ValidationError(f"{len(plans)} RT plans in one case folder ({', '.join(plans)}); keep exactly one")
    name = plans[0]
    if inv.files[name] == 0:
        raise ValidationError(f"RT plan {name} is empty; export it again")
    # pydicom warns about odd values with the values in the text: a damaged field may hold
    # patient data, and the reason we give says enough.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open_case_file(case_dir, name) as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
        except ValidationError:
            raise
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
            log.info("RT plan %s unreadable (%s)", name, type(exc).__name__)
            raise ValidationError(f"RT plan {name} is not a readable DICOM file; export it again") from None
        try:
            return name, ds, _plan_beams(name, ds)
        except ValidationError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged value deep in the plan
            log.info("RT plan %s not interpretable (%s)", name, type(exc).__name__)
            raise ValidationError(f"RT plan {name} holds values that cannot be read (a damaged or unusual export); "
                                  "export it again") from None


def _plan_beams(name: str, ds) -> dict:
    """The plan's ion beams by number, once the plan is known to be whole."""
    if ds.get("Modality") != "RTPLAN" or "IonBeamSequence" not in ds:
        found = f"Modality {ds.get('Modality')!r}" if ds.get("Modality") != "RTPLAN" else "no IonBeamSequence"
        raise ValidationError(f"{name} is not an RT Ion plan ({found}); export the RT Ion plan")
    beams = {}
    for i, beam in enumerate(ds.IonBeamSequence, start=1):
        raw = str(beam.get("BeamNumber", "")).strip()
        if not re.fullmatch(r"\+?[0-9]{1,9}", raw, re.ASCII):
            raise ValidationError(f"RT plan {name}: ion beam #{i} ({beam.get('BeamName', 'unnamed')}) has "
                                  f"{'no BeamNumber' if not raw else f'BeamNumber {raw!r}, not a number'}; "
                                  "export the plan again from the planning system")
        if int(raw) in beams:
            raise ValidationError(f"RT plan {name} numbers two ion beams {int(raw)}; export the plan again from "
                                  "the planning system")
        points, expected = len(beam.get("IonControlPointSequence", [])), beam.get("NumberOfControlPoints")
        if expected is not None and points != int(expected):
            raise ValidationError(f"RT plan {name} is incomplete: beam {raw} has {points} of its {int(expected)} "
                                  "control points (the file was cut short); export it again")
        beams[int(raw)] = beam
    if not beams:
        raise ValidationError(f"RT plan {name} holds no ion beams; export the RT Ion plan with its beams")
    referenced = {int(ref.ReferencedBeamNumber) for group in ds.get("FractionGroupSequence", [])
                  for ref in group.get("ReferencedBeamSequence", []) if "ReferencedBeamNumber" in ref}
    missing = sorted(referenced - set(beams))
    if missing:
        raise ValidationError(f"RT plan {name} is incomplete: its fraction group names beam(s) "
                              f"{', '.join(map(str, missing))}, which the file does not hold (cut short?); "
                              "export it again")
    return beams


def _check_loose_files(inv: Inventory) -> None:
    """A delivery log at the top of the case, or packed in an archive, would be uploaded and
    never used: its beam would silently be missing from the result."""
    for name in inv.top_files():
        if any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in DELIVERY_LOG_FILES):
            raise ValidationError(f"{name} lies at the top of the case folder: a beam's delivery log belongs in a "
                                  "folder of its own (one per beam); move it there")
        if any(fnmatch.fnmatchcase(name.lower(), p) for p in ARCHIVES):
            raise ValidationError(f"{name} is an archive: unpack it into the case folder (one folder per beam), "
                                  "then remove it")


def _check_plan_identity(name: str, plan) -> None:
    """The plan says whose and which study it is: without that no log can be checked against it."""
    for keyword in ("PatientID", "StudyInstanceUID"):
        if not str(plan.get(keyword, "") or "").strip():
            raise ValidationError(f"RT plan {name} has no {keyword}, so no delivery log can be checked against it; "
                                  "export the plan again from the planning system")


def _check_same_treatment(folder: str, info: dict[str, str], plan) -> None:
    """A log of another patient or study beside this plan would be recomputed against the
    wrong plan. (Patient ids are compared, never shown; both are present by now.)"""
    patient, plan_patient = info["DICOM_PATIENT_ID"], str(plan.get("PatientID", "")).strip()
    if patient != plan_patient:
        raise ValidationError(f"{folder}/PlanInfo.txt is of another patient than the RT plan (its "
                              "DICOM_PATIENT_ID is not the plan's Patient ID); copy this patient's delivery log")
    study, plan_study = info["DICOM_STUDY_INS_UID"], str(plan.get("StudyInstanceUID", "")).strip()
    if study != plan_study:
        raise ValidationError(f"{folder}/PlanInfo.txt is of study {shown(study)}, but the RT plan is of study "
                              f"{shown(plan_study)}; copy the delivery log of this plan's study")


MAX_BEAM_NAME = 64  # DICOM's LO value: the engine's input and result names carry it


def _beam_name(plan_file: str, number: int, beam) -> str:
    name = str(beam.get("BeamName", "") or f"beam{number}")
    if len(name) > MAX_BEAM_NAME or not name.isprintable():
        what = f"is {len(name)} characters long (DICOM allows {MAX_BEAM_NAME})" if len(name) > MAX_BEAM_NAME else \
            "holds control characters"
        raise ValidationError(f"RT plan {plan_file}: the BeamName of beam {number} {what}; export the plan again "
                              "from the planning system")
    return name


def read_case(case_dir: Path, marker: str = "_CASE_READY", *, references: str = "RD*.dcm",
              require_reference: bool = False) -> CaseInfo:
    """Validate the case; raises ``ValidationError`` with the first problem found. Every
    folder of the case must be a beam's delivery log: nothing is skipped unannounced.
    ``references``: the planned doses' file pattern (``require_reference``: one must be there)."""
    inv = inventory(case_dir, marker)
    plan_file, plan, beams = _read_plan(case_dir, inv)
    _check_plan_identity(plan_file, plan)
    _check_loose_files(inv)
    folders = sorted(inv.top_folders())
    if not folders:
        raise ValidationError(f"no delivery log folders (with PlanInfo.txt) in case folder {shown(case_dir.name)}; "
                              "copy one folder per delivered beam into it")
    delivered: dict[int, DeliveredBeam] = {}
    unused: list[str] = []
    for folder in folders:
        if f"{folder}/PlanInfo.txt" in inv.folders:
            raise ValidationError(f"{folder}/PlanInfo.txt is a folder, not a file; copy the file the delivery "
                                  "system wrote")
        if f"{folder}/PlanInfo.txt" not in inv.files:
            raise ValidationError(f"folder {folder} in the case is not a delivery log: it has no PlanInfo.txt; "
                                  f"copy the complete delivery log folder, or move {folder} out of the case")
        info = delivery_log.plan_info(case_dir, folder)
        number = delivery_log.beam_number(folder, info)
        _check_same_treatment(folder, info, plan)
        beam = beams.get(number)
        if beam is None:
            raise ValidationError(f"delivery folder {folder} names beam {number}, which is not in the plan "
                                  f"(plan beams: {', '.join(map(str, sorted(beams)))}); the log and the plan "
                                  "must be of the same treatment: copy the matching one")
        kind = beam.get("TreatmentDeliveryType") or "unspecified"
        if kind != "TREATMENT":
            raise ValidationError(f"delivery folder {folder} names beam {number} ({beam.get('BeamName')}), "
                                  f"a {kind} beam, not a TREATMENT beam; remove that folder from the case")
        if number in delivered:
            raise ValidationError(f"beam {number} has two delivery folders ({delivered[number].folder}, "
                                  f"{folder}); keep the one to recompute")
        layers, extra = delivery_log.check_layers(case_dir, folder, inv, info)
        unused += extra
        delivered[number] = DeliveredBeam(number, _beam_name(plan_file, number, beam), folder, layers,
                                          str(beam.get("TreatmentMachineName", "")))
    first = delivered[min(delivered)]
    planned = reference_dose.check(case_dir, reference_dose.find(inv.top_files(), references), plan, set(delivered))
    if require_reference and not planned:
        raise ValidationError(f"no planned dose ({references}) in the case folder, and qa.require_reference is set; "
                              "export the planned dose (RTDOSE, per beam or for the plan) into it")
    return CaseInfo(plan_file=plan_file, study_uid=str(plan.get("StudyInstanceUID", "")), machine=first.machine,
                    beams=tuple(delivered[n] for n in sorted(delivered)), unused=tuple(unused), references=planned)


def last_change(folder: Path) -> float:
    """When anything in the folder last changed (its own entry included, links not followed).
    Change times, not modification times: a copy that keeps the source's dates (``cp -p``,
    rsync) or a file dated in the future cannot make a folder look settled, or unsettled."""
    newest = 0.0
    for path in _walk_entries(folder):
        try:
            newest = max(newest, os.lstat(path).st_ctime)
        except FileNotFoundError:  # gone since it was listed (a copy's temporary file): changing now
            if path == str(folder):
                raise
            return time.time()
    return newest


def _walk_entries(folder: Path):
    yield str(folder)
    if folder.is_symlink() or not folder.is_dir():
        return
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            yield os.path.join(root, name)


def manifest(case_dir: Path, marker: str, *, leave_out=()) -> dict[str, str]:
    """SHA-256 of every file of the case (but ``leave_out``), by relative path: what is uploaded."""
    files = [rel for rel in inventory(case_dir, marker).files if rel not in set(leave_out)]
    try:
        return {rel: case_file_sha256(case_dir, rel) for rel in files}
    except FileNotFoundError as exc:
        require_folder(case_dir)
        raise ValidationError(f"{shown(Path(exc.filename).name)} disappeared while the case was being read; wait "
                              "until the copy is complete, then retry the case") from None


@dataclass(frozen=True)
class FolderChange:
    """What differs in a case folder from what was validated (its manifest). ``touched``:
    something changed after ``since`` even when its content did not (a marker, a copy of
    the same bytes, ``chmod -R``). ``new_content``: files added or changed, not only removed."""
    what: str | None
    touched: bool
    new_content: bool = False


# Change times are the file server's clock, the check time ours: a file changed this long
# before the check is looked at too (only its content decides, so this costs a hash).
CLOCK_MARGIN_SECONDS = 5.0


def _raise(exc: OSError) -> None:
    raise exc  # a folder that cannot be read now is not a folder whose files went away


def changes_since(case_dir: Path, manifest: dict[str, str], since: float, marker: str,
                  left_out=()) -> FolderChange:
    """Files added, removed or changed in content since ``since`` (a change time in
    seconds): only files changed after it are read. ``left_out``: files that were there at
    validation but not part of the case (layer files no row names). Counts and folders, no
    file names (a .mgn name carries the patient id). Hidden entries and the marker are not
    content."""
    since -= CLOCK_MARGIN_SECONDS
    left_out = set(left_out)
    added, changed, present, touched = [], [], set(), os.lstat(case_dir).st_ctime > since
    for root, dirs, files in os.walk(case_dir, onerror=_raise):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_root = PurePosixPath(os.path.relpath(root, case_dir))
        for name in files:
            rel = str(rel_root / name) if str(rel_root) != "." else name
            if name.startswith(".") or rel == marker:
                continue
            try:
                newer = os.lstat(os.path.join(root, name)).st_ctime > since
            except FileNotFoundError:
                continue  # going away now: counted as removed
            present.add(rel)
            touched |= newer
            if not newer or rel in left_out:
                continue
            if rel not in manifest:
                added.append(rel)
            elif sha256_or_none(case_dir, rel) != manifest[rel]:
                changed.append(rel)
    removed = [rel for rel in manifest if rel not in present]
    if not (added or changed or removed):
        return FolderChange(None, touched)
    counts = [f"{len(names)} file(s) {verb}" for names, verb in ((added, "added"), (removed, "removed"),
                                                                  (changed, "changed")) if names]
    folders = sorted({rel.split("/", 1)[0] if "/" in rel else "." for rel in added + removed + changed})
    where = ", ".join("the case folder itself" if f == "." else shown(f) for f in folders[:5])
    more = f" and {len(folders) - 5} more" if len(folders) > 5 else ""
    return FolderChange(f"{', '.join(counts)} (in {where}{more})", True, bool(added or changed))


def sha256_or_none(case_dir: Path, rel: str) -> str | None:
    """A case file's SHA-256 now; None when it cannot be read (gone, or not a plain file)."""
    try:
        return case_file_sha256(case_dir, rel)
    except (OSError, ValidationError):
        return None
