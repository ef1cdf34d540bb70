"""Replicated volumes: how replicas stay identical, how a dead server is survived, resync and rebuild.

A replicated volume keeps every column ``R`` times (``Layout.mirrors``), each replica on a drive in
another failure domain (``planner.plan_replicated``). Each replica of a column is ``ok`` (read and
written), ``syncing`` (written, not read) or ``out`` (neither). This module holds the metadata
service's half of the protocol; the client's half is in ``client/volume.py`` and the agent's in
``agents/core.py`` ("Serve lease", "Dirty tracking").

Ordering design: **the client fans out under the exclusive writer lease** (as NVMesh's client-side
RAID-1 and Mayastor's nexus do), not a primary per column. A volume has at most one writer (a
client holding the writer lease; a takeover fences the previous one, see ``pool/meta.py``). The
writer sends each write to the first ``ok`` replica of the piece's column, then to the other ``ok``
ones, then to every ``syncing`` one, and acknowledges only when all of them have answered OK. It never has two overlapping writes
in flight (a per-volume range lock in the writer's client), so every replica applies overlapping
writes in the same order, and a read returns the same bytes whichever replica serves it. The price,
an extra round trip per write compared with a primary that forwards, is paid on the writer's own
network links, and no storage server forwards data.

Why replicas never diverge and a reader never sees old bytes, step by step:

1. **A write is acknowledged only when every replica in the writer's write set holds it.** If one
   replica does not answer (connection lost, ``replica_timeout`` passed, ``BUSY``, ``IO_ERROR``),
   the writer reports it (``report_failure``) and retries the whole piece with the layout it gets
   back: to every replica of the new write set. Writes are idempotent per piece, so resending to
   replicas that already hold it is harmless.
2. **A replica is taken out only when it cannot serve anyone an old byte.** ``mark_out`` takes a
   replica out (a new layout generation ``g``) only after its agent acknowledged a fence at ``g``
   (every command of an older generation is refused: a reader with an older layout cannot read it)
   or after the agent has been silent for ``agent_timeout``, longer than its *serve lease*: an agent
   serves replicated extents only for ``serve_lease`` < ``agent_timeout`` after its last successful
   heartbeat, and applies the fences a heartbeat answer carries before it serves again (the
   heartbeat digest covers fences). So from the moment the service publishes ``g``, the out replica
   answers nobody at an older generation, and clients at ``g`` neither read nor write it.
3. **Never the last copy.** A replica is not taken out when no other replica of its column is ``ok``:
   I/O to that column waits (within each call's time budget) for it to come back instead.
4. **Missed writes are tracked before anyone can miss them.** Before ``g`` is published, every agent
   holding an ``ok`` replica of an affected column starts recording the grains written to it
   (``Dirty start``; all must acknowledge). A write the out replica missed is either acknowledged
   only after being resent at ``g`` (step 1: tracked), or was sent before the out replica failed and
   reached it. So the tracked grains cover every byte the out replica may lack.
5. **Resync** (the agent is back, its drive is fine): publish ``g+1`` with the replica ``syncing``
   after fencing every agent of the write set at ``g+1`` (a writer still at ``g``, which does not
   write the returning replica, is refused and re-fetches). From then on every write reaches the
   syncing replica after the ``ok`` ones. Then read the dirty grains of **every** ``ok`` replica's
   agent (the union: with three copies, an ``ok`` replica may itself have come back by copy while
   another was out, and a write acknowledged on one copy alone is in that copy's record only) and
   copy them from one ``ok`` replica with ``CopyExtent``, which never overwrites bytes a client wrote to the destination
   while the chunk was in flight (the argument of ``pool/migration.py`` step 3, with the ``ok``
   replica as the old layout and the syncing one as the target). Flush the destination, then
   publish ``g+2`` with the replica ``ok`` (the write set does not change, so no fence is needed).
   An agent that restarted lost its record (``tracking=False``): the replica is copied whole, which
   skips only ranges never written on the source or the destination (``MapExtent``). A replica that
   is copied while another replica of its column is ``out`` records what it receives (its agent
   tracks before the copy starts, and ``finish_copy`` marks copied grains): once ``ok``, its record
   holds every write the other one lacks even if it is the only ``ok`` copy left by then.
6. **Rebuild** (the replica has been out longer than ``rebuild_after``, its drive failed or returned
   ``IO_ERROR``, or its server was removed): place a new replica in a failure domain none of the
   column's other replicas use, assign it zeroed, then as in step 5 publish it ``syncing`` (fenced),
   copy the column whole, flush, and publish it ``ok``. The old replica's extents become
   ``releasing`` in the same commit that drops them from the layout (``pool/meta.py``, "Extent
   release"), so their space is reused only after their agent confirms.
7. **Partitions.** Only the metadata service changes replica states, one change at a time under its
   lock, and every change is a new generation that agents enforce. A writer cut off from a replica
   cannot make it ``out`` unless the service can fence that replica's agent or the agent has stopped
   serving; an agent cut off from the service stops serving replicated extents within its serve
   lease. Two sides of a partition therefore never both accept writes for one column at the same
   generation: the side without the service loses its serve lease, and the writer without the
   service cannot complete a write that lacks a replica.

8. **Write intent: a writer that dies mid fan-out.** Steps 1-7 cover a write a *replica* missed; a
   writer killed between two copies of a write leaves copies that differ where no replica failed.
   Every agent marks, before applying it, each write to a replicated extent in an in-memory
   write-intent record (``agents/intent.py``), grouped in *epochs*. The writer counts its replicated
   writes in flight by the epoch it knew when each started, and with each lease renewal (every
   ``INTENT_INTERVAL`` while it writes) claims epoch ``E`` *settled* once every write it started
   before it learned ``E`` is on every copy of its write set (``intent_renew``). On that claim the
   service tells the volume's agents to drop the records closed at ``E`` or earlier, rotates every
   agent to a new epoch ``E'`` and, only once *all* acknowledged, announces ``E'`` to the writer.
   Why no unsettled write is forgotten: a write in a record closed at ``E`` reached its agent before
   that agent acknowledged the rotation to ``E``, so before ``E`` was announced, so before the writer
   learned ``E``: the claim covers it. A write the writer gave up on (error, cancellation) is never
   claimed: from then on it claims nothing and its close counts as unclean. When a writer's lease
   ends without a clean close (crash, expiry, ``--force`` takeover, or an unsettled close), the
   service, before it grants the next writer lease or calls the volume healthy (``resync_writer``):
   fences every agent at a new generation (nothing the dead writer still has in flight lands later),
   reads the records of every copy that is not ``out`` (their union: a write may have reached any
   subset of the copies), and copies those grains from the column's first ``ok`` copy to the others.
   That copy holds every acknowledged write (step 1), and every write any other copy holds: the
   writer sends each write to the first ``ok`` copy first and to the others only once it answered
   (``client/volume.py``, ``_write_copies``). So a grain an unacknowledged write touched ends up with
   the source's bytes on every copy, and whatever a reader saw of that write on any copy is rolled
   forward, never back (unless the first copy itself failed before the resync, and another became
   first: then the write is lost as by a disk that lost power with it in its cache). Which copy is
   first never changes otherwise: a copy returning to ``ok`` (published without a fence, so writers
   of the previous generation still write in the old order) takes a slot after the first copy's,
   trading places with it if it had a lower one. A copy
   that is ``out`` at that moment may hold such a write too: it is resynced whole when it returns
   (``ReplicaRepair.whole``, kept through later failures). Chunks copied onto a replicated extent
   (resync, rebuild, migration) are marked as writes are, so a difference a dead writer left travels
   with its record to the copy made from it; a volume waiting for this resync is not re-spread. A
   grant breaks no replicated volume's writer itself (``MetaService._open`` goes back to
   ``_break_for_resync`` when it finds one expired or to be taken over), so no writer lease is ever
   granted, and no record reset, before the resync. A rotation some agent did not acknowledge is
   retried at the same epoch, so the others close no new record meanwhile. Records are in memory: an agent that restarted says its record may be
   incomplete until an epoch it rotated to is settled, and its columns are then compared whole
   (``MapExtent`` of every copy) instead. Cost on the write path: a few bit sets per write on the
   agents, and one renewal a second per writer, which the service turns into two control calls per
   agent of the volume. (A deposed leader's late rotation cannot reach a restarted agent's record:
   agents obey only the newest term they have seen, and a restarted agent serves replicated extents
   only after registering with the current leader.)
9. **Failure reports** come only from a holder of a live lease on the volume, about an extent of
   the volume's current layout, at most ``REPORT_BURST`` at once and ``REPORT_RATE`` a second per
   lease; anything else is refused and logged. (Without this, any caller could take healthy copies
   out of service, one call each.)
10. **Scrub** (``pool/scrub.py``): copies that a *drive* made differ (bit rot, a lost or misdirected
   write inside it) are found by comparing per-block checksums stored at write time
   (``agents/checksums.py``) and copy against copy, and repaired under a fence from a copy that
   matches its own checksums, by the same first-copy rule as step 8 when each copy matches its own.

What the repair costs the foreground: copies run ``parallel`` chunks at a time through a token bucket
of ``rate`` bytes/s (``repair_rate`` in the service's config).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from nvpool.pool.meta import Lease, MetaService, ReplicaRepair, VolumeRec
from nvpool.pool.migration import CopyChunk
from nvpool.pool.planner import plan_replica, with_allocations
from nvpool.pool.rebalancer import TokenBucket
from nvpool.proto.errors import CapacityError, LeaseError, NvpoolError, UnavailableError, UsageError
from nvpool.proto.layout import OK, OUT, SYNCING, Column, Extent, Layout

logger = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
#: longest a fence for taking a replica out may take before its agent must be silent instead
FENCE_TIMEOUT = 2.0
#: longest a write-intent call to one agent may take during a lease renewal (two per renewal)
INTENT_TIMEOUT = 1.0
#: failure reports one lease may make at once, and per second after that (step 9)
REPORT_BURST, REPORT_RATE = 32.0, 4.0


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (offset, length) ranges covering ``ranges``."""
    merged: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if n <= 0:
            continue
        if merged and merged[-1][0] + merged[-1][1] >= off:
            end = max(merged[-1][0] + merged[-1][1], off + n)
            merged[-1] = (merged[-1][0], end - merged[-1][0])
        else:
            merged.append((off, n))
    return merged


def column_ranges(layout: Layout, column: int, replica: int, extent_ranges: dict[int, list[tuple[int, int]]]
                  ) -> list[tuple[int, int]]:
    """Convert ranges given per extent of replica ``replica`` of ``column`` into column offsets."""
    out = []
    col = layout.replica_column(column, replica)
    for start, e in zip(col.starts, col.extents):
        for off, n in extent_ranges.get(e.extent_id, ()):
            out.append((start + off, min(n, e.length - off)))
    return merge_ranges(out)


def resync_chunks(layout: Layout, column: int, src: int, dst: int, ranges: list[tuple[int, int]],
                  chunk: int = CHUNK) -> list[CopyChunk]:
    """Copy chunks for column byte ranges ``ranges``, from replica ``src`` to replica ``dst`` of
    ``column``: each at most ``chunk`` bytes and inside one extent on both sides (their extent
    boundaries may differ). ``volume_offset`` is the column offset (for progress reports)."""
    s_col, d_col = layout.replica_column(column, src), layout.replica_column(column, dst)
    need = min(s_col.length, d_col.length)
    out = []
    for off, n in ranges:
        pos, end = off, min(off + n, need)
        while pos < end:
            si, soff = s_col.locate(pos)
            di, doff = d_col.locate(pos)
            k = min(end - pos, chunk, s_col.extents[si].length - soff, d_col.extents[di].length - doff)
            out.append(CopyChunk(pos, k, s_col.extents[si], soff, d_col.extents[di], doff))
            pos += k
    return out


def _with_column(lay: Layout, column: int, replica: int, col: Column) -> Layout:
    """``lay`` with replica ``replica`` of ``column`` replaced by ``col``."""
    if replica == 0:
        cols = list(lay.columns)
        cols[column] = col
        return lay.evolve(columns=tuple(cols))
    mirrors = [list(m) for m in lay.mirrors]
    mirrors[replica - 1][column] = col
    return lay.evolve(mirrors=tuple(tuple(m) for m in mirrors))


class Replication:
    """Marks replicas out, and repairs them in the background (one volume at a time)."""

    def __init__(self, svc: MetaService, rebuild_after: float = 300.0, rate: int = 0, parallel: int = 4,
                 interval: float = 0.25) -> None:
        self.svc = svc
        self.rebuild_after = rebuild_after
        self.rate = rate
        self.parallel = parallel
        self.interval = interval
        self._task: Optional[asyncio.Task[None]] = None
        self.errors = 0
        #: agent -> when a fence to it last failed (the next reports wait for silence instead)
        self._unfenceable: dict[str, float] = {}
        #: volume id -> serializes its write-intent rotations and writer resyncs (step 8)
        self._intent_locks: dict[int, asyncio.Lock] = {}
        #: volume id -> the epoch of a rotation not every agent has acknowledged yet
        self._rotating: dict[int, int] = {}
        #: volume id -> the generation a writer resync fenced at (a retry of it need not fence again)
        self._resync_fenced: dict[int, int] = {}
        #: lease id -> (report tokens left, when counted) (step 9)
        self._report_budget: dict[str, tuple[float, float]] = {}
        #: resyncs after an unclean writer, and the bytes they copied (pool status, metrics)
        self.writer_resyncs = 0
        self.writer_resync_bytes = 0
        svc.on_unclean = self.resync_writer
        svc.on_write_lease = self.reset_intent

    # ------------------------------------------------------------------ taking replicas out
    def abandon_migration(self, vol: VolumeRec, why: str) -> None:
        """A replica of a migrating volume failed: publish the old layout alone at a higher generation
        and release the target's new extents (call under the lock; see ``pool/migration.py``). The
        old layout received every write first, so nothing is lost; the rebalancer notices before its
        next step and moves on. The space is reused only after the agents confirm the release."""
        svc = self.svc
        vid = vol.volume_id
        lay = svc.layouts[vid]
        if lay.target is None:
            return
        old = lay.evolve(target=None, generation=lay.generation + 1)
        kept = {e.extent_id for e in old.extents()}
        new_only = [e for e in lay.target.extents() if e.extent_id not in kept]
        svc.layouts[vid] = old
        fences = svc.fences.setdefault(vid, {})
        for e in new_only:
            fences.pop(e.extent_id, None)
        svc.store.commit({**svc._volume_puts(vol), **svc.mark_releasing(new_only, vid, old.generation, commit=False)},
                         [f"migration/{vid:020d}"])
        logger.warning("volume %s: migration abandoned at generation %d (%s); %d target extents released",
                       vol.name, old.generation, why, len(new_only))

    def _on_agent(self, lay: Layout, agent: Optional[str], loc: tuple[int, int],
                  drive: str = "") -> set[tuple[int, int]]:
        """``loc`` and every other replica of the volume on ``agent`` (silent, or fenced for the whole
        volume): one new generation takes them all out, not one per report. With ``drive`` (an I/O
        error: that drive is suspect, the agent's other drives are not), only that drive's."""
        out = {loc}
        if agent is not None:
            for i in range(lay.width):
                for k in range(lay.replicas):
                    if lay.replica_state(i, k) != OUT and any(
                            self._agent_of(e) == agent and (not drive or e.drive_id == drive)
                            for e in lay.replica_column(i, k).extents):
                        out.add((i, k))
        return out

    def _agent_of(self, e: Extent) -> Optional[str]:
        d = self.svc.drives.get(e.drive_id)
        return d.agent_id if d is not None else None

    async def mark_out(self, vol: VolumeRec, targets: set[tuple[int, int]], reason: str, rebuild: bool = False) -> bool:
        """Take replicas out of service (call under the lock; see steps 2-4). Every target's agent
        must be surely silent, or have acknowledged a fence at the new generation (the caller saw
        to it). Returns whether anything changed."""
        svc = self.svc
        vid = vol.volume_id
        lay = svc.layouts[vid]
        todo = set()
        for i, k in sorted(targets):
            if lay.replica_state(i, k) == OUT:
                continue
            others = [j for j in lay.readable(i) if j != k and (i, j) not in targets]
            if not others:
                logger.warning("volume %s column %d: replica %d is failing (%s) but no other replica is up to "
                               "date; I/O to the column waits for it", vol.name, i, k, reason)
                continue
            todo.add((i, k))
        if not todo:
            return False
        g = lay.generation + 1
        # step 4: the remaining ok replicas of the affected columns track writes from now on
        trackers: dict[str, list[int]] = {}
        trackers_down: set[str] = set()
        for i in {i for i, _ in todo}:
            for j in lay.readable(i):
                if (i, j) in todo:
                    continue
                for e in lay.replica_column(i, j).extents:
                    a = self._agent_of(e)
                    if a is not None:
                        trackers.setdefault(a, []).append(e.extent_id)
                        if not svc.alive(a):
                            trackers_down.add(a)
        if trackers_down:  # a silent tracker cannot record writes: the replicas stay in (I/O waits)
            raise UnavailableError(f"cannot take replicas {sorted(todo)} of {vol.name!r} out: agents "
                                   f"{', '.join(sorted(trackers_down))} holding their other copies are silent too")
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(asyncio.wait_for(svc.link.dirty(svc.agents[a].control_address, ids, "start"), FENCE_TIMEOUT)
              for a, ids in trackers.items()),
            return_exceptions=True)
        if time.monotonic() - t0 > 0.5:
            logger.info("volume %s: write tracking took %.1fs to start on %s (for %s)", vol.name, time.monotonic() - t0,
                        trackers, sorted(todo))
        for a, r in zip(trackers, results):
            if isinstance(r, BaseException):
                raise UnavailableError(f"agent {a} could not start tracking writes for a resync: {r}")
        states = {(i, k): st for i, k, st in lay.states}
        now_mono, now_wall = time.monotonic(), time.time()
        reps = svc.repairs.setdefault(vid, {})
        fences = svc.fences.setdefault(vid, {})
        for i, k in todo:
            states[(i, k)] = OUT
            prev = reps.get((i, k))
            reps[(i, k)] = ReplicaRepair(reason, prev.since if prev else now_wall, now_mono if not prev else
                                         prev.since_mono, "out", rebuild or (prev.rebuild if prev else False),
                                         whole=prev.whole if prev else False)
            for e in lay.replica_column(i, k).extents:  # learnt by the agent before it serves again
                fences[e.extent_id] = max(fences.get(e.extent_id, 1), g)
        new = lay.evolve(generation=g, states=tuple(sorted((i, k, st) for (i, k), st in states.items())))
        new.validate()
        svc.layouts[vid] = new
        svc.persist_volume(vol)
        logger.warning("volume %s: replicas %s out of service at generation %d (%s)%s", vol.name,
                       ", ".join(f"{i}/{k}" for i, k in sorted(todo)), g, reason, "; will rebuild" if rebuild else "")
        return True

    def check_reporter(self, lease_id: str, volume_id: int, extent_id: int) -> None:
        """Step 9: refuse (and log) a failure report from anyone but a holder of a live lease on the
        volume, about an extent not in its current layout, or past the lease's rate."""
        svc = self.svc
        lease = svc.leases.get(lease_id) if lease_id else None
        if lease is None or lease.volume_id != volume_id or lease.expires <= time.monotonic():
            logger.warning("refused a replica failure report for volume %d extent %d: %s", volume_id, extent_id,
                           "no lease given" if not lease_id else "the lease is not a live lease on that volume")
            raise LeaseError("replica failures are reported only by a holder of a live lease on the volume")
        lay = svc.layouts.get(volume_id)
        if lay is None or lay.replica_of(extent_id) is None:
            logger.warning("refused a replica failure report from %s: extent %d is not a replica of volume %d",
                           lease.holder, extent_id, volume_id)
            raise UsageError(f"extent {extent_id} is not a replica of volume {volume_id}")
        now = time.monotonic()
        tokens, when = self._report_budget.get(lease_id, (REPORT_BURST, now))
        tokens = min(REPORT_BURST, tokens + (now - when) * REPORT_RATE)
        if tokens < 1.0:
            self._report_budget[lease_id] = (tokens, now)
            logger.warning("refused a replica failure report from %s on volume %d: more than %g a second",
                           lease.holder, volume_id, REPORT_RATE)
            raise UnavailableError("too many replica failure reports from this lease; try again shortly")
        self._report_budget[lease_id] = (tokens - 1.0, now)
        if len(self._report_budget) > 4096:  # forget leases that are gone
            for k in [k for k in self._report_budget if k not in svc.leases]:
                del self._report_budget[k]

    async def report_failure(self, volume_id: int, generation: int, extent_id: int, reason: str,
                             address: str = "", lease_id: str = "", check: bool = True) -> None:
        """A client could not write or read the replica holding ``extent_id`` (step 1). Returns once
        the replica is out (or another layout is current, or it is the column's last copy); bounded
        by about ``agent_timeout`` + ``FENCE_TIMEOUT``. The fence is sent outside the lock (a hung
        agent must not stall the service) and the layout re-checked before anything is published.
        Only a lease holder is heard (step 9; ``check=False``: the service's own callers)."""
        svc = self.svc
        if check:
            async with svc.lock:
                self.check_reporter(lease_id, volume_id, extent_id)
        deadline = time.monotonic() + svc.agent_timeout + FENCE_TIMEOUT + 1.0
        rebuild = reason == "io"
        while True:
            async with svc.lock:
                vol = svc.volume_by_id(volume_id)
                lay = svc.layouts[volume_id]
                if lay.target is not None and lay.replicas > 1:
                    self.abandon_migration(vol, f"{reason} on extent {extent_id} (reported by a client)")
                    lay = svc.layouts[volume_id]
                loc = lay.replica_of(extent_id)
                if loc is None or lay.replica_state(*loc) == OUT or lay.replicas == 1:
                    return
                i, k = loc
                e = next(x for x in lay.replica_column(i, k).extents if x.extent_id == extent_id)
                agent = self._agent_of(e)
                if agent is None or agent not in svc.agents or svc.surely_silent(agent):
                    await self.mark_out(vol, self._on_agent(lay, agent, loc, e.drive_id if rebuild else ""), f"{reason} (reported by a client)",
                                        rebuild)
                    return
                if address and address != svc.agents[agent].address and svc.alive(agent):
                    return  # the agent restarted since: the client retries at its new address
                if not [j for j in lay.readable(i) if j != k]:
                    return  # the column's last copy: the client waits for it
                g = lay.generation + 1
                control = svc.agents[agent].control_address
                svc.fence_ahead(volume_id, g)
            fenced = False
            if time.monotonic() - self._unfenceable.get(agent, -1e9) > svc.agent_timeout:
                try:
                    await asyncio.wait_for(svc.link.fence(control, volume_id, g), FENCE_TIMEOUT)
                    fenced = True
                except (NvpoolError, TimeoutError) as exc:
                    self._unfenceable[agent] = time.monotonic()
                    logger.info("volume %s: agent %s did not take fence %d (%s); waiting for it to go silent",
                                vol.name, agent, g, exc)
            async with svc.lock:
                if svc.layouts.get(volume_id) is not lay:
                    continue  # changed meanwhile: decide again on the current layout
                if fenced:
                    # the agent fences every extent of the volume it holds: mirror that
                    for j in range(lay.replicas):
                        for c in range(lay.width):
                            for x in lay.replica_column(c, j).extents:
                                if self._agent_of(x) == agent:
                                    svc.fences[volume_id][x.extent_id] = max(
                                        svc.fences[volume_id].get(x.extent_id, 1), g)
                    await self.mark_out(vol, self._on_agent(lay, agent, loc, e.drive_id if rebuild else ""),
                                        f"{reason} on agent {agent} (reported by a client)", rebuild)
                    return
                if svc.surely_silent(agent):
                    await self.mark_out(vol, self._on_agent(lay, agent, loc, e.drive_id if rebuild else ""),
                                        f"{reason}; agent {agent} silent (reported by a client)", rebuild)
                    return
            if time.monotonic() > deadline:
                raise UnavailableError(f"agent {agent} neither took a fence nor went silent; the replica stays in")
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ write intent (step 8)
    def _intent_lock(self, volume_id: int) -> asyncio.Lock:
        lock = self._intent_locks.get(volume_id)
        if lock is None:
            lock = self._intent_locks[volume_id] = asyncio.Lock()
        return lock

    def _intent_agents(self, lay: Layout) -> dict[str, list[int]]:
        """Agent -> the volume's extents it holds in copies that are written (not ``out``)."""
        out: dict[str, list[int]] = {}
        for e in MetaService.live_extents(lay):
            a = self._agent_of(e)
            if a is not None and a in self.svc.agents:
                out.setdefault(a, []).append(e.extent_id)
        return out

    async def _intent_all(self, lay: Layout, op: str, epoch: int, timeout: float = FENCE_TIMEOUT) -> bool:
        """``op`` ("rotate" or "settle") at ``epoch`` on every agent of the volume; whether all acknowledged."""
        svc = self.svc
        agents = self._intent_agents(lay)
        results = await asyncio.gather(
            *(asyncio.wait_for(svc.link.intent(svc.agents[a].control_address, lay.volume_id, ids, op, epoch), timeout)
              for a, ids in agents.items()), return_exceptions=True)
        ok = True
        for a, r in zip(agents, results):
            if isinstance(r, BaseException):
                ok = False
                logger.info("volume %d: agent %s did not take write-intent %s %d (%s)", lay.volume_id, a, op, epoch, r)
        return ok

    async def intent_renew(self, lease: Lease, settled: int) -> int:
        """A writer's lease renewal with its settled claim (step 8): drop what settled, rotate every agent
        to a new epoch, and return the epoch the writer may now count from."""
        svc = self.svc
        vid = lease.volume_id
        lay = svc.layouts.get(vid)
        if lay is None or lay.replicas == 1 or lease.mode != "write":
            return 0
        lock = self._intent_lock(vid)
        if lock.locked():  # a rotation or a resync runs: nothing new to announce
            return svc.intent_epoch.get(vid, 0)
        async with lock:
            cur = svc.intent_epoch.get(vid, 0)
            if cur and settled < cur:
                return cur  # writes started before it learned ``cur`` are still in flight
            if cur:
                await self._intent_all(lay, "settle", cur, timeout=INTENT_TIMEOUT)
            # a rotation some agent missed is retried at the same epoch: the others close nothing new
            new = self._rotating.get(vid) or svc.next_intent_epoch()
            self._rotating[vid] = new
            if await self._intent_all(lay, "rotate", new, timeout=INTENT_TIMEOUT):
                svc.intent_epoch[vid] = new  # announced only once every agent marks in it
                self._rotating.pop(vid, None)
            return svc.intent_epoch.get(vid, 0)

    async def reset_intent(self, vol: VolumeRec) -> None:
        """A writer lease is being granted (no write of any earlier writer is unsettled: it closed cleanly
        or was resynced): start every agent's record afresh, complete from here on even on an agent
        that restarted. Best effort, briefly: an agent that misses it keeps its record incomplete, which
        only makes a later resync compare more."""
        lay = self.svc.layouts.get(vol.volume_id)
        if lay is None or lay.replicas == 1:
            return
        new = self.svc.next_intent_epoch()
        self._rotating.pop(vol.volume_id, None)
        if await self._intent_all(lay, "rotate", new, timeout=INTENT_TIMEOUT):
            await self._intent_all(lay, "settle", new, timeout=INTENT_TIMEOUT)
            self.svc.intent_epoch[vol.volume_id] = new

    async def _replica_ranges(self, lay: Layout, i: int, k: int, op: str) -> Optional[list[tuple[int, int]]]:
        """Column ranges of replica ``k`` of column ``i``: its write-intent record (``op`` "intent"), its
        dirty record ("dirty"), or what was ever written ("map"). None: a record may be incomplete."""
        svc = self.svc
        exts = lay.replica_column(i, k).extents
        by_agent: dict[str, list[int]] = {}
        for e in exts:
            a = self._agent_of(e)
            if a is None or a not in svc.agents:
                raise UnavailableError(f"the agent of extent {e.extent_id} is not registered")
            by_agent.setdefault(a, []).append(e.extent_id)
        per_ext: dict[int, list[tuple[int, int]]] = {}
        for a, ids in by_agent.items():
            addr = svc.agents[a].control_address
            if op == "map":
                for eid in ids:
                    per_ext[eid] = await svc.link.map_extent(addr, eid)
                continue
            got = await (svc.link.intent(addr, lay.volume_id, ids, "get") if op == "intent"
                         else svc.link.dirty(addr, ids, "get"))
            for eid in ids:
                ranges = got.get(eid)
                if ranges is None:
                    return None
                per_ext[eid] = ranges
        return column_ranges(lay, i, k, per_ext)

    async def resync_writer(self, vol: VolumeRec) -> None:
        """Step 8: make every written copy of ``vol`` identical after its writer ended uncleanly, before a
        writer lease is granted again or the volume is called healthy. Raises when it cannot now."""
        svc = self.svc
        vid = vol.volume_id
        async with self._intent_lock(vid):
            async with svc.lock:
                lay = svc.layouts.get(vid)
                if vid not in svc.unclean or lay is None:
                    return
                if lay.replicas == 1 or any(w.mode == "write" for w in svc._live_leases(vid)):
                    return
                for i in range(lay.width):
                    if not lay.readable(i) and sum(lay.replica_state(i, k) != OUT for k in range(lay.replicas)) > 1:
                        raise UnavailableError(f"volume {vol.name!r} column {i} has no up-to-date copy to resync "
                                               "the others from yet")
                if self._resync_fenced.get(vid) != lay.generation:  # once per attempt that got this far
                    await svc._fence_writers(vol, ["a writer that ended uncleanly"])
                    lay = svc.layouts[vid]
                    self._resync_fenced[vid] = lay.generation
                reps = svc.repairs.setdefault(vid, {})
                for i, k, st in lay.states:
                    if st == OUT:  # it may hold a write no other copy has: compared whole when it returns
                        reps.setdefault((i, k), ReplicaRepair("unknown", time.time(), time.monotonic())).whole = True
                svc.persist_volume(vol)
            t0 = time.monotonic()
            plan: list[tuple[tuple[int, int], CopyChunk]] = []
            whole_cols = 0
            for i in range(lay.width):
                copies = [k for k in range(lay.replicas) if lay.replica_state(i, k) != OUT]
                ok = lay.readable(i)
                if len(copies) < 2:
                    continue
                if not ok:
                    raise UnavailableError(f"volume {vol.name!r} column {i} has no up-to-date copy to resync the "
                                           "others from yet")
                found: list[tuple[int, int]] = []
                for k in copies:
                    got = await self._replica_ranges(lay, i, k, "intent")
                    if got is None:
                        break
                    found += got
                else:
                    got = found
                if got is None:  # a record may be incomplete (its agent restarted): everything written
                    whole_cols += 1
                    found = []
                    for k in copies:
                        found += await self._replica_ranges(lay, i, k, "map") or []
                ranges = merge_ranges(found)
                for k in copies:
                    if k != ok[0]:
                        plan += [((i, k), c) for c in resync_chunks(lay, i, ok[0], k, ranges)]
            await self._copy_chunks(vid, lay, plan, {})
            for a in sorted({x for _, c in plan if (x := self._agent_of(c.dst)) is not None}):
                await svc.link.flush(svc.agents[a].control_address)
            copied = sum(c.length for _, c in plan)
            async with svc.lock:
                cur = svc.layouts.get(vid)
                if cur is None:
                    return
                reps = svc.repairs.setdefault(vid, {})
                for (i, k), _ in plan:  # a copy that went out meanwhile may have missed part of it
                    if cur.replica_state(i, k) == OUT:
                        reps.setdefault((i, k), ReplicaRepair("unknown", time.time(), time.monotonic())).whole = True
                svc.unclean.discard(vid)
                self._resync_fenced.pop(vid, None)
                svc.store.commit(svc._volume_puts(vol), [f"unclean/{vid:020d}"])
                self.writer_resyncs += 1
                self.writer_resync_bytes += copied
                logger.warning("volume %s: copies resynced after a writer ended uncleanly: %d bytes in %d chunks%s "
                               "(%.2fs)", vol.name, copied, len(plan),
                               f", {whole_cols} columns compared whole" if whole_cols else "", time.monotonic() - t0)
            await self.reset_intent(vol)

    async def _copy_chunks(self, vid: int, lay: Layout, plan: list[tuple[tuple[int, int], CopyChunk]],
                           reps: dict[tuple[int, int], ReplicaRepair]) -> None:
        """Copy ``plan``'s chunks, ``parallel`` at a time through the ``rate`` token bucket."""
        svc = self.svc
        sem = asyncio.Semaphore(self.parallel)
        bucket = TokenBucket(self.rate)  # at most `rate` bytes/s on average, as the rebalancer

        async def one(t: tuple[int, int], c: CopyChunk) -> None:
            try:
                dst = svc.agent_of_drive(c.dst.drive_id)
                src = svc.agent_of_drive(c.src.drive_id)
                await svc.link.copy(dst.control_address, c.dst, c.dst_offset, src.address, c.src, c.src_offset,
                                    c.length, svc.layouts[vid].generation if vid in svc.layouts else lay.generation,
                                    vid, src.data_tls)
                rec = reps.get(t)
                if rec is not None:
                    rec.bytes_done += c.length
            finally:
                sem.release()

        tasks = []
        try:
            for t, c in plan:
                await sem.acquire()
                await bucket.take(c.length)
                tasks.append(asyncio.create_task(one(t, c)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    # ------------------------------------------------------------------ background repair
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must survive; reported
                self.errors += 1
                logger.warning("replica repair: %s; retrying", exc, exc_info=not isinstance(exc, NvpoolError))
                await asyncio.sleep(1.0)
            await asyncio.sleep(self.interval)

    def _replica_agents(self, lay: Layout, i: int, k: int) -> set[Optional[str]]:
        return {self._agent_of(e) for e in lay.replica_column(i, k).extents}

    def _gone(self, agent: Optional[str]) -> bool:
        return agent is None or agent not in self.svc.agents or self.svc.surely_silent(agent)

    def _healthy(self, agent: Optional[str], lay: Layout, i: int, k: int) -> bool:
        svc = self.svc
        if agent is None or agent not in svc.agents:
            return False
        a = svc.agents[agent]
        return a.ready and svc.alive(agent) and all(
            svc.drives[e.drive_id].state == "ok" for e in lay.replica_column(i, k).extents if e.drive_id in svc.drives)

    async def tick(self) -> None:
        """Take silent agents' replicas out, resync volumes whose writer ended uncleanly, then repair
        out replicas."""
        svc = self.svc
        await self._tick_out()
        for vid in sorted(svc.unclean):
            try:
                vol = svc.volume_by_id(vid)
            except NvpoolError:
                continue
            lay = svc.layouts.get(vid)
            if lay is None or lay.replicas == 1 or any(w.mode == "write" for w in svc._live_leases(vid)):
                continue
            try:
                await self.resync_writer(vol)
            except (NvpoolError, TimeoutError) as exc:
                logger.info("volume %s: resync after an unclean writer not possible yet: %s", vol.name, exc)
        for vol in sorted(svc.volumes.values(), key=lambda v: v.name):
            lay = svc.layouts.get(vol.volume_id)
            if lay is None or not lay.degraded:
                continue
            await self.repair(vol)

    async def _tick_out(self) -> None:
        """Take silent agents' replicas out (and abandon migrations that lost an extent)."""
        svc = self.svc
        async with svc.lock:
            for vol in list(svc.volumes.values()):
                lay = svc.layouts.get(vol.volume_id)
                if lay is None or lay.replicas == 1:
                    continue
                if lay.target is not None:
                    bad = [e for e in lay.extents() if self._gone(self._agent_of(e))
                           or (e.drive_id in svc.drives and svc.drives[e.drive_id].state != "ok")]
                    if bad:
                        self.abandon_migration(vol, f"extent {bad[0].extent_id} is on a silent agent or failed drive")
                        lay = svc.layouts[vol.volume_id]
                down: set[tuple[int, int]] = set()
                failed: set[tuple[int, int]] = set()
                for i in range(lay.width):
                    for k in range(lay.replicas):
                        if lay.replica_state(i, k) == OUT:
                            continue
                        agents = self._replica_agents(lay, i, k)
                        if any(self._gone(a) for a in agents):
                            down.add((i, k))
                        elif any(svc.drives[e.drive_id].state != "ok" for e in lay.replica_column(i, k).extents
                                 if e.drive_id in svc.drives):
                            failed.add((i, k))
                if down:
                    gone = sorted({a or "?" for t in down for a in self._replica_agents(lay, *t) if self._gone(a)})
                    await self.mark_out(vol, down, f"agent {', '.join(gone)} stopped answering heartbeats")
                if failed:
                    await self.mark_out(vol, failed, "drive failed", rebuild=True)

    async def repair(self, vol: VolumeRec) -> None:
        """Resync or rebuild every out (or interrupted syncing) replica of ``vol`` that can be now."""
        svc = self.svc
        vid = vol.volume_id
        now = time.monotonic()
        resync: set[tuple[int, int]] = set()
        rebuild: set[tuple[int, int]] = set()
        full: set[tuple[int, int]] = set()
        async with svc.lock:
            lay = svc.layouts.get(vid)
            if lay is None:
                return
            reps = svc.repairs.setdefault(vid, {})
            for i, k, st in lay.states:
                rec = reps.setdefault((i, k), ReplicaRepair("unknown", time.time(), now))
                if not lay.readable(i):
                    continue  # nothing to copy from
                agents = self._replica_agents(lay, i, k)
                if st == SYNCING:  # interrupted (service restart): copy again
                    if all(self._healthy(a, lay, i, k) for a in agents):
                        resync.add((i, k))
                    continue
                too_long = now - rec.since_mono > self.rebuild_after
                lost = any(a is None or a not in svc.agents for a in agents)
                if rec.rebuild or too_long or lost:
                    rebuild.add((i, k))
                elif all(self._healthy(a, lay, i, k) for a in agents):
                    resync.add((i, k))
            if not resync and not rebuild:
                return
            # rebuilds: new replicas, assigned below, then synced whole
            new_cols: dict[tuple[int, int], Any] = {}
            spaces = svc.drive_spaces()
            work = lay  # each plan sees the ones before it: their space, and their failure domains
            for i, k in sorted(rebuild):
                try:
                    col, svc.next_extent_id = plan_replica(work, i, k, spaces, svc.next_extent_id,
                                                           vol.failure_domain, seed=vid)
                except CapacityError as exc:
                    logger.warning("volume %s: cannot rebuild replica %d of column %d yet: %s", vol.name, k, i, exc)
                    continue
                new_cols[(i, k)] = col
                spaces = with_allocations(spaces, col.extents)
                work = _with_column(work, i, k, col)
            new_ext = [e for c in new_cols.values() for e in c.extents]
            if new_ext:
                svc.store.commit({**svc._counters(), **svc.reserve_pending(vid, new_ext, lay.generation + 1)})
        if new_ext:
            try:
                await svc.assign_on_agents(vid, new_ext, lay.generation + 1, lay.replicas)
            except BaseException:
                svc.rollback_pending(new_ext)
                raise
        async with svc.lock:
            lay = svc.layouts.get(vid)
            if lay is None:
                svc.rollback_pending(new_ext)
                return
            targets = {t for t in resync if lay.replica_state(*t) != OK} | set(new_cols)
            g = lay.generation + 1
            dropped: list[Extent] = []
            new = lay
            for (i, k), col in new_cols.items():
                dropped += lay.replica_column(i, k).extents
                new = _with_column(new, i, k, col)
                full.add((i, k))
            states = {(i, k): st for i, k, st in lay.states}
            for t in targets:
                states[t] = SYNCING
            new = new.evolve(generation=g, states=tuple(sorted((i, k, st) for (i, k), st in states.items())))
            new.validate()
            write_set = [e for i in range(new.width) for k in range(new.replicas)
                         if new.replica_state(i, k) != OUT for e in new.replica_column(i, k).extents]
        # step 5: a copy made while another copy of its column is out records what it receives
        track: dict[str, list[int]] = {}
        for i, k in targets:
            if any(new.replica_state(i, j) == OUT for j in range(new.replicas) if j != k):
                for e in new.replica_column(i, k).extents:
                    a = self._agent_of(e)
                    if a is not None and a in svc.agents:
                        track.setdefault(a, []).append(e.extent_id)
        # step 5: every agent of the new write set refuses the old generation before it is published
        # (outside the lock: a hung agent must not stall the service; the layout is re-checked below)
        try:
            for a, ids in track.items():
                await asyncio.wait_for(svc.link.dirty(svc.agents[a].control_address, ids, "start"), FENCE_TIMEOUT)
            await asyncio.wait_for(svc.fence_on_agents(vid, write_set, g), FENCE_TIMEOUT * 2)
            changed = False
        except (NvpoolError, TimeoutError) as exc:
            changed = True
            why: BaseException = exc
        async with svc.lock:
            if changed or svc.layouts.get(vid) is not lay:
                if new_ext:
                    svc.rollback_pending(new_ext)
                if not changed:
                    why = UnavailableError(f"volume {vol.name!r} changed while its repair was prepared")
                logger.info("volume %s: repair not started (%s); trying again", vol.name, why)
                return
            fences = svc.fences.setdefault(vid, {})
            for e in dropped:
                fences.pop(e.extent_id, None)
            for e in new_ext:
                fences[e.extent_id] = g
            svc.layouts[vid] = new
            reps = svc.repairs.setdefault(vid, {})
            for t in targets:
                rec = reps.setdefault(t, ReplicaRepair("unknown", time.time(), now))
                rec.state = "rebuild" if t in new_cols else "resync"
                rec.bytes_done = 0
                rec.started = time.monotonic()
            svc.store.commit({**svc._volume_puts(vol), **svc.mark_releasing(dropped, vid, g, commit=False)},
                             svc.unreserve(new_ext))
            logger.info("volume %s: %s replicas %s at generation %d", vol.name,
                        "rebuilding" if new_cols else "resyncing", ", ".join(f"{i}/{k}" for i, k in sorted(targets)), g)
        if dropped:
            await svc.release_on_agents(dropped, mark=False)
        await self._sync(vol, new, targets, full)

    async def _sync(self, vol: VolumeRec, lay: Layout, targets: set[tuple[int, int]], full: set[tuple[int, int]]) -> None:
        """Copy what each syncing replica lacks, flush, and publish it ``ok`` (step 5)."""
        svc = self.svc
        vid = vol.volume_id
        reps = svc.repairs.get(vid, {})
        plan: list[tuple[tuple[int, int], CopyChunk]] = []
        for i, k in sorted(targets):
            oks = lay.readable(i)
            src = oks[0]
            found: Optional[list[tuple[int, int]]] = None
            rec = reps.get((i, k))
            if (i, k) not in full and not (rec is not None and rec.whole):
                found = []
                for j in oks:  # the union of every ok copy's record (step 5)
                    got = await self._replica_ranges(lay, i, j, "dirty")
                    if got is None:
                        found = None
                        break
                    found += got
            if found is None:  # a whole copy: what was ever written, on the source or (a resync) here
                found = await self._replica_ranges(lay, i, src, "map") or []
                if (i, k) not in full:
                    found += await self._replica_ranges(lay, i, k, "map") or []
            chunks = resync_chunks(lay, i, src, k, merge_ranges(found))
            rec = reps.get((i, k))
            if rec is not None:
                rec.bytes_total = sum(c.length for c in chunks)
            plan += [((i, k), c) for c in chunks]
        await self._copy_chunks(vid, lay, plan, reps)
        dst_agents = {self._agent_of(e) for i, k in targets for e in lay.replica_column(i, k).extents}
        for dst_agent in sorted(x for x in dst_agents if x is not None):
            await svc.link.flush(svc.agents[dst_agent].control_address)
        async with svc.lock:
            cur = svc.layouts.get(vid)
            if cur is None:
                return
            done = {t for t in targets if cur.replica_state(*t) == SYNCING
                    and cur.replica_column(*t) == lay.replica_column(*t)}
            if not done:
                return
            states = {(i, k): st for i, k, st in cur.states if (i, k) not in done}
            new = cur.evolve(generation=cur.generation + 1,
                             states=tuple(sorted((i, k, st) for (i, k), st in states.items())))
            # the copy every write reaches first stays first (step 8): a promoted copy of a lower index
            # trades places with it (both ok now: no state or repair record moves)
            for i, k in sorted(done):
                first = cur.readable(i)
                if first and k < first[0]:
                    promoted, kept = new.replica_column(i, k), new.replica_column(i, first[0])
                    new = _with_column(_with_column(new, i, k, kept), i, first[0], promoted)
            new.validate()
            svc.layouts[vid] = new
            for t in done:
                svc.repairs.get(vid, {}).pop(t, None)
            svc.persist_volume(vol)
            untrack: dict[str, list[int]] = {}
            for i in {i for i, _ in done}:
                if any(new.replica_state(i, k) != OK for k in range(new.replicas)):
                    continue
                for k in range(new.replicas):
                    for e in new.replica_column(i, k).extents:
                        a = self._agent_of(e)
                        if a is not None:
                            untrack.setdefault(a, []).append(e.extent_id)
            logger.info("volume %s: replicas %s in sync at generation %d (%d bytes copied)", vol.name,
                        ", ".join(f"{i}/{k}" for i, k in sorted(done)), new.generation,
                        sum(c.length for t, c in plan if t in done))
        for a, ids in untrack.items():
            try:
                await svc.link.dirty(svc.agents[a].control_address, ids, "stop")
            except NvpoolError as exc:
                logger.info("agent %s: could not stop write tracking (%s)", a, exc)

    def status(self) -> list[dict[str, Any]]:
        """Every replica out of service or being repaired, for ``pool status``."""
        out = []
        now = time.monotonic()
        for vol in sorted(self.svc.volumes.values(), key=lambda v: v.name):
            lay = self.svc.layouts.get(vol.volume_id)
            if lay is None:
                continue
            if self.svc.resync_pending(lay):
                out.append({"volume": vol.name, "column": 0, "replica": 0, "state": "writer-resync",
                            "reason": "its writer ended without a clean close; the copies it may have left "
                                      "different are being made identical", "since": 0.0,
                            "bytes_total": 0, "bytes_done": 0, "eta_s": 0.0})
            reps = self.svc.repairs.get(vol.volume_id, {})
            for i, k, st in lay.states:
                rec = reps.get((i, k))
                state = rec.state if rec is not None and st == SYNCING else "out"
                eta = 0.0
                if rec is not None and st == SYNCING and rec.bytes_done and rec.started:
                    rate = rec.bytes_done / max(1e-3, now - rec.started)
                    eta = max(0.0, (rec.bytes_total - rec.bytes_done) / rate)
                out.append({"volume": vol.name, "column": i, "replica": k, "state": state,
                            "reason": rec.reason if rec else "", "since": rec.since if rec else 0.0,
                            "bytes_total": rec.bytes_total if rec else 0, "bytes_done": rec.bytes_done if rec else 0,
                            "eta_s": eta})
        return out
