"""The agent's native connection threads (``agents/_cserve.c`` ``Conn``, ``agents/dataplane.py``
``NativeConnection``) against the reference, the pure-Python path.

The streams are those of ``tests/test_compiled_agent.py`` (seeded mixes of good and bad commands:
reads and writes of every size, FUA, digests, stale generations, unknown extents, ranges past the end,
zero lengths, forged, expired and read-only capabilities, a replicated extent past its serve lease, a
migration copy in flight, region commands, NOPs, FLUSHes, zeroing, unknown opcodes, a framing error
at the end). The native connection gets them over a real socket pair in random pieces, from a writer
thread, while a reader thread takes the replies; the reference gets them through an
``AgentConnection`` with the compiled loop switched off. Every completion (status, info, message,
data), what is on the drives afterwards, the copy's recorded writes, the regions, the core's counters
and whether the connection was closed must be the same. Completions are compared by tag: a FLUSH may
complete after commands behind it on both paths, at a moment that depends on the drive's worker thread.

Then what only the threads can get wrong: they really serve (not a vacuous comparison), a large read
sent with sendfile stops when its extent goes away while the peer is not reading, a connection whose
peer never reads its replies is stopped promptly, and ``close_connections`` stops every thread.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nvpool.agents import dataplane as adp
from nvpool.agents.core import AgentCore
from nvpool.agents.drive import DATA_OFFSET
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import Status
from tests.test_compiled_agent import (
    REGIONS,
    caps_frames,
    command_stream,
    completions,
    make_core,
    rnd_drain,
    run_stream,
    template,  # noqa: F401  (a fixture)
)

MiB = 1 << 20
KiB = 1 << 10

pytestmark = pytest.mark.skipif(not adp.native_enabled(), reason="native connections are not built "
                                "(or NVPOOL_PURE_PYTHON=1 / NVPOOL_NATIVE_CONNECTIONS=0)")


def by_tag(sent: bytes) -> dict[int, tuple[int, int, bytes]]:
    out = {}
    for tag, status, info, data in completions(sent):
        assert tag not in out, f"two completions for tag {tag}"
        out[tag] = (status, info, data)
    return out


def stats_of(core: AgentCore) -> tuple[Any, ...]:
    st = core.stats
    return (st.commands, st.bytes_read, st.bytes_written, dict(st.errors),
            {k: list(v) for k, v in st.drives.items()}, {k: list(v) for k, v in st.volumes.items()},
            {op: sum(h[0]) for op, h in st.latency.items()})


def split_bad_end(stream: bytes, bad_end: bool) -> tuple[bytes, bytes]:
    """The stream without its final bad frame, and that frame (b"" if none)."""
    return (stream[:-48], stream[-48:]) if bad_end else (stream, b"")


async def run_native(core: AgentCore, stream: bytes, bad: bytes, cuts: list[int], copy: bool,
                     n_tags: int) -> dict[str, Any]:
    backing = {rid: bytearray(random.Random(rid).randbytes(n)) for rid, n in REGIONS.items()}
    regions = {rid: memoryview(b) for rid, b in backing.items()}  # (released when the connection ends)
    ours, theirs = socket.socketpair()
    conn = adp.NativeConnection(core, ours, regions)
    cp = core.begin_copy(1, 0, 4 * MiB) if copy else None
    received = bytearray()
    closed = threading.Event()
    answered = threading.Event()

    def reader() -> None:
        while True:
            try:
                chunk = theirs.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                closed.set()
                return
            received.extend(chunk)
            if len(completions_safe(bytes(received))) >= n_tags:
                answered.set()

    def writer() -> None:
        pos = 0
        rng = random.Random(len(stream))
        for cut in cuts + [len(stream)]:
            if cut > pos:
                theirs.sendall(stream[pos:cut])
                pos = cut
            if rnd_drain(cut) and rng.random() < 0.5:
                time.sleep(0.001)

    loop = asyncio.get_running_loop()
    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    await loop.run_in_executor(None, writer)
    # every command before the bad frame is answered before the bad frame is sent (as the reference gets
    # it in a receive of its own after draining), then the peer is done
    for _ in range(1000):
        if answered.is_set() or closed.is_set():
            break
        await asyncio.sleep(0.01)
    assert answered.is_set() or closed.is_set(), f"{len(completions_safe(bytes(received)))} of {n_tags} answered"
    for _ in range(200):  # a FLUSH completion may still be on its way (posted after its fdatasync)
        if not conn.inflight:
            break
        await asyncio.sleep(0.01)
    if bad:
        theirs.sendall(bad)
    else:
        theirs.shutdown(socket.SHUT_WR)
    for _ in range(1000):
        if closed.is_set():
            break
        await asyncio.sleep(0.01)
    assert closed.is_set(), "the native connection did not close after the peer was done"
    for _ in range(200):  # the thread's end reaches the event loop
        if conn not in core.stats.live:
            break
        await asyncio.sleep(0.01)
    rt.join(5)
    theirs.close()
    drive = next(iter(core.drives.values()))
    return {
        "sent": bytes(received),
        "closed": True,
        "data": os.pread(drive.fd, 12 * MiB, DATA_OFFSET),
        "copy": sorted(cp.written) if cp is not None else None,
        "regions": {rid: bytes(b) for rid, b in backing.items()},
        "regions_released": not regions,
        "stats": stats_of(core),
        "native": conn.native_stats(),
        "live": conn in core.stats.live,
        "connections": core.stats.connections,
    }


def completions_safe(sent: bytes) -> list[Any]:
    """Completions decoded so far (a partial one at the end is left out)."""
    dec = dp.CompletionDecoder()
    return dec.next_completions(sent)


@pytest.mark.parametrize("seed", range(16))
def test_native_connection_answers_exactly_as_the_python_path(tmp_path: Path, template: Path, seed: int,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(1000 + seed)
    full, bad_end = command_stream(rng, rng.randrange(40, 260), digests=seed % 2 == 0)
    stream, bad = split_bad_end(full, bad_end)
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randrange(1, 40)))
    lease_ok = seed % 5 != 1
    copy = seed % 4 == 3
    n_tags = len(dp.CommandDecoder().next_commands(stream))

    core = make_core(tmp_path, "n", template, lease_ok)
    try:
        native = asyncio.run(run_native(core, stream, bad, cuts, copy, n_tags))
    finally:
        core.close()
    core = make_core(tmp_path, "p", template, lease_ok)
    monkeypatch.setattr(adp, "_cserve", None)
    try:  # the reference gets the bad frame alone, after everything before it was answered
        ref = asyncio.run(run_stream(core, stream + bad, cuts + ([len(stream)] if bad else []), 0, copy))
    finally:
        monkeypatch.undo()
        core.close()

    assert by_tag(native["sent"]) == by_tag(ref["sent"])
    assert len(by_tag(native["sent"])) == n_tags
    assert native["copy"] == ref["copy"]
    assert native["stats"] == ref["stats"]
    assert native["data"] == ref["data"]
    assert native["regions"] == ref["regions"]
    assert ref["closed"][0] == bool(bad)  # (the reference closes only on the framing error)
    assert not native["live"] and native["connections"] == 0 and native["regions_released"]


def auth_and(frames: list[bytes]) -> bytes:
    return b"".join(caps_frames(1) + frames)


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def test_the_native_thread_serves_the_plain_commands(tmp_path: Path, template: Path) -> None:  # noqa: F811
    """Not a vacuous comparison: after the capabilities (handed to Python once), a stream of plain reads
    and writes, small and large, is served by the thread itself, with the right bytes."""
    core = make_core(tmp_path, "s", template, True)
    drive = next(iter(core.drives.values()))
    frames = []
    for i in range(64):
        frames.append(dp.encode_command(dp.WRITE, 100 + i, 1, i * 4 * KiB, 4 * KiB, 1) + bytes([i]) * 4 * KiB)
    for i in range(64):
        frames.append(dp.encode_command(dp.READ, 200 + i, 1, i * 4 * KiB, 4 * KiB, 1))
    frames.append(dp.encode_command(dp.READ, 300, 1, MiB, 2 * MiB, 1))  # large: sendfile

    async def go() -> tuple[dict[str, int], list[Any]]:
        ours, theirs = socket.socketpair()
        conn = adp.NativeConnection(core, ours)
        theirs.sendall(caps_frames(1)[0])  # volume 10's capability alone first
        await asyncio.get_running_loop().run_in_executor(None, recv_exact, theirs, 24)
        theirs.sendall(b"".join(frames))
        want = 64 * 24 + 64 * (24 + 4 * KiB) + 24 + 2 * MiB
        got = await asyncio.get_running_loop().run_in_executor(None, recv_exact, theirs, want)
        theirs.close()
        for _ in range(200):
            if conn not in core.stats.live:
                break
            await asyncio.sleep(0.01)
        return conn.native_stats(), [(c.tag, c.status, bytes(c.payload or b"")) for c in
                                     dp.CompletionDecoder().next_completions(got)]

    stats, comps = asyncio.run(go())
    assert [c[0] for c in comps] == list(range(100, 164)) + list(range(200, 264)) + [300]
    assert all(c[1] == 0 for c in comps)
    assert [c[2] for c in comps[64:128]] == [bytes([i]) * 4 * KiB for i in range(64)]
    assert comps[128][2] == os.pread(drive.fd, 2 * MiB, DATA_OFFSET + MiB)
    assert stats["handoffs"] == 1 and stats["served"] == 128 and stats["large_reads"] == 1, stats
    assert core.stats.commands == 1 + 129 and core.stats.volumes[10] == [64 * 4 * KiB + 2 * MiB, 64 * 4 * KiB]
    core.close()


@pytest.mark.parametrize("path", ["native", "asyncio"])
def test_a_large_read_never_sends_bytes_written_after_its_extent_went_away(
        tmp_path: Path, template: Path, path: str) -> None:  # noqa: F811
    """A 4 MiB READ to a peer that reads slowly; half-way its extent is released and its bytes are
    overwritten (as another volume's would be once the space is reused). The peer must never receive a
    byte written after the release. The native thread reads and sends in steps, checking the command
    again before each: it closes the connection at the first step after the release. The asyncio path
    reads the whole command at once when it serves it. (With ``sendfile``, which both used before,
    the socket held references to page-cache pages and the peer received the new bytes.)"""
    core = make_core(tmp_path, "l", template, True)
    drive = next(iter(core.drives.values()))
    old = os.pread(drive.fd, 4 * MiB, DATA_OFFSET)

    async def go() -> tuple[bytes, bool]:
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        conn: Any
        if path == "native":
            conn = adp.NativeConnection(core, ours)
        else:
            ours.setblocking(False)
            _t, conn = await loop.connect_accepted_socket(lambda: adp.AgentConnection(core), ours)
        theirs.sendall(caps_frames(1)[0])
        await loop.run_in_executor(None, recv_exact, theirs, 24)
        theirs.sendall(dp.encode_command(dp.READ, 7, 1, 0, 4 * MiB, 1))
        first = await loop.run_in_executor(None, recv_exact, theirs, 24 + 4 * KiB)
        await asyncio.sleep(0.5)  # the agent is now waiting for room in the socket
        core.release([1])
        os.pwrite(drive.fd, b"\xee" * 4 * MiB, DATA_OFFSET)  # the bytes of whoever gets the space next
        rest = bytearray()

        def drain() -> None:
            theirs.settimeout(2.0)
            try:
                while chunk := theirs.recv(1 << 20):
                    rest.extend(chunk)
            except TimeoutError:
                pass

        await loop.run_in_executor(None, drain)
        theirs.close()
        for _ in range(200):
            if conn not in core.stats.live:
                break
            await asyncio.sleep(0.01)
        return first + bytes(rest), conn in core.stats.live

    got, _live = asyncio.run(go())
    magic, status, _flags, tag, length, _res, _info = dp.COMPLETION.unpack(got[:24])
    assert (tag, status, length) == (7, 0, 4 * MiB)
    data = got[24 : 24 + 4 * MiB]
    assert data == old[: len(data)], "bytes written after the release reached the peer"
    if path == "native":
        assert len(data) < 4 * MiB, "the read went on after its extent was released"
    core.close()


def test_a_peer_that_never_reads_is_stopped_promptly(tmp_path: Path, template: Path) -> None:  # noqa: F811
    """A peer pipelines reads and never reads a reply: its thread blocks in send (the commands wait in
    the kernel, the thread's memory stays bounded), and close_connections stops it at once."""
    core = make_core(tmp_path, "h", template, True)

    async def go() -> float:
        ours, theirs = socket.socketpair()
        conn = adp.NativeConnection(core, ours)
        theirs.sendall(caps_frames(1)[0])
        await asyncio.get_running_loop().run_in_executor(None, recv_exact, theirs, 24)
        theirs.setblocking(False)
        sent = 0
        burst = b"".join(dp.encode_command(dp.READ, i, 1, (i % 64) * 32 * KiB, 32 * KiB, 1) for i in range(1000))
        for _ in range(200):
            try:
                sent += theirs.send(burst)
            except BlockingIOError:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.3)
        assert conn in core.stats.live
        t0 = time.monotonic()
        adp.close_connections(core)
        took = time.monotonic() - t0
        assert conn not in core.stats.live and core.stats.connections == 0
        theirs.close()
        return took

    assert asyncio.run(go()) < 2.0
    core.close()


def test_a_connection_without_a_capability_is_answered_denied_and_closed(
        tmp_path: Path, template: Path) -> None:  # noqa: F811
    core = make_core(tmp_path, "d", template, True)

    async def go() -> bytes:
        ours, theirs = socket.socketpair()
        conn = adp.NativeConnection(core, ours)
        theirs.sendall(dp.encode_command(dp.READ, 5, 1, 0, 4 * KiB, 1))
        loop = asyncio.get_running_loop()

        def drain() -> bytes:
            out = bytearray()
            while chunk := theirs.recv(65536):
                out += chunk
            return bytes(out)

        got = await loop.run_in_executor(None, drain)
        for _ in range(200):
            if conn not in core.stats.live:
                break
            await asyncio.sleep(0.01)
        theirs.close()
        return got

    (comp,) = dp.CompletionDecoder().next_completions(asyncio.run(go()))
    assert comp.tag == 5 and comp.status == Status.DENIED
    core.close()


def test_ended_connections_leave_nothing_behind(tmp_path: Path, template: Path) -> None:  # noqa: F811
    """Connections that come and go: each one's objects are freed when it ends (the thread's callback
    into its Python side once made a reference cycle no collector could see), and the agent's count
    of connections goes back to zero."""
    import gc
    import weakref

    core = make_core(tmp_path, "g", template, True)

    async def go() -> list[weakref.ref[adp.NativeConnection]]:
        refs = []
        for _ in range(40):
            ours, theirs = socket.socketpair()
            conn = adp.NativeConnection(core, ours)
            theirs.sendall(caps_frames(1)[0] + dp.encode_command(dp.READ, 9, 1, 0, 4 * KiB, 1))
            await asyncio.get_running_loop().run_in_executor(None, recv_exact, theirs, 24 + 24 + 4 * KiB)
            theirs.close()
            refs.append(weakref.ref(conn))
            del conn
        for _ in range(300):
            if core.stats.connections == 0:
                break
            await asyncio.sleep(0.01)
        return refs

    refs = asyncio.run(go())
    gc.collect()
    assert core.stats.connections == 0
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of 40 ended connections are still alive"
    core.close()



def test_a_framing_error_deep_in_a_pipeline_closes_the_connection(tmp_path: Path, template: Path) -> None:  # noqa: F811
    """3000 pipelined reads, a bad header, then more reads, in one send: the thread serves the reads in
    many batches (remembering how far the framing was already checked), never answers anything after
    the bad header, and closes the connection."""
    core = make_core(tmp_path, "f", template, True)
    drive = next(iter(core.drives.values()))

    async def go() -> bytes:
        ours, theirs = socket.socketpair()
        adp.NativeConnection(core, ours)
        good = b"".join(dp.encode_command(dp.READ, 100 + i, 1, (i % 256) * 4 * KiB, 4 * KiB, 1) for i in range(3000))
        after = b"".join(dp.encode_command(dp.READ, 9000 + i, 1, 0, 4 * KiB, 1) for i in range(10))
        theirs.sendall(caps_frames(1)[0])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, recv_exact, theirs, 24)

        def exchange() -> bytes:
            out = bytearray()
            t = threading.Thread(target=theirs.sendall, args=(good + b"\xde\xad" + bytes(46) + after,), daemon=True)
            t.start()
            while chunk := theirs.recv(1 << 20):
                out += chunk
            return bytes(out)

        got = await loop.run_in_executor(None, exchange)
        theirs.close()
        return got

    comps = dp.CompletionDecoder().next_completions(asyncio.run(go()))
    tags = [c.tag for c in comps]
    assert tags == list(range(100, 100 + len(tags))), "answers out of order, or after the bad header"
    assert all(c.status == 0 for c in comps)
    for c in comps[:: max(1, len(comps) // 20)]:
        off = ((c.tag - 100) % 256) * 4 * KiB
        assert bytes(c.payload or b"") == os.pread(drive.fd, 4 * KiB, DATA_OFFSET + off)
    assert len(tags) <= 3000
    core.close()
