"""Capabilities: what a client may do on a volume, signed by the metadata service, checked by agents.

The model is cephx's tickets: the metadata service, which knows who holds which lease, issues a
short-lived *capability* naming the volume, the access (read, or read and write), the highest layout
generation it covers and an expiry, signed with HMAC-SHA256 under a key only the pool's daemons know.
A client presents it on every connection to an agent (the data plane's ``AUTH`` command) before it
touches that volume's extents; the agent checks it locally, with no call to the metadata service on
the I/O path, and refuses any command on an extent of a volume the connection holds no valid
capability for, a write under a read capability, or a generation above the capability's.

Why the generation has an upper bound: an agent's fence says only "at least"; without a ceiling a
peer could send generation 2^64-1 and pass every fence. The ceiling is the volume's generation when
the capability was issued, so a client that learns of a newer layout also gets a newer capability,
and a writer whose lease was taken over (the volume fenced one generation higher) holds a capability
that covers nothing any agent still accepts.

Keys. Every key is derived (HKDF-style HMAC) from the pool's *join secret*, which the operator gives
to the metadata service and to every agent (a file, 0600) and which never travels on the network:
``key(secret, "capability")`` signs capabilities, ``key(secret, "control")`` authenticates the metadata
service's calls to agents, ``key(secret, "join")`` an agent's registration. A key id in every token
allows rotation (agents accept the current and the previous secret).

Sans-IO: encoding, signing and checking only; the clock is a parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from nvpool.proto.errors import UsageError

READ, WRITE = 1, 2
ACCESS_NAMES = {READ: "read", WRITE: "write"}
MAGIC = b"NVC1"
#: magic, key id, volume id, access, max generation, expires (unix seconds), holder (16 bytes)
BODY = struct.Struct("<4sIQBQQ16s")
MAC_LEN = 16
SIZE = BODY.size + MAC_LEN


def derive(secret: bytes, purpose: str) -> bytes:
    """A purpose-bound key from the pool's join secret."""
    if len(secret) < 16:
        raise UsageError("the pool's join secret must be at least 16 bytes")
    return hmac.new(secret, b"nvpool key: " + purpose.encode(), hashlib.sha256).digest()


def key_id(secret: bytes) -> int:
    """A short public identifier of a secret (which one signed a token)."""
    return int.from_bytes(hashlib.sha256(b"nvpool key id: " + secret).digest()[:4], "little")


@dataclass(frozen=True, slots=True)
class Capability:
    volume_id: int
    access: int  # READ or WRITE (WRITE includes reading)
    max_generation: int
    expires: int  # unix seconds
    holder: bytes = b"\0" * 16  # the lease it was issued for (for logs)
    key: int = 0

    def allows(self, write: bool, generation: int, now: float) -> str:
        """Empty string if a command may run under this capability, else why not (no secrets)."""
        if now >= self.expires:
            return "capability expired"
        if write and self.access != WRITE:
            return "capability is read-only"
        if generation > self.max_generation:
            return "generation beyond the capability"
        return ""


class CapabilityError(UsageError):
    """A capability is malformed, forged, or signed by an unknown key."""


def sign(cap: Capability, secret: bytes) -> bytes:
    body = BODY.pack(MAGIC, key_id(secret), cap.volume_id, cap.access, cap.max_generation, cap.expires,
                     cap.holder[:16].ljust(16, b"\0"))
    mac = hmac.new(derive(secret, "capability"), body, hashlib.sha256).digest()[:MAC_LEN]
    return body + mac


def verify(blob: bytes, secrets: list[bytes]) -> Capability:
    """Decode and check the signature of a capability against the accepted secrets."""
    if len(blob) != SIZE:
        raise CapabilityError(f"a capability is {SIZE} bytes, got {len(blob)}")
    body, mac = blob[: BODY.size], blob[BODY.size:]
    magic, kid, volume_id, access, max_gen, expires, holder = BODY.unpack(body)
    if magic != MAGIC or access not in ACCESS_NAMES:
        raise CapabilityError("not a capability")
    for secret in secrets:
        if key_id(secret) == kid:
            want = hmac.new(derive(secret, "capability"), body, hashlib.sha256).digest()[:MAC_LEN]
            if hmac.compare_digest(want, mac):
                return Capability(volume_id, access, max_gen, expires, holder, kid)
            break
    raise CapabilityError("capability signature is not valid for this pool")


# ---------------------------------------------------------------------- control plane and registration
#: gRPC metadata key of the metadata service's credential on calls to agents
AUTH_HEADER = "x-nvpool-auth"
#: gRPC metadata key: the term (epoch) of the metadata service making a control call
EPOCH_HEADER = "nvpool-epoch"


def control_token(secret: bytes, method: str, now: float) -> str:
    """What the metadata service sends with each call to an agent: ``TIME:MAC`` over the method."""
    ts = int(now)
    mac = hmac.new(derive(secret, "control"), f"{method}|{ts}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{ts}:{mac}"


def check_control_token(token: str, secrets: list[bytes], method: str, now: float, window: float = 120.0) -> str:
    """Empty string if ``token`` authenticates a call of ``method`` now, else why not."""
    ts_s, _, mac = token.partition(":")
    try:
        ts = int(ts_s)
    except ValueError:
        return "malformed credential"
    if abs(now - ts) > window:
        return "credential expired (check the clocks)"
    for secret in secrets:
        want = hmac.new(derive(secret, "control"), f"{method}|{ts}".encode(), hashlib.sha256).hexdigest()[:32]
        if hmac.compare_digest(want, mac):
            return ""
    return "credential not valid for this pool"


def join_proof(secret: bytes, agent_id: str, instance: str, now: float) -> str:
    """What an agent sends with its registration and heartbeats."""
    ts = int(now)
    mac = hmac.new(derive(secret, "join"), f"{agent_id}|{instance}|{ts}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{ts}:{mac}"


def check_join_proof(proof: str, secrets: list[bytes], agent_id: str, instance: str, now: float,
                     window: float = 120.0) -> str:
    ts_s, _, mac = proof.partition(":")
    try:
        ts = int(ts_s)
    except ValueError:
        return "no join credential"
    if abs(now - ts) > window:
        return "join credential expired (check the clocks)"
    for secret in secrets:
        want = hmac.new(derive(secret, "join"), f"{agent_id}|{instance}|{ts}".encode(), hashlib.sha256).hexdigest()[:32]
        if hmac.compare_digest(want, mac):
            return ""
    return "join credential not valid for this pool"
