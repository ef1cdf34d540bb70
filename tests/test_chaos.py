"""Faults at random points of metadata changes (issue 10 acceptance): SIGKILL and SIGSTOP of agents and
of the metadata service while volumes are created, deleted, resized, drained and rebalanced. After
every step, once the pool is whole again:

* no extent is leaked or double-allocated: every agent's on-drive extent table equals what the
  metadata store places on that agent's drives, nothing is left reserved, and no two extents in the
  store share bytes of a drive;
* a golden copy of every volume reads back identical.

Seeded and bounded (a fixed number of steps, each with timeouts), so a failure reproduces."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nvpool import client
from nvpool.agents.drive import Drive
from nvpool.client.cluster import LocalCluster
from nvpool.proto.layout import Layout
from tests.conftest import make_cluster
from tests.waiting import poll

MiB = 1 << 20
STEPS = int(os.environ.get("NVPOOL_CHAOS_STEPS", "10"))
pytestmark = pytest.mark.slow


def nv(meta: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvpool", *args, "--meta", meta], capture_output=True, text=True,
                          timeout=timeout)


def store_view(c: LocalCluster) -> tuple[list[Layout], list[dict[str, Any]]]:
    """Layouts and reservations, read from the metadata store itself (SQLite, read-only)."""
    db = sqlite3.connect(f"file:{c.dir / 'meta.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key, value FROM kv WHERE key >= 'layout/' AND key < 'layout0'").fetchall()
        layouts = [Layout.from_dict(json.loads(v)) for _, v in rows]
        rows = db.execute("SELECT key, value FROM kv WHERE key >= 'reserved/' AND key < 'reserved0'").fetchall()
        return layouts, [json.loads(v) for _, v in rows]
    finally:
        db.close()


def check_extents(c: LocalCluster) -> None:
    layouts, reserved = store_view(c)
    assert reserved == [], f"space still reserved after the pool settled: {reserved[:3]}"
    placed: dict[str, list[tuple[int, int, int]]] = {}
    for lay in layouts:
        for e in lay.extents():
            placed.setdefault(e.drive_id, []).append((e.drive_offset, e.length, e.extent_id))
    for drive, ranges in placed.items():
        ranges.sort()
        for (a, n, x), (b, _, y) in zip(ranges, ranges[1:]):
            assert a + n <= b, f"extents {x} and {y} share bytes of drive {drive}"
    for img in sorted((c.dir / "drives").glob("*.img")):
        label, table = Drive.inspect(str(img))
        held = sorted(r.extent_id for r in table)
        want = sorted(x for _, _, x in placed.get(str(label["drive_id"]), []))
        assert held == want, f"{img.name}: the agent holds {held}, the store places {want} there"


class Golden:
    def __init__(self, meta: str, seed: int) -> None:
        self.meta = meta
        self.rng = np.random.default_rng(seed)
        self.copies: dict[str, np.ndarray] = {}

    def sync_names(self) -> None:
        """Adopt what the pool says after an operation of unknown outcome (a fault hit it)."""
        with client.connect(self.meta) as pool:
            infos = {v.name: v for v in pool.list_volumes()}
        for name in list(self.copies):
            if name not in infos:
                del self.copies[name]
        for name, v in infos.items():
            gold = self.copies.get(name)
            if gold is None:
                self.copies[name] = np.zeros(v.size, dtype=np.uint8)  # a new volume reads as zeros
            elif gold.size < v.size:
                self.copies[name] = np.concatenate([gold, np.zeros(v.size - gold.size, dtype=np.uint8)])

    def scribble(self) -> None:
        with client.connect(self.meta) as pool:
            for name, gold in self.copies.items():
                n = int(self.rng.integers(1, 2 * MiB))
                off = int(self.rng.integers(0, gold.size - n))
                data = self.rng.integers(0, 256, n, dtype=np.uint8)
                with pool.open(name, force=True) as vol:
                    vol.write(off, data)
                    vol.flush()
                gold[off : off + n] = data

    def verify(self) -> None:
        with client.connect(self.meta) as pool:
            for name, gold in self.copies.items():
                with pool.open(name, read_only=True) as vol:
                    got = vol.read(0, gold.size)
                assert np.array_equal(got, gold), f"volume {name} differs from its golden copy"


def test_faults_during_metadata_changes_leak_nothing_and_lose_nothing(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("NVPOOL_CHAOS_SEED", "20261125")))
    c = make_cluster(tmp_path / "pool", agents=3, drives_per_agent=1, drive_size="256M").up()
    try:
        meta = c.meta.address
        golden = Golden(meta, 5)
        assert nv(meta, "volume", "create", "base", "--size", "24M").returncode == 0
        golden.sync_names()
        golden.scribble()
        made = 0
        for step in range(STEPS):
            names = sorted(golden.copies)
            op = rng.choice(["create", "create", "delete", "resize", "drain", "rebalance"])
            if op == "create" or not names:
                made += 1
                args = ["volume", "create", f"v{made}", "--size", f"{rng.choice([8, 16, 24])}M"]
            elif op == "delete":
                args = ["volume", "delete", rng.choice(names), "--yes", "--force"]
            elif op == "resize":
                name = rng.choice(names)
                args = ["volume", "resize", name, "--size", str(golden.copies[name].size + 8 * MiB)]
            elif op == "drain":
                args = ["pool", "drain", f"agent{rng.randrange(3)}", "--wait"]
            else:
                args = ["pool", "rebalance", "--wait"]
            fault = rng.choice(["kill-meta", "stop-agent", "kill-agent", "stop-meta"])
            victim = rng.randrange(3)
            delay = rng.uniform(0.0, 0.4)
            result: dict[str, Any] = {}

            def run(args: list[str] = args, result: dict[str, Any] = result) -> None:
                result["p"] = nv(meta, *args, "--timeout", "60", timeout=120)

            t = threading.Thread(target=run)
            t.start()
            time.sleep(delay)
            if fault == "kill-meta":
                c.kill_meta()
                c.start_meta()
            elif fault == "stop-meta":
                os.kill(c.meta.pid, signal.SIGSTOP)
                time.sleep(rng.uniform(0.2, 1.5))
                os.kill(c.meta.pid, signal.SIGCONT)
            elif fault == "stop-agent":
                os.kill(c.agents[victim].pid, signal.SIGSTOP)
                time.sleep(rng.uniform(0.2, 2.0))
                os.kill(c.agents[victim].pid, signal.SIGCONT)
            else:
                c.kill_agent(victim)
                c.start_agent(victim)
            t.join(150)
            assert not t.is_alive(), f"step {step}: `nvpool {' '.join(args)}` hung after {fault}"
            c.wait_registered(60)
            # the pool settles: drains undone, interrupted rebalances finished, releases confirmed
            for i in range(3):
                nv(meta, "pool", "undrain", f"agent{i}")
            st = json.loads(nv(meta, "pool", "status", "--json").stdout)
            if st["rebalance"]["state"] in ("failed", "running"):
                nv(meta, "pool", "rebalance", "--wait")
            poll(f"step {step} ({op} + {fault}): released space confirmed",
                 lambda: json.loads(nv(meta, "pool", "status", "--json").stdout)["releasing_extents"] == 0,
                 60, 0.2, (ValueError, KeyError))
            check_extents(c)
            golden.sync_names()
            golden.verify()
            golden.scribble()
        golden.verify()
        check_extents(c)
    finally:
        c.down()
