"""Helpers shared by the ``nvpool`` subcommand modules: metadata connection, output, arguments."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Awaitable, Callable, TypeVar

from nvpool.client.metaclient import MetaClient, default_meta
from nvpool.proto.units import human, parse_size

T = TypeVar("T")

__all__ = ["add_common", "emit", "human", "parse_size_arg", "table", "with_meta"]


def parse_size_arg(text: str) -> int:
    return parse_size(text)


def with_meta(args: argparse.Namespace, fn: Callable[[MetaClient], Awaitable[T]]) -> T:
    async def run() -> T:
        meta = MetaClient(args.meta or default_meta())
        try:
            return await fn(meta)
        finally:
            await meta.close()

    return asyncio.run(run())


def emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(obj, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(text)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--meta", help="metadata service HOST:PORT (default $NVPOOL_META or 127.0.0.1:7400)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
