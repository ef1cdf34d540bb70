"""The metadata store on etcd (``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]``), and leader election.

etcd is a Raft-replicated key-value store: with three or five members a pool's metadata survives
the loss of any minority of them. Several ``nvpool meta`` instances share one etcd prefix; exactly
one is the *leader* and acts on the pool, the others redirect callers to it and stand by.

Threads. The etcd client (``aetcd``, asyncio) runs on its own event loop in a thread of its own.
The metadata service calls the store synchronously (``get``/``scan``/``commit`` block the caller
for one etcd round trip, as a SQLite commit blocks for an fsync); the election and its lease
keep-alives run on the etcd thread, so a busy metadata service never misses a keep-alive.

Endpoints. The URL lists the etcd members; requests go to one, and a member that fails or times
out is replaced by the next, within ``timeout`` seconds per operation. A commit whose answer was
lost (the member died after receiving it) is settled by reading back its keys: with the leader
guard nobody else writes them, so "all puts present with our values, all deletes absent" means it
was applied.

Keys. Every key lives under the prefix (default ``/nvpool``): ``PREFIX/volume/NAME``, ... and the
election key ``PREFIX/leader``. Nothing per-I/O and nothing per-second is written: mutations of
the pool (volumes, layouts, leases taken and closed, agent registrations, migration steps) and the
leader key's keep-alive (a lease renewal, not a write) are all (vitastor#94: statistics in etcd
overloaded it; ours stay in Prometheus). Requests stay far below etcd's 1.5 MiB limit: the largest
value is one volume's layout (``commit`` refuses a transaction above 1 MiB with a clear error).

Leader election (etcd's own recipe, as Vitastor's monitor does it):

1. A candidate grants an etcd lease of ``ttl`` seconds and, in one transaction, creates the leader
   key attached to it if the key does not exist. The key's create revision identifies this term.
2. The winner renews the lease every ``ttl/4``. It counts itself leader only until
   ``sent + ttl - margin`` after the last renewal that etcd acknowledged (``sent`` being when the
   renewal was sent, before etcd could receive it): etcd expires the lease no earlier than
   ``ttl`` after it received the renewal, so the old leader stops acting before the key can
   disappear and a new leader be elected. Every commit also carries the guard "the leader key's
   create revision is still mine", so even a leader that was paused past its term (SIGSTOP, a
   stalled VM) cannot change the pool: its first commit fails and it steps down.
3. The others watch the leader key and run again when it is deleted (lease expired or revoked).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, TypeVar

from nvpool.pool.kvstore import StoreConflict, StoreUnavailable, _Revisions
from nvpool.proto.errors import UsageError

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PREFIX = "/nvpool"
#: the largest transaction we send (etcd refuses requests above 1.5 MiB by default)
MAX_TXN_BYTES = 1024 * 1024
#: the leader compacts etcd's history every this many seconds, keeping the last KEEP_REVISIONS revisions
#: (etcd keeps every old revision until compacted: without it the database only grows)
COMPACT_EVERY = 600.0
KEEP_REVISIONS = 10000


def parse_url(url: str, prefix: str = "") -> tuple[list[tuple[str, int]], str]:
    """(endpoints, prefix) of ``etcd://h1:p1,h2:p2[/prefix]``; ``prefix`` (``--prefix``) wins."""
    if not url.startswith("etcd://"):
        raise UsageError(f"not an etcd URL: {url!r}")
    rest = url[len("etcd://"):]
    hosts, slash, path = rest.partition("/")
    eps: list[tuple[str, int]] = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            continue
        host, colon, port = part.rpartition(":")
        if not colon:
            host, port = part, "2379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"bad etcd endpoint {part!r} in {url!r}: expected HOST:PORT")
        eps.append((host, int(port)))
    if not eps:
        raise UsageError(f"no etcd endpoint in {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
    p = prefix or ("/" + path if slash and path else DEFAULT_PREFIX)
    if not p.startswith("/") or p.endswith("/") and p != "/" or "//" in p:
        raise UsageError(f"bad etcd prefix {p!r}: expected an absolute path like /nvpool/prod")
    return eps, p.rstrip("/")


async def _txn(txn: Any, c: Any) -> Any:
    return await c.kvstub.Txn(txn, timeout=c._timeout)


async def _revoke(lease_id: int, c: Any) -> Any:
    from aetcd import rpc

    return await c.leasestub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), timeout=c._timeout)


class EtcdStore(_Revisions):
    def __init__(self, url: str, prefix: str = "", timeout: float = 6.0) -> None:
        super().__init__()
        import aetcd  # noqa: F401 - fail here, clearly, when the client is missing

        self.endpoints, self.prefix = parse_url(url, prefix)
        self.url = "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints) + self.prefix
        self.timeout = timeout
        self._ep = 0
        self._client: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nvpool-etcd", daemon=True)
        self._thread.start()
        #: (leader key, its create revision) while this process is leader: every commit is guarded by it
        self._guard: Optional[tuple[bytes, int]] = None
        self._valid_until = 0.0
        self._leader_value: Optional[bytes] = None
        self._campaign: Optional[concurrent.futures.Future[None]] = None
        self._stopping = False
        self._closing: set[asyncio.Future[None]] = set()
        self._abdicate = False
        #: the etcd lease of the term this process leads in (0: none)
        self._lease_id = 0
        try:
            self._call(self._status, "connect")
        except StoreUnavailable:
            self.close()
            raise

    # ------------------------------------------------------------------ plumbing
    def _k(self, key: str) -> bytes:
        return f"{self.prefix}/{key}".encode()

    def _unk(self, raw: bytes) -> str:
        return raw.decode()[len(self.prefix) + 1:]

    @property
    def leader_key(self) -> bytes:
        return f"{self.prefix}/leader".encode()

    async def _connect(self) -> Any:
        import aetcd

        if self._client is None:
            host, port = self.endpoints[self._ep]
            self._client = aetcd.Client(host=host, port=port, timeout=max(1, int(self.timeout / 3)),
                                        options={"grpc.enable_retries": 0})
            await self._client.connect()
        return self._client

    async def _rotate(self) -> None:
        client, self._client = self._client, None
        self._ep = (self._ep + 1) % len(self.endpoints)
        if client is not None:  # closed later: other calls on this loop may still be using it
            async def close_later() -> None:
                await asyncio.sleep(self.timeout)
                try:
                    await client.close()
                except Exception:  # noqa: BLE001 - closing a broken channel may fail; it is dropped either way
                    pass

            self._closing.add(asyncio.ensure_future(close_later()))
            for t in [t for t in self._closing if t.done()]:
                self._closing.discard(t)

    async def _status(self, client: Any) -> None:
        from aetcd import rpc

        await client.maintenancestub.Status(rpc.StatusRequest(), timeout=client._timeout)

    async def _with_failover(self, op: Callable[[Any], Awaitable[T]], what: str, deadline: float) -> T:
        """Run ``op(client)``, moving to the next endpoint when one fails, until ``deadline``."""
        from aetcd import exceptions, rpc

        last = ""
        tried = 0
        while True:
            try:
                client = await self._connect()
                return await op(client)
            except (rpc.AioRpcError, exceptions.ClientError, asyncio.TimeoutError, OSError) as exc:
                if isinstance(exc, rpc.AioRpcError) and exc.code() in (
                        rpc.StatusCode.INVALID_ARGUMENT, rpc.StatusCode.PERMISSION_DENIED,
                        rpc.StatusCode.UNAUTHENTICATED, rpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise StoreUnavailable(f"etcd refused {what}: {exc.details()}") from None
                last = (exc.details() if isinstance(exc, rpc.AioRpcError) else str(exc)) or type(exc).__name__
                host, port = self.endpoints[self._ep]
                logger.debug("etcd %s:%d failed %s: %s", host, port, what, last)
                await self._rotate()
                tried += 1
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"cannot reach etcd at {', '.join(f'{h}:{p}' for h, p in self.endpoints)} ({what}): "
                        f"{last.splitlines()[0][:200] if last else 'no answer'}") from None
                if tried % len(self.endpoints) == 0:
                    await asyncio.sleep(0.2)

    def _call(self, op: Callable[[Any], Awaitable[T]], what: str, timeout: Optional[float] = None) -> T:
        deadline = time.monotonic() + (timeout or self.timeout)
        fut = asyncio.run_coroutine_threadsafe(self._with_failover(op, what, deadline), self._loop)
        try:
            return fut.result((timeout or self.timeout) + 5)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise StoreUnavailable(f"etcd did not answer {what} within {timeout or self.timeout:g}s") from None

    # ------------------------------------------------------------------ KVStore
    def get(self, key: str) -> Optional[bytes]:
        from aetcd import rpc

        async def op(c: Any) -> Any:
            return await c.kvstub.Range(rpc.RangeRequest(key=self._k(key)), timeout=c._timeout)

        r = self._call(op, f"get {key}")
        if not r.kvs:
            self._saw(key, 0)
            return None
        self._saw(key, r.kvs[0].mod_revision)
        return bytes(r.kvs[0].value)

    def _range(self, prefix: str, keys_only: bool = False) -> list[Any]:
        from aetcd import rpc, utils

        start = self._k(prefix)

        async def op(c: Any) -> Any:
            return await c.kvstub.Range(rpc.RangeRequest(
                key=start, range_end=utils.prefix_range_end(start), keys_only=keys_only,
                sort_order=rpc.RangeRequest.ASCEND, sort_target=rpc.RangeRequest.KEY), timeout=c._timeout)

        return list(self._call(op, f"scan {prefix or '/'}").kvs)

    def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        out = []
        for kv in self._range(prefix):
            k = self._unk(kv.key)
            if k == "leader":
                continue
            self._saw(k, kv.mod_revision)
            out.append((k, bytes(kv.value)))
        return out

    def load_revisions(self) -> None:
        kvs = self._range("", keys_only=True)
        with self._rev_lock:
            self._rev = {self._unk(kv.key): kv.mod_revision for kv in kvs}

    def term(self) -> Optional[tuple[bytes, int]]:
        """The term this process leads in (the leader key and its create revision), None if it does not."""
        return self._guard

    def commit(self, puts: Mapping[str, bytes], deletes: Iterable[str] = (),
               term: Optional[tuple[bytes, int]] = None) -> None:
        """As the contract says; ``term`` (``term()`` when the caller's view was loaded) must still be the
        term this process leads in, so a view from an earlier term of this same process cannot commit
        under a later one."""
        from aetcd import rpc

        dels = [k for k in deletes if k not in puts]
        if not puts and not dels:
            return
        guard = self._guard  # read once: the etcd thread may end the term at any moment
        if self._campaign is not None and (guard is None or not self.is_leader() or
                                           (term is not None and term != guard)):
            raise StoreConflict("this metadata service is not the leader (any more), or not in the term its "
                                "view was loaded in: it changes nothing")
        size = sum(len(k) + len(v) for k, v in puts.items()) + sum(len(k) for k in dels)
        if size > MAX_TXN_BYTES:
            raise StoreUnavailable(f"a metadata change of {size} bytes is above etcd's request limit")
        expected = self._expected([*puts, *dels])
        compare = [rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=self._k(k), mod_revision=r)
                   for k, r in expected.items()]
        if guard is not None:
            compare.append(rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=guard[0],
                                       create_revision=guard[1]))
        success = [rpc.RequestOp(request_put=rpc.PutRequest(key=self._k(k), value=bytes(v))) for k, v in puts.items()]
        success += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._k(k))) for k in dels]
        req = rpc.TxnRequest(compare=compare, success=success, failure=[])
        attempts = 0

        async def op(c: Any) -> Any:
            nonlocal attempts
            attempts += 1
            resp = await c.kvstub.Txn(req, timeout=c._timeout)
            if resp.succeeded or attempts == 1:
                return resp, None
            # a retry whose compare failed: was the first attempt applied before its answer was lost?
            got = {}
            for k in [*puts, *dels]:
                r = await c.kvstub.Range(rpc.RangeRequest(key=self._k(k)), timeout=c._timeout)
                got[k] = r.kvs[0] if r.kvs else None
            return resp, got

        resp, readback = self._call(op, "commit")
        if resp.succeeded:
            revs = {k: resp.header.revision for k in puts}
        elif readback is not None and all(readback[k] is not None and bytes(readback[k].value) == bytes(puts[k])
                                          for k in puts) and all(readback[k] is None for k in dels):
            revs = {k: readback[k].mod_revision for k in puts}  # the lost first attempt was applied
        elif guard is not None and not self._still_leader(guard):
            raise StoreConflict("this metadata service is no longer the leader (its etcd lease expired); "
                                "another instance has taken over")
        else:
            raise StoreConflict("the metadata in etcd changed under this service (another metadata instance wrote it)")
        for k, rev in revs.items():
            self._saw(k, rev)
        for k in dels:
            self._saw(k, 0)

    def _still_leader(self, guard: tuple[bytes, int]) -> bool:
        from aetcd import rpc

        async def op(c: Any) -> Any:
            return await c.kvstub.Range(rpc.RangeRequest(key=guard[0]), timeout=c._timeout)

        try:
            r = self._call(op, "check leadership")
        except StoreUnavailable:
            return False
        return bool(r.kvs) and r.kvs[0].create_revision == guard[1]

    async def _compact(self, keep: int) -> int:
        """Drop etcd's history older than the last ``keep`` revisions (current keys are untouched, so no
        compare of ours is affected); returns the revision compacted to (0: nothing to do)."""
        from aetcd import rpc

        client = await self._connect()
        st = await client.kvstub.Range(rpc.RangeRequest(key=self.leader_key), timeout=client._timeout)
        target = st.header.revision - keep
        if target <= 0:
            return 0
        try:
            await client.kvstub.Compact(rpc.CompactionRequest(revision=target), timeout=client._timeout)
        except rpc.AioRpcError as exc:
            if "compacted" not in (exc.details() or ""):  # (already compacted that far: nothing to do)
                raise
        logger.info("compacted etcd's history up to revision %d", target)
        return int(target)

    async def _compact_quietly(self) -> None:
        try:
            await asyncio.wait_for(self._compact(KEEP_REVISIONS), 30)
        except Exception as exc:  # noqa: BLE001 - compaction is housekeeping; next time
            logger.warning("compacting etcd's history failed: %s", exc)

    def compact(self, keep: int = KEEP_REVISIONS) -> int:
        """``_compact`` from any thread (tests; the leader runs it every ``COMPACT_EVERY`` seconds)."""
        fut = asyncio.run_coroutine_threadsafe(self._compact(keep), self._loop)
        return int(fut.result(self.timeout + 5))

    def close(self) -> None:
        self._stopping = True
        if self._campaign is not None:
            self._campaign.cancel()
        if self._loop.is_running():
            async def shutdown() -> None:
                await self._resign()
                if self._client is not None:
                    try:
                        await asyncio.wait_for(self._client.close(), 2)
                    except Exception:  # noqa: BLE001 - best effort at exit
                        pass
                    self._client = None

            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    # ------------------------------------------------------------------ election
    def is_leader(self) -> bool:
        return self._guard is not None and time.monotonic() < self._valid_until

    @property
    def leader_info(self) -> Optional[dict[str, Any]]:
        """What the current leader published (its address), as last seen; None when unknown."""
        raw = self._leader_value
        if not raw:
            return None
        try:
            got = json.loads(raw)
            return got if isinstance(got, dict) else None
        except ValueError:
            return None

    def step_down(self, term: Optional[tuple[bytes, int]] = None) -> None:
        """Give up the term now (after a failed commit): commits fail from here on, the lease is revoked
        and the election runs again. With ``term``: only if this process still leads in that term (a
        failure of a view from an earlier term must not end a later one)."""
        def act() -> None:
            if self._guard is not None and (term is None or term == self._guard):
                self._guard, self._valid_until = None, 0.0
                self._abdicate = True

        self._loop.call_soon_threadsafe(act)

    def campaign(self, value: bytes, ttl: int, on_change: Callable[[bool], None]) -> None:
        """Run for leader in the background; ``on_change(True/False)`` (called on the etcd thread) when
        this process wins or loses leadership."""
        self._campaign = asyncio.run_coroutine_threadsafe(self._elect(value, ttl, on_change), self._loop)

    async def _resign(self) -> None:
        lease, self._lease_id = self._lease_id, 0
        self._guard, self._valid_until = None, 0.0
        if lease and self._client is not None:
            try:
                await asyncio.wait_for(_revoke(lease, self._client), 2)
            except Exception:  # noqa: BLE001 - the lease expires by itself
                pass

    async def _elect(self, value: bytes, ttl: int, on_change: Callable[[bool], None]) -> None:
        from aetcd import exceptions, rpc

        margin = max(0.5, ttl / 4)
        key = self.leader_key
        while not self._stopping:
            try:
                deadline = time.monotonic() + self.timeout
                lease = await self._with_failover(
                    lambda c: c.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), timeout=c._timeout),
                    "grant a lease", deadline)
                self._lease_id = lease.ID
                sent = time.monotonic()
                txn = rpc.TxnRequest(
                    compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key,
                                         create_revision=0)],
                    success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease.ID))],
                    failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))])
                resp = await self._with_failover(functools.partial(_txn, txn), "run for leader", deadline)
                if resp.succeeded:
                    self._abdicate = False
                    self._guard = (key, resp.header.revision)
                    self._valid_until = sent + lease.TTL - margin
                    self._leader_value = value
                    logger.info("won the metadata leader election (etcd revision %d, lease %ds)", resp.header.revision,
                                lease.TTL)
                    on_change(True)
                    await self._keep_leading(lease.ID, lease.TTL, margin)
                    logger.warning("lost the metadata leadership")
                    await self._resign()
                    on_change(False)
                    await asyncio.sleep(0.2)
                    continue
                await self._with_failover(functools.partial(_revoke, lease.ID), "revoke a lease", deadline)
                self._lease_id = 0
                kvs = resp.responses[0].response_range.kvs
                self._leader_value = bytes(kvs[0].value) if kvs else None
                if not kvs:
                    continue
                client = await self._connect()
                try:  # until the leader key changes (deleted when the leader's lease ends)
                    ev = await client.watch_once(key, timeout=ttl, start_revision=resp.header.revision + 1)
                    if isinstance(ev, Exception):  # aetcd hands a watch error back as the event
                        raise ev
                except exceptions.WatchTimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd unreachable: stand by, try again
                self._leader_value = None
                if self._guard is not None:
                    await self._resign()
                    on_change(False)
                logger.warning("metadata leader election: %s", exc)
                await self._rotate()
                await asyncio.sleep(0.5)

    async def _keep_leading(self, lease_id: int, ttl: int, margin: float) -> None:
        """Renew the lease every ttl/4 until it is gone; return when leadership is lost. While renewals
        fail (an etcd member died, etcd is electing its own leader) the term runs out and this process
        stops acting (``is_leader`` is False); a renewal that succeeds while the lease still exists
        resumes it (nobody else can have been elected while the key existed)."""
        from aetcd import rpc

        failing = False
        compacted = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(0.1 if failing else ttl / 4)
            if self._abdicate:
                self._abdicate = False
                return
            if not failing and time.monotonic() - compacted > COMPACT_EVERY:
                compacted = time.monotonic()
                # beside the renewals, never in their way: a slow member must not cost the term
                task = asyncio.ensure_future(self._compact_quietly())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            sent = time.monotonic()
            try:
                client = await self._connect()

                async def renew(client: Any = client) -> Any:
                    async for reply in client.leasestub.LeaseKeepAlive(
                            iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=client._timeout):
                        return reply
                    return None

                reply = await asyncio.wait_for(renew(), max(1.0, ttl / 3))
                if reply is None or reply.TTL <= 0:
                    return  # the lease is gone: someone else may lead already
                self._valid_until = sent + reply.TTL - margin
                if failing:
                    logger.info("the metadata leader lease is renewed again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - try the next member while the term lasts
                if not failing:
                    logger.warning("renewing the metadata leader lease failed (%s); trying the next etcd member",
                                   str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
                failing = True
                await self._rotate()
            if time.monotonic() >= self._valid_until + ttl:  # surely expired at etcd by now
                return
