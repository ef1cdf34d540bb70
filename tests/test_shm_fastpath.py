"""The shared-memory connection's posted-at-once path (``ShmConnection.start``): a READ whose caller
stopped waiting (cancelled, or abandoned by a hedged read that lost) must never have its data copied
into the caller's buffer when the agent's answer arrives late, and its bounce slot must come back.
The agent is scripted: completion frames are fed to the connection as if received. I/O of at most
``ShmConnection.inline_max`` bytes whose buffer is not registered goes inline on the socket instead
(plain READ/WRITE), which the last tests check."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nvpool.client.transport_shm import BOUNCE_ID, Region, ShmConnection
from nvpool.proto import dataplane as dp

#: an I/O size that goes through the bounce region (above the inline limit)
N = 2 * getattr(ShmConnection, "inline_max", 64 * 1024)


class Sink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def writelines(self, frames: Any) -> None:
        self.sent.extend(bytes(f) for f in frames)

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def deliver(conn: ShmConnection, data: bytes) -> None:
    buf = conn.get_buffer(-1)
    buf[: len(data)] = data
    conn.buffer_updated(len(data))


@pytest.mark.parametrize("how", ["cancel", "abandon"])
def test_a_late_answer_never_lands_in_a_buffer_given_up(how: str) -> None:
    errors: list[Any] = []

    async def go() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        conn = ShmConnection("fake", 1 << 20, Region(BOUNCE_ID, 1 << 20), [])
        conn.connection_made(Sink())  # type: ignore[arg-type]
        dest = bytearray(b"\x00" * N)
        fut = conn.start(dp.READ, 7, 0, N, 1, memoryview(dest))
        assert fut is not None
        await asyncio.sleep(0)
        (hdr,) = [f for f in conn.transport.sent if len(f) == dp.COMMAND.size]  # type: ignore[union-attr]
        fields = dp.COMMAND.unpack(hdr)
        tag, region_offset = fields[3], fields[8]
        assert fields[1] == dp.Opcode.READ_REGION and fields[7] == BOUNCE_ID
        if how == "cancel":
            fut.cancel()
        else:
            conn.abandon(fut)
        await asyncio.sleep(0)
        # the agent answers late: the data is in the bounce slot, the completion on the socket
        conn.bounce.view[region_offset : region_offset + N] = b"\xab" * N
        deliver(conn, dp.encode_completion(tag))
        await asyncio.sleep(0)
        assert bytes(dest) == b"\x00" * N, "a given-up read's data was copied into the caller's buffer"
        assert not conn.pending
        # the slot is free again: a bounce-sized read fits
        again = conn.start(dp.READ, 7, 0, 1 << 20, 1, memoryview(bytearray(1 << 20)))
        assert again is not None
        again.cancel()

    asyncio.run(go())
    assert not errors, errors


def test_a_read_and_a_write_through_the_bounce_region() -> None:
    async def go() -> None:
        conn = ShmConnection("fake", 1 << 20, Region(BOUNCE_ID, 1 << 20), [])
        conn.connection_made(Sink())  # type: ignore[arg-type]
        dest = bytearray(N)
        rd = conn.start(dp.READ, 7, 0, N, 1, memoryview(dest))
        wr = conn.start(dp.WRITE, 7, N, N, 1, None, b"\x5a" * N)
        assert rd is not None and wr is not None
        await asyncio.sleep(0)  # the second command is corked until the loop turns
        cmds = [dp.COMMAND.unpack(f) for f in conn.transport.sent if len(f) == dp.COMMAND.size]  # type: ignore[union-attr]
        (r,), (w,) = [c for c in cmds if c[1] == dp.Opcode.READ_REGION], [c for c in cmds if c[1] == dp.Opcode.WRITE_REGION]
        # the write's bytes were placed in its slot before the command went out; the read's slot differs
        assert bytes(conn.bounce.view[w[8] : w[8] + N]) == b"\x5a" * N and r[8] != w[8]
        conn.bounce.view[r[8] : r[8] + N] = b"\x33" * N
        deliver(conn, dp.encode_completion(r[3]) + dp.encode_completion(w[3]))
        comp = await rd
        conn.check(comp, dp.READ, N, memoryview(dest))
        conn.check(await wr, dp.WRITE, N, None)
        assert bytes(dest) == b"\x33" * N

    asyncio.run(go())


def test_small_io_goes_inline_on_the_socket_and_registered_memory_through_its_region() -> None:
    """At most ``inline_max`` bytes: a plain READ (its data arrives in the completion, straight into
    the caller's buffer) and a plain WRITE (its payload on the socket), no bounce slot taken; a small
    read into registered memory still goes to its region (zero copies)."""

    async def go() -> None:
        user = Region(BOUNCE_ID + 1, 1 << 20)
        conn = ShmConnection("fake", 1 << 20, Region(BOUNCE_ID, 1 << 20), [user])
        conn.connection_made(Sink())  # type: ignore[arg-type]
        small = getattr(ShmConnection, "inline_max", 64 * 1024)
        dest = bytearray(small)
        rd = conn.start(dp.READ, 7, 0, small, 1, memoryview(dest))
        wr = conn.start(dp.WRITE, 7, small, 4096, 1, None, b"\x5a" * 4096)
        assert rd is not None and wr is not None
        assert conn.slots.free == [(0, 1 << 20)], "an inline I/O took a bounce slot"
        reg = asyncio.ensure_future(conn.submit(dp.READ, 7, 0, 4096, 1, dest=user.view[8192 : 8192 + 4096]))
        for _ in range(3):
            await asyncio.sleep(0)
        sent = b"".join(conn.transport.sent)  # type: ignore[union-attr]
        cmds, payloads = [], []
        at = 0
        while at < len(sent):
            c = dp.COMMAND.unpack_from(sent, at)
            cmds.append(c)
            n = c[6] if c[1] == dp.Opcode.WRITE else 0
            payloads.append(sent[at + dp.COMMAND.size : at + dp.COMMAND.size + n])
            at += dp.COMMAND.size + n
        ops = [(c[1], c[7]) for c in cmds]
        assert ops == [(dp.Opcode.READ, 0), (dp.Opcode.WRITE, 0), (dp.Opcode.READ_REGION, user.region_id)], ops
        assert payloads[1] == b"\x5a" * 4096  # the write's payload went inline
        assert cmds[2][8] == 8192
        data = bytes(range(256)) * (small // 256)
        deliver(conn, dp.encode_completion(cmds[0][3], length=small) + data + dp.encode_completion(cmds[1][3])
                + dp.encode_completion(cmds[2][3]))
        conn.check(await rd, dp.READ, small, memoryview(dest))
        conn.check(await wr, dp.WRITE, 4096, None)
        await reg
        assert bytes(dest) == data

    asyncio.run(go())
