"""`nvpool dataset pack` / `nvpool dataset show`: a tree of files as one self-describing volume."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nvpool.client.cli.common import add_common, emit, size_arg, volume_name
from nvpool.proto.units import human


def cmd_pack(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nvpool.client.api import connect
    from nvpool.client.dataset import list_files, pack

    files = list_files(args.sources)
    total = sum(__import__("os").path.getsize(p) for p, _ in files)
    quiet = args.json or not sys.stderr.isatty()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"packing {len(files)} files", disable=quiet)
    with connect(args.meta) as pool:
        pool.meta.timeout = args.timeout
        try:
            summary = pack(pool, args.sources, args.volume, shard_size=args.shard_size,
                           label_from_dir=args.label_from_dir, replicas=args.replicas, progress=bar.update)
        finally:
            bar.close()
    emit(args, summary, f"packed {summary['files']} files ({human(summary['bytes'])}) into {args.volume}: "
                        f"{summary['shards']} shards" + (f", {summary['classes']} classes" if summary["classes"] else "")
                        + f", {summary['bytes'] / max(summary['seconds'], 1e-9) / 1e6:.0f} MB/s")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from nvpool.client.api import connect
    from nvpool.client.dataset import read_index

    with connect(args.meta) as pool, pool.open(args.volume, read_only=True) as vol:
        pool.meta.timeout = args.timeout
        ix = read_index(vol)
    d = {"volume": args.volume, "samples": len(ix.names), "bytes": int(ix.lengths.sum()), "shards": len(ix.shards),
         "classes": ix.classes, "first": ix.names[:3]}
    emit(args, d, f"{args.volume}: {d['samples']} samples, {human(d['bytes'])}, {d['shards']} shards"
                  + (f", {len(ix.classes)} classes" if ix.classes else ""))
    return 0


def register(sub: Any) -> None:
    d = sub.add_parser("dataset", help="pack files into a volume for training; show one",
                       description="A dataset volume holds files as records with an index in the volume itself; "
                                   "read it with nvpool.data.VolumeDataset (PyTorch DataLoader ready).")
    ds = d.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    p = ds.add_parser("pack", help="write files (directories are walked) into a new volume")
    p.add_argument("sources", nargs="+", help="files or directories")
    p.add_argument("volume", type=volume_name, help="the new volume")
    p.add_argument("--shard-size", type=size_arg(4096, None, "shard size"), default=64 * 1024 * 1024,
                   help="bytes per shard, the unit an iterable reader takes (default 64M)")
    p.add_argument("--label-from-dir", action="store_true",
                   help="label each file by its directory (ImageFolder style: class per directory)")
    p.add_argument("--replicas", type=int, default=1, choices=[1, 2, 3], help="copies of the volume (default 1)")
    add_common(p)
    p.set_defaults(func=cmd_pack)
    s = ds.add_parser("show", help="samples, bytes, shards and classes of a dataset volume")
    s.add_argument("volume", type=volume_name)
    add_common(s)
    s.set_defaults(func=cmd_show)
