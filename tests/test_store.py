"""The metadata store contract on every implementation (memory, SQLite, a real etcd cluster): atomic
durable commits, prefix scans, revisions and compare-and-swap, the etcd leader guard, clear errors for
bad URLs, an unreachable etcd and a prefix holding something else; migration; generated code is
current."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import tempfile
import time
from typing import Iterator

import pytest

from nvpool.pool.kvstore import KVStore, MemoryStore, SQLiteStore, StoreConflict, StoreUnavailable, migrate, open_store
from nvpool.pool.meta import AgentRec, DriveRec, MetaService, check_store
import secrets
from nvpool.proto.errors import UnavailableError, UsageError
from nvpool.client import etcdlocal as etcdcluster
from tests.conftest import store_url
from tests.test_meta_unit import FakeLink


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[KVStore]:
    if request.param == "memory":
        s: KVStore = MemoryStore()
    elif request.param == "sqlite":
        s = SQLiteStore(str(tmp_path / "meta.db"))
    else:
        s = open_store(store_url(request, "etcd"))
    try:
        yield s
    finally:
        s.close()


def second_party(request: pytest.FixtureRequest, s: KVStore) -> KVStore:
    """Another metadata instance on the same data."""
    if isinstance(s, MemoryStore):
        return s.view()
    return open_store(s.url)


def test_commit_scan_get_and_delete(store: KVStore) -> None:
    store.commit({"volume/a": b"1", "volume/b": b"2", "agent/x": b"3"})
    store.commit({"volume/c": b"4"}, ["volume/a"])
    assert store.scan("volume/") == [("volume/b", b"2"), ("volume/c", b"4")]
    assert store.get("agent/x") == b"3" and store.get("nope") is None
    assert [k for k, _ in store.scan("")] == ["agent/x", "volume/b", "volume/c"]
    r = store.revision("volume/b")
    assert r > 0 and store.revision("volume/a") == 0
    store.commit({"volume/b": b"5"})
    assert store.revision("volume/b") > r


@pytest.fixture(params=["memory", "etcd"])
def shared_store(request: pytest.FixtureRequest) -> Iterator[KVStore]:
    """Stores that two metadata instances can share (one SQLite store has one service: a file lock)."""
    s: KVStore = MemoryStore() if request.param == "memory" else open_store(store_url(request, "etcd"))
    try:
        yield s
    finally:
        s.close()


def test_a_stale_commit_is_refused_and_applies_nothing(request: pytest.FixtureRequest, shared_store: KVStore) -> None:
    """Two instances read the same key; the first to commit wins, the second's whole transaction fails."""
    store = shared_store
    store.commit({"counters": b"1", "volume/a": b"x"})
    other = second_party(request, store)
    try:
        other.load_revisions()
        assert other.get("counters") == b"1"
        store.commit({"counters": b"2"})
        with pytest.raises(StoreConflict):
            other.commit({"counters": b"2-other", "volume/new": b"y"})  # allocate the same id twice: refused
        assert store.get("counters") == b"2" and store.get("volume/new") is None
        with pytest.raises(StoreConflict):  # a key believed absent that another created
            store.commit({"volume/b": b"1"})
            other.commit({"volume/b": b"2"})
        assert store.get("volume/b") == b"1"
        other.get("counters")  # read again: now it may write
        other.commit({"counters": b"3"})
        assert store.get("counters") == b"3"
    finally:
        if other is not store and not isinstance(other, MemoryStore):
            other.close()


def test_a_service_whose_commit_conflicts_stops_acting() -> None:
    """A metadata service whose view went stale (another instance wrote) refuses everything after the
    failed commit and asks its host to reload or step down."""
    shared = MemoryStore()
    svc = MetaService(shared, FakeLink())
    failures: list[Exception] = []
    svc.on_failure = failures.append
    intruder = shared.view()
    intruder.commit({"agent/a0": b"{}"})  # another instance registered a0 meanwhile

    async def go() -> None:
        with pytest.raises(UnavailableError, match="changed under this service"):
            await svc.register_agent(AgentRec("a0", "h0", "", "127.0.0.1:1", "127.0.0.1:2", "", []),
                                     [DriveRec("d0", "a0", "/dev/x", 1 << 30, 4096)])

    asyncio.run(go())
    assert failures and svc.failed is not None
    with pytest.raises(UnavailableError, match="stopped acting"):
        svc.store.commit({"anything": b"1"})
    assert shared.get("anything") is None


def test_old_sqlite_store_gains_revisions(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    db.execute("INSERT INTO kv VALUES ('pool', ?)", (b"{}",))
    db.commit()
    db.close()
    s = SQLiteStore(path)
    assert s.get("pool") == b"{}" and s.revision("pool") == 1
    s.commit({"pool": b"[]"})
    assert s.revision("pool") > 1
    s.close()


def test_failed_sqlite_commit_changes_nothing(tmp_path: pathlib.Path) -> None:
    s = SQLiteStore(str(tmp_path / "m.db"))
    s.commit({"k": b"v"})
    with pytest.raises(sqlite3.Error):
        s.commit({"k": b"new", "bad": object()})  # type: ignore[dict-item]
    assert s.get("k") == b"v" and s.get("bad") is None
    s.commit({"k": b"w"})  # the revision it knows is still right
    s.close()


def test_store_urls() -> None:
    from nvpool.pool.etcdstore import parse_url

    with pytest.raises(UsageError, match="unknown metadata store"):
        open_store("postgres://x")
    with pytest.raises(UsageError):
        open_store("sqlite:/no/such/dir/meta.db")
    with pytest.raises(UsageError):
        open_store("sqlite:")
    assert parse_url("etcd://a:1,b:2/nvpool/prod") == ([("a", 1), ("b", 2)], "/nvpool/prod")
    assert parse_url("etcd://a", "/x") == ([("a", 2379)], "/x")
    assert parse_url("etcd://a:1")[1] == "/nvpool"
    for bad in ("etcd://", "etcd://a:b", "etcd://a:99999", "etcd://a:1,:2"):
        with pytest.raises(UsageError):
            parse_url(bad)
    with pytest.raises(UsageError, match="prefix"):
        parse_url("etcd://a:1", "relative")


def test_unreachable_etcd_is_a_clear_bounded_error() -> None:
    from nvpool.client.etcdlocal import _free_ports

    port = _free_ports(1)[0]  # nothing listens there
    t = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"cannot reach etcd at 127.0.0.1:{port}"):
        open_store(f"etcd://127.0.0.1:{port}")
    assert time.monotonic() - t < 20


def test_a_prefix_holding_something_else_is_refused(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> None:
    url = store_url(request, "etcd")
    s = open_store(url)
    try:
        s.commit({"config/app": b"someone else's"})
        with pytest.raises(UsageError, match="not an nvpool pool"):
            check_store(s, [])
    finally:
        s.close()
    # another pool's prefix: its join secret is not ours
    url2 = store_url(request, "etcd")
    s = open_store(url2)
    try:
        svc = MetaService(s, FakeLink())
        svc.check_secret([secrets.token_bytes(32)])
        with pytest.raises(UsageError, match="not that pool's"):
            check_store(s, [secrets.token_bytes(32)])
    finally:
        s.close()


def test_leader_guard_fences_a_deposed_leader(request: pytest.FixtureRequest) -> None:
    """Only the elected instance's commits apply; one deposed while it still believes it leads (paused,
    its lease revoked behind its back) has every commit refused."""
    url = store_url(request, "etcd")
    a, b = open_store(url), open_store(url)
    try:
        won: dict[str, list[bool]] = {"a": [], "b": []}
        a.campaign(b'{"address": "a:1"}', 3, won["a"].append)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while not a.is_leader():  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        b.campaign(b'{"address": "b:1"}', 3, won["b"].append)  # type: ignore[attr-defined]
        time.sleep(0.3)
        assert not b.is_leader() and b.leader_info == {"address": "a:1"}  # type: ignore[attr-defined]
        a.load_revisions()
        a.commit({"volume/x": b"1"})
        with pytest.raises(StoreConflict, match="not the leader"):
            b.commit({"volume/y": b"1"})
        # depose a behind its back: its lease is revoked (as if it had been paused past its term)
        lease = a._lease_id  # type: ignore[attr-defined]
        b._call(lambda c: c.leasestub.LeaseRevoke(__import__("aetcd").rpc.LeaseRevokeRequest(ID=lease)),  # type: ignore[attr-defined]
                "revoke")
        deadline = time.monotonic() + 10
        while not b.is_leader():  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the standby never took over"
            time.sleep(0.02)
        a._valid_until = time.monotonic() + 60  # type: ignore[attr-defined]  # a still believes it leads
        a._guard = a._guard or (a.leader_key, 1)  # type: ignore[attr-defined]
        a.get("volume/x")
        with pytest.raises(StoreConflict):
            a.commit({"volume/x": b"stale"})
        b.load_revisions()
        b.commit({"volume/x": b"2"})
        assert b.get("volume/x") == b"2"
    finally:
        a.close()
        b.close()


def test_migrate_sqlite_to_etcd(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> None:
    src = str(tmp_path / "meta.db")
    s = SQLiteStore(src)
    svc = MetaService(s, FakeLink())
    svc.check_secret([secrets.token_bytes(32)])
    s.commit({"volume/v": b"{}", "layout/1": b"{}"})
    want = s.scan("")
    s.close()
    url = store_url(request, "etcd")
    assert migrate(f"sqlite:{src}", url) == len(want)
    d = open_store(url)
    try:
        assert d.scan("") == want
    finally:
        d.close()
    with pytest.raises(UsageError, match="not empty"):
        migrate(f"sqlite:{src}", url)
    with pytest.raises(UsageError, match="does not exist"):
        migrate(f"sqlite:{tmp_path / 'missing.db'}", url)
    assert not (tmp_path / "missing.db").exists()
    SQLiteStore(str(tmp_path / "empty.db")).close()
    with pytest.raises(UsageError, match="no nvpool pool"):
        migrate(f"sqlite:{tmp_path / 'empty.db'}", url)


def test_etcd_available_where_ci_runs() -> None:
    """deploy/test.sh installs etcd; in CI its absence fails here rather than skipping the etcd suite."""
    import os

    if os.environ.get("CI"):
        assert etcdcluster.available()


def test_generated_code_is_up_to_date() -> None:
    pytest.importorskip("grpc_tools")
    from nvpool.proto.generate import OUTPUTS, ROOT, generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        for name in OUTPUTS:
            fresh = (pathlib.Path(tmp) / "nvpool" / "proto" / name).read_text()
            assert fresh == (ROOT / "proto" / name).read_text(), f"proto/{name} is stale: run python -m nvpool.proto.generate"


def test_etcd_history_is_compacted_and_commits_go_on(request: pytest.FixtureRequest) -> None:
    """The leader compacts etcd's history (etcd keeps every revision until told): old revisions are gone,
    current keys and revision compares are untouched."""
    from aetcd import rpc

    s = open_store(store_url(request, "etcd"))
    try:
        for i in range(20):
            s.commit({"k": str(i).encode()})
        old = s.revision("k") - 10
        upto = s.compact(keep=5)  # type: ignore[attr-defined]
        assert upto > old

        async def read_at(c: object, rev: int = old) -> object:
            return await c.kvstub.Range(rpc.RangeRequest(key=s._k("k"), revision=rev), timeout=2)  # type: ignore[attr-defined]

        with pytest.raises(StoreUnavailable, match="compacted"):
            s._call(read_at, "read an old revision", timeout=2)  # type: ignore[attr-defined]
        s.commit({"k": b"after"})
        assert s.get("k") == b"after"
    finally:
        s.close()


@pytest.mark.parametrize("args,message", [
    (["--store", "etcd://a:b"], "bad etcd endpoint 'a:b'"),
    (["--store", "etcd://127.0.0.1:2379"], "needs --join-secret-file"),
    (["--store", "sqlite:x.db", "--prefix", "/p"], "etcd store only"),
    (["--store", "etcd://127.0.0.1:2379", "--prefix", "p"], "bad etcd prefix"),
])
def test_meta_cli_refuses_bad_stores_in_one_line(tmp_path: pathlib.Path, args: list[str], message: str) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "nvpool", "meta", "--listen", "127.0.0.1:0", *args],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_a_view_from_an_earlier_term_cannot_commit_in_a_later_one(request: pytest.FixtureRequest) -> None:
    """The same process leads, steps down and is elected again: a metadata service loaded in the first
    term (a create still waiting on agents, say) must not commit in the second, whose view was reloaded."""
    url = store_url(request, "etcd")
    s = open_store(url)
    try:
        s.campaign(b'{"address": "a:1"}', 3, lambda won: None)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while not s.is_leader():  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first = s.term()  # type: ignore[attr-defined]
        old = MetaService(s, FakeLink())
        old.store.commit({"note/x": b"1"})
        s.step_down(first)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 15
        while not (s.is_leader() and s.term() != first):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "not elected again"
            time.sleep(0.02)
        new = MetaService(s, FakeLink())  # the next term's view, reloaded from the store
        with pytest.raises(UnavailableError, match="not in the term"):
            old.store.commit({"note/x": b"stale"})
        assert old.failed is not None
        new.store.commit({"note/y": b"1"})
        assert s.get("note/x") == b"1" and s.get("note/y") == b"1"
        s.step_down(first)  # type: ignore[attr-defined]  # a late failure of the old view: no effect now
        time.sleep(1.0)
        assert s.is_leader() and s.term() != first  # type: ignore[attr-defined]
    finally:
        s.close()
