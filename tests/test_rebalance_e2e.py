"""Growing the pool online: volumes re-spread over new servers while clients read and write them.

Every test keeps a golden copy of each volume; client threads write and read random ranges the whole
time, and at the end every byte is compared.
"""

from __future__ import annotations

import json
from typing import Any
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nvpool import client
from tests.conftest import make_cluster
from tests.waiting import poll

MiB = 1 << 20
pytestmark = pytest.mark.slow


class Workload:
    """One thread per volume: random writes and reads, each read checked against the golden copy."""

    def __init__(self, meta: str, names: list[str], size: int, seed: int = 7) -> None:
        self.meta, self.names, self.size = meta, names, size
        self.golden = {n: np.zeros(size, dtype=np.uint8) for n in names}
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.ops = 0
        self.threads = [threading.Thread(target=self._loop, args=(n, seed + i), daemon=True) for i, n in enumerate(names)]

    def _loop(self, name: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        gold = self.golden[name]
        try:
            with client.connect(self.meta) as pool:
                vol = pool.open(name)
                while not self.stop.is_set():
                    n = int(rng.integers(1, 300_000))
                    off = int(rng.integers(0, self.size - n))
                    if rng.random() < 0.5:
                        data = rng.integers(0, 256, n, dtype=np.uint8)
                        vol.write(off, data)
                        gold[off : off + n] = data
                    else:
                        got = vol.read(off, n)
                        if not np.array_equal(got, gold[off : off + n]):
                            bad = int(np.flatnonzero(got != gold[off : off + n])[0])
                            raise AssertionError(f"{name}: read mismatch at byte {off + bad} during rebalance")
                    self.ops += 1
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.errors.append(exc)

    def __enter__(self) -> "Workload":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]
        with client.connect(self.meta) as pool:
            for name, gold in self.golden.items():
                got = pool.open(name).read(0, self.size)
                assert np.array_equal(got, gold), f"{name}: final contents differ from the golden copy"


def nvpool(meta: str, *args: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "nvpool", *args, "--meta", meta, "--json"],
                       capture_output=True, text=True, timeout=300)
    # (`pool status` exits 3 while the pool is not healthy: an agent restarting, for instance)
    assert p.returncode == 0 or (list(args[:2]) == ["pool", "status"] and p.returncode == 3), p.stderr
    return dict(json.loads(p.stdout))


def wait_rebalance(meta: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = nvpool(meta, "pool", "status")["rebalance"]
        if st["state"] != "running":
            return dict(st)
        time.sleep(0.2)
    raise AssertionError("rebalance did not finish")


def wait_free(meta: str, used: int, timeout: float = 20) -> None:
    """Released extents are reserved until their agents confirm; then ``used`` is exact."""
    deadline = time.monotonic() + timeout
    while nvpool(meta, "pool", "status")["used"] != used:
        assert time.monotonic() < deadline, "released space was never freed"
        time.sleep(0.2)
    assert nvpool(meta, "pool", "status")["releasing_extents"] == 0


def columns_per_host(meta: str, name: str) -> dict[str, int]:
    info = nvpool(meta, "volume", "show", name)
    out: dict[str, int] = {}
    for h in info["hosts"]:
        out[h] = out.get(h, 0) + 1
    return out


def test_grow_pool_and_rebalance_under_load(tmp_path: Path) -> None:
    size = 24 * MiB
    with make_cluster(tmp_path, agents=2, drives_per_agent=1, drive_size="256M").up() as c:
        meta = c.meta.address
        with client.connect(meta) as pool:
            for n in ("va", "vb"):
                pool.create_volume(n, size, stripe_unit="256K")
        width = nvpool(meta, "volume", "show", "va")["stripe_width"]
        assert width == 6 and columns_per_host(meta, "va") == {"agent0": 3, "agent1": 3}
        with Workload(meta, ["va", "vb"], size) as w:
            c.add_agent()
            c.add_agent()
            c.wait_registered()
            plan = nvpool(meta, "pool", "rebalance", "--plan")
            # whole columns move: two of six per volume (the new servers' even share), width unchanged
            assert [(m["old_width"], m["new_width"]) for m in plan["moves"]] == [(6, 6), (6, 6)]
            assert [m["bytes"] for m in plan["moves"]] == [size // 3, size // 3]
            assert plan["bytes_total"] == 2 * size // 3 and plan["imbalance_after"] < plan["imbalance_before"]
            ops_before = w.ops
            st = nvpool(meta, "pool", "rebalance", "--wait", "--max-rate", "8M")  # ~2 s under load
            ops_during = w.ops - ops_before
            assert st["state"] == "done" and st["bytes_done"] == plan["bytes_total"]  # moved what it said
        w.check()
        assert ops_during > 10, f"the workload made {ops_during} operations during the rebalance"
        for n in ("va", "vb"):
            assert columns_per_host(meta, n) == {"agent0": 2, "agent1": 2, "agent2": 1, "agent3": 1} or \
                sorted(columns_per_host(meta, n).values()) == [1, 1, 2, 2]
            assert nvpool(meta, "volume", "show", n)["state"] == "ready"
        wait_free(meta, 2 * size)  # the old extents were released: space used is exactly the two volumes
        with client.connect(meta) as pool:
            assert len(set(pool.create_volume("vc", 8 * MiB).hosts)) == 4  # new volumes use every server
        assert nvpool(meta, "pool", "rebalance", "--plan")["moves"] == []


def progress(meta: str) -> dict[str, Any]:
    return dict(nvpool(meta, "pool", "status")["rebalance"])


def test_rebalance_survives_meta_and_source_agent_restart(tmp_path: Path) -> None:
    size = 32 * MiB
    with make_cluster(tmp_path, agents=2, drives_per_agent=1, drive_size="256M").up() as c:
        meta = c.meta.address
        with client.connect(meta) as pool:
            pool.create_volume("vr", size, stripe_unit="256K")
        with Workload(meta, ["vr"], size, seed=11) as w:
            c.add_agent()
            c.add_agent()
            c.wait_registered()
            st = nvpool(meta, "pool", "rebalance", "--max-rate", "3M")  # 16 MiB to move: ~5 s
            assert st["state"] == "running"
            total = st["bytes_total"]
            assert total == size // 2
            # kill the metadata service only once the copy has really started
            before_kill = poll("copying to start", lambda: progress(meta)["bytes_done"] >= 4 * MiB and progress(meta))
            killed = time.monotonic()
            c.kill_meta()
            c.start_meta()  # same address; resumes from persisted progress
            after = progress(meta)
            elapsed = time.monotonic() - killed
            assert after["state"] == "running" and after["bytes_done"] > 0, "the run restarted instead of resuming"
            # no more than the rate allows since the kill (plus a chunk in flight): progress was not double counted
            assert after["bytes_done"] <= before_kill["bytes_done"] + 3 * MiB * elapsed + 4 * MiB
            resumed_at = after["bytes_done"]
            poll("more copying after the restart", lambda: progress(meta)["bytes_done"] > resumed_at)
            c.kill_agent(0)  # a source of the copy
            time.sleep(0.5)
            c.start_agent(0)
            c.wait_registered()
            st = wait_rebalance(meta)
            assert st["state"] == "done", st
            # resumed, not restarted: what was copied before the kill was not copied again in full
            assert st["bytes_done"] <= total + 8 * MiB, st
        w.check()
        assert sorted(columns_per_host(meta, "vr").values()) == [2, 2, 2, 2]
        log = (c.dir / "logs" / "meta.log").read_text()
        assert "resuming" in log or "finishing interrupted migrations" in log


def test_cancel_keeps_every_byte(tmp_path: Path) -> None:
    size = 16 * MiB
    with make_cluster(tmp_path, agents=1, drives_per_agent=1, drive_size="256M").up() as c:
        meta = c.meta.address
        with client.connect(meta) as pool:
            pool.create_volume("vx", size, stripe_unit="128K")
        with Workload(meta, ["vx"], size, seed=3) as w:
            c.add_agent()
            c.wait_registered()
            nvpool(meta, "pool", "rebalance", "--max-rate", "2M")
            poll("copying to start", lambda: progress(meta)["bytes_done"] > 0)
            st = nvpool(meta, "pool", "rebalance", "--cancel")
            assert st["state"] == "cancelled"
        w.check()
        info = nvpool(meta, "volume", "show", "vx")
        assert info["stripe_width"] == 4 and info["state"] == "ready" and set(info["hosts"]) == {"agent0"}
        wait_free(meta, size)  # the target's extents were released and confirmed


def test_drain_after_growth_undrain_and_remove(tmp_path: Path) -> None:
    """Issue 10.7: after a rebalance over new servers, draining and removing still work; undrain
    exists; a live server that was not drained cannot be removed; a removed agent stays out."""
    size = 16 * MiB
    with make_cluster(tmp_path, agents=2, drives_per_agent=1, drive_size="256M").up() as c:
        meta = c.meta.address
        data = os.urandom(size)
        with client.connect(meta) as pool:
            pool.create_volume("vg", size, stripe_unit="256K")
            with pool.open("vg") as vol:
                vol.write(0, data)
        c.add_agent()
        c.wait_registered()
        assert nvpool(meta, "pool", "rebalance", "--wait")["state"] == "done"
        assert set(columns_per_host(meta, "vg")) == {"agent0", "agent1", "agent2"}
        # `pool remove` drains the server first, then takes it out
        p = subprocess.run([sys.executable, "-m", "nvpool", "pool", "remove", "agent2", "--meta", meta],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert "agent2" not in {a["agent_id"] for a in nvpool(meta, "pool", "status")["agents"]}
        # the removed agent keeps running and heartbeating: it is refused, and does not come back
        poll("the removed agent to be refused",
             lambda: "removed from this pool" in (c.dir / "logs" / "agent2.log").read_text())
        assert "agent2" not in {a["agent_id"] for a in nvpool(meta, "pool", "status")["agents"]}
        # drain one of the original servers: only its columns move; then undrain it
        st = nvpool(meta, "pool", "drain", "agent0", "--wait")
        assert st["state"] == "done"
        assert set(columns_per_host(meta, "vg")) == {"agent1"}
        agents = {a["agent_id"]: a for a in nvpool(meta, "pool", "status")["agents"]}
        assert agents["agent0"]["state"] == "draining"
        nvpool(meta, "pool", "undrain", "agent0")
        agents = {a["agent_id"]: a for a in nvpool(meta, "pool", "status")["agents"]}
        assert agents["agent0"]["state"] == "active"
        with client.connect(meta) as pool, pool.open("vg", read_only=True) as vol:
            assert bytes(vol.read(0, size)) == data


def test_remove_refuses_a_live_undrained_server(tmp_path: Path) -> None:
    import asyncio

    from nvpool.client.metaclient import MetaClient
    from nvpool.proto import nvpool_pb2 as pb
    from nvpool.proto.errors import UsageError

    with make_cluster(tmp_path, agents=2, drives_per_agent=1, drive_size="256M").up() as c:
        async def remove() -> None:
            meta = MetaClient(c.meta.address)
            try:
                await meta.call("Drain", pb.DrainRequest(host="agent1", remove=True))
            finally:
                await meta.close()

        with pytest.raises(UsageError, match="not drained"):
            asyncio.run(remove())
        assert "agent1" in {a["agent_id"] for a in nvpool(c.meta.address, "pool", "status")["agents"]}


def test_drain_and_remove_a_server(tmp_path: Path) -> None:
    size = 12 * MiB
    with make_cluster(tmp_path, agents=3, drives_per_agent=1, drive_size="256M").up() as c:
        meta = c.meta.address
        with client.connect(meta) as pool:
            pool.create_volume("vd", size, stripe_unit="256K", stripe_width=2)
            data = os.urandom(size)
            pool.open("vd").write(0, data)
            hosts = pool.volume_info("vd").hosts
        victim = hosts[0]
        st = nvpool(meta, "pool", "remove", victim)
        assert st["state"] == "done"
        status = nvpool(meta, "pool", "status")
        assert victim not in {a["host"] for a in status["agents"]}
        with client.connect(meta) as pool:
            info = pool.volume_info("vd")
            assert victim not in info.hosts and info.stripe_width == 2  # an explicit width is kept
            assert bytes(pool.open("vd").read(0, size)) == data
