"""The NBD export under hostile and degenerate input, against real processes: memory stays bounded
when a client stops reading replies or half-sends big writes, and every degenerate request gets the
same answer nbdkit gives (a table run against ``nvpool export --file`` and ``nbdkit file`` on the
same bytes). The export's log must never hold a traceback."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import pytest

from nvpool.client.nbd import proto as nbd

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
RSS_LIMIT_MIB = 256
EXPORT_SIZE = 96 * MiB
CONTENT = 32 * MiB  # random bytes at the start of the data export; the rest is sparse


# ---------------------------------------------------------------------------- a raw NBD client
class Peer:
    """A raw NBD client: fixed newstyle handshake (NBD_OPT_GO), then requests as bytes."""

    def __init__(self, path: str, structured: bool = False, block_size: bool = False, timeout: float = 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = structured
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT) and hflags & nbd.FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", nbd.C_FIXED_NEWSTYLE | nbd.C_NO_ZEROES))
        if structured:
            self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_STRUCTURED_REPLY, 0))
            assert self._option_reply()[0] == nbd.REP_ACK
        infos = [nbd.INFO_BLOCK_SIZE] if block_size else []
        body = struct.pack(">IH", 0, len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, len(body)) + body)
        self.size = 0
        self.transmission_flags = 0
        self.max_block = 0
        while True:
            rtype, data = self._option_reply()
            if rtype == nbd.REP_ACK:
                break
            assert rtype == nbd.REP_INFO, hex(rtype)
            (info,) = struct.unpack_from(">H", data)
            if info == nbd.INFO_EXPORT:
                self.size, self.transmission_flags = struct.unpack_from(">QH", data, 2)
            elif info == nbd.INFO_BLOCK_SIZE:
                self.max_block = struct.unpack_from(">III", data, 2)[2]

    def _option_reply(self) -> tuple[int, bytes]:
        _magic, _opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        return rtype, self.recv(length)

    def recv(self, n: int) -> bytes:
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise EOFError(f"connection closed after {got} of {n} bytes")
            got += k
        return bytes(out)

    def send(self, cmd: int, handle: int = 1, flags: int = 0, offset: int = 0, length: int = 0,
             payload: Union[bytes, bytearray, memoryview] = b"") -> None:
        self.sock.sendall(header(cmd, handle, flags, offset, length))
        if payload:
            self.sock.sendall(payload)

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(NBD error, handle, data) of the next reply; ``read_length``: the READ it answers."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == nbd.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv(12))
            return error, handle, self.recv(read_length) if read_length and not error else b""
        assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
        error, data = 0, bytearray()
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(length)
            if rtype & 0x8000:
                error = error or struct.unpack_from(">I", body)[0]
            elif rtype == nbd.REPLY_TYPE_OFFSET_DATA:
                data += body[8:]
            if flags & nbd.REPLY_FLAG_DONE:
                return error, handle, bytes(data)
            (magic,) = struct.unpack(">I", self.recv(4))

    def closed(self) -> bool:
        """The server closed this connection (nothing else is pending on it)."""
        if not select.select([self.sock], [], [], 0.05)[0]:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def header(cmd: int, handle: int = 1, flags: int = 0, offset: int = 0, length: int = 0) -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length)


# ---------------------------------------------------------------------------- servers
@dataclass
class Server:
    proc: "subprocess.Popen[bytes]"
    sock: str
    pid: int
    log: Optional[Path] = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_export(workdir: Path, image: Path) -> Server:
    return spawn_export(workdir, "export", ["export", "--file", str(image)])


def spawn_export(workdir: Path, name: str, args: list[str]) -> Server:
    """``nvpool ARGS --socket workdir/NAME.sock``, logging to workdir/NAME.log, once it is ready."""
    sock, log = str(workdir / f"{name}.sock"), workdir / f"{name}.log"
    ready = sock + ".ready"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nvpool", *args, "--socket", sock, "--ready-file", ready],
                                stderr=out, cwd=ROOT)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "export did not start"
        time.sleep(0.02)
    with open(ready) as f:
        return Server(proc, sock, json.load(f)["pid"], log)


def start_nbdkit(workdir: Path, image: Path) -> Server:
    sock = str(workdir / "nbdkit.sock")
    log = workdir / "nbdkit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["nbdkit", "-f", "--unix", sock, "file", str(image)], stderr=out)
    deadline = time.monotonic() + 30
    while True:  # ready when a real connection gets a greeting
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "nbdkit did not start"
        try:
            Peer(sock, timeout=2).close()
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.02)
    return Server(proc, sock, proc.pid, log)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def peak_rss_mib(pid: int, seconds: float) -> float:
    """Highest RSS seen over ``seconds`` (stops early once over the limit)."""
    peak, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, rss_mib(pid))
        if peak > RSS_LIMIT_MIB:
            break
        time.sleep(0.02)
    return peak


def assert_clean_log(server: Server) -> None:
    text = server.log_text()
    assert "Traceback" not in text and "Fatal error" not in text, text[-3000:]


@pytest.fixture(scope="module")
def data_export(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, bytes]]:
    work = tmp_path_factory.mktemp("nbd-hostile")
    content = os.urandom(CONTENT)
    image = work / "data.img"
    with open(image, "wb") as f:
        f.write(content)
        f.truncate(EXPORT_SIZE)
    server = start_export(work, image)
    try:
        yield server, content
    finally:
        server.stop()


# ---------------------------------------------------------------------------- memory under hostile clients
def test_pipelined_reads_whose_replies_are_never_read_keep_memory_bounded(data_export: tuple[Server, bytes]) -> None:
    server, content = data_export
    before = rss_mib(server.pid)
    hostile = Peer(server.sock)
    n = 1500
    hostile.sock.sendall(b"".join(header(nbd.CMD_READ, i, 0, (i % 32) * MiB, MiB) for i in range(n)))
    peak = peak_rss_mib(server.pid, 1.5)
    print(f"\nexport RSS: {before:.0f} MiB before, {peak:.0f} MiB peak with {n} x 1 MiB READs unread")
    assert peak < RSS_LIMIT_MIB, f"export grew from {before:.0f} to {peak:.0f} MiB"

    normal = Peer(server.sock, structured=True)  # served meanwhile, on its own connection
    blob = os.urandom(4096)
    normal.send(nbd.CMD_WRITE, 7, nbd.CMD_FLAG_FUA, 90 * MiB, len(blob), blob)
    assert normal.reply()[:2] == (0, 7)
    normal.send(nbd.CMD_READ, 8, 0, 90 * MiB, len(blob))
    assert normal.reply(len(blob)) == (0, 8, blob)
    normal.close()

    seen = set()  # the stalled client resumes: every reply arrives, each with the right bytes
    for _ in range(n):
        error, handle, data = hostile.reply(MiB)
        off = (handle % 32) * MiB
        assert error == 0 and data == content[off : off + MiB], handle
        seen.add(handle)
    assert seen == set(range(n))
    hostile.close()
    print(f"export RSS after draining: {rss_mib(server.pid):.0f} MiB")
    assert_clean_log(server)


def test_half_sent_big_writes_keep_memory_bounded_and_are_served(data_export: tuple[Server, bytes]) -> None:
    server, _ = data_export
    before = rss_mib(server.pid)
    size, offset = nbd.HARD_MAX_REQUEST, 32 * MiB  # 64 MiB: above the advertised 32 MiB, below the limit
    pattern = os.urandom(MiB) * (size // MiB)
    stalled = []
    for i in range(16):  # each announces 64 MiB (1 GiB in all) and sends 1 MiB of it
        p = Peer(server.sock)
        p.send(nbd.CMD_WRITE, i, 0, offset, size, pattern[:MiB])
        stalled.append(p)
    peak = peak_rss_mib(server.pid, 1.0)
    print(f"\nexport RSS: {before:.0f} MiB before, {peak:.0f} MiB peak with 16 half-sent 64 MiB WRITEs")
    assert peak < RSS_LIMIT_MIB
    assert not any(p.closed() for p in stalled), "a WRITE above 32 MiB from a client that did not negotiate block sizes was refused"

    first = stalled.pop(0)  # one completes: served whole
    first.sock.sendall(pattern[MiB:])
    assert first.reply()[:2] == (0, 0)
    first.send(nbd.CMD_READ, 1, 0, offset + size - MiB, MiB)
    assert first.reply(MiB) == (0, 1, pattern[-MiB:])
    first.close()
    for p in stalled:  # the rest hang up half-way: dropped quietly, the export goes on
        p.close()
    after = Peer(server.sock)
    after.send(nbd.CMD_FLUSH, 3)
    assert after.reply()[:2] == (0, 3)
    after.close()
    assert_clean_log(server)


# ---------------------------------------------------------------------------- degenerate requests: same answers as nbdkit
@dataclass(frozen=True)
class Case:
    name: str
    cmd: int
    expect: Union[int, str]  # NBD error code, or "closed"
    flags: int = 0
    offset: int = 0
    length: int = 0
    payload: Optional[int] = None  # bytes sent after the header (default: length for WRITE)
    structured: bool = False


END = EXPORT_SIZE
CASES = [
    Case("unknown flag on READ", nbd.CMD_READ, nbd.EINVAL, flags=0x40, length=4096),
    Case("unknown flag on READ, structured", nbd.CMD_READ, nbd.EINVAL, flags=0x40, length=4096, structured=True),
    Case("unknown flag on WRITE", nbd.CMD_WRITE, nbd.EINVAL, flags=0x8000, length=4096),
    Case("NO_HOLE on WRITE", nbd.CMD_WRITE, nbd.EINVAL, flags=nbd.CMD_FLAG_NO_HOLE, length=4096),
    Case("FAST_ZERO on READ", nbd.CMD_READ, nbd.EINVAL, flags=nbd.CMD_FLAG_FAST_ZERO, length=4096),
    Case("REQ_ONE on READ", nbd.CMD_READ, nbd.EINVAL, flags=nbd.CMD_FLAG_REQ_ONE, length=4096),
    Case("DF without structured replies", nbd.CMD_READ, nbd.EINVAL, flags=nbd.CMD_FLAG_DF, length=4096),
    Case("DF with structured replies", nbd.CMD_READ, 0, flags=nbd.CMD_FLAG_DF, length=4096, structured=True),
    Case("DF on WRITE", nbd.CMD_WRITE, nbd.EINVAL, flags=nbd.CMD_FLAG_DF, length=4096, structured=True),
    Case("FUA on READ", nbd.CMD_READ, 0, flags=nbd.CMD_FLAG_FUA, length=4096),
    Case("READ of 33 MiB, no block sizes asked", nbd.CMD_READ, 0, length=33 * MiB),
    Case("READ of 48 MiB, structured", nbd.CMD_READ, 0, length=48 * MiB, structured=True),
    Case("READ of 64 MiB", nbd.CMD_READ, 0, length=64 * MiB),
    Case("READ of 64 MiB + 1", nbd.CMD_READ, nbd.ENOMEM, length=64 * MiB + 1),
    Case("WRITE of 40 MiB", nbd.CMD_WRITE, 0, length=40 * MiB),
    Case("WRITE of 64 MiB + 1 (payload skipped)", nbd.CMD_WRITE, nbd.ENOMEM, length=64 * MiB + 1),
    Case("WRITE of 128 MiB + 1 (too big to skip)", nbd.CMD_WRITE, "closed", length=128 * MiB + 1, payload=0),
    Case("READ of length 0", nbd.CMD_READ, nbd.EINVAL),
    Case("READ of length 0, structured", nbd.CMD_READ, nbd.EINVAL, structured=True),
    Case("WRITE of length 0", nbd.CMD_WRITE, nbd.ENOSPC),
    Case("TRIM of length 0", nbd.CMD_TRIM, nbd.EINVAL),
    Case("WRITE_ZEROES of length 0", nbd.CMD_WRITE_ZEROES, nbd.ENOSPC),
    Case("CACHE of length 0", nbd.CMD_CACHE, nbd.EINVAL),
    Case("READ at the end", nbd.CMD_READ, nbd.EINVAL, offset=END, length=1),
    Case("READ of length 0 past the end", nbd.CMD_READ, nbd.EINVAL, offset=END + 1),
    Case("WRITE past the end", nbd.CMD_WRITE, nbd.ENOSPC, offset=END - 2, length=4),
    Case("WRITE_ZEROES past the end", nbd.CMD_WRITE_ZEROES, nbd.ENOSPC, offset=END, length=4096),
    Case("TRIM past the end", nbd.CMD_TRIM, nbd.EINVAL, offset=END, length=4096),
    Case("CACHE past the end", nbd.CMD_CACHE, nbd.EINVAL, offset=END, length=4096),
    Case("READ whose offset + length overflows", nbd.CMD_READ, nbd.EINVAL, offset=2**64 - 4096, length=8192),
    Case("WRITE whose offset + length overflows", nbd.CMD_WRITE, nbd.ENOSPC, offset=2**64 - 2, length=4),
    Case("FLUSH with an offset and length", nbd.CMD_FLUSH, nbd.EINVAL, offset=4096, length=4096),
    Case("BLOCK_STATUS (not negotiated)", 7, nbd.EINVAL, length=4096),
    Case("unknown command 99", 99, nbd.EINVAL, length=4096),
]


def run_case(sock: str, case: Case) -> str:
    """What a server answers: the error name, then whether the connection is still in step."""
    p = Peer(sock, structured=case.structured)
    try:
        n = case.length if case.payload is None and case.cmd == nbd.CMD_WRITE else (case.payload or 0)
        p.send(case.cmd, 1, case.flags, case.offset, case.length, bytes(n))
        try:
            error, handle, data = p.reply(case.length if case.cmd == nbd.CMD_READ else 0)
        except (EOFError, ConnectionResetError):
            return "closed"
        assert handle == 1
        if error == 0 and case.cmd == nbd.CMD_READ:
            assert len(data) == case.length
        p.send(nbd.CMD_FLUSH, 2)  # still in step (a refused WRITE's payload was consumed)?
        return f"{errorname(error)}, then {'in step' if p.reply()[:2] == (0, 2) else 'out of step'}"
    finally:
        p.close()


def errorname(error: int) -> str:
    names = {0: "OK", nbd.EPERM: "EPERM", nbd.EIO: "EIO", nbd.ENOMEM: "ENOMEM", nbd.EINVAL: "EINVAL",
             nbd.ENOSPC: "ENOSPC", nbd.EOVERFLOW: "EOVERFLOW", nbd.ENOTSUP: "ENOTSUP"}
    return names.get(error, str(error))


@pytest.fixture(scope="module")
def both_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    work = tmp_path_factory.mktemp("nbd-table")
    for name in ("ours.img", "nbdkit.img"):
        with open(work / name, "wb") as f:
            f.truncate(EXPORT_SIZE)
    ours, kit = start_export(work, work / "ours.img"), start_nbdkit(work, work / "nbdkit.img")
    try:
        yield ours, kit
    finally:
        ours.stop()
        kit.stop()
    assert_clean_log(ours)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_degenerate_request_gets_the_answer_nbdkit_gives(both_servers: tuple[Server, Server], case: Case) -> None:
    ours, kit = both_servers
    expected = "closed" if case.expect == "closed" else f"{errorname(int(case.expect))}, then in step"
    assert (run_case(ours.sock, case), run_case(kit.sock, case)) == (expected, expected)
    assert_clean_log(ours)


def test_client_that_asked_for_block_sizes_is_held_to_them(both_servers: tuple[Server, Server]) -> None:
    ours, _ = both_servers
    p = Peer(ours.sock, structured=True, block_size=True)
    assert p.max_block == nbd.MAX_REQUEST and p.transmission_flags & nbd.TF_SEND_DF
    p.send(nbd.CMD_READ, 1, 0, 0, nbd.MAX_REQUEST + 1)
    assert p.reply()[:2] == (nbd.EINVAL, 1)
    p.send(nbd.CMD_WRITE, 2, 0, 0, nbd.MAX_REQUEST + 1, bytes(nbd.MAX_REQUEST + 1))  # read and discarded
    assert p.reply()[:2] == (nbd.EINVAL, 2)
    p.send(nbd.CMD_READ, 3, nbd.CMD_FLAG_DF, 0, nbd.MAX_REQUEST)
    error, handle, data = p.reply(nbd.MAX_REQUEST)
    assert (error, handle, len(data)) == (0, 3, nbd.MAX_REQUEST)
    p.close()


def test_garbage_drops_only_that_connection_with_one_line(both_servers: tuple[Server, Server]) -> None:
    ours, _ = both_servers
    keep = Peer(ours.sock)
    for junk in (b"\xff" * 28, header(nbd.CMD_WRITE, 1, 0, 0, nbd.MAX_SKIP + 1)):
        bad = Peer(ours.sock)
        bad.sock.sendall(junk)
        with pytest.raises((EOFError, ConnectionResetError)):
            bad.reply()
        bad.close()
    keep.send(nbd.CMD_FLUSH, 5)
    assert keep.reply()[:2] == (0, 5)
    keep.close()
    deadline = time.monotonic() + 5
    while ours.log_text().count("dropping NBD client") < 2:
        assert time.monotonic() < deadline, ours.log_text()
        time.sleep(0.02)
    assert_clean_log(ours)


# ---------------------------------------------------------------------------- the codec alone (pull API, back-pressure hooks)
def lookup(name: str) -> Optional[nbd.ExportInfo]:
    return nbd.ExportInfo("vol", 8 * MiB)


def go_bytes(block_size: bool = False) -> bytes:
    body = struct.pack(">IH", 0, 1 if block_size else 0) + (struct.pack(">H", nbd.INFO_BLOCK_SIZE) if block_size else b"")
    return struct.pack(">I", nbd.C_FIXED_NEWSTYLE) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, len(body)) + body


@pytest.mark.parametrize("step", [1, 7, 4096, 10**7])
def test_codec_refused_write_payload_is_skipped_in_any_chunking(step: int) -> None:
    stream = (go_bytes() + header(nbd.CMD_WRITE, 1, 0, 8 * MiB, 65536) + bytes(65536)  # past the end
              + header(nbd.CMD_WRITE, 2, 0, 0, 5) + b"hello" + header(nbd.CMD_READ, 3, 0, 0, 0))
    c = nbd.ServerConnection(lookup, lambda: ["vol"])
    events: list[nbd.Event] = []
    for i in range(0, len(stream), step):
        events += c.receive(stream[i : i + step])[1]
        assert c.buffered <= max(step, 28)  # nothing piles up, a refused payload least of all
    reqs = [e for e in events if isinstance(e, nbd.Request)]
    assert [(r.handle, r.error, r.data) for r in reqs] == [(1, nbd.ENOSPC, None), (2, 0, b"hello"), (3, nbd.EINVAL, None)]


def test_codec_announces_cost_before_taking_a_header_and_collects_payload_as_it_arrives() -> None:
    c = nbd.ServerConnection(lookup, lambda: ["vol"])
    c.receive(go_bytes())
    assert c.next_cost() is None
    c.receive_data(header(nbd.CMD_WRITE, 1, 0, 0, 4 * MiB) + bytes(10))
    assert c.next_cost() == 4 * MiB  # not taken yet: a server over budget leaves it there
    assert c.next_cost() == 4 * MiB
    assert c.next_event() is None and c.next_cost() is None  # taken; payload incomplete
    for _ in range(4):
        c.receive_data(bytes(MiB))
    ev = c.next_event()
    assert isinstance(ev, nbd.Request) and ev.data is not None and len(ev.data) == 4 * MiB and ev.cost == 4 * MiB
    assert c.next_cost() is None and c.buffered == 10  # the next header's first bytes stay buffered
