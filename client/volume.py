"""Volumes as block devices: byte ranges split by stripe unit and sent to all agents in parallel.

``AsyncVolume`` implements ``client.blockdev.BlockDevice``. It holds one ``Layout`` (fetched once from
the metadata service) and talks to agents directly. Failure handling, per piece of an I/O:

* ``STALE_LAYOUT`` (an agent fenced our generation): fetch the layout again and re-map the piece;
* a lost connection / unreachable agent: re-fetch endpoints (the agent may have restarted on another
  port), reconnect, retry with back-off, up to ``retries`` times;
* a data digest mismatch: retried the same way (and counted);
* anything else (out of range, I/O error on the drive): raised to the caller.

Every I/O call (read, write, write_zeroes, flush) has a time budget, ``ClientOptions.io_deadline``
(30 s unless set; ``timeout=`` per call): retries happen inside it, every wait (connecting, a full
window, back-off, re-fetching the layout, the agent's answer) ends with it, and when it runs out the
call fails with ``AgentTimeoutError`` (an ``UnavailableError`` and a ``TimeoutError``) naming the
agent. A hung agent therefore costs a caller at most the budget, never minutes.

Reads and writes are idempotent per piece, so a retry after a lost connection is safe: a write either
landed before or lands again with the same bytes. While the volume is being re-spread
(``layout.target``), each write lands on the current columns and then on the target columns (in that
order; see ``pool/migration.py`` for why the order matters).

Replicated volumes (the client's half of ``pool/replication.py``):

* A write holds a range lock (shared by every handle of the volume in this client) over its bytes, so
  no two overlapping writes are ever in flight and every replica applies them in the same order. It
  goes to every ``ok`` replica of each piece's column, then to every ``syncing`` one, and returns
  when all answered. A replica that fails (connection lost, no answer within
  ``replica_timeout``, ``BUSY``, ``IO_ERROR``) is reported to the metadata service, which takes it
  out of service (or says it is the column's last copy); the piece is then resent to the new
  layout's write set. The application sees a pause, never an error: about the service's
  ``agent_timeout`` for a dead or hung server (the service must know it has stopped serving before
  anyone writes without it; a write that waits on a hung server looks at the layout every 0.25 s
  and stops waiting once the replica is out), less for a server that acknowledges the fence.
* A read waits for this client's in-flight writes to the same bytes (so the writer's process never
  sees a new copy and then an old one), then goes to one ``ok`` replica (spread by stripe row over all
  of them). Another process reading while a write is in flight may see either copy's bytes until the
  write is acknowledged, as with a single disk during a write; after that, every read sees it. If that replica has not
  answered within the hedge delay (a few times the recent read latency), the same read goes to
  another replica into a scratch buffer and the first answer wins; the loser is abandoned before
  its bytes can reach the caller's buffer. A replica that fails is skipped at once.
* A process forked from the writer may read but not write a replicated volume (the range lock does
  not span processes).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Union

from nvpool.client.metaclient import MetaClient
from nvpool.client.metrics import COUNTERS
from nvpool.proto.transport import AgentConnection, connect
from nvpool.client.transport_shm import BOUNCE_ID, Region, ShmConnection, connect_shm
from nvpool.proto.layout import Layout
from nvpool.proto import dataplane as dp
from nvpool.proto.records import Endpoint
from nvpool.proto.tls import TlsFiles, from_env
from nvpool.proto.errors import (
    AgentTimeoutError,
    DigestError,
    LeaseError,
    NotFoundError,
    NvpoolError,
    RemoteError,
    StaleLayoutError,
    Status,
    UnavailableError,
    UsageError,
)

logger = logging.getLogger(__name__)

#: how often a writer of a replicated volume renews its lease while it writes (the write-intent cadence)
INTENT_INTERVAL = 1.0

Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class ClientOptions:
    #: "tcp", "shm" (one-sided, same host only) or "auto" (shm where the agent shares our host)
    transport: str = "auto"
    digests: bool = False
    #: bytes in flight per agent connection
    window: int = 4 * 1024 * 1024
    retries: int = 8
    connect_timeout: float = 5.0
    #: a command unanswered this long fails its connection over to a retry (cut link, hung agent)
    io_timeout: float = 30.0
    #: the longest one I/O call (read, write, write_zeroes, flush) takes end to end, retries included;
    #: then it fails with ``AgentTimeoutError`` (an ``UnavailableError``) naming the agent
    io_deadline: float = 30.0
    #: replicated volumes: a replica that has not answered a command this long is reported as failed
    replica_timeout: float = 3.0
    #: replicated volumes: hedge a read after max(this, 4 x the recent read latency) seconds (0: never)
    hedge_min: float = 0.005
    #: the pool's TLS material (proto/tls.py) for the metadata service and TLS agents;
    #: None: $NVPOOL_TLS if set, else plaintext
    tls: Optional[TlsFiles] = None

    def __post_init__(self) -> None:
        if not 0 < self.io_deadline < math.inf:
            raise UsageError(f"io_deadline must be a positive number of seconds, not {self.io_deadline!r}")


class Connections:
    """One connection per agent, opened on first use and re-opened after a failure.

    Transport per agent: "tcp"; "shm" (the agent's Unix socket with registered memory: same server
    only); "auto": shm where the agent's socket exists on this machine and accepts us, else TCP.
    """

    def __init__(self, options: ClientOptions) -> None:
        if options.transport not in ("auto", "tcp", "shm"):
            raise UsageError(f"unknown transport {options.transport!r} (auto, tcp, shm)")
        self.options = options
        self._conns: dict[str, AgentConnection] = {}  # keyed by the agent's TCP address
        self._opening: dict[str, asyncio.Task[AgentConnection]] = {}
        self._no_shm: set[str] = set()
        self.user_regions: list[Region] = []
        self._range_locks: dict[int, RangeLock] = {}
        self._tls = options.tls if options.tls is not None else from_env()
        self._ssl: Optional[ssl.SSLContext] = None

    def ssl_for(self, ep: Endpoint) -> Optional[ssl.SSLContext]:
        """The TLS context for an agent whose data plane is TLS (made once)."""
        if not ep.tls:
            return None
        if self._tls is None:
            raise UsageError(f"agent {ep.agent_id} serves its data plane over TLS: give this client the pool's "
                             "certificates ($NVPOOL_TLS or ClientOptions.tls)")
        if self._ssl is None:
            self._ssl = self._tls.client_context()
        return self._ssl

    def range_lock(self, volume_id: int) -> "RangeLock":
        """The in-flight write ranges of ``volume_id`` in this client (see ``AsyncVolume``)."""
        lock = self._range_locks.get(volume_id)
        if lock is None:
            lock = self._range_locks[volume_id] = RangeLock()
        return lock

    def peek(self, ep: Endpoint) -> Optional[AgentConnection]:
        """The open connection for ``ep``, if there is one (no await: the small-I/O fast path)."""
        conn = self._conns.get(ep.address)
        return conn if conn is not None and not conn.closed else None

    async def get(self, ep: Endpoint, deadline: float = math.inf) -> AgentConnection:
        conn = self._conns.get(ep.address)
        if conn is not None and not conn.closed:
            return conn
        task = self._opening.get(ep.address)
        if task is None:
            task = asyncio.ensure_future(self._open(ep))
            self._opening[ep.address] = task
            task.add_done_callback(lambda _t, a=ep.address: self._opening.pop(a, None))  # type: ignore[misc]
        if deadline == math.inf:
            return await asyncio.shield(task)
        try:  # the opening goes on for other callers; this one stops waiting at its deadline
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise AgentTimeoutError(f"agent {ep.address} did not accept a connection within the I/O's time budget",
                                    ep.address) from None

    def _wants_shm(self, ep: Endpoint) -> bool:
        t = self.options.transport
        if t == "shm":
            if not ep.unix_path:
                raise UsageError(f"agent {ep.agent_id} has no same-host socket for the shm transport")
            return True
        return t == "auto" and bool(ep.unix_path) and ep.address not in self._no_shm and os.path.exists(ep.unix_path)

    async def _open(self, ep: Endpoint) -> AgentConnection:
        conn: AgentConnection
        if self._wants_shm(ep):
            try:
                conn = await connect_shm(ep.unix_path, self.options.window, self.user_regions, self.options.connect_timeout,
                                         self.options.io_timeout, name=ep.address)
            except UnavailableError:
                if self.options.transport == "shm":
                    raise
                self._no_shm.add(ep.address)  # not on our server after all: TCP from now on
                conn = await connect(ep.address, self.options.window, self.options.connect_timeout, self.options.io_timeout,
                                     self.ssl_for(ep))
        else:
            conn = await connect(ep.address, self.options.window, self.options.connect_timeout, self.options.io_timeout,
                                 self.ssl_for(ep))
        self._conns[ep.address] = conn
        return conn

    def register(self, nbytes: int) -> Region:
        """Register memory with every same-host agent (open shm connections reconnect to include it)."""
        region = Region(BOUNCE_ID + 1 + len(self.user_regions), nbytes)
        self.user_regions.append(region)
        for addr, c in list(self._conns.items()):
            if isinstance(c, ShmConnection):
                c.close()
                del self._conns[addr]
        return region

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()


@dataclass(slots=True)
class _Range:
    offset: int  # volume offset
    length: int
    buf_offset: int  # into the caller's buffer


Sender = Callable[[AgentConnection, int, int, int, int, int, float], Awaitable[None]]
"""(conn, extent_id, extent_offset, length, generation, buf_offset, deadline) -> None"""


class RangeLock:
    """Byte ranges with a write in flight: a write waits until no in-flight write overlaps its range.
    Keeps overlapping writes to a replicated volume in one order on every replica."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, "asyncio.Future[None]"]] = []

    async def acquire(self, start: int, end: int, deadline: float) -> "asyncio.Future[None]":
        while True:
            busy = [f for s, e, f in self._held if s < end and start < e]
            if not busy:
                break
            try:
                await asyncio.wait_for(asyncio.shield(busy[0]), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AgentTimeoutError("a write to an overlapping range did not finish within the I/O's time "
                                        "budget") from None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.append((start, end, fut))
        return fut

    async def wait_clear(self, start: int, end: int, deadline: float) -> None:
        """Wait until no write overlapping ``[start, end)`` is in flight (without holding anything):
        a read of a replicated volume in the writer's own client never sees one copy's new bytes and
        then the other's old ones while a write is under way."""
        while True:
            busy = [f for s, e, f in self._held if s < end and start < e]
            if not busy:
                return
            try:
                await asyncio.wait_for(asyncio.shield(busy[0]), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AgentTimeoutError("a write to an overlapping range did not finish within the read's time "
                                        "budget") from None

    def release(self, fut: "asyncio.Future[None]") -> None:
        self._held = [h for h in self._held if h[2] is not fut]
        if not fut.done():
            fut.set_result(None)


#: leases this process took and has not returned, by lease id (``return_leases_at_exit``)
_HELD: "dict[str, Lease]" = {}
_HELD_LOCK = threading.Lock()


def return_leases_at_exit() -> int:
    """Give back every lease this process took and did not return (``atexit``): a script that writes and
    exits without ``close()`` does not leave its volume locked for the lease's term. A forked child
    returns none of its parent's. Each is returned through gRPC's synchronous stack (the program's event
    loops may be gone), with a short deadline; one that cannot be returned expires by itself. A writer
    with writes still in flight returns its lease as unsettled (the copies are resynced, as after a
    crash). Returns how many were returned."""
    with _HELD_LOCK:
        leases = [lease for lease in _HELD.values() if lease.pid == os.getpid() and lease.owner and not lease.closed]
        _HELD.clear()
    done = 0
    for lease in leases:
        lease.closed = True
        if lease.meta.close_volume_sync(lease.lease_id, lease.write and (lease.unsettled or bool(lease._in_flight))):
            done += 1
    return done


atexit.register(return_leases_at_exit)


class Lease:
    """A volume lease held by one pool (client), shared by all its handles of that volume in that mode:
    the writer lease is exclusive per *client*, as RBD's exclusive lock is per librbd client, so one
    program may open its volume many times. Renewed every third of its term by a timer on the loop
    (no task lingers between renewals); returned when the last handle closes. ``fenced`` says why the
    holder may no longer write (taken over, or expired), once the metadata service has said so."""

    def __init__(self, meta: MetaClient, name: str, lease_id: str, ttl: float, write: bool,
                 on_closed: Optional[Callable[["Lease"], None]] = None) -> None:
        self.meta, self.name, self.lease_id, self.ttl, self.write = meta, name, lease_id, ttl, write
        self.fenced: Optional[str] = None
        #: the capability agents check (proto/capability.py); refreshed with every renewal and layout
        self.cap = b""
        self.refs = 0
        self.closed = False
        #: False for a lease inherited from a forked parent: the parent returns it, never the child
        self.owner = True
        self._on_closed = on_closed
        self._timer: Optional[asyncio.TimerHandle] = None
        self._task: "Optional[asyncio.Task[None]]" = None
        #: write intent (``pool/replication.py``, "Write intent"): the last epoch the service announced,
        #: and how many replicated writes are in flight per epoch known when each started
        self.intent_epoch = 0
        self._in_flight: dict[int, int] = {}
        #: a replicated write was given up on: its copies may differ until the service resyncs them, so
        #: this writer claims nothing settled any more and its close counts as unclean
        self.unsettled = False
        self._wrote = False
        #: the process that took it (only that one returns it at exit)
        self.pid = os.getpid()

    def start(self) -> None:
        if self.owner and not self.closed and self.pid == os.getpid():
            with _HELD_LOCK:
                _HELD[self.lease_id] = self
        if self.ttl > 0 and self._timer is None and not self.closed:
            # while replicated writes go on, every INTENT_INTERVAL: each renewal lets the agents forget
            # the write intent of what has settled since the one before
            every = min(self.ttl / 3, INTENT_INTERVAL) if self._wrote else self.ttl / 3
            self._wrote = False
            self._timer = asyncio.get_running_loop().call_later(every, self._tick)

    def write_started(self) -> int:
        """A replicated write begins; returns its token for ``write_done``."""
        e = self.intent_epoch
        self._in_flight[e] = self._in_flight.get(e, 0) + 1
        if not self._wrote:
            self._wrote = True
            t = self._timer
            if t is not None and t.when() - asyncio.get_running_loop().time() > INTENT_INTERVAL:
                t.cancel()
                self._timer = None
                self.start()
        return e

    def write_done(self, token: int, ok: bool) -> None:
        """A replicated write ended: on every copy of its write set (``ok``), or given up on."""
        if not ok:
            self.unsettled = True
        n = self._in_flight.get(token, 0) - 1
        if n > 0:
            self._in_flight[token] = n
        else:
            self._in_flight.pop(token, None)

    def settled_claim(self) -> int:
        """The epoch whose earlier writes this writer knows complete on every copy (0: no claim)."""
        e = self.intent_epoch
        if self.unsettled or not e or any(k < e for k in self._in_flight):
            return 0
        return e

    def _tick(self) -> None:
        self._timer = None
        if not self.closed and self.fenced is None:
            self._task = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        try:
            # (a lease inherited from a forked parent claims nothing: the parent's writes are not its own)
            claim = self.settled_claim() if self.write and self.owner else 0
            _, cap, epoch = await self.meta.renew_lease(self.lease_id, claim)
            if cap:
                self.cap = cap
            self.intent_epoch = max(self.intent_epoch, epoch)
        except LeaseError as exc:
            self.fence(str(exc))
        except NvpoolError as exc:  # metadata service unreachable: agents' fences keep us safe meanwhile
            if not self.closed:  # (returned meanwhile, at exit too: nothing to say)
                logger.warning("volume %s: cannot renew the lease: %s", self.name, exc)
        finally:
            self._task = None
            self.start()

    def fence(self, why: str) -> None:
        if self.fenced is None and self.write:
            logger.error("volume %s: this writer was fenced: %s", self.name, why)
        self.fenced = why

    async def release(self) -> None:
        """One handle closed; the last one returns the lease."""
        self.refs -= 1
        if self.refs <= 0:
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        if self._on_closed is not None:
            self._on_closed(self)
        with _HELD_LOCK:
            _HELD.pop(self.lease_id, None)
        if not self.owner:
            return
        try:
            await self.meta.close_volume(self.lease_id, unsettled=self.write and (self.unsettled or bool(self._in_flight)))
        except NvpoolError as exc:  # it expires on its own
            logger.info("volume %s: could not return the lease (%s); it expires by itself", self.name, exc)


class AsyncVolume:
    def __init__(
        self,
        meta: MetaClient,
        connections: Connections,
        layout: Layout,
        endpoints: dict[str, Endpoint],
        read_only: bool = False,
        options: Optional[ClientOptions] = None,
        lease: Optional[Lease] = None,
    ) -> None:
        self.meta = meta
        #: the lease this handle holds a reference to (see pool/meta.py, "Writer leases")
        self.lease = lease
        if lease is not None:
            lease.refs += 1
        self.connections = connections
        self.layout = layout
        self.endpoints = endpoints
        self._read_only = read_only
        self.options = options or ClientOptions()
        self._refresh_lock = asyncio.Lock()
        self._closed = False
        self._started: dict[int, tuple[AgentConnection, int, memoryview]] = {}
        self.stats = {"stale_refetches": 0, "retries": 0, "digest_errors": 0, "hedged_reads": 0,
                      "hedge_wins": 0, "replica_failures": 0}
        #: this client's writes in flight on the volume, shared by all its handles of it (write and
        #: read-only): writes never overlap in flight, reads wait for overlapping writes (replicated)
        self._ranges = connections.range_lock(layout.volume_id)
        COUNTERS.volumes.add(self)
        #: recent read latency (seconds, moving average): sets the hedge delay
        self._read_latency = 0.002
        self._hedges = 0
        self._polled = 0.0

    # ------------------------------------------------------------------ BlockDevice
    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def closed(self) -> bool:
        return self._closed

    async def readinto(self, buf: memoryview, offset: int, *, timeout: Optional[float] = None) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``; ``timeout``: this call's time budget
        (default ``options.io_deadline``)."""
        t0, failed = time.perf_counter(), True
        try:
            view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
            if view.readonly:
                raise UsageError("readinto needs a writable buffer")
            deadline = time.monotonic() + (self.options.io_deadline if timeout is None else timeout)
            errors = await self._one_piece(dp.READ, offset, view, deadline)
            if errors is not None:
                await self._readinto(view, offset, timeout, deadline, errors)
            failed = False
        finally:
            COUNTERS.record("read", memoryview(buf).nbytes, time.perf_counter() - t0, failed)

    async def _one_piece(self, opcode: int, offset: int, view: memoryview, deadline: float,
                         fua: bool = False) -> Optional[list[BaseException]]:
        """The small-I/O fast path: when ``[offset, offset+len(view))`` is one piece of an unreplicated
        layout on an agent we are connected to, post it at once (no gather, no closures) and wait for
        it. None: done. Otherwise the errors of the attempt ([] when there was none) for the general
        path (``_run``), which maps, retries and reports within the same ``deadline``."""
        lay = self.layout
        if self._closed or lay.mirrors or self.options.digests:
            return []
        write = opcode == dp.WRITE
        p = lay.single_piece(offset, len(view), write)
        if p is None:
            return []
        conn = self._peek(self.endpoints.get(p.extent.drive_id))
        if conn is None:
            return []
        n = len(view)
        try:
            if conn.posts_directly:
                if write:
                    fut = conn.start(dp.WRITE, p.extent.extent_id, p.extent_offset, n, lay.generation, None, view,
                                     dp.FUA if fua else 0, deadline)
                else:
                    fut = conn.start(dp.READ, p.extent.extent_id, p.extent_offset, n, lay.generation, view, None, 0,
                                     deadline)
                if fut is None:
                    return []  # the window is full or the socket congested: the general path waits for room
                try:
                    comp = await fut
                except asyncio.CancelledError:
                    conn.abandon(fut)
                    raise
                conn.check(comp, opcode, n, None if write else view)
            else:  # the same-host transport places the data itself (registered memory or its bounce region)
                await conn.submit(opcode, p.extent.extent_id, p.extent_offset, n, lay.generation,
                                  payload=view if write else None, dest=None if write else view,
                                  flags=dp.FUA if fua else 0, deadline=deadline)
            return None
        except DigestError as exc:
            self.stats["digest_errors"] += 1
            return [exc]
        except (StaleLayoutError, UnavailableError) as exc:
            return [exc]
        except RemoteError as exc:
            if exc.status not in (Status.NO_EXTENT, Status.DENIED):
                raise
            return [exc]

    async def _readinto(self, buf: memoryview, offset: int, timeout: Optional[float], deadline: float,
                        errors: list[BaseException]) -> None:
        flags = dp.HDGST | dp.DDGST if self.options.digests else 0

        async def send(conn: AgentConnection, ext: int, eoff: int, n: int, gen: int, boff: int, dl: float) -> None:
            await conn.submit(dp.READ, ext, eoff, n, gen, dest=buf[boff : boff + n], flags=flags, deadline=dl)

        if self.layout.replicas > 1:
            await self._run_replicated(offset, len(buf), None, buf, flags, timeout)
            return
        await self._run(offset, len(buf), send, target=False, timeout=timeout, deadline=deadline, errors=errors)

    async def readv(self, requests: "list[tuple[int, memoryview]]", *, timeout: Optional[float] = None) -> None:
        """Read many ``(offset, buffer)`` pairs, all in flight together (a batch of samples)."""
        await asyncio.gather(*(self.readinto(buf, off, timeout=timeout) for off, buf in requests))

    def start_read(self, buf: memoryview, offset: int) -> "Optional[asyncio.Future[Any]]":
        """Callback-style read for front ends (the NBD export): if ``buf`` maps to one piece on a
        connected agent, post it now and return its completion future (check it with
        ``finish_read``); otherwise None, and the caller uses ``readinto``, which handles everything."""
        lay = self.layout
        n = len(buf)
        p = lay.single_piece(offset, n, write=False)
        if p is None:
            return None
        ep = self.endpoints.get(p.extent.drive_id)
        conn = self._peek(ep)
        if conn is None or self.options.digests:
            return None
        fut = conn.start(dp.READ, p.extent.extent_id, p.extent_offset, n, lay.generation, buf)
        if fut is None:
            return None
        self._started[id(fut)] = (conn, n, buf)
        return fut

    def finish_read(self, fut: "asyncio.Future[Any]") -> None:
        """Raise what a ``start_read`` completion carries (the caller then retries with readinto)."""
        conn, n, buf = self._started.pop(id(fut))
        conn.check(fut.result(), dp.READ, n, buf)

    async def read(self, offset: int, length: int, *, timeout: Optional[float] = None) -> bytearray:
        out = bytearray(length)
        await self.readinto(memoryview(out), offset, timeout=timeout)
        return out

    async def write(self, offset: int, data: Buffer, fua: bool = False, *, timeout: Optional[float] = None) -> None:
        t0, failed = time.perf_counter(), True
        try:
            self._check_writable()
            view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
            deadline = time.monotonic() + (self.options.io_deadline if timeout is None else timeout)
            errors = await self._one_piece(dp.WRITE, offset, view, deadline, fua)
            if errors is not None:
                await self._write(offset, view, fua, timeout, deadline, errors)
            failed = False
        finally:
            COUNTERS.record("write", memoryview(data).nbytes, time.perf_counter() - t0, failed)

    async def _write(self, offset: int, view: memoryview, fua: bool, timeout: Optional[float], deadline: float,
                     errors: list[BaseException]) -> None:
        self._check_writable()  # (again: a failed fast attempt may have learnt that the lease is gone)
        flags = (dp.HDGST | dp.DDGST if self.options.digests else 0) | (dp.FUA if fua else 0)

        async def send(conn: AgentConnection, ext: int, eoff: int, n: int, gen: int, boff: int, dl: float) -> None:
            await conn.submit(dp.WRITE, ext, eoff, n, gen, payload=view[boff : boff + n], flags=flags, deadline=dl)

        if self.layout.replicas > 1:
            await self._run_replicated(offset, len(view), send, None, 0, timeout)
            return
        await self._run(offset, len(view), send, target=True, timeout=timeout, deadline=deadline, errors=errors)

    async def write_zeroes(self, offset: int, length: int, *, timeout: Optional[float] = None) -> None:
        self._check_writable()

        async def send(conn: AgentConnection, ext: int, eoff: int, n: int, gen: int, boff: int, dl: float) -> None:
            await conn.submit(dp.Opcode.WRITE_ZEROES, ext, eoff, n, gen, deadline=dl)

        if self.layout.replicas > 1:
            await self._run_replicated(offset, length, send, None, 0, timeout)
            return
        await self._run(offset, length, send, target=True, timeout=timeout)

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length)

    async def flush(self, *, timeout: Optional[float] = None) -> None:
        """Make every completed write durable: FLUSH on every extent of the layout (in parallel)."""
        budget = self.options.io_deadline if timeout is None else timeout
        deadline = time.monotonic() + budget

        async def one(ep: Endpoint, ext: int, gen: int) -> None:
            conn = await self._conn(ep, deadline)
            await conn.submit(dp.Opcode.FLUSH, ext, 0, 0, gen, deadline=deadline)

        for attempt in range(self.options.retries + 1):
            lay = self.layout
            live = _live_extents(lay)
            try:
                if lay.replicas == 1:
                    await asyncio.gather(*(one(self._endpoint(e.drive_id), e.extent_id, lay.generation) for e in live))
                    return
                results = await asyncio.gather(
                    *(one(self._endpoint(e.drive_id), e.extent_id, lay.generation) for e in live), return_exceptions=True)
                bad = [(e, r) for e, r in zip(live, results) if isinstance(r, BaseException)]
                if not bad:
                    return
                stale = [r for _, r in bad if isinstance(r, StaleLayoutError)]
                if stale:
                    raise stale[0]
                denied = [r for _, r in bad if isinstance(r, RemoteError) and r.status == Status.DENIED]
                if denied:
                    raise denied[0]
                for e, r in bad:
                    if not isinstance(r, (UnavailableError, RemoteError)):
                        raise r
                    await self._report(lay, e.extent_id, r, deadline)
                continue
            except (StaleLayoutError, UnavailableError, RemoteError) as exc:
                if isinstance(exc, RemoteError) and not isinstance(exc, StaleLayoutError) and exc.status != Status.DENIED:
                    raise
                if time.monotonic() >= deadline:
                    raise self._out_of_time("flush", budget, [exc]) from exc
                if attempt == self.options.retries:
                    raise
                await self._recover(exc, attempt, deadline)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.lease is not None:
            await self.lease.release()

    # ------------------------------------------------------------------ lease
    @property
    def fenced(self) -> Optional[str]:
        return self.lease.fenced if self.lease is not None else None

    @property
    def writable(self) -> bool:
        return not self._read_only and self.fenced is None

    def _fence(self, why: str) -> None:
        if self.lease is not None:
            self.lease.fence(why)

    def _check_writable(self) -> None:
        if self._read_only:
            raise UsageError(f"volume {self.name!r} is open read-only")
        if self.fenced is not None:
            raise LeaseError(f"volume {self.name!r} may no longer be written by this process: {self.fenced}")

    async def _conn(self, ep: Endpoint, deadline: float = math.inf) -> AgentConnection:
        """The connection to ``ep``'s agent, with this volume's capability presented on it."""
        conn = await self.connections.get(ep, deadline)
        if self.lease is not None and self.lease.cap:
            conn.authorize(self.layout.volume_id, self.lease.cap, self.lease.write)
        return conn

    def _peek(self, ep: Optional[Endpoint]) -> Optional[AgentConnection]:
        """An open connection to ``ep``'s agent, if there is one (fast paths), capability presented."""
        conn = self.connections.peek(ep) if ep is not None else None
        if conn is not None and self.lease is not None and self.lease.cap:
            conn.authorize(self.layout.volume_id, self.lease.cap, self.lease.write)
        return conn

    def _endpoint(self, drive_id: str) -> Endpoint:
        ep = self.endpoints.get(drive_id)
        if ep is None:
            raise UnavailableError(f"no agent currently holds drive {drive_id}")
        return ep

    async def refresh(self, min_generation: int = 0) -> None:
        """Fetch the layout and endpoints again (once, however many callers ask at the same time)."""
        seen = self.layout.generation
        async with self._refresh_lock:
            if self.layout.generation > seen and self.layout.generation >= min_generation:
                return  # someone else refreshed while we waited
            try:
                usable = self.lease is not None and (self._read_only or self.writable)
                lease = self.lease.lease_id if self.lease is not None and usable else ""
                layout, endpoints, cap = await self.meta.get_layout_cap(volume_id=self.layout.volume_id,
                                                                        lease_id=lease)
                if cap and self.lease is not None:
                    self.lease.cap = cap
            except LeaseError as exc:
                # our writer lease is gone: never write again; reads may go on with the current layout
                self._fence(str(exc))
                layout, endpoints = await self.meta.get_layout(volume_id=self.layout.volume_id)
            if layout.generation < self.layout.generation:
                logger.warning("metadata service returned an older layout (%d < %d)", layout.generation, self.layout.generation)
            layout.validate()
            self.layout, self.endpoints = layout, endpoints

    async def _refresh_within(self, deadline: float, min_generation: int = 0) -> None:
        try:
            await asyncio.wait_for(self.refresh(min_generation), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise UnavailableError(f"volume {self.name!r}: the metadata service did not return the layout within "
                                   "the I/O's time budget") from None

    def _out_of_time(self, what: str, budget: float, errors: list[BaseException]) -> AgentTimeoutError:
        """The error for an I/O whose budget ran out: it names the agent that did not answer."""
        cause = next((e for e in errors if isinstance(e, AgentTimeoutError)), errors[0] if errors else None)
        address = cause.address if isinstance(cause, AgentTimeoutError) else ""
        return AgentTimeoutError(f"volume {self.name!r}: {what} did not complete within {budget:g}s: {cause}", address)

    async def _recover(self, exc: Exception, attempt: int, deadline: float) -> None:
        if isinstance(exc, StaleLayoutError):
            # agents fence a generation before the metadata service publishes it (a migration's
            # cut-over, a writer takeover): wait for it within the I/O's time budget, not a count
            self.stats["stale_refetches"] += 1
            await self._refresh_within(deadline, exc.info)
            if self.layout.generation < exc.info:
                await asyncio.sleep(max(0.0, min(0.005 * (2 ** min(attempt, 5)), deadline - time.monotonic())))
            return
        if isinstance(exc, DigestError):
            self.stats["digest_errors"] += 1
        self.stats["retries"] += 1
        logger.info("retrying after: %s", exc)
        await asyncio.sleep(max(0.0, min(0.05 * (2**attempt), 2.0, deadline - time.monotonic())))
        try:
            await self._refresh_within(deadline)
        except NvpoolError as meta_exc:  # metadata service down: keep the layout we have
            logger.info("cannot refresh layout (%s); retrying with the one we have", meta_exc)

    async def _run(self, offset: int, length: int, send: Sender, target: bool, timeout: Optional[float] = None,
                   deadline: Optional[float] = None, errors: Optional[list[BaseException]] = None) -> None:
        """Map [offset, offset+length) onto the layout, send every piece, retry failed pieces, all
        within the time budget (``timeout`` or ``options.io_deadline``, ending at ``deadline`` when
        the caller started the clock). ``errors``: what a fast attempt of the caller's
        (``_one_piece``) already met; given, this skips its own."""
        if self._closed:
            raise UsageError("volume is closed")
        lay = self.layout
        lay.check_range(offset, length)
        if length == 0:
            return
        budget = self.options.io_deadline if timeout is None else timeout
        if deadline is None:
            deadline = time.monotonic() + budget
        p = lay.single_piece(offset, length, target) if errors is None else None
        errors = [] if errors is None else list(errors)
        if p is not None:
            # fast path: one piece on one agent, no gather; any trouble takes the general path below
            ep = self.endpoints.get(p.extent.drive_id)
            conn = self._peek(ep)
            if conn is not None:
                try:
                    await send(conn, p.extent.extent_id, p.extent_offset, length, lay.generation, 0, deadline)
                    return
                except DigestError as exc:
                    self.stats["digest_errors"] += 1
                    errors.append(exc)
                except (StaleLayoutError, UnavailableError) as exc:
                    errors.append(exc)
                except RemoteError as exc:
                    if exc.status not in (Status.NO_EXTENT, Status.DENIED):
                        raise
                    errors.append(exc)
        todo = [_Range(offset, length, 0)]
        attempt = 0
        history: list[BaseException] = []  # earlier rounds' errors: the agent that hung may be named there
        while todo:
            if time.monotonic() >= deadline:
                raise self._out_of_time(f"I/O of {length} bytes at {offset}", budget, errors + history)
            history.extend(errors)
            lay = self.layout
            failed: list[_Range] = []
            errors = []

            async def piece(
                r: _Range, lay: Layout = lay, failed: list[_Range] = failed, errors: list[BaseException] = errors
            ) -> None:
                try:
                    await self._send_range(lay, r, send, deadline)
                    if target and lay.target is not None:
                        await self._send_range(lay.target, r, send, deadline, generation=lay.generation)
                except (StaleLayoutError, UnavailableError, DigestError) as exc:
                    failed.append(r)
                    errors.append(exc)
                except RemoteError as exc:
                    if exc.status in (Status.NO_EXTENT, Status.DENIED):  # DENIED: a new capability helps
                        failed.append(r)
                        errors.append(exc)
                    else:
                        raise

            await asyncio.gather(*(piece(r) for r in _split(lay, todo)))
            if not failed:
                return
            if time.monotonic() >= deadline:
                raise self._out_of_time(f"I/O of {length} bytes at {offset}", budget, errors + history) from errors[0]
            stale = [e for e in errors if isinstance(e, StaleLayoutError)]
            if attempt >= self.options.retries and len(stale) < len(errors):
                raise errors[0]  # (stale layouts are waited out within the budget, however many)
            first = stale[0] if stale else errors[0]
            assert isinstance(first, Exception)
            if isinstance(first, RemoteError) and first.status == Status.NO_EXTENT:
                # the extent was released: fine if the layout moved on (a migration finished), else a
                # real error (the volume was deleted, or the agent lost it)
                gen = self.layout.generation
                try:
                    await self._refresh_within(deadline)
                except NotFoundError:
                    raise first from None
                if self.layout.generation == gen:
                    raise first
            else:
                await self._recover(first, attempt, deadline)
            if target:
                self._check_writable()  # a re-fetch may have told us our writer lease is gone
            attempt += 1
            todo = failed

    # ------------------------------------------------------------------ replicated volumes
    async def _report(self, lay: Layout, extent_id: int, exc: BaseException, deadline: float) -> None:
        """Report a failed replica (``pool/replication.py`` step 1) and adopt the layout the service
        returns; without the service, re-fetch what we can and retry."""
        self.stats["replica_failures"] += 1
        if isinstance(exc, RemoteError):
            reason = {Status.IO_ERROR: "io", Status.BUSY: "busy"}.get(exc.status, "unavailable")
        else:
            reason = "timeout" if isinstance(exc, TimeoutError) else "unavailable"
        logger.warning("volume %s: replica extent %d failed (%s): %s", self.name, extent_id, reason, exc)
        left = deadline - time.monotonic()
        if left <= 0:
            return
        drive = next((e.drive_id for e in lay.extents() if e.extent_id == extent_id), "")
        ep = self.endpoints.get(drive)
        try:
            layout, endpoints = await self.meta.report_replica_failure(
                lay.volume_id, lay.generation, extent_id, reason, timeout=max(0.1, left),
                address=ep.address if ep is not None else "", lease_id=self.lease.lease_id if self.lease else "")
        except NvpoolError as meta_exc:
            logger.info("cannot report the failed replica (%s); retrying", meta_exc)
            await asyncio.sleep(max(0.0, min(0.2, deadline - time.monotonic())))
            return
        layout.validate()
        if layout.generation >= self.layout.generation:
            self.layout, self.endpoints = layout, endpoints

    async def _write_copies(self, lay: Layout, r: _Range, send: Sender, deadline: float,
                            failed: list[tuple[int, BaseException]], generation: int = 0) -> bool:
        """Write range ``r`` to every replica of the write set: the first ``ok`` one, then the other
        ``ok`` ones, then ``syncing`` ones (and, while the volume moves, then every replica of the
        target: ``pool/migration.py``). Returns False (with ``failed`` filled) unless every replica
        answered OK. The first ``ok`` copy is written first so that no other copy ever holds a write it
        lacks: after a writer dies, its resync copies from that one, so what any reader saw of an
        unfinished write is rolled forward, never back (``pool/replication.py``, step 8)."""
        gen = generation or lay.generation
        for p in lay.map(r.offset, r.length):
            ok, syncing = lay.write_set(p.column)
            if not ok:
                raise UnavailableError(f"volume {self.name!r}: column {p.column} has no replica in service")
            for phase in (ok[:1], ok[1:], syncing):
                if not phase:
                    continue
                jobs = []
                for k in phase:
                    ext, eoff = p.copies[k]
                    jobs.append((ext, self._copy_write(ext, eoff, p.length, r.buf_offset + p.buf_offset, gen, send,
                                                       deadline)))
                results = await asyncio.gather(*(j for _, j in jobs), return_exceptions=True)
                for (ext, _), res in zip(jobs, results):
                    if isinstance(res, BaseException):
                        if isinstance(res, (UnavailableError, RemoteError)) or isinstance(res, TimeoutError):
                            failed.append((ext.extent_id, res))
                        else:
                            raise res
                if failed:
                    return False
        if lay.target is not None:
            return await self._write_copies(lay.target, r, send, deadline, failed, gen)
        return True

    async def _copy_write(self, ext: Any, eoff: int, n: int, boff: int, gen: int, send: Sender, deadline: float) -> None:
        work = asyncio.ensure_future(self._copy_write_now(ext, eoff, n, boff, gen, send, deadline))
        await self._replica_wait(work, ext.extent_id, gen, deadline)

    async def _replica_wait(self, work: "asyncio.Future[None]", extent_id: int, gen: int, deadline: float) -> None:
        """Wait for a write to one replica. While it is slow (a hung server), look at the layout now
        and then: once the metadata service has taken that replica out (its agent fell silent), stop
        waiting, so the pause is about the service's ``agent_timeout``, not ``replica_timeout``. The
        abandoned command can never land: the silent agent serves nothing past its serve lease."""
        wait = 0.5
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=wait)
                if done:
                    return work.result()
                wait = 0.25
                if time.monotonic() - self._polled > 0.2:
                    self._polled = time.monotonic()
                    try:
                        await self._refresh_within(min(deadline, time.monotonic() + 1.0))
                    except NvpoolError:
                        continue
                lay = self.layout
                if lay.generation > gen and extent_id not in {e.extent_id for e in _live_extents(lay)}:
                    raise UnavailableError(f"replica extent {extent_id} was taken out of service while it hung")
        finally:
            if not work.done():
                work.cancel()

    async def _copy_write_now(self, ext: Any, eoff: int, n: int, boff: int, gen: int, send: Sender,
                              deadline: float) -> None:
        dl = min(deadline, time.monotonic() + self.options.replica_timeout)
        conn = await self._conn(self._endpoint(ext.drive_id), dl)
        off = 0
        while off < n:
            k = min(n - off, dp.MAX_IO)
            await send(conn, ext.extent_id, eoff + off, k, gen, boff + off, dl)
            off += k

    async def _read_copies(self, lay: Layout, r: _Range, buf: memoryview, flags: int, deadline: float,
                           failed: list[tuple[int, BaseException]]) -> bool:
        """Read range ``r`` from the preferred ``ok`` replica of each piece, hedged, failing over."""
        for p in lay.map(r.offset, r.length):
            readable = lay.readable(p.column)
            if not readable:
                raise UnavailableError(f"volume {self.name!r}: column {p.column} has no replica in service")
            first = next((k for k in readable if p.copies[k][0] == p.extent), readable[0])
            order = [first] + [k for k in readable if k != first]
            dest = buf[r.buf_offset + p.buf_offset : r.buf_offset + p.buf_offset + p.length]
            if not await self._read_piece(lay, p.copies, order, dest, flags, deadline, failed):
                return False
        return True

    async def _read_one(self, ext: Any, eoff: int, dest: memoryview, gen: int, flags: int, deadline: float) -> None:
        dl = min(deadline, time.monotonic() + self.options.replica_timeout)
        conn = await self._conn(self._endpoint(ext.drive_id), dl)
        off, n = 0, len(dest)
        while off < n:
            k = min(n - off, dp.MAX_IO)
            await conn.submit(dp.READ, ext.extent_id, eoff + off, k, gen, dest=dest[off : off + k], flags=flags,
                              deadline=dl)
            off += k

    async def _read_piece(self, lay: Layout, copies: tuple[tuple[Any, int], ...], order: list[int], dest: memoryview,
                          flags: int, deadline: float, failed: list[tuple[int, BaseException]]) -> bool:
        gen = lay.generation
        t0 = time.monotonic()
        for n_try, k in enumerate(order):
            ext, eoff = copies[k]
            primary = asyncio.ensure_future(self._read_one(ext, eoff, dest, gen, flags, deadline))
            others = order[n_try + 1 :]
            hedge_after = max(self.options.hedge_min, 4 * self._read_latency)
            ep = self.endpoints.get(ext.drive_id)
            conn = self._peek(ep)
            can_hedge = (self.options.hedge_min > 0 and others and self._hedges < 8
                         and (conn is None or not isinstance(conn, ShmConnection)))
            if can_hedge:
                done, _ = await asyncio.wait({primary}, timeout=hedge_after)
                if not done:
                    # the primary is slow: the same read from another replica, into scratch space
                    self.stats["hedged_reads"] += 1
                    self._hedges += 1
                    h_ext, h_off = copies[others[0]]
                    scratch = memoryview(bytearray(len(dest)))
                    hedge = asyncio.ensure_future(self._read_one(h_ext, h_off, scratch, gen, flags, deadline))
                    try:
                        await asyncio.wait({primary, hedge}, return_when=asyncio.FIRST_COMPLETED)
                        if hedge.done() and not hedge.exception() and not (primary.done() and not primary.exception()):
                            primary.cancel()  # abandoned: its bytes never reach dest (AgentConnection.abandon)
                            try:
                                await primary
                            except BaseException:  # noqa: BLE001 - cancelled or failed: either way not used
                                pass
                            dest[:] = scratch
                            self.stats["hedge_wins"] += 1
                            self._read_latency = 0.9 * self._read_latency + 0.1 * (time.monotonic() - t0)
                            return True
                        if not primary.done():
                            hedge.cancel()
                            await asyncio.wait({primary})
                        else:
                            hedge.cancel()
                    finally:
                        self._hedges -= 1
            try:
                await primary
            except (UnavailableError, RemoteError, TimeoutError) as exc:
                if isinstance(exc, StaleLayoutError):
                    failed.append((ext.extent_id, exc))
                    return False
                failed.append((ext.extent_id, exc))
                continue  # the next replica
            self._read_latency = 0.9 * self._read_latency + 0.1 * (time.monotonic() - t0)
            return True
        return False

    async def _run_replicated(self, offset: int, length: int, send: Optional[Sender], buf: Optional[memoryview],
                              flags: int, timeout: Optional[float]) -> None:
        """Reads (``buf``) or writes (``send``) of a replicated volume; see the module docstring."""
        if self._closed:
            raise UsageError("volume is closed")
        self.layout.check_range(offset, length)
        if length == 0:
            return
        budget = self.options.io_deadline if timeout is None else timeout
        deadline = time.monotonic() + budget
        hold = None
        token: Optional[int] = None
        done = False
        if send is not None:
            if self.lease is not None and not self.lease.owner:
                raise UsageError(f"volume {self.name!r} is replicated: a forked process cannot write it through its "
                                 "parent's handle (open it in this process)")
            hold = await self._ranges.acquire(offset, offset + length, deadline)
            if self.lease is not None:  # counted until it is on every copy, or given up on
                token = self.lease.write_started()
        else:
            await self._ranges.wait_clear(offset, offset + length, deadline)
        try:
            todo = [_Range(offset, length, 0)]
            history: list[BaseException] = []
            reported: set[tuple[int, int]] = set()
            attempt_denied = 0
            while todo:
                lay = self.layout
                failed_ranges: list[_Range] = []
                failures: list[tuple[int, BaseException]] = []

                async def piece(r: _Range, lay: Layout = lay, fr: list[_Range] = failed_ranges,
                                fl: list[tuple[int, BaseException]] = failures) -> None:
                    mine: list[tuple[int, BaseException]] = []
                    if send is not None:
                        ok = await self._write_copies(lay, r, send, deadline, mine)
                    else:
                        assert buf is not None
                        ok = await self._read_copies(lay, r, buf, flags, deadline, mine)
                    if not ok:
                        fr.append(r)
                        fl.extend(mine)

                await asyncio.gather(*(piece(r) for r in _split(lay, todo)))
                if not failed_ranges:
                    done = True
                    return
                history.extend(e for _, e in failures)
                if time.monotonic() >= deadline:
                    raise self._out_of_time(f"I/O of {length} bytes at {offset}", budget, history)
                stale = [e for _, e in failures if isinstance(e, StaleLayoutError)]
                denied = [e for _, e in failures if isinstance(e, RemoteError) and e.status == Status.DENIED]
                if stale or denied:  # a newer layout, or a new capability for it
                    self.stats["stale_refetches"] += 1
                    if denied and not stale:
                        if attempt_denied >= self.options.retries:
                            raise denied[0]
                        attempt_denied += 1
                    await self._refresh_within(deadline, stale[0].info if stale else 0)
                else:
                    hard = [e for _, e in failures if isinstance(e, RemoteError)
                            and e.status not in (Status.BUSY, Status.IO_ERROR, Status.DIGEST, Status.NO_EXTENT)]
                    if hard:
                        raise hard[0]
                    live = {e.extent_id for e in _live_extents(self.layout)}
                    for eid, exc in failures:
                        if (eid, lay.generation) in reported or eid not in live:
                            continue
                        reported.add((eid, lay.generation))
                        await self._report(lay, eid, exc, deadline)
                    if self.layout.generation == lay.generation:
                        await asyncio.sleep(max(0.0, min(0.05, deadline - time.monotonic())))
                        try:
                            await self._refresh_within(deadline)
                        except NvpoolError as meta_exc:
                            logger.info("cannot refresh layout (%s); retrying with the one we have", meta_exc)
                if send is not None:
                    self._check_writable()
                todo = failed_ranges
        finally:
            if token is not None and self.lease is not None:
                self.lease.write_done(token, done)
            if hold is not None:
                self._ranges.release(hold)

    async def _send_range(self, lay: Layout, r: _Range, send: Sender, deadline: float, generation: int = 0) -> None:
        gen = generation or lay.generation
        work = []
        for p in lay.map(r.offset, r.length):
            conn = await self._conn(self._endpoint(p.extent.drive_id), deadline)
            off, boff, left = p.extent_offset, r.buf_offset + p.buf_offset, p.length
            while left > 0:
                n = min(left, dp.MAX_IO)
                work.append((conn, p.extent.extent_id, off, n, boff))
                off, boff, left = off + n, boff + n, left - n
        if len(work) == 1:  # the common small-I/O case: no gather
            conn, ext, off, n, boff = work[0]
            await send(conn, ext, off, n, gen, boff, deadline)
            return
        results = await asyncio.gather(*(send(c, e, o, n, gen, b, deadline) for c, e, o, n, b in work),
                                       return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res


def _live_extents(lay: Layout) -> list[Any]:
    """Extents of replicas that are read or written (not ``out``), and of a migration target."""
    out = [e for i in range(lay.width) for k in range(lay.replicas) if lay.replica_state(i, k) != "out"
           for e in lay.replica_column(i, k).extents]
    if lay.target is not None:
        out += list(lay.target.extents())
    return out


def _split(lay: Layout, ranges: list[_Range]) -> list[_Range]:
    """Cut ranges at stripe-unit boundaries so each retry unit is one piece of work per agent."""
    out = []
    su = lay.stripe_unit * max(1, lay.width)
    for r in ranges:
        pos, end, boff = r.offset, r.offset + r.length, r.buf_offset
        while pos < end:
            n = min(su - pos % su, end - pos)
            out.append(_Range(pos, n, boff))
            pos, boff = pos + n, boff + n
    return out
