"""Shared fixtures: a real local pool (processes on 127.0.0.1), and a guard that fails any test in which
an unhandled exception reached an event loop (asyncio and uvloop both report those on the
``asyncio`` logger)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nvpool.client.cluster import LocalCluster  # noqa: E402
from nvpool.proto import tls as _tls  # noqa: E402
from nvpool.client import etcdlocal as etcdcluster  # noqa: E402

#: every pool the tests start runs with TLS on both planes (proto/tls.py), from one test CA; clients
#: in the test process and the processes it starts find the client certificate through NVPOOL_TLS
TLS_DIR = Path(tempfile.mkdtemp(prefix="nvpool-test-tls-"))
os.environ["NVPOOL_TLS"] = str(TLS_DIR)
_tls.init_ca(str(TLS_DIR))
_tls.issue(str(TLS_DIR), "client", "client")


class _LoopErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_unhandled_loop_errors() -> Iterator[None]:
    handler = _LoopErrors()
    log = logging.getLogger("asyncio")
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
    if handler.records:
        msgs = "\n".join(handler.format(r) for r in handler.records[:5])
        pytest.fail(f"unhandled exception(s) reached the event loop:\n{msgs}")


#: clusters made by the running test (their daemons' logs are checked when it ends)
_clusters: list[LocalCluster] = []


def make_cluster(tmp: Path, agents: int = 4, drives_per_agent: int = 2, drive_size: str = "256M",
                 data_tls: bool = True, metrics: bool = False, store: str = "", metas: int = 1) -> LocalCluster:
    c = LocalCluster(tmp, agents=agents, drives_per_agent=drives_per_agent, drive_size=drive_size, tls_dir=TLS_DIR,
                     data_tls=data_tls, metrics=metrics, store=store, metas=metas)
    _clusters.append(c)
    return c


def daemon_tracebacks(c: LocalCluster) -> list[str]:
    """Tracebacks in a pool's daemon logs: a daemon must never print one, whatever a peer does."""
    out = []
    for log in sorted((c.dir / "logs").glob("*.log")) if (c.dir / "logs").is_dir() else []:
        text = log.read_text(errors="replace")
        if "Traceback (most recent call last)" in text:
            i = text.index("Traceback (most recent call last)")
            out.append(f"{log.name}:\n{text[max(0, i - 300): i + 1500]}")
    return out


@pytest.fixture(autouse=True)
def no_daemon_tracebacks() -> Iterator[None]:
    """Every multi-process test: the daemons it started logged no traceback."""
    start = len(_clusters)
    yield
    made = _clusters[start:]
    del _clusters[start:]
    for c in made:  # a test that failed half-way (or forgot) leaves no daemon behind
        if c.meta.pid or c.agents:
            c.down()
    found = [t for c in made for t in daemon_tracebacks(c)]
    if found:
        pytest.fail("a daemon logged a traceback:\n" + "\n".join(found[:3]))


def need_etcd() -> None:
    """Skip without etcd, except in CI, where the test command installs it and its absence is a failure."""
    if not etcdcluster.available():
        if os.environ.get("CI"):
            pytest.fail("etcd is not installed (deploy/test.sh installs Debian's etcd-server)")
        pytest.skip("etcd is not installed (apt-get install etcd-server)")


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[etcdcluster.EtcdCluster]:
    """A real 3-member etcd cluster on loopback, shared by the session (each user takes its own prefix;
    tests that kill members start their own)."""
    need_etcd()
    c = etcdcluster.EtcdCluster(tmp_path_factory.mktemp("etcd")).up()
    try:
        yield c
    finally:
        c.down()


_prefixes = iter(range(1, 1 << 30))


def store_url(request: pytest.FixtureRequest, kind: str) -> str:
    """The --store of a test pool: "" (SQLite in the pool's directory) or a fresh prefix on the session's etcd."""
    if kind == "sqlite":
        return ""
    cluster = request.getfixturevalue("etcd")
    return str(cluster.url(f"/test{os.getpid()}-{next(_prefixes)}"))


@pytest.fixture(scope="module")
def local_pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real pool: metadata service + 4 agents x 2 drives of 256 MiB, shared by a test module. A module
    parametrises it (``indirect``) with "etcd" to run the metadata service on etcd instead of SQLite."""
    kind = getattr(request, "param", "sqlite")
    c = LocalCluster(tmp_path_factory.mktemp("pool"), agents=4, drives_per_agent=2, drive_size="256M", tls_dir=TLS_DIR,
                     store=store_url(request, kind))
    c.up(timeout=60)
    try:
        yield c
    finally:
        c.down()
    found = daemon_tracebacks(c)
    assert not found, "a daemon logged a traceback:\n" + "\n".join(found[:3])
