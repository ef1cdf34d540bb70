"""The Prometheus endpoint every daemon can serve (``--metrics HOST:PORT``): one collector on its own
registry, served by ``prometheus_client``'s HTTP server on a thread of its own."""

from __future__ import annotations

from typing import Any

from nvpool.proto.addresses import split_hostport
from nvpool.proto.errors import UsageError


def start_metrics(listen: str, collector: Any) -> Any:
    """Serve ``collector`` at http://LISTEN/metrics; returns the server (``shutdown()`` stops it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    host, port = split_hostport(listen, 0)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, _thread = start_http_server(port, addr=host or "127.0.0.1", registry=registry)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    return server
