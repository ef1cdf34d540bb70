"""``nvpool export``, ``nvpool mount``, ``nvpool unmount``: volumes through the standard NBD protocol."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from client.cli_daemons import run_daemon, write_ready
from client.cli_volume import human


def cmd_export(args: argparse.Namespace) -> int:
    from client.nbdserver import FileBlockDevice, NBDServer

    if args.file and args.volume:
        print("nvpool: error: give a VOLUME or --file, not both", file=sys.stderr)
        return 2
    if not args.file and not args.volume:
        print("nvpool: error: which volume? (nvpool export VOLUME, or --file PATH)", file=sys.stderr)
        return 2

    async def main() -> None:
        pool = None
        if args.file:
            device: Any = FileBlockDevice(args.file, args.read_only)
            name = args.name or os.path.basename(args.file)
        else:
            from client.api import AsyncPool

            pool = await AsyncPool.connect(args.meta)
            device = await pool.open(args.volume, read_only=args.read_only)
            name = args.name or args.volume
        server = NBDServer(device, name, args.read_only, description=f"nvpool volume {name}")
        try:
            if args.socket:
                where = await server.listen_unix(args.socket)
                uri = f"nbd+unix:///{name}?socket={where}"
            else:
                host, _, port = (args.listen or "127.0.0.1:10809").rpartition(":")
                where = await server.listen_tcp(host or "127.0.0.1", int(port))
                uri = f"nbd://{where}/{name}"
            info = {"export": name, "size": device.size, "read_only": server.read_only, "uri": uri, "pid": os.getpid()}
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

    return run_daemon(main)


def cmd_mount(args: argparse.Namespace) -> int:
    from client.mounting import mount

    st = mount(args.volume, args.mountpoint, args.meta, args.mkfs, args.read_only, args.socket)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(f"mounted {args.volume} on {st['mountpoint']} (device {st['device']})")
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    from client.mounting import unmount

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
    e.add_argument("volume", nargs="?", help="volume to export")
    where = e.add_mutually_exclusive_group()
    where.add_argument("--socket", help="serve on this Unix socket")
    where.add_argument("--listen", help="serve on HOST:PORT (default 127.0.0.1:10809)")
    e.add_argument("--read-only", action="store_true", help="refuse writes")
    e.add_argument("--name", help="export name (default: the volume name)")
    e.add_argument("--file", help="export a plain file instead of a volume (testing, benchmarks)")
    e.add_argument("--meta", help="metadata service (default $NVPOOL_META)")
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
    m.add_argument("volume")
    m.add_argument("mountpoint")
    m.add_argument("--mkfs", choices=["ext4", "xfs"], help="make this file system first (erases the volume)")
    m.add_argument("--read-only", action="store_true")
    m.add_argument("--socket", help="use an export already serving on this Unix socket")
    m.add_argument("--meta", help="metadata service (default $NVPOOL_META)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("unmount", help="unmount and undo everything `nvpool mount` did")
    u.add_argument("mountpoint")
    u.set_defaults(func=cmd_unmount)
