"""The metadata store: a small transactional key-value interface with revisions and compare-and-swap
commits, implemented on SQLite (the embedded default), in memory (tests) and on etcd
(``pool/etcdstore.py``).

Contract:

* Keys are strings, values bytes; ``scan(prefix)`` lists a prefix in key order.
* Every key has a *revision*: a number that changes whenever the key is written or deleted (0: the
  key does not exist). The store remembers the revision of every key as this process last read or
  wrote it (``load_revisions`` reads them all, which a service does before it acts on the store).
* ``commit(puts, deletes)`` is one transaction that applies every put and delete atomically and
  durably, **only if** every key it writes or deletes still has the revision this process knows
  (a key it believes absent must still be absent), and, on etcd, only while this process still
  holds the leadership it won, in the term the caller's view was loaded in (``pool/etcdstore.py``).
  Otherwise nothing is applied and it raises ``StoreConflict``. A store that cannot be reached
  raises ``StoreUnavailable``. On etcd a commit whose answer was lost is retried on another member
  and settled by reading back what it wrote; when even that runs out of time, whether it was
  applied is unknown, which is why the metadata service treats every ``StoreUnavailable`` from a
  commit as the end of its view (it reloads from the store, or steps down).

Why two metadata services can never both win. Every mutation of the metadata service is computed
under its lock from its in-memory view, then committed in one ``commit``. The in-memory view is a
cache of the store, valid only while the service is the sole writer: it was loaded from the store
when the service became leader, and every change since is the service's own committed change. Two
guards make a stale view harmless: the per-key revision compare (a key somebody else wrote since
this service read it fails the commit) and, on etcd, the leader guard (a service whose leadership
lapsed, even one paused by SIGSTOP while another was elected, fails every commit, because the
leader key it created is gone). A failed commit poisons the service (``pool/meta.py``): it answers
nothing more from its view and its host reloads the view from the store, or steps down.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from typing import Iterable, Mapping, Optional, Protocol

from nvpool.proto.errors import UnavailableError, UsageError


class StoreUnavailable(UnavailableError):
    """The store could not be reached (etcd down or partitioned away, a disk error)."""


class StoreConflict(StoreUnavailable):
    """A commit's compare failed: another metadata instance changed a key, or leadership was lost."""


class KVStore(Protocol):
    #: where the data lives, for messages ("sqlite:/var/lib/nvpool/meta.db", "etcd://...")
    url: str

    def get(self, key: str) -> Optional[bytes]: ...

    def scan(self, prefix: str) -> list[tuple[str, bytes]]: ...

    def commit(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None: ...

    def load_revisions(self) -> None: ...

    def revision(self, key: str) -> int: ...

    def close(self) -> None: ...


class _Revisions:
    """The revision of every key as this process last saw it (see the module doc)."""

    def __init__(self) -> None:
        self._rev: dict[str, int] = {}
        self._rev_lock = threading.Lock()

    def revision(self, key: str) -> int:
        with self._rev_lock:
            return self._rev.get(key, 0)

    def _saw(self, key: str, rev: int) -> None:
        with self._rev_lock:
            if rev:
                self._rev[key] = rev
            else:
                self._rev.pop(key, None)

    def _expected(self, keys: Iterable[str]) -> dict[str, int]:
        with self._rev_lock:
            return {k: self._rev.get(k, 0) for k in keys}


class SQLiteStore(_Revisions):
    def __init__(self, path: str) -> None:
        super().__init__()
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise UsageError(f"metadata store directory {d} does not exist")
        self.path = path
        self.url = f"sqlite:{path}"
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
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
            cols = [r[1] for r in self._db.execute("PRAGMA table_info(kv)").fetchall()]
            if "rev" not in cols:  # a store written before revisions: every key starts at revision 1
                self._db.execute("ALTER TABLE kv ADD COLUMN rev INTEGER NOT NULL DEFAULT 1")
            self._db.execute("CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 0), rev INTEGER)")
            self._db.execute("INSERT OR IGNORE INTO revision (id, rev) VALUES (0, 1)")
        except sqlite3.DatabaseError as exc:
            os.close(self._lock_fd)
            raise UsageError(f"{path} is not an nvpool metadata store: {exc}") from None
        self.load_revisions()

    def load_revisions(self) -> None:
        rows = self._db.execute("SELECT key, rev FROM kv").fetchall()
        with self._rev_lock:
            self._rev = {k: int(r) for k, r in rows}

    def get(self, key: str) -> Optional[bytes]:
        row = self._db.execute("SELECT value, rev FROM kv WHERE key = ?", (key,)).fetchone()
        self._saw(key, 0 if row is None else int(row[1]))
        return None if row is None else bytes(row[0])

    def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        rows = self._db.execute(
            "SELECT key, value, rev FROM kv WHERE key >= ? AND key < ? ORDER BY key", (prefix, prefix + "\uffff")
        ).fetchall()
        for k, _, r in rows:
            self._saw(k, int(r))
        return [(k, bytes(v)) for k, v, _ in rows]

    def commit(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        dels = [k for k in deletes if k not in puts]
        if not puts and not dels:
            return
        expected = self._expected([*puts, *dels])
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for key, want in expected.items():
                row = cur.execute("SELECT rev FROM kv WHERE key = ?", (key,)).fetchone()
                have = 0 if row is None else int(row[0])
                if have != want:
                    raise StoreConflict(f"metadata key {key!r} changed under this service (revision {have}, "
                                        f"expected {want})")
            rev = int(cur.execute("SELECT rev FROM revision WHERE id = 0").fetchone()[0]) + 1
            cur.execute("UPDATE revision SET rev = ? WHERE id = 0", (rev,))
            cur.executemany("INSERT OR REPLACE INTO kv (key, value, rev) VALUES (?, ?, ?)",
                            [(k, v, rev) for k, v in puts.items()])
            cur.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in dels])
            cur.execute("COMMIT")
        except sqlite3.OperationalError as exc:  # disk full, I/O error: nothing was applied
            cur.execute("ROLLBACK")
            raise StoreUnavailable(f"the metadata store {self.path} failed a commit: {exc}") from None
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        for k in puts:
            self._saw(k, rev)
        for k in dels:
            self._saw(k, 0)

    def close(self) -> None:
        self._db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class MemoryStore(_Revisions):
    """For tests: the same contract in memory. ``view()`` is a second party on the same data (its own
    revisions), as a second metadata instance would be."""

    def __init__(self, shared: Optional[dict[str, tuple[bytes, int]]] = None) -> None:
        super().__init__()
        self.url = "memory:"
        self._data: dict[str, tuple[bytes, int]] = shared if shared is not None else {}
        self.load_revisions()

    @property
    def data(self) -> dict[str, bytes]:
        return {k: v for k, (v, _) in self._data.items()}

    def view(self) -> "MemoryStore":
        return MemoryStore(self._data)

    def load_revisions(self) -> None:
        with self._rev_lock:
            self._rev = {k: r for k, (_, r) in self._data.items()}

    def get(self, key: str) -> Optional[bytes]:
        got = self._data.get(key)
        self._saw(key, got[1] if got else 0)
        return got[0] if got else None

    def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        out = sorted((k, v) for k, v in self._data.items() if k.startswith(prefix))
        for k, (_, r) in out:
            self._saw(k, r)
        return [(k, v) for k, (v, _) in out]

    def commit(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        dels = [k for k in deletes if k not in puts]
        for key, want in self._expected([*puts, *dels]).items():
            have = self._data[key][1] if key in self._data else 0
            if have != want:
                raise StoreConflict(f"metadata key {key!r} changed under this service")
        rev = max((r for _, r in self._data.values()), default=0) + 1
        for k, v in puts.items():
            self._data[k] = (bytes(v), rev)
            self._saw(k, rev)
        for k in dels:
            self._data.pop(k, None)
            self._saw(k, 0)

    def close(self) -> None:
        pass


def open_store(url: str, prefix: str = "") -> KVStore:
    """``sqlite:PATH`` (the embedded default), ``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`` (several
    metadata services, ``pool/etcdstore.py``) or ``memory:``."""
    if url.startswith("sqlite:"):
        if prefix:
            raise UsageError("--prefix applies to an etcd store only")
        path = url[len("sqlite:"):]
        if not path:
            raise UsageError("sqlite: needs a path, e.g. sqlite:/var/lib/nvpool/meta.db")
        return SQLiteStore(path)
    if url == "memory:":
        return MemoryStore()
    if url.startswith("etcd://"):
        from nvpool.pool.etcdstore import EtcdStore

        return EtcdStore(url, prefix)
    raise UsageError(f"unknown metadata store {url!r}: expected sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...]")


def migrate(source: str, dest: str, prefix: str = "") -> int:
    """Copy every key of ``source`` into ``dest``, which must hold nothing yet (one transaction per 256
    keys; the pool record goes last, so a half-copied destination is never taken for a pool)."""
    if source.startswith("sqlite:") and not os.path.exists(source[len("sqlite:"):]):
        raise UsageError(f"{source[len('sqlite:'):]} does not exist")
    src = open_store(source)
    try:
        items = src.scan("")
        if not any(k == "pool" for k, _ in items):
            raise UsageError(f"{source} holds no nvpool pool")
        dst = open_store(dest, prefix if dest.startswith("etcd://") else "")
        try:
            there = dst.scan("")
            if there:
                raise UsageError(f"{dst.url} is not empty ({len(there)} keys, e.g. {there[0][0]}): migrate into an "
                                 "empty store or another --prefix")
            body = [(k, v) for k, v in items if k != "pool"]
            for i in range(0, len(body), 256):
                dst.commit(dict(body[i:i + 256]))
            dst.commit({"pool": dict(items)["pool"]})
            return len(items)
        finally:
            dst.close()
    finally:
        src.close()
