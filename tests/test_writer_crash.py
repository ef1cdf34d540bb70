"""A replicated volume's writer killed mid fan-out (``pool/replication.py`` step 8, "Write intent").

The acceptance: a writer SIGKILLed with 32 writes of 1 MiB in flight, 20 rounds, half of them with one
agent SIGSTOPped for 0.4 s at the moment of the kill. Whenever the pool says healthy (after the dead
writer's lease is gone), every copy is byte-identical, read straight from the drive files; and the
history checker (tests/history.py) is clean for the readers, which run across all rounds.

Each round starts a writer *process* (the generated ``writer.py``) on a 2-copy volume. It keeps 32
writes of 1 MiB in flight at random 4 KiB-aligned offsets, each of self-describing payloads
(``history.payload``: fresh bytes for every write id), and appends a line to its log before issuing a
write (``B``) and after it was acknowledged (``E``), one ``write(2)`` each, so a line survives the
SIGKILL. The parent turns the log into a history: a write begun and never acknowledged is unfinished,
which the checker treats as indeterminate (it may land or not, at any time after it started).

"Healthy" means what an operator sees: the pool's status or the volume's health says ``ok``. While
the dead writer's lease is still live, that says nothing about the copies (a live writer has writes
in flight, on one copy and not yet the other, all the time): the claim is checked from the moment no
writer lease is held. The first time then that either says ``ok``, the copies are compared at once.

What fails the test, each with the rounds' figures (printed per round, too):

* copies that differ when the pool first says healthy, or once the round's resync is logged;
* a violation in the history of the readers (a scan of the whole volume and random reads, throttled,
  across all rounds, plus a full read after each round's recovery, so a lost acknowledged write shows
  as a stale read) merged with the writers' histories, or an error that reached a reader;
* the pool saying healthy before the round's resync was logged ("copies resynced after a writer ended
  uncleanly"); the volume never seen degraded between a lease's end and the resync in any round; a
  round without a logged resync.

The 20 rounds of the acceptance take about 3 minutes on 2 cores; ``NVPOOL_SOAK=1`` runs 60, and
``NVPOOL_CRASH_ROUNDS`` any number.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from nvpool.agents.drive import Drive
from nvpool.client.api import AsyncPool
from nvpool.client.cluster import LocalCluster
from nvpool.client.metaclient import MetaClient
from nvpool.proto.layout import Layout
from tests.conftest import make_cluster
from tests.history import BLOCK, ID_SPAN, History, Violation, check, find_violations, summary

pytestmark = pytest.mark.slow

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
SOAK = os.environ.get("NVPOOL_SOAK") == "1"
#: rounds: the acceptance's 20 (about 3 minutes here), more with NVPOOL_SOAK=1; NVPOOL_CRASH_ROUNDS sets it
ROUNDS = int(os.environ.get("NVPOOL_CRASH_ROUNDS", 60 if SOAK else 20))
VOLUME_SIZE = 128 * MiB
WRITE_BLOCKS = MiB // BLOCK
IN_FLIGHT = 32
#: a dead writer's lease expires after this (short, so a round is quick)
LEASE_TTL = 3.0
META_ARGS = ["--lease-ttl", str(LEASE_TTL), "--agent-timeout", "1.2", "--heartbeat-interval", "0.3",
             "--rebuild-after", "600"]
STOP_FOR = 0.4
#: the readers' pace (bytes/s): the scan passes over the whole volume every 2 s, so it reads every block
#: between a kill and the resync that follows
SCAN_RATE, RANDOM_RATE = 64 * MiB, 16 * MiB
#: the longest a round may take from the kill to healthy copies (lease expiry, fence, resync)
RECOVERY_TIMEOUT = 60.0
#: how long after that the round's resync may take to be logged
RESYNC_WAIT = 10.0

WRITER = textwrap.dedent("""
    import asyncio, os, random, sys, time
    root, meta, name, log, id_base, blocks, per_write, in_flight, seed = sys.argv[1:]
    sys.path.insert(0, root)
    from nvpool.client.api import AsyncPool
    from tests.history import BLOCK, payload

    id_base, blocks, per_write, in_flight = int(id_base), int(blocks), int(per_write), int(in_flight)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line):
        os.write(fd, (line + "\\n").encode())  # one write(2) a line: what is written survives SIGKILL

    async def main():
        pool = await AsyncPool.connect(meta)
        vol = await pool.open(name, holder=f"crash-writer {os.getpid()}")
        rng = random.Random(int(seed))
        ids = iter(range(id_base + 1, id_base + 10**9))
        note(f"S {time.monotonic()!r}")

        async def one():
            while True:
                wid = next(ids)
                first = rng.randrange(0, blocks - per_write + 1)
                data = payload(wid, first, per_write)
                t0 = time.monotonic()
                note(f"B {wid} {first} {per_write} {t0!r}")
                try:
                    await vol.write(first * BLOCK, data)
                    ok = 1
                except Exception as exc:  # recorded as failed (indeterminate); the parent reports it
                    print(f"write {wid}: {exc!r}", file=sys.stderr, flush=True)
                    ok = 0
                note(f"E {wid} {ok} {time.monotonic()!r}")

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(in_flight))), 120)  # never ends first

    asyncio.run(main())
""")


def writer_history(log: Path, id_base: int) -> tuple[History, int, int, int]:
    """The history of a killed writer's log: (history, acknowledged, failed, unfinished). A line cut by
    the kill (no newline) is ignored: at worst a write counts as unfinished."""
    h = History(id_base)
    ended: dict[int, tuple[bool, float]] = {}
    starts: list[tuple[int, int, int, float]] = []
    text = log.read_text()
    for line in text[: text.rfind("\n") + 1].splitlines():
        f = line.split()
        if f[0] == "B":
            starts.append((int(f[1]), int(f[2]), int(f[3]), float(f[4])))
        elif f[0] == "E":
            ended[int(f[1])] = (f[2] == "1", float(f[3]))
    for wid, first, n, t0 in sorted(starts):
        got, _ = h.begin_write(first, n, at=t0)
        assert got == wid, f"{log}: write ids are not consecutive ({got} != {wid})"
        if wid in ended:
            h.end_write(wid, ended[wid][0], at=ended[wid][1])
    acked = sum(1 for ok, _ in ended.values() if ok)
    return h, acked, len(ended) - acked, len(starts) - len(ended)


class Readers:
    """Readers that survive every round: a sequential scan of the whole volume and random reads, in a
    thread of their own, recording a history; ``scan_all`` reads the volume once more, whole."""

    def __init__(self, meta: str, name: str, blocks: int) -> None:
        self.meta, self.name, self.blocks = meta, name, blocks
        self.history = History()
        self.errors: list[str] = []
        self.reads = 0
        #: the read handle's counters (hedged reads: a read also sent to the other copy)
        self.stats: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self.stop: Optional[asyncio.Event] = None
        self.vol: Any = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _read(self, first: int, n: int, rate: float = 0.0) -> None:
        """Read blocks ``first .. first+n-1`` and record it; with ``rate``, then pause to stay below it
        (bytes/s): the checker's time grows with every block read."""
        t0 = time.monotonic()
        try:
            data = await self.vol.read(first * BLOCK, n * BLOCK)
            self.history.record_read(first, bytes(data), t0, time.monotonic())
        except Exception as exc:  # noqa: BLE001 - recorded: the test fails on any
            self.history.read_failed(first, n, t0, time.monotonic(), repr(exc))
            self.errors.append(f"read of blocks {first}+{n}: {exc!r}")
        self.reads += 1
        if rate:
            await asyncio.sleep(max(0.0, t0 + n * BLOCK / rate - time.monotonic()))

    async def _main(self) -> None:
        stop = self.stop = asyncio.Event()
        pool = await AsyncPool.connect(self.meta)
        try:
            self.vol = await pool.open(self.name, read_only=True)
            self._ready.set()

            async def scan() -> None:
                pos = 0
                while not stop.is_set():
                    n = min(WRITE_BLOCKS, self.blocks - pos)
                    await self._read(pos, n, SCAN_RATE)
                    pos = (pos + n) % self.blocks

            async def randomly(seed: int) -> None:
                rng = random.Random(seed)
                while not stop.is_set():
                    n = rng.choice((16, WRITE_BLOCKS))
                    await self._read(rng.randrange(0, self.blocks - n + 1), n, RANDOM_RATE)

            await asyncio.gather(scan(), randomly(11))
            self.stats = dict(self.vol.stats)
            await self.vol.close()
        finally:
            self._ready.set()
            await pool.close()

    async def _scan_all(self) -> None:
        for first in range(0, self.blocks, WRITE_BLOCKS):
            await self._read(first, min(WRITE_BLOCKS, self.blocks - first))

    def scan_all(self) -> None:
        asyncio.run_coroutine_threadsafe(self._scan_all(), self.loop).result(120)

    def __enter__(self) -> "Readers":
        self.thread.start()
        assert self._ready.wait(60) and self.vol is not None, "the readers did not open the volume"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the readers did not stop"
        self.loop.close()


def drive_files(c: LocalCluster) -> dict[str, Path]:
    """Drive id -> its file, from each drive's own label."""
    out = {}
    for path in sorted((c.dir / "drives").glob("*.img")):
        label, _ = Drive.inspect(str(path))
        out[str(label["drive_id"])] = path
    return out


def differing_blocks(c: LocalCluster, lay: Layout) -> dict[tuple[int, int], int]:
    """(column, replica) -> how many 4 KiB blocks of that copy differ from replica 0 of its column, read
    straight from the drive files (the page cache the agents write through)."""
    files = drive_files(c)
    fds = {d: os.open(p, os.O_RDONLY) for d, p in files.items()}
    out = {}
    try:
        for i in range(lay.width):
            length = lay.replica_column(i, 0).length
            copies = []
            for k in range(lay.replicas):
                buf = bytearray()
                for e in lay.replica_column(i, k).extents:
                    buf += os.pread(fds[e.drive_id], e.length, e.drive_offset)
                copies.append(np.frombuffer(bytes(buf[:length]), dtype=np.uint64).reshape(-1, BLOCK // 8))
            for k in range(1, lay.replicas):
                bad = int((copies[k] != copies[0]).any(axis=1).sum())
                if bad:
                    out[(i, k)] = bad
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


RESYNCED = re.compile(r"copies resynced after a writer ended uncleanly: (\d+) bytes")


@dataclass
class Round:
    n: int
    stopped: str = ""
    kill_after: float = 0.0
    acked: int = 0
    failed: int = 0
    unfinished: int = 0
    #: seconds from the kill to the first claim of health without a writer lease
    to_healthy: float = 0.0
    #: degraded seen between the end of the writer's lease and that claim, and after it
    degraded_before: bool = False
    degraded_after: bool = False
    #: whether the round's resync had been logged when the claim came
    resync_before_claim: bool = False
    #: bytes of each resync logged after the kill
    resynced: list[int] = field(default_factory=list)
    #: differing blocks per (column, replica) at the claim, and again once the round's resync was
    #: logged and the volume said healthy (or RESYNC_WAIT passed)
    differing: dict[tuple[int, int], int] = field(default_factory=dict)
    differing_after: dict[tuple[int, int], int] = field(default_factory=dict)

    def line(self) -> str:
        diff, after = sum(self.differing.values()), sum(self.differing_after.values())
        return (f"round {self.n:2d}: kill {self.kill_after:.2f}s after the first write"
                f"{f', {self.stopped} stopped {STOP_FOR}s' if self.stopped else ''}; writes {self.acked} acked, "
                f"{self.unfinished} in flight, {self.failed} failed; healthy {self.to_healthy:.2f}s after the kill, "
                f"{'after' if self.resync_before_claim else 'BEFORE'} its resync (degraded "
                f"{'seen' if self.degraded_before else 'not seen'} before, {'seen' if self.degraded_after else 'not seen'}"
                f" after); resynced {'+'.join(str(b) for b in self.resynced) or 'nothing'} bytes; {diff} differing "
                f"4 KiB blocks when it said healthy, {after} once resynced")


class MetaLog:
    """The resyncs the metadata service logged after an unclean writer (bytes copied each)."""

    def __init__(self, c: LocalCluster) -> None:
        self.path = c.dir / "logs" / "meta.log"

    def resyncs(self) -> list[int]:
        return [int(b) for b in RESYNCED.findall(self.path.read_text(errors="replace"))]


async def healthy_without_writer(meta: MetaClient, name: str, r: Round, t_kill: float) -> None:
    """Wait until no writer lease is held and the pool or the volume says healthy (whichever first)."""
    deadline = t_kill + RECOVERY_TIMEOUT
    while True:
        info = await meta.get_volume(name)
        pool = await meta.pool_status()
        if not any(h["mode"] == "write" for h in info.holders):
            if info.health == "ok" or pool.health == "ok":
                r.to_healthy = time.monotonic() - t_kill
                return
            r.degraded_before = True
        assert time.monotonic() < deadline, (
            f"round {r.n}: not healthy {RECOVERY_TIMEOUT:g}s after the writer's kill (holders {info.holders}, "
            f"volume {info.health}, pool {pool.health})")
        await asyncio.sleep(0.02)


async def resynced(meta: MetaClient, name: str, r: Round, log: MetaLog, seen: int) -> None:
    """Wait (at most RESYNC_WAIT) for the round's resync to be logged and the volume to say healthy,
    noting whether it said degraded meanwhile."""
    deadline = time.monotonic() + RESYNC_WAIT
    while time.monotonic() < deadline:
        r.resynced = log.resyncs()[seen:]
        info = await meta.get_volume(name)
        pool = await meta.pool_status()
        if info.health != "ok" or pool.health != "ok":
            r.degraded_after = True
        elif r.resynced:
            return
        await asyncio.sleep(0.02)


def start_writer(tmp: Path, c: LocalCluster, name: str, n: int, blocks: int, seed: int) -> tuple[
        "subprocess.Popen[bytes]", Path, int]:
    script = tmp / "writer.py"
    if not script.exists():
        script.write_text(WRITER)
    log = tmp / f"writer{n}.log"
    id_base = (n + 1) * ID_SPAN
    err = open(tmp / f"writer{n}.err", "wb")
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT), c.meta.address, name, str(log), str(id_base),
                             str(blocks), str(WRITE_BLOCKS), str(IN_FLIGHT), str(seed)],
                            stdout=err, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT))
    err.close()
    return proc, log, id_base


async def run_rounds(tmp: Path, c: LocalCluster, name: str, readers: Readers, rounds: list[Round]) -> History:
    rng = random.Random(20261208)
    blocks = VOLUME_SIZE // BLOCK
    writers = History()
    meta = MetaClient(c.meta.address)
    meta_log = MetaLog(c)
    try:
        for n in range(ROUNDS):
            r = Round(n)
            seen = len(meta_log.resyncs())
            proc, log, id_base = start_writer(tmp, c, name, n, blocks, rng.randrange(1 << 30))
            stopped: Optional[int] = None
            try:
                t_end = time.monotonic() + 60
                while not (log.exists() and log.read_text().startswith("S ")):
                    assert proc.poll() is None, f"round {n}: the writer exited: " + (
                        tmp / f"writer{n}.err").read_text(errors="replace")[-2000:]
                    assert time.monotonic() < t_end, f"round {n}: the writer did not start writing"
                    await asyncio.sleep(0.01)
                r.kill_after = rng.uniform(0.5, 2.5)
                await asyncio.sleep(r.kill_after)
                if n % 2 == 1:  # half the rounds: an agent hangs at the moment of the kill
                    agent = c.agents[rng.randrange(len(c.agents))]
                    stopped, r.stopped = agent.pid, agent.name
                    os.kill(agent.pid, signal.SIGSTOP)
                os.kill(proc.pid, signal.SIGKILL)
                t_kill = time.monotonic()
                if stopped is not None:
                    await asyncio.sleep(STOP_FOR)
            finally:
                if stopped is not None:
                    os.kill(stopped, signal.SIGCONT)
                if proc.poll() is None:
                    proc.kill()
                proc.wait(30)
            await healthy_without_writer(meta, name, r, t_kill)
            r.resync_before_claim = len(meta_log.resyncs()) > seen
            lay, _ = await meta.get_layout(name=name)
            assert not lay.degraded, f"round {n}: healthy, but a copy is out of service: {lay.states}"
            r.differing = differing_blocks(c, lay)  # at once: what the copies hold when the pool says healthy
            await resynced(meta, name, r, meta_log, seen)
            r.differing_after = differing_blocks(c, (await meta.get_layout(name=name))[0])
            h, r.acked, r.failed, r.unfinished = writer_history(log, id_base)
            writers.merge(h)
            assert r.acked > 0, f"round {n}: the writer acknowledged no write before its kill"
            await asyncio.to_thread(readers.scan_all)  # every acknowledged write must now be read back
            rounds.append(r)
            print(r.line(), flush=True)
    finally:
        await meta.close()
    return writers


@pytest.mark.timeout(120 + 30 * ROUNDS)
def test_copies_identical_after_writer_killed_mid_fanout(tmp_path: Path) -> None:
    c = make_cluster(tmp_path / "pool", agents=3, drives_per_agent=1, drive_size="192M")
    c.meta_extra = list(META_ARGS)
    c.up()
    name = "wc"

    async def create() -> None:
        p = await AsyncPool.connect(c.meta.address)
        try:
            await p.create_volume(name, VOLUME_SIZE, replicas=2)
        finally:
            await p.close()

    asyncio.run(create())
    rounds: list[Round] = []
    t0 = time.monotonic()
    with Readers(c.meta.address, name, VOLUME_SIZE // BLOCK) as readers:
        try:
            writers = asyncio.run(run_rounds(tmp_path, c, name, readers, rounds))
        finally:
            print(f"{len(rounds)} rounds in {time.monotonic() - t0:.0f}s; {readers.reads} reads", flush=True)
    print(f"readers: {readers.stats}", flush=True)
    failures = []
    diverged = [r for r in rounds if r.differing or r.differing_after]
    if diverged:
        failures.append(f"copies differ although the pool said healthy, in {len(diverged)} of {len(rounds)} rounds:\n"
                        + "\n".join(f"{r.line()}\n    (column, replica): blocks {sorted(r.differing.items())[:6]}, "
                                    f"after the resync {sorted(r.differing_after.items())[:6]}" for r in diverged))
    if readers.errors:
        failures.append(f"{len(readers.errors)} errors reached the readers: {readers.errors[:5]}")
    history = readers.history
    history.merge(writers)
    t_check = time.monotonic()
    problems = check(history)
    print(f"history checked in {time.monotonic() - t_check:.1f}s: {summary(history)}", flush=True)
    if problems:
        (tmp_path / "history.json").write_text(history.to_json())
        found = find_violations(history)
        _, reads = history.snapshot()

        def round_of(v: Violation) -> int:  # whose write was read: for going back in time, the newer one
            wid = v.returned
            if v.kind == "nonmonotonic" and v.culprit is not None:
                earlier = reads[v.culprit]
                wid = earlier.ids[v.block - earlier.first_block]
            return wid // ID_SPAN - 1

        failures.append(f"the history checker found {len(found)} violations ({', '.join(sorted({v.kind for v in found}))})"
                        f" in {len({v.read for v in found})} reads, of writes of rounds "
                        f"{sorted({round_of(v) for v in found})}; the first:\n" + "\n".join(problems[:6]) + "\n"
                        + summary(history))
    early = [r.n for r in rounds if not r.resync_before_claim]
    if early:
        failures.append(f"the pool said healthy without a writer lease before the kill's resync was done in rounds "
                        f"{early}" + (f" (then degraded again in {[r.n for r in rounds if r.degraded_after]})"
                                      if any(r.degraded_after for r in rounds) else ""))
    if not any(r.degraded_before for r in rounds):  # the window is short: asserted over all the rounds
        failures.append("the volume never showed degraded between the end of a killed writer's lease and its resync")
    if not all(r.resynced for r in rounds):
        failures.append(f"no resync was logged within {RESYNC_WAIT:g}s in rounds {[r.n for r in rounds if not r.resynced]}")
    assert not failures, "\n\n".join(failures)
