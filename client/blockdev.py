"""The block-device contract that front ends (the NBD export, benchmarks) are written against.

``client.volume.AsyncVolume`` implements it over the pool; ``MemoryBlockDevice`` implements it in
memory for tests of the front ends. All offsets and lengths are bytes; a range beyond ``size``
raises ``proto.errors.UsageError`` and changes nothing; an I/O failure below raises another
``NvpoolError`` (``RemoteError``, ``UnavailableError``, ``DriveError``).
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

from nvpool.proto.errors import UsageError

Buffer = Union[bytes, bytearray, memoryview]


@runtime_checkable
class BlockDevice(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    async def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` (writable, any length) with the bytes at ``offset``."""

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable when this returns."""

    async def flush(self) -> None:
        """Every write that completed before this call is durable when it returns."""

    async def write_zeroes(self, offset: int, length: int) -> None: ...

    async def discard(self, offset: int, length: int) -> None:
        """Drop the bytes (they read back as zeros)."""


def check_range(size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise UsageError(f"negative offset or length ({offset}, {length})")
    if offset + length > size:
        raise UsageError(f"range [{offset}, {offset + length}) is beyond the end of the device ({size} bytes)")


class MemoryBlockDevice:
    """A ``BlockDevice`` in memory (for front-end tests)."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        self._data = bytearray(size)
        self._ro = read_only
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def read_only(self) -> bool:
        return self._ro

    async def readinto(self, buf: memoryview, offset: int) -> None:
        check_range(self.size, offset, len(buf))
        buf[:] = self._data[offset : offset + len(buf)]

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if self._ro:
            raise UsageError("device is read-only")
        check_range(self.size, offset, len(data))
        self._data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self.flushes += 1

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.write(offset, bytes(length))

    async def discard(self, offset: int, length: int) -> None:
        await self.write(offset, bytes(length))
