"""The storage agent daemon: opens its drives, serves the data plane, registers with the metadata
service and heartbeats.

The data plane serves from the extent tables on the drives' own labels, so it works from the first
second, even while the metadata service is unreachable; registration (retried with back-off) then
brings the extent table in line with the metadata service's authoritative list.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import grpc

from nvpool.agents import osio
from nvpool.agents.control import AgentServicer
from nvpool.agents.copy import Copier
from nvpool.agents.core import AgentCore
from nvpool.agents.dataplane import start_tcp
from nvpool.agents.shm import start_unix
from nvpool.agents.drive import Drive, DriveSpec
from nvpool.proto import nvpool_pb2 as pb
from nvpool.proto import nvpool_pb2_grpc as pbg
from nvpool.proto.convert import extent_record_from_pb, extent_record_to_pb
from nvpool.proto.config import check_keys
from nvpool.proto.errors import UsageError

logger = logging.getLogger(__name__)


def split_hostport(text: str, default_port: int = 0) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text or "127.0.0.1", default_port
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise UsageError(f"invalid address {text!r}: expected HOST:PORT") from None


@dataclass(frozen=True)
class AgentConfig:
    """Every option of ``nvpool agent``; documented in deploy/agent.conf.sample."""

    meta: str = "127.0.0.1:7400"
    listen: str = "127.0.0.1:7500"  # data plane (TCP); port 0 picks one
    control_listen: str = ""  # control gRPC; default: the data-plane host, port 0
    unix_path: str = ""  # same-host data plane (one-sided transport); "" = none
    advertise: str = ""  # data address clients should use, if not the bound one
    drives: tuple[str, ...] = ()
    discover_nvme: bool = False
    name: str = field(default_factory=socket.gethostname)  # agent id
    host: str = ""  # failure domain: the server (default: name)
    rack: str = ""
    heartbeat_interval: float = 1.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "AgentConfig":
        check_keys(cls, values, "agent")
        vals = dict(values)
        if "drives" in vals:
            vals["drives"] = tuple(vals["drives"])
        return cls(**vals)


class StorageAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        specs = [DriveSpec.parse(d) for d in config.drives]
        if config.discover_nvme:
            specs += [DriveSpec(ns.path) for ns in osio.discover_nvme()]
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
        self.core = AgentCore(drives)
        self.agent_id = config.name
        self.address = ""
        self.control_address = ""
        self.registered = asyncio.Event()
        self._servers: list[Any] = []
        self._grpc: Optional[grpc.aio.Server] = None

    async def start(self) -> None:
        host, port = split_hostport(self.config.listen, 7500)
        srv = await start_tcp(self.core, host, port)
        self._servers.append(srv)
        bound = srv.sockets[0].getsockname()
        self.address = self.config.advertise or f"{host}:{bound[1]}"
        if self.config.unix_path:
            self._servers.append(await start_unix(self.core, self.config.unix_path))
        self._grpc = grpc.aio.server()
        self.copier = Copier(self.core)
        pbg.add_AgentServicer_to_server(AgentServicer(self.core, self.copier.copy), self._grpc)
        chost, cport = split_hostport(self.config.control_listen or f"{host}:0")
        got = self._grpc.add_insecure_port(f"{chost}:{cport}")
        if got == 0:
            raise UsageError(f"cannot listen on control address {chost}:{cport}")
        await self._grpc.start()
        self.control_address = f"{chost}:{got}"
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
            version="0.1.0",
        )

    def _drive_infos(self) -> list[pb.DriveInfo]:
        from nvpool.agents.drive import DATA_OFFSET

        return [
            pb.DriveInfo(
                drive_id=d.drive_id, path=d.path, capacity=d.capacity, data_offset=DATA_OFFSET,
                state="failed" if d.failed else "ok",
            )
            for d in self.core.drives.values()
        ]

    async def run_registration(self) -> None:
        """Register, then heartbeat forever; re-register when the metadata service asks."""
        interval = self.config.heartbeat_interval
        backoff = 0.2
        async with grpc.aio.insecure_channel(self.config.meta) as channel:
            stub = pbg.MetaStub(channel)
            need_register = True
            warned = False
            while True:
                try:
                    if need_register:
                        resp = await stub.RegisterAgent(self._register_request(), timeout=10)
                        self.core.replace_all(extent_record_from_pb(r) for r in resp.extents)
                        if resp.heartbeat_interval_ms:
                            interval = resp.heartbeat_interval_ms / 1000
                        need_register = False
                        warned = False
                        logger.info("registered with %s (%d drives)", self.config.meta, len(self.core.drives))
                        continue  # heartbeat at once: it tells the service the extent list is applied
                    else:
                        st = self.core.stats
                        hb = await stub.Heartbeat(
                            pb.HeartbeatRequest(
                                agent_id=self.agent_id, drives=self._drive_infos(), bytes_read=st.bytes_read,
                                bytes_written=st.bytes_written, commands=st.commands,
                            ),
                            timeout=max(2 * interval, 2.0),
                        )
                        need_register = hb.reregister
                        if not need_register:
                            self.registered.set()  # registered, extents adopted, placeable
                    backoff = 0.2
                    await asyncio.sleep(interval)
                except grpc.aio.AioRpcError as exc:
                    if not warned:
                        logger.warning("metadata service %s: %s; retrying", self.config.meta, exc.details())
                        warned = True
                    need_register = True
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        self.copier.close()
        self.core.close()
        if self.config.unix_path:
            try:
                os.unlink(self.config.unix_path)
            except OSError:
                pass


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
