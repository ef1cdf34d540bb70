"""Same-host data plane with registered memory: the agent side of the one-sided ("RDMA-style") transport.

A client on the agent's own server connects to the agent's Unix socket and first sends a *hello*
that registers memory regions: for each, a region id and size, with the memfd passed alongside
(``SCM_RIGHTS``)::

    b"NVSH" u32 version=1 u32 count, then count x (u32 region_id, u64 size)   + count memfds

The agent maps every region (MAP_SHARED), answers ``b"NVOK" u32 0`` (or ``b"NVNO" u32 reason`` and
closes), and the connection then carries the ordinary data-plane protocol. READ_REGION makes the agent
``preadv`` extent bytes straight into the client's region and send only a completion (like an RDMA
WRITE); WRITE_REGION makes it take the bytes from the region (like an RDMA READ). A command naming
bytes outside a registered region is refused (``Status.REGION``) before anything is touched, so the
agent only ever writes a region within the bounds of the command it serves. Mappings are dropped
when the connection closes. A bad hello closes only that connection.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
import struct
from typing import Any, Optional

from nvpool.agents.core import AgentCore
from nvpool.agents.dataplane import AgentConnection, NativeConnection, native_enabled, release_regions

logger = logging.getLogger(__name__)

HELLO = struct.Struct("<4sII")
REGION = struct.Struct("<IQ")
ANSWER = struct.Struct("<4sI")
MAX_REGIONS = 64
MAX_REGION_SIZE = 1 << 40
HANDSHAKE_TIMEOUT = 5.0


class RegionConnection(AgentConnection):
    """A data-plane connection that owns the mappings of its registered regions."""

    def __init__(self, core: AgentCore, maps: list[mmap.mmap], regions: dict[int, memoryview]) -> None:
        super().__init__(core, regions)
        self._maps = maps

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        release_regions(self.regions, self._maps)


def _recv_exact_with_fds(sock: socket.socket, n: int, max_fds: int) -> tuple[bytes, list[int]]:
    data, fds = b"", []
    while len(data) < n:
        chunk, got, _flags, _addr = socket.recv_fds(sock, n - len(data), max_fds)
        fds += got
        if not chunk:
            raise ConnectionError("closed during the hello")
        data += chunk
    return data, fds


def handshake(sock: socket.socket) -> tuple[list[mmap.mmap], dict[int, memoryview]]:
    """Blocking (run in a thread, with a timeout): read the hello, map the regions."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    fds: list[int] = []
    maps: list[mmap.mmap] = []
    try:
        head, fds = _recv_exact_with_fds(sock, HELLO.size, MAX_REGIONS)
        magic, version, count = HELLO.unpack(head)
        if magic != b"NVSH" or version != 1 or count > MAX_REGIONS:
            raise ValueError(f"bad hello (magic {magic!r}, version {version}, {count} regions)")
        body, more = _recv_exact_with_fds(sock, REGION.size * count, MAX_REGIONS) if count else (b"", [])
        fds += more
        if len(fds) != count:
            raise ValueError(f"hello names {count} regions but carries {len(fds)} descriptors")
        regions: dict[int, memoryview] = {}
        for i in range(count):
            rid, size = REGION.unpack_from(body, i * REGION.size)
            if rid == 0 or rid in regions or not 0 < size <= MAX_REGION_SIZE:
                raise ValueError(f"bad region {rid} of {size} bytes")
            if os.fstat(fds[i]).st_size < size:
                raise ValueError(f"region {rid} is smaller than announced")
            m = mmap.mmap(fds[i], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            maps.append(m)
            regions[rid] = memoryview(m)
        sock.sendall(ANSWER.pack(b"NVOK", 0))
        sock.settimeout(None)
        sock.setblocking(False)
        return maps, regions
    except BaseException:
        for m in maps:
            m.close()
        raise
    finally:
        for fd in fds:
            os.close(fd)


class ShmServer:
    """Accepts same-host clients on a Unix socket; each one registers its regions first."""

    def __init__(self, core: AgentCore, path: str) -> None:
        self.core = core
        self.path = path
        self.sock: Optional[socket.socket] = None
        self._task: Optional[asyncio.Task[None]] = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(256)
        sock.setblocking(False)
        self.sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            t = loop.create_task(self._serve(conn))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(True)
        try:
            maps, regions = await loop.run_in_executor(None, handshake, conn)
        except Exception as exc:  # OSError, ValueError, struct.error, ...: this client only, one line
            logger.warning("refusing same-host client: %s", exc)
            try:
                conn.setblocking(True)
                conn.settimeout(0.5)
                conn.sendall(ANSWER.pack(b"NVNO", 1))
            except OSError:
                pass
            conn.close()
            return
        if native_enabled():
            try:
                NativeConnection(self.core, conn, regions, maps)
            except Exception as exc:  # (no memory, no thread): this client only, one line
                logger.warning("cannot serve a same-host client: %s", exc)
                conn.close()
            return
        await loop.connect_accepted_socket(lambda: RegionConnection(self.core, maps, regions), conn)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in self._conns:
            t.cancel()
        if self.sock is not None:
            self.sock.close()


async def start_unix(core: AgentCore, path: str) -> Any:
    server = ShmServer(core, path)
    await server.start()
    return server
