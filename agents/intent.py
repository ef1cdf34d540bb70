"""Write-intent records of replicated extents: which grains a writer may have left different on its copies.

The anchor is md's write-intent bitmap and DRBD's activity log: a region is marked before a write to it
is applied, and the mark is cleared lazily once every copy is known to hold the write. A replicated
volume's writer fans each write out to every copy itself (``pool/replication.py``); if it dies between
two copies, nothing but this record says which grains may now differ.

Here an agent marks, in memory, the ``INTENT_GRAIN`` grains of every write or zero to a replicated
extent *before* the bytes are applied (the Python path in ``AgentCore.write``/``zero``, the compiled
path in ``agents/_cserve.c`` ``locate``, under the same GIL hold as the command's checks and I/O). Marks
go into the extent's *current* bitmap, which belongs to the volume's current **epoch**. Clearing is
driven by the writer through the metadata service (the argument is in ``pool/replication.py``, "Write
intent"):

* ``rotate(volume, E)`` (E above the current epoch): every current bitmap of the volume is *closed*,
  labelled ``E``, and a fresh one starts. Every write in a bitmap labelled ``E`` arrived here before
  this agent acknowledged the rotation to ``E``.
* ``settle(volume, E)``: the writer has confirmed that every write it started before it learned ``E``
  is on every copy; the service announces ``E`` to a writer only after every agent of the volume
  acknowledged the rotation to ``E``, so every write in a bitmap closed at ``E`` or earlier is settled,
  and those bitmaps are dropped. The current bitmap is never dropped.
* ``ranges(extent)``: the union of the current and the closed bitmaps: every grain this agent applied
  a write to that is not yet known settled.

The record lives in memory, so a restarted agent has lost the marks of writes it applied before it
restarted. It says so: ``complete(volume)`` is true only once an epoch this process rotated to has been
settled (every write the agent may have forgotten was then confirmed on every copy); until then the
service resyncs the columns it holds whole instead of trusting the record. Persisting each new mark
before its write (md's way) would cost a synchronous write per newly touched grain on the I/O path;
this costs a whole-column resync only when an agent restart and a writer crash fall within one epoch.
"""

from __future__ import annotations

from typing import Optional

from nvpool.proto.records import ExtentRecord

#: granularity of write-intent marks (and of their resync)
INTENT_GRAIN = 64 * 1024


def new_bitmap(length: int, grain: int) -> bytearray:
    """A zeroed bitmap with one bit per ``grain`` bytes of an extent of ``length`` bytes."""
    return bytearray(-(-length // grain) // 8 + 1)


def mark_grains(bm: bytearray, offset: int, length: int, grain: int) -> None:
    """Set the bits of every grain ``[offset, offset+length)`` touches."""
    if length <= 0:
        return
    for g in range(offset // grain, (offset + length - 1) // grain + 1):
        bm[g >> 3] |= 1 << (g & 7)


def grain_ranges(bm: bytes | bytearray, length: int, grain: int) -> list[tuple[int, int]]:
    """The byte ranges of the set grains of an extent of ``length`` bytes, merged and in order."""
    out: list[tuple[int, int]] = []
    grains = -(-length // grain)
    for i, byte in enumerate(bm):
        if not byte:
            continue
        for b in range(8):
            g = i * 8 + b
            if byte >> b & 1 and g < grains:
                start = g * grain
                n = min(grain, length - start)
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((start, n))
    return out


class IntentRecords:
    """The write-intent record of every replicated extent an agent holds (see the module docstring)."""

    def __init__(self) -> None:
        #: extent id -> bitmap of the current epoch; the compiled command loop marks these in place and
        #: hands a write to Python when its extent has none yet. Never replaced: one dict for life.
        self.current: dict[int, bytearray] = {}
        #: extent id -> [(epoch that closed it, bitmap)]
        self.closed: dict[int, list[tuple[int, bytearray]]] = {}
        #: volume id -> current epoch (0 until the first rotation of this process)
        self.epoch: dict[int, int] = {}
        #: volume id -> the first epoch this process rotated to (its record is complete once settled)
        self.first: dict[int, int] = {}
        #: volume id -> highest settled epoch
        self.settled: dict[int, int] = {}

    def mark(self, rec: ExtentRecord, offset: int, length: int) -> None:
        bm = self.current.get(rec.extent_id)
        if bm is None:
            bm = self.current[rec.extent_id] = new_bitmap(rec.length, INTENT_GRAIN)
        mark_grains(bm, offset, length, INTENT_GRAIN)

    def rotate(self, volume_id: int, epoch: int, recs: list[ExtentRecord]) -> int:
        """Close the current bitmaps of ``recs`` (the volume's extents here) at ``epoch`` and start new
        ones, unless the volume is already at ``epoch`` or later (idempotent). Returns the current epoch."""
        if epoch <= self.epoch.get(volume_id, 0):
            return self.epoch.get(volume_id, 0)
        for rec in recs:
            bm = self.current.get(rec.extent_id)
            if bm is not None and any(bm):
                self.closed.setdefault(rec.extent_id, []).append((epoch, bm))
            self.current[rec.extent_id] = new_bitmap(rec.length, INTENT_GRAIN)
        self.epoch[volume_id] = epoch
        self.first.setdefault(volume_id, epoch)
        return epoch

    def settle(self, volume_id: int, epoch: int, recs: list[ExtentRecord]) -> None:
        """Drop the bitmaps of ``recs`` closed at ``epoch`` or earlier (their writes are on every copy)."""
        self.settled[volume_id] = max(self.settled.get(volume_id, 0), epoch)
        for rec in recs:
            kept = [(e, bm) for e, bm in self.closed.get(rec.extent_id, ()) if e > epoch]
            if kept:
                self.closed[rec.extent_id] = kept
            else:
                self.closed.pop(rec.extent_id, None)

    def complete(self, volume_id: int) -> bool:
        """Whether the record holds every unsettled write this agent applied (see the module docstring)."""
        first = self.first.get(volume_id)
        return first is not None and first <= self.settled.get(volume_id, 0)

    def ranges(self, rec: ExtentRecord) -> Optional[list[tuple[int, int]]]:
        """Extent byte ranges with writes not known settled, merged (None: the record is incomplete)."""
        if not self.complete(rec.volume_id):
            return None
        acc = bytearray(self.current.get(rec.extent_id) or new_bitmap(rec.length, INTENT_GRAIN))
        for _, bm in self.closed.get(rec.extent_id, ()):
            for i, b in enumerate(bm):
                acc[i] |= b
        return grain_ranges(acc, rec.length, INTENT_GRAIN)

    def drop(self, extent_ids: list[int]) -> None:
        """Forget released extents."""
        for eid in extent_ids:
            self.current.pop(eid, None)
            self.closed.pop(eid, None)
