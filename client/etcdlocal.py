"""A local etcd cluster on loopback: N members as separate processes, each on its own client and peer
port, data in a directory; members can be killed and restarted. ``nvpool cluster up --metas 3`` runs
the local pool's metadata on one (the tests and benchmarks start their own).

``etcd`` comes from Debian's ``etcd-server`` (``deploy/bootstrap.sh`` installs it when missing).
The cluster's ports and member pids are kept in ``state()``, so another process (``nvpool cluster
down``) can stop it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from nvpool.client.cluster import pid_alive

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def available() -> bool:
    return os.access(ETCD, os.X_OK)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdCluster:
    def __init__(self, directory: Path, members: int = 3) -> None:
        self.dir = Path(directory)
        self.n = members
        ports = _free_ports(2 * members)
        self.client_ports = ports[:members]
        self.peer_ports = ports[members:]
        self.procs: list[Optional[subprocess.Popen[bytes]]] = [None] * members
        #: member pids (also of members another process started: see ``from_state``)
        self.pids: list[int] = [0] * members
        self.token = f"nvpool-local-{os.getpid()}-{int(time.time() * 1000)}"

    def state(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "client_ports": self.client_ports, "peer_ports": self.peer_ports,
                "pids": self.pids, "token": self.token}

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> "EtcdCluster":
        c = cls(Path(st["dir"]), len(st["client_ports"]))
        c.client_ports, c.peer_ports = list(st["client_ports"]), list(st["peer_ports"])
        c.pids, c.token = list(st["pids"]), str(st["token"])
        return c

    def alive(self, i: int) -> bool:
        return pid_alive(self.pids[i])

    def name(self, i: int) -> str:
        return f"m{i}"

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def url(self, prefix: str = "") -> str:
        return "etcd://" + ",".join(self.endpoints) + prefix

    def start_member(self, i: int, state: str = "new") -> None:
        initial = ",".join(f"{self.name(j)}=http://127.0.0.1:{self.peer_ports[j]}" for j in range(self.n))
        if not available():
            raise FileNotFoundError(f"etcd is not installed ({ETCD}): apt-get install etcd-server")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / f"etcd-{i}.log", "ab")
        self.procs[i] = subprocess.Popen(
            [ETCD, "--name", self.name(i), "--data-dir", str(self.dir / f"etcd-{i}"),
             "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
             "--initial-cluster", initial, "--initial-cluster-token", self.token,
             "--initial-cluster-state", state, "--heartbeat-interval", "100", "--election-timeout", "1000",
             "--listen-metrics-urls", "", "--logger", "zap", "--log-outputs", "stderr"],
            stdout=log, stderr=log, start_new_session=True,
        )
        self.pids[i] = self.procs[i].pid  # type: ignore[union-attr]
        log.close()

    def up(self, timeout: float = 30) -> "EtcdCluster":
        self.dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            # a member with data from an earlier run rejoins with it (same ports, from ``from_state``)
            self.start_member(i, state="existing" if (self.dir / f"etcd-{i}" / "member").exists() else "new")
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30, members: Optional[list[int]] = None) -> None:
        """Until every (given) member answers as part of a cluster with a leader."""
        import urllib.request

        want = members if members is not None else [i for i in range(self.n) if self.procs[i] is not None
                                                    or self.alive(i)]
        deadline = time.monotonic() + timeout
        while True:
            ok = 0
            for i in want:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.client_ports[i]}/health", timeout=1) as r:
                        ok += b'"true"' in r.read()
                except OSError:
                    pass
            if ok == len(want):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd members {want} not healthy within {timeout:g}s (logs in {self.dir})")
            time.sleep(0.1)

    def raft_leader(self) -> int:
        """The index of the member that leads etcd's own Raft group (from the v3 JSON gateway)."""
        import json
        import urllib.request

        ids = {}
        leader = 0
        for i in range(self.n):
            if self.procs[i] is None:
                continue
            req = urllib.request.Request(f"http://127.0.0.1:{self.client_ports[i]}/v3/maintenance/status", data=b"{}",
                                         method="POST")
            with urllib.request.urlopen(req, timeout=2) as r:
                st = json.loads(r.read())
            ids[int(st["header"]["member_id"])] = i
            leader = int(st["leader"])
        return ids[leader]

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[i]
        if p is None:
            if sig == signal.SIGKILL and self.alive(i):  # started by another process
                os.kill(self.pids[i], sig)
                _wait_gone(self.pids[i], 10)
            return
        if sig == signal.SIGKILL:
            p.kill()
            p.wait(10)
            self.procs[i] = None
        else:
            os.kill(p.pid, sig)

    def restart(self, i: int) -> None:
        self.kill(i)
        self.start_member(i, state="existing")

    def down(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
                self.procs[i] = None
            elif self.alive(i):  # started by another process (nvpool cluster up)
                os.kill(self.pids[i], signal.SIGTERM)
                if not _wait_gone(self.pids[i], 10):
                    os.kill(self.pids[i], signal.SIGKILL)
                    _wait_gone(self.pids[i], 5)

    def __enter__(self) -> "EtcdCluster":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
