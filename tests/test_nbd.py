"""NBD export: the codec, real clients (nbdinfo, nbdcopy, qemu-img, fio) against a pool volume, error
mapping, and the whole chain export -> nbdfuse -> loop -> mkfs.ext4 -> mount -> remount."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from nvpool.client.nbd import proto as nbd
from nvpool.client.blockdev import MemoryBlockDevice
from nvpool.client.cluster import LocalCluster
from nvpool.client.nbd.server import NBDServer
from nvpool.proto.errors import UnavailableError

MiB = 1 << 20


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


# ---------------------------------------------------------------------------- codec
def lookup(name: str) -> nbd.ExportInfo | None:
    return nbd.ExportInfo("vol", 8 * MiB) if name in ("vol", "") else None


def handshake_bytes(name: str = "vol") -> bytes:
    raw = name.encode()
    go = struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, nbd.INFO_BLOCK_SIZE)
    return (struct.pack(">I", nbd.C_FIXED_NEWSTYLE | nbd.C_NO_ZEROES)
            + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_STRUCTURED_REPLY, 0)
            + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_LIST, 0)
            + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, len(go)) + go)


def requests_bytes() -> bytes:
    out = b""
    for h in range(5):
        out += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, h, h * 4096, 4096)
    out += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, nbd.CMD_FLAG_FUA, nbd.CMD_WRITE, 9, 0, 5) + b"hello"
    return out + struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 10, 0, 0)


def run_codec(stream: bytes, step: int) -> tuple[bytes, list[nbd.Event]]:
    c = nbd.ServerConnection(lookup, lambda: ["vol"])
    out, evs = b"", []
    for i in range(0, len(stream), step):
        o, e = c.receive(stream[i : i + step])
        out += o
        evs += e
    return out, evs


@pytest.mark.parametrize("step", [1, 7, 10**6])
def test_codec_handshake_and_requests_in_any_chunking(step: int) -> None:
    out, evs = run_codec(handshake_bytes() + requests_bytes(), step)
    assert isinstance(evs[0], nbd.Ready) and evs[0].export.size == 8 * MiB
    reqs = [e for e in evs if isinstance(e, nbd.Request)]
    assert [r.handle for r in reqs] == [0, 1, 2, 3, 4, 9]
    assert reqs[-1].data == b"hello" and reqs[-1].flags & nbd.CMD_FLAG_FUA
    assert isinstance(evs[-1], nbd.Disconnect)
    assert out.count(struct.pack(">Q", nbd.REPLY_MAGIC)) == 1 + 2 + 3  # STRUCTURED ack, LIST server+ack, GO info*2+ack


def test_codec_unknown_export_and_unsupported_option() -> None:
    c = nbd.ServerConnection(lookup, lambda: ["vol"])
    raw = b"nope"
    go = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    out, evs = c.receive(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, len(go)) + go
                         + struct.pack(">QII", nbd.IHAVEOPT, 99, 0))
    assert evs == [] and not c.transmitting
    types = [struct.unpack_from(">I", out, i + 12)[0] for i in (0, 20 + len("no export named 'nope'"))]
    assert types == [nbd.REP_ERR_UNKNOWN, nbd.REP_ERR_UNSUP]


@pytest.mark.parametrize("bad", [
    struct.pack(">I", 0),  # client without fixed newstyle
    struct.pack(">I", 1) + b"X" * 16,  # bad option magic
    handshake_bytes() + b"\0" * 28,  # bad request magic
    # a refused WRITE too big even to read and discard (nbdkit drops the connection too)
    handshake_bytes() + struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, nbd.MAX_SKIP + 1),
])
def test_codec_malformed_input_is_a_protocol_error(bad: bytes) -> None:
    with pytest.raises(nbd.NBDProtocolError):
        run_codec(bad, 10**6)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50), st.booleans())
def test_codec_fuzz_only_its_error_escapes(garbage: bytes, step: int, after_handshake: bool) -> None:
    prefix = handshake_bytes() if after_handshake else b""
    try:
        run_codec(prefix + garbage, step)
    except nbd.NBDProtocolError:
        pass


# ---------------------------------------------------------------------------- real clients over a pool volume
@pytest.fixture(scope="module")
def pool_export(local_pool: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from nvpool import client

    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("nbdvol", 64 * MiB, stripe_unit="256K")
    sock = str(tmp_path_factory.mktemp("nbd") / "vol.sock")
    ready = sock + ".ready"
    proc = subprocess.Popen([sys.executable, "-m", "nvpool", "export", "nbdvol", "--socket", sock,
                             "--meta", local_pool.meta.address, "--ready-file", ready],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "export did not start"
        time.sleep(0.05)
    try:
        yield f"nbd+unix:///nbdvol?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.external
def test_nbdinfo_size_and_flags(pool_export: str) -> None:
    need("nbdinfo")
    info = json.loads(subprocess.run(["nbdinfo", "--json", pool_export], capture_output=True, text=True, check=True).stdout)
    exp = info["exports"][0]
    assert exp["export-size"] == 64 * MiB
    assert exp["can_flush"] and exp["can_fua"] and exp["can_multi_conn"] and exp["can_trim"] and exp["can_zero"]
    assert not exp["is_read_only"] and exp["block_size_preferred"] == 4096


@pytest.mark.external
def test_nbdcopy_and_qemu_img_round_trips(pool_export: str, tmp_path: Path) -> None:
    need("nbdcopy", "qemu-img")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(64 * MiB))
    subprocess.run(["nbdcopy", "--connections=4", str(src), pool_export], check=True)
    out = tmp_path / "out.img"
    subprocess.run(["nbdcopy", pool_export, str(out)], check=True)
    assert out.read_bytes() == src.read_bytes()
    q = tmp_path / "q.img"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", pool_export, str(q)], check=True)
    assert q.read_bytes() == src.read_bytes()
    src.write_bytes(os.urandom(64 * MiB))
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), pool_export], check=True)
    subprocess.run(["nbdcopy", pool_export, str(out)], check=True)
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.external
@pytest.mark.parametrize("depth", [1, 32])
def test_fio_random_writes_verify(pool_export: str, depth: int) -> None:
    need("fio")
    p = subprocess.run(
        ["fio", "--name=verify", "--ioengine=nbd", f"--uri={pool_export}", "--rw=randwrite",
         "--bssplit=4k/50:16k/20:64k/20:1m/10", "--size=24M", f"--iodepth={depth}", "--verify=crc32c",
         "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= 24 * MiB and job["read"]["io_bytes"] >= 24 * MiB


# ---------------------------------------------------------------------------- error mapping (in process)
class FlakyDevice(MemoryBlockDevice):
    """Fails every I/O touching the first MiB, like an unreachable agent would."""

    async def readinto(self, buf: memoryview, offset: int) -> None:
        if offset < MiB:
            raise UnavailableError("agent unreachable")
        await super().readinto(buf, offset)


def raw_client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    s.recv(18)
    s.sendall(handshake_bytes("")[:4] + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 6) + struct.pack(">IH", 0, 0))
    got = b""
    while not got.endswith(struct.pack(">QII", nbd.REPLY_MAGIC, nbd.OPT_GO, nbd.REP_ACK) + struct.pack(">I", 0)):
        got += s.recv(4096)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "connection closed"
        out += chunk
    return out


def test_io_failure_is_eio_and_connection_survives(tmp_path: Path) -> None:
    path = str(tmp_path / "e.sock")

    async def main() -> None:
        server = NBDServer(FlakyDevice(4 * MiB), "e")
        await server.listen_unix(path)
        loop = asyncio.get_running_loop()

        def client() -> None:
            s = raw_client(path)
            s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 1, 0, 4096))
            magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
            assert (magic, err, handle) == (nbd.SIMPLE_REPLY_MAGIC, nbd.EIO, 1)
            s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 2, 2 * MiB, 4096))
            magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
            assert (err, handle) == (0, 2) and recv_exact(s, 4096) == bytes(4096)
            s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 3, 4 * MiB, 1))
            assert struct.unpack(">IIQ", recv_exact(s, 16))[1] == nbd.EINVAL
            s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 4, 4 * MiB - 1, 2) + b"xx")
            assert struct.unpack(">IIQ", recv_exact(s, 16))[1] == nbd.ENOSPC
            bad = raw_client(path)  # a malformed request drops only its own connection
            bad.sendall(b"\xff" * 28)
            assert bad.recv(100) == b""
            s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_FLUSH, 5, 0, 0))
            assert struct.unpack(">IIQ", recv_exact(s, 16)) == (nbd.SIMPLE_REPLY_MAGIC, 0, 5)
            s.close()

        await loop.run_in_executor(None, client)
        await server.close()

    uvloop.run(main())


# ---------------------------------------------------------------------------- the whole chain
def fuse_and_loop_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices"
    if os.geteuid() != 0:
        return "mounting needs root"
    for tool in ("nbdfuse", "losetup", "mkfs.ext4", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.mark.external
def test_mount_write_unmount_remount(local_pool: LocalCluster, tmp_path: Path) -> None:
    why = fuse_and_loop_missing()
    if why:
        print(f"skipping the mount chain: {why}")
        pytest.skip(why)
    from nvpool import client

    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("fsvol", 96 * MiB)
    env = dict(os.environ, NVPOOL_RUN_DIR=str(tmp_path / "run"), NVPOOL_META=local_pool.meta.address)
    mnt = tmp_path / "mnt"

    def nv(*args: str) -> None:
        p = subprocess.run([sys.executable, "-m", "nvpool", *args], capture_output=True, text=True, env=env, timeout=180)
        assert p.returncode == 0, p.stderr

    nv("mount", "fsvol", str(mnt), "--mkfs", "ext4")
    sums = {}
    try:
        for i in range(40):
            data = os.urandom(1000 + i * 37_000)
            (mnt / f"f{i}.bin").write_bytes(data)
            sums[f"f{i}.bin"] = hashlib.sha256(data).hexdigest()
    finally:
        nv("unmount", str(mnt))
    assert not os.path.ismount(mnt)
    assert not list((tmp_path / "run" / "mounts").glob("*.json")), "unmount left state behind"
    nv("mount", "fsvol", str(mnt))  # a fresh export process
    try:
        got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mnt.glob("f*.bin")}
        assert got == sums
    finally:
        nv("unmount", str(mnt))


def test_mount_failure_undoes_its_steps(local_pool: LocalCluster, tmp_path: Path) -> None:
    env = dict(os.environ, NVPOOL_RUN_DIR=str(tmp_path / "run"), NVPOOL_META=local_pool.meta.address)
    p = subprocess.run([sys.executable, "-m", "nvpool", "mount", "no-such-volume", str(tmp_path / "m")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "no-such-volume" in p.stderr  # the export's own reason reaches the user
    assert not list((tmp_path / "run" / "mounts").glob("*.json"))


@pytest.mark.external
def test_export_workers_share_one_socket(local_pool: LocalCluster, tmp_path: Path) -> None:
    need("nbdcopy", "fio")
    from nvpool import client

    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("wvol", 32 * MiB)
    sock = str(tmp_path / "w.sock")
    proc = subprocess.Popen([sys.executable, "-m", "nvpool", "export", "wvol", "--workers", "2", "--socket", sock,
                             "--meta", local_pool.meta.address, "--ready-file", sock + ".ready"])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock + ".ready"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        uri = f"nbd+unix:///wvol?socket={sock}"
        src = tmp_path / "src.img"
        src.write_bytes(os.urandom(32 * MiB))
        subprocess.run(["nbdcopy", "--connections=4", str(src), uri], check=True)  # spread over both workers
        out = tmp_path / "out.img"
        subprocess.run(["nbdcopy", "--connections=4", uri, str(out)], check=True)
        assert out.read_bytes() == src.read_bytes()
        p = subprocess.run(["fio", "--name=v", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                            "--size=8M", "--offset_increment=8M", "--iodepth=8", "--numjobs=2", "--verify=crc32c", "--do_verify=1",
                            "--verify_fatal=1", "--verify_state_save=0"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "err= 0" in p.stdout, p.stdout + p.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    deadline = time.monotonic() + 10
    while True:  # every worker goes with the export (bounded poll)
        left = subprocess.run(["pgrep", "-f", f"export wvol --workers 2 --socket {sock}"], capture_output=True, text=True)
        if left.stdout.strip() == "":
            break
        assert time.monotonic() < deadline, "a worker outlived the export"
        time.sleep(0.05)
