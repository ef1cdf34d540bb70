"""Agent-to-agent extent copies for online re-spreading: the destination pulls from the source.

The destination agent reads the chunk from the source agent over the ordinary data plane (the same
client connection code GPU hosts use) and applies it with ``AgentCore.finish_copy``, which never
overwrites bytes a client wrote to the destination while the chunk was in flight.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from nvpool.agents.core import AgentCore
from nvpool.proto.transport import AgentConnection, connect
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import UnavailableError
from nvpool.proto.tls import TlsFiles

logger = logging.getLogger(__name__)


class Copier:
    def __init__(self, core: AgentCore, tls: Optional[TlsFiles] = None) -> None:
        self.core = core
        self.tls = tls
        self._conns: dict[str, AgentConnection] = {}
        self.bytes_copied = 0

    async def _conn(self, address: str, tls: bool = False) -> AgentConnection:
        c = self._conns.get(address)
        if c is None or c.closed:
            ctx = self.tls.client_context() if tls and self.tls is not None else None
            c = await connect(address, ssl_context=ctx)
            self._conns[address] = c
        return c

    async def copy(self, req: Any) -> int:
        """Serve one CopyExtentRequest; returns the bytes applied."""
        length = int(req.length)
        cp = self.core.begin_copy(req.dst_extent_id, req.dst_offset, length)
        try:
            buf = memoryview(bytearray(length))
            conn = await self._conn(req.src_address, req.src_tls)
            if req.capability:
                conn.authorize(self.core.extents[req.dst_extent_id].volume_id, bytes(req.capability))
            pos = 0
            while pos < length:
                n = min(dp.MAX_IO, length - pos)
                await conn.submit(
                    dp.Opcode.READ, req.src_extent_id, req.src_offset + pos, n, req.generation, dest=buf[pos : pos + n]
                )
                pos += n
            applied = self.core.finish_copy(cp, buf)
        except UnavailableError:
            self.core.abort_copy(cp)
            self._conns.pop(req.src_address, None)
            raise
        except BaseException:
            self.core.abort_copy(cp)
            raise
        self.bytes_copied += length
        return applied

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()
