"""The metadata service's domain core: registry of agents and drives, volumes, layouts and fences.

Contract:

* State lives in memory and in a ``KVStore``; every mutation is committed to the store before the
  call returns, so a restarted service loses nothing it acknowledged. Mutations are serialized by
  one asyncio lock.
* Free space is derived from the extents in all layouts (current and migration target): there is no
  second allocation table to drift. Volume and extent ids come from persisted counters and are
  never reused, so a stale client can never address a reused extent.
* Each volume has per-extent *fences* (the lowest layout generation an agent accepts). The extents
  an agent must hold, with their fences, are derived from the layouts: ``extents_for_agent``.
* Agents are called through ``AgentLink`` (gRPC ``Agent`` service); a tested fake can replace it.

Nothing here imports generated protobuf code; ``pool/server.py`` is the gRPC edge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Protocol

from nvpool.pool.kvstore import KVStore
from nvpool.proto.layout import DEFAULT_STRIPE_UNIT, Extent, Layout
from nvpool.pool.planner import DriveSpace, plan_columns, plan_grow
from nvpool.proto.records import Endpoint, ExtentRecord
from nvpool.proto.errors import AlreadyExistsError, NotFoundError, UnavailableError, UsageError

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MIN_STRIPE_UNIT, MAX_STRIPE_UNIT = 4096, 16 * 1024 * 1024
SIZE_ALIGN = 4096


class AgentLink(Protocol):
    """The calls the metadata service makes to agents (control plane)."""

    async def assign(self, address: str, records: list[ExtentRecord], zero: bool) -> None: ...

    async def release(self, address: str, extent_ids: list[int]) -> None: ...

    async def fence(self, address: str, volume_id: int, min_generation: int) -> None: ...

    async def copy(
        self, address: str, dst: Extent, dst_offset: int, src_address: str, src: Extent, src_offset: int,
        length: int, generation: int,
    ) -> int: ...

    async def close(self) -> None: ...


@dataclass
class AgentRec:
    agent_id: str
    host: str
    rack: str
    address: str
    control_address: str
    unix_path: str
    drives: list[str]
    state: str = "active"  # "active" | "draining"
    last_seen: float = field(default=0.0, compare=False)
    #: False from registration until the agent's next heartbeat, which it sends only after it has
    #: adopted the authoritative extent list: until then it takes no new extents (a concurrent
    #: assignment would be dropped when the agent applies the older list)
    ready: bool = field(default=False, compare=False)


@dataclass
class DriveRec:
    drive_id: str
    agent_id: str
    path: str
    capacity: int
    data_offset: int
    state: str = "ok"


@dataclass
class VolumeRec:
    volume_id: int
    name: str
    size: int
    stripe_unit: int
    created: float
    state: str = "ready"  # "ready" | "migrating"


def _j(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class MetaService:
    def __init__(
        self, store: KVStore, agents: AgentLink, heartbeat_interval: float = 1.0, agent_timeout: float = 3.0
    ) -> None:
        self.store = store
        self.link = agents
        self.heartbeat_interval = heartbeat_interval
        self.agent_timeout = agent_timeout
        self.lock = asyncio.Lock()
        self.agents: dict[str, AgentRec] = {}
        self.drives: dict[str, DriveRec] = {}
        self.volumes: dict[str, VolumeRec] = {}
        self.layouts: dict[int, Layout] = {}
        self.fences: dict[int, dict[int, int]] = {}  # volume_id -> extent_id -> min generation
        self.next_volume_id = 1
        self.next_extent_id = 1
        self._load()

    # ------------------------------------------------------------------ persistence
    def _load(self) -> None:
        for _, v in self.store.scan("agent/"):
            a = AgentRec(**json.loads(v))
            self.agents[a.agent_id] = a
        for _, v in self.store.scan("drive/"):
            d = DriveRec(**json.loads(v))
            self.drives[d.drive_id] = d
        for _, v in self.store.scan("volume/"):
            vol = VolumeRec(**json.loads(v))
            self.volumes[vol.name] = vol
        for _, v in self.store.scan("layout/"):
            lay = Layout.from_dict(json.loads(v))
            self.layouts[lay.volume_id] = lay
        for k, v in self.store.scan("fences/"):
            self.fences[int(k.split("/")[1])] = {int(e): g for e, g in json.loads(v).items()}
        counters = self.store.get("counters")
        if counters:
            c = json.loads(counters)
            self.next_volume_id, self.next_extent_id = c["volume"], c["extent"]
        for a in self.agents.values():
            a.last_seen, a.ready = 0.0, False
        logger.info("loaded %d agents, %d drives, %d volumes", len(self.agents), len(self.drives), len(self.volumes))

    def _counters(self) -> dict[str, bytes]:
        return {"counters": _j({"volume": self.next_volume_id, "extent": self.next_extent_id})}

    def _volume_puts(self, vol: VolumeRec) -> dict[str, bytes]:
        lay = self.layouts[vol.volume_id]
        return {
            f"volume/{vol.name}": _j(asdict(vol)),
            f"layout/{vol.volume_id:020d}": _j(lay.to_dict()),
            f"fences/{vol.volume_id:020d}": _j({str(k): g for k, g in self.fences[vol.volume_id].items()}),
        }

    def persist_volume(self, vol: VolumeRec) -> None:
        self.store.commit({**self._volume_puts(vol), **self._counters()})

    # ------------------------------------------------------------------ registry
    def alive(self, agent_id: str, now: Optional[float] = None) -> bool:
        a = self.agents.get(agent_id)
        return a is not None and (now or time.monotonic()) - a.last_seen <= self.agent_timeout and a.last_seen > 0

    def agent_of_drive(self, drive_id: str) -> AgentRec:
        d = self.drives.get(drive_id)
        if d is None or d.agent_id not in self.agents:
            raise UnavailableError(f"drive {drive_id} is not attached to any registered agent")
        return self.agents[d.agent_id]

    def extents_for_agent(self, agent_id: str) -> list[ExtentRecord]:
        drives = {d for d, rec in self.drives.items() if rec.agent_id == agent_id}
        out = []
        for vid, lay in self.layouts.items():
            fences = self.fences.get(vid, {})
            for e in lay.extents():
                if e.drive_id in drives:
                    out.append(ExtentRecord(e.extent_id, e.drive_id, e.drive_offset, e.length, vid,
                                            fences.get(e.extent_id, 1)))
        return out

    async def register_agent(
        self, agent: AgentRec, drives: list[DriveRec]
    ) -> list[ExtentRecord]:
        async with self.lock:
            old = self.agents.get(agent.agent_id)
            if old is not None:
                agent.state = old.state
            puts: dict[str, bytes] = {}
            deletes: list[str] = []
            for d in drives:
                prev = self.drives.get(d.drive_id)
                if prev is not None and prev.agent_id != agent.agent_id:
                    logger.info("drive %s moved from agent %s to %s", d.drive_id, prev.agent_id, agent.agent_id)
                    other = self.agents.get(prev.agent_id)
                    if other is not None and d.drive_id in other.drives:
                        other.drives.remove(d.drive_id)
                        puts[f"agent/{other.agent_id}"] = _j({**asdict(other), "last_seen": 0.0})
                if prev is not None and d.capacity < prev.capacity:
                    d.capacity = prev.capacity  # never shrink below placed extents
                self.drives[d.drive_id] = d
                puts[f"drive/{d.drive_id}"] = _j(asdict(d))
            agent.drives = [d.drive_id for d in drives]
            agent.last_seen = time.monotonic()
            agent.ready = False
            self.agents[agent.agent_id] = agent
            puts[f"agent/{agent.agent_id}"] = _j({**asdict(agent), "last_seen": 0.0, "ready": False})
            self.store.commit(puts, deletes)
            logger.info("agent %s registered at %s with %d drives", agent.agent_id, agent.address, len(drives))
            return self.extents_for_agent(agent.agent_id)

    def heartbeat(self, agent_id: str, drive_states: dict[str, str]) -> bool:
        """Returns True if the agent must register again."""
        a = self.agents.get(agent_id)
        if a is None or not a.address:
            return True
        a.last_seen = time.monotonic()
        a.ready = True
        for did, st in drive_states.items():
            d = self.drives.get(did)
            if d is not None and d.state != st:
                d.state = st
                self.store.commit({f"drive/{did}": _j(asdict(d))})
        return False

    def drive_spaces(self, exclude_hosts: Iterable[str] = ()) -> list[DriveSpace]:
        """Space snapshots for the planner (usable = alive agent, drive ok, server not draining)."""
        excl = set(exclude_hosts)
        used: dict[str, list[tuple[int, int]]] = {d: [] for d in self.drives}
        for lay in self.layouts.values():
            for e in lay.extents():
                used.setdefault(e.drive_id, []).append((e.drive_offset, e.length))
        now = time.monotonic()
        out = []
        for d in sorted(self.drives.values(), key=lambda d: d.drive_id):
            a = self.agents.get(d.agent_id)
            usable = (
                a is not None and a.ready and self.alive(a.agent_id, now) and d.state == "ok"
                and a.state == "active" and a.host not in excl
            )
            out.append(DriveSpace(d.drive_id, a.host if a else "", d.capacity, d.data_offset,
                                  tuple(used.get(d.drive_id, ())), usable, a.rack if a else ""))
        return out

    # ------------------------------------------------------------------ volumes
    def volume(self, name: str) -> VolumeRec:
        v = self.volumes.get(name)
        if v is None:
            raise NotFoundError(f"no volume named {name!r}")
        return v

    def volume_by_id(self, volume_id: int) -> VolumeRec:
        for v in self.volumes.values():
            if v.volume_id == volume_id:
                return v
        raise NotFoundError(f"no volume with id {volume_id}")

    async def assign_on_agents(self, volume_id: int, extents: list[Extent], generation: int) -> None:
        """Assign (zeroed) extents on their agents, all or nothing."""
        by_agent: dict[str, list[ExtentRecord]] = {}
        for e in extents:
            a = self.agent_of_drive(e.drive_id)
            by_agent.setdefault(a.agent_id, []).append(
                ExtentRecord(e.extent_id, e.drive_id, e.drive_offset, e.length, volume_id, generation)
            )
        names = list(by_agent)
        results = await asyncio.gather(
            *(self.link.assign(self.agents[n].control_address, by_agent[n], True) for n in names),
            return_exceptions=True,
        )
        failed = [(n, r) for n, r in zip(names, results) if isinstance(r, BaseException)]
        if failed:
            ok = [n for n, r in zip(names, results) if not isinstance(r, BaseException)]
            await asyncio.gather(
                *(self.link.release(self.agents[n].control_address, [r.extent_id for r in by_agent[n]]) for n in ok),
                return_exceptions=True,
            )
            n, exc = failed[0]
            raise UnavailableError(f"agent {n} could not take the new extents: {exc}")

    async def release_on_agents(self, extents: Iterable[Extent]) -> None:
        """Best effort: an agent that misses it drops them when it registers again."""
        by_agent: dict[str, list[int]] = {}
        for e in extents:
            d = self.drives.get(e.drive_id)
            if d is not None and d.agent_id in self.agents:
                by_agent.setdefault(d.agent_id, []).append(e.extent_id)
        results = await asyncio.gather(
            *(self.link.release(self.agents[a].control_address, ids) for a, ids in by_agent.items()),
            return_exceptions=True,
        )
        for a, r in zip(by_agent, results):
            if isinstance(r, BaseException):
                logger.info("agent %s will drop released extents when it registers again (%s)", a, r)

    async def fence_on_agents(self, volume_id: int, extents: Iterable[Extent], generation: int) -> None:
        """Fence extents at ``generation`` on every agent holding them; all must acknowledge."""
        agents = {self.agent_of_drive(e.drive_id).agent_id for e in extents}
        results = await asyncio.gather(
            *(self.link.fence(self.agents[a].control_address, volume_id, generation) for a in sorted(agents)),
            return_exceptions=True,
        )
        for a, r in zip(sorted(agents), results):
            if isinstance(r, BaseException):
                raise UnavailableError(f"agent {a} did not acknowledge fence {generation} of volume {volume_id}: {r}")
        # an agent fences every extent of the volume it holds: mirror that, so re-registration agrees
        lay = self.layouts.get(volume_id)
        fences = self.fences.setdefault(volume_id, {})
        if lay is not None:
            for e in lay.extents():
                d = self.drives.get(e.drive_id)
                if d is not None and d.agent_id in agents:
                    fences[e.extent_id] = max(fences.get(e.extent_id, 1), generation)
            self.store.commit({f"fences/{volume_id:020d}": _j({str(k): g for k, g in fences.items()})})

    def _validate(self, name: str, size: int, stripe_unit: int) -> tuple[int, int]:
        if not NAME_RE.match(name or ""):
            raise UsageError(
                f"invalid volume name {name!r}: 1-64 characters of letters, digits, '.', '_', '-', "
                "starting with a letter or digit"
            )
        if size <= 0:
            raise UsageError(f"volume size must be positive (got {size})")
        size = -(-size // SIZE_ALIGN) * SIZE_ALIGN
        su = stripe_unit or DEFAULT_STRIPE_UNIT
        if su & (su - 1) or not MIN_STRIPE_UNIT <= su <= MAX_STRIPE_UNIT:
            raise UsageError(f"stripe unit must be a power of two between 4 KiB and 16 MiB (got {su})")
        return size, su

    async def create_volume(self, name: str, size: int, stripe_unit: int = 0, width: int = 0) -> VolumeRec:
        size, su = self._validate(name, size, stripe_unit)
        if width < 0:
            raise UsageError("stripe width must not be negative")
        async with self.lock:
            if name in self.volumes:
                raise AlreadyExistsError(f"a volume named {name!r} already exists")
            vid = self.next_volume_id
            columns, next_eid = plan_columns(self.drive_spaces(), size, su, width, vid, self.next_extent_id)
            # burn the ids first: they must never be reused, even if the agents refuse
            self.next_volume_id, self.next_extent_id = vid + 1, next_eid
            self.store.commit(self._counters())
            lay = Layout(vid, name, 1, size, su, columns)
            lay.validate()
            await self.assign_on_agents(vid, list(lay.extents()), 1)
            vol = VolumeRec(vid, name, size, su, time.time())
            self.volumes[name] = vol
            self.layouts[vid] = lay
            self.fences[vid] = {e.extent_id: 1 for e in lay.extents()}
            self.persist_volume(vol)
            logger.info("created volume %s (%d bytes, %d columns)", name, size, lay.width)
            return vol

    async def resize_volume(self, name: str, size: int) -> VolumeRec:
        async with self.lock:
            vol = self.volume(name)
            size, _ = self._validate(name, size, vol.stripe_unit)
            lay = self.layouts[vol.volume_id]
            if lay.target is not None:
                raise UsageError(f"volume {name!r} is being re-spread; resize it when that is done")
            if size < vol.size:
                raise UsageError(f"shrinking {name!r} from {vol.size} to {size} bytes would discard data; only growing is supported")
            if size == vol.size:
                return vol
            new, next_eid = plan_grow(lay, self.drive_spaces(), size, self.next_extent_id)
            self.next_extent_id = next_eid
            self.store.commit(self._counters())
            old_ids = {e.extent_id for e in lay.extents()}
            added = [e for e in new.extents() if e.extent_id not in old_ids]
            await self.assign_on_agents(vol.volume_id, added, new.generation)
            vol.size = size
            self.layouts[vol.volume_id] = new
            self.fences[vol.volume_id].update({e.extent_id: new.generation for e in added})
            self.persist_volume(vol)
            return vol

    async def delete_volume(self, name: str) -> None:
        async with self.lock:
            vol = self.volume(name)
            lay = self.layouts.pop(vol.volume_id)
            del self.volumes[name]
            self.fences.pop(vol.volume_id, None)
            self.store.commit(
                {}, [f"volume/{name}", f"layout/{vol.volume_id:020d}", f"fences/{vol.volume_id:020d}",
                     f"migration/{vol.volume_id:020d}"],
            )
        await self.release_on_agents(lay.extents())
        logger.info("deleted volume %s", name)

    def layout(self, name: str = "", volume_id: int = 0) -> tuple[Layout, list[Endpoint]]:
        vol = self.volume(name) if name else self.volume_by_id(volume_id)
        lay = self.layouts[vol.volume_id]
        return lay, self.endpoints(lay.drive_ids())

    def endpoints(self, drive_ids: Iterable[str]) -> list[Endpoint]:
        out = []
        now = time.monotonic()
        for did in sorted(drive_ids):
            d = self.drives.get(did)
            a = self.agents.get(d.agent_id) if d else None
            if a is None:
                continue
            out.append(Endpoint(did, a.agent_id, a.address, a.unix_path, a.host, self.alive(a.agent_id, now)))
        return out

    def volume_view(self, vol: VolumeRec) -> dict[str, Any]:
        lay = self.layouts[vol.volume_id]
        drives = [c.extents[0].drive_id for c in lay.columns]
        hosts = [self.agents[self.drives[d].agent_id].host if d in self.drives and self.drives[d].agent_id in self.agents else "" for d in drives]
        return {
            "volume_id": vol.volume_id, "name": vol.name, "size": vol.size, "stripe_unit": vol.stripe_unit,
            "stripe_width": lay.width, "generation": lay.generation,
            "state": "migrating" if lay.target is not None else vol.state, "created": vol.created,
            "drives": drives, "hosts": hosts,
        }

    def pool_status(self) -> dict[str, Any]:
        spaces = {s.drive_id: s for s in self.drive_spaces()}
        counts: dict[str, int] = {}
        for lay in self.layouts.values():
            for e in lay.extents():
                counts[e.drive_id] = counts.get(e.drive_id, 0) + 1
        now = time.monotonic()
        agents = []
        degraded = False
        for a in sorted(self.agents.values(), key=lambda a: a.agent_id):
            alive = self.alive(a.agent_id, now)
            drives = []
            for did in a.drives:
                d = self.drives.get(did)
                if d is None:
                    continue
                used = spaces[did].used_bytes if did in spaces else 0
                drives.append({"drive": d, "used": used, "extents": counts.get(did, 0)})
                if (not alive or d.state != "ok") and counts.get(did, 0):
                    degraded = True
            agents.append({"agent": a, "alive": alive and a.ready, "drives": drives})
        cap = sum(d.capacity for d in self.drives.values())
        used = sum(s.used_bytes for s in spaces.values())
        health = "empty" if not self.drives else ("degraded" if degraded else "ok")
        return {"agents": agents, "capacity": cap, "used": used, "volumes": len(self.volumes), "health": health}
