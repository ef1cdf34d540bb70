"""Replicated volumes without processes: layout math, failure-domain placement, resync plans, the
agent's serve lease and dirty tracking, the metadata service's replica state machine (with a fake
agent link), and the transport's abandoning of a hedged read's loser."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nvpool.agents.core import DIRTY_GRAIN, AgentCore
from nvpool.agents.drive import Drive, DriveSpec
from nvpool.pool.kvstore import MemoryStore
from nvpool.pool.meta import MetaService
from nvpool.pool.planner import DriveSpace, plan_replica, plan_replicated
from nvpool.pool.replication import Replication, column_ranges, resync_chunks
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import CapacityError, RemoteError, Status, UsageError
from nvpool.proto.layout import ALLOC_ALIGN, OUT, SYNCING, Column, Extent, Layout
from nvpool.proto.records import ExtentRecord, extent_digest

from tests.test_meta_unit import FakeLink, register

MiB = ALLOC_ALIGN


def pool(hosts: int, drives: int = 2, cap_mib: int = 64, racks: int = 0) -> list[DriveSpace]:
    out = []
    for h in range(hosts):
        labels = (("rack", f"r{h % racks}"),) if racks else ()
        for d in range(drives):
            out.append(DriveSpace(f"h{h}d{d}", f"h{h}", cap_mib * MiB, MiB, labels=labels))
    return out


def layout_of(drives: list[DriveSpace], size: int, replicas: int, domain: str = "host", width: int = 0) -> Layout:
    cols, mirrors, _ = plan_replicated(drives, size, MiB, width, 1, 1, replicas, domain)
    lay = Layout(1, "v", 1, size, MiB, cols, mirrors=mirrors)
    lay.validate()
    return lay


# ---------------------------------------------------------------------- placement
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 3), st.integers(2, 3), st.integers(1, 48), st.integers(0, 3))
def test_replicas_of_a_column_never_share_a_failure_domain(hosts: int, drives: int, replicas: int, size_mib: int,
                                                          racks: int) -> None:
    spaces = pool(hosts, drives, racks=racks)
    domain = "rack" if racks else "host"
    n_domains = min(racks, hosts) if racks else hosts
    try:
        lay = layout_of(spaces, size_mib * MiB, replicas, domain)
    except CapacityError as exc:
        assert n_domains < replicas or "room" in str(exc), exc  # refused only when it could not be safe
        return
    assert n_domains >= replicas
    by_id = {d.drive_id: d for d in spaces}
    for i in range(lay.width):
        doms = [by_id[e.drive_id].domain(domain) for k in range(lay.replicas) for e in lay.replica_column(i, k).extents]
        assert len(doms) == len(set(doms)) == lay.replicas
    # every drive carries a fair share of replicas (spread, not piled on the first domains)
    per_host: dict[str, int] = {}
    for e in lay.extents():
        per_host[by_id[e.drive_id].host] = per_host.get(by_id[e.drive_id].host, 0) + 1
    if not racks and lay.width * replicas >= hosts:
        assert max(per_host.values()) - min(per_host.values()) <= max(2, lay.width * replicas // hosts)


def test_too_few_failure_domains_is_refused_with_the_reason() -> None:
    with pytest.raises(CapacityError, match="2 replicas need 2 failure domains.*has 1"):
        layout_of(pool(1, 4), 16 * MiB, 2)
    with pytest.raises(CapacityError, match="3 replicas need 3 failure domains"):
        layout_of(pool(4, 1, racks=2), 16 * MiB, 3, "rack")
    # agents without the label are no candidates for a rack-separated volume
    spaces = pool(2, 1, racks=2) + [DriveSpace("x", "h9", 64 * MiB, MiB)]
    lay = layout_of(spaces, 8 * MiB, 2, "rack")
    assert "x" not in lay.drive_ids()


def test_rebuild_placement_avoids_the_other_replicas_domains() -> None:
    spaces = pool(4, 1)
    lay = layout_of(spaces, 16 * MiB, 2)
    for i in range(lay.width):
        col, _ = plan_replica(lay, i, 1, spaces, 1000)
        other = {e.drive_id for e in lay.replica_column(i, 0).extents}
        assert {e.drive_id for e in col.extents}.isdisjoint(other)
        assert col.length >= lay.replica_column(i, 1).length
    # only the server of the other replica is usable: no safe home, refused with the reason
    home = lay.replica_column(0, 0).extents[0].drive_id
    only = [d if d.drive_id == home else DriveSpace(d.drive_id, d.host, d.capacity, d.data_offset, d.used, False)
            for d in spaces]
    with pytest.raises(CapacityError, match="outside the failure domains"):
        plan_replica(lay, 0, 1, only, 1000)


# ---------------------------------------------------------------------- layout math
def test_map_names_every_replica_and_spreads_reads_over_ok_ones() -> None:
    lay = layout_of(pool(3, 1), 12 * MiB, 2, width=3)
    pieces = list(lay.map(0, 12 * MiB))
    assert all(len(p.copies) == 2 for p in pieces)
    # rows alternate the replica a read prefers: both copies serve readers
    prefs = {(p.column, p.copies.index(next(c for c in p.copies if c[0] == p.extent))) for p in pieces}
    assert {k for _, k in prefs} == {0, 1}
    out = lay.evolve(generation=2, states=((0, 1, OUT),))
    out.validate()
    for p in out.map(0, 12 * MiB):
        if p.column == 0:
            assert p.extent == p.copies[0][0]  # never the out replica
    assert out.write_set(0) == ([0], []) and out.readable(1) == [0, 1]
    sync = lay.evolve(generation=3, states=((0, 1, SYNCING),))
    assert sync.write_set(0) == ([0], [1]) and sync.readable(0) == [0]
    assert Layout.from_dict(sync.to_dict()) == sync
    assert lay.single_piece(0, 4096, write=True) is None  # replicated writes never take a fast path
    assert lay.single_piece(0, 4096, write=False) is not None


def test_layout_validation_refuses_replicas_on_one_drive_and_bad_states() -> None:
    c = Column((Extent(1, "a", 0, 4 * MiB),))
    same = Layout(1, "v", 1, 4 * MiB, MiB, (c,), mirrors=((Column((Extent(2, "a", 8 * MiB, 4 * MiB),)),),))
    with pytest.raises(UsageError, match="share drive"):
        same.validate()
    ok = Layout(1, "v", 1, 4 * MiB, MiB, (c,), mirrors=((Column((Extent(2, "b", 0, 4 * MiB),)),),))
    for bad in (((0, 2, OUT),), ((0, 1, "ok"),), ((0, 1, "weird"),), ((0, 1, OUT), (0, 1, SYNCING))):
        with pytest.raises(UsageError):
            ok.evolve(states=bad).validate()


def test_resync_chunks_cover_exactly_the_dirty_ranges_across_extent_boundaries() -> None:
    # replica 0 is one extent, replica 1 two extents of different lengths
    r0 = Column((Extent(1, "a", 0, 8 * MiB),))
    r1 = Column((Extent(2, "b", 0, 3 * MiB), Extent(3, "b", 16 * MiB, 5 * MiB)))
    lay = Layout(1, "v", 1, 8 * MiB, MiB, (r0,), mirrors=((r1,),))
    lay.validate()
    dirty = {1: [(0, 64 * 1024), (2 * MiB + 4096, 2 * MiB), (7 * MiB, MiB)]}
    ranges = column_ranges(lay, 0, 0, dirty)
    chunks = resync_chunks(lay, 0, 0, 1, ranges, chunk=MiB)
    covered = sorted((c.volume_offset, c.length) for c in chunks)
    total = sum(n for _, n in ranges)
    assert sum(n for _, n in covered) == total
    for c in chunks:
        assert c.length <= MiB and c.src.extent_id == 1
        assert c.src_offset + c.length <= c.src.length and c.dst_offset + c.length <= c.dst.length
        # the destination offset is the same column offset in replica 1
        dst_start = 0 if c.dst.extent_id == 2 else 3 * MiB
        assert dst_start + c.dst_offset == c.volume_offset == c.src_offset
    assert any(c.dst.extent_id == 2 for c in chunks) and any(c.dst.extent_id == 3 for c in chunks)


# ---------------------------------------------------------------------- agent core
def make_core(tmp_path: Path, replicas: int) -> AgentCore:
    drive = Drive.open(DriveSpec.parse(f"file:{tmp_path / 'd.img'}:64M"))
    core = AgentCore([drive])
    core.assign([ExtentRecord(7, drive.drive_id, 4 * MiB, 4 * MiB, 1, 1, replicas)], zero=True)
    return core


def cmd(op: int, offset: int, length: int, generation: int = 1) -> dp.Command:
    return dp.Command(op, 0, 1, extent_id=7, offset=offset, length=length, generation=generation)


def test_replicated_extents_are_served_only_within_the_serve_lease(tmp_path: Path) -> None:
    core = make_core(tmp_path, 2)
    try:
        with pytest.raises(RemoteError) as e:  # a fresh agent has no lease yet
            core.read(cmd(dp.READ, 0, 4096))
        assert e.value.status == Status.BUSY
        core.serve_until = time.monotonic() + 5
        assert core.read(cmd(dp.READ, 0, 4096)) == bytes(4096)
        core.serve_until = time.monotonic() - 0.001  # lapsed: refused again
        with pytest.raises(RemoteError):
            core.write(cmd(dp.WRITE, 0, 4096), memoryview(b"x" * 4096))
    finally:
        core.close()
    (tmp_path / "plain").mkdir()
    plain = make_core(tmp_path / "plain", 1)
    try:
        assert plain.read(cmd(dp.READ, 0, 4096)) == bytes(4096)  # single-copy volumes never need one
    finally:
        plain.close()


def test_dirty_tracking_records_every_written_grain(tmp_path: Path) -> None:
    core = make_core(tmp_path, 2)
    core.serve_until = time.monotonic() + 60
    try:
        core.write(cmd(dp.WRITE, 0, 4096), memoryview(b"a" * 4096))  # before tracking: not recorded
        assert core.dirty_ranges(7) is None
        core.track_dirty([7])
        core.write(cmd(dp.WRITE, DIRTY_GRAIN - 1, 2), memoryview(b"bb"))  # straddles two grains
        core.zero(cmd(dp.Opcode.WRITE_ZEROES, 3 * MiB, MiB))
        got = core.dirty_ranges(7)
        assert got == [(0, 2 * DIRTY_GRAIN), (3 * MiB, MiB)]
        core.track_dirty([7])  # idempotent: the running record is kept
        assert core.dirty_ranges(7) == got
        core.untrack_dirty([7])
        assert core.dirty_ranges(7) is None
    finally:
        core.close()


def test_digest_covers_fences_so_a_raised_fence_reaches_a_returning_agent() -> None:
    a = ExtentRecord(1, "d", 0, MiB, 1, 3, 2)
    assert extent_digest([a]) != extent_digest([ExtentRecord(1, "d", 0, MiB, 1, 4, 2)])
    assert extent_digest([a]) == extent_digest([a, a])


# ---------------------------------------------------------------------- metadata service
class ReplLink(FakeLink):
    def __init__(self) -> None:
        super().__init__()
        self.fences: list[tuple[str, int, int]] = []

    async def fence(self, address: str, volume_id: int, min_generation: int) -> None:
        if address in self.fail:
            from nvpool.proto.errors import UnavailableError
            raise UnavailableError(f"{address} is down")
        self.fences.append((address, volume_id, min_generation))


async def reader(svc: MetaService, name: str = "v") -> str:
    """A read lease on the volume: only lease holders' failure reports are heard."""
    return (await svc.open_volume(name, False, "test reader")).lease_id


async def replicated_service(agents: int = 3) -> tuple[MetaService, ReplLink, Replication]:
    link = ReplLink()
    svc = MetaService(MemoryStore(), link, agent_timeout=0.3)
    await register(svc, agents)
    await svc.create_volume("v", 16 * MiB, replicas=2)
    return svc, link, Replication(svc, rebuild_after=60)


def test_a_silent_agents_replicas_go_out_tracked_then_resync_in_place() -> None:
    async def body() -> None:
        svc, link, repl = await replicated_service()
        lay = svc.layouts[1]
        assert lay.replicas == 2
        # agent a1 falls silent: after agent_timeout its replicas go out (it has stopped serving)
        svc.agents["a1"].last_seen = time.monotonic() - 1.0
        svc.started -= 1.0
        await repl.tick()
        lay2 = svc.layouts[1]
        outs = {(i, k) for i, k, st in lay2.states if st == OUT}
        assert outs and lay2.generation == lay.generation + 1
        a1_drives = set(svc.agents["a1"].drives)
        assert all(e.drive_id in a1_drives for i, k in outs for e in lay2.replica_column(i, k).extents)
        # the surviving replicas' agents were told to track writes before the new layout was published
        started = [c for c in link.dirty_calls if c[2] == "start"]
        tracked = {e for _, ids, _ in started for e in ids}
        for i, _ in outs:
            for k in lay2.readable(i):
                assert {e.extent_id for e in lay2.replica_column(i, k).extents} <= tracked
        # the out replicas' extents are fenced at the new generation (learnt at the agent's next heartbeat)
        for i, k in outs:
            for e in lay2.replica_column(i, k).extents:
                assert svc.fences[1][e.extent_id] == lay2.generation
        # the agent comes back: resync in place (syncing, fenced, copied, ok)
        svc.heartbeat("a1", {})
        await repl.tick()
        lay3 = svc.layouts[1]
        assert not lay3.degraded and lay3.generation == lay2.generation + 2
        assert any(f[2] == lay2.generation + 1 for f in link.fences)  # the syncing generation was fenced
        assert [c for c in link.dirty_calls if c[2] == "get"] and [c for c in link.dirty_calls if c[2] == "stop"]
        assert not svc.repairs.get(1)

    asyncio.run(body())


def test_the_last_up_to_date_replica_is_never_taken_out() -> None:
    async def body() -> None:
        svc, link, repl = await replicated_service()
        for a in ("a0", "a1", "a2"):
            svc.agents[a].last_seen = time.monotonic() - 1.0
        svc.started -= 1.0
        await repl.tick()
        lay = svc.layouts[1]
        for i in range(lay.width):
            assert lay.readable(i), f"column {i} lost every readable replica"

    asyncio.run(body())


def test_a_replica_out_too_long_is_rebuilt_elsewhere_and_its_old_extents_released() -> None:
    async def body() -> None:
        svc, link, repl = await replicated_service(agents=4)
        repl.rebuild_after = 0.0
        svc.agents["a1"].last_seen = time.monotonic() - 1.0
        svc.started -= 1.0
        before = svc.layouts[1]
        await repl.tick()
        after = svc.layouts[1]
        assert not after.degraded
        a1 = set(svc.agents["a1"].drives)
        assert not any(e.drive_id in a1 for e in after.extents())  # rebuilt on the other servers
        old = {e.extent_id for e in before.extents() if e.drive_id in a1}
        assert old and old <= set(svc.reserved) and all(svc.reserved[e].kind == "releasing" for e in old)
        # several replicas rebuilt in one pass never share bytes of a drive
        spans = sorted((e.drive_id, e.drive_offset, e.drive_offset + e.length) for e in after.extents())
        for a, b in zip(spans, spans[1:]):
            assert a[0] != b[0] or a[2] <= b[1], f"extents overlap: {a} {b}"
        by_id = {d: svc.drives[d].agent_id for d in svc.drives}
        for i in range(after.width):
            hosts = [by_id[after.replica_column(i, k).extents[0].drive_id] for k in range(after.replicas)]
            assert len(set(hosts)) == after.replicas

    asyncio.run(body())


def test_a_client_report_fences_a_live_agent_before_its_replica_goes_out() -> None:
    async def body() -> None:
        svc, link, repl = await replicated_service()
        lay = svc.layouts[1]
        ext = lay.replica_column(0, 1).extents[0]
        agent = svc.drives[ext.drive_id].agent_id
        await repl.report_failure(1, lay.generation, ext.extent_id, "timeout", lease_id=await reader(svc))
        new = svc.layouts[1]
        assert new.replica_state(0, 1) == OUT
        # every copy on that agent goes out with it, in one generation (not one per later report)
        assert new.generation == lay.generation + 1
        on_agent = {(i, k) for i in range(lay.width) for k in range(lay.replicas)
                    if svc.drives[lay.replica_column(i, k).extents[0].drive_id].agent_id == agent}
        assert len(on_agent) > 1 and all(new.replica_state(i, k) == OUT for i, k in on_agent)
        ctl = svc.agents[agent].control_address
        assert (ctl, 1, new.generation) in link.fences  # acknowledged before publishing
        # a second report for the same replica changes nothing
        await repl.report_failure(1, lay.generation, ext.extent_id, "timeout", lease_id=await reader(svc))
        assert svc.layouts[1].generation == new.generation

    asyncio.run(body())


def test_a_report_waits_for_an_unfenceable_agent_to_go_silent() -> None:
    async def body() -> None:
        svc, link, repl = await replicated_service()
        lay = svc.layouts[1]
        ext = lay.replica_column(1, 0).extents[0]
        agent = svc.drives[ext.drive_id].agent_id
        link.fail.add(svc.agents[agent].control_address)
        svc.started -= 1.0

        async def others_beat() -> None:  # every other agent stays alive; the failing one is silent
            while True:
                for a in svc.agents:
                    if a != agent:
                        svc.heartbeat(a, {})
                await asyncio.sleep(0.05)

        beats = asyncio.ensure_future(others_beat())
        t0 = time.monotonic()
        try:
            await repl.report_failure(1, lay.generation, ext.extent_id, "timeout", lease_id=await reader(svc))
        finally:
            beats.cancel()
        waited = time.monotonic() - t0
        assert svc.layouts[1].replica_state(1, 0) == OUT
        assert waited >= svc.agent_timeout - 0.1  # not before its serve lease has surely run out

    asyncio.run(body())


def test_create_refuses_bad_replica_counts_and_domains() -> None:
    async def body() -> None:
        svc = MetaService(MemoryStore(), ReplLink())
        await register(svc, 3)
        with pytest.raises(UsageError, match="replicas must be between"):
            await svc.create_volume("a", MiB, replicas=4)
        with pytest.raises(UsageError, match="failure domain"):
            await svc.create_volume("b", MiB, replicas=2, failure_domain="no spaces!")
        with pytest.raises(CapacityError, match="failure domains"):
            await svc.create_volume("c", MiB, replicas=2, failure_domain="rack")  # no agent has the label

    asyncio.run(body())


# ---------------------------------------------------------------------- transport
def test_an_abandoned_read_never_writes_into_the_callers_buffer() -> None:
    from nvpool.proto.transport import AgentConnection

    async def body() -> None:
        conn = AgentConnection("test:0")
        sent: list[bytes] = []

        class T:
            def writelines(self, frames: list[bytes]) -> None:
                sent.extend(bytes(f) for f in frames)

            def is_closing(self) -> bool:
                return False

            def get_write_buffer_size(self) -> int:
                return 0

            def abort(self) -> None:
                raise AssertionError("not expected")

        conn.transport = T()  # type: ignore[assignment]
        dest = memoryview(bytearray(4096))
        task = asyncio.ensure_future(conn.submit(dp.READ, 7, 0, 4096, 1, dest=dest))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the completion and its payload arrive after the caller gave up
        frame = dp.encode_completion(1, 0, 4096, 0, 0) + b"z" * 4096
        buf = conn.get_buffer(len(frame))
        n = min(len(buf), len(frame))
        buf[:n] = frame[:n]
        conn.buffer_updated(n)
        rest = frame[n:]
        while rest:
            buf = conn.get_buffer(len(rest))
            k = min(len(buf), len(rest))
            buf[:k] = rest[:k]
            conn.buffer_updated(k)
            rest = rest[k:]
        assert bytes(dest) == bytes(4096)

    asyncio.run(body())



def test_an_io_error_rebuilds_the_replica_elsewhere_at_once() -> None:
    async def body() -> None:
        svc, link, repl = await replicated_service(agents=4)
        lay = svc.layouts[1]
        ext = lay.replica_column(2, 0).extents[0]
        bad_drive = ext.drive_id
        await repl.report_failure(1, lay.generation, ext.extent_id, "io", lease_id=await reader(svc))
        assert svc.layouts[1].replica_state(2, 0) == OUT
        assert svc.repairs[1][(2, 0)].rebuild  # not worth a resync in place
        await repl.tick()  # rebuilt on another drive although the agent is alive
        after = svc.layouts[1]
        assert not after.degraded
        assert all(e.drive_id != bad_drive for e in after.replica_column(2, 0).extents)

    asyncio.run(body())


def test_a_failure_at_a_restarted_agents_old_address_takes_nothing_out() -> None:
    async def body() -> None:
        svc, link, repl = await replicated_service()
        lay = svc.layouts[1]
        ext = lay.replica_column(0, 1).extents[0]
        agent = svc.drives[ext.drive_id].agent_id
        old = svc.agents[agent].address
        svc.agents[agent].address = "127.0.0.1:9999"  # re-registered after a restart, alive
        await repl.report_failure(1, lay.generation, ext.extent_id, "unavailable", address=old, lease_id=await reader(svc))
        assert svc.layouts[1].generation == lay.generation and not svc.layouts[1].degraded
        # at its current address the same report does take it out
        await repl.report_failure(1, lay.generation, ext.extent_id, "unavailable", address="127.0.0.1:9999", lease_id=await reader(svc))
        assert svc.layouts[1].replica_state(0, 1) == OUT

    asyncio.run(body())


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(1, 4), st.integers(2, 3), st.integers(4, 40), st.booleans())
@example(2, 1, 2, 36, False)  # two replicas of one column both moving once left a drive 2 over its share
def test_rebalancing_replicas_keeps_them_apart_and_evens_the_shares(hosts: int, more: int, replicas: int,
                                                                  size_mib: int, drain_first: bool) -> None:
    from nvpool.pool.planner import plan_rebalance_replicated, with_allocations
    if hosts < replicas:
        hosts = replicas
    spaces = pool(hosts, 1)
    lay = layout_of(spaces, size_mib * MiB, replicas)
    grown = with_allocations(spaces, lay.extents()) + [
        DriveSpace(f"n{j}d0", f"n{j}", 64 * MiB, MiB) for j in range(more)]
    if drain_first:  # the first server drains: everything on it must move
        grown = [DriveSpace(d.drive_id, d.host, d.capacity, d.data_offset, d.used, d.host != "h0") for d in grown]
    try:
        planned, _ = plan_rebalance_replicated(lay, grown, 1000, seed=1)
    except CapacityError:
        usable_hosts = {d.host for d in grown if d.usable}
        assert len(usable_hosts) < replicas or drain_first  # only when it truly cannot be placed apart
        return
    if planned is None:
        assert not drain_first or not any(e.drive_id.startswith("h0") for e in lay.extents())
        return
    new = lay.evolve(columns=planned[0], mirrors=planned[1], generation=2)
    new.validate()
    by_id = {d.drive_id: d for d in grown}
    for i in range(new.width):
        homes = [by_id[new.replica_column(i, k).extents[0].drive_id].host for k in range(new.replicas)]
        assert len(set(homes)) == new.replicas, f"column {i}: replicas share a server {homes}"
    if drain_first:
        assert not any(e.drive_id.startswith("h0") for e in new.extents())
    per: dict[str, int] = {}
    for i in range(new.width):
        for k in range(new.replicas):
            d = new.replica_column(i, k).extents[0].drive_id
            per[d] = per.get(d, 0) + 1
    usable = [d.drive_id for d in grown if d.usable]
    units = new.width * new.replicas
    assert max(per.get(d, 0) for d in usable) <= -(-units // len(usable)) + 1


def test_volume_health_says_degraded_or_unavailable() -> None:
    async def body() -> None:
        svc, link, repl = await replicated_service()
        await svc.create_volume("plain", 8 * MiB)
        view = {n: svc.volume_view(svc.volumes[n])["health"] for n in ("v", "plain")}
        assert view == {"v": "ok", "plain": "ok"}
        svc.agents["a1"].last_seen = time.monotonic() - 1.0
        svc.started -= 1.0
        assert svc.volume_view(svc.volumes["plain"])["health"] == "unavailable"  # its only copy is gone
        await repl.tick()
        assert svc.volume_view(svc.volumes["v"])["health"] == "degraded"  # served by the other copies

    asyncio.run(body())


def test_resizing_a_replicated_volume_grows_every_copy_apart() -> None:
    async def body() -> None:
        svc, link, repl = await replicated_service(agents=3)
        before = svc.layouts[1]
        await svc.resize_volume("v", 40 * MiB)
        after = svc.layouts[1]
        after.validate()
        assert after.size == 40 * MiB and after.replicas == 2 and after.generation > before.generation
        host = {d: svc.drives[d].agent_id for d in svc.drives}
        for i in range(after.width):
            for k in range(after.replicas):
                assert after.replica_column(i, k).length >= after.replica_column(i, 0).length
            hosts = [{host[e.drive_id] for e in after.replica_column(i, k).extents} for k in range(after.replicas)]
            assert not hosts[0] & hosts[1], f"column {i}: copies share a server after growing"
        # a degraded volume is not resized (its out copies could not take new extents)
        svc.agents["a2"].last_seen = time.monotonic() - 1.0
        svc.started -= 1.0
        await repl.tick()
        assert svc.layouts[1].degraded
        with pytest.raises(UsageError, match="out of service"):
            await svc.resize_volume("v", 48 * MiB)

    asyncio.run(body())


def test_reads_wait_for_overlapping_writes_in_flight_and_writes_never_overlap() -> None:
    """The client-side order behind "reads never go back in time" in the writer's process: a read of
    bytes a write is changing waits for that write; a second overlapping write waits too; other ranges
    do not wait."""
    from nvpool.client.volume import RangeLock

    async def body() -> None:
        lock = RangeLock()
        far = time.monotonic() + 5
        w = await lock.acquire(100, 200, far)
        order: list[str] = []

        async def read(s: int, e: int, tag: str) -> None:
            await lock.wait_clear(s, e, far)
            order.append(tag)

        async def write(s: int, e: int, tag: str) -> None:
            h = await lock.acquire(s, e, far)
            order.append(tag)
            lock.release(h)

        tasks = [asyncio.ensure_future(read(150, 160, "read-overlap")), asyncio.ensure_future(read(0, 50, "read-apart")),
                 asyncio.ensure_future(write(199, 300, "write-overlap"))]
        await asyncio.sleep(0.05)
        assert order == ["read-apart"]  # only the one apart from the write in flight went ahead
        order.append("write-done")
        lock.release(w)
        await asyncio.gather(*tasks)
        assert order[:2] == ["read-apart", "write-done"] and set(order[2:]) == {"read-overlap", "write-overlap"}
        with pytest.raises(TimeoutError):  # (AgentTimeoutError) bounded by the I/O's budget
            h = await lock.acquire(0, 10, far)
            await lock.wait_clear(5, 6, time.monotonic() + 0.05)
        lock.release(h)

    asyncio.run(body())
