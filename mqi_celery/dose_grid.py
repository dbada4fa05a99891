"""An RTDOSE file read into patient coordinates, from its own header and nothing else.

Every dose is placed by its attributes (``ImagePositionPatient``, ``ImageOrientationPatient``,
``PixelSpacing``, ``GridFrameOffsetVector``, ``DoseGridScaling``) and returned as a grid in
patient order (z, y, x) with ascending axes in mm. What a file leaves out or gets wrong is
not guessed silently: each assumption is a note (it goes into the QA report), and stored
values that are not a dose (clipped at the integer maximum) are marked as unjudgeable.

What MOQUI writes (``tests/fixtures/moqui/1S070_2_Dose.dcm``) and how it is read:
- ``DoseGridScaling`` 0: no dose scaling. The values are relative (as stored); they are
  compared with another relative dose as they are, and with an absolute one after both are
  normalised to their own maximum (a uniform scale error then cannot be seen: the note says so).
- The header declares one frame (no ``NumberOfFrames``) but the pixel data holds several:
  every frame in the data is read; with no ``GridFrameOffsetVector`` frame k is assumed at
  ``ImagePositionPatient`` + k × ``SliceThickness`` along the slice normal.
- Values at the 16-bit maximum (65535) are clipped: the true dose there is unknown.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MQIError

AXES = "zyx"  # patient axes in array order


class DoseFileError(MQIError):
    """A dose file that cannot be read or placed in space (the message names it)."""


@dataclass
class DoseGrid:
    dose: np.ndarray  # (z, y, x), float64: Gy when ``absolute``, else as stored
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    absolute: bool
    unjudgeable: np.ndarray  # (z, y, x) bool: stored values that are not a dose (clipped)
    notes: list[str] = field(default_factory=list)
    name: str = ""

    @property
    def planar(self) -> bool:
        return self.dose.shape[0] == 1

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.z, self.y, self.x

    def valid_max(self) -> float:
        values = self.dose[~self.unjudgeable]
        return float(values.max()) if values.size else 0.0

    def describe(self) -> str:
        shape = "x".join(str(n) for n in self.dose.shape[::-1])
        spacing = "/".join(f"{_step(a):g}" for a in (self.x, self.y) if a.size > 1)
        where = f"plane z = {self.z[0]:g} mm" if self.planar else f"{self.z.size} planes z {self.z[0]:g}…{self.z[-1]:g} mm"
        return f"{self.name}: {shape} at {spacing} mm, {where}"


def _step(axis: np.ndarray) -> float:
    return float(np.round(np.diff(axis).mean(), 4)) if axis.size > 1 else 0.0


def read_dose(path: Path, dataset=None) -> DoseGrid:
    """Read an RTDOSE file (``dataset``: already parsed) into patient coordinates."""
    import pydicom

    name = Path(path).name
    try:
        ds = dataset if dataset is not None else pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure: not a dose file we can read
        raise DoseFileError(f"{name} is not readable DICOM ({type(exc).__name__})") from None
    if ds.get("Modality") != "RTDOSE":
        raise DoseFileError(f"{name} is {ds.get('Modality') or 'not a DICOM object with a modality'}, not RTDOSE")
    for keyword in ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient",
                    "PixelData"):
        if keyword not in ds:
            raise DoseFileError(f"{name} has no {keyword}: its dose cannot be placed in space")
    notes: list[str] = []
    stored, clipped = _frames(ds, name, notes)
    dose, absolute = _scaled(ds, stored, notes)
    grid_axes, order, flips = _placement(ds, name, stored.shape[0], notes)
    dose = np.flip(np.transpose(dose, order), flips) if flips else np.transpose(dose, order)
    clipped = np.flip(np.transpose(clipped, order), flips) if flips else np.transpose(clipped, order)
    z, y, x = (np.sort(a) for a in grid_axes)
    return DoseGrid(np.ascontiguousarray(dose), z, y, x, absolute, np.ascontiguousarray(clipped), notes, name)


def _frames(ds, name: str, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The stored values as (frame, row, column), every frame the pixel data holds, and
    where they sit at the integer maximum."""
    rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.get("BitsAllocated", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    declared = int(ds.get("NumberOfFrames") or 1)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        values = ds.pixel_array.reshape(-1, rows, columns)
    else:
        if bits not in (8, 16, 32):
            raise DoseFileError(f"{name}: BitsAllocated {bits} is not a dose encoding this reads (8, 16 or 32)")
        little = syntax is None or syntax.is_little_endian
        dtype = np.dtype(f"{'<' if little else '>'}{'i' if signed else 'u'}{bits // 8}")
        raw = np.frombuffer(ds.PixelData, dtype=dtype)
        per_frame = rows * columns
        if raw.size < per_frame or raw.size % per_frame:
            raise DoseFileError(f"{name}: its pixel data ({raw.size} values) is not a whole number of "
                                f"{rows}×{columns} frames")
        values = raw.reshape(-1, rows, columns)
    if values.shape[0] != declared:
        notes.append(f"{name}: the header declares {declared} frame(s) but the pixel data holds "
                     f"{values.shape[0]}; all {values.shape[0]} were read")
    top = (1 << int(ds.get("BitsStored", bits))) - 1 if not signed else None
    clipped = values == top if top is not None else np.zeros(values.shape, bool)
    if clipped.any():
        frames = [str(k + 1) for k in range(values.shape[0]) if clipped[k].any()]
        notes.append(f"{name}: {int(clipped.sum())} point(s) of frame {', '.join(frames)} sit at {top}, the "
                     f"{int(ds.get('BitsStored', bits))}-bit maximum: the dose there was clipped, its true value is "
                     "unknown, and those points (and what lies within the distance criterion of them) are not judged")
    return values, clipped


def _scaled(ds, stored: np.ndarray, notes: list[str]) -> tuple[np.ndarray, bool]:
    scaling = ds.get("DoseGridScaling")
    units = str(ds.get("DoseUnits", "")).upper()
    value = float(scaling) if scaling not in (None, "") else 0.0
    if value <= 0:
        notes.append(f"{ds.get('Manufacturer') or 'the engine'} wrote no dose scaling (DoseGridScaling "
                     f"{'missing' if scaling in (None, '') else scaling}): relative dose, values as stored")
        return stored.astype(np.float64), False
    dose = stored.astype(np.float64) * value
    if units == "RELATIVE":
        notes.append("DoseUnits RELATIVE: a relative dose")
        return dose, False
    return dose, True


def _unit_axis(vector, name: str, what: str) -> tuple[int, int]:
    """The patient axis (0 x, 1 y, 2 z) a direction cosine runs along, and its sign."""
    v = np.asarray(vector, dtype=float)
    k = int(np.argmax(np.abs(v)))
    if abs(abs(v[k]) - 1) > 1e-3 or np.abs(np.delete(v, k)).max() > 1e-3:
        raise DoseFileError(f"{name}: its {what} ({', '.join(f'{c:g}' for c in v)}) is oblique; only dose grids "
                            "along the patient axes are compared")
    return k, int(np.sign(v[k]))


def _placement(ds, name: str, frames: int, notes: list[str]):
    """The patient coordinate of each array index along each patient axis (z, y, x), the
    transposition that puts the array in that order, and the axes to flip so that each
    coordinate ascends."""
    iop = [float(c) for c in ds.ImageOrientationPatient]
    ipp = np.array([float(c) for c in ds.ImagePositionPatient])
    row_spacing, column_spacing = (float(c) for c in ds.PixelSpacing)  # between rows, between columns
    along_row = _unit_axis(iop[:3], name, "row direction")  # column index grows along it
    along_column = _unit_axis(iop[3:], name, "column direction")  # row index grows along it
    normal_vector = np.cross(iop[:3], iop[3:])
    along_normal = _unit_axis(normal_vector, name, "slice normal")
    if len({along_row[0], along_column[0], along_normal[0]}) != 3:
        raise DoseFileError(f"{name}: ImageOrientationPatient {iop} does not span three axes")
    offsets = _frame_offsets(ds, name, frames, notes)
    # array axes: 0 frame, 1 row, 2 column
    coords = {along_normal[0]: ipp[along_normal[0]] + along_normal[1] * offsets,
              along_column[0]: ipp[along_column[0]] + along_column[1] * row_spacing * np.arange(int(ds.Rows)),
              along_row[0]: ipp[along_row[0]] + along_row[1] * column_spacing * np.arange(int(ds.Columns))}
    array_axis = {along_normal[0]: 0, along_column[0]: 1, along_row[0]: 2}
    order = tuple(array_axis[p] for p in (2, 1, 0))  # patient z, y, x
    grid_axes = [coords[p] for p in (2, 1, 0)]
    flips = tuple(i for i, a in enumerate(grid_axes) if a.size > 1 and a[-1] < a[0])
    if iop != [1, 0, 0, 0, 1, 0]:
        turned = [AXES[i] for i in flips]
        notes.append(f"{name}: ImageOrientationPatient {', '.join(f'{c:g}' for c in iop)}: placed by it"
                     + (f" (its {', '.join(turned)} axis runs backwards in the file)" if turned else ""))
    return grid_axes, order, flips


def _frame_offsets(ds, name: str, frames: int, notes: list[str]) -> np.ndarray:
    given = ds.get("GridFrameOffsetVector")
    if given is not None:
        given = [given] if isinstance(given, (int, float, str)) else list(given)  # one value reads as a scalar
        if len(given) == frames:
            return np.array([float(v) for v in given])
    if frames == 1:
        return np.zeros(1)
    thickness = float(ds.get("SliceThickness") or 0)
    if thickness <= 0:
        raise DoseFileError(f"{name}: {frames} frames but no GridFrameOffsetVector and no SliceThickness: where the "
                            "frames lie is unknown")
    notes.append(f"{name}: no GridFrameOffsetVector for its {frames} frames: frame k assumed at "
                 f"ImagePositionPatient + k × SliceThickness ({thickness:g} mm) along the slice normal")
    return thickness * np.arange(frames)
