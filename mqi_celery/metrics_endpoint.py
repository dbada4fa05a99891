"""This host's Prometheus endpoint: the samples every process of the host recorded
(``metrics``), plus gauges read from the database at each scrape: cases and jobs by status,
breakers, inbox problems, and the free disk where results land."""
from __future__ import annotations

import logging
import os
import re
import shutil

from . import context, db, metrics

log = logging.getLogger(__name__)


class DatabaseCollector:
    """Gauges read at each scrape: cheap GROUP BY queries, never per case."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from .models import CaseStatus, JobStatus

        ctx = context.current()
        settings, up = ctx.settings, GaugeMetricFamily("mqi_database_up", "The state database answers")
        try:
            store = ctx.store
            cases, jobs = store.count_by_status()
            hosts = store.host_states()
            # The configured host has a breaker from its first connection on; before that (and
            # for the local folder, which has none) it is closed.
            hosts.setdefault(settings.transport.ssh.host if settings.transport.kind == "ssh" else "local", "closed")
            problems = len(store.inbox_problems())
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even when the database does not
            log.warning("metrics: the database did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        family = GaugeMetricFamily("mqi_cases_by_status", "Cases in each status now", labels=["status"])
        for status in CaseStatus:
            family.add_metric([status.value], cases.get(status.value, 0))
        yield family
        family = GaugeMetricFamily("mqi_jobs_by_status", "Beam jobs in each status now", labels=["status"])
        for status in JobStatus:
            family.add_metric([status.value], jobs.get(status.value, 0))
        yield family
        family = GaugeMetricFamily("mqi_host_breaker_state", "Circuit breaker of each remote host (1: the state "
                                   "it is in)", labels=["host", "state"])
        for host, state in hosts.items():
            for name in ("closed", "open", "half_open"):
                family.add_metric([host, name], 1 if state == name else 0)
        yield family
        family = GaugeMetricFamily("mqi_inbox_problems", "Inbox entries that are not (yet) cases (`mqi inbox`)")
        family.add_metric([], problems)
        yield family
        family = GaugeMetricFamily("mqi_disk_free_bytes", "Free disk space", labels=["host", "path"])
        try:
            family.add_metric(["local", "results"], shutil.disk_usage(settings.paths.results).free)
        except OSError:
            pass
        readings = [h for h in store.hosts() if h["reading"]]
        for h in readings:
            disk = h["reading"].get("disk") or {}
            if disk.get("state") == "ok":
                family.add_metric([h["host"], "remote"], disk["free_bytes"])
        yield family
        yield from host_families(ctx, readings)


def host_families(ctx, hosts: list[dict]):
    """The System Curator's latest reading of each host: whether it takes work, and its GPUs."""
    from prometheus_client.core import GaugeMetricFamily

    from .admission import accepting_hold, gpu_state

    store = ctx.store
    accepting = GaugeMetricFamily("mqi_host_accepting_work", "1: the host takes new work; 0: new cases or beams "
                                  "wait (unreachable, partition closed, a disk full, GPUs unreadable or taken)",
                                  labels=["host"])
    age = GaugeMetricFamily("mqi_host_reading_age_seconds", "Age of the System Curator's latest reading",
                            labels=["host"])
    gpu = ["host", "gpu"]
    gauges = {"utilization_percent": GaugeMetricFamily("mqi_gpu_utilization_percent", "GPU utilization", labels=gpu),
              "memory_used_mib": GaugeMetricFamily("mqi_gpu_memory_used_mib", "GPU memory used", labels=gpu),
              "memory_total_mib": GaugeMetricFamily("mqi_gpu_memory_total_mib", "GPU memory in all", labels=gpu),
              "temperature_c": GaugeMetricFamily("mqi_gpu_temperature_celsius", "GPU temperature", labels=gpu)}
    state = GaugeMetricFamily("mqi_gpu_state", "Each GPU now (1: the state it is in): free, ours (a beam holds "
                              "it), shared (a beam holds it and someone else's work runs beside it) or busy "
                              "(someone else's work)", labels=["host", "gpu", "state"])
    for h in hosts:
        reading, host = h["reading"], h["host"]
        accepting.add_metric([host], 0 if accepting_hold(ctx, reading, store.breaker_state(host)) else 1)
        age.add_metric([host], (db.utcnow() - h["read_at"]).total_seconds())
        claims = store.claims(host)
        for device in (reading.get("gpus") or {}).get("devices", ()):
            index = str(device["index"])
            for key, family in gauges.items():
                if device.get(key) is not None:
                    family.add_metric([host, index], device[key])
            now = gpu_state(ctx, device, reading, claims)
            for name in ("free", "ours", "shared", "busy"):
                state.add_metric([host, index, name], 1 if name == now else 0)
    yield from (accepting, age, *gauges.values(), state)


def _forget_dead_processes(folder: str) -> None:
    """A SIGKILLed process never marks itself dead: its live gauges would count for ever."""
    for name in os.listdir(folder):
        match = re.fullmatch(r"gauge_live\w+?_(\d+)\.db", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            metrics.process_gone(int(match.group(1)))


class _LiveCollector:
    def __init__(self, folder: str):
        from prometheus_client import multiprocess

        self.folder, self.inner = folder, multiprocess.MultiProcessCollector(None, path=folder)

    def collect(self):
        _forget_dead_processes(self.folder)
        yield from self.inner.collect()


def registry():
    from prometheus_client import CollectorRegistry

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or str(context.current().settings.metrics.multiproc_dir)
    os.makedirs(folder, exist_ok=True)
    reg = CollectorRegistry()
    reg.register(_LiveCollector(folder))
    reg.register(DatabaseCollector())
    return reg


def serve(port: int, address: str):
    """Start this host's endpoint (a thread); returns the server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=address, registry=registry())
    return server
