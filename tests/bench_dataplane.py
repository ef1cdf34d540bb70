#!/usr/bin/env python3
"""Data-plane benchmark (run by hand; not collected by pytest). Everything side by side in one run:

1. sequential 1 MiB reads of a 4-agent striped volume through the library (TCP, shm, and shm into
   registered memory from ``pool.alloc``) vs fio reading
   the same backing drive files locally (psync, 1 MiB): the local limit; and vs the machine's limits
   measured in the same run: loopback TCP (an iperf3-style stream between two processes) for TCP,
   single-thread memcpy for shm (one copy is the floor);
2. 4 KiB random reads at QD32 (IOPS) and QD1 (p50, p99) through the library (asyncio API; QD1 also
   through the blocking API, which takes the thread's own socket; and batches of 32 through the
   blocking API's ``readv``, all in flight together on the thread's own sockets) vs ``fio --ioengine=nbd`` against
   ``nbdkit file`` serving a fully allocated file of the same size and page-cache state: a C peer;
   and the CPU per 4 KiB I/O on the client and on the agents (process accounting: getrusage and
   /proc/PID/stat), against the issue-17 bound of 15 us a side and against fio's and nbdkit's own CPU
   per I/O in the same run; each figure the median of ``--rounds`` rounds, ours and the peer alternately;
3. the same with writes;
4. client CPU per GB read with 1, 2 and 4 agents;
5. client and agent resident memory after reading ``--rss-gib`` GiB.

The first line says which data-plane implementation ran (``NVPOOL_PURE_PYTHON=1`` runs the pure-Python
reference: agents inherit the environment), so the compiled path and the reference can be compared run
against run.

    .venv/bin/python tests/bench_dataplane.py [--size 1G] [--seconds 4] [--rounds 3] [--rss-gib 16] [--json]
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from nvpool.agents.drive import DATA_OFFSET  # noqa: E402
from nvpool.proto.units import parse_size  # noqa: E402
from nvpool.client.cli.bench import run_bench  # noqa: E402
from nvpool.client.cluster import LocalCluster  # noqa: E402
from nvpool.proto import compiled  # noqa: E402
from tests.benchlib import loopback_tcp_MBps, memcpy_MBps  # noqa: E402

MiB = 1 << 20


def fio(args: list[str]) -> dict[str, Any]:
    p = subprocess.run(["fio", "--output-format=json", *args], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"fio failed: {p.stderr[-1500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    return dict(job)


def fio_figures(job: dict[str, Any], kind: str) -> dict[str, float]:
    d = job[kind]
    pct = d.get("clat_ns", {}).get("percentile", {})
    return {"MBps": d["bw_bytes"] / 1e6, "iops": d["iops"],
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000}


def proc_cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench(meta: str, vol: str, **kw: Any) -> Any:
    return uvloop.run(run_bench(meta, vol, **kw))


def sync_qd1(meta: str, vol: str, io_type: str, seconds: float, transport: str) -> tuple[float, float]:
    """4 KiB random I/O at QD1 through the blocking API (``Volume.readinto`` / ``write``: what a
    DataLoader worker calls); (p50, p99) in microseconds."""
    import random

    from nvpool import client
    from nvpool.client.volume import ClientOptions

    with client.connect(meta, ClientOptions(transport=transport)) as pool, \
            pool.open(vol, read_only=io_type == "read") as v:
        slots = v.size // 4096
        rng = random.Random(7)
        buf = bytearray(4096)
        payload = os.urandom(4096)
        lat: list[int] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            off = rng.randrange(slots) * 4096
            t0 = time.perf_counter_ns()
            if io_type == "read":
                v.readinto(buf, off)
            else:
                v.write(off, payload)
            lat.append(time.perf_counter_ns() - t0)
    lat.sort()
    return lat[len(lat) // 2] / 1000, lat[len(lat) * 99 // 100] / 1000


def sync_readv(meta: str, vol: str, seconds: float, transport: str, batch: int = 32) -> tuple[float, float]:
    """4 KiB random reads through the blocking API, ``batch`` at a time with ``Volume.readv`` (what a
    DataLoader worker reading a batch of samples calls): (IOPS, client CPU us per I/O)."""
    import random

    import numpy as np

    from nvpool import client
    from nvpool.client.volume import ClientOptions

    with client.connect(meta, ClientOptions(transport=transport)) as pool, pool.open(vol, read_only=True) as v:
        slots = v.size // 4096
        rng = random.Random(7)
        bufs = [np.empty(4096, dtype=np.uint8) for _ in range(batch)]
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            v.readv([(rng.randrange(slots) * 4096, b) for b in bufs])
            n += batch
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, 1e6 * cpu / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="volume size")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rss-gib", type=float, default=16.0, help="GiB to read before measuring RSS")
    ap.add_argument("--rounds", type=int, default=3,
                    help="small-I/O figures: rounds of ours and the C peer, alternately (medians are printed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (./deploy/bootstrap.sh installs it)")
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="nvpool-bench-"))
    rows: list[dict[str, Any]] = []
    print("data plane: " + ", ".join(f"{k.rsplit('.', 1)[1]} {v}" for k, v in compiled.status().items()), file=sys.stderr)

    def row(what: str, ours: float, ref: float, ref_name: str, goal: str, higher_better: bool = True) -> None:
        ratio = ours / ref if ref else 0.0
        rows.append({"what": what, "nvpool": round(ours, 1), "reference": round(ref, 1), "ref": ref_name,
                     "ratio": round(ratio, 2), "goal": goal})
        print(f"{what:<44} {ours:>10.1f} {ref:>10.1f} {ratio:>7.2f}  {ref_name}  (goal {goal})", file=sys.stderr)

    os.environ.pop("NVPOOL_TLS", None)  # plaintext pool (tests/bench_tls.py measures TLS)
    c = LocalCluster(work / "pool", agents=4, drives_per_agent=1, drive_size=str(size // 4 + 600 * MiB), tls=False)
    nbdkit = None
    try:
        c.up()
        meta = c.meta.address
        from nvpool import client

        with client.connect(meta) as pool:
            pool.create_volume("seq", size)
            for w in (1, 2):
                pool.create_volume(f"w{w}", 256 * MiB, stripe_width=w)
        bench(meta, "seq", io_type="write", io_size=MiB, io_depth=8, total=size)
        for w in (1, 2):
            bench(meta, f"w{w}", io_type="write", io_size=MiB, io_depth=8, total=256 * MiB)
        drives = sorted((work / "pool" / "drives").glob("*.img"))
        col = size // 4
        # 1. sequential reads vs the local limit
        print(f"{'figure':<44} {'nvpool':>10} {'reference':>10} {'ratio':>7}", file=sys.stderr)
        bench(meta, "seq", io_type="read", io_size=MiB, io_depth=8, total=size, transport="tcp")  # warm
        local = fio_figures(fio(["--name=local", "--ioengine=psync", "--rw=read", "--bs=1M", f"--offset={DATA_OFFSET}",
                                 f"--size={col}", "--filename=" + ":".join(str(d) for d in drives), "--numjobs=1",
                                 f"--runtime={args.seconds}", "--time_based"]), "read")
        limits = {"tcp": (loopback_tcp_MBps(args.seconds), "loopback TCP stream"),
                  "shm": (memcpy_MBps(args.seconds), "memcpy, 1 thread")}
        for t in ("tcp", "shm"):
            r = bench(meta, "seq", io_type="read", io_size=MiB, io_depth=8, seconds=args.seconds, transport=t)
            row(f"seq 1M read MB/s, 4 agents, {t}", r.MBps, local["MBps"], "fio psync local", ">= 0.7")
            row(f"seq 1M read MB/s, 4 agents, {t}", r.MBps, limits[t][0], limits[t][1], ">= 0.8")
        # the same into registered memory (pool.alloc): the agents place the bytes in it, no copy here
        r = bench(meta, "seq", io_type="read", io_size=MiB, io_depth=8, seconds=args.seconds, transport="shm",
                  registered=True)
        row("seq 1M read MB/s, 4 agents, shm registered", r.MBps, local["MBps"], "fio psync local", ">= 0.7")
        row("seq 1M read MB/s, 4 agents, shm registered", r.MBps, limits["shm"][0], limits["shm"][1], ">= 0.8")
        # 2./3. small I/O vs nbdkit
        # the C peer serves a file in the same state as the agents' drives: fully allocated (every
        # column's bytes, written in 1 MiB pieces) and read once, so both sides' 4K I/O meets the same
        # page cache (a file of holes would give nbdkit the kernel's cheaper write-into-hole path:
        # ext4 costs ~2-4 us for a 4K pwrite into a hole or small folio, ~13 us into a large folio)
        peer = work / "peer.img"
        with open(peer, "wb") as f:
            for d in drives:
                with open(d, "rb") as src:
                    src.seek(DATA_OFFSET)
                    for _ in range(col // MiB):
                        f.write(src.read(MiB))
        with open(peer, "rb") as back:
            while back.read(MiB):
                pass
        sock = str(work / "nbdkit.sock")
        nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", str(peer)])
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        for io_type, rw in (("read", "randread"), ("write", "randwrite")):
            kind = "read" if io_type == "read" else "write"
            for t in ("tcp", "shm"):
                got: dict[str, list[float]] = {}
                for _ in range(args.rounds):  # ours and the C peer alternately; the medians are reported
                    a0 = sum(proc_cpu_s(a.pid) for a in c.agents)
                    q32 = bench(meta, "seq", io_type=io_type, io_size=4096, io_depth=32, pattern="rand",
                                seconds=args.seconds, transport=t)
                    agent_us = 1e6 * (sum(proc_cpu_s(a.pid) for a in c.agents) - a0) / max(1, q32.ops)
                    client_us = 1e6 * (q32.cpu_percent / 100 * q32.seconds) / max(1, q32.ops)
                    q1 = bench(meta, "seq", io_type=io_type, io_size=4096, io_depth=1, pattern="rand",
                               seconds=args.seconds, transport=t)
                    s50, s99 = sync_qd1(meta, "seq", io_type, args.seconds, t)
                    if io_type == "read":
                        rv_iops, rv_us = sync_readv(meta, "seq", args.seconds, t)
                        got.setdefault("rv_iops", []).append(rv_iops)
                        got.setdefault("rv_us", []).append(rv_us)
                    k0 = proc_cpu_s(nbdkit.pid)
                    j32 = fio(["--name=p", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k", "--iodepth=32",
                               f"--runtime={args.seconds}", "--time_based", f"--size={size}"])
                    p32 = fio_figures(j32, kind)
                    ios = max(1, j32[kind]["total_ios"])
                    nbdkit_us = 1e6 * (proc_cpu_s(nbdkit.pid) - k0) / ios
                    fio_us = 1e6 * (j32["usr_cpu"] + j32["sys_cpu"]) / 100 * j32["job_runtime"] / 1000 / ios
                    p1 = fio_figures(fio(["--name=p", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
                                          "--iodepth=1", f"--runtime={args.seconds}", "--time_based",
                                          f"--size={size}"]), kind)
                    for k, v in dict(q32=q32.iops, client_us=client_us, agent_us=agent_us, q1_50=q1.lat_p50_us,
                                     q1_99=q1.lat_p99_us, s50=s50, s99=s99, p32=p32["iops"], nbdkit_us=nbdkit_us,
                                     fio_us=fio_us, p1_50=p1["p50_us"], p1_99=p1["p99_us"]).items():
                        got.setdefault(k, []).append(v)
                m = {k: statistics.median(v) for k, v in got.items()}
                how = "tcp" if t == "tcp" else "unix socket"
                row(f"4K rand {io_type} IOPS QD32, {t}", m["q32"], m["p32"], "fio nbd -> nbdkit", ">= 0.8")
                row(f"4K rand {io_type} CPU us/IO QD32 client, {t}", m["client_us"], 15.0, "bound", "< 1.0", False)
                row(f"4K rand {io_type} CPU us/IO QD32 client, {t}", m["client_us"], m["fio_us"], "fio's own",
                    "report", False)
                row(f"4K rand {io_type} CPU us/IO QD32 agents, {t}", m["agent_us"], 15.0, "bound", "< 1.0", False)
                row(f"4K rand {io_type} CPU us/IO QD32 agents, {t}", m["agent_us"], m["nbdkit_us"], "nbdkit's own",
                    "report", False)
                if io_type == "read":
                    row(f"4K rand read IOPS, blocking readv x32, {how}", m["rv_iops"], m["p32"], "nbdkit QD32", ">= 0.8")
                    row(f"4K rand read CPU us/IO, blocking readv x32, {how}", m["rv_us"], 15.0, "bound", "< 1.0", False)
                row(f"4K rand {io_type} p50 us QD1, {t}", m["q1_50"], m["p1_50"], "fio nbd -> nbdkit", "<= 1.5", False)
                row(f"4K rand {io_type} p99 us QD1, {t}", m["q1_99"], m["p1_99"], "fio nbd -> nbdkit", "report", False)
                row(f"4K rand {io_type} p50 us QD1, blocking API, {how}", m["s50"], m["p1_50"], "fio nbd -> nbdkit",
                    "<= 1.5", False)
                row(f"4K rand {io_type} p99 us QD1, blocking API, {how}", m["s99"], m["p1_99"], "fio nbd -> nbdkit",
                    "report", False)
        # 4. CPU per GB read, 1/2/4 agents
        cpu = {}
        for w, name in ((1, "w1"), (2, "w2"), (4, "seq")):
            r = bench(meta, name, io_type="read", io_size=MiB, io_depth=8, seconds=args.seconds, transport="tcp")
            cpu[w] = r.cpu_s_per_GB
        for w in (2, 4):
            row(f"client CPU-s per GB read, {w} agents vs 1", cpu[w], cpu[1], "same, 1 agent", "flat (~1.0)", False)
        # 5. memory after reading a lot
        total = int(args.rss_gib * (1 << 30))
        before = {a.name: rss_kib(a.pid) for a in c.agents}
        bench(meta, "seq", io_type="read", io_size=MiB, io_depth=8, total=total, transport="tcp")
        import resource

        client_rss = rss_kib(os.getpid())
        after = {a.name: rss_kib(a.pid) for a in c.agents}
        print(f"\nafter reading {args.rss_gib:g} GiB: client RSS {client_rss / 1024:.0f} MiB "
              f"(peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB); agents RSS "
              + ", ".join(f"{n} {before[n] / 1024:.0f}->{after[n] / 1024:.0f} MiB" for n in after), file=sys.stderr)
        rows.append({"what": f"RSS after {args.rss_gib:g} GiB", "client_MiB": round(client_rss / 1024),
                     "agents_MiB_before": {n: round(v / 1024) for n, v in before.items()},
                     "agents_MiB_after": {n: round(v / 1024) for n, v in after.items()}})
        if args.json:
            print(json.dumps(rows, indent=2))
        return 0
    finally:
        if nbdkit is not None:
            nbdkit.terminate()
            nbdkit.wait()
        c.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
