"""Storage agent: drive labels and extent tables, zeroing, fences, and the data-plane server's refusals."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import uvloop

from nvpool.agents.core import AgentCore
from nvpool.agents.dataplane import start_tcp
from nvpool.agents.drive import DATA_OFFSET, SLOT_OFFSETS, Drive, DriveSpec
from nvpool.proto.units import parse_size
from nvpool.proto.transport import connect
from nvpool.proto import dataplane as dp
from nvpool.proto.records import ExtentRecord
from nvpool.proto.errors import RemoteError, StaleLayoutError, Status, UsageError

MiB = 1 << 20


def new_drive(tmp_path: Path, name: str = "d0", size: str = "64M") -> Drive:
    return Drive.open(DriveSpec.parse(f"file:{tmp_path / name}:{size}"))


def test_parse_size_and_spec() -> None:
    assert parse_size("8G") == 8 << 30 and parse_size("512M") == 512 * MiB and parse_size("4096") == 4096
    assert parse_size("1.5K") == 1536
    for bad in ["", "x", "-1G", "G"]:
        with pytest.raises(UsageError):
            parse_size(bad)
    assert DriveSpec.parse("file:/a/b:c.img:4G") == DriveSpec("/a/b:c.img", 4 << 30)
    with pytest.raises(UsageError):
        DriveSpec.parse("file:nosize")


def test_label_survives_reopen_with_extents(tmp_path: Path) -> None:
    d = new_drive(tmp_path)
    rec = ExtentRecord(5, d.drive_id, DATA_OFFSET, MiB, 9, 3)
    core = AgentCore([d])
    core.assign([rec], zero=True)
    drive_id = d.drive_id
    core.close()
    d2 = Drive.open(DriveSpec(str(tmp_path / "d0")))
    assert d2.drive_id == drive_id
    assert AgentCore([d2]).extents == {5: rec}


def test_torn_table_slot_falls_back_to_the_other(tmp_path: Path) -> None:
    d = new_drive(tmp_path)
    core = AgentCore([d])
    r1 = ExtentRecord(1, d.drive_id, DATA_OFFSET, MiB, 1, 1)
    r2 = ExtentRecord(2, d.drive_id, DATA_OFFSET + MiB, MiB, 1, 1)
    core.assign([r1], zero=False)
    core.assign([r2], zero=False)  # second save goes to the other slot
    latest = SLOT_OFFSETS[d._table_seq % 2]
    os.pwrite(d.fd, b"garbage!", latest + 40)  # tear the newest table
    assert {r.extent_id for r in d.load_extents()} == {1}


def test_refuses_foreign_data_and_missing_path(tmp_path: Path) -> None:
    p = tmp_path / "foreign"
    p.write_bytes(b"precious data" + bytes(16 * MiB))
    with pytest.raises(UsageError, match="no nvpool label"):
        Drive.open(DriveSpec(str(p)))
    assert p.read_bytes().startswith(b"precious data")
    with pytest.raises(UsageError, match="does not exist"):
        Drive.open(DriveSpec(str(tmp_path / "nope")))


def test_assign_zeroes_old_bytes_and_release_fence(tmp_path: Path) -> None:
    d = new_drive(tmp_path)
    os.pwrite(d.fd, b"\xAA" * MiB, DATA_OFFSET)  # a previous volume's bytes
    core = AgentCore([d])
    core.assign([ExtentRecord(1, d.drive_id, DATA_OFFSET, MiB, 1, 1)], zero=True)
    assert os.pread(d.fd, MiB, DATA_OFFSET) == bytes(MiB)
    assert core.fence(1, 4) == 1 and core.extents[1].min_generation == 4
    assert core.fence(1, 2) == 1 and core.extents[1].min_generation == 4  # fences never go back
    with pytest.raises(UsageError):  # same id, other placement
        core.assign([ExtentRecord(1, d.drive_id, DATA_OFFSET + MiB, MiB, 1, 1)], zero=True)
    core.release([1])
    assert core.extents == {} and d.load_extents() == []


async def _with_agent(tmp_path: Path, body):  # type: ignore[no-untyped-def]
    d = new_drive(tmp_path)
    core = AgentCore([d])
    core.assign([ExtentRecord(7, d.drive_id, DATA_OFFSET, 4 * MiB, 1, 2)], zero=True)
    srv = await start_tcp(core, "127.0.0.1", 0)
    addr = "127.0.0.1:%d" % srv.sockets[0].getsockname()[1]
    try:
        await body(addr, core)
    finally:
        srv.close()
        core.close()


def test_dataplane_refusals(tmp_path: Path) -> None:
    async def body(addr: str, core: AgentCore) -> None:
        c = await connect(addr)
        data = os.urandom(10000)
        await c.submit(dp.Opcode.WRITE, 7, 123, len(data), 2, payload=data)
        out = memoryview(bytearray(len(data)))
        await c.submit(dp.Opcode.READ, 7, 123, len(data), 2, dest=out)
        assert out == data
        cases = [
            (dict(extent_id=99, offset=0, length=10, generation=2), Status.NO_EXTENT),
            (dict(extent_id=7, offset=4 * MiB - 5, length=10, generation=2), Status.OUT_OF_RANGE),
            (dict(extent_id=7, offset=0, length=10, generation=1), Status.STALE_LAYOUT),
        ]
        for kw, status in cases:
            with pytest.raises(RemoteError) as ei:
                await c.submit(dp.Opcode.READ, kw["extent_id"], kw["offset"], kw["length"], kw["generation"],
                               dest=memoryview(bytearray(10)))
            assert ei.value.status == status
        with pytest.raises(StaleLayoutError) as stale:
            await c.submit(dp.Opcode.WRITE, 7, 0, 3, 1, payload=b"abc")
        assert stale.value.info == 2
        with pytest.raises(RemoteError) as ei:
            await c.submit(0x7E, 7, 0, 0, 2)
        assert ei.value.status == Status.INVALID
        await c.submit(dp.Opcode.READ, 7, 123, len(data), 2, dest=out)  # nothing above changed the bytes
        assert out == data
        assert core.stats.errors["STALE_LAYOUT"] == 2

    uvloop.run(_with_agent(tmp_path, body))


def test_digest_mismatch_is_refused_and_connection_survives(tmp_path: Path) -> None:
    async def body(addr: str, core: AgentCore) -> None:
        host, port = addr.split(":")
        r, w = await asyncio.open_connection(host, int(port))
        data = b"x" * 5000
        flags = dp.Flag.HDGST | dp.Flag.DDGST
        hdr = dp.encode_command(dp.Opcode.WRITE, 1, 7, 0, len(data), 2, flags)
        w.write(hdr + data + dp.DIGEST.pack(dp.crc32c(data) ^ 1))
        w.write(dp.encode_command(dp.Opcode.NOP, 2, 0, 0, 0, 0))
        dec = dp.CompletionDecoder()
        events: list[dp.Completion] = []
        while len(events) < 2:
            events += dec.next_completions(await r.read(65536))
        assert [(e.tag, e.status) for e in events] == [(1, Status.DIGEST), (2, Status.OK)]
        check = memoryview(bytearray(5000))
        c = await connect(addr)
        await c.submit(dp.Opcode.READ, 7, 0, 5000, 2, dest=check)
        assert bytes(check) == bytes(5000)  # the corrupted write was not applied
        w.close()

    uvloop.run(_with_agent(tmp_path, body))


def test_malformed_command_drops_only_that_connection(tmp_path: Path) -> None:
    async def body(addr: str, core: AgentCore) -> None:
        good = await connect(addr)
        host, port = addr.split(":")
        s = socket.create_connection((host, int(port)))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(100))
        s.settimeout(5)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, s.recv, 100) == b""  # closed by the agent
        s.close()
        await good.submit(dp.Opcode.NOP, 0, 0, 0, 0)  # the other client is still served
        again = await connect(addr)
        await again.submit(dp.Opcode.NOP, 0, 0, 0, 0)

    uvloop.run(_with_agent(tmp_path, body))


def test_copy_never_overwrites_a_client_write_made_during_the_copy(tmp_path: Path) -> None:
    d = new_drive(tmp_path)
    core = AgentCore([d])
    core.assign([ExtentRecord(3, d.drive_id, DATA_OFFSET, MiB, 1, 1)], zero=True)
    cp = core.begin_copy(3, 0, 64 * 1024)
    # a client writes into the middle of the range after the copy read its (older) source bytes
    cmd = dp.Command(dp.Opcode.WRITE, 0, 1, 3, 1000, 10, generation=1)
    core.write(cmd, memoryview(b"N" * 10))
    cmd2 = dp.Command(dp.Opcode.WRITE_ZEROES, 0, 2, 3, 60000, 100, generation=1)
    core.zero(cmd2)
    old = memoryview(b"O" * (64 * 1024))
    applied = core.finish_copy(cp, old)
    assert applied == 64 * 1024 - 10 - 100
    got = os.pread(d.fd, 64 * 1024, DATA_OFFSET)
    assert got[:1000] == b"O" * 1000 and got[1000:1010] == b"N" * 10 and got[1010:60000] == b"O" * 58990
    assert got[60000:60100] == bytes(100) and got[60100:] == b"O" * (64 * 1024 - 60100)
    # once finished, later writes are not tracked and a new copy overwrites as usual
    cp2 = core.begin_copy(3, 0, 10)
    assert core.finish_copy(cp2, memoryview(b"P" * 10)) == 10
    assert core._copies == {}


class _CongestedTransport:
    """Looks like a socket whose send buffer is full: nothing can bypass the queue."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent: list[bytes] = []

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 1  # always something queued

    def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def writelines(self, frames: list[bytes]) -> None:
        self.sent.extend(bytes(f) for f in frames)

    def is_closing(self) -> bool:
        return False


def test_large_read_while_congested_is_still_answered(tmp_path: Path) -> None:
    """Regression: a large read while the transport is congested (it once went through sendfile and fell
    back to the queue) was once never answered."""
    from nvpool.agents.dataplane import AgentConnection

    d = new_drive(tmp_path)
    core = AgentCore([d])
    core.assign([ExtentRecord(7, d.drive_id, DATA_OFFSET, 4 * MiB, 1, 1)], zero=True)
    os.pwrite(d.fd, b"\x5a" * (256 * 1024), DATA_OFFSET)
    a, b = socket.socketpair()
    conn = AgentConnection(core)
    tr = _CongestedTransport(a)
    conn.connection_made(tr)  # type: ignore[arg-type]
    frames = dp.encode_command(dp.Opcode.NOP, 1, 0, 0, 0, 0) + dp.encode_command(dp.Opcode.READ, 2, 7, 0, 256 * 1024, 1)
    buf = conn.get_buffer(-1)
    buf[: len(frames)] = frames
    conn.buffer_updated(len(frames))
    events = dp.CompletionDecoder().next_completions(b"".join(tr.sent))
    assert [(e.tag, e.status) for e in events] == [(1, 0), (2, 0)]
    assert events[1].payload is not None and bytes(events[1].payload) == b"\x5a" * (256 * 1024)
    a.close()
    b.close()


def test_assign_refuses_an_extent_over_bytes_another_extent_holds(tmp_path: Path) -> None:
    """Two live extents never share bytes: a stale client of one could write into the other."""
    d = new_drive(tmp_path)
    core = AgentCore([d])
    core.assign([ExtentRecord(1, d.drive_id, DATA_OFFSET, 4 * MiB, 1, 1)], zero=True)
    for off, n in ((DATA_OFFSET, MiB), (DATA_OFFSET + 3 * MiB, 2 * MiB)):
        with pytest.raises(UsageError, match="overlap extent 1"):
            core.assign([ExtentRecord(2, d.drive_id, off, n, 2, 1)], zero=True)
    for off, n in ((DATA_OFFSET - MiB, 2 * MiB), (d.data_end - MiB, 2 * MiB)):  # into the label or sums area
        with pytest.raises(UsageError, match="does not fit"):
            core.assign([ExtentRecord(2, d.drive_id, off, n, 2, 1)], zero=True)
    # two new extents that overlap each other in one request
    with pytest.raises(UsageError, match="overlap"):
        core.assign([ExtentRecord(3, d.drive_id, DATA_OFFSET + 8 * MiB, 2 * MiB, 2, 1),
                     ExtentRecord(4, d.drive_id, DATA_OFFSET + 9 * MiB, 2 * MiB, 2, 1)], zero=True)
    assert set(core.extents) == {1}
    core.assign([ExtentRecord(2, d.drive_id, DATA_OFFSET + 4 * MiB, MiB, 2, 1)], zero=True)  # adjacent: fine
    core.assign([ExtentRecord(1, d.drive_id, DATA_OFFSET, 4 * MiB, 1, 1)], zero=True)  # idempotent re-assign
    assert set(core.extents) == {1, 2}


def test_reconciliation_drops_and_raises_fences_but_never_adds(tmp_path: Path) -> None:
    d = new_drive(tmp_path)
    core = AgentCore([d])
    r1 = ExtentRecord(1, d.drive_id, DATA_OFFSET, MiB, 1, 1)
    r2 = ExtentRecord(2, d.drive_id, DATA_OFFSET + MiB, MiB, 1, 5)
    core.assign([r1, r2], zero=True)
    new = ExtentRecord(3, d.drive_id, DATA_OFFSET + 2 * MiB, MiB, 1, 1)
    dropped = core.keep_only([ExtentRecord(1, d.drive_id, DATA_OFFSET, MiB, 1, 4),
                              ExtentRecord(2, d.drive_id, DATA_OFFSET + MiB, MiB, 1, 2), new])
    assert dropped == [] and set(core.extents) == {1, 2}  # 3 was not added
    assert core.extents[1].min_generation == 4 and core.extents[2].min_generation == 5  # never lowered
    assert core.keep_only([core.extents[2]]) == [1]
    assert AgentCore([d]).extents == {2: core.extents[2]}  # persisted


def test_a_drive_is_served_by_one_agent_at_a_time(tmp_path: Path) -> None:
    d = new_drive(tmp_path)
    with pytest.raises(UsageError, match="in use by another nvpool agent"):
        Drive.open(DriveSpec(str(tmp_path / "d0")))
    d.close()
    Drive.open(DriveSpec(str(tmp_path / "d0"))).close()


def test_pool_id_is_written_to_the_label(tmp_path: Path) -> None:
    d = new_drive(tmp_path)
    assert d.pool_id == ""
    d.set_pool("p1")
    d.close()
    again = Drive.open(DriveSpec(str(tmp_path / "d0")))
    assert again.pool_id == "p1" and again.drive_id == d.drive_id


def test_a_slow_flush_does_not_stall_other_commands(tmp_path: Path) -> None:
    """fdatasync runs on the drive's worker thread: while one FLUSH waits on a slow drive, reads on
    the same connection are answered (issue 11.8: one slow drive stalled the whole agent)."""
    async def body(addr: str, core: AgentCore) -> None:
        drive = next(iter(core.drives.values()))
        real = drive.flush
        started = threading.Event()

        def slow_flush() -> None:
            started.set()
            time.sleep(1.0)
            real()

        drive.flush = slow_flush  # type: ignore[method-assign]
        c = await connect(addr)
        flush = asyncio.ensure_future(c.submit(dp.Opcode.FLUSH, 0, 0, 0, 2))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        t0 = time.monotonic()
        out = memoryview(bytearray(4096))
        await c.submit(dp.Opcode.READ, 7, 0, 4096, 2, dest=out)
        assert time.monotonic() - t0 < 0.5, "a read waited for another command's fdatasync"
        assert not flush.done()
        await asyncio.wait_for(flush, 5)  # and the FLUSH completes once the drive is done
        # a FLUSH of an unknown extent is refused at once
        with pytest.raises(RemoteError) as ei:
            await c.submit(dp.Opcode.FLUSH, 99, 0, 0, 2)
        assert ei.value.status == Status.NO_EXTENT
        c.close()

    uvloop.run(_with_agent(tmp_path, body))


def test_discovery_skips_devices_that_are_in_use(tmp_path: Path) -> None:
    """--discover-nvme takes only namespaces that hold nothing: mounted, partitioned, held by
    device-mapper, or carrying a file system are skipped, each with its reason; an nvpool drive is ours."""
    from nvpool.agents import osio
    from nvpool.agents.drive import LABEL_MAGIC

    sysb = tmp_path / "sys"
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/nvme0n1p2 / ext4 rw 0 0\n/dev/nvme3n1 /data xfs rw 0 0\n")

    def dev(name: str, head: bytes = b"", parts: tuple[str, ...] = (), holders: tuple[str, ...] = ()) -> str:
        d = sysb / name
        d.mkdir(parents=True)
        for p in parts:
            (d / p).mkdir()
        (d / "holders").mkdir()
        for h in holders:
            (d / "holders" / h).mkdir()
        img = tmp_path / name
        img.write_bytes(head.ljust(0x20000, b"\0"))
        return str(img)

    ext4 = bytearray(0x20000)
    ext4[0x438:0x43A] = b"\x53\xef"
    cases = {
        dev("nvme0n1", parts=("nvme0n1p1", "nvme0n1p2")): "mounted on / (the boot device)",
        dev("nvme1n1", parts=("nvme1n1p1",)): "has partitions",
        dev("nvme2n1", holders=("dm-0",)): "held by dm-0",
        dev("nvme3n1"): "mounted on /data",
        dev("nvme4n1", head=bytes(ext4)): "ext2/3/4",
        dev("nvme5n1"): "",
        dev("nvme6n1", head=LABEL_MAGIC + b"{}"): "",
    }
    for path, want in cases.items():
        got = osio.in_use(path, sys_block=sysb, mounts=str(mounts), own_magic=LABEL_MAGIC)
        if want:
            assert got is not None and want in got, (path, got)
        else:
            assert got is None, (path, got)


def test_the_agent_keeps_at_most_max_connections_open(tmp_path: Path) -> None:
    """An agent-wide bound: connections beyond ``max_connections`` are closed as they arrive, and a
    slot frees when a connection goes."""
    import asyncio as aio

    from nvpool.agents.core import AgentCore
    from nvpool.agents.dataplane import start_tcp
    from nvpool.agents.drive import Drive, DriveSpec
    from nvpool.proto import dataplane as dp

    async def body() -> None:
        core = AgentCore([Drive.open(DriveSpec.parse(f"file:{tmp_path / 'd.img'}:64M"))])
        core.max_connections = 3
        srv = await start_tcp(core, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            conns = [await aio.open_connection("127.0.0.1", port) for _ in range(5)]
            alive = []
            for r, w in conns:  # a NOP each: the kept ones answer, the refused ones are closed
                w.write(dp.encode_command(dp.NOP, 1))
                await w.drain()
                try:
                    got = await aio.wait_for(r.read(dp.COMPLETION.size), 5)
                except ConnectionError:
                    got = b""
                alive.append(len(got) == dp.COMPLETION.size)
            assert alive == [True, True, True, False, False], alive
            conns[0][1].close()
            await aio.sleep(0.2)
            r, w = await aio.open_connection("127.0.0.1", port)
            w.write(dp.encode_command(dp.NOP, 2))
            assert len(await aio.wait_for(r.read(dp.COMPLETION.size), 5)) == dp.COMPLETION.size
            for _, w2 in conns[1:] + [(r, w)]:
                w2.close()
        finally:
            srv.close()
            core.close()

    aio.run(body())
