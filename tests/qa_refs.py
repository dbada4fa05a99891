"""Planned doses (RD*.dcm) for test cases, made from the stand-in engine's own dose so the
expected gamma is known: identical, scaled, shifted along each axis, on a coarser grid with
an offset origin, stored with its rows flipped by its orientation, or of a beam the case
does not have. ``independent_pass_rate`` runs pymedphys on the two files directly (its own
reading, no project code) to check the pipeline's wiring against."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RTDoseStorage, generate_uid

from mqi_celery.demo_engine import GRID, dose_plane

DEPTH_MM = 20.0  # 3D references: the dose falls off along z as exp(-z²/2·DEPTH²) around the engine's plane z = 0


def plane_axes(spacing: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """The engine's plane axis (-199.5…199.5 mm at 1 mm), or another spacing over the same field."""
    n = int(round((GRID - 1) / spacing)) + 1
    return -(GRID - 1) / 2 + offset + spacing * np.arange(n)


def engine_dose_at(beam: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The engine's dose (Gy) at any points of its plane (linear interpolation)."""
    from scipy.interpolate import RegularGridInterpolator

    axis = plane_axes()
    points = np.stack(np.meshgrid(y, x, indexing="ij"), axis=-1)
    return RegularGridInterpolator((axis, axis), dose_plane(beam), bounds_error=False, fill_value=0.0)(points)


def write_reference(case_dir: Path, plan_path: Path, beam: int, *, scale: float = 1.0,
                    shift: tuple[float, float, float] = (0, 0, 0), spacing: float = 1.0, offset: float = 0.0,
                    flip_rows: bool = False, planes: int = 1, of_beam: int | None = None,
                    name: str | None = None) -> Path:
    """``beam``'s planned dose: the engine's, scaled by ``scale`` and moved by ``shift``
    (x, y, z mm: the reference's dose at p is the engine's at p - shift); ``planes`` > 1
    makes it 3D (``spacing`` apart along z, falling off with depth); ``of_beam``: the
    beam it says it is (default ``beam``)."""
    plan = pydicom.dcmread(plan_path, stop_before_pixels=True)
    x = plane_axes(spacing, offset)
    y = plane_axes(spacing, offset)
    z = (np.arange(planes) - (planes - 1) / 2) * spacing
    dx, dy, dz = shift
    plane = engine_dose_at(beam, y - dy, x - dx) * scale
    dose = np.stack([plane * np.exp(-((zk - dz) ** 2) / (2 * DEPTH_MM ** 2)) for zk in z]) if planes > 1 else plane[None]
    if flip_rows:
        dose = dose[:, ::-1, :]  # row 0 is the largest y: the orientation's column direction is -y
    scaling = float(f"{dose.max() / 60000:.6e}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.Manufacturer = "RTDOSE", "Test planning system"
    ds.PatientName, ds.PatientID = plan.get("PatientName", ""), plan.PatientID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = plan.StudyInstanceUID, generate_uid()
    ds.FrameOfReferenceUID = plan.get("FrameOfReferenceUID", generate_uid())
    ds.ImagePositionPatient = [float(x[0]), float(y[-1] if flip_rows else y[0]), float(z[0])]
    ds.ImageOrientationPatient = [1, 0, 0, 0, -1 if flip_rows else 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = str(spacing)
    ds.NumberOfFrames = planes
    ds.GridFrameOffsetVector = [float(v - z[0]) for v in z]
    ds.FrameIncrementPointer = pydicom.tag.Tag("GridFrameOffsetVector")
    ds.Rows, ds.Columns = y.size, x.size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "BEAM"
    ds.DoseGridScaling = f"{scaling:.6e}"
    beam_ref = Dataset()
    beam_ref.ReferencedBeamNumber = of_beam if of_beam is not None else beam
    group = Dataset()
    group.ReferencedFractionGroupNumber = 1
    group.ReferencedBeamSequence = [beam_ref]
    plan_ref = Dataset()
    plan_ref.ReferencedSOPClassUID, plan_ref.ReferencedSOPInstanceUID = plan.SOPClassUID, plan.SOPInstanceUID
    plan_ref.ReferencedFractionGroupSequence = [group]
    ds.ReferencedRTPlanSequence = [plan_ref]
    ds.PixelData = np.clip(np.rint(dose / scaling), 0, 65535).astype("<u2").tobytes()
    target = case_dir / (name or f"RD.beam{beam}.dcm")
    ds.save_as(target, enforce_file_format=True)
    return target


def read_independently(path: Path) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Axes (z, y, x) ascending and dose, read here with pydicom alone (axis-aligned files)."""
    ds = pydicom.dcmread(path)
    offsets = ds.get("GridFrameOffsetVector") or [0]
    offsets = [offsets] if isinstance(offsets, (int, float, str)) else list(offsets)
    frames = len(offsets)
    dose = ds.pixel_array.reshape(frames, ds.Rows, ds.Columns) * float(ds.DoseGridScaling)
    iop = [float(v) for v in ds.ImageOrientationPatient]
    ipp = [float(v) for v in ds.ImagePositionPatient]
    dr, dc = (float(v) for v in ds.PixelSpacing)
    x = ipp[0] + iop[0] * dc * np.arange(ds.Columns)
    y = ipp[1] + iop[4] * dr * np.arange(ds.Rows)
    z = ipp[2] + np.array([float(v) for v in offsets])
    if y[-1] < y[0]:
        y, dose = y[::-1], dose[:, ::-1, :]
    return (z, y, x), dose


def independent_pass_rate(reference: Path, evaluated: Path, dose_percent=3.0, distance_mm=2.0, cutoff=10.0) -> float:
    """pymedphys on the two files, the evaluated plane compared with the reference at its z."""
    import pymedphys
    from scipy.interpolate import RegularGridInterpolator

    (rz, ry, rx), rd = read_independently(reference)
    (ez, ey, ex), ed = read_independently(evaluated)
    if rz.size > 1:  # the reference at the evaluated plane
        points = np.stack(np.meshgrid(ez[:1], ry, rx, indexing="ij"), -1)
        rd = RegularGridInterpolator((rz, ry, rx), rd)(points)
    logging.disable(logging.INFO)  # pymedphys logs progress on the root logger, some of it unformattable
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = pymedphys.gamma((ry, rx), rd[0], (ey, ex), ed[0], dose_percent, distance_mm,
                                lower_percent_dose_cutoff=cutoff, max_gamma=2, quiet=True)
    finally:
        logging.disable(logging.NOTSET)
    judged = ~np.isnan(g)
    return 100.0 * float(np.mean(g[judged] <= 1))
