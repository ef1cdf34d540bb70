"""Cut links: an agent on its own host (network namespace); its link goes down mid-use.

A silent peer never resets the connection, so this is the case where a client could wait forever.
It must instead fail over to retries and then raise a clear error within a bounded time, and work
again once the link is back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from nvpool import client
from nvpool.client.api import ClientOptions
from nvpool.proto.errors import UnavailableError
from tests.creds import tls_args
from tests.netns import BRIDGE_ADDR, Fabric, available
from tests.waiting import stop_all, wait_json

MiB = 1 << 20
pytestmark = pytest.mark.netns


@pytest.fixture
def fabric_pool(tmp_path: Path) -> Iterator[tuple[Fabric, str]]:
    why = available()
    if why:
        print(f"skipping network-namespace tests: {why}")
        pytest.skip(why)
    fabric = Fabric()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        meta = subprocess.Popen([sys.executable, "-m", "nvpool", "meta", "--listen", f"{BRIDGE_ADDR}:0",
                                 "--store", f"sqlite:{tmp_path / 'meta.db'}", "--ready-file", str(tmp_path / "meta.ready"),
                                 *tls_args("meta", "meta")])
        procs.append(meta)
        addr = str(wait_json(tmp_path / "meta.ready", meta)["address"])
        host = fabric.add_host("s0")
        agent = host.popen([sys.executable, "-m", "nvpool", "agent", "--meta", addr, "--listen", f"{host.address}:0",
                            "--name", "s0", "--drive", f"file:{tmp_path / 'd0.img'}:256M", "--heartbeat", "0.5",
                            "--join-secret-file", str(tmp_path / "meta.db.join-secret"), *tls_args("s0", "agent"),
                            "--ready-file", str(tmp_path / "s0.ready")], cwd=os.getcwd())
        procs.append(agent)
        wait_json(tmp_path / "s0.ready", agent)
        yield fabric, addr
    finally:
        stop_all(procs)
        fabric.close()


def test_cut_link_gives_a_clear_error_in_bounded_time_then_recovers(fabric_pool: tuple[Fabric, str]) -> None:
    fabric, meta = fabric_pool
    data = os.urandom(4 * MiB)
    opts = ClientOptions(transport="tcp", io_timeout=1.5, connect_timeout=1.0, retries=3)
    with client.connect(meta, opts) as pool:
        pool.create_volume("cut", 8 * MiB)
        vol = pool.open("cut")
        vol.write(0, data)
        fabric.set_link("s0", up=False)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            vol.read(0, 4 * MiB)
        waited = time.monotonic() - t0
        assert waited < 20, f"took {waited:.1f}s to report the dead link"
        fabric.set_link("s0", up=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert bytes(vol.read(0, 4 * MiB)) == data
                break
            except UnavailableError:
                assert time.monotonic() < deadline, "did not recover after the link came back"
                time.sleep(0.2)
