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


@dataclass(frozen=True, slots=True)
class ExtentRecord:
    """An extent as an agent holds it: its place, its volume and its generation fence."""

    extent_id: int
    drive_id: str
    drive_offset: int
    length: int
    volume_id: int
    min_generation: int


def extent_digest(extent_ids: Iterable[int]) -> bytes:
    """A short digest of a set of extent ids: an agent and the metadata service compare their views
    of what the agent holds on every heartbeat without sending the whole list."""
    h = hashlib.sha256()
    for eid in sorted(set(extent_ids)):
        h.update(struct.pack("<Q", eid))
    return h.digest()[:16]
