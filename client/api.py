"""The nvpool Python API.

Synchronous (any thread; an event loop runs in a background thread)::

    from nvpool.client import api
    pool = api.connect("127.0.0.1:7400")          # or NVPOOL_META
    pool.create_volume("train", "20G")
    vol = pool.open("train")
    vol.write(0, data)                             # bytes / bytearray / numpy array
    arr = vol.read(0, 1 << 20)                     # numpy uint8 array
    vol.readinto(buf, offset)                      # any writable buffer: numpy, bytearray, pinned memory
    vol.flush(); vol.close(); pool.close()

asyncio::

    pool = await api.AsyncPool.connect("127.0.0.1:7400")
    vol = await pool.open("train")                 # client.volume.AsyncVolume (a BlockDevice)
    await vol.readinto(memoryview(buf), offset)

Fork and spawn: a ``Pool`` (and each ``Volume`` of it) notices a ``fork()`` (``os.register_at_fork``) and,
on its first use in the child, connects afresh: a new event-loop thread, a new metadata client, new
agent connections. The parent's loop, channel and sockets are left alone in the child (never closed,
never used: they are shared with the parent), so the parent keeps working. ``Pool`` and ``Volume``
pickle as the metadata address, the options and the volume's name, and reopen on first use, so a
``Dataset`` holding one can go to ``spawn`` workers too.

Every I/O call waits at most ``ClientOptions.io_deadline`` (30 s unless set), retries included, then
raises ``AgentTimeoutError`` naming the agent (see ``client/volume.py``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future
from typing import Any, Coroutine, Optional, Sequence, TypeVar, Union

import numpy as np

from nvpool.client.metaclient import MetaClient, VolumeInfo, default_meta
from nvpool.client.metrics import COUNTERS
from nvpool.client.syncpath import MAX_FAST, BatchRead, FastPathMiss, SyncChannels
from nvpool.client.volume import AsyncVolume, ClientOptions, Connections, Lease
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import AgentTimeoutError, UsageError

from nvpool.proto.units import parse_size

T = TypeVar("T")
Buffer = Union[bytes, bytearray, memoryview, np.ndarray]

__all__ = ["AgentTimeoutError", "AsyncPool", "Pool", "Volume", "ClientOptions", "VolumeInfo", "connect", "default_meta"]

#: the largest request ``Volume.readv`` reads on the thread's own connections (larger ones take the
#: normal path, which keeps a window of bytes in flight per agent)
MAX_BATCH_REQUEST = 4 * 1024 * 1024

_forks = 0  # fork() calls that led to this process; objects made before the last one reconnect
_reconnect_lock = threading.Lock()
_left_behind: list[object] = []  # the parents' loops, channels and sockets: kept, never closed, in a child


def _after_fork_in_child() -> None:
    global _forks, _reconnect_lock
    _forks += 1
    _reconnect_lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


class AsyncPool:
    """A connection to a pool: the metadata service plus on-demand connections to agents."""

    def __init__(self, meta: MetaClient, options: ClientOptions) -> None:
        self.meta = meta
        self.options = options
        self.connections = Connections(options)
        #: (volume name, read-only) -> the lease every handle of that volume shares
        self._leases: dict[tuple[str, bool], Lease] = {}
        #: one lease request at a time per key: handles opened at once (several threads of a program
        #: through one ``Pool``) share the lease the first one takes, instead of being refused by it
        self._opening: dict[tuple[str, bool], asyncio.Lock] = {}

    @classmethod
    async def connect(cls, meta_address: Optional[str] = None, options: Optional[ClientOptions] = None) -> "AsyncPool":
        options = options or ClientOptions()
        return cls(MetaClient(meta_address or default_meta(), tls=options.tls), options)

    async def open(self, name: str, read_only: bool = False, force: bool = False, holder: str = "",
                   lease: Optional[tuple[str, float]] = None) -> AsyncVolume:
        """Open a volume. For writing, this client takes the volume's exclusive writer lease (another
        client is refused with the holder's name; ``force`` takes it over and fences the current
        writer); read-only openers share reader leases. Every handle of one client shares its lease,
        renewed in the background and returned when the last handle closes. ``lease`` (id, term)
        joins a lease this program already holds (the export's worker processes)."""
        key = (name, read_only)
        gate = self._opening.setdefault(key, asyncio.Lock())
        async with gate:
            held = self._leases.get(key)
            if held is None or held.closed or held.fenced is not None:
                if lease is not None:
                    lease_id, ttl = lease
                else:
                    lease_id, ttl = await self.meta.open_volume(name, write=not read_only, force=force, holder=holder)
                held = Lease(self.meta, name, lease_id, ttl, not read_only, self._forget)
                self._leases[key] = held
                held.start()
            held.refs += 1  # while the layout is fetched
        try:
            layout, endpoints, cap = await self.meta.get_layout_cap(name=name, lease_id=held.lease_id)
            if cap:
                held.cap = cap
            layout.validate()
            return AsyncVolume(self.meta, self.connections, layout, endpoints, read_only, self.options, held)
        finally:
            await held.release()

    async def inherit(self, leases: list[Lease]) -> None:
        """Share leases a forked parent holds (the child renews them too; it never returns them: the
        parent does)."""
        for old in leases:
            lease = Lease(self.meta, old.name, old.lease_id, old.ttl, old.write, self._forget)
            lease.fenced = old.fenced
            lease.cap = old.cap
            lease.owner = False  # the parent returns it; the child only helps renew it
            self._leases[(old.name, not old.write)] = lease
            lease.start()

    def _forget(self, lease: Lease) -> None:
        for k, v in list(self._leases.items()):
            if v is lease:
                del self._leases[k]

    async def adopt(self, other: AsyncVolume) -> AsyncVolume:
        """A handle on this pool's connections for a volume opened elsewhere (in the parent of a fork),
        from the layout it knows (no metadata call; a stale layout is re-fetched on first use). It
        shares the parent's lease (the child renews it too)."""
        lease = None
        if other.lease is not None and not other.closed:
            key = (other.name, other.read_only)
            lease = self._leases.get(key)
            if lease is None or lease.lease_id != other.lease.lease_id:
                await self.inherit([other.lease])
                lease = self._leases[key]
        vol = AsyncVolume(self.meta, self.connections, other.layout, other.endpoints, other.read_only, self.options,
                          lease)
        if other.closed:
            await vol.close()
        return vol

    async def create_volume(
        self, name: str, size: Union[int, str], stripe_unit: Union[int, str] = 0, stripe_width: int = 0,
        replicas: int = 1, failure_domain: str = "host",
    ) -> VolumeInfo:
        """Create a volume; ``replicas`` copies of every column, in different ``failure_domain``s
        ("host", or an agent label key such as "rack")."""
        return await self.meta.create_volume(name, parse_size(size), parse_size(stripe_unit), stripe_width,
                                             replicas, failure_domain)

    def alloc(self, nbytes: int) -> np.ndarray:
        """A numpy uint8 buffer in memory registered with same-host agents: reads into it are
        placed there by the agent itself (zero copies in this process). Allocate before I/O."""
        return self.connections.register(nbytes).array(nbytes)

    async def list_volumes(self) -> list[VolumeInfo]:
        return await self.meta.list_volumes()

    async def delete_volume(self, name: str, force: bool = False) -> None:
        """Delete a volume; refused while another client has it open, unless ``force`` (which fences
        them). This client's own open handles do not count (they fail from then on)."""
        own = [lease.lease_id for (n, _), lease in self._leases.items() if n == name and not lease.closed]
        await self.meta.delete_volume(name, force, own)

    async def close(self) -> None:
        for lease in list(self._leases.values()):
            await lease.close()
        self.connections.close()
        await self.meta.close()


class _LoopThread:
    """A private uvloop event loop on a daemon thread."""

    def __init__(self) -> None:
        import uvloop  # a dependency; imported here so that `import nvpool.client` chooses no loop

        self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nvpool-io", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("blocking nvpool call from inside its own event loop; use the async API")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> "Future[T]":
        """Start ``coro`` on the loop; its ``concurrent.futures.Future`` (no waiting here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


def _channel_way(av: AsyncVolume, ep: Any) -> "tuple[str, Any]":
    """How a thread's own blocking connection reaches ``ep``'s agent: (the agent's Unix socket, or ""
    for TCP; the TLS context when that is TCP to a TLS data plane, else None)."""
    unix = ep.unix_path if av.options.transport != "tcp" else ""
    return unix, av.connections.ssl_for(ep) if ep.tls and not (unix and os.path.exists(unix)) else None


def _as_view(buf: Buffer, writable: bool) -> memoryview:
    if not isinstance(buf, (np.ndarray, bytes, bytearray, memoryview)) and hasattr(buf, "numpy"):
        if getattr(buf, "device", None) is not None and str(buf.device) != "cpu":
            raise UsageError("read into CPU (pinned) memory, then copy to the device")
        buf = buf.numpy()  # a torch CPU tensor shares its memory with numpy
    if isinstance(buf, np.ndarray):
        if not buf.flags["C_CONTIGUOUS"]:
            raise UsageError("numpy buffers must be C-contiguous")
        view = buf.reshape(-1).view(np.uint8).data
    else:
        view = memoryview(buf).cast("B")
    if writable and view.readonly:
        raise UsageError("buffer is read-only")
    return view


class Volume:
    """Synchronous handle of a volume. Pickles as its pool, name and read-only flag, and reopens on
    first use after unpickling (or after a fork)."""

    def __init__(self, pool: "Pool", avol: AsyncVolume) -> None:
        self._pool = pool
        self._avol: Optional[AsyncVolume] = avol
        self._name = avol.name
        self._read_only = avol.read_only
        self._forks = _forks

    def __getstate__(self) -> dict[str, Any]:
        return {"pool": self._pool, "name": self._name, "read_only": self._read_only}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._pool = state["pool"]
        self._name = state["name"]
        self._read_only = state["read_only"]
        self._avol = None
        self._forks = -1

    def _reopen(self) -> AsyncVolume:
        """The volume's handle on the pool's current connections (after unpickling or a fork)."""
        pool = self._pool
        apool = pool._ap()
        old = self._avol
        if old is None:
            self._avol = pool._run(apool.open(self._name, self._read_only))
        elif old.connections is not apool.connections:
            self._avol = pool._run(apool.adopt(old))
        self._forks = _forks
        assert self._avol is not None
        return self._avol

    def _av(self) -> AsyncVolume:
        av = self._avol
        return av if self._forks == _forks and av is not None else self._reopen()

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._av().size

    @property
    def generation(self) -> int:
        return self._av().layout.generation

    @property
    def asyncio(self) -> AsyncVolume:
        """The underlying asyncio volume (use it from the pool's own loop only)."""
        return self._av()

    def read(self, offset: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.uint8)
        self.readinto(out, offset)
        return out

    def readinto(self, buf: Buffer, offset: int) -> int:
        view = _as_view(buf, writable=True)
        av = self._av()
        t0 = time.monotonic()
        if not self._fast(av, dp.READ, offset, view, t0):
            self._pool._run(av.readinto(view, offset, timeout=self._left(av, t0)))
        return len(view)

    def readv(self, requests: "Sequence[tuple[int, Any]]") -> int:
        """Read many ``(offset, buffer)`` pairs at once: each buffer (numpy, a torch CPU tensor, pinned
        memory, ``pool.alloc()`` memory, any writable buffer) is filled from its offset. One call into
        the I/O machinery for the whole batch, all pieces in flight together. Returns the bytes read."""
        views = [(off, _as_view(buf, writable=True)) for off, buf in requests]
        if not views:
            return 0
        av = self._av()
        rest = self._fast_batch(av, views, time.monotonic())
        if rest:
            self._pool._run(av.readv(rest))
        return sum(len(v) for _, v in views)

    def _fast_batch(self, av: AsyncVolume, views: "list[tuple[int, memoryview]]",
                    t0: float) -> "list[tuple[int, memoryview]]":
        """Read what can be read on this thread's own connections, all at once (client/syncpath.py,
        ``read_batch``): every request whose pieces (one per stripe unit) each have an agent, at most
        ``MAX_BATCH_REQUEST`` bytes. Returns the requests left for the normal path (which reads, retries
        and reports them in full)."""
        if av.options.digests:
            return views
        lay = av.layout
        su, size, single = lay.stripe_unit, lay.size, lay.single_piece
        eps = av.endpoints
        reads: list[BatchRead] = []
        owner: list[int] = []
        rest: list[int] = []
        conns: dict[str, tuple[str, Any]] = {}
        for i, (off, view) in enumerate(views):
            n = len(view)
            if not 0 < n <= MAX_BATCH_REQUEST or off < 0 or off + n > size:
                rest.append(i)
                continue
            start, pos = len(reads), 0
            while pos < n:
                k = min(su - (off + pos) % su, n - pos)
                p = single(off + pos, k, False)
                ep = eps.get(p.extent.drive_id) if p is not None else None
                if p is None or ep is None:
                    del reads[start:], owner[start:]
                    rest.append(i)
                    break
                if ep.address not in conns:
                    conns[ep.address] = _channel_way(av, ep)
                reads.append((ep.address, p.extent.extent_id, p.extent_offset, view if k == n else view[pos : pos + k]))
                owner.append(i)
                pos += k
        if reads:
            got = self._pool._sync.read_batch(reads, lay.generation, lay.volume_id,
                                              av.lease.cap if av.lease is not None else b"", conns)
            missed = {owner[j] for j, good in enumerate(got) if not good}
            rest.extend(missed)
            done = set(owner) - missed
            if done:
                COUNTERS.record("read", sum(len(views[i][1]) for i in done), time.monotonic() - t0, False,
                                count=len(done))
        return [views[i] for i in sorted(set(rest))]

    def pread(self, buf: Buffer, offset: int) -> "Future[int]":
        """Start reading ``len(buf)`` bytes at ``offset`` into ``buf``; a ``concurrent.futures.Future``
        of the byte count (like kvikio's ``CuFile.pread``). Do not touch ``buf`` until it is done."""
        view = _as_view(buf, writable=True)
        av = self._av()

        async def go() -> int:
            await av.readinto(view, offset)
            return len(view)

        assert self._pool._lt is not None
        return self._pool._lt.submit(go())

    def write(self, offset: int, data: Buffer, fua: bool = False) -> int:
        view = _as_view(data, writable=False)
        av = self._av()
        t0 = time.monotonic()
        if fua or not av.writable or not self._fast(av, dp.WRITE, offset, view, t0):
            self._pool._run(av.write(offset, view, fua, timeout=self._left(av, t0)))
        return len(view)

    @staticmethod
    def _left(av: AsyncVolume, t0: float) -> float:
        """What is left of the I/O's time budget after the fast path's attempt."""
        return av.options.io_deadline - (time.monotonic() - t0)

    def _fast(self, av: AsyncVolume, opcode: int, offset: int, view: memoryview, t0: float) -> bool:
        """Small single-piece I/O on this thread's own blocking connection (client/syncpath.py);
        False sends the request the normal way (which also reports any error)."""
        lay = av.layout
        n = len(view)
        if n > MAX_FAST or av.options.digests:
            return False
        p = lay.single_piece(offset, n, opcode == dp.WRITE)
        ep = av.endpoints.get(p.extent.drive_id) if p is not None else None
        if p is None or ep is None:
            return False
        unix, ctx = _channel_way(av, ep)
        try:
            self._pool._sync.call(ep.address, unix, opcode, p.extent.extent_id, p.extent_offset, n, lay.generation,
                                  payload=view if opcode == dp.WRITE else None,
                                  dest=view if opcode == dp.READ else None,
                                  volume_id=lay.volume_id, cap=av.lease.cap if av.lease is not None else b"",
                                  ssl_context=ctx)
            COUNTERS.record("read" if opcode == dp.READ else "write", n, time.monotonic() - t0, False)
        except FastPathMiss as miss:
            budget = av.options.io_deadline
            if miss.timed_out and time.monotonic() - t0 >= budget:
                raise AgentTimeoutError(
                    f"volume {self._name!r}: I/O of {n} bytes at {offset} did not complete within {budget:g}s: "
                    f"agent {ep.address} did not answer", ep.address) from None
            return False
        return True

    def write_zeroes(self, offset: int, length: int) -> None:
        av = self._av()
        self._pool._run(av.write_zeroes(offset, length))

    def flush(self) -> None:
        av = self._av()
        self._pool._run(av.flush())

    def refresh(self) -> None:
        av = self._av()
        self._pool._run(av.refresh())

    def close(self) -> None:
        av = self._av()
        self._pool._run(av.close())

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pool:
    """Synchronous handle of a pool (thread-safe; all I/O runs on one background event loop).

    Survives ``fork()`` (the child reconnects on first use) and pickles as its metadata address and
    options (it reconnects on first use after unpickling)."""

    _apool: AsyncPool
    _sync: SyncChannels

    def __init__(self, meta_address: Optional[str] = None, options: Optional[ClientOptions] = None) -> None:
        self._address = meta_address or default_meta()
        self._options = options or ClientOptions()
        self._forks = -1
        self._lt: Optional[_LoopThread] = None
        self._connect()

    def __getstate__(self) -> dict[str, Any]:
        return {"meta_address": self._address, "options": self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._address = state["meta_address"]
        self._options = state["options"]
        self._forks = -1
        self._lt = None

    def _connect(self) -> None:
        """(Re)connect: a new loop thread, metadata client and agent connections. In a forked child
        the parent's are put aside untouched: closing them would close what the parent still uses."""
        with _reconnect_lock:
            if self._forks == _forks:
                return  # another thread did it
            inherited: list[Lease] = []
            if self._lt is not None:
                _left_behind.extend((self._lt, self._apool, self._sync))
                inherited = [lease for lease in self._apool._leases.values() if not lease.closed]
            lt = _LoopThread()
            apool = lt.run(AsyncPool.connect(self._address, self._options))
            if inherited:  # a forked child is the same client: it shares (and renews) the parent's leases
                lt.run(apool.inherit(inherited))
            self._sync = SyncChannels(min(apool.options.connect_timeout, apool.options.io_deadline))
            self._apool = apool
            self._lt = lt
            self._forks = _forks

    def _ap(self) -> AsyncPool:
        if self._forks != _forks:
            self._connect()
        return self._apool

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._forks != _forks:  # callers go through _ap() first; this is a safety net
            coro.close()
            raise RuntimeError("nvpool: pool used before reconnecting")
        assert self._lt is not None
        return self._lt.run(coro)

    @property
    def meta(self) -> MetaClient:
        return self._ap().meta

    @property
    def options(self) -> ClientOptions:
        return self._options

    @property
    def address(self) -> str:
        """The metadata service's address."""
        return self._address

    def open(self, name: str, read_only: bool = False, force: bool = False) -> Volume:
        """Open a volume: for writing (the exclusive writer lease; ``force`` takes it over and fences
        the current writer) or ``read_only`` (any number of readers)."""
        ap = self._ap()
        return Volume(self, self._run(ap.open(name, read_only, force)))

    def create_volume(
        self, name: str, size: Union[int, str], stripe_unit: Union[int, str] = 0, stripe_width: int = 0,
        replicas: int = 1, failure_domain: str = "host",
    ) -> VolumeInfo:
        ap = self._ap()
        return self._run(ap.create_volume(name, size, stripe_unit, stripe_width, replicas, failure_domain))

    def list_volumes(self) -> list[VolumeInfo]:
        ap = self._ap()
        return self._run(ap.list_volumes())

    def alloc(self, nbytes: int) -> np.ndarray:
        """Registered (zero-copy) memory; see ``AsyncPool.alloc``."""
        ap = self._ap()
        return self._run(self._alloc(ap, nbytes))

    @staticmethod
    async def _alloc(ap: AsyncPool, nbytes: int) -> np.ndarray:
        return ap.alloc(nbytes)

    def volume_info(self, name: str) -> VolumeInfo:
        ap = self._ap()
        return self._run(ap.meta.get_volume(name))

    def resize_volume(self, name: str, size: Union[int, str]) -> VolumeInfo:
        ap = self._ap()
        return self._run(ap.meta.resize_volume(name, parse_size(size)))

    def delete_volume(self, name: str, force: bool = False) -> None:
        """Delete a volume; refused while anyone has it open, unless ``force`` (which fences them)."""
        ap = self._ap()
        self._run(ap.delete_volume(name, force))

    def close(self) -> None:
        if self._forks != _forks or self._lt is None:
            return  # never connected in this process: nothing of ours to close
        try:
            self._sync.close()
            self._run(self._apool.close())
        finally:
            self._lt.stop()
            self._lt = None
            self._forks = -2  # a later use reconnects

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(meta_address: Optional[str] = None, options: Optional[ClientOptions] = None) -> Pool:
    """Connect to the pool whose metadata service is at ``meta_address`` (default: $NVPOOL_META)."""
    return Pool(meta_address, options)
