"""The rebalancer: plans which volumes to re-spread and drives their migrations (``pool/migration.py``).

* **Plan**: a volume keeps its columns (its stripe width never changes, explicit or not); whole
  columns move so that every usable drive holds its even share of each volume's columns
  (``planner.plan_rebalance``): growing a pool of N servers by one moves about 1/(N+1) of a volume's
  bytes, and a draining server's columns move to the others. Volumes are planned one after another
  against a simulated pool, where each finished migration has freed its old extents, so the plan is
  feasible in the order it runs.
* **Run**: one volume at a time; chunks copied by the destination agents, several in flight, throttled
  by a token bucket (``max_rate``); progress persisted so a restarted metadata service resumes; an
  unreachable agent is retried until it comes back or the rebalance is cancelled.
* **Cancel**: the volume in flight keeps its old layout (its data never left it); nothing is lost.
* **Failure**: a run that fails (an error it cannot retry, or a bug) is ``failed`` with its reason,
  and never left ``running``. A failed run can be resumed (``nvpool pool rebalance`` starts by
  finishing every migration in flight) or cancelled (every migration in flight is rolled back to its
  old layout), without a restart.
* **Durability**: before cut-over, every destination agent flushes its drives (``Flush``), so the
  copied bytes are on stable storage before the old copy is released.
* **Drain / undrain / remove**: draining a server moves its columns to the others; ``undrain`` puts it
  back in service (its columns stay where the drain left them); ``remove`` takes a drained, empty
  server out of the pool and refuses one that still holds data or still answers without being
  drained. A removed agent that comes back is refused at registration (its drives keep their data).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, TypeVar

from nvpool.proto.layout import Extent, Layout
from nvpool.pool.meta import MetaService, VolumeRec
from nvpool.pool.migration import CopyChunk, copy_plan_replicas
from nvpool.pool.planner import DriveSpace, imbalance, plan_rebalance, plan_rebalance_replicated, with_allocations
from nvpool.proto.errors import NotFoundError, NvpoolError, UnavailableError, UsageError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class MigrationAbandoned(NvpoolError):
    """The metadata service abandoned a volume's migration (a replica failed; pool/replication.py)."""

CHUNK = 4 * 1024 * 1024
PARALLEL = 4


@dataclass
class Move:
    volume: str
    old_width: int
    new_width: int
    bytes: int
    from_drives: list[str]
    to_drives: list[str]


@dataclass
class RunState:
    state: str = "idle"  # idle | running | done | cancelled | failed
    queue: list[str] = field(default_factory=list)
    drain: list[str] = field(default_factory=list)
    max_rate: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    current_volume: str = ""
    error: str = ""
    imbalance_before: float = 0.0
    imbalance_after: float = 0.0
    moves: list[dict[str, Any]] = field(default_factory=list)


class TokenBucket:
    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(min(rate, CHUNK)) if rate else 0.0
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(float(max(self.rate, n)), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


class Rebalancer:
    def __init__(self, service: MetaService, retry_interval: float = 0.5) -> None:
        self.svc = service
        self.retry_interval = retry_interval
        self.run = RunState()
        self._task: Optional[asyncio.Task[None]] = None
        self._cancel = False
        raw = self.svc.store.get("rebalance")
        if raw:
            self.run = RunState(**json.loads(raw))

    # ------------------------------------------------------------------ state
    def _persist(self) -> None:
        self.svc.store.commit({"rebalance": json.dumps(self.run.__dict__).encode()})

    def status(self, run: Optional[RunState] = None) -> dict[str, Any]:
        r = run or self.run
        return {
            "state": r.state, "moves": r.moves, "bytes_total": r.bytes_total, "bytes_done": r.bytes_done,
            "current_volume": r.current_volume, "error": r.error, "imbalance_before": r.imbalance_before,
            "imbalance_after": r.imbalance_after, "max_rate": r.max_rate,
        }

    # ------------------------------------------------------------------ planning
    def _targets(self, names: Optional[list[str]], drain: list[str]) -> tuple[list[tuple[VolumeRec, Layout, Layout]], float, float]:
        """(volume, current layout, target layout) for every volume to move, in order; imbalance before/after."""
        svc = self.svc
        spaces = svc.drive_spaces(exclude_hosts=drain)
        before = imbalance(spaces)
        vols = sorted(svc.volumes.values(), key=lambda v: v.name)
        if names:
            missing = set(names) - {v.name for v in vols}
            if missing:
                raise NotFoundError(f"no volume named {sorted(missing)[0]!r}")
            vols = [v for v in vols if v.name in names]
        sim: list[DriveSpace] = spaces
        next_id = svc.next_extent_id
        out = []
        for vol in vols:
            lay = svc.layouts[vol.volume_id]
            if lay.target is not None:
                continue
            if lay.degraded:  # re-spread only with every replica in service (pool/migration.py)
                logger.info("rebalance: skipping volume %s until its replicas are all in service", vol.name)
                continue
            if svc.resync_pending(lay):  # its copies may differ until resynced (pool/replication.py, step 8)
                logger.info("rebalance: skipping volume %s until its copies are resynced after its writer", vol.name)
                continue
            if lay.replicas > 1:
                planned, next_id = plan_rebalance_replicated(lay, sim, next_id, seed=vol.volume_id,
                                                             domain_key=vol.failure_domain)
                if planned is None:
                    continue
                target = lay.evolve(generation=lay.generation + 1, columns=planned[0], mirrors=planned[1],
                                    states=(), target=None)
            else:
                cols, next_id = plan_rebalance(lay, sim, next_id, seed=vol.volume_id)
                if cols is None:
                    continue
                target = Layout(vol.volume_id, vol.name, lay.generation + 1, lay.size, lay.stripe_unit, cols)
            target.validate()
            out.append((vol, lay, target))
            new_ext = [e for e in target.extents() if e.extent_id not in {x.extent_id for x in lay.extents()}]
            old_only = [e for e in lay.extents() if e.extent_id not in {x.extent_id for x in target.extents()}]
            sim = with_allocations(with_allocations(sim, new_ext, 1), old_only, -1)
        return out, before, imbalance(sim)

    async def _written(self, chunks: list[CopyChunk]) -> list[bool]:
        """For each chunk: may its source hold written data? Never-written (and punched) ranges read
        as zeros, and the destination was zeroed when it was assigned, so those chunks need no copy.
        An agent that cannot tell (or does not answer) gets every chunk copied."""
        maps: dict[int, Optional[list[tuple[int, int]]]] = {}
        for c in chunks:
            if c.src.extent_id in maps:
                continue
            try:
                agent = self.svc.agent_of_drive(c.src.drive_id)
                maps[c.src.extent_id] = await self.svc.link.map_extent(agent.control_address, c.src.extent_id)
            except NvpoolError:
                maps[c.src.extent_id] = None
        out = []
        for c in chunks:
            ranges = maps[c.src.extent_id]
            out.append(ranges is None or any(o < c.src_offset + c.length and c.src_offset < o + n for o, n in ranges))
        return out

    async def _moves(self, targets: list[tuple[VolumeRec, Layout, Layout]]) -> list[dict[str, Any]]:
        moves = []
        for vol, lay, target in targets:
            chunks = list(copy_plan_replicas(lay, target, CHUNK))
            written = await self._written(chunks)
            moves.append(Move(
                vol.name, lay.width, target.width, sum(c.length for c, w in zip(chunks, written) if w),
                sorted({c.src.drive_id for c in chunks}), sorted({c.dst.drive_id for c in chunks}),
            ).__dict__)
        return moves

    # ------------------------------------------------------------------ control
    def _in_flight(self) -> list[str]:
        return sorted(v.name for v in self.svc.volumes.values() if self.svc.layouts[v.volume_id].target is not None)

    async def start(self, plan_only: bool = False, max_rate: int = 0, volumes: Optional[list[str]] = None,
                    drain: Optional[list[str]] = None) -> dict[str, Any]:
        if self.run.state == "running":
            if plan_only:
                return self.status()
            raise UsageError("a rebalance is already running (nvpool pool rebalance --cancel stops it)")
        async with self.svc.lock:
            targets, before, after = self._targets(volumes, drain or [])
        moves = await self._moves(targets)
        st = RunState(
            state="running" if targets else "done", queue=[v.name for v, _, _ in targets], drain=drain or [],
            max_rate=max_rate, bytes_total=sum(m["bytes"] for m in moves), imbalance_before=before,
            imbalance_after=after, moves=moves,
        )
        if plan_only:  # a dry run reports the plan and changes nothing
            st.state = "idle"
            return self.status(st)
        stuck = [n for n in self._in_flight() if n not in st.queue]
        if stuck:  # a failed or interrupted run: finish its migrations first
            logger.info("rebalance: resuming the migrations of %s", ", ".join(stuck))
            st.queue = stuck + st.queue
            st.state = "running"
        self.run = st
        self._persist()
        if st.queue:
            self._spawn()
        logger.info("rebalance started: %d volumes, %d bytes to move%s", len(st.queue), st.bytes_total,
                    f", draining {', '.join(st.drain)}" if st.drain else "")
        return self.status()

    def resume(self) -> None:
        """After a restart: finish any migration in flight and the rest of the queue."""
        in_flight = [v.name for v in self.svc.volumes.values() if self.svc.layouts[v.volume_id].target is not None]
        for name in in_flight:
            if name not in self.run.queue:
                self.run.queue.insert(0, name)
        if in_flight or (self.run.queue and self.run.state == "running"):
            logger.info("resuming rebalance after a restart: %s (%d of %d bytes done)", ", ".join(self.run.queue),
                        self.run.bytes_done, self.run.bytes_total)
            self.run.state = "running"
            self._persist()
            self._spawn()

    def _spawn(self) -> None:
        self._cancel = False
        self._task = asyncio.get_running_loop().create_task(self._run_queue())

    async def cancel(self) -> dict[str, Any]:
        if self.run.state == "running" and self._task is not None and not self._task.done():
            self._cancel = True
            await asyncio.wait({self._task})
        stuck = self._in_flight()
        if stuck:  # a failed run left migrations in flight: roll each back to its old layout
            for name in stuck:
                vol = self.svc.volumes[name]
                lay = self.svc.layouts[vol.volume_id]
                assert lay.target is not None
                old = lay.evolve(target=None)
                old_ids = {e.extent_id for e in old.extents()}
                new_only = [e for e in lay.target.extents() if e.extent_id not in old_ids]
                try:
                    await self._finish(vol, old, keep=old, drop=new_only, g2=lay.generation + 1)
                except MigrationAbandoned:
                    continue  # already rolled back by the replication service
                logger.info("rebalance: migration of %s rolled back", name)
            self.run.state, self.run.queue, self.run.current_volume = "cancelled", [], ""
            self._persist()
        elif self.run.state in ("running", "failed"):
            self.run.state = "cancelled"
            self._persist()
        return self.status()

    async def stop(self) -> None:
        """Service shutdown: stop copying, keep the persisted state for resume()."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def drain(self, host: str, remove: bool, undrain: bool = False, max_rate: int = 0) -> dict[str, Any]:
        svc = self.svc
        agents = [a for a in svc.agents.values() if a.host == host]
        if not agents:
            raise NotFoundError(f"no server named {host!r} in the pool")
        ids = {a.agent_id for a in agents}
        if undrain:
            async with svc.lock:
                for a in agents:
                    a.state = "active"
                    svc.store.commit(svc._agent_puts(a))
            if host in self.run.drain:
                self.run.drain = [h for h in self.run.drain if h != host]
                self._persist()
            logger.info("server %s is back in service (undrain)", host)
            return self.status()
        holds = sum(1 for lay in svc.layouts.values() for e in lay.extents()
                    if e.drive_id in svc.drives and svc.drives[e.drive_id].agent_id in ids)
        if remove:
            if holds:
                if all(a.state == "draining" for a in agents):
                    raise UsageError(f"server {host!r} still holds {holds} extents: wait for the drain to finish")
            elif all(a.state == "draining" for a in agents) or not any(svc.alive(i) for i in ids):
                async with svc.lock:
                    svc.remove_agents(agents)
                logger.info("removed server %s from the pool", host)
                self.run = RunState(state="done")
                return self.status()
            else:
                raise UsageError(f"server {host!r} is alive and not drained: `nvpool pool drain {host}` first")
        async with svc.lock:
            for a in agents:
                a.state = "draining"
                svc.store.commit(svc._agent_puts(a))
        logger.info("draining server %s (%d extents to move)", host, holds)
        return await self.start(drain=sorted(set(self.run.drain) | {host}), max_rate=max_rate)

    # ------------------------------------------------------------------ running
    def _still_moving(self, vid: int, target: Optional[Layout]) -> bool:
        """The volume still carries this migration's target (replication may have abandoned it)."""
        lay = self.svc.layouts.get(vid)
        if target is None or lay is None or lay.target is None:
            return False
        return {e.extent_id for e in lay.target.extents()} == {e.extent_id for e in target.extents()}

    async def _retry(self, what: str, fn: Callable[[], Awaitable[T]], vid: int = 0,
                     target: Optional[Layout] = None) -> T:
        """Retry while agents are unreachable (they may be restarting), until cancelled, or until the
        migration of ``vid`` to ``target`` was abandoned (``MigrationAbandoned``)."""
        warned = False
        while True:
            if vid and not self._still_moving(vid, target):
                raise MigrationAbandoned(f"the migration of volume {vid} was abandoned (a replica failed)")
            try:
                return await fn()
            except UnavailableError as exc:
                if self._cancel:
                    raise
                if not warned:
                    logger.warning("%s: %s; retrying", what, exc)
                    warned = True
                await asyncio.sleep(self.retry_interval)

    async def _run_queue(self) -> None:
        abandoned: list[str] = []
        try:
            while self.run.queue:
                name = self.run.queue[0]
                self.run.current_volume = name
                self._persist()
                if name in self.svc.volumes:
                    try:
                        done = await self._migrate(self.svc.volumes[name])
                    except MigrationAbandoned as exc:
                        logger.warning("rebalance: %s; volume %s keeps its layout (run `nvpool pool rebalance` again "
                                       "once it is fully redundant)", exc, name)
                        abandoned.append(name)
                        done = True
                    if not done:
                        self.run.state = "cancelled"
                        self.run.queue = []
                        self._persist()
                        return
                self.run.queue.pop(0)
                self._persist()
            self.run.current_volume = ""
            if abandoned:  # the run did not do what was asked (a drained server may still hold data): say so
                self.run.state = "failed"
                self.run.error = (f"the move of {', '.join(abandoned)} was abandoned because a replica failed during "
                                  "it; run it again once the volume is fully redundant (nvpool pool status)")
                self._persist()
                logger.warning("rebalance ended with %s not moved: %d bytes moved", ", ".join(abandoned),
                               self.run.bytes_done)
                return
            self.run.state = "done"
            self._persist()
            logger.info("rebalance done: %d bytes moved", self.run.bytes_done)
        except asyncio.CancelledError:
            raise
        except (NvpoolError, OSError) as exc:
            logger.error("rebalance failed: %s (resume with `nvpool pool rebalance`, or --cancel)", exc)
            self.run.state, self.run.error = "failed", str(exc)
            self._persist()
        except Exception as exc:  # a bug must not leave the run "running" forever
            logger.exception("rebalance failed unexpectedly")
            self.run.state, self.run.error = "failed", f"internal error: {exc!r}"
            self._persist()

    async def _migrate(self, vol: VolumeRec) -> bool:
        """Move one volume to its target layout; False if cancelled (the old layout stays)."""
        svc = self.svc
        vid = vol.volume_id
        lay = svc.layouts[vid]
        while lay.target is None:
            # plan and reserve under the lock, assign on the agents outside it (zeroing can be slow:
            # no other metadata change waits for it), commit under the lock
            async with svc.lock:
                targets, _, _ = self._targets([vol.name], self.run.drain)
                if not targets:
                    return True
                _, _, planned = targets[0]
                busy = vid in svc._busy
                if not busy:
                    svc._claim(vol)
                    old_ids = {e.extent_id for e in lay.extents()}
                    new_ext = [e for e in planned.extents() if e.extent_id not in old_ids]
                    svc.next_extent_id = max([svc.next_extent_id] + [e.extent_id + 1 for e in new_ext])
                    g1 = lay.generation + 1
                    # ids are burned and the space reserved even if the agents refuse (see pool/meta.py)
                    svc.store.commit({**svc._counters(), **svc.reserve_pending(vid, new_ext, g1)})
            if busy:  # a resize is in flight: plan again after it
                await asyncio.sleep(self.retry_interval)
                lay = svc.layouts.get(vid, lay)
                if vid not in svc.layouts:
                    return True
                continue
            try:
                try:
                    await svc.assign_on_agents(vid, new_ext, g1)
                    assigned = True
                except UnavailableError as exc:
                    logger.warning("assigning target extents of %s: %s; retrying", vol.name, exc)
                    assigned = False
                except BaseException:
                    svc.rollback_pending(new_ext)
                    raise
                if assigned:
                    async with svc.lock:
                        cur = svc.layouts[vid]  # only a takeover could have raised the generation
                        g1 = max(g1, cur.generation + 1)
                        target = planned.evolve(generation=g1)
                        lay = cur.with_target(target, g1)
                        svc.layouts[vid] = lay
                        svc.fences[vid].update({e.extent_id: g1 for e in new_ext})
                        svc.store.commit({**svc._volume_puts(vol), f"migration/{vid:020d}": b'{"done":0}'},
                                         svc.unreserve(new_ext))
                        logger.info("rebalance: volume %s prepared at generation %d (%d new extents)", vol.name,
                                    g1, len(new_ext))
                    break
            finally:
                svc._busy.discard(vid)
            if self._cancel:
                return False
            await asyncio.sleep(self.retry_interval)
            if vid not in svc.layouts:  # deleted meanwhile: nothing to move
                return True
            lay = svc.layouts[vid]
        assert lay.target is not None
        g1 = lay.generation
        old = lay.evolve(target=None)
        target = lay.target
        target_ids = {e.extent_id for e in target.extents()}
        old_only = [e for e in old.extents() if e.extent_id not in target_ids]
        new_only = [e for e in target.extents() if e.extent_id not in {x.extent_id for x in old.extents()}]
        # 2. fence the old generation: from now on every write reaches the target too
        await self._retry("fencing the old layout", lambda: svc.fence_on_agents(vid, old.extents(), g1), vid, target)
        # 3. copy what was ever written. The map is taken after the fence above: a write that lands
        #    in a hole from now on reaches the target too, and one that landed before is data now.
        chunks = list(copy_plan_replicas(old, target, CHUNK))
        written = await self._written(chunks)
        raw = svc.store.get(f"migration/{vid:020d}")
        start = json.loads(raw)["done"] if raw else 0
        completed = await self._copy(vid, chunks, start, g1, written, target)
        if not completed:
            await self._finish(vol, old, keep=old, drop=new_only, g2=g1 + 1)
            return False
        # 4. cut over, once the copied bytes are durable on every destination
        dst_agents = sorted({svc.agent_of_drive(e.drive_id).agent_id for e in new_only})
        for a in dst_agents:
            await self._retry(f"flushing agent {a}", lambda a=a: svc.link.flush(svc.agents[a].control_address),  # type: ignore[misc]
                              vid, target)
        await self._finish(vol, old, keep=target, drop=old_only, g2=g1 + 1)
        return True

    async def _copy(self, vid: int, chunks: list[CopyChunk], start: int, generation: int,
                    written: Optional[list[bool]] = None, target: Optional[Layout] = None) -> bool:
        svc = self.svc
        bucket = TokenBucket(self.run.max_rate)
        sem = asyncio.Semaphore(PARALLEL)
        done = set(range(start))
        last_save = time.monotonic()
        errors: list[BaseException] = []

        async def one(i: int, c: CopyChunk) -> None:
            def call() -> Awaitable[int]:
                dst = svc.agent_of_drive(c.dst.drive_id)
                src = svc.agent_of_drive(c.src.drive_id)
                return svc.link.copy(dst.control_address, c.dst, c.dst_offset, src.address, c.src, c.src_offset,
                                     c.length, generation, vid, src.data_tls)
            try:
                await self._retry(f"copying chunk {i} of volume {vid}", call, vid, target)
                self.run.bytes_done += c.length
                done.add(i)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                sem.release()

        tasks = []
        for i in range(start, len(chunks)):
            if self._cancel or errors:
                break
            if target is not None and not self._still_moving(vid, target):
                break
            if written is not None and not written[i]:
                done.add(i)  # never written: the zeroed destination already holds it
                continue
            await sem.acquire()
            await bucket.take(chunks[i].length)
            tasks.append(asyncio.create_task(one(i, chunks[i])))
            if time.monotonic() - last_save > 0.5:
                prefix = 0
                while prefix in done:
                    prefix += 1
                svc.store.commit({f"migration/{vid:020d}": json.dumps({"done": prefix}).encode(),
                                  "rebalance": json.dumps(self.run.__dict__).encode()})
                last_save = time.monotonic()
        await asyncio.gather(*tasks)
        if errors and not self._cancel:
            raise errors[0]
        return not self._cancel

    async def _finish(self, vol: VolumeRec, old: Layout, keep: Layout, drop: list[Extent], g2: int) -> None:
        """Publish ``keep`` alone at generation ``g2`` and release ``drop`` (cut-over or cancel)."""
        svc = self.svc
        vid = vol.volume_id
        was_cancel = self._cancel
        self._cancel = False  # fences below must complete even when cancelling
        moving = svc.layouts[vid].target if vid in svc.layouts else None
        try:
            # no reader may still use the old extents once anyone can write at g2
            await self._retry("fencing the old layout for cut-over", lambda: svc.fence_on_agents(vid, old.extents(), g2),
                              vid, moving)
            final = keep.evolve(generation=g2, target=None, states=())
            final.validate()
            async with svc.lock:
                if not self._still_moving(vid, moving):
                    raise MigrationAbandoned(f"the migration of volume {vol.name!r} was abandoned (a replica failed)")
                svc.layouts[vid] = final
                fences = svc.fences[vid]
                for e in drop:
                    fences.pop(e.extent_id, None)
                for e in final.extents():
                    fences[e.extent_id] = max(fences.get(e.extent_id, 1), g2)
                # one commit: the dropped extents leave the layout and become releasing together
                svc.store.commit({**svc._volume_puts(vol), **svc.mark_releasing(drop, vid, g2, commit=False)},
                                 [f"migration/{vid:020d}"])
            await self._retry("fencing the new layout", lambda: svc.fence_on_agents(vid, final.extents(), g2))
            if drop:
                # a client still writing them gets NO_EXTENT, re-fetches (generation g2) and retries
                await svc.release_on_agents(drop, mark=False)
            logger.info("volume %s now at generation %d (%d columns)", vol.name, g2, final.width)
        finally:
            self._cancel = was_cancel
