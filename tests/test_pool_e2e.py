"""End to end with real processes: metadata service + 4 agents on 127.0.0.1, file-backed drives; the
metadata on SQLite and, the same tests again, on etcd.

Random unaligned reads and writes crossing stripe boundaries are checked byte for byte against an
in-memory model; restarts lose nothing; bad input gets a clear error and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import uvloop

from nvpool import client
from nvpool.client.api import AsyncPool
from nvpool.client.cluster import LocalCluster
from nvpool.proto.errors import (AlreadyExistsError, CapacityError, NotFoundError, NvpoolError, RemoteError, Status,
                                 UsageError)

MiB = 1 << 20
# the whole module runs twice: metadata on SQLite, and on a real 3-member etcd cluster (issue 13)
pytestmark = [pytest.mark.slow,
              pytest.mark.parametrize("local_pool", ["sqlite", "etcd"], indirect=True, scope="module")]


def nvpool(meta: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NVPOOL_META=meta)
    p = subprocess.run([sys.executable, "-m", "nvpool", *args], capture_output=True, text=True, env=env, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"nvpool {' '.join(args)} failed ({p.returncode}): {p.stderr}")
    return p


def test_random_io_matches_model(local_pool: LocalCluster) -> None:
    rng = np.random.default_rng(42)
    size = 48 * MiB
    with client.connect(local_pool.meta.address) as pool:
        info = pool.create_volume("model", size, stripe_unit="64K")
        # more columns than drives (growth then moves whole columns), on all drives and all servers
        assert info.stripe_width == 12 and len(set(info.hosts)) == 4 and len(set(info.drives)) == 8
        vol = pool.open("model")
        model = np.zeros(size, dtype=np.uint8)
        assert not vol.read(0, size).any()  # a new volume reads as zeros
        for i in range(150):
            n = int(rng.integers(1, 400_000))
            off = int(rng.integers(0, size - n))
            if i % 2 == 0:
                data = rng.integers(0, 256, n, dtype=np.uint8)
                vol.write(off, data)
                model[off : off + n] = data
            else:
                # misaligned destination inside a larger buffer
                buf = np.zeros(n + 3, dtype=np.uint8)
                vol.readinto(buf[3:], off)
                assert np.array_equal(buf[3:], model[off : off + n]), f"mismatch at op {i} [{off}, {off + n})"
        vol.flush()
        assert np.array_equal(vol.read(0, size), model)


def test_concurrent_disjoint_writers_and_readers(local_pool: LocalCluster) -> None:
    async def body() -> None:
        pool = await AsyncPool.connect(local_pool.meta.address)
        try:
            await pool.create_volume("conc", 16 * MiB, stripe_unit="128K")
            vol = await pool.open("conc")
            blobs = [os.urandom(700_001) for _ in range(16)]
            offs = [i * MiB + 17 for i in range(16)]
            await asyncio.gather(*(vol.write(o, b) for o, b in zip(offs, blobs)))
            outs = [bytearray(len(b)) for b in blobs]
            await asyncio.gather(*(vol.readinto(memoryview(x), o) for x, o in zip(outs, offs)))
            assert all(x == b for x, b in zip(outs, blobs))
        finally:
            await pool.close()

    uvloop.run(body())


def test_deleted_volume_space_reads_zeros_and_stale_handles_are_refused(local_pool: LocalCluster) -> None:
    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("old", 32 * MiB)
        old = pool.open("old")
        old.write(0, b"\xff" * (32 * MiB))
        old.flush()
        pool.delete_volume("old")
        with pytest.raises(NotFoundError):
            pool.open("old")
        new = pool.open(pool.create_volume("new", 32 * MiB).name)
        assert not new.read(0, 32 * MiB).any(), "a new volume saw another volume's bytes"
        # the stale handle of the deleted volume can neither read nor write the reused space
        with pytest.raises(RemoteError) as ei:
            old.write(0, b"evil")
        assert ei.value.status == Status.NO_EXTENT
        with pytest.raises(RemoteError):
            old.read(0, 10)
        assert not new.read(0, 1 * MiB).any()
        pool.delete_volume("new")


def test_bad_input_changes_nothing(local_pool: LocalCluster) -> None:
    with client.connect(local_pool.meta.address) as pool:
        before = {v.name for v in pool.list_volumes()}
        with pytest.raises(CapacityError):
            pool.create_volume("huge", "100T")
        pool.create_volume("dup", 4 * MiB)
        with pytest.raises(AlreadyExistsError):
            pool.create_volume("dup", 8 * MiB)
        assert pool.volume_info("dup").size == 4 * MiB
        for bad in ["", "a/b", "-x", "x" * 65]:
            with pytest.raises(UsageError):
                pool.create_volume(bad, 4 * MiB)
        vol = pool.open("dup")
        vol.write(0, b"keep")
        for off, n in [(-1, 1), (4 * MiB, 1), (4 * MiB - 2, 3)]:
            with pytest.raises(UsageError):
                vol.read(off, n)
            with pytest.raises(UsageError):
                vol.write(off, b"x" * n)
        assert bytes(vol.read(0, 4)) == b"keep"
        with pytest.raises(NotFoundError):
            pool.open("missing")
        with pytest.raises(NotFoundError):
            pool.delete_volume("missing")
        assert {v.name for v in pool.list_volumes()} == before | {"dup"}
        pool.delete_volume("dup")


def test_resize_grows_online_and_keeps_data(local_pool: LocalCluster) -> None:
    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("grow", 8 * MiB, stripe_unit="256K")
        vol = pool.open("grow")
        data = os.urandom(8 * MiB)
        vol.write(0, data)
        gen = vol.generation
        info = pool.resize_volume("grow", 24 * MiB)
        assert info.size == 24 * MiB and info.generation > gen
        with pytest.raises(UsageError):
            pool.resize_volume("grow", 4 * MiB)
        vol.refresh()
        assert vol.size == 24 * MiB
        assert bytes(vol.read(0, 8 * MiB)) == data
        assert not vol.read(8 * MiB, 16 * MiB).any()
        vol.write(20 * MiB, b"tail")
        assert bytes(pool.open("grow").read(20 * MiB, 4)) == b"tail"
        pool.delete_volume("grow")


def test_cli_volume_lifecycle_and_json(local_pool: LocalCluster) -> None:
    meta = local_pool.meta.address
    out = json.loads(nvpool(meta, "volume", "create", "clivol", "--size", "16M", "--stripe-unit", "1M", "--json").stdout)
    assert out["name"] == "clivol" and out["size"] == 16 * MiB
    names = [v["name"] for v in json.loads(nvpool(meta, "volume", "list", "--json").stdout)]
    assert "clivol" in names
    assert "clivol" in nvpool(meta, "volume", "show", "clivol").stdout
    st = json.loads(nvpool(meta, "pool", "status", "--json").stdout)
    assert st["health"] == "ok" and len(st["agents"]) == 4 and all(a["alive"] for a in st["agents"])
    assert sum(len(a["drives"]) for a in st["agents"]) == 8
    bad = nvpool(meta, "volume", "create", "clivol", "--size", "1M", check=False)
    assert bad.returncode == 1 and "exists" in bad.stderr
    bad = nvpool(meta, "volume", "show", "nope", check=False)
    assert bad.returncode == 1 and "nope" in bad.stderr and "Traceback" not in bad.stderr
    nvpool(meta, "volume", "delete", "clivol", "--yes")
    assert "clivol" not in nvpool(meta, "volume", "list").stdout


def test_agent_with_unknown_drive_path_fails_clearly(local_pool: LocalCluster) -> None:
    p = nvpool(local_pool.meta.address, "agent", "--drive", "/nonexistent/drive.img", "--listen", "127.0.0.1:0",
               "--join-secret-file", str(local_pool.secret_file), check=False)
    assert p.returncode == 1 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_restarts_of_meta_and_agent_lose_nothing(local_pool: LocalCluster) -> None:
    data = os.urandom(24 * MiB)
    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("durable", 24 * MiB, stripe_unit="512K")
        vol = pool.open("durable")
        vol.write(0, data)
        vol.flush()
        local_pool.kill_meta()
        # the data path does not need the metadata service
        assert bytes(vol.read(0, 24 * MiB)) == data
        local_pool.start_meta()
        local_pool.kill_agent(1)
        local_pool.start_agent(1)  # comes back on another port, same drives
        local_pool.wait_registered()
        # the old handle finds the agent again through the metadata service and retries
        assert bytes(vol.read(0, 24 * MiB)) == data
        vol.write(5 * MiB, b"after-restart")
    with client.connect(local_pool.meta.address) as pool:
        assert "durable" in {v.name for v in pool.list_volumes()}
        again = pool.open("durable")
        expect = bytearray(data)
        expect[5 * MiB : 5 * MiB + 13] = b"after-restart"
        assert bytes(again.read(0, 24 * MiB)) == bytes(expect)
        pool.delete_volume("durable")


def test_sync_fast_path_agrees_with_the_full_path(local_pool: LocalCluster) -> None:
    rng = np.random.default_rng(9)
    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("fast", 8 * MiB, stripe_unit="64K")
        vol = pool.open("fast")
        model = np.zeros(8 * MiB, dtype=np.uint8)
        for _ in range(200):
            n = int(rng.integers(1, 64 * 1024))
            off = int(rng.integers(0, 8 * MiB - n))
            data = rng.integers(0, 256, n, dtype=np.uint8)
            vol.write(off, data)  # small ones take this thread's blocking channels
            model[off : off + n] = data
            assert np.array_equal(vol.read(off, n), model[off : off + n])
        assert pool._sync._channels(), "small I/O did not use the synchronous fast path"
        assert np.array_equal(vol.read(0, 8 * MiB), model)  # the full (asyncio) path sees the same bytes
        with pytest.raises(UsageError):
            vol.read(8 * MiB - 10, 20)  # out of range: refused by the full path, not the fast one
        pool.delete_volume("fast")
        with pytest.raises(RemoteError):
            vol.read(0, 4096)  # a deleted volume: the fast path misses, the full path reports NO_EXTENT


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_readv_batches_agree_with_the_model_and_fall_back_when_stale(local_pool: LocalCluster,
                                                                    transport: str) -> None:
    """``Volume.readv`` reads a batch on the thread's own connections, all in flight together (the
    compiled batch over the agents' Unix sockets with "auto"; over TLS, one round trip at a time, with
    "tcp"): requests of 1 byte to 5 MiB, crossing stripe units and columns, byte for byte. After a
    forced writer takeover raised the volume's generation, the reader's batch is refused (STALE_LAYOUT)
    and the normal path refreshes the layout and reads the same bytes."""
    from nvpool.client.volume import ClientOptions

    rng = np.random.default_rng(11)
    size = 24 * MiB
    model = rng.integers(0, 256, size, dtype=np.uint8)
    name = f"batch-{transport}"
    with client.connect(local_pool.meta.address, ClientOptions(transport=transport)) as pool:
        pool.create_volume(name, size, stripe_unit="256K")
        writer = pool.open(name)
        writer.write(0, model)
        reader = pool.open(name, read_only=True)

        def check_batch() -> None:
            reqs = []
            for _ in range(300):
                n = int(rng.choice([1, 4096, 4096, 65536, 300_000, 1 << 20, 5 << 20]))
                off = int(rng.integers(0, size - n))
                reqs.append((off, np.empty(n, dtype=np.uint8)))
            assert reader.readv(reqs) == sum(len(b) for _, b in reqs)
            for off, b in reqs:
                assert np.array_equal(b, model[off : off + len(b)]), (off, len(b))

        check_batch()
        assert pool._sync.misses == 0, "a batch of a healthy volume missed"
        assert pool._sync._channels(), "readv did not use the thread's own connections"
        with client.connect(local_pool.meta.address) as other, other.open(name, force=True) as taker:
            taker.write(0, model[:4096])  # (the takeover raised the generation on every agent)
            check_batch()
        assert pool._sync.misses > 0, "the stale batch was not refused"
        reader.close()
        try:
            writer.close()
        except NvpoolError:  # (its lease was taken over)
            pass
        pool.delete_volume(name, force=True)


def test_dead_agent_clear_errors_degraded_health_nothing_lost(local_pool: LocalCluster) -> None:
    """Runs last in this module: it stops one agent and brings it back."""
    import time

    from nvpool.client.api import ClientOptions
    from nvpool.proto.errors import UnavailableError

    meta = local_pool.meta.address
    data = os.urandom(16 * MiB)
    with client.connect(meta) as pool:
        pool.create_volume("victim", 16 * MiB, stripe_unit="256K")
        pool.open("victim").write(0, data)
    local_pool.kill_agent(3)
    try:
        with client.connect(meta, ClientOptions(retries=2, connect_timeout=1.0)) as pool:
            vol = pool.open("victim")
            t0 = time.monotonic()
            with pytest.raises(UnavailableError):
                vol.read(0, 16 * MiB)  # some stripes live on the dead agent
            assert time.monotonic() - t0 < 15
            deadline = time.monotonic() + 10
            while True:
                p = nvpool(meta, "pool", "status", "--json", check=False)
                assert p.returncode in (0, 3), p.stderr  # 3: not healthy, for scripts
                st = json.loads(p.stdout)
                if st["health"] == "degraded":
                    assert p.returncode == 3
                    break
                assert time.monotonic() < deadline, "the pool never reported the dead agent"
                time.sleep(0.2)
            assert [a["alive"] for a in st["agents"] if a["agent_id"] == "agent3"] == [False]
            fresh = pool.create_volume("avoids-dead", 8 * MiB)
            assert "agent3" not in fresh.hosts and len(set(fresh.hosts)) == 3
            pool.delete_volume("avoids-dead")
    finally:
        local_pool.start_agent(3)
        local_pool.wait_registered()
    with client.connect(meta) as pool:
        assert bytes(pool.open("victim").read(0, 16 * MiB)) == data
        pool.delete_volume("victim")
