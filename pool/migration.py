"""Online re-spreading of a volume: the protocol, and the pure copy plan it follows.

Protocol for one volume whose layout is ``L`` at generation ``g`` (the metadata service drives it;
every step is persisted before the next, so a restarted service resumes where it stopped):

1. **Prepare**: allocate the target columns ``T`` (same size and stripe unit, new extents), assign
   them on their agents (zeroed, fence ``g+1``) and persist layout ``g+1`` = ``L`` with target ``T``.
2. **Fence the old generation**: fence ``L``'s extents at ``g+1`` on every agent that holds them,
   and wait for every acknowledgement. From now on no client can write ``L`` without also writing
   ``T``: clients at ``g`` are refused (``STALE_LAYOUT``), re-fetch, and at ``g+1`` every write goes to
   ``L`` first and then to ``T`` (reads come from ``L``).
3. **Copy** every chunk whose placement differs between ``L`` and ``T`` (``copy_plan``), throttled.
   The destination agent pulls the chunk from the source agent and applies it skipping any byte a
   client wrote to the destination since the chunk's copy began (``agents/core.py``). Because clients
   write ``L`` before ``T``: a client write that reaches ``T`` before the copy began was already in
   ``L`` when the copy read it; one that reaches ``T`` while the copy is in flight is kept over the
   copy; one that reaches ``T`` afterwards simply overwrites it. No write is lost or reordered.
   Progress (chunks done) is persisted periodically; re-copying a chunk is harmless.
4. **Cut over**: fence ``L``'s extents at ``g+2`` (all acknowledged: no reader at ``g+1`` can read
   ``L`` any more, so none can miss a write made at ``g+2``), persist layout ``g+2`` = ``T`` alone,
   fence ``T`` at ``g+2``, then release ``L``'s extents on their agents. Clients refused in the short
   window between the two fences re-fetch and retry until ``g+2`` is published.

Cancel before cut-over: persist ``L`` alone at ``g+2``, fence ``L`` at ``g+2``, release ``T``.

Replicated volumes: ``L`` and ``T`` have the same number of replicas, every replica of ``L`` in
service; a client writes every replica of ``L`` and then every replica of ``T``, and replica ``k`` of
``T`` is copied from replica ``k`` of ``L`` (``copy_plan_replicas``). If a replica of either fails
while the volume moves, the metadata service abandons the migration (``pool/replication.py``):
it publishes ``L`` alone, with the failed replica out of service, at a higher generation and
releases ``T``'s new extents; the rebalancer sees that its target is gone and moves on (it checks
before every step that publishes anything, under the lock). Nothing written is lost: ``L`` received
every write, first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from nvpool.proto.layout import Extent, Layout
from nvpool.proto.errors import UsageError


@dataclass(frozen=True, slots=True)
class CopyChunk:
    """Copy ``length`` bytes from ``src`` at ``src_offset`` to ``dst`` at ``dst_offset``."""

    volume_offset: int
    length: int
    src: Extent
    src_offset: int
    dst: Extent
    dst_offset: int


def copy_plan(old: Layout, new: Layout, chunk: int = 4 * 1024 * 1024) -> Iterator[CopyChunk]:
    """Every range of the volume whose bytes live elsewhere in ``new`` than in ``old``.

    Ranges that stay in place (same extent, same offset: an unmoved column) are skipped. Chunks are
    at most ``chunk`` bytes and lie inside one extent on both sides; consecutive pieces that are
    contiguous on both sides are merged.
    """
    if old.size != new.size:
        raise UsageError("a migration keeps the volume size")
    step = min(old.stripe_unit, new.stripe_unit)
    pending: CopyChunk | None = None
    pos = 0
    while pos < old.size:
        n = min(step - pos % step, old.size - pos)
        src = list(old.map(pos, n))
        dst = list(new.map(pos, n))
        # the two maps may cut differently (extent boundaries); walk both
        i = j = 0
        si = sj = 0  # bytes consumed inside src[i], dst[j]
        vpos = pos
        while i < len(src) and j < len(dst):
            a, b = src[i], dst[j]
            k = min(a.length - si, b.length - sj, chunk)
            if not (a.extent == b.extent and a.extent_offset + si == b.extent_offset + sj):
                c = CopyChunk(vpos, k, a.extent, a.extent_offset + si, b.extent, b.extent_offset + sj)
                if (
                    pending is not None
                    and pending.src == c.src
                    and pending.dst == c.dst
                    and pending.src_offset + pending.length == c.src_offset
                    and pending.dst_offset + pending.length == c.dst_offset
                    and pending.volume_offset + pending.length == c.volume_offset
                    and pending.length + k <= chunk
                ):
                    pending = CopyChunk(
                        pending.volume_offset, pending.length + k, pending.src, pending.src_offset,
                        pending.dst, pending.dst_offset,
                    )
                else:
                    if pending is not None:
                        yield pending
                    pending = c
            vpos += k
            si += k
            sj += k
            if si == a.length:
                i, si = i + 1, 0
            if sj == b.length:
                j, sj = j + 1, 0
        pos += n
    if pending is not None:
        yield pending


def copy_plan_replicas(old: Layout, new: Layout, chunk: int = 4 * 1024 * 1024) -> Iterator[CopyChunk]:
    """``copy_plan`` for every replica: replica ``k`` of the new layout is filled from replica ``k`` of
    the old one (a replicated volume is re-spread only while every replica is in service)."""
    if old.replicas != new.replicas:
        raise UsageError("a migration keeps the number of replicas")
    for k in range(old.replicas):
        yield from copy_plan(old.replica_view(k), new.replica_view(k), chunk)


def bytes_to_move(old: Layout, new: Layout) -> int:
    return sum(c.length for c in copy_plan_replicas(old, new))
