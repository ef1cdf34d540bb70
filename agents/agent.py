"""The storage agent daemon: opens its drives, serves the data plane, registers with the metadata
service and heartbeats.

The data plane serves from the extent tables on the drives' own labels, so it works from the first
second, even while the metadata service is unreachable; registration (retried with back-off) then
brings the extent table in line with the metadata service's authoritative list, and every heartbeat
reconciles it again (see ``pool/meta.py``, "Extent release").

Pool identity: the drives' labels carry the pool id from the agent's first registration. An agent
never adopts the extent list of a metadata service of another pool, nor of one that refuses it
because it holds extents that service never allocated (a wrong address, a restored older store): it
keeps its extents and data, logs why at ERROR, and tries again later.

Addresses: the agent registers the address clients and the metadata service should dial, never a
wildcard: ``advertise`` (a host, or host:port) if given, else the listen host, else (for 0.0.0.0
or ::) the local address this server uses to reach the metadata service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nvpool.agents import osio
from nvpool.agents.control import AgentServicer, ControlAuth, Terms
from nvpool.agents.copy import Copier
from nvpool.agents.metrics import AgentCollector
from nvpool.agents.core import AgentCore
from nvpool.agents.dataplane import close_connections, start_tcp
from nvpool.agents.shm import start_unix
from nvpool import __version__
from nvpool.agents.drive import DATA_OFFSET, LABEL_MAGIC, Drive, DriveSpec
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto import nvpool_pb2_grpc as pbg
from nvpool.proto.convert import extent_record_from_pb, extent_record_to_pb
from nvpool.proto.config import check_keys
from nvpool.proto.addresses import check_bindable, is_wildcard, join_hostport, split_hostport
from nvpool.proto.errors import UsageError
from nvpool.proto import capability, grpctls, keys
from nvpool.proto.metrics import start_metrics
from nvpool.proto.tls import TlsFiles, tls_files
from nvpool.proto.records import extent_digest

logger = logging.getLogger(__name__)


def route_source(meta: str) -> str:
    """The local address this host uses to reach ``meta`` (a UDP connect sends nothing)."""
    host, port = split_hostport(meta.split(",")[0], 7400)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return str(s.getsockname()[0])
    except OSError as exc:
        raise UsageError(
            f"cannot tell which address to advertise (listening on a wildcard, and {meta} is not routable: "
            f"{exc.strerror or exc}); pass --advertise HOST"
        ) from None


def default_name() -> str:
    """The server's host name; a generic one (localhost, a container's) gets the machine id added."""
    name = socket.gethostname() or "localhost"
    if name.startswith("localhost"):
        try:
            with open("/etc/machine-id") as f:
                name = f"{name}-{f.read().strip()[:12]}"
        except OSError:
            pass
    return name


@dataclass(frozen=True)
class AgentConfig:
    """Every option of ``nvpool agent``; documented in deploy/agent.toml.sample."""

    meta: str = "127.0.0.1:7400"
    listen: str = "127.0.0.1:7500"  # data plane (TCP); port 0 picks one
    control_listen: str = ""  # control gRPC; default: the data-plane host, port 0
    unix_path: str = ""  # same-host data plane (one-sided transport); "" = none
    advertise: str = ""  # host (or host:port of the data plane) others dial; never a wildcard
    drives: tuple[str, ...] = ()
    discover_nvme: bool = False
    name: str = field(default_factory=default_name)  # agent id, unique in the pool
    host: str = ""  # failure domain: the server (default: name)
    rack: str = ""
    #: failure-domain labels ("rack=r1"); a volume's --failure-domain names one of the keys
    labels: tuple[str, ...] = ()
    heartbeat_interval: float = 1.0
    #: the pool's join secret (created by `nvpool meta` next to its store); required
    join_secret_file: str = ""
    #: TLS (proto/tls.py): the pool CA, this agent's certificate and key; all three or none
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    #: with TLS: encrypt the TCP data plane too (costs CPU on both ends); control calls are always TLS then
    data_tls: bool = True
    #: HOST:PORT of a Prometheus metrics endpoint ("" = none)
    metrics_listen: str = ""
    #: data-plane connections kept open at once (an agent-wide bound on what peers can cost)
    max_connections: int = 4096

    def tls(self) -> Optional[TlsFiles]:
        return tls_files(self.tls_ca, self.tls_cert, self.tls_key)

    def __post_init__(self) -> None:
        for lab in self.labels:
            key, sep, value = lab.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,31}", key) or not value or key == "host":
                raise UsageError(f"invalid label {lab!r}: KEY=VALUE with a key of letters, digits, '_', '.', '-' "
                                 "(not 'host', which is the server itself)")

    def label_map(self) -> dict[str, str]:
        """Labels as a mapping; ``rack`` given on its own is the label ``rack``."""
        out = {"rack": self.rack} if self.rack else {}
        out.update(lab.split("=", 1) for lab in self.labels)  # type: ignore[misc]
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "AgentConfig":
        check_keys(cls, values, "agent")
        vals = dict(values)
        if "drives" in vals:
            vals["drives"] = tuple(vals["drives"])
        if isinstance(vals.get("labels"), Mapping):
            vals["labels"] = tuple(f"{k}={v}" for k, v in vals["labels"].items())
        elif "labels" in vals:
            vals["labels"] = tuple(vals["labels"])
        return cls(**vals)


class StorageAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        if not config.join_secret_file:
            raise UsageError("an agent needs the pool's join secret: --join-secret-file PATH (`nvpool meta` "
                             "creates it next to its store, e.g. /var/lib/nvpool/meta.db.join-secret; copy it "
                             "to this server, mode 600)")
        self.secrets = keys.load(config.join_secret_file)
        specs = [DriveSpec.parse(d) for d in config.drives]
        if config.discover_nvme:
            for ns in osio.discover_nvme():
                why = osio.in_use(ns.path, own_magic=LABEL_MAGIC)
                if why:
                    logger.warning("--discover-nvme: skipping %s (%s %s): it %s", ns.path, ns.model, ns.serial, why)
                else:
                    specs.append(DriveSpec(ns.path))
        if not specs:
            raise UsageError("an agent needs at least one drive (--drive file:PATH:SIZE or --drive /dev/...)")
        drives: list[Drive] = []
        try:
            for spec in specs:
                drives.append(Drive.open(spec))
        except BaseException:
            for d in drives:
                d.close()
            raise
        ids = [d.drive_id for d in drives]
        if len(set(ids)) != len(ids):
            for d in drives:
                d.close()
            raise UsageError("the same drive was given twice")
        pools = {d.pool_id for d in drives if d.pool_id}
        if len(pools) > 1:
            for d in drives:
                d.close()
            raise UsageError(f"the drives belong to different pools ({', '.join(sorted(pools))}); "
                             "serve each pool's drives from its own agent")
        self.pool_id = pools.pop() if pools else ""
        self.instance = uuid.uuid4().hex
        self.core = AgentCore(drives)
        self.core.secrets = self.secrets
        #: the highest metadata-service term seen (agents/control.py ``Terms``)
        self.terms = Terms()
        self.core.max_connections = config.max_connections
        self.agent_id = config.name
        #: extent ids the metadata service asked us to release that we no longer hold (to confirm)
        self._released: set[int] = set()
        self.address = ""
        self.control_address = ""
        self.registered = asyncio.Event()
        self._servers: list[Any] = []
        self._grpc: Optional[grpc.aio.Server] = None
        self.data_tls = False
        self._metrics: Optional[Any] = None
        self._last_heartbeat = 0.0
        self._identities: dict[str, tuple[str, str]] = {}

    async def start(self) -> None:
        host, port = split_hostport(self.config.listen, 7500)
        check_bindable(join_hostport(host, port), "agent data plane")
        tls = self.config.tls()
        self.data_tls = tls is not None and self.config.data_tls
        srv = await start_tcp(self.core, host, port, tls.server_context() if self.data_tls and tls else None)
        self._servers.append(srv)
        bound = srv.sockets[0].getsockname()
        adv_host, adv_port = self.config.advertise, 0
        if adv_host.startswith("[") or adv_host.count(":") == 1:  # HOST:PORT or [V6]:PORT
            adv_host, adv_port = split_hostport(adv_host)
        if not adv_host:
            adv_host = route_source(self.config.meta) if is_wildcard(host) else host
        if is_wildcard(adv_host):
            raise UsageError(f"cannot advertise the wildcard address {adv_host}: pass --advertise HOST")
        self.address = join_hostport(adv_host, adv_port or bound[1])
        if self.config.unix_path:
            self._servers.append(await start_unix(self.core, self.config.unix_path))
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                                     interceptors=[ControlAuth(self.secrets, self.terms)])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # until registered
        self.copier = Copier(self.core, tls)
        pbg.add_AgentServicer_to_server(AgentServicer(self.core, self.copier.copy), self._grpc)
        chost, cport = split_hostport(self.config.control_listen or f"{host}:0")
        check_bindable(join_hostport(chost, cport), "agent control service")
        got = grpctls.add_port(self._grpc, f"{chost}:{cport}", tls)
        if got == 0:
            raise UsageError(f"cannot listen on control address {chost}:{cport}: in use or not local")
        await self._grpc.start()
        if self.config.metrics_listen:
            self._metrics = start_metrics(self.config.metrics_listen,
                                          AgentCollector(self.core, self.agent_id, self._heartbeat_age))
        self.control_address = join_hostport(adv_host, got)
        logger.info("agent %s data plane on %s, control on %s", self.agent_id, self.address, self.control_address)

    def _register_request(self) -> pb.RegisterAgentRequest:
        return pb.RegisterAgentRequest(
            agent_id=self.agent_id,
            host=self.config.host or self.config.name,
            rack=self.config.rack,
            address=self.address,
            control_address=self.control_address,
            unix_path=self.config.unix_path,
            drives=self._drive_infos(),
            extents=[extent_record_to_pb(r) for r in self.core.extents.values()],
            version=__version__,
            pool_id=self.pool_id,
            instance=self.instance,
            labels=self.config.label_map(),
            credential=capability.join_proof(self.secrets[0], self.agent_id, self.instance, time.time()),
            data_tls=self.data_tls,
        )

    def _adopt_pool(self, pool_id: str) -> bool:
        """Check the metadata service's pool id against the drives'; label unlabelled drives."""
        if self.pool_id and pool_id != self.pool_id:
            logger.error(
                "metadata service %s serves pool %s, but this agent's drives belong to pool %s: "
                "refusing it (extents and data kept); check --meta", self.config.meta, pool_id or "?", self.pool_id)
            return False
        if not self.pool_id and pool_id:
            for d in self.core.drives.values():
                d.set_pool(pool_id)
            self.pool_id = pool_id
            logger.info("drives joined pool %s", pool_id)
        return True

    def _heartbeat_request(self) -> pb.HeartbeatRequest:
        st = self.core.stats
        released = sorted(e for e in self._released if e not in self.core.extents)
        return pb.HeartbeatRequest(
            agent_id=self.agent_id, drives=self._drive_infos(), bytes_read=st.bytes_read,
            bytes_written=st.bytes_written, commands=st.commands, instance=self.instance,
            extents_digest=extent_digest(self.core.extents.values()), released=released,
            credential=capability.join_proof(self.secrets[0], self.agent_id, self.instance, time.time()),
        )

    async def _apply_heartbeat(self, hb: pb.HeartbeatResponse, sent: pb.HeartbeatRequest) -> None:
        self._released -= set(sent.released)  # confirmed: the service has freed them
        if hb.reconcile:
            before = dict(self.core.extents)
            dropped = self.core.keep_only(extent_record_from_pb(r) for r in hb.keep)
            await self.core.punch_async(before[e] for e in dropped)
        if hb.release:
            await self.core.release_async(hb.release)
            self._released |= set(hb.release)

    def _drive_infos(self) -> list[pb.DriveInfo]:
        return [
            pb.DriveInfo(
                drive_id=d.drive_id, path=d.path, capacity=d.capacity, data_offset=DATA_OFFSET,
                state="failed" if d.failed else "ok", errors=d.errors, last_error=d.last_error,
                model=self._identity(d.path)[0], serial=self._identity(d.path)[1],
            )
            for d in self.core.drives.values()
        ]

    async def run_registration(self) -> None:
        """Register, then heartbeat forever; re-register when the metadata service asks.

        ``--meta`` may list several metadata services (an etcd-backed pool): the agent talks to one; when
        it fails or answers "not the leader" the agent moves to the leader it names, else to the next
        address. Answers of an older term than the agent has seen come from a deposed leader and are
        ignored (``Terms``)."""
        interval = self.config.heartbeat_interval
        backoff = 0.2
        addresses = [a.strip() for a in self.config.meta.split(",") if a.strip()]
        channels: dict[str, Any] = {}
        current = 0
        hint = ""
        #: when each address last failed: a standby may go on naming a dead leader until its lease ends
        failed_at: dict[str, float] = {}
        call_timeout = 10.0 if len(addresses) == 1 else 3.0

        def stub_for(address: str) -> Any:
            if address not in channels:
                channels[address] = grpctls.aio_channel(address, self.config.tls())
            return pbg.MetaStub(channels[address])

        try:
            need_register = True
            warned = False
            serve_lease = 0.0
            while True:
                address = hint or addresses[current % len(addresses)]
                stub = stub_for(address)
                try:
                    sent_at = time.monotonic()
                    if need_register:
                        resp = await stub.RegisterAgent(self._register_request(), timeout=call_timeout)
                        why = self.terms.check(resp.epoch)
                        if why:
                            raise _Deposed(why)
                        if not self._adopt_pool(resp.pool_id):
                            await asyncio.sleep(min(backoff * 10, 30.0))
                            backoff = min(backoff * 2, 5.0)
                            continue
                        self.core.keep_only(extent_record_from_pb(r) for r in resp.extents)
                        if resp.heartbeat_interval_ms:
                            interval = resp.heartbeat_interval_ms / 1000
                        serve_lease = resp.serve_lease_ms / 1000
                        self.core.serve_until = sent_at + serve_lease  # fences applied: serve again
                        need_register = False
                        warned = False
                        hint = address
                        logger.info("registered with %s (%d drives)", address, len(self.core.drives))
                        continue  # heartbeat at once: it tells the service the extent list is applied
                    else:
                        req = self._heartbeat_request()
                        hb = await stub.Heartbeat(req, timeout=max(2 * interval, 2.0))
                        why = self.terms.check(hb.epoch)
                        if why:
                            raise _Deposed(why)
                        need_register = hb.reregister
                        if not need_register:
                            await self._apply_heartbeat(hb, req)
                            self.core.serve_until = sent_at + serve_lease  # after the fences it carried
                            self.registered.set()  # registered, extents adopted, placeable
                            self._last_heartbeat = time.monotonic()
                            await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
                    backoff = 0.2
                    await asyncio.sleep(interval)
                except _Deposed as exc:
                    logger.warning("metadata service %s: %s", address, exc)
                    need_register, hint = True, ""
                    current += 1
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                except grpc.aio.AioRpcError as exc:
                    refused = exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
                                             grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                    leader = dict(exc.trailing_metadata() or ()).get("nvpool-leader", "")
                    if refused:  # not a network problem: say it every time, loudly, and back off
                        logger.error("metadata service %s refused this agent: %s", address, exc.details())
                    elif leader and leader != address:
                        logger.info("metadata service %s: the leader is %s", address, leader)
                    elif not warned:
                        logger.warning("metadata service %s: %s; retrying%s", address, exc.details(),
                                       " with the next one" if len(addresses) > 1 else "")
                        warned = True
                    need_register = True
                    if leader and leader != address and time.monotonic() - failed_at.get(str(leader), -1e9) > 2.0:
                        hint = str(leader)
                        await asyncio.sleep(0.05)
                        continue  # straight to the leader
                    if not leader:
                        failed_at[address] = time.monotonic()
                    hint = ""
                    current += 1
                    if len(addresses) == 1 or current % len(addresses) == 0 or refused:
                        await asyncio.sleep(5.0 if refused else backoff)
                        # several metadata services: one is elected within seconds, keep looking often
                        backoff = min(backoff * 2, 5.0 if len(addresses) == 1 else 1.0)
        finally:
            for ch in channels.values():
                await ch.close()

    def _identity(self, path: str) -> tuple[str, str]:
        got = self._identities.get(path)
        if got is None:
            got = self._identities[path] = osio.device_identity(path)
        return got

    @property
    def metrics_address(self) -> str:
        """Where the metrics endpoint listens ("" without one)."""
        if self._metrics is None:
            return ""
        return f"{self._metrics.server_address[0]}:{self._metrics.server_port}"

    def _heartbeat_age(self) -> float:
        return time.monotonic() - self._last_heartbeat if self._last_heartbeat else -1.0

    async def stop(self) -> None:
        if self._metrics is not None:
            self._metrics.shutdown()
        for srv in self._servers:
            srv.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        self.copier.close()
        close_connections(self.core)  # (native connection threads end before the drives close)
        self.core.close()
        if self.config.unix_path:
            try:
                os.unlink(self.config.unix_path)
            except OSError:
                pass


class _Deposed(Exception):
    """An answer from a metadata service of an older term than this agent has seen."""


async def serve(config: AgentConfig, on_ready: Optional[Callable[["StorageAgent"], None]] = None) -> None:
    """Run an agent until cancelled. ``on_ready`` gets the agent once it serves and is registered."""
    agent = StorageAgent(config)
    await agent.start()
    reg = asyncio.create_task(agent.run_registration())
    try:
        waiter = asyncio.create_task(agent.registered.wait())
        await asyncio.wait({reg, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if reg.done():
            reg.result()
        if on_ready is not None:
            on_ready(agent)
        await reg
    finally:
        reg.cancel()
        await agent.stop()
