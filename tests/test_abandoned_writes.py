"""A write given up on never lands after a newer one (``agents/dataplane.py``, "Abandoned connections";
the client's half in ``proto/transport.py``).

A client that abandons a connection to an overdue agent sends what was in flight again on another
connection at the same generation. The abandoned commands may still be in the agent's socket buffer and
be served later; the revocation presented first on the new connection makes the agent refuse them."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from nvpool.agents import dataplane as adp
from nvpool.agents.core import AgentCore
from nvpool.agents.drive import Drive, DriveSpec
from nvpool.proto import capability
from nvpool.proto import dataplane as dp
from nvpool.proto import transport as tp
from nvpool.proto.capability import Capability
from nvpool.proto.errors import Status, UnavailableError
from nvpool.proto.records import ExtentRecord

MiB = 1 << 20
SECRET = b"k" * 32
VOL = 5


def make_core(tmp_path: Path) -> AgentCore:
    drive = Drive.open(DriveSpec.parse(f"file:{tmp_path / 'd.img'}:64M"))
    core = AgentCore([drive])
    core.assign([ExtentRecord(3, drive.drive_id, 4 * MiB, 4 * MiB, VOL, 1, 1)], zero=True)
    core.secrets = [SECRET]
    return core


def cap(volume: int = VOL) -> bytes:
    return capability.sign(Capability(volume, capability.WRITE, 100, int(time.time()) + 600), SECRET)


def run(core: AgentCore, caps: dict[int, Capability], cmd: dp.Command) -> dp.Completion:
    out: list[bytes] = []
    adp.execute(core, cmd, {}, out, None, None, caps)
    comps = dp.CompletionDecoder().next_completions(b"".join(out))
    assert len(comps) == 1
    return comps[0]


def auth(tag: int, own: int, revoke: int = 0, volume: int = VOL) -> dp.Command:
    blob = cap(volume)
    return dp.Command(dp.Opcode.AUTH, 0, tag, extent_id=own, offset=revoke, length=len(blob), payload=memoryview(blob))


def write(tag: int, data: bytes) -> dp.Command:
    return dp.Command(dp.WRITE, 0, tag, extent_id=3, offset=0, length=len(data), generation=1,
                      payload=memoryview(data))


def on_drive(core: AgentCore, n: int) -> bytes:
    d = next(iter(core.drives.values()))
    rec = core.extents[3]
    return os.pread(d.fd, n, rec.drive_offset)


def test_an_abandoned_write_served_late_is_refused_and_never_overwrites_the_newer_ones(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    try:
        old: dict[int, Capability] = {}
        new: dict[int, Capability] = {}
        assert run(core, old, auth(1, own=0x1111)).status == 0
        # the client gave up on the old connection with WRITE "a" in it, unserved (the agent was hung);
        # on its new connection: revoke, the write again, then a newer write to the same block
        assert run(core, new, auth(2, own=0x2222, revoke=0x1111)).status == 0
        assert run(core, new, write(3, b"a" * 4096)).status == 0
        assert run(core, new, write(4, b"b" * 4096)).status == 0
        late = run(core, old, write(5, b"a" * 4096))  # the abandoned copy is served now
        assert late.status == Status.DENIED
        assert on_drive(core, 4096) == b"b" * 4096
        again = run(core, old, auth(6, own=0x1111))  # it cannot get its capability back
        assert again.status == Status.DENIED and "replaced" in again.message
        assert run(core, old, write(7, b"a" * 4096)).status == Status.DENIED
        assert on_drive(core, 4096) == b"b" * 4096
        # the revocation covered only the revoker's volume; ids in use cannot be taken by another connection
        other: dict[int, Capability] = {}
        assert run(core, other, auth(8, own=0x2222)).status == Status.DENIED
        adp.forget_connection(core, new)
        assert 0x2222 not in core.connection_caps
    finally:
        core.close()


def test_an_abandoned_connection_whose_auth_arrives_after_the_revocation_is_refused(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    try:
        old: dict[int, Capability] = {}
        new: dict[int, Capability] = {}
        assert run(core, new, auth(1, own=0x2222, revoke=0x1111)).status == 0  # old's AUTH never got here
        assert run(core, old, auth(2, own=0x1111)).status == Status.DENIED
        assert run(core, old, write(3, b"a" * 4096)).status == Status.DENIED
        assert on_drive(core, 4096) == bytes(4096)
    finally:
        core.close()


def test_a_refused_revocation_leaves_the_connection_nothing_and_readers_revoke_nothing(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    try:
        old: dict[int, Capability] = {}
        new: dict[int, Capability] = {}
        assert run(core, old, auth(1, own=0x1111)).status == 0
        assert run(core, new, auth(2, own=0x2222)).status == 0  # it holds a capability already
        bad = dp.Command(dp.Opcode.AUTH, 0, 3, extent_id=0x2222, offset=0x1111, length=3, payload=memoryview(b"bad"))
        assert run(core, new, bad).status == Status.DENIED
        # what the client resent behind the refused revocation is not served before a revocation is
        assert run(core, new, write(4, b"a" * 4096)).status == Status.DENIED
        reader = capability.sign(Capability(VOL, capability.READ, 100, int(time.time()) + 600), SECRET)
        ro: dict[int, Capability] = {}
        by_reader = dp.Command(dp.Opcode.AUTH, 0, 5, extent_id=0x3333, offset=0x1111, length=len(reader),
                               payload=memoryview(reader))
        assert run(core, ro, by_reader).status == 0
        assert run(core, old, write(6, b"c" * 4096)).status == 0  # a read capability revokes nothing
    finally:
        core.close()


class ScriptedAgent:
    """The far end of a socket pair: decodes ``want`` commands and answers each OK."""

    def __init__(self, want: int) -> None:
        import socket
        import threading

        self.client, self._end = socket.socketpair()
        self.seen: list[dp.Command] = []
        self._want = want
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        dec = dp.CommandDecoder()
        while len(self.seen) < self._want:
            data = self._end.recv(65536)
            if not data:
                return
            for cmd in dec.next_commands(data):
                self.seen.append(cmd)
                self._end.sendall(dp.encode_completion(cmd.tag, 0, 0, 0))

    def commands(self) -> list[tuple[int, int, int]]:
        self._thread.join(5)
        return [(c.opcode, c.extent_id, c.offset) for c in self.seen]

    def close(self) -> None:
        self.client.close()
        self._end.close()


def test_the_blocking_path_revokes_before_it_sends_anything_of_the_volume() -> None:
    from nvpool.client.syncpath import _Channel

    tp.ABANDONED.clear()
    tp.abandoned("agent:1", 0x1111, [VOL])
    agent = ScriptedAgent(2)
    try:
        ch = _Channel.__new__(_Channel)
        ch._adopt(agent.client, 5.0, False)
        ch.conn_id = 0x2222
        ch.authorize(VOL, b"cap", "agent:1")
        ch.call(dp.WRITE, 3, 0, 4, 1, b"aaaa", None)
        assert agent.commands() == [(dp.Opcode.AUTH, 0x2222, 0x1111), (dp.WRITE, 3, 0)]
        assert tp.ABANDONED == {}
    finally:
        agent.close()


def test_the_nbd_engines_fresh_connection_revokes_before_the_engine_gets_it() -> None:
    from nvpool.client.syncpath import present_revocations

    tp.ABANDONED.clear()
    present_revocations(None, "agent:1", VOL, b"cap", 0x3333, 5.0)  # type: ignore[arg-type]  # nothing to revoke: untouched
    tp.abandoned("agent:1", 0x1111, [VOL])
    tp.abandoned("agent:1", 0x2222, [VOL + 1])  # another volume's: not this engine's to revoke
    agent = ScriptedAgent(1)
    try:
        agent.client.settimeout(None)  # (the engine's sockets are blocking)
        present_revocations(agent.client, "agent:1", VOL, b"cap", 0x3333, 5.0)
        assert agent.commands() == [(dp.Opcode.AUTH, 0x3333, 0x1111)]
        assert tp.ABANDONED == {"agent:1": {0x2222: {VOL + 1}}}
        assert agent.client.gettimeout() is None  # left as the engine wants it
    finally:
        agent.close()
        tp.ABANDONED.clear()


class Transport:
    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: Any) -> None:
        self.sent += bytes(data)

    def writelines(self, frames: Any) -> None:
        for f in frames:
            self.write(f)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def abort(self) -> None:
        pass


def auths(sent: bytes) -> list[tuple[int, int]]:
    out = []
    dec = dp.CommandDecoder()
    for cmd in dec.next_commands(sent):
        if cmd.opcode == dp.Opcode.AUTH:
            out.append((cmd.extent_id, cmd.offset))
    return out


def test_the_client_revokes_a_connection_lost_with_commands_in_flight_before_anything_else() -> None:
    async def body() -> None:
        tp.ABANDONED.clear()
        first = tp.AgentConnection("10.9.9.9:1")  # (never connected: a fake transport records the frames)
        t1 = Transport()
        first.connection_made(t1)  # type: ignore[arg-type]
        first.authorize(VOL, b"cap")
        fut = first._post(dp.WRITE, 3, 0, 4, 1, b"aaaa", None, 0, 0, 0, 4)
        first.connection_lost(ConnectionResetError("gone"))  # given up on with the write in flight
        with pytest.raises(UnavailableError):
            await fut
        assert tp.ABANDONED == {"10.9.9.9:1": {first.conn_id: {VOL}}}
        second = tp.AgentConnection("10.9.9.9:1")
        t2 = Transport()
        second.connection_made(t2)  # type: ignore[arg-type]
        second.authorize(VOL, b"rocap")  # a reader: agents take revocations only with a write capability
        await asyncio.sleep(0)
        assert auths(bytes(t2.sent)) == [(second.conn_id, 0)] and tp.ABANDONED
        second.authorized.clear()
        t2.sent.clear()
        second.pending.clear()
        second.authorize(VOL, b"cap", write=True)
        await asyncio.sleep(0)
        assert auths(bytes(t2.sent)) == [(second.conn_id, first.conn_id)]  # the revocation comes first
        # the agent accepts it: forgotten; the next authorize posts nothing more
        tag = next(iter(second.pending))
        second.pending[tag].future.set_result(dp.Completion(0, 0, tag))
        await asyncio.sleep(0)
        assert tp.ABANDONED == {}
        n = len(t2.sent)
        second.authorize(VOL, b"cap", write=True)
        await asyncio.sleep(0)
        assert len(t2.sent) == n
        # a refused revocation leaves the agent's side of the connection no capability: the client
        # presents its capabilities again before anything else
        tp.abandoned("10.9.9.9:1", 0x77, [VOL])
        second.authorize(VOL, b"cap", write=True)
        tag = list(second.pending)[-1]
        second.pending[tag].future.set_result(dp.Completion(int(Status.DENIED), 0, tag))
        await asyncio.sleep(0)
        assert second.authorized == {} and tp.ABANDONED
        tp.ABANDONED.clear()
        for c in (first, second):
            if c._watch_handle is not None:
                c._watch_handle.cancel()

    asyncio.run(body())
