"""``nvpool``: the one command-line tool (metadata service, agents, volumes, pool, export, mount, bench,
cluster). Each family of subcommands lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from typing import Any, Optional, Sequence

from nvpool import __version__
from nvpool.client.cli.common import BadArgument, Parser, one_line
from nvpool.proto.errors import NvpoolError
from nvpool.proto.units import human

#: modules that add subcommands (each has register(subparsers) -> None)
COMMAND_MODULES = (
    "nvpool.client.cli.daemons",  # meta, agent
    "nvpool.client.cli.volume",  # volume, pool
    "nvpool.client.cli.cluster",  # cluster up/down/status
    "nvpool.client.cli.bench",  # bench
    "nvpool.client.cli.export",  # export, mount, unmount
    "nvpool.client.cli.certs",  # certs init/issue
    "nvpool.client.cli.ops",  # health, completion
    "nvpool.client.cli.dataset",  # dataset pack/show
)


EPILOG = """\
Exit status:
  0  success
  1  the operation failed (the pool refused it, an agent or the metadata service could not be
     reached or did not answer within --timeout, a check did not pass)
  2  usage error: an invalid command line (unknown option, bad size, name, number); nothing was done
  3  `nvpool pool status`: the pool is not healthy (a volume degraded or unavailable, or no drives)

Every error is one line on stderr: "nvpool: error: ...".

Environment: NVPOOL_META is the default metadata service address (host:port); NVPOOL_TLS the
directory with the pool's ca.pem, client.pem and client.key (TLS)."""


def humanize_sizes(message: str) -> str:
    """'... 1073741824 bytes ...' -> '... 1.0 GiB ...' (messages from the pool count in bytes)."""

    def repl(m: "re.Match[str]") -> str:
        n = int(m.group(1))
        return human(n) if n >= 1024 else m.group(0)

    return re.sub(r"\b(\d+) bytes\b", repl, message)


class _Version(argparse.Action):
    """``--version``: the version, then the data plane's implementation (looked up only when asked)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        from nvpool.proto import compiled

        print(f"nvpool {__version__}")
        print("data plane: " + ", ".join(f"{k.removeprefix('nvpool.')} {v}" for k, v in compiled.status().items()))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="nvpool",
        description=(
            "nvpool: many NVMe servers as one shared, striped storage pool.\n"
            "Run a metadata service (`nvpool meta`), a storage agent on each server (`nvpool agent`),\n"
            "then create volumes and read them from GPU hosts (Python API, `nvpool export`, `nvpool mount`)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and which data-plane "
                   "implementation this process uses (compiled C, or the pure-Python reference), then exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # daemons log at INFO by default: their INFO lines are the audit trail (create, delete, leases,
    # agents up and down, rebalance steps); commands log warnings only unless -v
    base = logging.INFO if getattr(args, "command", "") in ("meta", "agent") else logging.WARNING
    logging.basicConfig(
        level=max(logging.DEBUG, base - 10 * min(args.verbose, 2)),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `nvpool ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BadArgument as exc:  # an argument checked by the command itself: a usage error
        print(f"nvpool: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except NvpoolError as exc:
        print(f"nvpool: error: {humanize_sizes(one_line(str(exc)))}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
