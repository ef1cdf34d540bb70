"""nvpool: an elastic NVMe-over-fabric storage pool.

One installed package with four layers, each a folder of the source tree:

* ``nvpool.proto``  - the shared wire package at the bottom: the data-plane codec and initiator, layout
  types, records, errors, sizes, the .proto and its generated code (used only at gRPC edges);
* ``nvpool.pool``   - the metadata service (registry, placement, versioned layouts, migrations);
* ``nvpool.agents`` - the storage agent (drives, extent tables, data plane);
* ``nvpool.client`` - the client library, the NBD export and the ``nvpool`` command.

``nvpool.connect(meta)`` is the library's entry point (see ``nvpool.client``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

# gRPC core prints INFO lines of its own to stderr (a failed TLS handshake, a notice in every forked
# DataLoader worker) that break the CLI's one-line errors and clutter training logs; its errors still
# show. Only a default: set GRPC_VERBOSITY to see more. (Effective when gRPC is not loaded yet.)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = "0.2.0"

__all__ = ["__version__", "connect"]

if TYPE_CHECKING:
    from nvpool.client.api import ClientOptions, Pool


def connect(meta_address: Optional[str] = None, options: "Optional[ClientOptions]" = None) -> "Pool":
    """Open a pool (``nvpool.client.connect``); imported lazily so ``import nvpool`` stays cheap."""
    from nvpool.client.api import connect as _connect

    return _connect(meta_address, options)
