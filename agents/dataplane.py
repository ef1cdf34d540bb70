"""The agent's data-plane server: the asyncio glue between sockets and ``AgentCore``.

One ``AgentConnection`` per client connection (TCP or Unix socket). Bytes go into the sans-IO
``CommandDecoder`` (WRITE payloads are received straight into one buffer each); each command is
executed in order and answered with one completion. Reads without a data digest go out with
``os.sendfile`` from the drive's page cache whenever the transport has nothing queued (the header
through the transport, the payload from the kernel); otherwise one ``pread`` and ``writelines``.

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
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections import deque
from typing import Any, Callable, Optional

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
#: reads at least this large use sendfile (smaller ones: one pread + writelines is cheaper)
SENDFILE_MIN = 64 * 1024
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
        self._sock_fd = -1
        self._peer: Any = None
        self._use_sendfile = True
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
        if transport.get_extra_info("sslcontext") is not None:
            self._use_sendfile = False  # the payload must go through TLS, not around it
        if sock is not None:
            self._sock_fd = sock.fileno()
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=REPLY_HIGH_WATER)  # type: ignore[attr-defined]

    @property
    def inflight(self) -> int:
        """Commands received and not yet answered (queued behind a full reply buffer, or flushing)."""
        return len(self._pending) + len(self._flushes)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.core.stats.connections -= 1
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
        small = SENDFILE_MIN if self._use_sendfile and self._sock_fd >= 0 else dp.MAX_IO + 1
        while True:
            pos, stop = _cserve.serve(dec.scratch, dec.pos, dec.end, core, caps, self.regions, out, small,
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
        futs = [loop.run_in_executor(d.worker, d.flush) for d in drives]
        tag, flags = cmd.tag, cmd.flags & (dp.HDGST | dp.DDGST)

        async def finish() -> None:
            try:
                await asyncio.gather(*futs)
                frames = [dp.encode_completion(tag, 0, 0, 0, flags & dp.HDGST)]
            except DriveError as exc:
                self.core.stats.error(Status.IO_ERROR)
                frames = [dp.error_completion(tag, Status.IO_ERROR, str(exc), 0, flags)]
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
        transport = self.transport
        assert transport is not None
        flags = cmd.flags & (dp.HDGST | dp.DDGST)
        n = cmd.length
        if self._use_sendfile and n >= SENDFILE_MIN and not flags & dp.DDGST and self._sock_fd >= 0:
            drive, off, rec = self.core.locate(cmd)
            self._send()  # completions batched before this one go first
            if transport.get_write_buffer_size() == 0:
                transport.write(dp.encode_completion(cmd.tag, 0, n, 0, flags))
                # header sent and nothing queued: the payload may go straight from the page cache
                sent = self._sendfile(drive.fd, off, n) if transport.get_write_buffer_size() == 0 else 0
                self.core.stats.io(rec, False, sent)
                if sent < n:  # socket full: the rest through the transport, which keeps the order
                    cmd.offset += sent
                    cmd.length = n - sent
                    try:
                        data = self.core.read(cmd)
                    except RemoteError as exc:  # the OK header is out: only closing can tell the peer
                        self._drop("read failed after its completion was sent: %s", exc)
                        return
                    transport.write(data)
                return
        self._out_bytes += n
        read_frames(self.core, cmd, out)

    def _sendfile(self, file_fd: int, offset: int, count: int) -> int:
        sent = 0
        while sent < count:
            try:
                k = os.sendfile(self._sock_fd, file_fd, offset + sent, count - sent)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                logger.info("sendfile to %s failed (%s); using pread", self._peer, exc)
                self._use_sendfile = False
                break
            if k == 0:
                break
            sent += k
        return sent


async def start_tcp(core: AgentCore, host: str, port: int,
                    ssl_context: Optional[ssl.SSLContext] = None) -> asyncio.base_events.Server:
    """Serve the data plane on TCP; with ``ssl_context``, TLS with client certificates required
    (``sendfile`` is then off: the bytes must pass through the TLS layer)."""
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


def _accept_capability(core: AgentCore, cmd: dp.Command, caps: dict[int, Capability]) -> None:
    blob = bytes(cmd.payload) if cmd.payload is not None else b""
    if not core.secrets:
        return  # an agent core without keys (in-process tests) checks nothing
    try:
        cap = capability.verify(blob, core.secrets)
    except capability.CapabilityError as exc:
        raise RemoteError(Status.DENIED, str(exc)) from None
    if cap.volume_id not in caps and len(caps) >= MAX_CAPS:
        raise RemoteError(Status.DENIED, f"a connection holds at most {MAX_CAPS} capabilities")
    caps[cap.volume_id] = cap


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
