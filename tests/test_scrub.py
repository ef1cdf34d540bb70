"""Scrub (``pool/scrub.py``) and the block sums it checks (``agents/checksums.py``).

Unit tests hold the pure-Python sealed write and the compiled one (``agents/_cserve.c``) to the same
bytes, check the rules of the sums (a partial write over a corrupted block keeps it flagged), and the
scrub's pure decisions. The end-to-end tests run a real pool: a byte flipped in one copy's drive file
(behind the agent's back, as a failing drive would) is found and repaired whichever copy it is in;
copies that differ though each matches its own sums are made identical from the first copy; a block
wrong on every copy is reported, never guessed at; a scrub racing a writer reports nothing and loses
nothing; sums survive an agent's SIGKILL and restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from nvpool import client
from nvpool.agents import checksums
from nvpool.agents.checksums import SUM_BLOCK, ZERO_SUM, SumsArea, seal
from nvpool.agents.drive import DATA_OFFSET, Drive, DriveSpec, sums_offset
from nvpool.client.cluster import LocalCluster
from nvpool.client.metaclient import MetaClient
from nvpool.pool.scrub import Look, block_runs, decide, suspects
from nvpool.proto.compiled import load
from nvpool.proto.dataplane import crc32c
from nvpool.proto.layout import Layout
from tests.conftest import make_cluster
from tests.test_writer_crash import drive_files

MiB = 1 << 20
_cserve: Any = load("nvpool.agents._cserve")
U32 = struct.Struct("<I")


# ---------------------------------------------------------------------------------------------- sums
def _drive(tmp: Path, name: str) -> Drive:
    return Drive.open(DriveSpec.parse(f"file:{tmp / name}:64M"))


def _stored(d: Drive, offset: int) -> int:
    assert d.sums is not None
    return int(U32.unpack(d.sums.read(offset, SUM_BLOCK))[0])


def _all_sealed(d: Drive, start: int, length: int) -> None:
    """Every block with a recorded sum holds bytes matching it."""
    data = os.pread(d.fd, length, start)
    assert d.sums is not None
    stored = d.sums.read(start, length)
    assert checksums.mismatches(checksums.block_sums(data), stored) == []


def test_new_drive_has_a_sums_area_and_reports_the_capacity_left(tmp_path: Path) -> None:
    d = _drive(tmp_path, "a.img")
    try:
        assert d.sums_at == sums_offset(64 * MiB) and d.sums_at % MiB == 0
        assert d.capacity == d.sums_at - DATA_OFFSET and d.capacity >= 61 * MiB
        # the area covers every block of the data area, and lies past it
        assert d.sums_at + checksums.sums_bytes(d.sums_at - DATA_OFFSET) <= d.size
        assert d.sums is not None and d.sums.read(DATA_OFFSET, 64 * 1024) == bytes(64)
    finally:
        d.close()
    again = Drive.open(DriveSpec(str(tmp_path / "a.img")))  # the label says where the area is
    try:
        assert again.sums_at == d.sums_at
    finally:
        again.close()


@pytest.mark.parametrize("compiled", [False, True])
def test_sealed_writes_keep_every_sum_true(tmp_path: Path, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if compiled and _cserve is None:
        pytest.skip("the compiled agent is not built")
    from nvpool.agents import drive as drive_mod

    monkeypatch.setattr(drive_mod, "_cserve", _cserve if compiled else None)
    d = _drive(tmp_path, "b.img")
    rng = random.Random(7)
    base = DATA_OFFSET + 4 * MiB
    try:
        for _ in range(300):
            off = base + rng.randrange(0, 2 * MiB)
            n = rng.choice([1, 511, 512, 4096, 4097, 8192, 65536, rng.randrange(1, 300_000)])
            if rng.random() < 0.15:
                d.sealed_zero(off, n)
            else:
                d.sealed_write(os.urandom(n), off)
        _all_sealed(d, base, 3 * MiB)
        # zeroed whole blocks carry the zero sum
        d.sealed_zero(base, 3 * SUM_BLOCK)
        assert _stored(d, base + SUM_BLOCK) == ZERO_SUM
    finally:
        d.close()


def test_compiled_and_python_sealed_writes_leave_the_same_bytes(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if _cserve is None:
        pytest.skip("the compiled agent is not built")
    from nvpool.agents import drive as drive_mod

    drives = [_drive(tmp_path, "p.img"), _drive(tmp_path, "c.img")]
    rng = random.Random(11)
    base = DATA_OFFSET + MiB
    ops = []
    for i in range(200):
        off, n = base + rng.randrange(0, MiB), rng.choice([1, 100, 4096, 5000, 12288, rng.randrange(1, 100_000)])
        ops.append((off, os.urandom(n)))
        if i == 100:  # a corrupted block under a partial write: both keep it flagged
            ops.append((-1, b""))
    try:
        for d, mod in zip(drives, (None, _cserve)):
            monkeypatch.setattr(drive_mod, "_cserve", mod)
            for off, data in ops:
                if off < 0:
                    os.pwrite(d.fd, b"\xff", base + 7)
                    continue
                d.sealed_write(data, off)
        p, c = drives
        assert os.pread(p.fd, 2 * MiB, base) == os.pread(c.fd, 2 * MiB, base)
        assert p.sums is not None and c.sums is not None
        assert p.sums.read(base, 2 * MiB) == c.sums.read(base, 2 * MiB)
    finally:
        for d in drives:
            d.close()


@pytest.mark.parametrize("compiled", [False, True])
def test_partial_write_over_a_corrupted_block_keeps_it_flagged(tmp_path: Path, compiled: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if compiled and _cserve is None:
        pytest.skip("the compiled agent is not built")
    from nvpool.agents import drive as drive_mod

    monkeypatch.setattr(drive_mod, "_cserve", _cserve if compiled else None)
    d = _drive(tmp_path, "f.img")
    blk = DATA_OFFSET + 8 * SUM_BLOCK
    try:
        d.sealed_write(os.urandom(2 * SUM_BLOCK), blk)
        good = _stored(d, blk)
        os.pwrite(d.fd, bytes([os.pread(d.fd, 1, blk + 100)[0] ^ 0x10]), blk + 100)  # the media flips a bit
        d.sealed_write(b"new bytes", blk + 2000)  # part of the block: must not seal the flip in
        assert _stored(d, blk) == good
        now, stored = d.scrub_read(blk, 2 * SUM_BLOCK, True)
        assert checksums.mismatches(now, stored) == [0]
        d.sealed_write(os.urandom(SUM_BLOCK), blk)  # the whole block rewritten: true again
        now, stored = d.scrub_read(blk, 2 * SUM_BLOCK, True)
        assert checksums.mismatches(now, stored) == []
    finally:
        d.close()


def test_a_media_error_during_a_scrub_read_fails_the_drive_cleanly(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from nvpool.proto.errors import DriveError

    d = _drive(tmp_path, "eio.img")
    try:
        with pytest.raises(DriveError, match="block aligned"):
            d.scrub_read(DATA_OFFSET, 100, True)  # not whole blocks: refused, not misreported

        def eio(*args: object) -> int:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "preadv", eio)
        with pytest.raises(DriveError, match="Input/output error"):
            d.scrub_read(DATA_OFFSET, 2 * SUM_BLOCK, True)
        assert d.failed and d.errors == 1
    finally:
        monkeypatch.undo()
        d.close()


def test_compiled_block_checksum_is_crc32c() -> None:
    if _cserve is None:
        pytest.skip("the compiled agent is not built")
    rng = random.Random(3)
    blocks = [bytes(SUM_BLOCK), b"\xff" * SUM_BLOCK] + [rng.randbytes(SUM_BLOCK) for _ in range(300)]
    for b in blocks:  # the three-stream block sum, and the one-stream sum of any length
        assert _cserve.crc32c_block(b) == crc32c(b)
    for n in list(range(0, 70)) + [4095, 4096, 4097, 100_003]:
        b = rng.randbytes(n)
        assert _cserve.crc32c(b) == crc32c(b)


def test_sums_area_unit_rules(tmp_path: Path) -> None:
    assert seal(0) == 0xFFFFFFFF and seal(5) == 5
    fd = os.open(tmp_path / "raw", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 16 * MiB)
        area = SumsArea(fd, 12 * MiB, DATA_OFFSET)
        assert area.at(DATA_OFFSET) == 12 * MiB and area.at(DATA_OFFSET + 3 * SUM_BLOCK + 5) == 12 * MiB + 12
        part = area.before(DATA_OFFSET + 10, 20)
        os.pwrite(fd, b"x" * 20, DATA_OFFSET + 10)
        area.after(DATA_OFFSET + 10, 20, b"x" * 20, part)
        assert U32.unpack(area.read(DATA_OFFSET, SUM_BLOCK))[0] == seal(crc32c(os.pread(fd, SUM_BLOCK, DATA_OFFSET)))
        area.clear(DATA_OFFSET, SUM_BLOCK)
        assert area.read(DATA_OFFSET, SUM_BLOCK) == bytes(4)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- decisions
def _look(sums: list[int], bad: tuple[int, ...] = (), kept: bool = True) -> Look:
    return Look(b"".join(U32.pack(s) for s in sums), frozenset(bad), kept)


def test_decide_trusts_a_copy_matching_its_sums_first_in_layout_order() -> None:
    # copy 0 fails its sums: repaired from copy 1
    assert decide([_look([9], bad=(0,)), _look([5])], 0) == (1, [0])
    # both match their own sums but differ: the first copy wins (the writer-resync rule)
    assert decide([_look([5]), _look([6])], 0) == (0, [1])
    # three copies, the first on an old drive without sums and different: a verified copy wins
    assert decide([_look([1], kept=False), _look([2]), _look([2])], 0) == (1, [0])
    # every copy fails its sums: nothing to trust
    assert decide([_look([1], bad=(0,)), _look([2], bad=(0,))], 0) == (None, [])
    # a copy that fails its sums is rewritten even when its bytes equal the source's
    assert decide([_look([5]), _look([5], bad=(0,))], 0) == (0, [1])
    assert suspects([_look([1, 2, 3]), _look([1, 9, 3], bad=(2,))], 3) == [1, 2]
    assert block_runs([7, 1, 2, 3, 9, 10], limit=2) == [(1, 2), (3, 1), (7, 1), (9, 2)]


# ---------------------------------------------------------------------------------------------- a real pool
def nvpool(meta: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvpool", *args], capture_output=True, text=True,
                          env=dict(os.environ, NVPOOL_META=meta), timeout=120)


def scrub(meta: str, name: str) -> tuple[int, dict[str, Any]]:
    p = nvpool(meta, "volume", "scrub", name, "--json")
    return p.returncode, json.loads(p.stdout) if p.stdout else {"error": p.stderr}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = make_cluster(tmp_path_factory.mktemp("scrub"), agents=3, drives_per_agent=1, drive_size="128M", metrics=True)
    c.meta_extra = ["--agent-timeout", "1.2", "--heartbeat-interval", "0.3", "--lease-ttl", "3"]
    c.up()
    yield c
    c.down()


def layout(c: LocalCluster, name: str) -> Layout:
    async def get() -> Layout:
        m = MetaClient(c.meta.address)
        try:
            return (await m.get_layout(name=name))[0]
        finally:
            await m.close()
    return asyncio.run(get())


def copy_bytes(c: LocalCluster, lay: Layout, column: int, replica: int, offset: int, n: int) -> bytes:
    """Bytes ``[offset, offset+n)`` of one copy of a column, read straight from its drive file."""
    col = lay.replica_column(column, replica)
    i, eoff = col.locate(offset)
    e = col.extents[i]
    with open(drive_files(c)[e.drive_id], "rb") as f:
        f.seek(e.drive_offset + eoff)
        return f.read(n)


def poke(c: LocalCluster, lay: Layout, column: int, replica: int, offset: int, data: bytes, seal_it: bool = False) -> None:
    """Change one copy's bytes in its drive file behind its agent's back (``seal_it``: and their sums, as
    a well-behaved write would have)."""
    col = lay.replica_column(column, replica)
    i, eoff = col.locate(offset)
    e = col.extents[i]
    path = drive_files(c)[e.drive_id]
    fd = os.open(path, os.O_RDWR)
    try:
        at = e.drive_offset + eoff
        os.pwrite(fd, data, at)
        if seal_it:
            label, _ = Drive.inspect(str(path))
            area = SumsArea(fd, int(label["sums"]), DATA_OFFSET)  # type: ignore[call-overload]
            blk = at - at % SUM_BLOCK
            area.after(blk, SUM_BLOCK, os.pread(fd, SUM_BLOCK, blk), [])
    finally:
        os.close(fd)


def identical(c: LocalCluster, lay: Layout, size: int) -> bool:
    for i in range(lay.width):
        n = min(lay.replica_column(i, k).length for k in range(lay.replicas))
        n = min(n, size)
        first = copy_bytes(c, lay, i, 0, 0, n)
        if any(copy_bytes(c, lay, i, k, 0, n) != first for k in range(1, lay.replicas)):
            return False
    return True


def test_a_flipped_byte_is_found_and_repaired_whichever_copy_holds_it(pool: LocalCluster) -> None:
    meta = pool.meta.address
    size = 16 * MiB
    data = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8).tobytes()
    with client.connect(meta) as p:
        p.create_volume("flip", size, replicas=2, stripe_unit="1M")
        v = p.open("flip")
        v.write(0, data)
        v.flush()
        v.close()
    lay = layout(pool, "flip")
    assert identical(pool, lay, size)
    rc, st = scrub(meta, "flip")
    assert rc == 0 and st["state"] == "done" and st["bytes_done"] == st["bytes_total"] >= size
    assert (st["checksum_errors"], st["mismatches"], st["repaired"]) == (0, 0, 0), st
    for replica in (0, 1):  # in the first copy (which readers and the resync prefer) and in the other
        off = 123_457 + replica * 5000
        old = copy_bytes(pool, lay, 0, replica, off, 1)
        poke(pool, lay, 0, replica, off, bytes([old[0] ^ 0x40]))
        assert not identical(pool, lay, size)
        rc, st = scrub(meta, "flip")
        assert rc == 0, st
        assert (st["checksum_errors"], st["mismatches"], st["repaired"], st["unrepairable"]) == (1, 0, 1, 0), st
        lay = layout(pool, "flip")
        assert identical(pool, lay, size), f"copy {replica}: the copies still differ after the repair"
    with client.connect(meta) as p:
        assert bytes(p.open("flip", read_only=True).read(0, size)) == data
    status = json.loads(nvpool(meta, "pool", "status", "--json").stdout)
    last = [s for s in status["scrubs"] if s["volume"] == "flip"]
    assert last and last[0]["state"] == "done" and last[0]["finished"] > 0
    text = nvpool(meta, "pool", "status").stdout
    assert "last scrub of flip" in text and "1 copies repaired" in text
    log = (pool.dir / "logs" / "meta.log").read_text()
    assert "return bytes unlike what was written to them" in log and "rewritten from copy" in log
    from urllib.request import urlopen

    metrics = urlopen(f"http://{pool.meta.metrics}/metrics", timeout=10).read().decode()
    assert 'nvpool_meta_scrub_errors_total{kind="checksum"} 2.0' in metrics
    assert "nvpool_meta_scrub_repaired_total 2.0" in metrics


def test_copies_that_differ_each_matching_its_sums_follow_the_first(pool: LocalCluster) -> None:
    meta = pool.meta.address
    size = 8 * MiB
    data = os.urandom(size)
    with client.connect(meta) as p:
        p.create_volume("diverged", size, replicas=2, stripe_unit="1M")
        v = p.open("diverged")
        v.write(0, data)
        v.close()
    lay = layout(pool, "diverged")
    poke(pool, lay, 1, 1, 40_000, b"a write only this copy got", seal_it=True)
    rc, st = scrub(meta, "diverged")
    assert rc == 0 and (st["checksum_errors"], st["mismatches"], st["repaired"]) == (0, 1, 1), st
    lay = layout(pool, "diverged")
    assert identical(pool, lay, size)
    with client.connect(meta) as p:
        assert bytes(p.open("diverged", read_only=True).read(0, size)) == data


def test_a_block_wrong_on_every_copy_is_reported_not_guessed(pool: LocalCluster) -> None:
    meta = pool.meta.address
    size = 8 * MiB
    with client.connect(meta) as p:
        p.create_volume("lost", size, replicas=2, stripe_unit="1M")
        v = p.open("lost")
        v.write(0, os.urandom(size))
        v.close()
    lay = layout(pool, "lost")
    before = [copy_bytes(pool, lay, 0, k, 8192, 4096) for k in (0, 1)]
    for k in (0, 1):
        poke(pool, lay, 0, k, 8192 + 10 * k, b"rot")
    rc, st = scrub(meta, "lost")
    assert rc == 4 and (st["checksum_errors"], st["unrepairable"], st["repaired"]) == (1, 1, 0), st
    after = [copy_bytes(pool, layout(pool, "lost"), 0, k, 8192, 4096) for k in (0, 1)]
    assert after != before and after[0] != after[1]  # left as they were: no copy was trusted
    assert "no copy holds bytes matching their sums" in (pool.dir / "logs" / "meta.log").read_text()


def test_scrub_racing_a_writer_repairs_only_what_is_wrong_and_loses_nothing(pool: LocalCluster) -> None:
    """Scrubs back to back while a writer writes: the writes never show as errors (a copy written first,
    the other a moment later, or a block read between its bytes and its sum), and the three blocks
    flipped in the volume's last MiB (which the writer leaves alone) are repaired with the writer's
    I/O going on around the fenced repair, which it must wait out and lose nothing by."""
    meta = pool.meta.address
    size = 32 * MiB
    quiet = size - MiB
    rng = np.random.default_rng(5)
    model = rng.integers(0, 256, size, dtype=np.uint8)
    with client.connect(meta) as p:
        p.create_volume("busy", size, replicas=2, stripe_unit="256K")
        v = p.open("busy")
        v.write(0, model.tobytes())  # every block written, so the scrub reads the whole volume
        v.flush()
        lay = layout(pool, "busy")
        for j, at in enumerate((quiet + 5, quiet + 300_000, size - 10)):
            stripe, within = divmod(at, lay.stripe_unit)
            column, col_off = stripe % lay.width, (stripe // lay.width) * lay.stripe_unit + within
            poke(pool, lay, column, j % 2, col_off, bytes([model[at] ^ 0x01]))
        runs: list[dict[str, Any]] = []
        stop = time.monotonic() + 60
        scrubber = subprocess.Popen([sys.executable, "-m", "nvpool", "volume", "scrub", "busy", "--json"],
                                    stdout=subprocess.PIPE, text=True, env=dict(os.environ, NVPOOL_META=meta))
        try:
            n = 0
            while time.monotonic() < stop:
                # unaligned writes, some sharing a block: the sums' partial-block path under load
                off = int(rng.integers(0, quiet - 70_000))
                ln = int(rng.integers(1, 70_000))
                chunk = rng.integers(0, 256, ln, dtype=np.uint8)
                v.write(off, chunk)
                model[off : off + ln] = chunk
                n += 1
                if scrubber.poll() is not None:
                    if len(runs) >= 2:
                        break
                    runs.append(json.loads(scrubber.communicate()[0]))
                    scrubber = subprocess.Popen([sys.executable, "-m", "nvpool", "volume", "scrub", "busy", "--json"],
                                                stdout=subprocess.PIPE, text=True,
                                                env=dict(os.environ, NVPOOL_META=meta))
        finally:
            if scrubber.poll() is None:
                scrubber.wait(120)
            runs.append(json.loads(scrubber.communicate()[0]))
        print(f"{n} writes during {len(runs)} scrubs: {runs}")
        assert n > 100
        assert np.array_equal(np.frombuffer(bytes(v.read(0, size)), dtype=np.uint8), model)
        v.close()
    assert all(st["state"] == "done" for st in runs), runs
    found = [sum(st[k] for st in runs) for k in ("checksum_errors", "mismatches", "repaired", "unrepairable")]
    assert found == [3, 0, 3, 0], runs
    lay = layout(pool, "busy")
    assert identical(pool, lay, size)
    rc, st = scrub(meta, "busy")  # quiet now: a clean pass, every block compared
    assert rc == 0 and (st["checksum_errors"], st["mismatches"], st["busy"]) == (0, 0, 0), st


def test_sums_survive_an_agent_kill_and_restart(pool: LocalCluster) -> None:
    meta = pool.meta.address
    size = 8 * MiB
    data = os.urandom(size)
    with client.connect(meta) as p:
        p.create_volume("restart", size, replicas=2, stripe_unit="1M")
        v = p.open("restart")
        v.write(0, data)
        v.close()
    pool.kill_agent(0)
    pool.start_agent(0)
    pool.wait_registered()
    deadline = time.monotonic() + 60
    while True:  # the restarted agent's copies come back (resynced) before a scrub may run
        rc, st = scrub(meta, "restart")
        if rc == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rc == 0 and (st["checksum_errors"], st["mismatches"], st["repaired"]) == (0, 0, 0), st


# ---------------------------------------------------------------------------------------------- the service's side, in process
class SumsLink:
    """An agent link whose extents hold a sum per block (from ``tests.test_meta_unit.FakeLink``): the
    scrub reads them, a copy copies them, and a test can flip one or mark it failing its stored sum."""

    def __init__(self) -> None:
        from tests.test_meta_unit import FakeLink

        self.inner = FakeLink()
        self.sums: dict[int, dict[int, int]] = {}  # extent -> block -> sum (absent: 7)
        self.bad: dict[int, set[int]] = {}
        self.fences: list[tuple[int, int]] = []
        self.copies: list[tuple[int, int, int, int]] = []  # dst extent, dst block, src extent, generation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def fence(self, address: str, volume_id: int, min_generation: int) -> None:
        self.fences.append((volume_id, min_generation))

    async def scrub(self, address: str, extent_id: int, offset: int, length: int) -> tuple[bytes, list[int], bool]:
        got = self.sums.get(extent_id, {})
        first = offset // SUM_BLOCK
        n = length // SUM_BLOCK
        return (b"".join(U32.pack(got.get(first + j, 7)) for j in range(n)),
                [j for j in range(n) if first + j in self.bad.get(extent_id, set())], True)

    async def copy(self, address: str, dst: Any, dst_offset: int, src_address: str, src: Any, src_offset: int,
                   length: int, generation: int, volume_id: int = 0, src_tls: bool = False) -> int:
        for j in range(length // SUM_BLOCK):
            db, sb = dst_offset // SUM_BLOCK + j, src_offset // SUM_BLOCK + j
            self.sums.setdefault(dst.extent_id, {})[db] = self.sums.get(src.extent_id, {}).get(sb, 7)
            self.bad.get(dst.extent_id, set()).discard(db)
            self.copies.append((dst.extent_id, db, src.extent_id, generation))
        return length


def test_the_service_repairs_under_a_fence_schedules_passes_and_remembers_them() -> None:
    from nvpool.pool.kvstore import MemoryStore
    from nvpool.pool.meta import MetaService
    from nvpool.pool.replication import Replication
    from nvpool.pool.scrub import Scrubber
    from tests.test_meta_unit import register

    async def body() -> None:
        link = SumsLink()
        store = MemoryStore()
        svc = MetaService(store, link)
        await register(svc, 3)
        vol = await svc.create_volume("v", 16 * MiB, replicas=2)
        await svc.create_volume("plain", 4 * MiB)
        lay = svc.layouts[vol.volume_id]
        repl = Replication(svc)
        first = lay.replica_column(0, 0).extents[0]
        second = lay.replica_column(0, 1).extents[0]
        link.bad[first.extent_id] = {3}  # the first copy's drive corrupted block 3
        link.sums[first.extent_id] = {3: 99}
        link.sums[second.extent_id] = {10: 5}  # and the copies differ at block 10, each matching its sums
        scrubber = Scrubber(svc, repl, interval=3600.0, tick=0.01)
        assert scrubber.due(time.time()) is None  # a new volume waits a whole interval
        assert scrubber.due(time.time() + 3601).name == "v"  # type: ignore[union-attr]
        with pytest.raises(Exception, match="not replicated"):
            scrubber.start_scrub("plain")
        st = scrubber.start_scrub("v")
        assert st.task is not None
        await st.task
        assert (st.state, st.checksum_errors, st.mismatches, st.repaired, st.unrepairable) == ("done", 1, 1, 2, 0), st
        g = svc.layouts[vol.volume_id].generation
        assert g == lay.generation + 1  # both blocks are in one piece: one fenced repair
        # each repair was fenced on the agents at the generation published after it, and copied at it
        assert all(gen in {f[1] for f in link.fences} for *_, gen in link.copies)
        assert (first.extent_id, 3, second.extent_id) in [c[:3] for c in link.copies]  # from the copy that matched
        assert (second.extent_id, 10, first.extent_id) in [c[:3] for c in link.copies]  # the first copy wins
        assert scrubber.totals["repaired"] == 2
        # remembered: a service that takes over knows when the volume was last scrubbed
        again = Scrubber(svc, repl, interval=3600.0)
        assert again.last[vol.volume_id] == pytest.approx(st.finished)
        assert again.due(time.time() + 1800) is None and again.due(st.finished + 3601) is not None
        # the background schedule starts a pass by itself once one is due
        sched = Scrubber(svc, repl, interval=0.05, tick=0.01)
        sched.last[vol.volume_id] = 0.0
        sched.start()
        try:
            for _ in range(500):
                cur = sched.scrubs.get(vol.volume_id)
                if cur is not None and cur.state == "done" and cur.background:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("no background scrub ran")
        finally:
            await sched.stop()
        assert cur.checksum_errors == 0 and cur.mismatches == 0  # repaired the first time

    asyncio.run(body())
