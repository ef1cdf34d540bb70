"""The agent's data-plane server: the asyncio glue between sockets and ``AgentCore``.

One ``AgentConnection`` per client connection (TCP or Unix socket). Bytes go into the sans-IO
``CommandDecoder`` (WRITE payloads are received straight into one buffer each); each command is
executed in order and answered with one completion; a READ's data is read with ``pread`` when the
command is served and goes out with ``writelines``. Never ``sendfile``: it queues references to
page-cache pages whose bytes are copied only when the peer reads them, so bytes written after the
command's checks (after its extent was released and the space given to another volume, say) could
reach a peer that reads slowly; a ``pread`` copies the bytes the checks were made for.

A peer's bad bytes never take the agent down: framing errors (bad magic, unknown flag bits, a
length above ``MAX_IO``, a header digest mismatch) drop that connection with one log line; a
well-framed but invalid command (unknown opcode, zero length, a range outside its extent or region,
an unregistered region) gets an error completion and the connection carries on. Anything else that
goes wrong while serving one connection drops that connection with one log line, never the agent.

Memory per connection is bounded whatever the peer does (nbdkit bounds requests per connection the
same way):

* WRITE payloads: the decoder commits memory only for payload bytes that have arrived
  (``proto/dataplane.py``, ``LAZY_ALLOC_MIN``), so headers announcing payloads that never come cost
  nothing; and it receives only while this connection is allowed to read (below).
* Replies: completions and read data of one receive are handed to the transport every
  ``BATCH_BYTES``. When the transport's queue passes ``REPLY_HIGH_WATER`` (the peer is not reading
  its replies), the connection stops *executing* commands and stops *reading* the socket; both
  resume when the queue drains. So replies queued in the agent stay below ``REPLY_HIGH_WATER`` plus
  one reply (``MAX_IO``).
* In flight: commands decoded but not yet executed wait in order; reading also stops while more than
  ``MAX_INFLIGHT_COMMANDS`` of them, or ``MAX_INFLIGHT_BYTES`` of their WRITE payloads, are held.

So a connection holds at most about ``REPLY_HIGH_WATER + 2 * MAX_IO`` plus the decoder's scratch
buffer, however many commands it announces; the agent's total grows only with the number of
connections that really send or refuse to receive that much. The checks cost a few integer
operations per command.

One-sided ("RDMA-style") opcodes work on memory regions that the client registered for this
connection (``regions``: region id -> writable memoryview); see ``agents/shm.py``.

Abandoned connections
---------------------
A client that gives up on a connection (the agent did not answer in time) sends what was in flight
again on another connection, at the same layout generation, and may write the same blocks again
later. The abandoned connection's commands may still sit in this agent's socket buffer, or in a batch
a connection thread holds, and would then land after the newer writes, unfenced. So a client names
each connection with a random id (AUTH's ``extent_id`` field) and, on the next connection it uses to
that agent, presents the abandoned id in an AUTH for each volume it wrote through it (``offset``
field; ``client`` side: ``proto/transport.py``, "Abandoned connections"). That AUTH removes the
volume's capability from the abandoned connection and remembers the id as revoked for the volume:

1. The revoking AUTH precedes the resent commands on the new connection, which is served in order,
   so it is applied before any of them.
2. From then on every command of the abandoned connection for that volume fails its capability
   check (``DENIED``; a connection left with none is closed), whether it is served by the event
   loop or a connection thread: capabilities are read before each command under the GIL (see
   "Native connections", step 2), and the revocation is made by Python code.
3. A command of the abandoned connection that was checked before the revocation was applied before
   it too (its check and its I/O happen together), so before anything resent.
4. An AUTH of the revoked id for that volume, arriving late, is refused: the abandoned connection
   cannot regain the capability.

Ids are 64 random bits chosen by the client and never shown to anyone else; a revocation needs a
write capability for the volume and affects only that volume. A refused revoking AUTH leaves its
connection no capability (the commands resent behind it are refused too, and resent again after a
successful one). The agent remembers ``MAX_CONNECTION_IDS`` ids and revocations (the oldest are
forgotten past that; a connection still alive then merely cannot be revoked).

Native connections
------------------
Where the compiled module is built (``native_enabled()``), each plaintext connection (TCP, or the
same-host Unix socket after its hello) is served by a thread of its own in C (``agents/_cserve.c``,
``Conn``; its header is the contract) and a ``NativeConnection`` here, instead of an
``AgentConnection`` on the event loop. TLS connections stay on the event loop. The thread receives
and sends with blocking calls and runs the compiled command loop over what it received; frames it does
not serve itself (AUTH, FLUSH, zeroing, digests, FUA, any refusal, anything unusual) are handed to
``NativeConnection`` on the event loop, which answers them in order with ``execute`` (the same code as
the Python path), and the thread waits for that answer before it serves anything behind them. A
FLUSH's completion is posted later, when its drives' worker threads are done, as on the Python path.

Why a thread may serve commands while the event loop changes the tables (the safety argument):

1. Every change that can make a command unservable (a fence raised, an extent released or assigned,
   ``keep_only``, the serve lease, a capability replaced, a migration copy or dirty tracking started)
   is made by Python code, so with the GIL held.
2. The thread holds the GIL through each batch it serves (``serve_core`` with ``threaded``; FUA
   writes, whose fdatasync must not hold the GIL, go to Python), and makes each command's checks
   right before that command's ``pread``/``pwrite``, reading the tables and the core's flags afresh
   (Python code can run inside a batch: a collection started by a first-time stats entry runs
   finalizers, during which the GIL can pass to the event loop; so the flags are re-read per command,
   and nothing that can start a collection happens between a command's checks and its I/O). So each
   command's checks and its I/O happen together between two Python steps, exactly as on the
   single-threaded event loop: a change made before them is seen by the checks; a change made after
   them comes after the I/O. In particular, once the control call that raised a fence or released an
   extent has returned, no command of the old generation or on the old extent is in flight anywhere
   in the agent.
3. Reads are copied (``pread``) under that same GIL hold, never ``sendfile``d (see the top). A read
   larger than ``LARGE_READ_MIN`` goes out in steps of 1 MiB, each step checked again and read under
   one GIL hold: if the checks fail after the completion header went out, the connection is closed,
   the only way to tell its peer (which then retries on another connection and is refused properly).
4. Commands of one connection run in order: the thread serves nothing behind a frame it handed over
   until Python has answered it. Completions may leave in another order only for FLUSH, as before.

What a peer can cost is bounded as on the Python path: the thread's receive buffer holds at most the
frame at its front (``MAX_IO`` plus header; memory is committed as bytes arrive), it sends its replies
with blocking calls before it reads more (so a peer that does not read stops its own thread in
``send``, and what it sends next waits in the kernel), Python is handed at most about 1 MiB of frames
and read lengths at a time, and at most ``MAX_DEFERRED_FLUSHES`` FLUSH completions wait to be posted.
``NVPOOL_NATIVE_CONNECTIONS=0`` keeps every connection on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections import deque
from typing import Any, Awaitable, Callable, Optional

from nvpool.agents.core import AgentCore
from nvpool.proto import capability
from nvpool.proto.capability import Capability
from nvpool.proto.compiled import load as load_compiled
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import DriveError, ProtocolError, RemoteError, Status

logger = logging.getLogger(__name__)

#: the compiled command loop (None: pure Python, see proto/compiled.py)
_cserve: Any = load_compiled("nvpool.agents._cserve")
if _cserve is not None:
    from nvpool.agents.core import LATENCY_BUCKETS
    from nvpool.agents.drive import Drive

    _cserve.configure(Drive, LATENCY_BUCKETS)

MiB = 1024 * 1024
#: native connections send reads at least this large in steps from a buffer of their own, each step
#: checked again (smaller ones are built into the batch of replies)
LARGE_READ_MIN = 64 * 1024
#: replies queued in the transport above which a connection stops executing and reading commands
REPLY_HIGH_WATER = 8 * MiB
#: completions and read data produced by one receive go to the transport whenever they reach this size
BATCH_BYTES = 1 * MiB
#: per connection: commands decoded but not yet executed above which the agent stops reading
MAX_INFLIGHT_COMMANDS = 256
#: per connection: WRITE payload bytes received but not yet executed above which the agent stops reading
MAX_INFLIGHT_BYTES = 64 * MiB


class AgentConnection(asyncio.BufferedProtocol):
    def __init__(self, core: AgentCore, regions: Optional[dict[int, memoryview]] = None) -> None:
        self.core = core
        self.regions: dict[int, memoryview] = regions if regions is not None else {}
        self.decoder = dp.CommandDecoder()
        self.transport: Optional[asyncio.Transport] = None
        self._peer: Any = None
        #: the transport's queue is above REPLY_HIGH_WATER: execute nothing until it drains
        self._write_paused = False
        #: transport.pause_reading() is in effect
        self._read_paused = False
        #: decoded commands waiting (in order) for the peer to consume replies
        self._pending: deque[dp.Command] = deque()
        #: WRITE payload bytes held by ``_pending``
        self._pending_bytes = 0
        #: completions produced while handling one receive, sent with one writelines
        self._out: list[bytes] = []
        #: FLUSHes waiting on drive worker threads (their completions are sent when they finish)
        self._flushes: set["asyncio.Task[None]"] = set()
        #: read data in ``_out``
        self._out_bytes = 0
        #: the peer shut down its sending side while commands were held: close once they are answered
        self._eof = False
        #: volume id -> the capability this connection presented for it (proto/capability.py)
        self.caps: dict[int, Capability] = {}

    # ------------------------------------------------------------------ asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.core.stats.connections += 1
        self.core.stats.live.add(self)
        if self.core.stats.connections > self.core.max_connections:  # agent-wide bound on peers
            logger.warning("refusing a connection from %s: %d open (max_connections)",
                           transport.get_extra_info("peername") or "unix", self.core.stats.connections - 1)
            transport.abort()  # type: ignore[attr-defined]
            return
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        self._peer = transport.get_extra_info("peername") or "unix"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=REPLY_HIGH_WATER)  # type: ignore[attr-defined]

    @property
    def inflight(self) -> int:
        """Commands received and not yet answered (queued behind a full reply buffer, or flushing)."""
        return len(self._pending) + len(self._flushes)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.core.stats.connections -= 1
        forget_connection(self.core, self.caps)
        self.transport = None
        self._pending.clear()
        self._pending_bytes = 0
        self._out.clear()
        self._out_bytes = 0
        if exc is not None:
            logger.info("client %s went away: %s", self._peer, exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._gate_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._pending:  # run them outside the transport's callback
            asyncio.get_running_loop().call_soon(self._run_pending)
        else:
            self._gate_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        dec = self.decoder
        try:
            if _cserve is not None and not self._pending and not self._write_paused and dec.received_raw(nbytes):
                # the compiled loop serves the plain reads and writes at the front of this receive;
                # the Python decoder and execute() take the first frame it leaves, and all after it
                try:
                    self._serve_compiled()
                except Exception as exc:  # a bug must cost this connection, not the agent
                    self._drop("internal error %r", exc)
                    return
                if self.transport is None or self.transport.is_closing():
                    return
                commands = dec.parse()
            else:
                commands = dec.advance(nbytes)
        except ProtocolError as exc:
            self._drop("%s", exc)
            return
        if commands:
            try:
                if self._pending or self._write_paused:
                    self._hold(commands, 0)
                else:
                    self._run(commands)
            except Exception as exc:  # a bug must cost this connection, not the agent
                self._drop("internal error %r", exc)
                return
        self._gate_reading()

    def _serve_compiled(self) -> None:
        """Serve the receive buffer's leading plain READs and WRITEs (and their region variants) in C (``agents/_cserve.c``: the
        same checks as ``execute``, the same completions), sending each ``BATCH_BYTES`` of replies."""
        assert _cserve is not None
        dec, out, core, caps = self.decoder, self._out, self.core, self.caps
        while True:
            pos, stop = _cserve.serve(dec.scratch, dec.pos, dec.end, core, caps, self.regions, out, dp.MAX_IO + 1,
                                      BATCH_BYTES)
            dec.pos = pos
            self._send()
            if stop != _cserve.STOP_FULL or self._write_paused or self.transport is None:
                return

    def _defer_flush(self, cmd: dp.Command, drives: list[Any]) -> bool:
        """A FLUSH waits for fdatasync on each drive's worker thread, never on the event loop (one slow
        drive must not stall every connection and the heartbeat)."""
        if len(self._flushes) >= MAX_DEFERRED_FLUSHES or self.transport is None:
            return False
        loop = asyncio.get_running_loop()
        flushing = flush_frames(self.core, cmd, drives)

        async def finish() -> None:
            frames = await flushing
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.writelines(frames)

        task = loop.create_task(finish())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)
        return True

    def _run(self, commands: list[Any]) -> None:
        """Execute commands in order until the peer stops consuming replies; hold the rest."""
        core, regions, out, read = self.core, self.regions, self._out, self._read
        i = 0
        for cmd in commands:
            if self._write_paused:
                break
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            i += 1
            if self._unauthenticated(cmd):
                return
            execute(core, cmd, regions, out, read, self._defer_flush, self.caps)
            if self._out_bytes >= BATCH_BYTES:
                self._send()
        self._send()
        if i < len(commands):
            self._hold(commands, i)

    def _unauthenticated(self, cmd: dp.Command) -> bool:
        """A data command from a connection that never presented a capability: answer it (DENIED,
        saying what is missing) and close the connection, so a peer without credentials costs one
        round trip, never a connection's worth of buffers."""
        if not self.core.secrets or self.caps or cmd.opcode in _FREE_OPS:
            return False
        execute(self.core, cmd, self.regions, self._out, self._read, self._defer_flush, self.caps)
        self._send()
        logger.info("closing client %s: a data command without a capability", self._peer)
        self._pending.clear()
        self._pending_bytes = 0
        if self.transport is not None:
            self.transport.close()  # the DENIED answer goes out first
        return True

    def _hold(self, commands: list[Any], start: int) -> None:
        for cmd in commands[start:]:
            self._pending.append(cmd)
            if cmd.payload is not None:
                self._pending_bytes += len(cmd.payload)

    def _run_pending(self) -> None:
        pending, core, regions, out, read = self._pending, self.core, self.regions, self._out, self._read
        try:
            while pending and not self._write_paused:
                transport = self.transport
                if transport is None or transport.is_closing():
                    return
                cmd = pending.popleft()
                if cmd.payload is not None:
                    self._pending_bytes -= len(cmd.payload)
                if self._unauthenticated(cmd):
                    return
                execute(core, cmd, regions, out, read, self._defer_flush, self.caps)
                if self._out_bytes >= BATCH_BYTES:
                    self._send()
            self._send()
        except Exception as exc:
            self._drop("internal error %r", exc)
            return
        if self._eof and not pending and self.transport is not None:
            self.transport.close()  # sends what is queued first
            return
        self._gate_reading()

    def _gate_reading(self) -> None:
        """Read only while replies are consumed and the in-flight budgets allow."""
        transport = self.transport
        if transport is None:
            return
        stop = (
            self._write_paused
            or len(self._pending) >= MAX_INFLIGHT_COMMANDS
            or self._pending_bytes >= MAX_INFLIGHT_BYTES
        )
        if stop != self._read_paused:
            self._read_paused = stop
            if transport.is_closing():
                return
            if stop:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _drop(self, why: str, *args: Any) -> None:
        """Close this connection with one log line (its bytes can no longer be trusted or served)."""
        logger.warning("dropping client %s: " + why, self._peer, *args)
        self._pending.clear()
        self._pending_bytes = 0
        self._out.clear()
        self._out_bytes = 0
        if self.transport is not None:
            self.transport.abort()

    def _send(self) -> None:
        """Send the batch and empty it in place (``execute`` callers hold a reference to it)."""
        if self._out and self.transport is not None:
            self.transport.writelines(self._out)  # copies what it cannot send now
        self._out.clear()
        self._out_bytes = 0

    def eof_received(self) -> Optional[bool]:
        if self._pending:  # the peer is done sending: answer what it sent, then close
            self._eof = True
            return True
        return False

    # ------------------------------------------------------------------ commands
    def _read(self, cmd: dp.Command, out: list[bytes]) -> None:
        self._out_bytes += cmd.length
        read_frames(self.core, cmd, out)


def native_enabled() -> bool:
    """Whether plaintext connections are served by native threads: the compiled module is built and
    neither ``NVPOOL_PURE_PYTHON`` nor ``NVPOOL_NATIVE_CONNECTIONS=0`` says otherwise."""
    flag = os.environ.get("NVPOOL_NATIVE_CONNECTIONS", "").strip().lower()
    return _cserve is not None and flag not in ("0", "no", "false", "off")


class NativeConnection:
    """A data-plane connection served by a native thread (``_cserve.Conn``; see "Native connections"
    in the module docstring). This object keeps the connection's capabilities and regions, answers the
    frames the thread hands over (on the event loop, in order, with ``execute``) and does the
    bookkeeping an ``AgentConnection`` does."""

    def __init__(self, core: AgentCore, sock: socket.socket, regions: Optional[dict[int, memoryview]] = None,
                 maps: Optional[list[Any]] = None) -> None:
        assert _cserve is not None
        self.core = core
        self.regions: dict[int, memoryview] = regions if regions is not None else {}
        self.caps: dict[int, Capability] = {}
        self._maps = maps or []
        self._loop = asyncio.get_running_loop()
        self._busy = False
        self._closed = False
        self._tasks: set["asyncio.Task[None]"] = set()
        #: FLUSHes waiting on drive worker threads (their completions are posted when done)
        self._flushes: set["asyncio.Task[None]"] = set()
        self._conn: Any = None
        try:
            self._peer: Any = sock.getpeername() or "unix"
        except OSError:
            self._peer = "unix"
        core.stats.connections += 1
        core.stats.live.add(self)
        if core.stats.connections > core.max_connections:  # agent-wide bound on peers
            logger.warning("refusing a connection from %s: %d open (max_connections)", self._peer,
                           core.stats.connections - 1)
            sock.close()
            self.close()
            return
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(True)
        fd = sock.detach()
        try:
            conn = _cserve.Conn(fd, core, self.caps, self.regions, self._event, LARGE_READ_MIN, BATCH_BYTES)
        except BaseException:
            os.close(fd)
            self.close()
            raise
        self._conn = conn  # (it owns the descriptor now: close() closes it)
        try:
            conn.start()
        except BaseException:  # no thread (out of threads or memory): nothing held stays behind
            self.close()
            raise

    @property
    def inflight(self) -> int:
        """Commands handed to Python and not yet answered (the thread's own are answered as it serves)."""
        return (1 if self._busy else 0) + len(self._flushes)

    def native_stats(self) -> dict[str, int]:
        return dict(self._conn.stats()) if self._conn is not None else {}

    def _event(self, kind: int, payload: Any) -> None:
        """Runs on the connection's thread (holding the GIL): hand the event to the event loop."""
        self._loop.call_soon_threadsafe(self._on_event, kind, payload)

    def _on_event(self, kind: int, payload: Any) -> None:
        if kind == _cserve.EV_ENDED:
            if payload:  # (a connection this side stopped sends no EV_ENDED)
                logger.info("client %s went away: %s", self._peer, payload)
            self.close()
            return
        self._busy = True
        task = self._loop.create_task(self._answer(payload, kind == _cserve.EV_BAD_FRAMING))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, data: bytes, bad_framing: bool) -> None:
        frames: list[bytes] = []
        close = False
        try:
            commands = dp.CommandDecoder().next_commands(data)
            if bad_framing:  # (the compiled framing check and the decoder agree; this is a backstop)
                raise ProtocolError("framing error")
            frames, close = await execute_in_order(self.core, commands, self.regions, self.caps, self._peer,
                                                   self._later)
        except ProtocolError as exc:
            logger.warning("dropping client %s: %s", self._peer, exc)
            frames, close = [], True
        except Exception as exc:  # a bug must cost this connection, not the agent
            logger.warning("dropping client %s: internal error %r", self._peer, exc)
            frames, close = [], True
        finally:
            self._busy = False
        if self._conn is not None and not self._closed:
            self._conn.answer([f if isinstance(f, bytes) else bytes(f) for f in frames], close)

    def _later(self, completion: Awaitable[list[bytes]]) -> bool:
        """Send a FLUSH's completion when its fdatasync is done, while the connection goes on (at most
        ``MAX_DEFERRED_FLUSHES`` at once; past that the connection waits for each, as back-pressure)."""
        if len(self._flushes) >= MAX_DEFERRED_FLUSHES:
            return False

        async def send_when_done() -> None:
            frames = await completion
            if self._conn is not None and not self._closed:
                self._conn.post(frames)

        task = self._loop.create_task(send_when_done())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)
        self._conn.expect()  # (before the answer: the thread must not sleep where the post cannot wake it)
        return True

    def close(self) -> None:
        """Stop the thread (waits for it) and forget the connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        forget_connection(self.core, self.caps)
        if self._conn is not None:
            self._conn.stop()
        for task in (*self._tasks, *self._flushes):
            task.cancel()
        self.core.stats.connections -= 1
        self.core.stats.live.discard(self)
        release_regions(self.regions, self._maps)


def release_regions(regions: dict[int, memoryview], maps: list[Any]) -> None:
    """Drop a connection's registered regions and their mappings (agents/shm.py)."""
    for view in regions.values():
        view.release()
    regions.clear()
    for m in maps:
        try:
            m.close()
        except BufferError:  # a view still exported: the GC closes it later
            pass


async def execute_in_order(core: AgentCore, commands: list[dp.Command], regions: dict[int, memoryview],
                           caps: dict[int, Capability], peer: Any,
                           later: Optional[Callable[[Awaitable[list[bytes]]], bool]] = None,
                           ) -> tuple[list[bytes], bool]:
    """Run commands in order as the Python path does; the completion frames, and whether to close the
    connection afterwards (a data command from a connection without any capability: answered DENIED,
    then closed). A FLUSH's fdatasync runs on its drives' worker threads; ``later(completion)`` may take
    its completion to send when it is done (True), else the next command waits for it."""
    out: list[bytes] = []
    deferred: list[list[Any]] = []  # a FLUSH's drives, from execute

    def defer(_cmd: dp.Command, drives: list[Any]) -> bool:
        deferred.append(drives)
        return True

    for cmd in commands:
        if core.secrets and not caps and cmd.opcode not in _FREE_OPS:
            execute(core, cmd, regions, out, None, None, caps)
            logger.info("closing client %s: a data command without a capability", peer)
            return out, True
        execute(core, cmd, regions, out, None, defer, caps)
        if deferred:
            flushing = flush_frames(core, cmd, deferred.pop())
            if later is None or not later(flushing):
                out.extend(await flushing)
    return out, False


class NativeServer:
    """A plaintext TCP listener whose connections are served by native threads (``start_tcp``)."""

    def __init__(self, core: AgentCore, sock: socket.socket) -> None:
        self.core = core
        self.sock = sock
        self.sockets = [sock]
        self._task: Optional["asyncio.Task[None]"] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:  # out of descriptors, a connection reset before accept: wait, go on
                logger.warning("accepting a data-plane connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            try:
                NativeConnection(self.core, conn)
            except Exception as exc:  # (no memory, no thread): that client only, one line
                logger.warning("cannot serve a data-plane connection: %s", exc)
                conn.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sock.close()


def close_connections(core: AgentCore) -> None:
    """Close every data-plane connection of ``core`` (native threads are stopped and waited for): before
    the drives close, so no thread can use a drive's descriptor after it."""
    for conn in list(core.stats.live):
        if isinstance(conn, NativeConnection):
            conn.close()
        elif conn.transport is not None:
            conn.transport.abort()


async def start_tcp(core: AgentCore, host: str, port: int,
                    ssl_context: Optional[ssl.SSLContext] = None) -> Any:
    """Serve the data plane on TCP; with ``ssl_context``, TLS with client certificates required.
    Plaintext connections are served by native threads where ``native_enabled()``; the result has
    ``sockets`` and ``close()``."""
    if ssl_context is None and native_enabled():
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=256)
        sock.setblocking(False)
        server = NativeServer(core, sock)
        server.start()
        return server
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AgentConnection(core), host, port, reuse_address=True, backlog=256,
                                    ssl=ssl_context, ssl_handshake_timeout=10 if ssl_context else None)


# ---------------------------------------------------------------------- shared by every server
ReadFn = Callable[[dp.Command, list[bytes]], None]


def read_frames(core: AgentCore, cmd: dp.Command, out: list[bytes]) -> None:
    """A READ answered from one pread: completion header, data, optional data digest."""
    flags = cmd.flags & (dp.HDGST | dp.DDGST)
    data = core.read(cmd)
    out.append(dp.encode_completion(cmd.tag, 0, cmd.length, 0, flags))
    out.append(data)
    if flags & dp.DDGST:
        out.append(dp.DIGEST.pack(dp.crc32c(data)))


def _region(regions: dict[int, memoryview], cmd: dp.Command) -> memoryview:
    region = regions.get(cmd.region)
    if region is None:
        raise RemoteError(Status.REGION, f"region {cmd.region} is not registered on this connection")
    if not cmd.length:
        raise RemoteError(Status.INVALID, f"opcode {cmd.opcode} of 0 bytes")
    if cmd.region_offset + cmd.length > len(region):
        raise RemoteError(
            Status.REGION,
            f"[{cmd.region_offset}, {cmd.region_offset + cmd.length}) is outside region {cmd.region} "
            f"({len(region)} bytes)",
        )
    return region[cmd.region_offset : cmd.region_offset + cmd.length]


#: FLUSHes one connection may have waiting on drive worker threads; past it, flushes run inline
#: (which stops the connection: natural back-pressure for a peer that floods FLUSH)
MAX_DEFERRED_FLUSHES = 16

#: run these drives' fdatasync off the event loop and send the command's completion when done;
#: False: not now (the caller flushes inline)
DeferFn = Callable[[dp.Command, list[Any]], bool]


_OP_NAMES = {int(o): o.name.lower() for o in dp.Opcode}
#: what a connection may send before it holds a capability
_FREE_OPS = frozenset({dp.NOP, int(dp.Opcode.AUTH)})

#: capabilities one connection may hold (one per volume); more is a peer's abuse
MAX_CAPS = 4096
_WRITES = frozenset({dp.WRITE, int(dp.Opcode.WRITE_REGION), int(dp.Opcode.WRITE_ZEROES), int(dp.Opcode.DISCARD)})


def _authorize(core: AgentCore, cmd: dp.Command, caps: dict[int, Capability]) -> None:
    """Refuse a command no capability of this connection covers (``DENIED``; the message says what
    is missing, never what would have worked). An extent this agent does not hold is ``NO_EXTENT``
    only for a connection that holds some capability (a client whose layout moved on)."""
    rec = core.extents.get(cmd.extent_id)
    if rec is None:
        if cmd.extent_id == 0 and cmd.opcode == dp.FLUSH and caps:
            return  # flush every drive: durability only, for any authorized client
        if caps:
            return  # the core answers NO_EXTENT
        raise RemoteError(Status.DENIED, "no capability: send AUTH with one from the metadata service first")
    cap = caps.get(rec.volume_id)
    if cap is None:
        raise RemoteError(Status.DENIED, "no capability for this extent's volume")
    why = cap.allows(cmd.opcode in _WRITES, cmd.generation, time.time())
    if why:
        raise RemoteError(Status.DENIED, why)


#: connection ids (and revoked ones) an agent remembers; past that the oldest are forgotten
MAX_CONNECTION_IDS = 65536


def _accept_capability(core: AgentCore, cmd: dp.Command, caps: dict[int, Capability]) -> None:
    """AUTH: verify the capability and hold it for this connection; with a connection id (``extent_id``)
    and a revoked one (``offset``), see "Abandoned connections" at the top. A refused AUTH that was to
    revoke leaves the connection no capability at all: what the client resends behind it must not be
    served before the revocation is."""
    if not core.secrets:
        return  # an agent core without keys (in-process tests) checks nothing
    try:
        _accept(core, cmd, caps)
    except RemoteError:
        if cmd.offset:
            caps.clear()
        raise


def _accept(core: AgentCore, cmd: dp.Command, caps: dict[int, Capability]) -> None:
    blob = bytes(cmd.payload) if cmd.payload is not None else b""
    try:
        cap = capability.verify(blob, core.secrets)
    except capability.CapabilityError as exc:
        raise RemoteError(Status.DENIED, str(exc)) from None
    if cap.volume_id not in caps and len(caps) >= MAX_CAPS:
        raise RemoteError(Status.DENIED, f"a connection holds at most {MAX_CAPS} capabilities")
    own, revoke = cmd.extent_id, cmd.offset
    if own:
        if cap.volume_id in core.revoked.get(own, ()):
            raise RemoteError(Status.DENIED, "this connection was replaced by a newer one of its client (what it "
                                             "had in flight was sent again there)")
        held = core.connection_caps.get(own)
        if held is None:
            if len(core.connection_caps) >= MAX_CONNECTION_IDS:
                del core.connection_caps[next(iter(core.connection_caps))]
            core.connection_caps[own] = caps
        elif held is not caps:
            raise RemoteError(Status.DENIED, "another connection uses this connection id")
    if revoke and revoke != own and cap.access == capability.WRITE:  # (a reader has nothing to fence)
        old = core.connection_caps.get(revoke)
        if old is not None:
            old.pop(cap.volume_id, None)  # its queued commands for the volume are refused from now on
        gone = core.revoked.get(revoke)
        if gone is None:
            if len(core.revoked) >= MAX_CONNECTION_IDS:
                del core.revoked[next(iter(core.revoked))]
            gone = core.revoked[revoke] = set()
        gone.add(cap.volume_id)
    caps[cap.volume_id] = cap


def forget_connection(core: AgentCore, caps: dict[int, Capability]) -> None:
    """A data-plane connection ended: its id no longer names anything."""
    if core.connection_caps:
        for k in [k for k, v in core.connection_caps.items() if v is caps]:
            del core.connection_caps[k]


def flush_frames(core: AgentCore, cmd: dp.Command, drives: list[Any]) -> Awaitable[list[bytes]]:
    """Start a FLUSH's fdatasync on each drive's worker thread now; the awaitable gives its completion."""
    loop = asyncio.get_running_loop()
    futs = [loop.run_in_executor(d.worker, d.flush) for d in drives]
    tag, flags = cmd.tag, cmd.flags & (dp.HDGST | dp.DDGST)

    async def finish() -> list[bytes]:
        try:
            await asyncio.gather(*futs)
            return [dp.encode_completion(tag, 0, 0, 0, flags & dp.HDGST)]
        except DriveError as exc:
            core.stats.error(Status.IO_ERROR)
            return [dp.error_completion(tag, Status.IO_ERROR, str(exc), 0, flags)]

    return finish()


def execute(core: AgentCore, cmd: dp.Command, regions: dict[int, memoryview], out: list[bytes],
            read: Optional[ReadFn] = None, defer: Optional[DeferFn] = None,
            caps: Optional[dict[int, Capability]] = None) -> None:
    """Run one command and append its completion frames to ``out`` (refusals become error completions).

    Checks the data-plane layer owns (the core checks extent, fence and range): a data digest, a
    known opcode, and a length above 0 for every opcode that moves or zeroes bytes (a 0-byte command
    is a peer's mistake, not an I/O: refusing it keeps the drive and the stream out of it)."""
    core.stats.commands += 1
    t0 = time.perf_counter()
    try:
        if not cmd.digest_ok:
            raise RemoteError(Status.DIGEST, "data digest mismatch")
        op = cmd.opcode
        ok_flags = cmd.flags & dp.HDGST
        if op == dp.Opcode.AUTH:
            _accept_capability(core, cmd, caps if caps is not None else {})
            out.append(dp.encode_completion(cmd.tag, 0, 0, 0, ok_flags))
            return
        if core.secrets and op != dp.NOP:
            _authorize(core, cmd, caps if caps is not None else {})
        if op == dp.READ:
            if not cmd.length:
                raise RemoteError(Status.INVALID, "READ of 0 bytes")
            if read is None:
                read_frames(core, cmd, out)
            else:
                read(cmd, out)
            return
        if op == dp.WRITE:
            payload = cmd.payload
            if payload is None:
                raise RemoteError(Status.INVALID, "WRITE of 0 bytes")
            core.write(cmd, payload, fua=bool(cmd.flags & dp.FUA))
        elif op == dp.Opcode.READ_REGION:
            core.readinto(cmd, _region(regions, cmd))
        elif op == dp.Opcode.WRITE_REGION:
            core.write(cmd, _region(regions, cmd), fua=bool(cmd.flags & dp.FUA))
        elif op in (dp.Opcode.WRITE_ZEROES, dp.Opcode.DISCARD):
            if not cmd.length:
                raise RemoteError(Status.INVALID, f"{dp.Opcode(op).name} of 0 bytes")
            core.zero(cmd)
        elif op == dp.FLUSH:
            drives = core.flush_drives(cmd)  # refusals (unknown extent, stale generation) answer now
            if defer is not None and defer(cmd, drives):
                return  # fdatasync on the drives' worker threads; the connection completes it
            core.flush(cmd)
        elif op != dp.NOP:
            raise RemoteError(Status.INVALID, f"unknown opcode {op}")
        out.append(dp.encode_completion(cmd.tag, 0, 0, 0, ok_flags))
    except RemoteError as exc:
        core.stats.error(Status(exc.status))
        out.append(dp.error_completion(cmd.tag, exc.status, str(exc), exc.info, cmd.flags & (dp.HDGST | dp.DDGST)))
    finally:
        core.stats.observe(_OP_NAMES.get(cmd.opcode, "other"), time.perf_counter() - t0)
