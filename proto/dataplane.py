"""nvpool data-plane protocol: a sans-IO codec shared by client and agent.

In the spirit of NVMe-oF capsules. Every request is a *command* with a tag; every command gets exactly
one *completion* with the same tag. Many commands may be in flight on one connection; completions may
come back in any order. All integers are little-endian (as in NVMe).

Command (48 bytes, ``COMMAND``)::

    0  u16  magic      0x564E ("NV")
    2  u8   opcode     Opcode
    3  u8   flags      Flag (HDGST, DDGST, FUA)
    4  u32  tag        chosen by the client, unique among its in-flight commands
    8  u64  extent_id  the extent on the agent (global id assigned by the metadata service)
   16  u64  offset     byte offset inside the extent
   24  u32  length     bytes to read / write / zero
   28  u32  region     registered memory region (one-sided opcodes), else 0
   32  u64  region_off offset inside the region
   40  u64  generation layout generation the client holds for the extent's volume
   [48 u32  CRC32C of bytes 0..47, present if HDGST]
   then, for WRITE and AUTH: ``length`` payload bytes, [u32 CRC32C of the payload if DDGST]

Completion (24 bytes, ``COMPLETION``)::

    0  u16  magic      0x434E ("NC")
    2  u8   status     errors.Status
    3  u8   flags      Flag (HDGST, DDGST) of the payload that follows
    4  u32  tag
    8  u32  length     payload bytes that follow (READ data; UTF-8 message for errors)
   12  u32  reserved   0
   16  u64  info       STALE_LAYOUT: the generation required; otherwise 0
   [24 u32 CRC32C of bytes 0..23 if HDGST]
   then ``length`` payload bytes, [u32 CRC32C of the payload if DDGST]

A digest mismatch on a *header* means the stream can no longer be trusted: ``ProtocolError``. A data
digest mismatch keeps framing intact: the event carries ``digest_ok=False`` and the receiver answers /
retries that one command.

Receiving is pull-style so payloads land straight in the caller's memory: the transport asks
``get_buffer()`` for where the next bytes should go, writes them there, and calls ``advance(n)``, which
returns the events completed. ``feed(bytes)`` does the same for callers that already hold bytes (tests).
A ``target`` callback chooses the destination of each payload (for a client: the slice of the
caller's buffer that the command reads into).

Memory: a header only *announces* a payload; a peer may never send it. Where the decoder allocates a
payload buffer itself, one of ``LAZY_ALLOC_MIN`` bytes or more is anonymous memory mapped on demand,
so memory is committed page by page as the payload's bytes arrive, never for bytes only announced
(64 headers announcing 16 MiB each cost nothing until their bytes come). Smaller buffers are plain
``bytearray``s. A receiver bounds what has *arrived* by pausing its reads (``agents/dataplane.py``).
"""

from __future__ import annotations

import enum
import mmap
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import crc32c as _crc32c

from nvpool.proto.errors import ProtocolError, Status

COMMAND_MAGIC = 0x564E
COMPLETION_MAGIC = 0x434E
COMMAND = struct.Struct("<HBBIQQIIQQ")
COMPLETION = struct.Struct("<HBBIIIQ")
DIGEST = struct.Struct("<I")
assert COMMAND.size == 48 and COMPLETION.size == 24

#: Largest payload a single command may carry. Larger I/O is split by the client.
MAX_IO = 16 * 1024 * 1024
#: Largest error message a completion may carry.
MAX_MESSAGE = 4096
#: Payload buffers the decoder allocates itself at this size or above are committed only as bytes arrive.
LAZY_ALLOC_MIN = 256 * 1024


def crc32c(data: Union[bytes, bytearray, memoryview], value: int = 0) -> int:
    return int(_crc32c.crc32c(data, value))


class Opcode(enum.IntEnum):
    NOP = 0
    READ = 1
    WRITE = 2
    FLUSH = 3
    WRITE_ZEROES = 4
    DISCARD = 5
    # One-sided ("RDMA-style"): data moves through a registered memory region, not the socket.
    READ_REGION = 0x10  # agent places extent bytes into the region (like an RDMA WRITE to the client)
    WRITE_REGION = 0x11  # agent takes bytes from the region (like an RDMA READ from the client)
    # Authorization: the payload is a capability (proto/capability.py) for one volume, kept by the
    # agent for the rest of the connection; commands on that volume's extents are checked against it.
    AUTH = 0x20


class Flag(enum.IntFlag):
    NONE = 0
    HDGST = 1
    DDGST = 2
    FUA = 4


# plain ints for hot paths (IntFlag arithmetic costs microseconds per operation)
HDGST, DDGST, FUA = 1, 2, 4
READ, WRITE, FLUSH, NOP = int(Opcode.READ), int(Opcode.WRITE), int(Opcode.FLUSH), int(Opcode.NOP)
_KNOWN_FLAGS = HDGST | DDGST | FUA
_OPCODES = frozenset(int(o) for o in Opcode)
#: opcodes whose command carries a payload on the stream
_CARRIES_PAYLOAD = frozenset({WRITE, int(Opcode.AUTH)})


@dataclass(slots=True)
class Command:
    opcode: int
    flags: int
    tag: int
    extent_id: int = 0
    offset: int = 0
    length: int = 0
    region: int = 0
    region_offset: int = 0
    generation: int = 0
    #: WRITE payload (where the decoder put it); None for other opcodes
    payload: Optional[memoryview] = None
    #: False if a data digest was present and did not match
    digest_ok: bool = True


@dataclass(slots=True)
class Completion:
    status: int
    flags: int
    tag: int
    length: int = 0
    info: int = 0
    #: payload as placed by the decoder (the ``target`` buffer, or an internal one for messages)
    payload: Optional[memoryview] = None
    digest_ok: bool = True

    @property
    def message(self) -> str:
        if self.status == Status.OK or self.payload is None:
            return ""
        return bytes(self.payload).decode("utf-8", "replace")


# --------------------------------------------------------------------------------------- encoding


def encode_command(
    opcode: int,
    tag: int,
    extent_id: int = 0,
    offset: int = 0,
    length: int = 0,
    generation: int = 0,
    flags: int = 0,
    region: int = 0,
    region_offset: int = 0,
) -> bytes:
    """Header of a command (with its header digest if HDGST). The payload is sent separately."""
    hdr = COMMAND.pack(
        COMMAND_MAGIC, opcode, flags, tag, extent_id, offset, length, region, region_offset, generation
    )
    if flags & HDGST:
        hdr += DIGEST.pack(crc32c(hdr))
    return hdr


def command_frames(
    header: bytes, payload: Optional[Union[bytes, bytearray, memoryview]], flags: int
) -> list[Union[bytes, bytearray, memoryview]]:
    """Everything to send for one command: header, payload, data digest (for ``writelines``)."""
    if payload is None:
        return [header]
    if flags & DDGST:
        return [header, payload, DIGEST.pack(crc32c(payload))]
    return [header, payload]


def encode_completion(
    tag: int, status: int = Status.OK, length: int = 0, info: int = 0, flags: int = 0
) -> bytes:
    hdr = COMPLETION.pack(COMPLETION_MAGIC, status, flags, tag, length, 0, info)
    if flags & HDGST:
        hdr += DIGEST.pack(crc32c(hdr))
    return hdr


def error_completion(tag: int, status: int, message: str = "", info: int = 0, flags: int = 0) -> bytes:
    """A complete error completion frame (header + UTF-8 message [+ digest])."""
    msg = message.encode("utf-8", "replace")[:MAX_MESSAGE]
    out = encode_completion(tag, status, len(msg), info, flags)
    if msg:
        out += msg
        if flags & DDGST:
            out += DIGEST.pack(crc32c(msg))
    return out


# --------------------------------------------------------------------------------------- decoding

Target = Callable[[int, int], Optional[memoryview]]
"""``target(tag_or_opcode, length)``: where to put a payload of ``length`` bytes, or None to let the
decoder allocate. The returned view must be exactly ``length`` bytes."""

_HEADER, _HDGST, _PAYLOAD, _DDGST = range(4)


class _Reader:
    """Shared pull-style framing for both directions (the subclass parses the fixed header).

    Strategy: bytes arrive in a scratch buffer. Headers are parsed from scratch; a payload is copied
    out of scratch into its target only for the part that came with headers; once a payload is the
    next thing on the stream and scratch is drained, ``get_buffer`` hands out the target itself, so
    large payloads are received exactly once, into the caller's memory.
    """

    header_size: int
    magic: int

    def __init__(self, scratch_size: int = 256 * 1024, direct_threshold: int = 16 * 1024) -> None:
        self._scratch = bytearray(scratch_size)
        self._sv = memoryview(self._scratch)
        self._start = 0  # first unconsumed byte in scratch
        self._end = 0  # end of valid bytes in scratch
        self._state = _HEADER
        self._direct_threshold = direct_threshold
        self._event: Union[Command, Completion, None] = None
        self._hdr_raw = b""
        self._dst: Optional[memoryview] = None
        self._dst_pos = 0
        self._direct = False  # the last get_buffer() returned the payload target
        self._events: list[Union[Command, Completion]] = []
        self.failed: Optional[ProtocolError] = None

    # -- subclass hooks
    def _parse_header(self, raw: memoryview) -> Union[Command, Completion]:
        raise NotImplementedError

    def _payload_length(self, ev: Union[Command, Completion]) -> int:
        raise NotImplementedError

    def _payload_target(self, ev: Union[Command, Completion], n: int) -> Optional[memoryview]:
        raise NotImplementedError

    # -- pull API
    def get_buffer(self) -> memoryview:
        """Where the next received bytes should be written (never empty)."""
        if self.failed is not None:
            raise self.failed
        if self._state == _PAYLOAD and self._start == self._end and self._dst is not None:
            remaining = len(self._dst) - self._dst_pos
            if remaining >= self._direct_threshold:
                self._direct = True
                return self._dst[self._dst_pos :]
        self._direct = False
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._scratch) - self._end < 4096:
            # compact: move the unparsed tail to the front
            n = self._end - self._start
            self._sv[:n] = self._sv[self._start : self._end]
            self._start, self._end = 0, n
        return self._sv[self._end :]

    def advance(self, n: int) -> list[Union[Command, Completion]]:
        """``n`` bytes were written into the last buffer from ``get_buffer``; returns finished events."""
        if n <= 0:
            return []
        if self._direct:
            self._direct = False
            self._dst_pos += n
            if self._dst is not None and self._dst_pos >= len(self._dst):
                self._payload_done()
        else:
            self._end += n
        return self.parse()

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> list[Union[Command, Completion]]:
        """Push bytes we already hold; returns the events completed."""
        mv = memoryview(data).cast("B")
        out: list[Union[Command, Completion]] = []
        while len(mv):
            buf = self.get_buffer()
            k = min(len(buf), len(mv))
            buf[:k] = mv[:k]
            mv = mv[k:]
            out.extend(self.advance(k))
        return out

    # -- for a consumer that serves whole frames straight from the receive buffer (agents/_cserve.c)
    def received_raw(self, n: int) -> bool:
        """Like ``advance(n)``, but parse nothing, when the reader is between frames: the bytes stay in
        ``scratch[pos:end]`` for a consumer that serves whole frames itself and moves ``pos`` past
        them; ``parse()`` then decodes what it left. False (and nothing done) otherwise."""
        if self._state != _HEADER or self._direct or self.failed is not None or n <= 0:
            return False
        self._end += n
        return True

    @property
    def scratch(self) -> bytearray:
        return self._scratch

    @property
    def pos(self) -> int:
        return self._start

    @pos.setter
    def pos(self, value: int) -> None:
        if not self._start <= value <= self._end or self._state != _HEADER:
            raise ValueError(f"pos {value} outside the unparsed bytes [{self._start}, {self._end}]")
        self._start = value

    @property
    def end(self) -> int:
        return self._end

    def parse(self) -> list[Union[Command, Completion]]:
        """Decode what is in the buffer (after ``advance``, or ``received_raw``); the events completed."""
        if self.failed is not None:
            raise self.failed
        try:
            self._process()
        except ProtocolError as exc:
            self.failed = exc
            raise
        out, self._events = self._events, []
        return out

    @property
    def idle(self) -> bool:
        """True when no partial frame is buffered (a clean place to close the connection)."""
        return self._state == _HEADER and self._start == self._end

    # -- internals
    def _avail(self) -> int:
        return self._end - self._start

    def _process(self) -> None:
        while True:
            st = self._state
            if st == _HEADER:
                hs = self.header_size
                if self._avail() < hs:
                    return
                raw = self._sv[self._start : self._start + hs]
                ev = self._parse_header(raw)
                self._event = ev
                self._hdr_raw = bytes(raw) if ev.flags & HDGST else b""
                self._start += hs
                self._state = _HDGST if ev.flags & HDGST else _PAYLOAD
                if self._state == _PAYLOAD:
                    self._begin_payload()
            elif st == _HDGST:
                if self._avail() < 4:
                    return
                (got,) = DIGEST.unpack_from(self._sv, self._start)
                self._start += 4
                if got != crc32c(self._hdr_raw):
                    raise ProtocolError("header digest mismatch")
                self._state = _PAYLOAD
                self._begin_payload()
            elif st == _PAYLOAD:
                dst = self._dst
                assert dst is not None
                need = len(dst) - self._dst_pos
                k = min(need, self._avail())
                if k:
                    dst[self._dst_pos : self._dst_pos + k] = self._sv[self._start : self._start + k]
                    self._dst_pos += k
                    self._start += k
                if self._dst_pos < len(dst):
                    return
                self._payload_done()
            else:  # _DDGST
                if self._avail() < 4:
                    return
                (got,) = DIGEST.unpack_from(self._sv, self._start)
                self._start += 4
                done = self._event
                assert done is not None
                payload = done.payload
                assert payload is not None
                done.digest_ok = got == crc32c(payload)
                self._finish()

    def _begin_payload(self) -> None:
        ev = self._event
        assert ev is not None
        n = self._payload_length(ev)
        if n == 0:
            self._dst = None
            self._finish()
            return
        dst = self._payload_target(ev, n)
        if dst is None:
            dst = allocate(n)
        elif len(dst) != n:
            raise ProtocolError(f"payload target has {len(dst)} bytes, frame carries {n}")
        self._dst = dst
        self._dst_pos = 0

    def _payload_done(self) -> None:
        ev = self._event
        assert ev is not None and self._dst is not None
        ev.payload = self._dst
        self._dst = None
        if ev.flags & DDGST:
            self._state = _DDGST
        else:
            self._finish()

    def _finish(self) -> None:
        ev = self._event
        assert ev is not None
        self._events.append(ev)
        self._event = None
        self._state = _HEADER


def allocate(n: int) -> memoryview:
    """A writable buffer of ``n`` bytes whose memory is committed as it is written (see ``LAZY_ALLOC_MIN``)."""
    if n < LAZY_ALLOC_MIN:
        return memoryview(bytearray(n))
    # private anonymous mapping: zero pages until touched; unmapped when the last view goes away
    return memoryview(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


class CommandDecoder(_Reader):
    """Agent side: bytes from a client -> ``Command`` events.

    ``target(opcode, length)`` may supply the buffer a WRITE payload is received into.
    Malformed framing (bad magic, unknown flag bits, oversized length) raises ``ProtocolError``;
    an unknown opcode with valid framing is returned as a ``Command`` for the agent to refuse.
    """

    header_size = COMMAND.size

    def __init__(self, target: Optional[Target] = None, **kw: int) -> None:
        super().__init__(**kw)
        self._target = target

    def _parse_header(self, raw: memoryview) -> Command:
        (magic, op, flags, tag, ext, off, length, region, roff, gen) = COMMAND.unpack(raw)
        if magic != COMMAND_MAGIC:
            raise ProtocolError(f"bad command magic 0x{magic:04x}")
        if flags & ~_KNOWN_FLAGS:
            raise ProtocolError(f"unknown command flags 0x{flags:02x}")
        if length > MAX_IO:
            raise ProtocolError(f"command length {length} exceeds {MAX_IO}")
        return Command(op, flags, tag, ext, off, length, region, roff, gen)

    def _payload_length(self, ev: Union[Command, Completion]) -> int:
        assert isinstance(ev, Command)
        return ev.length if ev.opcode in _CARRIES_PAYLOAD else 0

    def _payload_target(self, ev: Union[Command, Completion], n: int) -> Optional[memoryview]:
        assert isinstance(ev, Command)
        return self._target(ev.opcode, n) if self._target is not None else None

    def next_commands(self, data: Union[bytes, bytearray, memoryview]) -> list[Command]:
        return [e for e in self.feed(data) if isinstance(e, Command)]


class CompletionDecoder(_Reader):
    """Client side: bytes from an agent -> ``Completion`` events.

    ``target(tag, length)`` returns the caller's buffer for a successful READ's payload, so the data
    is received straight into it. Error completions carry a short message in an internal buffer.
    """

    header_size = COMPLETION.size

    def __init__(self, target: Optional[Target] = None, **kw: int) -> None:
        super().__init__(**kw)
        self._target = target

    def _parse_header(self, raw: memoryview) -> Completion:
        magic, status, flags, tag, length, _res, info = COMPLETION.unpack(raw)
        if magic != COMPLETION_MAGIC:
            raise ProtocolError(f"bad completion magic 0x{magic:04x}")
        if flags & ~_KNOWN_FLAGS:
            raise ProtocolError(f"unknown completion flags 0x{flags:02x}")
        limit = MAX_IO if status == Status.OK else MAX_MESSAGE
        if length > limit:
            raise ProtocolError(f"completion length {length} exceeds {limit}")
        return Completion(status, flags, tag, length, info)

    def _payload_length(self, ev: Union[Command, Completion]) -> int:
        assert isinstance(ev, Completion)
        return ev.length

    def _payload_target(self, ev: Union[Command, Completion], n: int) -> Optional[memoryview]:
        assert isinstance(ev, Completion)
        if ev.status != Status.OK or self._target is None:
            return None
        return self._target(ev.tag, n)

    def next_completions(self, data: Union[bytes, bytearray, memoryview]) -> list[Completion]:
        return [e for e in self.feed(data) if isinstance(e, Completion)]


def is_payload_opcode(opcode: int) -> bool:
    return opcode in _CARRIES_PAYLOAD


def known_opcode(opcode: int) -> bool:
    return opcode in _OPCODES


def total_length(frames: Iterable[Union[bytes, bytearray, memoryview]]) -> int:
    return sum(len(f) for f in frames)
