"""The agent's compiled command loop (``agents/_cserve.c``) against its reference, the pure-Python path.

Both run the same byte streams (seeded random mixes of good and bad commands: reads, writes with and
without FUA, digests, stale generations, unknown extents, ranges past the end, zero lengths, forged,
expired and read-only capabilities, a replicated extent past its serve lease, a migration copy in
flight, NOPs, FLUSHes, zeroing, unknown opcodes, a framing error at the end), cut at random points so
frames straddle receives, through an ``AgentConnection`` on a fake transport that also stops
consuming replies now and then. Two cores on identical drive files answer them: one with the compiled
loop, one with it switched off. Every completion (status, info, message, data), their order, what is
on the drives afterwards, the copy's recorded writes, the write-intent marks, the core's counters and whether the connection
was closed must be the same.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from nvpool.agents import dataplane as adp
from nvpool.agents import drive as drive_mod
from nvpool.agents.core import AgentCore
from nvpool.agents.drive import DATA_OFFSET, Drive, DriveSpec
from nvpool.proto import capability
from nvpool.proto import dataplane as dp
from nvpool.proto.records import ExtentRecord
from nvpool.proto.errors import Status

MiB = 1 << 20
KiB = 1 << 10
SECRET = b"s" * 32

pytestmark = pytest.mark.skipif(adp._cserve is None, reason="the compiled agent loop is not built "
                                "(or NVPOOL_PURE_PYTHON=1)")


class FakeTransport:
    """Records what the agent sends; ``pause_after`` bytes unconsumed make it call pause_writing."""

    def __init__(self, proto: adp.AgentConnection, pause_after: int) -> None:
        self.proto = proto
        self.sent = bytearray()
        self.unconsumed = 0
        self.pause_after = pause_after
        self.paused = False
        self.closing = False
        self.aborted = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int = 0, low: int = 0) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.unconsumed

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: Any) -> None:
        self.sent += bytes(data)
        self.unconsumed += len(data)
        if self.pause_after and self.unconsumed > self.pause_after and not self.paused:
            self.paused = True
            self.proto.pause_writing()

    def writelines(self, frames: Any) -> None:
        for f in frames:
            self.write(f)

    def drain(self) -> None:
        self.unconsumed = 0
        if self.paused:
            self.paused = False
            self.proto.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True
        self.proto.connection_lost(None)


EXTENTS = [  # id, offset in the drive's data area, length, volume, fence, replicas
    (1, 0, 4 * MiB, 10, 1, 1),
    (2, 4 * MiB, 2 * MiB, 11, 5, 1),  # fenced at generation 5
    (3, 6 * MiB, 2 * MiB, 12, 1, 2),  # replicated; the serve lease may have run out
    (4, 8 * MiB, 1 * MiB, 13, 1, 1),  # volume 13: only a read-only capability
    (5, 9 * MiB, 1 * MiB, 14, 1, 1),  # volume 14: an expired capability
    (6, 10 * MiB, 2 * MiB, 15, 1, 1),  # volume 15: capability bound to generation <= 3
]


def caps_frames(tag0: int) -> list[bytes]:
    now = int(time.time())
    caps = [capability.Capability(10, capability.WRITE, 100, now + 3600),
            capability.Capability(11, capability.WRITE, 100, now + 3600),
            capability.Capability(12, capability.WRITE, 100, now + 3600),
            capability.Capability(13, capability.READ, 100, now + 3600),
            capability.Capability(14, capability.WRITE, 100, now - 5),
            capability.Capability(15, capability.WRITE, 3, now + 3600)]
    out = []
    for i, cap in enumerate(caps):
        blob = capability.sign(cap, SECRET)
        out.append(dp.encode_command(dp.Opcode.AUTH, tag0 + i, length=len(blob)) + blob)
    return out


#: regions registered on the connection (id -> bytes), as the same-host transport registers them
REGIONS = {3: 1 * MiB, 5: 64 * KiB}


def command_stream(rng: random.Random, n: int, digests: bool) -> tuple[bytes, bool]:
    """``n`` commands after the capabilities; True if it ends with a framing error."""
    frames = caps_frames(1)
    tag = 100
    for _ in range(n):
        tag += 1
        kind = rng.random()
        ext, _off, length, _vol, fence, _rep = rng.choice(EXTENTS)
        gen = fence + rng.choice((0, 0, 0, 1, 7)) if rng.random() > 0.08 else max(0, fence - 1)
        size = rng.choice((512, 4 * KiB, 4 * KiB, 8 * KiB, 60 * KiB, 64 * KiB, 200 * KiB))
        off = rng.randrange(0, max(1, length - size)) if rng.random() > 0.05 else length - size // 2
        if rng.random() < 0.03:
            ext = 99  # not on this agent
        flags = 0
        if digests and rng.random() < 0.15:
            flags |= dp.HDGST | (dp.DDGST if rng.random() < 0.5 else 0)
        if kind < 0.36:
            if rng.random() < 0.03:
                size = 0
            frames.append(dp.encode_command(dp.READ, tag, ext, off, size, gen, flags))
        elif kind < 0.72:
            if rng.random() < 0.2:
                flags |= dp.FUA
            data = rng.randbytes(size)
            hdr = dp.encode_command(dp.WRITE, tag, ext, off, size, gen, flags)
            frame = b"".join(bytes(f) for f in dp.command_frames(hdr, data, flags))
            if flags & dp.DDGST and rng.random() < 0.3:  # a damaged payload: DIGEST, framing intact
                frame = frame[:-1] + bytes([frame[-1] ^ 1])
            frames.append(frame)
        elif kind < 0.84:  # the same-host transport: data through a registered region (or not)
            op = dp.Opcode.READ_REGION if rng.random() < 0.5 else dp.Opcode.WRITE_REGION
            region = rng.choice((3, 3, 3, 5, 9))  # 9 is not registered
            roff = rng.randrange(0, REGIONS[3]) if rng.random() < 0.9 else REGIONS[3] - size // 2
            if region == 5:
                roff = rng.randrange(0, 2 * REGIONS[5])
            if rng.random() < 0.1:
                flags |= dp.FUA
            if rng.random() < 0.03:
                size = 0
            frames.append(dp.encode_command(op, tag, ext, off, size, gen, flags & ~dp.DDGST, region, roff))
        elif kind < 0.88:
            frames.append(dp.encode_command(dp.NOP, tag, flags=flags & dp.HDGST))
        elif kind < 0.92:
            frames.append(dp.encode_command(dp.Opcode.WRITE_ZEROES, tag, ext, off, size, gen))
        elif kind < 0.95:
            frames.append(dp.encode_command(0x77, tag, ext, off, size, gen))
        else:
            frames.append(dp.encode_command(dp.Opcode.READ_REGION, tag, ext, off, size, gen, region=3))
    bad_end = rng.random() < 0.3
    if bad_end:
        frames.append(b"\xde\xad" + bytes(46))
    return b"".join(frames), bad_end


def make_core(base: Path, name: str, template: Path, lease_ok: bool) -> AgentCore:
    path = base / f"{name}.img"
    shutil.copyfile(template, path)
    drive = Drive.open(DriveSpec(str(path)))
    core = AgentCore([drive])
    core.secrets = [SECRET]
    core.serve_until = time.monotonic() + (3600 if lease_ok else -1)
    return core


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tmpl")
    d = Drive.open(DriveSpec.parse(f"file:{base / 'd.img'}:{DATA_OFFSET + 16 * MiB}"))
    core = AgentCore([d])
    core.assign([ExtentRecord(e, d.drive_id, DATA_OFFSET + o, n, v, f, r) for e, o, n, v, f, r in EXTENTS], zero=True)
    rng = random.Random(7)
    os.pwrite(d.fd, rng.randbytes(12 * MiB), DATA_OFFSET)
    core.close()
    return base / "d.img"


async def run_stream(core: AgentCore, stream: bytes, cuts: list[int], pause_after: int,
                     copy: bool) -> dict[str, Any]:
    regions = {rid: memoryview(bytearray(random.Random(rid).randbytes(n))) for rid, n in REGIONS.items()}
    conn = adp.AgentConnection(core, regions)
    t = FakeTransport(conn, pause_after)
    conn.connection_made(t)  # type: ignore[arg-type]
    cp = core.begin_copy(1, 0, 4 * MiB) if copy else None
    pos = 0
    for cut in cuts + [len(stream)]:
        while pos < cut and not t.closing:
            if not t.reading:  # the agent stopped reading: the peer consumes replies, which resumes it
                for _ in range(20):
                    t.drain()
                    for _ in range(3):
                        await asyncio.sleep(0)
                    if t.reading:
                        break
                if not t.reading:
                    raise AssertionError("the agent stopped reading and did not resume after its replies drained: "
                                         f"{len(conn._pending)} held, {conn._pending_bytes} bytes, "
                                         f"write paused {conn._write_paused}, read paused {conn._read_paused}")
            buf = conn.get_buffer(-1)
            k = min(len(buf), cut - pos)
            buf[:k] = stream[pos:pos + k]
            pos += k
            conn.buffer_updated(k)
            for _ in range(2):
                await asyncio.sleep(0)
        if rnd_drain(cut):
            t.drain()
            await asyncio.sleep(0)
    for _ in range(50):
        t.drain()
        await asyncio.sleep(0)
        if not conn.inflight:
            break
    await asyncio.sleep(0.01)
    for task in list(conn._flushes):
        await task
    drive = next(iter(core.drives.values()))
    data = os.pread(drive.fd, 12 * MiB, DATA_OFFSET)
    st = core.stats
    return {
        "sent": bytes(t.sent),
        "closed": (t.closing, t.aborted),
        "data": data,
        "copy": sorted(cp.written) if cp is not None else None,
        "intent": {eid: bytes(bm) for eid, bm in core.intent.current.items()},  # write intent (agents/intent.py)
        "sums": drive.sums.read(DATA_OFFSET, 12 * MiB) if drive.sums is not None else None,  # agents/checksums.py
        "regions": {rid: bytes(v) for rid, v in regions.items()},
        "stats": (st.commands, st.bytes_read, st.bytes_written, dict(st.errors),
                  {k: list(v) for k, v in st.drives.items()}, {k: list(v) for k, v in st.volumes.items()},
                  {op: sum(h[0]) for op, h in st.latency.items()}),
    }


def rnd_drain(cut: int) -> bool:
    return cut % 3 == 0


def completions(sent: bytes) -> list[tuple[int, int, int, bytes]]:
    dec = dp.CompletionDecoder()
    return [(c.tag, c.status, c.info, bytes(c.payload or b"")) for c in dec.next_completions(sent)]


@pytest.mark.parametrize("seed", range(24))
def test_compiled_loop_answers_exactly_as_the_python_path(tmp_path: Path, template: Path, seed: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    stream, _bad_end = command_stream(rng, rng.randrange(40, 260), digests=seed % 2 == 0)
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randrange(1, 40)))
    pause_after = rng.choice((0, 0, 64 * KiB, 300 * KiB))
    lease_ok = seed % 5 != 1
    copy = seed % 4 == 3
    results = []
    for compiled in (True, False):
        core = make_core(tmp_path, f"c{int(compiled)}", template, lease_ok)
        if not compiled:
            monkeypatch.setattr(adp, "_cserve", None)
            monkeypatch.setattr(drive_mod, "_cserve", None)  # the pure-Python sealed write
        try:
            results.append(asyncio.run(run_stream(core, stream, cuts, pause_after, copy)))
        finally:
            monkeypatch.undo()
            core.close()
    fast, ref = results
    assert completions(fast["sent"]) == completions(ref["sent"])
    assert fast["sent"] == ref["sent"]
    assert fast["closed"] == ref["closed"]
    assert fast["copy"] == ref["copy"]
    assert fast["stats"] == ref["stats"]
    assert fast["data"] == ref["data"]
    assert fast["sums"] == ref["sums"] and fast["sums"] is not None
    assert fast["intent"] == ref["intent"]
    assert fast["regions"] == ref["regions"]


def serve_counting(core: AgentCore, frames: list[bytes],
                   regions: Optional[dict[int, memoryview]] = None) -> tuple[bytes, int]:
    """Deliver the 6 capability frames in one receive and the rest in a second one; what the agent
    sent, and how many commands went through the Python ``execute``."""
    import unittest.mock

    calls = 0
    real = adp.execute

    def counting(*a: Any, **kw: Any) -> None:
        nonlocal calls
        calls += 1
        real(*a, **kw)

    async def go() -> bytes:
        conn = adp.AgentConnection(core, regions)
        t = FakeTransport(conn, 0)
        conn.connection_made(t)  # type: ignore[arg-type]
        for chunk in (b"".join(frames[:6]), b"".join(frames[6:])):
            buf = conn.get_buffer(-1)
            buf[: len(chunk)] = chunk
            conn.buffer_updated(len(chunk))
            await asyncio.sleep(0)
        return bytes(t.sent)

    with unittest.mock.patch.object(adp, "execute", counting):
        sent = asyncio.run(go())
    return sent, calls


def test_the_compiled_loop_serves_the_plain_commands(tmp_path: Path, template: Path) -> None:
    """Not a vacuous comparison: most of a plain stream's commands are served in C (the Python
    ``execute`` is never called for them), and a stale one still gets STALE_LAYOUT from Python."""
    core = make_core(tmp_path, "x", template, True)
    frames = caps_frames(1)
    for i in range(64):
        frames.append(dp.encode_command(dp.READ, 100 + i, 1, i * 4 * KiB, 4 * KiB, 1))
    frames.append(dp.encode_command(dp.READ, 500, 2, 0, 4 * KiB, 4))  # stale: fence is 5
    for i in range(8):
        frames.append(dp.encode_command(dp.WRITE, 600 + i, 1, i * 4 * KiB, 4 * KiB, 1) + bytes([i]) * 4 * KiB)

    sent, calls = serve_counting(core, frames)
    comps = completions(sent)
    assert [c[1] for c in comps[:6]] == [0] * 6
    assert [c[0] for c in comps[6:70]] == list(range(100, 164)) and all(c[1] == 0 for c in comps[6:70])
    assert comps[70][0] == 500 and comps[70][1] == Status.STALE_LAYOUT and comps[70][2] == 5
    assert all(c[1] == 0 for c in comps[71:]) and len(comps) == 79
    # 6 AUTHs and the stale read went through execute, and the 8 writes after it (the rest of that
    # receive); the 64 reads of the second receive before it did not
    assert calls == 6 + 1 + 8
    drive = next(iter(core.drives.values()))
    assert os.pread(drive.fd, 4 * KiB, DATA_OFFSET + 7 * 4 * KiB) == bytes([7]) * 4 * KiB
    assert core.stats.commands == 79 and core.stats.volumes[10] == [64 * 4 * KiB, 8 * 4 * KiB]
    core.close()


def test_switch_off_with_the_environment() -> None:
    import subprocess
    import sys

    code = "import nvpool.agents.dataplane as d, nvpool.proto.compiled as c; print(d._cserve is None, c.status())"
    env = dict(os.environ, NVPOOL_PURE_PYTHON="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("True") and "disabled" in p.stdout
    env["NVPOOL_PURE_PYTHON"] = "0"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.stdout.startswith("False") and "'compiled'" in p.stdout, p.stdout



def test_the_compiled_loop_serves_region_commands(tmp_path: Path, template: Path) -> None:
    """READ_REGION and WRITE_REGION on a registered region are served in C too: the data lands in the
    region (and on the drive) with Python's ``execute`` called only for the capabilities."""
    core = make_core(tmp_path, "r", template, True)
    frames = caps_frames(1)
    for i in range(16):  # drive -> region at 4 KiB * i
        frames.append(dp.encode_command(dp.Opcode.READ_REGION, 100 + i, 1, i * 4 * KiB, 4 * KiB, 1, 0, 3, i * 4 * KiB))
    for i in range(16):  # region (from 64 KiB on) -> drive at 1 MiB + 4 KiB * i
        frames.append(dp.encode_command(dp.Opcode.WRITE_REGION, 200 + i, 1, MiB + i * 4 * KiB, 4 * KiB, 1, 0, 3,
                                        64 * KiB + i * 4 * KiB))
    region = memoryview(bytearray(1 * MiB))
    region[64 * KiB : 128 * KiB] = random.Random(3).randbytes(64 * KiB)

    sent, calls = serve_counting(core, frames, {3: region})
    comps = completions(sent)
    assert len(comps) == 6 + 32 and all(c[1] == 0 and c[3] == b"" for c in comps)
    assert calls == 6
    drive = next(iter(core.drives.values()))
    assert bytes(region[: 64 * KiB]) == os.pread(drive.fd, 64 * KiB, DATA_OFFSET)
    assert os.pread(drive.fd, 64 * KiB, DATA_OFFSET + MiB) == bytes(region[64 * KiB : 128 * KiB])
    st = core.stats
    assert st.bytes_read == 64 * KiB and st.bytes_written == 64 * KiB
    assert sum(st.latency["read_region"][0]) == 16 and sum(st.latency["write_region"][0]) == 16
    core.close()
