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

Nothing here does I/O; everything is deterministic and property-tested.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from nvpool.proto.errors import UsageError

MiB = 1024 * 1024
#: Extents start and end on this boundary on every drive (O_DIRECT friendly, limits fragmentation).
ALLOC_ALIGN = MiB
DEFAULT_STRIPE_UNIT = MiB


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

    @property
    def width(self) -> int:
        return len(self.columns)

    def extents(self) -> Iterator[Extent]:
        for c in self.columns:
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
        for i, c in enumerate(self.columns):
            if c.length < need:
                raise UsageError(f"column {i} holds {c.length} bytes, needs {need}")
            for e in c.extents:
                if e.length <= 0 or e.drive_offset < 0:
                    raise UsageError(f"extent {e.extent_id} has an invalid range")
        ids = [e.extent_id for c in self.columns for e in c.extents]
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
        """Split ``[offset, offset+length)`` into pieces, each inside one stripe unit of one extent."""
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
            yield Piece(col, ext, ext_off, n, buf)
            pos += n
            buf += n

    def single_piece(self, offset: int, length: int, write: bool) -> Optional[Piece]:
        """The one piece ``[offset, offset+length)`` maps to, when it does (non-empty, inside the volume,
        one stripe unit, one extent; for a write, no migration target to write as well), else None.
        The eligibility check of every small-I/O fast path (sync API, asyncio, the NBD export)."""
        if length <= 0 or offset < 0 or offset + length > self.size:
            return None
        if offset % self.stripe_unit + length > self.stripe_unit or (write and self.target is not None):
            return None
        p = next(self.map(offset, length))
        return p if p.length == length else None

    def with_target(self, target: Optional["Layout"], generation: int) -> "Layout":
        return Layout(self.volume_id, self.name, generation, self.size, self.stripe_unit, self.columns, target)

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
        )
