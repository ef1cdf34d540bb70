"""nvpool client: block-IO library, NBD export, CLI. ``client.connect(meta)`` is the entry point."""

from client.api import AsyncPool, ClientOptions, Pool, Volume, connect

__all__ = ["AsyncPool", "ClientOptions", "Pool", "Volume", "connect"]
