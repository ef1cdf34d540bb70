"""The NBD export's compiled transmission loop (client/nbd/_cnbd.c, client/nbd/engine.py).

Differential tests hold the engine to the Python specification: its request validation is the codec's
(``ServerConnection._validate``) on random headers, and its address math is ``Layout.single_piece``
on random layouts. Against real processes (a metadata service, four agents, ``nvpool export``), a pool
volume exported through the engine serves reads and writes that match a model byte for byte, with
simple and structured replies, the requests it hands to Python (spanning pieces, large, FLUSH/TRIM/
WRITE_ZEROES) included; every degenerate request gets the answer nbdkit gives; a client that stops
reading replies keeps memory bounded; an agent killed and restarted mid-stream loses no request and the
engine goes back to serving from C; a completion whose agent connection is declared lost while the
engine answers it is answered once (a test hook in _cnbd.c holds the window open); a writer fenced by a
forced take-over writes nothing more.
"""

from __future__ import annotations

import os
import random
import re
import select
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvpool.client.nbd import proto as nbd
from nvpool.client.cluster import LocalCluster, pid_alive
from nvpool.proto import compiled
from nvpool.proto.layout import Layout
from tests.test_layout import layouts
from tests.test_nbd_hostile import (CASES, EXPORT_SIZE, RSS_LIMIT_MIB, Case, Peer, Server, errorname, header, peak_rss_mib,
                                    rss_mib, run_case, spawn_export)

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
_cnbd: Any = compiled.load("nvpool.client.nbd._cnbd")
needs_engine = pytest.mark.skipif(_cnbd is None, reason="the compiled NBD engine is not in use (not built, or NVPOOL_PURE_PYTHON)")


# ---------------------------------------------------------------------------- differential: the engine vs the codec
EDGE64 = [0, 1, 4095, 4096, MiB, 96 * MiB - 1, 96 * MiB, 2**63, 2**64 - 4096, 2**64 - 1]
EDGE32 = [0, 1, 4096, MiB, 32 * MiB, 32 * MiB + 1, 64 * MiB, 64 * MiB + 1, 128 * MiB + 1, 2**32 - 1]


@needs_engine
@settings(max_examples=3000, deadline=None)
@given(cmd=st.one_of(st.integers(0, 9), st.sampled_from([99, 0xFFFF])),
       flags=st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 5, 0x20, 0x8000]), st.integers(0, 0xFFFF)),
       offset=st.one_of(st.sampled_from(EDGE64), st.integers(0, 2**64 - 1)),
       length=st.one_of(st.sampled_from(EDGE32), st.integers(0, 2**32 - 1)),
       size=st.sampled_from([4096, 96 * MiB, 2**40]), max_block=st.sampled_from([32 * MiB, 64 * MiB]),
       read_only=st.booleans(), structured=st.booleans(), bsn=st.booleans())
def test_engine_validation_is_the_codecs(cmd: int, flags: int, offset: int, length: int, size: int, max_block: int,
                                         read_only: bool, structured: bool, bsn: bool) -> None:
    codec = nbd.ServerConnection(lambda name: None, lambda: [])
    codec.export = nbd.ExportInfo("v", size, read_only, max_block=max_block)
    codec.structured, codec.block_size_negotiated = structured, bsn
    expected = codec._validate(cmd, flags, offset, length)[0]
    assert _cnbd.validate(size, codec.export.max_block, read_only, structured, bsn, cmd, flags, offset, length) == expected


def engine_columns(lay: Layout) -> list[list[tuple[int, int, int, int]]]:
    return [[(start, e.length, e.extent_id, int(e.drive_id[5:])) for start, e in zip(col.starts, col.extents)]
            for col in lay.columns]


@needs_engine
@settings(max_examples=400, deadline=None)
@given(lay=layouts(), data=st.data())
def test_engine_address_math_is_single_piece(lay: Layout, data: st.DataObject) -> None:
    cols = engine_columns(lay)
    for _ in range(20):
        offset = data.draw(st.integers(0, lay.size - 1))
        length = data.draw(st.integers(1, min(lay.size - offset, 3 * lay.stripe_unit)))
        p = lay.single_piece(offset, length, write=False)
        got = _cnbd.map_piece(lay.stripe_unit, cols, offset, length)
        if p is None:
            assert got is None, (offset, length)
        else:
            assert got == (int(p.extent.drive_id[5:]), p.extent.extent_id, p.extent_offset), (offset, length)


# ---------------------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def engine_export(local_pool: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from nvpool import client

    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("engvol", EXPORT_SIZE, stripe_unit="256K")
    work = tmp_path_factory.mktemp("nbd-engine")
    server = start_pool_export(local_pool, work, "engvol")
    try:
        yield server
    finally:
        server.stop()
    text = server.log_text()
    assert "Traceback" not in text and "Fatal error" not in text, text[-3000:]


def start_pool_export(cluster: LocalCluster, work: Path, volume: str) -> Server:
    return spawn_export(work, volume, ["-vv", "export", volume, "--meta", cluster.meta.address])


SUMMARY = re.compile(r"NBD client (?P<peer>\S+): compiled engine served (?P<reads>\d+) reads and (?P<writes>\d+) writes, "
                     r"Python (?P<python>\d+) requests \((?P<handed_back>\d+) handed back by agents\), (?P<lost>\d+) agent "
                     r"connections lost")
OPENED = re.compile(r"NBD client (?P<peer>\S+) opened export")


def engine_summaries(server: Server, since: int = 0, peer: Optional[str] = None) -> list[dict[str, int]]:
    """The per-connection summaries the export logs when an engine connection ends (``peer``: only that
    connection's)."""
    out = []
    for line in server.log_text()[since:].splitlines():
        m = SUMMARY.search(line)
        if m and (peer is None or m["peer"] == peer):
            out.append({k: int(v) for k, v in m.groupdict().items() if k != "peer"})
    return out


def wait_summaries(server: Server, n: int, since: int = 0, peer: Optional[str] = None) -> list[dict[str, int]]:
    deadline = time.monotonic() + 10
    while len(got := engine_summaries(server, since, peer)) < n:
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.02)
    return got


def opened_peer(server: Server, since: int) -> str:
    """The export's name for the first connection opened after log position ``since`` (the export
    numbers Unix-socket clients, so an earlier test's connection that ends late is not mistaken for it)."""
    deadline = time.monotonic() + 10
    while (m := OPENED.search(server.log_text()[since:])) is None:
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.02)
    return m["peer"]


def reply_any(p: Peer, want: dict[int, Optional[bytes]]) -> tuple[int, int, bytes]:
    """The next reply, whichever request it answers (a simple READ reply's length is the request's)."""
    (magic,) = struct.unpack(">I", p.recv(4))
    if magic == nbd.SIMPLE_REPLY_MAGIC:
        error, handle = struct.unpack(">IQ", p.recv(12))
        return error, handle, p.recv(len(want.get(handle) or b"")) if not error else b""
    assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
    flags, rtype, handle, length = struct.unpack(">HHQI", p.recv(16))
    assert flags & nbd.REPLY_FLAG_DONE, "one chunk per reply"
    body = p.recv(length)
    if rtype & 0x8000:
        return struct.unpack_from(">I", body)[0], handle, b""
    return 0, handle, body[8:] if rtype == nbd.REPLY_TYPE_OFFSET_DATA else b""


@needs_engine
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_engine_reads_and_writes_match_a_model(engine_export: Server, structured: bool) -> None:
    since = len(engine_export.log_text())
    rng = random.Random(7 + structured)
    base = 48 * MiB if structured else 56 * MiB  # each run its own 8 MiB
    model = bytearray(os.urandom(8 * MiB))
    p = Peer(engine_export.sock, structured=structured)
    peer = opened_peer(engine_export, since)
    p.send(nbd.CMD_WRITE, 1, 0, base, len(model), bytes(model))  # 8 MiB: one request, served by Python
    assert p.reply()[:2] == (0, 1)
    handle = 10
    for _ in range(300):  # pipelined in batches: small ones in C, pieces spanning stripe units in Python
        batch: list[tuple[int, Optional[bytes]]] = []
        busy: list[tuple[int, int]] = []
        for _ in range(rng.randint(1, 24)):
            off = rng.randrange(0, len(model) - 4096) & ~511
            n = min(rng.choice([512, 4096, 4096, 65536, 256 * 1024, 300 * 1024]), len(model) - off)
            if any(off < e and s < off + n for s, e in busy):
                continue  # requests in flight together are unordered (NBD): keep a batch's ranges apart
            busy.append((off, off + n))
            handle += 1
            if rng.random() < 0.4:
                blob = os.urandom(n)
                model[off : off + n] = blob
                p.send(nbd.CMD_WRITE, handle, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0, base + off, n, blob)
                batch.append((handle, None))
            else:
                p.send(nbd.CMD_READ, handle, 0, base + off, n)
                batch.append((handle, bytes(model[off : off + n])))
        want = dict(batch)  # replies come in any order (different agents): match them by handle
        while want:
            error, h, data = reply_any(p, want)
            assert error == 0 and h in want, (error, h)
            expect = want.pop(h)
            if expect is not None:
                assert data == expect, f"handle {h}: wrong bytes"
    for cmd in (nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES):  # served by Python, then read back through C
        p.send(cmd, 5, 0, base + MiB, 64 * 1024)
        assert p.reply()[:2] == (0, 5)
        model[MiB : MiB + 64 * 1024] = bytes(64 * 1024)
    p.send(nbd.CMD_FLUSH, 6)
    assert p.reply()[:2] == (0, 6)
    p.send(nbd.CMD_READ, 7, 0, base, len(model))
    assert p.reply(len(model)) == (0, 7, bytes(model))
    p.send(nbd.CMD_DISC, 8)
    p.close()
    (summary,) = wait_summaries(engine_export, 1, since, peer)
    assert summary["reads"] > 500 and summary["writes"] > 300 and summary["python"] > 20, summary


@needs_engine
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_engine_answers_degenerate_requests_as_nbdkit_does(engine_export: Server, case: Case) -> None:
    # the same table test_nbd_hostile runs against nbdkit and the file export; WRITEs go past the
    # first 32 MiB, which the other tests here use
    if case.cmd == nbd.CMD_WRITE and case.offset == 0 and case.length <= 64 * MiB:
        case = Case(case.name, case.cmd, case.expect, case.flags, 32 * MiB if case.length <= 64 * MiB else 0,
                    case.length, case.payload, case.structured)
    expected = "closed" if case.expect == "closed" else f"{errorname(int(case.expect))}, then in step"
    assert run_case(engine_export.sock, case) == expected


@needs_engine
def test_engine_drops_garbage_with_one_line_and_serves_the_rest(engine_export: Server) -> None:
    keep = Peer(engine_export.sock)
    bad = Peer(engine_export.sock)
    bad.sock.sendall(b"\xff" * 28)
    with pytest.raises((EOFError, ConnectionResetError)):
        bad.reply()
    bad.close()
    keep.send(nbd.CMD_READ, 5, 0, 0, 4096)
    assert keep.reply(4096)[:2] == (0, 5)
    keep.close()
    deadline = time.monotonic() + 5
    while "bad request magic 0xffffffff" not in engine_export.log_text():
        assert time.monotonic() < deadline, engine_export.log_text()[-2000:]
        time.sleep(0.02)


@needs_engine
def test_engine_memory_stays_bounded_when_replies_are_not_read(engine_export: Server) -> None:
    p = Peer(engine_export.sock)
    content = os.urandom(4 * MiB)
    p.send(nbd.CMD_WRITE, 1, 0, 0, len(content), content)
    assert p.reply()[:2] == (0, 1)
    before = rss_mib(engine_export.pid)
    hostile = Peer(engine_export.sock)
    n = 3000  # 3000 x 1 MiB READs (C serves them: one stripe unit each), never read
    hostile.sock.sendall(b"".join(header(nbd.CMD_READ, i, 0, (i % 16) * 256 * 1024, 256 * 1024) for i in range(n)))
    peak = peak_rss_mib(engine_export.pid, 1.5)
    print(f"\nexport RSS: {before:.0f} MiB before, {peak:.0f} MiB peak with {n} x 256 KiB READs unread")
    assert peak < RSS_LIMIT_MIB, f"export grew from {before:.0f} to {peak:.0f} MiB"
    p.send(nbd.CMD_READ, 2, 0, 4096, 4096)  # another connection is served meanwhile
    assert p.reply(4096) == (0, 2, content[4096:8192])
    p.close()
    for _ in range(n):  # the stalled client resumes: every reply, with the right bytes
        error, handle, data = hostile.reply(256 * 1024)
        off = (handle % 16) * 256 * 1024
        assert error == 0 and data == content[off : off + 256 * 1024], handle
    hostile.close()


@needs_engine
@pytest.mark.slow
def test_engine_loses_nothing_when_an_agent_is_killed_and_restarted(local_pool: LocalCluster, engine_export: Server) -> None:
    since = len(engine_export.log_text())
    content = os.urandom(4 * MiB)
    p = Peer(engine_export.sock, structured=True)
    peer = opened_peer(engine_export, since)
    p.send(nbd.CMD_WRITE, 1, 0, 0, len(content), content)
    assert p.reply()[:2] == (0, 1)
    handle, rng = 10, random.Random(3)

    def round_of_reads(k: int) -> None:
        nonlocal handle
        want: dict[int, Optional[bytes]] = {}
        for _ in range(k):
            handle += 1
            off = rng.randrange(0, len(content) // 4096) * 4096
            p.send(nbd.CMD_READ, handle, 0, off, 4096)
            want[handle] = content[off : off + 4096]
        while want:
            error, h, data = reply_any(p, want)
            assert error == 0 and data == want.pop(h), h

    round_of_reads(64)
    local_pool.kill_agent(1)  # SIGKILL: its engine connection breaks
    t0 = time.monotonic()
    killed_reads = threading.Thread(target=round_of_reads, args=(64,))  # some wait for the agent to come back
    killed_reads.start()
    time.sleep(0.5)
    local_pool.start_agent(1)
    killed_reads.join(60)
    assert not killed_reads.is_alive(), "reads did not complete after the agent came back"
    print(f"\nreads across the agent's restart completed in {time.monotonic() - t0:.1f}s")
    time.sleep(2.5)  # the link reconnects to the restarted agent within a second or two
    for _ in range(4):  # (a client that sends more than the budget without reading replies stalls itself)
        round_of_reads(64)
    p.send(nbd.CMD_DISC, 2)
    p.close()
    (summary,) = wait_summaries(engine_export, 1, since, peer)
    assert summary["lost"] >= 1 and summary["python"] >= 1, summary
    assert summary["reads"] >= 64 + 200, summary  # served from C again after the reconnect


@needs_engine
def test_engine_writer_fenced_by_a_forced_takeover_writes_nothing(local_pool: LocalCluster,
                                                                  tmp_path: Path) -> None:
    from nvpool import client

    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("engfence", 8 * MiB, stripe_unit="1M")
    server = start_pool_export(local_pool, tmp_path, "engfence")
    try:
        p = Peer(server.sock)
        p.send(nbd.CMD_WRITE, 1, 0, 0, 4096, b"\x11" * 4096)
        assert p.reply()[:2] == (0, 1)
        with client.connect(local_pool.meta.address) as pool:
            vol = pool.open("engfence", force=True)  # fences the export's writer generation on the agents
            vol.write(0, b"\x22" * 4096)
            vol.flush()
            for i in range(8):  # every later write of the export fails: on each of the volume's 8 stripe units
                p.send(nbd.CMD_WRITE, 10 + i, 0, i * MiB, 4096, b"\x33" * 4096)
                error, handle, _ = p.reply()
                assert handle == 10 + i and error != 0, "a fenced writer's write succeeded"
            assert bytes(vol.read(0, 4096)) == b"\x22" * 4096
            assert all(bytes(vol.read(i * MiB, 4096)) != b"\x33" * 4096 for i in range(1, 8))
            vol.close()
        p.close()
    finally:
        server.stop()


@needs_engine
def test_engine_refused_write_and_the_requests_after_it_in_one_segment(engine_export: Server) -> None:
    p = Peer(engine_export.sock)
    blob = os.urandom(4096)
    p.send(nbd.CMD_WRITE, 1, 0, 40 * MiB, 4096, blob)
    assert p.reply()[:2] == (0, 1)
    # a WRITE past the end (refused, its payload skipped), then a READ and a FLUSH, all in one send
    p.sock.sendall(header(nbd.CMD_WRITE, 2, 0, EXPORT_SIZE - 2048, 4096) + bytes(4096)
                   + header(nbd.CMD_READ, 3, 0, 40 * MiB, 4096) + header(nbd.CMD_FLUSH, 4))
    got = {}
    for _ in range(3):
        error, handle, data = reply_any(p, {3: blob})
        got[handle] = (error, data)
    assert got == {2: (nbd.ENOSPC, b""), 3: (0, blob), 4: (0, b"")}
    p.close()


@needs_engine
def test_engine_reads_and_writes_show_in_the_exports_metrics(local_pool: LocalCluster, tmp_path: Path) -> None:
    from nvpool import client

    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("engmetrics", 8 * MiB, stripe_unit="1M")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = spawn_export(tmp_path, "engmetrics", ["-v", "export", "engmetrics", "--meta", local_pool.meta.address,
                                                   "--metrics", f"127.0.0.1:{port}"])

    def ops() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {m.group(1) + ":" + m.group(2): float(m.group(3)) for m in
                re.finditer(r'^nvpool_client_(operations|bytes)_total\{op="(\w+)"\} (\S+)$', text, re.M)}

    try:
        p = Peer(server.sock)
        for i in range(100):  # served by the engine (one stripe unit each)
            p.send(nbd.CMD_WRITE, i, 0, (i % 8) * MiB + 4096, 4096, bytes(4096))
            assert p.reply()[:2] == (0, i)
            p.send(nbd.CMD_READ, 1000 + i, 0, (i % 8) * MiB, 8192)
            assert p.reply(8192)[:2] == (0, 1000 + i)
        live = ops()  # while the connection is open: the engine's live counters
        assert live["operations:read"] >= 100 and live["bytes:read"] >= 100 * 8192, live
        assert live["operations:write"] >= 100 and live["bytes:write"] >= 100 * 4096, live
        p.send(nbd.CMD_DISC, 1)
        p.close()
        deadline = time.monotonic() + 10
        while "compiled engine served" not in server.log_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        after = ops()  # after it ended: kept, not counted twice
        assert after["operations:read"] == live["operations:read"], (live, after)
        assert after["bytes:write"] == live["bytes:write"], (live, after)
    finally:
        server.stop()


#: the test hook in client/nbd/_cnbd.c: a receiver waits this long between reading a completion's slot and
#: committing its answer
ANSWER_DELAY_ENV = "NVPOOL_TEST_CNBD_ANSWER_DELAY"


@needs_engine
def test_engine_answers_once_when_the_agent_connection_is_lost_while_it_answers(
        local_pool: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A receiver has read an agent's completion and checked its slot when the reader, sending to the same
    # (killed) agent, declares the connection lost and hands the slot to Python. The request must be
    # answered once, by whichever side claims the slot first: here Python, the hook holding the receiver
    # in between for longer than the slow path takes (an answer from both would come as two replies for
    # one handle, and count the request out of flight twice, so the connection never ends).
    from nvpool import client

    delay = 6.0
    content = os.urandom(8 * MiB)
    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("engrace", len(content), stripe_unit="1M")
        vol = pool.open("engrace")
        vol.write(0, content)
        vol.flush()
        (piece,) = vol.asyncio.layout.map(0, 1)
        holder = vol.asyncio.endpoints[piece.extent.drive_id].agent_id
        vol.close()
    victim = [a.name for a in local_pool.agents].index(holder)
    monkeypatch.setenv(ANSWER_DELAY_ENV, str(delay))
    server = start_pool_export(local_pool, tmp_path, "engrace")
    monkeypatch.delenv(ANSWER_DELAY_ENV)  # (the agent restarted below inherits the environment)
    try:
        p = Peer(server.sock)
        peer = opened_peer(server, 0)
        want: dict[int, Optional[bytes]] = {1: content[:4096], 2: content[8192:12288], 3: None}
        t0 = time.monotonic()
        p.send(nbd.CMD_READ, 1, 0, 0, 4096)  # served from C: the receiver holds its completion in the window
        time.sleep(1.0)
        assert not select.select([p.sock], [], [], 0)[0], "the hook did not hold the completion"
        local_pool.kill_agent(victim)
        p.send(nbd.CMD_READ, 2, 0, 8192, 4096)  # the reader's send to the dead agent fails: both go to Python
        local_pool.start_agent(victim)  # which serves them once the agent is back
        answered: list[tuple[int, int, bytes]] = []

        def until(handle: int) -> None:
            while handle not in {h for _, h, _ in answered}:
                error, h, data = reply_any(p, want)
                assert h not in {h for _, h, _ in answered}, f"handle {h} answered twice"
                answered.append((error, h, data))

        until(1)
        until(2)
        took = time.monotonic() - t0
        print(f"\nthe slow path answered both in {took:.1f}s; the receiver was held {delay:.0f}s")
        assert took < delay - 1, f"the slow path took {took:.1f}s: raise the delay to keep the window open"
        time.sleep(max(0.0, t0 + delay + 0.5 - time.monotonic()))  # the receiver leaves the window
        p.send(nbd.CMD_FLUSH, 3)
        until(3)
        assert sorted(answered) == [(0, 1, want[1]), (0, 2, want[2]), (0, 3, b"")]
        p.send(nbd.CMD_DISC, 4)
        p.close()
        # the connection ends only once no request is in flight: each one was counted out once
        (summary,) = wait_summaries(server, 1, 0, peer)
        assert (summary["reads"], summary["python"], summary["handed_back"], summary["lost"]) == (2, 3, 2, 1), summary
    finally:
        server.stop()
        if not pid_alive(local_pool.agents[victim].pid):
            local_pool.start_agent(victim)
        local_pool.wait_registered()
    text = server.log_text()
    assert "Traceback" not in text and "no such request" not in text, text[-3000:]
