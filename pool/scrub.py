"""Scrub: find the copies of a replicated volume that no longer hold what was written, and repair them.

Ceph's deep scrub and ZFS's scrub are the anchors: read every copy of every written block on the
server that holds it, compare, and rewrite a wrong copy from a right one. Here the metadata service
drives it (``Scrubber``), one volume at a time, through the agents' ``Scrub`` call, which reads a range
of an extent from the drive itself and answers with a checksum per 4 KiB block and the blocks that do
not match the checksum stored when they were written (``agents/checksums.py``). No data crosses the
network unless a difference is found.

A pass over a volume, column by column:

1. **What to read**: the union of the ranges any ``ok`` copy of the column ever wrote (``MapExtent``),
   in pieces of at most ``SCRUB_MAX`` that lie inside one extent on every copy (``scrub_pieces``),
   at ``rate`` bytes per second of column (each copy reads that much).
2. **First look**: every ``ok`` copy sums the piece at once. A block is *suspect* when a copy's bytes
   fail their own stored sum (a *checksum error*: the drive returned what it was not given) or the
   copies' sums differ (a *mismatch*).
3. **Second look**, after ``SECOND_LOOK`` seconds, at the suspect blocks only. A write in flight makes
   copies differ for as long as it takes to reach them all (milliseconds), and a write racing the
   first look's read can make a block look bad; either shows as a different sum the second time.
   Blocks whose sums changed are counted ``busy`` and left to the next pass; the others are repaired.
4. **Repair, fenced** (``_repair``): the writer may still write. Under the service's lock the volume's
   agents are fenced at a new generation ``g`` (committed ahead, ``MetaService.fence_ahead``) and the
   layout is published at ``g`` only when the repair is done: meanwhile every command of the old
   generation is refused, readers and the writer wait for ``g`` within their I/O budgets (as for a
   migration's cut-over), and nothing changes the blocks. Then the suspects are looked at a third
   time, and for each block (``decide``):

   * the **source** is the first ``ok`` copy (in the layout's order, which is the order the writer
     writes them, ``pool/replication.py`` step 8) whose bytes match its stored sum; failing that, the
     first copy that keeps no sums (a drive labelled before sums existed); failing that, none: the
     block is *unrepairable* (every copy fails its own sums) and reported, never guessed at;
   * every other copy whose sum differs from the source's, or whose bytes fail their own sum, is
     rewritten from the source with ``CopyExtent`` (at generation ``g``), which stores new sums with
     the bytes, and flushed.

   Why this source: a copy whose bytes match the sum stored with them holds what was last written to
   it. Copies that each match their own sums but differ can only come from a write that did not reach
   every copy, which the writer-resync (step 8) settles by rolling the first copy forward; the same
   rule here keeps the two repairs from ever disagreeing. The layout is then published at ``g`` (also
   when the repair failed: the fence is committed, so ``g`` must come), and clients resume.
5. **Report**: counters per pass (``ScrubStatus``, in ``pool status`` and ``nvpool volume scrub``), pool
   totals in the metrics (``nvpool_meta_scrub_*``), and a WARNING line in the service's log (its audit
   trail) for every block found and for every copy rewritten, naming the volume, column, copy, agent,
   drive and offset.

Volumes being resynced after a writer crash, re-spread, resized, or with a copy not ``ok`` are not
scrubbed then (the background schedule comes back to them; ``nvpool volume scrub`` says why). The
background schedule scrubs every replicated volume once per ``scrub_interval``, oldest pass first, one
volume at a time, at ``scrub_rate``; the time of each volume's last pass is kept in the metadata store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from nvpool.proto.blocksums import SCRUB_MAX, SUM_BLOCK, SUM_SIZE
from nvpool.pool.meta import MetaService, VolumeRec
from nvpool.pool.rebalancer import TokenBucket
from nvpool.pool.replication import merge_ranges
from nvpool.proto.errors import NotFoundError, NvpoolError, UnavailableError, UsageError
from nvpool.proto.layout import Extent, Layout

logger = logging.getLogger(__name__)

#: seconds between the first look at a suspect block and the second
SECOND_LOOK = 0.5
#: longest a fenced repair may take before the layout is published regardless
REPAIR_TIMEOUT = 10.0
#: longest one agent may take to sum a piece
SCRUB_CALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Piece:
    """A column range inside one extent on every copy: ``parts[j]`` is (extent, offset in it) on copy
    ``copies[j]``."""

    offset: int
    length: int
    copies: tuple[int, ...]
    parts: tuple[tuple[Extent, int], ...]


def _align(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """``ranges`` widened to whole blocks, clipped to ``limit``, merged."""
    widened = []
    for off, n in ranges:
        start = off - off % SUM_BLOCK
        widened.append((start, min(limit, -(-(off + n) // SUM_BLOCK) * SUM_BLOCK) - start))
    return merge_ranges(widened)


def scrub_pieces(layout: Layout, column: int, copies: list[int], ranges: list[tuple[int, int]],
                 chunk: int = SCRUB_MAX) -> list[Piece]:
    """Pieces of ``column`` covering ``ranges`` (column offsets, widened to whole blocks), each at most
    ``chunk`` bytes and inside one extent on every one of ``copies`` (their extent boundaries may differ)."""
    cols = [layout.replica_column(column, k) for k in copies]
    need = min(c.length for c in cols)
    out = []
    for off, n in _align(ranges, need):
        pos, end = off, off + n
        while pos < end:
            k = min(end - pos, chunk)
            parts = []
            for c in cols:
                i, eoff = c.locate(pos)
                k = min(k, c.extents[i].length - eoff)
                parts.append((c.extents[i], eoff))
            out.append(Piece(pos, k, tuple(copies), tuple(parts)))
            pos += k
    return out


@dataclass(frozen=True)
class Look:
    """What one copy said about a range: sums per block, blocks failing their stored sums, sums kept."""

    sums: bytes
    bad: frozenset[int]
    kept: bool

    def sum(self, block: int) -> bytes:
        return self.sums[block * SUM_SIZE : block * SUM_SIZE + SUM_SIZE]


def suspects(looks: list[Look], blocks: int) -> list[int]:
    """Blocks (of a range every look covers) where a copy fails its own sums or the copies differ."""
    return [b for b in range(blocks)
            if any(b in lk.bad for lk in looks) or len({lk.sum(b) for lk in looks}) > 1]


def decide(looks: list[Look], block: int) -> tuple[Optional[int], list[int]]:
    """(the copy to repair ``block`` from, the copies to rewrite), as indexes into ``looks`` (the copies
    in the layout's order); (None, []) when no copy can be trusted (see the module docstring, step 4)."""
    source = next((j for j, lk in enumerate(looks) if lk.kept and block not in lk.bad), None)
    if source is None:
        source = next((j for j, lk in enumerate(looks) if not lk.kept), None)
    if source is None:
        return None, []
    want = looks[source].sum(block)
    return source, [j for j, lk in enumerate(looks) if j != source and (lk.sum(block) != want or block in lk.bad)]


def same_piece(lay: Layout, column: int, piece: Piece) -> bool:
    """Whether ``piece`` still names the ``ok`` copies of ``column`` in ``lay`` and their extents."""
    if tuple(lay.readable(column)) != piece.copies:
        return False
    for k, (ext, eoff) in zip(piece.copies, piece.parts):
        col = lay.replica_column(column, k)
        try:
            i, off = col.locate(piece.offset)
        except IndexError:
            return False
        if col.extents[i].extent_id != ext.extent_id or off != eoff:
            return False
    return True


def block_runs(blocks: list[int], limit: int = SCRUB_MAX // SUM_BLOCK) -> list[tuple[int, int]]:
    """Sorted block indexes as (first, count) runs of consecutive blocks, each at most ``limit`` long."""
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if out and out[-1][0] + out[-1][1] == b and out[-1][1] < limit:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


@dataclass
class ScrubState:
    """One volume's running or last scrub (``ScrubStatus`` on the wire)."""

    volume: str
    state: str = "idle"
    bytes_total: int = 0
    bytes_done: int = 0
    checksum_errors: int = 0
    mismatches: int = 0
    repaired: int = 0
    unrepairable: int = 0
    busy: int = 0
    started: float = 0.0
    finished: float = 0.0
    error: str = ""
    max_rate: int = 0
    background: bool = False
    task: Optional["asyncio.Task[None]"] = field(default=None, repr=False, compare=False)

    def public(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "task"}


class Scrubber:
    """Runs scrubs (on request and on the background schedule) for a metadata service."""

    def __init__(self, svc: MetaService, repl: Any, rate: int = 16 * 1024 * 1024, interval: float = 7 * 86400.0,
                 tick: float = 5.0) -> None:
        self.svc = svc
        self.repl = repl  # pool/replication.py Replication: its per-volume lock orders repairs and resyncs
        self.rate = rate
        self.interval = interval
        self.tick = tick
        #: volume id -> its running or last scrub
        self.scrubs: dict[int, ScrubState] = {}
        #: volume id -> wall time its last pass finished (persisted: ``scrub/<volume id>``)
        self.last: dict[int, float] = {}
        #: pool totals since this service started leading (metrics)
        self.totals = {"bytes": 0, "checksum_errors": 0, "mismatches": 0, "repaired": 0, "unrepairable": 0,
                       "passes": 0}
        self._task: Optional[asyncio.Task[None]] = None
        self._started = time.time()
        for key, raw in svc.store.scan("scrub/"):
            try:
                rec = json.loads(raw)
                vid = int(key.rsplit("/", 1)[1])
                self.last[vid] = float(rec["finished"])
                self.scrubs[vid] = ScrubState(volume=str(vid), state="done", **{
                    k: rec[k] for k in ("bytes_total", "bytes_done", "checksum_errors", "mismatches", "repaired",
                                        "unrepairable", "busy", "started", "finished") if k in rec})
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                logger.warning("ignoring unreadable scrub record %s: %s", key, exc)

    # ------------------------------------------------------------------ requests
    def status(self) -> list[dict[str, Any]]:
        out = []
        for vid, st in sorted(self.scrubs.items()):
            try:
                st.volume = self.svc.volume_by_id(vid).name
            except NvpoolError:
                continue
            out.append(st.public())
        return out

    def get(self, name: str) -> ScrubState:
        vol = self.svc.volume(name)
        return self.scrubs.get(vol.volume_id) or ScrubState(volume=vol.name)

    def start_scrub(self, name: str, max_rate: int = 0, background: bool = False) -> ScrubState:
        """Start a scrub of volume ``name`` (or return the one running). Refused when the volume is not
        replicated or cannot be scrubbed now (the error says why)."""
        vol = self.svc.volume(name)
        cur = self.scrubs.get(vol.volume_id)
        if cur is not None and cur.state == "running":
            return cur
        self._check(vol)
        st = ScrubState(volume=vol.name, state="running", started=time.time(), max_rate=max_rate, background=background)
        self.scrubs[vol.volume_id] = st
        st.task = asyncio.get_running_loop().create_task(self._run(vol, st))
        return st

    def _check(self, vol: VolumeRec) -> None:
        """Why ``vol`` cannot be scrubbed now, as an error (nothing when it can)."""
        svc = self.svc
        lay = svc.layouts.get(vol.volume_id)
        if lay is None or lay.replicas < 2:
            raise UsageError(f"volume {vol.name!r} is not replicated: a scrub compares copies")
        if vol.volume_id in svc.unclean:
            raise UnavailableError(f"volume {vol.name!r} is being resynced after its writer ended uncleanly; "
                                   "scrub it once `pool status` shows no writer-resync")
        if lay.target is not None or vol.volume_id in svc._busy:
            raise UnavailableError(f"volume {vol.name!r} is being re-spread or resized; scrub it afterwards")
        if lay.degraded:
            raise UnavailableError(f"volume {vol.name!r} has a copy out of service or being rebuilt; scrub it "
                                   "once every copy is back (`pool status`)")

    # ------------------------------------------------------------------ one pass
    async def _run(self, vol: VolumeRec, st: ScrubState) -> None:
        t0 = time.monotonic()
        try:
            await self._pass(vol, st)
            st.state = "done"
        except asyncio.CancelledError:
            st.state, st.error = "failed", "stopped (the metadata service stepped down or stopped)"
            raise
        except (NvpoolError, TimeoutError, OSError) as exc:
            st.state, st.error = "failed", str(exc) or type(exc).__name__
            logger.warning("volume %s: scrub stopped: %s", vol.name, st.error)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the service down; reported
            st.state, st.error = "failed", f"internal error: {exc}"
            logger.exception("volume %s: scrub failed", vol.name)
        finally:
            st.finished = time.time()
            st.task = None
            self.totals["passes"] += 1
        if st.state == "done":
            self.last[vol.volume_id] = st.finished
            try:
                self.svc.store.commit({f"scrub/{vol.volume_id:020d}": json.dumps(
                    {k: v for k, v in st.public().items() if k not in ("volume", "state", "error")}).encode()})
            except NvpoolError as exc:
                logger.warning("volume %s: could not record the scrub: %s", vol.name, exc)
        found = st.checksum_errors + st.mismatches
        logger.log(logging.WARNING if found or st.state != "done" else logging.INFO,
                   "volume %s: scrub %s in %.1fs: %d bytes compared, %d checksum errors, %d mismatches, %d copies "
                   "repaired, %d unrepairable, %d busy%s", vol.name, st.state, time.monotonic() - t0, st.bytes_done,
                   st.checksum_errors, st.mismatches, st.repaired, st.unrepairable, st.busy,
                   f" ({st.error})" if st.error else "")

    async def _pass(self, vol: VolumeRec, st: ScrubState) -> None:
        svc = self.svc
        vid = vol.volume_id
        self._check(vol)
        lay = svc.layouts[vid]
        work: list[tuple[int, Piece]] = []
        for i in range(lay.width):
            copies = lay.readable(i)
            if len(copies) < 2:
                continue
            written: list[tuple[int, int]] = []
            for k in copies:
                written += await self.repl._replica_ranges(lay, i, k, "map") or []
            work += [(i, p) for p in scrub_pieces(lay, i, copies, written)]
        st.bytes_total = sum(p.length for _, p in work)
        bucket = TokenBucket(st.max_rate)
        for i, piece in work:
            await bucket.take(piece.length)
            cur = svc.layouts.get(vid)
            if cur is None:
                raise NotFoundError(f"volume {vol.name!r} was deleted during its scrub")
            if cur.generation != lay.generation:  # re-map the piece on the current layout
                self._check(vol)
                lay = cur
                copies = lay.readable(i)
                pieces = scrub_pieces(lay, i, copies, [(piece.offset, piece.length)]) if len(copies) > 1 else []
            else:
                pieces = [piece]
            for p in pieces:
                await self._piece(vol, lay, i, p, st)
            st.bytes_done += piece.length
            self.totals["bytes"] += piece.length

    async def _look(self, lay: Layout, piece: Piece, first: int, count: int) -> list[Look]:
        """Every copy's sums of blocks ``[first, first+count)`` of ``piece``, asked at once."""
        svc = self.svc

        async def one(ext: Extent, eoff: int) -> Look:
            agent = svc.agent_of_drive(ext.drive_id)
            sums, bad, kept = await asyncio.wait_for(svc.link.scrub(
                agent.control_address, ext.extent_id, eoff + first * SUM_BLOCK, count * SUM_BLOCK), SCRUB_CALL_TIMEOUT)
            return Look(sums, frozenset(bad), kept)

        return list(await asyncio.gather(*(one(e, off) for e, off in piece.parts)))

    async def _piece(self, vol: VolumeRec, lay: Layout, column: int, piece: Piece, st: ScrubState) -> None:
        blocks = -(-piece.length // SUM_BLOCK)
        first = await self._look(lay, piece, 0, blocks)
        sus = suspects(first, blocks)
        if not sus:
            return
        await asyncio.sleep(SECOND_LOOK)
        stable: list[int] = []
        for b0, n in block_runs(sus):
            again = await self._look(lay, piece, b0, n)
            for j in range(n):
                b = b0 + j
                same = all(a.sum(j) == f.sum(b) and ((j in a.bad) == (b in f.bad)) for a, f in zip(again, first))
                if same:
                    stable.append(b)
                else:
                    st.busy += 1
        if stable:
            await self._repair(vol, column, piece, stable, st)

    # ------------------------------------------------------------------ repair (step 4)
    async def _repair(self, vol: VolumeRec, column: int, piece: Piece, blocks: list[int], st: ScrubState) -> None:
        svc = self.svc
        vid = vol.volume_id
        async with self.repl._intent_lock(vid):
            async with svc.lock:
                lay = svc.layouts.get(vid)
                if lay is None:
                    return
                try:
                    self._check(vol)
                except NvpoolError:
                    st.busy += len(blocks)
                    return
                if not same_piece(lay, column, piece):  # the layout changed since the look
                    st.busy += len(blocks)
                    return
                g = lay.generation + 1
                try:
                    try:
                        await asyncio.wait_for(svc.fence_on_agents(vid, svc.live_extents(lay), g), REPAIR_TIMEOUT)
                    except (UnavailableError, TimeoutError) as exc:
                        st.busy += len(blocks)
                        logger.warning("volume %s: scrub repair postponed: fencing failed (%s)", vol.name, exc)
                        return
                    await asyncio.wait_for(self._fenced_repair(vol, lay, column, piece, blocks, g, st), REPAIR_TIMEOUT)
                finally:
                    new = svc.layouts[vid].evolve(generation=max(g, svc.layouts[vid].generation))
                    svc.layouts[vid] = new
                    fences = svc.fences.setdefault(vid, {})
                    for e in new.extents():
                        fences[e.extent_id] = max(fences.get(e.extent_id, 1), g)
                    svc.persist_volume(vol)

    async def _fenced_repair(self, vol: VolumeRec, lay: Layout, column: int, piece: Piece, blocks: list[int],
                             g: int, st: ScrubState) -> None:
        svc = self.svc
        targets: set[str] = set()
        for b0, n in block_runs(blocks):
            looks = await self._look(lay, piece, b0, n)
            sus = set(suspects(looks, n))
            for j in range(n):
                if j not in sus:
                    st.busy += 1  # settled by itself (a write completed meanwhile)
                    continue
                b = b0 + j
                where = piece.offset + b * SUM_BLOCK
                failing = [piece.copies[x] for x, lk in enumerate(looks) if j in lk.bad]
                if failing:
                    st.checksum_errors += 1
                    self.totals["checksum_errors"] += 1
                else:
                    st.mismatches += 1
                    self.totals["mismatches"] += 1
                src, dsts = decide(looks, j)
                logger.warning("volume %s column %d offset %d: %s", vol.name, column, where,
                               f"copies {failing} return bytes unlike what was written to them" if failing
                               else "copies differ though each matches its own sums")
                if src is None:
                    st.unrepairable += 1
                    self.totals["unrepairable"] += 1
                    logger.error("volume %s column %d offset %d: no copy holds bytes matching their sums; left as it "
                                 "is (restore this block from a backup)", vol.name, column, where)
                    continue
                s_ext, s_off = piece.parts[src]
                s_agent = svc.agent_of_drive(s_ext.drive_id)
                for d in dsts:
                    d_ext, d_off = piece.parts[d]
                    d_agent = svc.agent_of_drive(d_ext.drive_id)
                    await svc.link.copy(d_agent.control_address, d_ext, d_off + b * SUM_BLOCK, s_agent.address, s_ext,
                                        s_off + b * SUM_BLOCK, SUM_BLOCK, g, vol.volume_id, s_agent.data_tls)
                    targets.add(d_agent.control_address)
                    st.repaired += 1
                    self.totals["repaired"] += 1
                    logger.warning("volume %s column %d offset %d: copy %d (agent %s, drive %s, extent %d) rewritten "
                                   "from copy %d (agent %s)", vol.name, column, where, piece.copies[d], d_agent.agent_id,
                                   d_ext.drive_id, d_ext.extent_id, piece.copies[src], s_agent.agent_id)
        for addr in sorted(targets):
            await svc.link.flush(addr)

    # ------------------------------------------------------------------ background schedule
    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        tasks = [t for t in [self._task] + [s.task for s in self.scrubs.values()] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping
                pass

    def due(self, now: float) -> Optional[VolumeRec]:
        """The replicated volume whose last pass is oldest, if it is older than ``interval``."""
        best: Optional[tuple[float, VolumeRec]] = None
        for vol in self.svc.volumes.values():
            lay = self.svc.layouts.get(vol.volume_id)
            if lay is None or lay.replicas < 2:
                continue
            last = self.last.get(vol.volume_id, vol.created)
            if now - last >= self.interval and (best is None or last < best[0]):
                best = (last, vol)
        return best[1] if best else None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            if any(s.state == "running" for s in self.scrubs.values()):
                continue
            vol = self.due(time.time())
            if vol is None:
                continue
            try:
                self.start_scrub(vol.name, self.rate, background=True)
            except NvpoolError as exc:  # not now (being repaired, re-spread): try again later
                logger.info("volume %s: background scrub postponed: %s", vol.name, exc)
                self.last[vol.volume_id] = time.time() - self.interval + 60.0
