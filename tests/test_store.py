"""Metadata store: atomic durable commits, prefix scans, reopen; generated code is up to date."""

from __future__ import annotations

import pathlib
import tempfile

import pytest

from nvpool.pool.kvstore import SQLiteStore, open_store
from nvpool.proto.errors import UsageError


def test_sqlite_commit_scan_and_reopen(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "meta.db")
    s = SQLiteStore(path)
    s.commit({"volume/a": b"1", "volume/b": b"2", "agent/x": b"3"})
    s.commit({"volume/c": b"4"}, ["volume/a"])
    assert s.scan("volume/") == [("volume/b", b"2"), ("volume/c", b"4")]
    assert s.get("agent/x") == b"3" and s.get("nope") is None
    s.close()
    again = open_store(f"sqlite:{path}")
    assert [k for k, _ in again.scan("")] == ["agent/x", "volume/b", "volume/c"]


def test_failed_commit_changes_nothing(tmp_path: pathlib.Path) -> None:
    s = SQLiteStore(str(tmp_path / "m.db"))
    s.commit({"k": b"v"})
    import sqlite3

    with pytest.raises(sqlite3.Error):
        s.commit({"k": b"new", "bad": object()})  # type: ignore[dict-item]
    assert s.get("k") == b"v" and s.get("bad") is None


def test_store_urls() -> None:
    with pytest.raises(UsageError):
        open_store("postgres://x")
    with pytest.raises(UsageError):
        open_store("sqlite:/no/such/dir/meta.db")
    with pytest.raises(UsageError, match="etcd"):
        open_store("etcd://127.0.0.1:2379")


def test_generated_code_is_up_to_date() -> None:
    pytest.importorskip("grpc_tools")
    from nvpool.proto.generate import OUTPUTS, ROOT, generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        for name in OUTPUTS:
            fresh = (pathlib.Path(tmp) / "nvpool" / "proto" / name).read_text()
            assert fresh == (ROOT / "proto" / name).read_text(), f"proto/{name} is stale: run python -m nvpool.proto.generate"
