"""A real local pool: a metadata service and N agents as separate processes on loopback, with
file-backed drives. Used by ``nvpool cluster up/down``, the README demo and the integration tests.

State lives in ``DIR/cluster.json`` (pids and addresses), logs in ``DIR/logs/``, drives in
``DIR/drives/``, metadata in ``DIR/meta.db``; a pool stopped with ``down`` and started again with
``up`` on the same DIR comes back with its volumes and data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from nvpool.proto.errors import NvpoolError, UnavailableError, UsageError


@dataclass
class ProcInfo:
    name: str
    pid: int = 0
    address: str = ""
    args: list[str] = field(default_factory=list)
    ready_file: str = ""
    log: str = ""
    #: where its Prometheus endpoint listens ("" = none)
    metrics: str = ""


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is dead (and reaped here)
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:  # so is anyone else's zombie (a daemon restarted by hand, its parent not yet waiting)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LocalCluster:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        agents: int = 4,
        drives_per_agent: int = 2,
        drive_size: str = "4G",
        meta_listen: str = "127.0.0.1:0",
        unix_sockets: bool = True,
        python: str = sys.executable,
        tls: bool = True,
        tls_dir: Optional[str | os.PathLike[str]] = None,
        data_tls: bool = True,
        metrics: bool = False,
        store: str = "",
        metas: int = 1,
    ) -> None:
        #: where metadata lives: "" = sqlite:DIR/meta.db (one metadata service), or an etcd URL; with
        #: ``metas`` > 1 and no store, ``up`` starts a 3-member etcd cluster in DIR/etcd for them
        self.store = store
        self.n_metas = metas
        #: the local etcd cluster's state (client/etcdlocal.py), when this pool runs one
        self.etcd: Optional[dict[str, Any]] = None
        #: every daemon serves Prometheus metrics on a free port (ProcInfo.metrics says which)
        self.metrics = metrics
        #: with TLS: encrypt the agents' TCP data plane too (else only the control plane)
        self.data_tls = data_tls
        self.dir = Path(directory).resolve()
        #: TLS everywhere (proto/tls.py): a pool CA and certificates in ``tls_dir`` (default DIR/tls;
        #: an existing CA there is reused), for the daemons and one ``client`` certificate
        self.tls_dir: Optional[Path] = (Path(tls_dir).resolve() if tls_dir else self.dir / "tls") if tls else None
        self.n_agents = agents
        self.drives_per_agent = drives_per_agent
        self.drive_size = drive_size
        self.meta_listen = meta_listen
        self.unix_sockets = unix_sockets
        self.python = python
        self.meta = ProcInfo("meta")
        #: further metadata services (standbys of an etcd-backed pool); ``meta`` is the first
        self.standbys: list[ProcInfo] = [ProcInfo(f"meta{i}") for i in range(1, metas)]
        #: extra arguments for `nvpool meta` (tests: e.g. a short --lease-ttl)
        self.meta_extra: list[str] = []
        self.agents: list[ProcInfo] = []
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ state
    @property
    def state_file(self) -> Path:
        return self.dir / "cluster.json"

    def save(self) -> None:
        state = {
            "meta": asdict(self.meta), "agents": [asdict(a) for a in self.agents],
            "drives_per_agent": self.drives_per_agent, "drive_size": self.drive_size,
            "tls_dir": str(self.tls_dir) if self.tls_dir else "", "data_tls": self.data_tls,
            "unix_sockets": self.unix_sockets, "meta_extra": self.meta_extra, "metrics": self.metrics,
            "store": self.store, "standbys": [asdict(m) for m in self.standbys],
            "etcd": self._etcd.state() if self._etcd is not None else self.etcd,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "LocalCluster":
        d = Path(directory).resolve()
        try:
            state = json.loads((d / "cluster.json").read_text())
        except FileNotFoundError:
            raise UsageError(f"no local pool in {d}: pass --dir DIR (or set NVPOOL_HOME) where one was started, or "
                             f"start one with `nvpool cluster up --dir {d}`") from None
        c = cls(d, len(state["agents"]), state["drives_per_agent"], state["drive_size"],
                unix_sockets=state.get("unix_sockets", True), tls=bool(state.get("tls_dir")),
                tls_dir=state.get("tls_dir") or None, data_tls=state.get("data_tls", True),
                metrics=state.get("metrics", False), store=state.get("store", ""),
                metas=1 + len(state.get("standbys", [])))
        c.standbys = [ProcInfo(**m) for m in state.get("standbys", [])]
        c.etcd = state.get("etcd")
        c.meta_extra = list(state.get("meta_extra", []))
        c.meta = ProcInfo(**state["meta"])
        c.agents = [ProcInfo(**a) for a in state["agents"]]
        for info in [*c.metas, *c.agents]:  # a daemon restarted by hand with its ready file is this one now
            if info.ready_file and not pid_alive(info.pid):
                try:
                    ready = json.loads(Path(info.ready_file).read_text())
                except (OSError, ValueError):
                    continue
                pid = int(ready.get("pid") or 0)
                if pid and pid_alive(pid):
                    info.pid, info.address = pid, str(ready.get("address") or info.address)
        return c

    # ------------------------------------------------------------------ processes
    def _spawn(self, info: ProcInfo) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        if info.ready_file and os.path.exists(info.ready_file):
            os.unlink(info.ready_file)
        log = open(info.log, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [self.python, "-m", "nvpool", *info.args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        log.close()
        self._procs[proc.pid] = proc
        info.pid = proc.pid

    def _wait_ready(self, info: ProcInfo, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(info.ready_file):
                try:
                    return dict(json.loads(Path(info.ready_file).read_text()))
                except ValueError:
                    pass
            if not pid_alive(info.pid):
                tail = Path(info.log).read_text(errors="replace")[-2000:] if os.path.exists(info.log) else ""
                raise UnavailableError(f"{info.name} exited during start-up; log {info.log}:\n{tail}")
            time.sleep(0.05)
        raise UnavailableError(f"{info.name} did not become ready within {timeout:.0f}s (log {info.log})")

    def _tls_args(self, name: str, role: str) -> list[str]:
        """``--tls-ca/--tls-cert/--tls-key`` for a daemon (its certificate issued on first use)."""
        if self.tls_dir is None:
            return []
        from nvpool.proto import tls

        tls.init_ca(str(self.tls_dir))
        files = tls.TlsFiles.from_dir(str(self.tls_dir), name)
        if not Path(files.cert).exists():
            tls.issue(str(self.tls_dir), name, role, ("127.0.0.1", "localhost"))
        return ["--tls-ca", files.ca, "--tls-cert", files.cert, "--tls-key", files.key]

    def client_tls(self) -> "Optional[Any]":
        """The ``TlsFiles`` a client of this pool uses (None without TLS); what NVPOOL_TLS points at."""
        if self.tls_dir is None:
            return None
        from nvpool.proto import tls

        self._tls_args("client", "client")
        return tls.TlsFiles.from_dir(str(self.tls_dir), "client")

    @property
    def _etcd(self) -> "Optional[Any]":
        """The local etcd cluster (a client/etcdlocal.py EtcdCluster), if this pool runs one."""
        got = self.__dict__.get("_etcd_cluster")
        if got is None and self.etcd:
            from nvpool.client.etcdlocal import EtcdCluster

            got = self.__dict__["_etcd_cluster"] = EtcdCluster.from_state(self.etcd)
        return got

    def _start_etcd(self, timeout: float) -> None:
        from nvpool.client.etcdlocal import EtcdCluster, available

        if not available():
            raise UsageError("several metadata services keep the metadata in etcd, which is not installed "
                             "(apt-get install etcd-server)")
        cluster = self._etcd or EtcdCluster(self.dir / "etcd", 3)
        self.__dict__["_etcd_cluster"] = cluster
        cluster.up(timeout)
        self.etcd = cluster.state()
        self.store = cluster.url("/nvpool")
        self.save()

    @property
    def metas(self) -> list[ProcInfo]:
        return [self.meta, *self.standbys]

    @property
    def meta_addresses(self) -> str:
        """Every metadata service's address, comma-separated (what agents, clients and the CLI take)."""
        return ",".join(m.address for m in self.metas if m.address)

    def start_meta(self, timeout: float = 30, i: int = 0) -> None:
        info = self.metas[i]
        listen = info.address or self.meta_listen  # keep the port across restarts
        tag = "meta" if i == 0 else f"meta{i}"
        if self.store:
            from nvpool.proto import keys

            keys.create(str(self.secret_file))  # every metadata service of the pool shares it
            store = ["--store", self.store, "--join-secret-file", str(self.secret_file)]
        else:
            store = ["--store", f"sqlite:{self.dir / 'meta.db'}"]
        info.args = [
            "meta", "--listen", listen, *store,
            "--ready-file", str(self.dir / f"{tag}.ready"), *self._tls_args("meta", "meta"), *self.meta_extra,
            *(["--metrics", "127.0.0.1:0"] if self.metrics else []),
        ]
        self.client_tls()
        info.ready_file = str(self.dir / f"{tag}.ready")
        info.log = str(self.dir / "logs" / f"{tag}.log")
        self._spawn(info)
        ready = self._wait_ready(info, timeout)
        info.address, info.metrics = ready["address"], ready.get("metrics", "")
        self.save()

    def leader(self, timeout: float = 30) -> int:
        """Which metadata service leads (an index into ``metas``), once one does."""
        from nvpool.client.api import ClientOptions, Pool

        deadline = time.monotonic() + timeout
        with Pool(self.meta_addresses, ClientOptions(tls=self.client_tls())) as pool:
            while True:
                try:
                    meta = pool.meta
                    addr = str(pool._run(meta.pool_status()).meta_leader)
                    for i, m in enumerate(self.metas):
                        if m.address == addr and pid_alive(m.pid):
                            return i
                except NvpoolError:
                    pass
                if time.monotonic() > deadline:
                    raise UnavailableError(f"no metadata service leads within {timeout:.0f}s")
                time.sleep(0.1)

    @property
    def secret_file(self) -> Path:
        """The pool's join secret, which `nvpool meta` creates next to its store."""
        return self.dir / "meta.db.join-secret"

    def agent_info(self, i: int) -> ProcInfo:
        name = f"agent{i}"
        drives = [f"file:{self.dir / 'drives' / f'{name}-d{j}.img'}:{self.drive_size}" for j in range(self.drives_per_agent)]
        args = ["agent", "--meta", self.meta_addresses, "--listen", "127.0.0.1:0", "--name", name, "--host", name,
                "--join-secret-file", str(self.secret_file), *self._tls_args(name, "agent"),
                *([] if self.data_tls else ["--no-data-tls"]), *(["--metrics", "127.0.0.1:0"] if self.metrics else []),
                "--ready-file", str(self.dir / f"{name}.ready"), "--heartbeat", "0.5"]
        if self.unix_sockets:
            args += ["--unix", str(self.dir / f"{name}.sock")]
        for d in drives:
            args += ["--drive", d]
        return ProcInfo(name, args=args, ready_file=str(self.dir / f"{name}.ready"), log=str(self.dir / "logs" / f"{name}.log"))

    def start_agent(self, i: int, timeout: float = 30) -> ProcInfo:
        while len(self.agents) <= i:
            self.agents.append(self.agent_info(len(self.agents)))
        info = self.agents[i]
        fresh = self.agent_info(i)
        info.args, info.ready_file, info.log = fresh.args, fresh.ready_file, fresh.log
        self._spawn(info)
        ready = self._wait_ready(info, timeout)
        info.address, info.metrics = ready["address"], ready.get("metrics", "")
        self.save()
        return info

    def add_agent(self, timeout: float = 30) -> ProcInfo:
        info = self.start_agent(len(self.agents), timeout)
        self.n_agents = len(self.agents)
        return info

    def up(self, timeout: float = 60) -> "LocalCluster":
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "drives").mkdir(exist_ok=True)
        if self.state_file.exists():
            old = LocalCluster.load(self.dir)
            if any(pid_alive(m.pid) for m in old.metas) or any(pid_alive(a.pid) for a in old.agents):
                # running: start what is missing, and add agents up to the count asked for
                old.resume(max(self.n_agents, len(old.agents)), timeout)
                self.__dict__.update(old.__dict__)
                return self
            # every agent it had comes back (an agent left out would hold data nobody serves), on its drives
            self.n_agents = max(self.n_agents, len(old.agents))
            self.drives_per_agent, self.drive_size = old.drives_per_agent, old.drive_size
            for mine, theirs in zip(self.metas, old.metas):
                mine.address = theirs.address
            if old.etcd and self.n_metas > 1 and not self.store:
                self.etcd = old.etcd  # its members rejoin with their data, on their ports
        try:
            if self.n_metas > 1 and (not self.store or self.etcd):
                self._start_etcd(timeout)
            for i in range(len(self.metas)):
                self.start_meta(timeout, i)
            for i in range(self.n_agents):
                self.start_agent(i, timeout)
            self.wait_registered(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def resume(self, agents: int, timeout: float = 60) -> list[str]:
        """On a running pool: start every daemon of it that is not running (on its old address and
        drives), then add agents until there are ``agents``; returns what was started. Never stops
        anything."""
        started = []
        etcd = self._etcd
        if etcd is not None:
            dead = [i for i in range(len(etcd.endpoints)) if not etcd.alive(i)]
            for i in dead:  # each rejoins with its data, on its port
                etcd.start_member(i, state="existing")
                started.append(f"etcd{i}")
            if dead:
                etcd.wait_healthy(timeout)
        for i, m in enumerate(self.metas):
            if not pid_alive(m.pid):
                self.start_meta(timeout, i)
                started.append(m.name)
        for i, a in enumerate(list(self.agents)):
            if not pid_alive(a.pid):
                self.start_agent(i, timeout)
                started.append(a.name)
        while len(self.agents) < agents:
            started.append(self.add_agent(timeout).name)
        self.n_agents = len(self.agents)
        self.save()
        self.wait_registered(timeout)
        return started

    def wait_registered(self, timeout: float = 30) -> None:
        """Until the metadata service sees every agent alive."""
        from nvpool.client.metaclient import MetaClient
        import asyncio

        async def check() -> bool:
            meta = MetaClient(self.meta_addresses, timeout=5, tls=self.client_tls())
            try:
                st = await meta.pool_status()
                alive = {a.agent_id for a in st.agents if a.alive}
                return all(a.name in alive for a in self.agents)
            except NvpoolError:
                return False
            finally:
                await meta.close()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if asyncio.run(check()):
                return
            time.sleep(0.1)
        raise UnavailableError(f"agents did not all register with {self.meta.address} within {timeout:.0f}s")

    def stop_proc(self, info: ProcInfo, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if not pid_alive(info.pid):
            return
        try:
            os.kill(info.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(info.pid):
            time.sleep(0.02)
        if pid_alive(info.pid):
            os.kill(info.pid, signal.SIGKILL)
            while pid_alive(info.pid):
                time.sleep(0.02)
        proc = self._procs.pop(info.pid, None)
        if proc is not None:
            proc.wait(timeout=5)

    def kill_agent(self, i: int) -> None:
        self.stop_proc(self.agents[i], signal.SIGKILL)

    def kill_meta(self, i: int = 0) -> None:
        self.stop_proc(self.metas[i], signal.SIGKILL)

    def down(self) -> None:
        for a in self.agents:
            self.stop_proc(a)
        for m in self.metas:
            self.stop_proc(m)
        if self._etcd is not None:
            self._etcd.down()
        if self.state_file.parent.exists():
            self.save()

    def status(self) -> dict[str, Any]:
        etcd = self._etcd
        return {
            "dir": str(self.dir), "meta": {"address": self.meta.address, "pid": self.meta.pid, "alive": pid_alive(self.meta.pid)},
            "metas": [{"address": m.address, "pid": m.pid, "alive": pid_alive(m.pid)} for m in self.metas],
            "store": self.store or f"sqlite:{self.dir / 'meta.db'}",
            "etcd": [{"address": a, "pid": etcd.pids[i], "alive": etcd.alive(i)} for i, a in enumerate(etcd.endpoints)]
            if etcd is not None else [],
            "agents": [{"name": a.name, "address": a.address, "pid": a.pid, "alive": pid_alive(a.pid)} for a in self.agents],
        }

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def default_dir() -> str:
    """Where the local pool lives when no ``--dir`` is given: ``$NVPOOL_HOME``, else ``./.nvpool/local``
    (where the quick start, ``deploy/local-pool.sh``, puts it), else a pool an earlier version started in
    ``./.nvpool``."""
    home = os.environ.get("NVPOOL_HOME")
    if home:
        return home
    local = os.path.join(os.getcwd(), ".nvpool", "local")
    older = os.path.join(os.getcwd(), ".nvpool")
    if not os.path.exists(os.path.join(local, "cluster.json")) and os.path.exists(os.path.join(older, "cluster.json")):
        return older
    return local


def read_meta_address(directory: Optional[str]) -> Optional[str]:
    try:
        return LocalCluster.load(directory or default_dir()).meta.address
    except NvpoolError:
        return None
