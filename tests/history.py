"""A Jepsen-style history checker for block-device I/O.

Clients write self-describing payloads (:func:`payload`), record every operation with its real-time
interval in a :class:`History` (write id, blocks, invocation and completion times from
``time.monotonic()``, which on Linux is one clock for all processes of a host), and afterwards
:func:`check` looks for behaviour that no correct block device could have produced.

Payloads. Every 4096-byte block a client writes encodes which write produced it and which block it
was meant for: a 32-byte header ``struct.pack('<8sQQQ', b'NVHIST01', write_id, block, check)``
followed by 4064 bytes of filler: a hash of (write_id, block) xor a distinct constant per 8-byte word
position, so the filler of two different (write, block) pairs differs in every word. :func:`decode_block` accepts a block only if all 4096 bytes are exactly that payload (or
all zeros, the initial value), so a torn block (parts of two writes, or part of a write and part of
the old zeros), a flipped byte anywhere, or a payload landed at the wrong block (misdirected write) is
reported as corruption, never mistaken for data.

What a clean :func:`check` proves, for the operations recorded (per block, each block an independent
register, as Jepsen checks linearizability per key):

1. every block every successful read returned is either all zeros or a complete, intact payload
   written for exactly that block;
2. every value read was written to that block by a recorded write, which started before the read
   ended (no reads from the future, no misdirected or invented writes);
3. every read returned the latest value or a value being written concurrently: not a value that a
   later write, which started after the value's write ended and completed successfully before the
   read started, had definitely overwritten (Lamport's *regular register*, generalised to
   overlapping writes; in particular, after a write succeeded, no later read sees the zeros or any
   value from before it: no lost writes, no stale reads);
4. reads do not go back in time: once a read has returned a value, no read that starts after it
   ended returns a value that was definitely overwritten by it (a value whose write ended before the
   first value's write started; the initial zeros are overwritten by every write).

Writes that returned an error (``ok=False``) or never completed are indeterminate: they may take
effect at any time after they started, or never, so they never count as having overwritten anything,
and seeing or not seeing them is both fine. Reads that failed are not checked, only counted.

What it does not prove:

* atomicity across blocks: a multi-block write or read is checked block by block, so a read that
  sees the new value in one block and the old one in the next passes (a block device promises
  atomicity for one block at most);
* full linearizability of a block: rule 4 only forbids going back past a write that was *definitely*
  older. A new-old inversion among mutually concurrent writes is not caught: with writes A and B
  overlapping in time, the sequential reads A, then B, then A again pass, although no single order
  of A and B explains them. (Rule 3 plus rule 4 is "regular register plus monotonic reads", between
  Lamport's regular and atomic registers.)
* anything about operations that were not recorded, or about durability after the history ends;
* timing: the check trusts the recorded intervals; a client must take a read's start time before
  issuing it and its end time after it returned, and likewise for writes (``begin_write`` before
  issuing, ``end_write`` after completion), or the check may miss or invent violations.

Histories from several processes are merged with :meth:`History.merge`; each process gives its
history a distinct ``id_base`` (process k: ``k * ID_SPAN``) so write ids stay unique.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from numpy.typing import NDArray

BLOCK = 4096
"""The unit a block device reads and writes atomically, and the unit every check is made in."""

ID_SPAN = 10**9
"""Write ids a history allocates: ``id_base + 1`` .. ``id_base + ID_SPAN - 1``."""

MAGIC = b"NVHIST01"
HEADER = struct.Struct("<8sQQQ")  # magic, write id, block, check word

_WORDS = BLOCK // 8
_HEADER_WORDS = HEADER.size // 8
_SECTOR = 512
_MAGIC_WORD = int.from_bytes(MAGIC, "little")
_MAX_ID = 2**63 - 1

U64 = NDArray[np.uint64]
I64 = NDArray[np.int64]
F64 = NDArray[np.float64]
Bools = NDArray[np.bool_]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ID_SALT = np.uint64(0x6E7670_6F6F6C_4944)
_CHECK_SALT = np.uint64(0xC0FFEE_5EED_C4EC)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
# per filler word, an offset that makes every word of a block differ (so shifted or swapped sectors show)
_POSITIONS: U64 = np.arange(1, _WORDS - _HEADER_WORDS + 1, dtype=np.uint64) * _GOLDEN


class Corrupt(Exception):
    """A block that is neither all zeros nor a complete, intact payload for the block it was read at."""


def _mix(z: U64) -> U64:
    """SplitMix64's finaliser, element-wise (uint64 arithmetic wraps)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _block_words(write_ids: U64, blocks: U64) -> U64:
    """The payload words (one row of 512 little-endian uint64 per block) of write_ids[i] for blocks[i]."""
    seeds = _mix(_mix(write_ids ^ _ID_SALT) + blocks * _GOLDEN)
    out = np.empty((len(seeds), _WORDS), dtype=np.uint64)
    out[:, 0] = _MAGIC_WORD
    out[:, 1] = write_ids
    out[:, 2] = blocks
    out[:, 3] = _mix(seeds ^ _CHECK_SALT)
    # filler: the seed (a hash of write id and block) xor a distinct constant per word position, so the
    # filler of two different (write, block) pairs differs in every word, and a moved sector shows too
    np.bitwise_xor(seeds[:, None], _POSITIONS[None, :], out=out[:, _HEADER_WORDS:])
    return out


def _to_bytes(words: U64) -> bytes:
    return words.astype("<u8", copy=False).tobytes()


def payload(write_id: int, first_block: int, nblocks: int) -> bytes:
    """What write ``write_id`` (>= 1) writes to blocks ``first_block .. first_block + nblocks - 1``:
    ``nblocks * BLOCK`` bytes, each block as :func:`block_payload`."""
    if not 1 <= write_id <= _MAX_ID:
        raise ValueError(f"write id {write_id} out of range 1..2**63-1")
    if first_block < 0 or nblocks < 0:
        raise ValueError(f"bad block range {first_block}+{nblocks}")
    blocks = np.arange(first_block, first_block + nblocks, dtype=np.uint64)
    return _to_bytes(_block_words(np.full(nblocks, write_id, dtype=np.uint64), blocks))


def block_payload(write_id: int, block: int) -> bytes:
    """The 4096 bytes write ``write_id`` puts in block ``block``: a header
    ``struct.pack('<8sQQQ', b'NVHIST01', write_id, block, check)``, then filler derived from
    (write_id, block), different in every 8-byte word."""
    return payload(write_id, block, 1)


def _describe_bad_block(row: U64, expected_block: int) -> str:
    """Why a block (as 512 uint64 words) is not zeros and not the payload of its header's write."""
    raw = _to_bytes(row)
    magic, wid, blk, chk = HEADER.unpack_from(raw)

    def sectors(expected: U64 | None) -> str:
        marks = []
        per = _SECTOR // 8
        for s in range(_WORDS // per):
            part = row[s * per:(s + 1) * per]
            if not part.any():
                marks.append("0")
            elif expected is not None and np.array_equal(part, expected[s * per:(s + 1) * per]):
                marks.append("=")
            else:
                marks.append("x")
        legend = "0: zeros, x: other" + ("" if expected is None else f", =: write {wid}'s payload")
        return f"512-byte sectors [{''.join(marks)}] ({legend})"

    if magic != MAGIC:
        return f"neither zeros nor a payload (header starts {raw[:16].hex()}); {sectors(None)}"
    if not 1 <= wid <= _MAX_ID:
        return f"payload header with invalid write id {wid}; {sectors(None)}"
    expected = _block_words(np.array([wid], dtype=np.uint64), np.array([blk], dtype=np.uint64))[0]
    if chk != int(expected[3]):
        return f"payload header damaged (check word mismatch; claims write {wid} block {blk}); {sectors(None)}"
    diff = np.flatnonzero(row != expected)
    where = "" if diff.size == 0 else f"; bytes {int(diff[0]) * 8}..{int(diff[-1]) * 8 + 7} differ from it"
    if blk != expected_block:
        return f"misdirected write: holds write {wid}'s payload for block {blk}{where}; {sectors(expected)}"
    return f"torn or corrupt block: header says write {wid}{where}; {sectors(expected)}"


def decode_blocks(data: bytes | bytearray | memoryview, first_block: int) -> tuple[list[int], dict[int, str]]:
    """Decode a read of blocks ``first_block ..`` all at once, raising nothing: per block the write id
    (0 for all zeros), or -1 for a corrupt block, whose offset (in blocks) maps to a description in
    the returned dict. A trailing partial block counts as corrupt."""
    view = memoryview(data).cast("B")
    nfull, rest = divmod(len(view), BLOCK)
    words = np.frombuffer(view, dtype="<u8", count=nfull * _WORDS).reshape(nfull, _WORDS).astype(np.uint64, copy=False)
    ids = np.zeros(nfull, dtype=np.int64)
    bad: dict[int, str] = {}
    nonzero = np.flatnonzero(words.any(axis=1))
    if nonzero.size:
        rows = words if nonzero.size == nfull else words[nonzero]
        wids = rows[:, 1]
        blocks = (nonzero + first_block).astype(np.uint64)
        good = (rows == _block_words(wids, blocks)).all(axis=1) & (wids >= 1) & (wids <= _MAX_ID)
        ids[nonzero[good]] = wids[good].astype(np.int64)
        for off in nonzero[~good].tolist():
            ids[off] = -1
            bad[off] = _describe_bad_block(words[off], first_block + off)
    out: list[int] = ids.tolist()
    if rest:
        bad[nfull] = f"short read: only {rest} of {BLOCK} bytes"
        out.append(-1)
    return out, bad


def decode_block(data: bytes | bytearray | memoryview, expected_block: int) -> int:
    """The write id whose payload ``data`` (one block read at ``expected_block``) is, 0 for all zeros;
    :class:`Corrupt` if it is neither (torn, damaged, misdirected, wrong length)."""
    if len(memoryview(data).cast("B")) != BLOCK:
        raise Corrupt(f"block {expected_block}: {len(data)} bytes, not {BLOCK}")
    ids, bad = decode_blocks(data, expected_block)
    if bad:
        raise Corrupt(f"block {expected_block}: {bad[0]}")
    return ids[0]


@dataclass
class WriteOp:
    """One write: ``ok`` is None while unfinished, False if it returned an error (indeterminate)."""

    id: int
    first_block: int
    nblocks: int
    start: float
    end: float | None = None
    ok: bool | None = None

    @property
    def status(self) -> str:
        return "unfinished" if self.ok is None else "ok" if self.ok else "failed"


@dataclass
class ReadOp:
    """One read: ``ids`` per block (0: zeros, -1: corrupt, described in ``corrupt`` by block offset);
    a read whose error reached the application has ``error`` set and no ids."""

    first_block: int
    nblocks: int
    start: float
    end: float
    ids: list[int] = field(default_factory=list)
    corrupt: dict[int, str] = field(default_factory=dict)
    error: str | None = None


class History:
    """The operations of a test, recorded from any number of threads (it is thread-safe); processes
    keep one each, with distinct ``id_base``, and the parent merges them (:meth:`merge`, via
    :meth:`to_json` / :meth:`from_json`).

    Time arguments default to ``clock()`` (``time.monotonic``); they may be given for recorded or
    simulated histories."""

    FORMAT = "nvpool-block-history/1"

    def __init__(self, id_base: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        if id_base < 0 or id_base + ID_SPAN > _MAX_ID:
            raise ValueError(f"bad id_base {id_base}")
        self.id_base = id_base
        self.clock = clock
        self.writes: dict[int, WriteOp] = {}
        self.reads: list[ReadOp] = []
        self._next_id = id_base + 1
        self._lock = threading.Lock()

    def begin_write(self, first_block: int, nblocks: int, *, at: float | None = None) -> tuple[int, float]:
        """Allocate a fresh write id for a write about to be issued; returns (write id, start time).
        Write :func:`payload` ``(write_id, first_block, nblocks)``."""
        if first_block < 0 or nblocks < 1:
            raise ValueError(f"bad block range {first_block}+{nblocks}")
        with self._lock:
            wid = self._next_id
            if wid >= self.id_base + ID_SPAN:
                raise RuntimeError(f"write ids of id_base {self.id_base} exhausted")
            self._next_id += 1
            start = self.clock() if at is None else at
            self.writes[wid] = WriteOp(wid, first_block, nblocks, start)
        return wid, start

    def end_write(self, write_id: int, ok: bool, *, at: float | None = None) -> None:
        """The write completed: ``ok=False`` if an error reached the application (the write may or may
        not have landed, at any time after it started)."""
        end = self.clock() if at is None else at
        with self._lock:
            w = self.writes[write_id]
            if w.ok is not None:
                raise ValueError(f"write {write_id} already ended")
            if end < w.start:
                raise ValueError(f"write {write_id} ends at {end} before it started at {w.start}")
            w.end, w.ok = end, ok

    def record_read(self, first_block: int, data: bytes | bytearray | memoryview, start: float,
                    end: float) -> ReadOp:
        """A read of ``len(data) // BLOCK`` blocks from ``first_block`` that returned ``data``; decoded
        here, corrupt blocks are recorded (and reported by :func:`check`), nothing is raised."""
        if end < start:
            raise ValueError(f"read ends at {end} before it started at {start}")
        ids, bad = decode_blocks(data, first_block)
        op = ReadOp(first_block, len(ids), start, end, ids, bad)
        with self._lock:
            self.reads.append(op)
        return op

    def read_failed(self, first_block: int, nblocks: int, start: float, end: float, error: str) -> ReadOp:
        """A read whose error reached the application (not a violation; counted by :func:`summary`)."""
        op = ReadOp(first_block, nblocks, start, end, error=error)
        with self._lock:
            self.reads.append(op)
        return op

    def merge(self, other: History) -> None:
        """Add ``other``'s operations (another process's history, with its own id_base)."""
        with other._lock:
            writes = [WriteOp(w.id, w.first_block, w.nblocks, w.start, w.end, w.ok) for w in other.writes.values()]
            reads = [ReadOp(r.first_block, r.nblocks, r.start, r.end, list(r.ids), dict(r.corrupt), r.error)
                     for r in other.reads]
        with self._lock:
            dup = sorted(w.id for w in writes if w.id in self.writes)
            if dup:
                raise ValueError(f"write ids in both histories (give each process its own id_base): {dup[:10]}")
            for w in writes:
                self.writes[w.id] = w
                if self._next_id <= w.id < self.id_base + ID_SPAN:
                    self._next_id = w.id + 1
            self.reads.extend(reads)

    def to_json(self) -> str:
        """The history as JSON, to save when a check fails, or to send to the process that merges."""
        with self._lock:
            doc: dict[str, Any] = {
                "format": self.FORMAT,
                "id_base": self.id_base,
                "next_id": self._next_id,
                "writes": [[w.id, w.first_block, w.nblocks, w.start, w.end, w.ok] for w in self.writes.values()],
                "reads": [[r.first_block, r.nblocks, r.start, r.end, r.ids,
                           {str(k): v for k, v in r.corrupt.items()}, r.error] for r in self.reads],
            }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> History:
        doc = json.loads(text)
        if doc.get("format") != cls.FORMAT:
            raise ValueError(f"not a {cls.FORMAT} history: format {doc.get('format')!r}")
        h = cls(int(doc["id_base"]))
        h._next_id = int(doc["next_id"])
        for wid, first, n, start, end, ok in doc["writes"]:
            h.writes[int(wid)] = WriteOp(int(wid), int(first), int(n), float(start),
                                         None if end is None else float(end), ok)
        for first, n, start, end, ids, bad, error in doc["reads"]:
            h.reads.append(ReadOp(int(first), int(n), float(start), float(end), [int(i) for i in ids],
                                  {int(k): str(v) for k, v in bad.items()}, error))
        return h

    def snapshot(self) -> tuple[list[WriteOp], list[ReadOp]]:
        """The operations recorded so far (the lists are copies; the records are shared)."""
        with self._lock:
            return list(self.writes.values()), list(self.reads)


# ---------------------------------------------------------------------------------------------- check

KINDS = ("corrupt", "unknown-write", "misdirected", "future", "stale", "nonmonotonic")


@dataclass(frozen=True)
class Violation:
    """One block of one read that no correct device could have returned. ``read`` indexes
    ``History.reads``; ``returned`` is the write id read (0: zeros, -1: corrupt); ``culprit`` is,
    for ``stale``, the completed write that had overwritten the value, for ``nonmonotonic`` the index
    of the earlier read that had already seen a newer value."""

    kind: str
    block: int
    read: int
    returned: int
    culprit: int | None = None


def _expand(first: I64, count: I64) -> tuple[NDArray[np.intp], I64]:
    """For ranges first[i] .. first[i] + count[i] - 1: (owner index, block) of each element."""
    owner = np.repeat(np.arange(len(count)), count)
    starts = np.cumsum(count) - count
    return owner, first[owner] + (np.arange(len(owner)) - starts[owner])


def _prior_max(eg: I64, et: F64, ev: F64, qg: I64, qt: F64) -> tuple[F64, NDArray[np.intp]]:
    """For each query i: the largest ``ev[j]`` over entries j with ``eg[j] == qg[i]`` and
    ``et[j] < qt[i]`` (-inf if none), and that j (-1 if none). O((entries + queries) log)."""
    best = np.full(len(qg), -np.inf)
    arg = np.full(len(qg), -1, dtype=np.intp)
    ne = len(eg)
    if ne == 0 or len(qg) == 0:
        return best, arg
    # dense group numbers and time ranks shared by entries and queries: (group, time) becomes one integer
    _, g = np.unique(np.concatenate([eg, qg]), return_inverse=True)
    times, t = np.unique(np.concatenate([et, qt]), return_inverse=True)
    key = g.astype(np.int64) * len(times) + t
    order = np.argsort(key[:ne], kind="stable")
    ekey, egrp = key[:ne][order], g[:ne][order].astype(np.int64)
    # running argmax of the values within each group: rank them, offset by group so that the running
    # maximum never reaches back into an earlier group
    by_value = np.argsort(ev[order], kind="stable")
    rank = np.empty(ne, dtype=np.int64)
    rank[by_value] = np.arange(ne)
    running = np.maximum.accumulate(egrp * ne + rank)
    best_pos = by_value[running - egrp * ne]
    # the last entry before (group, time) of each query: same group and strictly earlier time, if any
    pos = np.searchsorted(ekey, key[ne:], side="left") - 1
    hit = pos >= 0
    hit[hit] = egrp[pos[hit]] == g[ne:][hit]
    j = order[best_pos[pos[hit]]]
    arg[hit] = j
    best[hit] = ev[j]
    return best, arg


def find_violations(history: History) -> list[Violation]:
    """All violations of the rules in the module docstring, in no particular order."""
    writes, reads = history.snapshot()
    return _find(writes, reads)


def _find(writes: list[WriteOp], reads: list[ReadOp]) -> list[Violation]:
    out: list[Violation] = []
    inf = math.inf
    # writes, by id (after a sentinel of no blocks, so that lookups never index an empty array), and
    # expanded to one entry per block
    writes = [WriteOp(-(2**62), 0, 0, -inf, -inf, True)] + sorted(writes, key=lambda w: w.id)
    w_id = np.array([w.id for w in writes], dtype=np.int64)
    w_first = np.array([w.first_block for w in writes], dtype=np.int64)
    w_n = np.array([w.nblocks for w in writes], dtype=np.int64)
    w_start = np.array([w.start for w in writes], dtype=np.float64)
    # the time after which a write is definitely in place: its end if it succeeded, else never
    w_end = np.array([w.end if w.ok and w.end is not None else inf for w in writes], dtype=np.float64)
    wb_owner, wb_block = _expand(w_first, w_n)

    # one observation per (successful read, block)
    done = [i for i, r in enumerate(reads) if r.error is None]
    r_first = np.array([reads[i].first_block for i in done], dtype=np.int64)
    r_n = np.array([len(reads[i].ids) for i in done], dtype=np.int64)
    r_start = np.array([reads[i].start for i in done], dtype=np.float64)
    r_end = np.array([reads[i].end for i in done], dtype=np.float64)
    ob_owner, ob_block = _expand(r_first, r_n)
    ob_wid = np.fromiter(itertools.chain.from_iterable(reads[i].ids for i in done), dtype=np.int64,
                         count=len(ob_owner))
    ob_read = np.array(done, dtype=np.intp)[ob_owner] if done else np.zeros(0, dtype=np.intp)
    ob_rs, ob_re = r_start[ob_owner], r_end[ob_owner]

    def report(kind: str, sel: Bools, culprit: NDArray[Any] | None = None) -> None:
        idx = np.flatnonzero(sel)
        culprits: list[int | None] = [None] * len(idx) if culprit is None else culprit[idx].tolist()
        for k, c in zip(idx.tolist(), culprits):
            out.append(Violation(kind, int(ob_block[k]), int(ob_read[k]), int(ob_wid[k]), c))

    # rule 1: corrupt blocks
    report("corrupt", ob_wid < 0)
    # rule 3: the write read must be a recorded write that targeted this block
    pos = np.minimum(np.searchsorted(w_id, ob_wid), len(w_id) - 1)
    nonzero = ob_wid > 0
    known = nonzero & (w_id[pos] == ob_wid)
    targeted = known & (w_first[pos] <= ob_block) & (ob_block < w_first[pos] + w_n[pos])
    report("unknown-write", nonzero & ~known)
    report("misdirected", known & ~targeted)
    valid = targeted | (ob_wid == 0)
    # the read value's write interval; the initial zeros count as written and ended at -inf
    ow_start = np.where(targeted, w_start[pos], -inf)
    ow_end = np.where(targeted, w_end[pos], -inf)
    # rule 2a: the write must have started before the read ended
    future = targeted & (ow_start > ob_re)
    report("future", future)
    # rule 2b: no write of the block that started after the value's write ended may have completed
    # (successfully) before the read started: compare with the latest start among such completed writes
    fin = np.isfinite(w_end[wb_owner])
    q = np.flatnonzero(valid)
    latest, arg = _prior_max(wb_block[fin], w_end[wb_owner][fin], w_start[wb_owner][fin], ob_block[q], ob_rs[q])
    stale = np.zeros(len(ob_wid), dtype=np.bool_)
    stale[q] = latest > ow_end[q]
    culprit = np.zeros(len(ob_wid), dtype=np.int64)
    culprit[q[arg >= 0]] = w_id[wb_owner[fin][arg[arg >= 0]]]
    report("stale", stale, culprit)
    # rule 4: no read may return a value definitely older than one a read that ended before it
    # started has returned (only reads that broke no other rule count as evidence)
    clean = valid & ~future & ~stale
    e = np.flatnonzero(clean & targeted)
    q = np.flatnonzero(clean)
    newest, arg = _prior_max(ob_block[e], ob_re[e], ow_start[e], ob_block[q], ob_rs[q])
    back = np.zeros(len(ob_wid), dtype=np.bool_)
    back[q] = newest > ow_end[q]
    earlier = np.zeros(len(ob_wid), dtype=np.int64)
    earlier[q[arg >= 0]] = ob_read[e[arg[arg >= 0]]]
    report("nonmonotonic", back, earlier)
    return out


class _Describer:
    """Formats violations for people: times relative to the history's first operation."""

    def __init__(self, writes: list[WriteOp], reads: list[ReadOp]) -> None:
        self.writes = {w.id: w for w in writes}
        self.reads = reads
        starts = [w.start for w in writes] + [r.start for r in reads]
        self.t0 = min(starts) if starts else 0.0
        self._by_block: dict[int, list[WriteOp]] | None = None

    def t(self, x: float | None) -> str:
        return "never" if x is None else f"+{x - self.t0:.6f}"

    def write(self, wid: int) -> str:
        if wid == 0:
            return "the initial zeros"
        w = self.writes[wid]
        end = "" if w.end is None else f"..{self.t(w.end)}"
        return f"write {wid} [{self.t(w.start)}{end} {w.status}]"

    def read(self, i: int) -> str:
        r = self.reads[i]
        return f"read #{i} [{self.t(r.start)}..{self.t(r.end)}] of blocks {r.first_block}+{r.nblocks}"

    def block_writes(self, block: int) -> list[WriteOp]:
        if self._by_block is None:
            self._by_block = {}
            for w in self.writes.values():
                for b in range(w.first_block, w.first_block + w.nblocks):
                    self._by_block.setdefault(b, []).append(w)
        return self._by_block.get(block, [])

    def allowed(self, block: int, read: int, not_before: float = -math.inf) -> str:
        """What the read could have returned for the block by rule 2 (and, given the newest start a
        previous read saw, rule 4)."""
        r = self.reads[read]

        def end(w: WriteOp) -> float:
            return w.end if w.ok and w.end is not None else math.inf

        ws = self.block_writes(block)
        latest = max((w.start for w in ws if end(w) < r.start), default=-math.inf)
        names = ["the initial zeros"] if latest == -math.inf and not_before == -math.inf else []
        names += [f"write {w.id}" for w in sorted(ws, key=lambda w: w.start)
                  if w.start <= r.end and end(w) >= latest and end(w) >= not_before]
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        return ", ".join(names[:8]) + more if names else "nothing"

    def __call__(self, v: Violation) -> str:
        r = self.reads[v.read]
        head = f"block {v.block}: {self.read(v.read)}"
        if v.kind == "corrupt":
            return f"{head} returned a corrupt block: {r.corrupt.get(v.block - r.first_block, '?')}"
        if v.kind == "unknown-write":
            return f"{head} returned write {v.returned}, which no recorded write has (unknown write id)"
        if v.kind == "misdirected":
            w = self.writes[v.returned]
            return (f"{head} returned {self.write(v.returned)}, which wrote blocks "
                    f"{w.first_block}..{w.first_block + w.nblocks - 1}, not this one (misdirected write)")
        got = self.write(v.returned)
        if v.kind == "future":
            return (f"{head} returned {got}, which started after the read ended (read from the future); "
                    f"allowed: {self.allowed(v.block, v.read)}")
        if v.kind == "stale":
            assert v.culprit is not None
            by = self.write(v.culprit)
            how = "" if v.returned == 0 else f", which started after {got} ended,"
            return (f"{head} returned {got}, but {by}{how} had completed before the read started "
                    f"(stale read); allowed: {self.allowed(v.block, v.read)}")
        assert v.kind == "nonmonotonic" and v.culprit is not None
        seen = self.reads[v.culprit]
        w1 = seen.ids[v.block - seen.first_block]
        return (f"{head} returned {got}, but the earlier {self.read(v.culprit)}, which ended before this read "
                f"started, returned {self.write(w1)}, which started after {got} ended (reads went back in "
                f"time); allowed: {self.allowed(v.block, v.read, self.writes[w1].start)}")


def check(history: History, limit: int = 50) -> list[str]:
    """Human-readable violations of the history (empty: clean), ordered by read start, then block;
    at most ``limit`` of them, then a line ``... and N more``."""
    writes, reads = history.snapshot()
    found = _find(writes, reads)
    found.sort(key=lambda v: (reads[v.read].start, v.block, KINDS.index(v.kind)))
    describe = _Describer(writes, reads)
    msgs = [describe(v) for v in found[:limit]]
    if len(found) > limit:
        msgs.append(f"... and {len(found) - limit} more")
    return msgs


def summary(history: History) -> str:
    """Counts: writes ok / failed / unfinished, reads ok / failed (and with corrupt blocks), blocks."""
    writes, reads = history.snapshot()
    status = {"ok": 0, "failed": 0, "unfinished": 0}
    for w in writes:
        status[w.status] += 1
    failed = sum(1 for r in reads if r.error is not None)
    corrupt = sum(1 for r in reads if r.corrupt)
    written = _blocks(((w.first_block, w.nblocks) for w in writes))
    read = _blocks(((r.first_block, r.nblocks) for r in reads if r.error is None))
    return (f"writes: {status['ok']} ok, {status['failed']} failed, {status['unfinished']} unfinished; "
            f"reads: {len(reads) - failed} ok ({corrupt} with corrupt blocks), {failed} failed; "
            f"blocks touched: {len(written | read)} ({len(written)} written, {len(read)} read)")


def _blocks(ranges: Iterable[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for first, n in ranges:
        out.update(range(first, first + n))
    return out
