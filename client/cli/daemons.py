"""``nvpool meta`` and ``nvpool agent``: the two daemons.

Both accept ``--config FILE`` (TOML, keys as in deploy/*.toml.sample); a flag given on the command
line overrides only that key. ``--ready-file`` writes a JSON object with the bound addresses once
the daemon serves (what ``nvpool cluster up`` and tests wait for). SIGTERM/SIGINT stop gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tomllib
from typing import Any, Awaitable, Callable, Optional

from nvpool.client.cli.common import listen_address, meta_address, seconds_arg, seconds_or_zero_arg, size_arg
from nvpool.proto.errors import UsageError

logger = logging.getLogger(__name__)


def _load_config(path: Optional[str]) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: {exc}") from None


def write_ready(path: Optional[str], info: dict[str, Any]) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def run_daemon(main: Callable[[], Awaitable[None]]) -> int:
    """Run ``main`` on uvloop until it returns or SIGTERM/SIGINT arrives."""
    import uvloop

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await main()
        except asyncio.CancelledError:
            logger.info("stopping")

    uvloop.run(runner())
    return 0


def cmd_meta(args: argparse.Namespace) -> int:
    from nvpool.pool.grpc_meta import MetaConfig, serve

    values = _load_config(args.config)
    if getattr(args, "meta_cmd", None) == "migrate":
        return cmd_meta_migrate(args)
    for key in ("listen", "store", "lease_ttl", "agent_timeout", "heartbeat_interval", "rebuild_after", "repair_rate",
                "scrub_interval", "scrub_rate", "join_secret_file", "tls_ca", "tls_cert", "tls_key", "metrics_listen", "prefix", "leader_ttl",
                "advertise"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    config = MetaConfig.from_mapping(values)

    extra: dict[str, Any] = {}

    def ready(address: str) -> None:
        write_ready(args.ready_file, {"address": address, "pid": os.getpid(), **extra})
        print(f"nvpool meta serving on {address} (store {config.store})", file=sys.stderr, flush=True)

    return run_daemon(lambda: serve(config, on_ready=ready, info=extra))


def cmd_meta_migrate(args: argparse.Namespace) -> int:
    """Copy a pool's metadata from one store to another (``nvpool meta migrate``)."""
    from nvpool.pool.kvstore import migrate

    n = migrate(args.source, args.dest, args.prefix or "")
    print(f"copied {n} metadata keys from {args.source} to {args.dest}{' (prefix ' + args.prefix + ')' if args.prefix else ''}")
    if args.source.startswith("sqlite:") and not args.dest.startswith("sqlite:"):
        print(f"next: copy {args.source[len('sqlite:'):]}.join-secret to every metadata server and start each with "
              f"--store {args.dest} --join-secret-file PATH")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from nvpool.agents.agent import AgentConfig, StorageAgent, serve

    values = _load_config(args.config)
    mapping = {
        "meta": args.meta, "listen": args.listen, "control_listen": args.control_listen,
        "unix_path": args.unix, "advertise": args.advertise, "name": args.name, "host": args.host,
        "rack": args.rack, "heartbeat_interval": args.heartbeat, "join_secret_file": args.join_secret_file,
        "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
        "data_tls": False if args.no_data_tls else None, "metrics_listen": args.metrics_listen,
        "max_connections": args.max_connections,
    }
    values.update({k: v for k, v in mapping.items() if v is not None})
    if args.drive:
        values["drives"] = list(values.get("drives", [])) + args.drive
    if args.label:
        values["labels"] = list(values.get("labels", [])) + args.label
    if args.discover_nvme:
        values["discover_nvme"] = True
    if "meta" not in values:
        values["meta"] = os.environ.get("NVPOOL_META", "127.0.0.1:7400")
    config = AgentConfig.from_mapping(values)

    def ready(agent: StorageAgent) -> None:
        info = {
            "agent_id": agent.agent_id, "address": agent.address, "control_address": agent.control_address,
            "unix_path": config.unix_path, "drives": sorted(agent.core.drives), "pid": os.getpid(),
            "metrics": agent.metrics_address,
        }
        write_ready(args.ready_file, info)
        print(
            f"nvpool agent {agent.agent_id} serving {len(agent.core.drives)} drive(s) on {agent.address}",
            file=sys.stderr, flush=True,
        )

    return run_daemon(lambda: serve(config, on_ready=ready))


def add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", dest="metrics_listen", type=listen_address, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: none)")


def add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", metavar="PEM", help="the pool CA certificate (nvpool certs init); with --tls-cert and "
                                                   "--tls-key: mutually authenticated TLS")
    p.add_argument("--tls-cert", metavar="PEM", help="this daemon's certificate (nvpool certs issue)")
    p.add_argument("--tls-key", metavar="PEM", help="this daemon's private key (mode 600)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "meta",
        help="run the metadata service",
        description=(
            "Run the metadata service: the registry of agents and drives, volume placement and the\n"
            "versioned layouts. It is not on the data path: clients read a layout once and then\n"
            "talk to agents directly."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", type=listen_address, help="HOST:PORT to serve gRPC on (default 127.0.0.1:7400; port 0 picks one)")
    p.add_argument("--store", help="where metadata lives: sqlite:PATH (default sqlite:./nvpool-meta.db), or "
                                   "etcd://HOST:PORT[,HOST:PORT...] for several metadata services with a leader")
    p.add_argument("--prefix", help="etcd: this pool's key prefix (default /nvpool)")
    p.add_argument("--leader-ttl", type=int, metavar="SECONDS",
                   help="etcd: seconds of the leader's lease; a dead leader is replaced after about this long (default 5)")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="etcd: the address other metadata services send callers to while this one leads")
    p.add_argument("--lease-ttl", type=seconds_arg,
                   help="seconds a volume lease lives without renewal (default 15; see deploy/meta.toml.sample)")
    p.add_argument("--agent-timeout", type=seconds_arg,
                   help="seconds without a heartbeat before an agent counts as down and its replicas are taken out "
                        "of service (default 3)")
    p.add_argument("--heartbeat-interval", type=seconds_arg, help="seconds between agent heartbeats (default 1)")
    p.add_argument("--rebuild-after", type=seconds_arg,
                   help="seconds a replica may stay out of service before it is rebuilt on another drive instead of "
                        "resynced in place (default 300)")
    p.add_argument("--repair-rate", type=size_arg(0, 1 << 50),
                   help="bytes/s for resync and rebuild copies, pool-wide, e.g. 200M (default 64M; 0: unlimited)")
    p.add_argument("--scrub-interval", type=seconds_or_zero_arg,
                   help="seconds between background scrubs of each replicated volume (default 604800, a week; "
                        "0: only `nvpool volume scrub`)")
    p.add_argument("--scrub-rate", type=size_arg(0, 1 << 50),
                   help="bytes/s a background scrub reads from each copy, e.g. 64M (default 16M; 0: unlimited)")
    p.add_argument("--join-secret-file", metavar="PATH",
                   help="the pool's join secret (created at the first start if missing; default: next to a SQLite "
                        "store, STORE.join-secret); copy it to every storage server")
    add_tls(p)
    add_metrics(p)
    p.add_argument("--config", help="TOML config file (see deploy/meta.toml.sample)")
    p.add_argument("--ready-file", help="write {address, pid} as JSON here once serving")
    p.set_defaults(func=cmd_meta)
    msub = p.add_subparsers(dest="meta_cmd", metavar="[migrate]")
    m = msub.add_parser("migrate", help="copy a pool's metadata to another store (e.g. SQLite to etcd)",
                        description="Copy every metadata key of a pool from one store to another, e.g. from the "
                                    "embedded SQLite store to etcd. Stop the metadata service first (a SQLite store "
                                    "in use is refused). The destination must hold no pool yet.")
    m.add_argument("--from", dest="source", required=True, metavar="STORE", help="sqlite:PATH or etcd://...")
    m.add_argument("--to", dest="dest", required=True, metavar="STORE", help="etcd://HOST:PORT[,...][/PREFIX] or sqlite:PATH")
    m.add_argument("--prefix", dest="prefix", help="etcd destination: the key prefix (default /nvpool)")
    m.set_defaults(func=cmd_meta)

    a = sub.add_parser(
        "agent",
        help="run a storage agent on an NVMe server",
        description=(
            "Run a storage agent: open its drives (labelling new ones), serve the data plane, and\n"
            "register with the metadata service. Drives: --drive /dev/nvme1n1 (a block device),\n"
            "--drive file:/data/d0.img:8G (a sparse file, created if missing), or --discover-nvme."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("--meta", type=meta_address, help="metadata service HOST:PORT (default $NVPOOL_META or 127.0.0.1:7400)")
    a.add_argument("--listen", type=listen_address, help="data-plane HOST:PORT (default 127.0.0.1:7500; port 0 picks one)")
    a.add_argument("--control-listen", type=listen_address, help="control gRPC HOST:PORT (default: data-plane host, any port)")
    a.add_argument("--unix", help="also serve the data plane on this Unix socket (same-host clients, shm transport)")
    a.add_argument("--advertise", help="HOST (or HOST:PORT) that clients and the metadata service dial, for both the "
                                       "data and control ports (default: the listen host; for 0.0.0.0, the address "
                                       "that reaches the metadata service)")
    a.add_argument("--drive", action="append", default=[], help="a drive (repeatable): PATH or file:PATH:SIZE")
    a.add_argument("--discover-nvme", action="store_true", help="also use every NVMe namespace in /sys/block")
    a.add_argument("--name", help="agent id (default: the hostname)")
    a.add_argument("--host", help="failure domain: server name (default: the agent id)")
    a.add_argument("--rack", help="failure domain: rack label (the same as --label rack=NAME)")
    a.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a failure-domain label (repeatable), e.g. rack=r1 or room=a; a replicated volume created "
                        "with --failure-domain KEY keeps its copies on agents with different values")
    a.add_argument("--heartbeat", type=seconds_arg, help="seconds between heartbeats (default 1)")
    a.add_argument("--join-secret-file", metavar="PATH",
                   help="the pool's join secret, copied from the metadata server (required; mode 600)")
    add_tls(a)
    add_metrics(a)
    a.add_argument("--max-connections", type=int, metavar="N",
                   help="data-plane connections kept open at once; more are closed as they arrive (default 4096)")
    a.add_argument("--no-data-tls", action="store_true",
                   help="with TLS: leave the TCP data plane unencrypted (served by connection threads; capabilities are still "
                        "checked); control calls stay TLS")
    a.add_argument("--config", help="TOML config file (see deploy/agent.toml.sample)")
    a.add_argument("--ready-file", help="write {address, control_address, drives, pid} as JSON once serving")
    a.set_defaults(func=cmd_agent)
