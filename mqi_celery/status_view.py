"""``mqi status``: the System Curator's picture of the host for people (rich tables)."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table

from .admission import human_size as size


def queue_depths() -> dict[str, int | None]:
    """Messages waiting per queue, asked of the broker (None where it does not say)."""
    from .celery_app import app
    from .tasks import QUEUES

    depths: dict[str, int | None] = {q: None for q in QUEUES}
    try:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            for queue in QUEUES:
                try:
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except Exception:  # noqa: BLE001 - not declared yet: nothing waits in it
                    depths[queue] = 0
                    channel = conn.channel()
    except Exception:  # noqa: BLE001 - broker unreachable: depths unknown, the rest still shows
        pass
    return depths


def _yes(value) -> str:
    return {True: "[green]yes[/green]", False: "[red]no[/red]", None: "unknown"}[value]


def host_table(s: dict) -> Table:
    t = Table(title=f"host {s['host']} ({s['scheduler']}), read {s['read_at'] or 'never'}", show_header=False,
              expand=True)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("accepting work", _yes(s["accepting_work"]) + (f" — {s['reason']}" if s["reason"] else ""))
    t.add_row("scheduler up", _yes(s["scheduler_up"]))
    if s["partition"]:
        t.add_row(f"partition {s['partition']}", ", ".join(
            f"{n['node']} {n['state']}" + (f" ({n['reason']})" if n["reason"] else "") for n in s["nodes"]))
    disk = (f"{size(s['disk_free'])} free of {size(s['disk_total'])} on {s['disk_mount']}"
            if s["disk_free"] is not None else "unknown")
    t.add_row("remote disk", disk)
    t.add_row("results disk", f"{size(s['results_disk_free'])} free")
    t.add_row("GPUs", f"{s['free_gpus']} free of {len(s['gpus'])}" if s["gpus"] else
              "none" + (f" ({s['gpu_note']})" if s["gpu_note"] and s["gpu_state"] == "absent" else ""))
    for note in s["unknown"]:
        t.add_row("[yellow]unknown[/yellow]", note)
    return t


def gpu_table(gpus: list[dict]) -> Table:
    t = Table(title="GPUs", expand=True)
    for col in ("GPU", "name", "state", "used by", "util", "memory used/total", "temp", "power"):
        t.add_column(col, overflow="fold")
    colors = {"free": "green", "ours": "cyan", "busy": "red", "excluded": "dim"}
    for g in gpus:
        holder = g["claimed_by"]
        users = (f"case {holder['case_id']} beam {holder['beam']}" if holder else
                 ", ".join(f"pid {p['pid']} {p.get('name') or ''} ({p.get('used_memory_mib')} MiB)"
                           for p in g["processes"]))
        t.add_row(str(g["index"]), g["name"] or "", f"[{colors[g['state']]}]{g['state']}[/]", users,
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
        t.add_row(f"[yellow]waiting[/yellow] {w['case_id']}", w["reason"])
    return t


def status_view(s: dict) -> Group:
    return Group(host_table(s), *([gpu_table(s["gpus"])] if s["gpus"] else []), work_table(s))
