"""Helpers shared by the ``nvpool`` subcommand modules: metadata connection, output, arguments.

Argument checking: every option is converted by a ``type=`` function below that raises
``argparse.ArgumentTypeError`` with a one-line reason; ``Parser.error`` prints that one line
(``nvpool: error: ...``) and exits with status 2, argparse's convention for usage errors. A check that
needs several arguments at once raises ``BadArgument`` from the command, which ``nvpool.client.cli.main.main``
also turns into status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
from typing import Any, Awaitable, Callable, NoReturn, Optional, TypeVar

from nvpool.client.metaclient import MetaClient, default_meta
from nvpool.proto.errors import UsageError
from nvpool.proto.units import KiB, MiB, human, parse_size

T = TypeVar("T")

__all__ = [
    "BadArgument", "DEFAULT_META_TIMEOUT", "NAME_RE", "SIZE_ALIGN", "Parser", "add_common", "add_timeout",
    "check_meta_address", "emit", "human", "int_arg", "listen_address", "meta_address", "meta_client", "one_line", "parse_size_arg",
    "resolve_meta", "seconds_arg", "server_name", "shorten", "size_arg", "stripe_unit_arg", "table", "volume_name",
    "with_meta",
]

#: seconds a CLI command waits for each answer of the metadata service unless --timeout says otherwise
DEFAULT_META_TIMEOUT = 10.0

#: volume names: the metadata service's rule (pool/meta.py NAME_RE), checked here before any call
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
#: stripe units the metadata service accepts (pool/meta.py MIN_STRIPE_UNIT, MAX_STRIPE_UNIT)
MIN_STRIPE_UNIT, MAX_STRIPE_UNIT = 4 * KiB, 16 * MiB
#: the metadata service rounds a volume's size up to a multiple of this (pool/meta.py SIZE_ALIGN)
SIZE_ALIGN = 4 * KiB
#: counts travel as unsigned 32-bit values on the wire
MAX_UINT32 = (1 << 32) - 1


class BadArgument(UsageError):
    """An invalid command-line argument found by the CLI itself, before anything was asked or changed:
    ``nvpool`` exits with status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``nvpool: error: ...`` on stderr, exit status 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(2, f"nvpool: error: {one_line(message)}{hint}\n")


def one_line(text: str) -> str:
    """``text`` on one line (a message from elsewhere may span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def shorten(text: str, limit: int = 40) -> str:
    """``repr(text)``, cut short for messages (a 100,000-character argument must not flood the terminal)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


# ---------------------------------------------------------------------------- argument types
def size_arg(minimum: int = 0, maximum: Optional[int] = None, what: str = "size") -> Callable[[str], int]:
    """A ``type=`` for sizes ('8G', '512M', '4096'): a whole number of bytes within [minimum, maximum]."""

    def convert(text: str) -> int:
        try:
            n = parse_size(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("invalid size", f"invalid {what}", 1)) from None
        if n < minimum:
            if minimum == 1:
                raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: must be larger than 0")
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: must be at least {human(minimum)}")
        if maximum is not None and n > maximum:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: must be at most {human(maximum)}")
        return n

    convert.__name__ = what  # argparse names the type in some messages
    return convert


def stripe_unit_arg(text: str) -> int:
    """A stripe unit: a power of two from 4 KiB to 16 MiB (the metadata service's rule)."""
    n = size_arg(1, None, "stripe unit")(text)
    if n & (n - 1) or not MIN_STRIPE_UNIT <= n <= MAX_STRIPE_UNIT:
        raise argparse.ArgumentTypeError(
            f"invalid stripe unit {text!r}: must be a power of two from {human(MIN_STRIPE_UNIT)} to "
            f"{human(MAX_STRIPE_UNIT)} (e.g. 64K, 1M)"
        )
    return n


def int_arg(minimum: int, maximum: int, what: str) -> Callable[[str], int]:
    """A ``type=`` for a whole number within [minimum, maximum]."""

    def convert(text: str) -> int:
        try:
            n = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {shorten(text)}: not a whole number") from None
        if not minimum <= n <= maximum:
            raise argparse.ArgumentTypeError(f"invalid {what} {text.strip()}: must be from {minimum} to {maximum}")
        return n

    convert.__name__ = what
    return convert


def seconds_arg(text: str) -> float:
    """Seconds: a finite number larger than 0 (at most a year)."""
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {shorten(text)}: not a number of seconds") from None
    if not math.isfinite(s) or s <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text.strip()!r}: must be a finite number of seconds larger than 0")
    if s > 365 * 86400:
        raise argparse.ArgumentTypeError(f"invalid duration {text.strip()!r}: must be at most a year (31536000 seconds)")
    return s


def seconds_or_zero_arg(text: str) -> float:
    """Seconds as ``seconds_arg``, or 0 (off)."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return seconds_arg(text)


def volume_name(text: str) -> str:
    """A volume name the metadata service accepts: 1-64 letters, digits, '.', '_', '-', first a letter or digit."""
    if not NAME_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid volume name {shorten(text)}: use 1-64 characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return text


def server_name(text: str) -> str:
    """A server (agent host) name: 1-255 printable characters without spaces."""
    if not text or len(text) > 255 or not text.isprintable() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(
            f"invalid server name {shorten(text)}: use 1-255 printable characters without spaces"
        )
    return text


def check_meta_address(text: str, source: str = "metadata service address") -> str:
    """HOST:PORT (or [IPv6]:PORT); gRPC target forms (unix:PATH, dns:///HOST:PORT, ...) pass unchecked."""
    if "://" in text or text.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:", "dns:")):
        return text
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    ok = bool(sep) and bool(host) and port.isdigit() and 0 < int(port) < 65536
    ok = ok and len(text) <= 1024 and text.isprintable() and not any(c.isspace() for c in text)
    if not ok:
        raise BadArgument(f"invalid {source} {shorten(text)}: expected HOST:PORT, e.g. 127.0.0.1:7400")
    return text


def meta_address(text: str) -> str:
    """``type=`` for --meta: HOST:PORT, or several comma-separated (the metadata services of an etcd pool)."""
    try:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) > 1 and all(parts):
            return ",".join(check_meta_address(p) for p in parts)
        return check_meta_address(text)
    except BadArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def listen_address(text: str) -> str:
    """``type=`` for --meta-listen: HOST:PORT, port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if sep and port == "0" and host:
        return text
    try:
        return check_meta_address(text, "listen address")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("e.g. 127.0.0.1:7400", "e.g. 127.0.0.1:0")) from None


def parse_size_arg(text: str) -> int:
    """A size from a command argument; an invalid one is a ``BadArgument`` (exit status 2)."""
    try:
        return parse_size(text)
    except UsageError as exc:
        raise BadArgument(str(exc)) from None


# ---------------------------------------------------------------------------- metadata service
def resolve_meta(args: argparse.Namespace) -> str:
    """--meta, else $NVPOOL_META (checked like --meta), else the default address."""
    if getattr(args, "meta", None):
        return str(args.meta)
    address = default_meta()
    return check_meta_address(address, "metadata service address in $NVPOOL_META")


def meta_client(args: argparse.Namespace) -> MetaClient:
    return MetaClient(resolve_meta(args), timeout=getattr(args, "timeout", None) or DEFAULT_META_TIMEOUT)


def with_meta(args: argparse.Namespace, fn: Callable[[MetaClient], Awaitable[T]]) -> T:
    async def run() -> T:
        meta = meta_client(args)
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


def add_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout", type=seconds_arg, default=DEFAULT_META_TIMEOUT, metavar="SECONDS",
        help=f"give up on the metadata service after this many seconds without an answer, per call "
             f"(default {DEFAULT_META_TIMEOUT:g}; creating or growing a large volume may need more)",
    )


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--meta", type=meta_address,
                   help="metadata service HOST:PORT (default $NVPOOL_META or 127.0.0.1:7400)")
    add_timeout(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

