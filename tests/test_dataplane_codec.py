"""The data-plane codec: whole, byte by byte, with garbage; only ProtocolError may escape."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvpool.proto import dataplane as dp
from nvpool.proto.errors import ProtocolError, Status


def cmd_frames(op: int, tag: int, length: int, payload: bytes | None = None, flags: int = 0, **kw: int) -> bytes:
    hdr = dp.encode_command(op, tag, kw.get("extent", 7), kw.get("offset", 0), length, kw.get("gen", 1), flags)
    return b"".join(bytes(f) for f in dp.command_frames(hdr, payload, flags))


def stream_of_commands() -> tuple[bytes, list[tuple[int, int, bytes | None]]]:
    parts: list[bytes] = []
    expect: list[tuple[int, int, bytes | None]] = []
    for i in range(20):
        if i % 3 == 0:
            data = os.urandom(1 + i * 997)
            flags = dp.Flag.HDGST | dp.Flag.DDGST if i % 2 else 0
            parts.append(cmd_frames(dp.Opcode.WRITE, i, len(data), data, flags))
            expect.append((dp.Opcode.WRITE, i, data))
        else:
            parts.append(cmd_frames(dp.Opcode.READ, i, 4096 * i, flags=dp.Flag.HDGST if i % 2 else 0))
            expect.append((dp.Opcode.READ, i, None))
    return b"".join(parts), expect


def check_commands(events: list[dp.Command], expect: list[tuple[int, int, bytes | None]]) -> None:
    assert [(e.opcode, e.tag) for e in events] == [(op, tag) for op, tag, _ in expect]
    for e, (_, _, data) in zip(events, expect):
        assert e.digest_ok
        if data is None:
            assert e.payload is None
        else:
            assert e.payload is not None and bytes(e.payload) == data


def test_commands_whole_and_byte_by_byte() -> None:
    stream, expect = stream_of_commands()
    check_commands(dp.CommandDecoder().next_commands(stream), expect)
    dec = dp.CommandDecoder()
    events: list[dp.Command] = []
    for i in range(len(stream)):
        events += dec.next_commands(stream[i : i + 1])
    check_commands(events, expect)
    assert dec.idle


def test_commands_in_random_chunks() -> None:
    stream, expect = stream_of_commands()
    rng = __import__("random").Random(5)
    dec, events, pos = dp.CommandDecoder(scratch_size=8192), [], 0
    while pos < len(stream):
        n = rng.randint(1, 70000)
        events += dec.next_commands(stream[pos : pos + n])
        pos += n
    check_commands(events, expect)


def test_completion_payload_lands_in_target_buffer() -> None:
    data = os.urandom(300_000)
    dests = {5: memoryview(bytearray(len(data))), 6: memoryview(bytearray(10))}
    frames = dp.encode_completion(5, Status.OK, len(data)) + data
    frames += dp.error_completion(6, Status.STALE_LAYOUT, "fenced", info=9)
    dec = dp.CompletionDecoder(target=lambda tag, n: dests[tag])
    events: list[dp.Completion] = []
    # drive it the way a BufferedProtocol does
    pos = 0
    while pos < len(frames):
        buf = dec.get_buffer()
        k = min(len(buf), len(frames) - pos, 65536)
        buf[:k] = frames[pos : pos + k]
        pos += k
        events += [e for e in dec.advance(k) if isinstance(e, dp.Completion)]
    ok, err = events
    assert ok.payload is dests[5] and bytes(dests[5]) == data
    assert err.status == Status.STALE_LAYOUT and err.info == 9 and err.message == "fenced"
    assert bytes(dests[6]) == bytes(10)  # error payloads never go to the caller's buffer


def test_data_digest_mismatch_keeps_framing() -> None:
    data = os.urandom(5000)
    good = cmd_frames(dp.Opcode.WRITE, 1, len(data), data, dp.Flag.DDGST)
    bad = bytearray(cmd_frames(dp.Opcode.WRITE, 2, len(data), data, dp.Flag.DDGST))
    bad[dp.COMMAND.size + 100] ^= 0xFF
    events = dp.CommandDecoder().next_commands(bytes(bad) + good)
    assert [e.digest_ok for e in events] == [False, True]


def test_header_digest_mismatch_is_a_protocol_error() -> None:
    frame = bytearray(cmd_frames(dp.Opcode.READ, 1, 4096, flags=dp.Flag.HDGST))
    frame[10] ^= 1
    dec = dp.CommandDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(bytes(frame))
    with pytest.raises(ProtocolError):  # the decoder stays failed
        dec.feed(b"x")


@pytest.mark.parametrize(
    "frame",
    [
        b"XX" + bytes(46),  # bad magic
        dp.COMMAND.pack(dp.COMMAND_MAGIC, 1, 0x80, 1, 1, 0, 4096, 0, 0, 1),  # unknown flag
        dp.COMMAND.pack(dp.COMMAND_MAGIC, 2, 0, 1, 1, 0, dp.MAX_IO + 1, 0, 0, 1),  # too long
    ],
)
def test_malformed_commands(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        dp.CommandDecoder().feed(frame)


def test_unknown_opcode_is_returned_for_the_agent_to_refuse() -> None:
    (ev,) = dp.CommandDecoder().next_commands(dp.encode_command(0x7F, 3, 1, 0, 0, 1))
    assert ev.opcode == 0x7F and not dp.known_opcode(ev.opcode)


def test_trailing_partial_frame_waits() -> None:
    stream, expect = stream_of_commands()
    dec = dp.CommandDecoder()
    events = dec.next_commands(stream + b"NV\x01")
    check_commands(events, expect)
    assert not dec.idle


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
def test_fuzz_only_protocol_error_escapes(garbage: bytes, chunk: int) -> None:
    for dec in (dp.CommandDecoder(), dp.CompletionDecoder()):
        try:
            for i in range(0, len(garbage), chunk):
                dec.feed(garbage[i : i + chunk])
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=3000), st.booleans()), max_size=8))
def test_roundtrip_property(items: list[tuple[int, bytes, bool]]) -> None:
    stream = b""
    for tag, data, dg in items:
        flags = dp.Flag.HDGST | dp.Flag.DDGST if dg else 0
        stream += dp.encode_completion(tag, Status.OK, len(data), 0, flags) + data
        if dg and data:
            stream += dp.DIGEST.pack(dp.crc32c(data))
    events = dp.CompletionDecoder().next_completions(stream)
    assert [(e.tag, bytes(e.payload or b"")) for e in events] == [(t, d) for t, d, _ in items]
    assert all(e.digest_ok for e in events)


def test_data_digest_arriving_in_a_later_receive() -> None:
    data = os.urandom(3000)
    frame = cmd_frames(dp.Opcode.WRITE, 4, len(data), data, dp.Flag.DDGST)
    dec = dp.CommandDecoder()
    assert dec.next_commands(frame[:-2]) == []
    (ev,) = dec.next_commands(frame[-2:])
    assert ev.digest_ok and ev.payload is not None and bytes(ev.payload) == data


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_announced_payloads_commit_no_memory() -> None:
    """64 WRITE headers announcing 16 MiB each (3 KiB of input) must not cost 1 GiB: the decoder
    commits payload memory only as the bytes arrive."""
    before = _rss()
    decoders = []
    for i in range(64):
        dec = dp.CommandDecoder()
        assert dec.next_commands(cmd_frames(dp.Opcode.WRITE, i, dp.MAX_IO)) == []
        decoders.append(dec)
    assert _rss() - before < 64 * 1024 * 1024
    # a page of payload commits about a page, and the payload still arrives intact
    data = os.urandom(dp.MAX_IO)
    dec = decoders[0]
    assert dec.next_commands(data[:4096]) == []
    assert _rss() - before < 64 * 1024 * 1024
    (ev,) = dec.next_commands(data[4096:])
    assert ev.payload is not None and not ev.payload.readonly and bytes(ev.payload) == data


def test_large_payload_in_random_chunks_with_digest() -> None:
    data = os.urandom(dp.LAZY_ALLOC_MIN * 3 + 5)
    stream = cmd_frames(dp.Opcode.WRITE, 1, len(data), data, dp.Flag.HDGST | dp.Flag.DDGST)
    stream += cmd_frames(dp.Opcode.READ, 2, 4096)
    rng = __import__("random").Random(9)
    dec, events, pos = dp.CommandDecoder(), [], 0
    while pos < len(stream):
        n = rng.choice([1, 7, 4096, 100_000])
        events += dec.next_commands(stream[pos : pos + n])
        pos += n
    check_commands(events, [(dp.Opcode.WRITE, 1, data), (dp.Opcode.READ, 2, None)])
    assert dec.idle


def test_zero_length_commands_decode_whole_and_byte_by_byte() -> None:
    """Framing accepts 0-byte commands (no payload follows); refusing them is the agent's job."""
    stream = b"".join(cmd_frames(op, tag, 0) for tag, op in enumerate([dp.Opcode.WRITE, dp.Opcode.READ, 0x7E], 1))
    expect: list[tuple[int, int, bytes | None]] = [(dp.Opcode.WRITE, 1, None), (dp.Opcode.READ, 2, None), (0x7E, 3, None)]
    check_commands(dp.CommandDecoder().next_commands(stream + b"NV"), expect)
    dec = dp.CommandDecoder()
    events: list[dp.Command] = []
    for i in range(len(stream)):
        events += dec.next_commands(stream[i : i + 1])
    check_commands(events, expect)
    assert dec.idle
