"""Placement: which drives and byte ranges a volume's columns get. Pure and deterministic.

Inputs are immutable snapshots of drive space (``DriveSpace``: capacity and the ranges already
allocated, derived from every layout, current and migration target, and reserved space); outputs are
new columns. A volume is striped over more *columns* than the pool has drives (``default_columns``),
the way Ceph maps many placement groups to few OSDs: a drive may hold several columns of a volume,
and growing the pool moves whole columns, about 1/(N+1) of a volume's bytes for the (N+1)-th server,
while the volume still spreads over every server. Rules:

* only usable drives (alive agent, drive ok, server not draining) receive extents;
* a volume's columns are spread evenly over servers first (no server gets a second column before
  each server with room has one, and so on), then evenly over the drives of each server;
  consecutive columns land on different servers whenever there are several;
* among equally loaded candidates, the emptiest drive (by fill ratio) wins; ties are broken by a hash
  of the seed and the drive id, never by dict order, so a plan is reproducible from its inputs;
* extents are ``ALLOC_ALIGN``-aligned, never overlap, never exceed a drive's capacity; a column is
  one extent when any free range fits it, else several (largest ranges first);
* ``plan_rebalance`` moves as few columns as possible: every usable drive ends with its even share
  of the volume's columns (the drives holding most keep the remainder), columns on unusable or
  draining drives always move, and the rest stay where they are.

Replicated volumes (``replicas`` > 1): replica 0 of every column is placed by the rules above;
every further replica of a column goes to a drive whose *failure domain* (the server by default, or
the value of an agent label such as ``rack``) holds no other replica of that column, again spread
evenly. Drives without the label are not candidates. A volume that cannot be placed that way is
refused with the number of domains it needs and has (``CapacityError``): copies in one domain would
not survive that domain's loss, so they are never placed silently. ``plan_replica`` places one
replacement replica (a rebuild) under the same rule.

``CapacityError`` says how much was asked and how much is free; nothing is changed by a failed plan.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from nvpool.proto.layout import ALLOC_ALIGN, Column, Extent, Layout, column_length_for
from nvpool.proto.errors import CapacityError, UsageError

#: most columns a volume may have, and the default for pools smaller than it
MAX_COLUMNS = 256
DEFAULT_COLUMNS = 32
#: a default layout gives each column at least this much (fewer, longer columns for small volumes)
MIN_COLUMN_BYTES = 4 * 1024 * 1024
#: kept for callers that ask how wide a plain-striped volume may be
MAX_WIDTH = MAX_COLUMNS


@dataclass(frozen=True)
class DriveSpace:
    drive_id: str
    host: str
    capacity: int  # bytes usable for extents
    data_offset: int  # first usable byte
    used: tuple[tuple[int, int], ...] = ()  # allocated (offset, length), any order
    usable: bool = True
    rack: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    def domain(self, key: str = "host") -> str:
        """This drive's failure domain for ``key``: the server for "host", else the label's value
        ("" when the agent has no such label)."""
        if key == "host":
            return self.host
        for k, v in self.labels:
            if k == key:
                return v
        return self.rack if key == "rack" else ""

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
        return DriveSpace(d.drive_id, d.host, d.capacity, d.data_offset, d.used + tuple(more), d.usable, d.rack,
                          d.labels)

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


def _column_at(drive_id: str, ranges: list[tuple[int, int]], eid: int) -> tuple[Column, int]:
    """A column of new extents (ids from ``eid`` on) over ``ranges`` of one drive; the next free id."""
    exts = []
    for off, n in ranges:
        exts.append(Extent(eid, drive_id, off, n))
        eid += 1
    return Column(tuple(exts)), eid


def usable_drives(drives: Iterable[DriveSpace]) -> list[DriveSpace]:
    return [d for d in drives if d.usable and d.capacity > 0]


def default_width(drives: Iterable[DriveSpace]) -> int:
    """How many drives a volume can spread over now (for status and planning reports)."""
    return max(1, min(MAX_COLUMNS, len(usable_drives(drives))))


def default_columns(size: int, stripe_unit: int, drives: Iterable[DriveSpace]) -> int:
    """Columns for a new volume: many more than drives (so growth moves whole columns), but at least
    ``MIN_COLUMN_BYTES`` each, and never fewer than the drives it can spread over (a small volume
    still uses every drive, one ALLOC_ALIGN unit each)."""
    n = len(usable_drives(drives))
    want = min(MAX_COLUMNS, max(DEFAULT_COLUMNS, n))
    want = min(want, max(1, size // MIN_COLUMN_BYTES))
    spread = min(n, -(-size // ALLOC_ALIGN), -(-size // stripe_unit), MAX_COLUMNS)
    return max(1, want, spread)


def _choose(
    work: _Work, candidates: Sequence[DriveSpace], width: int, col_len: int, seed: int, avoid: set[str],
    per_host: Optional[dict[str, int]] = None, per_drive: Optional[dict[str, int]] = None,
    last_host: str = "", domain_key: str = "host", forbidden: Optional[Sequence[set[str]]] = None,
) -> list[tuple[str, list[tuple[int, int]]]]:
    """A drive and its allocated ranges for each of ``width`` columns: fewest columns of this volume on
    the server, then on the drive, then emptiest; not the server of the previous column when another
    one can take it. ``forbidden[i]``: failure domains (by ``domain_key``) the i-th choice must avoid."""
    chosen: list[tuple[str, list[tuple[int, int]]]] = []
    per_host = dict(per_host or {})
    per_drive = dict(per_drive or {})
    for n in range(width):
        best: Optional[tuple[tuple[int, int, int, float, bytes], str]] = None
        for d in candidates:
            if d.drive_id in avoid:
                continue
            if forbidden is not None and (not d.domain(domain_key) or d.domain(domain_key) in forbidden[n]):
                continue
            space = work.space(d.drive_id)
            if space.free_bytes() < _align_up(col_len):
                continue
            key = (per_host.get(d.host, 0), int(d.host == last_host), per_drive.get(d.drive_id, 0), space.fill,
                   _tiebreak(seed, d.drive_id))
            if best is None or key < best[0]:
                best = (key, d.drive_id)
        if best is None:
            break
        did = best[1]
        ranges = work.allocate(did, col_len)
        assert ranges is not None  # free_bytes was checked above
        chosen.append((did, ranges))
        host = work.drives[did].host
        per_host[host] = per_host.get(host, 0) + 1
        per_drive[did] = per_drive.get(did, 0) + 1
        last_host = host
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
    """Columns for a new volume (``width`` 0: ``default_columns``). Returns (columns, next free id)."""
    cols, mirrors, eid = plan_replicated(drives, size, stripe_unit, width, seed, next_extent_id, 1, "host", avoid)
    return cols, eid


def _domains(cands: Sequence[DriveSpace], key: str) -> set[str]:
    return {d.domain(key) for d in cands if d.domain(key)}


def plan_replicated(
    drives: Sequence[DriveSpace],
    size: int,
    stripe_unit: int,
    width: int,
    seed: int,
    next_extent_id: int,
    replicas: int = 1,
    domain_key: str = "host",
    avoid: Iterable[str] = (),
) -> tuple[tuple[Column, ...], tuple[tuple[Column, ...], ...], int]:
    """Columns and their further replicas for a new volume. Returns (columns, mirrors, next free id)."""
    if size <= 0:
        raise UsageError("volume size must be positive")
    if replicas < 1:
        raise UsageError("a volume needs at least one replica")
    cands = [d for d in usable_drives(drives) if d.drive_id not in set(avoid)]
    if not cands:
        raise CapacityError("the pool has no usable drives (no agent alive, or every server draining)")
    if replicas > 1:
        cands = [d for d in cands if d.domain(domain_key)]
        doms = _domains(cands, domain_key)
        if len(doms) < replicas:
            what = "servers" if domain_key == "host" else f"distinct '{domain_key}' labels among usable agents"
            raise CapacityError(
                f"{replicas} replicas need {replicas} failure domains ({what}); the pool has {len(doms)}"
                + (f" ({', '.join(sorted(doms))})" if doms else "")
            )
    if width <= 0:
        width = default_columns(size, stripe_unit, cands)
    if width > MAX_COLUMNS:
        raise UsageError(f"stripe width {width} is above the maximum of {MAX_COLUMNS} columns")
    col_len = column_length_for(size, stripe_unit, width)
    work = _Work({d.drive_id: d for d in drives})
    chosen = _choose(work, cands, width, col_len, seed, set(avoid), domain_key=domain_key,
                     forbidden=[set() for _ in range(width)] if replicas > 1 else None)
    if len(chosen) < width:
        free = sum(d.free_bytes() for d in cands)
        raise CapacityError(
            f"cannot place {size} bytes as {width} columns of {_align_up(col_len)} bytes: room for only "
            f"{len(chosen)} on {len(cands)} usable drives; {free} bytes free in all"
        )
    by_id = {d.drive_id: d for d in drives}
    per_host: dict[str, int] = {}
    for did, _ in chosen:
        per_host[by_id[did].host] = per_host.get(by_id[did].host, 0) + 1
    used_domains = [{by_id[did].domain(domain_key)} for did, _ in chosen]
    copies = [chosen]
    for k in range(1, replicas):
        more = _choose(work, cands, width, col_len, seed + 7919 * k, set(avoid), per_host, None,
                       domain_key=domain_key, forbidden=used_domains)
        if len(more) < width:
            raise CapacityError(
                f"cannot place replica {k + 1} of {width} columns ({_align_up(col_len)} bytes each) in failure "
                f"domains apart from the other replicas: room for only {len(more)}"
            )
        for i, (did, _) in enumerate(more):
            used_domains[i].add(by_id[did].domain(domain_key))
            per_host[by_id[did].host] = per_host.get(by_id[did].host, 0) + 1
        copies.append(more)
    eid = next_extent_id
    out: list[tuple[Column, ...]] = []
    for picked in copies:
        columns = []
        for did, ranges in picked:
            col, eid = _column_at(did, ranges, eid)
            columns.append(col)
        out.append(tuple(columns))
    return out[0], tuple(out[1:]), eid


def plan_replica(
    layout: Layout, column: int, replica: int, drives: Sequence[DriveSpace], next_extent_id: int,
    domain_key: str = "host", seed: int = 0,
) -> tuple[Column, int]:
    """A new home for replica ``replica`` of ``column`` (a rebuild): a usable drive in a failure
    domain that holds none of the column's other replicas. Returns (column, next free id)."""
    by_id = {d.drive_id: d for d in drives}
    taken: set[str] = set()
    for k in range(layout.replicas):
        if k != replica:
            for e in layout.replica_column(column, k).extents:
                d = by_id.get(e.drive_id)
                if d is not None and d.domain(domain_key):
                    taken.add(d.domain(domain_key))
    col_len = layout.replica_column(column, replica).length
    cands = [d for d in usable_drives(drives) if d.domain(domain_key)]
    per_drive: dict[str, int] = {}
    for e in layout.extents():
        per_drive[e.drive_id] = per_drive.get(e.drive_id, 0) + 1
    work = _Work({d.drive_id: d for d in drives})
    got = _choose(work, cands, 1, col_len, seed + column * 31 + replica, set(), None, per_drive,
                  domain_key=domain_key, forbidden=[taken])
    if not got:
        raise CapacityError(
            f"no usable drive with {_align_up(col_len)} bytes free outside the failure domains of the other "
            f"replicas of column {column} of {layout.name!r} ({', '.join(sorted(taken)) or 'none'})"
        )
    did, ranges = got[0]
    return _column_at(did, ranges, next_extent_id)


def plan_grow(layout: Layout, drives: Sequence[DriveSpace], new_size: int, next_extent_id: int,
              domain_key: str = "host") -> tuple[Layout, int]:
    """Extend every column (every replica of it) so the layout holds ``new_size`` bytes: on the same
    drive when it has room, else on another drive (for a replica: one whose failure domain holds no
    other replica of the column)."""
    if new_size < layout.size:
        raise UsageError("shrinking a volume would discard data; only growing is supported")
    need = column_length_for(new_size, layout.stripe_unit, layout.width)
    work = _Work({d.drive_id: d for d in drives})
    usable = {d.drive_id for d in usable_drives(drives)}
    by_id = {d.drive_id: d for d in drives}
    eid = next_extent_id
    used_by_volume = {e.drive_id for e in layout.extents()}
    replicas: list[list[Column]] = [[] for _ in range(layout.replicas)]
    for i in range(layout.width):
        for k in range(layout.replicas):
            col = layout.replica_column(i, k)
            others: set[str] = set()
            for j in range(layout.replicas):
                if j != k:
                    sibling = replicas[j][i] if j < k else layout.replica_column(i, j)
                    others |= {by_id[e.drive_id].domain(domain_key) for e in sibling.extents if e.drive_id in by_id}
            new_col, eid = _grow_column(col, need, work, usable, used_by_volume, eid, by_id, others, domain_key)
            replicas[k].append(new_col)
    return layout.evolve(generation=layout.generation + 1, size=new_size, columns=tuple(replicas[0]),
                         mirrors=tuple(tuple(r) for r in replicas[1:])), eid


def _grow_column(col: Column, need: int, work: _Work, usable: set[str], used_by_volume: set[str], eid: int,
                 by_id: dict[str, DriveSpace], forbidden: set[str], domain_key: str) -> tuple[Column, int]:
    missing = need - col.length
    exts = list(col.extents)
    if missing > 0:
        home = col.extents[-1].drive_id
        got = work.allocate(home, missing) if home in usable else None
        if got is None:
            alt = [work.space(d) for d in usable if d != home
                   and not (forbidden and by_id[d].domain(domain_key) in forbidden)]
            alt.sort(key=lambda d: (d.drive_id in used_by_volume, d.fill, d.drive_id))
            for d in alt:
                got = work.allocate(d.drive_id, missing)
                if got is not None:
                    home = d.drive_id
                    break
        if got is None:
            raise CapacityError(f"cannot grow a column by {missing} bytes: no drive has room")
        for off, n in got:
            exts.append(Extent(eid, home, off, n))
            eid += 1
    return Column(tuple(exts)), eid


def _home(col: Column) -> str:
    """The drive a column counts against (its first extent's)."""
    return col.extents[0].drive_id


def plan_rebalance(
    layout: Layout, drives: Sequence[DriveSpace], next_extent_id: int, seed: int = 0,
) -> tuple[Optional[tuple[Column, ...]], int]:
    """Columns after moving as few whole columns as possible so that every usable drive holds its even
    share of the volume's columns (see the module rules). Returns (None, next id) when nothing moves.
    ``drives`` must already count this layout's own extents as used."""
    usable = usable_drives(drives)
    if not usable:
        raise CapacityError("no usable drive to move columns to (no agent alive, or every server draining)")
    ok = {d.drive_id for d in usable}
    width = layout.width
    count: dict[str, int] = {d.drive_id: 0 for d in usable}
    must_move: list[int] = []
    for i, col in enumerate(layout.columns):
        if any(e.drive_id not in ok for e in col.extents):
            must_move.append(i)
        else:
            count[_home(col)] += 1
    # even shares; the extra columns stay on the drives that hold most now (fewest moves)
    q, r = divmod(width, len(usable))
    order = sorted(usable, key=lambda d: (-count[d.drive_id], d.fill, _tiebreak(seed, d.drive_id)))
    quota = {d.drive_id: q + (1 if i < r else 0) for i, d in enumerate(order)}
    move = list(must_move)
    for i in reversed(range(width)):  # take the last columns of over-full drives
        col = layout.columns[i]
        if i in must_move:
            continue
        home = _home(col)
        if count[home] > quota[home]:
            count[home] -= 1
            move.append(i)
    if not move:
        return None, next_extent_id
    work = _Work({d.drive_id: d for d in drives})
    by_id = {d.drive_id: d for d in drives}
    per_host: dict[str, int] = {}
    for i, col in enumerate(layout.columns):
        if i not in move:
            h = by_id[_home(col)].host if _home(col) in by_id else ""
            per_host[h] = per_host.get(h, 0) + 1
    columns = list(layout.columns)
    eid = next_extent_id
    for i in sorted(move):
        col_len = layout.columns[i].length
        under = [d for d in usable if count[d.drive_id] < quota[d.drive_id]]
        got = _choose(work, under, 1, col_len, seed + i, set(), per_host, count)
        if not got:  # no drive below its share has room: any usable drive with room
            got = _choose(work, usable, 1, col_len, seed + i, set(), per_host, count)
        if not got:
            raise CapacityError(
                f"cannot move column {i} of volume {layout.name!r} ({_align_up(col_len)} bytes): no usable drive has room"
            )
        did, ranges = got[0]
        count[did] += 1
        per_host[by_id[did].host] = per_host.get(by_id[did].host, 0) + 1
        columns[i], eid = _column_at(did, ranges, eid)
    return tuple(columns), eid


def plan_rebalance_replicated(
    layout: Layout, drives: Sequence[DriveSpace], next_extent_id: int, seed: int = 0, domain_key: str = "host",
) -> tuple[Optional[tuple[tuple[Column, ...], tuple[tuple[Column, ...], ...]]], int]:
    """``plan_rebalance`` for a replicated layout: every (column, replica) is a unit; units on unusable
    or draining drives move, then units of over-full drives, to drives below their even share whose
    failure domain holds no other replica of the column (counting the replicas already moved).
    Returns ((columns, mirrors), next id), or (None, next id) when nothing moves."""
    usable = usable_drives(drives)
    if not usable:
        raise CapacityError("no usable drive to move replicas to (no agent alive, or every server draining)")
    ok = {d.drive_id for d in usable}
    by_id = {d.drive_id: d for d in drives}
    units = [(i, k) for i in range(layout.width) for k in range(layout.replicas)]
    count: dict[str, int] = {d.drive_id: 0 for d in usable}
    must_move: list[tuple[int, int]] = []
    for i, k in units:
        col = layout.replica_column(i, k)
        if any(e.drive_id not in ok for e in col.extents):
            must_move.append((i, k))
        else:
            count[_home(col)] += 1
    q, r = divmod(len(units), len(usable))
    order = sorted(usable, key=lambda d: (-count[d.drive_id], d.fill, _tiebreak(seed, d.drive_id)))
    quota = {d.drive_id: q + (1 if n < r else 0) for n, d in enumerate(order)}
    move = list(must_move)
    # take units off over-full drives, preferring columns none of whose replicas moves yet (two
    # replicas of one column moving at once would compete for the same few domains)
    for second_pass in (False, True):
        moving_cols = {i for i, _ in move}
        for i, k in reversed(units):
            if (i, k) in move or (not second_pass and i in moving_cols):
                continue
            home = _home(layout.replica_column(i, k))
            if count[home] > quota[home]:
                count[home] -= 1
                move.append((i, k))
                moving_cols.add(i)
    if not move:
        return None, next_extent_id
    work = _Work({d.drive_id: d for d in drives})
    per_host: dict[str, int] = {}
    for i, k in units:
        if (i, k) not in move:
            h = by_id[_home(layout.replica_column(i, k))].host if _home(layout.replica_column(i, k)) in by_id else ""
            per_host[h] = per_host.get(h, 0) + 1
    cols: dict[tuple[int, int], Column] = {(i, k): layout.replica_column(i, k) for i, k in units}
    eid = next_extent_id
    for i, k in sorted(move):
        taken = {by_id[e.drive_id].domain(domain_key) for j in range(layout.replicas) if j != k
                 for e in cols[(i, j)].extents if e.drive_id in by_id}
        col_len = cols[(i, k)].length
        under = [d for d in usable if count[d.drive_id] < quota[d.drive_id]]
        got = _choose(work, under, 1, col_len, seed + 31 * i + k, set(), per_host, count, domain_key=domain_key,
                      forbidden=[taken])
        if not got:
            got = _choose(work, usable, 1, col_len, seed + 31 * i + k, set(), per_host, count,
                          domain_key=domain_key, forbidden=[taken])
        if not got:
            raise CapacityError(
                f"cannot move replica {k} of column {i} of {layout.name!r} ({_align_up(col_len)} bytes): no usable "
                f"drive with room outside the failure domains of its other replicas ({', '.join(sorted(taken))})"
            )
        did, ranges = got[0]
        count[did] += 1
        per_host[by_id[did].host] = per_host.get(by_id[did].host, 0) + 1
        cols[(i, k)], eid = _column_at(did, ranges, eid)
    columns = tuple(cols[(i, 0)] for i in range(layout.width))
    mirrors = tuple(tuple(cols[(i, k)] for i in range(layout.width)) for k in range(1, layout.replicas))
    return (columns, mirrors), eid


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
    return [DriveSpace(d.drive_id, d.host, d.capacity, d.data_offset, tuple(by[d.drive_id]), d.usable, d.rack,
                       d.labels) for d in drives]
