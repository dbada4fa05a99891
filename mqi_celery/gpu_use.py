"""Whose work is on each GPU of a direct host, from one reading (see ``readings``).

Ours are the processes we started: each beam's run leads its own session on the host (the
pid the direct scheduler recorded), so a GPU process in one of those sessions is ours and
any other is someone else's, also on a GPU one of our beams holds. Memory in use beyond
what our processes use is someone else's too. Only where the host lists no process at all
(a driver that hides them, e.g. in a container) is memory on a GPU we held taken as ours.
"""
from __future__ import annotations


def mark_ours(reading: dict, runs: set[int], starting: set[int] = frozenset()) -> None:
    """Mark each GPU process of the reading ``ours`` when its session (or itself) is one of
    ``runs``: the pids that lead our runs' sessions. On a GPU in ``starting`` (claimed by a
    beam whose run is being started, its pid not recorded yet) every process is taken as
    ours for this reading: the next one tells which are someone else's."""
    for device in ((reading.get("gpus") or {}).get("devices") or ()):
        for process in device.get("processes") or ():
            process["ours"] = (process.get("session") in runs or process.get("pid") in runs
                               or device["index"] in starting)


def foreign(device: dict, reading: dict, threshold_mib: int) -> dict | None:
    """Someone else's use of the GPU: ``{"processes": [...], "memory_mib": n}``, or None."""
    processes = device.get("processes") or []
    theirs = [p for p in processes if not p.get("ours")]
    used = device.get("memory_used_mib") or 0
    if theirs:
        return {"processes": theirs, "memory_mib": sum(p.get("used_memory_mib") or 0 for p in theirs) or used}
    if not processes and f"gpu:{device['index']}" in set(reading.get("claimed", ())):
        return None  # held by a beam of ours and no process visible: its memory is taken as ours
    beyond = used - sum(p.get("used_memory_mib") or 0 for p in processes)
    return {"processes": [], "memory_mib": beyond} if beyond >= threshold_mib > 0 else None


def state(device: dict, reading: dict, holder, allowed, threshold_mib: int) -> str:
    """free | ours | shared (ours, and someone else's beside it) | busy | excluded."""
    if allowed is not None and device["index"] not in allowed:
        return "excluded"
    other = foreign(device, reading, threshold_mib)
    if holder:
        return "shared" if other else "ours"
    return "busy" if other else "free"


def describe(use: dict) -> str:
    """"process 4242, 12000 MiB" / "2 processes, 900 MiB" / "12000 MiB, no process listed"."""
    procs, memory = use["processes"], use["memory_mib"]
    if not procs:
        return f"{memory} MiB, no process listed"
    if len(procs) == 1:
        return f"process {procs[0].get('pid')}, {memory} MiB"
    return f"{len(procs)} processes, {memory} MiB"
