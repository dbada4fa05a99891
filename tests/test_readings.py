"""The System Curator's parsing of nvidia-smi, df and sinfo: exact on real captures from
an NVIDIA H200 (tests/fixtures/nvidia-smi/h200, copied from ../shared/fixtures), and an
"unknown" state with a reason, never an exception, on everything malformed."""
from __future__ import annotations

from pathlib import Path

import pytest

from mqi_celery import readings

H200 = Path(__file__).parent / "fixtures" / "nvidia-smi" / "h200"
UUID = "GPU-4d9b8fc3-08a5-1431-9bd8-94a76ef268c5"


def capture_fields(name: str) -> tuple[str, ...]:
    """The field list of a capture, from the header of its headed twin (units dropped)."""
    header = (H200 / name).read_text().splitlines()[0]
    return tuple(f.strip().split(" [")[0] for f in header.split(","))


GPU_CAPTURE_FIELDS = capture_fields("query-gpu_busy.csv")
APP_CAPTURE_FIELDS = tuple(f if f != "used_gpu_memory" else "used_memory"
                           for f in capture_fields("compute-apps_busy.csv") if f != "gpu_bus_id")


def parse_capture(state: str) -> dict:
    return readings.parse_gpus((H200 / f"query-gpu-noheader-nounits_{state}.csv").read_text(), 0,
                               (H200 / f"compute-apps-noheader-nounits_{state}.csv").read_text(), 0,
                               gpu_fields=GPU_CAPTURE_FIELDS, app_fields=APP_CAPTURE_FIELDS)


def test_the_busy_h200_capture_is_read_exactly():
    part = parse_capture("busy")
    assert part["state"] == "ok"
    [gpu] = part["devices"]
    assert gpu == {"index": 0, "uuid": UUID, "name": "NVIDIA H200", "utilization_percent": 100.0,
                   "memory_used_mib": 21363, "memory_total_mib": 143771, "memory_free_mib": 121794,
                   "temperature_c": 55.0, "power_w": 692.04,
                   "processes": [{"pid": 441, "name": "python3", "used_memory_mib": 21354}]}


def test_the_idle_h200_capture_has_no_process():
    [gpu] = parse_capture("idle")["devices"]
    assert (gpu["utilization_percent"], gpu["memory_used_mib"], gpu["memory_free_mib"]) == (0.0, 0, 143156)
    assert (gpu["temperature_c"], gpu["power_w"], gpu["processes"]) == (33.0, 130.20, [])


def test_the_capture_read_with_units_gives_the_same_figures():
    """The headed capture keeps its units (``100 %``, ``21363 MiB``): tolerated."""
    lines = (H200 / "query-gpu_busy.csv").read_text().splitlines()[1:]
    part = readings.parse_gpus("\n".join(lines), 0, "", 0, gpu_fields=GPU_CAPTURE_FIELDS, app_fields=APP_CAPTURE_FIELDS)
    assert part["devices"][0]["memory_used_mib"] == 21363 and part["devices"][0]["power_w"] == 691.97


MULTI = """0, GPU-aaaa, NVIDIA H200, 3, 120, 143771, 143651, 31, 120.5
1, GPU-bbbb, NVIDIA H200, 100, 40000, 143771, 103771, 61, 650.0
2, GPU-cccc, NVIDIA H200, [N/A], N/A, 143771, [Not Supported], N/A, [Not Supported]
"""


def test_several_gpus_with_not_available_values():
    part = readings.parse_gpus(MULTI, 0, "GPU-bbbb, 7001, python3, 39000\nGPU-bbbb, 7002, moqui, 900\n", 0)
    assert part["state"] == "ok"
    a, b, c = part["devices"]
    assert a["processes"] == [] and [p["pid"] for p in b["processes"]] == [7001, 7002]
    assert c["utilization_percent"] is None and c["memory_used_mib"] is None and c["power_w"] is None
    assert c["memory_total_mib"] == 143771


@pytest.mark.parametrize("gpu_text, app_text, reason", [
    ("0, GPU-aaaa, NVIDIA H200, 3, 120\n", "", "row 1 has 5 values, expected 9"),
    ("0, GPU-aaaa, NVIDIA H200, lots, 120, 143771, 143651, 31, 120.5\n", "", "utilization.gpu: 'lots' is not a number"),
    ("zero, GPU-aaaa, NVIDIA H200, 3, 120, 143771, 143651, 31, 120.5\n", "", "index: 'zero' is not a number"),
    ("N/A, GPU-aaaa, NVIDIA H200, 3, 120, 143771, 143651, 31, 120.5\n", "", "without index or UUID"),
    (MULTI + MULTI, "", "one GPU index twice"),
    (MULTI, "GPU-zzzz, 1, x, 10\n", "processes on a GPU it did not list"),
    (MULTI, "GPU-bbbb, 7001\n", "row 1 has 2 values, expected 4"),
    ("\x00\xff garbage", "", "row 1 has 1 values"),
])
def test_malformed_nvidia_smi_output_is_unknown_with_the_reason(gpu_text, app_text, reason):
    part = readings.parse_gpus(gpu_text, 0, app_text, 0)
    assert part["state"] == "unknown" and reason in part["reason"], part


def test_an_empty_gpu_list_is_a_host_without_gpus():
    assert readings.parse_gpus("", 0, "", 0) == {"state": "ok", "devices": []}


@pytest.mark.parametrize("code, output, state, reason", [
    (127, "sh: 1: nvidia-smi: not found", "absent", "nvidia-smi is not installed"),
    (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", "unknown",
     "failed (exit 9): NVIDIA-SMI has failed"),
    (255, "", "unknown", "exit 255): no output"),
])
def test_nvidia_smi_failing_is_absent_or_unknown(code, output, state, reason):
    part = readings.parse_gpus(output, code, "", 0)
    assert part["state"] == state and reason in part["reason"]


def test_the_h200_df_capture():
    disk = readings.parse_df((H200 / "df-P.txt").read_text(), 0)
    assert disk == {"state": "ok", "total_bytes": 264212084 * 1024, "free_bytes": 67092040 * 1024, "mount": "/"}


@pytest.mark.parametrize("text, code, reason", [
    ("", 0, "could not be read"),
    ("Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/x lots of space /\n", 0, "could not be read"),
    ("df: /remote: No such file or directory", 1, "df failed (exit 1): df: /remote"),
])
def test_malformed_df_is_unknown(text, code, reason):
    disk = readings.parse_df(text, code)
    assert disk["state"] == "unknown" and reason in disk["reason"]


SINFO = """gpu01|debug*|up|mixed|none
gpu02|debug*|up|drained|maintenance by IT
gpu01|urgent|up|mixed|none
"""


def test_sinfo_a_partition_with_one_usable_node_accepts():
    nodes = readings.parse_sinfo(SINFO, 0, partition=None)
    assert nodes["partition"] == "debug" and nodes["usable_nodes"] == 1 and nodes["accepting"]


@pytest.mark.parametrize("text, reason", [
    ("n1|debug*|up|drained|disk swap\n", "no node of Slurm partition debug takes jobs: n1 drained (disk swap)"),
    ("n1|debug*|up|draining|upgrade\n", "n1 draining (upgrade)"),
    ("n1|debug*|up|down*|Not responding\n", "n1 down* (Not responding)"),
    ("n1|debug*|up|maint|none\n", "n1 maint"),
    ("n1|debug*|up|idle$|none\n", "n1 idle$"),
    ("n1|debug*|up|idle*|none\n", "n1 idle*"),
    ("n1|debug*|down|idle|none\n", "Slurm partition debug is down"),
    ("n1|debug*|inact|idle|none\n", "Slurm partition debug is inact"),
])
def test_sinfo_a_partition_nobody_can_use_holds_with_the_reason(text, reason):
    nodes = readings.parse_sinfo(text, 0, partition=None)
    assert nodes["state"] == "ok" and not nodes["accepting"] and reason in nodes["reason"]


@pytest.mark.parametrize("text, code, partition, reason", [
    ("n1|debug*|up\n", 0, None, "sinfo line 1 could not be read"),
    (SINFO, 0, "gpu-long", "no node in partition gpu-long"),
    ("slurm_load_partitions: Unable to contact slurm controller", 1, None, "sinfo failed (exit 1)"),
])
def test_malformed_sinfo_is_unknown(text, code, partition, reason):
    nodes = readings.parse_sinfo(text, code, partition=partition)
    assert nodes["state"] == "unknown" and reason in nodes["reason"]


def test_one_command_output_split_into_its_parts():
    script = readings.command("/remote/root", slurm=True)
    assert script.count("##mqi exit") == 4 and "/remote/root" in script
    text = ("##mqi gpus\n" + MULTI + "##mqi exit 0\n##mqi apps\n##mqi exit 0\n##mqi disk\n"
            + (H200 / "df-P.txt").read_text() + "##mqi exit 0\n##mqi nodes\n" + SINFO + "##mqi exit 0\n")
    reading = readings.parse(text, host="h", slurm=True, partition="debug")
    assert len(reading["gpus"]["devices"]) == 3 and reading["disk"]["free_bytes"] == 67092040 * 1024
    assert reading["nodes"]["accepting"]


def test_output_cut_short_leaves_the_missing_parts_unknown():
    reading = readings.parse("##mqi gpus\n" + MULTI, host="h", slurm=True, partition=None, returncode=255,
                             stderr="Connection reset")
    assert reading["gpus"]["state"] == reading["disk"]["state"] == reading["nodes"]["state"] == "unknown"
    assert "exit 255" in reading["disk"]["reason"] and "Connection reset" in reading["disk"]["reason"]


class DroppedHost:
    name, root = "cluster", "/remote"

    def run(self, command, timeout):
        raise ConnectionResetError("connection dropped")


def test_a_host_that_drops_the_connection_gives_an_unknown_reading():
    reading = readings.take(DroppedHost(), slurm=True, partition=None)
    assert {reading[p]["state"] for p in ("gpus", "disk", "nodes")} == {"unknown"}
    assert "connection dropped" in reading["disk"]["reason"]
