"""Operability: the Prometheus endpoints of a real pool move with the workload, and the standard
gRPC health service answers on the metadata service and on agents."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvpool.client.api import AsyncPool, ClientOptions
from nvpool.client.cluster import LocalCluster

MiB = 1 << 20


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    from tests.conftest import make_cluster

    c = make_cluster(tmp_path_factory.mktemp("metrics"), agents=2, drives_per_agent=1, drive_size="128M", metrics=True)
    with c.up():  # down() when the module is done
        yield c


def scrape(address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def test_agent_counters_follow_what_the_client_read_and_wrote(pool: LocalCluster) -> None:
    assert all(a.metrics for a in pool.agents) and pool.meta.metrics
    before = [scrape(a.metrics) for a in pool.agents]
    wrote, read = 24 * MiB, 40 * MiB

    async def work() -> None:
        p = await AsyncPool.connect(pool.meta.address, ClientOptions(transport="tcp"))
        try:
            await p.create_volume("m", 32 * MiB)
            v = await p.open("m")
            await v.write(0, os.urandom(wrote))
            buf = bytearray(8 * MiB)
            for i in range(read // len(buf)):
                await v.readinto(memoryview(buf), (i % 3) * len(buf))
            await v.close()
        finally:
            await p.close()

    asyncio.run(work())
    after = [scrape(a.metrics) for a in pool.agents]
    d_read = sum(total(a, "nvpool_agent_read_bytes_total") - total(b, "nvpool_agent_read_bytes_total")
                 for a, b in zip(after, before))
    d_written = sum(total(a, "nvpool_agent_written_bytes_total") - total(b, "nvpool_agent_written_bytes_total")
                    for a, b in zip(after, before))
    assert d_written == wrote  # one copy: exactly the bytes written
    assert read <= d_read <= read * 1.01, (d_read, read)
    vol_read = sum(total(a, "nvpool_agent_volume_read_bytes_total") - total(b, "nvpool_agent_volume_read_bytes_total")
                   for a, b in zip(after, before))
    assert vol_read == d_read
    ops = sum(total(a, "nvpool_agent_command_seconds_count") - total(b, "nvpool_agent_command_seconds_count")
              for a, b in zip(after, before))
    assert ops >= (wrote + read) // (1 * MiB)  # every command is timed
    for a in after:
        assert "nvpool_agent_inflight_commands" in a and total(a, "nvpool_agent_connections") >= 0
        assert total(a, "nvpool_agent_serving_replicated") == 1
        assert 0 <= total(a, "nvpool_agent_heartbeat_age_seconds") < 5
        assert total(a, "nvpool_agent_drive_capacity_bytes") > 0


def test_meta_metrics_show_the_pool(pool: LocalCluster) -> None:
    m = scrape(pool.meta.metrics)
    ups = m["nvpool_meta_agent_up"]
    assert len(ups) == 2 and all(v == 1 for _, v in ups)
    assert total(m, "nvpool_meta_capacity_bytes") > 0 and total(m, "nvpool_meta_pool_healthy") == 1
    rpcs = {(lab["method"], lab["code"]): v for lab, v in m["nvpool_meta_rpcs_total"]}
    assert rpcs.get(("RegisterAgent", "OK"), 0) >= 2 and rpcs.get(("Heartbeat", "OK"), 0) >= 2


def test_health_service_answers_on_meta_and_agents(pool: LocalCluster, tmp_path: Path) -> None:
    import json

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from nvpool.proto import grpctls, tls

    async def check(address: str) -> int:
        async with grpctls.aio_channel(address, tls.from_env()) as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return int(r.status)

    controls = [json.loads(Path(a.ready_file).read_text())["control_address"] for a in pool.agents]
    for address in [pool.meta.address, *controls]:
        assert asyncio.run(check(address)) == health_pb2.HealthCheckResponse.SERVING


def test_client_library_counts_what_the_application_did(pool: LocalCluster) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from nvpool import client
    from nvpool.client.metrics import collector

    registry = CollectorRegistry()
    registry.register(collector())

    def sample(name: str, op: str) -> float:
        for fam in text_string_to_metric_families(generate_latest(registry).decode()):
            for s in fam.samples:
                if s.name == name and s.labels.get("op") == op:
                    return float(s.value)
        return 0.0

    r0, w0 = sample("nvpool_client_bytes_total", "read"), sample("nvpool_client_bytes_total", "write")
    n0 = sample("nvpool_client_call_seconds_count", "read")
    with client.connect(pool.meta.address) as p:
        p.create_volume("cm", 8 * MiB)
        with p.open("cm") as v:
            v.write(0, b"x" * (3 * MiB))  # the general path
            for i in range(16):
                v.write(i * 4096, b"y" * 4096)  # small writes: the blocking fast path
            v.read(0, 2 * MiB)
    assert sample("nvpool_client_bytes_total", "write") - w0 == 3 * MiB + 16 * 4096
    assert sample("nvpool_client_bytes_total", "read") - r0 == 2 * MiB
    assert sample("nvpool_client_call_seconds_count", "read") - n0 == 1


def test_drive_list_and_volume_du(pool: LocalCluster) -> None:
    import json
    import subprocess
    import sys

    def nv(*args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([sys.executable, "-m", "nvpool", *args, "--meta", pool.meta.address], capture_output=True,
                              text=True, timeout=60)

    r = nv("drive", "list", "--json")
    assert r.returncode == 0, r.stderr
    drives = json.loads(r.stdout)
    assert len(drives) == 2 and all(d["model"] == "file" and d["state"] == "ok" and d["capacity"] > 0 for d in drives)
    assert "SERIAL" in nv("drive", "list").stdout
    with __import__("nvpool").client.connect(pool.meta.address) as p:
        p.create_volume("du", 16 * MiB)
        with p.open("du") as v:
            v.write(0, b"z" * (3 * MiB))
    r = nv("volume", "du", "du", "--json")
    assert r.returncode == 0, r.stderr
    (u,) = json.loads(r.stdout)
    assert u["size"] == 16 * MiB and u["allocated"] >= 16 * MiB
    assert 3 * MiB <= u["written"] < 16 * MiB  # only what was written holds data
