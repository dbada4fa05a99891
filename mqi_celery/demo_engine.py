"""A stand-in for the MOQUI dose engine, for tests and demos without a GPU.

It reads a MOQUI input file, finds the RT Ion plan, prints MOQUI-like progress
and writes one RTDOSE per beam named ``<BeamName>_<BeamNumber>_<Scorer>.dcm``
with a dose the tests can reason about (``dose_plane``): on MOQUI's 400 × 400 plane at
1 mm (z = 0), a Gaussian spot whose centre (80 mm from the axis, at 1.3 rad × the beam
number) and width (σ = 25 + 5 × (beam number mod 4) mm) follow the plan's beam number, and
whose height is 2 Gy × the delivered fraction of the beam's energy layers (the layers the
delivery log's PlanRange.txt lists over the plan's NumberOfControlPoints / 2): a delivery
cut short gives less dose. ``--fail`` simulates the ways the real engine fails, so the
code that drives it can be tested. ``--planned-dose CASE_FOLDER`` writes, into a case
folder, the planned dose of each of its plan's beams as this engine computes it for a
complete delivery (``RD.<beam>.dcm``): a case to see a QA verdict with (``make run``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RTDoseStorage, generate_uid

from mqi_celery.moqui_input import parse

GRID = 400  # MOQUI's TwoCentimeterMode dose plane is 400 x 400 at 1 mm


class FatalError(Exception):
    """Input or plan problem; reported as ``FATAL ERROR: ...``, exit 1."""


def _say(text: str) -> None:
    # Flush every line: the worker streams our stdout to watch progress.
    print(text, flush=True)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _at_least(low, convert):
    def check(text: str):
        if convert(text) < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return convert(text)
    return check


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqi-demo-engine", description=__doc__.splitlines()[0])
    parser.add_argument("input_file", metavar="INPUT_FILE", nargs="?", help="MOQUI input file")
    parser.add_argument("--planned-dose", type=Path, metavar="CASE_FOLDER",
                        help="write the plan's per-beam planned dose (RD.<beam>.dcm) into a case folder, and exit")
    parser.add_argument("--batches", type=_at_least(1, int), default=5,
                        help="progress batches per beam")
    parser.add_argument("--delay", type=_at_least(0, float), default=0.05,
                        help="seconds between batches")
    parser.add_argument("--fail", choices=["exit", "segfault", "no-output", "hang"],
                        help="simulate a failure")
    parser.add_argument("--fail-beams", type=_int_list, metavar="N[,N...]",
                        help="fail only these beam numbers (default: all)")
    parser.add_argument("--fail-if-exists", type=Path, metavar="PATH",
                        help="fail only while this file exists")
    return parser


def _resolve(path: str, base: Path, absolute: bool) -> Path:
    # MOQUI resolves relative paths against its folders unless UseAbsolutePath.
    return Path(path) if absolute or os.path.isabs(path) else base / path


def _load_plan(dicom_dir: Path) -> Dataset:
    plans = sorted(dicom_dir.glob("RP*.dcm"))
    if len(plans) != 1:
        raise FatalError(f"expected one RP*.dcm in {dicom_dir}, found {len(plans)}")
    try:
        plan = pydicom.dcmread(plans[0])
        plan.IonBeamSequence  # noqa: B018 - fail here, not halfway through a run
    except Exception as exc:  # pydicom raises many types for bad files
        raise FatalError(f"cannot read RT Ion plan {plans[0].name}: {type(exc).__name__}") from None
    return plan


def dose_plane(beam_number: int, delivered: float = 1.0) -> np.ndarray:
    """Dose in Gy on the 400x400 grid: a Gaussian blob placed by beam number, 2 Gy high for
    a complete delivery (``delivered``: the fraction of the plan's layers delivered)."""
    angle = beam_number * 1.3
    cx, cy = GRID / 2 + 80 * math.cos(angle), GRID / 2 + 80 * math.sin(angle)
    sigma = 25.0 + 5 * (beam_number % 4)
    y, x = np.mgrid[0:GRID, 0:GRID]
    return 2.0 * delivered * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def delivered_fraction(beam: Dataset, log_dir: Path | None) -> float:
    """The energy layers the delivery log lists (distinct LAYER_NO in PlanRange.txt) over the
    plan beam's layers (two control points each); 1.0 without a readable log."""
    import csv

    planned = int(beam.get("NumberOfControlPoints") or 0) // 2
    try:
        with open(log_dir / "PlanRange.txt", newline="", encoding="utf-8-sig") as f:
            layers = {row.get("LAYER_NO") for row in csv.DictReader(f)} - {None, ""}
    except (OSError, TypeError, UnicodeDecodeError, csv.Error):
        return 1.0
    return len(layers) / planned if planned and layers else 1.0


def _fraction_group_number(plan: Dataset, beam_number: int) -> int:
    for group in plan.get("FractionGroupSequence", []):
        for ref in group.get("ReferencedBeamSequence", []):
            if ref.get("ReferencedBeamNumber") == beam_number:
                return int(group.FractionGroupNumber)
    return 1


def build_rtdose(plan: Dataset, beam_number: int, delivered: float = 1.0) -> Dataset:
    """An RTDOSE dataset shaped like MOQUI's, referencing ``plan`` and the beam."""
    dose = dose_plane(beam_number, delivered)
    # DS holds at most 16 characters, so round the scaling before using it.
    scaling = float(f"{dose.max() / 65000:.6e}")
    pixels = np.clip(np.rint(dose / scaling), 0, 65535).astype("<u2")
    today = datetime.date.today().strftime("%Y%m%d")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTDoseStorage
    ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyDate = plan.get("StudyDate", today)
    ds.SeriesDate = ds.ContentDate = today
    ds.Modality = "RTDOSE"
    ds.Manufacturer = "Moqui Monte Carlo"
    ds.SeriesDescription = "Generated by Moqui Monte Carlo Simulation"
    ds.PatientName = plan.get("PatientName", "")
    ds.PatientID = plan.get("PatientID", "")
    ds.StudyInstanceUID = plan.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = plan.get("FrameOfReferenceUID", generate_uid())
    ds.SliceThickness = "1"
    ds.ImagePositionPatient = [-(GRID - 1) / 2, -(GRID - 1) / 2, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = GRID
    ds.PixelSpacing = [1, 1]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "BEAM"
    ds.DoseGridScaling = f"{scaling:.6e}"

    beam_ref = Dataset()
    beam_ref.ReferencedBeamNumber = beam_number
    group_ref = Dataset()
    group_ref.ReferencedFractionGroupNumber = _fraction_group_number(plan, beam_number)
    group_ref.ReferencedBeamSequence = [beam_ref]
    plan_ref = Dataset()
    plan_ref.ReferencedSOPClassUID = plan.SOPClassUID
    plan_ref.ReferencedSOPInstanceUID = plan.SOPInstanceUID
    plan_ref.ReferencedFractionGroupSequence = [group_ref]
    ds.ReferencedRTPlanSequence = [plan_ref]

    ds.PixelData = pixels.tobytes()
    return ds


def output_name(beam_name: str, beam_number: int, scorer: str) -> str:
    """MOQUI's file name: unsafe characters in the beam name become ``_``."""
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", beam_name)
    return f"{safe}_{beam_number}_{scorer}.dcm"


def _simulate(batches: int, delay: float, fail: str | None) -> int | None:
    """Print batch progress; return an exit code if the simulated run fails."""
    for batch in range(1, batches + 1):
        _say(f"Generating particles for ({batch} of {batches} batches)")
        # The real engine dies mid-simulation, so fail after the first batch.
        if fail == "exit":
            _say("ERROR: simulated failure")
            return 3
        if fail == "segfault":
            _say("Segmentation fault (core dumped)")
            return 139
        while fail == "hang":
            time.sleep(3600)
        if batch < batches:
            time.sleep(delay)
    return None


def _write(ds: Dataset, target: Path) -> None:
    # Write then rename, so a killed run never leaves a truncated RTDOSE behind.
    partial = target.with_name(f".{target.name}.partial")
    try:
        ds.save_as(partial, enforce_file_format=True)
        os.replace(partial, target)
    except OSError as exc:
        raise FatalError(f"cannot write {target}: {exc.strerror}") from None


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    input_path = Path(args.input_file)
    try:
        config = parse(input_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FatalError(f"cannot read input file {input_path}: {exc}") from None
    required = ("DicomDir", "BeamNumbers", "OutputDir", "OutputFormat")
    missing = [key for key in required if key not in config]
    if missing:
        raise FatalError(f"missing keys in {input_path}: {', '.join(missing)}")
    if config["OutputFormat"] != "dcm":
        _say(f"ERROR: OutputFormat {config['OutputFormat']} not supported")
        return 2
    try:
        beam_numbers = _int_list(config["BeamNumbers"])
    except ValueError:
        beam_numbers = []
    if not beam_numbers:
        raise FatalError(f"bad BeamNumbers {config['BeamNumbers']!r}")

    absolute = config.get("UseAbsolutePath", "false").lower() == "true"
    parent = _resolve(config.get("ParentDir", "."), input_path.parent, absolute)
    plan = _load_plan(_resolve(config["DicomDir"], parent, absolute))
    output_dir = _resolve(config["OutputDir"], input_path.parent, absolute)
    log_dir = _resolve(config["logFilePath"], parent, absolute) if config.get("logFilePath") else None
    scorer, gpu = config.get("Scorer", "Dose"), config.get("GPUID", "0")

    beams = {int(b.BeamNumber): b for b in plan.IonBeamSequence}
    for number in beam_numbers:  # check all first: no partial output for a bad request
        if number not in beams:
            _say(f"ERROR: beam {number} not found in plan")
            return 1
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FatalError(f"cannot create OutputDir {output_dir}: {exc.strerror}") from None

    for number in beam_numbers:
        beam_name = str(beams[number].get("BeamName", f"Beam{number}"))
        _say(f'MOQUI demo engine: beam {number} "{beam_name}" on GPU {gpu}')
        fail = args.fail
        if (args.fail_beams is not None and number not in args.fail_beams) or (
                args.fail_if_exists is not None and not args.fail_if_exists.exists()):
            fail = None
        code = _simulate(args.batches, args.delay, fail)
        if code is not None:
            return code
        if fail != "no-output":
            delivered = delivered_fraction(beams[number], log_dir)
            _write(build_rtdose(plan, number, delivered), output_dir / output_name(beam_name, number, scorer))

    _say(f"Total execution time: {round((time.monotonic() - started) * 1000)} ms")
    return 0


def _planned_dose(case_dir: Path) -> int:
    """The plan's per-beam planned doses, as this engine computes a complete delivery."""
    plan = _load_plan(case_dir)
    for beam in plan.IonBeamSequence:
        if beam.get("TreatmentDeliveryType", "TREATMENT") == "TREATMENT":
            ds = build_rtdose(plan, int(beam.BeamNumber))
            ds.Manufacturer, ds.SeriesDescription = "mqi-demo-engine", "Planned dose (demo: the engine's own)"
            _write(ds, case_dir / f"RD.{int(beam.BeamNumber)}.dcm")
            _say(f"wrote {case_dir / f'RD.{int(beam.BeamNumber)}.dcm'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``mqi-demo-engine``; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.planned_dose is None and args.input_file is None:
        parser.error("INPUT_FILE is required (or --planned-dose CASE_FOLDER)")
    try:
        return _planned_dose(args.planned_dose) if args.planned_dose else _run(args)
    except FatalError as exc:
        print(f"FATAL ERROR: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
