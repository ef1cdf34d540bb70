"""The metadata service's domain core: registry of agents and drives, volumes, layouts, fences, leases.

Contract:

* State lives in memory and in a ``KVStore``; every mutation is committed to the store before the
  call returns, so a restarted service loses nothing it acknowledged. Mutations are serialized by
  one asyncio lock.
* Volume and extent ids come from persisted counters and are never reused, so a stale client can
  never address a reused extent.
* Free space is derived from the extents in all layouts (current and migration target) plus the
  *reserved* extents: there is no second allocation table to drift.
* Each volume has per-extent *fences* (the lowest layout generation an agent accepts). The extents
  an agent must hold, with their fences, are derived from the layouts: ``extents_for_agent``.
* Agents are called through ``AgentLink`` (gRPC ``Agent`` service); a tested fake can replace it.

Pool identity. The first start of a store creates a pool id (``pool`` key). Agents write it into
their drive labels at their first registration and refuse a metadata service with another id; the
service refuses an agent whose drives carry another pool's id, or that holds extent ids it never
allocated (ids at or above ``next_extent_id``: a different or an older, restored store). So an agent
pointed at the wrong metadata service keeps its extents and its data, and says why.

Agent identity. A registration carries the agent process's random *instance* token. A second live
agent (heartbeat within ``agent_timeout``) registering an id already held by another instance with
other drives is refused; a restart of the same agent (same drives, which an agent locks) is not.
Heartbeats from an instance that is not the registered one are told to register again (and are
then refused), so two agents can never keep one registry entry alive.

Extent release (why a deleted volume's space is never reused while an agent still serves it):

1. Space is *reserved* before any agent is asked to hold it: a create or grow plans under the lock
   and persists its new extents as ``pending`` reservations, calls the agents outside the lock, and
   commits the layout (dropping the reservations) under the lock. A service that dies in between
   finds the pending reservations at its next start and turns them into ``releasing`` ones.
2. Deleting a volume, dropping a migration's old or target columns, or rolling back a refused create
   removes the extents from every layout and, in the same store commit, records them as
   ``releasing``. Releasing space counts as used: the planner never places anything on it.
3. Every heartbeat response lists the releasing extents on the agent's drives (``release``); the
   agent drops them (persisting its table first) and confirms, in its next heartbeat, the ids it no
   longer holds (``released``). Only a confirmation frees the space. Heartbeats are sequential per
   agent, so a confirmation always describes the agent's table after the drop.
4. A drive that moves to another agent is confirmed by the agent that now holds it (the new agent
   registered with the drive's own label table). An agent that never returns keeps its releasing
   space reserved, which is safe: it is on that agent's drives.
5. Every heartbeat also carries a digest of the extent ids the agent holds; on a mismatch the
   response carries the authoritative keep-list (current layouts plus pending reservations) with
   their fences, and the agent drops what is not in it and raises its fences. Reconciliation never
   *adds* an extent: only ``assign`` does, after zeroing. And an agent refuses to assign an extent
   that overlaps one it holds, so even a stale table cannot put two live extents on the same bytes.

Writer leases (exclusive write access, any number of readers; RBD's exclusive lock is the anchor):
opening a volume for writing takes the writer lease, renewed by the client; a second writer is
refused with the holder's name unless it forces a takeover. Whenever a writer lease is granted after
one that was not closed cleanly (it expired, or is being broken by ``force``), the volume's layout
generation is raised and every agent holding its extents must acknowledge the new fence before the
lease is granted: the previous holder's in-flight and future commands carry an older generation and
are refused (``STALE_LAYOUT``); when it re-fetches the layout with its lease id it is told its lease
is gone, and the client library fails its writes from then on. For a replicated volume the copies the
previous writer may have left different are made identical before the lease is granted
(``pool/replication.py``, "Write intent"); a writer that closes after giving up on a write says so
(``unsettled``) and its close counts as unclean. A takeover is refused while the
volume is being re-spread (the migration owns the generation then). Leases are persisted, renewals
are not: a restarted service gives every persisted lease one full term before it can expire.

Fences are written ahead (why a leader change never strands a volume): every operation that raises
fences on agents first commits the generation it fences at (``fencing/<volume>``), then sends the
fences, then commits the layout. A leader that dies in between leaves the store with a layout older
than fences agents may have applied; the next leader publishes the layout it loaded again at the
fenced generation (same columns and states). That is always safe: the fence only made agents refuse
older generations, and a layout at the new generation that changes nothing routes every read and
write exactly as the old one did (an out replica stays out, a kept one stays in and was fenced with
the others).

Nothing here imports generated protobuf code; ``pool/grpc_meta.py`` is the gRPC edge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
import hashlib
import hmac
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Protocol

from nvpool.pool.kvstore import KVStore, StoreUnavailable
from nvpool.proto.layout import DEFAULT_STRIPE_UNIT, MAX_REPLICAS, Extent, Layout
from nvpool.pool.planner import DriveSpace, plan_grow, plan_replicated
from nvpool.proto.capability import READ, WRITE, Capability, sign
from nvpool.proto.records import Endpoint, ExtentRecord, extent_digest
from nvpool.proto.errors import (
    AlreadyExistsError,
    AuthError,
    LeaseError,
    NotFoundError,
    NvpoolError,
    UnavailableError,
    UsageError,
)

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MIN_STRIPE_UNIT, MAX_STRIPE_UNIT = 4096, 16 * 1024 * 1024
SIZE_ALIGN = 4096
#: how long a writer or reader lease lives without renewal (clients renew every third of it)
LEASE_TTL = 15.0
#: how long a capability is valid (clients get a fresh one with every lease renewal and layout)
CAPABILITY_TTL = 3600


class AgentLink(Protocol):
    """The calls the metadata service makes to agents (control plane)."""

    async def assign(self, address: str, records: list[ExtentRecord], zero: bool) -> None: ...

    async def release(self, address: str, extent_ids: list[int]) -> None: ...

    async def fence(self, address: str, volume_id: int, min_generation: int) -> None: ...

    async def flush(self, address: str) -> None: ...

    async def map_extent(self, address: str, extent_id: int, written: bool = False) -> list[tuple[int, int]]: ...

    async def dirty(self, address: str, extent_ids: list[int], op: str) -> dict[int, Optional[list[tuple[int, int]]]]: ...

    async def intent(self, address: str, volume_id: int, extent_ids: list[int], op: str, epoch: int = 0
                     ) -> dict[int, Optional[list[tuple[int, int]]]]: ...

    async def scrub(self, address: str, extent_id: int, offset: int, length: int) -> tuple[bytes, list[int], bool]: ...

    async def copy(
        self, address: str, dst: Extent, dst_offset: int, src_address: str, src: Extent, src_offset: int,
        length: int, generation: int, volume_id: int = 0, src_tls: bool = False,
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
    #: random token of the registered agent process (see "Agent identity")
    instance: str = field(default="", compare=False)
    #: wall-clock time of the last heartbeat (for operators; liveness uses the monotonic last_seen)
    last_seen_wall: float = field(default=0.0, compare=False)
    #: failure-domain labels (``rack`` is one when given)
    labels: dict[str, str] = field(default_factory=dict)
    #: its TCP data plane is TLS
    data_tls: bool = False
    #: the name of the TLS certificate it first registered with ("" without TLS): the agent id is
    #: bound to it, so no other certificate's holder can take the id over (remove it to re-enroll)
    certificate: str = ""


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
    replicas: int = 1
    failure_domain: str = "host"


@dataclass
class ReplicaRepair:
    """A replica out of service (``pool/replication.py``): why, since when, and the repair's progress."""

    reason: str
    since: float  # wall clock
    since_mono: float = field(default=0.0, compare=False)  # monotonic; not persisted
    state: str = "out"  # "out" | "resync" | "rebuild"
    rebuild: bool = False  # rebuild elsewhere rather than resync in place
    #: resync it whole, not from the write records: a writer ended uncleanly while it was out, so it
    #: may hold writes no other copy has (pool/replication.py, "Write intent")
    whole: bool = False
    bytes_total: int = 0
    bytes_done: int = 0
    started: float = field(default=0.0, compare=False)  # monotonic start of the running copy


@dataclass(frozen=True)
class Reserved:
    """Space no planner may use: extents being created (``pending``) or not yet confirmed released."""

    extent_id: int
    drive_id: str
    drive_offset: int
    length: int
    volume_id: int
    generation: int
    kind: str  # "pending" | "releasing"


@dataclass
class Lease:
    lease_id: str
    volume_id: int
    mode: str  # "write" | "read"
    holder: str  # who: "host pid N (what)"
    granted: float  # wall clock
    expires: float = field(default=0.0, compare=False)  # monotonic; not persisted
    #: the opener's request id: a retried open (its first answer lost in a failover) gets this lease back
    request: str = ""


@dataclass
class HeartbeatResult:
    reregister: bool = False
    #: set when the agent's extent ids differ from the authoritative ones: what it may keep
    keep: Optional[list[ExtentRecord]] = None
    #: releasing extents on the agent's drives that it must drop and confirm
    release: list[int] = field(default_factory=list)


def _j(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _lease_dict(lease: Lease) -> dict[str, Any]:
    d = asdict(lease)
    d.pop("expires")
    return d


@dataclass
class Role:
    """What this metadata process is now: the leader (``svc`` and its workers set) or a standby (all
    None: it redirects callers to ``leader``, the address the leader published)."""

    svc: "Optional[MetaService]" = None
    reb: Any = None
    repl: Any = None
    scrub: Any = None
    #: where this process is reached (published in the leader key)
    address: str = ""
    #: the store's URL, for status
    store_url: str = ""
    #: returns the leader's address as last seen ("" = unknown), and whether this process may act
    leader: Callable[[], str] = field(default=lambda: "")
    may_act: Callable[[], bool] = field(default=lambda: True)
    #: the leader's housekeeping task
    watch: Any = None

    def acting(self) -> bool:
        return self.svc is not None and self.svc.failed is None and self.may_act()


def secret_id(secret: bytes, pool_id: str) -> str:
    """A fingerprint of a join secret, bound to the pool id (kept with the pool id in the store)."""
    return hmac.new(secret, b"nvpool-pool:" + pool_id.encode(), hashlib.sha256).hexdigest()[:32]


def check_store(store: KVStore, secrets: list[bytes]) -> None:
    """Before serving: the store holds nothing, or an nvpool pool whose join secret is among ``secrets``."""
    raw = store.get("pool")
    if raw is None:
        foreign = [k for k, _ in store.scan("")][:3]
        if foreign:
            raise UsageError(
                f"the metadata store {store.url} holds data that is not an nvpool pool's (keys "
                f"{', '.join(foreign)}...): give this pool a prefix of its own (--prefix) or an empty store")
        return
    try:
        rec = json.loads(raw)
        pool_id = str(rec["pool_id"])
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"the metadata store {store.url} holds a damaged pool record") from None
    have = rec.get("secret_id")
    if secrets and have and have not in [secret_id(s, pool_id) for s in secrets]:
        raise UsageError(
            f"the metadata store {store.url} holds pool {pool_id}, and the join secret given is not that pool's: "
            "check --prefix (each pool needs its own) and --join-secret-file")


class _WatchedStore:
    """The service's store: a commit that fails (a conflict, lost leadership, an unreachable store)
    poisons the service, whose in-memory view may now be ahead of the store (see pool/kvstore.py)."""

    def __init__(self, store: KVStore, svc: "MetaService") -> None:
        self.inner = store
        self.url = store.url
        self.svc = svc
        #: the leader term this view is loaded in (etcd; None for SQLite): its commits must stay in it
        term = getattr(store, "term", None)
        self.term = term() if term is not None else None

    def get(self, key: str) -> Optional[bytes]:
        return self.inner.get(key)

    def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        return self.inner.scan(prefix)

    def load_revisions(self) -> None:
        self.inner.load_revisions()

    def revision(self, key: str) -> int:
        return self.inner.revision(key)

    def commit(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        if self.svc.failed is not None:
            raise UnavailableError(f"this metadata service stopped acting: {self.svc.failed}")
        try:
            if self.term is not None:
                self.inner.commit(puts, deletes, term=self.term)  # type: ignore[call-arg]
            else:
                self.inner.commit(puts, deletes)
        except StoreUnavailable as exc:
            self.svc.fail(exc)
            raise

    def close(self) -> None:
        self.inner.close()


class MetaService:
    def __init__(
        self, store: KVStore, agents: AgentLink, heartbeat_interval: float = 1.0, agent_timeout: float = 3.0,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        #: set when a commit failed: this instance's view may differ from the store; it answers nothing
        #: more and its host reloads it or steps down (``on_failure``)
        self.failed: Optional[Exception] = None
        self.on_failure: Optional[Callable[[Exception], None]] = None
        self.store: KVStore = _WatchedStore(store, self)
        #: this service's term: raised at every start (and by every new leader); agents refuse orders
        #: and heartbeat answers from an older term (a deposed leader's)
        self.epoch = 0
        self.lease_ttl = lease_ttl
        self.link = agents
        #: the pool's join secrets (first: signs capabilities); empty: no capabilities (unit tests)
        self.secrets: list[bytes] = []
        #: when this process started: an agent is "surely silent" only after agent_timeout from here too
        self.started = time.monotonic()
        #: volume id -> (column, replica) -> repair record of every replica not ``ok``
        self.repairs: dict[int, dict[tuple[int, int], ReplicaRepair]] = {}
        #: drive id -> what its agent last reported (model, serial, errors, last_error); not persisted
        self.drive_health: dict[str, dict[str, Any]] = {}
        self.heartbeat_interval = heartbeat_interval
        self.agent_timeout = agent_timeout
        self.lock = asyncio.Lock()
        self.agents: dict[str, AgentRec] = {}
        self.drives: dict[str, DriveRec] = {}
        self.volumes: dict[str, VolumeRec] = {}
        self.layouts: dict[int, Layout] = {}
        self.fences: dict[int, dict[int, int]] = {}  # volume_id -> extent_id -> min generation
        self.reserved: dict[int, Reserved] = {}  # extent_id -> reservation
        self.leases: dict[str, Lease] = {}  # lease_id -> lease
        #: volume ids whose last writer lease ended without a clean close (next writer must fence;
        #: replicated ones are resynced first: ``on_unclean``)
        self.unclean: set[int] = set()
        #: volume id -> the generation its fences were last raised to (written ahead: see "Fences are
        #: written ahead")
        self.fencing: dict[int, int] = {}
        #: resyncs what a replicated volume's unclean writer may have left different (pool/replication.py)
        self.on_unclean: Optional[Callable[["VolumeRec"], Awaitable[None]]] = None
        #: starts a writer's write-intent records afresh when its lease is granted (pool/replication.py)
        self.on_write_lease: Optional[Callable[["VolumeRec"], Awaitable[None]]] = None
        #: volume id -> the write-intent epoch last announced to its writer (pool/replication.py)
        self.intent_epoch: dict[int, int] = {}
        self._intent_counter = 0
        self.next_volume_id = 1
        self.next_extent_id = 1
        self.pool_id = ""
        self._creating: set[str] = set()
        #: volume ids a resize or a rebalance is changing outside the lock (see ``_claim``)
        self._busy: set[int] = set()
        self._load()

    # ------------------------------------------------------------------ persistence
    def fail(self, exc: Exception) -> None:
        if self.failed is None:
            self.failed = exc
            logger.error("metadata service stops acting on its view: %s", exc)
            if self.on_failure is not None:
                self.on_failure(exc)

    def _load(self) -> None:
        self.store.load_revisions()
        check_store(self.store, [])
        raw_pool = self.store.get("pool")
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
        #: the agents known when this service started (``settle`` waits for them to come back)
        self._loaded_agents = set(self.agents)
        puts: dict[str, bytes] = {}
        for _, v in self.store.scan("reserved/"):
            r = Reserved(**json.loads(v))
            if r.kind == "pending":  # its create or grow died with the previous process: roll it back
                r = Reserved(**{**asdict(r), "kind": "releasing"})
                puts[self._rkey(r.extent_id)] = _j(asdict(r))
            self.reserved[r.extent_id] = r
        now = time.monotonic()
        for _, v in self.store.scan("lease/"):
            lease = Lease(**json.loads(v))
            lease.expires = now + self.lease_ttl  # one full term of grace after a restart
            self.leases[lease.lease_id] = lease
        for _, v in self.store.scan("unclean/"):
            self.unclean.add(int(json.loads(v)))
        for k, v in self.store.scan("fencing/"):
            self.fencing[int(k.split("/")[1])] = int(json.loads(v))
        for k, v in self.store.scan("repl/"):
            recs = {}
            for key, r in json.loads(v).items():
                i, kk = map(int, key.split(":"))
                recs[(i, kk)] = ReplicaRepair(**{**r, "since_mono": now, "started": 0.0})
            self.repairs[int(k.split("/")[1])] = recs
        self.epoch = int(json.loads(self.store.get("epoch") or b"0")) + 1
        puts["epoch"] = _j(self.epoch)
        for vid, g in self.fencing.items():  # see "Fences are written ahead"
            was = self.layouts.get(vid)
            if was is not None and g > was.generation:
                new = was.evolve(generation=g)
                self.layouts[vid] = new
                fences = self.fences.setdefault(vid, {})
                for e in self.live_extents(new):
                    fences[e.extent_id] = max(fences.get(e.extent_id, 1), g)
                puts[f"layout/{vid:020d}"] = _j(new.to_dict())
                puts[f"fences/{vid:020d}"] = _j({str(k): f for k, f in fences.items()})
                logger.warning("volume %d: agents may hold fences at generation %d but its layout was persisted at "
                               "%d (the previous leader stopped in between): published again at %d", vid, g,
                               was.generation, g)
        raw = raw_pool
        if raw:
            self.pool_id = json.loads(raw)["pool_id"]
        else:
            self.pool_id = uuid.uuid4().hex
            puts["pool"] = _j({"pool_id": self.pool_id, "created": time.time()})
            logger.info("new pool %s", self.pool_id)
        self.store.commit(puts)
        logger.info("pool %s: loaded %d agents, %d drives, %d volumes, %d reserved extents", self.pool_id,
                    len(self.agents), len(self.drives), len(self.volumes), len(self.reserved))

    def check_secret(self, secrets: list[bytes]) -> None:
        """The store must hold the pool of this join secret: a fingerprint of the secret is kept with the
        pool id (written at the first start with a secret), so a metadata service given another pool's
        prefix, or another pool's secret, says so instead of serving a pool its agents cannot join."""
        self.secrets = secrets
        if not secrets:
            return
        check_store(self.store, secrets)
        raw = self.store.get("pool")
        rec = json.loads(raw) if raw else {"pool_id": self.pool_id, "created": time.time()}
        mine = [secret_id(s, self.pool_id) for s in secrets]
        if rec.get("secret_id") != mine[0]:
            self.store.commit({"pool": _j({**rec, "secret_id": mine[0]})})

    @staticmethod
    def _rkey(extent_id: int) -> str:
        return f"reserved/{extent_id:020d}"

    def _agent_puts(self, a: AgentRec) -> dict[str, bytes]:
        return {f"agent/{a.agent_id}": _j({**asdict(a), "last_seen": 0.0, "ready": False})}

    def _counters(self) -> dict[str, bytes]:
        return {"counters": _j({"volume": self.next_volume_id, "extent": self.next_extent_id})}

    def _volume_puts(self, vol: VolumeRec) -> dict[str, bytes]:
        lay = self.layouts[vol.volume_id]
        reps = self.repairs.get(vol.volume_id, {})
        return {
            f"volume/{vol.name}": _j(asdict(vol)),
            f"layout/{vol.volume_id:020d}": _j(lay.to_dict()),
            f"fences/{vol.volume_id:020d}": _j({str(k): g for k, g in self.fences[vol.volume_id].items()}),
            f"repl/{vol.volume_id:020d}": _j({
                f"{i}:{k}": {key: val for key, val in asdict(r).items() if key not in ("since_mono", "started")}
                for (i, k), r in reps.items()}),
        }

    def persist_volume(self, vol: VolumeRec) -> None:
        self.store.commit({**self._volume_puts(vol), **self._counters()})

    # ------------------------------------------------------------------ registry
    @property
    def serve_lease(self) -> float:
        """How long an agent serves replicated extents after a successful heartbeat (sent time):
        shorter than ``agent_timeout``, so a silent agent has stopped serving them before the
        service counts it as gone (see ``pool/replication.py``)."""
        return self.agent_timeout * 0.75

    async def settle(self) -> None:
        """Just after this service started (or took over as leader), wait until the agents it knows have
        heartbeated again, for at most ``agent_timeout``: placing a volume before they have would
        leave the servers still re-registering out of it."""
        while time.monotonic() - self.started < self.agent_timeout:
            now = time.monotonic()
            if all(a.last_seen > 0 and self.alive(a.agent_id, now) for a in self.agents.values()
                   if a.drives and a.agent_id in self._loaded_agents):
                return
            await asyncio.sleep(0.05)

    def surely_silent(self, agent_id: str) -> bool:
        """The agent has not heartbeated for ``agent_timeout`` (nor since this process started): its
        serve lease has run out, so it serves no replicated extent."""
        a = self.agents.get(agent_id)
        if a is None:
            return True
        return time.monotonic() - max(a.last_seen, self.started) > self.agent_timeout

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
                                            fences.get(e.extent_id, 1), lay.replicas))
        return out

    def remove_agents(self, agents: list[AgentRec]) -> None:
        """Take servers out of the pool for good (call under the lock; they hold nothing). A removed
        agent that registers again is refused: its drives are recorded as removed."""
        deletes: list[str] = []
        puts: dict[str, bytes] = {}
        for a in agents:
            for d in a.drives:
                self.drives.pop(d, None)
                deletes.append(f"drive/{d}")
                puts[f"removed/{d}"] = _j({"agent_id": a.agent_id, "removed": time.time()})
                # the drive leaves the pool: nothing on it can be reused by this pool any more
                for eid in [e for e, r in self.reserved.items() if r.drive_id == d]:
                    del self.reserved[eid]
                    deletes.append(self._rkey(eid))
            self.agents.pop(a.agent_id, None)
            deletes.append(f"agent/{a.agent_id}")
        self.store.commit(puts, deletes)

    def keep_list_for_agent(self, agent_id: str) -> list[ExtentRecord]:
        """What an agent may hold: its extents in the layouts plus pending ones (being assigned)."""
        drives = {d for d, rec in self.drives.items() if rec.agent_id == agent_id}
        out = self.extents_for_agent(agent_id)
        out += [ExtentRecord(r.extent_id, r.drive_id, r.drive_offset, r.length, r.volume_id, r.generation,
                             self._replicas_of(r.volume_id))
                for r in self.reserved.values() if r.kind == "pending" and r.drive_id in drives]
        return out

    def _replicas_of(self, volume_id: int) -> int:
        lay = self.layouts.get(volume_id)
        if lay is not None:
            return lay.replicas
        return next((v.replicas for v in self.volumes.values() if v.volume_id == volume_id), 1)

    def check_pool(self, agent_id: str, pool_id: str, held: Iterable[int]) -> None:
        """Refuse an agent of another pool, or one holding extents this store never allocated."""
        if pool_id and pool_id != self.pool_id:
            logger.warning("refused agent %s: its drives belong to pool %s, this is pool %s",
                           agent_id, pool_id, self.pool_id)
            raise UsageError(
                f"agent {agent_id!r} belongs to pool {pool_id}, but this metadata service serves pool "
                f"{self.pool_id}: check the agent's --meta address"
            )
        unknown = sorted(e for e in held if e >= self.next_extent_id)
        if unknown:
            logger.warning("refused agent %s: it holds extents %s that this store never allocated",
                           agent_id, unknown[:5])
            raise UsageError(
                f"agent {agent_id!r} holds extents ({', '.join(map(str, unknown[:5]))}) that this metadata "
                f"service never allocated: it is a different pool's or an older copy of this pool's store"
            )

    async def register_agent(
        self, agent: AgentRec, drives: list[DriveRec], pool_id: str = "", held: Iterable[int] = ()
    ) -> list[ExtentRecord]:
        async with self.lock:
            self.check_pool(agent.agent_id, pool_id, held)
            gone = [d.drive_id for d in drives if self.store.get(f"removed/{d.drive_id}") is not None]
            if gone:
                logger.warning("refused agent %s: drive %s was removed from the pool", agent.agent_id, gone[0])
                raise UsageError(
                    f"drive {gone[0]} of agent {agent.agent_id!r} was removed from this pool (nvpool pool remove); "
                    "wipe its first 4 KiB to add it back as a new drive"
                )
            old = self.agents.get(agent.agent_id)
            if old is not None and old.certificate and agent.certificate != old.certificate:
                logger.warning("refused agent %s at %s: the id is bound to another certificate", agent.agent_id,
                               agent.address)
                raise AuthError(
                    f"agent id {agent.agent_id!r} is bound to another certificate; `nvpool pool remove` the old "
                    "server to enroll a new one under this name")
            if old is not None:
                agent.state = old.state
                if (old.instance and agent.instance != old.instance and self.alive(old.agent_id)
                        and set(old.drives) != {d.drive_id for d in drives}):
                    logger.warning("refused agent %s at %s: the name is in use by a live agent at %s",
                                   agent.agent_id, agent.address, old.address)
                    raise AlreadyExistsError(
                        f"an agent named {agent.agent_id!r} is already registered and alive at {old.address} "
                        f"with other drives: give this agent another --name"
                    )
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
            agent.last_seen_wall = time.time()
            agent.ready = False
            self.agents[agent.agent_id] = agent
            puts.update(self._agent_puts(agent))
            self.store.commit(puts, deletes)
            logger.info("agent %s registered at %s (control %s) with %d drives", agent.agent_id, agent.address,
                        agent.control_address, len(drives))
            return self.keep_list_for_agent(agent.agent_id)

    def heartbeat(
        self, agent_id: str, drive_states: dict[str, str], instance: str = "", digest: Optional[bytes] = None,
        released: Iterable[int] = (),
    ) -> HeartbeatResult:
        """Record a heartbeat; tell the agent to register again, to reconcile, or to release extents."""
        a = self.agents.get(agent_id)
        if a is None or not a.address or (instance and a.instance and instance != a.instance):
            return HeartbeatResult(reregister=True)
        if not a.ready or not self.alive(agent_id):
            logger.info("agent %s is up", agent_id)
        a.last_seen = time.monotonic()
        a.last_seen_wall = time.time()
        a.ready = True
        puts: dict[str, bytes] = {}
        deletes: list[str] = []
        for did, st in drive_states.items():
            d = self.drives.get(did)
            if d is not None and d.state != st:
                d.state = st
                puts[f"drive/{did}"] = _j(asdict(d))
        mine = set(a.drives)
        for eid in released:
            r = self.reserved.get(eid)
            if r is not None and r.kind == "releasing" and r.drive_id in mine:
                del self.reserved[eid]
                deletes.append(self._rkey(eid))
        if deletes:
            logger.info("agent %s confirmed the release of %d extents", agent_id, len(deletes))
        self.store.commit(puts, deletes)
        result = HeartbeatResult()
        result.release = sorted(e for e, r in self.reserved.items() if r.kind == "releasing" and r.drive_id in mine)
        if digest is not None:
            keep = self.keep_list_for_agent(agent_id)
            if digest != extent_digest(keep):
                result.keep = keep
        return result

    def mark_down(self) -> list[str]:
        """Agents whose heartbeats stopped since the last call (for the audit log)."""
        now = time.monotonic()
        gone = []
        for a in self.agents.values():
            if a.ready and a.last_seen and not self.alive(a.agent_id, now):
                a.ready = False
                gone.append(a.agent_id)
                logger.warning("agent %s is down: no heartbeat for %.1f s", a.agent_id, now - a.last_seen)
        return gone

    def drive_spaces(self, exclude_hosts: Iterable[str] = ()) -> list[DriveSpace]:
        """Space snapshots for the planner (usable = alive agent, drive ok, server not draining)."""
        excl = set(exclude_hosts)
        used: dict[str, list[tuple[int, int]]] = {d: [] for d in self.drives}
        for lay in self.layouts.values():
            for e in lay.extents():
                used.setdefault(e.drive_id, []).append((e.drive_offset, e.length))
        for r in self.reserved.values():
            used.setdefault(r.drive_id, []).append((r.drive_offset, r.length))
        now = time.monotonic()
        out = []
        for d in sorted(self.drives.values(), key=lambda d: d.drive_id):
            a = self.agents.get(d.agent_id)
            usable = (
                a is not None and a.ready and self.alive(a.agent_id, now) and d.state == "ok"
                and a.state == "active" and a.host not in excl
            )
            out.append(DriveSpace(d.drive_id, a.host if a else "", d.capacity, d.data_offset,
                                  tuple(used.get(d.drive_id, ())), usable, a.rack if a else "",
                                  tuple(sorted(a.labels.items())) if a else ()))
        return out

    # ------------------------------------------------------------------ volumes
    def volume(self, name: str) -> VolumeRec:
        v = self.volumes.get(name)
        if v is None:
            raise NotFoundError(f"no volume named {name!r}")
        return v

    def _name_of(self, volume_id: int) -> str:
        """A volume's name for log lines (its id when it is gone)."""
        return next((v.name for v in self.volumes.values() if v.volume_id == volume_id), f"#{volume_id}")

    def volume_by_id(self, volume_id: int) -> VolumeRec:
        for v in self.volumes.values():
            if v.volume_id == volume_id:
                return v
        raise NotFoundError(f"no volume with id {volume_id}")

    async def assign_on_agents(self, volume_id: int, extents: list[Extent], generation: int,
                               replicas: int = 0) -> None:
        """Assign (zeroed) extents on their agents, all or nothing."""
        replicas = replicas or self._replicas_of(volume_id)
        by_agent: dict[str, list[ExtentRecord]] = {}
        for e in extents:
            a = self.agent_of_drive(e.drive_id)
            by_agent.setdefault(a.agent_id, []).append(
                ExtentRecord(e.extent_id, e.drive_id, e.drive_offset, e.length, volume_id, generation, replicas)
            )
        names = list(by_agent)
        results = await asyncio.gather(
            *(self.link.assign(self.agents[n].control_address, by_agent[n], True) for n in names),
            return_exceptions=True,
        )
        failed = [(n, r) for n, r in zip(names, results) if isinstance(r, BaseException)]
        if failed:
            # every agent asked may hold them (a refusal may come after the agent applied them, e.g. a
            # timeout): all are released, and the space stays reserved until each agent confirms
            self.mark_releasing(extents, volume_id, generation)
            await self.release_on_agents(extents, mark=False)
            n, exc = failed[0]
            raise UnavailableError(f"agent {n} could not take the new extents: {exc}")

    def reserve_pending(self, volume_id: int, extents: Iterable[Extent], generation: int) -> dict[str, bytes]:
        """Reserve new extents before any agent is asked to hold them; returns the store puts."""
        puts = {}
        for e in extents:
            r = Reserved(e.extent_id, e.drive_id, e.drive_offset, e.length, volume_id, generation, "pending")
            self.reserved[e.extent_id] = r
            puts[self._rkey(e.extent_id)] = _j(asdict(r))
        return puts

    def rollback_pending(self, extents: Iterable[Extent]) -> None:
        """Turn still-pending reservations into releasing ones (their agents may hold them)."""
        left = [e for e in extents if (r := self.reserved.get(e.extent_id)) is not None and r.kind == "pending"]
        if left:
            self.mark_releasing(left)

    def unreserve(self, extents: Iterable[Extent]) -> list[str]:
        """Drop pending reservations that a committed layout now accounts for; returns store deletes."""
        out = []
        for e in extents:
            r = self.reserved.get(e.extent_id)
            if r is not None and r.kind == "pending":
                del self.reserved[e.extent_id]
                out.append(self._rkey(e.extent_id))
        return out

    def mark_releasing(self, extents: Iterable[Extent], volume_id: int = 0, generation: int = 0,
                       commit: bool = True) -> dict[str, bytes]:
        """Record extents (already out of every layout) as releasing: reserved until confirmed."""
        puts = {}
        for e in extents:
            r = Reserved(e.extent_id, e.drive_id, e.drive_offset, e.length, volume_id, generation, "releasing")
            self.reserved[e.extent_id] = r
            puts[self._rkey(e.extent_id)] = _j(asdict(r))
        if commit:
            self.store.commit(puts)
        return puts

    async def release_on_agents(self, extents: Iterable[Extent], mark: bool = True) -> None:
        """Mark the extents releasing (persisted) and ask their agents to drop them now. The space is
        freed only when each agent confirms in a heartbeat (see "Extent release" above)."""
        extents = list(extents)
        if mark:
            self.mark_releasing(extents)
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
                logger.info("agent %s will drop released extents at its next heartbeat (%s)", a, r)

    @staticmethod
    def live_extents(lay: Layout) -> list[Extent]:
        """Extents of every replica that is read or written (not ``out``; an out replica refuses every
        generation older than the one that took it out, or has stopped serving: see
        ``pool/replication.py``), and of the migration target."""
        out = [e for i in range(lay.width) for k in range(lay.replicas) if lay.replica_state(i, k) != "out"
               for e in lay.replica_column(i, k).extents]
        if lay.target is not None:
            out += list(lay.target.extents())
        return out

    def fence_ahead(self, volume_id: int, generation: int) -> None:
        """Commit that fences at ``generation`` may be sent (before sending them: see "Fences are written
        ahead")."""
        if generation > self.fencing.get(volume_id, 0):
            self.store.commit({f"fencing/{volume_id:020d}": _j(generation)})
            self.fencing[volume_id] = generation

    def next_intent_epoch(self) -> int:
        """A write-intent epoch above every one this or an earlier leader announced: the term in the high
        bits (raised at every start and leader change, and persisted), a counter in the low ones."""
        self._intent_counter += 1
        return (self.epoch << 32) | self._intent_counter

    async def fence_on_agents(self, volume_id: int, extents: Iterable[Extent], generation: int) -> None:
        """Fence extents at ``generation`` on every agent holding them; all must acknowledge."""
        agents = {self.agent_of_drive(e.drive_id).agent_id for e in extents}
        self.fence_ahead(volume_id, generation)
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

    async def create_volume(self, name: str, size: int, stripe_unit: int = 0, width: int = 0,
                            who: str = "", replicas: int = 1, failure_domain: str = "host") -> VolumeRec:
        """Plan and reserve under the lock, assign on the agents outside it, commit under it."""
        size, su = self._validate(name, size, stripe_unit)
        if width < 0:
            raise UsageError("stripe width must not be negative")
        replicas = replicas or 1
        failure_domain = failure_domain or "host"
        if not 1 <= replicas <= MAX_REPLICAS:
            raise UsageError(f"replicas must be between 1 and {MAX_REPLICAS} (got {replicas})")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,31}", failure_domain):
            raise UsageError(f"invalid failure domain {failure_domain!r}: 'host' or an agent label key such as 'rack'")
        await self.settle()
        async with self.lock:
            if name in self.volumes or name in self._creating:
                raise AlreadyExistsError(f"a volume named {name!r} already exists")
            vid = self.next_volume_id
            columns, mirrors, next_eid = plan_replicated(self.drive_spaces(), size, su, width, vid,
                                                         self.next_extent_id, replicas, failure_domain)
            lay = Layout(vid, name, 1, size, su, columns, mirrors=mirrors)
            lay.validate()
            # burn the ids and reserve the space first: ids are never reused, even if the agents refuse
            self.next_volume_id, self.next_extent_id = vid + 1, next_eid
            self.store.commit({**self._counters(), **self.reserve_pending(vid, lay.extents(), 1)})
            self._creating.add(name)
        try:
            try:
                await self.assign_on_agents(vid, list(lay.extents()), 1, replicas)
            except BaseException:  # refused, or cancelled (the caller went away): never leave them pending
                self.rollback_pending(lay.extents())
                raise
            async with self.lock:
                vol = VolumeRec(vid, name, size, su, time.time(), replicas=replicas, failure_domain=failure_domain)
                self.volumes[name] = vol
                self.layouts[vid] = lay
                self.fences[vid] = {e.extent_id: 1 for e in lay.extents()}
                self.store.commit({**self._volume_puts(vol), **self._counters()}, self.unreserve(lay.extents()))
        finally:
            self._creating.discard(name)
        logger.info("created volume %s (%s bytes, %d columns x %d replicas, %d servers)%s", name, size, lay.width,
                    lay.replicas,
                    len({self.drives[e.drive_id].agent_id for e in lay.extents() if e.drive_id in self.drives}),
                    f" for {who}" if who else "")
        return vol

    def _claim(self, vol: VolumeRec) -> None:
        """Mark a volume as being changed by a call that talks to agents outside the lock (resize, a
        rebalance preparing its target): other changes of that volume are refused meanwhile, so the
        change commits onto the columns it planned from. Call under the lock."""
        if vol.volume_id in self._busy:
            raise UsageError(f"volume {vol.name!r} is being changed (resize or rebalance); try again in a moment")
        self._busy.add(vol.volume_id)

    async def resize_volume(self, name: str, size: int, who: str = "") -> VolumeRec:
        """Plan and reserve under the lock, assign (zeroing) on the agents outside it, commit under it."""
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
            self._claim(vol)
            try:
                if lay.degraded:
                    raise UsageError(f"volume {name!r} has replicas out of service; resize it once it is "
                                     "fully redundant again (nvpool volume show)")
                new, next_eid = plan_grow(lay, self.drive_spaces(), size, self.next_extent_id, vol.failure_domain)
            except BaseException:
                self._busy.discard(vol.volume_id)
                raise
            self.next_extent_id = next_eid
            old_ids = {e.extent_id for e in lay.extents()}
            added = [e for e in new.extents() if e.extent_id not in old_ids]
            self.store.commit({**self._counters(), **self.reserve_pending(vol.volume_id, added, new.generation)})
        try:
            try:
                await self.assign_on_agents(vol.volume_id, added, new.generation)
            except BaseException:
                self.rollback_pending(added)
                raise
            async with self.lock:
                # only the generation may have moved meanwhile (a writer takeover): keep it rising
                cur = self.layouts[vol.volume_id]
                gen = max(new.generation, cur.generation + 1)
                final = new.evolve(generation=gen, states=cur.states)
                old_size = vol.size
                vol.size = size
                self.layouts[vol.volume_id] = final
                self.fences[vol.volume_id].update({e.extent_id: new.generation for e in added})
                self.store.commit({**self._volume_puts(vol), **self._counters()}, self.unreserve(added))
        finally:
            self._busy.discard(vol.volume_id)
        logger.info("resized volume %s from %d to %d bytes%s", name, old_size, size, f" for {who}" if who else "")
        return vol

    async def delete_volume(self, name: str, force: bool = False, who: str = "", own: Iterable[str] = ()) -> None:
        async with self.lock:
            vol = self.volume(name)
            lay = self.layouts[vol.volume_id]
            if lay.target is not None or vol.volume_id in self._busy:
                raise UsageError(f"volume {name!r} is being re-spread or resized; cancel the rebalance or wait, "
                                 "then delete it")
            mine = set(own)
            held = [lease for lease in self._live_leases(vol.volume_id) if lease.lease_id not in mine]
            if held and not force:
                raise LeaseError(
                    f"volume {name!r} is in use by {held[0].holder} ({held[0].mode})"
                    + (f" and {len(held) - 1} more" if len(held) > 1 else "")
                    + "; close it first or delete with --force"
                )
            extents = list(lay.extents())
            del self.layouts[vol.volume_id]
            del self.volumes[name]
            self.fences.pop(vol.volume_id, None)
            self.repairs.pop(vol.volume_id, None)
            dropped = [k for k, lease in self.leases.items() if lease.volume_id == vol.volume_id]
            for k in dropped:
                del self.leases[k]
            self.unclean.discard(vol.volume_id)
            self.fencing.pop(vol.volume_id, None)
            self.intent_epoch.pop(vol.volume_id, None)
            # one commit: the extents leave every layout and become releasing together
            self.store.commit(
                self.mark_releasing(extents, vol.volume_id, lay.generation, commit=False),
                [f"volume/{name}", f"layout/{vol.volume_id:020d}", f"fences/{vol.volume_id:020d}",
                 f"fencing/{vol.volume_id:020d}",
                 f"migration/{vol.volume_id:020d}", f"unclean/{vol.volume_id:020d}", f"repl/{vol.volume_id:020d}",
                 f"scrub/{vol.volume_id:020d}"]
                + [f"lease/{k}" for k in dropped],
            )
        await self.release_on_agents(extents, mark=False)
        logger.info("deleted volume %s%s%s", name, " (forced, leases broken)" if held else "",
                    f" for {who}" if who else "")

    # ------------------------------------------------------------------ leases
    def _live_leases(self, volume_id: int, now: Optional[float] = None) -> list[Lease]:
        now = now or time.monotonic()
        return [lease for lease in self.leases.values() if lease.volume_id == volume_id and lease.expires > now]

    def expire_leases(self) -> None:
        now = time.monotonic()
        gone = [lease for lease in self.leases.values() if lease.expires <= now]
        puts: dict[str, bytes] = {}
        for lease in gone:
            del self.leases[lease.lease_id]
            if lease.mode == "write":
                self.unclean.add(lease.volume_id)
                puts[f"unclean/{lease.volume_id:020d}"] = _j(lease.volume_id)
            logger.info("lease of %s on volume %s (%s) expired", lease.holder, self._name_of(lease.volume_id), lease.mode)
        if gone:
            self.store.commit(puts, [f"lease/{lease.lease_id}" for lease in gone])

    async def open_volume(self, name: str, write: bool, holder: str, force: bool = False, request: str = "") -> Lease:
        """Take a lease: ``write`` is exclusive (see "Writer leases"), readers share. A request id seen before
        (a retry whose first answer was lost) returns the lease that request took."""
        while True:
            vol = await self._break_for_resync(name, write, force, request)
            if vol is None:
                lease = await self._open(name, write, holder, force, request)
                if lease is not None:
                    return lease
                continue  # a writer's lease ended meanwhile: resync first
            assert self.on_unclean is not None
            await self.on_unclean(vol)  # then grant on the resynced volume

    async def _break_for_resync(self, name: str, write: bool, force: bool, request: str = "") -> Optional[VolumeRec]:
        """A writer's open of a replicated volume whose copies a previous writer may have left different
        (its lease expired, or is taken over here): break that lease (unclean) and return the volume,
        to resync before anything is granted. None: nothing to resync first."""
        if not write or self.on_unclean is None:
            return None
        async with self.lock:
            self.expire_leases()
            vol = self.volume(name)
            vid = vol.volume_id
            lay = self.layouts[vid]
            writers = [w for w in self._live_leases(vid) if w.mode == "write"]
            if not self._resync_first(lay, bool(writers)) or (writers and not force):
                return None  # (a migrating or busy volume: _open refuses the takeover with the reason)
            if request and any(w.request == request for w in writers):
                return None  # a retry of the open that took it: _open returns that lease
            for w in writers:
                del self.leases[w.lease_id]
                logger.warning("writer lease of %s on volume %s broken by a takeover", w.holder, name)
            self.unclean.add(vid)
            self.store.commit({f"unclean/{vid:020d}": _j(vid)}, [f"lease/{w.lease_id}" for w in writers])
            return vol

    def _resync_first(self, lay: Layout, writers: bool) -> bool:
        """Whether a writer lease on ``lay``'s volume waits for ``on_unclean``: it is replicated, a writer
        holds it (to be taken over) or the last one ended uncleanly, and it is not being re-spread or
        resized (then the takeover is refused instead)."""
        vid = lay.volume_id
        return (self.on_unclean is not None and lay.replicas > 1 and (writers or vid in self.unclean)
                and lay.target is None and vid not in self._busy)

    async def _open(self, name: str, write: bool, holder: str, force: bool, request: str) -> Optional[Lease]:
        """The grant, under the lock; None when a replicated volume's previous writer must be resynced
        first (its lease expired or is being broken since ``_break_for_resync`` looked)."""
        async with self.lock:
            self.expire_leases()
            vol = self.volume(name)
            vid = vol.volume_id
            mode = "write" if write else "read"
            if request:
                for got in self._live_leases(vid):
                    if got.request == request and got.mode == mode:
                        got.expires = time.monotonic() + self.lease_ttl
                        return got
            lease = Lease(uuid.uuid4().hex, vid, mode, holder or "unknown", time.time(),
                          time.monotonic() + self.lease_ttl, request[:64])
            if write:
                writers = [w for w in self._live_leases(vid) if w.mode == "write"]
                if writers and not force:
                    left = max(0.0, writers[0].expires - time.monotonic())
                    raise LeaseError(
                        f"volume {name!r} is open for writing by {writers[0].holder} (since "
                        f"{time.strftime('%H:%M:%S', time.localtime(writers[0].granted))}; its lease runs out in "
                        f"{left:.0f}s unless renewed); open it read-only, or take it over with --force (that fences "
                        "the current writer)"
                    )
                if self._resync_first(self.layouts[vid], bool(writers)):
                    return None  # never break a replicated volume's writer here: _break_for_resync does, then resyncs
                if writers or vid in self.unclean:
                    await self._fence_writers(vol, [w.holder for w in writers])
                deletes = [f"lease/{w.lease_id}" for w in writers] + [f"unclean/{vid:020d}"]
                for w in writers:
                    del self.leases[w.lease_id]
                    logger.warning("writer lease of %s on volume %s broken by %s", w.holder, name, holder)
                self.unclean.discard(vid)
                if self.on_write_lease is not None and self.layouts[vid].replicas > 1:
                    await self.on_write_lease(vol)
            else:
                deletes = []
            self.leases[lease.lease_id] = lease
            self.store.commit({f"lease/{lease.lease_id}": _j(_lease_dict(lease))}, deletes)
            logger.info("%s lease on volume %s taken by %s", lease.mode, name, lease.holder)
            return lease

    async def _fence_writers(self, vol: VolumeRec, holders: list[str]) -> None:
        """Raise the volume's generation and fence every extent at it (all agents must acknowledge)."""
        lay = self.layouts[vol.volume_id]
        if lay.target is not None or vol.volume_id in self._busy:
            raise LeaseError(
                f"volume {vol.name!r} is being re-spread or resized: a writer cannot be fenced now; wait for "
                "the rebalance or cancel it"
            )
        g = lay.generation + 1
        try:
            await self.fence_on_agents(vol.volume_id, self.live_extents(lay), g)
        except UnavailableError as exc:
            raise UnavailableError(f"cannot fence the previous writer of {vol.name!r}: {exc}") from None
        new = lay.evolve(generation=g)
        self.layouts[vol.volume_id] = new
        fences = self.fences.setdefault(vol.volume_id, {})
        for e in new.extents():
            fences[e.extent_id] = max(fences.get(e.extent_id, 1), g)
        self.persist_volume(vol)
        logger.info("volume %s fenced at generation %d (previous writer: %s)", vol.name, g,
                    ", ".join(holders) or "expired")

    def capability(self, lease: Lease) -> bytes:
        """A signed capability for a lease's holder (proto/capability.py): its volume, its access,
        the volume's current generation as the ceiling, valid for ``CAPABILITY_TTL``."""
        if not self.secrets:
            return b""
        lay = self.layouts.get(lease.volume_id)
        gen = lay.generation if lay is not None else 0
        cap = Capability(lease.volume_id, WRITE if lease.mode == "write" else READ, gen,
                         int(time.time() + CAPABILITY_TTL), bytes.fromhex(lease.lease_id)[:16])
        return sign(cap, self.secrets[0])

    def renew_lease(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None or lease.expires <= time.monotonic():
            raise LeaseError("the lease is gone (it expired or was taken over)")
        lease.expires = time.monotonic() + self.lease_ttl
        return lease

    def check_lease(self, lease_id: str, volume_id: int) -> None:
        """For GetLayout: a holder whose lease was broken must learn it, not get a new generation."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.volume_id != volume_id or lease.expires <= time.monotonic():
            raise LeaseError("the lease on this volume is gone (it expired or was taken over); reopen the volume")

    async def close_lease(self, lease_id: str, unsettled: bool = False) -> None:
        """Return a lease. ``unsettled``: the writer gave up on writes, so its volume's copies may differ:
        the close counts as unclean (see "Writer leases")."""
        async with self.lock:
            lease = self.leases.pop(lease_id, None)
            if lease is None:
                return
            if unsettled and lease.mode == "write":
                self.unclean.add(lease.volume_id)
                self.store.commit({f"unclean/{lease.volume_id:020d}": _j(lease.volume_id)}, [f"lease/{lease_id}"])
                logger.warning("writer %s closed volume %s after giving up on writes: counted as unclean",
                               lease.holder, self._name_of(lease.volume_id))
                return
            self.store.commit({}, [f"lease/{lease_id}"])
            logger.info("%s lease on volume %s released by %s", lease.mode, self._name_of(lease.volume_id), lease.holder)

    def holders(self, volume_id: int) -> list[Lease]:
        return sorted(self._live_leases(volume_id), key=lambda lease: (lease.mode != "write", lease.granted))

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
            out.append(Endpoint(did, a.agent_id, a.address, a.unix_path, a.host, self.alive(a.agent_id, now),
                                a.data_tls))
        return out

    def resync_pending(self, lay: Layout) -> bool:
        """A replicated volume whose last writer ended uncleanly, not yet resynced: its copies may differ.
        A writer lease past its expiry counts already (``expire_leases`` marks it unclean a moment later)."""
        if lay.replicas == 1:
            return False
        if lay.volume_id in self.unclean:
            return True
        now = time.monotonic()
        return any(w.volume_id == lay.volume_id and w.mode == "write" and w.expires <= now
                   for w in self.leases.values())

    def _volume_health(self, lay: Layout) -> str:
        """"unavailable" when some column has no copy on a live agent with a working drive, else
        "degraded" when some copy is out of service or on a server that is down, or the copies may
        differ after a writer ended uncleanly (until they are resynced), else "ok"."""
        now = time.monotonic()

        def up(col: Any) -> bool:
            for e in col.extents:
                d = self.drives.get(e.drive_id)
                if d is None or d.state != "ok" or not self.alive(d.agent_id, now):
                    return False
            return True

        degraded = lay.degraded or self.resync_pending(lay)
        for i in range(lay.width):
            ups = [up(lay.replica_column(i, k)) for k in lay.readable(i) or [0]]
            if not any(ups):
                return "unavailable"
            degraded = degraded or not all(ups)  # a copy on a server that is down, not yet taken out
        return "degraded" if degraded else "ok"

    def volume_view(self, vol: VolumeRec) -> dict[str, Any]:
        lay = self.layouts[vol.volume_id]
        drives = [c.extents[0].drive_id for c in lay.columns]
        hosts = [self.agents[self.drives[d].agent_id].host if d in self.drives and self.drives[d].agent_id in self.agents else "" for d in drives]
        replica_info = []
        if lay.replicas > 1:
            for i in range(lay.width):
                for k in range(lay.replicas):
                    col = lay.replica_column(i, k)
                    d0 = self.drives.get(col.extents[0].drive_id)
                    a0 = self.agents.get(d0.agent_id) if d0 is not None else None
                    dom = (a0.host if vol.failure_domain == "host" else a0.labels.get(vol.failure_domain, "")) if a0 else ""
                    replica_info.append({"column": i, "replica": k, "state": lay.replica_state(i, k),
                                         "drives": [e.drive_id for e in col.extents], "host": a0.host if a0 else "",
                                         "domain": dom})
        return {
            "volume_id": vol.volume_id, "name": vol.name, "size": vol.size, "stripe_unit": vol.stripe_unit,
            "stripe_width": lay.width, "generation": lay.generation,
            "state": "migrating" if lay.target is not None else vol.state, "created": vol.created,
            "drives": drives, "hosts": hosts, "replicas": lay.replicas, "failure_domain": vol.failure_domain,
            "replica_info": replica_info, "health": self._volume_health(lay),
            "holders": [{"lease_id": "", "mode": h.mode, "holder": h.holder, "granted": h.granted}
                        for h in self.holders(vol.volume_id)],
        }

    async def volume_usage(self, names: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Provisioned, allocated and written bytes of volumes (``nvpool volume du``). Written bytes
        come from the agents (written extents of each, ``osio.written_ranges``), asked in parallel
        outside the lock."""
        wanted = list(names) or sorted(self.volumes)
        vols = [self.volume(n) for n in wanted]
        out = []
        for vol in vols:
            lay = self.layouts[vol.volume_id]
            exts = [e for e in lay.extents()]

            async def written(e: Extent) -> Optional[int]:
                d = self.drives.get(e.drive_id)
                a = self.agents.get(d.agent_id) if d is not None else None
                if a is None or not self.alive(a.agent_id):
                    return None
                try:
                    ranges = await asyncio.wait_for(self.link.map_extent(a.control_address, e.extent_id, True), 10)
                except (NvpoolError, TimeoutError):
                    return None
                return sum(min(n, e.length - off) for off, n in ranges if off < e.length)

            got = await asyncio.gather(*(written(e) for e in exts))
            out.append({"name": vol.name, "size": vol.size, "replicas": lay.replicas,
                        "allocated": sum(e.length for e in exts),
                        "written": sum(g for g in got if g is not None),
                        "written_known": all(g is not None for g in got)})
        return out

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
                drives.append({"drive": d, "used": used, "extents": counts.get(did, 0),
                               **self.drive_health.get(did, {})})
                if (not alive or d.state != "ok") and counts.get(did, 0):
                    degraded = True
            agents.append({"agent": a, "alive": alive and a.ready, "drives": drives,
                           "last_seen": a.last_seen_wall if a.last_seen else 0.0})
        degraded = degraded or any(lay.degraded or self.resync_pending(lay) for lay in self.layouts.values())
        cap = sum(d.capacity for d in self.drives.values())
        used = sum(s.used_bytes for s in spaces.values())
        health = "empty" if not self.drives else ("degraded" if degraded else "ok")
        releasing = [r for r in self.reserved.values() if r.kind == "releasing"]
        unavailable = sorted(v.name for v in self.volumes.values()
                             if v.volume_id in self.layouts and self._volume_health(self.layouts[v.volume_id]) == "unavailable")
        return {"agents": agents, "capacity": cap, "used": used, "volumes": len(self.volumes), "health": health,
                "pool_id": self.pool_id, "releasing_extents": len(releasing),
                "releasing_bytes": sum(r.length for r in releasing), "unavailable_volumes": unavailable}
