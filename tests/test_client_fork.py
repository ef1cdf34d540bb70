"""The sync client across fork() and spawn, with a real local pool.

A process that used a ``Pool`` and then forks (PyTorch ``DataLoader`` workers, Linux's default start
method) must be able to go on using the same ``Pool``/``Volume`` objects in the child: the client
notices the fork and reconnects there (its event-loop thread did not survive the fork, and grpc.aio
cannot be used in the child), while the parent keeps working. ``Pool`` and ``Volume`` pickle as address,
name and options, for ``spawn`` workers.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from nvpool import client
from nvpool.client.api import ClientOptions, Pool, Volume
from nvpool.client.cluster import LocalCluster

KiB = 1 << 10
MiB = 1 << 20
pytestmark = pytest.mark.slow


def _pattern(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _wait_child(pid: int, seconds: float) -> int:
    """The child's exit status; a child still running after ``seconds`` is killed and fails the test."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child {pid} hung (killed after {seconds:.0f}s)")


def _child_io(pool: Pool, vol: Volume, parent_data: np.ndarray, k: int) -> None:
    """In a forked child: I/O through the parent's Pool and Volume objects."""
    assert np.array_equal(vol.read(100, 4 * KiB), parent_data[100 : 100 + 4 * KiB])  # sync fast path
    assert np.array_equal(vol.read(0, parent_data.size), parent_data)  # asyncio path, every agent
    small, big = _pattern(100 + k, 3 * KiB), _pattern(200 + k, 1 * MiB + 7)
    base = (4 + 2 * k) * MiB
    vol.write(base, small)
    vol.write(base + 64 * KiB, big)
    assert np.array_equal(vol.read(base, small.size), small)
    assert np.array_equal(vol.read(base + 64 * KiB, big.size), big)
    vol.flush()
    assert "fork" in {v.name for v in pool.list_volumes()}  # the metadata service, from the child
    again = pool.open("fork")
    assert np.array_equal(again.read(base, small.size), small)
    pool.close()


def test_forked_children_use_the_parents_pool_and_volume(local_pool: LocalCluster, tmp_path: Path) -> None:
    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("fork", 8 * MiB, stripe_unit="256K")
        vol = pool.open("fork")
        data = _pattern(1, 4 * MiB)
        vol.write(0, data)
        assert np.array_equal(vol.read(100, 4 * KiB), data[100 : 100 + 4 * KiB])  # this thread's fast channels
        assert np.array_equal(vol.read(0, 4 * MiB), data)  # the loop thread's connections

        children = []
        for k in range(2):  # two workers at once, as a DataLoader starts them
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                code = 1
                try:
                    signal.alarm(60)  # belt and braces: never outlive the test
                    _child_io(pool, vol, data, k)
                    code = 0
                except BaseException:
                    (tmp_path / f"child{k}.err").write_text(traceback.format_exc())
                finally:
                    os._exit(code)
            children.append(pid)
        for k, pid in enumerate(children):
            code = _wait_child(pid, 30)
            err = tmp_path / f"child{k}.err"
            assert code == 0, f"child {k} failed:\n{err.read_text() if err.exists() else f'exit status {code}'}"

        # the parent keeps working on its own loop and connections, and sees the children's writes
        assert np.array_equal(vol.read(100, 4 * KiB), data[100 : 100 + 4 * KiB])
        assert np.array_equal(vol.read(0, 4 * MiB), data)
        for k in range(2):
            base = (4 + 2 * k) * MiB
            assert np.array_equal(vol.read(base, 3 * KiB), _pattern(100 + k, 3 * KiB))
            assert np.array_equal(vol.read(base + 64 * KiB, MiB + 7), _pattern(200 + k, MiB + 7))
        vol.write(0, data[::-1].copy())
        assert np.array_equal(vol.read(0, 4 * MiB), data[::-1])
        pool.delete_volume("fork")


_NO_FORK_SUPPORT_CHILD = """
import os, sys, time
from nvpool import client
from nvpool.proto.errors import UnavailableError
pool = client.connect(sys.argv[1])
vol = pool.open("nofork")
vol.write(0, b"parent")
pid = os.fork()
if pid == 0:
    code = 3
    try:
        assert bytes(vol.read(0, 6)) == b"parent"  # the data plane needs no gRPC
        vol.write(0, b"child!")
        t0 = time.monotonic()
        try:
            pool.list_volumes()
        except UnavailableError as exc:
            code = 0 if "GRPC_ENABLE_FORK_SUPPORT" in str(exc) and time.monotonic() - t0 < 2 else 4
            print(exc, file=sys.stderr)
    finally:
        os._exit(code)
deadline = time.monotonic() + 20
while not (done := os.waitpid(pid, os.WNOHANG))[0]:
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        sys.exit("the forked child hung")
    time.sleep(0.05)
assert bytes(vol.read(0, 6)) == b"child!"
sys.exit(os.waitstatus_to_exitcode(done[1]))
"""


def test_forked_child_without_grpc_fork_support_gets_a_clear_error_not_a_hang(local_pool: LocalCluster) -> None:
    """With GRPC_ENABLE_FORK_SUPPORT=0 no gRPC call can complete in a forked child: metadata calls there
    fail at once, saying why; agent I/O (no gRPC) still works."""
    with client.connect(local_pool.meta.address) as pool:
        pool.create_volume("nofork", 1 * MiB)
        env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="0")
        p = subprocess.run([sys.executable, "-c", _NO_FORK_SUPPORT_CHILD, local_pool.meta.address], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        pool.delete_volume("nofork", force=True)  # the child exited without closing: its lease lingers


def _spawned_reader(vol: Volume, results: "multiprocessing.Queue[tuple[str, str]]") -> None:
    """In a ``spawn`` child: the Volume arrived pickled; it reopens on first use."""
    try:
        digest = hashlib.sha256(vol.read(0, vol.size).tobytes()).hexdigest()
        vol.write(vol.size - 5, b"spawn")
        results.put(("ok", digest))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def test_volume_pickles_to_a_spawned_worker(local_pool: LocalCluster) -> None:
    with client.connect(local_pool.meta.address, ClientOptions(retries=3)) as pool:
        pool.create_volume("spawned", 2 * MiB, stripe_unit="64K")
        vol = pool.open("spawned")
        data = _pattern(7, 2 * MiB)
        vol.write(0, data)
        # a spawned worker is another client: it may write only once this one has closed for writing
        vol.close()
        vol = pool.open("spawned", read_only=True)
        writer = pool.open("spawned")  # pickles as (pool, name, writable); reopens in the child
        writer.close()
        ctx = multiprocessing.get_context("spawn")
        results: "multiprocessing.Queue[tuple[str, str]]" = ctx.Queue()
        proc = ctx.Process(target=_spawned_reader, args=(writer, results))
        proc.start()
        try:
            kind, value = results.get(timeout=60)
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert kind == "ok", value
        assert value == hashlib.sha256(data.tobytes()).hexdigest()
        assert bytes(vol.read(2 * MiB - 5, 5)) == b"spawn"
        pool.delete_volume("spawned", force=True)  # the spawned child exited without closing


def test_pool_and_volume_pickle_as_address_name_and_options(local_pool: LocalCluster) -> None:
    opts = ClientOptions(retries=3, io_deadline=12.0)
    with client.connect(local_pool.meta.address, opts) as pool:
        pool.create_volume("pickled", 1 * MiB)
        vol = pool.open("pickled", read_only=False)
        data = _pattern(9, 1 * MiB)
        vol.write(0, data)
        blob = pickle.dumps(vol)
        vol.close()  # the unpickled copy is another client: the writer lease must be free for it
        vol = pool.open("pickled", read_only=True)

        assert len(blob) < 1024, "a pickled Volume should carry only its address, name and options"
        copy = pickle.loads(blob)
        assert copy.name == "pickled"
        assert copy._pool is not pool and copy._pool.options == opts
        assert copy._pool.address == local_pool.meta.address
        try:
            assert np.array_equal(copy.read(0, 1 * MiB), data)  # reopened on first use
            copy.write(10, b"copy")
            assert bytes(vol.read(10, 4)) == b"copy"
            assert copy.size == vol.size and copy.generation == vol.generation
        finally:
            copy._pool.close()

        pool_copy = pickle.loads(pickle.dumps(pool))
        try:
            assert "pickled" in {v.name for v in pool_copy.list_volumes()}
            assert bytes(pool_copy.open("pickled", read_only=True).read(10, 4)) == b"copy"
        finally:
            pool_copy.close()
        pool.delete_volume("pickled")
