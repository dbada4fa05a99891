"""A beam's delivery log, as the treatment-control system writes it: ``PlanInfo.txt``
(``KEY,VALUE`` lines), ``PlanRange.txt`` (one row per energy layer) and the per-layer
``*.ptn`` / ``*.mgn`` files beside them. Checked before anything leaves the machine, every
problem in words a physicist can act on. Files are read through ``hosts.open_case_file``
(no link followed); what a folder holds comes from ``case_reader.inventory``.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from .errors import ValidationError
from .hosts import open_case_file
from .naming import shown

PTN_ROW_BYTES = 16  # 8 big-endian uint16 per 15 us sample
MIN_ENERGY_MEV, MAX_ENERGY_MEV = 1.0, 400.0  # what a proton therapy layer can be, generously
MAX_LAYERS = 1000  # energy layers of one beam (real ones: 30 to 60)
LAYER_FILE_COLUMNS = ("SCAN_OUT_FL_NM", "PLAN_SCAN_OUT_FL_NM")
# What each column names: the spot positions (.ptn) and the monitor counts (.mgn) of a layer,
# named "<...>_<field, 3 digits>_<layer, 3 digits>.<kind>" by the delivery system.
LAYER_FILE_KINDS = {"SCAN_OUT_FL_NM": ".ptn", "PLAN_SCAN_OUT_FL_NM": ".mgn"}
LAYER_FILE_NAME = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*_([0-9]{1,9})_([0-9]{1,9})\.(ptn|mgn)", re.ASCII)
# Identity columns of PlanRange.txt, each compared with what PlanInfo.txt says.
RANGE_IDENTITY = {"PATIENT_ID": "DICOM_PATIENT_ID", "FLD_NO": "TCSC_FIELD_NUMBER", "RESULT_ID": "TCSC_IRRAD_DATETIME"}


def looks_like_delivery_folder(names: set[str]) -> bool:
    """A folder's entry names look like a beam's delivery log (even an incomplete one)."""
    return bool({"PlanInfo.txt", "PlanRange.txt"} & names) or any(n.endswith((".ptn", ".mgn")) for n in names)

def read_plan_info_text(text: str) -> dict[str, str]:
    """``KEY,VALUE`` lines (Windows line ends allowed); the value may itself hold commas."""
    info = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(",")
        if sep:
            info[key.strip()] = value.strip()
    return info

def int_field(value: str, where: str, what: str) -> int:
    if not re.fullmatch(r"\+?[0-9]{1,9}", value.strip(), re.ASCII):
        raise ValidationError(f"{where}: {what} {value!r} is not a whole number; copy the file the delivery "
                              "system wrote")
    return int(value)

def read_text(case_dir: Path, rel: str) -> str:
    """A delivery-log text file as the delivery system writes it: ASCII or UTF-8 (a byte
    order mark allowed), any line ends."""
    with open_case_file(case_dir, rel) as f:
        data = f.read()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\0" in data:
        raise ValidationError(f"{rel} is not plain text (UTF-16 or binary); copy the file the delivery system "
                              "wrote, or save it as UTF-8")
    return data.decode("utf-8-sig", errors="replace").replace("\r\n", "\n").replace("\r", "\n")

PLAN_INFO_KEYS = ("DICOM_BEAM_NUMBER", "DICOM_PATIENT_ID", "DICOM_STUDY_INS_UID", "START_LAYER_NUMBER",
                  "STOP_LAYER_NUMBER")
# Every identity the cross-checks compare must be there: a missing one would let a log of
# another patient or study through unchecked.
REQUIRED_KEYS = ("DICOM_BEAM_NUMBER", "DICOM_PATIENT_ID", "DICOM_STUDY_INS_UID", "START_LAYER_NUMBER",
                 "STOP_LAYER_NUMBER")

def plan_info(case_dir: Path, folder: str) -> dict[str, str]:
    """PlanInfo.txt's keys; each key the pipeline relies on must be there exactly once."""
    where = f"{folder}/PlanInfo.txt"
    lines = [line.partition(",") for line in read_text(case_dir, where).splitlines()]
    keys = [key.strip() for key, sep, _ in lines if sep]
    for key in PLAN_INFO_KEYS:
        if keys.count(key) > 1:
            raise ValidationError(f"{where} names {key} {keys.count(key)} times; copy the file the delivery "
                                  "system wrote")
    info = read_plan_info_text("\n".join("".join(parts) for parts in lines))
    for key in REQUIRED_KEYS:
        if not info.get(key):
            raise ValidationError(f"{where} has no {key} line{'' if key not in info else ' value'}; copy the file "
                                  "the delivery system wrote")
    return info

def check_layers(case_dir: Path, folder: str, inv, info: dict[str, str]) -> tuple[int, list[str]]:
    """Every layer row in PlanRange.txt names a present, plausible .ptn and .mgn file beside
    it (``inv``: the case's ``case_reader.Inventory``); returns the number of layers and the
    layer files in the folder that no row names (not uploaded: the engine never reads them)."""
    where = f"{folder}/PlanRange.txt"
    if where not in inv.files:
        raise ValidationError(f"delivery folder {folder} has no PlanRange.txt; copy the complete delivery log")
    try:
        reader = csv.DictReader(io.StringIO(read_text(case_dir, where)))
        header = reader.fieldnames or []
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error:
        raise ValidationError(f"{where} is not a readable comma-separated table; copy the file the delivery "
                              "system wrote") from None
    needed = [c for c in ("LAYER_NO", "PATIENT_ID", *LAYER_FILE_COLUMNS) if c not in header]
    if needed:
        raise ValidationError(f"{where} has no header naming {', '.join(needed)}; copy the file the delivery "
                              "system wrote")
    if not rows:
        raise ValidationError(f"{where} lists no layers; copy the complete delivery log")
    if len(rows) > MAX_LAYERS:
        raise ValidationError(f"{where} lists {len(rows):,} layers, more than any beam has (at most {MAX_LAYERS}); "
                              "copy the file the delivery system wrote")
    first, last = _layer_range(folder, info)
    if last - first + 1 != len(rows):
        raise ValidationError(f"{where} lists {len(rows)} layers, but PlanInfo.txt says layers {first} to {last} "
                              "were delivered; copy the complete delivery log")
    layers: dict[int, int] = {}
    files: dict[str, int] = {}
    for line, row in rows:
        layer = int_field(row.get("LAYER_NO") or "", f"{where} line {line}", "LAYER_NO")
        if layer in layers:
            raise ValidationError(f"{where} line {line}: layer {layer} is listed twice (also line {layers[layer]}); "
                                  "copy the file the delivery system wrote")
        if not first <= layer <= last:
            raise ValidationError(f"{where} line {line}: layer {layer} is outside the layers PlanInfo.txt says "
                                  f"were delivered ({first} to {last}); copy the delivery log of this beam")
        layers[layer] = line
        if "LAYER_ENERGY" in header:
            _check_energy(f"{where} line {line}", (row.get("LAYER_ENERGY") or "").strip())
        _check_row_identity(where, line, row, header, info)
        for column in LAYER_FILE_COLUMNS:
            name = (row.get(column) or "").strip()
            _check_layer_file(folder, where, line, column, name, inv)
            if name in files:
                raise ValidationError(f"{where} names {name} for two layers (lines {files[name]} and {line}); "
                                      "copy the file the delivery system wrote")
            files[name] = line
            _check_layer_file_name(where, line, column, name, layer, row)
    return len(rows), unnamed_layer_files(folder, inv, set(files))

def _check_row_identity(where: str, line: int, row: dict, header, info: dict[str, str]) -> None:
    """The row is of this beam's delivery: its patient (compared, never shown), field and
    irradiation agree with PlanInfo.txt wherever both say them."""
    for column, key in RANGE_IDENTITY.items():
        if column not in header:
            continue
        value, expected = (row.get(column) or "").strip(), info.get(key)
        if column == "PATIENT_ID" and not value:
            raise ValidationError(f"{where} line {line} has no PATIENT_ID; copy the file the delivery system wrote")
        if expected is None or not value:
            continue
        # Patient ids are strings ("0055061194" is not "55061194"); field numbers and times are numbers.
        numeric = column != "PATIENT_ID" and _number(value) is not None
        same = _number(value) == _number(expected) if numeric else value == expected
        if not same:
            what = ("is of another patient than PlanInfo.txt (its PATIENT_ID is not PlanInfo.txt's "
                    "DICOM_PATIENT_ID)" if column == "PATIENT_ID" else
                    f"says {column} {shown(value)}, but PlanInfo.txt says {key} {shown(expected)}")
            raise ValidationError(f"{where} line {line} {what}; the two files must be of the same delivery: copy "
                                  "the complete delivery log of this beam")


def _check_layer_file_name(where: str, line: int, column: str, name: str, layer: int, row: dict) -> None:
    """A .ptn under SCAN_OUT_FL_NM, a .mgn under PLAN_SCAN_OUT_FL_NM, each named for the
    row's field and layer: a swapped or foreign name would feed the engine the wrong layer."""
    kind = LAYER_FILE_KINDS[column]
    if not name.endswith(kind):
        raise ValidationError(f"{where} line {line}: {column} names {shown(name)}, not a {kind} file (the "
                              f"{column} column holds the layer's {kind} file); copy the file the delivery system "
                              "wrote")
    match = LAYER_FILE_NAME.fullmatch(name)
    if match is None:
        raise ValidationError(f"{where} line {line}: {column} {shown(name)} is not named like a layer file "
                              f"(<...>_<field>_<layer>{kind}); copy the file the delivery system wrote")
    field = _number((row.get("FLD_NO") or "").strip())
    if int(match.group(2)) != layer or (field is not None and int(match.group(1)) != field):
        raise ValidationError(f"{where} line {line}: {column} {shown(name)} is the file of another layer or field "
                              f"than the row's (layer {layer}{'' if field is None else f', field {field}'}); "
                              "copy the file the delivery system wrote")


def _number(text: str) -> int | None:
    """ASCII digits as a number (leading zeros allowed: "004" is field 4); None otherwise."""
    return int(text) if re.fullmatch(r"[0-9]{1,18}", text, re.ASCII) else None


def unnamed_layer_files(folder: str, inv, named: set[str]) -> list[str]:
    """Layer files (.ptn, .mgn) in the folder that no PlanRange.txt row names."""
    return sorted(f for f in inv.files if f.startswith(f"{folder}/") and "/" not in f[len(folder) + 1:]
                  and f.endswith((".ptn", ".mgn")) and f[len(folder) + 1:] not in named)


def _check_energy(where: str, energy: str) -> None:
    if not re.fullmatch(r"[0-9]+(\.[0-9]*)?", energy, re.ASCII):
        raise ValidationError(f"{where}: LAYER_ENERGY {energy!r} is not a number; copy the file the delivery "
                              "system wrote")
    if not MIN_ENERGY_MEV <= float(energy) <= MAX_ENERGY_MEV:
        raise ValidationError(f"{where}: LAYER_ENERGY {energy} MeV is not a proton therapy energy "
                              f"({MIN_ENERGY_MEV:g} to {MAX_ENERGY_MEV:g} MeV); copy the file the delivery system wrote")

def _check_layer_file(folder: str, where: str, line: int, column: str, name: str, inv) -> None:
    if not name:
        raise ValidationError(f"{where} line {line} has no {column}; copy the file the delivery system wrote")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValidationError(f"{where} line {line}: {column} {shown(name)!r} is not a plain file name; the log "
                              "may only name files in its own folder")
    size = inv.files.get(f"{folder}/{name}")
    if f"{folder}/{name}" in inv.folders:
        raise ValidationError(f"delivery folder {folder}: layer file {shown(name)} (named in {where} line {line}) "
                              "is a folder, not a file; copy the complete delivery log")
    if name.startswith("."):
        raise ValidationError(f"{where} line {line} names the hidden file {shown(name)} (hidden files are not part "
                              "of a case); copy the file the delivery system wrote")
    if size is None:
        raise ValidationError(f"delivery folder {folder}: layer file {shown(name)} (named in {where} line {line}) "
                              "is missing; copy the complete delivery log")
    if size == 0:
        raise ValidationError(f"delivery folder {folder}: layer file {name} is empty; copy the complete "
                              "delivery log")
    if name.endswith(".ptn") and size % PTN_ROW_BYTES:
        raise ValidationError(f"delivery folder {folder}: {name} is truncated (size not a multiple of "
                              f"{PTN_ROW_BYTES} bytes); copy the complete delivery log")

def _layer_range(folder: str, info: dict[str, str]) -> tuple[int, int]:
    """The delivered layers PlanInfo.txt states: PlanRange.txt must list exactly these (a
    shorter table is a log that was cut off)."""
    where = f"{folder}/PlanInfo.txt"
    first = int_field(info["START_LAYER_NUMBER"], where, "START_LAYER_NUMBER")
    last = int_field(info["STOP_LAYER_NUMBER"], where, "STOP_LAYER_NUMBER")
    if last < first:
        raise ValidationError(f"{where}: STOP_LAYER_NUMBER {last} is before START_LAYER_NUMBER {first}; copy the "
                              "file the delivery system wrote")
    return first, last

def beam_number(folder: str, info: dict[str, str]) -> int:
    raw = info.get("DICOM_BEAM_NUMBER")
    if raw is None:
        raise ValidationError(f"{folder}/PlanInfo.txt has no DICOM_BEAM_NUMBER line; copy the file the delivery "
                              "system wrote")
    if not re.fullmatch(r"\+?[0-9]{1,9}", raw, re.ASCII):
        raise ValidationError(f"{folder}/PlanInfo.txt: DICOM_BEAM_NUMBER {raw!r} is not a beam number; copy the "
                              "file the delivery system wrote")
    return int(raw)
