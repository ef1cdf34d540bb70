"""Prometheus metrics of a storage agent (``nvpool agent --metrics HOST:PORT``).

Nothing is counted here: the I/O path keeps plain counters (``agents/core.py`` ``Stats``) and this
collector turns them into metrics when Prometheus scrapes, on the HTTP server's thread (reading dicts
that the event loop updates: each is copied in one step under the GIL). Names follow Prometheus
conventions: ``nvpool_agent_*``, ``_total`` for counters, ``_bytes`` / ``_seconds`` units.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from nvpool.agents.core import LATENCY_BUCKETS, AgentCore


class AgentCollector(Collector):
    def __init__(self, core: AgentCore, agent_id: str, heartbeat_age: Callable[[], float]) -> None:
        self.core = core
        self.agent_id = agent_id
        self.heartbeat_age = heartbeat_age

    def collect(self) -> Iterator[Any]:
        st = self.core.stats
        drives = dict(st.drives)
        volumes = dict(st.volumes)
        latency = dict(st.latency)
        errors = dict(st.errors)
        rb = CounterMetricFamily("nvpool_agent_read_bytes", "Bytes read from a drive for clients", labels=["drive"])
        wb = CounterMetricFamily("nvpool_agent_written_bytes", "Bytes written to a drive for clients", labels=["drive"])
        ops = CounterMetricFamily("nvpool_agent_operations", "Reads and writes served, per drive",
                                  labels=["drive", "op"])
        for did, (r, w, nr, nw) in sorted(drives.items()):
            rb.add_metric([did], r)
            wb.add_metric([did], w)
            ops.add_metric([did, "read"], nr)
            ops.add_metric([did, "write"], nw)
        yield from (rb, wb, ops)
        vr = CounterMetricFamily("nvpool_agent_volume_read_bytes", "Bytes read per volume", labels=["volume_id"])
        vw = CounterMetricFamily("nvpool_agent_volume_written_bytes", "Bytes written per volume",
                                 labels=["volume_id"])
        for vid, (r, w) in sorted(volumes.items()):
            vr.add_metric([str(vid)], r)
            vw.add_metric([str(vid)], w)
        yield from (vr, vw)
        cmds = CounterMetricFamily("nvpool_agent_commands", "Data-plane commands received")
        cmds.add_metric([], st.commands)
        yield cmds
        err = CounterMetricFamily("nvpool_agent_errors", "Commands refused or failed, by status", labels=["status"])
        for status, n in sorted(errors.items()):
            err.add_metric([status], n)
        yield err
        h = HistogramMetricFamily("nvpool_agent_command_seconds", "Time to execute a command (excluding the wire)",
                                  labels=["op"])
        for op, (counts, total) in sorted(latency.items()):
            acc, buckets = 0, []
            for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts):
                acc += n
                buckets.append((bound, acc))
            h.add_metric([op], buckets, total[0])
        yield h
        conns = GaugeMetricFamily("nvpool_agent_connections", "Open data-plane connections")
        conns.add_metric([], st.connections)
        yield conns
        inflight = GaugeMetricFamily("nvpool_agent_inflight_commands",
                                     "Commands received and not yet answered (queued or flushing)")
        inflight.add_metric([], sum(getattr(c, "inflight", 0) for c in list(st.live)))
        yield inflight
        cap = GaugeMetricFamily("nvpool_agent_drive_capacity_bytes", "Drive capacity", labels=["drive", "path"])
        fail = GaugeMetricFamily("nvpool_agent_drive_failed", "1 when the drive has failed", labels=["drive"])
        derr = CounterMetricFamily("nvpool_agent_drive_io_errors", "Failed I/O requests on a drive", labels=["drive"])
        ext = GaugeMetricFamily("nvpool_agent_extents", "Extents held on a drive", labels=["drive"])
        held: dict[str, int] = {}
        for rec in list(self.core.extents.values()):
            held[rec.drive_id] = held.get(rec.drive_id, 0) + 1
        for did, d in sorted(self.core.drives.items()):
            cap.add_metric([did, d.path], d.capacity)
            fail.add_metric([did], 1 if d.failed else 0)
            derr.add_metric([did], d.errors)
            ext.add_metric([did], held.get(did, 0))
        yield from (cap, fail, derr, ext)
        serving = GaugeMetricFamily("nvpool_agent_serving_replicated",
                                    "1 while the serve lease holds (replicated extents are served)")
        serving.add_metric([], 1 if time.monotonic() <= self.core.serve_until else 0)
        yield serving
        age = GaugeMetricFamily("nvpool_agent_heartbeat_age_seconds", "Seconds since the last successful heartbeat")
        age.add_metric([], self.heartbeat_age())
        yield age
