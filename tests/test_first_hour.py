"""What a new user meets in the first hour (issue 30, "The first hour"), each tried as they would.

1. A script that opens a volume for writing, writes and exits without ``close()`` gives its lease back
   at exit: run again at once, it opens the volume. A holder that died without that (SIGKILL) is named
   as gone in the refusal, with the time its lease has left.
2. Several threads of one program opening one volume at once through one ``Pool`` share its lease.
3. With an agent of the pool dead, unreplicated volumes with data on it cannot be read: ``pool status``
   names them, ``volume list`` and ``volume show`` say ``unavailable`` for them as for replicated ones.
8. ``volume du`` counts as written only what was written: reads of a new volume add nothing.
7. ``nvpool health`` given the agent address every listing shows (its data plane) asks its control port.

(5 and 9 are in tests/test_cli_cluster.py and tests/test_config.py, 10 in tests/test_deploy.py, 11 in
tests/test_readme.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
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


SCRIPT = """
import os, sys
from nvpool import client
pool = client.connect(os.environ["NVPOOL_META"])
vol = pool.open(sys.argv[1])
vol.write(0, b"x" * 4096)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), 9)
print("wrote")
"""


def test_a_script_that_exits_without_close_gives_its_writer_lease_back(pool: LocalCluster, tmp_path: Path) -> None:
    meta = pool.meta.address
    with client.connect(meta) as p:
        p.create_volume("script", 8 * MiB)
    env = dict(os.environ, NVPOOL_META=meta)
    script = tmp_path / "writer.py"
    script.write_text(SCRIPT)
    for run in range(2):  # the second run finds the volume free at once
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, str(script), "script", "exit"], capture_output=True, text=True, env=env,
                           timeout=60)
        assert r.returncode == 0 and "wrote" in r.stdout, f"run {run}: {r.stderr}"
        assert time.monotonic() - t0 < 10
    held = json.loads(nvpool(meta, "volume", "status", "script", "--json").stdout)["holders"]
    assert held == [], held
    # a writer killed outright cannot give it back: the next opener is told the holder is gone
    r = subprocess.run([sys.executable, str(script), "script", "kill"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == -9
    r = subprocess.run([sys.executable, str(script), "script", "exit"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode != 0
    assert "has exited without closing the volume" in r.stderr and "lease runs out in" in r.stderr, r.stderr


def test_threads_opening_one_volume_at_once_share_the_lease(pool: LocalCluster) -> None:
    import threading

    meta = pool.meta.address
    with client.connect(meta) as p:
        p.create_volume("threads", 8 * MiB)
        errors: list[BaseException] = []
        handles = []
        start = threading.Barrier(8)

        def opener(i: int) -> None:
            try:
                start.wait()
                v = p.open("threads")
                v.write(i * 4096, bytes([i + 1]) * 4096)
                handles.append(v)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=opener, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(handles) == 8
        for i in range(8):
            assert bytes(handles[0].read(i * 4096, 4096)) == bytes([i + 1]) * 4096
        for v in handles:
            v.close()


def test_health_of_an_agent_by_the_address_listings_show(pool: LocalCluster) -> None:
    meta = pool.meta.address
    st = json.loads(nvpool(meta, "pool", "status", "--json").stdout)
    agent = st["agents"][0]
    assert agent["control_address"] and agent["control_address"] != agent["address"]
    r = nvpool(meta, "health", agent["address"])
    assert r.returncode == 0, r.stderr
    assert "SERVING" in r.stdout and "asking its control port" in r.stderr
    r = nvpool(meta, "health", agent["control_address"])
    assert r.returncode == 0 and "SERVING" in r.stdout and not r.stderr


def test_du_counts_written_bytes_not_read_ones(pool: LocalCluster) -> None:
    meta = pool.meta.address

    def written() -> int:
        rows = json.loads(nvpool(meta, "volume", "du", "readonly", "--json").stdout)
        return int(rows[0]["written"])

    with client.connect(meta) as p:
        p.create_volume("readonly", 24 * MiB)
        assert written() == 0
        v = p.open("readonly", read_only=True)
        assert not bytes(v.read(0, 24 * MiB)).strip(b"\0")  # reads bring the space into the page cache
        v.close()
        assert written() == 0  # ... which SEEK_DATA counted as data
        w = p.open("readonly")
        w.write(5 * MiB, b"z" * 8192)
        w.close()
    assert 8192 <= written() <= 2 * 8192  # written back, then counted by file-system block
