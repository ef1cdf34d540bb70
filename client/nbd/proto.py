"""NBD server protocol (fixed newstyle), sans-IO: bytes in -> events, replies -> bytes.

Implements the parts of NetworkBlockDevice/nbd ``doc/proto.md`` that the Linux kernel client,
libnbd (nbdinfo, nbdcopy, nbdfuse), QEMU and fio use:

* handshake: NBDMAGIC/IHAVEOPT greeting, client flags (FIXED_NEWSTYLE, NO_ZEROES), options
  EXPORT_NAME, ABORT, LIST, INFO, GO (with NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE),
  STRUCTURED_REPLY; anything else is answered NBD_REP_ERR_UNSUP (meta contexts, TLS, extended
  headers are not offered);
* transmission: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE, DISC with FUA; simple replies, and
  structured replies (OFFSET_DATA, NONE, ERROR) once negotiated.

Usage (pull style, like h11): ``conn = ServerConnection(lookup, names)``; send ``conn.greeting()``;
hand received bytes to ``conn.receive_data(data)``, then call ``conn.next_event()`` until it returns
None (more bytes needed), sending ``conn.data_to_send()`` (option replies) as it grows. Events are
``Ready`` (the export chosen; transmission begins), ``Request`` (a command to serve, or to answer at
once with its ``error``) and ``Disconnect``. ``receive(data)`` does all of that in one call (tests).
Answer requests with ``reply(...)`` / ``read_reply(...)``, which return the frames to send.

Back-pressure: before pulling, a server asks ``next_cost()``: the bytes the next request will pin
(its payload, or its read buffer) if its header has arrived, else None. A server over its budget
simply stops pulling (and stops reading its socket); unpulled bytes stay in the kernel. A WRITE
payload is collected only as its bytes arrive (never allocated from the announced length), and only
after the server admitted its header.

Validation follows nbdkit (``server/protocol.c`` ``validate_request``), in its order, so a client sees
the same error code from both: a write-type command on a read-only export -> EPERM; a range that is
empty or runs past the end (or overflows) -> ENOSPC for WRITE/WRITE_ZEROES, EINVAL otherwise; FLUSH
with an offset or length, an unknown command -> EINVAL; unknown flags, a flag on a command it does not
apply to, DF without structured replies -> EINVAL; a READ/WRITE above ``HARD_MAX_REQUEST`` -> ENOMEM.
A rejected WRITE's payload is read and discarded (up to ``2 * HARD_MAX_REQUEST``, beyond which the
connection is dropped, as nbdkit does). Sizes: ``MAX_REQUEST`` (32 MiB) is what we advertise in
NBD_INFO_BLOCK_SIZE; a client that asked for block sizes is held to it (EINVAL above it). A client
that did not ask may send up to ``HARD_MAX_REQUEST`` (64 MiB, nbdkit's limit; the reference
nbd-server and nbdkit both serve such requests, and proto.md asks servers not to refuse them just
because they exceed the 32 MiB a cautious client limits itself to).

Only ``NBDProtocolError`` escapes ``receive_data``/``next_event``, for input that leaves no way to
answer (bad magic, a bad handshake, a WRITE whose payload is too big even to skip): drop the
connection.
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
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_DF, TF_CAN_MULTI_CONN, TF_SEND_CACHE = 32, 64, 128, 256, 1024

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, CMD_FLAG_FAST_ZERO = 1, 2, 4, 8, 16
#: flags this server understands (REQ_ONE and FAST_ZERO are known, and always refused: we offer
#: neither block status nor fast zeroing)
KNOWN_CMD_FLAGS = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_ERROR = 0, 1, (1 << 15) + 1

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108

#: largest request payload we advertise (NBD_INFO_BLOCK_SIZE maximum); a client that asked for block
#: sizes gets EINVAL above it. 32 MiB is the size proto.md tells cautious clients to stay under.
MAX_REQUEST = 32 * 1024 * 1024
#: largest READ/WRITE served at all, for clients that did not ask for block sizes (nbdkit's
#: MAX_REQUEST_SIZE); above it: ENOMEM, like nbdkit. Bounds the memory one request can pin.
HARD_MAX_REQUEST = 64 * 1024 * 1024
#: a rejected WRITE's payload up to this size is read and discarded (the connection goes on); a
#: bigger one drops the connection (nbdkit's rule: twice its request limit)
MAX_SKIP = 2 * HARD_MAX_REQUEST
MAX_OPTION = 64 * 1024

_OPT_HDR = struct.Struct(">QII")
_REQ_HDR = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")

_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM",
          CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES"}


def command_name(cmd: int) -> str:
    return _NAMES.get(cmd, f"command {cmd}")


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
    data: Optional[Union[bytes, bytearray]] = None  # WRITE payload (None when the request is refused)
    error: int = 0  # nonzero: the request is invalid; answer it with this NBD error and do nothing
    message: str = ""  # why (for the log and a structured error reply)

    @property
    def cost(self) -> int:
        """Bytes this request pins while in flight (its payload or its read buffer)."""
        return request_cost(self.command, self.length, self.error)


@dataclass(frozen=True)
class Disconnect:
    pass


Event = Union[Ready, Request, Disconnect]
Lookup = Callable[[str], Optional[ExportInfo]]


def request_cost(command: int, length: int, error: int = 0) -> int:
    return length if not error and command in (CMD_READ, CMD_WRITE) else 0


_GREETING, _CLIENT_FLAGS, _OPTIONS, _TRANSMISSION, _CLOSED = range(5)


class ServerConnection:
    def __init__(self, lookup: Lookup, export_names: Callable[[], list[str]]) -> None:
        self._lookup = lookup
        self._names = export_names
        self._buf = bytearray()
        self._out = bytearray()
        self._state = _CLIENT_FLAGS
        self.no_zeroes = False
        self.structured = False
        self.block_size_negotiated = False  # NBD_OPT_GO asked for NBD_INFO_BLOCK_SIZE
        self.export: Optional[ExportInfo] = None
        # the request whose WRITE payload is being received (or skipped), and how much is missing
        self._pending: Optional[Request] = None
        self._payload: Optional[bytearray] = None
        self._missing = 0
        # the header next_cost parsed and judged: (flags, cmd, handle, offset, length, error, message)
        self._verdict: Optional[tuple[int, int, int, int, int, int, str]] = None

    def greeting(self) -> bytes:
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    @property
    def transmitting(self) -> bool:
        return self._state == _TRANSMISSION

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events (besides a WRITE payload being collected)."""
        return len(self._buf)

    # ------------------------------------------------------------------ receive
    def receive(self, data: bytes) -> tuple[bytes, list[Event]]:
        """``receive_data`` + every event now complete + ``data_to_send`` (no back-pressure)."""
        self.receive_data(data)
        events: list[Event] = []
        while (ev := self.next_event()) is not None:
            events.append(ev)
        return self.data_to_send(), events

    def receive_data(self, data: Union[bytes, bytearray, memoryview]) -> None:
        if self._state == _CLOSED:
            return
        if self._pending is not None and self._missing and not self._buf:
            # the common case of a large WRITE: its bytes go straight into its payload (one copy)
            with memoryview(data) as view:
                n = min(self._missing, len(view))
                if self._payload is not None:
                    self._payload += view[:n]
                self._missing -= n
                self._buf += view[n:]
            return
        self._buf += data

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_cost(self) -> Optional[int]:
        """Bytes the next request will pin, if its header is here and not yet taken; else None."""
        if self._state != _TRANSMISSION or self._pending is not None or len(self._buf) < _REQ_HDR.size:
            return None
        if self._verdict is None:  # parsed and judged once; next_event takes this header
            magic, flags, cmd, handle, offset, length = _REQ_HDR.unpack_from(self._buf)
            if magic != REQUEST_MAGIC:
                return 0  # next_event raises
            self._verdict = (flags, cmd, handle, offset, length, *self._validate(cmd, flags, offset, length))
        v = self._verdict
        return v[4] if v[1] <= CMD_WRITE and not v[5] else 0

    def next_event(self) -> Optional[Event]:
        while True:
            if self._state == _CLIENT_FLAGS:
                if len(self._buf) < 4:
                    return None
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
                    return None
                magic, opt, length = _OPT_HDR.unpack_from(self._buf)
                if magic != IHAVEOPT:
                    raise NBDProtocolError("bad option magic")
                if length > MAX_OPTION:
                    raise NBDProtocolError(f"option {opt} of {length} bytes is too long")
                if len(self._buf) < _OPT_HDR.size + length:
                    return None
                body = bytes(self._buf[_OPT_HDR.size : _OPT_HDR.size + length])
                del self._buf[: _OPT_HDR.size + length]
                events: list[Event] = []
                self._out += self._option(opt, body, events)
                if events:
                    if self._state == _CLOSED:
                        self._buf.clear()
                    return events[0]
            elif self._state == _TRANSMISSION:
                if self._pending is not None:
                    return self._take_payload()
                if len(self._buf) < _REQ_HDR.size:
                    return None
                verdict, self._verdict = self._verdict, None
                if verdict is not None:
                    flags, cmd, handle, offset, length, error, message = verdict
                else:
                    magic, flags, cmd, handle, offset, length = _REQ_HDR.unpack_from(self._buf)
                    if magic != REQUEST_MAGIC:
                        raise NBDProtocolError(f"bad request magic 0x{magic:08x}")
                    error, message = self._validate(cmd, flags, offset, length)
                if cmd == CMD_DISC:
                    self._state = _CLOSED
                    self._buf.clear()
                    return Disconnect()
                if cmd == CMD_WRITE and error and length > MAX_SKIP:
                    raise NBDProtocolError(f"WRITE of {length} bytes is too large even to skip ({message})")
                del self._buf[: _REQ_HDR.size]
                req = Request(cmd, flags, handle, offset, length, None, error, message)
                if cmd != CMD_WRITE:
                    return req
                self._pending, self._missing = req, length
                self._payload = None if error else bytearray()
                # loop: take what is here (all of it, for a small write)
            else:
                return None

    def _take_payload(self) -> Optional[Request]:
        """Move arrived payload bytes of the pending WRITE (or discard them for a refused one)."""
        req = self._pending
        assert req is not None
        n = min(self._missing, len(self._buf))
        if self._payload is not None:
            if n == req.length:  # all of it arrived at once: one copy, no growth
                with memoryview(self._buf) as view:
                    data: Union[bytes, bytearray] = bytes(view[:n])
                del self._buf[:n]
                self._pending, self._missing = None, 0
                self._payload = None
                return Request(req.command, req.flags, req.handle, req.offset, req.length, data)
            with memoryview(self._buf) as view:
                self._payload += view[:n]
        del self._buf[:n]
        self._missing -= n
        if self._missing:
            return None
        payload, self._payload, self._pending = self._payload, None, None
        if payload is None:  # a refused WRITE, its payload now discarded
            return req
        return Request(req.command, req.flags, req.handle, req.offset, req.length, payload)

    def take_buffered(self) -> bytes:
        """Hand over the bytes received and not yet parsed (transmission only, between requests): the
        compiled engine (``client/nbd/_cnbd.c``) goes on from there."""
        if self._state != _TRANSMISSION or self._pending is not None:
            raise NBDProtocolError("the connection is not between requests")
        out, self._buf = bytes(self._buf), bytearray()
        self._verdict = None
        return out

    def judge(self, cmd: int, flags: int, handle: int, offset: int, length: int,
              data: Optional[Union[bytes, bytearray]] = None) -> Request:
        """The ``Request`` ``next_event`` makes of a header (and a WRITE's payload) framed elsewhere (the
        compiled engine): the same validation, so the same answer."""
        error, message = self._validate(cmd, flags, offset, length)
        if error:
            return Request(cmd, flags, handle, offset, length, None, error, message)
        return Request(cmd, flags, handle, offset, length, data if cmd == CMD_WRITE else None)

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """(NBD error, reason) for a request, (0, "") when it may be served; nbdkit's checks and order."""
        exp = self.export
        assert exp is not None
        if (cmd <= CMD_WRITE and not flags & ~CMD_FLAG_FUA and 0 < length <= exp.max_block <= HARD_MAX_REQUEST
                and offset + length <= exp.size and not (cmd == CMD_WRITE and exp.read_only)):
            return 0, ""  # the common case, decided at once
        name = command_name(cmd)
        if exp.read_only and cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return EPERM, f"{name} on a read-only export"
        if cmd in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES):
            if length == 0 or offset + length > exp.size:
                return (ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL,
                        f"{name} of {length} bytes at {offset} is outside the export ({exp.size} bytes)")
        elif cmd == CMD_FLUSH:
            if offset or length:
                return EINVAL, "FLUSH takes no offset or length"
        else:
            return EINVAL, f"{name} is not supported"
        if flags & ~KNOWN_CMD_FLAGS:
            return EINVAL, f"unknown command flags 0x{flags & ~KNOWN_CMD_FLAGS:x}"
        if flags & CMD_FLAG_NO_HOLE and cmd != CMD_WRITE_ZEROES:
            return EINVAL, "NO_HOLE flag on a command other than WRITE_ZEROES"
        if flags & CMD_FLAG_FAST_ZERO:
            return EINVAL, "FAST_ZERO flag: fast zeroing is not offered"
        if flags & CMD_FLAG_REQ_ONE:
            return EINVAL, "REQ_ONE flag: block status is not offered"
        if flags & CMD_FLAG_DF:
            if cmd != CMD_READ:
                return EINVAL, "DF flag on a command other than READ"
            if not self.structured:
                return EINVAL, "DF flag without structured replies"
        if cmd in (CMD_READ, CMD_WRITE):
            if self.block_size_negotiated and length > exp.max_block:
                return EINVAL, f"{name} of {length} bytes exceeds the advertised maximum of {exp.max_block}"
            if length > HARD_MAX_REQUEST:
                return ENOMEM, f"{name} of {length} bytes exceeds the {HARD_MAX_REQUEST} byte limit"
        return 0, ""

    # ------------------------------------------------------------------ options
    def _rep(self, opt: int, rtype: int, data: bytes = b"") -> bytes:
        return _OPT_HDR.pack(REPLY_MAGIC, opt, rtype) + struct.pack(">I", len(data)) + data

    def _err(self, opt: int, rtype: int, msg: str) -> bytes:
        return self._rep(opt, rtype, msg.encode())

    def _flags(self, exp: ExportInfo) -> int:
        # DF is meaningful (and offered) only with structured replies; every READ reply is one chunk
        return exp.transmission_flags | (TF_SEND_DF if self.structured else 0)

    def _option(self, opt: int, body: bytes, events: list[Event]) -> bytes:
        if opt == OPT_EXPORT_NAME:
            exp = self._lookup(body.decode("utf-8", "replace"))
            if exp is None:
                self._state = _CLOSED  # the protocol has no way to refuse this option politely
                events.append(Disconnect())
                return b""
            self._enter(exp, events)
            return struct.pack(">QH", exp.size, self._flags(exp)) + (b"" if self.no_zeroes else bytes(124))
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
            out = self._rep(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, exp.size, self._flags(exp)))
            if INFO_NAME in wanted:
                out += self._rep(opt, REP_INFO, struct.pack(">H", INFO_NAME) + exp.name.encode())
            if INFO_DESCRIPTION in wanted and exp.description:
                out += self._rep(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + exp.description.encode())
            out += self._rep(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, exp.min_block, exp.preferred_block, exp.max_block))
            out += self._rep(opt, REP_ACK)
            if opt == OPT_GO:
                self.block_size_negotiated = INFO_BLOCK_SIZE in wanted
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
