"""The block sums' format, shared by the agents that keep them (``agents/checksums.py``, which argues
how they are kept) and the metadata service that compares them (``pool/scrub.py``)."""

from __future__ import annotations

import struct
from typing import Union

from nvpool.proto.dataplane import crc32c

Buffer = Union[bytes, bytearray, memoryview]
_U32 = struct.Struct("<I")

#: bytes covered by one sum (agents/_cserve.c SUM_BLOCK)
SUM_BLOCK = 4096
#: bytes one sum takes in the sums area
SUM_SIZE = 4
#: most bytes one scrub call reads (pool/scrub.py asks for at most this)
SCRUB_MAX = 4 * 1024 * 1024


def seal(crc: int) -> int:
    """The stored form of a block's crc32c: never 0 (0 means "no sum")."""
    return crc or 0xFFFFFFFF


#: the sum of a block of zeros
ZERO_SUM = seal(crc32c(bytes(SUM_BLOCK)))


def sums_bytes(data_bytes: int) -> int:
    """Bytes of sums area that ``data_bytes`` of data area need."""
    return -(-data_bytes // SUM_BLOCK) * SUM_SIZE


def block_sums(data: Buffer) -> bytes:
    """The sums of ``data`` (a whole number of blocks; a short last block is summed as it is)."""
    view = memoryview(data)
    return b"".join(_U32.pack(seal(crc32c(view[i : i + SUM_BLOCK]))) for i in range(0, len(view), SUM_BLOCK))


def mismatches(sums: bytes, stored: bytes) -> list[int]:
    """Indexes of the blocks whose stored sum is recorded (non-zero) and differs from the data's."""
    if not stored:
        return []
    n = min(len(sums), len(stored)) // SUM_SIZE
    return [i for i in range(n) if stored[i * 4 : i * 4 + 4] != sums[i * 4 : i * 4 + 4]
            and stored[i * 4 : i * 4 + 4] != b"\0\0\0\0"]


