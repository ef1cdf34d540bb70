"""``nvpool``: the one command-line tool (metadata service, agents, volumes, pool, export, mount, bench,
cluster). Each family of subcommands lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from nvpool import __version__
from nvpool.proto.errors import NvpoolError

#: modules that add subcommands (each has register(subparsers) -> None)
COMMAND_MODULES = (
    "nvpool.client.cli_daemons",  # meta, agent
    "nvpool.client.cli_volume",  # volume, pool
    "nvpool.client.cli_cluster",  # cluster up/down/status
    "nvpool.client.cli_bench",  # bench
    "nvpool.client.cli_export",  # export, mount, unmount
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nvpool",
        description=(
            "nvpool: many NVMe servers as one shared, striped storage pool.\n"
            "Run a metadata service (`nvpool meta`), a storage agent on each server (`nvpool agent`),\n"
            "then create volumes and read them from GPU hosts (Python API, `nvpool export`, `nvpool mount`)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment: NVPOOL_META is the default metadata service address (host:port).",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("--version", action="version", version=f"nvpool {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `nvpool ... | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except NvpoolError as exc:
        print(f"nvpool: error: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
