#!/usr/bin/env python3
"""The agents' connection threads against their event loop (run by hand; not collected by pytest).

Two plaintext pools run side by side on this machine, the same shape, one whose agents serve every
connection on their event loop (``NVPOOL_NATIVE_CONNECTIONS=0``: the compiled command loop inside
asyncio) and one whose agents serve each connection from a thread of its own (the default). In each
round, each pool in turn: 4 KiB random reads and writes at QD32 through the asyncio API (IOPS and the
agents' CPU per I/O from /proc) and at QD1 through the blocking API (p50), over TCP and over the
same-host Unix socket. Each figure is the median of ``--rounds`` rounds, with the ratio threads / loop.

    .venv/bin/python tests/bench_connections.py [--agents 4] [--rounds 3] [--seconds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from nvpool.client.cli.bench import run_bench  # noqa: E402
from nvpool.client.cluster import LocalCluster  # noqa: E402
from tests.bench_dataplane import proc_cpu_s, sync_qd1  # noqa: E402

MiB = 1 << 20
MODES = {"loop": "0", "threads": "1"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.pop("NVPOOL_TLS", None)
    pools: dict[str, tuple[LocalCluster, Path]] = {}
    got: dict[tuple[str, str, str, str], list[float]] = {}
    try:
        for mode, flag in MODES.items():
            os.environ["NVPOOL_NATIVE_CONNECTIONS"] = flag  # the agents started now inherit it
            work = Path(tempfile.mkdtemp(prefix=f"nvpool-conn-{mode}-"))
            c = LocalCluster(work / "pool", agents=args.agents, drives_per_agent=1, drive_size="400M", tls=False)
            c.up()
            pools[mode] = (c, work)
            from nvpool import client

            with client.connect(c.meta.address) as pool:
                pool.create_volume("v", 256 * MiB)
            uvloop.run(run_bench(c.meta.address, "v", io_type="write", io_size=MiB, io_depth=8, total=256 * MiB))
        os.environ.pop("NVPOOL_NATIVE_CONNECTIONS")
        for _ in range(args.rounds):
            for mode, (c, _w) in pools.items():
                for t in ("tcp", "shm"):
                    for io in ("read", "write"):
                        a0 = sum(proc_cpu_s(a.pid) for a in c.agents)
                        q = uvloop.run(run_bench(c.meta.address, "v", io_type=io, io_size=4096, io_depth=32,
                                                 pattern="rand", seconds=args.seconds, transport=t))
                        agent_us = 1e6 * (sum(proc_cpu_s(a.pid) for a in c.agents) - a0) / max(1, q.ops)
                        p50, _p99 = sync_qd1(c.meta.address, "v", io, args.seconds, t)
                        for fig, v in (("QD32 IOPS", q.iops), ("QD32 agents CPU us/IO", agent_us),
                                       ("QD1 p50 us, blocking API", p50)):
                            got.setdefault((t, io, fig, mode), []).append(v)
        rows: list[dict[str, Any]] = []
        print(f"\n{args.agents} agents, medians of {args.rounds} rounds", file=sys.stderr)
        print(f"{'figure':<48} {'loop':>10} {'threads':>10} {'threads/loop':>13}", file=sys.stderr)
        for t in ("tcp", "shm"):
            for io in ("read", "write"):
                for fig in ("QD32 IOPS", "QD32 agents CPU us/IO", "QD1 p50 us, blocking API"):
                    loop_v = statistics.median(got[(t, io, fig, "loop")])
                    thr_v = statistics.median(got[(t, io, fig, "threads")])
                    how = "tcp" if t == "tcp" else ("unix socket" if "blocking" in fig else "shm")
                    what = f"4K {io} {fig}, {how}"
                    print(f"{what:<48} {loop_v:>10.1f} {thr_v:>10.1f} {thr_v / loop_v:>13.2f}", file=sys.stderr)
                    rows.append({"what": what, "loop": round(loop_v, 1), "threads": round(thr_v, 1),
                                 "ratio": round(thr_v / loop_v, 2)})
        if args.json:
            print(json.dumps(rows, indent=2))
        return 0
    finally:
        for c, work in pools.values():
            c.down()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
