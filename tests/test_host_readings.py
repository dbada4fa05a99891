"""The System Curator's parsing of nvidia-smi, df and sinfo: exact on real captures from
an NVIDIA H200 (tests/fixtures/nvidia-smi/h200, copied from ../shared/fixtures), and an
"unknown" state with a reason, never an exception, on everything malformed."""
from __future__ import annotations

from pathlib import Path

import pytest

from mqi_celery import host_readings

H200 = Path(__file__).parent / "fixtures" / "nvidia-smi" / "h200"
UUID = "GPU-4d9b8fc3-08a5-1431-9bd8-94a76ef268c5"


def capture_fields(name: str) -> tuple[str, ...]:
    """The field list of a capture, from the header of its headed twin (units dropped)."""
    header = (H200 / name).read_text().splitlines()[0]
    return tuple(f.strip().split(" [")[0] for f in header.split(","))


GPU_CAPTURE_FIELDS = capture_fields("query-gpu_busy.csv")
APP_CAPTURE_FIELDS = tuple(f if f != "used_gpu_memory" else "used_memory"
                           for f in capture_fields("compute-apps_busy.csv") if f != "gpu_bus_id")


def parse_capture(state: str, sessions: str = "") -> dict:
    return host_readings.parse_gpus((H200 / f"query-gpu-noheader-nounits_{state}.csv").read_text(), 0,
                               (H200 / f"compute-apps-noheader-nounits_{state}.csv").read_text(), 0,
                               sessions=sessions, gpu_fields=GPU_CAPTURE_FIELDS, app_fields=APP_CAPTURE_FIELDS)


def test_the_busy_h200_capture_is_read_exactly():
    part = parse_capture("busy", sessions="  441   398\n")  # ps -o pid=,sid= of the process
    assert part["state"] == "ok"
    [gpu] = part["devices"]
    assert gpu == {"index": 0, "uuid": UUID, "name": "NVIDIA H200", "utilization_percent": 100.0,
                   "memory_used_mib": 21363, "memory_total_mib": 143771, "memory_free_mib": 121794,
                   "temperature_c": 55.0, "power_w": 692.04,
                   "processes": [{"pid": 441, "name": "python3", "used_memory_mib": 21354, "session": 398}]}


def test_the_idle_h200_capture_has_no_process():
    [gpu] = parse_capture("idle")["devices"]
    assert (gpu["utilization_percent"], gpu["memory_used_mib"], gpu["memory_free_mib"]) == (0.0, 0, 143156)
    assert (gpu["temperature_c"], gpu["power_w"], gpu["processes"]) == (33.0, 130.20, [])


def test_the_capture_read_with_units_gives_the_same_figures():
    """The headed capture keeps its units (``100 %``, ``21363 MiB``): tolerated."""
    lines = (H200 / "query-gpu_busy.csv").read_text().splitlines()[1:]
    part = host_readings.parse_gpus("\n".join(lines), 0, "", 0, gpu_fields=GPU_CAPTURE_FIELDS, app_fields=APP_CAPTURE_FIELDS)
    assert part["devices"][0]["memory_used_mib"] == 21363 and part["devices"][0]["power_w"] == 691.97


MULTI = """0, GPU-aaaa, NVIDIA H200, 3, 120, 143771, 143651, 31, 120.5
1, GPU-bbbb, NVIDIA H200, 100, 40000, 143771, 103771, 61, 650.0
2, GPU-cccc, NVIDIA H200, [N/A], N/A, 143771, [Not Supported], N/A, [Not Supported]
"""


def test_several_gpus_with_not_available_values():
    part = host_readings.parse_gpus(MULTI, 0, "GPU-bbbb, 7001, python3, 39000\nGPU-bbbb, 7002, moqui, 900\n", 0)
    assert part["state"] == "ok"
    a, b, c = part["devices"]
    assert a["processes"] == [] and [p["pid"] for p in b["processes"]] == [7001, 7002]
    assert c["utilization_percent"] is None and c["memory_used_mib"] is None and c["power_w"] is None
    assert c["memory_total_mib"] == 143771


@pytest.mark.parametrize("gpu_text, app_text, reason", [
    ("0, GPU-aaaa, NVIDIA H200, 3, 120\n", "", "printed no GPU it could read: 0, GPU-aaaa, NVIDIA H200, 3, 120"),
    ("0, GPU-aaaa, NVIDIA H200, lots, 120, 143771, 143651, 31, 120.5\n", "", "utilization.gpu: 'lots' is not a number"),
    ("zero, GPU-aaaa, NVIDIA H200, 3, 120, 143771, 143651, 31, 120.5\n", "", "index: 'zero' is not a number"),
    ("N/A, GPU-aaaa, NVIDIA H200, 3, 120, 143771, 143651, 31, 120.5\n", "", "without index or UUID"),
    (MULTI + MULTI, "", "one GPU index twice"),
    (MULTI, "GPU-zzzz, 1, x, 10\n", "processes on a GPU it did not list"),
    (MULTI, "GPU-bbbb, 7001\n", "could not be read (GPU-bbbb, 7001)"),
    ("\x00\xff garbage", "", "printed no GPU it could read"),
])
def test_malformed_nvidia_smi_output_is_unknown_with_the_reason(gpu_text, app_text, reason):
    part = host_readings.parse_gpus(gpu_text, 0, app_text, 0)
    assert part["state"] == "unknown" and reason in part["reason"], part


UNREADABLE = "Unable to determine the device handle for GPU0000:41:00.0: Unknown Error"


@pytest.mark.parametrize("code", [0, 15])
def test_one_unreadable_gpu_leaves_the_others_usable_and_quotes_the_tools_line(code):
    """nvidia-smi prints the healthy GPUs' rows and one error line for the broken GPU, with
    exit 0 or not; the reason is that line, never a healthy GPU's row."""
    gpus = MULTI.splitlines()
    text = "\n".join([gpus[0], UNREADABLE, gpus[1]]) + "\n"
    apps = f"GPU-bbbb, 7001, python3, 39000\n{UNREADABLE}\nGPU-dead, 7002, moqui, 900\n"
    part = host_readings.parse_gpus(text, code, apps, code, sessions="7001 7001\n")
    assert part["state"] == "ok" and [d["index"] for d in part["devices"]] == [0, 1]
    assert part["unreadable"] == [UNREADABLE]
    assert part["devices"][1]["processes"] == [{"pid": 7001, "name": "python3", "used_memory_mib": 39000,
                                                "session": 7001}]


def test_a_process_query_that_fails_otherwise_leaves_nothing_judged():
    """An unreadable GPU excuses only its own line: any other failure of the process query
    could hide another user's process on a healthy GPU."""
    gpus = MULTI.splitlines()
    text = "\n".join([gpus[0], UNREADABLE]) + "\n"
    part = host_readings.parse_gpus(text, 15, "Failed to query the compute processes\n", 15)
    assert part["state"] == "unknown" and "Failed to query the compute processes" in part["reason"]
    assert host_readings.parse_gpus(text, 15, "", 15)["state"] == "unknown"  # failed, said nothing


def test_every_gpu_unreadable_is_unknown_with_the_tools_line():
    part = host_readings.parse_gpus(UNREADABLE + "\n", 15, "", 0)
    assert part == {"state": "unknown", "reason": f"nvidia-smi --query-gpu failed (exit 15): {UNREADABLE}"}


@pytest.mark.parametrize("sections, reason", [
    ("##mqi gpus\n##mqi exit 124\n", "nvidia-smi did not answer within 9 s (stopped on the host)"),
    ("##mqi gpus\n##mqi exit 137\n", "nvidia-smi did not answer within 9 s (stopped on the host)"),
    ("##mqi gpus\n" + MULTI + "##mqi exit 0\n##mqi apps\n##mqi exit 124\n",
     "nvidia-smi --query-compute-apps did not answer within 9 s (stopped on the host)"),
])
def test_a_tool_stopped_by_its_time_limit_on_the_host_is_unknown(sections, reason):
    reading = host_readings.parse(sections + "##mqi disk\n##mqi exit 124\n", host="h", slurm=False, partition=None,
                             limit=9)
    assert reading["gpus"] == {"state": "unknown", "reason": reason}
    assert reading["disk"] == {"state": "unknown", "reason": "df did not answer within 9 s (stopped on the host)"}


def test_every_tool_of_a_reading_runs_under_a_time_limit_on_the_host():
    script = host_readings.command("/remote/root", slurm=True, limit=9)
    for tool in ("nvidia-smi --query-gpu", "nvidia-smi --query-compute-apps", "sh -c 'mkdir -p \"$1\" && exec df -P",
                 "sinfo"):
        assert f"timeout -k 2 9 {tool}" in script, tool
    assert "timeout -k 1 3 ps -o pid=,sid=" in script
    # In sequence, each killed 2 s after its limit, ps included: the whole stays within the timeout.
    assert 3 * (host_readings.tool_limit(30, gpus=True, slurm=False) + 2) + 3 <= 30
    assert 2 * (host_readings.tool_limit(30, gpus=False, slurm=True) + 2) + 3 <= 30


def test_an_empty_gpu_list_is_a_host_without_gpus():
    assert host_readings.parse_gpus("", 0, "", 0) == {"state": "ok", "devices": []}


@pytest.mark.parametrize("code, output, state, reason", [
    (127, "sh: 1: nvidia-smi: not found", "absent", "nvidia-smi is not installed"),
    (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", "unknown",
     "failed (exit 9): NVIDIA-SMI has failed"),
    (255, "", "unknown", "exit 255): no output"),
])
def test_nvidia_smi_failing_is_absent_or_unknown(code, output, state, reason):
    part = host_readings.parse_gpus(output, code, "", 0)
    assert part["state"] == state and reason in part["reason"]


def test_the_h200_df_capture():
    disk = host_readings.parse_df((H200 / "df-P.txt").read_text(), 0)
    assert disk == {"state": "ok", "total_bytes": 264212084 * 1024, "free_bytes": 67092040 * 1024, "mount": "/"}


@pytest.mark.parametrize("text, code, reason", [
    ("", 0, "could not be read"),
    ("Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/x lots of space /\n", 0, "could not be read"),
    ("df: /remote: No such file or directory", 1, "df failed (exit 1): df: /remote"),
])
def test_malformed_df_is_unknown(text, code, reason):
    disk = host_readings.parse_df(text, code)
    assert disk["state"] == "unknown" and reason in disk["reason"]


SINFO = """gpu01|debug*|up|mixed|none
gpu02|debug*|up|drained|maintenance by IT
gpu01|urgent|up|mixed|none
"""


def test_sinfo_a_partition_with_one_usable_node_accepts():
    nodes = host_readings.parse_sinfo(SINFO, 0, partition=None)
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
    nodes = host_readings.parse_sinfo(text, 0, partition=None)
    assert nodes["state"] == "ok" and not nodes["accepting"] and reason in nodes["reason"]


@pytest.mark.parametrize("text, code, partition, reason", [
    ("n1|debug*|up\n", 0, None, "sinfo line 1 could not be read"),
    (SINFO, 0, "gpu-long", "no node in partition gpu-long"),
    ("slurm_load_partitions: Unable to contact slurm controller", 1, None, "sinfo failed (exit 1)"),
])
def test_malformed_sinfo_is_unknown(text, code, partition, reason):
    nodes = host_readings.parse_sinfo(text, code, partition=partition)
    assert nodes["state"] == "unknown" and reason in nodes["reason"]


def test_one_command_output_split_into_its_parts():
    script = host_readings.command("/remote/root", slurm=True)
    assert script.count("##mqi exit") == 5 and "/remote/root" in script  # gpus, apps, sessions, disk, nodes
    text = ("##mqi gpus\n" + MULTI + "##mqi exit 0\n##mqi apps\n##mqi exit 0\n##mqi disk\n"
            + (H200 / "df-P.txt").read_text() + "##mqi exit 0\n##mqi nodes\n" + SINFO + "##mqi exit 0\n")
    reading = host_readings.parse(text, host="h", slurm=True, partition="debug")
    assert len(reading["gpus"]["devices"]) == 3 and reading["disk"]["free_bytes"] == 67092040 * 1024
    assert reading["nodes"]["accepting"]


def test_output_cut_short_leaves_the_missing_parts_unknown():
    reading = host_readings.parse("##mqi gpus\n" + MULTI, host="h", slurm=True, partition=None, returncode=255,
                             stderr="Connection reset")
    assert reading["gpus"]["state"] == reading["disk"]["state"] == reading["nodes"]["state"] == "unknown"
    assert "exit 255" in reading["disk"]["reason"] and "Connection reset" in reading["disk"]["reason"]


class DroppedHost:
    name, root = "cluster", "/remote"

    def run(self, command, timeout):
        raise ConnectionResetError("connection dropped")


def test_a_host_that_drops_the_connection_gives_an_unknown_reading():
    reading = host_readings.take(DroppedHost(), slurm=True, partition=None)
    assert {reading[p]["state"] for p in ("gpus", "disk", "nodes")} == {"unknown"}
    assert "connection dropped" in reading["disk"]["reason"]
