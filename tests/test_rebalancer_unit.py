"""The rebalancer against the real metadata core and a fake agent link: every failure ends in a state
that can be resumed or cancelled, copied data is flushed before cut-over, and growth moves whole
columns (issue 10.6)."""

from __future__ import annotations

import asyncio

import pytest

from nvpool.pool.kvstore import MemoryStore
from nvpool.pool.meta import AgentRec, DriveRec, MetaService
from nvpool.pool.rebalancer import Rebalancer
from nvpool.proto.errors import RemoteError, Status
from nvpool.proto.layout import Extent
from tests.test_meta_unit import FakeLink

MiB = 1 << 20


class Link(FakeLink):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.copy_error: BaseException | None = None

    async def copy(self, address: str, dst: Extent, dst_offset: int, src_address: str, src: Extent,  # type: ignore[override]
                   src_offset: int, length: int, generation: int, volume_id: int = 0,
                   src_tls: bool = False) -> int:
        if self.copy_error is not None:
            raise self.copy_error
        self.events.append(f"copy {address}")
        return length

    async def flush(self, address: str) -> None:
        self.events.append(f"flush {address}")


async def pool(n: int, link: Link, svc: MetaService | None = None, start: int = 0) -> MetaService:
    svc = svc or MetaService(MemoryStore(), link)
    for i in range(start, start + n):
        await svc.register_agent(AgentRec(f"a{i}", f"h{i}", "", f"127.0.0.1:{7000 + i}", f"ctl{i}", "", []),
                                 [DriveRec(f"d{i}", f"a{i}", f"/d{i}", 256 * MiB, 2 * MiB)])
        svc.heartbeat(f"a{i}", {})
    return svc


async def finish(reb: Rebalancer) -> dict[str, object]:
    assert reb._task is not None
    await asyncio.wait_for(asyncio.shield(reb._task), 10)
    return reb.status()


@pytest.mark.parametrize("error", [RemoteError(Status.IO_ERROR, "source drive failed"), RuntimeError("a bug")])
def test_a_failed_run_is_reported_and_can_be_cancelled_or_resumed(error: BaseException) -> None:
    async def body() -> None:
        link = Link()
        svc = await pool(2, link)
        await svc.create_volume("v", 32 * MiB)
        vid = svc.volumes["v"].volume_id
        before = svc.layouts[vid]
        await pool(2, link, svc, start=2)
        reb = Rebalancer(svc, retry_interval=0.01)
        link.copy_error = error
        await reb.start()
        st = await finish(reb)
        assert st["state"] == "failed" and st["error"], st
        if isinstance(error, RuntimeError):
            assert "internal error" in str(st["error"])
        assert svc.layouts[vid].target is not None  # the migration is in flight, double-writing
        # cancel without a restart: the old layout alone, at a new generation; the target released
        st = await reb.cancel()
        lay = svc.layouts[vid]
        assert st["state"] == "cancelled" and lay.target is None and lay.columns == before.columns
        assert lay.generation > before.generation
        assert {r.kind for r in svc.reserved.values()} == {"releasing"} and svc.reserved
        # and a new run (the copy works again) moves whole columns and finishes
        link.copy_error = None
        await reb.start()
        st = await finish(reb)
        assert st["state"] == "done", st
        after = svc.layouts[vid]
        assert after.width == before.width
        assert sorted(sum(1 for c in after.columns if c.extents[0].drive_id == d) for d in ("d0", "d1", "d2", "d3")) \
            == [2, 2, 2, 2]
        # resume of a failed run: fail again, then start() finishes the migration in flight first
        await pool(1, link, svc, start=4)
        link.copy_error = error
        await reb.start()
        assert (await finish(reb))["state"] == "failed"
        link.copy_error = None
        await reb.start()
        assert (await finish(reb))["state"] == "done" and svc.layouts[vid].target is None

    asyncio.run(body())


def test_copied_data_is_flushed_before_cut_over() -> None:
    async def body() -> None:
        link = Link()
        svc = await pool(1, link)
        await svc.create_volume("v", 16 * MiB)
        vid = svc.volumes["v"].volume_id
        await pool(1, link, svc, start=1)
        reb = Rebalancer(svc, retry_interval=0.01)
        gen = svc.layouts[vid].generation
        await reb.start()
        assert (await finish(reb))["state"] == "done"
        assert svc.layouts[vid].generation == gen + 2
        copies = [i for i, e in enumerate(link.events) if e.startswith("copy ctl1")]
        flushes = [i for i, e in enumerate(link.events) if e == "flush ctl1"]
        assert copies and flushes and max(copies) < min(flushes)

    asyncio.run(body())


def test_a_run_whose_move_was_abandoned_ends_failed_naming_the_volume() -> None:
    """A replica failing mid-move abandons the migration (pool/replication.py); the run must not then say
    "done": a drain would claim a server is empty while it still holds the volume's copies."""
    from nvpool.pool.replication import Replication

    async def body() -> None:
        link = Link()
        svc = await pool(2, link)
        repl = Replication(svc)
        plain_copy = link.copy

        async def copy_then_fail(*args: object, **kw: object) -> int:
            repl.abandon_migration(svc.volumes["v"], "a replica failed (test)")
            return await plain_copy(*args, **kw)  # type: ignore[arg-type]

        link.copy = copy_then_fail  # type: ignore[method-assign]
        await svc.create_volume("v", 32 * MiB)
        vid = svc.volumes["v"].volume_id
        before = svc.layouts[vid]
        await pool(2, link, svc, start=2)
        reb = Rebalancer(svc, retry_interval=0.01)
        await reb.start()
        st = await finish(reb)
        assert st["state"] == "failed" and "v" in str(st["error"]) and "abandoned" in str(st["error"]), st
        assert svc.layouts[vid].target is None and svc.layouts[vid].columns == before.columns

    asyncio.run(body())
