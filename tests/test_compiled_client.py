"""The client's compiled completion path (``proto/_ccomplete.c``) against its reference, the Python decoder.

Both receive the same byte streams from a scripted agent: seeded random mixes of READ completions
with data (into the caller's buffers), WRITE completions, error completions with messages, completions
with header and data digests (good and bad data digests), a payload shorter or longer than the caller
asked, commands whose caller gave up (cancelled futures, abandoned buffers), an unknown tag, a bad magic
or a bad header digest at the end, cut at random points so frames straddle receives (and large
payloads go straight into the caller's buffer). Two ``AgentConnection``\\ s on fake transports, one with
the compiled path and one with it switched off, must give every future the same outcome (result fields
and data, or exception type), leave the same bytes in every caller's buffer, the same commands pending,
the same bytes in flight, and be closed alike.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Optional

import pytest

from nvpool.proto import dataplane as dp
from nvpool.proto import transport as tp
from nvpool.proto.errors import Status

KiB = 1 << 10

pytestmark = pytest.mark.skipif(tp._ccomplete is None, reason="the compiled completion path is not built "
                                "(or NVPOOL_PURE_PYTHON=1)")


class FakeTransport:
    def __init__(self, proto: tp.AgentConnection) -> None:
        self.proto = proto
        self.closing = False
        self.aborted = False
        self.sent = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def writelines(self, frames: Any) -> None:
        self.sent += sum(len(f) for f in frames)

    def write(self, data: Any) -> None:
        self.sent += len(data)

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        if not self.aborted:
            self.closing = self.aborted = True
            self.proto.connection_lost(None)


def frame(tag: int, status: int = 0, payload: bytes = b"", info: int = 0, flags: int = 0,
          bad_ddgst: bool = False, bad_hdgst: bool = False, magic: int = dp.COMPLETION_MAGIC) -> bytes:
    hdr = dp.COMPLETION.pack(magic, status, flags, tag, len(payload), 0, info)
    out = hdr
    if flags & dp.HDGST:
        out += dp.DIGEST.pack(dp.crc32c(hdr) ^ (1 if bad_hdgst else 0))
    out += payload
    if flags & dp.DDGST and payload:
        out += dp.DIGEST.pack(dp.crc32c(payload) ^ (1 if bad_ddgst else 0))
    return out


def script(seed: int) -> tuple[list[tuple[str, int]], list[bytes], set[int], set[int]]:
    """Commands to post (kind, length) and the agent's completion frames for them (in a shuffled
    order, as an agent completes them), plus the indexes to cancel and to abandon before delivery."""
    rng = random.Random(seed)
    n = rng.randrange(20, 120)
    cmds: list[tuple[str, int]] = []
    frames: list[tuple[int, bytes]] = []
    for i in range(n):
        tag = i + 1
        kind = rng.choices(["read", "write", "err", "digest", "short", "big"], [50, 20, 8, 8, 5, 9])[0]
        length = rng.choice([512, 4 * KiB, 8 * KiB, 4 * KiB])
        if kind == "big":
            length = rng.choice([64 * KiB, 200 * KiB])
        data = bytes([rng.randrange(256)]) * length
        if kind in ("read", "big"):
            cmds.append(("read", length))
            frames.append((tag, frame(tag, 0, data)))
        elif kind == "write":
            cmds.append(("write", length))
            frames.append((tag, frame(tag)))
        elif kind == "err":
            cmds.append(("read", length))
            st = rng.choice([Status.STALE_LAYOUT, Status.NO_EXTENT, Status.IO_ERROR, Status.DENIED])
            frames.append((tag, frame(tag, st, b"refused: " + bytes(str(i), "ascii"), info=rng.randrange(9))))
        elif kind == "digest":
            cmds.append(("read", length))
            frames.append((tag, frame(tag, 0, data, flags=dp.HDGST | dp.DDGST, bad_ddgst=rng.random() < 0.5)))
        else:  # the agent returns a different length than asked
            cmds.append(("read", length))
            frames.append((tag, frame(tag, 0, data[: length // 2] if rng.random() < 0.5 else data + b"x" * 512)))
    # agents complete out of order, within a window
    order = sorted(range(n), key=lambda i: i + rng.randrange(0, 8))
    out = [frames[i][1] for i in order]
    end = rng.random()
    if end < 0.15:
        out.append(frame(9999, 0, b""))  # a tag nobody posted
    elif end < 0.3:
        out.append(frame(1, magic=0x1234))
    elif end < 0.4:
        out.append(frame(1, flags=dp.HDGST, bad_hdgst=True))
    cancel = {i for i in range(n) if rng.random() < 0.05}
    abandon = {i for i in range(n) if rng.random() < 0.05} - cancel
    return cmds, out, cancel, abandon


def run(seed: int, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    cmds, frames, cancel, abandon = script(seed)
    monkeypatch.setattr(tp, "_ccomplete", tp._ccomplete if compiled else None)
    rng = random.Random(seed * 7 + 1)
    stream = b"".join(frames)
    cuts = sorted({rng.randrange(1, len(stream)) for _ in range(rng.randrange(0, 40))})

    async def go() -> dict[str, Any]:
        conn = tp.AgentConnection("fake:1", window=64 << 20)
        t = FakeTransport(conn)
        conn.connection_made(t)  # type: ignore[arg-type]
        bufs: list[Optional[bytearray]] = []
        futs = []
        for kind, length in cmds:
            if kind == "read":
                b = bytearray(b"\xee" * length)
                bufs.append(b)
                futs.append(conn._post(dp.READ, 1, 0, length, 1, None, memoryview(b), 0, 0, 0, length))
            else:
                bufs.append(None)
                futs.append(conn._post(dp.WRITE, 1, 0, length, 1, b"w" * length, None, 0, 0, 0, length))
        for i in cancel:
            futs[i].cancel()
        for i in abandon:
            conn.abandon(futs[i])
        await asyncio.sleep(0)
        pos = 0
        for c in [*cuts, len(stream)]:
            chunk = stream[pos:c]
            while chunk and not t.aborted:
                buf = conn.get_buffer(-1)
                k = min(len(buf), len(chunk))
                buf[:k] = chunk[:k]
                chunk = chunk[k:]
                conn.buffer_updated(k)
            pos = c
            if t.aborted:
                break
        await asyncio.sleep(0)
        outcomes: list[Any] = []
        for f in futs:
            if not f.done():
                outcomes.append("pending")
            elif f.cancelled():
                outcomes.append("cancelled")
            elif f.exception() is not None:
                outcomes.append(type(f.exception()).__name__)
            else:
                r = f.result()
                outcomes.append((r.status, r.flags, r.tag, r.length, r.info, r.digest_ok,
                                 None if r.payload is None else bytes(r.payload), r.message))
        out = {"outcomes": outcomes, "bufs": [None if b is None else bytes(b) for b in bufs],
               "pending": sorted(conn.pending), "inflight": conn._inflight, "aborted": t.aborted}
        conn.close()
        return out

    return asyncio.run(go())


@pytest.mark.parametrize("seed", range(40))
def test_compiled_completions_match_the_python_decoder(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = run(seed, True, monkeypatch)
    ref = run(seed, False, monkeypatch)
    assert fast["aborted"] == ref["aborted"]
    assert fast["pending"] == ref["pending"]
    assert fast["inflight"] == ref["inflight"]
    for i, (a, b) in enumerate(zip(fast["outcomes"], ref["outcomes"])):
        assert a == b, f"command {i}: compiled {str(a)[:200]} != python {str(b)[:200]}"
    assert fast["bufs"] == ref["bufs"]


def test_the_compiled_path_delivers_plain_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a vacuous comparison: plain successes are delivered without the Python decoder."""
    calls = 0
    real = dp.CompletionDecoder._parse_header

    def counting(self: dp.CompletionDecoder, raw: memoryview) -> dp.Completion:
        nonlocal calls
        calls += 1
        return real(self, raw)

    monkeypatch.setattr(dp.CompletionDecoder, "_parse_header", counting)

    async def go() -> list[bytes]:
        conn = tp.AgentConnection("fake:1")
        t = FakeTransport(conn)
        conn.connection_made(t)  # type: ignore[arg-type]
        bufs = [bytearray(4 * KiB) for _ in range(32)]
        futs = [conn._post(dp.READ, 1, 0, 4 * KiB, 1, None, memoryview(b), 0, 0, 0, 4 * KiB) for b in bufs]
        stream = b"".join(frame(i + 1, 0, bytes([i]) * 4 * KiB) for i in range(32))
        stream += frame(33, Status.IO_ERROR, b"no")  # an error: the Python decoder's
        buf = conn.get_buffer(-1)
        buf[: len(stream)] = stream
        conn.buffer_updated(len(stream))
        assert all(f.done() and f.result().status == 0 for f in futs) and not conn.pending
        assert conn._inflight == 0
        return [bytes(b) for b in bufs]

    got = asyncio.run(go())
    assert got == [bytes([i]) * 4 * KiB for i in range(32)]
    assert calls == 1
