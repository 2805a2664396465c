"""A worker's training batches: a rank's stream of a shard reader (`LatentDataset` for Stage B / C,
`ImageShardDataset` for Stage A) behind a DataLoader. The readers batch and order the samples
themselves (a seeded order that resumes at any sample), so the loader only adds worker processes.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from pipelines.training.config import DataConfig


def batches(dataset: IterableDataset, data: DataConfig, device: torch.device) -> Iterator[dict]:
    """An endless iterator of the reader's batches, read by `data.loader_workers` processes."""
    workers = data.loader_workers
    # A private generator: DataLoader draws its workers' base seed from it, not from the global RNG
    # (which would shift the dropout stream of a resumed run against an uninterrupted one).
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(data.seed),
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    return iter(loader)
