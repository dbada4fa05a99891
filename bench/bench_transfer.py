"""SSHHost transfer speed against OpenSSH on the same loopback sshd, same cipher.

    .venv/bin/python bench/bench_transfer.py [--runs 3] [--case DIR] [--rekey-control N]

Starts its own testbed (tests/testbed, needs root), then times, interleaved, medians of
--runs: (a) the real case (../shared fixture when present, or --case DIR; else a generated
case-like folder of 250 files, ~45 MB) via SSHHost.put_tree vs
``tar c | ssh tar x``; (b) 1 GiB up via put_tree vs scp; (c) 1 GiB down via SSHHost.get vs
scp. "speed" is OpenSSH's time / ours (1.0 = as fast). Every SSHHost transfer runs on one
pooled connection that ends up carrying > 6 GiB, far past paramiko's own 512 MiB re-key
point: each must finish in time (a re-key deadlock stalls 30 s) and verify by SHA-256.
--rekey-control N also downloads 1 GiB N times over exec ``cat`` with paramiko's default
re-key interval restored, to show the deadlock our settings avoid (each hang costs 30 s).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqi_celery import ssh_pool  # noqa: E402
from mqi_celery.hosts import file_sha256  # noqa: E402
from mqi_celery.config import SSHSettings  # noqa: E402
from mqi_celery.ssh_host import SSHHost  # noqa: E402
from tests.testbed.cluster import Testbed  # noqa: E402

CIPHER = "aes128-gcm@openssh.com"
GIB = 1 << 30
STALL_SECONDS = 20
REAL_CASE = (Path(__file__).resolve().parents[2] / "shared/fixtures/cases/shi_log"
             / "1.2.840.113854.19.1.19271.1")  # a healthy 1 GiB transfer here takes 1-4 s; a re-key deadlock 30 s+


class RekeyCounter(logging.Handler):
    """Counts key re-exchanges paramiko starts (it logs them at DEBUG)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if "Rekeying" in record.getMessage():
            self.count += 1


def make_case(folder: Path, n_files: int = 250, total: int = 45_000_000, seed: int = 7) -> list[str]:
    """Like a real case: a few plan/text files, mostly 50-500 KB layer files in beam folders."""
    rng = random.Random(seed)
    sizes = ([rng.randint(50_000, 500_000) for _ in range(n_files - 10)]
             + [rng.randint(200, 5000) for _ in range(10)])
    scale = total / sum(sizes)
    names = []
    for i, size in enumerate(sizes):
        name = f"beam_{i % 3 + 1}/layer_{i:04d}.ptn" if i < n_files - 10 else f"PlanInfo_{i}.txt"
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(int(size * scale)))
        names.append(name)
    return names


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    if seconds > STALL_SECONDS:
        raise SystemExit(f"FAIL: a transfer took {seconds:.1f} s: re-key deadlock or stall")
    return seconds


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, stdin=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rekey-control", type=int, default=0, metavar="N")
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the big file (MiB, a multiple of 16)")
    ap.add_argument("--case", type=Path, default=REAL_CASE if REAL_CASE.is_dir() else None,
                    help="a case folder to upload (default: the real shared case, if present)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mqi-bench-", dir="/tmp"))
    work.chmod(0o711)  # munged wants o+x on every parent of its socket
    tb = Testbed(work / "tb")
    tb.start()
    try:
        run_all(tb, work, args)
    finally:
        ssh_pool.close_all()
        tb.stop()
        shutil.rmtree(work, ignore_errors=True)


def run_all(tb: Testbed, work: Path, args) -> dict[str, tuple[float, float]]:
    """Each transfer's median time, ours and OpenSSH's (and prints the table)."""
    settings = SSHSettings(host=tb.host, port=tb.ssh_port, user=tb.user, key_file=tb.client_key,
                           known_hosts=tb.known_hosts, ciphers=(CIPHER,))
    host = SSHHost(settings, PurePosixPath(tb.remote_root))
    remote = Path(tb.remote_root)
    ssh = f"ssh -F {tb.ssh_config} -c {CIPHER}"
    scp = f"scp -q -F {tb.ssh_config} -c {CIPHER}"

    if args.case:
        case = args.case
        names = sorted(str(p.relative_to(case)) for p in case.rglob("*") if p.is_file())
    else:
        case = work / "case"
        names = make_case(case)
    case_bytes = sum((case / n).stat().st_size for n in names)
    big = work / "big.bin"
    with open(big, "wb") as f:
        for _ in range(max(1, args.big_mib >> 4)):
            f.write(os.urandom(1 << 24))
    big_sha = file_sha256(big)
    shutil.copyfile(big, remote / "big.bin")

    rekeys = RekeyCounter()
    logging.getLogger("paramiko.transport").addHandler(rekeys)
    logging.getLogger("paramiko.transport").setLevel(logging.DEBUG)
    host.run("true")  # warm the pooled connection: the pipeline reuses it across tasks

    def fresh(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    results: dict[str, dict[str, list[float]]] = {}

    def bench(row: str, ours, theirs, check, before_ours=lambda: None) -> None:
        times = results.setdefault(row, {"ours": [], "openssh": []})
        for i in range(args.runs):
            order = [("ours", ours), ("openssh", theirs)][:: 1 if i % 2 == 0 else -1]
            for who, fn in order:  # alternate who goes first: the machine is shared
                os.sync()  # no write-back of the previous run's GiB inside this one's time
                if who == "ours":
                    before_ours()
                times[who].append(timed(fn))
                check(who)
            print(f"  {row} run {i + 1}: ours {times['ours'][-1]:.2f} s, "
                  f"openssh {times['openssh'][-1]:.2f} s", flush=True)

    # (a) case folder upload
    def case_check(who):
        dst = remote / f"case-{who}"
        assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == sorted(names), who
        fresh(dst)
    bench(f"case upload ({len(names)} files, {case_bytes / 1e6:.0f} MB)",
          lambda: host.put_tree(case, host.root / "case-ours", names),
          lambda: sh(f"tar -C {case} -cf - . | {ssh} testbed 'mkdir -p {remote}/case-openssh && "
                     f"tar -C {remote}/case-openssh -xf -'"),
          case_check)

    mux = f"{ssh} -o ControlMaster=auto -o ControlPath={work}/mux-%C -o ControlPersist=120"
    sh(f"{mux} testbed true")  # the master connection OpenSSH then reuses
    bench("case upload, warm connections (ssh ControlMaster)",
          lambda: host.put_tree(case, host.root / "case-ours", names),
          lambda: sh(f"tar -C {case} -cf - . | {mux} testbed 'mkdir -p {remote}/case-openssh && "
                     f"tar -C {remote}/case-openssh -xf -'"),
          case_check)
    sh(f"{mux} -O exit testbed 2>/dev/null")

    # include connect + key exchange + auth, as a new ssh process does
    bench("case upload, new connection each time",
          lambda: host.put_tree(case, host.root / "case-ours", names),
          lambda: sh(f"tar -C {case} -cf - . | {ssh} testbed 'mkdir -p {remote}/case-openssh && "
                     f"tar -C {remote}/case-openssh -xf -'"),
          case_check, before_ours=ssh_pool.close_all)

    # (b) 1 GiB up
    def up_check(who):
        dst = remote / f"up-{who}" / "big.bin"
        assert file_sha256(dst) == big_sha, f"{who}: upload corrupted"
        fresh(dst)
    size = "1 GiB" if args.big_mib == 1024 else f"{args.big_mib} MiB"
    bench(f"{size} upload (put_tree vs scp)",
          lambda: host.put_tree(work, host.root / "up-ours", ["big.bin"]),
          lambda: sh(f"mkdir -p {remote}/up-openssh && {scp} {big} testbed:{remote}/up-openssh/big.bin"),
          up_check)

    # (c) 1 GiB down
    def down_check(who):
        got = work / f"down-{who}.bin"
        assert file_sha256(got) == big_sha, f"{who}: download corrupted"
        fresh(got)
    bench(f"{size} download (get vs scp)",
          lambda: host.get(host.root / "big.bin", work / "down-ours.bin"),
          lambda: sh(f"{scp} testbed:{remote}/big.bin {work}/down-openssh.bin"),
          down_check)

    conn = ssh_pool.current(settings)
    print(f"\n{'transfer':50} {'SSHHost':>9} {'OpenSSH':>9} {'speed':>7}  (median of {args.runs})")
    medians = {}
    for row, t in results.items():
        ours, theirs = statistics.median(t["ours"]), statistics.median(t["openssh"])
        medians[row] = (ours, theirs)
        print(f"{row:50} {ours:8.2f}s {theirs:8.2f}s {theirs / ours:6.2f}x")
    print(f"\npooled connection carried ~{conn.moved / GIB:.1f} GiB of payload; paramiko re-keys "
          f"started: {rekeys.count}; handshakes {SSHHost.stats.handshakes}, reconnects "
          f"{SSHHost.stats.reconnects}; every transfer verified by SHA-256, none stalled")

    if args.rekey_control:
        rekey_control(host, settings, remote, args.rekey_control, rekeys)
    return medians


def rekey_control(host: SSHHost, settings: SSHSettings, remote: Path, n: int, rekeys: RekeyCounter) -> None:
    """1 GiB over exec `cat` with paramiko's default 512 MiB re-key interval."""
    import paramiko

    print(f"\ncontrol: {n} x 1 GiB exec-cat downloads with paramiko's default re-key interval")
    hangs = 0
    for i in range(n):
        ssh_pool.close_all()
        host.run("true")
        t = ssh_pool.current(settings).transport
        t.packetizer.REKEY_BYTES = paramiko.packet.Packetizer.REKEY_BYTES  # 2**29
        before = rekeys.count
        t0 = time.perf_counter()
        chan = t.open_session()
        chan.settimeout(120)
        chan.exec_command(f"cat {remote}/big.bin")
        try:
            while chan.recv(1 << 20):
                pass
            status = chan.recv_exit_status()
            ok = status == 0 and t.is_active()
        except Exception as exc:  # noqa: BLE001  (report whatever paramiko raised)
            ok, status = False, repr(exc)
        dt = time.perf_counter() - t0
        hangs += (not ok) or dt > STALL_SECONDS
        print(f"  run {i + 1}: {dt:.1f} s, re-keys {rekeys.count - before}, exit {status}, "
              f"transport {'alive' if t.is_active() else 'DEAD'}", flush=True)
    print(f"control: {hangs}/{n} runs stalled or failed")


if __name__ == "__main__":
    main()
