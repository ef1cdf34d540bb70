"""A replicated volume across a network partition: three storage servers in their own network
namespaces; one server's link is cut while a verifying writer and readers run, then restored.

What must hold (``pool/replication.py``, steps 2 and 7):

* the application never sees an error; the history checker is clean; the replicas are identical and
  fully redundant again afterwards;
* the cut-off server stops serving the volume once its serve lease runs out: a client on *its* side
  of the partition (a process inside its namespace, still holding the old layout) gets no data from
  it after the metadata service could have taken its replicas out, so two sides never both serve
  (and accept writes for) one column.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from nvpool.client.api import AsyncPool
from nvpool.client.metaclient import MetaClient
from tests.creds import capability_for, tls_args
from tests.history import check, summary
from tests.netns import BRIDGE_ADDR, Fabric, available
from tests.test_replication_faults import Workload
from tests.waiting import stop_all, poll, wait_json

pytestmark = [pytest.mark.netns, pytest.mark.slow]

AGENT_TIMEOUT = 1.5

#: runs inside the cut-off server's namespace: reads one extent of the volume from that server with
#: the layout generation it had before the cut, every 50 ms, and prints what it got (one JSON line each)
PROBE = r"""
import asyncio, json, sys, time
from nvpool.proto.transport import connect
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import NvpoolError, RemoteError
from nvpool.proto import tls
address, extent, generation, until = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
volume_id, cap = int(sys.argv[5]), bytes.fromhex(sys.argv[6])
async def main():
    conn = None
    end = time.monotonic() + until
    while time.monotonic() < end:
        t = time.time()
        try:
            if conn is None or conn.closed:
                files = tls.from_env()
                conn = await connect(address, timeout=1.0, io_timeout=1.0,
                                     ssl_context=files.client_context() if files else None)
                conn.authorize(volume_id, cap)
            buf = memoryview(bytearray(4096))
            await conn.submit(dp.READ, extent, 0, 4096, generation, dest=buf, deadline=time.monotonic() + 1.0)
            out = "ok"
        except RemoteError as exc:
            out = exc.status.name
        except NvpoolError as exc:
            out = "unavailable"
            conn = None
        print(json.dumps({"t": t, "r": out}), flush=True)
        await asyncio.sleep(0.05)
asyncio.run(main())
"""


@pytest.fixture
def fabric_pool(tmp_path: Path) -> Iterator[tuple[Fabric, str, list[str]]]:
    why = available()
    if why:
        pytest.skip(why)
    fabric = Fabric()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        meta = subprocess.Popen([sys.executable, "-m", "nvpool", "meta", "--listen", f"{BRIDGE_ADDR}:0",
                                 "--store", f"sqlite:{tmp_path / 'meta.db'}", "--ready-file", str(tmp_path / "meta.ready"),
                                 "--agent-timeout", str(AGENT_TIMEOUT), "--heartbeat-interval", "0.3",
                                 "--rebuild-after", "600", *tls_args("meta", "meta")],
                                stdout=open(tmp_path / "meta.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(meta)
        addr = str(wait_json(tmp_path / "meta.ready", meta)["address"])
        agents = []
        for i in range(3):
            host = fabric.add_host(f"s{i}")
            p = host.popen([sys.executable, "-m", "nvpool", "agent", "--meta", addr, "--listen", f"{host.address}:0",
                            "--name", f"s{i}", "--host", f"s{i}", "--drive", f"file:{tmp_path / f'd{i}.img'}:192M",
                            "--join-secret-file", str(tmp_path / "meta.db.join-secret"), *tls_args(f"s{i}", "agent"),
                            "--ready-file", str(tmp_path / f"s{i}.ready")], cwd=os.getcwd(),
                           stdout=open(tmp_path / f"s{i}.log", "wb"), stderr=subprocess.STDOUT)
            procs.append(p)
            agents.append(str(wait_json(tmp_path / f"s{i}.ready", p)["address"]))
        yield fabric, addr, agents
    finally:
        stop_all(procs)
        fabric.close()


async def volume_state(meta: str, name: str) -> tuple[str, set[str]]:
    m = MetaClient(meta)
    try:
        info = await m.get_volume(name)
        return info.health, {r["host"] for r in info.replica_info if r["state"] == "out"}
    finally:
        await m.close()


def test_a_cut_off_server_stops_serving_while_the_other_side_writes_on(
        fabric_pool: tuple[Fabric, str, list[str]], tmp_path: Path) -> None:
    fabric, meta, agents = fabric_pool

    async def prepare() -> tuple[int, int, int]:
        p = await AsyncPool.connect(meta)
        try:
            await p.create_volume("p", "24M", stripe_unit="256K", replicas=2)
            m = MetaClient(meta)
            lay, eps = await m.get_layout(name="p")
            await m.close()
            ext = next(e for e in lay.extents() if eps[e.drive_id].agent_id == "s1")
            return ext.extent_id, lay.generation, lay.volume_id
        finally:
            await p.close()

    extent, generation, volume_id = asyncio.run(prepare())
    host = fabric.hosts["s1"]
    # the probe holds a valid read capability: what stops it is the serve lease, not a credential
    cap = capability_for(tmp_path / "meta.db.join-secret", volume_id, write=False, max_generation=generation)
    probe = host.popen([sys.executable, "-c", PROBE, agents[1], str(extent), str(generation), "12",
                        str(volume_id), cap.hex()],
                       cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert probe.stdout is not None
    first = probe.stdout.readline()  # the probe reads the replica before anything is cut
    assert first and json.loads(first)["r"] == "ok", first + probe.stderr.read() if probe.stderr else first
    with Workload(meta, "p", (24 << 20) // 4096) as w:
        poll("the workload to start", lambda: w.ops > 100, 30)
        cut_at = time.time()
        fabric.set_link("s1", up=False)
        poll("s1's replicas taken out", lambda: asyncio.run(volume_state(meta, "p"))[1] == {"s1"}, 30, 0.2)
        w.running(lambda: time.sleep(1.0), min_ops=100)  # the writer carries on without s1
        fabric.set_link("s1", up=True)
        poll("back to fully redundant", lambda: asyncio.run(volume_state(meta, "p"))[0] == "ok", 60, 0.3)
        w.running(lambda: time.sleep(0.3))
    out, err = probe.communicate(timeout=30)
    assert probe.returncode == 0, err.decode()[-2000:]
    assert not w.errors, f"{len(w.errors)} errors reached the application: {w.errors[:5]}"
    problems = check(w.history)
    assert not problems, "\n".join(problems[:20]) + "\n" + summary(w.history)
    from tests.test_replication_faults import replica_bytes
    lay, cols = asyncio.run(replica_bytes(meta, "p", tmp_path / "meta.db.join-secret"))
    assert not lay.degraded and all(c[0] == c[1] for c in cols)
    # the probe on s1's side of the partition: served before the cut, refused from the end of the
    # serve lease on (0.75 x agent_timeout after the last heartbeat before the cut), never served
    # again at the old generation
    results = [json.loads(line) for line in (first + out).decode().splitlines() if line.strip()]
    before = [r for r in results if r["t"] < cut_at]
    assert any(r["r"] == "ok" for r in before), before[-5:]  # the probe reads the replica
    lease_end = cut_at + 0.75 * AGENT_TIMEOUT + 0.5
    late = [r for r in results if r["t"] > lease_end]
    assert late, "the probe did not run past the serve lease"
    assert not [r for r in late if r["r"] == "ok"], [r for r in late if r["r"] == "ok"][:5]
    assert {r["r"] for r in late} <= {"BUSY", "STALE_LAYOUT", "unavailable"}
