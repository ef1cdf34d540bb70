"""Volume layouts: immutable, versioned, and the pure math that maps volume bytes onto extents.

A volume of ``size`` bytes is striped RAID-0 style over ``width`` *columns* in units of
``stripe_unit`` bytes: stripe unit ``s = offset // stripe_unit`` lives on column ``s % width`` at
column offset ``(s // width) * stripe_unit + offset % stripe_unit``. A column is a concatenation of
*extents*; each extent is a contiguous byte range on one drive, named by a global ``extent_id`` that is
never reused. (A column has more than one extent after the volume grows, or when a drive's free
space is fragmented.)

Every change of placement produces a new ``Layout`` with a higher ``generation``. Agents refuse
commands that carry a generation below the fence of the extent (``Status.STALE_LAYOUT``), so a
client holding an old layout re-fetches instead of reading or writing the wrong place.

While a volume is being re-spread (``target`` is set) every write goes to the current columns and
then to the target columns, and reads are served from the current columns; see ``pool/migration.py``.

A replicated volume (``replicas`` > 1) keeps every column ``replicas`` times: replica 0 is
``columns[i]``, replica ``k`` is ``mirrors[k-1][i]``, each on another drive (and, by the planner's rule,
another failure domain). Each replica of a column is in one of three states (``states`` lists the ones
that are not ``ok``): ``ok`` (read and written), ``syncing`` (written after the ``ok`` ones, never read:
being resynced or rebuilt), ``out`` (neither: it missed writes). ``map`` names, for every piece, the
extent of each replica (``Piece.copies``) and a preferred ``ok`` replica to read (``Piece.extent``),
chosen by stripe row so that readers of one dataset spread over every copy. See
``pool/replication.py`` for the protocol that keeps replicas identical.

Nothing here does I/O; everything is deterministic and property-tested.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

from nvpool.proto.errors import UsageError

MiB = 1024 * 1024
#: Extents start and end on this boundary on every drive (O_DIRECT friendly, limits fragmentation).
ALLOC_ALIGN = MiB
DEFAULT_STRIPE_UNIT = MiB
#: replica states (see the module docstring)
OK, SYNCING, OUT = "ok", "syncing", "out"
REPLICA_STATES = (OK, SYNCING, OUT)
MAX_REPLICAS = 3


@dataclass(frozen=True, slots=True)
class Extent:
    extent_id: int
    drive_id: str
    drive_offset: int
    length: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.extent_id, "drive": self.drive_id, "off": self.drive_offset, "len": self.length}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Extent":
        return Extent(int(d["id"]), str(d["drive"]), int(d["off"]), int(d["len"]))


@dataclass(frozen=True, slots=True)
class Column:
    extents: tuple[Extent, ...]
    #: cumulative start offsets of the extents within the column (derived)
    starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts, pos = [], 0
        for e in self.extents:
            starts.append(pos)
            pos += e.length
        object.__setattr__(self, "starts", tuple(starts))

    @property
    def length(self) -> int:
        return sum(e.length for e in self.extents)

    def locate(self, col_offset: int) -> tuple[int, int]:
        """(index of the extent holding ``col_offset``, offset inside that extent)."""
        i = bisect.bisect_right(self.starts, col_offset) - 1
        if i < 0 or col_offset - self.starts[i] >= self.extents[i].length:
            raise IndexError(f"column offset {col_offset} beyond column length {self.length}")
        return i, col_offset - self.starts[i]


@dataclass(frozen=True, slots=True)
class Piece:
    """One contiguous part of an I/O: ``length`` bytes at ``extent_offset`` in ``extent``, which are
    bytes ``[buf_offset, buf_offset+length)`` of the caller's buffer."""

    column: int
    extent: Extent
    extent_offset: int
    length: int
    buf_offset: int
    #: replicated layouts: (extent, extent offset) of every replica, by replica index
    copies: tuple[tuple[Extent, int], ...] = ()


def column_length_for(size: int, stripe_unit: int, width: int) -> int:
    """Bytes each column needs so that ``width`` columns hold ``size`` bytes."""
    rows = -(-size // (stripe_unit * width)) if size else 0
    return rows * stripe_unit


@dataclass(frozen=True, slots=True)
class Layout:
    volume_id: int
    name: str
    generation: int
    size: int
    stripe_unit: int
    columns: tuple[Column, ...]
    #: while re-spreading: the layout being filled (writes go to both; reads from ``columns``)
    target: Optional["Layout"] = None
    #: replicas 1.. of every column: ``mirrors[k-1][i]`` is replica ``k`` of column ``i``
    mirrors: tuple[tuple[Column, ...], ...] = ()
    #: (column, replica, state) for every replica whose state is not ``ok``
    states: tuple[tuple[int, int, str], ...] = ()
    _state: dict[tuple[int, int], str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_state", {(i, k): st for i, k, st in self.states})

    @property
    def width(self) -> int:
        return len(self.columns)

    @property
    def replicas(self) -> int:
        return 1 + len(self.mirrors)

    def replica_column(self, column: int, replica: int) -> Column:
        return self.columns[column] if replica == 0 else self.mirrors[replica - 1][column]

    def replica_state(self, column: int, replica: int) -> str:
        return self._state.get((column, replica), OK)

    def readable(self, column: int) -> list[int]:
        """Replicas of ``column`` that may serve reads (state ``ok``)."""
        return [k for k in range(self.replicas) if self._state.get((column, k), OK) == OK]

    def write_set(self, column: int) -> tuple[list[int], list[int]]:
        """(``ok`` replicas, ``syncing`` replicas) of ``column``: a write goes to the first, then the second."""
        ok = [k for k in range(self.replicas) if self._state.get((column, k), OK) == OK]
        return ok, [k for k in range(self.replicas) if self._state.get((column, k), OK) == SYNCING]

    @property
    def degraded(self) -> bool:
        """Some replica is not ``ok``."""
        return bool(self.states)

    def replica_of(self, extent_id: int) -> Optional[tuple[int, int]]:
        """(column, replica) holding ``extent_id`` in the current columns, or None."""
        for k in range(self.replicas):
            for i in range(self.width):
                if any(e.extent_id == extent_id for e in self.replica_column(i, k).extents):
                    return i, k
        return None

    def replica_view(self, replica: int) -> "Layout":
        """Replica ``replica`` of every column as a plain striped layout (for copy plans)."""
        cols = self.columns if replica == 0 else self.mirrors[replica - 1]
        return Layout(self.volume_id, self.name, self.generation, self.size, self.stripe_unit, cols)

    def evolve(self, **changes: Any) -> "Layout":
        """A copy with ``changes`` (dataclass fields), e.g. a new generation or states."""
        return replace(self, **changes)

    def extents(self) -> Iterator[Extent]:
        for c in self.columns:
            yield from c.extents
        for m in self.mirrors:
            for c in m:
                yield from c.extents
        if self.target is not None:
            yield from self.target.extents()

    def drive_ids(self) -> set[str]:
        return {e.drive_id for e in self.extents()}

    def validate(self) -> None:
        """Raise ``UsageError`` unless the layout is internally consistent."""
        if self.size < 0 or self.stripe_unit <= 0 or self.generation <= 0:
            raise UsageError("layout has a negative size, a zero stripe unit or generation")
        if not self.columns:
            raise UsageError("layout has no columns")
        need = column_length_for(self.size, self.stripe_unit, self.width)
        if self.replicas > MAX_REPLICAS:
            raise UsageError(f"layout has {self.replicas} replicas; at most {MAX_REPLICAS}")
        for m in self.mirrors:
            if len(m) != self.width:
                raise UsageError("every replica must have as many columns as the layout")
        for i in range(self.width):
            drives: set[str] = set()
            for k in range(self.replicas):
                c = self.replica_column(i, k)
                if c.length < need:
                    raise UsageError(f"column {i} replica {k} holds {c.length} bytes, needs {need}")
                mine = {e.drive_id for e in c.extents}
                if mine & drives:
                    raise UsageError(f"two replicas of column {i} share drive {sorted(mine & drives)[0]}")
                drives |= mine
                for e in c.extents:
                    if e.length <= 0 or e.drive_offset < 0:
                        raise UsageError(f"extent {e.extent_id} has an invalid range")
        for i, k, st in self.states:
            if not (0 <= i < self.width and 0 <= k < self.replicas) or st not in REPLICA_STATES or st == OK:
                raise UsageError(f"invalid replica state ({i}, {k}, {st!r})")
        if len(self._state) != len(self.states):
            raise UsageError("a replica's state is given twice")
        ids = [e.extent_id for c in self.columns for e in c.extents]
        ids += [e.extent_id for m in self.mirrors for c in m for e in c.extents]
        if len(ids) != len(set(ids)):
            raise UsageError("an extent appears twice in the layout")
        if self.target is not None:
            if self.target.size != self.size or self.target.target is not None:
                raise UsageError("a migration target must have the same size and no target itself")
            self.target.validate()

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise UsageError(f"negative offset or length ({offset}, {length})")
        if offset + length > self.size:
            raise UsageError(
                f"range [{offset}, {offset + length}) is beyond the end of volume {self.name!r} "
                f"({self.size} bytes)"
            )

    def map(self, offset: int, length: int) -> Iterator[Piece]:
        """Split ``[offset, offset+length)`` into pieces, each inside one stripe unit of one extent
        (of every replica, for a replicated layout)."""
        self.check_range(offset, length)
        su, width = self.stripe_unit, self.width
        pos, end, buf = offset, offset + length, 0
        while pos < end:
            s, within = divmod(pos, su)
            n = min(su - within, end - pos)
            col = s % width
            col_off = (s // width) * su + within
            column = self.columns[col]
            i, ext_off = column.locate(col_off)
            ext = column.extents[i]
            if ext_off + n > ext.length:  # a stripe unit straddles two extents of the column
                n = ext.length - ext_off
            if not self.mirrors:
                yield Piece(col, ext, ext_off, n, buf)
            else:
                copies = [(ext, ext_off)]
                for m in self.mirrors:
                    mc = m[col]
                    j, moff = mc.locate(col_off)
                    mext = mc.extents[j]
                    n = min(n, mext.length - moff)
                    copies.append((mext, moff))
                ok = self.readable(col)
                pick = ok[(s // width) % len(ok)] if ok else 0
                yield Piece(col, copies[pick][0], copies[pick][1], n, buf, tuple(copies))
            pos += n
            buf += n

    def single_piece(self, offset: int, length: int, write: bool) -> Optional[Piece]:
        """The one piece ``[offset, offset+length)`` maps to, when it does (non-empty, inside the volume,
        one stripe unit, one extent; for a write, no migration target and no replicas to write as
        well), else None. The eligibility check of every small-I/O fast path (sync API, asyncio, the
        NBD export); for a replicated layout it names the preferred ``ok`` replica to read."""
        if length <= 0 or offset < 0 or offset + length > self.size:
            return None
        if offset % self.stripe_unit + length > self.stripe_unit:
            return None
        if write and (self.target is not None or self.mirrors):
            return None
        if not self.mirrors:
            # map()'s first step, without the generator (this runs once per small I/O)
            su = self.stripe_unit
            s, within = divmod(offset, su)
            col = s % len(self.columns)
            column = self.columns[col]
            i, ext_off = column.locate((s // len(self.columns)) * su + within)
            ext = column.extents[i]
            if ext_off + length > ext.length:  # the range straddles two extents of the column
                return None
            return Piece(col, ext, ext_off, length, 0)
        p = next(self.map(offset, length))
        if p.length != length or (self.mirrors and not self.readable(p.column)):
            return None
        return p

    def with_target(self, target: Optional["Layout"], generation: int) -> "Layout":
        return replace(self, generation=generation, target=target)

    # --- persistence (JSON-able dicts; the gRPC edge converts to protobuf separately)
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "volume_id": self.volume_id,
            "name": self.name,
            "generation": self.generation,
            "size": self.size,
            "stripe_unit": self.stripe_unit,
            "columns": [[e.to_dict() for e in c.extents] for c in self.columns],
        }
        if self.target is not None:
            d["target"] = self.target.to_dict()
        if self.mirrors:
            d["mirrors"] = [[[e.to_dict() for e in c.extents] for c in m] for m in self.mirrors]
        if self.states:
            d["states"] = [list(t) for t in self.states]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Layout":
        target = Layout.from_dict(d["target"]) if d.get("target") else None
        return Layout(
            int(d["volume_id"]),
            str(d["name"]),
            int(d["generation"]),
            int(d["size"]),
            int(d["stripe_unit"]),
            tuple(Column(tuple(Extent.from_dict(e) for e in c)) for c in d["columns"]),
            target,
            tuple(tuple(Column(tuple(Extent.from_dict(e) for e in c)) for c in m) for m in d.get("mirrors", ())),
            tuple((int(i), int(k), str(st)) for i, k, st in d.get("states", ())),
        )
