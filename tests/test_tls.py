"""TLS on both planes (proto/tls.py): every pool the tests start runs with it (tests/conftest.py).
Here: the TCP data plane carries the bytes intact through TLS, and whoever lacks a certificate of the
pool's CA (no certificate, or one from another CA) is refused by the metadata service and by agents,
with a clear error and without disturbing the pool."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from nvpool.client.api import AsyncPool, ClientOptions
from nvpool.client.cluster import LocalCluster
from nvpool.client.metaclient import MetaClient
from nvpool.proto import tls
from nvpool.proto.errors import UnavailableError
from nvpool.proto.transport import connect

MiB = 1 << 20


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    from tests.conftest import make_cluster

    c = make_cluster(tmp_path_factory.mktemp("tls"), agents=2, drives_per_agent=1, drive_size="128M")
    with c.up():  # down() when the module is done
        yield c


def test_tcp_data_plane_over_tls_round_trips(pool: LocalCluster) -> None:
    async def body() -> None:
        p = await AsyncPool.connect(pool.meta.address, ClientOptions(transport="tcp"))
        try:
            await p.create_volume("t", 16 * MiB)
            v = await p.open("t")
            assert all(ep.tls for ep in v.endpoints.values())
            data = os.urandom(12 * MiB)
            await v.write(MiB, data)
            assert bytes(await v.read(MiB, len(data))) == data
            got = bytearray(4096)
            await v.readinto(memoryview(got), MiB + 4096)
            assert bytes(got) == data[4096:8192]
            await v.close()
        finally:
            await p.close()
    asyncio.run(body())


def other_ca(tmp: Path) -> tls.TlsFiles:
    tls.init_ca(str(tmp))
    return tls.issue(str(tmp), "client", "client")


def test_clients_without_a_pool_certificate_are_refused(pool: LocalCluster, tmp_path: Path) -> None:
    import grpc

    from nvpool.proto import nvpool_pb2 as pb
    from nvpool.proto import nvpool_pb2_grpc as pbg

    stranger = other_ca(tmp_path / "other-ca")

    async def body() -> None:
        # the metadata service: a plaintext client, and a client of another CA
        async with grpc.aio.insecure_channel(pool.meta.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await pbg.MetaStub(ch).ListVolumes(pb.ListVolumesRequest(), timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # the CLI says so in one line (gRPC's own log lines stay out of it)
        env = dict(os.environ, NVPOOL_TLS=str(tmp_path / "other-ca"))
        env.pop("GRPC_VERBOSITY", None)
        r = subprocess.run([sys.executable, "-m", "nvpool", "pool", "status", "--meta", pool.meta.address], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "TLS handshake" in r.stderr, r.stderr
        m = MetaClient(pool.meta.address, timeout=5, tls=stranger)
        try:
            with pytest.raises(UnavailableError):
                await m.list_volumes()
        finally:
            await m.close()
        # the data plane: dropped at the handshake (a plaintext peer once it sends its first bytes)
        good = MetaClient(pool.meta.address)
        try:
            await good.create_volume("t2", 4 * MiB)
            lay, eps = await good.get_layout(name="t2")
        finally:
            await good.close()
        ep = next(iter(eps.values()))
        for ctx in (None, stranger.client_context()):
            with pytest.raises(UnavailableError):
                conn = await connect(ep.address, timeout=3, ssl_context=ctx)
                await conn.submit(0, 0, 0, 0, 0)  # NOP: never answered over plaintext

    asyncio.run(body())

    async def still() -> None:  # the pool is undisturbed
        p = await AsyncPool.connect(pool.meta.address)
        try:
            assert "t2" in {v.name for v in await p.list_volumes()}
        finally:
            await p.close()
    asyncio.run(still())


def test_an_agent_of_another_ca_cannot_join(pool: LocalCluster, tmp_path: Path) -> None:
    d = tmp_path / "rogue-ca"
    tls.init_ca(str(d))
    files = tls.issue(str(d), "rogue", "agent", ("127.0.0.1",))
    log = tmp_path / "rogue.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "nvpool", "agent", "--meta", pool.meta.address, "--listen",
                              "127.0.0.1:0", "--name", "rogue", "--drive", f"file:{tmp_path / 'r.img'}:64M",
                              "--join-secret-file", str(pool.secret_file), "--tls-ca", files.ca, "--tls-cert",
                              files.cert, "--tls-key", files.key], stdout=out, stderr=subprocess.STDOUT)
    try:
        async def members() -> set[str]:
            m = MetaClient(pool.meta.address)
            try:
                return {a.agent_id for a in (await m.pool_status()).agents}
            finally:
                await m.close()
        import time
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert "rogue" not in asyncio.run(members())
            time.sleep(0.5)
        assert "metadata service" in log.read_text(errors="replace")  # it says it cannot get through
    finally:
        p.kill()
        p.wait()


def test_certs_cli_makes_a_ca_and_role_certificates(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    run = [sys.executable, "-m", "nvpool", "certs"]
    assert subprocess.run([*run, "init", "--dir", str(d)], capture_output=True, timeout=60).returncode == 0
    r = subprocess.run([*run, "issue", "--dir", str(d), "--name", "s1", "--role", "agent", "--host", "10.0.0.5",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)
    assert oct(os.stat(files["key"]).st_mode & 0o777) == "0o600"
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(Path(files["cert"]).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "nvpool:agent:s1" in san.get_values_for_type(x509.UniformResourceIdentifier)
    assert tls.SERVER_NAME in san.get_values_for_type(x509.DNSName)
    bad = subprocess.run([*run, "issue", "--dir", str(tmp_path / "none"), "--name", "x", "--role", "client"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "certs init" in bad.stderr
    assert isinstance(tls.TlsFiles(files["ca"], files["cert"], files["key"]).client_context(), ssl.SSLContext)


def spawn_agent(pool: LocalCluster, tmp_path: Path, name: str, files: tls.TlsFiles, log: Path) -> "subprocess.Popen[bytes]":
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "nvpool", "agent", "--meta", pool.meta.address, "--listen",
                                 "127.0.0.1:0", "--name", name, "--drive", f"file:{tmp_path / (name + '.img')}:64M",
                                 "--join-secret-file", str(pool.secret_file), "--tls-ca", files.ca, "--tls-cert",
                                 files.cert, "--tls-key", files.key], stdout=out, stderr=subprocess.STDOUT)


def wait_log(log: Path, text: str, timeout: float = 20) -> None:
    import time
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.1)


def test_a_client_certificate_cannot_register_and_agent_ids_are_bound(pool: LocalCluster, tmp_path: Path) -> None:
    """With the join secret but a client's certificate: refused. Under a registered agent's id with
    another agent certificate of the pool: refused (the id is bound to the certificate's name)."""
    assert pool.tls_dir is not None
    d = str(pool.tls_dir)
    attempts = [("mallory", tls.issue(d, "mallory-client", "client"), "not an agent's"),
                ("agent0", tls.issue(d, "mallory-agent", "agent", ("127.0.0.1",)), "bound to another certificate")]
    for i, (name, cert, refusal) in enumerate(attempts):
        log = tmp_path / f"m{i + 1}.log"
        p = spawn_agent(pool, tmp_path, name, cert, log)
        try:
            wait_log(log, refusal)
        finally:
            p.kill()
            p.wait()

    async def agent0() -> str:
        m = MetaClient(pool.meta.address)
        try:
            return str(next(a.address for a in (await m.pool_status()).agents if a.agent_id == "agent0"))
        finally:
            await m.close()
    assert asyncio.run(agent0()) == pool.agents[0].address  # still the real one
