#!/usr/bin/env python3
"""Scrub benchmark (run by hand; not collected by pytest): what a scrub (pool/scrub.py) costs the
foreground, side by side in one run, on a local pool (a metadata service and agents as processes on
127.0.0.1, file-backed drives):

1. the scrub alone: an unlimited ``nvpool volume scrub`` of a full 2-replica volume, MB/s of volume
   compared (each copy reads that much from its drive), beside memcpy and the pool's own sequential
   read rate of the same volume;
2. foreground reads while a scrub runs: 4 KiB random reads at QD32 (IOPS) and 1 MiB sequential reads
   at QD8 (MB/s) with no scrub, during a scrub at ``--rate`` (the background default is 16 MiB/s), and
   during an unlimited scrub; each as a fraction of the no-scrub figure. The scrub reads its drives
   with O_DIRECT where the file system allows it (not on tmpfs): the foreground's page cache is left
   alone.
3. what a repair costs: one byte flipped in one copy, then a scrub; the time it took and the longest
   foreground 4 KiB read while the volume was fenced for the repair.

    .venv/bin/python tests/bench_scrub.py [--size 512M] [--seconds 3] [--rate 64M] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from tests.benchlib import daemon_problems, memcpy_MBps, rand_read, say, seq_timed, seq_write  # noqa: E402
from nvpool.agents.drive import DATA_OFFSET, Drive  # noqa: E402
from nvpool.client.api import AsyncPool  # noqa: E402
from nvpool.client.cluster import LocalCluster  # noqa: E402
from nvpool.client.metaclient import MetaClient  # noqa: E402
from nvpool.proto.units import parse_size  # noqa: E402

MiB = 1 << 20
VOL = "sc"


def cli(meta: str, *args: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "nvpool", *args, "--json"], capture_output=True, text=True,
                       env=dict(os.environ, NVPOOL_META=meta), timeout=3600)
    if p.returncode not in (0, 4):
        raise SystemExit(f"nvpool {' '.join(args)} failed: {p.stderr}")
    return json.loads(p.stdout)  # type: ignore[no-any-return]


class Scrub:
    """A scrub of the volume run in a background process (the CLI, waiting for it to finish)."""

    def __init__(self, meta: str, rate: int) -> None:
        argv = [sys.executable, "-m", "nvpool", "volume", "scrub", VOL, "--json"]
        if rate:
            argv += ["--max-rate", str(rate)]
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, NVPOOL_META=meta))

    def result(self) -> dict[str, Any]:
        out, err = self.p.communicate(timeout=3600)
        if self.p.returncode not in (0, 4):
            raise SystemExit(f"scrub failed: {err}")
        return json.loads(out)  # type: ignore[no-any-return]


async def max_read_latency(vol: Any, seconds: float) -> tuple[float, float]:
    """QD1 4 KiB random reads for ``seconds``: (p50, max) in ms."""
    rng = random.Random(9)
    buf = memoryview(bytearray(4096))
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        await vol.readinto(buf, rng.randrange(vol.size // 4096) * 4096)
        lat.append(time.perf_counter() - t)
    lat.sort()
    return lat[len(lat) // 2] * 1e3, lat[-1] * 1e3


async def bench(args: argparse.Namespace, c: LocalCluster, rows: list[tuple[str, str, str]]) -> None:
    meta = c.meta.address
    size = parse_size(args.size)
    p = await AsyncPool.connect(meta)
    try:
        await p.create_volume(VOL, size, replicas=2)
        vol = await p.open(VOL)
        say(f"filling {args.size}")
        fill = await seq_write(vol, size)
        await vol.flush()
        rows.append(("fill, 1 MiB writes QD8", f"{fill:.0f} MB/s", ""))
        mem = memcpy_MBps()
        seq, _ = await seq_timed(vol, args.seconds)
        rows.append(("memcpy (this machine)", f"{mem:.0f} MB/s", ""))

        say("scrub alone, unlimited")
        t0 = time.perf_counter()
        st = await asyncio.to_thread(lambda: Scrub(meta, 0).result())
        took = time.perf_counter() - t0
        rows.append(("scrub alone, unlimited", f"{st['bytes_done'] / took / 1e6:.0f} MB/s of volume "
                     f"({took:.1f} s, {st['bytes_done'] >> 20} MiB x 2 copies read)",
                     f"{st['bytes_done'] / took / 1e6 / seq:.2f} of seq reads ({seq:.0f} MB/s)"))

        base_r = await rand_read(vol, args.seconds)
        base_s, _ = await seq_timed(vol, args.seconds)
        rows.append(("4 KiB random reads QD32, no scrub", f"{base_r:.0f} IOPS", "1.00"))
        rows.append(("1 MiB sequential reads QD8, no scrub", f"{base_s:.0f} MB/s", "1.00"))
        for label, rate in ((f"scrub at {args.rate}/s", parse_size(args.rate)), ("scrub unlimited", 0)):
            say(f"foreground reads during a {label} (scrubs back to back)")
            stop = asyncio.Event()
            results: list[dict[str, Any]] = []

            async def scrubbing(rate: int = rate, stop: asyncio.Event = stop,
                                results: list[dict[str, Any]] = results) -> None:
                while not stop.is_set():
                    results.append(await asyncio.to_thread(Scrub(meta, rate).result))

            task = asyncio.create_task(scrubbing())
            await asyncio.sleep(1.0)  # the scrub has started reading
            r = await rand_read(vol, args.seconds)
            s, _ = await seq_timed(vol, args.seconds)
            stop.set()
            await task
            found = sum(x["checksum_errors"] + x["mismatches"] for x in results)
            rows.append((f"4 KiB random reads QD32, {label}", f"{r:.0f} IOPS", f"{r / base_r:.2f}"))
            rows.append((f"1 MiB sequential reads QD8, {label}", f"{s:.0f} MB/s ({len(results)} passes, {found} found)",
                         f"{s / base_s:.2f}"))

        say("a flipped byte: scrub and repair")
        m = MetaClient(meta)
        lay = (await m.get_layout(name=VOL))[0]
        await m.close()
        e = lay.replica_column(0, 1).extents[0]
        path = next(pth for pth in sorted((c.dir / "drives").glob("*.img"))
                    if Drive.inspect(str(pth))[0]["drive_id"] == e.drive_id)
        fd = os.open(path, os.O_RDWR)
        at = e.drive_offset + 12345
        assert at >= DATA_OFFSET
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)
        os.close(fd)
        t0 = time.perf_counter()
        sc = Scrub(meta, 0)
        p50, worst = await max_read_latency(vol, 1.0)
        while sc.p.poll() is None:
            p50b, worstb = await max_read_latency(vol, 0.5)
            worst = max(worst, worstb)
        res = await asyncio.to_thread(sc.result)
        rows.append(("scrub with one flipped byte", f"{time.perf_counter() - t0:.1f} s, {res['checksum_errors']} "
                     f"found, {res['repaired']} repaired", ""))
        rows.append(("QD1 4 KiB read during it (repair fenced)", f"p50 {p50:.2f} ms, max {worst:.1f} ms", ""))
        await vol.close()
    finally:
        await p.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M", help="the 2-replica volume")
    ap.add_argument("--drive-size", default="1G")
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="each timed read loop")
    ap.add_argument("--rate", default="64M", help="the rate-limited scrub's --max-rate")
    ap.add_argument("--keep", action="store_true", help="keep the pool's directory (logs) afterwards")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nvpool-scrubbench-"))
    rows: list[tuple[str, str, str]] = []
    c = LocalCluster(work / "pool", agents=args.agents, drives_per_agent=1, drive_size=args.drive_size, tls=False)
    c.meta_extra = ["--scrub-interval", "0"]
    t0 = time.monotonic()
    try:
        c.up()
        uvloop.run(bench(args, c, rows))
        problems = daemon_problems(c)
        out = sys.stderr if args.json else sys.stdout
        print(f"\nscrub, {args.agents} agents x 1 drive of {args.drive_size} under {work}, a 2-replica volume of "
              f"{args.size}; {time.monotonic() - t0:.0f}s in all\n", file=out)
        w = max(len(r[0]) for r in rows)
        for name, fig, ratio in rows:
            print(f"  {name:<{w}}  {fig:<48}  {ratio}", file=out)
        if problems:
            print("\ndaemon log errors:\n  " + "\n  ".join(problems[:40]), file=out)
        if args.json:
            print(json.dumps({"args": vars(args), "rows": rows, "daemon_log_errors": problems}, indent=2))
        return 0
    finally:
        c.down()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
