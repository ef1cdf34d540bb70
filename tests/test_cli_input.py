"""Bad command-line input, through the real CLI in a subprocess (issue 11, item 9).

Every invalid argument is one line on stderr (``nvpool: error: ...``) and exit status 2; a metadata
service that cannot be reached, or accepts connections and never answers, is one line naming the address
and exit status 1, within ``--timeout``; rounding of a size is stated; no traceback anywhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

from nvpool.client.cluster import LocalCluster

#: nothing listens here (the discard port): a call that gets past argument checking fails with status 1
NOWHERE = "127.0.0.1:9"
MiB = 1 << 20


def nvpool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NVPOOL_META"}
    return subprocess.run([sys.executable, "-m", "nvpool", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_error(p: subprocess.CompletedProcess[str], status: int) -> str:
    """Exit ``status``, exactly one line on stderr (``nvpool: error: ...``), no traceback; that line."""
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = p.stderr.splitlines()
    assert p.returncode == status, f"exit status {p.returncode}, stderr: {p.stderr[:2000]}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {p.stderr[:2000]}"
    assert lines[0].startswith("nvpool: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- sizes and numbers
@pytest.mark.parametrize("size", ["inf", "nan", "1e30", "2^64", "-1", "0", "12Q"])
def test_volume_create_refuses_a_bad_size(size: str) -> None:
    line = one_error(nvpool("volume", "create", "v", "--size", size, "--meta", NOWHERE), 2)
    assert "--size" in line and size in line


@pytest.mark.parametrize("width", ["-1", "0", "two", "99999999999"])
def test_volume_create_refuses_a_bad_stripe_width(width: str) -> None:
    line = one_error(nvpool("volume", "create", "v", "--size", "1M", "--stripe-width", width, "--meta", NOWHERE), 2)
    assert "stripe width" in line


@pytest.mark.parametrize(
    "args",
    [
        ["volume", "create", "v", "--size", "1M", "--stripe-unit", "3000"],  # not a power of two
        ["volume", "create", "v", "--size", "1M", "--stripe-unit", "32M"],  # above 16 MiB
        ["volume", "create", "v", "--size", "1M", "--stripe-unit", "inf"],
        ["volume", "resize", "v", "--size", "2^64"],
        ["volume", "resize", "v", "--size", "nan"],
        ["pool", "rebalance", "--max-rate", "1e30"],
        ["pool", "rebalance", "--max-rate", "inf"],
        ["pool", "drain", "a b"],
        ["bench", "v", "--io-size", "nan"],
        ["bench", "v", "--io-size", "0"],
        ["bench", "v", "--total", "inf"],
        ["bench", "v", "--io-depth", "-3"],
        ["bench", "v", "--seconds", "-1"],
        ["bench", "v", "--seconds", "inf"],
        ["bench", "v", "--io-size", "1G", "--io-depth", "64"],  # 64 GiB of buffers
        ["cluster", "demo", "--seed", "-1"],
        ["cluster", "demo", "--size", "inf"],
        ["volume", "list", "--timeout", "0"],
        ["volume", "list", "--timeout", "nan"],
        ["volume", "list", "--timeout", "-1"],
    ],
    ids=lambda a: " ".join(a),
)
def test_invalid_argument_is_one_line_and_status_2(args: list[str]) -> None:
    one_error(nvpool(*args, "--meta", NOWHERE), 2)


@pytest.mark.parametrize("meta", ["127.0.0.1:99999", "127.0.0.1", "host:port", ":7400"])
def test_invalid_meta_address_is_a_usage_error(meta: str) -> None:
    line = one_error(nvpool("volume", "list", "--meta", meta), 2)
    assert "HOST:PORT" in line


def test_export_refuses_zero_workers() -> None:
    one_error(nvpool("export", "v", "--workers", "0", "--meta", NOWHERE, "--listen", "127.0.0.1:0", timeout=30), 2)


def test_names_are_checked_like_the_metadata_service() -> None:
    from nvpool.client.cli import common as cli_common
    from nvpool.pool import meta

    assert cli_common.NAME_RE.pattern == meta.NAME_RE.pattern
    assert cli_common.SIZE_ALIGN == meta.SIZE_ALIGN
    assert (cli_common.MIN_STRIPE_UNIT, cli_common.MAX_STRIPE_UNIT) == (meta.MIN_STRIPE_UNIT, meta.MAX_STRIPE_UNIT)


@pytest.mark.parametrize("name", ["-starts-with-dash", "has space", "x" * 65, "slash/name", "é"])
def test_volume_show_refuses_an_impossible_name(name: str) -> None:
    line = one_error(nvpool("volume", "show", "--meta", NOWHERE, "--", name), 2)
    assert "volume name" in line


def test_top_level_help_documents_exit_status() -> None:
    p = nvpool("--help")
    assert p.returncode == 0
    assert "Exit status" in p.stdout
    assert "2  usage error" in p.stdout and "1  the operation failed" in p.stdout and "0  success" in p.stdout


# ---------------------------------------------------------------------------- unreachable metadata service
@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP listener that accepts connections and never answers (a hung metadata service)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield "127.0.0.1:%d" % srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()


@pytest.mark.parametrize(
    "args",
    [["volume", "list"], ["pool", "status"], ["volume", "create", "v", "--size", "1M"], ["bench", "v"],
     ["pool", "rebalance", "--plan"]],
    ids=lambda a: " ".join(a),
)
def test_hung_metadata_service_fails_after_timeout(silent_server: str, args: list[str]) -> None:
    t0 = time.monotonic()
    p = nvpool(*args, "--meta", silent_server, "--timeout", "1", timeout=30)
    elapsed = time.monotonic() - t0
    line = one_error(p, 1)
    assert silent_server in line and "within 1 s" in line
    assert elapsed < 8, f"took {elapsed:.1f} s with --timeout 1"


def test_unknown_host_says_what_it_tried_to_reach() -> None:
    line = one_error(nvpool("volume", "list", "--meta", "no-such-host.invalid:7400", "--timeout", "5"), 1)
    assert "cannot reach the metadata service at no-such-host.invalid:7400" in line
    assert "unknown host" in line
    for raw in ("errors resolving", "lookup", "Domain name", "field:", "UNKNOWN:", "ipv4:"):
        assert raw not in line, line


def test_refused_connection_says_what_it_tried_to_reach() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()  # nothing listens there now
    line = one_error(nvpool("pool", "status", "--meta", address, "--timeout", "5"), 1)
    assert f"cannot reach the metadata service at {address}: connection refused" in line
    for raw in ("failed to connect to all addresses", "UNKNOWN:", "ipv4:"):
        assert raw not in line, line


# ---------------------------------------------------------------------------- against a live pool
pool_tests = pytest.mark.slow


@pool_tests
def test_very_long_volume_name_is_refused_in_one_short_line(local_pool: LocalCluster) -> None:
    meta = local_pool.meta.address
    p = nvpool("volume", "create", "n" * 100_000, "--size", "1M", "--meta", meta)
    line = one_error(p, 2)
    assert "volume name" in line and "100000 characters" in line and len(line) < 400
    assert "n" * 1000 not in nvpool("volume", "list", "--meta", meta).stdout


@pool_tests
def test_size_rounding_is_stated(local_pool: LocalCluster) -> None:
    meta = local_pool.meta.address
    p = nvpool("volume", "create", "tiny", "--size", "1000", "--meta", meta)
    try:
        assert p.returncode == 0, p.stderr
        assert "rounded up" in p.stdout and "1000 bytes" in p.stdout and "4.0 KiB" in p.stdout, p.stdout
        g = nvpool("volume", "resize", "tiny", "--size", "5000", "--meta", meta, "--json")
        assert g.returncode == 0, g.stderr
        d = json.loads(g.stdout)
        assert d["size"] == 8192 and d["requested_size"] == 5000 and d["rounded_up"] is True
    finally:
        nvpool("volume", "delete", "tiny", "--yes", "--meta", meta)
    j = nvpool("volume", "create", "tiny2", "--size", "1000", "--meta", meta, "--json")
    try:
        assert j.returncode == 0, j.stderr
        d = json.loads(j.stdout)
        assert d["size"] == 4096 and d["requested_size"] == 1000 and d["rounded_up"] is True
        exact = json.loads(nvpool("volume", "create", "exact", "--size", "1M", "--meta", meta, "--json").stdout)
        assert exact["rounded_up"] is False and exact["requested_size"] == exact["size"] == MiB
    finally:
        nvpool("volume", "delete", "tiny2", "--yes", "--meta", meta)
        nvpool("volume", "delete", "exact", "--yes", "--meta", meta)


@pool_tests
def test_shrinking_is_refused_in_human_units(local_pool: LocalCluster) -> None:
    meta = local_pool.meta.address
    assert nvpool("volume", "create", "shrinkme", "--size", "8M", "--meta", meta).returncode == 0
    try:
        line = one_error(nvpool("volume", "resize", "shrinkme", "--size", "4M", "--meta", meta), 1)
        assert "8.0 MiB" in line and "4.0 MiB" in line and "8388608" not in line
    finally:
        nvpool("volume", "delete", "shrinkme", "--yes", "--meta", meta)


@pool_tests
@pytest.mark.parametrize("args", [["--io-depth", "0"], ["--seconds", "0"], ["--total", "0"], ["--io-size", "0"]],
                         ids=lambda a: " ".join(a))
def test_bench_refuses_degenerate_runs(local_pool: LocalCluster, args: list[str]) -> None:
    meta = local_pool.meta.address
    assert nvpool("volume", "create", "benchvol", "--size", "4M", "--meta", meta).returncode == 0
    try:
        extra = [] if "--total" in args else ["--total", "1M"]
        p = nvpool("bench", "benchvol", *args, *extra, "--meta", meta, timeout=60)
        one_error(p, 2)
        assert "MB/s" not in p.stdout
    finally:
        nvpool("volume", "delete", "benchvol", "--yes", "--meta", meta)


@pool_tests
def test_bench_io_larger_than_volume_is_one_line(local_pool: LocalCluster) -> None:
    meta = local_pool.meta.address
    assert nvpool("volume", "create", "smallbench", "--size", "64K", "--meta", meta).returncode == 0
    try:
        line = one_error(nvpool("bench", "smallbench", "--io-size", "1M", "--total", "1M", "--meta", meta), 1)
        assert "64.0 KiB" in line and "1.0 MiB" in line
    finally:
        nvpool("volume", "delete", "smallbench", "--yes", "--meta", meta)
