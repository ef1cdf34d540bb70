#!/usr/bin/env python3
"""Dataset-volume benchmark (run by hand; not collected by pytest). Everything side by side in one run,
on one local pool (a metadata service and 4 agents as processes on 127.0.0.1, file-backed drives,
plaintext):

a torch ``DataLoader`` over a packed dataset volume (``nvpool.data.VolumeDataset``: a batch is one
batched read) vs the same files read from a local directory by a plain file ``Dataset`` (one
``np.fromfile`` per sample), same DataLoader settings (``collate_fn=nvpool.data.collate``, shuffled,
forked persistent workers), at two sample sizes (about 100 KiB, like resnet50's records; 4 MiB, like
unet3d's) with 1 worker and with ``--workers``; samples/s, MB/s and the ratio volume / local per row.

Page cache: the local files were just written and the pool's drives are files on the same machine, so
both are in the page cache after a warm-up epoch ("warm" rows: the best of ``--epochs`` timed epochs,
taken local, volume, volume, local ...). "cold" rows drop the page cache of the local files, then of
the pool's drive images (fdatasync + POSIX_FADV_DONTNEED on each file) before one more epoch each: reads
go to the machine's disk (a virtual disk here: the host may still cache it).

    .venv/bin/python tests/bench_dataset.py [--small 100K --small-count 4000 --small-batch 32]
        [--large 4M --large-count 100 --large-batch 4] [--workers 4] [--epochs 4] [--no-cold] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from tests.benchlib import say, daemon_problems  # noqa: E402
from nvpool.client.api import connect  # noqa: E402
from nvpool.client.cluster import LocalCluster  # noqa: E402
from nvpool.client.transport_shm import ShmConnection  # noqa: E402
from nvpool.data import VolumeDataset, collate, pack  # noqa: E402
from nvpool.proto.units import human, parse_size  # noqa: E402

AGENTS = 4
PER_DIR = 1000  # files per directory of the local trees
Sample = tuple[npt.NDArray[np.uint8], str]


# ---------------------------------------------------------------------------------------------- the local baseline
class FileDataset(Dataset[Sample]):
    """A plain file dataset: ``ds[i]`` opens and reads the i-th file into a numpy array."""

    def __init__(self, paths: list[str], names: list[str]) -> None:
        self.paths, self.names = paths, names

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        return np.fromfile(self.paths[i], dtype=np.uint8), self.names[i]


def make_tree(root: Path, count: int, size: int, seed: int) -> None:
    """``count`` files of ``size`` random bytes in folders of ``PER_DIR``."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        d = root / f"d{i // PER_DIR:03d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"s{i:06d}.bin").write_bytes(rng.bytes(size))


def drop_cache(paths: Iterable[Path | str]) -> None:
    """Make each file's page cache clean (fdatasync), then drop it (DONTNEED)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(paths: list[str]) -> Optional[int]:
    """Bytes of the files in the page cache (util-linux ``fincore``; None without it)."""
    if shutil.which("fincore") is None:
        return None
    total = 0
    for i in range(0, len(paths), 500):
        out = subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES", *paths[i: i + 500]], capture_output=True,
                             text=True, check=False)
        if out.returncode != 0:
            return None
        total += sum(int(x) for x in out.stdout.split())
    return total


# ---------------------------------------------------------------------------------------------- loops
@dataclass
class Epoch:
    samples: int
    nbytes: int
    seconds: float

    @property
    def sps(self) -> float:
        return self.samples / self.seconds

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6


def run_epoch(loader: DataLoader[Sample]) -> Epoch:
    n = nbytes = 0
    t0 = time.perf_counter()
    for samples, _names in loader:
        n += len(samples)
        nbytes += sum(int(s.nbytes) for s in samples)
    return Epoch(n, nbytes, time.perf_counter() - t0)


def make_loader(ds: Dataset[Sample], workers: int, batch: int, timeout: float, seed: int) -> DataLoader[Sample]:
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                      multiprocessing_context="fork", persistent_workers=True, timeout=timeout,
                      generator=torch.Generator().manual_seed(seed))


def shutdown(loader: DataLoader[Sample]) -> None:
    it = getattr(loader, "_iterator", None)
    stop: Optional[Callable[[], None]] = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()
    loader._iterator = None


@dataclass
class Config:
    label: str  # "100K"
    size: int
    count: int
    batch: int
    volume: str
    src: Path
    local: Optional[FileDataset] = None
    vol: Optional[VolumeDataset] = None
    pack_summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measured:
    warm: dict[str, list[Epoch]]  # "local"/"volume" -> timed epochs
    first: dict[str, Epoch]  # the warm-up epoch (includes starting the workers and, for the volume, connecting)
    cold: dict[str, Epoch]
    cold_resident: dict[str, Optional[int]]  # bytes still cached after the drop


def measure(cfg: Config, workers: int, epochs: int, cold: bool, drives: list[Path], timeout: float) -> Measured:
    assert cfg.local is not None and cfg.vol is not None
    loaders = {"local": make_loader(cfg.local, workers, cfg.batch, timeout, 1),
               "volume": make_loader(cfg.vol, workers, cfg.batch, timeout, 1)}
    try:
        first = {k: run_epoch(ld) for k, ld in loaders.items()}
        warm: dict[str, list[Epoch]] = {k: [] for k in loaders}
        order = ["local", "volume", "volume", "local"]
        for i in range(epochs * 2):
            k = order[i % 4]
            warm[k].append(run_epoch(loaders[k]))
        cold_ep: dict[str, Epoch] = {}
        res: dict[str, Optional[int]] = {}
        if cold:
            drop_cache(cfg.local.paths)
            res["local"] = resident(cfg.local.paths)
            cold_ep["local"] = run_epoch(loaders["local"])
            drop_cache(drives)
            res["volume"] = resident([str(d) for d in drives])
            cold_ep["volume"] = run_epoch(loaders["volume"])
        return Measured(warm, first, cold_ep, res)
    finally:
        for ld in loaders.values():
            shutdown(ld)


def verify(cfg: Config, n: int = 16) -> list[str]:
    """Samples read in this process through the volume equal the local files; and the transport used."""
    assert cfg.local is not None and cfg.vol is not None
    wrong: list[str] = []
    rng = np.random.default_rng(3)
    for i in [0, len(cfg.local) - 1, *(int(x) for x in rng.integers(0, len(cfg.local), n))]:
        a, name = cfg.vol[i]
        b, lname = cfg.local[i]
        if name != lname or not np.array_equal(a, b):
            wrong.append(f"{cfg.volume}[{i}] ({name}) differs from {cfg.local.paths[i]} ({len(a)} vs {len(b)} bytes)")
    batch = cfg.vol.__getitems__(list(range(min(len(cfg.local), cfg.batch))))
    for i, (a, name) in enumerate(batch):
        if not np.array_equal(a, cfg.local[i][0]):
            wrong.append(f"{cfg.volume} batched read: sample {i} ({name}) differs from the local file")
    return wrong


def transport(ds: VolumeDataset) -> str:
    pool: Any = ds._reader._pool
    if pool is None:
        return "?"
    kinds = ["shm" if isinstance(c, ShmConnection) else "tcp" for c in pool._apool.connections._conns.values()]
    return f"{kinds.count('shm')} shm / {kinds.count('tcp')} tcp"


# ---------------------------------------------------------------------------------------------- figures
@dataclass
class Table:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, sample: str, workers: int, batch: int, cache: str, local: Epoch, vol: Epoch, note: str = "") -> None:
        self.rows.append({"sample": sample, "workers": workers, "batch": batch, "cache": cache,
                          "local_samples_s": round(local.sps, 1), "local_MBps": round(local.mbps, 1),
                          "volume_samples_s": round(vol.sps, 1), "volume_MBps": round(vol.mbps, 1),
                          "ratio": round(vol.sps / local.sps, 3), "note": note})

    def render(self) -> str:
        def num(v: float) -> str:
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"

        head = (f"{'sample':<7} {'workers':>7} {'batch':>5} {'cache':<5} | {'local smp/s':>11} {'local MB/s':>10} | "
                f"{'volume smp/s':>12} {'volume MB/s':>11} | {'vol/local':>9}")
        out = [head, "-" * len(head)]
        for r in self.rows:
            out.append(f"{r['sample']:<7} {r['workers']:>7} {r['batch']:>5} {r['cache']:<5} | "
                       f"{num(r['local_samples_s']):>11} {num(r['local_MBps']):>10} | "
                       f"{num(r['volume_samples_s']):>12} {num(r['volume_MBps']):>11} | {r['ratio']:>9.2f}")
            if r["note"]:
                out.append(f"{'':<8}({r['note']})")
        return "\n".join(out)


def spread(eps: list[Epoch]) -> str:
    return "/".join(f"{e.sps:.0f}" for e in eps)


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", default="100K", help="the small samples' size (resnet50-like records)")
    ap.add_argument("--small-count", type=int, default=4000)
    ap.add_argument("--small-batch", type=int, default=32)
    ap.add_argument("--large", default="4M", help="the large samples' size (unet3d-like)")
    ap.add_argument("--large-count", type=int, default=100)
    ap.add_argument("--large-batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4, help="the 'several workers' rows (the others: 1 worker)")
    ap.add_argument("--epochs", type=int, default=4, help="timed warm epochs per reader (the best is shown)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold (page cache dropped) rows")
    ap.add_argument("--drive-size", default="2G")
    ap.add_argument("--timeout", type=float, default=120.0, help="DataLoader worker timeout (a hang fails the run)")
    ap.add_argument("--keep", action="store_true", help="keep the pool's directory (logs) and the local trees")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # torch warns for every loader with more workers than CPUs: the header says how many CPUs there are
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    if args.workers < 1 or args.epochs < 1:
        raise SystemExit("--workers and --epochs must be at least 1")
    worker_counts = sorted({1, args.workers})
    configs = [
        Config(args.small, parse_size(args.small), args.small_count, args.small_batch, "ds-small", Path()),
        Config(args.large, parse_size(args.large), args.large_count, args.large_batch, "ds-large", Path()),
    ]
    need = sum(c.size * c.count for c in configs) * 1.1 + AGENTS * 64 * (1 << 20)
    if parse_size(args.drive_size) * AGENTS < need:
        raise SystemExit(f"--drive-size {args.drive_size} x {AGENTS} agents is too small for {human(need)} of datasets")
    env_tls = os.environ.pop("NVPOOL_TLS", None)  # a plaintext pool, like the local files
    if env_tls is not None:
        say(f"ignoring NVPOOL_TLS={env_tls} (the pool is plaintext)")
    work = Path(tempfile.mkdtemp(prefix="nvpool-databench-"))
    c = LocalCluster(work / "pool", agents=AGENTS, drives_per_agent=1, drive_size=args.drive_size, tls=False)
    table = Table()
    runs: dict[str, Any] = {}
    wrong: list[str] = []
    wires: dict[str, str] = {}
    t0 = time.monotonic()
    try:
        say(f"writing the local trees under {work}")
        for i, cfg in enumerate(configs):
            cfg.src = work / f"local-{cfg.volume}"
            make_tree(cfg.src, cfg.count, cfg.size, seed=i)
        say("starting the pool")
        c.up()
        with connect(c.meta.address) as pool:
            for cfg in configs:
                cfg.pack_summary = pack(pool, [str(cfg.src)], cfg.volume)
                s = cfg.pack_summary
                say(f"packed {s['files']} files ({human(s['bytes'])}) into {cfg.volume} in {s['seconds']:.1f}s "
                    f"({s['bytes'] / max(s['seconds'], 1e-9) / 1e6:.0f} MB/s)")
        drives = sorted((c.dir / "drives").glob("*.img"))
        for cfg in configs:
            cfg.vol = VolumeDataset(cfg.volume, meta=c.meta.address)
            names = list(cfg.vol.index.names)
            cfg.local = FileDataset([str(cfg.src / n) for n in names], names)
        for cfg in configs:
            assert cfg.local is not None
            for w in worker_counts:
                say(f"{cfg.label} x {cfg.count}, batch {cfg.batch}, {w} worker(s)")
                m = measure(cfg, w, args.epochs, not args.no_cold, drives, args.timeout)
                want = cfg.count * cfg.size
                for k, eps in [*m.warm.items(), *((k, [e]) for k, e in m.cold.items()),
                               *((k, [e]) for k, e in m.first.items())]:
                    for e in eps:
                        if e.samples != cfg.count or e.nbytes != want:
                            wrong.append(f"{cfg.label} {w}w {k}: an epoch gave {e.samples} samples / {e.nbytes} bytes, "
                                         f"expected {cfg.count} / {want}")
                best = {k: max(eps, key=lambda e: e.sps) for k, eps in m.warm.items()}
                note = (f"epochs local {spread(m.warm['local'])}, volume {spread(m.warm['volume'])} smp/s; "
                        f"first epoch (starts workers) local {m.first['local'].sps:.0f}, "
                        f"volume {m.first['volume'].sps:.0f}")
                table.add(cfg.label, w, cfg.batch, "warm", best["local"], best["volume"], note)
                for k, e in best.items():
                    say(f"   warm {k}: {e.sps:.0f} samples/s, {e.mbps:.0f} MB/s")
                if m.cold:
                    res = ", ".join(f"{k} {'?' if v is None else human(v)}" for k, v in m.cold_resident.items())
                    table.add(cfg.label, w, cfg.batch, "cold", m.cold["local"], m.cold["volume"],
                              f"still cached after the drop: {res}")
                    for k, e in m.cold.items():
                        say(f"   cold {k}: {e.sps:.0f} samples/s, {e.mbps:.0f} MB/s")
                runs[f"{cfg.label}/{w}"] = {"first": {k: vars(e) for k, e in m.first.items()},
                                            "warm": {k: [vars(e) for e in eps] for k, eps in m.warm.items()},
                                            "cold": {k: vars(e) for k, e in m.cold.items()},
                                            "cold_resident": m.cold_resident}
        for cfg in configs:
            assert cfg.vol is not None
            wrong.extend(verify(cfg))
            wires[cfg.volume] = transport(cfg.vol)
            pool_ = cfg.vol._reader._pool
            if pool_ is not None:
                pool_.close()
        elapsed = time.monotonic() - t0
        c.down()
        problems = daemon_problems(c)

        out = sys.stderr if args.json else sys.stdout
        sizes = ", ".join(f"{cfg.count} x {cfg.label} ({human(cfg.count * cfg.size)}, batch {cfg.batch})"
                          for cfg in configs)
        print(f"\nDataLoader over a packed dataset volume (VolumeDataset, one batched read per batch) vs the same files "
              f"from a local directory (np.fromfile per sample); {AGENTS} agents x 1 file-backed drive of "
              f"{args.drive_size}, plaintext, client transport auto ({'; '.join(f'{k}: {v}' for k, v in wires.items())}"
              f" in the main process); {sizes}; shuffled, collate_fn=nvpool.data.collate, fork, persistent workers; "
              f"{os.cpu_count()} CPUs; {elapsed:.0f}s in all\n"
              f"page cache: warm = after a warm-up epoch, both the local files and the pool's drive images (same "
              f"machine) are cached, best of {args.epochs} timed epochs; cold = one epoch after fdatasync + "
              f"POSIX_FADV_DONTNEED on every local file / every drive image (a virtual disk: the host may cache it)\n"
              f"ratio = volume / local (samples/s; the bytes are the same)\n", file=out)
        print(table.render(), file=out)
        print("\npacking: " + "; ".join(
            f"{cfg.volume} {cfg.pack_summary['bytes'] / max(cfg.pack_summary['seconds'], 1e-9) / 1e6:.0f} MB/s"
            for cfg in configs), file=out)
        if wrong:
            print("\nWRONG (the figures above do not measure what they say):\n  " + "\n  ".join(wrong), file=out)
        if problems:
            print("\ndaemon log errors:\n  " + "\n  ".join(problems[:40]), file=out)
        if args.json:
            print(json.dumps({"args": vars(args), "seconds": round(elapsed, 1), "rows": table.rows, "runs": runs,
                              "transport": wires, "pack": {cfg.volume: cfg.pack_summary for cfg in configs},
                              "wrong": wrong, "daemon_log_errors": problems}, indent=2))
        return 1 if wrong else 0
    finally:
        c.down()
        if env_tls is not None:
            os.environ["NVPOOL_TLS"] = env_tls
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
