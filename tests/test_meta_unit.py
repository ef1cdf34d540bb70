"""Metadata service core with an in-memory store and fake agents: registration readiness, rollback
when an agent refuses extents, ids never reused, restart from the store."""

from __future__ import annotations

import asyncio

import pytest

from nvpool.pool.kvstore import MemoryStore
from nvpool.proto.layout import Extent
from nvpool.pool.meta import AgentRec, DriveRec, MetaService
from nvpool.proto.records import ExtentRecord
from nvpool.proto.errors import CapacityError, UnavailableError

MiB = 1 << 20


class FakeLink:
    def __init__(self) -> None:
        self.assigned: dict[str, list[ExtentRecord]] = {}
        self.released: list[int] = []
        self.fail: set[str] = set()

    async def assign(self, address: str, records: list[ExtentRecord], zero: bool) -> None:
        if address in self.fail:
            raise UnavailableError(f"{address} is down")
        self.assigned.setdefault(address, []).extend(records)

    async def release(self, address: str, extent_ids: list[int]) -> None:
        self.released.extend(extent_ids)

    async def fence(self, address: str, volume_id: int, min_generation: int) -> None:
        pass

    async def copy(self, *args: object) -> int:
        return 0

    async def close(self) -> None:
        pass


async def register(svc: MetaService, n: int, heartbeat: bool = True) -> None:
    for i in range(n):
        a = AgentRec(f"a{i}", f"h{i}", "", f"127.0.0.1:{7000 + i}", f"ctl{i}", "", [])
        await svc.register_agent(a, [DriveRec(f"d{i}", f"a{i}", f"/d{i}", 256 * MiB, 2 * MiB)])
        if heartbeat:
            assert svc.heartbeat(f"a{i}", {}) is False


def test_new_agent_takes_no_extents_until_it_heartbeats() -> None:
    async def body() -> None:
        svc = MetaService(MemoryStore(), FakeLink())
        await register(svc, 2, heartbeat=False)
        assert not any(d.usable for d in svc.drive_spaces())
        with pytest.raises(CapacityError):
            await svc.create_volume("v", 8 * MiB)
        svc.heartbeat("a0", {})
        assert [d.drive_id for d in svc.drive_spaces() if d.usable] == ["d0"]
        assert svc.heartbeat("nobody", {}) is True  # unknown agent: register again

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
        # the space is free again
        assert all(d.used == () for d in svc.drive_spaces())

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
