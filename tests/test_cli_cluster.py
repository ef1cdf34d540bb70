"""The README's first command, through the CLI: cluster up -> demo -> bench -> status -> down -> up again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def gone(pid: int) -> None:
    """SIGKILL ``pid`` and wait until it no longer exists."""
    from nvpool.client.cluster import pid_alive

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)


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
        # `cluster up` on the running pool starts what is down and adds servers (issue 30, first hour, 4)
        assert json.loads(nv("cluster", "up", "--dir", d, "--json"))["started"] == []
        gone(st["agents"][1]["pid"])
        again = json.loads(nv("cluster", "up", "--dir", d, "--json"))
        assert again["started"] == ["agent1"] and all(a["alive"] for a in again["agents"]), again
        grown = json.loads(nv("cluster", "up", "--dir", d, "--agents", "4", "--json"))
        assert grown["started"] == ["agent3"] and len(grown["agents"]) == 4 and all(a["alive"] for a in grown["agents"])
        pool_st = json.loads(nv("pool", "status", "--json", env=env))
        assert sum(1 for a in pool_st["agents"] if a["alive"]) == 4
        # an agent restarted by hand (same arguments, same ready file) is the pool's: up, and stopped by down
        state = json.loads((tmp_path / "pool" / "cluster.json").read_text())
        gone(state["agents"][0]["pid"])
        by_hand = subprocess.Popen([sys.executable, "-m", "nvpool", *state["agents"][0]["args"]],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not all(a["alive"] for a in json.loads(nv("cluster", "status", "--dir", d, "--json"))["agents"]):
            assert time.monotonic() < deadline, "the agent restarted by hand shows DOWN"
            time.sleep(0.2)
        assert "DOWN" not in nv("cluster", "status", "--dir", d)
    finally:
        nv("cluster", "down", "--dir", d)
    assert by_hand.wait(30) is not None  # `cluster down` stopped it too
    st = json.loads(nv("cluster", "status", "--dir", d, "--json"))
    assert not st["meta"]["alive"] and not any(a["alive"] for a in st["agents"])
    # the pool comes back with its volume and data
    nv("cluster", "up", "--dir", d, "--agents", "3", "--drives-per-agent", "1", "--drive-size", "512M")
    try:
        env = pool_env(d)
        assert len(json.loads(nv("cluster", "status", "--dir", d, "--json"))["agents"]) == 4  # the one added, too
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
