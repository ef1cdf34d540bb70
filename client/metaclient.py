"""Client of the metadata service (gRPC edge of the client library).

Converts protobuf to plain domain objects and gRPC status codes to nvpool exceptions, so nothing
else in ``client/`` imports generated code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import grpc

from nvpool.proto.layout import Layout
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto import nvpool_pb2_grpc as pbg
from nvpool.proto.convert import layout_from_pb
from nvpool.proto.records import Endpoint
from nvpool.proto.errors import (
    AlreadyExistsError,
    CapacityError,
    NotFoundError,
    NvpoolError,
    UnavailableError,
    UsageError,
)

DEFAULT_META = "127.0.0.1:7400"


def default_meta() -> str:
    return os.environ.get("NVPOOL_META") or DEFAULT_META


@dataclass(frozen=True)
class VolumeInfo:
    volume_id: int
    name: str
    size: int
    stripe_unit: int
    stripe_width: int
    generation: int
    state: str
    created: float
    drives: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_pb(m: Any) -> "VolumeInfo":
        return VolumeInfo(
            m.volume_id, m.name, m.size, m.stripe_unit, m.stripe_width, m.generation, m.state, m.created,
            list(m.drives), list(m.hosts),
        )


_CODES: dict[grpc.StatusCode, type[NvpoolError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: UsageError,
    grpc.StatusCode.FAILED_PRECONDITION: UsageError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


def translate(exc: grpc.aio.AioRpcError, address: str) -> NvpoolError:
    cls = _CODES.get(exc.code(), NvpoolError)
    details = exc.details() or exc.code().name
    if cls is UnavailableError and exc.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details:
        details = f"metadata service {address} is unreachable ({details})"
    return cls(details)


class MetaClient:
    def __init__(self, address: Optional[str] = None, timeout: float = 30.0) -> None:
        self.address = address or default_meta()
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = pbg.MetaStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, name: str, request: Any, timeout: Optional[float] = None) -> Any:
        try:
            return await getattr(self._stub, name)(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None

    async def create_volume(self, name: str, size: int, stripe_unit: int = 0, stripe_width: int = 0) -> VolumeInfo:
        m = await self._call(
            "CreateVolume", pb.CreateVolumeRequest(name=name, size=size, stripe_unit=stripe_unit, stripe_width=stripe_width)
        )
        return VolumeInfo.from_pb(m)

    async def get_volume(self, name: str) -> VolumeInfo:
        return VolumeInfo.from_pb(await self._call("GetVolume", pb.GetVolumeRequest(name=name)))

    async def list_volumes(self) -> list[VolumeInfo]:
        m = await self._call("ListVolumes", pb.ListVolumesRequest())
        return [VolumeInfo.from_pb(v) for v in m.volumes]

    async def resize_volume(self, name: str, size: int) -> VolumeInfo:
        return VolumeInfo.from_pb(await self._call("ResizeVolume", pb.ResizeVolumeRequest(name=name, size=size)))

    async def delete_volume(self, name: str) -> None:
        await self._call("DeleteVolume", pb.DeleteVolumeRequest(name=name))

    async def get_layout(self, name: str = "", volume_id: int = 0) -> tuple[Layout, dict[str, Endpoint]]:
        m = await self._call("GetLayout", pb.GetLayoutRequest(name=name, volume_id=volume_id))
        return layout_from_pb(m)

    async def pool_status(self) -> Any:
        """The PoolStatusResponse message (the CLI renders it)."""
        return await self._call("PoolStatus", pb.PoolStatusRequest())

    async def call(self, name: str, request: Any, timeout: Optional[float] = None) -> Any:
        """Any other Meta RPC by name (rebalance, drain, ...), with errors translated."""
        return await self._call(name, request, timeout)
