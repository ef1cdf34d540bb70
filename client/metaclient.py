"""Client of the metadata service (gRPC edge of the client library).

Converts protobuf to plain domain objects and gRPC status codes to nvpool exceptions, so nothing
else in ``client/`` imports generated code.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import grpc

from nvpool.proto.layout import Layout
from nvpool.proto import grpctls
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto.tls import TlsFiles, from_env
from nvpool.proto import nvpool_pb2_grpc as pbg
from nvpool.proto.convert import layout_from_pb
from nvpool.proto.records import Endpoint
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
    #: who has it open: [{"mode": "write"|"read", "holder": "...", "granted": wall clock}], writer first
    holders: list[dict[str, Any]] = field(default_factory=list)
    replicas: int = 1
    failure_domain: str = "host"
    #: "ok" or "degraded" (some replica out of service or being repaired)
    health: str = "ok"
    #: replicated volumes: [{"column", "replica", "state", "drives", "host", "domain"}]
    replica_info: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_pb(m: Any) -> "VolumeInfo":
        return VolumeInfo(
            m.volume_id, m.name, m.size, m.stripe_unit, m.stripe_width, m.generation, m.state, m.created,
            list(m.drives), list(m.hosts),
            [{"mode": h.mode, "holder": h.holder, "granted": h.granted} for h in m.holders],
            m.replicas or 1, m.failure_domain or "host", m.health or "ok",
            [{"column": r.column, "replica": r.replica, "state": r.state, "drives": list(r.drives), "host": r.host,
              "domain": r.domain} for r in m.replica_info],
        )


def holder_name(what: str = "") -> str:
    """Who opens a volume, as status and refusals show it: 'host pid N (program)'."""
    prog = what or os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python") or "python"
    return f"{socket.gethostname()} pid {os.getpid()} ({prog})"


def holder_gone(message: str) -> str:
    """For a refusal naming a holder ('host pid N (program)'): when that holder ran on this host and its
    process is gone, a sentence saying so (its lease runs out by itself); else ""."""
    m = re.search(r"by (\S+) pid (\d+) \(", message)
    if m is None or m.group(1) != socket.gethostname():
        return ""
    pid = int(m.group(2))
    if pid == os.getpid():
        return "that is this process: another of its clients holds it"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return (f"process {pid} has exited without closing the volume; its lease runs out by itself, or take it "
                "over with force / --force")
    except OSError:
        pass
    return ""


_CODES: dict[grpc.StatusCode, type[NvpoolError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: UsageError,
    grpc.StatusCode.FAILED_PRECONDITION: LeaseError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


#: text gRPC puts in UNAVAILABLE when the channel itself failed (not a status the metadata service sent)
_TRANSPORT_MARKERS = (
    "failed to connect to all addresses", "errors resolving", "dns resolution failed", "socket closed",
    "connection reset", "broken pipe", "connection refused", "goaway", "keepalive watchdog", "stream removed",
    "connection attempt timed out", "no route to host", "network is unreachable", "endpoint closing",
)


def _host_of(address: str) -> str:
    host = address.rpartition(":")[0] if ":" in address else address
    return host.removeprefix("[").removesuffix("]") or address


def _transport_reason(details: str, address: str) -> str:
    """A short reason for a failed connection, in words (the raw resolver/socket text stays out)."""
    d = details.lower()
    if "errors resolving" in d or "dns resolution failed" in d or "domain name not found" in d or "lookup" in d:
        return f"unknown host {_host_of(address)!r} (the name does not resolve)"
    if "connection refused" in d:
        return "connection refused (is `nvpool meta` running there?)"
    if "timed out" in d or "timeout" in d:
        return "the connection attempt timed out"
    if "no route to host" in d:
        return "no route to host"
    if "network is unreachable" in d:
        return "network is unreachable"
    if "ssl" in d or "handshake" in d or "certificate" in d:
        return ("the TLS handshake failed: the service and this client do not hold certificates of the same pool "
                "(NVPOOL_TLS must name a directory with the pool's ca.pem, client.pem and client.key)")
    if "socket closed" in d or "connection reset" in d or "broken pipe" in d or "goaway" in d or "stream removed" in d:
        return ("the connection was closed by the other side (is it an nvpool metadata service? if the pool "
                "uses TLS, set NVPOOL_TLS to its client certificates)")
    return "the connection failed (if the pool uses TLS, check NVPOOL_TLS)"


def translate(
    exc: grpc.aio.AioRpcError, address: str, timeout: Optional[float] = None, connected: bool = True,
    method: str = "",
) -> NvpoolError:
    """An nvpool exception for a failed call. Failures to reach the service name the address and say what
    happened in words; statuses the service sent keep its message."""
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout:g} s" if timeout else ""
        if not connected:
            return UnavailableError(
                f"cannot reach the metadata service at {address}: no answer{within} "
                "(it accepts connections but does not answer, or the network drops them)"
            )
        what = f" to {method}" if method else ""
        return UnavailableError(
            f"the metadata service at {address} sent no answer{what}{within}; the request may still complete"
        )
    if code == grpc.StatusCode.UNAVAILABLE and any(m in details.lower() for m in _TRANSPORT_MARKERS):
        return UnavailableError(f"cannot reach the metadata service at {address}: {_transport_reason(details, address)}")
    cls = _CODES.get(code, NvpoolError)
    return cls(details)


_forked = False  # this process is a fork() child of one that may have used grpc.aio


def _note_fork() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_note_fork)


class _Redirect(Exception):
    def __init__(self, leader: str) -> None:
        super().__init__(leader)
        self.leader = leader


class MetaClient:
    """Calls the metadata service. ``address`` may list several (``m1:7400,m2:7400,m3:7400``, the
    services of an etcd-backed pool): a call goes to the one that answered last; a standby's "not
    the leader" moves it to the leader it names, and an unreachable one to the next address, within
    the call's deadline (``timeout``), and the error then names every address tried."""

    def __init__(self, address: Optional[str] = None, timeout: float = 30.0, tls: Optional[TlsFiles] = None) -> None:
        self.addresses = [a.strip() for a in (address or default_meta()).split(",") if a.strip()] or [DEFAULT_META]
        self.address = self.addresses[0]
        self.timeout = timeout
        #: the pool's TLS material (proto/tls.py); default: $NVPOOL_TLS, else plaintext
        self.tls = tls if tls is not None else from_env()
        # grpc.aio does not survive fork(): in a child it crashes (uvloop) or never answers (asyncio), even
        # on a new channel. A client made in a forked child calls through gRPC's synchronous stack on a
        # worker thread instead (tests/test_client_fork.py).
        self._sync_stack = _forked
        self._channels: dict[str, tuple[Any, Any]] = {}
        self._use(self.address)

    def _use(self, address: str) -> None:
        self.address = address
        got = self._channels.get(address)
        if got is None:
            ch = (grpctls.sync_channel(address, self.tls) if self._sync_stack
                  else grpctls.aio_channel(address, self.tls))
            got = self._channels[address] = (ch, pbg.MetaStub(ch))
        self._channel, self._stub = got

    async def close(self) -> None:
        for ch, _ in self._channels.values():
            if self._sync_stack:
                ch.close()
            else:
                await ch.close()
        self._channels.clear()

    async def _call_sync_stack(self, name: str, request: Any, timeout: float) -> Any:
        off = os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "").strip().lower()
        if off in ("0", "false", "no"):  # then no gRPC call can complete in a forked child: say so at once
            raise UnavailableError(
                f"cannot reach the metadata service at {self.address} from a forked process: gRPC's fork support "
                f"is off (GRPC_ENABLE_FORK_SUPPORT={off}); unset it, or start workers with 'spawn'"
            )
        call = functools.partial(getattr(self._stub, name), request, timeout=timeout)
        try:  # gRPC enforces the deadline; the wall-clock bound is for a gRPC core that the fork left stuck
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, call), timeout + 5)
        except grpc.RpcError as exc:
            raise translate(exc, self.address, timeout, True, name) from None
        except TimeoutError:
            raise UnavailableError(
                f"the metadata service at {self.address} sent no answer to {name} within {timeout:g} s "
                "(from a forked process, where gRPC may not work: start workers with 'spawn')"
            ) from None

    async def _call(self, name: str, request: Any, timeout: Optional[float] = None) -> Any:
        """One call with a deadline of ``timeout`` (default ``self.timeout``) seconds, moving between
        metadata services as the class doc says."""
        deadline = timeout or self.timeout
        end = time.monotonic() + deadline
        failures: dict[str, str] = {}
        hops = 0
        first = True
        while True:
            left = deadline if first else max(0.05, end - time.monotonic())
            first = False
            try:
                return await self._call_once(name, request, left)
            except (AlreadyExistsError, NotFoundError) as exc:
                # an earlier attempt may have been applied by a leader that died before answering
                exc.after_failover = bool(failures)
                raise
            except _Redirect as r:
                hops += 1
                if time.monotonic() >= end:
                    raise UnavailableError(f"the metadata services keep naming a leader that does not answer "
                                           f"({r.leader}); an election may be under way, retry") from None
                if r.leader in failures:  # a standby names a leader that just failed: its lease has not run out
                    await asyncio.sleep(min(0.2, max(0.0, end - time.monotonic())))
                    self._use(self._next_address())
                    continue
                self._use(r.leader)
                continue
            except UnavailableError as exc:
                failures[self.address] = str(exc)
                if len(self.addresses) == 1 and not hops:
                    raise
                if time.monotonic() >= end or len(failures) >= len(self.addresses) + 1:
                    if len(failures) == 1:
                        raise
                    raise UnavailableError("no metadata service answered: " + "; ".join(
                        f"{a}: {why}" for a, why in failures.items())) from None
                nxt = self._next_address()
                if nxt in failures and len(failures) >= len(self.addresses):
                    await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))
                self._use(nxt)

    def _next_address(self) -> str:
        """The address after the current one (the first, when the current one is a leader we were sent to)."""
        i = self.addresses.index(self.address) if self.address in self.addresses else -1
        return self.addresses[(i + 1) % len(self.addresses)]

    async def _call_once(self, name: str, request: Any, deadline: float) -> Any:
        if self._sync_stack:
            return await self._call_sync_stack(name, request, deadline)
        if len(self.addresses) > 1:
            # an unreachable service is skipped after a short wait, not after the whole deadline (polled:
            # a cancelled channel_ready() leaves a gRPC operation behind that outlives the event loop)
            give_up = time.monotonic() + min(deadline, 3.0)
            while (state := self._channel.get_state(try_to_connect=True)) != grpc.ChannelConnectivity.READY:
                if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    break  # refused: the call below fails at once with gRPC's own words
                if time.monotonic() >= give_up:
                    raise UnavailableError(f"cannot reach the metadata service at {self.address}: the connection "
                                           "attempt timed out")
                await asyncio.sleep(0.02)
        try:
            return await getattr(self._stub, name)(request, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            leader = dict(exc.trailing_metadata() or ()).get("nvpool-leader", "")
            if exc.code() == grpc.StatusCode.UNAVAILABLE and leader and leader != self.address:
                raise _Redirect(str(leader)) from None
            connected = self._channel.get_state() == grpc.ChannelConnectivity.READY
            raise translate(exc, self.address, deadline, connected, name) from None

    async def create_volume(self, name: str, size: int, stripe_unit: int = 0, stripe_width: int = 0,
                            replicas: int = 1, failure_domain: str = "host") -> VolumeInfo:
        try:
            m = await self._call(
                "CreateVolume", pb.CreateVolumeRequest(name=name, size=size, stripe_unit=stripe_unit,
                                                       stripe_width=stripe_width, replicas=replicas,
                                                       failure_domain=failure_domain)
            )
        except AlreadyExistsError as exc:
            if exc.after_failover:  # our own first attempt, applied by a leader that died
                got = await self.get_volume(name)
                if got.size >= size and got.replicas == replicas and not got.holders:
                    return got
            raise
        return VolumeInfo.from_pb(m)

    async def report_replica_failure(self, volume_id: int, generation: int, extent_id: int, reason: str,
                                     timeout: float, address: str = "", lease_id: str = ""
                                     ) -> tuple[Layout, dict[str, Endpoint]]:
        """Tell the service a replica did not answer; returns the layout to retry with (see
        ``pool/replication.py``, step 1). Only a holder of a lease on the volume (``lease_id``) is heard."""
        m = await self._call("ReportReplicaFailure", pb.ReplicaFailureRequest(
            volume_id=volume_id, generation=generation, extent_id=extent_id, reason=reason, address=address,
            lease_id=lease_id), timeout=timeout)
        return layout_from_pb(m)

    async def get_volume(self, name: str) -> VolumeInfo:
        return VolumeInfo.from_pb(await self._call("GetVolume", pb.GetVolumeRequest(name=name)))

    async def list_volumes(self) -> list[VolumeInfo]:
        m = await self._call("ListVolumes", pb.ListVolumesRequest())
        return [VolumeInfo.from_pb(v) for v in m.volumes]

    async def resize_volume(self, name: str, size: int) -> VolumeInfo:
        return VolumeInfo.from_pb(await self._call("ResizeVolume", pb.ResizeVolumeRequest(name=name, size=size)))

    async def delete_volume(self, name: str, force: bool = False, own_leases: Sequence[str] = ()) -> None:
        try:
            await self._call("DeleteVolume", pb.DeleteVolumeRequest(name=name, force=force, lease_ids=list(own_leases)))
        except NotFoundError as exc:
            if not exc.after_failover:  # else: our first attempt deleted it
                raise

    async def get_layout(self, name: str = "", volume_id: int = 0, lease_id: str = "") -> tuple[Layout, dict[str, Endpoint]]:
        lay, eps, _ = await self.get_layout_cap(name, volume_id, lease_id)
        return lay, eps

    async def get_layout_cap(self, name: str = "", volume_id: int = 0, lease_id: str = ""
                             ) -> tuple[Layout, dict[str, Endpoint], bytes]:
        """The layout, its endpoints, and (with a lease) a capability to present to agents."""
        m = await self._call("GetLayout", pb.GetLayoutRequest(name=name, volume_id=volume_id, lease_id=lease_id))
        lay, eps = layout_from_pb(m)
        return lay, eps, bytes(m.capability)

    async def open_volume(self, name: str, write: bool, force: bool = False, holder: str = "") -> tuple[str, float]:
        """Take a lease (writer: exclusive; reader: shared); returns (lease id, seconds it lives unrenewed)."""
        try:
            m = await self._call("OpenVolume", pb.OpenVolumeRequest(name=name, write=write, force=force,
                                                                    holder=holder or holder_name(),
                                                                    request_id=uuid.uuid4().hex))
        except LeaseError as exc:
            gone = holder_gone(str(exc))
            if gone:
                raise LeaseError(f"{exc} ({gone})") from None
            raise
        return m.lease_id, m.ttl_ms / 1000

    async def renew_lease(self, lease_id: str, intent_settled: int = 0) -> tuple[float, bytes, int]:
        """Renew a lease; returns (seconds it lives unrenewed, a fresh capability, the volume's write-intent
        epoch). ``intent_settled``: a replicated volume's writer's claim (``pool/replication.py``, "Write
        intent"): every write it started before it learned that epoch is on every copy."""
        m = await self._call("RenewLease", pb.RenewLeaseRequest(lease_id=lease_id, intent_settled=intent_settled),
                             timeout=5)
        return float(m.ttl_ms) / 1000, bytes(m.capability), int(m.intent_epoch)

    async def close_volume(self, lease_id: str, unsettled: bool = False) -> None:
        """Return a lease; ``unsettled``: this writer gave up on writes, so its copies may differ (the
        service resyncs what it may have left different, as after a crash)."""
        await self._call("CloseVolume", pb.CloseVolumeRequest(lease_id=lease_id, unsettled=unsettled), timeout=5)

    def close_volume_sync(self, lease_id: str, unsettled: bool = False, timeout: float = 2.0) -> bool:
        """``close_volume`` through gRPC's synchronous stack, for when no event loop may run any more (at
        interpreter exit): each address in turn (a standby forwards to the leader); whether one took it."""
        req = pb.CloseVolumeRequest(lease_id=lease_id, unsettled=unsettled)
        for address in self.addresses:
            try:
                ch = grpctls.sync_channel(address, self.tls)
                try:
                    pbg.MetaStub(ch).CloseVolume(req, timeout=timeout)
                    return True
                finally:
                    ch.close()
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    return True  # gone already
            except (OSError, ValueError):
                pass
        return False

    async def pool_status(self) -> Any:
        """The PoolStatusResponse message (the CLI renders it)."""
        return await self._call("PoolStatus", pb.PoolStatusRequest())

    async def call(self, name: str, request: Any, timeout: Optional[float] = None) -> Any:
        """Any other Meta RPC by name (rebalance, drain, ...), with errors translated."""
        return await self._call(name, request, timeout)
