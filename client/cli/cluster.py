"""``nvpool cluster up|down|status|demo``: a real local pool on loopback, for trying nvpool out."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

from nvpool.client.cli.common import (
    add_timeout,
    check_meta_address,
    int_arg,
    listen_address,
    meta_address,
    seconds_arg,
    size_arg,
    volume_name,
)
from nvpool.proto.units import MiB, human
from nvpool.client.cluster import LocalCluster, default_dir, pid_alive

#: the smallest drive an agent accepts (agents/drive.py MIN_DRIVE_SIZE: a 2 MiB label area + 8 MiB)
MIN_DRIVE_SIZE = 10 * MiB
#: the most agents, and drives per agent, `cluster up` starts on one machine
MAX_LOCAL_AGENTS, MAX_LOCAL_DRIVES = 256, 64


def cmd_up(args: argparse.Namespace) -> int:
    asked = args.agents
    args.agents = asked or 4
    c = LocalCluster(args.dir, args.agents, args.drives_per_agent, str(args.drive_size), meta_listen=args.meta_listen,
                     metas=args.metas)
    if c.state_file.exists():
        running = LocalCluster.load(c.dir)
        if any(pid_alive(m.pid) for m in running.metas) or any(pid_alive(a.pid) for a in running.agents):
            # a running pool: start what of it is down, and add agents up to --agents (never removes one)
            started = running.resume(max(asked or 0, len(running.agents)), timeout=args.timeout)
            if args.json:
                json.dump({**running.status(), "started": started}, sys.stdout, indent=2)
                print()
            else:
                print(f"the pool in {running.dir} runs: " + (f"started {', '.join(started)}" if started
                                                              else "everything was up already"))
            return 0
    if not args.json:
        what = (f"{args.metas} metadata services on a 3-member etcd cluster" if args.metas > 1
                else "a metadata service")
        print(f"starting {what} and {args.agents} agents x {args.drives_per_agent} drives "
              f"of {human(args.drive_size)} in {c.dir} ...", file=sys.stderr)
    c.up(timeout=args.timeout)
    st = c.status()
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        print()
    else:
        print(f"pool up: metadata service{'s' if len(c.metas) > 1 else ''} at {c.meta_addresses}"
              + (f" (store {c.store})" if c.store else ""))
        for a in st["agents"]:
            print(f"  {a['name']}  {a['address']}  pid {a['pid']}")
        tls = f"\nexport NVPOOL_TLS={c.tls_dir}" if c.tls_dir else ""
        print(f"\nexport NVPOOL_META={c.meta_addresses}{tls}\nstop it with: nvpool cluster down --dir {c.dir}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    c = LocalCluster.load(args.dir)
    c.down()
    print(f"stopped the local pool in {c.dir}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = LocalCluster.load(args.dir).status()
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        print()
    else:
        for i, m in enumerate(st["metas"]):
            print(f"{'meta' if i == 0 else f'meta{i}':<6} {m['address']}  {'up' if m['alive'] else 'DOWN'}")
        for i, e in enumerate(st["etcd"]):
            print(f"etcd{i:<2} {e['address']}  {'up' if e['alive'] else 'DOWN'}")
        for a in st["agents"]:
            print(f"{a['name']:<6} {a['address']}  {'up' if a['alive'] else 'DOWN'}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    """Shell lines that point the CLI at the local pool: eval "$(nvpool cluster env)"."""
    c = LocalCluster.load(args.dir)
    print(f"export NVPOOL_META={c.meta_addresses}")
    if c.tls_dir:
        print(f"export NVPOOL_TLS={c.tls_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Create a volume, write random data across many stripes, read it back, compare, report MB/s."""
    import numpy as np
    from tqdm import tqdm

    from nvpool.client.api import connect
    from nvpool.client.cluster import read_meta_address

    meta = args.meta or os.environ.get("NVPOOL_META") or read_meta_address(args.dir)
    if not meta:
        print("nvpool: error: no pool found: start one with `nvpool cluster up` or pass --meta", file=sys.stderr)
        return 1
    check_meta_address(meta, "metadata service address")
    chunk = 8 * 1024 * 1024
    total = max(chunk, args.size // chunk * chunk)
    if total != args.size and not args.json:
        print(f"using {human(total)}: --size {human(args.size)} rounded to a whole number of {human(chunk)} chunks",
              file=sys.stderr)
    options = None
    if os.path.exists(os.path.join(args.dir, "cluster.json")):
        local = LocalCluster.load(args.dir)
        if meta in (local.meta.address, local.meta_addresses):  # the local pool: its own certificates
            from nvpool.client.api import ClientOptions

            options = ClientOptions(tls=local.client_tls())
    pool = connect(meta, options)
    pool.meta.timeout = args.timeout
    result: dict[str, Any] = {}
    try:
        names = {v.name for v in pool.list_volumes()}
        if args.volume in names:
            pool.delete_volume(args.volume)
        info = pool.create_volume(args.volume, total)
        vol = pool.open(args.volume)
        rng = np.random.default_rng(args.seed)
        data = rng.integers(0, 256, size=chunk * 4, dtype=np.uint8)  # reused with an offset per chunk
        h_w, h_r = hashlib.sha256(), hashlib.sha256()
        quiet = args.json or not sys.stderr.isatty()
        t0 = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, desc="write", disable=quiet) as bar:
            for off in range(0, total, chunk):
                k = (off // chunk) % (3 * chunk // 4096)
                piece = data[k * 4096 // 4 : k * 4096 // 4 + chunk]
                vol.write(off, piece)
                h_w.update(piece.data)
                bar.update(chunk)
        vol.flush()
        t_write = time.perf_counter() - t0
        buf = np.empty(chunk, dtype=np.uint8)
        t0 = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, desc="read", disable=quiet) as bar:
            for off in range(0, total, chunk):
                vol.readinto(buf, off)
                h_r.update(buf.data)
                bar.update(chunk)
        t_read = time.perf_counter() - t0
        ok = h_w.digest() == h_r.digest()
        result = {
            "volume": info.name, "bytes": total, "requested_bytes": args.size, "columns": info.stripe_width, "servers": len(set(info.hosts)),
            "sha256_written": h_w.hexdigest(), "sha256_read": h_r.hexdigest(), "match": ok,
            "write_MBps": round(total / t_write / 1e6, 1), "read_MBps": round(total / t_read / 1e6, 1),
        }
        if args.json:
            json.dump(result, sys.stdout, indent=2)
            print()
        else:
            print(f"volume {info.name}: {human(total)} striped over {info.stripe_width} drives on "
                  f"{len(set(info.hosts))} servers (stripe unit {human(info.stripe_unit)})")
            print(f"wrote {human(total)} of random data at {result['write_MBps']} MB/s")
            print(f"read it back at {result['read_MBps']} MB/s")
            print(f"sha256 written {h_w.hexdigest()[:16]}...  read {h_r.hexdigest()[:16]}...  "
                  f"{'MATCH' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    finally:
        pool.close()


def register(sub: Any) -> None:
    p = sub.add_parser("cluster", help="run a real local pool on loopback (metadata service + agents)",
                       description="Start, stop and try out a complete pool on this machine: real processes "
                                   "on 127.0.0.1 with file-backed drives.")
    cs = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dir", default=default_dir(), help="state, logs and drive files (default $NVPOOL_HOME, or ./.nvpool/local as the quick start uses)")
        q.add_argument("--json", action="store_true", help="machine-readable output")

    up = cs.add_parser("up", help="start a metadata service and N agents; wait until registered (on a running pool: "
                                  "start what is down, and add agents up to --agents)")
    up.add_argument("--agents", type=int_arg(1, MAX_LOCAL_AGENTS, "number of agents"),
                    help="number of agents (servers), default 4; on a running pool, more than it has adds servers")
    up.add_argument("--drives-per-agent", type=int_arg(1, MAX_LOCAL_DRIVES, "drives per agent"), default=2,
                    help="file-backed drives per agent, default 2")
    up.add_argument("--drive-size", default="4G", type=size_arg(MIN_DRIVE_SIZE, None, "drive size"),
                    help=f"size of each sparse drive file, at least {human(MIN_DRIVE_SIZE)}; default 4G")
    up.add_argument("--meta-listen", default="127.0.0.1:0", type=listen_address,
                    help="metadata service address (default: a free port)")
    up.add_argument("--metas", type=int_arg(1, 5, "number of metadata services"), default=1,
                    help="metadata services: 1 (SQLite, the default) or 2-5 sharing a local 3-member etcd cluster "
                         "(needs etcd-server); kill the leader to watch another take over")
    up.add_argument("--timeout", type=seconds_arg, default=60, help="seconds to wait for start-up")
    common(up)
    up.set_defaults(func=cmd_up)

    down = cs.add_parser("down", help="stop the local pool (its data stays in --dir)")
    common(down)
    down.set_defaults(func=cmd_down)

    st = cs.add_parser("status", help="processes of the local pool")
    common(st)
    st.set_defaults(func=cmd_status)

    env = cs.add_parser("env", help='print "export NVPOOL_META=..." for the local pool (use with eval)')
    env.add_argument("--dir", default=default_dir(), help="state of the local pool (default $NVPOOL_HOME, or ./.nvpool/local as the quick start uses)")
    env.set_defaults(func=cmd_env)

    demo = cs.add_parser("demo", help="end-to-end check: write random data, read it back, compare, MB/s")
    demo.add_argument("--meta", type=meta_address,
                      help="metadata service (default: $NVPOOL_META or the local pool in --dir)")
    add_timeout(demo)
    demo.add_argument("--volume", default="demo", type=volume_name, help="volume name (re-created), default demo")
    demo.add_argument("--size", default="1G", type=size_arg(1, None, "size"),
                      help="bytes to write and read back (a multiple of 8 MiB, rounded down), default 1G")
    demo.add_argument("--seed", type=int_arg(0, 2**63 - 1, "seed"), default=1)
    common(demo)
    demo.set_defaults(func=cmd_demo)
