"""Datasets on a volume, for training jobs: a packer and PyTorch-native readers.

Format (self-describing; any number of hosts open it read-only at once):

* bytes ``[0, 4096)``: the header, ``MAGIC`` then JSON (``count``, ``index_offset``,
  ``index_length``, ``data_offset``, ``version``), zero-padded. The packer writes it **last**, after
  every record and the index are flushed: a volume whose packing stopped half-way has no header and
  is refused, never read as a short dataset.
* records from ``data_offset`` on, each file's bytes at an ``ALIGN``-aligned offset, in the order of
  the index, grouped into *shards* of about ``shard_size`` bytes (the unit an iterable reader takes).
* the index at ``index_offset``: zlib-compressed JSON with ``names``, ``offsets``, ``lengths``,
  optional ``labels`` and ``classes`` (from the parent directory, ImageFolder style), and ``shards``
  (the first record of each shard).

Readers: ``VolumeDataset`` (map-style: ``len``, ``ds[i]``, and ``__getitems__`` so a DataLoader batch
is one batched read, ``Volume.readv``) and ``VolumeIterableDataset`` (whole shards, sequential reads,
the next shard prefetched while the current one is consumed, shards split across DataLoader workers
and distributed ranks). Both open the pool lazily in the process that reads, so they pickle as a
name and an address and work with forked and spawned workers alike. torch is optional: samples are
numpy ``uint8`` arrays, which DataLoader turns into tensors (``collate`` keeps variable-length
samples as lists).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from nvpool.proto.errors import NvpoolError, UsageError

MAGIC = b"NVPOOLDATASET1\n"
HEADER_SIZE = 4096
ALIGN = 4096
DEFAULT_SHARD = 64 * 1024 * 1024
Sample = Any  # a numpy uint8 array, or whatever ``transform`` makes of one


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Index:
    names: list[str]
    offsets: np.ndarray  # int64
    lengths: np.ndarray  # int64
    labels: Optional[np.ndarray]  # int64, or None
    classes: list[str]
    shards: list[int]  # first record of each shard

    def to_bytes(self) -> bytes:
        return zlib.compress(json.dumps({
            "names": self.names, "offsets": self.offsets.tolist(), "lengths": self.lengths.tolist(),
            "labels": self.labels.tolist() if self.labels is not None else None, "classes": self.classes,
            "shards": self.shards,
        }, separators=(",", ":")).encode(), 6)

    @staticmethod
    def from_bytes(raw: bytes) -> "Index":
        d = json.loads(zlib.decompress(raw))
        return Index(list(d["names"]), np.asarray(d["offsets"], dtype=np.int64),
                     np.asarray(d["lengths"], dtype=np.int64),
                     np.asarray(d["labels"], dtype=np.int64) if d.get("labels") is not None else None,
                     list(d.get("classes", [])), list(d.get("shards", [0])))


def read_index(vol: Any) -> Index:
    """The index of the dataset in an open volume (``Volume`` of the sync API)."""
    head = bytes(vol.read(0, HEADER_SIZE))
    if not head.startswith(MAGIC):
        raise UsageError(f"volume {vol.name!r} holds no complete dataset (no header: not packed, or packing did not "
                         "finish)")
    meta = json.loads(head[len(MAGIC):].rstrip(b"\0"))
    if meta.get("version") != 1:
        raise UsageError(f"dataset version {meta.get('version')} is not supported")
    raw = bytes(vol.read(int(meta["index_offset"]), int(meta["index_length"])))
    index = Index.from_bytes(raw)
    if len(index.names) != int(meta["count"]):
        raise UsageError(f"volume {vol.name!r}: the dataset index is damaged")
    return index


# ---------------------------------------------------------------------- packing
def list_files(sources: Sequence[str]) -> list[tuple[str, str]]:
    """(path, name) of every file under ``sources`` (directories walked, sorted), names relative to
    their source directory."""
    out: list[tuple[str, str]] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    full = Path(root) / f
                    out.append((str(full), str(full.relative_to(p))))
        elif p.is_file():
            out.append((str(p), p.name))
        else:
            raise UsageError(f"{src} is neither a file nor a directory")
    if not out:
        raise UsageError("nothing to pack: no files under " + ", ".join(sources))
    return out


def pack(pool: Any, sources: Sequence[str], volume: str, shard_size: int = DEFAULT_SHARD,
         label_from_dir: bool = False, replicas: int = 1, progress: Optional[Callable[[int], None]] = None,
         chunk: int = 8 * 1024 * 1024) -> dict[str, Any]:
    """Write the files under ``sources`` into a new volume ``volume`` as a dataset (see the module
    docstring); ``progress(n)`` is called with bytes as they are written. Returns a summary."""
    files = list_files(sources)
    sizes = [os.path.getsize(p) for p, _ in files]
    offsets, pos = [], HEADER_SIZE
    for n in sizes:
        offsets.append(pos)
        pos += _align(max(n, 1))
    classes: list[str] = []
    labels: Optional[np.ndarray] = None
    if label_from_dir:
        dirs = [str(Path(name).parent) for _, name in files]
        classes = sorted(set(dirs))
        where = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([where[d] for d in dirs], dtype=np.int64)
    shards, acc = [0], 0
    for i, n in enumerate(sizes):
        if acc >= shard_size:
            shards.append(i)
            acc = 0
        acc += _align(max(n, 1))
    index = Index([name for _, name in files], np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64),
                  labels, classes, shards)
    raw = index.to_bytes()
    index_offset = pos
    total = _align(index_offset + len(raw))
    pool.create_volume(volume, total, replicas=replicas)
    t0 = time.monotonic()
    with pool.open(volume) as vol:
        buf = bytearray()
        buf_at = HEADER_SIZE
        for (path, _), off in zip(files, offsets):
            if off != buf_at + len(buf):  # alignment padding
                buf += bytes(off - buf_at - len(buf))
            with open(path, "rb") as f:
                buf += f.read()
            if len(buf) >= chunk:
                vol.write(buf_at, bytes(buf))
                if progress:
                    progress(len(buf))
                buf_at += len(buf)
                buf = bytearray()
        if buf:
            vol.write(buf_at, bytes(buf))
            if progress:
                progress(len(buf))
        vol.write(index_offset, raw)
        vol.flush()  # every record and the index are durable before the header says they exist
        head = MAGIC + json.dumps({"version": 1, "count": len(files), "index_offset": index_offset,
                                   "index_length": len(raw), "data_offset": HEADER_SIZE}).encode()
        vol.write(0, head.ljust(HEADER_SIZE, b"\0"))
        vol.flush()
    return {"volume": volume, "files": len(files), "bytes": sum(sizes), "volume_size": total,
            "shards": len(shards), "classes": len(classes), "seconds": time.monotonic() - t0}


# ---------------------------------------------------------------------- readers
class _Reader:
    """The pool and volume of the process that reads (opened on first use, again after a fork)."""

    def __init__(self, name: str, meta: Optional[str], options: Any = None) -> None:
        self.name, self.meta, self.options = name, meta, options
        self._pid = -1
        self._pool: Any = None
        self._vol: Any = None

    def volume(self) -> Any:
        if self._vol is None or self._pid != os.getpid():
            from nvpool.client.api import connect

            self._pool = connect(self.meta, self.options)
            self._vol = self._pool.open(self.name, read_only=True)
            self._pid = os.getpid()
        return self._vol

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "meta": self.meta, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["meta"], state["options"])  # type: ignore[misc]


def _load_index(name: str, meta: Optional[str], options: Any) -> Index:
    from nvpool.client.api import connect

    with connect(meta, options) as pool, pool.open(name, read_only=True) as vol:
        return read_index(vol)


__all__ = ["Index", "pack", "read_index", "list_files", "NvpoolError"]
