"""The shared-memory connection's posted-at-once path (``ShmConnection.start``): a READ whose caller
stopped waiting (cancelled, or abandoned by a hedged read that lost) must never have its data copied
into the caller's buffer when the agent's answer arrives late, and its bounce slot must come back.
The agent is scripted: completion frames are fed to the connection as if received."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nvpool.client.transport_shm import BOUNCE_ID, Region, ShmConnection
from nvpool.proto import dataplane as dp


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
        dest = bytearray(b"\x00" * 4096)
        fut = conn.start(dp.READ, 7, 0, 4096, 1, memoryview(dest))
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
        conn.bounce.view[region_offset : region_offset + 4096] = b"\xab" * 4096
        deliver(conn, dp.encode_completion(tag))
        await asyncio.sleep(0)
        assert bytes(dest) == b"\x00" * 4096, "a given-up read's data was copied into the caller's buffer"
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
        dest = bytearray(4096)
        rd = conn.start(dp.READ, 7, 0, 4096, 1, memoryview(dest))
        wr = conn.start(dp.WRITE, 7, 4096, 4096, 1, None, b"\x5a" * 4096)
        assert rd is not None and wr is not None
        await asyncio.sleep(0)  # the second command is corked until the loop turns
        cmds = [dp.COMMAND.unpack(f) for f in conn.transport.sent if len(f) == dp.COMMAND.size]  # type: ignore[union-attr]
        (r,), (w,) = [c for c in cmds if c[1] == dp.Opcode.READ_REGION], [c for c in cmds if c[1] == dp.Opcode.WRITE_REGION]
        # the write's bytes were placed in its slot before the command went out; the read's slot differs
        assert bytes(conn.bounce.view[w[8] : w[8] + 4096]) == b"\x5a" * 4096 and r[8] != w[8]
        conn.bounce.view[r[8] : r[8] + 4096] = b"\x33" * 4096
        deliver(conn, dp.encode_completion(r[3]) + dp.encode_completion(w[3]))
        comp = await rd
        conn.check(comp, dp.READ, 4096, memoryview(dest))
        conn.check(await wr, dp.WRITE, 4096, None)
        assert bytes(dest) == b"\x33" * 4096

    asyncio.run(go())
