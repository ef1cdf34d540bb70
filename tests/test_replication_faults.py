"""Replicated volumes under real faults: agents killed (SIGKILL), restarted, killed and replaced,
stopped (SIGSTOP) and resumed, while the library's verifying writer and readers run, and while fio
verifies through the NBD export. Afterwards: no error reached the application, the history checker
(tests/history.py) is clean, every column's replicas are identical byte for byte, and the pool is
fully redundant again by itself."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from nvpool.client.api import AsyncPool
from nvpool.client.cluster import LocalCluster
from nvpool.client.metaclient import MetaClient
from nvpool.proto import dataplane as dp
from nvpool.proto.layout import Layout
from nvpool.proto import tls
from nvpool.proto.transport import connect
from tests.conftest import make_cluster
from tests.creds import capability_for
from tests.history import BLOCK, History, check, payload, summary
from tests.waiting import poll

pytestmark = pytest.mark.slow

AGENT_TIMEOUT = "1.2"
META_ARGS = ["--agent-timeout", AGENT_TIMEOUT, "--heartbeat-interval", "0.3", "--rebuild-after", "600"]


def pool_of(tmp: Path, agents: int = 4, extra: list[str] = ()) -> LocalCluster:  # type: ignore[assignment]
    c = make_cluster(tmp, agents=agents, drives_per_agent=1, drive_size="192M")
    c.meta_extra = [*META_ARGS, *extra]
    c.up()
    return c


async def volume_info(meta: str, name: str) -> Any:
    m = MetaClient(meta)
    try:
        return await m.get_volume(name)
    finally:
        await m.close()


def health(c: LocalCluster, name: str) -> str:
    return str(asyncio.run(volume_info(c.meta.address, name)).health)


def wait_redundant(c: LocalCluster, name: str, timeout: float = 60) -> None:
    poll(f"volume {name} back to fully redundant", lambda: health(c, name) == "ok", timeout, 0.3)


async def replica_bytes(meta: str, name: str, secret_file: Path) -> tuple[Layout, list[list[bytes]]]:
    """Every replica of every column, read straight from its agent (with a read capability)."""
    m = MetaClient(meta)
    try:
        lay, eps = await m.get_layout(name=name)
    finally:
        await m.close()
    conns: dict[str, Any] = {}
    out = []
    try:
        for i in range(lay.width):
            copies = []
            for k in range(lay.replicas):
                buf = bytearray()
                for e in lay.replica_column(i, k).extents:
                    addr = eps[e.drive_id].address
                    if addr not in conns:
                        files = tls.from_env()
                        ctx = files.client_context() if eps[e.drive_id].tls and files is not None else None
                        conns[addr] = await connect(addr, ssl_context=ctx)
                        conns[addr].authorize(lay.volume_id, capability_for(secret_file, lay.volume_id, write=False))
                    part = memoryview(bytearray(e.length))
                    for off in range(0, e.length, dp.MAX_IO):
                        n = min(dp.MAX_IO, e.length - off)
                        await conns[addr].submit(dp.READ, e.extent_id, off, n, lay.generation, dest=part[off:off + n])
                    buf += part
                copies.append(bytes(buf[: lay.replica_column(i, 0).length]))
            out.append(copies)
    finally:
        for c in conns.values():
            c.close()
    return lay, out


class Workload:
    """A verifying writer and readers on one volume, recording a history (tests/history.py)."""

    def __init__(self, meta: str, name: str, blocks: int, readers: int = 2) -> None:
        self.meta, self.name, self.blocks, self.readers = meta, name, blocks, readers
        self.history = History()
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.ops = 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        pool = await AsyncPool.connect(self.meta)
        try:
            vol = await pool.open(self.name)
            rd = await pool.open(self.name, read_only=True)
            rng = random.Random(7)

            async def writer() -> None:
                while not self.stop.is_set():
                    n = rng.choice((1, 1, 2, 8, 64, 256))
                    b = rng.randrange(0, self.blocks - n)
                    wid, _ = self.history.begin_write(b, n)
                    try:
                        await vol.write(b * BLOCK, payload(wid, b, n))
                        self.history.end_write(wid, True)
                    except Exception as exc:  # noqa: BLE001 - recorded: the test fails on any
                        self.history.end_write(wid, False)
                        self.errors.append(f"write: {exc!r}")
                    self.ops += 1

            async def reader(seed: int) -> None:
                r = random.Random(seed)
                while not self.stop.is_set():
                    n = r.choice((1, 4, 64))
                    b = r.randrange(0, self.blocks - n)
                    t0 = time.monotonic()
                    try:
                        data = await rd.read(b * BLOCK, n * BLOCK)
                        self.history.record_read(b, bytes(data), t0, time.monotonic())
                    except Exception as exc:  # noqa: BLE001
                        self.history.read_failed(b, n, t0, time.monotonic(), repr(exc))
                        self.errors.append(f"read: {exc!r}")
                    self.ops += 1

            await asyncio.gather(writer(), writer(), *(reader(s) for s in range(self.readers)))
            await vol.close()
            await rd.close()
        finally:
            await pool.close()

    def __enter__(self) -> "Workload":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)
        assert not self.thread.is_alive(), "the workload did not stop"

    def running(self, what: Callable[[], object], min_ops: int = 50) -> None:
        """Run ``what`` and check the workload made progress across it."""
        before = self.ops
        what()
        poll("the workload to make progress", lambda: self.ops >= before + min_ops, 60)


def assert_identical(c: LocalCluster, name: str) -> None:
    lay, cols = asyncio.run(replica_bytes(c.meta.address, name, c.secret_file))
    assert not lay.degraded
    for i, copies in enumerate(cols):
        for k in range(1, len(copies)):
            if copies[k] != copies[0]:
                bad = next(j for j in range(len(copies[0])) if copies[k][j] != copies[0][j])
                pytest.fail(f"column {i}: replica {k} differs from replica 0 at column offset {bad}")


def test_two_replicas_survive_kill_restart_stop_and_replace_under_verified_io(tmp_path: Path) -> None:
    c = pool_of(tmp_path, agents=4, extra=["--rebuild-after", "4"])
    pool_meta = c.meta.address

    async def create() -> None:
        p = await AsyncPool.connect(pool_meta)
        try:
            await p.create_volume("r", "32M", stripe_unit="256K", replicas=2)
        finally:
            await p.close()

    asyncio.run(create())
    blocks = (32 << 20) // BLOCK
    with Workload(pool_meta, "r", blocks) as w:
        poll("the workload to start", lambda: w.ops > 100, 30)
        # 1. SIGKILL a server, bring it back: its replicas go out, then resync (dirty grains only)
        w.running(lambda: c.kill_agent(1))
        w.running(lambda: c.start_agent(1))
        wait_redundant(c, "r")
        # 2. SIGSTOP a server (hung, its sockets open), then resume it
        os.kill(c.agents[2].pid, signal.SIGSTOP)
        try:
            w.running(lambda: time.sleep(float(AGENT_TIMEOUT) * 2))
        finally:
            os.kill(c.agents[2].pid, signal.SIGCONT)
        wait_redundant(c, "r")
        # 3. SIGKILL a server for good: after --rebuild-after its replicas are rebuilt elsewhere
        w.running(lambda: c.kill_agent(3))

        def replaced() -> bool:
            info = asyncio.run(volume_info(pool_meta, "r"))
            return info.health == "ok" and "agent3" not in {r["host"] for r in info.replica_info}

        poll("agent3's replicas rebuilt on the other servers", replaced, 90, 0.3)
        w.running(lambda: time.sleep(0.5))
    assert not w.errors, f"{len(w.errors)} errors reached the application: {w.errors[:5]}"
    problems = check(w.history)
    if problems:
        (tmp_path / "history.json").write_text(w.history.to_json())
    assert not problems, "\n".join(problems[:20]) + "\n" + summary(w.history)
    assert_identical(c, "r")
    log = (c.dir / "logs" / "meta.log").read_text()
    assert "resyncing" in log and "rebuilding" in log


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_fio_verify_through_the_nbd_export_while_a_server_dies(tmp_path: Path) -> None:
    c = pool_of(tmp_path, agents=3)

    async def create() -> None:
        p = await AsyncPool.connect(c.meta.address)
        try:
            await p.create_volume("f", "48M", stripe_unit="64K", replicas=2)
        finally:
            await p.close()

    asyncio.run(create())
    # several worker processes cannot order one volume's replicated writes: refused, saying why
    many = subprocess.run([sys.executable, "-m", "nvpool", "export", "f", "--workers", "2", "--socket",
                           str(tmp_path / "many.sock"), "--meta", c.meta.address], capture_output=True, text=True,
                          timeout=60)
    assert many.returncode == 2 and "replicated" in many.stderr, many.stderr
    sock = str(tmp_path / "f.sock")
    exp = subprocess.Popen([sys.executable, "-m", "nvpool", "export", "f", "--socket", sock, "--meta", c.meta.address,
                            "--ready-file", sock + ".ready"], stderr=subprocess.PIPE)
    try:
        poll("the export", lambda: os.path.exists(sock + ".ready"), 30)
        uri = f"nbd+unix:///?socket={sock}"
        # every block written once (at a bounded rate, so the kill lands mid-run), then all read back
        # and verified (crc32c in every block)
        fio = subprocess.Popen(
            ["fio", "--name=v", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
             "--size=40M", "--rate_iops=1500", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
             "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        c.kill_agent(1)  # for the rest of the run: only the other copies can serve it
        out, err = fio.communicate(timeout=180)
        assert fio.returncode == 0, f"fio failed: {err[-2000:]} {out[-500:]}"
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 40 << 20, job
        assert job["read"]["io_bytes"] == 40 << 20, job  # the verify pass read every block back
        assert health(c, "f") == "degraded"
        # what an operator sees: the out replicas, by volume, and where each replica is
        st = subprocess.run([sys.executable, "-m", "nvpool", "pool", "status", "--meta", c.meta.address],
                            capture_output=True, text=True, timeout=30)
        assert st.returncode == 3 and "health degraded" in st.stdout and "f: " in st.stdout, st.stdout + st.stderr
        shown = subprocess.run([sys.executable, "-m", "nvpool", "volume", "show", "f", "--json", "--meta", c.meta.address],
                               capture_output=True, text=True, timeout=30)
        info = json.loads(shown.stdout)
        assert info["replicas"] == 2 and info["health"] == "degraded"
        assert {r["host"] for r in info["replica_info"] if r["state"] == "out"} == {"agent1"}
        c.start_agent(1)  # back: its replicas are resynced (only what it missed)
        wait_redundant(c, "f")
        assert "resyncing" in (c.dir / "logs" / "meta.log").read_text()
        again = subprocess.run([sys.executable, "-m", "nvpool", "pool", "status", "--meta", c.meta.address],
                               capture_output=True, text=True, timeout=30)
        assert again.returncode == 0 and "health ok" in again.stdout
    finally:
        exp.send_signal(signal.SIGTERM)
        try:
            exp.wait(10)
        except subprocess.TimeoutExpired:
            exp.kill()
    assert_identical(c, "f")


def nvpool_cli(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvpool", *args, "--meta", c.meta.address], capture_output=True,
                          text=True, timeout=120)


def rebalance_state(c: LocalCluster) -> str:
    out = nvpool_cli(c, "pool", "status", "--json")
    return str(json.loads(out.stdout)["rebalance"]["state"])


def test_replicated_volume_grows_drains_and_survives_a_death_mid_move(tmp_path: Path) -> None:
    c = pool_of(tmp_path, agents=3, extra=["--rebuild-after", "600"])

    async def create() -> None:
        p = await AsyncPool.connect(c.meta.address)
        try:
            await p.create_volume("g", "24M", stripe_unit="256K", replicas=2)
        finally:
            await p.close()

    asyncio.run(create())
    with Workload(c.meta.address, "g", (24 << 20) // BLOCK) as w:
        poll("the workload to start", lambda: w.ops > 100, 30)
        # grow: a fourth server takes its share of the replicas, online
        c.add_agent()
        r = nvpool_cli(c, "pool", "rebalance", "--wait")
        assert r.returncode == 0, r.stderr
        info = asyncio.run(volume_info(c.meta.address, "g"))
        assert "agent3" in {x["host"] for x in info.replica_info}
        # drain agent0 slowly; a server dies half-way: the move is abandoned, nothing is lost
        r = nvpool_cli(c, "pool", "drain", "agent0", "--max-rate", "4M")
        assert r.returncode == 0, r.stderr
        poll("the drain to start copying", lambda: rebalance_state(c) == "running", 30, 0.1)
        victim = next(i for i, a in enumerate(c.agents) if a.name in {x["host"] for x in info.replica_info}
                      and a.name != "agent0")
        w.running(lambda: c.kill_agent(victim))
        poll("the drain to end", lambda: rebalance_state(c) in ("done", "failed"), 60, 0.2)
        w.running(lambda: c.start_agent(victim))
        wait_redundant(c, "g")
        # finish the drain now that every replica is back in service (a client may still report a failure
        # it saw on the restarted server: that abandons the move again, and the run says so; retry)
        for _ in range(4):
            r = nvpool_cli(c, "pool", "drain", "agent0", "--wait")
            if r.returncode == 0:
                break
            assert "abandoned" in r.stderr + r.stdout, r.stderr + r.stdout
            wait_redundant(c, "g")
        assert r.returncode == 0, r.stderr + r.stdout
        w.running(lambda: time.sleep(0.3))
    assert not w.errors, f"{len(w.errors)} errors reached the application: {w.errors[:5]}"
    problems = check(w.history)
    assert not problems, "\n".join(problems[:20]) + "\n" + summary(w.history)
    assert_identical(c, "g")
    info = asyncio.run(volume_info(c.meta.address, "g"))
    hosts_by_column: dict[int, list[str]] = {}
    for x in info.replica_info:
        hosts_by_column.setdefault(x["column"], []).append(x["host"])
    assert all(len(set(h)) == 2 for h in hosts_by_column.values()), hosts_by_column
    assert "agent0" not in {h for hs in hosts_by_column.values() for h in hs}
    log = (c.dir / "logs" / "meta.log").read_text()
    assert "migration abandoned" in log


def test_hedged_reads_keep_the_tail_short_while_a_server_hangs(tmp_path: Path) -> None:
    """A stopped (hung) server: reads whose preferred copy is there are raced against the other copy
    after a few times the recent latency. Without hedging (hedge_min=0) the same reads wait for the
    replica timeout."""
    from nvpool.client.volume import ClientOptions

    c = pool_of(tmp_path, agents=2)

    async def run(hedge_min: float, stop_pid: int) -> tuple[float, dict[str, int]]:
        opts = ClientOptions(transport="tcp", hedge_min=hedge_min, replica_timeout=3.0)
        pool = await AsyncPool.connect(c.meta.address, opts)
        try:
            vol = await pool.open("h", read_only=True)
            rng = random.Random(3)
            worst = 0.0
            for _ in range(50):  # warm: connections open, latency known
                await vol.read(rng.randrange(0, 4096) * BLOCK, BLOCK)
            os.kill(stop_pid, signal.SIGSTOP)
            try:
                end = time.monotonic() + 2.0
                while time.monotonic() < end:
                    t0 = time.monotonic()
                    await vol.read(rng.randrange(0, 4096) * BLOCK, BLOCK)
                    worst = max(worst, time.monotonic() - t0)
            finally:
                os.kill(stop_pid, signal.SIGCONT)
            stats = dict(vol.stats)
            await vol.close()
            return worst, stats
        finally:
            await pool.close()

    async def create() -> None:
        p = await AsyncPool.connect(c.meta.address)
        try:
            await p.create_volume("h", "16M", stripe_unit="64K", replicas=2)
            v = await p.open("h")
            await v.write(0, os.urandom(16 << 20))
            await v.close()
        finally:
            await p.close()

    asyncio.run(create())
    hedged, stats = asyncio.run(run(0.005, c.agents[1].pid))
    assert stats["hedge_wins"] > 0, stats
    assert hedged < 1.0, f"a read took {hedged:.2f}s with hedging"
    wait_redundant(c, "h")
    plain, _ = asyncio.run(run(0.0, c.agents[0].pid))
    assert plain > 1.0, f"without hedging the worst read took only {plain:.2f}s: the test proves nothing"
