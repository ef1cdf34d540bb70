"""One-sided ("RDMA-style") transport for a client on the same server as the agent.

The narrow interface a verbs transport would implement too: *register a region* (``Region``; the
memfd is handed to the agent in the connection's hello), *post a read* (READ_REGION: the agent places
the bytes into our region and sends only a completion), *post a write* (WRITE_REGION: the agent takes
the bytes from our region), *completion* (the same tagged completions as TCP).

``ShmConnection.submit`` has the signature of ``client.transport.AgentConnection.submit``, so the
volume layer does not know which transport it uses. READ/WRITE go through a per-connection bounce
region (one memcpy on our side, no socket payload at all); when the caller's buffer lies inside a
region from ``AsyncPool.alloc`` (registered with every connection), the agent reads into it directly:
zero copies in user space.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import math
import mmap
import os
import socket
import struct
from typing import Optional, Sequence, Union

import numpy as np

from nvpool.proto.transport import AgentConnection
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import UnavailableError

HELLO = struct.Struct("<4sII")
REGION = struct.Struct("<IQ")
ANSWER = struct.Struct("<4sI")
PAGE = 4096
BOUNCE_ID = 1

Buffer = Union[bytes, bytearray, memoryview]


def buffer_address(buf: memoryview) -> int:
    """Address of the first byte of a (writable or read-only) contiguous buffer."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if len(buf) else 0


class Region:
    """Shared memory that agents may read and write (a memfd, mapped here and by the agent)."""

    def __init__(self, region_id: int, size: int) -> None:
        self.region_id = region_id
        self.size = -(-size // PAGE) * PAGE
        self.fd = os.memfd_create(f"nvpool-region-{region_id}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def offset_of(self, buf: memoryview) -> Optional[int]:
        """Offset of ``buf`` inside this region, or None if it is not (entirely) inside."""
        addr = buffer_address(buf)
        off = addr - self.base
        if 0 <= off and off + len(buf) <= self.size:
            return off
        return None

    def array(self, nbytes: int) -> np.ndarray:
        return np.frombuffer(self.map, dtype=np.uint8, count=nbytes)


class SlotAllocator:
    """First-fit allocation of page-aligned byte ranges in the bounce region; waits when full."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, length)
        self._waiters: list[asyncio.Future[None]] = []

    def try_alloc(self, n: int) -> Optional[int]:
        n = -(-n // PAGE) * PAGE
        for i, (off, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = (off + n, length - n)
                return off
        return None

    async def alloc(self, n: int) -> int:
        n = -(-n // PAGE) * PAGE
        if n > self.size:
            raise UnavailableError(f"I/O of {n} bytes is larger than the shared region ({self.size})")
        while True:
            off = self.try_alloc(n)
            if off is not None:
                return off
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    def release(self, off: int, n: int) -> None:
        n = -(-n // PAGE) * PAGE
        i = bisect.bisect(self.free, (off, n))
        self.free.insert(i, (off, n))
        # merge with neighbours
        if i + 1 < len(self.free) and off + n == self.free[i + 1][0]:
            self.free[i] = (off, n + self.free[i + 1][1])
            del self.free[i + 1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == off:
            self.free[i - 1] = (self.free[i - 1][0], self.free[i - 1][1] + self.free[i][1])
            del self.free[i]
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


class ShmConnection(AgentConnection):
    posts_directly = False
    #: READs and WRITEs of at most this many bytes whose buffer is not registered travel inline on the
    #: Unix socket (plain READ/WRITE: the kernel's one copy each way), not through the bounce region;
    #: for small I/O the slot bookkeeping and our memcpy cost more than the socket's copy (measured:
    #: tests/bench_dataplane.py, 4K shm rows). Registered buffers always go through their region.
    inline_max = 64 * 1024

    def __init__(self, address: str, window: int, bounce: Region, user_regions: Sequence[Region],
                 io_timeout: float = 30.0) -> None:
        super().__init__(address, window, io_timeout)
        self.bounce = bounce
        self.user_regions = list(user_regions)
        self.slots = SlotAllocator(bounce.size)
        #: start()'s futures -> the region command's own future
        self._outer: dict[asyncio.Future[dp.Completion], asyncio.Future[dp.Completion]] = {}

    def _user_region(self, buf: Optional[Buffer]) -> Optional[tuple[int, int]]:
        if buf is None or not self.user_regions:
            return None
        view = memoryview(buf)
        for r in self.user_regions:
            off = r.offset_of(view)
            if off is not None:
                return r.region_id, off
        return None

    def start(
        self, opcode: int, extent_id: int, offset: int, length: int, generation: int,
        dest: Optional[memoryview] = None, payload: Optional[Buffer] = None, flags: int = 0,
        deadline: float = math.inf,
    ) -> "Optional[asyncio.Future[dp.Completion]]":
        """A READ or WRITE through the bounce region, posted now; None if it would have to wait (or
        uses registered memory or digests: ``submit`` handles those). A READ's data is copied out of
        the region when it completes, and never once the caller has stopped waiting (``outer`` is
        done: cancelled, or abandoned by a hedged read that lost)."""
        is_read = opcode == dp.READ
        buf = dest if is_read else payload if opcode == dp.WRITE else None
        if buf is None or length == 0 or flags & ~dp.FUA or self.closed or (
            self._drain is not None and not self._drain.done()
        ) or self._user_region(buf) is not None:
            return None
        if length <= self.inline_max:  # small: inline on the socket, as over TCP
            return super().start(opcode, extent_id, offset, length, generation, dest, payload, flags, deadline)
        off = self.slots.try_alloc(length)
        if off is None:
            return None
        if not is_read:
            self.bounce.view[off : off + length] = buf
        op = dp.Opcode.READ_REGION if is_read else dp.Opcode.WRITE_REGION
        inner = self._post(op, extent_id, offset, length, generation, None, None, flags, BOUNCE_ID, off, 0, deadline)
        outer: asyncio.Future[dp.Completion] = self._loop.create_future()
        self._outer[outer] = inner

        def done(f: "asyncio.Future[dp.Completion]") -> None:
            self._outer.pop(outer, None)
            try:
                if outer.done():
                    return
                exc = f.exception()
                if exc is not None:
                    outer.set_exception(exc)
                    return
                comp = f.result()
                if comp.status == 0 and is_read:
                    assert dest is not None
                    dest[:] = self.bounce.view[off : off + length]
                    comp.length = length  # the payload went through the region, not the socket
                outer.set_result(comp)
            finally:
                self.slots.release(off, length)

        inner.add_done_callback(done)
        return outer

    def abandon(self, fut: "asyncio.Future[dp.Completion]") -> None:
        inner = self._outer.pop(fut, None)
        if inner is None:
            super().abandon(fut)
        elif not fut.done():
            fut.cancel()  # its completion then copies nothing into the caller's buffer

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
        if opcode not in (dp.READ, dp.WRITE) or length == 0:
            await super().submit(opcode, extent_id, offset, length, generation, payload, dest, flags, region, region_offset,
                                 deadline=deadline)
            return
        is_read = opcode == dp.READ
        op = dp.Opcode.READ_REGION if is_read else dp.Opcode.WRITE_REGION
        direct = self._user_region(dest if is_read else payload)
        if direct is None and length <= self.inline_max:  # small: inline on the socket, as over TCP
            await super().submit(opcode, extent_id, offset, length, generation, payload, dest, flags, deadline=deadline)
            return
        flags &= ~dp.DDGST  # no payload on the wire to digest
        if direct is not None:  # zero-copy: the agent uses the caller's (registered) memory
            await super().submit(op, extent_id, offset, length, generation, None, None, flags, *direct, deadline=deadline)
            return
        off = self.slots.try_alloc(length)
        if off is None:  # the bounce region is full (or too small: alloc says so)
            off = await self._within(self.slots.alloc(length), deadline, "no room in the shared region")
        try:
            if not is_read:
                assert payload is not None
                self.bounce.view[off : off + length] = payload
            await super().submit(op, extent_id, offset, length, generation, None, None, flags, BOUNCE_ID, off,
                                 deadline=deadline)
            if is_read:
                assert dest is not None
                dest[:] = self.bounce.view[off : off + length]
        finally:
            self.slots.release(off, length)


def _hello(path: str, regions: Sequence[Region], timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        msg = HELLO.pack(b"NVSH", 1, len(regions)) + b"".join(REGION.pack(r.region_id, r.size) for r in regions)
        sent = socket.send_fds(sock, [msg], [r.fd for r in regions])  # the fds travel with the first byte
        sock.sendall(memoryview(msg)[sent:])  # a blocking send may be partial
        answer = b""
        while len(answer) < ANSWER.size:
            chunk = sock.recv(ANSWER.size - len(answer))
            if not chunk:
                raise ConnectionError("agent closed the connection during the hello")
            answer += chunk
        magic, reason = ANSWER.unpack(answer)
        if magic != b"NVOK":
            raise ConnectionError(f"agent refused the memory registration (reason {reason})")
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


async def connect_shm(
    path: str, window: int = 8 * 1024 * 1024, user_regions: Sequence[Region] = (), timeout: float = 5.0,
    io_timeout: float = 30.0, name: str = "",
) -> ShmConnection:
    """Connect to an agent's Unix socket and register a bounce region plus ``user_regions``.
    ``name`` (the agent's TCP address) names the agent in errors, before the socket path."""
    loop = asyncio.get_running_loop()
    label = f"{name} (unix:{path})" if name else f"unix:{path}"
    bounce = Region(BOUNCE_ID, max(window, 16 * 1024 * 1024))
    try:
        sock = await loop.run_in_executor(None, _hello, path, [bounce, *user_regions], timeout)
        _, proto = await loop.create_unix_connection(
            lambda: ShmConnection(label, window, bounce, user_regions, io_timeout), sock=sock
        )
    except (OSError, ConnectionError) as exc:
        raise UnavailableError(f"cannot connect to agent {label}: {exc}") from exc
    return proto
