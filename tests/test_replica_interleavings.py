"""Replicated volumes under interleavings of faults that a single outage never shows, with real processes
(``pool/replication.py``, steps 5 and 9):

* overlapping outages on a 3-replica volume: a write acknowledged on one copy alone must reach, after
  both resyncs, the copy that was out longest, including when that copy resyncs from a copy that
  itself only received the write by a resync copy (step 5: the union of every ``ok`` copy's record,
  copied bytes recorded, and tracking started on a copy before it is copied to while another is out);
* failure reports: only a holder of a live lease on the volume is heard, about the volume's own
  extents, at a bounded rate (step 9); a refused report changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from nvpool.client.api import AsyncPool
from nvpool.client.cluster import LocalCluster
from nvpool.client.metaclient import MetaClient
from nvpool.client.volume import ClientOptions
from nvpool.pool import replication
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto.errors import LeaseError, NvpoolError, UnavailableError, UsageError
from nvpool.proto.layout import Layout
from nvpool.proto.records import Endpoint
from tests.test_replication_faults import assert_identical, pool_of, volume_info, wait_redundant
from tests.waiting import poll

SIZE, STRIPE_UNIT = 8 << 20, 256 << 10
#: the bytes every copy holds before the outages, and the write W acknowledged on one copy alone
BASE = bytes([0xA5]) * SIZE
W_OFFSET, W_LENGTH = 64 << 10, 128 << 10
W = random.Random(1).randbytes(W_LENGTH)


def layout_of(c: LocalCluster, name: str) -> tuple[Layout, dict[str, Endpoint]]:
    async def get() -> tuple[Layout, dict[str, Endpoint]]:
        m = MetaClient(c.meta.address, timeout=10)
        try:
            return await m.get_layout(name=name)
        finally:
            await m.close()

    return asyncio.run(get())


def replica_states(c: LocalCluster, name: str) -> list[dict[str, Any]]:
    """[{"column", "replica", "state", "host", ...}] as the service reports them."""
    return list(asyncio.run(volume_info(c.meta.address, name)).replica_info)


def wait_host(c: LocalCluster, name: str, host: str, state: str, timeout: float = 30) -> None:
    """Until every replica of ``name`` on ``host`` is in ``state``."""
    def done() -> bool:
        mine = [r for r in replica_states(c, name) if r["host"] == host]
        return bool(mine) and all(r["state"] == state for r in mine)

    poll(f"{host}'s replicas of {name} to be {state}", done, timeout, 0.1)


def agent_index(c: LocalCluster, agent_id: str) -> int:
    return next(i for i, a in enumerate(c.agents) if a.name == agent_id)


def column_copies_from_drive_files(c: LocalCluster, name: str, column: int) -> list[bytes]:
    """Every copy of ``column``, read straight from the agents' drive files (one drive per agent),
    not through any agent."""
    lay, eps = layout_of(c, name)
    out = []
    for k in range(lay.replicas):
        buf = bytearray()
        for e in lay.replica_column(column, k).extents:
            path = c.dir / "drives" / f"{eps[e.drive_id].agent_id}-d0.img"
            with open(path, "rb") as f:
                f.seek(e.drive_offset)
                buf += f.read(e.length)
        out.append(bytes(buf[: lay.replica_column(column, 0).length]))
    return out


@pytest.fixture
def stopped() -> Iterator[list[int]]:
    """Pids a test SIGSTOPs: resumed whatever happens, so the pool's teardown can stop them."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def sigstop(stopped: list[int], pid: int) -> None:
    stopped.append(pid)
    os.kill(pid, signal.SIGSTOP)


def sigcont(stopped: list[int], pid: int) -> None:
    os.kill(pid, signal.SIGCONT)
    stopped.remove(pid)


async def write_volume(meta: str, name: str, offset: int, data: bytes, expect_write_set: list[int] | None = None
                       ) -> None:
    """Write ``data`` and close cleanly (a writer that ends uncleanly makes the service resync on its
    own, which would hide what the test looks at). Every wait is bounded: no call may hang on an agent
    that is stopped."""
    opts = ClientOptions(replica_timeout=2.0, io_deadline=20.0, connect_timeout=2.0)
    pool = await AsyncPool.connect(meta, opts)
    try:
        vol = await pool.open(name)
        try:
            if expect_write_set is not None:
                lay = vol.layout
                assert {p.column for p in lay.map(offset, len(data))} == {0}, "the write must land in column 0"
                ok, syncing = lay.write_set(0)
                assert (list(ok), list(syncing)) == (expect_write_set, []), lay.states
            await asyncio.wait_for(vol.write(offset, data), 30)  # returns: acknowledged
            got = await asyncio.wait_for(vol.read(offset, len(data)), 30)
            assert bytes(got) == data
        finally:
            await asyncio.wait_for(vol.close(), 15)
    finally:
        await asyncio.wait_for(pool.close(), 15)


@pytest.mark.parametrize(("a_restarts", "b_out_before_c_returns"), [(False, False), (False, True), (True, True)],
                         ids=["b-stays", "b-out-too", "a-restarted-b-out-too"])
def test_write_on_one_copy_survives_overlapping_outages_of_three_replicas(
        tmp_path: Path, stopped: list[int], a_restarts: bool, b_out_before_c_returns: bool) -> None:
    """Column 0's copies A (replica 0), B (replica 1), C (replica 2) on three agents. C goes out, A goes
    out, W is acknowledged on B alone, A resyncs from B (W reaches A by a copy) and is ``ok``; then C
    returns and resyncs with A as the column's first ``ok`` copy (step 5).

    * ``b-stays``: C's resync must use B's record too (the union of the ``ok`` copies' records), or A's
      record must show the copied W;
    * ``b-out-too``: B goes out before C returns, so A, whose record must show the copied W, is C's
      only source;
    * ``a-restarted-b-out-too``: A's agent is killed and restarted instead (its record is lost), so A
      records W only if tracking starts on it before it is copied to while C is out."""
    c = pool_of(tmp_path, agents=3)  # agent_timeout 1.2 s, rebuild_after 600 s: returning copies are resynced
    meta = c.meta.address

    async def create() -> None:
        p = await AsyncPool.connect(meta)
        try:
            await p.create_volume("v", SIZE, stripe_unit=STRIPE_UNIT, replicas=3)
        finally:
            await p.close()

    asyncio.run(create())
    asyncio.run(write_volume(meta, "v", 0, BASE))
    wait_redundant(c, "v")
    lay, eps = layout_of(c, "v")
    assert lay.replicas == 3
    roles = [eps[lay.replica_column(0, k).extents[0].drive_id].agent_id for k in range(3)]
    assert len(set(roles)) == 3, f"column 0's copies are not on three agents: {roles}"
    a, b, cc = (agent_index(c, r) for r in roles)
    host_a, host_b, host_c = roles

    sigstop(stopped, c.agents[cc].pid)  # C out
    wait_host(c, "v", host_c, "out")
    if a_restarts:
        c.kill_agent(a)
    else:
        sigstop(stopped, c.agents[a].pid)
    wait_host(c, "v", host_a, "out")  # A out: B is column 0's only ok copy
    asyncio.run(write_volume(meta, "v", W_OFFSET, W, expect_write_set=[1]))  # W: on B alone

    if a_restarts:
        c.start_agent(a)
    else:
        sigcont(stopped, c.agents[a].pid)
    wait_host(c, "v", host_a, "ok")  # A back: resynced from B, so W reached A by a copy
    assert all(r["state"] == "out" for r in replica_states(c, "v") if r["host"] == host_c)
    if b_out_before_c_returns:
        sigstop(stopped, c.agents[b].pid)  # B out: A is the only ok copy, and C's only source
        wait_host(c, "v", host_b, "out")
    sigcont(stopped, c.agents[cc].pid)  # C back: resynced with A as the first ok copy
    if b_out_before_c_returns:
        wait_host(c, "v", host_c, "ok")
        sigcont(stopped, c.agents[b].pid)
    wait_redundant(c, "v")

    copies = column_copies_from_drive_files(c, "v", 0)
    col_off = W_OFFSET  # column 0 of stripe 0: the column offset is the volume offset
    for k, name in enumerate(("A", "B", "C")):
        assert copies[k][col_off: col_off + W_LENGTH] == W, (
            f"copy {name} (replica {k}, {roles[k]}) of column 0 lacks the acknowledged write")
        assert copies[k] == copies[0], f"copy {name} of column 0 differs from copy A"
    assert_identical(c, "v")  # every column, through the agents
    log = (c.dir / "logs" / "meta.log").read_text()
    assert "resyncing" in log and "rebuilding" not in log
    assert "unclean" not in log, "a writer closed uncleanly: the test did not exercise the resync records"


def test_failure_reports_only_from_a_lease_holder_about_its_volume_at_a_bounded_rate(tmp_path: Path) -> None:
    c = pool_of(tmp_path, agents=3)
    meta = c.meta.address

    async def main() -> None:
        m = MetaClient(meta, timeout=10)
        try:
            await m.create_volume("v", SIZE, STRIPE_UNIT, 0, 2, "host")
            await m.create_volume("other", SIZE, STRIPE_UNIT, 0, 2, "host")
            lay, _ = await m.get_layout(name="v")
            other, _ = await m.get_layout(name="other")
            vid, gen0 = lay.volume_id, lay.generation
            victim = lay.replica_column(0, 1).extents[0].extent_id  # a healthy copy

            async def unchanged(why: str) -> None:
                now, _ = await m.get_layout(name="v")
                info = await m.get_volume("v")
                assert (now.generation, now.states, info.health) == (gen0, lay.states, "ok"), (
                    f"{why}: the layout or health changed: generation {gen0} -> {now.generation}, "
                    f"states {now.states}, health {info.health}")

            # no lease at all (the old hole: one call took a healthy copy out and started a rebuild)
            with pytest.raises(NvpoolError) as raw:
                await m.call("ReportReplicaFailure", pb.ReplicaFailureRequest(
                    volume_id=vid, generation=gen0, extent_id=victim, reason="io"), timeout=10)
            assert isinstance(raw.value, LeaseError) and "lease" in str(raw.value), repr(raw.value)
            await unchanged("a report without a lease")
            for lease_id in ("", "no-such-lease"):
                with pytest.raises(LeaseError, match="lease"):
                    await m.report_replica_failure(vid, gen0, victim, "io", 10, lease_id=lease_id)
            await unchanged("a report with no live lease")

            # a live lease, but on another volume
            other_lease, _ = await m.open_volume("other", write=False)
            with pytest.raises(LeaseError, match="lease"):
                await m.report_replica_failure(vid, gen0, victim, "io", 10, lease_id=other_lease)
            await unchanged("a report with a lease on another volume")

            # a live lease on the volume, about another volume's extent
            lease, _ = await m.open_volume("v", write=False)
            foreign = other.replica_column(0, 1).extents[0].extent_id
            with pytest.raises(UsageError, match="not a replica"):
                await m.report_replica_failure(vid, gen0, foreign, "io", 10, lease_id=lease)
            await unchanged("a report about another volume's extent")

            # a burst from one lease: refused once past REPORT_BURST (plus what REPORT_RATE refills).
            # The reports name an agent address the agent no longer has (a client that saw it restart),
            # which the service answers without taking anything out: only the rate limit refuses them.
            burst, rate = replication.REPORT_BURST, replication.REPORT_RATE
            n = int(burst) * 2
            accepted, refused = 0, []
            t0 = time.monotonic()
            for _ in range(n):
                try:
                    await m.report_replica_failure(vid, gen0, victim, "unavailable", 10, address="127.0.0.1:1",
                                                   lease_id=lease)
                    accepted += 1
                except UnavailableError as exc:
                    refused.append(str(exc))
            elapsed = time.monotonic() - t0
            assert elapsed < (n - burst) / rate, f"{n} reports took {elapsed:.1f}s: too slow to test the rate"
            assert refused, f"all {n} reports in {elapsed:.2f}s were accepted"
            assert all("too many" in r for r in refused), refused[:3]
            assert burst <= accepted <= burst + rate * elapsed + 1, (accepted, elapsed)
            await unchanged("a burst of reports")

            # control: a holder of a fresh lease on the volume is heard, and the copy goes out
            heard, _ = await m.open_volume("v", write=False)
            after, _ = await m.report_replica_failure(vid, gen0, victim, "unavailable", 10, lease_id=heard)
            assert after.generation > gen0 and after.replica_state(0, 1) == "out", after.states
            for lid in (other_lease, lease, heard):
                await m.close_volume(lid)
        finally:
            await m.close()

    asyncio.run(main())
    wait_redundant(c, "v")  # the copy taken out by the control report is resynced
    log = (c.dir / "logs" / "meta.log").read_text()
    assert "refused a replica failure report" in log
