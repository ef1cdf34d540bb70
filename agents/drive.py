"""Drives: a block device or a file, carrying its own identity and extent table.

Contract of a ``Drive`` (the agent's only way to touch storage):

* ``readinto(buf, offset)`` / ``write(data, offset)`` move bytes at absolute drive offsets with
  ``preadv``/``pwritev`` through the page cache (no O_DIRECT: client buffers arrive at any alignment,
  and reads are served from the cache); ``flush()`` makes writes durable (fdatasync).
* ``fd`` is also the descriptor the compiled command loop (``agents/_cserve.c``) reads and writes.
* ``zero(offset, length)`` makes a range read as zeros (hole punch / BLKZEROOUT).
* ``reserve(offset, length)`` zeroes a newly assigned extent and makes it own its space (a sparse
  file drive then cannot hit ENOSPC in the middle of a client's write); ``release(offset, length)``
  gives a released extent's space back (hole punch on file drives).
* Errors surface as ``DriveError`` carrying the drive and the OS errno, and are counted. Only errors
  that say the device itself is broken (EIO, ENXIO, ENODEV, EROFS, ...) mark the drive failed (and
  so every extent on it unavailable); a full file system, a quota or a bad request fails that
  request only, and the drive stays in service for everything else.
* Slow work (zeroing, reserving, punching, table saves) runs on the drive's own worker thread
  (``worker``), so one slow drive never stalls the agent's event loop (Swift's per-disk thread pool).

On-disk format (the first ``LABEL_AREA`` bytes; extents start at ``DATA_OFFSET``)::

    0       4 KiB  label: b"NVPOOLDRV1\\n" + JSON {drive_id, created, size, pool_id} , zero padded
    64 KiB  slot A  extent table: header <8s magic, Q seq, I length, I crc32c> + JSON list
    576 KiB slot B  extent table (the two slots alternate; the valid one with the highest seq wins)
    2 MiB   data area: extents, at drive offsets the metadata service chooses, up to ``data_end``
    sums    the sums area (label key ``sums``, MiB aligned, to the end of the drive): a checksum of
            every 4 KiB of the data area as last written (``agents/checksums.py``)

Drives labelled before sums existed have no ``sums`` key: their data area runs to the end, and the
scrub can compare their copies but not say which one a drive corrupted.

So an agent restarted on the same drives, or a drive moved to another server, is recognised with its
extents and their generation fences, before the metadata service is even reachable. ``pool_id`` is
written at the agent's first registration: a drive of one pool is never adopted by another pool's
metadata service. An open drive is locked (``flock``), so two agents never serve the same drive.
"""

from __future__ import annotations

import errno
import fcntl
from concurrent.futures import ThreadPoolExecutor
import json
import logging
import mmap
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from nvpool.agents import checksums, osio
from nvpool.agents.checksums import SUM_BLOCK, SumsArea
from nvpool.proto.compiled import load as load_compiled
from nvpool.proto.records import ExtentRecord
from nvpool.proto.dataplane import crc32c
from nvpool.proto.errors import DriveError, UsageError
from nvpool.proto.units import parse_size

logger = logging.getLogger(__name__)

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
LABEL_MAGIC = b"NVPOOLDRV1\n"
TABLE_MAGIC = b"NVEXTTB1"
TABLE_HDR = struct.Struct("<8sQII")
LABEL_SIZE = 4 * KiB
SLOT_OFFSETS = (64 * KiB, 576 * KiB)
SLOT_SIZE = 512 * KiB
LABEL_AREA = DATA_OFFSET = 2 * MiB  # keep extents 1 MiB aligned, with room to spare
MIN_DRIVE_SIZE = DATA_OFFSET + 8 * MiB

Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class DriveSpec:
    """Where a drive is: ``file:PATH:SIZE`` (created sparse if missing), ``/dev/...``, or ``PATH``."""

    path: str
    create_size: int = 0  # for file: drives, the size to create when missing

    @staticmethod
    def parse(text: str) -> "DriveSpec":
        if text.startswith("file:"):
            rest = text[5:]
            path, sep, size = rest.rpartition(":")
            if not sep or not path:
                raise UsageError(f"drive {text!r}: expected file:PATH:SIZE (e.g. file:/data/d0.img:8G)")
            return DriveSpec(path, parse_size(size))
        if not text:
            raise UsageError("empty drive path")
        return DriveSpec(text)


def _read_table(fd: int, path: str) -> tuple[int, list[ExtentRecord]]:
    """(sequence, records) of the newest valid extent-table slot (a torn slot is skipped)."""
    best: tuple[int, list[ExtentRecord]] = (0, [])
    for off in SLOT_OFFSETS:
        magic, seq, length, crc = TABLE_HDR.unpack(os.pread(fd, TABLE_HDR.size, off))
        if magic != TABLE_MAGIC or length > SLOT_SIZE - TABLE_HDR.size:
            continue
        body = os.pread(fd, length, off + TABLE_HDR.size)
        if crc32c(body) != crc:
            logger.warning("drive %s: extent table slot at %d is torn; using the other", path, off)
            continue
        if seq > best[0]:
            best = (seq, [ExtentRecord(**r) for r in json.loads(body)])
    return best


class Drive:
    def __init__(self, path: str, fd: int, drive_id: str, size: int,
                 label: Optional[dict[str, object]] = None) -> None:
        self.label: dict[str, object] = dict(label or {"drive_id": drive_id, "size": size})
        self.pool_id = str(self.label.get("pool_id") or "")
        self.path = path
        self.fd = fd
        self.drive_id = drive_id
        self.size = size
        self.failed: Optional[str] = None
        #: I/O errors seen (each failed request counts), and the last one, for `pool status`
        self.errors = 0
        self.last_error = ""
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"drive-{drive_id[:8]}")
        #: where the sums area starts (0: a drive labelled before sums existed); the compiled command
        #: loop reads it (agents/_cserve.c)
        raw = self.label.get("sums", 0)
        self.sums_at = raw if (isinstance(raw, int) and DATA_OFFSET < raw <= size
                               and size - raw >= checksums.sums_bytes(raw - DATA_OFFSET)) else 0
        self.sums = SumsArea(fd, self.sums_at, DATA_OFFSET) if self.sums_at else None
        #: a second descriptor (O_DIRECT where the drive allows it) for scrub reads, opened on first use
        self._scrub_fd = -1
        self._table_seq = 0
        self._table_lock = threading.Lock()

    # ------------------------------------------------------------------ open / label
    @classmethod
    def open(cls, spec: DriveSpec) -> "Drive":
        """Open (creating a ``file:`` drive if needed) and read or write its label."""
        path = spec.path
        created = False
        if spec.create_size and not os.path.exists(path):
            if spec.create_size < MIN_DRIVE_SIZE:
                raise UsageError(f"drive {path}: size {spec.create_size} is below the minimum {MIN_DRIVE_SIZE}")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, spec.create_size)  # sparse
            os.close(fd)
            created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(
                f"drive {path!r} does not exist (use file:PATH:SIZE to create a file-backed drive)"
            ) from None
        except OSError as exc:
            raise UsageError(f"drive {path!r} cannot be opened: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"drive {path!r} is in use by another nvpool agent on this server") from None
        try:
            size = osio.device_size(fd)
            if size < MIN_DRIVE_SIZE:
                raise UsageError(f"drive {path}: {size} bytes is too small (minimum {MIN_DRIVE_SIZE})")
            label = os.pread(fd, LABEL_SIZE, 0)
            if label.startswith(LABEL_MAGIC):
                meta = json.loads(label[len(LABEL_MAGIC) :].rstrip(b"\0"))
                drive_id = str(meta["drive_id"])
            elif label.strip(b"\0") == b"" or created:
                drive_id = str(uuid.uuid4())
                meta = {"drive_id": drive_id, "created": time.time(), "size": size, "sums": sums_offset(size)}
                osio.zero_range(fd, meta["sums"], size - meta["sums"])  # no stale sums from a previous life
                body = LABEL_MAGIC + json.dumps(meta).encode()
                os.pwrite(fd, body.ljust(LABEL_SIZE, b"\0"), 0)
                for off in SLOT_OFFSETS:  # no stale tables from a previous life
                    os.pwrite(fd, bytes(TABLE_HDR.size), off)
                os.fsync(fd)
                logger.info("labelled new drive %s as %s", path, drive_id)
            else:
                raise UsageError(
                    f"drive {path!r} holds data but no nvpool label; refusing to overwrite it "
                    "(wipe its first 4 KiB to hand it to nvpool)"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, drive_id, size, meta)

    def set_pool(self, pool_id: str) -> None:
        """Write the pool id into the label (first registration); durable before it returns."""
        label = {**self.label, "pool_id": pool_id}
        body = LABEL_MAGIC + json.dumps(label).encode()
        if len(body) > LABEL_SIZE:
            raise DriveError(self.drive_id, errno.EINVAL, "label too large")
        try:
            os.pwrite(self.fd, body.ljust(LABEL_SIZE, b"\0"), 0)
            os.fdatasync(self.fd)
        except OSError as exc:
            raise self._fail(exc) from None
        self.label, self.pool_id = label, pool_id

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        for fd in (self.fd, self._scrub_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    @property
    def data_end(self) -> int:
        """Where the data area ends (the sums area, or the end of the drive)."""
        return self.sums_at or self.size

    @property
    def capacity(self) -> int:
        """Bytes usable for extents (1 MiB aligned)."""
        return (self.data_end - DATA_OFFSET) // MiB * MiB

    # ------------------------------------------------------------------ extent table
    @staticmethod
    def inspect(path: str) -> tuple[dict[str, object], list[ExtentRecord]]:
        """(label, extent table) of a drive, read without opening it for service (no lock; for
        operators and tests while its agent runs)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            label = os.pread(fd, LABEL_SIZE, 0)
            if not label.startswith(LABEL_MAGIC):
                raise UsageError(f"{path} carries no nvpool label")
            meta = json.loads(label[len(LABEL_MAGIC):].rstrip(b"\0"))
            return meta, _read_table(fd, path)[1]
        finally:
            os.close(fd)

    def load_extents(self) -> list[ExtentRecord]:
        self._table_seq, records = _read_table(self.fd, self.path)
        return records

    def save_extents(self, records: Iterable[ExtentRecord]) -> None:
        """Atomically replace the on-disk extent table (alternating slots, fsync)."""
        body = json.dumps(
            [
                {
                    "extent_id": r.extent_id, "drive_id": r.drive_id, "drive_offset": r.drive_offset,
                    "length": r.length, "volume_id": r.volume_id, "min_generation": r.min_generation,
                    **({"replicas": r.replicas} if r.replicas != 1 else {}),
                }
                for r in records
                if r.drive_id == self.drive_id
            ],
            separators=(",", ":"),
        ).encode()
        if len(body) > SLOT_SIZE - TABLE_HDR.size:
            raise DriveError(self.drive_id, errno.ENOSPC, "extent table is full")
        with self._table_lock:
            self._table_seq += 1
            off = SLOT_OFFSETS[self._table_seq % 2]
            try:
                os.pwrite(self.fd, TABLE_HDR.pack(TABLE_MAGIC, self._table_seq, len(body), crc32c(body)) + body, off)
                os.fdatasync(self.fd)
            except OSError as exc:
                raise self._fail(exc) from None

    # ------------------------------------------------------------------ I/O
    #: errno values that mean the device is broken, not that one request could not be served
    FATAL_ERRNOS = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.EROFS, errno.EBADF, errno.EUCLEAN})

    def _fail(self, exc: OSError) -> DriveError:
        code = exc.errno or errno.EIO
        msg = exc.strerror or str(exc)
        self.errors += 1
        self.last_error = msg
        if code in self.FATAL_ERRNOS:
            if not self.failed:
                logger.error("drive %s (%s) failed: %s", self.drive_id, self.path, msg)
            self.failed = msg
        else:
            logger.warning("drive %s (%s): request failed: %s (drive stays in service)", self.drive_id, self.path, msg)
        return DriveError(self.drive_id, code, msg)

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset`` (short reads past EOF are errors)."""
        try:
            n = os.preadv(self.fd, [buf], offset)
            while n < len(buf):
                got = os.preadv(self.fd, [buf[n:]], offset + n)
                if got == 0:
                    raise OSError(errno.EIO, "short read")
                n += got
        except OSError as exc:
            raise self._fail(exc) from None

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` as a new bytes object (no zero-fill, one copy)."""
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) < length:
                raise OSError(errno.EIO, "short read")
            return data
        except OSError as exc:
            raise self._fail(exc) from None

    def write(self, data: Buffer, offset: int) -> None:
        try:
            view = memoryview(data)
            n = os.pwritev(self.fd, [view], offset)
            while n < len(view):
                n += os.pwritev(self.fd, [view[n:]], offset + n)
        except OSError as exc:
            raise self._fail(exc) from None

    def reserve(self, offset: int, length: int) -> None:
        """Zero a new extent's range and allocate its space (ENOSPC: a clean refusal)."""
        try:
            osio.reserve_zeroed(self.fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                osio.punch(self.fd, offset, length)  # give back whatever was allocated
                raise DriveError(self.drive_id, exc.errno, f"no space left to reserve {length} bytes "
                                 f"(the file system under {self.path} is full)") from None
            raise self._fail(exc) from None

    def release(self, offset: int, length: int) -> None:
        try:
            osio.punch(self.fd, offset, length)
        except OSError as exc:
            raise self._fail(exc) from None

    def zero(self, offset: int, length: int) -> None:
        try:
            osio.zero_range(self.fd, offset, length)
        except OSError as exc:
            raise self._fail(exc) from None

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise self._fail(exc) from None

    # ------------------------------------------------------------------ sums (agents/checksums.py)
    def sealed_write(self, data: Buffer, offset: int) -> None:
        """``write`` and the sums of the blocks it touches, together (see ``agents/checksums.py``)."""
        if self.sums is None:
            return self.write(data, offset)
        try:
            view = memoryview(data)
            if _cserve is not None:  # one GIL hold for the data and its sums
                _cserve.sealed_pwrite(self.fd, self.sums_at, offset, view)
                return
            partial = self.sums.before(offset, len(view))
            n = os.pwritev(self.fd, [view], offset)
            while n < len(view):
                n += os.pwritev(self.fd, [view[n:]], offset + n)
            self.sums.after(offset, len(view), view, partial)
        except OSError as exc:
            raise self._fail(exc) from None

    def sealed_zero(self, offset: int, length: int) -> None:
        """``zero`` and the sums of the blocks it touches."""
        if self.sums is None:
            return self.zero(offset, length)
        try:
            partial = self.sums.before(offset, length)
            osio.zero_range(self.fd, offset, length)
            self.sums.after(offset, length, None, partial)
        except OSError as exc:
            raise self._fail(exc) from None

    def clear_sums(self, offset: int, length: int) -> None:
        """Forget the sums of ``[offset, offset+length)`` (a newly assigned extent, or one whose replica
        count changed)."""
        if self.sums is None:
            return
        try:
            self.sums.clear(offset, length)
        except OSError as exc:
            raise self._fail(exc) from None

    def scrub_read(self, offset: int, length: int, sums: bool) -> tuple[bytes, bytes]:
        """(the blocks' sums as the drive returns them now, their stored sums or b"") for a block-aligned
        range, read from the drive itself where it allows O_DIRECT (not from the page cache, which
        would hide what the media lost). Runs on the drive's worker thread."""
        if (offset % SUM_BLOCK or length % SUM_BLOCK or length <= 0 or length > checksums.SCRUB_MAX
                or offset + length > self.data_end):
            raise DriveError(self.drive_id, errno.EINVAL, f"scrub range [{offset}, {offset + length}) is not "
                             "block aligned inside the data area")
        try:
            if self._scrub_fd < 0:  # the same file as ``fd`` even if its path now names another
                same = f"/proc/self/fd/{self.fd}"
                try:
                    self._scrub_fd = os.open(same, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
                except OSError:  # a file system without O_DIRECT (tmpfs)
                    self._scrub_fd = os.open(same, os.O_RDONLY | os.O_CLOEXEC)
            buf = mmap.mmap(-1, -(-length // SUM_BLOCK) * SUM_BLOCK)  # page aligned, as O_DIRECT needs
            try:
                with memoryview(buf) as view:
                    try:
                        n = os.preadv(self._scrub_fd, [view], offset)
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        n = os.preadv(self.fd, [view], offset)
                    while 0 < n < length:
                        with view[n:length] as rest:
                            got = os.preadv(self.fd, [rest], offset + n)
                        if got == 0:
                            break
                        n += got
                    if n < length:
                        raise OSError(errno.EIO, "short read")
                    with view[:length] as part:
                        now = checksums.block_sums(part)
            finally:
                buf.close()
            stored = self.sums.read(offset, length) if sums and self.sums is not None else b""
            return now, stored
        except OSError as exc:
            raise self._fail(exc) from None


def sums_offset(size: int) -> int:
    """Where a new drive of ``size`` bytes puts its sums area: after as much data area as it can cover."""
    data = size - DATA_OFFSET
    return DATA_OFFSET + (data - checksums.sums_bytes(data)) // MiB * MiB


#: the compiled sealed write (agents/_cserve.c); None on the pure-Python path (proto/compiled.py)
_cserve: Any = load_compiled("nvpool.agents._cserve")
