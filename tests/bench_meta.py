#!/usr/bin/env python3
"""Metadata service on SQLite vs on etcd (run by hand; not collected by pytest). Side by side in one run,
on local pools of the same shape (one metadata service, 2 agents x 1 file-backed drive, TLS on):

  (s) the metadata in SQLite (one file, WAL, fsync per commit)
  (e) the metadata in a 3-member etcd cluster on loopback (each commit is one Raft round and fsyncs on
      a majority), the service elected leader

Figures, each from the client library's metadata client over gRPC:
  * volume create latency, p50 and p99 (sequential, 16 MiB volumes over 2 agents; each create is a few
    commits plus an assign RPC per agent), and the matching delete
  * metadata operations per second: open + close of a read lease (2 commits), sequential and with 8
    concurrent callers
  * layout reads per second (GetLayout: no store access; the control for everything above)
  * failover: SIGKILL the leader of a 2-instance pool on etcd; seconds until a create succeeds again, and
    the longest pause of a QD1 writer on a plain and on a 2-replica volume meanwhile

    .venv/bin/python tests/bench_meta.py [--creates 40] [--leases 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.benchlib import daemon_problems, say  # noqa: E402
from nvpool.client.etcdlocal import EtcdCluster  # noqa: E402
from nvpool.client.cluster import LocalCluster  # noqa: E402
from nvpool.client.metaclient import MetaClient  # noqa: E402

MiB = 1 << 20


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def measure(address: str, tls: Any, creates: int, leases: int) -> dict[str, float]:
    m = MetaClient(address, timeout=60, tls=tls)
    try:
        lat_c, lat_d = [], []
        for i in range(creates):
            t = time.perf_counter()
            await m.create_volume(f"b{i}", 16 * MiB)
            lat_c.append(time.perf_counter() - t)
        await m.create_volume("lease-target", 16 * MiB)
        t0 = time.perf_counter()
        for _ in range(leases):
            lid, _ttl = await m.open_volume("lease-target", write=False)
            await m.close_volume(lid)
        seq = leases / (time.perf_counter() - t0)

        async def worker(n: int) -> None:
            for _ in range(n):
                lid, _ttl = await m.open_volume("lease-target", write=False)
                await m.close_volume(lid)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(leases // 8) for _ in range(8)))
        conc = 8 * (leases // 8) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(leases):
            await m.get_layout("lease-target")
        layouts = leases / (time.perf_counter() - t0)
        for i in range(creates):
            t = time.perf_counter()
            await m.delete_volume(f"b{i}")
            lat_d.append(time.perf_counter() - t)
        return {"create_p50_ms": 1000 * statistics.median(lat_c), "create_p99_ms": 1000 * pct(lat_c, 0.99),
                "delete_p50_ms": 1000 * statistics.median(lat_d),
                "lease_ops_s": 2 * seq, "lease_ops_s_8way": 2 * conc, "layout_reads_s": layouts}
    finally:
        await m.close()


def failover(tmp: Path, etcd: EtcdCluster) -> dict[str, float]:
    """Kill the leader of a 2-instance pool while a QD1 writer runs on a plain and on a 2-replica volume:
    seconds until a create succeeds again, and the longest pause each writer saw."""
    import threading

    import numpy as np

    from nvpool import client
    from nvpool.client.api import ClientOptions

    c = LocalCluster(tmp / "failover", agents=2, drives_per_agent=1, drive_size="256M", store=etcd.url("/bench-fo"),
                     metas=2)
    c.up(timeout=60)
    try:
        lead = c.leader()
        stop = threading.Event()
        gaps: dict[str, float] = {}

        def writer(name: str) -> None:
            with client.connect(c.meta_addresses, ClientOptions(tls=c.client_tls())) as pool:
                vol = pool.open(name)
                buf = np.full(4096, 7, dtype=np.uint8)
                last, worst, i = time.monotonic(), 0.0, 0
                while not stop.is_set():
                    vol.write((i % 1024) * 4096, buf)
                    now = time.monotonic()
                    worst, last, i = max(worst, now - last), now, i + 1
                gaps[name] = worst

        with client.connect(c.meta_addresses, ClientOptions(tls=c.client_tls())) as pool:
            pool.create_volume("plain", 8 * MiB)
            pool.create_volume("mirrored", 8 * MiB, replicas=2)
        threads = [threading.Thread(target=writer, args=(n,)) for n in ("plain", "mirrored")]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        c.kill_meta(lead)
        with client.connect(c.meta_addresses, ClientOptions(tls=c.client_tls())) as pool:
            pool.create_volume("after", 4 * MiB)
        took = time.monotonic() - t0
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(60)
        return {"create_again_s": took, "plain_pause_s": gaps.get("plain", -1),
                "mirrored_pause_s": gaps.get("mirrored", -1)}
    finally:
        c.down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--creates", type=int, default=40)
    ap.add_argument("--leases", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nvpool-bench-meta-"))
    etcd = EtcdCluster(tmp / "etcd").up()
    results: dict[str, dict[str, float]] = {}
    try:
        for kind, store in (("sqlite", ""), ("etcd", etcd.url("/bench"))):
            say(f"pool with the metadata on {kind}")
            c = LocalCluster(tmp / kind, agents=2, drives_per_agent=1, drive_size="1G", store=store)
            c.up(timeout=60)
            try:
                results[kind] = asyncio.run(measure(c.meta.address, c.client_tls(), args.creates, args.leases))
            finally:
                c.down()
                problems = daemon_problems(c)
                if problems:
                    say("\n".join(problems))
        say("failover on etcd (2 metadata services, the leader SIGKILLed)")
        fo = failover(tmp, etcd)
    finally:
        etcd.down()
    if args.json:
        print(json.dumps({**results, "failover_s": fo}, indent=2))
        return 0
    rows = [("volume create p50 (ms)", "create_p50_ms"), ("volume create p99 (ms)", "create_p99_ms"),
            ("volume delete p50 (ms)", "delete_p50_ms"), ("lease open+close, ops/s", "lease_ops_s"),
            ("  the same, 8 callers, ops/s", "lease_ops_s_8way"), ("layout reads/s (no store access)", "layout_reads_s")]
    print(f"{'figure':36} {'SQLite':>10} {'etcd':>10} {'etcd/SQLite':>12}")
    for label, key in rows:
        s, e = results["sqlite"][key], results["etcd"][key]
        print(f"{label:36} {s:10.1f} {e:10.1f} {e / s:12.2f}")
    print("\nfailover on etcd (2 metadata services, leader_ttl 5 s, agent_timeout 3 s), the leader SIGKILLed:")
    print(f"  a volume create succeeds again after {fo['create_again_s']:.2f} s")
    print(f"  longest pause of a QD1 4 KiB writer: plain volume {fo['plain_pause_s']:.2f} s, "
          f"2-replica volume {fo['mirrored_pause_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
