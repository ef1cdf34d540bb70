"""``nvpool export``, ``nvpool mount``, ``nvpool unmount``: volumes through the standard NBD protocol."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from typing import Any

from nvpool.client.cli.common import add_timeout, int_arg, listen_address, meta_address, resolve_meta, volume_name
from nvpool.client.cli.daemons import run_daemon, write_ready
from nvpool.client.metaclient import holder_name
from nvpool.proto.units import human

#: the most worker processes `nvpool export --workers` forks
MAX_WORKERS = 256


def cmd_export(args: argparse.Namespace) -> int:
    from nvpool.client.nbd.server import FileBlockDevice, NBDServer

    if args.file and args.volume:
        print("nvpool: error: give a VOLUME or --file, not both", file=sys.stderr)
        return 2
    if not args.file and not args.volume:
        print("nvpool: error: which volume? (nvpool export VOLUME, or --file PATH)", file=sys.stderr)
        return 2
    meta = None if args.file else resolve_meta(args)  # an invalid address is a usage error, before any fork

    workers = max(1, args.workers)
    listener = None
    if args.metrics_listen and workers > 1:
        print("nvpool: error: --metrics serves one process's counters: use it with --workers 1", file=sys.stderr)
        return 2
    if args.metrics_listen:  # the client library's counters of this export (client/metrics.py)
        from nvpool.client.metrics import collector
        from nvpool.proto.metrics import start_metrics

        start_metrics(args.metrics_listen, collector())
    if workers > 1:
        if args.file:
            print("nvpool: error: --workers serves pool volumes only", file=sys.stderr)
            return 2
        if not args.read_only and asyncio.run(_replicas(meta, args)) > 1:
            # the writes to a replicated volume are ordered by one process (pool/replication.py)
            print(f"nvpool: error: {args.volume} is replicated: export it for writing with --workers 1 "
                  "(or --read-only with several workers)", file=sys.stderr)
            return 2
        listener = _listen(args)
    shared_lease = None
    if listener is not None and not args.file:
        # the workers share one lease, taken before they fork (each renews it)
        shared_lease = asyncio.run(_take_lease(meta, args))
    children = _fork_workers(workers - 1) if listener is not None else []
    is_parent = listener is None or children is not None

    async def main() -> None:
        pool = None
        if args.file:
            device: Any = FileBlockDevice(args.file, args.read_only)
            name = args.name or os.path.basename(args.file)
        else:
            from nvpool.client.api import AsyncPool
            from nvpool.client.metaclient import MetaClient
            from nvpool.client.volume import ClientOptions

            assert meta is not None
            pool = AsyncPool(MetaClient(meta, timeout=args.timeout), ClientOptions())
            device = await pool.open(args.volume, read_only=args.read_only, force=args.force,
                                     holder=holder_name("nvpool export"), lease=shared_lease)
            name = args.name or args.volume
        server = NBDServer(device, name, args.read_only, description=f"nvpool volume {name}")
        try:
            if listener is not None:
                await server.listen_socket(listener)
                if listener.family == socket.AF_UNIX:
                    uri = f"nbd+unix:///{name}?socket={args.socket}"
                else:
                    h, p = listener.getsockname()[:2]
                    uri = f"nbd://{h}:{p}/{name}"
            elif args.socket:
                where = await server.listen_unix(args.socket)
                uri = f"nbd+unix:///{name}?socket={where}"
            else:
                host, _, port = (args.listen or "127.0.0.1:10809").rpartition(":")
                where = await server.listen_tcp(host or "127.0.0.1", int(port))
                uri = f"nbd://{where}/{name}"
            info = {"export": name, "size": device.size, "read_only": server.read_only, "uri": uri, "pid": os.getpid(),
                    "workers": workers}
            if not is_parent:
                await asyncio.Event().wait()  # workers just serve
            write_ready(args.ready_file, info)
            if args.json:
                print(json.dumps(info), flush=True)
            else:
                print(f"exporting {name} ({human(device.size)}{', read-only' if server.read_only else ''}) at {uri}",
                      file=sys.stderr, flush=True)
            await asyncio.Event().wait()
        finally:
            await server.close()
            if pool is not None:
                await pool.close()

    try:
        return run_daemon(main)
    finally:
        for pid in children or []:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except OSError:
                pass


def _listen(args: argparse.Namespace) -> socket.socket:
    """The listening socket all worker processes accept from (the kernel spreads connections)."""
    if args.socket:
        if os.path.exists(args.socket):
            os.unlink(args.socket)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(args.socket)
    else:
        host, _, port = (args.listen or "127.0.0.1:10809").rpartition(":")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host or "127.0.0.1", int(port)))
    s.listen(128)
    s.setblocking(False)
    return s


async def _replicas(meta: Any, args: argparse.Namespace) -> int:
    from nvpool.client.metaclient import MetaClient

    m = MetaClient(meta, timeout=args.timeout)
    try:
        return int((await m.get_volume(args.volume)).replicas)
    finally:
        await m.close()


async def _take_lease(meta: Any, args: argparse.Namespace) -> tuple[str, float]:
    from nvpool.client.metaclient import MetaClient

    m = MetaClient(meta, timeout=args.timeout)
    try:
        return await m.open_volume(args.volume, write=not args.read_only, force=args.force,
                                   holder=holder_name("nvpool export"))
    finally:
        await m.close()


def _fork_workers(n: int) -> "list[int] | None":
    """Fork ``n`` workers before any event loop or connection exists; None in a worker."""
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: never outlive the parent
            return None
        pids.append(pid)
    return pids


def cmd_mount(args: argparse.Namespace) -> int:
    from nvpool.client.nbd.mounting import mount

    st = mount(args.volume, args.mountpoint, args.meta, args.mkfs, args.read_only, args.socket, args.force)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(f"mounted {args.volume} on {st['mountpoint']} (device {st['device']})")
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    from nvpool.client.nbd.mounting import unmount

    unmount(args.mountpoint)
    print(f"unmounted {args.mountpoint}")
    return 0


def register(sub: Any) -> None:
    e = sub.add_parser(
        "export", help="serve a volume over NBD (nbd-client, nbdfuse, qemu, fio)",
        description=(
            "Serve a volume over the standard Network Block Device protocol until stopped.\n"
            "Clients: nbd-client (kernel), libnbd's nbdinfo/nbdcopy/nbdfuse, qemu-img, fio --ioengine=nbd.\n"
            "Several connections may share the export (multi-conn); FLUSH covers all of them."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("volume", nargs="?", type=volume_name, help="volume to export")
    where = e.add_mutually_exclusive_group()
    where.add_argument("--socket", help="serve on this Unix socket")
    where.add_argument("--listen", type=listen_address, help="serve on HOST:PORT (default 127.0.0.1:10809)")
    e.add_argument("--read-only", action="store_true", help="refuse writes (a shared reader lease)")
    e.add_argument("--force", action="store_true",
                   help="take the volume over from its current writer (that writer is fenced: its writes fail)")
    e.add_argument("--metrics", dest="metrics_listen", type=listen_address, metavar="HOST:PORT",
                   help="serve this export's client metrics (Prometheus) at http://HOST:PORT/metrics")
    e.add_argument("--workers", type=int_arg(1, MAX_WORKERS, "number of workers"), default=1,
                   help="processes serving the export (they share the socket; multi-connection clients use more cores)")
    e.add_argument("--name", help="export name (default: the volume name)")
    e.add_argument("--file", help="export a plain file instead of a volume (testing, benchmarks)")
    e.add_argument("--meta", type=meta_address, help="metadata service HOST:PORT (default $NVPOOL_META)")
    add_timeout(e)
    e.add_argument("--ready-file", help="write {export, size, uri, pid} as JSON once serving")
    e.add_argument("--json", action="store_true", help="print the ready info as JSON on stdout")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser(
        "mount", help="mount a volume as a file system",
        description=(
            "Mount a volume: starts an export, attaches it as a block device (kernel NBD where\n"
            "/dev/nbd* exists, else nbdfuse + a loop device), optionally makes a file system, mounts it.\n"
            "Every step is recorded; `nvpool unmount` undoes them in reverse (a failure half-way too)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("volume", type=volume_name)
    m.add_argument("mountpoint")
    m.add_argument("--mkfs", choices=["ext4", "xfs"], help="make this file system first (erases the volume)")
    m.add_argument("--read-only", action="store_true", help="mount read-only (any number of read-only mounts)")
    m.add_argument("--force", action="store_true", help="take the volume over from its current writer (fences it)")
    m.add_argument("--socket", help="use an export already serving on this Unix socket")
    m.add_argument("--meta", type=meta_address, help="metadata service HOST:PORT (default $NVPOOL_META)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("unmount", help="unmount and undo everything `nvpool mount` did")
    u.add_argument("mountpoint")
    u.set_defaults(func=cmd_unmount)
