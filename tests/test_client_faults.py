"""Client faults with real processes: partial sends on the sync fast path, and a hung (SIGSTOPped) agent.

* A blocking ``sendmsg`` may take only part of a command: a sync write of 200 KiB - 1 MiB must still
  complete on the fast path (no 5 s stall and fall-back) and read back byte for byte.
* An agent that hangs without closing its sockets must cost an I/O at most its time budget
  (``ClientOptions.io_deadline``), then an ``UnavailableError`` that names the agent; volumes elsewhere
  keep working, and after SIGCONT everything works and no byte is wrong.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import pytest

from nvpool import client
from nvpool.client.api import ClientOptions, Volume
from nvpool.client.cluster import LocalCluster, ProcInfo
from nvpool.client.syncpath import MAX_FAST, FastPathMiss
from nvpool.proto.errors import UnavailableError

KiB = 1 << 10
MiB = 1 << 20
T = TypeVar("T")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_sync_writes_of_200k_to_1m_complete_on_the_fast_path(local_pool: LocalCluster, transport: str) -> None:
    rng = np.random.default_rng(6)
    sizes = [200 * KiB, 208 * KiB, 210 * KiB, 212 * KiB, 224 * KiB, 240 * KiB, 250 * KiB, MAX_FAST - 1, MAX_FAST,
             MAX_FAST + 1, 300 * KiB, 512 * KiB, MiB]
    name = f"sendall-{transport}"
    with client.connect(local_pool.meta.address, ClientOptions(transport=transport)) as pool:
        pool.create_volume(name, len(sizes) * MiB, stripe_unit="1M")
        vol = pool.open(name)
        sync = pool._sync
        served, missed = [0], [0]
        real_call = sync.call

        def counting_call(*args: Any, **kwargs: Any) -> None:
            try:
                real_call(*args, **kwargs)
            except FastPathMiss:
                missed[0] += 1
                raise
            served[0] += 1

        sync.call = counting_call  # type: ignore[method-assign]
        model = np.zeros(len(sizes) * MiB, dtype=np.uint8)
        for i, n in enumerate(sizes):
            data = rng.integers(0, 256, n, dtype=np.uint8)
            off = i * MiB  # one stripe unit: a single piece, the fast path's case up to MAX_FAST
            vol.write(off, data)
            model[off : off + n] = data
            assert np.array_equal(vol.read(off, n), data), f"{n} bytes did not read back"
            assert missed[0] == 0, f"a sync write of {n} bytes missed the fast path and fell back"
        fast = sum(1 for n in sizes if n <= MAX_FAST)
        assert served[0] == 2 * fast, "writes and reads up to MAX_FAST should all take the fast path"
        assert sync.misses == 0
        assert np.array_equal(vol.read(0, len(sizes) * MiB), model)  # the full path sees the same bytes
        pool.delete_volume(name)


def _within(seconds: float, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread and fail the test if it has not returned after ``seconds`` (the thread
    is left to finish once the agent runs again), so a client that waits for minutes fails at once."""
    ex = ThreadPoolExecutor(1)
    try:
        return ex.submit(fn).result(timeout=seconds)
    except FutureTimeout:
        pytest.fail(f"still waiting after {seconds:.0f}s for a hung agent")
    finally:
        ex.shutdown(wait=False)


def _fails_in_time(fn: Callable[[], object], budget: float, agent: ProcInfo) -> None:
    def attempt() -> Optional[BaseException]:
        try:
            fn()
        except UnavailableError as exc:
            return exc
        return None

    t0 = time.monotonic()
    err = _within(budget + 10, attempt)
    took = time.monotonic() - t0
    assert err is not None, "the I/O succeeded although its agent is stopped"
    assert took < budget + 2.5, f"the I/O failed only after {took:.1f}s (budget {budget}s)"
    assert agent.address in str(err), f"the error does not name agent {agent.address}: {err}"


def _offset_on(vol: Volume, agent_id: str, size: int) -> int:
    """A stripe-unit-aligned offset of ``vol`` whose stripe unit lives on ``agent_id``."""
    av = vol.asyncio
    su = av.layout.stripe_unit
    for off in range(0, size, su):
        (piece,) = av.layout.map(off, 1)
        if av.endpoints[piece.extent.drive_id].agent_id == agent_id:
            return off
    raise AssertionError(f"no stripe unit on {agent_id}")


def test_hung_agent_fails_io_within_its_budget_naming_the_agent(local_pool: LocalCluster) -> None:
    budget = 3.0
    size = 16 * MiB
    opts = ClientOptions(io_deadline=budget, retries=20)  # many retries: the budget, not the count, must end it
    rng = np.random.default_rng(3)
    with client.connect(local_pool.meta.address, opts) as pool:
        pool.create_volume("hang-wide", size, stripe_unit="256K")  # every drive: every agent
        narrow_info = pool.create_volume("hang-narrow", 4 * MiB, stripe_unit="256K", stripe_width=2)
        agent = next(a for a in local_pool.agents if a.name not in narrow_info.hosts)
        wide, narrow = pool.open("hang-wide"), pool.open("hang-narrow")
        model = rng.integers(0, 256, size, dtype=np.uint8)
        wide.write(0, model)
        narrow_model = rng.integers(0, 256, 4 * MiB, dtype=np.uint8)
        narrow.write(0, narrow_model)
        small_off = _offset_on(wide, agent.name, size)
        big_n = 2 * MiB  # spans every drive, so every agent; kept apart from the small write
        big_off = small_off + 256 * KiB if small_off + 256 * KiB + big_n <= size else small_off - big_n - 256 * KiB
        small = rng.integers(0, 256, 4 * KiB, dtype=np.uint8)
        big = rng.integers(0, 256, big_n, dtype=np.uint8)

        os.kill(agent.pid, signal.SIGSTOP)
        try:
            _fails_in_time(lambda: wide.read(0, size), budget, agent)  # the full (asyncio) path
            _fails_in_time(lambda: wide.read(small_off, 4 * KiB), budget, agent)  # the sync fast path
            _fails_in_time(lambda: wide.write(small_off, small), budget, agent)
            _fails_in_time(lambda: wide.write(big_off, big), budget, agent)
            # a failed write may or may not have landed: the same bytes are written again below
            model[small_off : small_off + small.size] = small
            model[big_off : big_off + big.size] = big
            # a volume on other agents keeps working, without waiting for the stopped one
            t0 = time.monotonic()
            fresh = rng.integers(0, 256, 1 * MiB, dtype=np.uint8)
            _within(budget, lambda: narrow.write(MiB, fresh))
            narrow_model[MiB : 2 * MiB] = fresh
            assert np.array_equal(_within(budget, lambda: narrow.read(0, 4 * MiB)), narrow_model)
            assert np.array_equal(_within(budget, lambda: narrow.read(MiB + 5, 100)), narrow_model[MiB + 5 : MiB + 105])
            assert time.monotonic() - t0 < budget
        finally:
            os.kill(agent.pid, signal.SIGCONT)

        deadline = time.monotonic() + 30
        while True:  # the agent answers again (its connections were dropped: the client reconnects)
            try:
                wide.write(small_off, small)
                wide.write(big_off, big)
                break
            except UnavailableError:
                assert time.monotonic() < deadline, "the agent did not come back after SIGCONT"
                time.sleep(0.2)
        assert np.array_equal(wide.read(0, size), model), "data changed across the hang"
        assert np.array_equal(wide.read(small_off, small.size), small)
        assert np.array_equal(narrow.read(0, 4 * MiB), narrow_model)
        pool.delete_volume("hang-wide")
        pool.delete_volume("hang-narrow")


def test_io_deadline_is_an_option_with_a_30s_default() -> None:
    assert ClientOptions().io_deadline == 30.0
    with pytest.raises(ValueError):
        ClientOptions(io_deadline=0)
