"""Metadata service core with an in-memory store and fake agents: registration readiness, rollback
when an agent refuses extents, ids never reused, restart from the store."""

from __future__ import annotations

import asyncio
from typing import Optional

import pytest

from nvpool.pool.kvstore import MemoryStore
from nvpool.proto.layout import Extent
from nvpool.pool.meta import AgentRec, DriveRec, MetaService
from nvpool.proto.records import ExtentRecord
from nvpool.proto.errors import AlreadyExistsError, CapacityError, LeaseError, UnavailableError, UsageError

MiB = 1 << 20


class FakeLink:
    def __init__(self) -> None:
        self.assigned: dict[str, list[ExtentRecord]] = {}
        self.released: list[int] = []
        self.fail: set[str] = set()
        self.dirty_calls: list[tuple[str, list[int], str]] = []

    async def assign(self, address: str, records: list[ExtentRecord], zero: bool) -> None:
        if address in self.fail:
            raise UnavailableError(f"{address} is down")
        self.assigned.setdefault(address, []).extend(records)

    async def release(self, address: str, extent_ids: list[int]) -> None:
        self.released.extend(extent_ids)

    async def fence(self, address: str, volume_id: int, min_generation: int) -> None:
        pass

    async def flush(self, address: str) -> None:
        pass

    async def map_extent(self, address: str, extent_id: int, written: bool = False) -> list[tuple[int, int]]:
        return [(0, 1 << 40)]  # everything may hold data

    async def dirty(self, address: str, extent_ids: list[int], op: str) -> dict[int, Optional[list[tuple[int, int]]]]:
        self.dirty_calls.append((address, list(extent_ids), op))
        return {e: [] for e in extent_ids} if op == "get" else {}

    async def intent(self, address: str, volume_id: int, extent_ids: list[int], op: str, epoch: int = 0
                     ) -> dict[int, Optional[list[tuple[int, int]]]]:
        self.dirty_calls.append((address, list(extent_ids), f"intent-{op}"))
        return {e: [] for e in extent_ids} if op == "get" else {}

    async def scrub(self, address: str, extent_id: int, offset: int, length: int) -> tuple[bytes, list[int], bool]:
        return bytes(-(-length // 4096) * 4), [], True  # every block zeros, no sums recorded

    async def copy(self, *args: object) -> int:
        return 0

    async def close(self) -> None:
        pass


async def register(svc: MetaService, n: int, heartbeat: bool = True) -> None:
    for i in range(n):
        a = AgentRec(f"a{i}", f"h{i}", "", f"127.0.0.1:{7000 + i}", f"ctl{i}", "", [])
        await svc.register_agent(a, [DriveRec(f"d{i}", f"a{i}", f"/d{i}", 256 * MiB, 2 * MiB)])
        if heartbeat:
            assert svc.heartbeat(f"a{i}", {}).reregister is False


def test_new_agent_takes_no_extents_until_it_heartbeats() -> None:
    async def body() -> None:
        svc = MetaService(MemoryStore(), FakeLink())
        await register(svc, 2, heartbeat=False)
        assert not any(d.usable for d in svc.drive_spaces())
        with pytest.raises(CapacityError):
            await svc.create_volume("v", 8 * MiB)
        svc.heartbeat("a0", {})
        assert [d.drive_id for d in svc.drive_spaces() if d.usable] == ["d0"]
        assert svc.heartbeat("nobody", {}).reregister is True  # unknown agent: register again

    asyncio.run(body())


def test_refused_assignment_rolls_back_and_ids_are_never_reused() -> None:
    async def body() -> None:
        link = FakeLink()
        store = MemoryStore()
        svc = MetaService(store, link)
        await register(svc, 3)
        link.fail.add("ctl2")
        with pytest.raises(UnavailableError, match="a2"):
            await svc.create_volume("v", 12 * MiB)
        assert svc.volumes == {} and svc.layouts == {}
        rolled_back = {r.extent_id for addr in ("ctl0", "ctl1") for r in link.assigned.get(addr, [])}
        assert rolled_back and rolled_back <= set(link.released)
        link.fail.clear()
        vol = await svc.create_volume("v", 12 * MiB)
        ids = {e.extent_id for e in svc.layouts[vol.volume_id].extents()}
        assert not ids & rolled_back, "an extent id was reused"
        # a restarted service sees the same volumes, layouts, fences and counters
        again = MetaService(store, link)
        assert again.layouts == svc.layouts and again.fences == svc.fences
        assert (again.next_volume_id, again.next_extent_id) == (svc.next_volume_id, svc.next_extent_id)
        assert {r.extent_id for r in again.extents_for_agent("a0")} == {
            e.extent_id for e in svc.layouts[vol.volume_id].extents() if e.drive_id == "d0"}

    asyncio.run(body())


def test_deleted_volume_leaves_the_authoritative_extent_list() -> None:
    async def body() -> None:
        link = FakeLink()
        svc = MetaService(MemoryStore(), link)
        await register(svc, 2)
        vol = await svc.create_volume("gone", 8 * MiB)
        ext: list[Extent] = list(svc.layouts[vol.volume_id].extents())
        await svc.delete_volume("gone")
        assert svc.extents_for_agent("a0") == [] and set(link.released) == {e.extent_id for e in ext}
        # not free until every agent confirmed the drop: a stopped agent may still serve them
        assert all(d.used != () for d in svc.drive_spaces())
        with pytest.raises(CapacityError):
            await svc.create_volume("big", 508 * MiB)
        for a, d in (("a0", "d0"), ("a1", "d1")):
            mine = sorted(e.extent_id for e in ext if e.drive_id == d)
            assert svc.heartbeat(a, {}).release == mine  # told again at every heartbeat
            assert svc.heartbeat(a, {}, released=[]).release == mine
            # a confirmation for another agent's extents frees nothing
            other = [e.extent_id for e in ext if e.drive_id != d]
            before = set(svc.reserved)
            svc.heartbeat(a, {}, released=other)
            assert set(svc.reserved) == before
            assert svc.heartbeat(a, {}, released=mine).release == []
        # the space is free again
        assert all(d.used == () for d in svc.drive_spaces())
        await svc.create_volume("big", 508 * MiB)

    asyncio.run(body())


def test_drive_moved_to_another_server_keeps_its_extents() -> None:
    async def body() -> None:
        svc = MetaService(MemoryStore(), FakeLink())
        await register(svc, 2)
        vol = await svc.create_volume("m", 8 * MiB)
        on_d0 = {e.extent_id for e in svc.layouts[vol.volume_id].extents() if e.drive_id == "d0"}
        assert on_d0
        # d0 is pulled from server a0 and plugged into a new server a9
        newcomer = AgentRec("a9", "h9", "", "127.0.0.1:7999", "ctl9", "", [])
        got = await svc.register_agent(newcomer, [DriveRec("d0", "a9", "/dev/nvme3n1", 256 * MiB, 2 * MiB)])
        assert {r.extent_id for r in got} == on_d0
        assert svc.extents_for_agent("a0") == [] and "d0" not in svc.agents["a0"].drives
        _, eps = svc.layout("m")
        assert {e.drive_id: e.agent_id for e in eps}["d0"] == "a9"

    asyncio.run(body())


class BlockingLink(FakeLink):
    """assign never returns: the metadata service dies while agents are taking the extents."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()

    async def assign(self, address: str, records: list[ExtentRecord], zero: bool) -> None:
        self.assigned.setdefault(address, []).extend(records)
        self.entered.set()
        await asyncio.Event().wait()


def test_space_of_a_create_that_died_half_way_stays_reserved_until_released() -> None:
    async def body() -> None:
        store = MemoryStore()
        link = BlockingLink()
        svc = MetaService(store, link)
        await register(svc, 2)
        task = asyncio.create_task(svc.create_volume("half", 8 * MiB))
        await link.entered.wait()
        # the lock is not held while agents work: other mutations go on
        await asyncio.wait_for(svc.register_agent(AgentRec("a7", "h7", "", "127.0.0.1:7007", "ctl7", "", []),
                                                  [DriveRec("d7", "a7", "/d7", 256 * MiB, 2 * MiB)]), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # a caller that went away leaves nothing pending in the live service either
        assert svc.reserved and all(r.kind == "releasing" for r in svc.reserved.values())
        for r in list(store.data):
            if r.startswith("reserved/"):  # as if it died before it could roll back
                store.data[r] = store.data[r].replace(b'"releasing"', b'"pending"')
        # "restart": a new service over the same store
        again = MetaService(store, FakeLink())
        assigned = {r.extent_id for rs in link.assigned.values() for r in rs}
        assert assigned and set(again.reserved) == assigned
        assert all(r.kind == "releasing" for r in again.reserved.values())
        assert again.volumes == {}
        await register(again, 2)
        res = again.heartbeat("a0", {})
        assert set(res.release) == {e for e in assigned if again.reserved[e].drive_id == "d0"}
        # the agent holds them (its digest differs from the authoritative empty list): told to drop them
        from nvpool.proto.records import extent_digest
        held = list(link.assigned.get("ctl0", []))
        mine = [r.extent_id for r in held]
        assert again.heartbeat("a0", {}, digest=extent_digest(held)).keep == []
        assert again.heartbeat("a0", {}, digest=extent_digest([]), released=mine).keep is None
        assert not any(r.drive_id == "d0" for r in again.reserved.values())

    asyncio.run(body())


def test_pool_identity_and_agent_identity() -> None:
    async def body() -> None:
        store = MemoryStore()
        svc = MetaService(store, FakeLink())
        assert svc.pool_id and MetaService(store, FakeLink()).pool_id == svc.pool_id  # persisted
        assert MetaService(MemoryStore(), FakeLink()).pool_id != svc.pool_id
        a = AgentRec("a0", "h0", "", "127.0.0.1:7000", "ctl0", "", [], instance="i1")
        drive = DriveRec("d0", "a0", "/d0", 256 * MiB, 2 * MiB)
        with pytest.raises(UsageError, match="belongs to pool"):
            await svc.register_agent(a, [drive], pool_id="another-pool")
        with pytest.raises(UsageError, match="never allocated"):
            await svc.register_agent(a, [drive], pool_id=svc.pool_id, held=[svc.next_extent_id + 3])
        await svc.register_agent(a, [drive], pool_id=svc.pool_id)
        assert svc.heartbeat("a0", {}, instance="i1").reregister is False
        # a second live agent with the same name and other drives is refused
        twin = AgentRec("a0", "h9", "", "127.0.0.1:7999", "ctl9", "", [], instance="i2")
        with pytest.raises(AlreadyExistsError, match="another --name"):
            await svc.register_agent(twin, [DriveRec("d9", "a0", "/d9", 256 * MiB, 2 * MiB)])
        assert svc.agents["a0"].address == "127.0.0.1:7000"
        # its heartbeats do not keep the entry alive
        assert svc.heartbeat("a0", {}, instance="i2").reregister is True
        # the same agent restarted (same drives, new instance) is welcome
        again = AgentRec("a0", "h0", "", "127.0.0.1:7001", "ctl0", "", [], instance="i3")
        await svc.register_agent(again, [drive])
        assert svc.agents["a0"].address == "127.0.0.1:7001"

    asyncio.run(body())


def test_slow_agents_do_not_hold_the_metadata_lock_during_resize() -> None:
    """Zeroing a grown volume's new extents can take long: other changes (a registration, another
    volume's create) go on meanwhile, and the volume itself refuses a second change until done."""
    async def body() -> None:
        link = BlockingLink()
        gate = asyncio.Event()

        async def assign(address: str, records: list[ExtentRecord], zero: bool) -> None:
            link.assigned.setdefault(address, []).extend(records)
            link.entered.set()
            await gate.wait()

        svc = MetaService(MemoryStore(), link)
        await register(svc, 2)
        gate.set()
        link.assign = assign  # type: ignore[method-assign]
        await svc.create_volume("g", 8 * MiB)
        gate.clear()
        link.entered.clear()
        task = asyncio.create_task(svc.resize_volume("g", 16 * MiB))
        await link.entered.wait()
        await asyncio.wait_for(svc.register_agent(AgentRec("a7", "h7", "", "127.0.0.1:7007", "ctl7", "", []),
                                                  [DriveRec("d7", "a7", "/d7", 256 * MiB, 2 * MiB)]), 2)
        with pytest.raises(UsageError, match="being changed|being re-spread or resized"):
            await svc.resize_volume("g", 24 * MiB)
        with pytest.raises(UsageError, match="resized"):
            await svc.delete_volume("g")
        gate.set()
        vol = await asyncio.wait_for(task, 5)
        assert vol.size == 16 * MiB and svc.layouts[vol.volume_id].size == 16 * MiB
        assert not [r for r in svc.reserved.values() if r.kind == "pending"]
        await svc.resize_volume("g", 24 * MiB)  # free again

    asyncio.run(body())


def test_a_retried_open_gets_the_lease_its_first_attempt_took() -> None:
    """An open whose answer was lost (the leader died after committing the lease) is retried on the new
    leader with the same request id: it gets that lease back instead of being refused as a second writer."""
    async def body() -> None:
        store = MemoryStore()
        svc = MetaService(store, FakeLink())
        await register(svc, 2)
        await svc.create_volume("v", 8 * MiB)
        first = await svc.open_volume("v", True, "host pid 1 (app)", request="r1")
        again = MetaService(store, FakeLink())  # the next leader, loaded from the store
        got = await again.open_volume("v", True, "host pid 1 (app)", request="r1")
        assert got.lease_id == first.lease_id
        with pytest.raises(LeaseError):  # without the request id it is a second writer
            await again.open_volume("v", True, "host pid 1 (app)")
        other = await again.open_volume("v", False, "host pid 2 (reader)", request="r1")
        assert other.lease_id != first.lease_id and other.mode == "read"

    asyncio.run(body())


def test_a_copy_on_a_server_that_is_down_makes_the_volume_degraded() -> None:
    """Before the server is taken out of service, a replicated volume with a copy on it is not "ok": it is
    "degraded" while another copy of every column is served, "unavailable" once none is."""
    async def body() -> None:
        svc = MetaService(MemoryStore(), FakeLink())
        await register(svc, 3)
        vol = await svc.create_volume("r", 8 * MiB, replicas=2)
        assert svc.volume_view(vol)["health"] == "ok"
        svc.agents["a0"].last_seen -= 10 * svc.agent_timeout  # silent, not yet marked out
        assert not svc.layouts[vol.volume_id].degraded
        assert svc.volume_view(vol)["health"] == "degraded"
        svc.agents["a1"].last_seen -= 10 * svc.agent_timeout
        svc.agents["a2"].last_seen -= 10 * svc.agent_timeout
        assert svc.volume_view(vol)["health"] == "unavailable"

    asyncio.run(body())
