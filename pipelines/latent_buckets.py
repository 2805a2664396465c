"""Aspect-ratio buckets: which bucket an image goes to, and the reader that batches within buckets.

`precompute` with ``buckets`` writes one sub-dataset per bucket (`pipelines.latent_shards`,
``bucket_manifest``); `BucketedLatentReader` reads them as one stream in which every batch holds one
bucket's samples. `open_reader` returns the plain `LatentDataset` for an unbucketed dataset and a
`BucketedLatentDataset` for a bucketed one, so training code does not branch on the layout.

Ordering contract (on top of `latent_shards`' per-bucket contract)
-------------------------------------------------------------------
Each bucket b is read by its own `LatentShardReader` (same seed, rank, world size, window) with
``M_b = N_b // W`` samples per rank and epoch; buckets with ``N_b < W`` cannot be split over the ranks and
are left out (``skipped_buckets``). Infinite mode (training): batch j of the stream comes from bucket
``schedule[j]``, where the schedule is cut into *cycles* of ``L = sum(n_b)`` batches, ``n_b =
max(1, round(M_b / B))``, and cycle c is bucket b repeated n_b times, permuted with
``numpy.random.default_rng([seed, c, 7])`` -- the same on every rank, so all ranks train one bucket at a
time and take the same number of steps. Bucket b's batches are the consecutive batches of its own
infinite stream. A run that consumed ``k * B`` samples resumes exactly: bucket b's reader starts at
``count_b(k) * B``, its batches before step k. Epoch mode (validation): the buckets one after another, in
manifest order, each its epoch-mode stream (a bucket's last batch may be short).

Loader workers: the buckets' pieces are merged in the order the consumer needs them (a piece's key is the
stream batch at which its window is first filled), read by ``DataLoader(reader.block_pieces(),
num_workers=K)`` and routed back to their bucket's assembler, so each row group is read once per pass.
"""

from __future__ import annotations

import collections
import heapq
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pipelines import lazy_dataset
from pipelines import manifest as manifest_lib
from pipelines import storage
from pipelines.latent_shards import (LatentDatasetError, LatentShardReader, bucket_manifest, bucket_names,
                                     is_bucketed, split_samples)


def assign_buckets(widths: Sequence[int], heights: Sequence[int], sizes: Sequence[Sequence[int]]) -> np.ndarray:
    """Index of the bucket (sizes: [height, width] each) whose aspect ratio is nearest each image's, in log
    space (a 2:1 and a 1:2 image are equally far from the square); ties go to the earlier bucket."""
    image = np.log(np.asarray(widths, dtype=np.float64) / np.asarray(heights, dtype=np.float64))
    buckets = np.log(np.array([w / h for h, w in sizes], dtype=np.float64))
    return np.abs(image[:, None] - buckets[None, :]).argmin(axis=1)


def __getattr__(name: str):
    if name == "BucketedLatentDataset":
        return lazy_dataset.iterable_dataset(globals(), name, BucketedLatentReader)
    if name == "BucketedPieces":
        return lazy_dataset.iterable_dataset(globals(), name, BucketedPieceReader)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_reader(uri: str, columns: Sequence[str], **kwargs):
    """`LatentDataset` for an unbucketed latent dataset, `BucketedLatentDataset` for a bucketed one (same
    arguments)."""
    from pipelines import latent_shards

    if is_bucketed(manifest_lib.read(storage.normalize(uri))):
        return __getattr__("BucketedLatentDataset")(uri, columns, **kwargs)
    return latent_shards.LatentDataset(uri, columns, **kwargs)


class BucketedLatentReader:
    """The methods of `BucketedLatentDataset` (a torch IterableDataset subclass); see the module."""

    def __init__(self, uri: str, columns: Sequence[str], rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_offset: int = 0, epoch: int = 0, infinite: bool = True, batch_size: int | None = None,
                 shuffle: bool = True, shuffle_window: int = 1024, drop_last: bool = False,
                 open_files: int = 8, split: str = "train"):
        super().__init__()
        self.uri = storage.normalize(uri)
        manifest = manifest_lib.read(self.uri)
        if infinite and batch_size is None:
            raise LatentDatasetError(f"{self.uri}: a bucketed dataset streams batches (one bucket each): "
                                     "pass batch_size")
        if infinite and start_offset % batch_size:
            raise LatentDatasetError(f"start_offset {start_offset}: a bucketed stream resumes at a batch boundary "
                                     f"(a multiple of batch_size {batch_size})")
        if start_offset < 0:
            raise LatentDatasetError(f"start_offset must be >= 0, got {start_offset}")
        self.seed, self.infinite, self.batch_size, self.start_offset = seed, infinite, batch_size, start_offset
        self._cycle_memo: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.columns = list(columns)
        names = bucket_names(manifest)
        self.bucket_names: list[str] = []
        self.skipped_buckets: dict[str, int] = {}  # name -> samples of a bucket too small to split over the ranks
        per_rank: list[int] = []
        for name in names:
            samples = split_samples(bucket_manifest(manifest, name), split)
            if samples < world_size:
                self.skipped_buckets[name] = samples
                continue
            self.bucket_names.append(name)
            per_rank.append(samples // world_size)
        if not self.bucket_names:
            raise LatentDatasetError(f"{self.uri}: no bucket of the {split} split holds {world_size} samples "
                                     f"(buckets: {dict(zip(names, [split_samples(bucket_manifest(manifest, n), split) for n in names]))})")
        self.samples_per_bucket = per_rank  # per rank and epoch
        self.samples_per_epoch = sum(per_rank)
        common = dict(rank=rank, world_size=world_size, seed=seed, epoch=epoch, infinite=infinite,
                      batch_size=batch_size, shuffle=shuffle, shuffle_window=shuffle_window, drop_last=drop_last,
                      open_files=open_files, split=split)
        if infinite:
            self.cycle_counts = np.array([max(1, round(m / batch_size)) for m in per_rank], dtype=np.int64)
            consumed = self.bucket_batches(start_offset // batch_size)
            offsets = (consumed * batch_size).tolist()
        else:
            # Epoch mode: the buckets one after another; the offset falls into one of them.
            starts = np.concatenate([[0], np.cumsum(per_rank)[:-1]])
            offsets = np.clip(start_offset - starts, 0, per_rank).tolist()
            self.cycle_counts = None
        self.readers = [LatentShardReader(self.uri, columns, start_offset=int(offset), bucket=name, **common)
                        for name, offset in zip(self.bucket_names, offsets)]
        self.shapes = {name: reader.shapes for name, reader in zip(self.bucket_names, self.readers)}

    # ------------------------------------------------------------------------------------------
    # The bucket schedule (infinite mode)

    def cycle(self, index: int) -> np.ndarray:
        """Cycle `index` of the schedule: bucket indices (into `bucket_names`), one per batch."""
        memo = self._cycle_memo.get(index)
        if memo is None:
            ordered = np.repeat(np.arange(len(self.bucket_names)), self.cycle_counts)
            memo = np.random.default_rng([self.seed, index, 7]).permutation(ordered)
            self._cycle_memo[index] = memo
            while len(self._cycle_memo) > 4:
                self._cycle_memo.popitem(last=False)
        return memo

    def bucket_of_batch(self, j: int) -> int:
        """The bucket (index into `bucket_names`) of batch j of the stream, counted from the stream's start."""
        period = int(self.cycle_counts.sum())
        return int(self.cycle(j // period)[j % period])

    def bucket_batches(self, k: int) -> np.ndarray:
        """How many of the stream's first k batches (from its start, not the offset) each bucket gave."""
        period = int(self.cycle_counts.sum())
        counts = (k // period) * self.cycle_counts
        return counts + np.bincount(self.cycle(k // period)[:k % period], minlength=len(self.bucket_names))

    def _global_batch(self, bucket: int, occurrence: int) -> int:
        """The stream batch (from its start) that is bucket `bucket`'s batch number `occurrence`."""
        n = int(self.cycle_counts[bucket])
        cycle, within = divmod(occurrence, n)
        positions = np.flatnonzero(self.cycle(cycle) == bucket)
        return cycle * int(self.cycle_counts.sum()) + int(positions[within])

    # ------------------------------------------------------------------------------------------
    # Pieces (loader workers) and assembling (the consuming process)

    def _keyed_pieces(self, bucket: int) -> Iterator[tuple[int, int, int, Any]]:
        """(stream batch at which it is first needed, bucket, sequence number, piece) of one bucket's pieces."""
        reader = self.readers[bucket]
        first_batch = reader.start_offset // self.batch_size if self.infinite else 0
        for seq, (position, piece) in enumerate(reader.keyed_pieces()):
            if self.infinite:
                key = self._global_batch(bucket, first_batch + position // self.batch_size)
            else:
                key = bucket  # epoch mode: bucket after bucket
            yield key, bucket, seq, piece

    def _piece_plan(self) -> Iterator[tuple[int, Any]]:
        """(bucket, piece) of every bucket's pieces, merged in the order the consumer needs them."""
        for _, bucket, _, piece in heapq.merge(*(self._keyed_pieces(b) for b in range(len(self.readers)))):
            yield bucket, piece

    def read_pieces(self, worker: int = 0, n_workers: int = 1, shared: bool = False) -> Iterator[dict[str, Any]]:
        for index, (bucket, piece) in enumerate(self._piece_plan()):
            if index % n_workers == worker:
                yield {**self.readers[bucket]._read_piece(piece, shared), "bucket": bucket}

    def block_pieces(self):
        """The merged pieces as a torch IterableDataset for `DataLoader(..., batch_size=None, num_workers=K)`."""
        return __getattr__("BucketedPieces")(self)

    def blocks_per_window(self) -> int:
        return max(reader.blocks_per_window() for reader in self.readers)

    def assemble(self, pieces: Iterable[dict[str, Any]] | None = None, pin_memory: bool = False
                 ) -> Iterator[dict[str, Any]]:
        """The stream's batches from the merged pieces in order (None: read them here)."""
        received = iter(self.read_pieces() if pieces is None else pieces)
        queues: list[collections.deque] = [collections.deque() for _ in self.readers]

        def routed(bucket: int) -> Iterator[dict[str, Any]]:
            while True:
                if queues[bucket]:
                    yield queues[bucket].popleft()
                    continue
                got = next(received, None)
                if got is None:
                    return
                queues[int(got["bucket"])].append(got)

        streams = [reader.assemble(routed(b), pin_memory=pin_memory) for b, reader in enumerate(self.readers)]
        if not self.infinite:
            for stream in streams:
                yield from stream
            return
        j = self.start_offset // self.batch_size
        while True:
            yield next(streams[self.bucket_of_batch(j)])
            j += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None or info.num_workers <= 1:
            return self.assemble()
        # A plain DataLoader's worker: every worker assembles the stream, each keeps batch j % K == its id.
        return (batch for index, batch in enumerate(self.assemble()) if index % info.num_workers == info.id)


class BucketedPieceReader:
    """The methods of `BucketedPieces`: a bucketed reader's merged pieces, piece i read by worker i % K."""

    def __init__(self, reader: BucketedLatentReader):
        super().__init__()
        self.reader = reader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None:
            return self.reader.read_pieces(shared=True)
        return self.reader.read_pieces(info.id, info.num_workers, shared=True)


def bucket_weights(manifest: dict) -> dict[str | None, float]:
    """Each bucket's share of the training split's samples (for FLOP counts averaged over buckets)."""
    counts = {name: split_samples(bucket_manifest(manifest, name), "train") for name in bucket_names(manifest)}
    total = sum(counts.values())
    return {name: (count / total if total else 0.0) for name, count in counts.items()}
