"""Write intent without processes (``agents/intent.py``, ``pool/replication.py`` step 8): the agents'
records, the writer's settle claims that let them forget, the resync after a writer that ended uncleanly
(crash, expiry, takeover, an unsettled close), the client's accounting, and the write-ahead fences that
keep a leader change from stranding a volume (``pool/meta.py``, "Fences are written ahead").

The fake agent link here holds a real ``IntentRecords`` per agent, so the service's calls act on the
same records the agents keep; the real agents' marking (Python and compiled paths alike) is checked by
``tests/test_compiled_agent.py``'s differential test and below on an ``AgentCore``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from nvpool.agents.core import AgentCore
from nvpool.agents.drive import Drive, DriveSpec
from nvpool.agents.intent import INTENT_GRAIN, IntentRecords
from nvpool.client.volume import Lease as ClientLease
from nvpool.pool.kvstore import MemoryStore
from nvpool.pool.meta import MetaService
from nvpool.pool.replication import Replication
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import RemoteError
from nvpool.proto.layout import OUT, Extent, Layout
from nvpool.proto.records import ExtentRecord

from tests.test_meta_unit import FakeLink, register

MiB = 1 << 20
G = INTENT_GRAIN


def test_records_keep_every_unsettled_write_and_forget_only_settled_ones() -> None:
    r = IntentRecords()
    rec = ExtentRecord(1, "d", 0, 4 * MiB, 9, 1, 2)
    r.mark(rec, 0, 4096)
    assert r.ranges(rec) is None  # a fresh process may have forgotten writes: not complete yet
    assert r.rotate(9, 5, [rec]) == 5  # the mark is closed at 5
    r.mark(rec, MiB + G - 1, 2)  # straddles two grains, in epoch 5
    assert not r.complete(9)
    r.settle(9, 4, [rec])  # a claim below this process's first rotation: still not complete
    assert not r.complete(9)
    r.settle(9, 5, [rec])  # every write from before 5 is on every copy: that bitmap goes
    assert r.complete(9)
    assert r.ranges(rec) == [(MiB, 2 * G)]
    assert r.rotate(9, 3, [rec]) == 5  # never backwards
    r.rotate(9, 7, [rec])
    r.mark(rec, 3 * MiB, 1)
    r.settle(9, 6, [rec])  # the bitmap closed at 7 holds writes that may be unsettled
    assert r.ranges(rec) == [(MiB, 2 * G), (3 * MiB, G)]
    r.settle(9, 7, [rec])
    assert r.ranges(rec) == [(3 * MiB, G)]  # the current one is never dropped
    r.drop([1])
    assert r.ranges(rec) == []


def make_core(tmp_path: Path) -> AgentCore:
    drive = Drive.open(DriveSpec.parse(f"file:{tmp_path / 'd.img'}:64M"))
    core = AgentCore([drive])
    core.assign([ExtentRecord(7, drive.drive_id, 4 * MiB, 4 * MiB, 1, 1, 2),
                 ExtentRecord(8, drive.drive_id, 8 * MiB, 4 * MiB, 2, 1, 1)], zero=True)
    core.serve_until = time.monotonic() + 60
    return core


def test_the_agent_marks_writes_and_zeroes_to_replicated_extents_before_applying_them(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    try:
        assert core.intent_ranges(7) is None  # nothing rotated yet: the record may lack a past life's writes
        for vid in (1, 2):
            core.intent_rotate(vid, 1)
            core.intent_settle(vid, 1)
        core.write(dp.Command(dp.WRITE, 0, 1, extent_id=7, offset=G - 1, length=2, generation=1), memoryview(b"ab"))
        core.zero(dp.Command(dp.Opcode.WRITE_ZEROES, 0, 2, extent_id=7, offset=2 * MiB, length=MiB, generation=1))
        core.write(dp.Command(dp.WRITE, 0, 3, extent_id=8, offset=0, length=2, generation=1), memoryview(b"ab"))
        assert core.intent_ranges(7) == [(0, 2 * G), (2 * MiB, MiB)]
        core.intent_rotate(1, 2)
        core.intent_settle(1, 1)
        assert core.intent_ranges(7) == [(0, 2 * G), (2 * MiB, MiB)]  # closed at 2: kept until 2 is settled
        core.intent_settle(1, 2)
        assert core.intent_ranges(7) == []
        assert core.intent_ranges(8) == []  # a single-copy extent is never marked
        assert 8 not in core.intent.current or not any(core.intent.current[8])
        with pytest.raises(RemoteError):  # refused by its checks: nothing applied, nothing marked
            core.write(dp.Command(dp.WRITE, 0, 4, extent_id=7, offset=4 * MiB - 1, length=2, generation=1),
                       memoryview(b"ab"))
        assert core.intent_ranges(7) == []
        asyncio.run(core.release_async([7]))
        assert 7 not in core.intent.current
    finally:
        core.close()


def test_the_compiled_loop_uses_the_same_grain() -> None:
    from nvpool.agents import dataplane as adp
    if adp._cserve is None:
        pytest.skip("the compiled agent loop is not built (or NVPOOL_PURE_PYTHON=1)")
    assert adp._cserve.INTENT_GRAIN == INTENT_GRAIN


# ---------------------------------------------------------------------- the service's half
class IntentLink(FakeLink):
    """Agents with real write-intent records; copies and fences recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.svc: Optional[MetaService] = None
        self.records: dict[str, IntentRecords] = {}
        self.copies: list[tuple[int, int, int, int, int]] = []  # src extent, src off, dst extent, dst off, n
        self.fenced: list[tuple[str, int, int]] = []
        self.block_fence: Optional[asyncio.Event] = None

    def rec(self, eid: int) -> ExtentRecord:
        assert self.svc is not None
        for lay in self.svc.layouts.values():
            for e in lay.extents():
                if e.extent_id == eid:
                    return ExtentRecord(eid, e.drive_id, e.drive_offset, e.length, lay.volume_id, 1, lay.replicas)
        raise KeyError(eid)

    def at(self, address: str) -> IntentRecords:
        return self.records.setdefault(address, IntentRecords())

    async def intent(self, address: str, volume_id: int, extent_ids: list[int], op: str, epoch: int = 0
                     ) -> dict[int, Optional[list[tuple[int, int]]]]:
        r = self.at(address)
        recs = [self.rec(e) for e in extent_ids]
        if op == "rotate":
            r.rotate(volume_id, epoch, recs)
        elif op == "settle":
            r.settle(volume_id, epoch, recs)
        else:
            return {x.extent_id: r.ranges(x) for x in recs}
        return {}

    async def fence(self, address: str, volume_id: int, min_generation: int) -> None:
        self.fenced.append((address, volume_id, min_generation))
        if self.block_fence is not None:
            await self.block_fence.wait()

    async def copy(self, *args: Any) -> int:
        _addr, dst, dst_off, _src_addr, src, src_off, n = args[:7]
        self.copies.append((src.extent_id, src_off, dst.extent_id, dst_off, n))
        return int(n)


async def intent_service(replicas: int = 2, agents: int = 3) -> tuple[MetaService, IntentLink, Replication]:
    link = IntentLink()
    svc = MetaService(MemoryStore(), link, agent_timeout=5)
    link.svc = svc
    await register(svc, agents)
    await svc.create_volume("v", 16 * MiB, replicas=replicas)
    return svc, link, Replication(svc, rebuild_after=60)


def address_of(svc: MetaService, e: Extent) -> str:
    return svc.agents[svc.drives[e.drive_id].agent_id].control_address


def mark(svc: MetaService, link: IntentLink, lay: Layout, column: int, replica: int, offset: int, n: int) -> Extent:
    """An agent applies a write at column offset ``offset`` of one copy (as a dying writer's would)."""
    col = lay.replica_column(column, replica)
    i, off = col.locate(offset)
    e = col.extents[i]
    link.at(address_of(svc, e)).mark(link.rec(e.extent_id), off, n)
    return e


def test_settle_claims_make_agents_forget_only_what_every_copy_holds() -> None:
    async def body() -> None:
        svc, link, repl = await intent_service()
        lease = await svc.open_volume("v", True, "writer")
        e0 = svc.intent_epoch[1]
        assert e0 and all(r.complete(1) for r in link.records.values())  # every record starts complete
        lay = svc.layouts[1]
        e = mark(svc, link, lay, 0, 0, 0, 4096)  # a write in flight
        at = link.at(address_of(svc, e))
        assert await repl.intent_renew(lease, 0) == e0  # no claim: nothing rotates or drops
        e1 = await repl.intent_renew(lease, e0)  # "everything before e0 settled": the mark is closed at e1
        assert e1 > e0
        assert at.ranges(link.rec(e.extent_id)) == [(0, G)]
        assert await repl.intent_renew(lease, e0) == e1  # a stale claim changes nothing
        e2 = await repl.intent_renew(lease, e1)  # the write was started before the writer learned e1
        assert e2 > e1 and at.ranges(link.rec(e.extent_id)) == []
        reader = await svc.open_volume("v", False, "reader")
        assert await repl.intent_renew(reader, e2) == 0  # readers write nothing: no epochs

    asyncio.run(body())


def test_a_writer_that_dies_leaves_copies_resynced_from_the_first_ok_copy_before_the_volume_is_healthy() -> None:
    async def body() -> None:
        svc, link, repl = await intent_service()
        vol = svc.volume("v")
        lease = await svc.open_volume("v", True, "writer")
        lay = svc.layouts[1]
        # the dying writer's last writes: one reached only the second copy of column 0, one only the first
        # copy of column 1 (a grain of 64 KiB each, at different offsets)
        mark(svc, link, lay, 0, 1, 5 * G + 10, 100)
        mark(svc, link, lay, 1, 0, 9 * G, G + 1)
        svc.leases[lease.lease_id].expires = 0.0  # its lease runs out
        svc.expire_leases()
        assert svc.volume_view(vol)["health"] == "degraded"  # copies may differ: never "ok" now
        assert svc.pool_status()["health"] == "degraded"
        assert [r["state"] for r in repl.status()] == ["writer-resync"]
        gen = lay.generation
        await repl.tick()
        lay = svc.layouts[1]
        assert lay.generation > gen  # fenced: nothing the dead writer still had in flight lands later
        want = set()
        for column, off, n in ((0, 5 * G, G), (1, 9 * G, 2 * G)):
            src, dst = lay.replica_column(column, 0), lay.replica_column(column, 1)
            si, soff = src.locate(off)
            di, doff = dst.locate(off)
            want.add((src.extents[si].extent_id, soff, dst.extents[di].extent_id, doff, n))
        assert set(link.copies) == want  # the union of both copies' records, from each column's first copy
        assert 1 not in svc.unclean and svc.volume_view(vol)["health"] == "ok"
        assert all(r.complete(1) for r in link.records.values())
        assert all(r.ranges(link.rec(e.extent_id)) == [] for e in lay.extents()
                   for r in [link.at(address_of(svc, e))])  # records start afresh

    asyncio.run(body())


def test_an_agent_that_restarted_has_its_columns_compared_whole() -> None:
    async def body() -> None:
        svc, link, repl = await intent_service()
        lease = await svc.open_volume("v", True, "writer")
        lay = svc.layouts[1]
        restarted = address_of(svc, lay.replica_column(0, 1).extents[0])
        link.records[restarted] = IntentRecords()  # its record is gone with its process
        svc.leases[lease.lease_id].expires = 0.0
        svc.expire_leases()
        await repl.tick()
        on_it = {i for i in range(lay.width) for k in range(2)
                 if any(address_of(svc, e) == restarted for e in lay.replica_column(i, k).extents)}
        assert on_it
        copied: dict[int, int] = {}
        dst_column = {e.extent_id: i for i in range(lay.width) for e in lay.replica_column(i, 1).extents}
        for _s, _so, d, _do, n in link.copies:
            copied[dst_column[d]] = copied.get(dst_column[d], 0) + n
        # every column with a copy there is copied whole (the fake says every byte may hold data), no other
        assert {i for i, n in copied.items() if n == lay.replica_column(i, 0).length} == on_it
        assert set(copied) == on_it

    asyncio.run(body())


def test_a_takeover_and_an_unsettled_close_resync_before_the_next_writer_is_granted() -> None:
    async def body() -> None:
        svc, link, repl = await intent_service()
        first = await svc.open_volume("v", True, "first writer")
        lay = svc.layouts[1]
        mark(svc, link, lay, 2, 1, 0, 1)
        second = await svc.open_volume("v", True, "second writer", force=True)
        assert len(link.copies) == 1 and 1 not in svc.unclean  # resynced before the grant
        assert first.lease_id not in svc.leases and second.lease_id in svc.leases
        mark(svc, link, svc.layouts[1], 3, 0, 0, 1)
        await svc.close_lease(second.lease_id, unsettled=True)  # it gave up on a write
        assert 1 in svc.unclean
        await svc.open_volume("v", True, "third writer")
        assert len(link.copies) == 2 and 1 not in svc.unclean

    asyncio.run(body())


def test_a_copy_that_is_out_when_the_writer_dies_is_resynced_whole_when_it_returns() -> None:
    async def body() -> None:
        svc, link, repl = await intent_service()
        vol = svc.volume("v")
        lease = await svc.open_volume("v", True, "writer")
        lay = svc.layouts[1]
        await repl.mark_out(vol, {(0, 1)}, "test")
        svc.leases[lease.lease_id].expires = 0.0
        svc.expire_leases()
        await repl.resync_writer(vol)
        assert svc.layouts[1].replica_state(0, 1) == OUT and svc.repairs[1][(0, 1)].whole
        link.copies.clear()
        await repl.repair(vol)  # its agent is up: resynced in place, but whole
        n = sum(c[4] for c in link.copies)
        assert n == lay.replica_column(0, 0).length

    asyncio.run(body())


def test_the_client_claims_an_epoch_only_when_every_write_started_before_it_is_done() -> None:
    lease = ClientLease(None, "v", "l", 15.0, True)  # type: ignore[arg-type]
    assert lease.settled_claim() == 0  # it has learned no epoch yet
    a = lease.write_started()
    lease.intent_epoch = 5  # learned from a renewal while ``a`` is in flight
    b = lease.write_started()
    assert lease.settled_claim() == 0
    lease.write_done(a, True)
    assert lease.settled_claim() == 5  # ``b`` started after it learned 5: it does not hold the claim back
    lease.intent_epoch = 6
    assert lease.settled_claim() == 0
    lease.write_done(b, False)  # given up on: its copies may differ
    assert lease.settled_claim() == 0 and lease.unsettled


def test_a_lease_inherited_by_a_forked_child_claims_nothing_for_its_parent() -> None:
    class Meta:
        claims: list[int] = []

        async def renew_lease(self, lease_id: str, settled: int = 0) -> tuple[float, bytes, int]:
            self.claims.append(settled)
            return 15.0, b"", 9

    async def body() -> None:
        meta = Meta()
        child = ClientLease(meta, "v", "l", 15.0, True)  # type: ignore[arg-type]
        child.owner = False
        child.intent_epoch = 9
        await child._renew()
        await child._renew()
        assert meta.claims == [0, 0]
        child.closed = True
        if child._timer is not None:
            child._timer.cancel()

    asyncio.run(body())


def test_a_copy_returning_to_service_never_takes_the_first_place_from_the_copy_written_first() -> None:
    async def body() -> None:
        svc, link, repl = await intent_service(replicas=3)
        vol = svc.volume("v")
        before = {i: svc.layouts[1].replica_column(i, 0) for i in range(svc.layouts[1].width)}
        await repl.mark_out(vol, {(i, 0) for i in range(svc.layouts[1].width)}, "test")
        firsts = {i: svc.layouts[1].replica_column(i, svc.layouts[1].readable(i)[0])
                  for i in range(svc.layouts[1].width)}
        await repl.repair(vol)  # copy 0 of every column resynced and published ok
        lay = svc.layouts[1]
        assert not lay.degraded
        for i in range(lay.width):
            assert lay.replica_column(i, lay.readable(i)[0]) == firsts[i]  # the first copy did not change
            assert before[i] in [lay.replica_column(i, k) for k in range(lay.replicas)]

    asyncio.run(body())


def test_a_leader_that_dies_between_fencing_agents_and_persisting_the_layout_strands_nothing() -> None:
    """Agents acknowledged a fence at g, the leader died before the layout at g was stored: the next
    leader must not publish g-1 (every I/O would be refused as stale, forever)."""
    async def body() -> None:
        store = MemoryStore()
        link = IntentLink()
        svc = MetaService(store, link, agent_timeout=5)
        link.svc = svc
        await register(svc, 2)
        await svc.create_volume("v", 8 * MiB)
        await svc.open_volume("v", True, "first writer")
        link.block_fence = asyncio.Event()  # the agents apply the fence; the leader never gets further
        takeover = asyncio.create_task(svc.open_volume("v", True, "second writer", force=True))
        while not link.fenced:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        takeover.cancel()  # the leader dies here
        with pytest.raises(asyncio.CancelledError):
            await takeover
        fenced_at = max(g for _, _, g in link.fenced)
        nxt = MetaService(store, FakeLink())  # the next leader, loaded from the store
        assert nxt.layouts[1].generation >= fenced_at
        assert all(f >= fenced_at for f in nxt.fences[1].values())

    asyncio.run(body())


def test_a_grant_never_skips_the_resync_when_the_writers_lease_ends_between_the_checks() -> None:
    """The open looked while the dead writer's lease was still live; by the time it takes the lock the
    lease has expired: the grant must go back and resync first, not fence and grant (its marks would be
    reset away with the copies still different)."""
    async def body() -> None:
        svc, link, repl = await intent_service()
        first = await svc.open_volume("v", True, "first writer")
        mark(svc, link, svc.layouts[1], 0, 1, 0, 1)
        svc.leases[first.lease_id].expires = 0.0  # it expires right after _break_for_resync looked
        assert await svc._open("v", True, "second writer", False, "") is None
        assert link.copies == []
        second = await svc.open_volume("v", True, "second writer")
        assert len(link.copies) == 1 and second.lease_id in svc.leases and 1 not in svc.unclean

    asyncio.run(body())


def test_copied_chunks_are_marked_and_a_copy_out_again_stays_to_be_resynced_whole(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    try:
        cp = core.begin_copy(7, MiB, 2 * G)
        core.write(dp.Command(dp.WRITE, 0, 1, extent_id=7, offset=MiB, length=10, generation=1), memoryview(b"x" * 10))
        core.finish_copy(cp, memoryview(bytes(2 * G)))
        for vid in (1,):
            core.intent_rotate(vid, 1)
        assert core.intent.ranges(core.extents[7]) is None  # (not complete yet: first rotation unsettled)
        assert core.intent.closed[7][0][1][2] == 0b11  # grains 16 (written and copied) and 17 (copied only)
    finally:
        core.close()

    async def body() -> None:
        svc, link, repl = await intent_service()
        vol = svc.volume("v")
        await repl.mark_out(vol, {(0, 1)}, "test")
        svc.repairs[1][(0, 1)].whole = True  # a writer died while it was out
        await repl.mark_out(vol, {(0, 1)}, "test again")  # (already out: nothing changes)
        assert svc.repairs[1][(0, 1)].whole
        lay = svc.layouts[1]
        rec = svc.repairs[1][(0, 1)]
        rec.state = "resync"
        svc.layouts[1] = lay.evolve(generation=lay.generation + 1, states=((0, 1, "syncing"),))
        await repl.mark_out(vol, {(0, 1)}, "failed again mid-copy")
        assert svc.repairs[1][(0, 1)].whole  # still owed a whole copy

    asyncio.run(body())
