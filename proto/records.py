"""Plain records shared by the metadata service, agents and clients: where a drive's agent is, and an
extent as an agent holds it. No protobuf here; ``proto/convert.py`` converts at the gRPC edges."""

from __future__ import annotations

from dataclasses import dataclass


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
