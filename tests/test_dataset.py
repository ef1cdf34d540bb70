"""Feeding training jobs (issue 16): batched reads into the caller's memory, the packer, and the
PyTorch readers over a real pool, with forked DataLoader workers after the parent used the pool."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from nvpool import client
from nvpool.client.cluster import LocalCluster
from nvpool.proto.errors import LeaseError, UsageError

torch = pytest.importorskip("torch")  # the `data` extra; the test extra installs the CPU build

MiB = 1 << 20


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    from tests.conftest import make_cluster

    c = make_cluster(tmp_path_factory.mktemp("ds"), agents=2, drives_per_agent=1, drive_size="256M")
    with c.up():  # down() when the module is done
        yield c


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A tree of random files of many sizes (empty, tiny, unaligned, several MiB) in class folders."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(5)
    files: dict[str, bytes] = {}
    sizes = [0, 1, 4095, 4096, 4097, 100_000, 3 * MiB + 17] + [int(s) for s in rng.integers(1, 300_000, 60)]
    for i, n in enumerate(sizes):
        cls = f"class{i % 4}"
        (root / cls).mkdir(exist_ok=True)
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        (root / cls / f"f{i:03d}.bin").write_bytes(data)
        files[f"{cls}/f{i:03d}.bin"] = data
    files["__root__"] = str(root).encode()
    return files


def nv(pool: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvpool", *args, "--meta", pool.meta.address], capture_output=True,
                          text=True, timeout=300)


def test_readv_and_pread_fill_every_kind_of_buffer(pool: LocalCluster) -> None:
    with client.connect(pool.meta.address) as p:
        p.create_volume("rv", 32 * MiB, stripe_unit="64K")
        data = np.random.default_rng(1).integers(0, 256, 32 * MiB, dtype=np.uint8)
        with p.open("rv") as v:
            v.write(0, data)
            reqs: list[tuple[int, Any]] = [(0, np.empty(100, np.uint8)), (65536 - 10, bytearray(20)), (5 * MiB + 3, np.empty(3 * MiB, np.uint8)),
                    (31 * MiB, memoryview(bytearray(MiB))), (7, p.alloc(4096))]
            assert v.readv(reqs) == sum(len(memoryview(b).cast("B")) if not isinstance(b, np.ndarray) else b.nbytes
                                        for _, b in reqs)
            for off, buf in reqs:
                got = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
                assert np.array_equal(got, data[off: off + len(got)]), off
            fut = v.pread(out := np.empty(MiB, np.uint8), 9 * MiB)
            assert fut.result(timeout=30) == MiB and np.array_equal(out, data[9 * MiB: 10 * MiB])
            t = torch.empty(4096, dtype=torch.uint8)
            v.readv([(12345, t)])  # a torch CPU tensor is a destination too
            assert bytes(t.numpy()) == data[12345: 12345 + 4096].tobytes()
            with pytest.raises(UsageError):
                v.readv([(0, b"read-only bytes")])


def test_pack_and_read_every_sample_back(pool: LocalCluster, tree: dict[str, bytes]) -> None:
    root = tree["__root__"].decode()
    r = nv(pool, "dataset", "pack", root, "ds1", "--label-from-dir", "--shard-size", "256K", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    files = {k: v for k, v in tree.items() if k != "__root__"}
    assert summary["files"] == len(files) and summary["classes"] == 4 and summary["shards"] > 4
    from nvpool.data import VolumeDataset, VolumeIterableDataset

    ds = VolumeDataset("ds1", meta=pool.meta.address)
    assert len(ds) == len(files)
    names = sorted(files)
    assert ds.index.names == names
    for i, name in enumerate(names):
        sample, label = ds[i]
        assert sample.tobytes() == files[name], name
        assert label == int(name[5])  # class<k>
    batch = ds.__getitems__([5, 0, 6, 5])
    assert [s.tobytes() for s, _ in batch] == [files[names[i]] for i in (5, 0, 6, 5)]
    it = VolumeIterableDataset("ds1", meta=pool.meta.address, shuffle=True, seed=3)
    seen = [(s.tobytes(), t) for s, t in it]
    assert sorted(h for h, _ in seen) == sorted(files.values())  # every sample once, in a shuffled order
    show = nv(pool, "dataset", "show", "ds1", "--json")
    assert show.returncode == 0 and json.loads(show.stdout)["samples"] == len(files)


def test_dataloader_with_forked_workers_after_the_parent_used_the_pool(pool: LocalCluster,
                                                                        tree: dict[str, bytes]) -> None:
    from nvpool.data import VolumeDataset, VolumeIterableDataset, collate

    files = {k: v for k, v in tree.items() if k != "__root__"}
    if "ds1" not in {v.name for v in client.connect(pool.meta.address).list_volumes()}:
        assert nv(pool, "dataset", "pack", tree["__root__"].decode(), "ds1", "--label-from-dir").returncode == 0
    ds = VolumeDataset("ds1", meta=pool.meta.address)
    first, _ = ds[3]  # the parent reads first: the workers inherit a used pool
    want = {hashlib.sha256(v).hexdigest() for v in files.values()}
    cases: list[tuple[Any, dict[str, Any]]] = [(ds, {"batch_size": 8, "shuffle": True}),
                                               (VolumeIterableDataset("ds1", meta=pool.meta.address), {"batch_size": 8})]
    for dataset, kwargs in cases:
        loader = torch.utils.data.DataLoader(dataset, num_workers=2, collate_fn=collate,
                                             multiprocessing_context="fork", **kwargs)
        got = []
        for samples, labels in loader:
            assert len(samples) == len(labels) <= 8
            got += [hashlib.sha256(s.tobytes()).hexdigest() for s in samples]
        assert sorted(got) == sorted(hashlib.sha256(v).hexdigest() for v in files.values())
        assert set(got) == want
    # equal-length samples through torch's default collate, with a transform to tensors
    fixed = VolumeDataset("ds1", meta=pool.meta.address, transform=lambda a: np.asarray([len(a)], dtype=np.int64))
    loader2 = torch.utils.data.DataLoader(fixed, batch_size=16, num_workers=2, multiprocessing_context="fork")
    lengths = [int(x) for batch in loader2 for x in batch[0].reshape(-1)]
    assert sorted(lengths) == sorted(len(v) for v in files.values())


def test_a_dataset_volume_is_served_for_reading_to_many_and_refused_for_writing(pool: LocalCluster,
                                                                               tree: dict[str, bytes]) -> None:
    if "ds1" not in {v.name for v in client.connect(pool.meta.address).list_volumes()}:
        assert nv(pool, "dataset", "pack", tree["__root__"].decode(), "ds1").returncode == 0
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, nvpool\n"
        f"p = nvpool.connect({pool.meta.address!r}); v = p.open('ds1')\n"
        "print('held', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "held"
        code = ("import nvpool.data as d\n"
                f"ds = d.VolumeDataset('ds1', meta={pool.meta.address!r})\n"
                "print(len(ds), sum(len(ds[i][0]) for i in range(len(ds))))\n")
        readers = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                  env=dict(os.environ)) for _ in range(2)]
        for r in readers:
            assert r.returncode == 0, r.stderr
        assert len({r.stdout for r in readers}) == 1
        with client.connect(pool.meta.address) as p:
            with pytest.raises(LeaseError):
                p.open("ds1")  # the writer lease is held elsewhere
    finally:
        writer.kill()
        writer.wait()


def test_packing_refuses_nothing_and_a_half_packed_volume_is_not_a_dataset(pool: LocalCluster, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = nv(pool, "dataset", "pack", str(empty), "nothing")
    assert r.returncode != 0 and "nothing to pack" in r.stderr
    with client.connect(pool.meta.address) as p:
        p.create_volume("half", 8 * MiB)  # records written, header never: as if the packer died
        with p.open("half") as v:
            v.write(4096, b"x" * 100)
    from nvpool.data import VolumeDataset

    with pytest.raises(UsageError, match="no complete dataset"):
        VolumeDataset("half", meta=pool.meta.address)
