"""Prometheus metrics of the metadata service (``nvpool meta --metrics HOST:PORT``): the pool's state
as the service sees it (agents, capacity, volumes, leases, rebalance and repair progress), read from
its in-memory state when Prometheus scrapes. Nothing here is written to the store (issue 13's rule:
no statistics in the metadata store)."""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nvpool.pool.meta import MetaService, Role


class MetaCollector(Collector):
    def __init__(self, svc: "MetaService | Role", rebalancer: Any = None, replication: Any = None) -> None:
        #: follows the leadership: a standby exports only ``nvpool_meta_leader 0`` and its RPC counts
        self.role = svc if isinstance(svc, Role) else Role(svc, rebalancer, replication)
        self.reb: Any = None
        self.repl: Any = None
        #: RPCs served, by method and gRPC status code name (counted by the gRPC edge)
        self.rpcs: dict[tuple[str, str], int] = {}

    def count(self, method: str, code: str) -> None:
        key = (method, code)
        self.rpcs[key] = self.rpcs.get(key, 0) + 1

    def collect(self) -> Iterator[Any]:
        role = self.role
        svc, self.reb, self.repl = role.svc, role.reb, role.repl
        leader = GaugeMetricFamily("nvpool_meta_leader", "1 on the metadata service that leads the pool")
        leader.add_metric([], 1 if role.acting() else 0)
        yield leader
        if svc is None:
            yield from self._rpcs()
            return
        agents = list(svc.agents.values())
        up = GaugeMetricFamily("nvpool_meta_agent_up", "1 when the agent heartbeats", labels=["agent", "host"])
        for a in agents:
            up.add_metric([a.agent_id, a.host], 1 if a.ready and svc.alive(a.agent_id) else 0)
        yield up
        st = svc.pool_status()
        cap = GaugeMetricFamily("nvpool_meta_capacity_bytes", "Capacity of every registered drive")
        cap.add_metric([], st["capacity"])
        used = GaugeMetricFamily("nvpool_meta_used_bytes", "Bytes allocated to extents (and reserved)")
        used.add_metric([], st["used"])
        rel = GaugeMetricFamily("nvpool_meta_releasing_bytes", "Space waiting for agents to confirm a release")
        rel.add_metric([], st["releasing_bytes"])
        healthy = GaugeMetricFamily("nvpool_meta_pool_healthy", "1 when every volume is fully served and redundant")
        healthy.add_metric([], 1 if st["health"] == "ok" else 0)
        yield from (cap, used, rel, healthy)
        vols = GaugeMetricFamily("nvpool_meta_volume_size_bytes", "Volume size", labels=["volume", "replicas"])
        gen = GaugeMetricFamily("nvpool_meta_volume_generation", "Layout generation", labels=["volume"])
        degraded = GaugeMetricFamily("nvpool_meta_volume_degraded_replicas", "Replicas not in service",
                                     labels=["volume"])
        for v in list(svc.volumes.values()):
            lay = svc.layouts.get(v.volume_id)
            if lay is None:
                continue
            vols.add_metric([v.name, str(lay.replicas)], v.size)
            gen.add_metric([v.name], lay.generation)
            degraded.add_metric([v.name], len(lay.states))
        yield from (vols, gen, degraded)
        leases = GaugeMetricFamily("nvpool_meta_leases", "Live volume leases", labels=["mode"])
        now = time.monotonic()
        live = [lease for lease in list(svc.leases.values()) if lease.expires > now]
        for mode in ("write", "read"):
            leases.add_metric([mode], sum(1 for lease in live if lease.mode == mode))
        yield leases
        if self.reb is not None:
            r = self.reb.status()
            done = GaugeMetricFamily("nvpool_meta_rebalance_bytes", "Rebalance progress", labels=["kind"])
            done.add_metric(["done"], r["bytes_done"])
            done.add_metric(["total"], r["bytes_total"])
            running = GaugeMetricFamily("nvpool_meta_rebalance_running", "1 while a rebalance runs")
            running.add_metric([], 1 if r["state"] == "running" else 0)
            yield from (done, running)
        if self.repl is not None:
            reps = self.repl.status()
            rep = GaugeMetricFamily("nvpool_meta_repair_replicas", "Replicas out of service or being repaired",
                                    labels=["state"])
            for state in ("out", "resync", "rebuild"):
                rep.add_metric([state], sum(1 for r in reps if r["state"] == state))
            left = GaugeMetricFamily("nvpool_meta_repair_bytes_left", "Bytes still to copy by running repairs")
            left.add_metric([], sum(max(0, r["bytes_total"] - r["bytes_done"]) for r in reps))
            pending = GaugeMetricFamily("nvpool_meta_writer_resync_pending",
                                        "Replicated volumes whose writer ended uncleanly, copies not yet resynced")
            pending.add_metric([], sum(1 for r in reps if r["state"] == "writer-resync"))
            resyncs = CounterMetricFamily("nvpool_meta_writer_resyncs", "Resyncs after a writer ended uncleanly")
            resyncs.add_metric([], self.repl.writer_resyncs)
            copied = CounterMetricFamily("nvpool_meta_writer_resync_bytes", "Bytes those resyncs copied")
            copied.add_metric([], self.repl.writer_resync_bytes)
            yield from (rep, left, pending, resyncs, copied)
        scrub = role.scrub
        if scrub is not None:  # pool/scrub.py
            t = dict(scrub.totals)
            scrubbed = CounterMetricFamily("nvpool_meta_scrub_bytes", "Column bytes scrubbed (each copy read them)")
            scrubbed.add_metric([], t["bytes"])
            found = CounterMetricFamily("nvpool_meta_scrub_errors", "Blocks scrubs found wrong", labels=["kind"])
            found.add_metric(["checksum"], t["checksum_errors"])
            found.add_metric(["mismatch"], t["mismatches"])
            repaired = CounterMetricFamily("nvpool_meta_scrub_repaired", "Block copies scrubs rewrote")
            repaired.add_metric([], t["repaired"])
            lost = CounterMetricFamily("nvpool_meta_scrub_unrepairable", "Blocks no copy of which matched its sums")
            lost.add_metric([], t["unrepairable"])
            running = GaugeMetricFamily("nvpool_meta_scrub_running", "Scrubs running")
            states = scrub.status()
            running.add_metric([], sum(1 for s in states if s["state"] == "running"))
            last = GaugeMetricFamily("nvpool_meta_scrub_last_finished", "Wall time a volume's last scrub finished",
                                     labels=["volume"])
            for s in states:
                if s["finished"]:
                    last.add_metric([s["volume"]], s["finished"])
            yield from (scrubbed, found, repaired, lost, running, last)
        yield from self._rpcs()

    def _rpcs(self) -> Iterator[Any]:
        rpc = CounterMetricFamily("nvpool_meta_rpcs", "RPCs served", labels=["method", "code"])
        for (method, code), n in sorted(dict(self.rpcs).items()):
            rpc.add_metric([method, code], n)
        yield rpc


def collector(svc: MetaService, rebalancer: Optional[Any], replication: Optional[Any]) -> MetaCollector:
    return MetaCollector(svc, rebalancer, replication)
