"""A worker's training batches: a rank's stream of a shard reader (`LatentDataset` for Stage B / C,
`ImageShardDataset` for Stage A) behind a DataLoader. The readers order the samples themselves (a
seeded order that resumes at any sample), so the loader only adds worker processes.

`LatentDataset` splits the work: the loader's workers read the stream's pieces (each parquet row group
once, piece i by worker i % K, handed back in order) and the reader's `assemble` cuts the shuffled
batches from them here, so K workers do not read every block K times (see `pipelines.latent_shards`); a
bucketed dataset's reader (`pipelines.latent_buckets`) does the same over all its buckets' pieces.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from pipelines.latent_buckets import BucketedLatentReader
from pipelines.latent_shards import LatentShardReader
from pipelines.training.config import DataConfig


def batches(dataset: IterableDataset, data: DataConfig, device: torch.device) -> Iterator[dict]:
    """An endless iterator of the reader's batches, read by `data.loader_workers` processes."""
    workers = data.loader_workers
    pin = device.type == "cuda"
    # A private generator: DataLoader draws its workers' base seed from it, not from the global RNG
    # (which would shift the dropout stream of a resumed run against an uninterrupted one).
    generator = torch.Generator().manual_seed(data.seed)
    if isinstance(dataset, (LatentShardReader, BucketedLatentReader)):
        if not workers:
            return dataset.assemble(pin_memory=pin)
        # In flight: one window's pieces, so the workers read window q+1 while batches of q are cut
        # (memory: the window buffer + about one window of pieces in shared memory).
        prefetch = max(2, -(-dataset.blocks_per_window() // workers))
        pieces = DataLoader(dataset.block_pieces(), batch_size=None, num_workers=workers, generator=generator,
                            prefetch_factor=prefetch, persistent_workers=False)
        # Batches are gathered straight into pinned memory: no pin thread, no second copy.
        return dataset.assemble(iter(pieces), pin_memory=pin)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin, generator=generator,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    return iter(loader)
