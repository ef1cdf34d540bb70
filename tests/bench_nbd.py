#!/usr/bin/env python3
"""NBD export benchmark (run by hand; not collected by pytest), side by side in one run:
fio --ioengine=nbd over ``nvpool export`` of a pool volume, over ``nvpool export --file`` (the front end
alone) and over ``nbdkit file`` serving the same bytes from one file: 4 KiB random read IOPS at QD32,
QD1 p50/p99 latency, 1 MiB sequential read MB/s, with the ratios to nbdkit; and the CPU each server (the
export with the pool's agents, or nbdkit) spends per 4 KiB read at QD32. Each figure is the median of
``--rounds`` rounds, the servers taken in turn in each round (these machines are noisy).

    .venv/bin/python tests/bench_nbd.py [--size 512M] [--seconds 4] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nvpool.proto.units import parse_size  # noqa: E402
from nvpool.client.cluster import LocalCluster  # noqa: E402
from nvpool.proto import compiled  # noqa: E402
from tests.bench_dataplane import fio, fio_figures, proc_cpu_s  # noqa: E402


def wait_path(p: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(p):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server for {p} did not start")
        time.sleep(0.05)


def with_children(pids: list[int]) -> list[int]:
    """``pids`` and all their descendants (an export's --workers are processes of their own)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = set(pids), list(pids)
    while todo:
        p = todo.pop()
        for child, pp in parent.items():
            if pp == p and child not in out:
                out.add(child)
                todo.append(child)
    return sorted(out)


def measure(uri: str, seconds: float, size: int, pids: list[int]) -> dict[str, float]:
    """fio's figures over ``uri``, and the CPU ``pids`` (the server's processes, with their children)
    spend per 4 KiB read at QD32."""
    common = ["--ioengine=nbd", f"--uri={uri}", f"--runtime={seconds}", "--time_based", f"--size={size}"]
    procs = with_children(pids)
    c0 = sum(proc_cpu_s(p) for p in procs)
    j32 = fio(["--name=q32", "--rw=randread", "--bs=4k", "--iodepth=32", *common])
    cpu_us = 1e6 * (sum(proc_cpu_s(p) for p in procs) - c0) / max(1, j32["read"]["total_ios"])
    q32 = fio_figures(j32, "read")
    q1 = fio_figures(fio(["--name=q1", "--rw=randread", "--bs=4k", "--iodepth=1", *common]), "read")
    seq = fio_figures(fio(["--name=seq", "--rw=read", "--bs=1M", "--iodepth=8", *common]), "read")
    multi = fio_figures(fio(["--name=m", "--rw=randread", "--bs=4k", "--iodepth=8", "--numjobs=4", "--group_reporting", *common]), "read")
    return {"iops_qd32": q32["iops"], "p50_us_qd1": q1["p50_us"], "p99_us_qd1": q1["p99_us"], "seq_MBps": seq["MBps"],
            "iops_4conn": multi["iops"], "cpu_us_qd32": cpu_us}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every server in turn (medians are printed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("fio", "nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (./deploy/bootstrap.sh installs it)")
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="nvpool-nbdbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    os.environ.pop("NVPOOL_TLS", None)  # plaintext pool (tests/bench_tls.py measures TLS)
    c = LocalCluster(work / "pool", agents=4, drives_per_agent=1, drive_size=str(size // 2 + 256 * (1 << 20)), tls=False)
    try:
        c.up()
        data = work / "data.img"
        with open(data, "wb") as f:
            for _ in range(size // (1 << 20)):
                f.write(os.urandom(1 << 20))
        from nvpool import client

        with client.connect(c.meta.address) as pool:
            # one volume per export: each export holds its volume's writer lease
            pool.create_volume("nbdbench", size)
            pool.create_volume("nbdbench2", size)
        servers = {
            "nvpool export (pool volume, 4 agents)": ["nbdbench", "--meta", c.meta.address],
            "nvpool export --workers 2 (pool volume)": ["nbdbench2", "--meta", c.meta.address, "--workers", "2"],
            "nvpool export --file (front end alone)": ["--file", str(data)],
        }
        uris: dict[str, str] = {}
        pids: dict[str, list[int]] = {}
        agents = [a.pid for a in c.agents]
        for label, extra in servers.items():
            sock = str(work / f"{len(uris)}.sock")
            p = subprocess.Popen([sys.executable, "-m", "nvpool", "export", *extra, "--socket", sock,
                                  "--ready-file", sock + ".ready"], cwd=ROOT)
            procs.append(p)
            wait_path(sock + ".ready", p)
            uris[label] = f"nbd+unix:///?socket={sock}"
            pids[label] = [p.pid] + (agents if "--file" not in extra else [])
        sock = str(work / "nbdkit.sock")
        p = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", str(data)])
        procs.append(p)
        wait_path(sock, p)
        uris["nbdkit file (C peer)"] = f"nbd+unix:///?socket={sock}"
        pids["nbdkit file (C peer)"] = [p.pid]
        # same bytes everywhere, caches warm
        subprocess.run(["nbdcopy", str(data), uris["nvpool export (pool volume, 4 agents)"]], check=True)
        subprocess.run(["nbdcopy", str(data), uris["nvpool export --workers 2 (pool volume)"]], check=True)
        rounds: dict[str, list[dict[str, float]]] = {label: [] for label in uris}
        for _ in range(args.rounds):
            for label, uri in uris.items():
                rounds[label].append(measure(uri, args.seconds, size, pids[label]))
        results = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in rounds.items()}
        ref = results["nbdkit file (C peer)"]
        print(f"\nmedians of {args.rounds} rounds")
        print(f"{'server':<42} {'4K QD32 IOPS':>13} {'QD1 p50 us':>11} {'QD1 p99 us':>11} {'1M seq MB/s':>12} "
              f"{'4K 4 conn x QD8':>16} {'CPU us/4K QD32':>15}")
        for label, r in results.items():
            print(f"{label:<42} {r['iops_qd32']:>13.0f} {r['p50_us_qd1']:>11.1f} {r['p99_us_qd1']:>11.1f} "
                  f"{r['seq_MBps']:>12.0f} {r['iops_4conn']:>16.0f} {r['cpu_us_qd32']:>15.1f}")
            if label != "nbdkit file (C peer)":
                print(f"{'  ratio to nbdkit':<42} {r['iops_qd32'] / ref['iops_qd32']:>13.2f} "
                      f"{r['p50_us_qd1'] / ref['p50_us_qd1']:>11.2f} {r['p99_us_qd1'] / ref['p99_us_qd1']:>11.2f} "
                      f"{r['seq_MBps'] / ref['seq_MBps']:>12.2f} {r['iops_4conn'] / ref['iops_4conn']:>16.2f} "
                      f"{r['cpu_us_qd32'] / ref['cpu_us_qd32']:>15.2f}")
        print("(CPU: the export's process and the pool's 4 agents together, or nbdkit's)")
        pool_r = results["nvpool export (pool volume, 4 agents)"]
        q, lat = pool_r["iops_qd32"] / ref["iops_qd32"], pool_r["p50_us_qd1"] / ref["p50_us_qd1"]
        print(f"\ngoals (issue 17), nvpool export of a pool volume vs nbdkit: 4K QD32 IOPS {q:.2f}x (goal >= 0.7: "
              f"{'met' if q >= 0.7 else 'NOT met'}), QD1 p50 {lat:.2f}x (goal <= 2: {'met' if lat <= 2 else 'NOT met'})")
        print("data plane: " + ", ".join(f"{k.rsplit('.', 1)[1]} {v}" for k, v in compiled.status().items()))
        if args.json:
            print(json.dumps(results, indent=2))
        return 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        c.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
