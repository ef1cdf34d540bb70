"""nvpool client: block-IO library, NBD export, CLI. ``nvpool.client.connect(meta)`` is the entry point.

The library's names are imported on first use (PEP 562), so that a sub-package (the sans-IO NBD codec
``nbd.proto``, the CLI's argument types) loads only what it needs (``tests/test_layering.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nvpool.client.api import AsyncPool, ClientOptions, Pool, Volume, connect

__all__ = ["AsyncPool", "ClientOptions", "Pool", "Volume", "connect"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from nvpool.client import api

        return getattr(api, name)
    raise AttributeError(f"module 'nvpool.client' has no attribute {name!r}")
