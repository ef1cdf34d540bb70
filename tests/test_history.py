"""Unit tests of the block-I/O history checker (tests/history.py): payload encoding, decoding of
every kind of damaged block, each checker rule with a history that breaks it (and one that only just
does not), merging and saving histories, and randomized histories cross-checked against a brute-force
reading of the rules."""

from __future__ import annotations

import math
import random
import struct
import threading
import time
from collections import defaultdict

import pytest

from tests.history import (
    BLOCK,
    ID_SPAN,
    Corrupt,
    History,
    ReadOp,
    block_payload,
    check,
    decode_block,
    decode_blocks,
    find_violations,
    payload,
    summary,
)

# ------------------------------------------------------------------------------------------ helpers


def write(h: History, first: int, n: int, start: float, end: float | None, ok: bool = True) -> int:
    """Record a write over [start, end] (end None: never completed); returns its id."""
    wid, _ = h.begin_write(first, n, at=start)
    if end is not None:
        h.end_write(wid, ok, at=end)
    return wid


def data_of(first: int, ids: list[int]) -> bytes:
    return b"".join(block_payload(w, first + i) if w else bytes(BLOCK) for i, w in enumerate(ids))


def read(h: History, first: int, ids: list[int], start: float, end: float) -> None:
    """Record a read over [start, end] that returned, per block, write ids[i] (0: zeros)."""
    h.record_read(first, data_of(first, ids), start, end)


def kinds(h: History) -> list[tuple[str, int, int]]:
    """(kind, read index, block) of every violation, sorted."""
    return sorted((v.kind, v.read, v.block) for v in find_violations(h))


def corrupt_message(data: bytes, block: int) -> str:
    with pytest.raises(Corrupt) as err:
        decode_block(data, block)
    return str(err.value)


# ------------------------------------------------------------------------------------------ payloads


def test_payload_layout_and_roundtrip() -> None:
    p = block_payload(5, 7)
    assert len(p) == BLOCK
    magic, wid, blk, _ = struct.unpack_from("<8sQQQ", p)
    assert (magic, wid, blk) == (b"NVHIST01", 5, 7)
    assert payload(5, 7, 3) == block_payload(5, 7) + block_payload(5, 8) + block_payload(5, 9)
    assert payload(5, 7, 0) == b""
    for wid in (1, 2, 12345, 3 * ID_SPAN + 1, 2**62):
        for blk in (0, 1, 8, 10**9):
            assert decode_block(block_payload(wid, blk), blk) == wid
    assert decode_block(memoryview(payload(9, 0, 2))[BLOCK:], 1) == 9
    with pytest.raises(ValueError):
        block_payload(0, 1)


def test_payloads_differ_in_every_filler_word() -> None:
    """So that any sector of another write, or of another block, or moved within the block, shows."""
    def words(p: bytes) -> list[int]:
        return list(struct.unpack(f"<{BLOCK // 8}Q", p))[4:]

    a = words(block_payload(5, 7))
    for other in (block_payload(6, 7), block_payload(5, 8), block_payload(4, 7)):
        assert all(x != y for x, y in zip(a, words(other)))
    assert len(set(a)) == len(a)


def test_zero_block_is_the_initial_value() -> None:
    assert decode_block(bytes(BLOCK), 3) == 0
    assert decode_blocks(bytes(3 * BLOCK), 3) == ([0, 0, 0], {})


@pytest.mark.parametrize("offset", [0, 7, 8, 16, 24, 31, 32, 100, 2047, 2048, 4095])
def test_a_flipped_byte_anywhere_is_corrupt(offset: int) -> None:
    bad = bytearray(block_payload(5, 7))
    bad[offset] ^= 0x10
    corrupt_message(bytes(bad), 7)


def test_a_torn_block_is_corrupt() -> None:
    a, b = block_payload(5, 7), block_payload(6, 7)
    msg = corrupt_message(a[:2048] + b[2048:], 7)
    assert "torn" in msg and "write 5" in msg and "2048..4095" in msg and "[====xxxx]" in msg
    msg = corrupt_message(a[:512] + bytes(BLOCK - 512), 7)
    assert "[=0000000]" in msg
    # the new header over old data, a single sector of another write, old zeros before the new data
    corrupt_message(b[:512] + a[512:], 7)
    corrupt_message(a[:3584] + b[3584:], 7)
    msg = corrupt_message(bytes(512) + a[512:], 7)
    assert "neither zeros nor a payload" in msg and "[0xxxxxxx]" in msg
    # a sector of the right write but moved within the block
    corrupt_message(a[:512] + a[1024:1536] + a[1024:], 7)


def test_a_misdirected_block_is_corrupt() -> None:
    msg = corrupt_message(block_payload(5, 7), 8)
    assert "misdirected" in msg and "block 7" in msg and "block 8" in msg
    # a block of the right write meant for another block, and the reverse
    corrupt_message(payload(5, 6, 3)[BLOCK:2 * BLOCK], 6)
    corrupt_message(block_payload(5, 8)[:2048] + block_payload(5, 7)[2048:], 7)


def test_garbage_and_wrong_lengths_are_corrupt() -> None:
    rng = random.Random(3)
    corrupt_message(bytes(rng.getrandbits(8) for _ in range(BLOCK)), 0)
    corrupt_message(block_payload(5, 7)[:-1], 7)
    corrupt_message(block_payload(5, 7) + bytes(1), 7)
    corrupt_message(b"\xff" * BLOCK, 7)


def test_decode_blocks_marks_each_bad_block() -> None:
    data = (block_payload(4, 10) + bytes(BLOCK) + block_payload(4, 12)[:100] + bytes(BLOCK - 100)
            + block_payload(4, 12) + block_payload(5, 14) + b"tail")
    ids, bad = decode_blocks(data, 10)
    assert ids == [4, 0, -1, -1, 5, -1]
    assert sorted(bad) == [2, 3, 5]
    assert "torn" in bad[2] and "misdirected" in bad[3] and "short read" in bad[5]


# ------------------------------------------------------------------------------------------ the rules


def test_clean_sequential_history() -> None:
    h = History()
    read(h, 0, [0, 0], 0, 1)
    a = write(h, 0, 2, 2, 3)
    read(h, 0, [a, a], 4, 5)
    b = write(h, 1, 1, 6, 7)
    read(h, 0, [a, b], 8, 9)
    read(h, 1, [b, 0], 10, 11)
    assert check(h) == []
    assert find_violations(h) == []


def test_concurrent_writes_either_value_passes() -> None:
    h = History()
    a = write(h, 0, 1, 0, 10)
    b = write(h, 0, 1, 5, 15)
    for i, got in enumerate([0, a, b]):
        read(h, 0, [got], 6 + i * 0.1, 7 + i * 0.1)  # during both writes: old, either new one
    read(h, 0, [a], 20, 21)  # afterwards: either, since neither definitely followed the other
    read(h, 0, [a], 22, 23)
    h2 = History()
    a = write(h2, 0, 1, 0, 10)
    write(h2, 0, 1, 5, 15)
    read(h2, 0, [a], 20, 21)
    assert check(h) == [] and check(h2) == []
    read(h, 0, [0], 30, 31)  # the zeros, though two writes completed
    assert kinds(h) == [("stale", 5, 0)]


def test_stale_read_is_flagged() -> None:
    h = History()
    a = write(h, 3, 1, 0, 1)
    b = write(h, 3, 1, 2, 3)
    read(h, 3, [a], 2.5, 3.5)  # b still in flight when the read started: fine
    read(h, 3, [a], 3, 4)  # b ended exactly when the read started: concurrent, fine
    assert check(h) == []
    read(h, 3, [a], 4, 5)
    msgs = check(h)
    assert kinds(h) == [("stale", 2, 3)]
    assert len(msgs) == 1
    assert msgs[0].startswith("block 3: read #2 [+4.000000..+5.000000]")
    assert f"returned write {a} [+0.000000..+1.000000 ok]" in msgs[0]
    assert f"write {b} [+2.000000..+3.000000 ok]" in msgs[0]
    assert "stale read" in msgs[0] and msgs[0].endswith(f"allowed: write {b}")


def test_overwrite_by_a_write_overlapping_the_old_one_does_not_make_it_stale() -> None:
    h = History()
    a = write(h, 0, 1, 0, 2)
    write(h, 0, 1, 1, 3)  # overlaps a: may have been ordered before it
    read(h, 0, [a], 4, 5)
    assert check(h) == []


def test_read_from_the_future_is_flagged() -> None:
    h = History()
    a = write(h, 0, 1, 10, 11)
    read(h, 0, [a], 0, 5)
    read(h, 0, [a], 5, 10)  # started exactly when the read ended: allowed
    assert kinds(h) == [("future", 0, 0)]
    msg = check(h)[0]
    assert "read from the future" in msg and "allowed: the initial zeros" in msg


def test_initial_zeros_after_a_completed_write_are_flagged() -> None:
    h = History()
    write(h, 0, 4, 0, 1)
    read(h, 0, [0], 0.5, 2)  # during the write: fine
    read(h, 2, [0, 0], 2, 3)  # after it: both blocks stale
    read(h, 4, [0], 2, 3)  # another block: fine
    assert kinds(h) == [("stale", 1, 2), ("stale", 1, 3)]
    assert "returned the initial zeros, but write 1" in check(h)[0]


def test_a_failed_write_may_or_may_not_be_seen() -> None:
    for seen in ([0, 0], [0, 2], [2, 2], [0, 1, 2, 1], [2, 0, 2]):
        h = History()
        write(h, 0, 1, 0, 1, ok=False)  # id 1: failed, may land at any time after it started, or never
        write(h, 0, 1, 0.5, 3, ok=False)  # id 2
        for i, got in enumerate(seen):
            read(h, 0, [got], 10 + 10 * i, 11 + 10 * i)
        # once 2 was seen, the zeros again: going back (the zeros are older than any write)
        assert kinds(h) == ([("nonmonotonic", 1, 0)] if seen == [2, 0, 2] else []), seen
    h = History()
    write(h, 0, 1, 0, None)  # never completed
    read(h, 0, [0], 5, 6)
    read(h, 0, [1], 7, 8)
    assert check(h) == []


def test_going_back_in_time_between_sequential_reads_is_flagged() -> None:
    h = History()
    a = write(h, 0, 1, 0, 1)
    f = write(h, 0, 1, 2, 3, ok=False)  # indeterminate: seeing it or a is fine ...
    read(h, 0, [f], 4, 5)
    read(h, 0, [a], 4.5, 6)  # concurrent with the read that saw f: fine
    assert check(h) == []
    read(h, 0, [a], 6, 7)  # ... but once f was seen, a (older than f) may not come back
    assert kinds(h) == [("nonmonotonic", 2, 0)]
    msg = check(h)[0]
    assert "the earlier read #0" in msg and f"returned write {f}" in msg and "went back in time" in msg
    assert msg.endswith(f"allowed: write {f}")


def test_an_in_flight_write_once_seen_stays_seen() -> None:
    h = History()
    a = write(h, 0, 2, 0, 1)
    b = write(h, 0, 2, 2, 10)
    read(h, 0, [b, a], 3, 4)
    read(h, 0, [a, a], 5, 6)  # block 0 went back from b (in flight) to a; block 1 never saw b: fine
    read(h, 2, [0], 5, 6)
    assert kinds(h) == [("nonmonotonic", 1, 0)]


def test_inversion_among_concurrent_writes_is_not_detected() -> None:
    """The documented limit: A, B, A from concurrent writes A and B passes (not linearizable)."""
    h = History()
    a = write(h, 0, 1, 0, 10)
    b = write(h, 0, 1, 0, 10)
    read(h, 0, [a], 1, 2)
    read(h, 0, [b], 3, 4)
    read(h, 0, [a], 5, 6)
    assert check(h) == []


def test_misdirected_and_unknown_writes_are_flagged() -> None:
    h = History()
    w = write(h, 0, 4, 0, 1)
    read(h, 3, [w], 2, 3)
    read(h, 4, [w], 2, 3)  # an intact payload of w for block 4, which w did not write
    read(h, 5, [999], 2, 3)
    assert kinds(h) == [("misdirected", 1, 4), ("unknown-write", 2, 5)]
    msgs = check(h)
    assert "wrote blocks 0..3, not this one (misdirected write)" in msgs[0]
    assert "returned write 999, which no recorded write has" in msgs[1]


def test_corrupt_blocks_are_flagged_and_failed_reads_are_not() -> None:
    h = History()
    a = write(h, 0, 2, 0, 1)
    good = payload(a, 0, 2)
    h.record_read(0, good[:BLOCK] + good[BLOCK:BLOCK + 2048] + bytes(2048), 2, 3)
    h.record_read(0, block_payload(a, 0), 2, 3)
    h.record_read(1, block_payload(a, 0), 2, 3)  # the payload of block 0 read at block 1
    h.read_failed(0, 2, 2, 3, "EIO")
    assert kinds(h) == [("corrupt", 0, 1), ("corrupt", 2, 1)]
    msgs = check(h)
    assert msgs[0].startswith("block 1: read #0") and "torn" in msgs[0]
    assert "misdirected" in msgs[1]
    s = summary(h)
    assert "writes: 1 ok, 0 failed, 0 unfinished" in s
    assert "reads: 3 ok (2 with corrupt blocks), 1 failed" in s
    assert "blocks touched: 2" in s


def test_summary_counts() -> None:
    h = History()
    write(h, 0, 2, 0, 1)
    write(h, 5, 1, 0, 1, ok=False)
    write(h, 9, 1, 0, None)
    read(h, 20, [0], 2, 3)
    assert summary(h) == ("writes: 1 ok, 1 failed, 1 unfinished; reads: 1 ok (0 with corrupt blocks), "
                          "0 failed; blocks touched: 5 (4 written, 1 read)")


def test_the_message_list_is_capped() -> None:
    h = History()
    a = write(h, 0, 60, 0, 1)
    write(h, 0, 60, 2, 3)
    read(h, 0, [a] * 60, 4, 5)
    msgs = check(h)
    assert len(msgs) == 51 and msgs[-1] == "... and 10 more"
    assert [m.split(":")[0] for m in msgs[:3]] == ["block 0", "block 1", "block 2"]
    assert len(check(h, limit=5)) == 6


# ------------------------------------------------------------------------------------------ histories


def test_write_ids_are_unique_across_threads() -> None:
    h = History(id_base=2 * ID_SPAN)
    got: list[list[int]] = [[] for _ in range(8)]

    def run(k: int) -> None:
        for _ in range(300):
            got[k].append(h.begin_write(k, 1)[0])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = sorted(i for g in got for i in g)
    assert ids == list(range(2 * ID_SPAN + 1, 2 * ID_SPAN + 1 + 2400))


def test_merge_of_histories_from_two_processes() -> None:
    p0, p1 = History(id_base=0), History(id_base=ID_SPAN)
    a = write(p0, 3, 1, 0, 1)
    b = write(p1, 4, 1, 0, 1)
    assert (a, b) == (1, ID_SPAN + 1)
    read(p1, 3, [a], 2, 3)  # process 1 read process 0's write
    read(p1, 3, [0], 4, 5)  # ... and then the zeros: stale, seen only with process 0's write known
    read(p0, 4, [b], 2, 3)
    assert [k for k, _, _ in kinds(p1)] == ["unknown-write"]
    assert [k for k, _, _ in kinds(p0)] == ["unknown-write"]
    merged = History.from_json(p0.to_json())
    merged.merge(History.from_json(p1.to_json()))
    assert sorted(merged.writes) == [a, b]
    assert kinds(merged) == [("stale", 2, 3)]  # p1's reads come after p0's one
    assert "write 1 [+0.000000..+1.000000 ok]" in check(merged)[0]
    assert merged.begin_write(0, 1)[0] == 2  # the merged history's own ids go on past its own range
    with pytest.raises(ValueError, match="write ids in both"):
        merged.merge(p1)
    same_base = History()
    write(same_base, 0, 1, 0, 1)
    with pytest.raises(ValueError):
        p0.merge(same_base)


def test_json_roundtrip() -> None:
    h = History(id_base=ID_SPAN)
    a = write(h, 0, 2, 0, 1)
    write(h, 1, 1, 0.5, 2, ok=False)
    write(h, 2, 1, 0.5, None)
    read(h, 0, [a, 0], 3, 4)
    h.record_read(0, block_payload(a, 0)[:100] + bytes(BLOCK - 100), 3, 4)
    h.read_failed(5, 3, 3, 4, "timed out")
    back = History.from_json(h.to_json())
    assert back.writes == h.writes and back.reads == h.reads and back.id_base == h.id_base
    assert check(back) == check(h) and len(check(h)) == 2
    assert back.begin_write(0, 1)[0] == ID_SPAN + 4
    with pytest.raises(ValueError):
        History.from_json('{"format": "something else"}')


def test_bad_operations_are_refused() -> None:
    h = History()
    wid = write(h, 0, 1, 5, 6)
    with pytest.raises(ValueError):
        h.end_write(wid, True, at=7)
    with pytest.raises(KeyError):
        h.end_write(12345, True)
    wid, _ = h.begin_write(0, 1, at=5)
    with pytest.raises(ValueError):
        h.end_write(wid, True, at=4)
    with pytest.raises(ValueError):
        h.begin_write(0, 0)
    with pytest.raises(ValueError):
        h.record_read(0, bytes(BLOCK), 2, 1)


def test_real_clock_defaults() -> None:
    h = History()
    before = time.monotonic()
    wid, start = h.begin_write(0, 1)
    h.end_write(wid, True)
    w = h.writes[wid]
    assert before <= start == w.start <= (w.end or 0.0) <= time.monotonic()


# ------------------------------------------------------------------------------------------ randomized


def reference(h: History) -> list[tuple[str, int, int]]:
    """The rules of the module docstring, read literally and checked by brute force."""
    inf = math.inf

    def end(wid: int) -> float:
        w = h.writes[wid]
        return w.end if w.ok and w.end is not None else inf

    by_block: dict[int, list[int]] = defaultdict(list)
    for w in h.writes.values():
        for blk in range(w.first_block, w.first_block + w.nblocks):
            by_block[blk].append(w.id)
    out: list[tuple[str, int, int]] = []
    clean: list[tuple[int, int, int]] = []
    for i, r in enumerate(h.reads):
        if r.error is not None:
            continue
        for k, wid in enumerate(r.ids):
            blk = r.first_block + k
            if wid < 0:
                out.append(("corrupt", i, blk))
            elif wid > 0 and wid not in h.writes:
                out.append(("unknown-write", i, blk))
            elif wid > 0 and wid not in by_block[blk]:
                out.append(("misdirected", i, blk))
            elif wid > 0 and h.writes[wid].start > r.end:
                out.append(("future", i, blk))
            elif any(end(w2) < r.start and (wid == 0 or end(wid) < h.writes[w2].start) for w2 in by_block[blk]):
                out.append(("stale", i, blk))
            else:
                clean.append((i, blk, wid))
    for i, blk, wid in clean:
        if any(b1 == blk and w1 != 0 and h.reads[i1].end < h.reads[i].start
               and (wid == 0 or end(wid) < h.writes[w1].start) for i1, b1, w1 in clean):
            out.append(("nonmonotonic", i, blk))
    return sorted(out)


def test_random_histories_agree_with_the_brute_force_reference() -> None:
    """Arbitrary (mostly wrong) histories with many equal times: the checker finds exactly the
    violations the literal rules give, and describes each."""
    total = 0
    for seed in range(150):
        rng = random.Random(seed)
        h = History(id_base=rng.choice([0, ID_SPAN]))
        nblocks = rng.randint(1, 5)
        for _ in range(rng.randint(0, 12)):
            s = rng.randint(0, 20)
            e = s + rng.randint(0, 6)
            first = rng.randrange(nblocks)
            write(h, first, rng.randint(1, nblocks - first), s, rng.choice([e, e, e, None]),
                        ok=rng.random() < 0.8)
        ids = [0, -1, 7] + list(h.writes)
        for _ in range(rng.randint(0, 25)):
            s = rng.randint(0, 25)
            e = s + rng.randint(0, 4)
            first = rng.randrange(nblocks)
            n = rng.randint(1, nblocks - first)
            if rng.random() < 0.1:
                h.read_failed(first, n, s, e, "EIO")
                continue
            got = [rng.choice(ids) for _ in range(n)]
            h.reads.append(ReadOp(first, n, s, e, got, {k: "bad" for k, g in enumerate(got) if g < 0}))
        want = reference(h)
        assert kinds(h) == want, seed
        assert len(check(h, limit=10**6)) == len(want)
        total += len(want)
    assert total > 200  # the histories do break the rules


def simulate(seed: int, clients: int = 6, ops: int = 60, blocks: int = 12) -> History:
    """A correct device under concurrent clients: each operation takes effect atomically at a random
    instant within its interval (a failed write: then, later, or never), on a simulated clock."""
    rng = random.Random(seed)
    h = History(id_base=ID_SPAN * rng.randint(0, 3))
    events: list[tuple[float, str, int, int, float, float, int]] = []  # when, kind, first, n, start, end, wid
    for _ in range(clients):
        t = rng.random()
        for _ in range(ops):
            start = t + rng.expovariate(5)
            end = start + rng.expovariate(1)
            at = rng.uniform(start, end)
            t = end
            first = rng.randrange(blocks)
            n = rng.randint(1, min(4, blocks - first))
            if rng.random() < 0.5:
                r = rng.random()
                ok = r >= 0.15
                wid = write(h, first, n, start, None if r < 0.03 else end, ok=ok)
                if not ok:
                    at = rng.choice([at, end + rng.expovariate(1), math.inf])
                events.append((at, "w", first, n, start, end, wid))
            else:
                events.append((at, "r", first, n, start, end, 0))
    state: dict[int, int] = {}
    for _, kind, first, n, start, end, wid in sorted(events):
        if kind == "w":
            state.update((b, wid) for b in range(first, first + n))
        elif rng.random() < 0.05:
            h.read_failed(first, n, start, end, "EIO")
        else:
            h.record_read(first, b"".join(block_payload(state[b], b) if b in state else bytes(BLOCK)
                                         for b in range(first, first + n)), start, end)
    return h


def test_a_simulated_correct_device_is_clean_and_an_injected_stale_read_is_caught() -> None:
    for seed in range(12):
        h = simulate(seed)
        assert check(h) == [], (seed, check(h)[:3])
        assert kinds(h) == reference(h)
        # a stale read: a value two ok writes back, read after the newer one completed
        ws = sorted((w for w in h.writes.values() if w.ok), key=lambda w: w.start)
        pairs = [(w1, w2, b) for w1 in ws for w2 in ws if w1.end is not None and w2.end is not None
                 and w1.end < w2.start for b in range(w2.first_block, w2.first_block + w2.nblocks)
                 if w1.first_block <= b < w1.first_block + w1.nblocks]
        w1, w2, b = random.Random(seed).choice(pairs)
        assert w2.end is not None
        read(h, b, [w1.id], w2.end + 0.001, w2.end + 0.002)
        assert kinds(h) == [("stale", len(h.reads) - 1, b)], seed
        # and the zeros where a write had completed
        h.reads.pop()
        read(h, b, [0], w2.end + 0.001, w2.end + 0.002)
        assert kinds(h) == [("stale", len(h.reads) - 1, b)], seed


def test_threads_on_a_locked_device_give_a_clean_history() -> None:
    """Real threads and the real clock on a correct (lock-protected) in-memory device."""
    nblocks = 16
    device = bytearray(nblocks * BLOCK)
    lock = threading.Lock()
    h = History()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            first = rng.randrange(nblocks)
            n = rng.randint(1, min(3, nblocks - first))
            if rng.random() < 0.5:
                wid, _ = h.begin_write(first, n)
                data = payload(wid, first, n)
                with lock:
                    device[first * BLOCK:(first + n) * BLOCK] = data
                h.end_write(wid, True)
            else:
                start = time.monotonic()
                with lock:
                    got = bytes(device[first * BLOCK:(first + n) * BLOCK])
                h.record_read(first, got, start, time.monotonic())

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(h.writes) + len(h.reads) == 900
    assert check(h) == []
    # a device that loses one acknowledged write: a read after it completed shows the older value
    wid, _ = h.begin_write(0, 1)
    h.end_write(wid, True)
    start = time.monotonic()
    h.record_read(0, bytes(device[:BLOCK]), start, time.monotonic())
    assert [v.kind for v in find_violations(h)] == ["stale"]
