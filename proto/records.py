"""Plain records shared by the metadata service, agents and clients: where a drive's agent is, and an
extent as an agent holds it. No protobuf here; ``proto/convert.py`` converts at the gRPC edges."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the agent holding a drive can be reached."""

    drive_id: str
    agent_id: str
    address: str
    unix_path: str = ""
    host: str = ""
    alive: bool = True
    #: the agent's TCP data plane is TLS (clients connect with the pool's certificates)
    tls: bool = False


@dataclass(frozen=True, slots=True)
class ExtentRecord:
    """An extent as an agent holds it: its place, its volume and its generation fence."""

    extent_id: int
    drive_id: str
    drive_offset: int
    length: int
    volume_id: int
    min_generation: int
    #: copies of the volume's data (>1: the agent serves it only while its metadata lease holds)
    replicas: int = 1


def extent_digest(records: Iterable[ExtentRecord]) -> bytes:
    """A short digest of what an agent holds (extent ids with their fences and replica counts): an
    agent and the metadata service compare their views on every heartbeat without sending the whole
    list, so a fence raised while the agent was unreachable reaches it at its next heartbeat."""
    h = hashlib.sha256()
    for eid, gen, rep in sorted({(r.extent_id, r.min_generation, r.replicas) for r in records}):
        h.update(struct.pack("<QQI", eid, gen, rep))
    return h.digest()[:16]
