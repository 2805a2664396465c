"""The latent-shard format (``latents/<version>/``): written by `precompute`, read by training.

One module for both sides, so the writer and the reader cannot drift apart: the shard schema and
parquet options, the shard writer (exact row groups, temp name + rename), the per-shard stats in each
file's footer, the empty caption's embedding file, and the reader. No torch at import: the phase's CPU
tasks import this module (`LatentDataset` is made on first use, see `pipelines.lazy_dataset`).

Format: ``shard-NNNNN.parquet`` files with string columns ``key``, ``uid``, ``caption`` (zstd,
dictionary) and float16 tensor columns stored as flat fixed-size lists (PLAIN, uncompressed, the
shape in the field metadata under ``shape``); the writer's per-shard stats as JSON in the footer
under ``wurst.precompute.stats``; ``empty_text_emb.npy``; ``manifest.json`` (``shards`` with row
counts, ``row_group_size``, ``columns`` with shape and dtype).

Reader
------

``LatentDataset(uri, columns, rank, world_size, seed, ...)`` is a ``torch.utils.data.IterableDataset``
that yields dicts: tensor columns as float16 ``torch.Tensor`` shaped as the manifest says
(``text_emb`` (77, W), ``semantic`` (16, h, w), ``stage_a`` (4, H, W)), string columns (``uid``,
``caption``, ``key``) as ``str`` (per sample) or ``list[str]`` (per batch). Only the requested parquet
columns are read.

Ordering contract (exact; tests and resumable training rely on it)
--------------------------------------------------------------------
The dataset holds N samples in the shards listed in ``manifest.json`` (``shards``, in that order);
each shard is cut into *blocks* of ``row_group_size`` rows (its parquet row groups; the last block of
a shard may be shorter). For epoch ``e`` and seed ``s``:

1. The blocks are permuted with ``numpy.random.default_rng([s, e])`` (``shuffle=False``: manifest
   order) and concatenated into one sequence of N samples.
2. Rank ``r`` of ``world_size`` W takes the contiguous range ``[r*M, (r+1)*M)`` of that sequence,
   ``M = N // W`` (``samples_per_epoch``). The last ``N - W*M`` (< W) samples of the sequence are not
   used in that epoch; with shuffling they are different samples every epoch. So within an epoch the
   ranks' samples are disjoint, and every rank sees the same number of samples (no DDP rank runs dry
   first).
3. The range is cut into windows of ``shuffle_window`` samples; window ``q`` is permuted with
   ``numpy.random.default_rng([s, e, r, W, q])`` (``shuffle=False``: unchanged). The result is the
   rank's epoch sequence ``S(r, e)``.
4. The rank's *stream* is ``S(r, epoch), S(r, epoch+1), ...`` (``infinite=True``) or ``S(r, epoch)``
   alone (``infinite=False``), started ``start_offset`` samples in. ``start_offset`` counts the samples
   this rank consumed since the start of epoch ``epoch`` (it may exceed M in infinite mode), so a run
   that consumed k samples resumes with ``start_offset=k`` and gets exactly what an uninterrupted
   reader yields after its first k samples.
5. With ``batch_size=b`` the stream (from the offset on) is cut into batches of b consecutive samples,
   and batch ``j`` is produced by DataLoader worker ``j % K`` (K = ``num_workers``, 1 without workers).
   ``DataLoader(dataset, batch_size=None, num_workers=K)`` returns worker outputs round-robin in order,
   so the consumer receives batches 0, 1, 2, ... = the stream itself, for any K. In epoch mode the
   last batch may be short unless ``drop_last=True``.
   With ``batch_size=None`` the dataset yields single samples and sample ``j`` goes to worker ``j % K``;
   the stream order (and exact resume) then holds for ``num_workers`` <= 1 only, because a
   ``DataLoader(batch_size=b)`` collates b samples of one worker into a batch. Use dataset-side
   batching for multi-worker training.

The order depends on (manifest, seed, epoch, rank, world_size, shuffle, shuffle_window), never on the
number of DataLoader workers. Each worker reads the blocks of every window it takes a batch from, so
with K workers a block may be read up to K times (cheap: tensor columns are uncompressed PLAIN).
"""

from __future__ import annotations

import collections
import io
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import lazy_dataset
from pipelines import manifest as manifest_lib
from pipelines import storage
from pipelines.phase import InputError

STRING_COLUMNS = ("uid", "caption", "key")
EMPTY_TEXT_FILE = "empty_text_emb.npy"
STATS_KEY = b"wurst.precompute.stats"
SHAPE_KEY = b"shape"


class LatentDatasetError(InputError):
    """The latent dataset, its manifest or a requested column is not what the reader expects."""


# ------------------------------------------------------------------------------------------------
# Writing


def shard_schema(tensor_shapes: dict[str, Any]):
    """key, uid, caption (strings) + one flat fixed-size list of float16 per tensor column."""
    fields = [pa.field(name, pa.string(), nullable=False) for name in STRING_COLUMNS]
    for name, shape in tensor_shapes.items():
        fields.append(pa.field(name, pa.list_(pa.float16(), int(np.prod(shape))), nullable=False))
    return pa.schema(fields)


def tensor_schema(shapes: dict[str, list[int]]):
    """`shard_schema` with each tensor column's shape in its field metadata (what the writer stores)."""
    fields = []
    for field in shard_schema(shapes):
        if field.name in shapes:
            field = field.with_metadata({SHAPE_KEY: json.dumps(shapes[field.name]).encode()})
        fields.append(field)
    return pa.schema(fields)


def tensor_column(values: np.ndarray):
    """(n, *shape) array -> flat fixed-size list float16 array of n rows (zero-copy for float16)."""
    values = np.ascontiguousarray(values, dtype=np.float16)
    width = int(np.prod(values.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def shard_table(keys: list[str], uids: list[str], captions: list[str], tensors: dict[str, bytes],
                shapes: dict[str, list[int]]) -> pa.Table:
    """One table in the shard schema: the strings, and each tensor column from its raw float16 bytes."""
    n = len(uids)
    columns: dict[str, Any] = {"key": pa.array(keys, pa.string()), "uid": pa.array(uids, pa.string()),
                               "caption": pa.array(captions, pa.string())}
    for name, shape in shapes.items():
        raw = tensors.get(name, b"") if n else b""
        columns[name] = tensor_column(np.frombuffer(raw, dtype=np.float16).reshape((n, *shape)))
    return pa.table(columns, schema=tensor_schema(shapes))


def parquet_writer_options(schema) -> dict[str, Any]:
    """Options for `pq.ParquetWriter`: strings zstd + dictionary; tensor columns uncompressed PLAIN
    without statistics. Dictionary-encoded float16 lists read ~15x slower, and fp16 latents do not
    compress, so PLAIN keeps the reader near memory speed (bench/precompute.py measures it)."""
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    tensors = [f.name for f in schema if not pa.types.is_string(f.type)]
    return {
        "compression": {**{n: "zstd" for n in strings}, **{n: "none" for n in tensors}},
        "use_dictionary": strings,
        "column_encoding": {n: "PLAIN" for n in tensors},
        "write_statistics": strings,
    }


def write_shard(uri: str, tables: Iterable[pa.Table], shapes: dict[str, list[int]], row_group_size: int,
                stats: dict | None = None) -> int:
    """Stream tables into one shard file with row groups of exactly `row_group_size` rows (the last
    may be shorter), `stats` as JSON in its footer; temp name + rename on local disk. Returns the
    row count."""
    schema = tensor_schema(shapes)
    metadata = {STATS_KEY: json.dumps(stats).encode()} if stats is not None else {}
    fs, path = storage.resolve(uri)
    local = storage.local_path(uri)
    target = f"{os.path.dirname(local)}/.{os.path.basename(local)}.tmp-{os.getpid()}" if local else path
    if local:
        os.makedirs(os.path.dirname(local), exist_ok=True)
    schema = schema.with_metadata(metadata)
    rows = 0
    pending: list = []
    pending_rows = 0
    try:
        with pq.ParquetWriter(target, schema, filesystem=None if local else fs,
                              **parquet_writer_options(schema)) as writer:
            def flush(final: bool) -> None:
                nonlocal pending, pending_rows
                if not pending:
                    return
                merged = pa.concat_tables(pending)
                full = (merged.num_rows // row_group_size) * row_group_size
                cut = merged.num_rows if final else full
                if cut:
                    writer.write_table(merged.slice(0, cut), row_group_size=row_group_size)
                rest = merged.slice(cut)
                pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

            for table in tables:
                if not table.schema.equals(schema, check_metadata=False):
                    raise LatentDatasetError(f"{uri}: a chunk has schema {table.schema}, expected {schema}")
                table = table.replace_schema_metadata(None)
                rows += table.num_rows
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= row_group_size:
                    flush(final=False)
            flush(final=True)
        if local:
            os.replace(target, local)
    except BaseException:
        if local and os.path.exists(target):
            os.unlink(target)
        raise
    return rows


def read_shard_stats(uri: str) -> tuple[dict, int]:
    """(per-shard stats from the footer, row count) of a finished shard file."""
    with storage.open_input(uri) as handle:
        metadata = pq.read_metadata(handle)
    raw = (metadata.metadata or {}).get(STATS_KEY)
    if raw is None:
        raise LatentDatasetError(f"{uri}: no {STATS_KEY.decode()} in the parquet footer; not written by this phase")
    return json.loads(raw), metadata.num_rows


def write_empty_text(out_dir: str, values: Any) -> dict:
    """The empty caption's embedding as ``empty_text_emb.npy`` (float16); returns its manifest entry."""
    empty = np.asarray(values, dtype=np.float16)
    buffer = io.BytesIO()
    np.save(buffer, empty, allow_pickle=False)
    storage.write_bytes(storage.join(out_dir, EMPTY_TEXT_FILE), buffer.getvalue())
    return {"file": EMPTY_TEXT_FILE, "shape": list(empty.shape), "dtype": "float16",
            "sha256": manifest_lib.hash_bytes(buffer.getvalue())}


# ------------------------------------------------------------------------------------------------
# Reading


def __getattr__(name: str):
    if name == "LatentDataset":
        return lazy_dataset.iterable_dataset(globals(), name, LatentShardReader)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LatentShardReader:
    """The methods of `LatentDataset` (a torch IterableDataset subclass of this class); see the module."""

    def __init__(self, uri: str, columns: Sequence[str], rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_offset: int = 0, epoch: int = 0, infinite: bool = True, batch_size: int | None = None,
                 shuffle: bool = True, shuffle_window: int = 1024, drop_last: bool = False,
                 open_files: int = 8):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise LatentDatasetError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        if start_offset < 0:
            raise LatentDatasetError(f"start_offset must be >= 0, got {start_offset}")
        if epoch < 0:
            raise LatentDatasetError(f"epoch must be >= 0, got {epoch}")
        if batch_size is not None and batch_size < 1:
            raise LatentDatasetError(f"batch_size must be >= 1 or None, got {batch_size}")
        if shuffle_window < 1:
            raise LatentDatasetError(f"shuffle_window must be >= 1, got {shuffle_window}")
        self.uri = storage.normalize(uri)
        self.manifest = manifest_lib.read(self.uri)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_offset, self.epoch, self.infinite = start_offset, epoch, infinite
        self.batch_size, self.shuffle, self.shuffle_window = batch_size, shuffle, shuffle_window
        self.drop_last, self.open_files = drop_last, open_files

        tensor_specs = self.manifest.get("columns") or {}
        available = list(STRING_COLUMNS) + sorted(tensor_specs)
        self.columns = list(columns)
        if not self.columns:
            raise LatentDatasetError(f"{self.uri}: no columns requested (available: {', '.join(available)})")
        for name in self.columns:
            if name not in available:
                raise LatentDatasetError(
                    f"{self.uri}: column {name!r} is not in this latent dataset (available: {', '.join(available)})"
                )
        if len(set(self.columns)) != len(self.columns):
            raise LatentDatasetError(f"columns listed twice: {self.columns}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in self.columns:
            if name in tensor_specs:
                spec = tensor_specs[name]
                if spec.get("dtype") != "float16":
                    raise LatentDatasetError(f"{self.uri}: column {name!r} has dtype {spec.get('dtype')!r}, "
                                             "the reader supports float16 tensor columns")
                self.shapes[name] = tuple(int(d) for d in spec["shape"])

        shards = self.manifest.get("shards")
        group_rows = self.manifest.get("row_group_size")
        if not isinstance(shards, list) or not isinstance(group_rows, int) or group_rows < 1:
            raise LatentDatasetError(f"{self.uri}/manifest.json: needs 'shards' (list) and 'row_group_size' (int)")
        self.row_group_size = group_rows
        self.shard_files = [storage.join(self.uri, s["file"]) for s in shards]
        # Blocks = parquet row groups: (shard, row group index, first global sample index, rows).
        block_shard, block_group, block_rows = [], [], []
        for shard_index, shard in enumerate(shards):
            rows = int(shard["rows"])
            n_groups = -(-rows // group_rows)
            block_shard += [shard_index] * n_groups
            block_group += list(range(n_groups))
            block_rows += [min(group_rows, rows - g * group_rows) for g in range(n_groups)]
        self.block_shard = np.asarray(block_shard, dtype=np.int64)
        self.block_group = np.asarray(block_group, dtype=np.int64)
        self.block_rows = np.asarray(block_rows, dtype=np.int64)
        self.num_samples = int(self.block_rows.sum())
        self.samples_per_epoch = self.num_samples // world_size
        if self.samples_per_epoch == 0:
            raise LatentDatasetError(
                f"{self.uri}: {self.num_samples} samples cannot be split over world_size {world_size}"
            )
        if not infinite and start_offset > self.samples_per_epoch:
            raise LatentDatasetError(f"start_offset {start_offset} is past the end of the epoch "
                                     f"({self.samples_per_epoch} samples per rank)")
        self._files: collections.OrderedDict[int, pq.ParquetFile] = collections.OrderedDict()
        self._order_memo: tuple[int, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        # Open files and memos stay in the process that made them (DataLoader workers may be spawned).
        state = dict(self.__dict__)
        state["_files"] = collections.OrderedDict()
        state["_order_memo"] = None
        return state

    # ------------------------------------------------------------------------------------------
    # Order

    def set_epoch(self, epoch: int) -> None:
        """Epoch mode: select the epoch of the next iteration (DataLoader workers that are re-created
        per iteration, the default, pick it up; persistent workers do not)."""
        if epoch < 0:
            raise LatentDatasetError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def _block_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permuted block ids, cumulative sample count after each) of epoch `epoch`."""
        if self._order_memo is not None and self._order_memo[0] == epoch:
            return self._order_memo[1], self._order_memo[2]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.block_rows))
        else:
            order = np.arange(len(self.block_rows))
        ends = np.cumsum(self.block_rows[order])
        self._order_memo = (epoch, order, ends)
        return order, ends

    def _window_sample_blocks(self, order: np.ndarray, ends: np.ndarray, epoch: int, window: int
                              ) -> tuple[np.ndarray, np.ndarray]:
        """(block id, row inside block) of the samples of window `window` of this rank's epoch
        sequence, in stream order."""
        first = self.rank * self.samples_per_epoch + window * self.shuffle_window
        last = min(first + self.shuffle_window, (self.rank + 1) * self.samples_per_epoch)
        seq = np.arange(first, last, dtype=np.int64)  # positions in the epoch's block sequence
        slot = np.searchsorted(ends, seq, side="right")
        starts = ends - self.block_rows[order]
        rows = seq - starts[slot]
        blocks = order[slot]
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, window]).permutation(len(seq))
            blocks, rows = blocks[perm], rows[perm]
        return blocks, rows

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """(shard index, row in shard) of S(rank, epoch), the whole epoch sequence (for tests and audits)."""
        order, ends = self._block_order(epoch)
        n_windows = -(-self.samples_per_epoch // self.shuffle_window)
        out: list[tuple[int, int]] = []
        for window in range(n_windows):
            blocks, rows = self._window_sample_blocks(order, ends, epoch, window)
            shard_rows = self.block_group[blocks] * self.row_group_size + rows
            out += list(zip(self.block_shard[blocks].tolist(), shard_rows.tolist()))
        return out

    # ------------------------------------------------------------------------------------------
    # Reading

    def _parquet(self, shard: int) -> pq.ParquetFile:
        handle = self._files.get(shard)
        if handle is None:
            handle = pq.ParquetFile(storage.open_input(self.shard_files[shard]))
            self._files[shard] = handle
            while len(self._files) > self.open_files:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(shard)
        return handle

    def _read_block(self, block: int) -> dict[str, Any]:
        shard, group = int(self.block_shard[block]), int(self.block_group[block])
        path = self.shard_files[shard]
        handle = self._parquet(shard)
        if group >= handle.metadata.num_row_groups:
            raise LatentDatasetError(f"{path}: has {handle.metadata.num_row_groups} row groups, the manifest "
                                     f"implies at least {group + 1}")
        table = handle.read_row_group(group, columns=self.columns)
        if table.num_rows != self.block_rows[block]:
            raise LatentDatasetError(f"{path}: row group {group} has {table.num_rows} rows, expected "
                                     f"{int(self.block_rows[block])} (row_group_size {self.row_group_size})")
        out: dict[str, Any] = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            if name in self.shapes:
                values = column.flatten().to_numpy(zero_copy_only=False)
                out[name] = values.reshape((table.num_rows,) + self.shapes[name])
            else:
                out[name] = np.asarray(column.to_pylist(), dtype=object)
        return out

    def _gather(self, blocks: np.ndarray, rows: np.ndarray, cache: dict[int, dict[str, Any]]
                ) -> dict[str, np.ndarray]:
        """Rows (blocks[i], rows[i]) of the requested columns, stacked in the given order."""
        n = len(blocks)
        unique_blocks = np.unique(blocks)
        for block in unique_blocks.tolist():
            if block not in cache:
                cache[block] = self._read_block(block)
        out: dict[str, np.ndarray] = {}
        for name in self.columns:
            first = cache[int(unique_blocks[0])][name]
            result = np.empty((n,) + first.shape[1:], dtype=first.dtype)
            for block in unique_blocks.tolist():
                mask = blocks == block
                result[mask] = cache[block][name][rows[mask]]
            out[name] = result
        return out

    def _emit(self, data: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, Any]:
        import torch

        item: dict[str, Any] = {}
        for name, values in data.items():
            part = values[lo:hi]
            if name in self.shapes:
                tensor = torch.from_numpy(np.ascontiguousarray(part))
                item[name] = tensor[0] if self.batch_size is None else tensor
            else:
                item[name] = str(part[0]) if self.batch_size is None else [str(v) for v in part]
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        batch = self.batch_size or 1
        per_epoch = self.samples_per_epoch
        stream_end = None if self.infinite else per_epoch  # stream positions counted from epoch start
        position = self.start_offset
        # Samples gathered for this worker but not yet emitted, with their batch numbers.
        pending: dict[str, np.ndarray] | None = None
        pending_batch = np.empty(0, dtype=np.int64)
        cache: dict[int, dict[str, Any]] = {}
        while stream_end is None or position < stream_end:
            epoch = self.epoch + position // per_epoch
            window = (position % per_epoch) // self.shuffle_window
            epoch_start = (epoch - self.epoch) * per_epoch
            window_start = epoch_start + window * self.shuffle_window
            window_end = epoch_start + min((window + 1) * self.shuffle_window, per_epoch)
            positions = np.arange(position, window_end, dtype=np.int64)
            batch_of = (positions - self.start_offset) // batch
            mine = batch_of % n_workers == worker
            if mine.any():
                order, ends = self._block_order(epoch)
                blocks, rows = self._window_sample_blocks(order, ends, epoch, window)
                skip = position - window_start  # the window's samples before the resume offset
                blocks, rows = blocks[skip:][mine], rows[skip:][mine]
                # Keep only blocks this window uses: neighbouring windows share at most their edge blocks.
                cache = {b: cache[b] for b in np.unique(blocks).tolist() if b in cache}
                data = self._gather(blocks, rows, cache)
                if pending is None:
                    pending, pending_batch = data, batch_of[mine]
                else:
                    pending = {k: np.concatenate([pending[k], data[k]]) for k in pending}
                    pending_batch = np.concatenate([pending_batch, batch_of[mine]])
            position = window_end
            # A batch is complete once the stream passed its last sample.
            complete_below = (position - self.start_offset) // batch
            ended = stream_end is not None and position >= stream_end
            if pending is not None and len(pending_batch):
                if ended and not self.drop_last:
                    complete_below = int(pending_batch[-1]) + 1
                n_done = int(np.searchsorted(pending_batch, complete_below, side="left"))
                lo = 0
                while lo < n_done:
                    hi = int(np.searchsorted(pending_batch, pending_batch[lo], side="right"))
                    yield self._emit(pending, lo, hi)
                    lo = hi
                pending = {k: v[n_done:] for k, v in pending.items()}
                pending_batch = pending_batch[n_done:]
