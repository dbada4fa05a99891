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

from . import gpu_use, host_readings, messages
from .errors import Held, NoSpace
from .models import Case
from .lifecycle import POLLER_STARTS, CaseStep, Stage


@dataclass(frozen=True)
class Grant:
    gpu: int | None  # None: the scheduler chooses (Slurm), or no GPU to assign


def latest_reading(ctx, *, max_age: float | None = None, may_read: bool = True) -> dict | None:
    """The host's latest reading; taken now when there is none (or it is older than
    ``max_age`` seconds). Without ``may_read`` (the poller never waits on a host that may
    hang) a reading is asked of the System Curator instead and None returned meanwhile; the
    one taken after that request is used at the next call, however old by then."""
    from .db import utcnow

    global _asked_at
    reading, read_at = ctx.store.reading(ctx.host_name)
    stale = reading is None or (max_age is not None and (utcnow() - read_at).total_seconds() > max_age)
    if not may_read and not stale and max_age is not None and _unjudged(reading):
        stale = True  # GPUs that could not be read: asked again at once, so a fault's end is seen soon
    if stale:
        if not may_read:
            if reading is not None and _asked_at is not None and read_at >= _asked_at:
                _asked_at = None  # the answer to our request, used once: the next stale one is asked for
                return reading
            ask_for_reading(ctx)
            return None
        reading = take_reading(ctx)
    return reading


_asked_at = None  # per process: when a reading was last asked for (UTC)


def ask_for_reading(ctx) -> None:
    """One request at a time: none while an earlier one may still be read (a host that
    hangs answers within ``curator.reading_timeout_seconds``)."""
    global _asked_at
    from .db import utcnow

    pending = ctx.settings.curator.reading_timeout_seconds
    if _asked_at is not None and (utcnow() - _asked_at).total_seconds() < pending:
        reading, read_at = ctx.store.reading(ctx.host_name)
        if read_at is None or read_at < _asked_at:
            return  # not answered yet
    try:
        ctx.sender.send("mqi.read_host")
        _asked_at = utcnow()
    except Exception:  # noqa: BLE001 - the curator reads the host on its own schedule anyway
        pass


def _unjudged(reading: dict) -> bool:
    return ((reading.get("gpus") or {}).get("state") or "ok") not in ("ok", "absent")


def take_reading(ctx) -> dict | None:
    """Read the host now and store it, with what our jobs held meanwhile: the GPUs they
    claimed and the sessions their runs lead (a GPU process in one of those is ours).
    One reading of a host at a time: None while another process reads it (a hung host
    then holds one worker slot, not every one that wants a reading)."""
    from . import db

    with db.slot(ctx.store.engine, f"reading:{ctx.host_name}", 1) as held:
        return None if held is None else _read_now(ctx)


def _read_now(ctx) -> dict:
    from .db import utcnow

    settings, store, host = ctx.settings, ctx.store, ctx.host
    claims, runs, began = set(store.claims(host.name)), our_runs(ctx), utcnow()
    slurm = settings.scheduler.kind == "slurm"
    if slurm:
        from . import metrics

        metrics.SCHEDULER_QUERIES.labels(host=host.name, command="sinfo").inc()
    reading = host_readings.take(host, slurm=slurm, partition=settings.scheduler.slurm.partition if slurm else None,
                            gpus=not slurm, timeout=settings.curator.reading_timeout_seconds)
    held = store.claims(host.name)  # read after the reading: what ran during it is known by now
    reading["claimed"] = sorted(claims | set(held))
    # Also the runs that began and ended during the reading (a slow host, a short beam): their
    # processes may be in it.
    jobs = [j for j in store.runs_since(began) if j.scheduler == "direct" and (j.remote_id or "").isdigit()]
    started = {(j.case_id, j.beam) for j in jobs}
    starting = {int(r.split(":")[1]) for r, beam in held.items() if r.startswith("gpu:") and beam not in started}
    gpu_use.mark_ours(reading, runs | {int(j.remote_id) for j in jobs}, starting)
    store.save_reading(host.name, reading)
    announce_shared(ctx, reading, store.claims(host.name))
    return reading


def announce_shared(ctx, reading: dict, claims: dict) -> None:
    """An event for the case whose beam holds a GPU once someone else's process appears
    beside it, once per set of processes (readings taken at once may be stored out of
    order, so the case's events say what was announced): that beam runs on, no new one
    starts there."""
    for device in (reading.get("gpus") or {}).get("devices", ()):
        holder, other = claims.get(f"gpu:{device['index']}"), foreign_use(ctx, device, reading)
        if not holder or not other:
            continue
        pids = sorted(p.get("pid") for p in other["processes"])
        said = [e["payload"] for e in ctx.store.events(holder[0]) if e["command"] == "gpu_shared"]
        if any(s.get("gpu") == device["index"] and s.get("processes") == pids for s in said):
            continue
        messages.emit(ctx, "gpu_shared", {"host": ctx.host_name, "gpu": device["index"], "beam": holder[1],
                                     "processes": pids, "memory_mib": other["memory_mib"],
                                     "reason": f"GPU {device['index']} is shared with another user's work "
                                               f"({gpu_use.describe(other)}); beam {holder[1]} runs on, no new "
                                               "beam starts there until it is gone"}, case_id=holder[0])


def our_runs(ctx) -> set[int]:
    """The pids that lead our direct runs' sessions (what the direct scheduler recorded)."""
    return {int(j.remote_id) for j in _direct_runs(ctx)}


def _direct_runs(ctx) -> list:
    return [j for j in ctx.store.active_jobs() if j.scheduler == "direct" and (j.remote_id or "").isdigit()]


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


def bytes_to_upload(ctx, case: Case) -> int:
    """What the case still has to send: nothing once its input was verified on the host and
    no upload failed since (a retry re-verifies it and sends only what differs), else all."""
    last = ctx.store.last_event(case.case_id, ("upload_success", "upload_failed"))
    return 0 if last == "upload_success" else case_bytes(case)


def disk_hold(ctx, case: Case, disk: dict | None) -> str | None:
    """Why the case may not be uploaded for lack of room (None: there is room)."""
    settings = ctx.settings
    margin = settings.curator.disk_margin
    if disk and disk.get("state") == "ok":
        need = bytes_to_upload(ctx, case) + margin
        if disk["free_bytes"] < need:
            return (f"the remote disk ({disk['mount']} on {ctx.host_name}) has {human_size(disk['free_bytes'])} "
                    f"free; this case needs {human_size(need)} (its {human_size(need - margin)} plus curator.disk_margin "
                    f"{human_size(margin)}); it goes on by itself once there is room")
    return results_hold(ctx)


def results_hold(ctx) -> str | None:
    """Why results cannot come down now: the results folder has less room than the margin."""
    settings = ctx.settings
    margin, results = settings.curator.disk_margin, settings.paths.results
    results.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(results).free
    if free < margin:
        return (f"the results folder {results} has {human_size(free)} free, less than curator.disk_margin "
                f"({human_size(margin)}); free space there: the case goes on by itself once there is room")
    return None


def after_full_disk(ctx, case: Case, exc: NoSpace) -> str:
    """Why a case whose transfer ran out of room waits (the disk is read again now)."""
    if exc.where == "local":
        return results_hold(ctx) or (f"the results folder {ctx.settings.paths.results} ran full during the "
                                  f"download ({exc}); the case goes on by itself once there is room")
    disk = _read_disk(ctx)
    return disk_hold(ctx, case, disk) or (f"the remote disk ran full during the upload ({exc}); the partial upload was "
                                     "removed and the case goes on by itself once there is room")


def _read_disk(ctx) -> dict:
    """The host's disk now, stored beside the latest reading (a waiting case is resumed
    from the stored figure once it has changed)."""
    host, store = ctx.host, ctx.store
    fresh = host_readings.take(host, slurm=False, partition=None, gpus=False,
                          timeout=ctx.settings.curator.reading_timeout_seconds)
    reading, _ = store.reading(host.name)
    if reading is None:  # the first reading: its GPUs are still to be read (never taken as "none to assign")
        direct = ctx.settings.scheduler.kind == "direct"
        reading = {"host": host.name, "gpus": {"state": "unknown", "reason": "not read yet"} if direct else None}
    store.save_reading(host.name, {**reading, "disk": fresh["disk"]})
    return fresh["disk"]


def upload_hold(ctx, case: Case) -> str | None:
    """Why the case may not be uploaded now: its host takes no work, or lacks room (asked
    now; the figure is stored so the waiting case is resumed only once it has changed)."""
    if hold := host_hold(latest_reading(ctx)):
        return hold
    return disk_hold(ctx, case, _read_disk(ctx))


@contextmanager
def transfer_slot(ctx):
    """One of the host's ``transport.max_transfers`` slots for the block; ``Held`` when all
    are in use (the case waits in line, and is resumed when a transfer ends)."""
    cap = ctx.settings.transport.max_transfers
    if cap is None:
        yield
        return
    from . import db

    with db.slot(ctx.store.engine, f"transfer:{ctx.host_name}", cap) as number:
        if number is None:
            raise Held(transfer_wait(ctx, cap))
        yield


def transfer_wait(ctx, cap: int) -> str:
    return (f"{cap} transfer(s) with {ctx.host_name} run already, the cap (transport.max_transfers); "
            "this one starts when one ends")


class TransferBudget:
    """Free transfer slots, counted once per resume run: no more waiting cases are sent
    on than can transfer, the others stay in line."""

    def __init__(self, ctx):
        self.ctx, self.cap, self.free = ctx, ctx.settings.transport.max_transfers, None

    def take(self) -> bool:
        if self.cap is None:
            return True
        if self.free is None:
            from . import db

            self.free = db.free_slots(self.ctx.store.engine, f"transfer:{self.ctx.host_name}", self.cap)
        self.free -= 1
        return self.free >= 0


def still_held(ctx, case: Case, budget: TransferBudget) -> str | None:
    """For a waiting case: why it must still wait, judged from the latest reading (None:
    it may go on)."""
    if any(j.step in POLLER_STARTS for j in case.jobs):
        return case.wait_reason  # its beams wait: the poller starts them and clears this
    if case.step == CaseStep.SETTLING:
        return case.wait_reason  # its folder is still changing: the scanner validates it once settled
    if case.stage in (None, Stage.UPLOAD):
        reading, _ = ctx.store.reading(ctx.host_name)
        if hold := host_hold(reading) or disk_hold(ctx, case, (reading or {}).get("disk")):
            return hold
    if case.stage == Stage.COLLECT and (hold := results_hold(ctx)):
        return hold
    if case.stage in (None, Stage.UPLOAD, Stage.COLLECT) and not budget.take():
        return transfer_wait(ctx, budget.cap)
    return None


def start_beam(ctx, case_id: str, beam: int, *, may_read: bool = True) -> Grant | str:
    """A grant to submit the beam now (with its GPU on direct hosts), or why it waits.
    ``may_read``: the host may be read now if the latest reading is too old (not in the
    poller: there the beam waits for the System Curator's fresh reading)."""
    settings, store, host = ctx.settings, ctx.store, ctx.host_name
    direct = settings.scheduler.kind == "direct"
    max_age = settings.curator.gpu_reading_max_age_seconds
    reading = latest_reading(ctx, max_age=max_age if direct else None, may_read=may_read)
    if reading is None and direct:
        return f"the GPUs of {host} are being read again (the latest reading is older than {max_age:g} s)"
    if hold := host_hold(reading):
        return hold
    cap = settings.scheduler.max_active_jobs
    if cap and store.claim(host, case_id, beam, [f"job:{i}" for i in range(cap)]) is None:
        return (f"{cap} job(s) of ours already on {host}, the cap (scheduler.max_active_jobs); "
                "the beam starts when one ends")
    if not direct:
        return Grant(None)
    claims = store.claims(host)
    gpus = gpu_candidates(ctx, reading, claims, (case_id, beam))
    if isinstance(gpus, list):
        got = store.claim(host, case_id, beam, [f"gpu:{g}" for g in gpus]) if gpus else None
        if got is not None:
            return Grant(int(got.split(":")[1]))
        gpus = no_free_gpu(ctx, reading, store.claims(host))
    if gpus is None:
        return Grant(None)
    store.release_claims(case_id, beam)  # its job slot: another beam may use it meanwhile
    return gpus


def gpu_candidates(ctx, reading: dict | None, claims: dict, me: tuple[str, int]) -> list[int] | None | str:
    """GPUs the beam may claim: listed and read, allowed (``engine.gpu_ids``), with no one
    else's work on them, held by no other beam of ours. None: the host has no GPU to
    assign. A string: why no GPU can be judged free."""
    allowed = ctx.settings.engine.gpu_ids
    part = (reading or {}).get("gpus")
    mine = {r for r, holder in claims.items() if tuple(holder) != tuple(me)}
    if part is None:  # a reading of the disk alone (before the first whole one): GPUs not read yet
        return f"the GPUs of {ctx.host_name} cannot be judged: not read yet"
    if part.get("state") == "absent":  # no nvidia-smi: trust the configuration
        return None if allowed is None else [g for g in allowed if f"gpu:{g}" not in mine]
    if part.get("state") != "ok":
        return f"the GPUs of {ctx.host_name} cannot be judged: {part.get('reason')}"
    return [d["index"] for d in part["devices"]
            if (allowed is None or d["index"] in allowed) and f"gpu:{d['index']}" not in mine
            and not foreign_use(ctx, d, reading)]


def foreign_use(ctx, device: dict, reading: dict) -> dict | None:
    """Someone else's processes or memory on the GPU (see ``gpu_use``)."""
    return gpu_use.foreign(device, reading, ctx.settings.curator.gpu_busy_memory_mib)


def no_free_gpu(ctx, reading: dict | None, claims: dict) -> str:
    allowed = ctx.settings.engine.gpu_ids
    part = (reading or {}).get("gpus") or {}
    devices = {d["index"]: d for d in part.get("devices", ())}
    what = []
    for index in sorted(set(devices) | set(allowed or ())):
        if allowed is not None and index not in allowed:
            continue
        holder, device = claims.get(f"gpu:{index}"), devices.get(index)
        other = foreign_use(ctx, device, reading) if device is not None else None
        if holder:
            what.append(f"GPU {index} runs beam {holder[1]} of case {holder[0]}" +
                        (f" and is shared with another user's work ({gpu_use.describe(other)})" if other else ""))
        elif other:
            what.append(f"GPU {index} is busy with another user's work ({gpu_use.describe(other)})")
        elif device is None and part.get("state") == "ok":
            why = (part.get("unreadable") or ["nvidia-smi does not list it"])[0]
            what.append(f"GPU {index} cannot be read ({why})")
    return f"no free GPU on {ctx.host_name}: " + ("; ".join(what) or "none is listed") + \
        "; the beam starts once one is free"


def accepting_hold(ctx, reading: dict | None, breaker: tuple) -> str | None:
    """Why the host takes no new work now (``mqi status``, the metrics): unreachable (its
    ``breaker`` state is not closed), or what admission would hold a case dropped now for.
    None: it takes new work."""
    state, _, error = breaker
    return f"host unreachable ({error})" if state != "closed" else new_work_hold(ctx, reading)


def gpu_state(ctx, device: dict, reading: dict, claims: dict) -> str:
    """free | ours | shared | busy | excluded, for people and dashboards (see ``gpu_use``)."""
    settings = ctx.settings
    return gpu_use.state(device, reading, claims.get(f"gpu:{device['index']}"), settings.engine.gpu_ids,
                         settings.curator.gpu_busy_memory_mib)


def new_work_hold(ctx, reading: dict | None) -> str | None:
    """Why a case dropped now would wait, as admission decides it: for its upload (the
    partition, room on either disk) or for its beams (GPUs that cannot be judged, or none
    free of other users' work). None: the host takes new work."""
    settings = ctx.settings
    if hold := host_hold(reading):
        return hold
    disk, margin = (reading or {}).get("disk") or {}, settings.curator.disk_margin
    if disk.get("state") == "ok" and disk["free_bytes"] < margin:
        return (f"the remote disk ({disk['mount']} on {ctx.host_name}) has {human_size(disk['free_bytes'])} "
                f"free, less than curator.disk_margin ({human_size(margin)}); new cases wait until there is room")
    if hold := results_hold(ctx):
        return hold
    if settings.scheduler.kind == "direct" and reading is not None:
        gpus = gpu_candidates(ctx, reading, {}, ("", -1))  # our own beams end by themselves: not a hold
        if isinstance(gpus, str) or gpus == []:
            return f"new beams wait: {gpus if isinstance(gpus, str) else no_free_gpu(ctx, reading, {})}"
    return None


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
