"""What the System Curator reads from a host: its GPUs (``nvidia-smi``) with the session of
each GPU process (``ps``: ours are the sessions our jobs lead), free disk under the remote
root (``df -P``) and, on Slurm hosts, the state of the partition's nodes (``sinfo``), all in
one shell command per host. Every tool runs under ``timeout`` on the host itself, so a tool
that hangs is killed there and leaves nothing behind. Parsing is tolerant: output it cannot
trust gives an "unknown" part with the reason (the tool's own error line), never an
exception, and never a guess; a GPU that cannot be read leaves the others usable.

A reading is plain JSON (it is stored per host in the database and published as is).
"""
from __future__ import annotations

import re
import shlex

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
TIMED_OUT = (124, 137)  # timeout(1)'s exit codes: the tool did not answer and was stopped (TERM, KILL)
_MARK = "##mqi "
PS_LIMIT = 3  # seconds for ps, which reads /proc only
_TOOLS = {"gpus": "nvidia-smi", "apps": "nvidia-smi --query-compute-apps", "disk": "df", "nodes": "sinfo"}


def command(root: str, *, gpus: bool = True, disk: bool = True, slurm: bool = False, limit: float = 10) -> str:
    """One shell script printing each part after a marker line, and its exit code; each
    tool is stopped on the host after ``limit`` seconds (exit 124)."""
    run = f"timeout -k 2 {limit:g}"
    lines = ["export LC_ALL=C"]
    if gpus:
        # The processes' sessions come from the PIDs the compute-apps query printed (its 2nd field).
        lines += [f"echo '{_MARK}gpus'; ( {run} nvidia-smi --query-gpu={','.join(GPU_FIELDS)} --format=csv,noheader,"
                  f"nounits ) 2>&1; rc=$?; echo \"{_MARK}exit $rc\"",
                  "case $rc in 124|127|137) ;; *)",
                  f"  apps=$( {run} nvidia-smi --query-compute-apps={','.join(APP_FIELDS)} --format=csv,noheader,"
                  f"nounits 2>&1 ); rc=$?",
                  f"  echo '{_MARK}apps'; [ -z \"$apps\" ] || printf '%s\\n' \"$apps\"; echo \"{_MARK}exit $rc\"",
                  "  pids=$(printf '%s\\n' \"$apps\" | awk -F', *' '$2 ~ /^[0-9]+$/ {print $2}' | paste -sd, -)",
                  f"  echo '{_MARK}sessions'; [ -z \"$pids\" ] || timeout -k 1 {PS_LIMIT} ps -o pid=,sid= -p \"$pids\"; "
                  f"echo \"{_MARK}exit 0\"",
                  "esac"]
    parts = []
    if disk:
        # mkdir and df on one time limit: a hung network mount blocks either
        parts.append(("disk", f"{run} sh -c 'mkdir -p \"$1\" && exec df -P -k \"$1\"' sh {shlex.quote(root)}"))
    if slurm:
        parts.append(("nodes", f"{run} sinfo -h -N -o '%N|%P|%a|%T|%E'"))
    for name, cmd in parts:
        lines.append(f"echo '{_MARK}{name}'; ( {cmd} ) 2>&1; echo \"{_MARK}exit $?\"")
    return "\n".join(lines)


def tool_limit(timeout: float, *, gpus: bool, slurm: bool) -> float:
    """Each tool's time limit on the host: the tools run one after the other, each may take
    its limit plus 2 s to be killed, and ps its own few seconds, all within ``timeout``."""
    tools = 2 * gpus + 1 + slurm  # nvidia-smi twice, df, sinfo
    return max(1.0, round((timeout - PS_LIMIT - 2) / tools - 2, 1))


def take(host: Host, *, slurm: bool, partition: str | None, gpus: bool = True, timeout: float = 30) -> dict:
    """Read the host now. A host that does not answer gives a reading that says so."""
    limit = tool_limit(timeout, gpus=gpus, slurm=slurm)
    try:
        result = host.run(command(str(host.root), gpus=gpus, slurm=slurm, limit=limit), timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - dropped connection, timeout, breaker open: "unknown", with why
        reason = f"could not read the host: {exc}"
        return {"host": host.name, "gpus": _unknown(reason) if gpus else None, "disk": _unknown(reason),
                "nodes": _unknown(reason) if slurm else None}
    return parse(result.stdout, host=host.name, slurm=slurm, partition=partition, gpus=gpus,
                 returncode=result.returncode, stderr=result.stderr, limit=limit)


def parse(text: str, *, host: str, slurm: bool, partition: str | None, gpus: bool = True,
          returncode: int = 0, stderr: str = "", limit: float | None = None) -> dict:
    sections = split_sections(text)
    missing = _unknown(f"the reading command ended early (exit {returncode}): {stderr.strip()[:200] or 'no output'}")

    def stopped(name: str) -> dict | None:
        if sections.get(name, ("", 0))[1] in TIMED_OUT:
            return _unknown(f"{_TOOLS[name]} did not answer within {limit or 0:g} s (stopped on the host)")
        return None

    def part(name: str, parser, **kw) -> dict:
        return missing if name not in sections else stopped(name) or parser(*sections[name], **kw)

    if not gpus:
        gpu_part = None
    elif "gpus" not in sections or ("apps" not in sections and sections["gpus"][1] not in (NOT_INSTALLED, *TIMED_OUT)):
        gpu_part = missing
    else:
        gpu_part = stopped("gpus") or stopped("apps") or parse_gpus(
            *sections["gpus"], *sections.get("apps", ("", 0)), sessions=sections.get("sessions", ("", 0))[0])
    return {"host": host, "gpus": gpu_part, "disk": part("disk", parse_df),
            "nodes": part("nodes", parse_sinfo, partition=partition) if slurm else None}


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


def _row(line: str, number: int, fields: tuple[str, ...], keys: dict) -> dict:
    """One CSV row; raises ValueError saying what is wrong: the line itself when it is not
    a row of the query at all (nvidia-smi's "Unable to determine the device handle for…")."""
    values = [v.strip() for v in line.split(",")]
    if len(values) != len(fields):
        raise ValueError(line.strip()[:200])
    row = {}
    for field, raw in zip(fields, values):
        if field not in keys:
            continue  # a column we do not use (the captures in tests hold more)
        key, kind = keys[field]
        try:
            row[key] = _value(raw, kind)
        except ValueError as exc:
            raise ValueError(f"row {number}, {field}: {exc}") from None
    return row


def _rows(text: str, fields: tuple[str, ...], keys: dict) -> tuple[list[dict], list[str]]:
    """The rows that can be read, and why each other line could not."""
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(_row(line, number, fields, keys))
            except ValueError as exc:
                problems.append(str(exc))
    return rows, problems


def parse_gpus(gpu_text: str, gpu_code: int, app_text: str, app_code: int, *, sessions: str = "",
               gpu_fields: tuple[str, ...] = GPU_FIELDS, app_fields: tuple[str, ...] = APP_FIELDS) -> dict:
    """``nvidia-smi --query-gpu`` and ``--query-compute-apps`` output (and ``ps -o pid=,sid=``
    of the processes) -> the GPU part: ``{"state": "ok", "devices": [...]}`` with each device's
    compute processes and their sessions, plus ``unreadable`` (the tool's line for each GPU it
    could not read: the others stay usable); or ``{"state": "unknown"|"absent", "reason": ...}``."""
    if gpu_code == NOT_INSTALLED:
        return _failed("nvidia-smi --query-gpu", gpu_text, gpu_code)
    devices, unreadable = _rows(gpu_text, gpu_fields, _GPU_KEYS)
    unreadable += [f"a GPU without index or UUID: {d}" for d in devices if d.get("index") is None or not d.get("uuid")]
    devices = [d for d in devices if d.get("index") is not None and d.get("uuid")]
    if not devices:
        if gpu_code != 0:
            first = unreadable[0] if unreadable else "no output"
            return _unknown(f"nvidia-smi --query-gpu failed (exit {gpu_code}): {first}")
        return _unknown(f"nvidia-smi printed no GPU it could read: {unreadable[0]}") if unreadable else \
            {"state": "ok", "devices": []}
    if len({d["index"] for d in devices}) != len(devices):
        return _unknown("nvidia-smi listed one GPU index twice")
    apps, app_problems = _rows(app_text, app_fields, _APP_KEYS)
    # The query of processes may fail on the GPU that could not be read, with the same line;
    # any other line we cannot place could be a process on any GPU: nothing can be judged.
    own = set(unreadable)
    if [p for p in app_problems if p not in own]:
        first = next(p for p in app_problems if p not in own)
        return _unknown(f"nvidia-smi --query-compute-apps printed what could not be read ({first})")
    if app_code != 0 and not (app_problems and own):
        return _failed("nvidia-smi --query-compute-apps", app_text, app_code)
    strays = {a.get("gpu_uuid") for a in apps} - {d["uuid"] for d in devices}
    if strays and not own:  # with an unreadable GPU they are its processes
        return _unknown(f"nvidia-smi listed processes on a GPU it did not list ({sorted(map(str, strays))[0]})")
    session_of = _sessions(sessions)
    for device in devices:
        device["processes"] = [{**{k: v for k, v in app.items() if k != "gpu_uuid"},
                                "session": session_of.get(app.get("pid"))}
                               for app in apps if app.get("gpu_uuid") == device["uuid"]]
    return {"state": "ok", "devices": devices, **({"unreadable": unreadable} if unreadable else {})}


def _sessions(text: str) -> dict[int, int]:
    """``ps -o pid=,sid=`` lines -> pid: session id (a process gone meanwhile is not listed)."""
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            found[int(parts[0])] = int(parts[1])
    return found


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
