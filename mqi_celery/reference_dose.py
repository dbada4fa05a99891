"""The planned dose a case brings along (``RD*.dcm`` in the case folder, exported by the
planning system): one per beam (``DoseSummationType`` BEAM) or one for the whole plan.

Checked at validation, before anything is uploaded: each must be an RTDOSE of this plan
(``ReferencedRTPlanSequence``), study and patient, placed in space, and a per-beam one must
name a beam of the case. Reference files are the QA's, never the engine's: they are not
uploaded. Patient ids are compared, never shown.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import ValidationError
from .hosts import open_case_file

PLACEMENT = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")
PLAN_LEVEL = ("PLAN", "FRACTION", "MULTI_PLAN")  # a dose of all the plan's beams


@dataclass(frozen=True)
class ReferenceDose:
    file: str  # relative to the case folder
    beam: int | None  # None: the plan's dose (all beams summed)


def find(top_files: list[str], pattern: str) -> list[str]:
    return sorted(f for f in top_files if fnmatch.fnmatchcase(f, pattern))


def check(case_dir: Path, files: list[str], plan, beams: set[int]) -> tuple[ReferenceDose, ...]:
    """The case's reference doses; ``ValidationError`` naming the file for one that does not
    belong to this plan or case."""
    found: dict[int | None, str] = {}
    for name in files:
        ref = _check_one(case_dir, name, plan, beams)
        if ref.beam in found:
            what = f"beam {ref.beam}" if ref.beam is not None else "the whole plan"
            raise ValidationError(f"{found[ref.beam]} and {name} are both the planned dose of {what}; keep one")
        found[ref.beam] = name
    return tuple(ReferenceDose(f, b) for b, f in sorted(found.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def _check_one(case_dir: Path, name: str, plan, beams: set[int]) -> ReferenceDose:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open_case_file(case_dir, name) as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
        except ValidationError:
            raise
        except Exception:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
            raise ValidationError(f"reference dose {name} is not a readable DICOM file; export it again") from None
    if ds.get("Modality") != "RTDOSE":
        raise ValidationError(f"reference dose {name} is {ds.get('Modality') or 'not a DICOM object with a modality'}, "
                              "not an RTDOSE; export the planned dose (RTDOSE) or remove the file")
    if str(ds.get("PatientID", "")).strip() != str(plan.get("PatientID", "")).strip():
        raise ValidationError(f"reference dose {name} is of another patient than the RT plan (its Patient ID is not "
                              "the plan's); export this patient's planned dose")
    if str(ds.get("StudyInstanceUID", "")).strip() != str(plan.get("StudyInstanceUID", "")).strip():
        raise ValidationError(f"reference dose {name} is of another study than the RT plan; export the planned dose "
                              "of this plan's study")
    plan_refs = ds.get("ReferencedRTPlanSequence") or []
    if not plan_refs or str(plan_refs[0].get("ReferencedSOPInstanceUID", "")) != str(plan.get("SOPInstanceUID", "")):
        raise ValidationError(f"reference dose {name} is the dose of another RT plan (its ReferencedRTPlanSequence "
                              "does not name this case's plan); export the planned dose of this plan")
    missing = [k for k in PLACEMENT if k not in ds]
    if missing:
        raise ValidationError(f"reference dose {name} has no {', '.join(missing)}: it cannot be placed in space; "
                              "export it again")
    kind = str(ds.get("DoseSummationType", "")).upper()
    if kind in PLAN_LEVEL:
        return ReferenceDose(name, None)
    if kind != "BEAM":
        raise ValidationError(f"reference dose {name} has DoseSummationType {kind or 'missing'}; export the planned "
                              "dose per beam (BEAM) or for the whole plan (PLAN)")
    beam = _referenced_beam(plan_refs[0])
    if beam is None:
        raise ValidationError(f"reference dose {name} is a per-beam dose that names no beam "
                              "(ReferencedFractionGroupSequence → ReferencedBeamSequence); export it again")
    if beam not in beams:
        raise ValidationError(f"reference dose {name} is the planned dose of beam {beam}, which is not in this case "
                              f"(beams {', '.join(map(str, sorted(beams)))}); remove it or add that beam's delivery")
    return ReferenceDose(name, beam)


def _referenced_beam(plan_ref) -> int | None:
    for group in plan_ref.get("ReferencedFractionGroupSequence") or []:
        for beam in group.get("ReferencedBeamSequence") or []:
            number = beam.get("ReferencedBeamNumber")
            if number is not None:
                return int(number)
    return None
