"""The README's first command, through the CLI: cluster up -> demo -> bench -> status -> down -> up again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def nv(*args: str, env: dict[str, str] | None = None) -> str:
    p = subprocess.run([sys.executable, "-m", "nvpool", *args], capture_output=True, text=True,
                       timeout=300, env=env or dict(os.environ))
    assert p.returncode == 0, f"nvpool {' '.join(args)}: {p.stderr}"
    return p.stdout


def pool_env(d: str) -> dict[str, str]:
    """The environment `eval "$(nvpool cluster env --dir D)"` makes (NVPOOL_META, NVPOOL_TLS)."""
    env = dict(os.environ)
    for line in nv("cluster", "env", "--dir", d).splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def test_cluster_lifecycle_demo_and_bench(tmp_path: Path) -> None:
    d = str(tmp_path / "pool")
    up = json.loads(nv("cluster", "up", "--dir", d, "--agents", "3", "--drives-per-agent", "1", "--drive-size", "512M", "--json"))
    assert len(up["agents"]) == 3 and all(a["alive"] for a in up["agents"])
    try:
        demo = json.loads(nv("cluster", "demo", "--dir", d, "--size", "64M", "--json"))
        assert demo["match"] and demo["sha256_written"] == demo["sha256_read"]
        assert demo["columns"] == 16 and demo["servers"] == 3 and demo["read_MBps"] > 0
        env = pool_env(d)
        assert env["NVPOOL_META"] == up["meta"]["address"] and env["NVPOOL_TLS"].endswith("tls")
        for io_type in ("write", "read"):
            b = json.loads(nv("bench", "demo", "--io-type", io_type, "--io-size", "64K", "--io-depth", "4",
                              "--total", "16M", "--json", env=env))
            assert b["ops"] == 256 and b["bytes"] == 16 << 20 and b["lat_p99_us"] >= b["lat_p50_us"] > 0
        st = json.loads(nv("cluster", "status", "--dir", d, "--json"))
        assert st["meta"]["alive"] and len(st["agents"]) == 3
        with pytest.raises(AssertionError, match="already running"):
            nv("cluster", "up", "--dir", d)
    finally:
        nv("cluster", "down", "--dir", d)
    st = json.loads(nv("cluster", "status", "--dir", d, "--json"))
    assert not st["meta"]["alive"] and not any(a["alive"] for a in st["agents"])
    # the pool comes back with its volume and data
    nv("cluster", "up", "--dir", d, "--agents", "3", "--drives-per-agent", "1", "--drive-size", "512M")
    try:
        env = pool_env(d)
        vols = json.loads(nv("volume", "list", "--json", env=env))
        assert [v["name"] for v in vols] == ["demo"]
    finally:
        nv("cluster", "down", "--dir", d)


def test_local_pool_with_three_metadata_services_survives_killing_the_leader(tmp_path: Path) -> None:
    """`nvpool cluster up --metas 3`: a local etcd cluster and three metadata services; kill the leader,
    the pool goes on through the addresses `cluster env` exports; `cluster down` stops everything, etcd
    included; `cluster up` again brings the pool back with its data, etcd members rejoining."""
    from tests.conftest import need_etcd

    need_etcd()
    d = str(tmp_path / "pool")
    nv("cluster", "up", "--dir", d, "--metas", "3", "--agents", "2", "--drives-per-agent", "1", "--drive-size", "256M")
    try:
        env = pool_env(d)
        assert env["NVPOOL_META"].count(",") == 2
        st = json.loads(subprocess.run([sys.executable, "-m", "nvpool", "pool", "status", "--json"], env=env,
                                       capture_output=True, text=True, timeout=60).stdout)
        assert st["meta_store"].startswith("etcd://")
        leader = st["meta_leader"]
        status = json.loads(nv("cluster", "status", "--dir", d, "--json"))
        assert len(status["metas"]) == 3 and len(status["etcd"]) == 3 and all(e["alive"] for e in status["etcd"])
        pid = next(m["pid"] for m in status["metas"] if m["address"] == leader)
        os.kill(pid, 9)
        nv("volume", "create", "ha", "--size", "16M", env=env)  # waits for the next leader
        demo = json.loads(nv("cluster", "demo", "--dir", d, "--size", "16M", "--json", env=env))
        assert demo["match"]
    finally:
        nv("cluster", "down", "--dir", d)
    status = json.loads(nv("cluster", "status", "--dir", d, "--json"))
    assert not any(m["alive"] for m in status["metas"]) and not any(e["alive"] for e in status["etcd"])
    nv("cluster", "up", "--dir", d, "--metas", "3", "--agents", "2", "--drives-per-agent", "1", "--drive-size", "256M")
    try:
        vols = json.loads(nv("volume", "list", "--json", env=pool_env(d)))
        assert {"ha", "demo"} <= {v["name"] for v in vols}
    finally:
        nv("cluster", "down", "--dir", d)


def test_without_dir_the_cli_finds_the_quick_starts_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``nvpool cluster env`` / ``status`` with no ``--dir`` look where the quick start put its pool
    (``.nvpool/local``), still find a pool an earlier version started in ``.nvpool``, and when there is
    none say to pass ``--dir`` (issue 30, the first hour, 5)."""
    from nvpool.client.cluster import LocalCluster, default_dir
    from nvpool.proto.errors import UsageError

    monkeypatch.delenv("NVPOOL_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_dir() == str(tmp_path / ".nvpool" / "local")
    (tmp_path / ".nvpool").mkdir()
    (tmp_path / ".nvpool" / "cluster.json").write_text("{}")
    assert default_dir() == str(tmp_path / ".nvpool")  # an older pool, and no quick-start one
    (tmp_path / ".nvpool" / "local").mkdir()
    (tmp_path / ".nvpool" / "local" / "cluster.json").write_text("{}")
    assert default_dir() == str(tmp_path / ".nvpool" / "local")
    monkeypatch.setenv("NVPOOL_HOME", str(tmp_path / "elsewhere"))
    assert default_dir() == str(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="pass --dir DIR"):
        LocalCluster.load(default_dir())
