"""The pool's join secret on disk: created by the metadata service, copied to every storage server.

A secret file holds one secret per line (hex): the first signs, every line is accepted, so a secret
is rotated by adding a new first line on every daemon, restarting them, then dropping the old line.
The file must be readable by its owner (0600), or by its owner and group (0440/0640: a Kubernetes
secret mounted for a non-root daemon with ``fsGroup``); a daemon refuses one that anyone else can read
or that its group can write.
"""

from __future__ import annotations

import os
import secrets as _secrets
import stat

from nvpool.proto.errors import UsageError


def load(path: str) -> list[bytes]:
    """The secrets in ``path`` (first: the one that signs)."""
    try:
        st = os.stat(path)
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as exc:
        raise UsageError(f"cannot read the pool's join secret {path}: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO):
        raise UsageError(f"the join secret {path} is open to others (mode {stat.S_IMODE(st.st_mode):o}); "
                         f"chmod 600 {path} (or 440 for a group of daemons)")
    try:
        out = [bytes.fromhex(ln) for ln in lines]
    except ValueError:
        raise UsageError(f"{path} is not a join secret (one hex secret per line)") from None
    if not out or any(len(s) < 16 for s in out):
        raise UsageError(f"{path} holds no usable secret (at least 16 bytes, hex)")
    return out


def create(path: str) -> list[bytes]:
    """Create ``path`` with a new random secret (0600) unless it exists; return its secrets."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# nvpool join secret: copy to every storage server (agent --join-secret-file), mode 600\n")
            f.write(_secrets.token_hex(32) + "\n")
    return load(path)
