"""The storage agent's core: drives, the extent table with generation fences, and command checks.

No sockets here. Transports (``agents/dataplane.py``) hand each decoded ``Command`` to ``locate`` /
``read`` / ``write`` / ``zero`` / ``flush``; every refusal is a ``RemoteError`` carrying the wire
status, which the transport turns into an error completion. A command is served only if

* its extent is assigned to this agent (else ``NO_EXTENT``: e.g. a deleted volume's stale client),
* its generation is at least the extent's fence (else ``STALE_LAYOUT`` with the fence in ``info``),
* ``offset + length`` lies inside the extent (else ``OUT_OF_RANGE``).

The metadata service changes the table through the control service (assign with zeroing, release,
fence) and through heartbeat answers (release lists and keep-lists; see ``pool/meta.py``, "Extent
release"); every change is written to the drives' own labels before it is acknowledged. Only
``assign`` adds an extent (after zeroing it), and it refuses one that would overlap the bytes of
another extent this agent holds on the same drive: two live extents never share bytes, so a stale
client of one can never write into the other.

Migration copies (``begin_copy`` / ``finish_copy``): while a volume is re-spread, the destination
agent pulls a chunk from the source agent and applies it here. Clients write to the old extent first
and then to the new one, so the only way a copy could lose a write is by overwriting bytes that a
client wrote to the destination *after* the copy started reading its source. Every client write or
zero to an extent with copies in flight is therefore recorded against those copies, and
``finish_copy`` applies the chunk everywhere except those byte ranges. This runs on the agent's one
event loop, so applying a chunk is atomic with respect to client writes.

Replicated extents (``ExtentRecord.replicas`` > 1; see ``pool/replication.py``):

* **Serve lease.** The agent serves them only until ``serve_until``, which each successful
  registration or heartbeat moves to (its send time + the service's ``serve_lease``), *after* the
  answer's fences are applied. The service counts an agent as gone only after ``agent_timeout`` >
  ``serve_lease`` without a heartbeat, and takes a silent agent's replicas out of service only then:
  so an agent cut off from the service has stopped serving them (``BUSY``) before anyone writes
  without it, and when it comes back it learns the new fences before it serves again. A replica
  that missed writes can therefore never answer a reader with old bytes.
* **Dirty tracking.** While a replica of a column is out of service, the agents of the other
  replicas record which grains (``DIRTY_GRAIN`` bytes) of their extents every write or zero touches
  (``track_dirty``); resync copies only those. The record lives in memory: an agent that restarted
  answers ``tracking=False`` and the replica is copied whole. Bytes a replica receives by a resync
  copy (``finish_copy``) are recorded too when it is tracking: a replica that became ``ok`` by copy
  while another is still out then holds, in its record, every write the other one lacks.
* **Block sums** (``agents/checksums.py``): writes, zeroes and copies to a replicated extent also
  store a checksum of every 4 KiB block they touch, beside the data, so a scrub can tell which copy a
  drive corrupted.
* **Write intent** (``agents/intent.py``): every write or zero to a replicated extent marks its grains
  before it is applied, so a writer that dies between two copies leaves a record of what may differ.
  Copied chunks are marked too: a resync, rebuild or migration copy made from a copy a dead writer
  left different carries the difference to the destination, and its record says so.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, TypeVar

from nvpool.agents import osio
from nvpool.agents.checksums import SCRUB_MAX, SUM_BLOCK, mismatches
from nvpool.agents.drive import DATA_OFFSET, Drive
from nvpool.agents.intent import IntentRecords, grain_ranges, mark_grains, new_bitmap
from nvpool.proto.records import ExtentRecord
from nvpool.proto.dataplane import Command
from nvpool.proto.errors import (DriveError, NotFoundError, RemoteError, StaleLayoutError, Status, UnavailableError,
                                 UsageError)

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: granularity of dirty tracking for replica resync
DIRTY_GRAIN = 64 * 1024


#: upper bounds (seconds) of the command-latency histogram buckets (agents/metrics.py)
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass
class Stats:
    """What the agent has done, counted on the I/O path with plain dict increments and read by
    heartbeats and the metrics endpoint (agents/metrics.py)."""

    bytes_read: int = 0
    bytes_written: int = 0
    commands: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: per drive: [bytes read, bytes written, reads, writes]
    drives: dict[str, list[int]] = field(default_factory=dict)
    #: per volume id: [bytes read, bytes written]
    volumes: dict[int, list[int]] = field(default_factory=dict)
    #: per opcode name: bucket counts (LATENCY_BUCKETS, then +Inf), sum of seconds
    latency: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    connections: int = 0
    #: the open data-plane connections (their queued and deferred commands are the in-flight ones)
    live: "weakref.WeakSet[Any]" = field(default_factory=weakref.WeakSet)

    def error(self, status: Status) -> None:
        self.errors[status.name] = self.errors.get(status.name, 0) + 1

    def io(self, rec: ExtentRecord, write: bool, n: int) -> None:
        d = self.drives.get(rec.drive_id)
        if d is None:
            d = self.drives[rec.drive_id] = [0, 0, 0, 0]
        v = self.volumes.get(rec.volume_id)
        if v is None:
            v = self.volumes[rec.volume_id] = [0, 0]
        if write:
            self.bytes_written += n
            d[1] += n
            d[3] += 1
            v[1] += n
        else:
            self.bytes_read += n
            d[0] += n
            d[2] += 1
            v[0] += n

    def observe(self, op: str, seconds: float) -> None:
        h = self.latency.get(op)
        if h is None:
            h = self.latency[op] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        h[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h[1][0] += seconds


@dataclass
class CopyInFlight:
    extent_id: int
    offset: int
    length: int
    #: byte ranges [start, end) inside the copy's range written by clients since it began
    written: list[tuple[int, int]] = field(default_factory=list)


class AgentCore:
    def __init__(self, drives: Iterable[Drive]) -> None:
        self.drives: dict[str, Drive] = {d.drive_id: d for d in drives}
        self.extents: dict[int, ExtentRecord] = {}
        self.stats = Stats()
        self._copies: dict[int, list[CopyInFlight]] = {}
        #: extents being zeroed and reserved by ``assign_async`` (not yet served)
        self._assigning: dict[int, ExtentRecord] = {}
        #: replicated extents are served until this monotonic time (see "Serve lease")
        self.serve_until = 0.0
        #: the pool's join secrets (current first): data-plane commands need a capability signed with
        #: one of them (agents/dataplane.py). Empty only for in-process tests of the core.
        self.secrets: list[bytes] = []
        #: data-plane connections the agent keeps open at once (more are closed as they arrive)
        self.max_connections = 4096
        #: extent id -> bitmap of DIRTY_GRAIN grains written since tracking started
        self._dirty: dict[int, bytearray] = {}
        #: client-chosen data-plane connection id -> that connection's capabilities, and connection ids
        #: a client revoked, per volume (agents/dataplane.py, "Abandoned connections")
        self.connection_caps: dict[int, dict[int, Any]] = {}
        self.revoked: dict[int, set[int]] = {}
        #: write-intent records of replicated extents; ``_intent`` is its current-epoch table, which
        #: the compiled command loop marks (agents/_cserve.c)
        self.intent = IntentRecords()
        self._intent = self.intent.current
        for d in self.drives.values():
            for rec in d.load_extents():
                self.extents[rec.extent_id] = rec

    # ------------------------------------------------------------------ command path
    def locate(self, cmd: Command) -> tuple[Drive, int, ExtentRecord]:
        """(drive, absolute drive offset, extent) for a command, or a RemoteError refusal."""
        rec = self.extents.get(cmd.extent_id)
        if rec is None:
            raise RemoteError(Status.NO_EXTENT, f"extent {cmd.extent_id} is not on this agent")
        if cmd.generation < rec.min_generation:
            raise StaleLayoutError(
                f"extent {cmd.extent_id} requires layout generation {rec.min_generation}, "
                f"command has {cmd.generation}",
                rec.min_generation,
            )
        if rec.replicas > 1 and time.monotonic() > self.serve_until:
            raise RemoteError(
                Status.BUSY, f"extent {cmd.extent_id} is replicated and this agent has lost contact with the "
                "metadata service: another replica serves it")
        if cmd.offset + cmd.length > rec.length:
            raise RemoteError(
                Status.OUT_OF_RANGE,
                f"[{cmd.offset}, {cmd.offset + cmd.length}) is outside extent {cmd.extent_id} "
                f"({rec.length} bytes)",
            )
        drive = self.drives.get(rec.drive_id)
        if drive is None or drive.failed:
            raise RemoteError(Status.IO_ERROR, f"drive {rec.drive_id} is failed or missing")
        return drive, rec.drive_offset + cmd.offset, rec

    def read(self, cmd: Command) -> bytes:
        drive, off, rec = self.locate(cmd)
        data = self._io(drive, lambda: drive.pread(off, cmd.length))
        self.stats.io(rec, False, cmd.length)
        return data

    def readinto(self, cmd: Command, buf: memoryview) -> None:
        drive, off, rec = self.locate(cmd)
        self._io(drive, lambda: drive.readinto(buf, off))
        self.stats.io(rec, False, cmd.length)

    def write(self, cmd: Command, payload: memoryview, fua: bool = False) -> None:
        drive, off, rec = self.locate(cmd)
        if self._copies:
            self._note_write(cmd.extent_id, cmd.offset, cmd.length)
        if self._dirty:
            self._mark_dirty(cmd.extent_id, cmd.offset, cmd.length)
        if rec.replicas > 1:
            self.intent.mark(rec, cmd.offset, cmd.length)
            self._io(drive, lambda: drive.sealed_write(payload, off))
        else:
            self._io(drive, lambda: drive.write(payload, off))
        if fua:
            self._io(drive, drive.flush)
        self.stats.io(rec, True, cmd.length)

    def zero(self, cmd: Command) -> None:
        drive, off, rec = self.locate(cmd)
        if self._copies:
            self._note_write(cmd.extent_id, cmd.offset, cmd.length)
        if self._dirty:
            self._mark_dirty(cmd.extent_id, cmd.offset, cmd.length)
        if rec.replicas > 1:
            self.intent.mark(rec, cmd.offset, cmd.length)
            self._io(drive, lambda: drive.sealed_zero(off, cmd.length))
        else:
            self._io(drive, lambda: drive.zero(off, cmd.length))

    # ------------------------------------------------------------------ dirty tracking (resync)
    def _mark_dirty(self, extent_id: int, offset: int, length: int) -> None:
        bm = self._dirty.get(extent_id)
        if bm is not None:
            mark_grains(bm, offset, length, DIRTY_GRAIN)

    def track_dirty(self, extent_ids: Iterable[int]) -> None:
        """Start recording writes to these extents (idempotent: a running record is kept)."""
        for eid in extent_ids:
            rec = self.extents.get(eid)
            if rec is None:
                raise NotFoundError(f"extent {eid} is not on this agent")
            if eid not in self._dirty:
                self._dirty[eid] = new_bitmap(rec.length, DIRTY_GRAIN)

    def untrack_dirty(self, extent_ids: Iterable[int]) -> None:
        for eid in extent_ids:
            self._dirty.pop(eid, None)

    def dirty_ranges(self, extent_id: int) -> Optional[list[tuple[int, int]]]:
        """Extent byte ranges written since tracking started, merged; None when not tracked."""
        bm = self._dirty.get(extent_id)
        rec = self.extents.get(extent_id)
        if bm is None or rec is None:
            return None
        return grain_ranges(bm, rec.length, DIRTY_GRAIN)

    # ------------------------------------------------------------------ write intent (agents/intent.py)
    def _replicated(self, volume_id: int) -> list[ExtentRecord]:
        return [r for r in self.extents.values() if r.volume_id == volume_id and r.replicas > 1]

    def intent_rotate(self, volume_id: int, epoch: int) -> int:
        return self.intent.rotate(volume_id, epoch, self._replicated(volume_id))

    def intent_settle(self, volume_id: int, epoch: int) -> None:
        self.intent.settle(volume_id, epoch, self._replicated(volume_id))

    def intent_ranges(self, extent_id: int) -> Optional[list[tuple[int, int]]]:
        """Extent byte ranges with writes not known settled; None when the record may be incomplete."""
        rec = self.extents.get(extent_id)
        if rec is None:
            raise NotFoundError(f"extent {extent_id} is not on this agent")
        return self.intent.ranges(rec)

    # ------------------------------------------------------------------ scrub (pool/scrub.py)
    async def scrub(self, extent_id: int, offset: int, length: int) -> tuple[bytes, list[int], bool]:
        """Read ``[offset, offset+length)`` of an extent from its drive (block aligned, at most
        ``SCRUB_MAX``) and return (the sum of each block as read now, the indexes of the blocks whose
        stored sum is recorded and differs, whether the extent keeps sums). Runs on the drive's worker
        thread; a write racing it may show as a difference, which the scrub's second look discards."""
        rec = self.extents.get(extent_id)
        if rec is None:
            raise NotFoundError(f"extent {extent_id} is not on this agent")
        if offset % SUM_BLOCK or length % SUM_BLOCK or length <= 0 or length > SCRUB_MAX or offset + length > rec.length:
            raise UsageError(f"scrub range [{offset}, {offset + length}) of extent {extent_id} must be "
                             f"{SUM_BLOCK}-byte aligned, at most {SCRUB_MAX} bytes and inside the extent")
        drive = self.drives.get(rec.drive_id)
        if drive is None or drive.failed:
            raise UnavailableError(f"drive {rec.drive_id} is failed or missing")
        kept = rec.replicas > 1 and drive.sums is not None
        try:
            now, stored = await self._on_drive(
                rec.drive_id, lambda: drive.scrub_read(rec.drive_offset + offset, length, kept))
        except DriveError as exc:
            raise UnavailableError(f"drive {rec.drive_id}: {exc}") from None
        return now, mismatches(now, stored), kept

    # ------------------------------------------------------------------ migration copies
    def _note_write(self, extent_id: int, offset: int, length: int) -> None:
        for cp in self._copies.get(extent_id, ()):
            start, end = max(offset, cp.offset), min(offset + length, cp.offset + cp.length)
            if start < end:
                cp.written.append((start, end))

    def begin_copy(self, extent_id: int, offset: int, length: int) -> CopyInFlight:
        """Start recording client writes into ``[offset, offset+length)`` of a local extent."""
        rec = self.extents.get(extent_id)
        if rec is None:
            raise NotFoundError(f"extent {extent_id} is not on this agent")
        if offset < 0 or length <= 0 or offset + length > rec.length:
            raise UsageError(f"copy range [{offset}, {offset + length}) is outside extent {extent_id}")
        cp = CopyInFlight(extent_id, offset, length)
        self._copies.setdefault(extent_id, []).append(cp)
        return cp

    def abort_copy(self, cp: CopyInFlight) -> None:
        lst = self._copies.get(cp.extent_id)
        if lst is not None and cp in lst:
            lst.remove(cp)
            if not lst:
                del self._copies[cp.extent_id]

    def finish_copy(self, cp: CopyInFlight, data: memoryview) -> int:
        """Apply a copied chunk, skipping bytes clients wrote meanwhile; returns bytes applied."""
        self.abort_copy(cp)
        rec = self.extents.get(cp.extent_id)
        if rec is None:
            raise NotFoundError(f"extent {cp.extent_id} was released during the copy")
        drive = self.drives[rec.drive_id]
        applied, pos = 0, cp.offset
        for start, end in sorted(cp.written) + [(cp.offset + cp.length, cp.offset + cp.length)]:
            if start > pos:
                if self._dirty:  # a copy is a write this replica's record must show (see "Dirty tracking")
                    self._mark_dirty(cp.extent_id, pos, start - pos)
                chunk = data[pos - cp.offset : start - cp.offset]
                if rec.replicas > 1:  # and its write intent: the source may hold a dead writer's half-done write
                    self.intent.mark(rec, pos, start - pos)
                    drive.sealed_write(chunk, rec.drive_offset + pos)
                else:
                    drive.write(chunk, rec.drive_offset + pos)
                applied += start - pos
            pos = max(pos, end)
        return applied

    def flush_drives(self, cmd: Command) -> list[Drive]:
        """The drives a FLUSH covers (extent_id 0: every working drive), or a RemoteError refusal."""
        if cmd.extent_id == 0:
            return [d for d in self.drives.values() if not d.failed]
        drive, _, _ = self.locate(cmd)
        return [drive]

    def flush(self, cmd: Command) -> None:
        """FLUSH with extent_id 0 flushes every drive; otherwise the extent's drive."""
        if cmd.extent_id == 0:
            for d in self.drives.values():
                if not d.failed:
                    self._io(d, d.flush)
            return
        drive, _, _ = self.locate(cmd)
        self._io(drive, drive.flush)

    async def map_extent(self, extent_id: int, written: bool = False) -> list[tuple[int, int]]:
        """Ranges of an extent (extent offsets) that may hold written data (see ``osio.data_ranges``);
        ``written``: only what was written, for reports (``osio.written_ranges``: it writes back first)."""
        rec = self.extents.get(extent_id)
        if rec is None:
            raise NotFoundError(f"extent {extent_id} is not on this agent")
        drive = self.drives[rec.drive_id]
        probe = osio.written_ranges if written else osio.data_ranges
        ranges = await self._on_drive(rec.drive_id, lambda: probe(drive.fd, rec.drive_offset, rec.length))
        return [(off - rec.drive_offset, n) for off, n in ranges]

    async def flush_all_async(self) -> None:
        """fdatasync every drive, each on its own worker thread (migration cut-over, shutdown)."""
        live = [d for d in self.drives.values() if not d.failed]
        results = await asyncio.gather(*(self._on_drive(d.drive_id, d.flush) for d in live), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res

    @staticmethod
    def _io(drive: Drive, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DriveError as exc:
            raise RemoteError(Status.IO_ERROR, str(exc)) from None

    # ------------------------------------------------------------------ control path
    def _check_assign(self, recs: list[ExtentRecord]) -> list[ExtentRecord]:
        """Validate an assignment; returns the records that are new (re-assigning is idempotent)."""
        busy = list(self.extents.values()) + list(self._assigning.values())
        for r in recs:
            drive = self.drives.get(r.drive_id)
            if drive is None:
                raise NotFoundError(f"drive {r.drive_id} is not attached to this agent")
            if r.drive_offset < DATA_OFFSET or r.drive_offset + r.length > drive.data_end or r.length <= 0:
                raise UsageError(f"extent {r.extent_id} does not fit drive {r.drive_id}")
            if drive.failed:
                raise UsageError(f"drive {r.drive_id} has failed ({drive.failed}); it takes no new extents")
            old = self.extents.get(r.extent_id) or self._assigning.get(r.extent_id)
            if old is not None and (old.drive_id, old.drive_offset, old.length) != (
                r.drive_id, r.drive_offset, r.length,
            ):
                raise UsageError(f"extent {r.extent_id} already exists with another placement")
            for other in busy + [x for x in recs if x is not r]:
                if (other.extent_id != r.extent_id and other.drive_id == r.drive_id
                        and other.drive_offset < r.drive_offset + r.length
                        and r.drive_offset < other.drive_offset + other.length):
                    raise UsageError(
                        f"extent {r.extent_id} would overlap extent {other.extent_id} on drive {r.drive_id} "
                        f"([{r.drive_offset}, {r.drive_offset + r.length}) and "
                        f"[{other.drive_offset}, {other.drive_offset + other.length})); refused"
                    )
        return [r for r in recs if r.extent_id not in self.extents]

    def _prepare(self, r: ExtentRecord, zero: bool) -> None:
        """Zero a new extent and make it own its space, and forget its blocks' sums (runs on the drive's
        worker thread)."""
        drive = self.drives[r.drive_id]
        if zero:
            drive.reserve(r.drive_offset, r.length)
        drive.clear_sums(r.drive_offset, r.length)

    def assign(self, records: Iterable[ExtentRecord], zero: bool) -> None:
        """Add extents (zeroed and reserved first if asked). Re-assigning the same extent is idempotent."""
        recs = list(records)
        for r in self._check_assign(recs):
            self._io(self.drives[r.drive_id], lambda r=r: self._prepare(r, zero))  # type: ignore[misc]
        for r in recs:
            self._adopt(r)
        self._persist({r.drive_id for r in recs})

    async def assign_async(self, records: Iterable[ExtentRecord], zero: bool) -> None:
        """``assign`` with the zeroing and the table saves on the drives' worker threads."""
        recs = list(records)
        new = self._check_assign(recs)
        for r in new:
            self._assigning[r.extent_id] = r  # later assignments see these bytes as taken
        try:
            results = await asyncio.gather(
                *(self._on_drive(r.drive_id, lambda r=r: self._prepare(r, zero)) for r in new),  # type: ignore[misc]
                return_exceptions=True,
            )
            for res in results:
                if isinstance(res, BaseException):
                    for r in new:  # give back what was reserved
                        try:
                            await self._on_drive(r.drive_id, lambda r=r: self.drives[r.drive_id].release(  # type: ignore[misc]
                                r.drive_offset, r.length))
                        except DriveError:
                            pass
                    if isinstance(res, DriveError):
                        raise UsageError(str(res)) from None
                    raise res
        finally:
            for r in new:
                self._assigning.pop(r.extent_id, None)
        for r in recs:
            self._adopt(r)
        await self.persist_async({r.drive_id for r in recs})

    def _adopt(self, r: ExtentRecord) -> None:
        """Put an assigned extent in the table (an existing one re-assigned with another replica count
        forgets its sums: those of a plain extent are not kept up)."""
        old = self.extents.get(r.extent_id)
        if old is not None and (old.replicas > 1) != (r.replicas > 1):
            self._forget_sums(r)
        self.extents[r.extent_id] = r

    def _forget_sums(self, r: ExtentRecord) -> None:
        try:
            self.drives[r.drive_id].clear_sums(r.drive_offset, r.length)
        except DriveError as exc:
            logger.warning("extent %d: forgetting its block sums: %s", r.extent_id, exc)

    async def _on_drive(self, drive_id: str, fn: Callable[[], T]) -> T:
        drive = self.drives[drive_id]
        return await asyncio.get_running_loop().run_in_executor(drive.worker, fn)

    async def persist_async(self, drive_ids: Iterable[str]) -> None:
        """Save the tables of ``drive_ids`` on their worker threads (snapshots taken here, on the loop)."""
        jobs = []
        for did in set(drive_ids):
            d = self.drives[did]
            snap = [r for r in self.extents.values() if r.drive_id == did]
            jobs.append(self._on_drive(did, lambda d=d, snap=snap: d.save_extents(snap)))  # type: ignore[misc]
        await asyncio.gather(*jobs)

    def release(self, extent_ids: Iterable[int]) -> None:
        touched = set()
        for eid in extent_ids:
            rec = self.extents.pop(eid, None)
            if rec is not None:
                touched.add(rec.drive_id)
        self._persist(touched)

    async def release_async(self, extent_ids: Iterable[int]) -> list[ExtentRecord]:
        """Drop extents (persisted before this returns), then give their space back to the file system."""
        gone = [rec for eid in extent_ids if (rec := self.extents.pop(eid, None)) is not None]
        self.untrack_dirty(r.extent_id for r in gone)
        self.intent.drop([r.extent_id for r in gone])
        if gone:
            await self.persist_async({r.drive_id for r in gone})
            await self.punch_async(gone)
        return gone

    async def punch_async(self, records: Iterable[ExtentRecord]) -> None:
        """Give dropped extents' space back, never touching bytes a held extent still covers."""
        for r in records:
            live = list(self.extents.values()) + list(self._assigning.values())
            if any(o.drive_id == r.drive_id and o.drive_offset < r.drive_offset + r.length
                   and r.drive_offset < o.drive_offset + o.length for o in live):
                continue
            try:
                await self._on_drive(r.drive_id, lambda r=r: self.drives[r.drive_id].release(  # type: ignore[misc]
                    r.drive_offset, r.length))
            except DriveError as exc:
                logger.warning("giving back the space of extent %d: %s", r.extent_id, exc)

    def fence(self, volume_id: int, min_generation: int) -> int:
        """Raise the fence of every extent of ``volume_id``; returns how many extents it covers."""
        touched, n = set(), 0
        for eid, rec in list(self.extents.items()):
            if rec.volume_id == volume_id:
                n += 1
                if rec.min_generation < min_generation:
                    self.extents[eid] = replace(rec, min_generation=min_generation)
                    touched.add(rec.drive_id)
        self._persist(touched)
        return n

    def keep_only(self, records: Iterable[ExtentRecord]) -> list[int]:
        """Reconcile with the metadata service's keep-list: drop every held extent not in it and raise
        fences to the list's. Never adds an extent (only ``assign`` does, after zeroing); never lowers a
        fence. Returns the ids dropped."""
        keep = {r.extent_id: r for r in records if r.drive_id in self.drives}
        dropped = [e for e in self.extents if e not in keep]
        changed = set()
        for eid in dropped:
            changed.add(self.extents.pop(eid).drive_id)
        for eid, rec in list(self.extents.items()):
            want = keep[eid]
            if (want.drive_id, want.drive_offset, want.length) != (rec.drive_id, rec.drive_offset, rec.length):
                logger.error("extent %d: the metadata service places it elsewhere; dropping it", eid)
                changed.add(self.extents.pop(eid).drive_id)
                dropped.append(eid)
            elif want.min_generation > rec.min_generation or want.replicas != rec.replicas:
                if (want.replicas > 1) != (rec.replicas > 1):
                    self._forget_sums(rec)
                self.extents[eid] = replace(rec, min_generation=max(rec.min_generation, want.min_generation),
                                            replicas=want.replicas)
                changed.add(rec.drive_id)
        self.untrack_dirty(dropped)
        self.intent.drop(dropped)
        if dropped:
            logger.info("dropped %d extents the metadata service no longer assigns here: %s", len(dropped),
                        sorted(dropped)[:10])
        self._persist(changed)
        return dropped

    def held_ids(self) -> list[int]:
        return list(self.extents)

    def _persist(self, drive_ids: Iterable[str]) -> None:
        for did in drive_ids:
            d = self.drives[did]
            d.save_extents(r for r in self.extents.values() if r.drive_id == did)

    def extent(self, extent_id: int) -> Optional[ExtentRecord]:
        return self.extents.get(extent_id)

    def close(self) -> None:
        for d in self.drives.values():
            d.close()
