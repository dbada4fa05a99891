"""The System Curator's picture of the host: computed from its latest reading (the curator
publishes it as ``system_status_update``) and drawn for people by ``mqi status``."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from rich.console import Group
from rich.table import Table

from . import admission
from .admission import human_size as size
from .models import CaseStatus, JobStatus
from .naming import inbox_fault
from .terminal import data, in_markup


def host_status(ctx, reads, reading: dict | None, read_at=None) -> dict:
    """The reading, interpreted: each GPU free, ours, shared or someone else's; whether the
    host takes new work and, if not, why (the same rule admission applies)."""
    settings, host = ctx.settings, ctx.host_name
    claims, breaker = reads.claims(host), reads.breaker_state(host)
    hold = inbox_fault(Path(os.path.realpath(settings.paths.inbox))) or admission.accepting_hold(ctx, 
        reading, breaker if settings.transport.kind == "ssh" else ("closed", None, None))
    reading = reading or {}
    gpu_part, disk, nodes = reading.get("gpus") or {}, reading.get("disk") or {}, reading.get("nodes") or {}
    gpus = [_gpu(ctx, d, reading, claims) for d in gpu_part.get("devices", ())]
    unknown = [f"{name}: {part['reason']}" for name, part in (("GPUs", gpu_part), ("disk", disk), ("Slurm", nodes))
               if part.get("state") == "unknown"]
    unknown += [f"a GPU: {line}" for line in gpu_part.get("unreadable", ())]
    results = settings.paths.results
    results.mkdir(parents=True, exist_ok=True)
    return {
        "host": host, "read_at": read_at.isoformat() + "Z" if read_at else None,
        "scheduler": settings.scheduler.kind,
        "gpus": gpus, "gpu_state": gpu_part.get("state"), "gpu_note": gpu_part.get("reason"),
        "free_gpus": sum(g["state"] == "free" for g in gpus),
        "disk_free": disk.get("free_bytes"), "disk_total": disk.get("total_bytes"), "disk_mount": disk.get("mount"),
        "results_disk_free": shutil.disk_usage(results).free,
        "scheduler_up": (nodes.get("state") == "ok") if settings.scheduler.kind == "slurm" else
        (None if not reading or disk.get("state") == "unknown" else True),
        "partition": nodes.get("partition"), "nodes": nodes.get("nodes", []),
        "breaker": breaker[0],
        # Never read (and reachable): whether it takes work is not known yet.
        "accepting_work": None if hold is None and not reading else hold is None, "reason": hold, "unknown": unknown,
        "claims": {resource: {"case_id": c, "beam": b} for resource, (c, b) in sorted(claims.items())},
    }


def _gpu(ctx, device: dict, reading: dict, claims: dict) -> dict:
    holder = claims.get(f"gpu:{device['index']}")
    total, used = device.get("memory_total_mib"), device.get("memory_used_mib")
    free = device.get("memory_free_mib")
    return {**device, "memory_free_mib": free if free is not None else (total - used if total and used is not None
                                                                          else None),
            "state": admission.gpu_state(ctx, device, reading, claims),
            "claimed_by": {"case_id": holder[0], "beam": holder[1]} if holder else None}


def system_status(ctx, reads, *, refresh: bool = True) -> dict:
    """The host's picture (a new reading unless ``refresh`` is false) and the work in flight,
    read through ``reads`` (the Store, or ``mqi status``'s own connection: no SQLAlchemy)."""
    if refresh:
        admission.take_reading(ctx)
    reading, read_at = reads.reading(ctx.host_name)
    cases, jobs = reads.count_by_status()
    return {**host_status(ctx, reads, reading, read_at),
            "cases": {s.value: cases.get(s.value, 0) for s in CaseStatus},
            "jobs": {s.value: jobs.get(s.value, 0) for s in JobStatus},
            "waiting": reads.waiting_cases()}


def queue_depths(ctx) -> dict[str, int | None]:
    """Messages waiting per queue, asked of the broker (None where it does not say)."""
    from .queues import QUEUES

    return ctx.sender.queue_depths(QUEUES)


def _yes(value) -> str:
    return {True: "[green]yes[/green]", False: "[red]no[/red]", None: "unknown"}[value]


def host_table(s: dict) -> Table:
    t = Table(title=f"host {in_markup(s['host'])} ({s['scheduler']}), read {s['read_at'] or 'never'}", show_header=False,
              expand=True)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    if not s["read_at"]:
        t.add_row("[yellow]not read yet[/yellow]", "the System Curator reads the host every curator.interval_seconds; "
                                                   "`mqi status --refresh` reads it now")
    t.add_row("accepting work", _yes(s["accepting_work"]) + (f" — {in_markup(s['reason'])}" if s["reason"] else ""))
    t.add_row("scheduler up", _yes(s["scheduler_up"]))
    if s["partition"]:
        t.add_row(data(f"partition {s['partition']}"), data(", ".join(
            f"{n['node']} {n['state']}" + (f" ({n['reason']})" if n["reason"] else "") for n in s["nodes"])))
    disk = (f"{size(s['disk_free'])} free of {size(s['disk_total'])} on {s['disk_mount']}"
            if s["disk_free"] is not None else "unknown")
    t.add_row("remote disk", data(disk))
    t.add_row("results disk", f"{size(s['results_disk_free'])} free")
    t.add_row("GPUs", f"{s['free_gpus']} free of {len(s['gpus'])}" if s["gpus"] else
              "none" + (f" ({in_markup(s['gpu_note'])})" if s["gpu_note"] and s["gpu_state"] == "absent" else ""))
    for note in s["unknown"]:
        t.add_row("[yellow]unknown[/yellow]", data(note))
    return t


def gpu_table(gpus: list[dict]) -> Table:
    t = Table(title="GPUs", expand=True)
    for col in ("GPU", "name", "state", "used by", "util", "memory used/total", "temp", "power"):
        t.add_column(col, overflow="fold")
    colors = {"free": "green", "ours": "cyan", "shared": "yellow", "busy": "red", "excluded": "dim"}
    for g in gpus:
        holder = g["claimed_by"]
        users = [f"case {holder['case_id']} beam {holder['beam']}"] if holder else []
        users += [f"pid {p['pid']} {p.get('name') or ''} ({p.get('used_memory_mib')} MiB)"
                  for p in g["processes"] if not (holder and p.get("ours"))]
        users = ", ".join(users) + (" (someone else's beside our beam)" if g["state"] == "shared" else "")
        t.add_row(str(g["index"]), data(g["name"]), data(g["state"], style=colors[g["state"]]), data(users),
                  _unit(g["utilization_percent"], "%"), f"{_unit(g['memory_used_mib'], '')}/"
                  f"{_unit(g['memory_total_mib'], ' MiB')}", _unit(g["temperature_c"], " °C"),
                  _unit(g["power_w"], " W"))
    return t


def _unit(value, unit: str) -> str:
    return "n/a" if value is None else f"{value:g}{unit}"


def work_table(s: dict) -> Table:
    t = Table(title="work", expand=True, show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("cases", "  ".join(f"{k} {v}" for k, v in s["cases"].items()))
    t.add_row("beam jobs", "  ".join(f"{k} {v}" for k, v in s["jobs"].items()))
    t.add_row("queue depth", "  ".join(f"{q} {'?' if n is None else n}" for q, n in s["queues"].items()))
    for w in s["waiting"]:
        t.add_row(f"[yellow]waiting[/yellow] {in_markup(w['case_id'])}", data(w["reason"]))
    return t


def status_view(s: dict) -> Group:
    return Group(host_table(s), *([gpu_table(s["gpus"])] if s["gpus"] else []), work_table(s))
