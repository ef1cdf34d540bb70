"""nvpool client: block-IO library, NBD export, CLI. ``nvpool.client.connect(meta)`` is the entry point."""

from nvpool.client.api import AsyncPool, ClientOptions, Pool, Volume, connect

__all__ = ["AsyncPool", "ClientOptions", "Pool", "Volume", "connect"]
