"""NBD export of a block device (a pool volume, or a plain file): the asyncio side of ``nbdproto``.

Many requests are in flight per connection (each one a task); replies go out whole, each with one
``writelines``. Several connections may serve one export (multi-conn): they share the same device,
so FLUSH on any connection makes every completed write durable. Errors map to NBD error codes:
out-of-range -> EINVAL (ENOSPC for writes past the end), read-only -> EPERM, any failure below
(agent unreachable, drive error) -> EIO for that request only; the connection and the server go on.
A malformed request drops only that connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, Optional, Union

from nvpool.client.blockdev import BlockDevice, check_range
from nvpool.client import nbdproto as nbd
from nvpool.proto.errors import NvpoolError, UsageError

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 128


class FileBlockDevice:
    """A plain file as a ``BlockDevice`` (``nvpool export --file``: the front end without the pool)."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self._size = os.fstat(self.fd).st_size
        self._ro = read_only

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._ro

    async def readinto(self, buf: memoryview, offset: int) -> None:
        check_range(self._size, offset, len(buf))
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    async def write(self, offset: int, data: Union[bytes, bytearray, memoryview], fua: bool = False) -> None:
        check_range(self._size, offset, len(data))
        os.pwrite(self.fd, data, offset)
        if fua:
            os.fdatasync(self.fd)

    async def flush(self) -> None:
        os.fdatasync(self.fd)

    async def write_zeroes(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        from nvpool.agents.osio import zero_range

        zero_range(self.fd, offset, length)

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length)

    def close(self) -> None:
        os.close(self.fd)


class _Connection(asyncio.Protocol):
    def __init__(self, server: "NBDServer") -> None:
        self.server = server
        self.codec = nbd.ServerConnection(server.lookup, server.names)
        self.transport: Optional[asyncio.Transport] = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.peer: Any = None
        self._paused = False
        self._closing = False
        self._out: list[Union[bytes, bytearray, memoryview]] = []
        self._flush_scheduled = False
        self.fast_in_flight = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername") or "unix"
        transport.write(self.codec.greeting())  # type: ignore[attr-defined]
        self.server.connections.add(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            out, events = self.codec.receive(data)
        except nbd.NBDProtocolError as exc:
            logger.warning("dropping NBD client %s: %s", self.peer, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        if out and self.transport is not None:
            self.transport.write(out)
        for ev in events:
            if isinstance(ev, nbd.Request):
                if ev.command == nbd.CMD_READ and self._fast_read(ev):
                    continue
                task = asyncio.ensure_future(self._serve(ev))
                self.tasks.add(task)
                task.add_done_callback(self._done)
            elif isinstance(ev, nbd.Disconnect):
                self._close_when_idle()
            elif isinstance(ev, nbd.Ready):
                logger.info("NBD client %s opened export %r", self.peer, ev.export.name)
        if len(self.tasks) >= MAX_IN_FLIGHT and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _fast_read(self, req: nbd.Request) -> bool:
        """Small reads of a pool volume: posted straight to the agent, answered from a callback
        (no task, no coroutine chain). Anything unusual goes the normal way (``_serve``)."""
        start = getattr(self.server.device, "start_read", None)
        finish = getattr(self.server.device, "finish_read", None)
        if start is None or finish is None or req.length > nbd.MAX_REQUEST:
            return False
        buf = bytearray(req.length)
        fut = start(memoryview(buf), req.offset)
        if fut is None:
            return False
        self.fast_in_flight += 1

        def done(f: "asyncio.Future[object]") -> None:
            self.fast_in_flight -= 1
            try:
                finish(f)
            except Exception:  # noqa: BLE001 - any trouble: the full path retries and maps errors
                task = asyncio.ensure_future(self._serve(req))
                self.tasks.add(task)
                task.add_done_callback(self._done)
                return
            self._send(self.codec.read_reply(req.handle, req.offset, buf))

        fut.add_done_callback(done)
        return True

    def _done(self, task: "asyncio.Task[None]") -> None:
        self.tasks.discard(task)
        if self._paused and len(self.tasks) < MAX_IN_FLIGHT // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._closing and not self.tasks and not self.fast_in_flight and not self._out and self.transport is not None:
            self.transport.close()

    def _close_when_idle(self) -> None:
        self._closing = True
        if not self.tasks and not self.fast_in_flight and not self._out and self.transport is not None:
            self.transport.close()

    def _send(self, frames: list[Union[bytes, bytearray, memoryview]]) -> None:
        """Queue a whole reply; replies finished in one event-loop turn go out in one writelines."""
        self._out.extend(frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)
        if self._closing and not self.tasks and self.transport is not None:
            self.transport.close()

    async def _serve(self, req: nbd.Request) -> None:
        dev = self.server.device
        codec = self.codec
        try:
            if req.command == nbd.CMD_READ:
                if req.length > nbd.MAX_REQUEST:
                    raise UsageError("request too large")
                check_range(dev.size, req.offset, req.length)
                buf = bytearray(req.length)
                await dev.readinto(memoryview(buf), req.offset)
                self._send(codec.read_reply(req.handle, req.offset, buf))
                return
            if req.command in (nbd.CMD_WRITE, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES) and self.server.read_only:
                self._send([codec.reply(req.handle, nbd.EPERM, "export is read-only")])
                return
            fua = bool(req.flags & nbd.CMD_FLAG_FUA)
            if req.command == nbd.CMD_WRITE:
                assert req.data is not None
                if req.offset + req.length > dev.size:
                    self._send([codec.reply(req.handle, nbd.ENOSPC, "write past the end of the export")])
                    return
                await dev.write(req.offset, req.data, fua)
            elif req.command == nbd.CMD_FLUSH:
                await dev.flush()
            elif req.command == nbd.CMD_TRIM:
                check_range(dev.size, req.offset, req.length)
                await dev.discard(req.offset, req.length)
                if fua:
                    await dev.flush()
            elif req.command == nbd.CMD_WRITE_ZEROES:
                if req.offset + req.length > dev.size:
                    self._send([codec.reply(req.handle, nbd.ENOSPC, "write past the end of the export")])
                    return
                await dev.write_zeroes(req.offset, req.length)
                if fua:
                    await dev.flush()
            elif req.command == nbd.CMD_CACHE:
                check_range(dev.size, req.offset, req.length)
            else:
                self._send([codec.reply(req.handle, nbd.EINVAL, f"command {req.command} is not supported")])
                return
            self._send([codec.reply(req.handle)])
        except UsageError as exc:
            self._send([codec.reply(req.handle, nbd.EINVAL, str(exc))])
        except NvpoolError as exc:
            logger.warning("NBD request %d at %d+%d failed: %s", req.command, req.offset, req.length, exc)
            self._send([codec.reply(req.handle, nbd.EIO, str(exc))])
        except OSError as exc:
            logger.warning("NBD request %d failed: %s", req.command, exc)
            self._send([codec.reply(req.handle, nbd.EIO, exc.strerror or str(exc))])


class NBDServer:
    def __init__(self, device: BlockDevice, name: str, read_only: bool = False, description: str = "") -> None:
        self.device = device
        self.name = name
        self.read_only = read_only or device.read_only
        self.description = description
        self.connections: set[_Connection] = set()
        self._servers: list[Any] = []

    def names(self) -> list[str]:
        return [self.name]

    def lookup(self, name: str) -> Optional[nbd.ExportInfo]:
        if name not in (self.name, ""):
            return None
        return nbd.ExportInfo(self.name, self.device.size, self.read_only, self.description)

    async def listen_tcp(self, host: str, port: int) -> str:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        self._servers.append(srv)
        return f"{host}:{srv.sockets[0].getsockname()[1]}"

    async def listen_unix(self, path: str) -> str:
        loop = asyncio.get_running_loop()
        if os.path.exists(path):
            os.unlink(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        srv = await loop.create_unix_server(lambda: _Connection(self), path)
        self._servers.append(srv)
        return path

    async def listen_socket(self, sock: "socket.socket") -> None:
        """Serve on a listening socket made elsewhere (shared by several worker processes)."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        else:
            srv = await loop.create_server(lambda: _Connection(self), sock=sock)
        self._servers.append(srv)

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        for srv in self._servers:
            await srv.wait_closed()
