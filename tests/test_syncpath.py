"""The blocking API's round trip (``client/syncpath.py``'s ``_Channel.call``): the compiled one
(``client/_csync.c``) against the pure-Python reference, on the same scripted agent.

Each case runs a scripted agent on the far end of a socketpair (a thread that reads the command and
answers with exactly the bytes the case gives, in the pieces and with the pauses it gives) and checks
that both implementations end the same way: the caller's buffer holding the payload, the same
exception class, the channel still aligned (a second command works) where the reference keeps it so,
and a silent agent costing one bounded wait.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Callable, Optional

import pytest

from nvpool.client import syncpath
from nvpool.client.syncpath import FastPathMiss, _Channel
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import Status

IMPLS = ["python"] + (["compiled"] if syncpath._csync is not None else [])
KiB = 1024
Cmd = tuple[int, ...]


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


class Agent:
    """Reads commands (and WRITE/AUTH payloads) and answers with ``script(command, payload)``: a list
    of byte pieces, each sent after a short pause; None closes the connection."""

    def __init__(self, sock: socket.socket, script: Callable[[Cmd, bytes], Optional[list[bytes]]]) -> None:
        self.sock, self.script = sock, script
        self.received: list[tuple[Cmd, bytes]] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            while True:
                cmd = dp.COMMAND.unpack(recv_exact(self.sock, dp.COMMAND.size))
                payload = recv_exact(self.sock, cmd[6]) if cmd[1] in (dp.WRITE, dp.Opcode.AUTH) else b""
                self.received.append((cmd, payload))
                pieces = self.script(cmd, payload)
                if pieces is None:
                    self.sock.close()
                    return
                for p in pieces:
                    time.sleep(0.002)
                    self.sock.sendall(p)
        except OSError:
            pass


def channel(impl: str, script: Callable[[Cmd, bytes], Optional[list[bytes]]], timeout: float = 5.0,
            sndbuf: int = 0) -> tuple[_Channel, Agent]:
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    a.settimeout(timeout)
    ch = _Channel.__new__(_Channel)
    ch._adopt(a, timeout, impl == "compiled")
    assert ch.compiled == (impl == "compiled")
    return ch, Agent(b, script)


def ok(cmd: Cmd, payload: bytes) -> list[bytes]:
    """A well-behaved agent: READ answers with bytes derived from the offset, in three pieces."""
    tag, offset, length = cmd[3], cmd[5], cmd[6]
    if cmd[1] == dp.READ:
        data = (struct.pack("<Q", offset) * (length // 8 + 1))[:length]
        frame = dp.encode_completion(tag, length=length) + data
        return [frame[:10], frame[10:30], frame[30:]]
    return [dp.encode_completion(tag)]


def expect_data(offset: int, length: int) -> bytes:
    return (struct.pack("<Q", offset) * (length // 8 + 1))[:length]


@pytest.mark.parametrize("impl", IMPLS)
def test_reads_and_writes_arrive_whole_whatever_the_pieces(impl: str) -> None:
    ch, agent = channel(impl, ok, sndbuf=16 * KiB)
    for size in (1, 512, 4 * KiB, 100 * KiB, 256 * KiB):
        dest = bytearray(size)
        ch.call(dp.READ, 3, 8 * size, size, 9, None, memoryview(dest))
        assert bytes(dest) == expect_data(8 * size, size)
    payload = bytes(range(256)) * (1024 * 4)  # 1 MiB through a 16 KiB socket buffer: many partial writes
    ch.call(dp.WRITE, 3, 0, len(payload), 9, memoryview(payload), None)
    cmd, got = agent.received[-1]
    assert got == payload and cmd[1] == dp.WRITE and cmd[4] == 3 and cmd[9] == 9
    ch.call(dp.Opcode.AUTH, 0, 0, 5, 0, b"token", None)
    assert agent.received[-1][1] == b"token"


def error(status: int, message: bytes) -> Callable[[Cmd, bytes], Optional[list[bytes]]]:
    state = {"n": 0}

    def script(cmd: Cmd, payload: bytes) -> list[bytes]:
        state["n"] += 1
        if state["n"] == 1:
            frame = dp.COMPLETION.pack(dp.COMPLETION_MAGIC, status, 0, cmd[3], len(message), 0, 0) + message
            return [frame[:20], frame[20:]]
        return ok(cmd, payload)

    return script


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("message", [b"", b"stale layout", b"x" * 100, b"y" * dp.MAX_MESSAGE])
def test_an_error_status_is_a_miss_and_the_channel_stays_aligned(impl: str, message: bytes) -> None:
    ch, _ = channel(impl, error(Status.STALE_LAYOUT, message))
    dest = bytearray(16)  # shorter than most messages: the message must not overrun it
    with pytest.raises(FastPathMiss, match=f"status {int(Status.STALE_LAYOUT)}"):
        ch.call(dp.READ, 3, 0, 16, 9, None, memoryview(dest))
    dest = bytearray(4 * KiB)
    ch.call(dp.READ, 3, 4096, 4 * KiB, 9, None, memoryview(dest))  # the next command works
    assert bytes(dest) == expect_data(4096, 4 * KiB)


def bad(kind: str) -> Callable[[Cmd, bytes], Optional[list[bytes]]]:
    def script(cmd: Cmd, payload: bytes) -> Optional[list[bytes]]:
        tag, length = cmd[3], cmd[6]
        if kind == "wrong tag":
            return [dp.encode_completion(tag + 1, length=length) + bytes(length)]
        if kind == "bad magic":
            return [b"\x00\x00" + dp.encode_completion(tag, length=length)[2:] + bytes(length)]
        if kind == "flags":
            return [dp.COMPLETION.pack(dp.COMPLETION_MAGIC, 0, dp.DDGST, tag, length, 0, 0) + bytes(length)]
        if kind == "short payload length":
            return [dp.encode_completion(tag, length=length - 1) + bytes(length - 1)]
        if kind == "payload on a write":
            return [dp.encode_completion(tag, length=8) + bytes(8)]
        if kind == "huge error message":
            return [dp.COMPLETION.pack(dp.COMPLETION_MAGIC, 1, 0, tag, dp.MAX_MESSAGE + 1, 0, 0)]
        if kind == "closed before the completion":
            return None
        if kind == "closed mid-payload":
            return [dp.encode_completion(tag, length=length) + bytes(length // 2), b""]
        raise AssertionError(kind)

    return script


KINDS = ["wrong tag", "bad magic", "flags", "short payload length", "payload on a write", "huge error message",
         "closed before the completion", "closed mid-payload"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_malformed_or_cut_answer_is_an_oserror(impl: str, kind: str) -> None:
    script = bad(kind)
    if kind == "closed mid-payload":
        inner = script

        def script(cmd: Cmd, payload: bytes) -> Optional[list[bytes]]:
            pieces = inner(cmd, payload)
            assert pieces is not None
            return pieces[:1] + [None]  # type: ignore[list-item]

    def run(cmd: Cmd, payload: bytes) -> Optional[list[bytes]]:
        pieces = script(cmd, payload)
        if pieces and pieces[-1] is None:
            agent.sock.sendall(pieces[0])
            return None
        return pieces

    ch, agent = channel(impl, run)
    if kind == "payload on a write":
        with pytest.raises(OSError):
            ch.call(dp.WRITE, 3, 0, 4 * KiB, 9, bytes(4 * KiB), None)
    else:
        with pytest.raises(OSError):
            ch.call(dp.READ, 3, 0, 4 * KiB, 9, None, memoryview(bytearray(4 * KiB)))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_silent_agent_costs_one_bounded_wait(impl: str) -> None:
    ch, _ = channel(impl, lambda cmd, payload: [], timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ch.call(dp.READ, 3, 0, 4 * KiB, 9, None, memoryview(bytearray(4 * KiB)))
    assert 0.25 <= time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("impl", IMPLS)
def test_an_agent_that_never_reads_costs_one_bounded_wait(impl: str) -> None:
    """A WRITE larger than the socket buffers to an agent that reads nothing: the send times out."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
    a.settimeout(0.3)
    ch = _Channel.__new__(_Channel)
    ch._adopt(a, 0.3, impl == "compiled")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ch.call(dp.WRITE, 3, 0, 4 << 20, 9, bytes(4 << 20), None)
    assert time.monotonic() - t0 < 3.0
    b.close()


# ---------------------------------------------------------------------- batched reads (read_batch)
class PipelinedAgent:
    """Reads commands as they come and answers them: in batches of whatever has arrived within a few
    milliseconds, in an order and in pieces chosen by a seeded RNG; ``answer(cmd)`` gives a command's
    completion frame (None: close the connection instead)."""

    def __init__(self, sock: socket.socket, answer: Callable[[Cmd], Optional[bytes]], seed: int) -> None:
        import random

        self.sock, self.answer, self.rng = sock, answer, random.Random(seed)
        self.received: list[Cmd] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        buf = b""
        try:
            while True:
                self.sock.settimeout(0.003)
                try:
                    chunk = self.sock.recv(1 << 16)
                except TimeoutError:
                    chunk = None
                if chunk == b"":
                    return
                if chunk:
                    buf += chunk
                    continue
                cmds = []
                while len(buf) >= dp.COMMAND.size:
                    cmds.append(dp.COMMAND.unpack(buf[: dp.COMMAND.size]))
                    buf = buf[dp.COMMAND.size :]
                self.rng.shuffle(cmds)
                self.sock.settimeout(None)
                for cmd in cmds:
                    self.received.append(cmd)
                    frame = self.answer(cmd)
                    if frame is None:
                        self.sock.close()
                        return
                    while frame:
                        k = self.rng.choice((7, 24, 100, 4096, 1 << 20))
                        self.sock.sendall(frame[:k])
                        frame = frame[k:]
        except OSError:
            pass


def data_for(cmd: Cmd) -> bytes:
    return expect_data(cmd[5] + cmd[4], cmd[6])  # derived from extent id and offset


def answer_ok(cmd: Cmd) -> Optional[bytes]:
    """READ only, plain (the batch sends nothing else); extent 66 is refused with a message."""
    magic, op, flags, tag, ext, off, length, region, roff, gen = cmd
    assert (magic, op, flags, region, roff) == (dp.COMMAND_MAGIC, dp.READ, 0, 0, 0), cmd
    if ext == 66:
        msg = b"stale layout: generation %d" % gen
        return dp.COMPLETION.pack(dp.COMPLETION_MAGIC, Status.STALE_LAYOUT, 0, tag, len(msg), 0, 7) + msg
    return dp.encode_completion(tag, length=length) + data_for(cmd)


def batch_channels(impl: str, answers: list[Callable[[Cmd], Optional[bytes]]], timeout: float = 5.0,
                   small_buffers: bool = False) -> tuple[syncpath.SyncChannels, list[PipelinedAgent]]:
    chans = syncpath.SyncChannels(timeout)
    agents = []
    for i, answer in enumerate(answers):
        a, b = socket.socketpair()
        if small_buffers:
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * KiB)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * KiB)
        a.settimeout(timeout)
        ch = _Channel.__new__(_Channel)
        ch._adopt(a, timeout, impl == "compiled")
        chans._channels()[f"agent{i}"] = ch
        agents.append(PipelinedAgent(b, answer, i))
    return chans, agents


def batch_of(n: int, seed: int, agents: int) -> list[tuple[str, int, int, memoryview]]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.choice((1, 512, 4 * KiB, 4 * KiB, 60 * KiB, 64 * KiB, 300 * KiB, 1 << 20))
        ext = 66 if rng.random() < 0.05 else rng.randrange(1, 9)
        out.append((f"agent{rng.randrange(agents)}", ext, rng.randrange(0, 1 << 30) & ~7, memoryview(bytearray(size))))
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(4))
def test_a_batch_reads_every_piece_whatever_the_order_and_pieces(impl: str, seed: int) -> None:
    chans, agents = batch_channels(impl, [answer_ok] * 3)
    reads = batch_of(200, seed, 3)
    got = chans.read_batch(reads, 9, 0, b"", {})
    for (addr, ext, off, dest), ok_ in zip(reads, got):
        assert ok_ == (ext != 66), (addr, ext)
        if ok_:
            assert bytes(dest) == expect_data(off + ext, len(dest))
    assert all(cmd[9] == 9 for a in agents for cmd in a.received)  # the layout generation
    assert chans.misses == got.count(False)
    # every connection is still aligned: a second batch works
    again = batch_of(50, seed + 100, 3)
    assert chans.read_batch(again, 9, 0, b"", {}) == [r[1] != 66 for r in again]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_keeps_reading_while_it_sends(impl: str) -> None:
    """Small socket buffers, 400 pipelined reads: the agent blocks sending answers unless they are read
    while the rest of the commands are still being sent."""
    chans, _ = batch_channels(impl, [answer_ok], small_buffers=True)
    reads = [("agent0", 1, i * 4096, memoryview(bytearray(4 * KiB))) for i in range(400)]
    assert all(chans.read_batch(reads, 9, 0, b"", {}))
    assert all(bytes(d) == expect_data(o + 1, 4 * KiB) for _a, _e, o, d in reads)


def broken(kind: str) -> Callable[[Cmd], Optional[bytes]]:
    state = {"n": 0}

    def answer(cmd: Cmd) -> Optional[bytes]:
        state["n"] += 1
        if state["n"] < 5:
            return answer_ok(cmd)
        tag, length = cmd[3], cmd[6]
        if kind == "closed":
            return None
        if kind == "closed mid-payload":
            frame = dp.encode_completion(tag, length=length) + data_for(cmd)
            return frame[: len(frame) // 2] if length > 2 else None
        if kind == "unknown tag":
            return dp.encode_completion(tag + 100000, length=length) + data_for(cmd)
        if kind == "bad magic":
            return b"\x00\x00" + (dp.encode_completion(tag, length=length) + data_for(cmd))[2:]
        if kind == "wrong length":
            return dp.encode_completion(tag, length=length + 1) + data_for(cmd) + b"!"
        if kind == "silent":
            return b""
        raise AssertionError(kind)

    return answer


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["closed", "closed mid-payload", "unknown tag", "bad magic", "wrong length", "silent"])
def test_a_broken_agent_costs_only_its_own_pieces_and_its_connection(impl: str, kind: str) -> None:
    chans, _ = batch_channels(impl, [answer_ok, broken(kind), answer_ok], timeout=0.5)
    reads = [(f"agent{i % 3}", 1 + i % 3, i * 8192, memoryview(bytearray(4 * KiB))) for i in range(60)]
    t0 = time.monotonic()
    got = chans.read_batch(reads, 9, 0, b"", {})
    assert time.monotonic() - t0 < 5.0
    for (addr, ext, off, dest), ok_ in zip(reads, got):
        if addr != "agent1":
            assert ok_ and bytes(dest) == expect_data(off + ext, 4 * KiB)
    assert not all(ok_ for (addr, *_), ok_ in zip(reads, got) if addr == "agent1")
    assert "agent1" not in chans._channels(), "the broken connection was kept"
    assert {"agent0", "agent2"} <= set(chans._channels())


@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_larger_than_one_compiled_call_is_read_in_parts(impl: str) -> None:
    chans, _ = batch_channels(impl, [answer_ok, answer_ok])
    n = syncpath.MAX_BATCH + 1500 if impl == "compiled" else 3000
    reads = [(f"agent{i % 2}", 1, i * 8, memoryview(bytearray(8))) for i in range(n)]
    assert all(chans.read_batch(reads, 9, 0, b"", {}))
    assert all(bytes(d) == expect_data(o + 1, 8) for _a, _e, o, d in reads[:: n // 50])


@pytest.mark.parametrize("impl", IMPLS)
def test_a_slow_but_steady_answer_is_not_a_timeout(impl: str) -> None:
    """A 1 MiB answer trickling in over about 1.5 s, with a 0.5 s timeout: bytes keep arriving, so the
    wait is not over (the timeout is for an agent that sends nothing at all)."""

    def trickle(cmd: Cmd) -> Optional[bytes]:
        frame = dp.encode_completion(cmd[3], length=cmd[6]) + data_for(cmd)
        step = len(frame) // 10
        while len(frame) > step:
            agent.sock.sendall(frame[:step])
            frame = frame[step:]
            time.sleep(0.15)
        return frame

    chans, (agent,) = batch_channels(impl, [trickle], timeout=0.5)
    dest = memoryview(bytearray(1 << 20))
    assert chans.read_batch([("agent0", 2, 0, dest)], 9, 0, b"", {}) == [True]
    assert bytes(dest) == expect_data(2, 1 << 20)
