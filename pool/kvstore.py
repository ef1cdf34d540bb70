"""The metadata store: a small transactional key-value interface, and its SQLite implementation.

Contract: keys are strings, values bytes; ``scan(prefix)`` lists a prefix in key order; ``commit``
applies puts and deletes atomically and durably (when it returns, a crash loses none of it). The
metadata service keeps its state in memory and writes every mutation through ``commit`` before it
answers. An etcd implementation fits the same contract (``etcd://host:port``): one etcd
transaction per ``commit``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from typing import Iterable, Mapping, Optional, Protocol

from nvpool.proto.errors import UsageError


class KVStore(Protocol):
    def get(self, key: str) -> Optional[bytes]: ...

    def scan(self, prefix: str) -> list[tuple[str, bytes]]: ...

    def commit(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None: ...

    def close(self) -> None: ...


class SQLiteStore:
    def __init__(self, path: str) -> None:
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise UsageError(f"metadata store directory {d} does not exist")
        self.path = path
        # one service per store: a second one would hand out the same space twice
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
            finally:
                os.close(self._lock_fd)
            raise UsageError(
                f"metadata store {path} is in use by another metadata service"
                + (f" (pid {holder})" if holder else "")
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")

    def get(self, key: str) -> Optional[bytes]:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        rows = self._db.execute(
            "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key", (prefix, prefix + "\uffff")
        ).fetchall()
        return [(k, bytes(v)) for k, v in rows]

    def commit(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        dels = list(deletes)
        if not puts and not dels:
            return
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", list(puts.items()))
            cur.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in dels])
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class MemoryStore:
    """For tests: the same contract in memory."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> Optional[bytes]:
        return self.data.get(key)

    def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    def commit(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        self.data.update(puts)
        for k in deletes:
            self.data.pop(k, None)

    def close(self) -> None:
        pass


def open_store(url: str) -> KVStore:
    """``sqlite:PATH`` (the embedded default) or ``memory:``."""
    if url.startswith("sqlite:"):
        return SQLiteStore(url[len("sqlite:") :])
    if url == "memory:":
        return MemoryStore()
    if url.startswith("etcd://"):
        raise UsageError("the etcd store is not built yet; use sqlite:PATH")
    raise UsageError(f"unknown metadata store {url!r}: expected sqlite:PATH")
