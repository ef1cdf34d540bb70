"""The one exception tree of nvpool, and the data-plane status codes that travel on the wire.

Families:

* ``UsageError`` (also a ``ValueError``): the caller asked for something invalid (negative offset,
  duplicate name, a volume larger than free space). Nothing was changed.
* ``NotFoundError`` (also a ``KeyError``-like ``LookupError``): a named thing does not exist.
* ``RemoteError``: a peer answered with a non-OK status; carries the wire ``status`` code.
  ``StaleLayoutError`` is the one a client handles by re-fetching its layout.
* ``ProtocolError``: bytes from a peer violate the protocol. The connection is unusable; the daemon
  that received them drops that connection and keeps serving others.
* ``DriveError``: a local drive failed an I/O; carries the drive and the OS error.
* ``UnavailableError``: a peer (agent, metadata service) cannot be reached.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """Completion status of a data-plane command (one byte on the wire)."""

    OK = 0
    INVALID = 1  # malformed or unsupported command
    NO_EXTENT = 2  # the agent holds no such extent (deleted volume, wrong agent)
    OUT_OF_RANGE = 3  # offset/length outside the extent
    STALE_LAYOUT = 4  # command generation older than the extent's fence
    IO_ERROR = 5  # the drive failed the I/O
    DIGEST = 6  # CRC32C data digest mismatch
    REGION = 7  # unknown memory region or bytes outside it
    BUSY = 8  # the agent is shutting down or overloaded; retry elsewhere/later
    DENIED = 9  # no valid capability covers the command (proto/capability.py)


class NvpoolError(Exception):
    """Root of every error nvpool raises on purpose."""

    #: set by the metadata client when the error came from a retry on another metadata service, after an
    #: attempt whose answer was lost (that attempt may have been applied)
    after_failover: bool = False


class UsageError(NvpoolError, ValueError):
    """The request is invalid; nothing was changed."""


class NotFoundError(NvpoolError, LookupError):
    """A named object (volume, agent, drive, extent) does not exist."""


class AlreadyExistsError(UsageError):
    """An object with this name already exists."""


class CapacityError(UsageError):
    """The pool has too little free space (or too few drives) for the request."""


class UnavailableError(NvpoolError, ConnectionError):
    """A peer could not be reached, or went away mid-request."""


class LeaseError(NvpoolError):
    """The volume is held by someone else (a writer, or any opener for delete), or this process's
    lease on it is gone (it expired, or another writer took over and fenced this one)."""


class AuthError(NvpoolError):
    """A credential is missing or not valid (join secret, capability, certificate)."""


class AgentTimeoutError(UnavailableError, TimeoutError):
    """An agent did not answer within an I/O's time budget. ``address`` names the agent."""

    def __init__(self, message: str, address: str = "") -> None:
        super().__init__(message)
        self.address = address


class ProtocolError(NvpoolError):
    """A peer sent bytes that violate the protocol; the connection must be dropped."""


class RemoteError(NvpoolError):
    """A peer completed a request with a non-OK status."""

    def __init__(self, status: Status, message: str = "", info: int = 0) -> None:
        self.status = Status(status)
        self.info = info
        super().__init__(f"{self.status.name}: {message}" if message else self.status.name)


class StaleLayoutError(RemoteError):
    """The agent fenced this layout generation; ``info`` holds the generation it requires."""

    def __init__(self, message: str = "", info: int = 0) -> None:
        super().__init__(Status.STALE_LAYOUT, message, info)


class DigestError(RemoteError):
    """A CRC32C digest did not match the data it covers."""

    def __init__(self, message: str = "") -> None:
        super().__init__(Status.DIGEST, message)


class DriveError(NvpoolError, OSError):
    """A drive failed an I/O. ``drive`` names it; ``errno`` is the OS error code."""

    def __init__(self, drive: str, errno: int, message: str) -> None:
        self.drive = drive
        OSError.__init__(self, errno, f"drive {drive}: {message}")


def remote_error(status: int, message: str = "", info: int = 0) -> RemoteError:
    """Build the most specific exception for a wire status."""
    if status == Status.STALE_LAYOUT:
        return StaleLayoutError(message, info)
    if status == Status.DIGEST:
        return DigestError(message)
    try:
        st = Status(status)
    except ValueError:
        return RemoteError(Status.INVALID, f"unknown status {status}: {message}", info)
    return RemoteError(st, message, info)
