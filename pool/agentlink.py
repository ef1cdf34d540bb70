"""gRPC client of the agents' control service (the metadata service's only way to reach agents)."""

from __future__ import annotations

import logging
import time
from typing import Callable, Any, Optional

import grpc

from nvpool.proto import capability, grpctls
from nvpool.proto.tls import TlsFiles
from nvpool.proto.layout import Extent
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto import nvpool_pb2_grpc as pbg
from nvpool.proto.convert import extent_record_to_pb
from nvpool.proto.records import ExtentRecord
from nvpool.proto.errors import NotFoundError, UnavailableError, UsageError

logger = logging.getLogger(__name__)


class GrpcAgentLink:
    """Every call carries the metadata service's credential (``x-nvpool-auth``, derived from the pool's
    join secret): agents refuse control calls from anyone else."""

    def __init__(self, timeout: float = 30.0, secrets: Optional[list[bytes]] = None,
                 tls: Optional[TlsFiles] = None) -> None:
        self.timeout = timeout
        self.secrets = secrets or []
        self.tls = tls
        self._channels: dict[str, tuple[Any, Any]] = {}
        #: the term of the metadata service using this link (``nvpool-epoch``): agents refuse calls of
        #: an older term than they have seen, so a deposed leader cannot order them about
        self.epoch = 0
        #: whether the metadata service may give orders now (False while its leader term is uncertain)
        self.may_act: Callable[[], bool] = lambda: True

    def _stub(self, address: str) -> Any:
        got = self._channels.get(address)
        if got is None:
            ch = grpctls.aio_channel(address, self.tls)
            got = (ch, pbg.AgentStub(ch))
            self._channels[address] = got
        return got[1]

    async def _call(self, address: str, method: str, request: Any, timeout: float | None = None) -> Any:
        if not address:
            raise UnavailableError("agent has no control address (not registered yet)")
        if not self.may_act():
            raise UnavailableError("this metadata service is not leading (its term lapsed): it orders no agent")
        try:
            meta: tuple[tuple[str, str], ...] = ()
            if self.secrets:
                token = capability.control_token(self.secrets[0], f"/nvpool.v1.Agent/{method}", time.time())
                meta = ((capability.AUTH_HEADER, token),)
            if self.epoch:
                meta += ((capability.EPOCH_HEADER, str(self.epoch)),)
            return await getattr(self._stub(address), method)(request, timeout=timeout or self.timeout,
                                                              metadata=meta)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise UsageError(f"agent {address}: {exc.details()}") from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFoundError(f"agent {address}: {exc.details()}") from None
            raise UnavailableError(f"agent {address}: {code.name}: {exc.details()}") from None

    async def assign(self, address: str, records: list[ExtentRecord], zero: bool) -> None:
        await self._call(address, "AssignExtents",
                         pb.AssignExtentsRequest(extents=[extent_record_to_pb(r) for r in records], zero=zero))

    async def release(self, address: str, extent_ids: list[int]) -> None:
        await self._call(address, "ReleaseExtents", pb.ReleaseExtentsRequest(extent_ids=extent_ids), timeout=5)

    async def map_extent(self, address: str, extent_id: int, written: bool = False) -> list[tuple[int, int]]:
        resp = await self._call(address, "MapExtent", pb.MapExtentRequest(extent_id=extent_id, written=written),
                                timeout=30)
        return [(r.offset, r.length) for r in resp.data]

    async def flush(self, address: str) -> None:
        await self._call(address, "Flush", pb.FlushRequest(), timeout=60)

    async def fence(self, address: str, volume_id: int, min_generation: int) -> None:
        await self._call(address, "Fence", pb.FenceRequest(volume_id=volume_id, min_generation=min_generation), timeout=10)

    async def dirty(self, address: str, extent_ids: list[int], op: str) -> dict[int, Optional[list[tuple[int, int]]]]:
        """Write tracking for resync: "start", "stop", or "get" (ranges per extent; None: not tracked)."""
        resp = await self._call(address, "Dirty", pb.DirtyRequest(extent_ids=extent_ids, op=op), timeout=10)
        return {d.extent_id: [(r.offset, r.length) for r in d.ranges] if d.tracking else None for d in resp.extents}

    async def intent(self, address: str, volume_id: int, extent_ids: list[int], op: str, epoch: int = 0
                     ) -> dict[int, Optional[list[tuple[int, int]]]]:
        """Write-intent records (agents/intent.py): "get" (ranges per extent; None: the record may be
        incomplete), "rotate" to ``epoch``, "settle" up to ``epoch``."""
        resp = await self._call(address, "Dirty", pb.DirtyRequest(extent_ids=extent_ids, op=f"intent-{op}",
                                                                  volume_id=volume_id, epoch=epoch), timeout=10)
        return {d.extent_id: [(r.offset, r.length) for r in d.ranges] if d.tracking else None for d in resp.extents}

    async def scrub(self, address: str, extent_id: int, offset: int, length: int) -> tuple[bytes, list[int], bool]:
        """(sums of the blocks as read now, blocks failing their stored sums, sums kept) (agents/checksums.py)."""
        resp = await self._call(address, "Scrub", pb.ScrubRequest(extent_id=extent_id, offset=offset, length=length),
                                timeout=30)
        return bytes(resp.sums), list(resp.bad), bool(resp.checksummed)

    async def copy(
        self, address: str, dst: Extent, dst_offset: int, src_address: str, src: Extent, src_offset: int,
        length: int, generation: int, volume_id: int = 0, src_tls: bool = False,
    ) -> int:
        cap = b""
        if self.secrets and volume_id:  # the destination reads the source with a read capability
            cap = capability.sign(capability.Capability(volume_id, capability.READ, generation,
                                                        int(time.time()) + 600), self.secrets[0])
        resp = await self._call(address, "CopyExtent", pb.CopyExtentRequest(
            dst_extent_id=dst.extent_id, dst_offset=dst_offset, src_address=src_address,
            src_extent_id=src.extent_id, src_offset=src_offset, length=length, generation=generation,
            capability=cap, src_tls=src_tls,
        ))
        return int(resp.bytes)

    async def close(self) -> None:
        for ch, _ in self._channels.values():
            await ch.close()
        self._channels.clear()
