"""Volumes as block devices: byte ranges split by stripe unit and sent to all agents in parallel.

``AsyncVolume`` implements ``client.blockdev.BlockDevice``. It holds one ``Layout`` (fetched once from
the metadata service) and talks to agents directly. Failure handling, per piece of an I/O:

* ``STALE_LAYOUT`` (an agent fenced our generation): fetch the layout again and re-map the piece;
* a lost connection / unreachable agent: re-fetch endpoints (the agent may have restarted on another
  port), reconnect, retry with back-off, up to ``retries`` times;
* a data digest mismatch: retried the same way (and counted);
* anything else (out of range, I/O error on the drive): raised to the caller.

Reads and writes are idempotent per piece, so a retry after a lost connection is safe: a write either
landed before or lands again with the same bytes. While the volume is being re-spread
(``layout.target``), each write lands on the current columns and then on the target columns (in that
order; see ``pool/migration.py`` for why the order matters).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Union

from nvpool.client.metaclient import MetaClient
from nvpool.proto.transport import AgentConnection, connect
from nvpool.client.transport_shm import BOUNCE_ID, Region, ShmConnection, connect_shm
from nvpool.proto.layout import Layout
from nvpool.proto import dataplane as dp
from nvpool.proto.records import Endpoint
from nvpool.proto.errors import (
    DigestError,
    NotFoundError,
    NvpoolError,
    RemoteError,
    StaleLayoutError,
    Status,
    UnavailableError,
    UsageError,
)

logger = logging.getLogger(__name__)

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

    def peek(self, ep: Endpoint) -> Optional[AgentConnection]:
        """The open connection for ``ep``, if there is one (no await: the small-I/O fast path)."""
        conn = self._conns.get(ep.address)
        return conn if conn is not None and not conn.closed else None

    async def get(self, ep: Endpoint) -> AgentConnection:
        conn = self._conns.get(ep.address)
        if conn is not None and not conn.closed:
            return conn
        task = self._opening.get(ep.address)
        if task is None:
            task = asyncio.ensure_future(self._open(ep))
            self._opening[ep.address] = task
            task.add_done_callback(lambda _t, a=ep.address: self._opening.pop(a, None))  # type: ignore[misc]
        return await asyncio.shield(task)

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
                conn = await connect_shm(ep.unix_path, self.options.window, self.user_regions, self.options.connect_timeout)
            except UnavailableError:
                if self.options.transport == "shm":
                    raise
                self._no_shm.add(ep.address)  # not on our server after all: TCP from now on
                conn = await connect(ep.address, self.options.window, self.options.connect_timeout, self.options.io_timeout)
        else:
            conn = await connect(ep.address, self.options.window, self.options.connect_timeout, self.options.io_timeout)
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


Sender = Callable[[AgentConnection, int, int, int, int, int], Awaitable[None]]
"""(conn, extent_id, extent_offset, length, generation, buf_offset) -> None"""


class AsyncVolume:
    def __init__(
        self,
        meta: MetaClient,
        connections: Connections,
        layout: Layout,
        endpoints: dict[str, Endpoint],
        read_only: bool = False,
        options: Optional[ClientOptions] = None,
    ) -> None:
        self.meta = meta
        self.connections = connections
        self.layout = layout
        self.endpoints = endpoints
        self._read_only = read_only
        self.options = options or ClientOptions()
        self._refresh_lock = asyncio.Lock()
        self._closed = False
        self._started: dict[int, tuple[AgentConnection, int, memoryview]] = {}
        self.stats = {"stale_refetches": 0, "retries": 0, "digest_errors": 0}

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

    async def readinto(self, buf: memoryview, offset: int) -> None:
        buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
        if buf.readonly:
            raise UsageError("readinto needs a writable buffer")
        flags = dp.HDGST | dp.DDGST if self.options.digests else 0

        async def send(conn: AgentConnection, ext: int, eoff: int, n: int, gen: int, boff: int) -> None:
            await conn.submit(dp.READ, ext, eoff, n, gen, dest=buf[boff : boff + n], flags=flags)

        await self._run(offset, len(buf), send, target=False)

    def start_read(self, buf: memoryview, offset: int) -> "Optional[asyncio.Future[Any]]":
        """Callback-style read for front ends (the NBD export): if ``buf`` maps to one piece on a
        connected agent, post it now and return its completion future (check it with
        ``finish_read``); otherwise None, and the caller uses ``readinto``, which handles everything."""
        lay = self.layout
        n = len(buf)
        if n == 0 or offset < 0 or offset + n > lay.size or offset % lay.stripe_unit + n > lay.stripe_unit:
            return None
        pieces = list(lay.map(offset, n))
        if len(pieces) != 1:
            return None
        p = pieces[0]
        ep = self.endpoints.get(p.extent.drive_id)
        conn = self.connections.peek(ep) if ep is not None else None
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

    async def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        await self.readinto(memoryview(out), offset)
        return out

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        flags = (dp.HDGST | dp.DDGST if self.options.digests else 0) | (dp.FUA if fua else 0)

        async def send(conn: AgentConnection, ext: int, eoff: int, n: int, gen: int, boff: int) -> None:
            await conn.submit(dp.WRITE, ext, eoff, n, gen, payload=view[boff : boff + n], flags=flags)

        await self._run(offset, len(view), send, target=True)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable()

        async def send(conn: AgentConnection, ext: int, eoff: int, n: int, gen: int, boff: int) -> None:
            await conn.submit(dp.Opcode.WRITE_ZEROES, ext, eoff, n, gen)

        await self._run(offset, length, send, target=True)

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length)

    async def flush(self) -> None:
        """Make every completed write durable: FLUSH on every extent of the layout (in parallel)."""
        async def one(ep: Endpoint, ext: int, gen: int) -> None:
            conn = await self.connections.get(ep)
            await conn.submit(dp.Opcode.FLUSH, ext, 0, 0, gen)

        for attempt in range(self.options.retries + 1):
            lay = self.layout
            try:
                await asyncio.gather(*(one(self._endpoint(e.drive_id), e.extent_id, lay.generation) for e in lay.extents()))
                return
            except (StaleLayoutError, UnavailableError) as exc:
                if attempt == self.options.retries:
                    raise
                await self._recover(exc, attempt)

    async def close(self) -> None:
        self._closed = True

    # ------------------------------------------------------------------ machinery
    def _check_writable(self) -> None:
        if self._read_only:
            raise UsageError(f"volume {self.name!r} is open read-only")

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
            layout, endpoints = await self.meta.get_layout(volume_id=self.layout.volume_id)
            if layout.generation < self.layout.generation:
                logger.warning("metadata service returned an older layout (%d < %d)", layout.generation, self.layout.generation)
            layout.validate()
            self.layout, self.endpoints = layout, endpoints

    async def _recover(self, exc: Exception, attempt: int) -> None:
        if isinstance(exc, StaleLayoutError):
            self.stats["stale_refetches"] += 1
            await self.refresh(exc.info)
            return
        if isinstance(exc, DigestError):
            self.stats["digest_errors"] += 1
        self.stats["retries"] += 1
        logger.info("retrying after: %s", exc)
        await asyncio.sleep(min(0.05 * (2**attempt), 2.0))
        try:
            await self.refresh()
        except NvpoolError as meta_exc:  # metadata service down: keep the layout we have
            logger.info("cannot refresh layout (%s); retrying with the one we have", meta_exc)

    async def _run(self, offset: int, length: int, send: Sender, target: bool) -> None:
        """Map [offset, offset+length) onto the layout, send every piece, retry failed pieces."""
        if self._closed:
            raise UsageError("volume is closed")
        lay = self.layout
        lay.check_range(offset, length)
        if length == 0:
            return
        su = lay.stripe_unit
        if length <= su - offset % su and (not target or lay.target is None):
            # fast path: one piece on one agent, no gather; any trouble takes the general path below
            pieces = list(lay.map(offset, length))
            p = pieces[0]
            ep = self.endpoints.get(p.extent.drive_id)
            conn = self.connections.peek(ep) if ep is not None and len(pieces) == 1 else None
            if conn is not None:
                try:
                    await send(conn, p.extent.extent_id, p.extent_offset, length, lay.generation, 0)
                    return
                except DigestError:
                    self.stats["digest_errors"] += 1
                except (StaleLayoutError, UnavailableError):
                    pass
                except RemoteError as exc:
                    if exc.status != Status.NO_EXTENT:
                        raise
        todo = [_Range(offset, length, 0)]
        attempt = 0
        while todo:
            lay = self.layout
            failed: list[_Range] = []
            errors: list[BaseException] = []

            async def piece(
                r: _Range, lay: Layout = lay, failed: list[_Range] = failed, errors: list[BaseException] = errors
            ) -> None:
                try:
                    await self._send_range(lay, r, send)
                    if target and lay.target is not None:
                        await self._send_range(lay.target, r, send, generation=lay.generation)
                except (StaleLayoutError, UnavailableError, DigestError) as exc:
                    failed.append(r)
                    errors.append(exc)
                except RemoteError as exc:
                    if exc.status == Status.NO_EXTENT:
                        failed.append(r)
                        errors.append(exc)
                    else:
                        raise

            await asyncio.gather(*(piece(r) for r in _split(lay, todo)))
            if not failed:
                return
            if attempt >= self.options.retries:
                raise errors[0]
            stale = [e for e in errors if isinstance(e, StaleLayoutError)]
            first = stale[0] if stale else errors[0]
            assert isinstance(first, Exception)
            if isinstance(first, RemoteError) and first.status == Status.NO_EXTENT:
                # the extent was released: fine if the layout moved on (a migration finished), else a
                # real error (the volume was deleted, or the agent lost it)
                gen = self.layout.generation
                try:
                    await self.refresh()
                except NotFoundError:
                    raise first from None
                if self.layout.generation == gen:
                    raise first
            else:
                await self._recover(first, attempt)
            attempt += 1
            todo = failed

    async def _send_range(self, lay: Layout, r: _Range, send: Sender, generation: int = 0) -> None:
        gen = generation or lay.generation
        work = []
        for p in lay.map(r.offset, r.length):
            conn = await self.connections.get(self._endpoint(p.extent.drive_id))
            off, boff, left = p.extent_offset, r.buf_offset + p.buf_offset, p.length
            while left > 0:
                n = min(left, dp.MAX_IO)
                work.append((conn, p.extent.extent_id, off, n, boff))
                off, boff, left = off + n, boff + n, left - n
        if len(work) == 1:  # the common small-I/O case: no gather
            conn, ext, off, n, boff = work[0]
            await send(conn, ext, off, n, gen, boff)
            return
        results = await asyncio.gather(*(send(c, e, o, n, gen, b) for c, e, o, n, b in work), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res


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
