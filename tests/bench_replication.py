#!/usr/bin/env python3
"""Replicated-volume benchmark (run by hand; not collected by pytest). Everything side by side in one run,
on local pools (a metadata service and agents as processes on 127.0.0.1, file-backed drives):

1. sequential 1 MiB writes at QD8 to a 2-replica volume vs a 1-replica volume of the same size on the
   same pool (ratio 2-replica / 1-replica);
2. sequential 1 MiB reads (QD8) and 4 KiB random reads (QD32) of the 2-replica volume, healthy vs
   degraded (one agent SIGKILLed and its replicas out of service; ratio degraded / healthy);
3. the pause an application sees when a replica dies: a QD1 4 KiB write loop, one agent SIGKILLed
   mid-loop (then, on a healthy volume again, one SIGSTOPped: a hung server), the longest single write
   vs the p50 before the fault;
4. resync: with one agent killed, ``--dirty`` bytes written, the agent restarted: the time until the
   volume is ``ok`` again and the bytes the metadata service says it copied;
5. rebuild, on a second pool started with ``--rebuild-after`` and ``--repair-rate``: one agent killed for
   good, the time from its replicas going out to the volume ``ok`` again, bytes copied / time;
6. foreground sequential reads during that rebuild as a fraction of the healthy figure.

    .venv/bin/python tests/bench_replication.py [--size 512M] [--seconds 3] [--dirty 64M]
        [--rebuild-size 512M] [--rebuild-after 2] [--repair-rate 200M] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from tests.benchlib import say, daemon_problems, rand_read, seq_timed, seq_write  # noqa: E402
from nvpool.client.api import AsyncPool  # noqa: E402
from nvpool.client.cluster import LocalCluster  # noqa: E402
from nvpool.client.metaclient import MetaClient, VolumeInfo  # noqa: E402
from nvpool.client.volume import AsyncVolume  # noqa: E402
from nvpool.proto.units import parse_size  # noqa: E402

MiB = 1 << 20
KiB4 = 4096
VOL = "r2"  # the replicated volume of the main pool
PLAIN = "r1"  # the 1-replica volume it is compared with
REB = "rb"  # the replicated volume of the rebuild pool


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
        say(f"  {what}: {value:.3f} {unit}" + (f" (baseline {baseline:.3f}, ratio {ratio:.2f})" if ratio else ""))

    def render(self) -> str:
        def num(v: Optional[float]) -> str:
            if v is None:
                return "-"
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"

        head = f"{'#':<2} {'figure':<52} {'value':>9} {'unit':<6} {'baseline':>9} {'ratio':>6}  {'ratio of':<26} args"
        out = [head, "-" * len(head)]
        for r in sorted(self.rows, key=lambda r: int(r["figure"])):
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            out.append(f"{r['figure']:<2} {r['what']:<52} {num(r['value']):>9} {r['unit']:<6} {num(r['baseline']):>9} {ratio:>6}  "
                       f"{r['ratio_of']:<26} {r['args']}")
            if r["note"]:
                out.append(f"{'':<6}({r['note']})")
        return "\n".join(out)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---------------------------------------------------------------------------------------------- I/O loops
async def seq_read(vol: AsyncVolume, seconds: float, io: int = MiB, qd: int = 8) -> float:
    """Sequential reads (wrapping at the end of the volume) for ``seconds``; MB/s."""
    return (await seq_timed(vol, seconds, io, qd))[0]


class Reader:
    """Sequential 1 MiB reads at QD8 until stopped, recording (completion time, bytes) for windows."""

    def __init__(self, vol: AsyncVolume, qd: int = 8, io: int = MiB) -> None:
        self.vol, self.qd, self.io = vol, qd, io
        self.done: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = False
        self._task: Optional[asyncio.Future[list[None]]] = None

    def start(self) -> None:
        span = self.vol.size - self.vol.size % self.io
        nxt = 0

        async def worker() -> None:
            nonlocal nxt
            buf = memoryview(bytearray(self.io))
            while not self._stop:
                off = nxt
                nxt = (nxt + self.io) % span
                try:
                    await self.vol.readinto(buf, off)
                except Exception as exc:  # noqa: BLE001 - reported: an application would see it
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.05)
                    continue
                self.done.append((time.monotonic(), self.io))

        self._task = asyncio.ensure_future(asyncio.gather(*(worker() for _ in range(self.qd))))

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            await self._task

    def longest_gap(self, a: float, b: float) -> float:
        """The longest time in [a, b] with no read completing."""
        ts = [a] + sorted(t for t, _ in self.done if a <= t <= b) + [b]
        return max(y - x for x, y in zip(ts, ts[1:]))

    def mbps(self, a: float, b: float) -> float:
        if b <= a:
            return 0.0
        return sum(n for t, n in self.done if a <= t <= b) / (b - a) / 1e6


# ---------------------------------------------------------------------------------------------- pool state
async def volume(m: MetaClient, name: str) -> VolumeInfo:
    return await m.get_volume(name)


async def wait_health(m: MetaClient, name: str, want: str, timeout: float, interval: float = 0.05) -> float:
    """Poll until the volume's health is ``want``; the time.monotonic() it was first seen."""
    deadline = time.monotonic() + timeout
    while True:
        info = await m.get_volume(name)
        if info.health == want:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit(f"volume {name} not {want!r} within {timeout:g}s (health {info.health!r}; "
                             f"replicas {[r for r in info.replica_info if r['state'] != 'ok']})")
        await asyncio.sleep(interval)


def replicas_on(info: VolumeInfo, host: str) -> list[tuple[int, int]]:
    return [(r["column"], r["replica"]) for r in info.replica_info if r["host"] == host]


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+): (.*)$")


@dataclass
class Repair:
    """What the metadata service's log says about one volume's repair after an offset of meta.log."""

    out: list[float] = field(default_factory=list)  # wall times of "out of service" lines
    started: list[tuple[float, str]] = field(default_factory=list)  # (wall time, "resyncing"/"rebuilding")
    synced: list[tuple[float, int]] = field(default_factory=list)  # (wall time, bytes copied)
    lines: list[str] = field(default_factory=list)

    @property
    def copied(self) -> int:
        return sum(n for _, n in self.synced)

    @property
    def copy_seconds(self) -> float:
        if not self.started or not self.synced:
            return 0.0
        return self.synced[-1][0] - self.started[0][0]


def log_size(c: LocalCluster) -> int:
    p = c.dir / "logs" / "meta.log"
    return p.stat().st_size if p.exists() else 0


def parse_repair(c: LocalCluster, since: int, name: str) -> Repair:
    rep = Repair()
    with open(c.dir / "logs" / "meta.log", "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m is None or not m.group(4).startswith(f"volume {name}: "):
            continue
        msg = m.group(4)
        wall = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        rep.lines.append(line)
        if "out of service at generation" in msg:
            rep.out.append(wall)
        elif s := re.search(r": (resyncing|rebuilding) replicas .* at generation \d+", msg):
            rep.started.append((wall, s.group(1)))
        elif s := re.search(r"in sync at generation \d+ \((\d+) bytes copied\)", msg):
            rep.synced.append((wall, int(s.group(1))))
    return rep


async def parse_repair_when_done(c: LocalCluster, since: int, name: str) -> Repair:
    """The log line follows the health change in the same step; allow the file a moment anyway."""
    rep = parse_repair(c, since, name)
    for _ in range(40):
        if rep.synced:
            break
        await asyncio.sleep(0.05)
        rep = parse_repair(c, since, name)
    return rep


def mono_of_wall(wall: float) -> float:
    return wall - time.time() + time.monotonic()


# ---------------------------------------------------------------------------------------------- phases
@dataclass
class Pause:
    p50_before_ms: float
    pause_s: float
    p50_after_ms: float
    writes: int
    pause_ended_after_s: float  # from the fault to the end of the longest write
    stats: dict[str, int]
    fault_wall: float
    stalls: list[float]  # latencies of the other writes after the fault slower than 10 x the p50 before


async def pause_run(c: LocalCluster, vol: AsyncVolume, agent: int, sig: signal.Signals, before: float,
                    span: int, settle: float = 1.5, cap: float = 40.0) -> Pause:
    """QD1 4 KiB writes at random offsets in [0, span); the fault ``sig`` to ``agent`` after ``before`` s;
    on until ``settle`` s of writes without a slow one, at most ``cap`` s after the fault."""
    rng = random.Random(7)
    data = rng.randbytes(KiB4)
    blocks = span // KiB4
    lat: list[tuple[float, float]] = []  # (start, seconds)
    inflight: list[float] = []
    stop = False

    async def loop() -> None:
        while not stop:
            off = rng.randrange(blocks) * KiB4
            t = time.monotonic()
            inflight.append(t)
            await vol.write(off, data)
            inflight.clear()
            lat.append((t, time.monotonic() - t))

    task = asyncio.ensure_future(loop())
    try:
        await asyncio.sleep(before)
        base = [x for _, x in lat]
        slow = max(0.1, 20 * pct(base, 0.5))
        t_fault, fault_wall = time.monotonic(), time.time()
        if sig == signal.SIGKILL:
            await asyncio.to_thread(c.kill_agent, agent)
        else:
            os.kill(c.agents[agent].pid, sig)
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if task.done():
                break
            if now - t_fault > cap:
                say(f"  (no quiet {settle:g}s within {cap:g}s of the fault: stopping the loop)")
                break
            if inflight and now - inflight[0] > slow:
                continue  # a write is stalled right now
            last_slow = max((t + x for t, x in lat if t + x >= t_fault and x > slow), default=t_fault)
            if now - last_slow > settle and now - t_fault > settle:
                break
    finally:
        stop = True
        await task
    before_l = [x for t, x in lat if t < t_fault]
    after = [(t, x) for t, x in lat if t + x >= t_fault]
    worst = max(after, key=lambda p: p[1]) if after else (t_fault, 0.0)
    settled = [x for t, x in after if t > worst[0] + worst[1]]
    p50 = pct(before_l, 0.5)
    stalls = [x for t, x in after if (t, x) != worst and x > 10 * p50]
    return Pause(p50 * 1000, worst[1], pct(settled, 0.5) * 1000, len(lat),
                 worst[0] + worst[1] - t_fault, dict(vol.stats), fault_wall, stalls)


async def main_pool(args: argparse.Namespace, work: Path, table: Table, stopped: list[int],
                    clusters: list[LocalCluster]) -> None:
    size = parse_size(args.size)
    dirty = parse_size(args.dirty)
    span = parse_size(args.pause_span)
    sec = args.seconds
    os.environ.pop("NVPOOL_TLS", None)  # plaintext pool (tests/bench_tls.py measures TLS)
    c = LocalCluster(work / "pool", agents=args.agents, drives_per_agent=1, drive_size=args.drive_size, tls=False)
    c.meta_extra = ["--agent-timeout", str(args.agent_timeout), "--heartbeat-interval", str(args.heartbeat_interval),
                    "--rebuild-after", "600"]
    clusters.append(c)
    say(f"main pool: {args.agents} agents x 1 drive of {args.drive_size}; meta {' '.join(c.meta_extra)}")
    await asyncio.to_thread(c.up)
    meta = c.meta.address
    m = MetaClient(meta)
    pool = await AsyncPool.connect(meta)
    try:
        await pool.create_volume(VOL, size, replicas=2)
        await pool.create_volume(PLAIN, size, replicas=1)
        # 1. sequential writes, 2 replicas vs 1 (each volume written whole once: fresh space for both)
        say("1. sequential 1 MiB writes, QD8")
        vols = {n: await pool.open(n) for n in (PLAIN, VOL)}
        # alternate and keep each volume's best of three passes: page-cache writeback of one pass
        # otherwise lands on whichever volume is written next
        mbps = {n: 0.0 for n in vols}
        for rnd in range(3):
            for n in ((PLAIN, VOL) if rnd % 2 == 0 else (VOL, PLAIN)):
                mbps[n] = max(mbps[n], await seq_write(vols[n], size, seed=rnd))
        for v in vols.values():
            await v.close()
        a1 = f"--size {args.size} --agents {args.agents}"
        table.add(1, "seq 1M write MB/s QD8, 1 replica (best of 3 alternating)", mbps[PLAIN], "MB/s", a1)
        table.add(1, "seq 1M write MB/s QD8, 2 replicas", mbps[VOL], "MB/s", a1, mbps[PLAIN], "2-replica / 1-replica")
        await pool.delete_volume(PLAIN)

        # 2. reads healthy vs degraded
        say("2. reads, healthy")
        rd = await pool.open(VOL, read_only=True)
        await seq_read(rd, min(1.0, sec))  # warm: connections, page cache
        seq_h = await seq_read(rd, sec)
        rand_h = await rand_read(rd, sec)
        healthy_stats = dict(rd.stats)
        await rd.close()
        victim = 1
        host = c.agents[victim].name
        info = await volume(m, VOL)
        on_victim = replicas_on(info, host)
        say(f"   SIGKILL {host} (holds {len(on_victim)} of {len(info.replica_info)} replicas); waiting for degraded")
        t_kill = time.monotonic()
        await asyncio.to_thread(c.kill_agent, victim)
        t_deg = await wait_health(m, VOL, "degraded", 30)
        say(f"   degraded {t_deg - t_kill:.2f}s after the kill")
        rd = await pool.open(VOL, read_only=True)
        await rd.read(0, MiB)  # still reads
        say("2. reads, degraded")
        seq_d = await seq_read(rd, sec)
        rand_d = await rand_read(rd, sec)
        read_stats = dict(rd.stats)
        await rd.close()
        a2 = f"--size {args.size} --seconds {sec:g}"
        table.add(2, "seq 1M read MB/s QD8, healthy", seq_h, "MB/s", a2)
        table.add(2, f"seq 1M read MB/s QD8, degraded ({host} killed)", seq_d, "MB/s", a2, seq_h, "degraded / healthy")
        table.add(2, "4K rand read IOPS QD32, healthy", rand_h, "IOPS", a2, note=f"healthy reader stats {healthy_stats}")
        table.add(2, f"4K rand read IOPS QD32, degraded ({host} killed)", rand_d, "IOPS", a2, rand_h,
                  "degraded / healthy", note=f"degraded reader stats {read_stats}")

        # 4. resync of --dirty bytes written while the agent is down
        say(f"4. resync: writing {args.dirty} while {host} is down")
        wr = await pool.open(VOL)
        await seq_write(wr, dirty, seed=2)
        await wr.close()
        dirty_cols = {i for i, _ in on_victim}
        expect = sum(min(info.stripe_unit, dirty - off) for off in range(0, dirty, info.stripe_unit)
                     if (off // info.stripe_unit) % info.stripe_width in dirty_cols)
        since = log_size(c)
        t0 = time.monotonic()
        await asyncio.to_thread(c.start_agent, victim)
        t_ready = time.monotonic()
        t_ok = await wait_health(m, VOL, "ok", 120)
        rep = await parse_repair_when_done(c, since, VOL)
        a4 = f"--dirty {args.dirty} --size {args.size}"
        table.add(4, "resync: dirty bytes written while down", dirty / MiB, "MiB", a4)
        table.add(4, "resync: bytes copied (meta.log)", rep.copied / MiB, "MiB", a4, expect / MiB, "copied / expected",
                  note=f"expected = the part of the {args.dirty} in the {len(dirty_cols)} columns with a replica "
                       f"on {host}")
        table.add(4, "resync: agent ready -> volume ok", t_ok - t_ready, "s", a4,
                  note=f"agent restart took {t_ready - t0:.2f}s more; copy phase in the log "
                       f"{rep.copy_seconds:.2f}s; log: {' | '.join(x.split(': ', 1)[1] for x in rep.lines)}")
        # control: the healthy figures again, now that every replica is back (order and noise)
        rd = await pool.open(VOL, read_only=True)
        seq_h2 = await seq_read(rd, sec)
        rand_h2 = await rand_read(rd, sec)
        await rd.close()
        table.add(2, "seq 1M read MB/s QD8, healthy again (control)", seq_h2, "MB/s", a2, seq_h, "again / first")
        table.add(2, "4K rand read IOPS QD32, healthy again (control)", rand_h2, "IOPS", a2, rand_h, "again / first",
                  note="measured after figure 4's resync: the degraded ratio's noise and order effects")

        # 3. the pause a writer sees: SIGKILL, then SIGSTOP (a hung server)
        a3 = f"--pause-span {args.pause_span} --agent-timeout {args.agent_timeout:g}"
        wr = await pool.open(VOL)
        for sig, agent in ((signal.SIGKILL, 2), (signal.SIGSTOP, 3)):
            name = c.agents[agent].name
            say(f"3. QD1 4K write loop, {sig.name} {name} after {args.pause_before:g}s")
            wr.stats.update({k: 0 for k in wr.stats})
            if sig == signal.SIGSTOP:
                stopped.append(c.agents[agent].pid)
            since = log_size(c)
            p = await pause_run(c, wr, agent, sig, args.pause_before, span)
            out_log = parse_repair(c, since, VOL).out
            out_after = (f"{out_log[0] - p.fault_wall:.2f}s after it, in {len(out_log)} step(s)/generation(s)"
                         if out_log else "?")
            say(f"   pause {p.pause_s:.2f}s ending {p.pause_ended_after_s:.2f}s after the fault; stats {p.stats}")
            since = log_size(c)
            if sig == signal.SIGSTOP:
                os.kill(c.agents[agent].pid, signal.SIGCONT)
                stopped.remove(c.agents[agent].pid)
            else:
                await asyncio.to_thread(c.start_agent, agent)
            t_back = time.monotonic()
            await wait_health(m, VOL, "ok", 120)
            rep = await parse_repair_when_done(c, since, VOL)
            say(f"   ok again {time.monotonic() - t_back:.2f}s after {'SIGCONT' if sig == signal.SIGSTOP else 'restart'}"
                f" ({rep.copied / MiB:.1f} MiB copied)")
            table.add(3, f"QD1 4K write p50 before {sig.name}", p.p50_before_ms, "ms", a3)
            table.add(3, f"QD1 4K write pause ({sig.name} {name})", p.pause_s * 1000, "ms", a3, p.p50_before_ms,
                      "pause / p50 before",
                      note=f"ended {p.pause_ended_after_s:.2f}s after the fault; replicas out (meta.log) {out_after}; "
                           f"{len(p.stalls)} other writes > 10x p50 (longest {max(p.stalls, default=0) * 1000:.1f} ms, "
                           f"sum {sum(p.stalls) * 1000:.0f} ms); p50 after {p.p50_after_ms:.2f} ms; "
                           f"{p.writes} writes; client stats {p.stats}")
        await wr.close()
    finally:
        await pool.close()
        await m.close()


async def rebuild_pool(args: argparse.Namespace, work: Path, table: Table, clusters: list[LocalCluster]) -> None:
    size = parse_size(args.rebuild_size)
    rate = parse_size(args.repair_rate)
    os.environ.pop("NVPOOL_TLS", None)  # plaintext pool (tests/bench_tls.py measures TLS)
    c = LocalCluster(work / "rebuild", agents=args.agents, drives_per_agent=1, drive_size=args.drive_size, tls=False)
    c.meta_extra = ["--agent-timeout", str(args.agent_timeout), "--heartbeat-interval", str(args.heartbeat_interval),
                    "--rebuild-after", str(args.rebuild_after), "--repair-rate", args.repair_rate]
    clusters.append(c)
    say(f"rebuild pool: meta {' '.join(c.meta_extra)}")
    await asyncio.to_thread(c.up)
    meta = c.meta.address
    m = MetaClient(meta)
    pool = await AsyncPool.connect(meta)
    reader: Optional[Reader] = None
    try:
        await pool.create_volume(REB, size, replicas=2)
        wr = await pool.open(REB)
        await seq_write(wr, size, seed=3)  # every byte written: a rebuild copies what was ever written
        await wr.close()
        victim = args.agents - 1
        host = c.agents[victim].name
        info = await volume(m, REB)
        on_victim = replicas_on(info, host)
        col_len = -(-size // (info.stripe_unit * info.stripe_width)) * info.stripe_unit
        expect = len(on_victim) * col_len
        rd = await pool.open(REB, read_only=True)
        await seq_read(rd, min(1.0, args.seconds))  # warm
        reader = Reader(rd)
        t_start = time.monotonic()
        reader.start()
        await asyncio.sleep(args.seconds)
        say(f"5./6. SIGKILL {host} for good ({len(on_victim)} replicas) with a reader running")
        since = log_size(c)
        t_kill = time.monotonic()
        await asyncio.to_thread(c.kill_agent, victim)
        t_deg: Optional[float] = None
        t_reb: Optional[float] = None
        deadline = time.monotonic() + args.rebuild_after + 180
        while True:
            now = time.monotonic()
            vi = await m.get_volume(REB)
            if t_deg is None and vi.health == "degraded":
                t_deg = now
            if t_deg is not None and t_reb is None:
                st = await m.pool_status()
                if any(r.volume == REB and r.state == "rebuild" for r in st.repairs):
                    t_reb = now
            if t_deg is not None and vi.health == "ok":
                t_ok = now
                break
            if now > deadline:
                raise SystemExit(f"rebuild of {REB} did not finish (health {vi.health})")
            await asyncio.sleep(0.05)
        assert t_deg is not None
        await asyncio.sleep(min(1.0, args.seconds))  # a little of "after" in the reader's record
        await reader.stop()
        t_end = time.monotonic()
        rep = await parse_repair_when_done(c, since, REB)
        # the copy window: from the "rebuilding" log line (else the poll) to volume ok
        reb0 = mono_of_wall(rep.started[0][0]) if rep.started else (t_reb or t_deg)
        healthy = reader.mbps(t_start, t_kill)
        during = reader.mbps(reb0, t_ok)
        waiting = reader.mbps(t_deg + 0.5, reb0)  # out of service, not yet rebuilding
        after = reader.mbps(t_ok, t_end)
        a5 = (f"--rebuild-size {args.rebuild_size} --rebuild-after {args.rebuild_after:g} "
              f"--repair-rate {args.repair_rate}")
        table.add(5, "rebuild: bytes copied (meta.log)", rep.copied / MiB, "MiB", a5, expect / MiB, "copied / expected",
                  note=f"expected = {len(on_victim)} replicas on {host} x {col_len / MiB:g} MiB")
        table.add(5, "rebuild: replicas out -> volume ok", t_ok - t_deg, "s", a5,
                  note=f"out {t_deg - t_kill:.2f}s after the kill; includes --rebuild-after "
                       f"{args.rebuild_after:g}s; copy phase (log) {rep.copy_seconds:.2f}s")
        table.add(5, "rebuild MiB/s (copied / out->ok)", rep.copied / MiB / (t_ok - t_deg), "MiB/s", a5)
        copy_s = t_ok - reb0
        table.add(5, "rebuild MiB/s (copied / rebuilding->ok)", rep.copied / MiB / copy_s if copy_s > 0 else 0.0,
                  "MiB/s", a5, rate / MiB, "rate / --repair-rate",
                  note="log: " + " | ".join(x.split(": ", 1)[1] for x in rep.lines))
        a6 = f"--repair-rate {args.repair_rate} --seconds {args.seconds:g}"
        table.add(6, "foreground seq 1M read MB/s QD8, healthy", healthy, "MB/s", a6)
        table.add(6, "foreground seq 1M read MB/s, during rebuild", during, "MB/s", a6, healthy, "during / healthy",
                  note=f"window {copy_s:.2f}s; out but not yet rebuilding {waiting:.0f} MB/s; after {after:.0f} MB/s; "
                     f"longest gap between reads kill..ok {reader.longest_gap(t_kill, t_ok) * 1000:.0f} ms; "
                       f"reader errors {len(reader.errors)}; reader stats {rd.stats}")
        if reader.errors:
            say(f"   reader errors: {reader.errors[:5]}")
        await rd.close()
    finally:
        if reader is not None and not reader._stop:
            await reader.stop()
        await pool.close()
        await m.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M", help="main pool volumes (2-replica and 1-replica)")
    ap.add_argument("--drive-size", default="1G")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0, help="each timed read loop")
    ap.add_argument("--dirty", default="64M", help="written while an agent is down, then resynced")
    ap.add_argument("--pause-span", default="32M", help="the QD1 write loop writes 4 KiB at random in [0, this)")
    ap.add_argument("--pause-before", type=float, default=1.5, help="seconds of the write loop before the fault")
    ap.add_argument("--rebuild-size", default="512M", help="the rebuild pool's volume")
    ap.add_argument("--rebuild-after", type=float, default=2.0, help="the rebuild pool's meta --rebuild-after")
    ap.add_argument("--repair-rate", default="200M", help="the rebuild pool's meta --repair-rate (bytes/s)")
    ap.add_argument("--agent-timeout", type=float, default=1.5, help="meta --agent-timeout (both pools)")
    ap.add_argument("--heartbeat-interval", type=float, default=0.4, help="meta --heartbeat-interval (both pools)")
    ap.add_argument("--keep", action="store_true", help="keep the pools' directories (logs) afterwards")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.agents < 3:
        raise SystemExit("--agents must be at least 3 (2 replicas, and a rebuild needs a third server)")
    work = Path(tempfile.mkdtemp(prefix="nvpool-replbench-"))
    table = Table()
    stopped: list[int] = []
    clusters: list[LocalCluster] = []
    problems: list[str] = []
    t0 = time.monotonic()

    async def run() -> None:
        await main_pool(args, work, table, stopped, clusters)
        problems.extend(f"main pool {p}" for p in daemon_problems(clusters[0]))
        await asyncio.to_thread(clusters[0].down)
        await rebuild_pool(args, work, table, clusters)

    try:
        uvloop.run(run())
        if len(clusters) > 1:
            problems.extend(f"rebuild pool {p}" for p in daemon_problems(clusters[1]))
        elapsed = time.monotonic() - t0
        out = sys.stderr if args.json else sys.stdout
        print(f"\nreplicated volumes, {args.agents} agents x 1 drive of {args.drive_size} "
              f"(meta --agent-timeout {args.agent_timeout:g} --heartbeat-interval {args.heartbeat_interval:g}); "
              f"client replica_timeout 3s; {elapsed:.0f}s in all\n", file=out)
        print(table.render(), file=out)
        if problems:
            print("\ndaemon log errors:\n  " + "\n  ".join(problems[:40]), file=out)
        if args.json:
            print(json.dumps({"args": vars(args), "seconds": round(elapsed, 1), "rows": table.rows,
                              "daemon_log_errors": problems}, indent=2))
        return 0
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        for c in clusters:
            c.down()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
