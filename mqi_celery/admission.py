"""Admission: whether the host takes a case's upload or a beam's run now, and which GPU a
beam gets. A case the host cannot take waits, QUEUED, with the reason shown; a beam waits
(job step "waiting") and the poller starts it once the host can. Nothing fails for it.

Decisions read the System Curator's latest reading from the database; only where a stale
figure would do harm is the host asked again: its free disk just before an upload, and its
GPUs before a claim when the reading is older than ``curator.gpu_reading_max_age_seconds``.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import db, metrics, readings, runtime
from .errors import Held
from .db import utcnow
from .models import Case
from .store import WAITING


@dataclass(frozen=True)
class Grant:
    gpu: int | None  # None: the scheduler chooses (Slurm), or no GPU to assign


def latest_reading(*, max_age: float | None = None) -> dict:
    """The host's latest reading; taken now when there is none (or it is older than
    ``max_age`` seconds)."""
    store, host = runtime.store(), runtime.host()
    reading, read_at = store.reading(host.name)
    if reading is None or (max_age is not None and (utcnow() - read_at).total_seconds() > max_age):
        reading = take_reading()
    return reading


def take_reading() -> dict:
    """Read the host now and store it, with the GPUs our jobs held meanwhile (a process
    on one of those is ours, not someone else's)."""
    settings, store, host = runtime.settings(), runtime.store(), runtime.host()
    before = set(store.claims(host.name))
    slurm = settings.scheduler.kind == "slurm"
    if slurm:
        metrics.SCHEDULER_QUERIES.labels(host=host.name, command="sinfo").inc()
    reading = readings.take(host, slurm=slurm, partition=settings.scheduler.slurm.partition if slurm else None,
                            gpus=not slurm, timeout=settings.curator.reading_timeout_seconds)
    reading["claimed"] = sorted(before | set(store.claims(host.name)))
    store.save_reading(host.name, reading)
    return reading


def host_hold(reading: dict | None) -> str | None:
    """Why the host takes no new work now (None: it does)."""
    nodes = (reading or {}).get("nodes")
    if nodes and nodes.get("state") == "ok" and not nodes["accepting"]:
        return f"{nodes['reason']}; new work waits until a node takes jobs again"
    return None


def case_bytes(case: Case) -> int:
    folder = Path(case.path)
    total = 0
    for rel in case.manifest:
        try:
            total += (folder / rel).lstat().st_size
        except OSError:
            pass  # gone: the upload says so with the file's name
    return total


def disk_hold(case: Case, disk: dict | None) -> str | None:
    settings = runtime.settings()
    margin = settings.curator.disk_margin
    if disk and disk.get("state") == "ok":
        need = case_bytes(case) + margin
        if disk["free_bytes"] < need:
            return (f"the remote disk ({disk['mount']} on {runtime.host().name}) has {human_size(disk['free_bytes'])} "
                    f"free; this case needs {human_size(need)} (its {human_size(need - margin)} plus curator.disk_margin "
                    f"{human_size(margin)}); it goes on by itself once there is room")
    results = settings.paths.results
    results.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(results).free
    if free < margin:
        return (f"the results folder {results} has {human_size(free)} free, less than curator.disk_margin "
                f"({human_size(margin)}); free space there")
    return None


def upload_hold(case: Case) -> str | None:
    """Why the case may not be uploaded now: its host takes no work, or lacks room (asked
    now; the figure is stored so the waiting case is resumed only once it has changed)."""
    if hold := host_hold(latest_reading()):
        return hold
    host, store = runtime.host(), runtime.store()
    fresh = readings.take(host, slurm=False, partition=None, gpus=False,
                          timeout=runtime.settings().curator.reading_timeout_seconds)
    reading, _ = store.reading(host.name)
    store.save_reading(host.name, {**(reading or {"host": host.name}), "disk": fresh["disk"]})
    return disk_hold(case, fresh["disk"])


@contextmanager
def transfer_slot():
    """One of the host's ``transport.max_transfers`` slots for the block; ``Held`` when all
    are in use (the case waits in line, and is resumed when a transfer ends)."""
    cap = runtime.settings().transport.max_transfers
    if cap is None:
        yield
        return
    with db.slot(runtime.store().engine, f"transfer:{runtime.host().name}", cap) as number:
        if number is None:
            raise Held(transfer_wait(cap))
        yield


def transfer_wait(cap: int) -> str:
    return (f"{cap} transfer(s) with {runtime.host().name} run already, the cap (transport.max_transfers); "
            "this one starts when one ends")


class TransferBudget:
    """Free transfer slots, counted once per resume run: no more waiting cases are sent
    on than can transfer, the others stay in line."""

    def __init__(self):
        self.cap, self.free = runtime.settings().transport.max_transfers, None

    def take(self) -> bool:
        if self.cap is None:
            return True
        if self.free is None:
            self.free = db.free_slots(runtime.store().engine, f"transfer:{runtime.host().name}", self.cap)
        self.free -= 1
        return self.free >= 0


def still_held(case: Case, budget: TransferBudget) -> str | None:
    """For a waiting case: why it must still wait, judged from the latest reading (None:
    it may go on)."""
    if any(j.step == WAITING for j in case.jobs):
        return case.wait_reason  # its beams wait: the poller starts them and clears this
    if case.stage in (None, "upload"):
        reading, _ = runtime.store().reading(runtime.host().name)
        if hold := host_hold(reading) or disk_hold(case, (reading or {}).get("disk")):
            return hold
    if case.stage in (None, "upload", "collect") and not budget.take():
        return transfer_wait(budget.cap)
    return None


def start_beam(case_id: str, beam: int) -> Grant | str:
    """A grant to submit the beam now (with its GPU on direct hosts), or why it waits."""
    settings, store, host = runtime.settings(), runtime.store(), runtime.host()
    direct = settings.scheduler.kind == "direct"
    reading = latest_reading(max_age=settings.curator.gpu_reading_max_age_seconds if direct else None)
    if hold := host_hold(reading):
        return hold
    cap = settings.scheduler.max_active_jobs
    if cap and store.claim(host.name, case_id, beam, [f"job:{i}" for i in range(cap)]) is None:
        return (f"{cap} job(s) of ours already on {host.name}, the cap (scheduler.max_active_jobs); "
                "the beam starts when one ends")
    if not direct:
        return Grant(None)
    claims = store.claims(host.name)
    gpus = gpu_candidates(reading, claims, (case_id, beam))
    if isinstance(gpus, list):
        got = store.claim(host.name, case_id, beam, [f"gpu:{g}" for g in gpus]) if gpus else None
        if got is not None:
            return Grant(int(got.split(":")[1]))
        gpus = no_free_gpu(reading, store.claims(host.name))
    if gpus is None:
        return Grant(None)
    store.release_claims(case_id, beam)  # its job slot: another beam may use it meanwhile
    return gpus


def gpu_candidates(reading: dict | None, claims: dict, me: tuple[str, int]) -> list[int] | None | str:
    """GPUs the beam may claim: listed, allowed (``engine.gpu_ids``), not someone else's,
    held by no other beam of ours. None: the host has no GPU to assign. A string: why no
    GPU can be judged free."""
    allowed = runtime.settings().engine.gpu_ids
    part = (reading or {}).get("gpus")
    mine = {r for r, holder in claims.items() if tuple(holder) != tuple(me)}
    if part is None or part.get("state") == "absent":  # no nvidia-smi: trust the configuration
        return None if allowed is None else [g for g in allowed if f"gpu:{g}" not in mine]
    if part.get("state") != "ok":
        return f"the GPUs of {runtime.host().name} cannot be judged: {part.get('reason')}"
    return [d["index"] for d in part["devices"]
            if (allowed is None or d["index"] in allowed) and f"gpu:{d['index']}" not in mine
            and not foreign_busy(d, reading)]


def foreign_busy(device: dict, reading: dict) -> bool:
    """Someone else's work is on the GPU: it ran a process or held memory while no beam
    of ours held it."""
    if f"gpu:{device['index']}" in set(reading.get("claimed", ())):
        return False
    threshold = runtime.settings().curator.gpu_busy_memory_mib
    return bool(device.get("processes")) or (device.get("memory_used_mib") or 0) >= threshold > 0


def no_free_gpu(reading: dict | None, claims: dict) -> str:
    allowed = runtime.settings().engine.gpu_ids
    part = (reading or {}).get("gpus") or {}
    what = []
    for index in (allowed if part.get("state") != "ok" else [d["index"] for d in part["devices"]]) or ():
        if allowed is not None and index not in allowed:
            continue
        holder = claims.get(f"gpu:{index}")
        device = next((d for d in part.get("devices", ()) if d["index"] == index), None)
        if holder:
            what.append(f"GPU {index} runs beam {holder[1]} of case {holder[0]}")
        elif device is not None and foreign_busy(device, reading):
            procs = device.get("processes") or []
            used = sum(p.get("used_memory_mib") or 0 for p in procs) or device.get("memory_used_mib")
            what.append(f"GPU {index} is busy with another user's work ({len(procs)} process(es), {used} MiB)")
    return f"no free GPU on {runtime.host().name}: " + ("; ".join(what) or "none is listed") + \
        "; the beam starts once one is free"


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
