"""MOQUI specifics: the per-beam input file, the command line, and reading a run's outcome.

Everything else in the pipeline is engine-agnostic; swapping the stand-in engine for the
real one is the ``engine.command`` setting.
"""
from __future__ import annotations

import re
import shlex
import zlib
from pathlib import PurePosixPath

from . import moqui_input
from .config import Engine

FAILURE_MARKERS = ("Segmentation fault", "FATAL ERROR", "ERROR:")
SUCCESS_MARKER = "Total execution time"
OUTPUT_SUFFIX = {"dcm": ".dcm", "raw": ".raw", "mhd": ".mhd", "mha": ".mha", "npz": ".npz"}


MAX_GANTRY_DIGITS = 2  # a facility has a few gantry rooms: "G12345678901234567890" names none


def gantry_number(machine_name: str, configured: int | None) -> int:
    """GantryNum from config, else from the beam's machine name ("G2" -> 2, "G2_ROOM" -> 2);
    ValueError when the name does not tell."""
    if configured is not None:
        return configured
    name = machine_name or ""
    trailing = re.search(r"(\d+)$", name, re.ASCII)
    numbers = re.findall(r"\d+", name, re.ASCII)
    found = trailing.group(1) if trailing else numbers[0] if len(numbers) == 1 else None
    if found is not None and len(found) <= MAX_GANTRY_DIGITS:
        return int(found)
    raise ValueError(f"the treatment machine name {name!r} does not say which gantry room it is; set "
                     "engine.gantry_num in the configuration")


def render_input(engine: Engine, *, case_id: str, beam: int, input_dir: PurePosixPath, delivery_dir: str,
                 output_dir: PurePosixPath, gantry: int, gpu_id: int = 0) -> str:
    """The ``moqui_tps.in`` for one beam, keys as in a real MOQUI input file."""
    ph = engine.phantom
    values: dict[str, object] = {
        "GPUID": gpu_id,
        # Reproducible: the same case and beam always get the same seed.
        "RandomSeed": -(zlib.crc32(f"{case_id}/{beam}".encode()) & 0x7FFFFFFF),
        "UseAbsolutePath": True,
        "TotalThreads": -1,
        "MaxHistoriesPerBatch": 1000000,
        "Verbosity": 0,
        "ParentDir": input_dir,
        "DicomDir": input_dir,
        "logFilePath": input_dir / delivery_dir,
        "GantryNum": gantry,
        "UsingPhantomGeo": ph.using_phantom_geo,
        "TwoCentimeterMode": ph.two_centimeter_mode,
    }
    for axis, i in (("X", 0), ("Y", 1), ("Z", 2)):
        values[f"PhantomDim{axis}"] = ph.dim[i]
    for axis, i in (("X", 0), ("Y", 1), ("Z", 2)):
        values[f"PhantomUnit{axis}"] = ph.unit[i]
    for axis, i in (("X", 0), ("Y", 1), ("Z", 2)):
        values[f"PhantomPosition{axis}"] = ph.position[i]
    values.update({
        "Scorer": engine.scorer, "SupressStd": True, "ReadStructure": True, "ROIName": "External",
        "SourceType": "FluenceMap", "SimulationType": "perBeam", "BeamNumbers": beam,
        "ParticlesPerHistory": 0.001, "ScoreToCTGrid": True,
        "OutputDir": output_dir, "OutputFormat": engine.output_format, "OverwriteResults": True,
    })
    return moqui_input.render(values)


def command_line(engine: Engine, *, input_file: PurePosixPath, job_dir: PurePosixPath) -> str:
    """The configured command with placeholders filled in, every word quoted for the shell."""
    words = shlex.split(engine.command)
    return shlex.join(w.format(input_file=input_file, job_dir=job_dir) for w in words)


def outcome(exit_code: int | None, log_tail: str, outputs: list[str], output_format: str,
            no_exit_code_reason: str = "engine stopped without an exit code (killed or lost)") -> str | None:
    """None when the run succeeded, else the reason in words. ``no_exit_code_reason`` is the
    scheduler's word for a run that ended without an exit code (e.g. Slurm TIMEOUT)."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    marker = next((line for line in lines if any(m in line for m in FAILURE_MARKERS)), None)
    if exit_code not in (0, None) and marker is None and lines:
        marker = lines[-1]  # e.g. "sh: 1: moqui: not found"
    if exit_code is None:
        return no_exit_code_reason + (f": {marker}" if marker else "")
    if exit_code != 0:
        return f"engine exited with code {exit_code}" + (f": {marker}" if marker else "")
    if marker:
        return f"engine reported an error: {marker}"
    suffix = OUTPUT_SUFFIX[output_format]
    if not any(name.endswith(suffix) for name in outputs):
        return f"engine exited 0 but wrote no {suffix} output"
    if SUCCESS_MARKER not in log_tail:
        return f"engine log has no '{SUCCESS_MARKER}' line: the run did not finish"
    return None
