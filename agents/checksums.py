"""Block checksums of replicated extents: what a drive was told to hold, to check what it returns.

ZFS keeps a checksum of every block it writes and Ceph's BlueStore a crc32c of every 4 KiB; a scrub
(``pool/scrub.py``) reads each copy on its own agent and compares. With two copies, comparing them
says *that* they differ, not *which* is right: a byte flipped on one drive's media reads back as a
well-formed block. So every drive labelled by this version keeps a **sums area** (``agents/drive.py``,
on-disk format): 4 bytes, little-endian, per ``SUM_BLOCK`` bytes of its data area, holding
``seal(crc32c(block))`` as the block was last written through this agent. ``0`` means "no sum
recorded": a block never written since its extent was assigned, or written while its extent was not
replicated (only replicated extents pay for sums; ``seal`` maps a crc of 0 to ``0xFFFFFFFF`` so a real
sum is never 0).

Keeping sums true (the *sealed write*, here and in ``agents/_cserve.c`` ``sealed_pwrite``, which the
compiled-vs-Python differential tests hold to the same bytes):

* Sums are written with ``pwrite`` right after the data, in the same page cache, so a killed agent
  process leaves both or, for a write in flight at that instant (unacknowledged), possibly new data
  with an old sum: a mismatch the scrub reports and repairs from another copy. After a power loss the
  same holds for writes not yet flushed; ``fdatasync`` on FLUSH covers the data and the sums alike.
* A write covering part of a block (the head or tail of an unaligned write, or of a zeroed range)
  first reads the old block and checks it against its stored sum. If it matches (or none is stored)
  the new sum is computed over the old block with the new bytes laid over it; if it does not, the
  stored sum is *kept*: the block stays flagged. Recomputing it there would seal the corruption in
  (Ceph checks the old block in a read-modify-write for the same reason).
* A block's data and sum change together for every command the compiled loop serves (it holds the
  GIL across the pair, as it holds it across a command's checks and I/O) and for writes and copies on
  the Python path (``Drive.sealed_write`` calls the compiled ``sealed_pwrite`` when it is built; the
  pure-Python fallback runs only where no native thread writes). Zeroing on the Python path updates
  sums after the zeroing system call without that atomicity: a write to a block being zeroed that
  lands in between (the single writer never overlaps its own writes, so only a second client, or
  sub-block writes sharing a block, can) may leave a sum that does not match. So may a client that
  changes its registered memory region while its write is in flight (the bytes are read twice: once
  to write, once to sum), and a data write that succeeded followed by a failed sums write (the retry
  finds new bytes under old sums and keeps the block flagged). Each shows as a "checksum error" the
  scrub repairs from another copy: reported, never lost, never sealed in.
* Assigning an extent clears its sums (``Drive.clear_sums``), and so does a change of its replica
  count (sums of a plain extent are not maintained, so they would be stale).

Reads do not check sums (a read is served from the page cache and the compiled loop sends it without
touching it); the scrub does, reading the drive itself (``O_DIRECT`` where the drive allows it).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Optional

from nvpool.proto.blocksums import (SCRUB_MAX, SUM_BLOCK, SUM_SIZE, ZERO_SUM, Buffer, block_sums, mismatches, seal,
                                    sums_bytes)
from nvpool.proto.dataplane import crc32c

__all__ = ["SCRUB_MAX", "SUM_BLOCK", "SUM_SIZE", "ZERO_SUM", "SumsArea", "block_sums", "mismatches", "seal",
           "sums_bytes"]
_U32 = struct.Struct("<I")

class SumsArea:
    """The sums of one drive: ``base`` is where its area starts, ``data_offset`` the drive offset of
    the first block it covers. Pure-Python sealed writes (see the module docstring)."""

    def __init__(self, fd: int, base: int, data_offset: int) -> None:
        self.fd = fd
        self.base = base
        self.data_offset = data_offset

    def at(self, offset: int) -> int:
        """Where the sum of the block holding drive offset ``offset`` is."""
        return self.base + (offset - self.data_offset) // SUM_BLOCK * SUM_SIZE

    def read(self, offset: int, length: int) -> bytes:
        """The stored sums of the blocks of ``[offset, offset+length)`` (block aligned)."""
        n = -(-length // SUM_BLOCK) * SUM_SIZE
        got = os.pread(self.fd, n, self.at(offset))
        return got.ljust(n, b"\0")

    def clear(self, offset: int, length: int) -> None:
        """Forget the sums of ``[offset, offset+length)`` (block aligned): "no sum recorded"."""
        start, n = self.at(offset), -(-length // SUM_BLOCK) * SUM_SIZE
        zeros = bytes(min(n, 1 << 20))
        pos = 0
        while pos < n:
            pos += os.pwrite(self.fd, zeros[: min(len(zeros), n - pos)], start + pos)

    def _partial(self, offset: int, length: int) -> list[tuple[int, bytearray, Optional[int]]]:
        """The blocks ``[offset, offset+length)`` covers only in part: (block start, old bytes, the sum
        to keep if the old bytes do not match their stored sum, else None)."""
        out: list[tuple[int, bytearray, Optional[int]]] = []
        end = offset + length
        first = offset - offset % SUM_BLOCK
        last = (end - 1) - (end - 1) % SUM_BLOCK
        for blk in dict.fromkeys((first, last)):
            if blk >= offset and blk + SUM_BLOCK <= end:
                continue  # wholly overwritten
            old = bytearray(os.pread(self.fd, SUM_BLOCK, blk))
            raw = os.pread(self.fd, SUM_SIZE, self.at(blk))
            if len(old) < SUM_BLOCK or len(raw) < SUM_SIZE:
                raise OSError(errno.EIO, "short read")
            (stored,) = _U32.unpack(raw)
            keep = stored if stored and stored != seal(crc32c(old)) else None
            out.append((blk, old, keep))
        return out

    def before(self, offset: int, length: int) -> list[tuple[int, bytearray, Optional[int]]]:
        """Step one of a sealed write or zero: read what its partial blocks held (before the data)."""
        return self._partial(offset, length) if length > 0 else []

    def after(self, offset: int, length: int, data: Optional[Buffer],
              partial: list[tuple[int, bytearray, Optional[int]]]) -> None:
        """Step two, once the data is on the drive: store the sums of every block it touched. ``data``
        None: the range was zeroed."""
        if length <= 0:
            return
        end = offset + length
        first = offset - offset % SUM_BLOCK
        view = memoryview(data) if data is not None else None
        parts = {blk: (old, keep) for blk, old, keep in partial}
        out = bytearray()
        for blk in range(first, end, SUM_BLOCK):
            if blk in parts:
                old, keep = parts[blk]
                if keep is not None:
                    out += _U32.pack(keep)
                    continue
                s, e = max(blk, offset), min(blk + SUM_BLOCK, end)
                old[s - blk : e - blk] = view[s - offset : e - offset] if view is not None else bytes(e - s)
                out += _U32.pack(seal(crc32c(old)))
            elif view is None:
                out += _U32.pack(ZERO_SUM)
            else:
                out += _U32.pack(seal(crc32c(view[blk - offset : blk - offset + SUM_BLOCK])))
        pos, at = 0, self.at(first)
        while pos < len(out):
            pos += os.pwrite(self.fd, out[pos:], at + pos)
