"""Both data-plane transports (TCP and one-sided shm): byte for byte, concurrency, digests, dropped
clients, agents restarted with commands in flight, and region bounds."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from typing import Iterator
import uvloop

from nvpool import client
from nvpool.agents.core import AgentCore
from nvpool.agents.drive import DATA_OFFSET, Drive, DriveSpec
from nvpool.agents.shm import ShmServer
from nvpool.client.api import AsyncPool, ClientOptions
from nvpool.client.cluster import LocalCluster
from nvpool.client.transport_shm import Region, connect_shm
from nvpool.proto import dataplane as dp
from nvpool.proto.records import Endpoint, ExtentRecord
from nvpool.proto.errors import RemoteError, Status, UnavailableError

MiB = 1 << 20
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden(local_pool: LocalCluster) -> np.ndarray:
    data = np.random.default_rng(1).integers(0, 256, 24 * MiB, dtype=np.uint8)
    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("tx", len(data), stripe_unit="128K")
        pool.open("tx").write(0, data)
    return data


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_random_reads_and_writes_byte_for_byte(local_pool: LocalCluster, golden: np.ndarray, transport: str) -> None:
    rng = np.random.default_rng(hash(transport) % 1000)
    model = golden.copy()
    with client.connect(local_pool.meta.address, ClientOptions(transport=transport)) as pool:
        vol = pool.open("tx")
        for i in range(80):
            n = int(rng.integers(1, 2 * MiB))
            off = int(rng.integers(0, len(model) - n))
            if i % 3 == 0:
                data = rng.integers(0, 256, n + 1, dtype=np.uint8)[1:]  # misaligned source
                vol.write(off, data)
                model[off : off + n] = data
            else:
                buf = np.zeros(n + 7, dtype=np.uint8)
                vol.readinto(buf[7:], off)  # misaligned destination
                assert np.array_equal(buf[7:], model[off : off + n])
        vol.write(0, golden)  # leave the fixture as found
        assert np.array_equal(vol.read(0, len(golden)), golden)


def test_zero_copy_registered_memory(local_pool: LocalCluster, golden: np.ndarray) -> None:
    with client.connect(local_pool.meta.address, ClientOptions(transport="shm")) as pool:
        buf = pool.alloc(4 * MiB)
        vol = pool.open("tx")
        vol.readinto(buf, 3 * MiB + 5)
        assert np.array_equal(buf, golden[3 * MiB + 5 : 7 * MiB + 5])
        vol.readinto(buf[100:200], 11)  # a slice inside the region
        assert np.array_equal(buf[100:200], golden[11:111])


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_concurrent_readers_and_writers(local_pool: LocalCluster, transport: str) -> None:
    async def body() -> None:
        pool = await AsyncPool.connect(local_pool.meta.address, ClientOptions(transport=transport))
        try:
            name = f"cc-{transport}"
            await pool.create_volume(name, 8 * MiB, stripe_unit="64K")
            vol = await pool.open(name)
            a, b = os.urandom(MiB), os.urandom(MiB)
            # disjoint ranges: exact; overlapping: each write is atomic per piece, so the result is one of them
            await asyncio.gather(vol.write(0, a), vol.write(2 * MiB, b), vol.write(5 * MiB, a), vol.write(5 * MiB, b))
            outs = [bytearray(MiB) for _ in range(3)]
            await asyncio.gather(*(vol.readinto(memoryview(o), off) for o, off in zip(outs, (0, 2 * MiB, 5 * MiB))))
            assert outs[0] == a and outs[1] == b
            pieces = [outs[2][i : i + 64 * 1024] for i in range(0, MiB, 64 * 1024)]
            assert all(p in (a[i * 65536 : (i + 1) * 65536], b[i * 65536 : (i + 1) * 65536]) for i, p in enumerate(pieces))
            await pool.delete_volume(name)
        finally:
            await pool.close()

    uvloop.run(body())


class CorruptingProxy:
    """Forwards a TCP connection and flips one byte of the Nth chunk in one direction, once."""

    def __init__(self, target: str, upstream: bool, at: int) -> None:
        self.target, self.upstream, self.at = target, upstream, at
        self.flipped = False
        self.address = ""

    async def start(self) -> None:
        srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = "127.0.0.1:%d" % srv.sockets[0].getsockname()[1]
        self.server = srv

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        ur, uw = await asyncio.open_connection(host, int(port))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, corrupt: bool) -> None:
            seen = 0
            while data := await src.read(65536):
                if corrupt and not self.flipped and seen + len(data) > self.at:
                    buf = bytearray(data)
                    buf[self.at - seen] ^= 0xFF
                    data = bytes(buf)
                    self.flipped = True
                seen += len(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pump(r, uw, self.upstream), pump(ur, w, not self.upstream), return_exceptions=True)
        except asyncio.CancelledError:  # the test's loop is ending: the proxy just stops
            pass


@pytest.fixture(scope="module")
def plain_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A pool whose data plane is plaintext (--no-data-tls): a byte flipped on the wire reaches the
    digests (with TLS, the record MAC would reject it first)."""
    from tests.conftest import make_cluster

    c = make_cluster(tmp_path_factory.mktemp("plain"), agents=1, drives_per_agent=1, data_tls=False)
    c.up()
    try:
        yield c
    finally:
        c.down()


@pytest.mark.parametrize("upstream", [False, True], ids=["read-corrupted", "write-corrupted"])
def test_digest_mismatch_is_rejected_counted_and_retried(plain_pool: LocalCluster, upstream: bool) -> None:
    async def body() -> None:
        pool = await AsyncPool.connect(plain_pool.meta.address, ClientOptions(transport="tcp", digests=True))
        try:
            name = f"dg{int(upstream)}"
            await pool.create_volume(name, 4 * MiB, stripe_width=1)
            vol = await pool.open(name)
            (ep,) = vol.endpoints.values()
            proxy = CorruptingProxy(ep.address, upstream, at=dp.COMMAND.size + 4 + 1000 if upstream else 24 + 4 + 1000)
            await proxy.start()
            vol.endpoints = {k: Endpoint(e.drive_id, e.agent_id, proxy.address, "", e.host) for k, e in vol.endpoints.items()}
            data = os.urandom(64 * 1024)
            if upstream:
                await vol.write(0, data)  # the agent refuses the corrupted payload; the client retries
            else:
                await (await pool.open(name)).write(0, data)
                out = bytearray(len(data))
                await vol.readinto(memoryview(out), 0)  # corrupted on the way back; retried
                assert out == data
            assert proxy.flipped
            assert vol.stats["digest_errors"] == 1
            check = await pool.open(name)
            assert await check.read(0, len(data)) == data
            proxy.server.close()
        finally:
            await pool.close()

    uvloop.run(body())


def test_client_disconnecting_mid_write_changes_nothing(local_pool: LocalCluster, golden: np.ndarray) -> None:
    with client.connect(local_pool.meta.address) as pool:
        vol = pool.open("tx")
        p = next(vol.asyncio.layout.map(0, 4096))
        ep = vol.asyncio.endpoints[p.extent.drive_id]
        host, port = ep.address.rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
        s.sendall(dp.encode_command(dp.Opcode.WRITE, 1, p.extent.extent_id, 0, 65536, vol.generation) + b"\xee" * 1000)
        s.close()
        assert np.array_equal(vol.read(0, 65536), golden[:65536])  # agent still serves; nothing applied


def test_agent_restart_with_commands_in_flight(tmp_path: Path) -> None:
    from tests.conftest import make_cluster

    with make_cluster(tmp_path, agents=2, drives_per_agent=1, drive_size="128M").up() as c:
        data = np.random.default_rng(3).integers(0, 256, 16 * MiB, dtype=np.uint8)
        with client.connect(c.meta.address, ClientOptions(transport="tcp")) as pool:
            pool.create_volume("ri", len(data), stripe_unit="64K")
            pool.open("ri").write(0, data)

        async def body() -> None:
            apool = await AsyncPool.connect(c.meta.address, ClientOptions(transport="tcp"))
            try:
                vol = await apool.open("ri")
                stop = asyncio.Event()
                done = [0]

                async def reader(k: int) -> None:
                    buf = bytearray(MiB)
                    i = k
                    while not stop.is_set():
                        off = (i % 16) * MiB
                        await vol.readinto(memoryview(buf), off)
                        assert bytes(buf) == data[off : off + MiB].tobytes(), f"wrong bytes at {off}"
                        done[0] += 1
                        i += 3

                readers = [asyncio.ensure_future(reader(k)) for k in range(8)]
                await asyncio.sleep(0.2)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, c.kill_agent, 1)  # commands are in flight right now
                await loop.run_in_executor(None, c.start_agent, 1)
                await asyncio.sleep(0.3)
                stop.set()
                await asyncio.gather(*readers)
                assert vol.stats["retries"] >= 1, "no command was in flight when the agent died"
                assert done[0] > 20
            finally:
                await apool.close()

        uvloop.run(body())


def test_region_bounds_and_bad_hello(tmp_path: Path) -> None:
    async def body() -> None:
        drive = Drive.open(DriveSpec.parse(f"file:{tmp_path / 'd'}:64M"))
        core = AgentCore([drive])
        core.assign([ExtentRecord(1, drive.drive_id, DATA_OFFSET, 8 * MiB, 1, 1)], zero=True)
        os.pwrite(drive.fd, b"\xab" * MiB, DATA_OFFSET)
        path = str(tmp_path / "a.sock")
        srv = ShmServer(core, path)
        await srv.start()
        try:
            user = Region(2, MiB)
            conn = await connect_shm(path, user_regions=[user])
            user.view[:] = b"\x11" * MiB
            # inside the region: only the commanded bytes change
            await conn.submit(dp.Opcode.READ_REGION, 1, 0, 4096, 1, region=2, region_offset=8192)
            assert bytes(user.view[8192 : 8192 + 4096]) == b"\xab" * 4096
            assert bytes(user.view[:8192]) == b"\x11" * 8192 and bytes(user.view[12288:]) == b"\x11" * (MiB - 12288)
            for region, roff, n in [(2, MiB - 100, 4096), (9, 0, 10), (2, 2**40, 1)]:
                with pytest.raises(RemoteError) as ei:
                    await conn.submit(dp.Opcode.READ_REGION, 1, 0, n, 1, region=region, region_offset=roff)
                assert ei.value.status == Status.REGION
            assert bytes(user.view[MiB - 100 :]) == b"\x11" * 100  # refused before anything was written
            # a bad hello closes only that connection
            loop = asyncio.get_running_loop()

            def bad() -> bytes:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                s.connect(path)
                s.sendall(struct.pack("<4sII", b"EVIL", 1, 0))
                got = s.recv(8)
                s.close()
                return got

            assert (await loop.run_in_executor(None, bad))[:4] == b"NVNO"
            buf = memoryview(bytearray(100))
            await conn.submit(dp.Opcode.READ, 1, 0, 100, 1, dest=buf)
            assert bytes(buf) == b"\xab" * 100
            with pytest.raises(UnavailableError):
                await connect_shm(str(tmp_path / "nope.sock"))
            conn.close()
        finally:
            srv.close()
            core.close()

    uvloop.run(body())
