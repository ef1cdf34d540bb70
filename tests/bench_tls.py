#!/usr/bin/env python3
"""TLS cost on the data plane (run by hand; not collected by pytest). Everything side by side in one run,
on local pools of the same shape (a metadata service and 4 agents x 1 file-backed drive on 127.0.0.1),
the client on the TCP transport (the same-host shm path has no TLS):

  (a) no TLS at all                                  LocalCluster(..., tls=False)
  (b) TLS on the control plane, plaintext data plane LocalCluster(..., tls=True, data_tls=False)
  (c) TLS on both planes                             LocalCluster(..., tls=True, data_tls=True)

For each: sequential 1 MiB write MB/s (QD8, overwriting a volume filled once), sequential 1 MiB read MB/s
(QD8), 4 KiB random read IOPS (QD32), and the client process's CPU seconds per GB read (time.process_time
over the sequential read; with the agents' CPU seconds per GB read as a note). Ratios (b)/(a) and (c)/(a).

One pool at a time, each torn down before the next: a first round in the order a, b, c and a second in
c, b, a; each figure is the best of its two rounds (the machine is noisy).

    .venv/bin/python tests/bench_tls.py [--size 512M] [--seconds 3] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from tests.benchlib import say, daemon_problems, rand_read, seq_timed, seq_write  # noqa: E402
from nvpool.client.api import AsyncPool, ClientOptions  # noqa: E402
from nvpool.client.cluster import LocalCluster  # noqa: E402
from nvpool.client.transport_shm import ShmConnection  # noqa: E402
from nvpool.client.volume import AsyncVolume  # noqa: E402
from nvpool.proto.units import parse_size  # noqa: E402

MiB = 1 << 20
KiB4 = 4096
VOL = "tls"
AGENTS = 4

#: name -> (label, LocalCluster tls, data_tls)
CONFIGS: dict[str, tuple[str, bool, bool]] = {
    "a": ("no TLS", False, False),
    "b": ("TLS control plane only", True, False),
    "c": ("TLS both planes", True, True),
}


# ---------------------------------------------------------------------------------------------- figures
@dataclass
class Table:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, fig: int, what: str, value: float, unit: str, args: str, baseline: Optional[float] = None,
            ratio_of: str = "", note: str = "") -> None:
        ratio = value / baseline if baseline else None
        self.rows.append({"figure": fig, "what": what, "value": round(value, 3), "unit": unit,
                          "baseline": None if baseline is None else round(baseline, 3),
                          "ratio": None if ratio is None else round(ratio, 3), "ratio_of": ratio_of,
                          "args": args, "note": note})

    def render(self) -> str:
        def num(v: Optional[float]) -> str:
            if v is None:
                return "-"
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"

        head = f"{'#':<2} {'figure':<50} {'value':>9} {'unit':<6} {'baseline':>9} {'ratio':>6}  {'ratio of':<10} args"
        out = [head, "-" * len(head)]
        for r in self.rows:  # in the order added: figure, then configuration
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            out.append(f"{r['figure']:<2} {r['what']:<50} {num(r['value']):>9} {r['unit']:<6} {num(r['baseline']):>9} "
                       f"{ratio:>6}  {r['ratio_of']:<10} {r['args']}")
            if r["note"]:
                out.append(f"{'':<6}({r['note']})")
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------- I/O loops
async def seq_overwrite(vol: AsyncVolume, seconds: float, io: int = MiB, qd: int = 8, seed: int = 1) -> float:
    """Sequential writes (wrapping at the end of the volume) for ``seconds``; MB/s."""
    return (await seq_timed(vol, seconds, io, qd, write=True, seed=seed))[0]


async def seq_read(vol: AsyncVolume, seconds: float, io: int = MiB, qd: int = 8) -> tuple[float, int]:
    """Sequential reads (wrapping at the end of the volume) for ``seconds``; (MB/s, bytes read)."""
    return await seq_timed(vol, seconds, io, qd)


# ---------------------------------------------------------------------------------------------- helpers
def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (another one: the agents), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wire(pool: AsyncPool) -> tuple[int, int, int]:
    """The client's open agent connections: (TCP, of which TLS, shm)."""
    tcp = tls = shm = 0
    for conn in pool.connections._conns.values():
        if isinstance(conn, ShmConnection):
            shm += 1
            continue
        tcp += 1
        if conn.transport is not None and conn.transport.get_extra_info("ssl_object") is not None:
            tls += 1
    return tcp, tls, shm


@dataclass
class Result:
    write_MBps: float
    fill_MBps: float
    read_MBps: float
    rand_iops: float
    cpu_s_per_GB: float  # the client process, over the sequential read
    agents_cpu_s_per_GB: float  # the four agents together, same window
    wire: tuple[int, int, int]
    endpoints_tls: int
    stats: dict[str, int]


async def measure(c: LocalCluster, size: int, seconds: float) -> Result:
    opts = ClientOptions(transport="tcp", tls=c.client_tls())
    pool = await AsyncPool.connect(c.meta.address, opts)
    try:
        await pool.create_volume(VOL, size)
        vol = await pool.open(VOL)
        fill = await seq_write(vol, size, seed=0)  # every byte written once: reads of it are real reads
        write = await seq_overwrite(vol, seconds)
        await vol.flush()
        await vol.close()
        rd = await pool.open(VOL, read_only=True)
        await seq_read(rd, min(1.0, seconds))  # warm: connections, page cache
        agents0 = sum(proc_cpu_s(a.pid) for a in c.agents)
        cpu0 = time.process_time()
        read, nbytes = await seq_read(rd, seconds)
        cpu = time.process_time() - cpu0
        agents = sum(proc_cpu_s(a.pid) for a in c.agents) - agents0
        rand = await rand_read(rd, seconds)
        stats = {k: v for k, v in rd.stats.items() if v}
        eps = sum(1 for ep in rd.endpoints.values() if ep.tls)
        on_wire = wire(pool)
        await rd.close()
        gb = nbytes / 1e9
        return Result(write, fill, read, rand, cpu / gb, agents / gb, on_wire, eps, stats)
    finally:
        await pool.close()


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M", help="the volume (striped over the 4 agents)")
    ap.add_argument("--drive-size", default="1G")
    ap.add_argument("--seconds", type=float, default=3.0, help="each timed loop (overwrite, seq read, rand read)")
    ap.add_argument("--keep", action="store_true", help="keep the pools' directories (logs) afterwards")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    if parse_size(args.drive_size) * AGENTS < size + AGENTS * 64 * MiB:
        raise SystemExit(f"--drive-size {args.drive_size} x {AGENTS} agents is too small for --size {args.size}")
    env_tls = os.environ.pop("NVPOOL_TLS", None)  # (a) and (b) must not pick up certificates from it
    if env_tls is not None:
        say(f"ignoring NVPOOL_TLS={env_tls} (each configuration sets its own TLS)")
    work = Path(tempfile.mkdtemp(prefix="nvpool-tlsbench-"))
    order = ["a", "b", "c", "c", "b", "a"]
    results: dict[str, list[Result]] = {k: [] for k in CONFIGS}
    problems: list[str] = []
    clusters: list[LocalCluster] = []
    t0 = time.monotonic()
    try:
        for i, key in enumerate(order):
            label, tls, data_tls = CONFIGS[key]
            rnd = 1 if i < len(CONFIGS) else 2
            c = LocalCluster(work / f"r{rnd}-{key}", agents=AGENTS, drives_per_agent=1, drive_size=args.drive_size,
                             tls=tls, data_tls=data_tls)
            clusters.append(c)
            say(f"round {rnd}: ({key}) {label}: starting the pool")
            c.up()
            try:
                r = uvloop.run(measure(c, size, args.seconds))
            finally:
                c.down()
            problems.extend(f"({key}) round {rnd} {p}" for p in daemon_problems(c))
            results[key].append(r)
            say(f"   write {r.write_MBps:.0f} MB/s (fill {r.fill_MBps:.0f}), read {r.read_MBps:.0f} MB/s, "
                f"rand {r.rand_iops:.0f} IOPS, client {r.cpu_s_per_GB:.2f} CPU-s/GB, agents {r.agents_cpu_s_per_GB:.2f}; "
                f"connections tcp/tls/shm {r.wire}, TLS endpoints {r.endpoints_tls}")
        elapsed = time.monotonic() - t0

        # sanity: each configuration really ran over the wire it names
        wrong: list[str] = []
        for key, rs in results.items():
            want_tls = CONFIGS[key][2]
            for r in rs:
                tcp, tls_n, shm = r.wire
                if shm or tcp != AGENTS or tls_n != (AGENTS if want_tls else 0) or r.endpoints_tls != tls_n:
                    wrong.append(f"({key}): connections tcp/tls/shm {r.wire}, endpoints advertising TLS "
                                 f"{r.endpoints_tls}; expected {AGENTS} TCP, {AGENTS if want_tls else 0} TLS, 0 shm")

        best = {k: Result(write_MBps=max(r.write_MBps for r in rs), fill_MBps=max(r.fill_MBps for r in rs),
                          read_MBps=max(r.read_MBps for r in rs), rand_iops=max(r.rand_iops for r in rs),
                          cpu_s_per_GB=min(r.cpu_s_per_GB for r in rs),
                          agents_cpu_s_per_GB=min(r.agents_cpu_s_per_GB for r in rs),
                          wire=rs[-1].wire, endpoints_tls=rs[-1].endpoints_tls, stats=rs[-1].stats)
                for k, rs in results.items()}

        def spread(key: str, attr: str) -> str:
            vals = [float(getattr(r, attr)) for r in results[key]]
            return "rounds " + " / ".join(f"{v:.3g}" if v < 10 else f"{v:.0f}" for v in vals)

        table = Table()
        base = best["a"]
        sec = f"--seconds {args.seconds:g}"
        figs: list[tuple[int, str, str, str, str]] = [
            (1, "seq 1M write MB/s QD8", "write_MBps", "MB/s", f"--size {args.size} {sec}"),
            (2, "seq 1M read MB/s QD8", "read_MBps", "MB/s", f"--size {args.size} {sec}"),
            (3, "4K rand read IOPS QD32", "rand_iops", "IOPS", f"--size {args.size} {sec}"),
        ]
        for fig, what, attr, unit, a in figs:
            for key in CONFIGS:
                v = float(getattr(best[key], attr))
                note = spread(key, attr)
                if attr == "write_MBps":
                    note += f"; first fill of the volume (best) {best[key].fill_MBps:.0f} MB/s"
                if key == "a":
                    table.add(fig, f"{what}, (a) {CONFIGS[key][0]}", v, unit, a, note=note)
                else:
                    table.add(fig, f"{what}, ({key}) {CONFIGS[key][0]}", v, unit, a, float(getattr(base, attr)),
                              f"({key}) / (a)", note=note)
        for key in ("a", "c"):
            v = best[key].cpu_s_per_GB
            note = (f"over the seq 1M QD8 read; {spread(key, 'cpu_s_per_GB')}; lowest of the two; the 4 agents together "
                    f"{best[key].agents_cpu_s_per_GB:.2f} CPU-s/GB")
            if key == "a":
                table.add(4, f"client CPU-s per GB read, (a) {CONFIGS[key][0]}", v, "s/GB",
                          f"--size {args.size} {sec}", note=note)
            else:
                table.add(4, f"client CPU-s per GB read, (c) {CONFIGS[key][0]}", v, "s/GB",
                          f"--size {args.size} {sec}", base.cpu_s_per_GB, "(c) / (a)", note=note)

        out = sys.stderr if args.json else sys.stdout
        print(f"\nTLS cost, {AGENTS} agents x 1 drive of {args.drive_size}, one {args.size} volume striped over them, "
              f"client transport tcp; rounds a,b,c then c,b,a (one pool at a time), best of the two rounds per "
              f"figure (highest throughput, lowest CPU); {elapsed:.0f}s in all\n", file=out)
        print(table.render(), file=out)
        print("\nconnections at the end of each run (tcp/tls/shm): "
              + ", ".join(f"({k}) {[r.wire for r in rs]}" for k, rs in results.items()), file=out)
        nonzero = {k: [r.stats for r in rs if r.stats] for k, rs in results.items()}
        if any(nonzero.values()):
            print("reader stats (non-zero): " + json.dumps(nonzero), file=out)
        if wrong:
            print("\nWRONG WIRE (the figures above do not measure what they say):\n  " + "\n  ".join(wrong), file=out)
        if problems:
            print("\ndaemon log errors:\n  " + "\n  ".join(problems[:40]), file=out)
        if args.json:
            print(json.dumps({"args": vars(args), "seconds": round(elapsed, 1), "rows": table.rows,
                              "runs": {k: [vars(r) for r in rs] for k, rs in results.items()},
                              "wrong_wire": wrong, "daemon_log_errors": problems}, indent=2))
        return 1 if wrong else 0
    finally:
        for c in clusters:
            c.down()
        if env_tls is not None:
            os.environ["NVPOOL_TLS"] = env_tls
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
