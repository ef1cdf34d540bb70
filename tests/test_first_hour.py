"""What a new user meets in the first hour (issue 30, "The first hour"), each tried as they would.

3. With an agent of the pool dead, unreplicated volumes with data on it cannot be read: ``pool status``
   names them, ``volume list`` and ``volume show`` say ``unavailable`` for them as for replicated ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Iterator

import pytest

from nvpool import client
from nvpool.client.cluster import LocalCluster
from tests.conftest import make_cluster

MiB = 1 << 20


def nvpool(meta: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvpool", *args], capture_output=True, text=True,
                          env=dict(os.environ, NVPOOL_META=meta), timeout=60)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = make_cluster(tmp_path_factory.mktemp("firsthour"), agents=3, drives_per_agent=1, drive_size="128M")
    c.meta_extra = ["--agent-timeout", "1.2", "--heartbeat-interval", "0.3"]
    c.up()
    yield c
    c.down()


def test_plain_volumes_on_a_dead_agent_are_named_unavailable(pool: LocalCluster) -> None:
    meta = pool.meta.address
    with client.connect(meta) as p:
        p.create_volume("plain", 12 * MiB)  # one column per agent: some of it on every agent
        p.create_volume("mirrored", 12 * MiB, replicas=2)
    shown = nvpool(meta, "volume", "show", "plain")
    assert shown.returncode == 0 and "health      ok" in shown.stdout, shown.stdout
    pool.kill_agent(2)
    try:
        deadline = time.monotonic() + 20
        while True:
            st = json.loads(nvpool(meta, "pool", "status", "--json").stdout)
            if st["unavailable_volumes"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert st["unavailable_volumes"] == ["plain"], st  # the replicated one is served by its other copies
        text = nvpool(meta, "pool", "status")
        assert text.returncode == 3 and "1 volume unavailable" in text.stdout and "plain" in text.stdout, text.stdout
        shown = nvpool(meta, "volume", "show", "plain")
        assert "health      unavailable (a server holding some of its data is down" in shown.stdout, shown.stdout
        listed = {v["name"]: v["health"] for v in json.loads(nvpool(meta, "volume", "list", "--json").stdout)}
        assert listed["plain"] == "unavailable" and listed["mirrored"] in ("degraded", "ok")
        assert "unavailable" in nvpool(meta, "volume", "list").stdout
    finally:
        pool.start_agent(2)
        pool.wait_registered()
    deadline = time.monotonic() + 20
    while json.loads(nvpool(meta, "pool", "status", "--json").stdout)["unavailable_volumes"]:
        assert time.monotonic() < deadline, "the volume stayed unavailable after its agent came back"
        time.sleep(0.2)
