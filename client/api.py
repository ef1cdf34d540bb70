"""The nvpool Python API.

Synchronous (any thread; an event loop runs in a background thread)::

    from nvpool.client import api
    pool = api.connect("127.0.0.1:7400")          # or NVPOOL_META
    pool.create_volume("train", "20G")
    vol = pool.open("train")
    vol.write(0, data)                             # bytes / bytearray / numpy array
    arr = vol.read(0, 1 << 20)                     # numpy uint8 array
    vol.readinto(buf, offset)                      # any writable buffer: numpy, bytearray, pinned memory
    vol.flush(); vol.close(); pool.close()

asyncio::

    pool = await api.AsyncPool.connect("127.0.0.1:7400")
    vol = await pool.open("train")                 # client.volume.AsyncVolume (a BlockDevice)
    await vol.readinto(memoryview(buf), offset)
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any, Coroutine, Optional, TypeVar, Union

import numpy as np

from nvpool.client.metaclient import MetaClient, VolumeInfo, default_meta
from nvpool.client.syncpath import MAX_FAST, FastPathMiss, SyncChannels
from nvpool.client.volume import AsyncVolume, ClientOptions, Connections
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import UsageError
from nvpool.proto.units import parse_size

T = TypeVar("T")
Buffer = Union[bytes, bytearray, memoryview, np.ndarray]

__all__ = ["AsyncPool", "Pool", "Volume", "ClientOptions", "VolumeInfo", "connect", "default_meta"]


class AsyncPool:
    """A connection to a pool: the metadata service plus on-demand connections to agents."""

    def __init__(self, meta: MetaClient, options: ClientOptions) -> None:
        self.meta = meta
        self.options = options
        self.connections = Connections(options)

    @classmethod
    async def connect(cls, meta_address: Optional[str] = None, options: Optional[ClientOptions] = None) -> "AsyncPool":
        return cls(MetaClient(meta_address or default_meta()), options or ClientOptions())

    async def open(self, name: str, read_only: bool = False) -> AsyncVolume:
        layout, endpoints = await self.meta.get_layout(name=name)
        layout.validate()
        return AsyncVolume(self.meta, self.connections, layout, endpoints, read_only, self.options)

    async def create_volume(
        self, name: str, size: Union[int, str], stripe_unit: Union[int, str] = 0, stripe_width: int = 0
    ) -> VolumeInfo:
        return await self.meta.create_volume(name, parse_size(size), parse_size(stripe_unit), stripe_width)

    def alloc(self, nbytes: int) -> np.ndarray:
        """A numpy uint8 buffer in memory registered with same-host agents: reads into it are
        placed there by the agent itself (zero copies in this process). Allocate before I/O."""
        return self.connections.register(nbytes).array(nbytes)

    async def list_volumes(self) -> list[VolumeInfo]:
        return await self.meta.list_volumes()

    async def delete_volume(self, name: str) -> None:
        await self.meta.delete_volume(name)

    async def close(self) -> None:
        self.connections.close()
        await self.meta.close()


class _LoopThread:
    """A private event loop (uvloop when available) on a daemon thread."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nvpool-io", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("blocking nvpool call from inside its own event loop; use the async API")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


def _as_view(buf: Buffer, writable: bool) -> memoryview:
    if isinstance(buf, np.ndarray):
        if not buf.flags["C_CONTIGUOUS"]:
            raise UsageError("numpy buffers must be C-contiguous")
        view = buf.reshape(-1).view(np.uint8).data
    else:
        view = memoryview(buf).cast("B")
    if writable and view.readonly:
        raise UsageError("buffer is read-only")
    return view


class Volume:
    """Synchronous handle of a volume."""

    def __init__(self, pool: "Pool", avol: AsyncVolume) -> None:
        self._pool = pool
        self._avol = avol

    @property
    def name(self) -> str:
        return self._avol.name

    @property
    def size(self) -> int:
        return self._avol.size

    @property
    def generation(self) -> int:
        return self._avol.layout.generation

    @property
    def asyncio(self) -> AsyncVolume:
        """The underlying asyncio volume (use it from the pool's own loop only)."""
        return self._avol

    def read(self, offset: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.uint8)
        self.readinto(out, offset)
        return out

    def readinto(self, buf: Buffer, offset: int) -> int:
        view = _as_view(buf, writable=True)
        if not self._fast(dp.READ, offset, view):
            self._pool._run(self._avol.readinto(view, offset))
        return len(view)

    def write(self, offset: int, data: Buffer, fua: bool = False) -> int:
        view = _as_view(data, writable=False)
        if fua or self._avol.read_only or not self._fast(dp.WRITE, offset, view):
            self._pool._run(self._avol.write(offset, view, fua))
        return len(view)

    def _fast(self, opcode: int, offset: int, view: memoryview) -> bool:
        """Small single-piece I/O on this thread's own blocking connection (client/syncpath.py);
        False sends the request the normal way (which also reports any error)."""
        av = self._avol
        lay = av.layout
        n = len(view)
        if not 0 < n <= MAX_FAST or av.options.digests or offset < 0 or offset + n > lay.size:
            return False
        if offset % lay.stripe_unit + n > lay.stripe_unit or (opcode == dp.WRITE and lay.target is not None):
            return False
        pieces = list(lay.map(offset, n))
        ep = av.endpoints.get(pieces[0].extent.drive_id)
        if len(pieces) != 1 or ep is None:
            return False
        p = pieces[0]
        unix = ep.unix_path if av.options.transport != "tcp" else ""
        try:
            self._pool._sync.call(ep.address, unix, opcode, p.extent.extent_id, p.extent_offset, n, lay.generation,
                                  payload=view if opcode == dp.WRITE else None,
                                  dest=view if opcode == dp.READ else None)
        except FastPathMiss:
            return False
        return True

    def write_zeroes(self, offset: int, length: int) -> None:
        self._pool._run(self._avol.write_zeroes(offset, length))

    def flush(self) -> None:
        self._pool._run(self._avol.flush())

    def refresh(self) -> None:
        self._pool._run(self._avol.refresh())

    def close(self) -> None:
        self._pool._run(self._avol.close())

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pool:
    """Synchronous handle of a pool (thread-safe; all I/O runs on one background event loop)."""

    def __init__(self, meta_address: Optional[str] = None, options: Optional[ClientOptions] = None) -> None:
        self._lt = _LoopThread()
        self._apool = self._lt.run(AsyncPool.connect(meta_address, options))
        self._sync = SyncChannels(self._apool.options.connect_timeout)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._lt.run(coro)

    @property
    def meta(self) -> MetaClient:
        return self._apool.meta

    def open(self, name: str, read_only: bool = False) -> Volume:
        return Volume(self, self._run(self._apool.open(name, read_only)))

    def create_volume(
        self, name: str, size: Union[int, str], stripe_unit: Union[int, str] = 0, stripe_width: int = 0
    ) -> VolumeInfo:
        return self._run(self._apool.create_volume(name, size, stripe_unit, stripe_width))

    def list_volumes(self) -> list[VolumeInfo]:
        return self._run(self._apool.list_volumes())

    def alloc(self, nbytes: int) -> np.ndarray:
        """Registered (zero-copy) memory; see ``AsyncPool.alloc``."""
        return self._run(self._alloc(nbytes))

    async def _alloc(self, nbytes: int) -> np.ndarray:
        return self._apool.alloc(nbytes)

    def volume_info(self, name: str) -> VolumeInfo:
        return self._run(self._apool.meta.get_volume(name))

    def resize_volume(self, name: str, size: Union[int, str]) -> VolumeInfo:
        return self._run(self._apool.meta.resize_volume(name, parse_size(size)))

    def delete_volume(self, name: str) -> None:
        self._run(self._apool.delete_volume(name))

    def close(self) -> None:
        try:
            self._sync.close()
            self._run(self._apool.close())
        finally:
            self._lt.stop()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(meta_address: Optional[str] = None, options: Optional[ClientOptions] = None) -> Pool:
    """Connect to the pool whose metadata service is at ``meta_address`` (default: $NVPOOL_META)."""
    return Pool(meta_address, options)
