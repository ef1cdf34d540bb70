"""Placement: which drives and byte ranges a volume's columns get. Pure and deterministic.

Inputs are immutable snapshots of drive space (``DriveSpace``: capacity and the ranges already
allocated, derived from every layout, current and migration target); outputs are new columns. Rules:

* only usable drives (alive agent, drive ok, server not draining) receive extents;
* a volume's columns go to drives on distinct servers whenever there are enough servers; otherwise
  servers are used evenly (none gets a second column before each has one), and one drive never
  holds two columns of the same volume;
* among candidates, the emptiest drive (by fill ratio) wins; ties are broken by a hash of the seed
  and the drive id, never by dict order, so a plan is reproducible from its inputs;
* extents are ``ALLOC_ALIGN``-aligned, never overlap, never exceed a drive's capacity; a column is
  one extent when any free range fits it, else several (largest ranges first).

``CapacityError`` says how much was asked and how much is free; nothing is changed by a failed plan.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from nvpool.proto.layout import ALLOC_ALIGN, Column, Extent, Layout, column_length_for
from nvpool.proto.errors import CapacityError, UsageError

MAX_WIDTH = 16


@dataclass(frozen=True)
class DriveSpace:
    drive_id: str
    host: str
    capacity: int  # bytes usable for extents
    data_offset: int  # first usable byte
    used: tuple[tuple[int, int], ...] = ()  # allocated (offset, length), any order
    usable: bool = True
    rack: str = ""

    @property
    def used_bytes(self) -> int:
        return sum(n for _, n in self.used)

    @property
    def fill(self) -> float:
        return self.used_bytes / self.capacity if self.capacity else 1.0

    def free_ranges(self) -> list[tuple[int, int]]:
        """Free aligned (offset, length) ranges in address order."""
        out, pos = [], _align_up(self.data_offset)
        end = self.data_offset + self.capacity
        for off, n in sorted(self.used):
            if off > pos:
                out.append((pos, _align_down(off) - pos))
            pos = max(pos, _align_up(off + n))
        if end > pos:
            out.append((pos, _align_down(end) - pos))
        return [(o, n) for o, n in out if n > 0]

    def free_bytes(self) -> int:
        return sum(n for _, n in self.free_ranges())


def _align_up(x: int) -> int:
    return -(-x // ALLOC_ALIGN) * ALLOC_ALIGN


def _align_down(x: int) -> int:
    return x // ALLOC_ALIGN * ALLOC_ALIGN


def _tiebreak(seed: int, drive_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{drive_id}".encode(), digest_size=8).digest()


@dataclass
class _Work:
    """Mutable scratch space of one plan (never visible outside)."""

    drives: dict[str, DriveSpace]
    extra: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def space(self, drive_id: str) -> DriveSpace:
        d = self.drives[drive_id]
        more = self.extra.get(drive_id)
        if not more:
            return d
        return DriveSpace(d.drive_id, d.host, d.capacity, d.data_offset, d.used + tuple(more), d.usable, d.rack)

    def allocate(self, drive_id: str, length: int) -> Optional[list[tuple[int, int]]]:
        """Ranges for ``length`` bytes (aligned) on one drive, or None if it does not fit."""
        length = _align_up(length)
        free = self.space(drive_id).free_ranges()
        if sum(n for _, n in free) < length:
            return None
        fits = [r for r in free if r[1] >= length]
        if fits:  # best fit: the smallest free range that holds it whole
            off, _ = min(fits, key=lambda r: (r[1], r[0]))
            got = [(off, length)]
        else:
            got, left = [], length
            for off, n in sorted(free, key=lambda r: (-r[1], r[0])):
                take = min(n, left)
                got.append((off, take))
                left -= take
                if not left:
                    break
        self.extra.setdefault(drive_id, []).extend(got)
        return got


def usable_drives(drives: Iterable[DriveSpace]) -> list[DriveSpace]:
    return [d for d in drives if d.usable and d.capacity > 0]


def default_width(drives: Iterable[DriveSpace]) -> int:
    return max(1, min(MAX_WIDTH, len(usable_drives(drives))))


def _choose(
    work: _Work, candidates: Sequence[DriveSpace], width: int, col_len: int, seed: int, avoid: set[str]
) -> list[str]:
    """``width`` drive ids on distinct hosts where possible, emptiest first."""
    chosen: list[str] = []
    per_host: dict[str, int] = {}
    taken = set(avoid)
    for _ in range(width):
        best: Optional[tuple[tuple[int, float, bytes], str]] = None
        for d in candidates:
            if d.drive_id in taken:
                continue
            space = work.space(d.drive_id)
            if space.free_bytes() < _align_up(col_len):
                continue
            key = (per_host.get(d.host, 0), space.fill, _tiebreak(seed, d.drive_id))
            if best is None or key < best[0]:
                best = (key, d.drive_id)
        if best is None:
            break
        did = best[1]
        chosen.append(did)
        taken.add(did)
        host = work.drives[did].host
        per_host[host] = per_host.get(host, 0) + 1
        work.allocate(did, col_len)
    return chosen


def plan_columns(
    drives: Sequence[DriveSpace],
    size: int,
    stripe_unit: int,
    width: int,
    seed: int,
    next_extent_id: int,
    avoid: Iterable[str] = (),
) -> tuple[tuple[Column, ...], int]:
    """Columns for a new volume (or a migration target). Returns (columns, next free extent id)."""
    if size <= 0:
        raise UsageError("volume size must be positive")
    cands = [d for d in usable_drives(drives) if d.drive_id not in set(avoid)]
    if width <= 0:
        width = max(1, min(MAX_WIDTH, len(cands)))
    if width > len(cands):
        raise CapacityError(f"stripe width {width} needs {width} usable drives; the pool has {len(cands)}")
    col_len = column_length_for(size, stripe_unit, width)
    work = _Work({d.drive_id: d for d in drives})
    chosen = _choose(work, cands, width, col_len, seed, set(avoid))
    if len(chosen) < width:
        free = sum(d.free_bytes() for d in cands)
        raise CapacityError(
            f"cannot place {size} bytes over {width} drives ({_align_up(col_len)} bytes each): "
            f"only {len(chosen)} usable drives have room; {free} bytes free in all"
        )
    columns, eid = [], next_extent_id
    for did in chosen:
        exts = []
        for off, n in work.extra[did]:
            exts.append(Extent(eid, did, off, n))
            eid += 1
        columns.append(Column(tuple(exts)))
    return tuple(columns), eid


def plan_grow(layout: Layout, drives: Sequence[DriveSpace], new_size: int, next_extent_id: int) -> tuple[Layout, int]:
    """Extend every column so the layout holds ``new_size`` bytes (same drive when it has room)."""
    if new_size < layout.size:
        raise UsageError("shrinking a volume would discard data; only growing is supported")
    need = column_length_for(new_size, layout.stripe_unit, layout.width)
    work = _Work({d.drive_id: d for d in drives})
    usable = {d.drive_id for d in usable_drives(drives)}
    columns, eid = [], next_extent_id
    used_by_volume = {e.drive_id for e in layout.extents()}
    for col in layout.columns:
        missing = need - col.length
        exts = list(col.extents)
        if missing > 0:
            home = col.extents[-1].drive_id
            got = work.allocate(home, missing) if home in usable else None
            if got is None:
                alt = [work.space(d) for d in usable if d not in used_by_volume]
                alt.sort(key=lambda d: (d.fill, d.drive_id))
                for d in alt:
                    got = work.allocate(d.drive_id, missing)
                    if got is not None:
                        home = d.drive_id
                        break
            if got is None:
                raise CapacityError(f"cannot grow volume {layout.name!r} to {new_size} bytes: no drive has room")
            for off, n in got:
                exts.append(Extent(eid, home, off, n))
                eid += 1
        columns.append(Column(tuple(exts)))
    return Layout(layout.volume_id, layout.name, layout.generation + 1, new_size, layout.stripe_unit, tuple(columns)), eid


def imbalance(drives: Iterable[DriveSpace]) -> float:
    """Spread of fill ratios over usable drives (0 = perfectly balanced)."""
    fills = [d.fill for d in usable_drives(drives)]
    return max(fills) - min(fills) if fills else 0.0


def with_allocations(drives: Sequence[DriveSpace], extents: Iterable[Extent], sign: int = 1) -> list[DriveSpace]:
    """Drive snapshots with ``extents`` added (sign=1) or removed (sign=-1)."""
    by = {d.drive_id: list(d.used) for d in drives}
    for e in extents:
        if e.drive_id in by:
            r = (e.drive_offset, _align_up(e.length))
            if sign > 0:
                by[e.drive_id].append(r)
            elif r in by[e.drive_id]:
                by[e.drive_id].remove(r)
    return [DriveSpace(d.drive_id, d.host, d.capacity, d.data_offset, tuple(by[d.drive_id]), d.usable, d.rack) for d in drives]
