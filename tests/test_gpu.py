"""Reads land in pinned host memory and go to the GPU asynchronously (issue 16). Runs only where
CUDA is available (a lent GPU machine); elsewhere it is skipped, saying why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

MiB = 1 << 20


def test_readv_into_pinned_memory_then_async_copy_to_the_device(tmp_path: Path) -> None:
    from nvpool import client
    from tests.conftest import make_cluster

    c = make_cluster(tmp_path / "pool", agents=2, drives_per_agent=1, drive_size="128M")
    c.up()
    try:
        data = np.random.default_rng(2).integers(0, 256, 16 * MiB, dtype=np.uint8)
        with client.connect(c.meta.address) as pool:
            pool.create_volume("g", 16 * MiB)
            with pool.open("g") as vol:
                vol.write(0, data)
                pinned = torch.empty(8 * MiB, dtype=torch.uint8).pin_memory()
                assert pinned.is_pinned()
                vol.readv([(4 * MiB, pinned)])  # straight into page-locked memory
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    dev = pinned.to("cuda", non_blocking=True)
                stream.synchronize()
                assert torch.equal(dev.cpu(), torch.from_numpy(data[4 * MiB: 12 * MiB].copy()))
    finally:
        c.down()
