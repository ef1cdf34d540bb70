"""Client-side metrics of this process: what the library did for the application (operations, bytes,
latency as the application saw it, errors, and the recovery work behind them: retries, layout
re-fetches, hedged reads, replica failures). Counted with plain increments on the I/O path;
``collector()`` exposes them to Prometheus (``nvpool export --metrics HOST:PORT`` serves them, and a
program can register the collector in its own registry)."""

from __future__ import annotations

import bisect
import weakref
from typing import Any, Iterator

#: upper bounds (seconds) of the latency histogram
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Counters:
    def __init__(self) -> None:
        #: op -> [calls, bytes, errors]
        self.ops: dict[str, list[int]] = {}
        #: op -> (bucket counts, [sum of seconds])
        self.latency: dict[str, tuple[list[int], list[float]]] = {}
        #: volumes whose recovery stats are summed at scrape time
        self.volumes: "weakref.WeakSet[Any]" = weakref.WeakSet()
        #: NBD export connections on the compiled engine (client/nbd/engine.py): their reads and writes
        #: served in C are counted by the engine, summed at scrape time, and added here when they end
        self.engines: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def add(self, op: str, calls: int, nbytes: int) -> None:
        """Calls counted elsewhere (the compiled NBD engine: no latency histogram for those)."""
        o = self.ops.setdefault(op, [0, 0, 0])
        o[0] += calls
        o[1] += nbytes

    def all_ops(self) -> dict[str, list[int]]:
        """``ops`` with the live engines' counts added."""
        out = {k: list(v) for k, v in self.ops.items()}
        for link in list(self.engines):
            for op, calls, nbytes in link.counted():
                o = out.setdefault(op, [0, 0, 0])
                o[0] += calls
                o[1] += nbytes
        return out

    def record(self, op: str, nbytes: int, seconds: float, failed: bool, count: int = 1) -> None:
        """``count`` calls (a batch: ``nbytes`` in all, each taking ``seconds``)."""
        o = self.ops.get(op)
        if o is None:
            o = self.ops[op] = [0, 0, 0]
        o[0] += count
        if failed:
            o[2] += count
        else:
            o[1] += nbytes
        h = self.latency.get(op)
        if h is None:
            h = self.latency[op] = ([0] * (len(BUCKETS) + 1), [0.0])
        h[0][bisect.bisect_left(BUCKETS, seconds)] += count
        h[1][0] += seconds * count


COUNTERS = Counters()


def collector() -> Any:
    """A Prometheus collector of this process's client metrics (``nvpool_client_*``)."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector

    class ClientCollector(Collector):
        def collect(self) -> Iterator[Any]:
            ops = CounterMetricFamily("nvpool_client_operations", "I/O calls made by the application", labels=["op"])
            nbytes = CounterMetricFamily("nvpool_client_bytes", "Bytes moved by successful calls", labels=["op"])
            errors = CounterMetricFamily("nvpool_client_errors", "Calls that raised an error", labels=["op"])
            for op, (n, b, e) in sorted(COUNTERS.all_ops().items()):
                ops.add_metric([op], n)
                nbytes.add_metric([op], b)
                errors.add_metric([op], e)
            yield from (ops, nbytes, errors)
            h = HistogramMetricFamily("nvpool_client_call_seconds", "Latency of a call as the application sees it",
                                      labels=["op"])
            for op, (counts, total) in sorted(dict(COUNTERS.latency).items()):
                acc, buckets = 0, []
                for bound, c in zip([*map(str, BUCKETS), "+Inf"], counts):
                    acc += c
                    buckets.append((bound, acc))
                h.add_metric([op], buckets, total[0])
            yield h
            rec = CounterMetricFamily("nvpool_client_recoveries", "Work behind the calls (retries, re-fetched "
                                      "layouts, hedged reads, replica failures) of the open volumes", labels=["kind"])
            sums: dict[str, int] = {}
            for vol in list(COUNTERS.volumes):
                for k, v in dict(vol.stats).items():
                    sums[k] = sums.get(k, 0) + int(v)
            for k, v in sorted(sums.items()):
                rec.add_metric([k], v)
            yield rec

    return ClientCollector()
