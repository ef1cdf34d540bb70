"""NBD server protocol (fixed newstyle), sans-IO: bytes in -> events, replies -> bytes.

Implements the parts of NetworkBlockDevice/nbd ``doc/proto.md`` that the Linux kernel client,
libnbd (nbdinfo, nbdcopy, nbdfuse), QEMU and fio use:

* handshake: NBDMAGIC/IHAVEOPT greeting, client flags (FIXED_NEWSTYLE, NO_ZEROES), options
  EXPORT_NAME, ABORT, LIST, INFO, GO (with NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE),
  STRUCTURED_REPLY; anything else is answered NBD_REP_ERR_UNSUP (meta contexts, TLS, extended
  headers are not offered);
* transmission: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE, DISC with FUA; simple replies, and
  structured replies (OFFSET_DATA, NONE, ERROR) once negotiated.

Usage: ``conn = ServerConnection(exports)``; send ``conn.greeting()``; feed received bytes to
``conn.receive(data)`` which returns ``(to_send: bytes, events)``; events are ``Ready`` (the export
chosen; transmission begins), ``Request`` (a command to serve) and ``Disconnect``. Answer requests
with ``reply(...)`` / ``read_reply(...)``, which return the frames to send. A malformed request
raises ``NBDProtocolError``: the connection must be dropped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Optional, Union

from nvpool.proto.errors import ProtocolError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
C_FIXED_NEWSTYLE, C_NO_ZEROES = 1, 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 5, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 2, (1 << 31) + 3, (1 << 31) + 6
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN, TF_SEND_CACHE = 32, 64, 256, 1024

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF = 1, 2, 4

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_ERROR = 0, 1, (1 << 15) + 1

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108

#: largest request payload we accept (advertised as the maximum block size)
MAX_REQUEST = 32 * 1024 * 1024
MAX_OPTION = 64 * 1024

_OPT_HDR = struct.Struct(">QII")
_REQ_HDR = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")


class NBDProtocolError(ProtocolError):
    """The NBD peer violated the protocol; drop the connection."""


@dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    read_only: bool = False
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_REQUEST

    @property
    def transmission_flags(self) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN | TF_SEND_CACHE
        return f | TF_READ_ONLY if self.read_only else f


@dataclass(frozen=True)
class Ready:
    export: ExportInfo


@dataclass(frozen=True)
class Request:
    command: int
    flags: int
    handle: int
    offset: int
    length: int
    data: Optional[bytes] = None  # WRITE payload


@dataclass(frozen=True)
class Disconnect:
    pass


Event = Union[Ready, Request, Disconnect]
Lookup = Callable[[str], Optional[ExportInfo]]

_GREETING, _CLIENT_FLAGS, _OPTIONS, _TRANSMISSION, _CLOSED = range(5)


class ServerConnection:
    def __init__(self, lookup: Lookup, export_names: Callable[[], list[str]]) -> None:
        self._lookup = lookup
        self._names = export_names
        self._buf = bytearray()
        self._state = _CLIENT_FLAGS
        self.no_zeroes = False
        self.structured = False
        self.export: Optional[ExportInfo] = None

    def greeting(self) -> bytes:
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    @property
    def transmitting(self) -> bool:
        return self._state == _TRANSMISSION

    # ------------------------------------------------------------------ receive
    def receive(self, data: bytes) -> tuple[bytes, list[Event]]:
        if self._state == _CLOSED:
            return b"", []
        self._buf += data
        out = bytearray()
        events: list[Event] = []
        while True:
            if self._state == _CLIENT_FLAGS:
                if len(self._buf) < 4:
                    break
                (cflags,) = struct.unpack_from(">I", self._buf)
                del self._buf[:4]
                if not cflags & C_FIXED_NEWSTYLE:
                    raise NBDProtocolError("client does not support fixed newstyle negotiation")
                if cflags & ~(C_FIXED_NEWSTYLE | C_NO_ZEROES):
                    raise NBDProtocolError(f"unknown client flags 0x{cflags:x}")
                self.no_zeroes = bool(cflags & C_NO_ZEROES)
                self._state = _OPTIONS
            elif self._state == _OPTIONS:
                if len(self._buf) < _OPT_HDR.size:
                    break
                magic, opt, length = _OPT_HDR.unpack_from(self._buf)
                if magic != IHAVEOPT:
                    raise NBDProtocolError("bad option magic")
                if length > MAX_OPTION:
                    raise NBDProtocolError(f"option {opt} of {length} bytes is too long")
                if len(self._buf) < _OPT_HDR.size + length:
                    break
                body = bytes(self._buf[_OPT_HDR.size : _OPT_HDR.size + length])
                del self._buf[: _OPT_HDR.size + length]
                out += self._option(opt, body, events)
                if self._state in (_TRANSMISSION, _CLOSED):
                    if self._state == _CLOSED:
                        return bytes(out), events
            elif self._state == _TRANSMISSION:
                if len(self._buf) < _REQ_HDR.size:
                    break
                magic, flags, cmd, handle, offset, length = _REQ_HDR.unpack_from(self._buf)
                if magic != REQUEST_MAGIC:
                    raise NBDProtocolError(f"bad request magic 0x{magic:08x}")
                need = _REQ_HDR.size + (length if cmd == CMD_WRITE else 0)
                if cmd == CMD_WRITE and length > MAX_REQUEST:
                    raise NBDProtocolError(f"write of {length} bytes exceeds the {MAX_REQUEST} byte maximum")
                if len(self._buf) < need:
                    break
                payload = bytes(self._buf[_REQ_HDR.size : need]) if cmd == CMD_WRITE else None
                del self._buf[:need]
                if cmd == CMD_DISC:
                    self._state = _CLOSED
                    events.append(Disconnect())
                    return bytes(out), events
                events.append(Request(cmd, flags, handle, offset, length, payload))
            else:
                break
        return bytes(out), events

    # ------------------------------------------------------------------ options
    def _rep(self, opt: int, rtype: int, data: bytes = b"") -> bytes:
        return _OPT_HDR.pack(REPLY_MAGIC, opt, rtype) + struct.pack(">I", len(data)) + data

    def _err(self, opt: int, rtype: int, msg: str) -> bytes:
        return self._rep(opt, rtype, msg.encode())

    def _option(self, opt: int, body: bytes, events: list[Event]) -> bytes:
        if opt == OPT_EXPORT_NAME:
            exp = self._lookup(body.decode("utf-8", "replace"))
            if exp is None:
                self._state = _CLOSED  # the protocol has no way to refuse this option politely
                events.append(Disconnect())
                return b""
            self._enter(exp, events)
            return struct.pack(">QH", exp.size, exp.transmission_flags) + (b"" if self.no_zeroes else bytes(124))
        if opt == OPT_ABORT:
            self._state = _CLOSED
            events.append(Disconnect())
            return self._rep(opt, REP_ACK)
        if opt == OPT_LIST:
            if body:
                return self._err(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            out = b""
            for name in self._names():
                raw = name.encode()
                out += self._rep(opt, REP_SERVER, struct.pack(">I", len(raw)) + raw)
            return out + self._rep(opt, REP_ACK)
        if opt == OPT_STRUCTURED_REPLY:
            if body:
                return self._err(opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            return self._rep(opt, REP_ACK)
        if opt in (OPT_INFO, OPT_GO):
            if len(body) < 6:
                return self._err(opt, REP_ERR_INVALID, "short NBD_OPT_INFO/GO request")
            (nlen,) = struct.unpack_from(">I", body)
            if len(body) < 4 + nlen + 2:
                return self._err(opt, REP_ERR_INVALID, "export name runs past the option")
            name = body[4 : 4 + nlen].decode("utf-8", "replace")
            (nreq,) = struct.unpack_from(">H", body, 4 + nlen)
            if len(body) != 4 + nlen + 2 + 2 * nreq:
                return self._err(opt, REP_ERR_INVALID, "bad information request list")
            wanted = set(struct.unpack_from(f">{nreq}H", body, 6 + nlen)) if nreq else set()
            exp = self._lookup(name)
            if exp is None:
                return self._err(opt, REP_ERR_UNKNOWN, f"no export named {name!r}")
            out = self._rep(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, exp.size, exp.transmission_flags))
            if INFO_NAME in wanted:
                out += self._rep(opt, REP_INFO, struct.pack(">H", INFO_NAME) + exp.name.encode())
            if INFO_DESCRIPTION in wanted and exp.description:
                out += self._rep(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + exp.description.encode())
            out += self._rep(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, exp.min_block, exp.preferred_block, exp.max_block))
            out += self._rep(opt, REP_ACK)
            if opt == OPT_GO:
                self._enter(exp, events)
            return out
        if opt == OPT_STARTTLS:
            return self._err(opt, REP_ERR_POLICY, "TLS is not offered by this server")
        return self._err(opt, REP_ERR_UNSUP, f"option {opt} is not supported")

    def _enter(self, exp: ExportInfo, events: list[Event]) -> None:
        self.export = exp
        self._state = _TRANSMISSION
        events.append(Ready(exp))

    # ------------------------------------------------------------------ replies
    def reply(self, handle: int, error: int = 0, message: str = "") -> bytes:
        """Reply to a request without payload (or an error for any request)."""
        if self.structured and error:
            msg = message.encode()[:4096]
            body = struct.pack(">IH", error, len(msg)) + msg
            return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len(body)) + body
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle)

    def read_reply(self, handle: int, offset: int, data: Union[bytes, bytearray, memoryview]) -> list[Union[bytes, bytearray, memoryview]]:
        """Frames of a successful READ reply (structured OFFSET_DATA when negotiated)."""
        if self.structured:
            if not len(data):
                return [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)]
            return [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + len(data))
                    + struct.pack(">Q", offset), data]
        return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, handle), data]
