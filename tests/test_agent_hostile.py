"""A real agent process under a hostile peer: bounded memory, an error completion (or one clean close)
for every malformed command, never a traceback, and normal clients served throughout.

Memory is the agent's resident set (``VmRSS`` of its process), sampled while the hostile connections
hold their commands; the bound is the issue's 256 MiB per agent.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import pytest

from nvpool import client
from nvpool.client.cluster import LocalCluster
from nvpool.proto import dataplane as dp
from nvpool.proto.errors import Status
from tests.creds import AUTH_TAG, auth_frame, capability_for

MiB = 1 << 20
RSS_BOUND = 256 * MiB
BIG = dp.MAX_IO  # 16 MiB, the largest command


class Target:
    """The agent process and one real extent of a volume on it."""

    def __init__(self, cluster: LocalCluster, extent_id: int, generation: int, data: np.ndarray,
                 volume_id: int = 0) -> None:
        self.cluster = cluster
        #: every raw connection first presents a valid capability: the checks below are the ones an
        #: authorized but hostile (or broken) client meets
        self.auth = auth_frame(capability_for(cluster.secret_file, volume_id))
        self.pid = cluster.agents[0].pid
        host, port = cluster.agents[0].address.rsplit(":", 1)
        self.addr = (host, int(port))
        self.unix_path = str(cluster.dir / "agent0.sock")
        self.log = Path(cluster.agents[0].log)
        self.extent_id = extent_id
        self.generation = generation
        self.data = data  # the extent's first BIG bytes

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def peak_rss(self, seconds: float) -> int:
        """Highest RSS seen over ``seconds`` (stops early once it is over the bound)."""
        peak, end = 0, time.monotonic() + seconds
        while time.monotonic() < end and peak < RSS_BOUND:
            peak = max(peak, self.rss())
            time.sleep(0.02)
        return peak

    def connect(self, rcvbuf: int = 0) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(self.addr)
        s.settimeout(10)
        self.authorize(s)
        return s

    def authorize(self, s: socket.socket) -> None:
        s.sendall(self.auth)
        got = recv_completions(s, AUTH_TAG)
        assert got is not None and [(c.tag, c.status) for c in got] == [(AUTH_TAG, Status.OK)], got

    def check_served(self) -> None:
        """A normal client still reads and writes correctly."""
        with client.connect(self.cluster.meta.address) as pool:
            vol = pool.open("hv")
            assert np.array_equal(vol.read(0, 2 * MiB), self.data[: 2 * MiB])
            fresh = np.random.default_rng(7).integers(0, 256, MiB, dtype=np.uint8)
            vol.write(BIG, fresh)
            assert np.array_equal(vol.read(BIG, MiB), fresh)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    from tests.conftest import make_cluster

    # a plaintext data plane (--no-data-tls: capabilities still checked), so the probes below can send
    # exact bytes; tests/test_capabilities.py and the rest of the suite use TLS
    c = make_cluster(tmp_path_factory.mktemp("hostile"), agents=1, drives_per_agent=1, drive_size="256M",
                     data_tls=False)
    c.up(timeout=60)
    try:
        data = np.random.default_rng(11).integers(0, 256, BIG, dtype=np.uint8)
        with client.connect(c.meta.address) as pool:
            pool.create_volume("hv", 64 * MiB, stripe_width=1, stripe_unit="16M")
            vol = pool.open("hv")
            vol.write(0, data)
            p = next(vol.asyncio.layout.map(0, BIG))
            assert p.extent_offset == 0 and p.extent.length >= 2 * BIG
            generation = vol.generation
            vol.close()  # (the writer lease: check_served opens it from another client)
            yield Target(c, p.extent.extent_id, generation, data, vol.asyncio.layout.volume_id)
    finally:
        c.down()


def recv_completions(s: socket.socket, until_tag: int) -> Optional[list[dp.Completion]]:
    """Completions up to and including ``until_tag``; None if the agent closed the connection first."""
    dec = dp.CompletionDecoder()
    got: list[dp.Completion] = []
    while not any(c.tag == until_tag for c in got):
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        got += dec.next_completions(chunk)
    return got


# --------------------------------------------------------------------------------------- memory


def test_announced_write_payloads_that_never_come_cost_no_memory(target: Target) -> None:
    """64 connections each announce a 16 MiB WRITE and send nothing more (3 KiB on the wire); 32
    more send one page of their payload and stop. Before: +1 GiB per 64 headers."""
    base = target.rss()
    socks = []
    hdr = dp.encode_command(dp.WRITE, 1, target.extent_id, 0, BIG, target.generation)
    try:
        for i in range(96):
            s = target.connect()
            s.sendall(hdr if i < 64 else hdr + b"\xee" * 4096)
            socks.append(s)
        peak = target.peak_rss(1.0)
        assert peak < RSS_BOUND, f"agent grew from {base / MiB:.0f} to {peak / MiB:.0f} MiB"
    finally:
        for s in socks:
            s.close()
    target.check_served()  # and the half-sent writes changed nothing


def test_pipelined_reads_never_read_keep_memory_bounded(target: Target) -> None:
    """96 pipelined 16 MiB READs on one connection and 3 x 32 on three more, replies never read.
    Before: 96 x 16 MiB of replies queued in the agent (1.6 GiB). Once the peer reads, every reply
    arrives complete and in order."""
    base = target.rss()
    socks = []
    try:
        for n in (96, 32, 32, 32):
            s = target.connect(rcvbuf=64 * 1024)
            s.sendall(b"".join(
                dp.encode_command(dp.READ, tag, target.extent_id, 0, BIG, target.generation) for tag in range(1, n + 1)
            ))
            socks.append(s)
        peak = target.peak_rss(1.5)
        assert peak < RSS_BOUND, f"agent grew from {base / MiB:.0f} to {peak / MiB:.0f} MiB"
        # back-pressure, not loss: the last connection gets all 32 replies once it reads
        s = socks[-1]
        dec = dp.CompletionDecoder()
        got: list[dp.Completion] = []
        while len(got) < 32:
            chunk = s.recv(4 * MiB)
            assert chunk, "agent closed a connection that was only slow to read"
            got += dec.next_completions(chunk)
        assert [(c.tag, c.status, c.length) for c in got] == [(t, Status.OK, BIG) for t in range(1, 33)]
        assert got[-1].payload is not None and bytes(got[-1].payload) == target.data.tobytes()
    finally:
        for s in socks:
            s.close()
    target.check_served()


# --------------------------------------------------------------------------------------- bad commands

Case = tuple[str, bytes, Union[Status, str]]


def bad_commands(ext: int, gen: int) -> list[Case]:
    enc = dp.encode_command
    page = b"\x99" * 4096
    return [
        ("write of 0 bytes", enc(dp.WRITE, 1, ext, 0, 0, gen), Status.INVALID),
        ("read of 0 bytes", enc(dp.READ, 1, ext, 0, 0, gen), Status.INVALID),
        ("write zeroes of 0 bytes", enc(dp.Opcode.WRITE_ZEROES, 1, ext, 0, 0, gen), Status.INVALID),
        ("discard of 0 bytes", enc(dp.Opcode.DISCARD, 1, ext, 0, 0, gen), Status.INVALID),
        ("read offset+length past 2^64", enc(dp.READ, 1, ext, 2**64 - 4096, 8192, gen), Status.OUT_OF_RANGE),
        ("write offset+length past 2^64", enc(dp.WRITE, 1, ext, 2**64 - 1, 4096, gen) + page, Status.OUT_OF_RANGE),
        ("zeroes past 2^64", enc(dp.Opcode.WRITE_ZEROES, 1, ext, 2**64 - 1, 4096, gen), Status.OUT_OF_RANGE),
        ("unknown opcode", enc(0x7E, 1, ext, 0, 0, gen), Status.INVALID),
        ("unknown opcode with a length", enc(0x42, 1, ext, 0, 4096, gen), Status.INVALID),
        ("write to extent 0", enc(dp.WRITE, 1, 0, 0, 4096, gen) + page, Status.NO_EXTENT),
        ("flush of an unknown extent", enc(dp.FLUSH, 1, 2**64 - 1, 0, 0, gen), Status.NO_EXTENT),
        ("read region not registered", enc(dp.Opcode.READ_REGION, 1, ext, 0, 4096, gen, region=5), Status.REGION),
        ("write region 0", enc(dp.Opcode.WRITE_REGION, 1, ext, 0, 4096, gen, region=0), Status.REGION),
        ("read region of 0 bytes", enc(dp.Opcode.READ_REGION, 1, ext, 0, 0, gen, region=2**32 - 1), Status.REGION),
        ("region offset past 2^64",
         enc(dp.Opcode.READ_REGION, 1, ext, 0, 4096, gen, region=1, region_offset=2**64 - 1), Status.REGION),
        ("unknown flag bits", dp.COMMAND.pack(dp.COMMAND_MAGIC, dp.READ, 0x80, 1, ext, 0, 4096, 0, 0, gen), "close"),
        ("bad magic", b"GET / HTTP/1.1\r\n\r\n" + bytes(30), "close"),
        ("length above MAX_IO", enc(dp.READ, 1, ext, 0, dp.MAX_IO + 1, gen), "close"),
        ("header digest mismatch", enc(dp.READ, 1, ext, 0, 4096, gen, dp.HDGST)[:-4] + b"\0\0\0\0", "close"),
    ]


def open_data_plane(target: Target, transport: str) -> socket.socket:
    if transport == "tcp":
        return target.connect()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(target.unix_path)
    s.sendall(struct.pack("<4sII", b"NVSH", 1, 0))  # hello registering no region
    assert s.recv(8) == struct.pack("<4sI", b"NVOK", 0)
    target.authorize(s)
    return s


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_every_bad_command_gets_an_error_or_one_clean_close(target: Target, transport: str) -> None:
    log_before = len(target.log_text())
    closes = 0
    for name, frames, expect in bad_commands(target.extent_id, target.generation):
        s = open_data_plane(target, transport)
        try:
            s.sendall(frames + dp.encode_command(dp.NOP, 99, 0, 0, 0, 0))
            got = recv_completions(s, until_tag=99)
        finally:
            s.close()
        if expect == "close":
            closes += 1
            assert got is None, f"{name}: expected the agent to close the connection, got {got}"
        else:
            assert got is not None, f"{name}: the agent dropped the connection"
            assert [(c.tag, c.status) for c in got] == [(1, expect), (99, Status.OK)], name
            assert got[0].message, name  # the refusal says why
    target.check_served()
    log = target.log_text()[log_before:]
    assert "Traceback" not in log and "Fatal error" not in log, log[-3000:]
    drops = [line for line in log.splitlines() if "dropping client" in line]
    assert len(drops) == closes, log[-3000:]


def test_bad_commands_pipelined_on_one_connection(target: Target) -> None:
    """All refusable commands back to back on one connection: one completion each, in order."""
    cases = [c for c in bad_commands(target.extent_id, target.generation) if c[2] != "close"]
    frames = b"".join(
        f[:4] + struct.pack("<I", tag) + f[8:] for tag, (_, f, _) in enumerate(cases, start=1)
    )
    s = target.connect()
    try:
        s.sendall(frames + dp.encode_command(dp.NOP, 999, 0, 0, 0, 0))
        got = recv_completions(s, until_tag=999)
    finally:
        s.close()
    assert got is not None
    assert [(c.tag, c.status) for c in got] == [(t, c[2]) for t, c in enumerate(cases, start=1)] + [(999, Status.OK)]
    assert "Traceback" not in target.log_text()
    assert os.path.exists(f"/proc/{target.pid}")


def test_held_commands_are_answered_after_the_peer_half_closes(target: Target) -> None:
    """Commands held back by back-pressure are still answered when the peer shuts down its sending
    side before reading (then the agent closes)."""
    s = target.connect(rcvbuf=64 * 1024)
    try:
        s.sendall(b"".join(dp.encode_command(dp.READ, t, target.extent_id, 0, BIG, target.generation) for t in range(1, 9)))
        s.shutdown(socket.SHUT_WR)
        dec = dp.CompletionDecoder()
        got: list[dp.Completion] = []
        while chunk := s.recv(4 * MiB):
            got += dec.next_completions(chunk)
        assert [(c.tag, c.status) for c in got] == [(t, Status.OK) for t in range(1, 9)]
        assert dec.idle
    finally:
        s.close()
