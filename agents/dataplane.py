"""The agent's data-plane server: the asyncio glue between sockets and ``AgentCore``.

One ``AgentConnection`` per client connection (TCP or Unix socket). Bytes go into the sans-IO
``CommandDecoder`` (WRITE payloads are received straight into one buffer each); each command is
executed in order and answered with one completion. Reads without a data digest go out with
``os.sendfile`` from the drive's page cache whenever the transport has nothing queued (the header
through the transport, the payload from the kernel); otherwise one ``pread`` and ``writelines``.

A peer's bad bytes never take the agent down: framing errors drop that connection (one log line);
a well-framed but invalid command gets an error completion and the connection carries on.
Back-pressure: when the transport's write buffer is full, the agent stops reading commands.

One-sided ("RDMA-style") opcodes work on memory regions that the client registered for this
connection (``regions``: region id -> writable memoryview); see ``agents/shm.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, Callable, Optional

from nvpool.agents.core import AgentCore
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import ProtocolError, RemoteError, Status

logger = logging.getLogger(__name__)

#: reads at least this large use sendfile (smaller ones: one pread + writelines is cheaper)
SENDFILE_MIN = 64 * 1024


class AgentConnection(asyncio.BufferedProtocol):
    def __init__(self, core: AgentCore, regions: Optional[dict[int, memoryview]] = None) -> None:
        self.core = core
        self.regions: dict[int, memoryview] = regions if regions is not None else {}
        self.decoder = dp.CommandDecoder()
        self.transport: Optional[asyncio.Transport] = None
        self._sock_fd = -1
        self._peer: Any = None
        self._paused = False
        self._use_sendfile = True
        #: completions produced while handling one receive, sent with one writelines
        self._out: list[bytes] = []

    # ------------------------------------------------------------------ asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        self._peer = transport.get_extra_info("peername") or "unix"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._sock_fd = sock.fileno()
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=8 * 1024 * 1024)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None
        if exc is not None:
            logger.info("client %s went away: %s", self._peer, exc)

    def pause_writing(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            commands = self.decoder.advance(nbytes)
        except ProtocolError as exc:
            logger.warning("dropping client %s: %s", self._peer, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for cmd in commands:
            if self.transport is None or self.transport.is_closing():
                return
            assert isinstance(cmd, dp.Command)
            self._execute(cmd)
        self._send()

    def _send(self) -> None:
        """Send the batch and empty it in place (``execute`` callers hold a reference to it)."""
        if self._out and self.transport is not None:
            self.transport.writelines(self._out)  # copies what it cannot send now
        self._out.clear()

    def eof_received(self) -> Optional[bool]:
        return False

    # ------------------------------------------------------------------ commands
    def _execute(self, cmd: dp.Command) -> None:
        execute(self.core, cmd, self.regions, self._out, self._read)

    def _read(self, cmd: dp.Command, out: list[bytes]) -> None:
        transport = self.transport
        assert transport is not None
        flags = cmd.flags & (dp.HDGST | dp.DDGST)
        n = cmd.length
        if self._use_sendfile and n >= SENDFILE_MIN and not flags & dp.DDGST and self._sock_fd >= 0:
            drive, off, _ = self.core.locate(cmd)
            self._send()  # completions batched before this one go first
            if transport.get_write_buffer_size() == 0:
                transport.write(dp.encode_completion(cmd.tag, 0, n, 0, flags))
                # header sent and nothing queued: the payload may go straight from the page cache
                sent = self._sendfile(drive.fd, off, n) if transport.get_write_buffer_size() == 0 else 0
                self.core.stats.bytes_read += sent
                if sent < n:  # socket full: the rest through the transport, which keeps the order
                    cmd.offset += sent
                    cmd.length = n - sent
                    transport.write(self.core.read(cmd))
                return
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


async def start_tcp(core: AgentCore, host: str, port: int) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AgentConnection(core), host, port, reuse_address=True, backlog=256)


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
    if cmd.region_offset + cmd.length > len(region):
        raise RemoteError(
            Status.REGION,
            f"[{cmd.region_offset}, {cmd.region_offset + cmd.length}) is outside region {cmd.region} "
            f"({len(region)} bytes)",
        )
    return region[cmd.region_offset : cmd.region_offset + cmd.length]


def execute(core: AgentCore, cmd: dp.Command, regions: dict[int, memoryview], out: list[bytes],
            read: Optional[ReadFn] = None) -> None:
    """Run one command and append its completion frames to ``out`` (refusals become error completions)."""
    core.stats.commands += 1
    try:
        if not cmd.digest_ok:
            raise RemoteError(Status.DIGEST, "data digest mismatch")
        op = cmd.opcode
        ok_flags = cmd.flags & dp.HDGST
        if op == dp.READ:
            if read is None:
                read_frames(core, cmd, out)
            else:
                read(cmd, out)
            return
        if op == dp.WRITE:
            assert cmd.payload is not None
            core.write(cmd, cmd.payload, fua=bool(cmd.flags & dp.FUA))
        elif op == dp.Opcode.READ_REGION:
            core.readinto(cmd, _region(regions, cmd))
        elif op == dp.Opcode.WRITE_REGION:
            core.write(cmd, _region(regions, cmd), fua=bool(cmd.flags & dp.FUA))
        elif op in (dp.Opcode.WRITE_ZEROES, dp.Opcode.DISCARD):
            core.zero(cmd)
        elif op == dp.FLUSH:
            core.flush(cmd)
        elif op != dp.NOP:
            raise RemoteError(Status.INVALID, f"unknown opcode {op}")
        out.append(dp.encode_completion(cmd.tag, 0, 0, 0, ok_flags))
    except RemoteError as exc:
        core.stats.error(Status(exc.status))
        out.append(dp.error_completion(cmd.tag, exc.status, str(exc), exc.info, cmd.flags & (dp.HDGST | dp.DDGST)))
