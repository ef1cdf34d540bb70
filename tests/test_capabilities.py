"""Nobody reads, writes or joins without a credential (issue 14), tried as a hostile peer would with
nothing but the pool's addresses: raw data-plane commands on guessed extents, forged, foreign,
expired and read-only capabilities, generations far beyond any layout, control calls from a peer that
is not the metadata service, and registrations under a taken name without the join secret. Every
probe must fail with DENIED / UNAUTHENTICATED, and the pool must keep working."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from nvpool.client.api import AsyncPool
from nvpool.client.cluster import LocalCluster
from nvpool.client.metaclient import MetaClient
from nvpool.proto import capability, grpctls, tls
from nvpool.proto import dataplane as dp
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto import nvpool_pb2_grpc as pbg
from nvpool.proto.errors import RemoteError, Status, UnavailableError, UsageError
from nvpool.proto.layout import Layout
from nvpool.proto.records import Endpoint
from nvpool.proto.transport import AgentConnection, connect
from tests.creds import capability_for, tls_args

MiB = 1 << 20
HUGE = 2**64 - 1


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    from tests.conftest import make_cluster

    c = make_cluster(tmp_path_factory.mktemp("caps"), agents=2, drives_per_agent=1, drive_size="128M")
    c.up()

    async def fill() -> None:
        p = await AsyncPool.connect(c.meta.address)
        try:
            for name, byte in (("victim", 0x5A), ("other", 0x33)):
                await p.create_volume(name, 8 * MiB, stripe_width=1)
                v = await p.open(name)
                await v.write(0, bytes([byte]) * MiB)
                await v.close()
        finally:
            await p.close()

    try:
        asyncio.run(fill())
        yield c
    finally:
        c.down()


async def layout(c: LocalCluster, name: str) -> tuple[Layout, dict[str, Endpoint]]:
    m = MetaClient(c.meta.address)
    try:
        return await m.get_layout(name=name)
    finally:
        await m.close()


async def raw(c: LocalCluster, name: str) -> tuple[AgentConnection, Layout, int]:
    """A raw data-plane connection to the agent holding ``name``'s first extent, and that extent."""
    lay, eps = await layout(c, name)
    ext = lay.columns[0].extents[0]
    ep = eps[ext.drive_id]
    assert ep.tls  # the pool's data plane is TLS: the hostile peer here holds a pool client certificate
    files = tls.from_env()
    assert files is not None
    return await connect(ep.address, ssl_context=files.client_context()), lay, ext.extent_id


async def status_of(conn: AgentConnection, op: int, extent: int, generation: int, n: int = 4096) -> Status:
    buf = memoryview(bytearray(n))
    try:
        if op == dp.READ:
            await conn.submit(dp.READ, extent, 0, n, generation, dest=buf)
        else:
            await conn.submit(op, extent, 0, n, generation, payload=b"\xee" * n)
    except RemoteError as exc:
        return exc.status
    return Status.OK


def victim_intact(c: LocalCluster) -> None:
    async def check() -> None:
        p = await AsyncPool.connect(c.meta.address)
        try:
            v = await p.open("victim", read_only=True)
            assert bytes(await v.read(0, MiB)) == b"\x5a" * MiB
            await v.close()
        finally:
            await p.close()
    asyncio.run(check())


def test_raw_commands_without_a_capability_are_denied(pool: LocalCluster) -> None:
    """Each probe on a fresh connection: answered DENIED (saying only what is missing), and then the
    connection is closed: a peer without credentials costs the agent one round trip."""
    async def probe(op: int, extent: int, gen: int) -> None:
        conn, _, _ = await raw(pool, "victim")
        try:
            assert await status_of(conn, op, extent, gen) == Status.DENIED
            with pytest.raises(UnavailableError):  # closed after the answer
                await status_of(conn, dp.READ, extent, gen)
        finally:
            conn.close()

    async def body() -> None:
        _, lay, ext = await raw(pool, "victim")
        for guess in range(1, 6):  # guessed extent ids, at generation 1 and at 2^64-1
            for gen in (1, lay.generation, HUGE):
                await probe(dp.READ, guess, gen)
        await probe(dp.WRITE, ext, HUGE)
        await probe(dp.WRITE, ext, lay.generation)
        conn, _, _ = await raw(pool, "victim")
        try:
            await conn.submit(dp.Opcode.WRITE_ZEROES, ext, 0, 4096, HUGE)
            raise AssertionError("zeroing without a capability was accepted")
        except RemoteError as exc:
            assert exc.status == Status.DENIED and "generation" not in str(exc)  # says nothing useful
        finally:
            conn.close()
    asyncio.run(body())
    victim_intact(pool)


def test_forged_foreign_expired_and_read_only_capabilities_are_refused(pool: LocalCluster) -> None:
    async def body() -> None:
        conn, lay, ext = await raw(pool, "victim")
        vid = lay.volume_id
        other, _ = await layout(pool, "other")
        try:
            forged = capability.sign(capability.Capability(vid, capability.WRITE, HUGE, int(time.time()) + 60),
                                     os.urandom(32))
            conn.authorize(vid, forged)  # refused: the connection holds no capability, so it is closed
            assert await status_of(conn, dp.READ, ext, lay.generation) == Status.DENIED
            with pytest.raises(UnavailableError):
                await status_of(conn, dp.READ, ext, lay.generation)
            conn.close()
            conn, _, _ = await raw(pool, "victim")
            # a genuine capability, for another volume
            conn.authorize(other.volume_id, capability_for(pool.secret_file, other.volume_id))
            assert await status_of(conn, dp.READ, ext, lay.generation) == Status.DENIED
            # expired
            conn.authorize(vid, capability_for(pool.secret_file, vid, ttl=-1))
            assert await status_of(conn, dp.READ, ext, lay.generation) == Status.DENIED
            # read-only: reads pass, writes do not
            conn.authorize(vid, capability_for(pool.secret_file, vid, write=False, max_generation=lay.generation))
            assert await status_of(conn, dp.READ, ext, lay.generation) == Status.OK
            assert await status_of(conn, dp.WRITE, ext, lay.generation) == Status.DENIED
            # a write capability never covers a generation above its own, whatever the fence says
            conn.authorize(vid, capability_for(pool.secret_file, vid, max_generation=lay.generation))
            assert await status_of(conn, dp.READ, ext, HUGE) == Status.DENIED
            assert await status_of(conn, dp.WRITE, ext, HUGE) == Status.DENIED
        finally:
            conn.close()
    asyncio.run(body())
    victim_intact(pool)


def test_a_fenced_writers_capability_cannot_write(pool: LocalCluster) -> None:
    async def body() -> None:
        m = MetaClient(pool.meta.address)
        try:
            lease, _ = await m.open_volume("victim", write=True, holder="old writer")
            lay, eps, cap = await m.get_layout_cap(name="victim", lease_id=lease)
            assert cap
            ext = lay.columns[0].extents[0]
            files = tls.from_env()
            assert files is not None
            conn = await connect(eps[ext.drive_id].address, ssl_context=files.client_context())
            conn.authorize(lay.volume_id, cap)
            assert await status_of(conn, dp.READ, ext.extent_id, lay.generation) == Status.OK
            await m.open_volume("victim", write=True, force=True, holder="new writer")  # takes it over
            # the old writer's capability: its generation is fenced, any newer one is beyond it
            assert await status_of(conn, dp.WRITE, ext.extent_id, lay.generation) == Status.STALE_LAYOUT
            assert await status_of(conn, dp.WRITE, ext.extent_id, lay.generation + 1) == Status.DENIED
            assert await status_of(conn, dp.WRITE, ext.extent_id, HUGE) == Status.DENIED
            conn.close()
        finally:
            await m.close()
    asyncio.run(body())
    victim_intact(pool)


def test_only_the_metadata_service_may_call_an_agents_control_service(pool: LocalCluster) -> None:
    async def body() -> None:
        lay, eps = await layout(pool, "victim")
        ext = lay.columns[0].extents[0]
        status = await pool_status(pool)
        ctl = next(a.control_address for a in status.agents if a.agent_id == eps[ext.drive_id].agent_id) \
            if hasattr(status.agents[0], "control_address") else None
        addresses = [ctl] if ctl else []
        if not addresses:  # the control address is not in pool status: read it from the agents' ready files
            addresses = [str(__import__("json").loads(Path(a.ready_file).read_text())["control_address"])
                         for a in pool.agents]
        for address in addresses:
            # without a pool certificate the TLS handshake itself fails
            async with grpc.aio.insecure_channel(address) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await pbg.AgentStub(ch).Fence(pb.FenceRequest(volume_id=lay.volume_id, min_generation=HUGE),
                                                  timeout=5)
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            # a pool client's certificate is not the metadata service's credential either
            async with grpctls.aio_channel(address, tls.from_env()) as ch:
                stub = pbg.AgentStub(ch)
                calls: list[tuple[str, Any]] = [
                    ("AssignExtents", stub.AssignExtents(pb.AssignExtentsRequest(extents=[pb.ExtentRecord(
                        extent_id=10**9, drive_id=ext.drive_id, drive_offset=ext.drive_offset, length=MiB,
                        volume_id=lay.volume_id, min_generation=1)], zero=True), timeout=5)),
                    ("ReleaseExtents", stub.ReleaseExtents(pb.ReleaseExtentsRequest(extent_ids=[ext.extent_id]),
                                                           timeout=5)),
                    ("Fence", stub.Fence(pb.FenceRequest(volume_id=lay.volume_id, min_generation=HUGE), timeout=5)),
                    ("MapExtent", stub.MapExtent(pb.MapExtentRequest(extent_id=ext.extent_id), timeout=5)),
                    ("Fence with a made-up token", stub.Fence(
                        pb.FenceRequest(volume_id=lay.volume_id, min_generation=HUGE), timeout=5,
                        metadata=((capability.AUTH_HEADER, f"{int(time.time())}:{'0' * 32}"),))),
                ]
                for what, call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as ei:
                        await call
                    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, what
    asyncio.run(body())
    victim_intact(pool)  # nothing was zeroed, released or fenced


async def pool_status(c: LocalCluster) -> Any:
    m = MetaClient(c.meta.address)
    try:
        return await m.pool_status()
    finally:
        await m.close()


def test_registering_under_a_taken_name_needs_the_join_secret(pool: LocalCluster) -> None:
    async def body() -> None:
        before = {a.agent_id: a.address for a in (await pool_status(pool)).agents}
        async with grpctls.aio_channel(pool.meta.address, tls.from_env()) as ch:  # a pool client, not an agent
            stub = pbg.MetaStub(ch)
            for cred in ("", f"{int(time.time())}:{'f' * 32}"):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await stub.RegisterAgent(pb.RegisterAgentRequest(
                        agent_id="agent0", host="agent0", address="127.0.0.9:1", control_address="127.0.0.9:2",
                        instance="attacker", credential=cred), timeout=5)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await stub.Heartbeat(pb.HeartbeatRequest(agent_id="agent0", instance="attacker",
                                                             credential=cred), timeout=5)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        after = {a.agent_id: a.address for a in (await pool_status(pool)).agents}
        assert after == before  # clients are never sent to the attacker
    asyncio.run(body())
    victim_intact(pool)


def test_an_agent_without_the_pools_secret_is_refused(pool: LocalCluster, tmp_path: Path) -> None:
    import subprocess
    import sys

    wrong = tmp_path / "wrong.secret"
    fd = os.open(wrong, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32).hex().encode() + b"\n")
    os.close(fd)
    log = tmp_path / "intruder.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "nvpool", "agent", "--meta", pool.meta.address, "--listen",
                              "127.0.0.1:0", "--name", "intruder", "--drive", f"file:{tmp_path / 'i.img'}:64M",
                              "--join-secret-file", str(wrong), *tls_args("intruder", "agent")],
                             stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "refused this agent" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert "intruder" not in {a.agent_id for a in asyncio.run(pool_status(pool)).agents}
    finally:
        p.kill()
        p.wait()
    # and without any secret it does not start at all, saying what is missing
    r = subprocess.run([sys.executable, "-m", "nvpool", "agent", "--meta", pool.meta.address, "--drive",
                        f"file:{tmp_path / 'j.img'}:64M"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "join secret" in r.stderr


def test_capability_codec() -> None:
    secret, old = os.urandom(32), os.urandom(32)
    cap = capability.Capability(7, capability.READ, 12, int(time.time()) + 60)
    blob = capability.sign(cap, secret)
    got = capability.verify(blob, [secret])
    assert (got.volume_id, got.access, got.max_generation) == (7, capability.READ, 12)
    assert capability.verify(capability.sign(cap, old), [secret, old]).volume_id == 7  # rotation: old still valid
    for i in range(len(blob)):  # any flipped byte is refused
        bad = bytearray(blob)
        bad[i] ^= 1
        with pytest.raises(UsageError):
            capability.verify(bytes(bad), [secret])
    with pytest.raises(UsageError):
        capability.verify(blob[:-1], [secret])
    assert got.allows(False, 12, time.time()) == ""
    assert got.allows(True, 12, time.time()) == "capability is read-only"
    assert got.allows(False, 13, time.time()) == "generation beyond the capability"
    assert got.allows(False, 1, time.time() + 120) == "capability expired"
    token = capability.control_token(secret, "/m", 1000)
    assert capability.check_control_token(token, [secret], "/m", 1000) == ""
    assert capability.check_control_token(token, [secret], "/other", 1000)
    assert capability.check_control_token(token, [secret], "/m", 1000 + 3600)
    assert capability.check_control_token(token, [old], "/m", 1000)
