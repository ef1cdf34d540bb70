"""gRPC edge of the metadata service: protobuf <-> domain, domain errors -> status codes, start/stop.

Nothing below this module imports generated code. Entry point: ``serve(MetaConfig, on_ready)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Optional, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nvpool.pool.agentlink import GrpcAgentLink
from nvpool.pool.kvstore import KVStore, open_store
from nvpool.pool.meta import AgentLink, AgentRec, DriveRec, MetaService, Role, check_store
from nvpool.pool.metrics import MetaCollector
from nvpool.pool.rebalancer import Rebalancer
from nvpool.pool.replication import Replication
from nvpool.pool.scrub import ScrubState, Scrubber
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto import nvpool_pb2_grpc as pbg
from nvpool.proto import capability, grpctls, keys
from nvpool.proto.metrics import start_metrics
from nvpool.proto.tls import TlsFiles, tls_files
from nvpool.proto.addresses import check_bindable
from nvpool.proto.config import check_keys
from nvpool.proto.convert import extent_record_to_pb, layout_to_pb
from nvpool.proto.errors import (
    AlreadyExistsError,
    AuthError,
    CapacityError,
    LeaseError,
    NotFoundError,
    NvpoolError,
    UnavailableError,
    UsageError,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: trailing metadata of a standby's refusal: where the leader is
LEADER_HEADER = "nvpool-leader"
#: metadata of a call a standby forwards to the leader: who asked the standby (for the audit log)
FORWARDED_HEADER = "nvpool-forwarded"


@dataclass(frozen=True)
class MetaConfig:
    """Every option of ``nvpool meta``; documented in deploy/meta.toml.sample."""

    listen: str = "127.0.0.1:7400"
    store: str = "sqlite:./nvpool-meta.db"
    heartbeat_interval: float = 1.0
    agent_timeout: float = 3.0
    lease_ttl: float = 15.0
    #: a replica out of service this long is rebuilt on another drive instead of resynced in place
    rebuild_after: float = 300.0
    #: bytes/s for resync and rebuild copies, pool-wide (0 = unlimited)
    repair_rate: int = 64 * 1024 * 1024
    #: every replicated volume is scrubbed once per this many seconds (0 = only on request), at
    #: ``scrub_rate`` bytes/s of volume read from each copy (pool/scrub.py)
    scrub_interval: float = 7 * 86400.0
    scrub_rate: int = 16 * 1024 * 1024
    #: the pool's join secret; "" = next to a SQLite store (PATH.join-secret), created at first start
    join_secret_file: str = ""
    #: TLS (proto/tls.py): the pool CA, this service's certificate and key; all three or none
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    #: HOST:PORT of a Prometheus metrics endpoint ("" = none)
    metrics_listen: str = ""
    #: etcd stores: the key prefix of this pool (default /nvpool, or the URL's path)
    prefix: str = ""
    #: etcd stores: seconds of the leader's etcd lease (failover takes about this long)
    leader_ttl: int = 5
    #: HOST:PORT other metadata services send callers to when this one leads ("" = the listen address,
    #: or this host's name with the bound port when listening on a wildcard)
    advertise: str = ""

    def tls(self) -> Optional[TlsFiles]:
        return tls_files(self.tls_ca, self.tls_cert, self.tls_key)

    def secret_path(self) -> str:
        if self.join_secret_file:
            return self.join_secret_file
        if self.store.startswith("sqlite:"):
            return self.store[len("sqlite:"):] + ".join-secret"
        raise UsageError("a metadata service on etcd needs --join-secret-file (the same file on every metadata "
                         "server; the first start creates it)")

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0 or self.agent_timeout < 2.5 * self.heartbeat_interval:
            raise UsageError(
                f"agent_timeout ({self.agent_timeout:g}s) must be at least 2.5 x heartbeat_interval "
                f"({self.heartbeat_interval:g}s): agents serve replicated data for 0.75 x agent_timeout after a "
                "heartbeat, which must span more than one heartbeat")
        if self.rebuild_after < 0 or self.repair_rate < 0 or self.scrub_interval < 0 or self.scrub_rate < 0:
            raise UsageError("rebuild_after, repair_rate, scrub_interval and scrub_rate must not be negative")
        if self.store.startswith("etcd://"):
            from nvpool.pool.etcdstore import parse_url

            parse_url(self.store, self.prefix)  # a bad URL or prefix is refused before anything starts
        elif self.prefix:
            raise UsageError("--prefix applies to an etcd store only")
        if not 2 <= self.leader_ttl <= 300:
            raise UsageError(f"leader_ttl must be 2..300 seconds, not {self.leader_ttl}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "MetaConfig":
        check_keys(cls, values, "meta")
        return cls(**dict(values))


def _code(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, AuthError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, LeaseError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, AlreadyExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, UsageError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


async def _guard(context: Any, coro: Awaitable[T]) -> T:
    try:
        return await coro
    except NvpoolError as exc:
        await context.abort(_code(exc), str(exc))
        raise  # unreachable: abort raises


def volume_pb(v: dict[str, Any]) -> pb.Volume:
    return pb.Volume(**{**v, "holders": [pb.Holder(**h) for h in v.get("holders", [])],
                        "replica_info": [pb.ReplicaInfo(**r) for r in v.get("replica_info", [])]})


def who(context: Any) -> str:
    """The peer that asked, for the audit log (through a standby: "CALLER via STANDBY")."""
    try:
        peer = str(context.peer())
        via = dict(context.invocation_metadata() or ()).get(FORWARDED_HEADER)
        return f"{via} via {peer}" if via else peer
    except Exception:  # noqa: BLE001 - a test double may not have a peer
        return "unknown peer"


def rebalance_pb(d: dict[str, Any]) -> pb.RebalanceStatus:
    moves = [pb.Move(**m) for m in d.get("moves", [])]
    return pb.RebalanceStatus(**{**d, "moves": moves})


class CountRpcs(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every RPC by method and status code for the metrics endpoint (pool/metrics.py)."""

    def __init__(self, metrics: MetaCollector) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, details.method.rsplit("/", 1)[-1]

        async def counted(request: Any, context: Any) -> Any:
            try:
                resp = await inner(request, context)
            except BaseException:
                code = context.code()
                self.metrics.count(method, code.name if code is not None else "UNKNOWN")
                raise
            code = context.code()
            self.metrics.count(method, code.name if code is not None else "OK")
            return resp

        return grpc.unary_unary_rpc_method_handler(counted, handler.request_deserializer, handler.response_serializer)


class LeaderGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Only the leading metadata service answers ``Meta`` calls. A standby (or a leader whose term is
    uncertain) *forwards* a caller's call to the leader and relays the answer, so a client that knows
    only a standby's address still works; an agent's registration and heartbeats (which the leader
    binds to the caller's own certificate) and a call already forwarded once are *redirected* instead:
    UNAVAILABLE naming the leader, in words and in the ``nvpool-leader`` trailer, and the caller moves
    there (client/metaclient.py, agents/agent.py). With no leader known (an election under way) the
    answer is UNAVAILABLE, and callers retry."""

    #: calls that are never forwarded (the leader must see the agent's own certificate)
    REDIRECT_ONLY = frozenset({"RegisterAgent", "Heartbeat"})

    def __init__(self, role: Role, tls: Optional[TlsFiles] = None) -> None:
        self.role = role
        self.tls = tls
        self._channels: dict[str, Any] = {}

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith("/nvpool.v1.Meta/"):
            return handler
        inner, method = handler.unary_unary, details.method
        name = method.rsplit("/", 1)[-1]

        async def gated(request: Any, context: Any) -> Any:
            if not self.role.acting():
                leader = self.role.leader()
                if leader and leader != self.role.address:
                    forwarded = dict(context.invocation_metadata() or ()).get(FORWARDED_HEADER)
                    if name not in self.REDIRECT_ONLY and not forwarded:
                        return await self._forward(method, request, context, leader)
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"not the leader: the metadata leader is at {leader}",
                                        trailing_metadata=((LEADER_HEADER, leader),))
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "no metadata leader right now (an election is under way); retry")
            try:
                return await inner(request, context)
            except UnavailableError as exc:  # stepped down during the call (MetaServicer.svc)
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

        plain = handler.response_serializer

        def serialize(resp: Any) -> bytes:  # a forwarded answer is relayed as the leader's bytes
            return bytes(resp) if isinstance(resp, (bytes, bytearray)) else plain(resp)

        return grpc.unary_unary_rpc_method_handler(gated, handler.request_deserializer, serialize)

    async def _forward(self, method: str, request: Any, context: Any, leader: str) -> Any:
        ch = self._channels.get(leader)
        if ch is None:
            ch = self._channels[leader] = grpctls.aio_channel(leader, self.tls)
        call = ch.unary_unary(method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=None)
        left = context.time_remaining()
        try:
            return await call(request, timeout=min(left, 60.0) if left else 30.0,
                              metadata=((FORWARDED_HEADER, who(context)),))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE and not (exc.details() or "").startswith("not the leader"):
                # the leader did not answer: tell the caller where it is, and let it try there itself
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"not the leader, and the metadata leader at {leader} did not answer: "
                                    f"{(exc.details() or code.name).splitlines()[0][:200]}",
                                    trailing_metadata=((LEADER_HEADER, leader),))
            await context.abort(code, exc.details() or code.name)


class MetaServicer(pbg.MetaServicer):  # type: ignore[misc]
    """The ``Meta`` service of the leading instance; ``role`` says who leads (see ``LeaderGate``)."""

    def __init__(self, service: Optional[MetaService] = None, rebalancer: Any = None,
                 replication: Optional[Replication] = None, role: Optional[Role] = None) -> None:
        self.role = role if role is not None else Role(service, rebalancer, replication)

    @property
    def svc(self) -> MetaService:
        svc = self.role.svc
        if svc is None:
            raise UnavailableError("this metadata service stopped leading; retry")
        return svc

    @property
    def reb(self) -> Any:
        return self.role.reb

    @property
    def repl(self) -> Optional[Replication]:
        return self.role.repl  # type: ignore[no-any-return]

    async def RegisterAgent(self, request: Any, context: Any) -> pb.RegisterAgentResponse:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        agent = AgentRec(request.agent_id, request.host or request.agent_id, request.rack, request.address,
                         request.control_address, request.unix_path, [], instance=request.instance,
                         labels=dict(request.labels), data_tls=request.data_tls)
        drives = [DriveRec(d.drive_id, request.agent_id, d.path, d.capacity, d.data_offset, d.state or "ok")
                  for d in request.drives]
        if not request.agent_id or not request.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent_id and address are required")
        await self._check_agent(context, request.agent_id, request.instance, request.credential, "registration")
        agent.certificate = await self._agent_certificate(context, request.agent_id)
        self._note_drives(request.drives)
        extents = await _guard(context, svc.register_agent(
            agent, drives, request.pool_id, [e.extent_id for e in request.extents]))
        return pb.RegisterAgentResponse(
            heartbeat_interval_ms=int(svc.heartbeat_interval * 1000),
            extents=[extent_record_to_pb(r) for r in extents],
            pool_id=svc.pool_id,
            serve_lease_ms=int(svc.serve_lease * 1000),
            epoch=svc.epoch,
        )

    async def _agent_certificate(self, context: Any, agent_id: str) -> str:
        """With TLS: the registering peer's certificate must be an agent's of this pool (a client's is
        refused), and the name it was issued to binds the agent id (pool/meta.py refuses a certificate
        issued to another name later; a re-issued certificate of the same name, a rotation, is fine)."""
        try:
            auth = context.auth_context() or {}
        except Exception:  # noqa: BLE001 - a test double may have none
            return ""
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            return ""
        uris = [u.decode() if isinstance(u, bytes) else str(u) for u in auth.get("x509_subject_alternative_name", [])]
        roles = {u.split(":")[1] for u in uris if u.startswith("nvpool:") and u.count(":") >= 2}
        if roles and "agent" not in roles:
            logger.warning("refused registration of agent %r from %s: its certificate is a %s's",
                           agent_id, who(context), "/".join(sorted(roles)))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "registration refused: this certificate is not an agent's (nvpool certs issue --role agent)")
        names = sorted(u for u in uris if u.startswith("nvpool:agent:"))
        if names:
            return names[0]
        return "sha256:" + hashlib.sha256(pems[0] if isinstance(pems[0], bytes) else str(pems[0]).encode()).hexdigest()[:32]

    def _note_drives(self, drives: Any) -> None:
        for d in drives:
            self.svc.drive_health[d.drive_id] = {"model": d.model, "serial": d.serial, "errors": d.errors,
                                                 "last_error": d.last_error}

    async def _check_agent(self, context: Any, agent_id: str, instance: str, credential: str, what: str) -> None:
        """Only a holder of the pool's join secret registers or heartbeats as an agent."""
        if not self.svc.secrets:
            return
        why = capability.check_join_proof(credential, self.svc.secrets, agent_id, instance, time.time())
        if why:
            logger.warning("refused %s of agent %r from %s: %s", what, agent_id, who(context), why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{what} refused: {why} (give the agent the pool's join secret)")

    async def Heartbeat(self, request: Any, context: Any) -> pb.HeartbeatResponse:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        await self._check_agent(context, request.agent_id, request.instance, request.credential, "heartbeat")
        self._note_drives(request.drives)
        res = svc.heartbeat(
            request.agent_id, {d.drive_id: d.state or "ok" for d in request.drives}, request.instance,
            request.extents_digest if request.extents_digest else None, request.released,
        )
        return pb.HeartbeatResponse(
            reregister=res.reregister, reconcile=res.keep is not None,
            keep=[extent_record_to_pb(r) for r in res.keep or ()], release=res.release, epoch=svc.epoch,
        )

    async def CreateVolume(self, request: Any, context: Any) -> pb.Volume:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        vol = await _guard(context, svc.create_volume(request.name, request.size, request.stripe_unit,
                                                           request.stripe_width, who=who(context),
                                                           replicas=request.replicas or 1,
                                                           failure_domain=request.failure_domain or "host"))
        return volume_pb(svc.volume_view(vol))

    async def OpenVolume(self, request: Any, context: Any) -> pb.OpenVolumeResponse:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        lease = await _guard(context, svc.open_volume(request.name, request.write,
                                                           request.holder or who(context), request.force,
                                                           request.request_id))
        return pb.OpenVolumeResponse(lease_id=lease.lease_id, ttl_ms=int(svc.lease_ttl * 1000),
                                     volume=volume_pb(svc.volume_view(svc.volume_by_id(lease.volume_id))),
                                     capability=svc.capability(lease))

    async def RenewLease(self, request: Any, context: Any) -> pb.RenewLeaseResponse:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        repl = self.repl
        async def renew() -> pb.RenewLeaseResponse:
            lease = svc.renew_lease(request.lease_id)
            epoch = await repl.intent_renew(lease, request.intent_settled) if repl is not None else 0
            return pb.RenewLeaseResponse(ttl_ms=int(svc.lease_ttl * 1000), capability=svc.capability(lease),
                                         intent_epoch=epoch)
        return await _guard(context, renew())

    async def CloseVolume(self, request: Any, context: Any) -> pb.CloseVolumeResponse:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        await _guard(context, svc.close_lease(request.lease_id, request.unsettled))
        return pb.CloseVolumeResponse()

    async def GetVolume(self, request: Any, context: Any) -> pb.Volume:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        async def get() -> pb.Volume:
            return volume_pb(svc.volume_view(svc.volume(request.name)))
        return await _guard(context, get())

    async def ListVolumes(self, request: Any, context: Any) -> pb.ListVolumesResponse:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        vols = sorted(svc.volumes.values(), key=lambda v: v.name)
        return pb.ListVolumesResponse(volumes=[volume_pb(svc.volume_view(v)) for v in vols])

    async def ResizeVolume(self, request: Any, context: Any) -> pb.Volume:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        vol = await _guard(context, svc.resize_volume(request.name, request.size, who=who(context)))
        return volume_pb(svc.volume_view(vol))

    async def DeleteVolume(self, request: Any, context: Any) -> pb.DeleteVolumeResponse:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        await _guard(context, svc.delete_volume(request.name, request.force, who=who(context),
                                                          own=list(request.lease_ids)))
        return pb.DeleteVolumeResponse()

    async def GetLayout(self, request: Any, context: Any) -> pb.Layout:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        async def get() -> pb.Layout:
            lay, eps = svc.layout(request.name, request.volume_id)
            msg = layout_to_pb(lay, eps)
            if request.lease_id:
                svc.check_lease(request.lease_id, lay.volume_id)
                msg.capability = svc.capability(svc.leases[request.lease_id])
            return msg
        return await _guard(context, get())

    async def PoolStatus(self, request: Any, context: Any) -> pb.PoolStatusResponse:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        st = svc.pool_status()
        agents = []
        for a in st["agents"]:
            rec = a["agent"]
            agents.append(pb.AgentStatus(
                agent_id=rec.agent_id, host=rec.host, rack=rec.rack, address=rec.address, alive=a["alive"],
                control_address=rec.control_address,
                labels=rec.labels,
                state=rec.state, last_seen=a["last_seen"],
                drives=[pb.DriveStatus(
                    info=pb.DriveInfo(drive_id=d["drive"].drive_id, path=d["drive"].path, capacity=d["drive"].capacity,
                                      data_offset=d["drive"].data_offset, state=d["drive"].state,
                                      model=d.get("model", ""), serial=d.get("serial", ""),
                                      errors=d.get("errors", 0), last_error=d.get("last_error", "")),
                    used=d["used"], extents=d["extents"]) for d in a["drives"]],
            ))
        resp = pb.PoolStatusResponse(agents=agents, capacity=st["capacity"], used=st["used"], volumes=st["volumes"],
                                     health=st["health"], pool_id=st["pool_id"],
                                     releasing_extents=st["releasing_extents"], releasing_bytes=st["releasing_bytes"],
                                     meta_store=self.role.store_url, meta_epoch=svc.epoch,
                                     meta_leader=self.role.address, unavailable_volumes=st["unavailable_volumes"])
        if self.reb is not None:
            resp.rebalance.CopyFrom(rebalance_pb(self.reb.status()))
        if self.repl is not None:
            repairs = self.repl.status()
            resp.repairs.extend(pb.RepairStatus(**r) for r in repairs)
            resp.degraded_volumes = len({r["volume"] for r in repairs})
        if self.role.scrub is not None:
            resp.scrubs.extend(pb.ScrubStatus(**s) for s in self.role.scrub.status())
        return resp

    async def _scrubber(self, context: Any) -> Scrubber:
        if self.role.scrub is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this metadata service stopped leading; retry")
        return self.role.scrub  # type: ignore[no-any-return]

    async def ScrubVolume(self, request: Any, context: Any) -> pb.ScrubStatus:
        scrub = await self._scrubber(context)
        logger.info("scrub of volume %s requested by %s (max rate %s)", request.name, who(context),
                    request.max_rate or "unlimited")

        async def start() -> ScrubState:
            return scrub.start_scrub(request.name, request.max_rate)
        return pb.ScrubStatus(**(await _guard(context, start())).public())

    async def GetScrub(self, request: Any, context: Any) -> pb.ScrubStatus:
        scrub = await self._scrubber(context)

        async def get() -> ScrubState:
            return scrub.get(request.name)
        return pb.ScrubStatus(**(await _guard(context, get())).public())

    async def VolumeUsage(self, request: Any, context: Any) -> pb.VolumeUsageResponse:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        usage = await _guard(context, svc.volume_usage(list(request.names)))
        return pb.VolumeUsageResponse(volumes=[pb.VolumeUsage(**u) for u in usage])

    async def ReportReplicaFailure(self, request: Any, context: Any) -> pb.Layout:
        svc = self.svc  # one view for the whole call, even if leadership changes during it
        if self.repl is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "replication is not available")
        assert self.repl is not None
        await _guard(context, self.repl.report_failure(request.volume_id, request.generation, request.extent_id,
                                                       request.reason or "unavailable", request.address,
                                                       request.lease_id))
        async def get() -> pb.Layout:
            lay, eps = svc.layout(volume_id=request.volume_id)
            return layout_to_pb(lay, eps)
        return await _guard(context, get())

    async def _reb(self, context: Any) -> Any:
        if self.reb is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "rebalancing is not available")
        return self.reb

    async def Rebalance(self, request: Any, context: Any) -> pb.RebalanceStatus:
        reb = await self._reb(context)
        if not request.plan_only:
            logger.info("rebalance requested by %s (max rate %s)", who(context), request.max_rate or "unlimited")
        st = await _guard(context, reb.start(plan_only=request.plan_only, max_rate=request.max_rate,
                                             volumes=list(request.volumes)))
        return rebalance_pb(st)

    async def GetRebalance(self, request: Any, context: Any) -> pb.RebalanceStatus:
        reb = await self._reb(context)
        return rebalance_pb(reb.status())

    async def CancelRebalance(self, request: Any, context: Any) -> pb.RebalanceStatus:
        reb = await self._reb(context)
        logger.info("rebalance cancel requested by %s", who(context))
        return rebalance_pb(await _guard(context, reb.cancel()))

    async def Drain(self, request: Any, context: Any) -> pb.RebalanceStatus:
        reb = await self._reb(context)
        logger.info("%s of server %s requested by %s", "undrain" if request.undrain else "removal" if request.remove
                    else "drain", request.host, who(context))
        return rebalance_pb(await _guard(context, reb.drain(request.host, request.remove, request.undrain,
                                                                  request.max_rate)))


async def serve(
    config: MetaConfig, on_ready: Optional[Callable[[str], None]] = None, link: Optional[AgentLink] = None,
    info: Optional[dict[str, Any]] = None,
) -> None:
    """Run the metadata service until cancelled; ``on_ready`` gets the bound host:port; ``info`` (if
    given) gets ``metrics``, the bound metrics address, before that.

    With SQLite this process is the pool's only metadata service and leads from the start. With
    etcd it runs for leader (``pool/etcdstore.py``) and, until it wins, forwards callers to the
    leader (``LeaderGate``). Winning loads the whole view from the store; losing (or a failed commit) drops it: the
    store is the only source of truth a new leader needs."""
    check_bindable(config.listen, "metadata service")
    secrets = keys.create(config.secret_path())
    store = open_store(config.store, config.prefix)
    try:
        check_store(store, secrets)
    except BaseException:
        store.close()
        raise
    agent_link = link or GrpcAgentLink(secrets=secrets, tls=config.tls())
    campaign = getattr(store, "campaign", None)
    role = Role(store_url=store.url,
                leader=lambda: (getattr(store, "leader_info", None) or {}).get("address", ""),
                may_act=getattr(store, "is_leader", lambda: True))
    metrics = MetaCollector(role)
    # no SO_REUSEPORT: a second service on a busy address must fail, not split the connections
    gate = LeaderGate(role, config.tls())
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=[CountRpcs(metrics), gate])
    pbg.add_MetaServicer_to_server(MetaServicer(role=role), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host, _, port = config.listen.rpartition(":")
    bound = grpctls.add_port(server, config.listen, config.tls())
    if bound == 0:
        store.close()
        await agent_link.close()
        raise UsageError(f"cannot listen on {config.listen}: the address is in use or not local")
    await server.start()
    address = f"{host or '127.0.0.1'}:{bound}"
    role.address = config.advertise or (f"{socket.getfqdn()}:{bound}" if host in ("0.0.0.0", "[::]", "::", "")
                                        else address)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[bool] = asyncio.Queue()
    if campaign is not None:
        value = json.dumps({"address": role.address, "host": socket.gethostname(), "pid": os.getpid()}).encode()
        campaign(value, config.leader_ttl, lambda won: loop.call_soon_threadsafe(events.put_nowait, won))
        logger.info("metadata service on %s (store %s): standing for leader", address, store.url)
    else:
        events.put_nowait(True)
    took_up = asyncio.Event()
    leading = asyncio.create_task(_lead(config, store, agent_link, secrets, role, events, took_up))
    stopped = asyncio.create_task(server.wait_for_termination())
    http = None
    try:
        if campaign is None:  # alone on SQLite: ready means serving the pool, as before there were elections
            waiter = asyncio.create_task(took_up.wait())
            await asyncio.wait({leading, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if leading.done():
                leading.result()  # it could not load the store: the daemon exits with why
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        http = start_metrics(config.metrics_listen, metrics) if config.metrics_listen else None
        if http is not None and info is not None:
            info["metrics"] = f"{http.server_address[0]}:{http.server_port}"
        if on_ready is not None:
            on_ready(address)
        await asyncio.wait({leading, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if leading.done():
            leading.result()  # a fatal error (another pool's store): the daemon exits with it
    finally:
        leading.cancel()
        stopped.cancel()
        await _step_down(role)
        if http is not None:
            http.shutdown()
        await server.stop(grace=1.0)
        await gate.close()
        await agent_link.close()
        store.close()


async def _lead(config: MetaConfig, store: KVStore, link: AgentLink, secrets: list[bytes], role: Role,
                events: "asyncio.Queue[bool]", took_up: Optional[asyncio.Event] = None) -> None:
    """Take up and drop the leader's work as the election (or a failed commit) says."""
    loop = asyncio.get_running_loop()
    while True:
        won = await events.get()
        if not won or role.svc is not None:
            if not won:
                await _step_down(role)
            continue
        try:
            service = MetaService(store, link, config.heartbeat_interval, config.agent_timeout, config.lease_ttl)
            service.check_secret(secrets)
        except UsageError:
            raise  # another pool's data: the daemon stops and says so
        except NvpoolError as exc:
            logger.error("cannot take up the metadata service: %s; retrying", exc)
            await _retry_later(store, events)
            continue

        term = service.store.term  # type: ignore[attr-defined]

        def failed(exc: Exception, term: Any = term) -> None:
            loop.call_soon(events.put_nowait, False)
            loop.call_soon(lambda: asyncio.ensure_future(_retry_later(store, events, term)))

        service.on_failure = failed
        if hasattr(link, "epoch"):
            link.epoch = service.epoch  # agents refuse orders of older terms (agents/control.py)
        if hasattr(link, "may_act"):
            link.may_act = role.acting  # no orders to agents while the term is uncertain
        rebalancer = Rebalancer(service)
        replication = Replication(service, rebuild_after=config.rebuild_after, rate=config.repair_rate)
        scrubber = Scrubber(service, replication, rate=config.scrub_rate, interval=config.scrub_interval)
        role.svc, role.reb, role.repl, role.scrub = service, rebalancer, replication, scrubber
        role.watch = asyncio.create_task(_watch(service, role))
        rebalancer.resume()
        replication.start()
        scrubber.start()
        if took_up is not None:
            took_up.set()
        logger.info("metadata service of pool %s leads on %s (store %s, term %d)", service.pool_id, role.address,
                    store.url, service.epoch)


async def _retry_later(store: KVStore, events: "asyncio.Queue[bool]", term: Any = None) -> None:
    """After a failed commit: with etcd, give up the term the failed view was loaded in (the election runs
    again, maybe electing this process, which then reloads); alone on SQLite, reload after a pause."""
    step_down = getattr(store, "step_down", None)  # an elected store (etcd)
    if step_down is not None:
        step_down(term)
    else:
        await asyncio.sleep(1.0)
        events.put_nowait(True)


async def _step_down(role: Role) -> None:
    svc, reb, repl, scrub, watch = role.svc, role.reb, role.repl, role.scrub, role.watch
    if svc is None:
        return
    role.svc = role.reb = role.repl = role.scrub = None
    role.watch = None
    # this view is over: whatever of it still runs (a create waiting on agents) must not commit, and its
    # late failure must not end a later term (pool/kvstore.py)
    svc.on_failure = None
    if svc.failed is None:
        svc.failed = UnavailableError("this metadata service stepped down")
    if watch is not None:
        watch.cancel()
    if scrub is not None:
        await scrub.stop()
    if repl is not None:
        await repl.stop()
    if reb is not None:
        await reb.stop()
    logger.info("metadata service stopped leading (term %d)", svc.epoch)


async def _watch(service: MetaService, role: Role) -> None:
    """Housekeeping: log agents whose heartbeats stopped, expire leases."""
    while True:
        await asyncio.sleep(service.heartbeat_interval)
        if service.failed is not None:
            return
        if not role.acting():
            continue  # the term is uncertain: nothing may be decided now
        try:
            service.mark_down()
            service.expire_leases()
        except NvpoolError as exc:  # the store failed: the service is poisoned and the leader steps down
            logger.warning("housekeeping: %s", exc)
            return
