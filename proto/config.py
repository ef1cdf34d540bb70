"""Daemon configuration: one frozen dataclass per daemon, built from a mapping that may not hold
unknown keys (a typo in a config file is an error, not a silently ignored option)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from nvpool.proto.errors import UsageError


def check_keys(cls: type, values: Mapping[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UsageError(f"unknown {what} option(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
