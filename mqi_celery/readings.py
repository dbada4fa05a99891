"""What the System Curator reads from a host: its GPUs (``nvidia-smi``), free disk under
the remote root (``df -P``) and, on Slurm hosts, the state of the partition's nodes
(``sinfo``), all in one shell command per host. Parsing is tolerant: output it cannot
trust gives an "unknown" part with the reason, never an exception, and never a guess
(a GPU row it cannot read could be the busy one).

A reading is plain JSON (it is stored per host in the database and published as is).
"""
from __future__ import annotations

import re
import shlex
from typing import Any

from .hosts import Host

# Queried fields, in this order (``--format=csv,noheader,nounits``).
GPU_FIELDS = ("index", "uuid", "name", "utilization.gpu", "memory.used", "memory.total", "memory.free",
              "temperature.gpu", "power.draw")
APP_FIELDS = ("gpu_uuid", "pid", "process_name", "used_memory")
# What each field becomes in a reading, and its type.
_GPU_KEYS = {"index": ("index", int), "uuid": ("uuid", str), "name": ("name", str),
             "utilization.gpu": ("utilization_percent", float), "memory.used": ("memory_used_mib", int),
             "memory.total": ("memory_total_mib", int), "memory.free": ("memory_free_mib", int),
             "temperature.gpu": ("temperature_c", float), "power.draw": ("power_w", float)}
_APP_KEYS = {"gpu_uuid": ("gpu_uuid", str), "pid": ("pid", int), "process_name": ("name", str),
             "used_memory": ("used_memory_mib", int), "used_gpu_memory": ("used_memory_mib", int)}
# nvidia-smi's words for a value it has not got.
_NO_VALUE = {"", "n/a", "[n/a]", "[not supported]", "[unknown error]", "[insufficient permissions]", "[gpu lost]"}
# Slurm node states (sinfo %T) in which a node takes new jobs.
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing", "planned"}

NOT_INSTALLED = 127  # the shell's exit code for a command that is not there
_MARK = "##mqi "


def command(root: str, *, gpus: bool = True, disk: bool = True, slurm: bool = False) -> str:
    """One shell script printing each part after a marker line, and its exit code."""
    parts = []
    if gpus:
        parts += [("gpus", f"nvidia-smi --query-gpu={','.join(GPU_FIELDS)} --format=csv,noheader,nounits"),
                  ("apps", f"nvidia-smi --query-compute-apps={','.join(APP_FIELDS)} --format=csv,noheader,nounits")]
    if disk:
        parts.append(("disk", f"mkdir -p {shlex.quote(root)} && df -P -k {shlex.quote(root)}"))
    if slurm:
        parts.append(("nodes", "sinfo -h -N -o '%N|%P|%a|%T|%E'"))
    lines = ["export LC_ALL=C"]
    for name, cmd in parts:
        lines.append(f"echo '{_MARK}{name}'; ( {cmd} ) 2>&1; echo \"{_MARK}exit $?\"")
    return "\n".join(lines)


def take(host: Host, *, slurm: bool, partition: str | None, gpus: bool = True, timeout: float = 30) -> dict:
    """Read the host now. A host that does not answer gives a reading that says so."""
    try:
        result = host.run(command(str(host.root), gpus=gpus, slurm=slurm), timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - dropped connection, timeout, breaker open: "unknown", with why
        reason = f"could not read the host: {exc}"
        return {"host": host.name, "gpus": _unknown(reason) if gpus else None, "disk": _unknown(reason),
                "nodes": _unknown(reason) if slurm else None}
    return parse(result.stdout, host=host.name, slurm=slurm, partition=partition, gpus=gpus,
                 returncode=result.returncode, stderr=result.stderr)


def parse(text: str, *, host: str, slurm: bool, partition: str | None, gpus: bool = True,
          returncode: int = 0, stderr: str = "") -> dict:
    sections = split_sections(text)
    reading: dict[str, Any] = {"host": host}
    missing = f"the reading command ended early (exit {returncode}): {stderr.strip()[:200] or 'no output'}"
    if gpus:
        if "gpus" in sections and "apps" in sections:
            reading["gpus"] = parse_gpus(*sections["gpus"], *sections["apps"])
        else:
            reading["gpus"] = _unknown(missing)
    else:
        reading["gpus"] = None
    reading["disk"] = parse_df(*sections["disk"]) if "disk" in sections else _unknown(missing)
    if slurm:
        reading["nodes"] = (parse_sinfo(*sections["nodes"], partition=partition) if "nodes" in sections
                            else _unknown(missing))
    else:
        reading["nodes"] = None
    return reading


def split_sections(text: str) -> dict[str, tuple[str, int]]:
    """``##mqi NAME`` ... ``##mqi exit N`` blocks -> {NAME: (output, exit code)}."""
    sections, name, body = {}, None, []
    for line in text.splitlines():
        if line.startswith(_MARK + "exit ") and name is not None:
            code = line[len(_MARK) + 5:].strip()
            sections[name] = ("\n".join(body), int(code) if code.lstrip("-").isdigit() else -1)
            name, body = None, []
        elif line.startswith(_MARK):
            name, body = line[len(_MARK):].strip(), []
        elif name is not None:
            body.append(line)
    return sections


def _unknown(reason: str) -> dict:
    return {"state": "unknown", "reason": reason}


def _failed(what: str, output: str, code: int) -> dict:
    if code == NOT_INSTALLED:
        return {"state": "absent", "reason": f"{what.split()[0]} is not installed on the host"}
    first = next((line.strip() for line in output.splitlines() if line.strip()), "no output")
    return _unknown(f"{what} failed (exit {code}): {first[:200]}")


def _value(raw: str, kind):
    """One CSV value: None for nvidia-smi's N/A words; units tolerated (``100 %``)."""
    text = raw.strip()
    if text.lower() in _NO_VALUE:
        return None
    if kind is str:
        return text
    number = re.fullmatch(r"(-?\d+(?:\.\d+)?)(?:\s*(?:%|MiB|W|C))?", text)
    if number is None:
        raise ValueError(f"{text!r} is not a number")
    value = float(number.group(1))
    if kind is int:
        if not value.is_integer():
            raise ValueError(f"{text!r} is not a whole number")
        return int(value)
    return value


def _rows(text: str, fields: tuple[str, ...], keys: dict) -> list[dict]:
    """CSV rows into dicts; raises ValueError naming the first row it cannot read."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(fields):
            raise ValueError(f"row {number} has {len(values)} values, expected {len(fields)}: {line.strip()[:120]!r}")
        row = {}
        for field, raw in zip(fields, values):
            if field not in keys:
                continue  # a column we do not use (the captures in tests hold more)
            key, kind = keys[field]
            try:
                row[key] = _value(raw, kind)
            except ValueError as exc:
                raise ValueError(f"row {number}, {field}: {exc}") from None
        rows.append(row)
    return rows


def parse_gpus(gpu_text: str, gpu_code: int, app_text: str, app_code: int, *,
               gpu_fields: tuple[str, ...] = GPU_FIELDS, app_fields: tuple[str, ...] = APP_FIELDS) -> dict:
    """``nvidia-smi --query-gpu`` and ``--query-compute-apps`` output -> the GPU part:
    ``{"state": "ok", "devices": [...]}`` with each device's compute processes, or
    ``{"state": "unknown"|"absent", "reason": ...}``."""
    if gpu_code != 0:
        return _failed("nvidia-smi --query-gpu", gpu_text, gpu_code)
    if app_code != 0:
        return _failed("nvidia-smi --query-compute-apps", app_text, app_code)
    try:
        devices = _rows(gpu_text, gpu_fields, _GPU_KEYS)
        apps = _rows(app_text, app_fields, _APP_KEYS)
    except ValueError as exc:
        return _unknown(f"nvidia-smi printed what could not be read ({exc})")
    for device in devices:
        if device.get("index") is None or not device.get("uuid"):
            return _unknown(f"nvidia-smi gave a GPU without index or UUID: {device}")
        device["processes"] = [{k: v for k, v in app.items() if k != "gpu_uuid"} for app in apps
                               if app.get("gpu_uuid") == device["uuid"]]
    if len({d["index"] for d in devices}) != len(devices):
        return _unknown("nvidia-smi listed one GPU index twice")
    strays = {a.get("gpu_uuid") for a in apps} - {d["uuid"] for d in devices}
    if strays:
        return _unknown(f"nvidia-smi listed processes on a GPU it did not list ({sorted(map(str, strays))[0]})")
    return {"state": "ok", "devices": devices}


def parse_df(text: str, code: int) -> dict:
    """``df -P -k PATH`` -> ``{"state": "ok", "free_bytes", "total_bytes", "mount"}``."""
    if code != 0:
        return _failed("df", text, code)
    lines = [line for line in text.splitlines() if line.strip()]
    unit = re.search(r"(\d+)-blocks", lines[0]) if lines else None
    row = re.match(r"^(.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)%\s+(/.*)$", lines[1]) if len(lines) > 1 else None
    if unit is None or row is None:
        return _unknown(f"df printed what could not be read: {' / '.join(lines)[:200]!r}")
    block = int(unit.group(1))
    return {"state": "ok", "total_bytes": int(row.group(2)) * block, "free_bytes": int(row.group(4)) * block,
            "mount": row.group(6)}


def parse_sinfo(text: str, code: int, *, partition: str | None) -> dict:
    """``sinfo -h -N -o '%N|%P|%a|%T|%E'`` -> the partition's nodes and whether any takes
    new jobs. ``partition`` None: the cluster's default partition (marked ``*``)."""
    if code != 0:
        return _failed("sinfo", text, code)
    nodes = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|", 4)
        if len(parts) != 5:
            return _unknown(f"sinfo line {number} could not be read: {line.strip()[:120]!r}")
        name, part, avail, state, why = (p.strip() for p in parts)
        default = part.endswith("*")
        nodes.append({"node": name, "partition": part.rstrip("*"), "default": default, "available": avail,
                      "state": state, "reason": "" if why.lower() in ("none", "") else why})
    wanted = partition or next((n["partition"] for n in nodes if n["default"]), None)
    mine = [n for n in nodes if n["partition"] == wanted]
    if wanted is None or not mine:
        return _unknown(f"sinfo lists no node in partition {wanted or '(no default partition)'}")
    usable = [n for n in mine if n["available"] == "up" and _takes_jobs(n["state"])]
    return {"state": "ok", "partition": wanted, "nodes": [{k: v for k, v in n.items() if k != "default"}
                                                          for n in mine],
            "usable_nodes": len(usable), "accepting": bool(usable),
            "reason": None if usable else _why_closed(wanted, mine)}


def _takes_jobs(state: str) -> bool:
    """``idle``, ``mixed~`` (powered down: it powers up) yes; ``idle*`` (not responding),
    ``idle$`` (maintenance reservation), ``drained``, ``down``, ``maint``, ``reserved`` no."""
    base = state.rstrip("*~#!%$@^-")
    return base in USABLE_NODE_STATES and not set(state[len(base):]) & set("*$%!^")


def _why_closed(partition: str, nodes: list[dict]) -> str:
    if all(n["available"] != "up" for n in nodes):
        return f"Slurm partition {partition} is {nodes[0]['available']}"
    shown = ", ".join(f"{n['node']} {n['state']}" + (f" ({n['reason']})" if n["reason"] else "") for n in nodes[:4])
    return f"no node of Slurm partition {partition} takes jobs: {shown}"
