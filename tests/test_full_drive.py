"""A full drive (issue 11, item 4): file drives are sparse, and a file system that fills up used to
take every extent on the drive offline (ENOSPC marked the whole drive failed) while deleting a
volume freed nothing. Now an extent owns its space from the moment it is assigned, an assignment
on a full file system fails cleanly, a failed request fails only itself, and released space goes
back to the file system."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from nvpool import client
from nvpool.agents.drive import Drive, DriveSpec
from nvpool.proto.errors import DriveError, NvpoolError
from tests.conftest import make_cluster

MiB = 1 << 20
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB file system for the drives (the sparse drive files are larger than it)."""
    mnt = tmp_path / "pool" / "drives"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "nvpool-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def status(meta: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "nvpool", "pool", "status", "--meta", meta, "--json"],
                       capture_output=True, text=True, timeout=60)
    return dict(json.loads(p.stdout))


def test_full_file_system_fails_the_request_not_the_drive(small_fs: Path) -> None:
    c = make_cluster(small_fs.parent, agents=2, drives_per_agent=1, drive_size="256M").up()
    try:
        small = np.random.default_rng(5).integers(0, 256, 8 * MiB, dtype=np.uint8)
        with client.connect(c.meta.address) as pool:
            pool.create_volume("small", 8 * MiB, stripe_unit="1M")
            with pool.open("small") as vol:
                vol.write(0, small)
                vol.flush()
            # more than the file system holds: refused cleanly, nothing half-made
            with pytest.raises(NvpoolError, match="no space left"):
                pool.create_volume("big", 200 * MiB, stripe_unit="1M")
            assert [v.name for v in pool.list_volumes()] == ["small"]
            # what fits is reserved up front: writing all of it cannot hit ENOSPC
            before = free_bytes(small_fs)
            pool.create_volume("mid", 32 * MiB, stripe_unit="1M")
            assert before - free_bytes(small_fs) >= 30 * MiB, "the new extents did not reserve their space"
            mid = np.random.default_rng(6).integers(0, 256, 32 * MiB, dtype=np.uint8)
            with pool.open("mid") as vol:
                vol.write(0, mid)
                vol.flush()
                assert np.array_equal(vol.read(0, 32 * MiB), mid)
            with pool.open("small", read_only=True) as vol:
                assert np.array_equal(vol.read(0, 8 * MiB), small)
            assert all(d["state"] == "ok" for a in status(c.meta.address)["agents"] for d in a["drives"])
            # deleting gives the space back to the file system
            low = free_bytes(small_fs)
            pool.delete_volume("mid")
            deadline = time.monotonic() + 20
            while free_bytes(small_fs) - low < 30 * MiB:
                assert time.monotonic() < deadline, "deleting a volume freed no space on the drive's file system"
                time.sleep(0.2)
            # and the space is usable again
            pool.create_volume("again", 32 * MiB, stripe_unit="1M")
            with pool.open("small", read_only=True) as vol:
                assert np.array_equal(vol.read(0, 8 * MiB), small)
    finally:
        c.down()


def test_enospc_on_a_write_fails_that_write_only(small_fs: Path) -> None:
    d = Drive.open(DriveSpec.parse(f"file:{small_fs / 'd.img'}:256M"))
    try:
        chunk = bytes([1]) * MiB
        off = 4 * MiB
        with pytest.raises(DriveError) as ei:
            while True:  # a sparse file on a 64 MiB file system: fill it
                d.write(chunk, off)
                off += MiB
        assert ei.value.errno == errno.ENOSPC
        assert d.failed is None and d.errors == 1  # the drive stays in service
        d.write(chunk, 4 * MiB)  # allocated bytes can still be overwritten
        buf = bytearray(MiB)
        d.readinto(memoryview(buf), 4 * MiB)
        assert bytes(buf) == bytes(chunk)
    finally:
        d.close()
