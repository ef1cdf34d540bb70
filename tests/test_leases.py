"""Exclusive write access (issue 10.5), with real processes: one writer at a time, any number of
readers, a second writer refused with the holder's name or taking over with --force (which fences the
previous writer: its writes fail from then on and change nothing), a dead writer's lease expiring by
itself, and no delete of a volume in use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Iterator

import numpy as np
import pytest

from nvpool import client
from nvpool.client.cluster import LocalCluster
from nvpool.proto.errors import LeaseError, UsageError
from tests.conftest import make_cluster, store_url

MiB = 1 << 20
pytestmark = pytest.mark.slow
TTL = 2.0


@pytest.fixture(scope="module", params=["sqlite", "etcd"])
def pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The lease tests run with the metadata on SQLite and on etcd."""
    c = make_cluster(tmp_path_factory.mktemp("leases"), agents=2, drives_per_agent=1,
                     store=store_url(request, request.param))
    c.meta_extra = ["--lease-ttl", str(TTL)]
    with c.up():  # down() when the module is done
        yield c


def nv(meta: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvpool", *args, "--meta", meta], capture_output=True, text=True,
                          timeout=60)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from nvpool import client
    from nvpool.proto.errors import NvpoolError
    pool = client.connect(sys.argv[1])
    vol = pool.open(sys.argv[2])
    vol.write(0, np.full(1 << 20, 0xAA, dtype=np.uint8))
    print("ready", flush=True)
    sys.stdin.readline()
    failed = 0
    for off in range(0, 4 << 20, 1 << 20):
        for n in (4096, 1 << 20):  # the small-I/O fast path and the general path
            try:
                vol.write(off, np.full(n, 0xAA, dtype=np.uint8))
            except NvpoolError as exc:
                failed += 1
                last = type(exc).__name__
    print(f"failed {failed} {last if failed else ''}", flush=True)
""")


def test_one_writer_many_readers_and_refusals_name_the_holder(pool: LocalCluster) -> None:
    meta = pool.meta.address
    with client.connect(meta) as p:
        p.create_volume("lv", 8 * MiB)
        w = p.open("lv")
        w.write(0, np.ones(MiB, dtype=np.uint8))
        reader = client.connect(meta)  # readers of two clients: two reader leases
        r1, r2 = p.open("lv", read_only=True), reader.open("lv", read_only=True)
        assert r1.read(0, 4).tolist() == [1, 1, 1, 1] and r2.read(0, 4).tolist() == [1, 1, 1, 1]
        with pytest.raises(UsageError, match="read-only"):
            r1.write(0, b"x")
        again = p.open("lv")  # the same client may open its volume again: it shares its lease
        again.close()
        with client.connect(meta) as other, pytest.raises(LeaseError, match=f"pid {os.getpid()}"):
            other.open("lv")  # a second client for writing: refused, naming who holds it
        st = json.loads(nv(meta, "volume", "status", "lv", "--json").stdout)
        assert sorted(h["mode"] for h in st["holders"]) == ["read", "read", "write"]
        assert st["holders"][0]["mode"] == "write"
        d = nv(meta, "volume", "delete", "lv", "--yes")
        assert d.returncode == 1 and "in use by" in d.stderr and "--force" in d.stderr, d.stderr
        w.close()
        with client.connect(meta) as other:
            other.open("lv").close()  # closed cleanly: the next writer gets it at once
        r1.close()
        r2.close()
        reader.close()
        assert json.loads(nv(meta, "volume", "status", "lv", "--json").stdout)["holders"] == []
        assert nv(meta, "volume", "delete", "lv", "--yes").returncode == 0


def test_force_takeover_fences_the_previous_writer(pool: LocalCluster) -> None:
    meta = pool.meta.address
    with client.connect(meta) as p:
        p.create_volume("tv", 8 * MiB, stripe_unit="1M")
        old = subprocess.Popen([sys.executable, "-c", WRITER, meta, "tv"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        try:
            assert old.stdout is not None and old.stdin is not None
            assert old.stdout.readline().strip() == "ready"
            gen = p.volume_info("tv").generation
            with pytest.raises(LeaseError, match="open for writing by"):
                p.open("tv")
            new = p.open("tv", force=True)
            assert p.volume_info("tv").generation > gen  # agents fenced the old writer's generation
            new.write(0, np.full(4 * MiB, 0xBB, dtype=np.uint8))
            new.flush()
            old.stdin.write("go\n")
            old.stdin.flush()
            out = old.stdout.readline().split()
            assert out[:2] == ["failed", "8"] and out[2] == "LeaseError", out  # every write of the fenced writer
            assert old.wait(30) == 0
            assert np.all(new.read(0, 4 * MiB) == 0xBB), "a fenced writer changed the volume"
            new.close()
        finally:
            if old.poll() is None:
                old.kill()


def test_a_dead_writers_lease_expires_by_itself(pool: LocalCluster) -> None:
    meta = pool.meta.address
    with client.connect(meta) as p:
        p.create_volume("dv", 8 * MiB, stripe_unit="1M")
        holder = subprocess.Popen([sys.executable, "-c", WRITER, meta, "dv"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        t0 = time.monotonic()
        while True:
            try:
                vol = p.open("dv")
                break
            except LeaseError:
                assert time.monotonic() - t0 < 3 * TTL, "a dead writer's lease never expired"
                time.sleep(0.2)
        assert time.monotonic() - t0 >= TTL / 2  # not before it could have expired
        vol.write(0, np.zeros(MiB, dtype=np.uint8))  # and the new writer works (generation raised)
        vol.close()
