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
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def wait_rebalance(meta: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = nvpool(meta, "pool", "status")["rebalance"]
        if st["state"] != "running":
            return dict(st)
        time.sleep(0.2)
    raise AssertionError("rebalance did not finish")


def test_grow_pool_and_rebalance_under_load(tmp_path: Path) -> None:
    size = 24 * MiB
    with make_cluster(tmp_path, agents=2, drives_per_agent=1, drive_size="256M").up() as c:
        meta = c.meta.address
        with client.connect(meta) as pool:
            for n in ("va", "vb"):
                pool.create_volume(n, size, stripe_unit="256K")
        with Workload(meta, ["va", "vb"], size) as w:
            time.sleep(0.5)
            c.add_agent()
            c.add_agent()
            c.wait_registered()
            plan = nvpool(meta, "pool", "rebalance", "--plan")
            assert [m["new_width"] for m in plan["moves"]] == [4, 4]
            assert plan["bytes_total"] == 2 * size and plan["imbalance_after"] < plan["imbalance_before"]
            st = nvpool(meta, "pool", "rebalance", "--wait")
            assert st["state"] == "done" and st["bytes_done"] == 2 * size
            ops_at_end = w.ops
            time.sleep(0.5)
        w.check()
        assert ops_at_end > 20, "the workload made no progress during the rebalance"
        with client.connect(meta) as pool:
            for n in ("va", "vb"):
                info = pool.volume_info(n)
                assert info.stripe_width == 4 and len(set(info.hosts)) == 4 and info.state == "ready"
            # the old extents were released: space used is exactly the two volumes
            st = nvpool(meta, "pool", "status")
            assert st["used"] == 2 * size
            # new volumes use the new servers at once
            assert len(set(pool.create_volume("vc", 8 * MiB).hosts)) == 4
        assert nvpool(meta, "pool", "rebalance", "--plan")["moves"] == []


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
            st = nvpool(meta, "pool", "rebalance", "--max-rate", "4M")  # slow: ~8 s
            assert st["state"] == "running"
            time.sleep(1.5)
            c.kill_meta()
            c.start_meta()  # same address; resumes from persisted progress
            time.sleep(0.5)
            c.kill_agent(0)  # a source of the copy
            time.sleep(0.5)
            c.start_agent(0)
            c.wait_registered()
            st = wait_rebalance(meta)
            assert st["state"] == "done", st
        w.check()
        with client.connect(meta) as pool:
            assert pool.volume_info("vr").stripe_width == 4


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
            time.sleep(1.0)
            st = nvpool(meta, "pool", "rebalance", "--cancel")
            assert st["state"] == "cancelled"
            time.sleep(0.3)
        w.check()
        with client.connect(meta) as pool:
            info = pool.volume_info("vx")
            assert info.stripe_width == 1 and info.state == "ready"
        # the target's extents are released: reserved until their agent confirms, then free
        deadline = time.monotonic() + 20
        while nvpool(meta, "pool", "status")["used"] != size:
            assert time.monotonic() < deadline, "the cancelled target's space was never freed"
            time.sleep(0.2)
        assert nvpool(meta, "pool", "status")["releasing_extents"] == 0


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
            assert victim not in info.hosts and info.stripe_width == 2
            assert bytes(pool.open("vd").read(0, size)) == data
