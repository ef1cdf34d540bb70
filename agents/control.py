"""gRPC edge of the storage agent: the ``Agent`` control service the metadata service calls.

Translates protobuf <-> ``AgentCore`` calls and maps domain errors to gRPC status codes. Control
calls never carry data; the data plane is ``agents/dataplane.py``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, Optional

import grpc

from nvpool.agents.core import AgentCore
from nvpool.proto import capability
from nvpool.proto.capability import AUTH_HEADER, EPOCH_HEADER
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto import nvpool_pb2_grpc as pbg
from nvpool.proto.convert import extent_record_from_pb
from nvpool.proto.errors import NotFoundError, NvpoolError, UnavailableError, UsageError

logger = logging.getLogger(__name__)

#: (dst_extent, dst_offset, src_address, src_extent, src_offset, length, generation) -> bytes copied
CopyHandler = Callable[[pb.CopyExtentRequest], Awaitable[int]]


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, NotFoundError):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, UsageError):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(exc, UnavailableError):
        code = grpc.StatusCode.UNAVAILABLE
    else:
        code = grpc.StatusCode.INTERNAL
    await context.abort(code, str(exc))


class Terms:
    """The highest metadata-service term (epoch) this agent has seen, from registration and heartbeat
    answers and control calls. Orders and answers of an older term come from a deposed leader (one
    paused or cut off while another was elected, ``pool/etcdstore.py``) and are refused: its view
    of the pool may be older than what the new leader has already told this agent."""

    def __init__(self) -> None:
        self.highest = 0

    def check(self, epoch: int) -> str:
        """Why ``epoch`` may not be obeyed; empty when it may (and it is remembered). 0: no term given."""
        if epoch and epoch < self.highest:
            return (f"a metadata service of an older term ({epoch}) than the current one ({self.highest}): "
                    "it was deposed; ignoring it")
        self.highest = max(self.highest, epoch)
        return ""


class ControlAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Only the metadata service may call an agent's control service: every call carries a token
    derived from the pool's join secret (``x-nvpool-auth``; proto/capability.py ``control_token``).
    Anything else is refused with UNAUTHENTICATED before it reaches a handler, except the standard
    gRPC health service (it reveals only SERVING / NOT_SERVING)."""

    def __init__(self, secrets: list[bytes], terms: Optional["Terms"] = None) -> None:
        self.secrets = secrets
        self.terms = terms

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)  # the standard health service answers anyone on the port
        token = dict(details.invocation_metadata or ()).get(AUTH_HEADER, "")
        why = capability.check_control_token(str(token), self.secrets, details.method, time.time())
        if not why and self.terms is not None:
            raw = str(dict(details.invocation_metadata or ()).get(EPOCH_HEADER, "") or "0")
            why = self.terms.check(int(raw) if raw.isdigit() else 0)
            if why:
                logger.warning("refused control call %s: %s", details.method, why)

                async def stale(request: Any, context: Any) -> Any:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, why)

                return grpc.unary_unary_rpc_method_handler(stale)
        if not why:
            return await continuation(details)
        logger.warning("refused control call %s: %s", details.method, why)

        async def deny(request: Any, context: Any) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"not the metadata service of this pool: {why}")

        return grpc.unary_unary_rpc_method_handler(deny)


class AgentServicer(pbg.AgentServicer):  # type: ignore[misc]
    def __init__(self, core: AgentCore, copy_handler: Optional[CopyHandler] = None) -> None:
        self.core = core
        self.copy_handler = copy_handler

    async def AssignExtents(self, request: Any, context: Any) -> pb.AssignExtentsResponse:
        try:
            await self.core.assign_async([extent_record_from_pb(r) for r in request.extents], zero=request.zero)
        except (NvpoolError, OSError) as exc:
            await _abort(context, exc)
        return pb.AssignExtentsResponse()

    async def ReleaseExtents(self, request: Any, context: Any) -> pb.ReleaseExtentsResponse:
        try:
            await self.core.release_async(request.extent_ids)
        except (NvpoolError, OSError) as exc:
            await _abort(context, exc)
        return pb.ReleaseExtentsResponse()

    async def Fence(self, request: Any, context: Any) -> pb.FenceResponse:
        try:
            n = self.core.fence(request.volume_id, request.min_generation)
        except (NvpoolError, OSError) as exc:
            await _abort(context, exc)
        return pb.FenceResponse(extents=n)

    async def MapExtent(self, request: Any, context: Any) -> pb.MapExtentResponse:
        try:
            ranges = await self.core.map_extent(request.extent_id, request.written)
        except (NvpoolError, OSError) as exc:
            await _abort(context, exc)
        return pb.MapExtentResponse(data=[pb.Range(offset=o, length=n) for o, n in ranges])

    async def Dirty(self, request: Any, context: Any) -> pb.DirtyResponse:
        out = pb.DirtyResponse()
        try:
            ids = list(request.extent_ids)
            if request.op == "start":
                self.core.track_dirty(ids)
            elif request.op == "stop":
                self.core.untrack_dirty(ids)
            elif request.op in ("get", "intent-get"):
                record = self.core.dirty_ranges if request.op == "get" else self.core.intent_ranges
                for eid in ids:
                    ranges = record(eid)
                    out.extents.append(pb.DirtyExtent(
                        extent_id=eid, tracking=ranges is not None,
                        ranges=[pb.Range(offset=o, length=n) for o, n in ranges or ()]))
            elif request.op == "intent-rotate":
                self.core.intent_rotate(request.volume_id, request.epoch)
            elif request.op == "intent-settle":
                self.core.intent_settle(request.volume_id, request.epoch)
            else:
                raise UsageError(f"unknown dirty-tracking operation {request.op!r} (start, get, stop, "
                                 "intent-get, intent-rotate, intent-settle)")
        except (NvpoolError, OSError) as exc:
            await _abort(context, exc)
        return out

    async def Scrub(self, request: Any, context: Any) -> pb.ScrubResponse:
        try:
            sums, bad, kept = await self.core.scrub(request.extent_id, request.offset, request.length)
        except (NvpoolError, OSError) as exc:
            await _abort(context, exc)
        return pb.ScrubResponse(sums=sums, bad=bad, checksummed=kept)

    async def Flush(self, request: Any, context: Any) -> pb.FlushResponse:
        try:
            await self.core.flush_all_async()
        except (NvpoolError, OSError) as exc:
            await _abort(context, exc)
        return pb.FlushResponse()

    async def CopyExtent(self, request: Any, context: Any) -> pb.CopyExtentResponse:
        if self.copy_handler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this agent cannot copy extents")
        try:
            assert self.copy_handler is not None
            n = await self.copy_handler(request)
        except (NvpoolError, OSError) as exc:
            await _abort(context, exc)
        return pb.CopyExtentResponse(bytes=n)
