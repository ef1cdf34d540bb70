"""The NBD export's compiled transmission loop, seen from asyncio: hand-off, the slow path, layout updates.

When a client enters transmission on an export of a pool volume, ``server._Connection`` hands the
connection to an ``EngineLink``, which runs it on ``client/nbd/_cnbd.c``'s engine (native threads, no GIL;
its header comment is the contract) and keeps the engine in step with the volume:

* **Hand-off.** The asyncio transport stops reading (and stays open, idle, until the engine ends); the
  engine gets a duplicate of its socket and the bytes the codec had received beyond the handshake. The
  engine's agent connections are opened here first, in a worker thread (a blocking connect must not
  stall the event loop): the agent's Unix socket on this server, else plain TCP; an agent reachable only
  over TLS gets no engine connection (its requests are served by Python). If anything fails before the
  engine starts, the connection simply stays on the Python path.
* **The slow path.** Requests the engine does not serve come back through ``take()``: they are judged
  by the codec (``ServerConnection.judge``: the same checks, so the same answers as the Python path) and
  served by ``_Connection._serve`` on the full client path, which refreshes the layout, retries within
  the I/O's remaining budget and maps errors; the reply bytes go back through the engine.
* **Layout, capability, fence.** The engine maps requests with the layout it was last given: the
  volume's current generation, its columns and which agent connection holds each extent; reads only for
  an unreplicated layout; writes only when, besides, there is no migration target and this process may
  write the volume (its lease is not fenced). They are pushed at hand-off, after every request the
  slow path served (which may have refreshed the layout or learnt of a fence) and once a second (lease
  renewals bring new capabilities, other connections refresh the layout). A stale engine is fenced by
  the agents themselves, as every client is: its commands carry the generation it holds, and a
  STALE_LAYOUT completion sends that request to the slow path, which refreshes.
* **Lost agents.** An agent connection that breaks or does not answer within the I/O deadline hands its
  requests to the slow path; the link opens a new one (at most once a second) and maps to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Optional

from nvpool.client.metrics import COUNTERS
from nvpool.client.syncpath import FastPathMiss, connect_agent, present_revocations
from nvpool.client.nbd import proto as nbd
from nvpool.client.volume import AsyncVolume
from nvpool.proto import compiled
from nvpool.proto.records import Endpoint
from nvpool.proto.transport import abandoned, new_connection_id

if TYPE_CHECKING:
    from nvpool.client.nbd.server import _Connection

logger = logging.getLogger(__name__)

_cnbd: Any = compiled.load("nvpool.client.nbd._cnbd")
#: how often the link re-checks the volume (layout, capability, fence) and retries lost agents
SYNC_INTERVAL = 1.0


def usable(device: Any) -> bool:
    """Whether connections to ``device`` can be handed to the compiled engine."""
    return (_cnbd is not None and isinstance(device, AsyncVolume) and not device.options.digests
            and not device.closed)


def _open_channel(ep: Endpoint, transport: str, timeout: float) -> Optional[socket.socket]:
    """A blocking socket to ``ep``'s agent for the engine; None when only TLS reaches it (the engine
    speaks plain sockets)."""
    unix = ep.unix_path if transport != "tcp" and ep.unix_path and os.path.exists(ep.unix_path) else ""
    if not unix and ep.tls:
        return None
    s = connect_agent(ep.address, unix, timeout)
    s.settimeout(None)
    return s


class EngineLink:
    """One NBD connection served by the compiled engine (see the module docstring)."""

    def __init__(self, conn: "_Connection", volume: Any) -> None:
        assert _cnbd is not None
        self.conn = conn
        self.volume: AsyncVolume = volume  # (usable() said so)
        self.engine: Any = None
        self.closed = False
        #: agent address -> engine connection index (only live ones)
        self._agent_of: dict[str, int] = {}
        self._pushed: Optional[tuple[Any, ...]] = None
        self._cap = b""
        self._tokens: dict[int, int] = {}
        self._rfd = self._wfd = -1
        self._timer: Optional[asyncio.TimerHandle] = None
        self._reconnecting: Optional["asyncio.Task[None]"] = None
        #: engine connection index -> its connection id (carried in its AUTH)
        self._conn_ids: dict[int, int] = {}
        self._last_reconnect = 0.0

    # ------------------------------------------------------------------ hand-off
    async def start(self) -> bool:
        """Open the agent connections and start the engine; False (nothing changed) if it cannot."""
        conn, vol = self.conn, self.volume
        socks = await self._open(self._wanted())
        try:
            transport = conn.transport
            if transport is None or transport.is_closing() or vol.closed:
                return False
            deadline = time.monotonic() + 2.0
            while transport.get_write_buffer_size():  # option replies still queued: let them go first
                if time.monotonic() > deadline or transport.is_closing():
                    return False
                await asyncio.sleep(0.001)
                if conn.transport is None:
                    return False
            sock = transport.get_extra_info("socket")
            if sock is None:
                return False
            codec = conn.codec
            exp = codec.export
            assert exp is not None
            self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            nbd_fd = os.dup(sock.fileno())
            try:
                self.engine = _cnbd.Engine(nbd_fd, self._wfd, exp.size, exp.max_block, exp.read_only, codec.structured,
                                           codec.block_size_negotiated, vol.options.io_deadline, codec.take_buffered())
            except BaseException:
                os.close(nbd_fd)
                raise
            for addr, (s, cid) in socks.items():
                self._add_agent(addr, s, cid)
            socks.clear()
            self._push()
            asyncio.get_running_loop().add_reader(self._rfd, self._on_notify)
            self.engine.start()
            self._timer = asyncio.get_running_loop().call_later(SYNC_INTERVAL, self._tick)
            COUNTERS.engines.add(self)
            return True
        finally:
            for s, _ in socks.values():
                s.close()

    def _add_agent(self, addr: str, s: socket.socket, cid: int) -> None:
        assert self.engine is not None
        idx = self.engine.add_agent(s.detach(), cid)
        self._agent_of[addr] = idx
        self._conn_ids[idx] = cid

    def _wanted(self) -> dict[str, Endpoint]:
        """Endpoints of the agents holding the layout's extents, by address."""
        vol = self.volume
        out: dict[str, Endpoint] = {}
        for col in vol.layout.columns:
            for ext in col.extents:
                ep = vol.endpoints.get(ext.drive_id)
                if ep is not None and ep.alive:
                    out.setdefault(ep.address, ep)
        return out

    async def _open(self, eps: dict[str, Endpoint]) -> dict[str, tuple[socket.socket, int]]:
        """Connections to ``eps``, each with its connection id, abandoned ones revoked first."""
        loop = asyncio.get_running_loop()
        opts = self.volume.options
        timeout = min(opts.connect_timeout, opts.io_deadline)
        lease = self.volume.lease
        cap = lease.cap if lease is not None and lease.write else b""  # (only writers revoke)
        vid = self.volume.layout.volume_id

        def one(ep: Endpoint) -> Optional[tuple[socket.socket, int]]:
            s = None
            try:
                s = _open_channel(ep, opts.transport, timeout)
                if s is None:
                    return None
                cid = new_connection_id()
                present_revocations(s, ep.address, vid, cap, cid, timeout)
                return s, cid
            except (OSError, FastPathMiss) as exc:
                if s is not None:
                    s.close()
                logger.info("NBD engine: no connection to agent %s (%s): its requests take the Python path",
                            ep.address, exc)
                return None

        got = await asyncio.gather(*(loop.run_in_executor(None, one, ep) for ep in eps.values()))
        return {addr: s for addr, s in zip(eps, got) if s is not None}

    # ------------------------------------------------------------------ keeping the engine in step
    def _push(self) -> None:
        """Give the engine the volume's current layout, capability and write permission, if they changed."""
        if self.engine is None or self.closed:
            return
        vol = self.volume
        lay = vol.layout
        cap = vol.lease.cap if vol.lease is not None else b""
        if cap != self._cap:
            self.engine.set_cap(cap)
            self._cap = cap
        reads = not lay.mirrors
        writes = reads and lay.target is None and not vol.read_only and not vol.closed and vol.writable
        # the objects themselves (a refresh replaces both): compared by identity first, and never
        # confused with a later object that reuses a freed one's id
        key = (lay, vol.endpoints, reads, writes, tuple(sorted(self._agent_of.items())))
        if key == self._pushed:
            return
        columns = []
        for col in lay.columns:
            row = []
            for start, ext in zip(col.starts, col.extents):
                ep = vol.endpoints.get(ext.drive_id)
                idx = self._agent_of.get(ep.address, -1) if ep is not None and ep.alive else -1
                row.append((start, ext.length, ext.extent_id, idx))
            columns.append(row)
        self.engine.set_layout(lay.generation, lay.stripe_unit, reads, writes, columns)
        self._pushed = key

    def _tick(self) -> None:
        self._timer = None
        if self.closed:
            return
        try:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("NBD engine %s: %s, agents %s", self.conn.peer, self.engine.stats(), self._agent_of)
            self._push()
            missing = {a: ep for a, ep in self._wanted().items() if a not in self._agent_of}
            if missing and self._reconnecting is None and time.monotonic() - self._last_reconnect >= SYNC_INTERVAL:
                self._last_reconnect = time.monotonic()
                self._reconnecting = asyncio.ensure_future(self._reconnect(missing))
        finally:
            self._timer = asyncio.get_running_loop().call_later(SYNC_INTERVAL, self._tick)

    async def _reconnect(self, eps: dict[str, Endpoint]) -> None:
        try:
            socks = await self._open(eps)
            for addr, (s, cid) in socks.items():
                if self.closed or self.engine is None:
                    s.close()
                    continue
                self._add_agent(addr, s, cid)
                logger.info("NBD engine: connected to agent %s again", addr)
            self._push()
        except Exception as exc:  # noqa: BLE001 - the Python path serves meanwhile; tried again later
            logger.info("NBD engine: reconnecting to agents failed: %s", exc)
        finally:
            self._reconnecting = None

    # ------------------------------------------------------------------ the slow path
    def _on_notify(self) -> None:
        if self.engine is None or self.closed:
            return
        items, finished, reason, lost = self.engine.take()
        if lost:
            dead = set(lost)
            for addr, idx in list(self._agent_of.items()):
                if idx in dead:
                    del self._agent_of[addr]
                    # its requests are served next by the Python path, which revokes this connection first
                    # (proto/transport.py, "Abandoned connections")
                    cid = self._conn_ids.pop(idx, 0)
                    lease = self.volume.lease
                    if lease is not None and lease.cap and lease.write:
                        abandoned(addr, cid, [self.volume.layout.volume_id])
                    logger.info("NBD engine: connection to agent %s lost; its requests take the Python path", addr)
            self._push()
        for token, cmd, flags, handle, offset, length, data, verdict, astatus, age in items:
            self._serve(token, cmd, flags, handle, offset, length, data, verdict, astatus, age)
        if finished:
            if reason:
                logger.warning("dropping NBD client %s: %s", self.conn.peer, reason)
            self.close()

    def _serve(self, token: int, cmd: int, flags: int, handle: int, offset: int, length: int, data: Optional[bytes],
               verdict: int, astatus: int, age: float) -> None:
        conn = self.conn
        req = conn.codec.judge(cmd, flags, handle, offset, length, data)
        if req.error != verdict:  # the two validations differ: a bug; answer safely, say so
            logger.error("NBD engine: request %s at %d+%d judged %d by the engine, %d by the codec",
                         cmd, offset, length, verdict, req.error)
            if not req.error and cmd == nbd.CMD_WRITE and data is None:  # its payload was skipped
                self.reply_frames(token, [conn.codec.reply(handle, nbd.EIO, "internal error")])
                return
        if req.error:
            self.reply_frames(token, [conn.codec.reply(handle, req.error, req.message)])
            return
        self._tokens[id(req)] = token
        budget = max(0.1, self.volume.options.io_deadline - age)
        task = asyncio.ensure_future(conn._serve(req, timeout=budget))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    def reply(self, req: Any, frames: list[Any]) -> None:
        token = self._tokens.pop(id(req), None)
        if token is not None:
            self.reply_frames(token, frames)
        self._push()  # the full path may have refreshed the layout or learnt of a fence

    def reply_frames(self, token: int, frames: list[Any]) -> None:
        if self.engine is None or self.closed:
            return
        self.engine.reply(token, b"".join(frames))

    # ------------------------------------------------------------------ the end
    def stats(self) -> dict[str, int]:
        return dict(self.engine.stats()) if self.engine is not None else {}

    def counted(self) -> list[tuple[str, int, int]]:
        """(op, calls, bytes) the engine answered itself, for the client metrics."""
        st = self.stats()
        return [("read", st.get("reads_ok", 0), st.get("read_bytes", 0)),
                ("write", st.get("writes_ok", 0), st.get("write_bytes", 0))] if st else []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        loop = asyncio.get_running_loop()
        if self.engine is not None:
            COUNTERS.engines.discard(self)
            for op, calls, nbytes in self.counted():
                COUNTERS.add(op, calls, nbytes)
            st = self.engine.stats()
            logger.info("NBD client %s: compiled engine served %d reads and %d writes, Python %d requests (%d handed "
                        "back by agents), %d agent connections lost", self.conn.peer, st["fast_reads"],
                        st["fast_writes"], st["to_python"], st["handed_back"], st["agents_lost"])
        if self._rfd >= 0:
            loop.remove_reader(self._rfd)
        if self.engine is not None:
            self.engine.close()
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1
        transport = self.conn.transport
        if transport is not None:
            transport.abort()
