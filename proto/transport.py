"""Client side of the data plane: connections to agents with many tagged commands in flight.

``AgentConnection`` (asyncio ``BufferedProtocol``) keeps a tag -> pending-command map. The sans-IO
``CompletionDecoder`` asks, for each READ completion, where its payload goes; the answer is the slice
of the caller's buffer, so data is received once, straight into it. Commands submitted in the same
event-loop turn are corked into one ``writelines`` (many small commands, one syscall). A byte window
bounds the data in flight per connection. When the connection drops, every pending command fails
with ``UnavailableError`` (cause attached), and the volume layer retries them on a new connection.

Bounded waits: a command may carry a *deadline* (``time.monotonic()`` seconds; the end of the whole
I/O's time budget). A watchdog on each connection, which already drops a connection whose oldest
command is unanswered for ``io_timeout``, wakes by the earliest deadline too (no timer per command):
a command past its deadline fails with ``AgentTimeoutError`` naming the agent, and the connection is
dropped (the agent is hung or cut off; a late READ payload must never land in a buffer whose caller
has been told the read failed). Waits before a command is posted (window, socket back-pressure) end
at the deadline as well.

``AgentConnection`` (submit a command, close) is the TCP/Unix socket initiator, used by the client
library and by agents' migration copies; the one-sided shared-memory variant is
``client/transport_shm.py``.

Abandoned connections (the agent's half and the argument: ``agents/dataplane.py``). Every client
connection has a random id, sent in its AUTH frames. A connection lost with commands in flight is
recorded in ``ABANDONED`` (by this module, the blocking path ``client/syncpath.py`` and the NBD
engine ``client/nbd/engine.py``), with the volumes it held capabilities for; whatever it had in flight
is retried through an ``AgentConnection``, whose ``authorize`` first presents, for each such volume,
an AUTH revoking the abandoned id on that agent. So a write that was given up on can never land after
the retry, or after a later write to the same blocks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Optional, TypeVar, Union

from nvpool.proto import dataplane as dp
from nvpool.proto.compiled import load as load_compiled
from nvpool.proto.tls import SERVER_NAME
from nvpool.proto.errors import AgentTimeoutError, DigestError, ProtocolError, UnavailableError, remote_error

logger = logging.getLogger(__name__)

#: connections this process gave up on with commands in flight: agent address -> connection id -> the
#: volumes it held capabilities for (see "Abandoned connections" above); changed under _ABANDONED_LOCK
#: (the blocking paths change it from their own threads)
ABANDONED: dict[str, dict[int, set[int]]] = {}
_ABANDONED_LOCK = threading.Lock()
#: abandoned connections remembered at most (each costs its agent a little memory until revoked)
MAX_ABANDONED = 4096


def new_connection_id() -> int:
    """A random, non-zero 64-bit connection id (carried in AUTH)."""
    return int.from_bytes(os.urandom(8), "little") or 1


def abandoned(address: str, conn_id: int, volumes: Any) -> None:
    """Record that the connection ``conn_id`` to ``address`` was given up on with commands in flight."""
    vols = set(volumes)
    if conn_id and vols:
        with _ABANDONED_LOCK:
            if sum(len(d) for d in ABANDONED.values()) >= MAX_ABANDONED:  # forget the oldest agent's
                del ABANDONED[next(iter(ABANDONED))]
            ABANDONED.setdefault(address, {}).setdefault(conn_id, set()).update(vols)


def to_revoke(address: str, volume_id: int, own: int) -> list[int]:
    """The abandoned connections to ``address`` a connection (``own``) must revoke for ``volume_id``
    before it sends anything of that volume."""
    if not ABANDONED:
        return []
    with _ABANDONED_LOCK:
        return [cid for cid, vols in ABANDONED.get(address, {}).items() if volume_id in vols and cid != own]


def revoked(address: str, conn_id: int, volume_id: int) -> None:
    """The agent at ``address`` accepted the revocation of ``conn_id`` for ``volume_id``."""
    with _ABANDONED_LOCK:
        left = ABANDONED.get(address, {})
        vols = left.get(conn_id)
        if vols is not None:
            vols.discard(volume_id)
            if not vols:
                del left[conn_id]
        if not left:
            ABANDONED.pop(address, None)


def _revoke_done(conn: "AgentConnection", conn_id: int, volume_id: int, fut: "asyncio.Future[dp.Completion]") -> None:
    conn._revoking.discard((conn_id, volume_id))
    if fut.cancelled() or fut.exception() is not None:
        return  # still recorded: the next authorize tries again
    if fut.result().status != 0:
        conn.authorized.clear()  # a refused revocation leaves the connection no capability at all
        return
    revoked(conn.address, conn_id, volume_id)

Buffer = Union[bytes, bytearray, memoryview]
T = TypeVar("T")

#: proto/_ccomplete.c: delivers the plain successful completions of a receive in C (None: pure Python)
_ccomplete: Any = load_compiled("nvpool.proto._ccomplete")


@dataclass(slots=True)
class _Pending:
    future: "asyncio.Future[dp.Completion]"
    dest: Optional[memoryview]
    nbytes: int
    posted: float
    deadline: float
    #: the decoder has been handed ``dest`` for this command's payload
    claimed: bool = False


class AgentConnection(asyncio.BufferedProtocol):
    """One connection to one agent (TCP or Unix socket)."""

    #: the small-I/O fast path may post with ``start`` and place the data itself (the socket carries
    #: it); False for the same-host transport, whose ``submit`` moves data through shared memory
    posts_directly = True

    def __init__(self, address: str, window: int = 4 * 1024 * 1024, io_timeout: float = 30.0) -> None:
        self.address = address
        self.io_timeout = io_timeout
        self.decoder = dp.CompletionDecoder(target=self._target)
        self.pending: dict[int, _Pending] = {}
        self.transport: Optional[asyncio.Transport] = None
        self._next_tag = 1
        self._out: list[Buffer] = []
        self._flush_scheduled = False
        self._window = window
        self._inflight = 0
        self._window_waiters: list[asyncio.Future[None]] = []
        self._drain: Optional[asyncio.Future[None]] = None
        self._lost: Optional[BaseException] = None
        self._loop = asyncio.get_event_loop()
        self.digest_errors = 0
        self._tick = min(1.0, io_timeout / 4)
        self._next_check = math.inf  # when the watchdog runs next
        self._watch_handle: Optional[asyncio.TimerHandle] = None
        #: volume id -> the capability presented on this connection (proto/capability.py)
        self.authorized: dict[int, bytes] = {}
        #: this connection's id (see "Abandoned connections")
        self.conn_id = new_connection_id()
        #: (abandoned connection id, volume id) revocations posted on this connection, not yet answered
        self._revoking: set[tuple[int, int]] = set()

    # ------------------------------------------------------------------ asyncio protocol
    def _watch(self) -> None:
        """A silent peer (cut link, hung agent) never closes the socket: give up on it after
        ``io_timeout`` so every pending command fails over to a retry instead of waiting forever,
        and at once when a command's deadline passes (its I/O is out of time)."""
        self._watch_handle = None
        self._next_check = math.inf
        if self.transport is None:
            return
        now = time.monotonic()
        first = math.inf
        if self.pending:
            oldest = next(iter(self.pending.values()))
            if now - oldest.posted > self.io_timeout:
                logger.warning("agent %s did not answer for %.0fs; dropping the connection", self.address, self.io_timeout)
                self._lost = TimeoutError(f"no answer for {self.io_timeout:.0f}s")
                self.transport.abort()
                return
            first = min(p.deadline for p in self.pending.values())
            if first <= now:
                self._expire(now)
                return
        self._arm(min(now + self._tick, first), now)

    def _arm(self, when: float, now: float) -> None:
        if self._watch_handle is not None:
            self._watch_handle.cancel()
        self._next_check = when
        self._watch_handle = self._loop.call_later(max(0.0, when - now), self._watch)

    def _expire(self, now: float) -> None:
        """Fail every command past its deadline with ``AgentTimeoutError``, then drop the connection
        (the others fail with ``UnavailableError`` and are retried, within their own budgets)."""
        n = 0
        for p in self.pending.values():
            if p.deadline <= now and not p.future.done():
                n += 1
                p.future.set_exception(AgentTimeoutError(
                    f"agent {self.address} did not answer within {now - p.posted:.1f}s (the I/O's time budget)",
                    self.address,
                ))
        logger.warning("agent %s did not answer %d command(s) within their time budget; dropping the connection",
                       self.address, n)
        self._lost = TimeoutError("commands ran out of their time budget")
        if self.transport is not None:
            self.transport.abort()

    async def _within(self, aw: Awaitable[T], deadline: float, what: str) -> T:
        """Await ``aw`` until ``deadline`` (only off the hot path: this costs a task)."""
        if deadline == math.inf:
            return await aw
        try:
            return await asyncio.wait_for(aw, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise AgentTimeoutError(f"agent {self.address}: {what} within the I/O's time budget", self.address) from None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._arm(time.monotonic() + self._tick, time.monotonic())
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None
        cause = exc or self._lost or ConnectionResetError("connection closed by agent")
        self._lost = cause
        err = UnavailableError(f"connection to agent {self.address} lost: {cause}")
        err.__cause__ = cause
        pending, self.pending = self.pending, {}
        if pending and self.authorized:  # what was in flight may still land: the retry revokes this connection
            abandoned(self.address, self.conn_id, self.authorized)
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(err)
        for w in self._window_waiters:
            if not w.done():
                w.set_result(None)
        self._window_waiters.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        dec = self.decoder
        try:
            if _ccomplete is not None and dec.received_raw(nbytes):
                # the plain successes at the front of the receive, in C (proto/_ccomplete.c); the
                # decoder parses whatever it left (an error, a digest, a partial frame)
                dec.pos, released = _ccomplete.complete(dec.scratch, dec.pos, dec.end, self.pending, dp.Completion)
                if released:
                    self._release(released)
                events = dec.parse()
            else:
                events = dec.advance(nbytes)
        except ProtocolError as exc:
            logger.warning("agent %s sent a malformed completion: %s", self.address, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for ev in events:
            assert isinstance(ev, dp.Completion)
            p = self.pending.pop(ev.tag, None)
            if p is None:
                logger.warning("agent %s completed unknown tag %d; dropping connection", self.address, ev.tag)
                if self.transport is not None:
                    self.transport.abort()
                return
            self._release(p.nbytes)
            if not p.future.done():
                p.future.set_result(ev)

    def _target(self, tag: int, n: int) -> Optional[memoryview]:
        p = self.pending.get(tag)
        if p is None or p.dest is None or len(p.dest) != n:
            return None
        p.claimed = True
        return p.dest

    # ------------------------------------------------------------------ submitting
    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _release(self, n: int) -> None:
        self._inflight -= n
        while self._window_waiters and self._inflight < self._window:
            w = self._window_waiters.pop(0)
            if not w.done():
                w.set_result(None)

    def _alloc_tag(self) -> int:
        tag = self._next_tag
        while tag in self.pending:
            tag = (tag + 1) & 0xFFFFFFFF or 1
        self._next_tag = (tag + 1) & 0xFFFFFFFF or 1
        return tag

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self.transport is not None and out:
            self.transport.writelines(out)

    async def submit(
        self,
        opcode: int,
        extent_id: int,
        offset: int,
        length: int,
        generation: int,
        payload: Optional[Buffer] = None,
        dest: Optional[memoryview] = None,
        flags: int = 0,
        region: int = 0,
        region_offset: int = 0,
        *,
        deadline: float = math.inf,
    ) -> None:
        moving = length if opcode == dp.READ or opcode == dp.WRITE else 0
        while self._inflight > 0 and self._inflight + moving > self._window and not self.closed:
            w: asyncio.Future[None] = self._loop.create_future()
            self._window_waiters.append(w)
            await self._within(w, deadline, "no room in the connection's window")
        if self._drain is not None and not self._drain.done():
            await self._within(asyncio.shield(self._drain), deadline, "the connection stayed congested")
        if self.closed:
            raise UnavailableError(f"connection to agent {self.address} is closed: {self._lost}")
        fut = self._post(opcode, extent_id, offset, length, generation, payload, dest, flags, region,
                         region_offset, moving, deadline)
        try:
            comp = await fut
        except asyncio.CancelledError:
            self.abandon(fut)
            raise
        self.check(comp, opcode, length, dest)

    def authorize(self, volume_id: int, cap: bytes, write: bool = False) -> None:
        """Present ``cap`` for ``volume_id`` before the next command (once per connection and
        capability). It is posted now, so it precedes every command posted after it; a refusal shows
        as ``DENIED`` on those commands (the client then fetches a new capability)."""
        if not cap or self.closed:
            return
        if ABANDONED and write and self._revoke(volume_id, cap):
            return
        if self.authorized.get(volume_id) == cap:
            return
        self.authorized[volume_id] = cap
        fut = self._post(dp.Opcode.AUTH, self.conn_id, 0, len(cap), 0, cap, None, 0, 0, 0, 0)
        fut.add_done_callback(_auth_done)

    def _revoke(self, volume_id: int, cap: bytes) -> bool:
        """Present ``cap`` (a write capability: agents take revocations only with one) revoking every
        abandoned connection to this agent that held ``volume_id`` (see "Abandoned connections");
        whether an AUTH with ``cap`` was posted now. One already in flight precedes whatever is sent
        now, so it is not posted again."""
        posted = False
        for cid in to_revoke(self.address, volume_id, self.conn_id):
            if (cid, volume_id) in self._revoking:
                continue
            self._revoking.add((cid, volume_id))
            fut = self._post(dp.Opcode.AUTH, self.conn_id, cid, len(cap), 0, cap, None, 0, 0, 0, 0)
            fut.add_done_callback(_auth_done)
            fut.add_done_callback(functools.partial(_revoke_done, self, cid, volume_id))
            posted = True
        if posted:
            self.authorized[volume_id] = cap
        return posted

    def abandon(self, fut: "asyncio.Future[dp.Completion]") -> None:
        """The caller stopped waiting for this command (cancelled; a hedged read that lost): its READ
        payload must never land in the caller's buffer. Before the payload arrives that is a matter
        of forgetting the buffer; once the decoder is filling it, only dropping the connection is
        safe (other commands on it fail over to a retry)."""
        for p in self.pending.values():
            if p.future is fut:
                if p.claimed:
                    if self.transport is not None:
                        self.transport.abort()
                else:
                    p.dest = None
                return

    def start(
        self, opcode: int, extent_id: int, offset: int, length: int, generation: int,
        dest: Optional[memoryview] = None, payload: Optional[Buffer] = None, flags: int = 0,
        deadline: float = math.inf,
    ) -> "Optional[asyncio.Future[dp.Completion]]":
        """Post a READ or WRITE without awaiting (the small-I/O fast paths and callback-style callers);
        None if it would have to wait for room. The caller passes the completion to ``check``."""
        if self.closed or (self._inflight > 0 and self._inflight + length > self._window) or (
            self._drain is not None and not self._drain.done()
        ):
            return None
        return self._post(opcode, extent_id, offset, length, generation, payload, dest, flags, 0, 0, length, deadline)

    def _post(
        self, opcode: int, extent_id: int, offset: int, length: int, generation: int, payload: Optional[Buffer],
        dest: Optional[memoryview], flags: int, region: int, region_offset: int, moving: int,
        deadline: float = math.inf,
    ) -> "asyncio.Future[dp.Completion]":
        tag = self._alloc_tag()
        fut: asyncio.Future[dp.Completion] = self._loop.create_future()
        now = time.monotonic()
        self.pending[tag] = _Pending(fut, dest, moving, now, deadline)
        if deadline < self._next_check and self.transport is not None:
            self._arm(deadline, now)  # only when the budget is shorter than the watchdog's tick
        self._inflight += moving
        hdr = dp.encode_command(opcode, tag, extent_id, offset, length, generation, flags, region, region_offset)
        frames = dp.command_frames(hdr, payload, flags)
        if not self._flush_scheduled and len(self.pending) == 1 and self.transport is not None:
            # the only command in flight (QD1): send it now rather than a loop turn later; commands
            # posted after it in this turn are corked as usual, and nothing queued is overtaken
            self.transport.writelines(frames)
            return fut
        self._out.extend(frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    def check(self, comp: dp.Completion, opcode: int, length: int, dest: Optional[memoryview]) -> None:
        """Raise the error a completion carries (and place READ data the decoder could not)."""
        if comp.status != 0:
            raise remote_error(comp.status, f"agent {self.address}: {comp.message}", comp.info)
        if opcode == dp.READ:
            if comp.length != length:
                raise UnavailableError(f"agent {self.address} returned {comp.length} bytes, asked {length}")
            if not comp.digest_ok:
                self.digest_errors += 1
                raise DigestError(f"data digest mismatch reading from agent {self.address}")
            if dest is not None and comp.payload is not None and comp.payload is not dest:
                dest[:] = comp.payload  # only when the decoder could not use dest (never on the fast path)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _auth_done(fut: "asyncio.Future[dp.Completion]") -> None:
    if not fut.cancelled() and fut.exception() is None and fut.result().status != 0:
        logger.info("an agent refused a capability: %s", fut.result().message)


async def connect(
    address: str, window: int = 4 * 1024 * 1024, timeout: float = 5.0, io_timeout: float = 30.0,
    ssl_context: Optional[ssl.SSLContext] = None,
) -> AgentConnection:
    """Open a connection: ``host:port`` over TCP (TLS with ``ssl_context``: the agent must present a
    certificate of the pool, proto/tls.py), or ``unix:PATH``."""
    loop = asyncio.get_running_loop()
    try:
        if address.startswith("unix:"):
            coro = loop.create_unix_connection(lambda: AgentConnection(address, window, io_timeout), address[5:])
        else:
            host, _, port = address.rpartition(":")
            coro = loop.create_connection(
                lambda: AgentConnection(address, window, io_timeout), host.strip("[]"), int(port), ssl=ssl_context,
                server_hostname=SERVER_NAME if ssl_context is not None else None)
        _, proto = await asyncio.wait_for(coro, timeout)
    except (OSError, asyncio.TimeoutError, ValueError) as exc:  # ssl.SSLError is an OSError: an untrusted peer
        raise UnavailableError(f"cannot connect to agent {address}: {exc or 'timed out'}") from exc
    return proto
