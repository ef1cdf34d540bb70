"""Datasets on nvpool volumes for training jobs (``client/dataset.py``): ``pack`` a tree of files into
a volume, then read it with ``VolumeDataset`` (map-style) or ``VolumeIterableDataset`` from a
``torch.utils.data.DataLoader`` (or plain Python: torch is optional)."""

from nvpool.client.datareaders import VolumeDataset, VolumeIterableDataset, collate
from nvpool.client.dataset import Index, pack, read_index

__all__ = ["Index", "VolumeDataset", "VolumeIterableDataset", "collate", "pack", "read_index"]
