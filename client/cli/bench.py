"""``nvpool bench VOLUME``: throughput, IOPS and latency through the client library (like ``rbd bench``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from nvpool.client.cli.common import BadArgument, add_timeout, int_arg, meta_address, resolve_meta, seconds_arg, size_arg, volume_name
from nvpool.proto.errors import UsageError
from nvpool.proto.units import GiB, human

#: the most I/Os in flight `nvpool bench` runs (each holds an --io-size buffer)
MAX_IO_DEPTH = 1024
#: the largest --io-size
MAX_IO_SIZE = 1 * GiB
#: the most buffer memory (--io-size x --io-depth) `nvpool bench` allocates
MAX_BUFFERS = 4 * GiB


@dataclass
class BenchResult:
    io_type: str
    pattern: str
    io_size: int
    io_depth: int
    transport: str
    ops: int
    bytes: int
    seconds: float
    MBps: float
    iops: float
    lat_p50_us: float
    lat_p99_us: float
    lat_p999_us: float
    cpu_percent: float
    cpu_s_per_GB: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def run_bench(
    meta: Optional[str],
    volume: str,
    io_type: str = "read",
    io_size: int = 1 << 20,
    io_depth: int = 4,
    pattern: str = "seq",
    total: int = 0,
    seconds: float = 0.0,
    transport: str = "auto",
    digests: bool = False,
    seed: int = 1,
    progress: bool = False,
    meta_timeout: float = 30.0,
    registered: bool = False,
) -> BenchResult:
    """Run one benchmark on the calling event loop (ends at ``total`` bytes or ``seconds``).
    ``meta_timeout``: seconds to wait for each answer of the metadata service. ``registered``: the
    workers' buffers are memory registered with same-host agents (``AsyncPool.alloc``), so the shm
    transport's agents place and take the data there themselves (no copy in this process)."""
    from nvpool.client.api import AsyncPool
    from nvpool.client.metaclient import MetaClient, default_meta
    from nvpool.client.volume import ClientOptions

    if io_size <= 0 or io_depth <= 0 or total < 0 or seconds < 0:
        raise UsageError(f"io_size, io_depth must be positive, total and seconds not negative "
                         f"(got {io_size}, {io_depth}, {total}, {seconds})")
    if not total and not seconds:
        seconds = 10.0
    pool = AsyncPool(MetaClient(meta or default_meta(), timeout=meta_timeout),
                     ClientOptions(transport=transport, digests=digests))
    try:
        arena = pool.alloc(io_size * io_depth) if registered else None  # (before any connection opens)
        vol = await pool.open(volume, read_only=(io_type == "read"))
        size = vol.size // io_size * io_size
        if size <= 0:
            raise UsageError(f"volume {volume} ({human(vol.size)}) is smaller than one I/O of {human(io_size)}")
        rng = np.random.default_rng(seed)
        payload = memoryview(rng.integers(0, 256, io_size, dtype=np.uint8).tobytes())
        if arena is not None:
            for w in range(io_depth):
                arena[w * io_size : (w + 1) * io_size] = np.frombuffer(payload, dtype=np.uint8)
        lat: list[int] = []
        state = {"next": 0, "bytes": 0, "ops": 0}
        deadline = time.monotonic() + seconds if seconds else float("inf")
        limit = total or float("inf")
        slots = size // io_size

        async def worker(wid: int) -> None:
            buf = memoryview(bytearray(io_size)) if arena is None else memoryview(arena[wid * io_size : (wid + 1) * io_size].data)
            data = payload if arena is None else buf
            wr = random.Random(seed + wid + 1)  # (numpy's scalar draws cost microseconds per I/O)
            while state["bytes"] < limit and time.monotonic() < deadline:
                if pattern == "seq":
                    off = (state["next"] % slots) * io_size
                    state["next"] += 1
                else:
                    off = wr.randrange(slots) * io_size
                state["bytes"] += io_size
                is_write = io_type == "write" or (io_type == "rw" and wr.random() < 0.5)
                t0 = time.perf_counter_ns()
                if is_write:
                    await vol.write(off, data)
                else:
                    await vol.readinto(buf, off)
                lat.append(time.perf_counter_ns() - t0)
                state["ops"] += 1

        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(io_depth)))
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        moved = state["ops"] * io_size
        arr = np.array(lat or [0], dtype=np.float64) / 1000.0
        return BenchResult(
            io_type, pattern, io_size, io_depth, transport, state["ops"], moved, round(wall, 3),
            round(moved / wall / 1e6, 1), round(state["ops"] / wall, 1),
            round(float(np.percentile(arr, 50)), 1), round(float(np.percentile(arr, 99)), 1),
            round(float(np.percentile(arr, 99.9)), 1), round(100 * cpu / wall, 1),
            round(cpu / (moved / 1e9), 3) if moved else 0.0,
        )
    finally:
        await pool.close()


def cmd_bench(args: argparse.Namespace) -> int:
    import uvloop

    if args.io_size * args.io_depth > MAX_BUFFERS:
        raise BadArgument(
            f"--io-size {human(args.io_size)} x --io-depth {args.io_depth} needs {human(args.io_size * args.io_depth)} "
            f"of buffers; at most {human(MAX_BUFFERS)}"
        )
    res = uvloop.run(
        run_bench(
            resolve_meta(args), args.volume, args.io_type, args.io_size, args.io_depth, args.pattern,
            args.total or 0, args.seconds or 0.0, args.transport, args.digests, meta_timeout=args.timeout,
            registered=args.registered,
        )
    )
    if args.json:
        json.dump(res.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(
            f"{res.io_type} {res.pattern} {human(res.io_size)} x QD{res.io_depth} over {res.transport}: "
            f"{res.MBps} MB/s, {res.iops:.0f} IOPS\n"
            f"latency p50 {res.lat_p50_us} us  p99 {res.lat_p99_us} us  p99.9 {res.lat_p999_us} us\n"
            f"client CPU {res.cpu_percent}% ({res.cpu_s_per_GB} CPU-s per GB)  {res.ops} ops ({human(res.bytes)}) "
            f"in {res.seconds}s"
        )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="measure a volume's throughput, IOPS and latency through the client library",
        description="Benchmark a volume through the client library (not the NBD export). Writes destroy data.",
    )
    p.add_argument("volume", type=volume_name)
    p.add_argument("--io-type", choices=["read", "write", "rw"], default="read")
    p.add_argument("--io-size", default="1M", type=size_arg(1, MAX_IO_SIZE, "I/O size"),
                   help=f"bytes per I/O, at most {human(MAX_IO_SIZE)} (default 1M)")
    p.add_argument("--io-depth", type=int_arg(1, MAX_IO_DEPTH, "I/O depth"), default=4,
                   help=f"I/Os in flight, 1 to {MAX_IO_DEPTH} (default 4)")
    p.add_argument("--pattern", choices=["seq", "rand"], default="seq")
    p.add_argument("--total", type=size_arg(1, None, "total"), help="stop after this many bytes (e.g. 4G)")
    p.add_argument("--seconds", type=seconds_arg, help="stop after this many seconds (default 10 if no --total)")
    p.add_argument("--transport", choices=["auto", "tcp", "shm"], default="auto")
    p.add_argument("--digests", action="store_true", help="CRC32C header and data digests")
    p.add_argument("--registered", action="store_true",
                   help="use buffers registered with same-host agents (the shm transport's zero-copy path)")
    p.add_argument("--meta", type=meta_address, help="metadata service HOST:PORT (default $NVPOOL_META or 127.0.0.1:7400)")
    add_timeout(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
