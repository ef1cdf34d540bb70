"""PyTorch-native readers of dataset volumes (the format and the packer: ``client/dataset.py``).

With torch installed the readers are ``torch.utils.data.Dataset`` / ``IterableDataset`` subclasses
(so a DataLoader treats them as such); without it they are plain Python classes with the same API.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from nvpool.client.dataset import Index, _load_index, _Reader

try:  # torch is optional (the ``data`` extra)
    from torch.utils.data import Dataset as _MapBase
    from torch.utils.data import IterableDataset as _IterBase
except ImportError:  # pragma: no cover - exercised where torch is absent
    _MapBase = object  # type: ignore[assignment,misc]
    _IterBase = object  # type: ignore[assignment,misc]


class VolumeDataset(_MapBase):  # type: ignore[type-arg]
    """Map-style dataset over a packed volume: ``len(ds)``; ``ds[i]`` is ``(sample, label)`` with a
    label, else ``(sample, name)``; a sample is a numpy ``uint8`` array of the record's bytes (or what
    ``transform`` makes of it). A DataLoader batch is fetched with one batched read
    (``__getitems__``). Safe with forked and spawned DataLoader workers."""

    def __init__(self, volume: str, meta: Optional[str] = None, transform: Optional[Callable[[np.ndarray], Any]] = None,
                 options: Any = None) -> None:
        self.volume, self.meta, self.transform = volume, meta, transform
        self.index = _load_index(volume, meta, options)
        self._reader = _Reader(volume, meta, options)

    def __len__(self) -> int:
        return len(self.index.names)

    def _tag(self, i: int) -> Any:
        return int(self.index.labels[i]) if self.index.labels is not None else self.index.names[i]

    def _out(self, i: int, data: np.ndarray) -> tuple[Any, Any]:
        return (self.transform(data) if self.transform is not None else data), self._tag(i)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        i %= len(self)
        n = int(self.index.lengths[i])
        data = np.empty(n, dtype=np.uint8)
        if n:
            self._reader.volume().readinto(data, int(self.index.offsets[i]))
        return self._out(i, data)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any]]:
        """A whole batch with one batched read into one buffer (DataLoader calls this)."""
        idx = [int(i) % len(self) for i in indices]
        lengths = [int(self.index.lengths[i]) for i in idx]
        buf = np.empty(sum(lengths), dtype=np.uint8)
        views, pos = [], 0
        for n in lengths:
            views.append(buf[pos: pos + n])
            pos += n
        self._reader.volume().readv([(int(self.index.offsets[i]), v) for i, v in zip(idx, views) if len(v)])
        return [self._out(i, v) for i, v in zip(idx, views)]


def _worker_and_rank() -> tuple[int, int]:
    """(this reader's number, how many readers) over DataLoader workers and distributed ranks."""
    wid, nworkers, rank, world = 0, 1, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        if info is not None:
            wid, nworkers = info.id, info.num_workers
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return rank * nworkers + wid, world * nworkers


class VolumeIterableDataset(_IterBase):  # type: ignore[type-arg]
    """Iterable dataset over a packed volume: each reader (DataLoader worker x distributed rank) takes
    every n-th shard, reads each shard with one sequential read while the next is prefetched, and
    yields its samples like ``VolumeDataset``. ``shuffle`` shuffles the shard order and the samples
    within a shard (``seed`` + ``set_epoch``)."""

    def __init__(self, volume: str, meta: Optional[str] = None, transform: Optional[Callable[[np.ndarray], Any]] = None,
                 shuffle: bool = False, seed: int = 0, options: Any = None) -> None:
        self.volume, self.meta, self.transform = volume, meta, transform
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.index = _load_index(volume, meta, options)
        self._reader = _Reader(volume, meta, options)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index.names)

    def _shard(self, s: int) -> tuple[int, int]:
        bounds = self.index.shards + [len(self.index.names)]
        return bounds[s], bounds[s + 1]

    def _span(self, first: int, last: int) -> tuple[int, int]:
        start = int(self.index.offsets[first])
        end = int(self.index.offsets[last - 1] + self.index.lengths[last - 1])
        return start, end - start

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        me, readers = _worker_and_rank()
        shards = list(range(len(self.index.shards)))
        rng = np.random.default_rng(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(shards)
        mine = shards[me::readers]
        vol = self._reader.volume()

        def start(s: int) -> tuple[int, int, np.ndarray, Any]:
            first, last = self._shard(s)
            off, n = self._span(first, last)
            buf = np.empty(n, dtype=np.uint8)
            return first, last, buf, vol.pread(buf, off) if n else None

        pending = start(mine[0]) if mine else None
        for k in range(len(mine)):
            assert pending is not None
            first, last, buf, fut = pending
            if fut is not None:
                fut.result()
            pending = start(mine[k + 1]) if k + 1 < len(mine) else None  # prefetch while this one is used
            base = int(self.index.offsets[first])
            order = list(range(first, last))
            if self.shuffle:
                rng.shuffle(order)
            for i in order:
                o, n = int(self.index.offsets[i]) - base, int(self.index.lengths[i])
                data = buf[o: o + n]
                tag = int(self.index.labels[i]) if self.index.labels is not None else self.index.names[i]
                yield (self.transform(data) if self.transform is not None else data), tag


def collate(batch: Iterable[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """A DataLoader ``collate_fn`` for variable-length samples: (list of samples, list of labels or
    names). (torch's default collate stacks equal-length samples into one tensor.)"""
    samples, tags = [], []
    for s, t in batch:
        samples.append(s)
        tags.append(t)
    return samples, tags



__all__ = ["VolumeDataset", "VolumeIterableDataset", "collate", "Index"]
