"""Helpers the benchmark scripts share (not collected by pytest)."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

from nvpool.client.cluster import LocalCluster

MiB = 1 << 20
KiB4 = 4096


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def daemon_problems(c: LocalCluster) -> list[str]:
    """Tracebacks and error lines in a pool's daemon logs."""
    out = []
    for log in sorted((c.dir / "logs").glob("*.log")) if (c.dir / "logs").is_dir() else []:
        for line in log.read_text(errors="replace").splitlines():
            if "Traceback (most recent call last)" in line or " ERROR " in line or " CRITICAL " in line:
                out.append(f"{log.name}: {line}")
    return out


async def rand_read(vol: Any, seconds: float, io: int = KiB4, qd: int = 32, seed: int = 1) -> float:
    """4 KiB random reads at QD ``qd`` for ``seconds``; IOPS."""
    rng = random.Random(seed)
    blocks = vol.size // io
    ops = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal ops
        buf = memoryview(bytearray(io))
        while time.perf_counter() < end:
            await vol.readinto(buf, rng.randrange(blocks) * io)
            ops += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(qd)))
    return ops / (time.perf_counter() - t0)


async def seq_write(vol: Any, total: int, io: int = MiB, qd: int = 8, seed: int = 0) -> float:
    """Write [0, total) in ``io`` pieces, ``qd`` at a time; MB/s."""
    data = random.Random(seed).randbytes(io)
    nxt = 0

    async def worker() -> None:
        nonlocal nxt
        while nxt < total:
            off = nxt
            nxt += io
            await vol.write(off, data[: min(io, total - off)])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(qd)))
    return total / (time.perf_counter() - t0) / 1e6


async def seq_timed(vol: Any, seconds: float, io: int = MiB, qd: int = 8, write: bool = False,
                    seed: int = 1) -> tuple[float, int]:
    """Sequential reads (or writes of one random ``io`` buffer), wrapping at the end of the volume, ``qd``
    at a time, for ``seconds``; (MB/s, bytes moved)."""
    data = random.Random(seed).randbytes(io) if write else b""
    span = vol.size - vol.size % io
    nxt = 0
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal nxt, done
        buf = memoryview(bytearray(0 if write else io))
        while time.perf_counter() < end:
            off = nxt
            nxt = (nxt + io) % span
            if write:
                await vol.write(off, data)
            else:
                await vol.readinto(buf, off)
            done += io

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(qd)))
    return done / (time.perf_counter() - t0) / 1e6, done


# ------------------------------------------------------------------ the machine's own limits, same run
def memcpy_MBps(seconds: float = 1.0, size: int = 64 * MiB) -> float:
    """Single-thread memory copy bandwidth (numpy's copy is libc memcpy), ``size`` bytes at a time:
    the floor of a one-copy read through shared memory."""
    import numpy as np

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.copyto(dst, src)
        n += size
    return n / (time.perf_counter() - t0) / 1e6


def _tcp_sink(port_q: Any, chunk: int) -> None:
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = bytearray(chunk)
    view = memoryview(buf)
    while conn.recv_into(view):
        pass
    conn.close()
    srv.close()


def loopback_tcp_MBps(seconds: float = 2.0, chunk: int = MiB) -> float:
    """The loopback TCP limit, iperf3-style: one stream between two processes on 127.0.0.1, ``chunk``
    bytes per send and per receive (the receiver copies into one reused buffer, as a reader would)."""
    import multiprocessing
    import socket

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_tcp_sink, args=(q, chunk), daemon=True)
    p.start()
    port = q.get(timeout=30)
    s = socket.create_connection(("127.0.0.1", port))
    data = b"\0" * chunk
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.sendall(data)
        n += chunk
    s.close()
    p.join(timeout=30)
    return n / (time.perf_counter() - t0) / 1e6
