"""Synchronous fast path for small I/O from the sync API: one blocking socket per thread per agent.

A blocking call of the sync API otherwise crosses into the event-loop thread and back, which costs
more than the I/O itself for small requests. Here the calling thread sends one command on its own
connection (the agent's Unix socket when it is on this server, else TCP) and receives the completion
straight into the caller's buffer with ``recv_into``: no event loop, no thread switch, no copy.

Only the plain case is handled (one piece on one agent, at most ``MAX_FAST`` bytes, no digests);
any error raises ``FastPathMiss`` and the caller takes the full asyncio path, which retries, re-fetches
layouts and maps errors. Each connection carries one command at a time, so a stale or broken
connection is simply closed.

The round trip itself is compiled where ``client/_csync.c`` is built (one ``writev`` for the command
and payload, one ``readv`` for the completion and a READ's data, the GIL released meanwhile; the
socket blocking with the timeout as the kernel's send/receive timeouts); ``_Channel.call``'s Python
path is the reference, used for TLS sockets and with ``NVPOOL_PURE_PYTHON=1``, and
``tests/test_syncpath.py`` runs every case on both.

Batches (``SyncChannels.read_batch``, used by ``Volume.readv``): many READ pieces on the thread's
connections to many agents at once. ``client/_csync.c``'s ``reads`` sends every command and receives
every completion with the GIL released, all sockets driven together by poll(); the reference (and the
path for TLS sockets) sends them one ``_Channel.call`` at a time. Either way each piece is read or
reported missed, and a connection that failed is dropped.

Every send has ``sendall`` semantics: a blocking ``sendmsg`` may send only part of the header and
payload (a Unix socket takes about 208 KiB at once), so ``_sendmsg_all`` sends the rest from where it
stopped, slicing memoryviews (no copy of the payload).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
from functools import partial
from typing import Callable, Optional, Union

from nvpool.proto import compiled
from nvpool.proto import dataplane as dp
from nvpool.proto.tls import SERVER_NAME
from nvpool.proto.transport import abandoned, new_connection_id, revoked, to_revoke

#: the compiled round trip (client/_csync.c; None: the pure-Python ``_Channel.call`` below)
_csync = compiled.load("nvpool.client._csync")

MAX_FAST = 256 * 1024
#: pieces sent in one compiled batch call (larger batches go in parts of this many)
MAX_BATCH = 16384
_HELLO_NO_REGIONS = struct.pack("<4sII", b"NVSH", 1, 0)

Buffer = Union[bytes, bytearray, memoryview]


#: one piece of a batched read: (agent address, extent id, offset in the extent, destination)
BatchRead = tuple[str, int, int, memoryview]


class FastPathMiss(Exception):
    """The fast path cannot serve this request; use the normal path. ``timed_out``: the agent did not
    answer within the channel's timeout."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def _sendmsg_all(sock: socket.socket, buffers: list[Buffer]) -> None:
    """``sendall`` for a list of buffers: loop over partial ``sendmsg`` results without copying."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            n = len(views[0])
            if sent >= n:
                views.pop(0)
                sent -= n
            else:
                views[0] = views[0][sent:]
                sent = 0
        while views and not len(views[0]):
            views.pop(0)


def connect_agent(address: str, unix_path: str, timeout: float,
                  ssl_context: Optional[ssl.SSLContext] = None) -> socket.socket:
    """A blocking connection to an agent's data plane (timeout ``timeout``): its Unix socket when
    ``unix_path`` exists (no registered regions), else TCP (TLS with ``ssl_context``). Also used by the
    NBD export's compiled engine (client/nbd/engine.py)."""
    if unix_path and os.path.exists(unix_path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(unix_path)
            s.sendall(_HELLO_NO_REGIONS)  # same-host socket: register no regions
            if _Channel._recv_exact(s, 8)[:4] != b"NVOK":
                raise OSError("agent refused the same-host connection")
        except BaseException:
            s.close()
            raise
        return s
    host, _, port = address.rpartition(":")
    s = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is not None:  # a TLS data plane (proto/tls.py)
        return ssl_context.wrap_socket(s, server_hostname=SERVER_NAME)
    return s


class _Channel:
    def __init__(self, address: str, unix_path: str, timeout: float,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self._adopt(connect_agent(address, unix_path, timeout, ssl_context), timeout, _csync is not None)

    def _adopt(self, sock: socket.socket, timeout: float, compiled: bool) -> None:
        """Use ``sock`` (connected, greeted) with the compiled round trip if ``compiled`` and it is a
        plaintext socket, else with the pure-Python one (the reference)."""
        self.sock = sock
        self.hdr = bytearray(dp.COMPLETION.size)
        self.tag = 0
        #: volume id -> capability presented on this connection
        self.authorized: dict[int, bytes] = {}
        #: this connection's id (proto/transport.py, "Abandoned connections")
        self.conn_id = new_connection_id()
        #: the compiled round trip serves this channel (plaintext sockets): the socket is made
        #: blocking, with the timeout as the kernel's per-call send and receive timeouts
        self.compiled = compiled and not isinstance(sock, ssl.SSLSocket)
        if self.compiled:
            tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            self.fd = self.sock.fileno()
        else:
            self.fd = -1

    def authorize(self, volume_id: int, cap: bytes, address: str = "") -> None:
        """Present a capability (data-plane AUTH) once per connection and capability; first, with
        ``address`` (the caller writes, holding a write capability: agents take revocations only with
        one), revoke this process's connections to that agent that were abandoned with commands of the
        volume in flight (proto/transport.py, "Abandoned connections")."""
        if not cap:
            return
        for cid in to_revoke(address, volume_id, self.conn_id) if address else ():
            try:
                self.call(dp.Opcode.AUTH, self.conn_id, cid, len(cap), 0, cap, None)
            except BaseException:
                self.authorized.clear()  # a refused revocation leaves the connection no capability at all
                raise
            revoked(address, cid, volume_id)
            self.authorized[volume_id] = cap
        if self.authorized.get(volume_id) != cap:
            self.call(dp.Opcode.AUTH, self.conn_id, 0, len(cap), 0, cap, None)
            self.authorized[volume_id] = cap

    @staticmethod
    def _recv_exact(s: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                raise OSError("connection closed")
            out += chunk
        return out

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise OSError("connection closed")
            got += n

    def call(self, opcode: int, extent_id: int, offset: int, length: int, generation: int,
             payload: Optional[Buffer], dest: Optional[memoryview]) -> None:
        self.tag = (self.tag + 1) & 0xFFFFFFFF or 1
        hdr = dp.encode_command(opcode, self.tag, extent_id, offset, length, generation)
        if self.compiled:
            assert _csync is not None
            status, _n, _info, _msg = _csync.exchange(self.fd, hdr, payload, dest if opcode == dp.READ else None,
                                                       self.tag)
            if status != 0:
                raise FastPathMiss(f"status {status}")
            return
        if payload is not None and isinstance(self.sock, ssl.SSLSocket):
            self.sock.sendall(hdr)  # (TLS sockets have no sendmsg)
            self.sock.sendall(payload)
        elif payload is not None:
            _sendmsg_all(self.sock, [hdr, payload])
        else:
            self.sock.sendall(hdr)
        self._recv_into(memoryview(self.hdr))
        magic, status, flags, tag, n, _res, _info = dp.COMPLETION.unpack(self.hdr)
        if magic != dp.COMPLETION_MAGIC or tag != self.tag or flags:
            raise OSError("unexpected completion")
        if status != 0:
            if n > dp.MAX_MESSAGE:
                raise OSError("unexpected completion")
            if n:
                self._recv_into(memoryview(bytearray(n)))  # the error message; the full path reports it
            raise FastPathMiss(f"status {status}")
        if opcode == dp.READ:
            if dest is None or n != len(dest):
                raise OSError("unexpected payload length")
            self._recv_into(dest)
        elif n:
            raise OSError("unexpected payload")


def present_revocations(sock: socket.socket, address: str, volume_id: int, cap: bytes, conn_id: int,
                        timeout: float) -> None:
    """On a fresh blocking socket that another engine will use as connection ``conn_id`` (the NBD
    export's): revoke this process's abandoned connections to ``address`` for ``volume_id`` first, as
    ``_Channel.authorize`` does (proto/transport.py, "Abandoned connections"). Raises OSError (or
    FastPathMiss on a refusal): then the socket is not to be used."""
    if not cap or not to_revoke(address, volume_id, conn_id):
        return
    was = sock.gettimeout()
    sock.settimeout(timeout)
    ch = _Channel.__new__(_Channel)
    ch._adopt(sock, timeout, False)
    ch.conn_id = conn_id
    ch.authorize(volume_id, cap, address)
    sock.settimeout(was)


_WRITES = frozenset({dp.WRITE, int(dp.Opcode.WRITE_ZEROES), int(dp.Opcode.DISCARD)})


class SyncChannels:
    """Per-thread blocking connections to agents."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._local = threading.local()
        #: requests this object could not serve (each then took the full path)
        self.misses = 0

    def _channels(self) -> dict[str, _Channel]:
        d: Optional[dict[str, _Channel]] = getattr(self._local, "channels", None)
        if d is None:
            d = {}
            self._local.channels = d
        return d

    def call(self, address: str, unix_path: str, opcode: int, extent_id: int, offset: int, length: int,
             generation: int, payload: Optional[Buffer] = None, dest: Optional[memoryview] = None,
             volume_id: int = 0, cap: bytes = b"", ssl_context: Optional[ssl.SSLContext] = None) -> None:
        chans = self._channels()
        ch = chans.get(address)
        try:
            if ch is None:
                ch = chans[address] = _Channel(address, unix_path, self.timeout, ssl_context)
            ch.authorize(volume_id, cap, address if opcode in _WRITES else "")
            ch.call(opcode, extent_id, offset, length, generation, payload, dest)
        except FastPathMiss:
            self.misses += 1
            raise
        except (OSError, ValueError, struct.error) as exc:
            self.misses += 1
            self._drop(address)
            raise FastPathMiss(str(exc), timed_out=isinstance(exc, TimeoutError)) from exc
        except BaseException:  # (a signal handler's exception mid-command: the channel is out of step)
            self._drop(address)
            raise

    def _guarded(self, address: str, step: Callable[[], None]) -> int:
        """Run one step on the connection to ``address``: 1 done, 0 a miss (the connection stays),
        -1 the connection failed (dropped). Any other exception drops it and propagates."""
        try:
            step()
            return 1
        except FastPathMiss:
            return 0
        except (OSError, ValueError, struct.error):
            self._drop(address)
            return -1
        except BaseException:
            self._drop(address)
            raise

    def _drop(self, address: str) -> None:
        """Close a channel that failed mid-command: what it had in flight may still land, so the retry
        (the full path) revokes it first (proto/transport.py, "Abandoned connections")."""
        bad = self._channels().pop(address, None)
        if bad is not None:
            bad.sock.close()
            abandoned(address, bad.conn_id, bad.authorized)

    def read_batch(self, reads: list[BatchRead], generation: int, volume_id: int, cap: bytes,
                   endpoints: dict[str, tuple[str, Optional[ssl.SSLContext]]]) -> list[bool]:
        """Read every piece (of one volume's layout ``generation``), all in flight together on this
        thread's connections; for each, True if it was read, False if the caller must read it the normal
        way (a refusal, a lost connection, no answer within ``timeout``: then the connection is dropped).
        ``endpoints``: address -> (unix path, TLS context) for the connections to open."""
        if len(reads) > MAX_BATCH:  # (the compiled call takes at most MAX_BATCH commands)
            return [good for at in range(0, len(reads), MAX_BATCH)
                    for good in self.read_batch(reads[at : at + MAX_BATCH], generation, volume_id, cap, endpoints)]
        chans = self._channels()
        ok = [False] * len(reads)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reads):
            groups.setdefault(r[0], []).append(i)
        batched: list[tuple[str, _Channel, list[int]]] = []
        for address, idxs in groups.items():

            def ready(address: str = address) -> None:
                ch = chans.get(address)
                if ch is None:
                    unix, ctx = endpoints[address]
                    ch = chans[address] = _Channel(address, unix, self.timeout, ctx)
                ch.authorize(volume_id, cap)

            if self._guarded(address, ready) <= 0:
                continue
            ch = chans[address]
            if ch.compiled and _csync is not None:
                batched.append((address, ch, idxs))
                continue
            for i in idxs:  # the reference: one round trip at a time
                _a, extent_id, offset, dest = reads[i]
                got = self._guarded(address, partial(ch.call, dp.READ, extent_id, offset, len(dest), generation,
                                                     None, dest))
                if got < 0:
                    break
                ok[i] = got > 0
        if batched:
            assert _csync is not None
            jobs: list[tuple[int, int, int, int, int, memoryview]] = []
            owners: list[int] = []
            for si, (_addr, ch, idxs) in enumerate(batched):
                tag = ch.tag
                for i in idxs:
                    _a, extent_id, offset, dest = reads[i]
                    tag = (tag + 1) & 0xFFFFFFFF or 1
                    jobs.append((si, tag, extent_id, offset, generation, dest))
                owners.extend(idxs)
                ch.tag = tag
            try:
                statuses, failed = _csync.reads([ch.fd for _a, ch, _i in batched], jobs, self.timeout)
            except BaseException:  # (a signal handler's exception: every connection is out of step)
                for addr, _ch, _i in batched:
                    self._drop(addr)
                raise
            for status, i in zip(statuses, owners):
                ok[i] = status == 0
            for si in failed:
                self._drop(batched[si][0])
        self.misses += ok.count(False)
        return ok

    def close(self) -> None:
        for ch in self._channels().values():
            ch.sock.close()
        self._channels().clear()
