"""NBD export of a block device (a pool volume, or a plain file): the asyncio side of ``proto``.

Many requests are in flight per connection (each one a task), within a per-connection budget of
commands and bytes (see ``_Connection``): a client that stops reading replies, or pipelines more
than the budget, is simply not read from until its replies drain, so memory stays bounded whatever
it sends. Replies go out whole, each with one ``writelines``. Several connections may serve one
export (multi-conn): they share the same device, so FLUSH on any connection makes every completed
write durable. Invalid requests are refused by the codec with nbdkit's error codes (``proto``);
any failure below (agent unreachable, drive error) -> EIO for that request only; the connection and
the server go on. Input that cannot be answered drops only that connection, with one log line.

Compiled transmission: once a client of a pool volume enters transmission, the connection is handed to
the compiled engine (``client/nbd/_cnbd.c`` through ``client/nbd/engine.py``): native threads frame,
validate and answer requests within the same budget, post small reads and writes straight to the agents
and hand everything else back to ``_serve`` here. With ``NVPOOL_PURE_PYTHON=1``, when the module is not
built, or for ``--file`` exports, this module serves the whole connection itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from typing import Any, Optional, Union

from nvpool.client.blockdev import BlockDevice, check_range
from nvpool.client.nbd import engine as nbdengine
from nvpool.client.nbd import proto as nbd
from nvpool.proto.errors import NvpoolError, UsageError

logger = logging.getLogger(__name__)

#: per-connection budget: commands in flight (admitted, reply not yet handed to the transport) ...
MAX_IN_FLIGHT = 128
#: ... and bytes they pin (WRITE payloads, READ buffers); a single request is admitted regardless, so a
#: request up to ``nbd.HARD_MAX_REQUEST`` is always served
MAX_BYTES_IN_FLIGHT = 16 * 1024 * 1024
#: transport write buffer: above HIGH nothing new is admitted until it drains below LOW. HIGH must
#: cover what a good client keeps outstanding (fio QD32 x 1 MiB: 32 MiB): a pause in steady state
#: costs half the sequential throughput (measured: 2.4 -> 1.0 GB/s with 8 or 16 MiB). Worst case per
#: connection that never reads: 16 MiB being served + 32 MiB of replies (+16 MiB RSS measured with
#: an 8 MiB mark, +48 MiB with this one; nbdkit: +17 MiB).
WRITE_HIGH_WATER = 32 * 1024 * 1024
WRITE_LOW_WATER = 8 * 1024 * 1024


#: numbers for Unix-socket NBD clients in log lines (they have no peer address)
_UNIX_PEERS = itertools.count(1)


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
    """One client connection: pulls requests from the codec only while the budget allows.

    Budget (per connection): at most ``MAX_IN_FLIGHT`` commands and ``MAX_BYTES_IN_FLIGHT`` bytes of
    payload/read buffers from the moment a request's header is admitted until its reply is handed to
    the transport; and nothing is admitted while the transport's write buffer is above its high-water
    mark (``pause_writing``), i.e. while the client does not consume replies. A request alone is
    always admitted (so one up to ``nbd.HARD_MAX_REQUEST`` can be served). When a request cannot be
    admitted the connection stops reading (``pause_reading``); the bytes stay in the kernel, and the
    codec holds at most one receive chunk. Worst case per connection: about one budget of buffers
    being served plus one budget of replies over the high-water mark, plus one chunk.
    """

    def __init__(self, server: "NBDServer") -> None:
        self.server = server
        self.codec = nbd.ServerConnection(server.lookup, server.names)
        self.transport: Optional[asyncio.Transport] = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.peer: Any = None
        self.in_flight = 0  # admitted requests whose reply is not yet handed to the transport
        self.bytes_in_flight = 0  # their cost (payloads, read buffers)
        self._reading_paused = False
        self._writing_paused = False
        self._pumping = False
        self._closing = False
        self._out: list[Union[bytes, bytearray, memoryview]] = []
        self._out_requests = 0
        self._out_bytes = 0
        self._flush_scheduled = False
        #: the compiled engine serving this connection's transmission phase (client/nbd/engine.py), if any
        self._link: Optional[nbdengine.EngineLink] = None
        self._handing_off = False

    # ------------------------------------------------------------------ transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # a Unix-socket peer has no address: number it, so each connection's log lines can be told apart
        self.peer = transport.get_extra_info("peername") or f"unix#{next(_UNIX_PEERS)}"
        try:
            self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)  # type: ignore[union-attr]
        except (AttributeError, NotImplementedError):  # pragma: no cover - every stream transport has it
            pass
        transport.write(self.codec.greeting())  # type: ignore[attr-defined]
        self.server.connections.add(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None
        self.server.connections.discard(self)
        if self._link is not None:
            self._link.close()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.codec.receive_data(data)
        self._pump()

    # ------------------------------------------------------------------ admission (the budget)
    def _pump(self) -> None:
        """Pull and start every request the budget admits; pause or resume reading accordingly."""
        if self._pumping or self.transport is None or self._handing_off:
            return
        self._pumping = True
        blocked = False
        codec = self.codec
        try:
            while self.transport is not None:
                cost = codec.next_cost()
                if self._writing_paused or (cost is not None and self.in_flight and (
                        self.in_flight >= MAX_IN_FLIGHT or self.bytes_in_flight + cost > MAX_BYTES_IN_FLIGHT)):
                    # over budget: leave the request in the codec (and the rest in the kernel); a request
                    # alone is always admitted, so one up to HARD_MAX_REQUEST is served
                    blocked = True
                    break
                ev = codec.next_event()
                if isinstance(ev, nbd.Request):  # the hot path: requests never come with bytes to send
                    self._request(ev)
                    continue
                out = codec.data_to_send()  # option replies
                if out:
                    self.transport.write(out)
                if ev is None:
                    break
                self._event(ev)
                if self._handing_off:
                    return
        except nbd.NBDProtocolError as exc:
            self._drop(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug must cost one connection, not the server
            self._drop(f"internal error: {exc.__class__.__name__}: {exc}")
            logger.debug("internal error on NBD client %s", self.peer, exc_info=True)
            return
        finally:
            self._pumping = False
        if self.transport is None:
            return
        if blocked and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not blocked and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def _drop(self, why: str) -> None:
        logger.warning("dropping NBD client %s: %s", self.peer, why)
        if self.transport is not None:
            self.transport.abort()

    def _request(self, req: nbd.Request) -> None:
        self.in_flight += 1
        if req.error:
            logger.debug("NBD client %s: refused %s at %d+%d: %s", self.peer, nbd.command_name(req.command),
                         req.offset, req.length, req.message)
            self._send([self.codec.reply(req.handle, req.error, req.message)], req)
            return
        if req.command <= nbd.CMD_WRITE:  # READ or WRITE: pins its length (``Request.cost``)
            self.bytes_in_flight += req.length
        if not (req.command == nbd.CMD_READ and self._fast_read(req)):
            task = asyncio.ensure_future(self._serve(req))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _event(self, ev: nbd.Event) -> None:
        if isinstance(ev, nbd.Request):
            self._request(ev)
        elif isinstance(ev, nbd.Disconnect):
            self._closing = True
            self._close_if_idle()
        elif isinstance(ev, nbd.Ready):
            logger.info("NBD client %s opened export %r", self.peer, ev.export.name)
            if self.server.use_engine and nbdengine.usable(self.server.device):
                self._begin_handoff()

    def _begin_handoff(self) -> None:
        """Serve the transmission phase from the compiled engine (client/nbd/engine.py): stop reading here
        (the engine reads the socket from now on); if the engine cannot start, go on in Python."""
        assert self.transport is not None
        self._handing_off = True
        self.transport.pause_reading()

        async def handoff() -> None:
            link = nbdengine.EngineLink(self, self.server.device)
            try:
                ok = await link.start()
            except Exception as exc:  # noqa: BLE001 - the Python path serves the connection instead
                logger.warning("NBD client %s: the compiled engine did not start (%s); serving it in Python",
                               self.peer, exc)
                link.close()
                ok = False
            if ok:
                self._link = link
                return
            self._handing_off = False
            if self.transport is not None:
                self.transport.resume_reading()
                self._reading_paused = False
                self._pump()

        task = asyncio.ensure_future(handoff())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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

        def done(f: "asyncio.Future[object]") -> None:
            try:
                finish(f)
            except Exception:  # noqa: BLE001 - any trouble: the full path retries and maps errors
                task = asyncio.ensure_future(self._serve(req))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                return
            self._send(self.codec.read_reply(req.handle, req.offset, buf), req)

        fut.add_done_callback(done)
        return True

    # ------------------------------------------------------------------ replies
    def _close_if_idle(self) -> None:
        if self._closing and not self.in_flight and not self._out and self.transport is not None:
            self.transport.close()

    def _send(self, frames: list[Union[bytes, bytearray, memoryview]], req: nbd.Request) -> None:
        """Queue a request's whole reply; replies finished in one event-loop turn go out in one writelines."""
        if self._link is not None:  # a request the compiled engine handed to Python: the reply goes back to it
            self._link.reply(req, frames)
            return
        self._out.extend(frames)
        self._out_requests += 1
        if req.command <= nbd.CMD_WRITE and not req.error:
            self._out_bytes += req.length  # ``req.cost``, inline: this is the hot path
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        self.in_flight -= self._out_requests
        self.bytes_in_flight -= self._out_bytes
        self._out_requests = self._out_bytes = 0
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)  # may call pause_writing: then nothing more is admitted
        self._close_if_idle()
        if self._reading_paused:
            self._pump()

    async def _serve(self, req: nbd.Request, timeout: Optional[float] = None) -> None:
        """Serve a request the codec validated (range, flags, size); device errors map to EINVAL/EIO.
        ``timeout``: what is left of the I/O's budget (a request the compiled engine handed back late)."""
        dev = self.server.device
        codec = self.codec
        kw: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            if req.command == nbd.CMD_READ:
                buf = bytearray(req.length)
                view = memoryview(buf)
                if req.length <= nbd.MAX_REQUEST:
                    await dev.readinto(view, req.offset, **kw)
                else:
                    for pos in range(0, req.length, nbd.MAX_REQUEST):  # above 32 MiB: in pieces, one reply
                        await dev.readinto(view[pos : pos + nbd.MAX_REQUEST], req.offset + pos, **kw)
                self._send(codec.read_reply(req.handle, req.offset, buf), req)
                return
            if req.command in (nbd.CMD_WRITE, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES) and self.server.read_only:
                self._send([codec.reply(req.handle, nbd.EPERM, "export is read-only")], req)
                return
            fua = bool(req.flags & nbd.CMD_FLAG_FUA)
            if req.command == nbd.CMD_WRITE:
                assert req.data is not None
                data = memoryview(req.data)
                for pos in range(0, req.length, nbd.MAX_REQUEST):
                    await dev.write(req.offset + pos, data[pos : pos + nbd.MAX_REQUEST], fua, **kw)
            elif req.command == nbd.CMD_FLUSH:
                await dev.flush(**kw)
            elif req.command == nbd.CMD_TRIM:
                check_range(dev.size, req.offset, req.length)
                await dev.discard(req.offset, req.length)
                if fua:
                    await dev.flush()
            elif req.command == nbd.CMD_WRITE_ZEROES:
                await dev.write_zeroes(req.offset, req.length)
                if fua:
                    await dev.flush()
            elif req.command == nbd.CMD_CACHE:
                check_range(dev.size, req.offset, req.length)
            else:
                self._send([codec.reply(req.handle, nbd.EINVAL, f"command {req.command} is not supported")], req)
                return
            self._send([codec.reply(req.handle)], req)
        except UsageError as exc:
            self._send([codec.reply(req.handle, nbd.EINVAL, str(exc))], req)
        except NvpoolError as exc:
            logger.warning("NBD %s at %d+%d failed: %s", nbd.command_name(req.command), req.offset, req.length, exc)
            self._send([codec.reply(req.handle, nbd.EIO, str(exc))], req)
        except OSError as exc:
            logger.warning("NBD %s failed: %s", nbd.command_name(req.command), exc)
            self._send([codec.reply(req.handle, nbd.EIO, exc.strerror or str(exc))], req)
        except Exception as exc:  # noqa: BLE001 - a bug fails this request, with one line, not the connection
            logger.warning("NBD %s at %d+%d failed: %s: %s", nbd.command_name(req.command), req.offset, req.length,
                           exc.__class__.__name__, exc)
            logger.debug("NBD request failure", exc_info=True)
            self._send([codec.reply(req.handle, nbd.EIO, "internal error")], req)


class NBDServer:
    def __init__(self, device: BlockDevice, name: str, read_only: bool = False, description: str = "",
                 use_engine: bool = True) -> None:
        self.device = device
        #: hand pool-volume connections to the compiled engine once they transmit (client/nbd/engine.py)
        self.use_engine = use_engine
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
            if c._link is not None:
                c._link.close()
            if c.transport is not None:
                c.transport.close()
        for srv in self._servers:
            await srv.wait_closed()
