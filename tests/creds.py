"""Capabilities for tests that talk to agents directly (hostile peers, region bounds): signed with
the test pool's own join secret, as the metadata service would sign them."""

from __future__ import annotations

import time
from pathlib import Path

from nvpool.proto import capability, keys
from nvpool.proto import dataplane as dp

AUTH_TAG = 0xFFFFFFF0


def capability_for(secret_file: Path, volume_id: int, write: bool = True, max_generation: int = 2**40,
                   ttl: float = 3600) -> bytes:
    cap = capability.Capability(volume_id, capability.WRITE if write else capability.READ, max_generation,
                                int(time.time() + ttl))
    return capability.sign(cap, keys.load(str(secret_file))[0])


def tls_args(name: str, role: str) -> list[str]:
    """``--tls-ca/--tls-cert/--tls-key`` for a daemon a test starts itself (the tests' CA, NVPOOL_TLS)."""
    import os

    from nvpool.proto import tls

    d = os.environ["NVPOOL_TLS"]
    tls.init_ca(d)
    files = tls.TlsFiles.from_dir(d, name)
    if not Path(files.cert).exists():
        tls.issue(d, name, role, ("127.0.0.1",))
    return ["--tls-ca", files.ca, "--tls-cert", files.cert, "--tls-key", files.key]


def auth_frame(cap: bytes, tag: int = AUTH_TAG) -> bytes:
    """The AUTH command that presents ``cap`` on a raw connection."""
    return dp.encode_command(dp.Opcode.AUTH, tag, 0, 0, len(cap), 0) + cap
