"""Reads and validates one case folder before anything leaves the machine.

A case (as exported by the treatment-control PC) is a study folder with one RT Ion plan
``RP*.dcm`` and one folder per delivered beam holding ``PlanInfo.txt``, ``PlanRange.txt``
and the per-layer ``*.ptn`` / ``*.mgn`` logs. Every problem is reported in words a
physicist can act on; nothing here reads or returns patient names.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from .errors import ValidationError
from .hosts import file_sha256

PTN_ROW_BYTES = 16  # 8 big-endian uint16 per 15 us sample


@dataclass(frozen=True)
class DeliveredBeam:
    number: int
    name: str
    folder: str  # delivery folder name, relative to the case
    layers: int


@dataclass(frozen=True)
class CaseInfo:
    plan_file: str  # relative to the case folder
    study_uid: str
    machine: str
    beams: tuple[DeliveredBeam, ...]


def is_delivery_folder(path: Path) -> bool:
    return (path / "PlanInfo.txt").is_file()


def read_plan_info(path: Path) -> dict[str, str]:
    """``KEY,VALUE`` lines (Windows line ends allowed); the value may itself hold commas."""
    info = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.strip().partition(",")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _read_plan(case_dir: Path):
    plans = sorted(p for p in case_dir.glob("RP*.dcm") if p.is_file())
    if not plans:
        raise ValidationError(f"no RT plan: expected one RP*.dcm file in the case folder {case_dir.name}; "
                              "export the RT Ion plan into it")
    if len(plans) > 1:
        names = ", ".join(p.name for p in plans)
        raise ValidationError(f"{len(plans)} RT plans in one case folder ({names}); keep exactly one")
    plan_file = plans[0]
    try:
        ds = pydicom.dcmread(plan_file, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ValidationError(f"RT plan {plan_file.name} is not a readable DICOM file ({type(exc).__name__}); "
                              "re-export it") from None
    if ds.get("Modality") != "RTPLAN" or "IonBeamSequence" not in ds:
        raise ValidationError(f"{plan_file.name} is not an RT Ion plan (Modality {ds.get('Modality')!r}, "
                              "no IonBeamSequence)")
    return plan_file, ds


def _check_layers(folder: Path) -> int:
    """Every layer row in PlanRange.txt must have its .ptn and .mgn file; returns the count."""
    ranges = folder / "PlanRange.txt"
    if not ranges.is_file():
        raise ValidationError(f"delivery folder {folder.name} has no PlanRange.txt")
    rows = list(csv.DictReader(io.StringIO(ranges.read_text(encoding="utf-8", errors="replace"))))
    if not rows:
        raise ValidationError(f"delivery folder {folder.name}: PlanRange.txt lists no layers")
    for row in rows:
        for column in ("SCAN_OUT_FL_NM", "PLAN_SCAN_OUT_FL_NM"):
            name = (row.get(column) or "").strip()
            if not name:
                raise ValidationError(f"delivery folder {folder.name}: PlanRange.txt layer "
                                      f"{row.get('LAYER_NO')} has no {column}")
            if not (folder / name).is_file():
                raise ValidationError(f"delivery folder {folder.name}: layer {row.get('LAYER_NO')} file {name} "
                                      "is missing; copy the complete delivery log")
            if name.endswith(".ptn") and (folder / name).stat().st_size % PTN_ROW_BYTES:
                raise ValidationError(f"delivery folder {folder.name}: {name} is truncated "
                                      f"(size not a multiple of {PTN_ROW_BYTES} bytes)")
    return len(rows)


def read_case(case_dir: Path) -> CaseInfo:
    """Validate the case; raises ``ValidationError`` with the first problem found."""
    plan_file, plan = _read_plan(case_dir)
    beams = {int(b.BeamNumber): b for b in plan.IonBeamSequence}
    delivered: dict[int, DeliveredBeam] = {}
    folders = sorted(p for p in case_dir.iterdir() if p.is_dir() and is_delivery_folder(p))
    if not folders:
        raise ValidationError(f"no delivery log folders (with PlanInfo.txt) in case folder {case_dir.name}")
    for folder in folders:
        raw = read_plan_info(folder / "PlanInfo.txt").get("DICOM_BEAM_NUMBER", "")
        if not raw.isdigit():
            raise ValidationError(f"delivery folder {folder.name}: PlanInfo.txt has no valid DICOM_BEAM_NUMBER "
                                  f"(found {raw!r})")
        number = int(raw)
        beam = beams.get(number)
        if beam is None:
            raise ValidationError(f"delivery folder {folder.name} names beam {number}, which is not in the plan "
                                  f"(plan beams: {', '.join(map(str, sorted(beams)))})")
        if beam.get("TreatmentDeliveryType") != "TREATMENT":
            raise ValidationError(f"delivery folder {folder.name} names beam {number} ({beam.get('BeamName')}), "
                                  f"a {beam.get('TreatmentDeliveryType')} beam, not a TREATMENT beam")
        if number in delivered:
            raise ValidationError(f"beam {number} has two delivery folders ({delivered[number].folder}, "
                                  f"{folder.name}); keep the one to recompute")
        delivered[number] = DeliveredBeam(number, str(beam.get("BeamName", f"beam{number}")), folder.name,
                                          _check_layers(folder))
    return CaseInfo(plan_file=plan_file.name, study_uid=str(plan.get("StudyInstanceUID", "")),
                    machine=str(plan.IonBeamSequence[0].get("TreatmentMachineName", "")),
                    beams=tuple(delivered[n] for n in sorted(delivered)))


def case_files(case_dir: Path, marker: str) -> list[str]:
    """Relative paths of the files that make up the case (the marker is not data). A
    symbolic link is refused: it could make the worker upload any file it can read."""
    links = [p for p in case_dir.rglob("*") if p.is_symlink()]
    if links:
        raise ValidationError(f"case folder {case_dir.name} contains a symbolic link "
                              f"({links[0].relative_to(case_dir)}); copy real files instead")
    return sorted(str(p.relative_to(case_dir)) for p in case_dir.rglob("*")
                  if p.is_file() and p.name != marker)


def manifest(case_dir: Path, marker: str) -> dict[str, str]:
    """SHA-256 of every file of the case, by relative path."""
    return {rel: file_sha256(case_dir / rel) for rel in case_files(case_dir, marker)}
