"""Metadata that survives the loss of a machine (issue 13), with real processes: a 3-member etcd cluster
on loopback, three `nvpool meta` instances sharing it (one leads, the others stand by and redirect),
agents and clients given all three addresses.

The leader is SIGKILLed in the middle of volume creation, of a rebalance and of a writer-lease
takeover; one etcd member is killed under load. Each time another instance takes over, nothing is
half-done or lost, and clients' I/O (which never goes through the metadata service) does not stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from nvpool import client
from nvpool.client.cluster import LocalCluster
from nvpool.proto.errors import LeaseError, NvpoolError
from tests.conftest import make_cluster, need_etcd
from nvpool.client.etcdlocal import EtcdCluster
from tests.test_rebalance_e2e import Workload, nvpool, wait_free, wait_rebalance
from tests.waiting import poll

MiB = 1 << 20
pytestmark = pytest.mark.slow


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[tuple[LocalCluster, EtcdCluster]]:
    need_etcd()
    etcd = EtcdCluster(tmp_path / "etcd").up()
    c = make_cluster(tmp_path / "pool", agents=3, drives_per_agent=1, drive_size="256M", store=etcd.url("/ha"),
                     metas=3)
    try:
        c.up(timeout=60)
        yield c, etcd
    finally:
        c.down()
        etcd.down()


class TimedIo:
    """One client writing and reading a volume back-to-back, checked against a golden copy; records when
    every operation completed, so a pause in I/O shows as a gap."""

    def __init__(self, meta: str, name: str, size: int) -> None:
        self.meta, self.name, self.size = meta, name, size
        self.gold = np.zeros(size, dtype=np.uint8)
        self.times: list[float] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(5)
        try:
            with client.connect(self.meta) as pool:
                vol = pool.open(self.name)
                while not self.stop.is_set():
                    n = int(rng.integers(1, 64 * 1024))
                    off = int(rng.integers(0, self.size - n))
                    if rng.random() < 0.5:
                        data = rng.integers(0, 256, n, dtype=np.uint8)
                        vol.write(off, data)
                        self.gold[off:off + n] = data
                    else:
                        got = vol.read(off, n)
                        assert np.array_equal(got, self.gold[off:off + n]), f"{self.name}: read mismatch at {off}"
                    self.times.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.errors.append(exc)

    def __enter__(self) -> "TimedIo":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)

    def ops_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.times if t0 <= t <= t1)

    def longest_gap(self, t0: float, t1: float) -> float:
        ts = [t0] + [t for t in self.times if t0 <= t <= t1] + [t1]
        return max(b - a for a, b in zip(ts, ts[1:]))

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]
        with client.connect(self.meta) as pool:
            assert np.array_equal(pool.open(self.name).read(0, self.size), self.gold), "final contents differ"


def meta_call(c: LocalCluster, what: str, *args: Any) -> Any:
    """One call through the client library's synchronous pool (its own event loop thread)."""
    with client.connect(c.meta_addresses) as pool:
        return getattr(pool, what)(*args)


def allocated(meta: str) -> int:
    """Bytes the volumes' layouts hold (all replicas), from `nvpool volume du`."""
    p = subprocess.run([sys.executable, "-m", "nvpool", "volume", "du", "--meta", meta, "--json"], capture_output=True,
                       text=True, timeout=60, check=True)
    return sum(int(v["allocated"]) for v in json.loads(p.stdout))


def test_leader_killed_during_volume_creation(ha: tuple[LocalCluster, EtcdCluster]) -> None:
    c, _ = ha
    meta = c.meta_addresses
    first = c.leader()
    with client.connect(meta) as pool:
        pool.create_volume("io", 16 * MiB)
    created: list[str] = []
    failed: dict[str, str] = {}
    stop = threading.Event()

    def creator() -> None:
        i = 0
        with client.connect(meta) as pool:
            while not stop.is_set() and len(created) < 12:
                name = f"v{i}"
                i += 1
                try:  # (a create whose answer was lost with the leader is recognised on retry: no AlreadyExists)
                    pool.create_volume(name, 8 * MiB)
                    created.append(name)
                except NvpoolError as exc:
                    failed[name] = f"{type(exc).__name__}: {exc}"

    with TimedIo(meta, "io", 16 * MiB) as io:
        t = threading.Thread(target=creator, daemon=True)
        t.start()
        poll("a few volumes created", lambda: len(created) >= 3, timeout=30)
        killed_at = time.monotonic()
        c.kill_meta(first)
        new = c.leader(timeout=30)
        took_over = time.monotonic() - killed_at
        assert new != first
        t.join(90)
        stop.set()
        assert len(created) >= 12 and not failed, f"creation failed across the failover: {failed}"
        after = time.monotonic()
    io.check()
    # the data path never stopped while no metadata service led
    assert io.ops_between(killed_at, killed_at + took_over) > 0
    assert io.longest_gap(killed_at, after) < 3.0
    # nothing half-done: every volume it acknowledged is there and readable; those that failed are
    # either there whole or absent; reserved space comes back (no pending reservation leaks)
    vols = {v.name: v for v in meta_call(c, "list_volumes")}
    assert set(created) <= set(vols)
    with client.connect(meta) as pool:
        for name in vols:
            assert pool.open(name, read_only=True).read(0, 4096).tobytes() == bytes(4096) or name == "io"
    wait_free(meta, allocated(meta), timeout=30)
    # the killed instance comes back as a standby; the leader stays
    c.start_meta(30, first)
    assert c.leader() == new
    st = nvpool(meta, "pool", "status")
    assert st["meta_store"].startswith("etcd://") and st["meta_leader"] == c.metas[new].address


def test_leader_killed_during_rebalance(ha: tuple[LocalCluster, EtcdCluster]) -> None:
    c, _ = ha
    meta = c.meta_addresses
    size = 24 * MiB
    with client.connect(meta) as pool:
        pool.create_volume("vr", size, stripe_unit="256K")
    with Workload(meta, ["vr"], size, seed=13) as w:
        c.add_agent()
        c.wait_registered()
        st = nvpool(meta, "pool", "rebalance", "--max-rate", "1M")
        assert st["state"] == "running"
        total = st["bytes_total"]
        poll("copying to start", lambda: nvpool(meta, "pool", "status")["rebalance"]["bytes_done"] >= 1 * MiB)
        ops = w.ops
        c.kill_meta(c.leader())
        c.leader(timeout=30)
        after = nvpool(meta, "pool", "status")["rebalance"]
        assert after["state"] in ("running", "done") and after["bytes_done"] > 0, "the new leader lost the run"
        st = wait_rebalance(meta)
        assert st["state"] == "done", st
        assert st["bytes_done"] <= total + 8 * MiB, st
        assert w.ops > ops
    w.check()
    hosts = nvpool(meta, "volume", "show", "vr")["hosts"]
    assert len(set(hosts)) == 4
    log = "".join((c.dir / "logs" / f"{m}.log").read_text() for m in ("meta", "meta1", "meta2"))
    assert "resuming" in log or "finishing interrupted migrations" in log


def test_leader_killed_during_writer_takeover(ha: tuple[LocalCluster, EtcdCluster]) -> None:
    """Writer A writes; the leader dies; B takes the volume over with force through the new leader. A is
    fenced: none of its writes lands after B's, and B's data is what is read."""
    c, _ = ha
    meta = c.meta_addresses
    size = 4 * MiB
    with client.connect(meta) as pool:
        pool.create_volume("vt", size)
    a_errors: list[BaseException] = []
    a_stop = threading.Event()

    def writer_a() -> None:
        try:
            with client.connect(meta) as pool:
                vol = pool.open("vt")
                i = 0
                while not a_stop.is_set():
                    vol.write((i % 64) * 65536, np.full(65536, 0xAA, dtype=np.uint8))
                    i += 1
        except BaseException as exc:  # noqa: BLE001 - A is expected to be fenced
            a_errors.append(exc)

    ta = threading.Thread(target=writer_a, daemon=True)
    ta.start()
    time.sleep(1.0)
    c.kill_meta(c.leader())
    with client.connect(meta) as pool:
        vol_b = pool.open("vt", force=True)  # waits for the new leader, fences A
        vol_b.write(0, np.full(size, 0xBB, dtype=np.uint8))
        poll("A to be fenced", lambda: bool(a_errors), timeout=30)
        a_stop.set()
        ta.join(30)
        assert isinstance(a_errors[0], (LeaseError, NvpoolError)), a_errors[0]
        time.sleep(0.5)
        got = vol_b.read(0, size)
        assert (got == 0xBB).all(), "a write of the fenced writer landed after the new writer's"


def test_etcd_member_killed_under_load(ha: tuple[LocalCluster, EtcdCluster]) -> None:
    c, etcd = ha
    meta = c.meta_addresses
    with client.connect(meta) as pool:
        pool.create_volume("io", 16 * MiB)
    with TimedIo(meta, "io", 16 * MiB) as io:
        time.sleep(0.5)
        killed_at = time.monotonic()
        victim = etcd.raft_leader()  # the hardest member to lose: etcd elects a new Raft leader first
        etcd.kill(victim)
        for i in range(5):  # metadata changes go on with two members of three
            meta_call(c, "create_volume", f"e{i}", 4 * MiB)
        c.wait_registered()
        etcd.start_member(victim, state="existing")
        etcd.wait_healthy(30)
        meta_call(c, "create_volume", "after", 4 * MiB)
        after = time.monotonic()
    io.check()
    assert io.longest_gap(killed_at, after) < 3.0
    assert {f"e{i}" for i in range(5)} | {"after"} <= {v.name for v in meta_call(c, "list_volumes")}


def test_a_paused_leader_is_deposed_and_stays_quiet(ha: tuple[LocalCluster, EtcdCluster]) -> None:
    """SIGSTOP the leader past its term: a standby takes over; when the old leader wakes it has lost its
    term, answers nothing as leader (callers are sent on) and no agent obeys it."""
    c, _ = ha
    meta = c.meta_addresses
    old = c.leader()
    with client.connect(meta) as pool:
        pool.create_volume("before", 4 * MiB)
    os.kill(c.metas[old].pid, signal.SIGSTOP)
    try:
        new = c.leader(timeout=30)
        assert new != old
        meta_call(c, "create_volume", "during", 4 * MiB)
    finally:
        os.kill(c.metas[old].pid, signal.SIGCONT)
    time.sleep(2.0)  # the woken process notices its term is over
    # asked directly, the old leader sends the caller to the new one
    with client.connect(c.metas[old].address) as pool:
        pool.create_volume("after", 4 * MiB)
    assert c.leader() == new
    names = {v.name for v in meta_call(c, "list_volumes")}
    assert {"before", "during", "after"} <= names
    log = (c.dir / "logs" / ("meta.log" if old == 0 else f"meta{old}.log")).read_text()
    assert "stopped leading" in log


def test_agents_refuse_orders_of_an_older_term(ha: tuple[LocalCluster, EtcdCluster]) -> None:
    """After a failover an agent has seen the new leader's term; a control call carrying the old term (a
    deposed leader's, even with the pool's credential) is refused, one with the current term obeyed."""
    from nvpool.pool.agentlink import GrpcAgentLink
    from nvpool.proto import keys
    from nvpool.proto.tls import TlsFiles

    c, _ = ha
    old = c.leader()
    first = int(nvpool(c.meta_addresses, "pool", "status")["meta_epoch"])
    c.kill_meta(old)
    c.leader(timeout=30)
    c.wait_registered()
    term = int(nvpool(c.meta_addresses, "pool", "status")["meta_epoch"])
    assert term > first
    control = json.loads(Path(c.agents[0].ready_file).read_text())["control_address"]
    c._tls_args("meta", "meta")

    async def call(epoch: int) -> None:
        link = GrpcAgentLink(secrets=keys.load(str(c.secret_file)), tls=TlsFiles.from_dir(str(c.tls_dir), "meta"))
        link.epoch = epoch
        try:
            await link.flush(control)
        finally:
            await link.close()

    poll("the agent to hear the new term", lambda: _obeys(call, term), timeout=15)
    with pytest.raises(NvpoolError, match="older term"):
        asyncio.run(call(first))


def _obeys(call: Any, epoch: int) -> bool:
    try:
        asyncio.run(call(epoch))
        return True
    except NvpoolError:
        return False


def test_sqlite_service_reloads_after_its_store_changed_under_it(tmp_path: Path) -> None:
    """The in-memory view is a cache: when the store changes under a running service (here: the id
    counters rewritten behind its back, as a restore or a stray second writer would), its next commit
    fails the revision compare, it says so, reloads from the store, and carries on with the store's
    values (no id handed out twice)."""
    import sqlite3

    with make_cluster(tmp_path, agents=2, drives_per_agent=1, drive_size="256M").up() as c:
        meta = c.meta.address
        with client.connect(meta) as pool:
            first = pool.create_volume("a", 4 * MiB)
            db = sqlite3.connect(str(c.dir / "meta.db"))
            counters = json.loads(db.execute("SELECT value FROM kv WHERE key = 'counters'").fetchone()[0])
            counters["volume"] += 100
            with db:
                db.execute("UPDATE kv SET value = ?, rev = rev + 1000 WHERE key = 'counters'",
                           (json.dumps(counters).encode(),))
            db.close()
            with pytest.raises(NvpoolError, match="changed under this service"):
                pool.create_volume("b", 4 * MiB)
            second = poll("the service to reload", lambda: _try_create(pool, "b"), timeout=30)
            assert second.volume_id >= counters["volume"] > first.volume_id
        log = (c.dir / "logs" / "meta.log").read_text()
        assert "stops acting on its view" in log and "leads on" in log


def _try_create(pool: Any, name: str) -> Any:
    try:
        return pool.create_volume(name, 4 * MiB)
    except NvpoolError:
        return None


def test_a_client_that_knows_only_a_standby_is_served_through_it(ha: tuple[LocalCluster, EtcdCluster]) -> None:
    """A standby forwards a client's calls to the leader (an agent's own registration it redirects), so
    a client given one address that happens to be a standby's works; the leader's audit log names the
    client and the standby."""
    c, _ = ha
    lead = c.leader()
    standby = (lead + 1) % 3
    with client.connect(c.metas[standby].address) as pool:
        pool.create_volume("via", 4 * MiB)
        vol = pool.open("via")
        vol.write(0, np.full(65536, 0x5A, dtype=np.uint8))
        assert (vol.read(0, 65536) == 0x5A).all()
        assert "via" in {v.name for v in pool.list_volumes()}
    tag = "meta" if lead == 0 else f"meta{lead}"
    log = (c.dir / "logs" / f"{tag}.log").read_text()
    assert "created volume via" in log and " via ipv4:127.0.0.1" in log


def test_replicated_io_goes_on_through_a_leader_kill(ha: tuple[LocalCluster, EtcdCluster]) -> None:
    """A 2-replica volume under verifying writers and readers (tests/history.py) while the metadata
    leader is SIGKILLed: the agents' serve lease runs out until they reach the next leader, so I/O
    pauses, but no error reaches the application, the history checker finds nothing, and the copies
    end identical and fully redundant."""
    from tests.history import BLOCK, check, summary
    from tests.test_replication_faults import Workload, replica_bytes, volume_info

    c, _ = ha
    meta = c.meta_addresses
    with client.connect(meta) as pool:
        pool.create_volume("r", 8 * MiB, replicas=2)
    with Workload(meta, "r", (8 * MiB) // BLOCK) as w:
        poll("the workload to start", lambda: w.ops > 100, 30)
        def failover() -> None:  # the whole gap: the kill, the election, every agent back with the new leader
            c.kill_meta(c.leader())
            c.leader(timeout=30)
            c.wait_registered()

        w.running(failover, min_ops=100)
    assert not w.errors, f"{len(w.errors)} errors reached the application: {w.errors[:5]}"
    problems = check(w.history)
    assert not problems, "\n".join(problems[:20]) + "\n" + summary(w.history)
    poll("fully redundant again", lambda: asyncio.run(volume_info(meta, "r")).health == "ok", 60, 0.3)
    lay, cols = asyncio.run(replica_bytes(meta, "r", c.secret_file))
    assert not lay.degraded
    for i, copies in enumerate(cols):
        assert copies[1] == copies[0], f"column {i}: the copies differ"
