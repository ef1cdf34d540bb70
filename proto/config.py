"""Daemon configuration: one frozen dataclass per daemon, built from a mapping that may not hold
unknown keys (a typo in a config file is an error, not a silently ignored option)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from nvpool.proto.errors import UsageError


def check_keys(cls: type, values: Mapping[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UsageError(f"unknown {what} option(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    check_types(cls, values, what)


def _type_error(value: Any, hint: Any) -> str:
    """Why ``value`` is not of the option type ``hint`` ("" when it is, or when the type is not a simple one)."""
    if hint is bool:
        return "" if isinstance(value, bool) else "true or false"
    if hint is int:
        return "" if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return "" if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return "" if isinstance(value, str) else "a string"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return "a list"
        if args and args[0] is str and not all(isinstance(v, str) for v in value):
            return "a list of strings"
    return ""


def check_types(cls: type, values: Mapping[str, Any], what: str) -> None:
    """Refuse values of the wrong type at start (``lease_ttl = "abc"`` in a config file), naming the
    option, rather than failing at first use."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        want = _type_error(value, hints.get(key))
        if want:
            raise UsageError(f"{what} option {key} must be {want}, not {value!r}")
