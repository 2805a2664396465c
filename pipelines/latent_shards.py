"""The latent-shard format (``latents/<version>/``): written by `precompute`, read by training.

One module for both sides, so the writer and the reader cannot drift apart: the shard schema and
parquet options, the shard writer (exact row groups, temp name + rename), the per-shard stats in each
file's footer, the empty caption's embedding file, and the reader. No torch at import: the phase's CPU
tasks import this module (`LatentDataset` is made on first use, see `pipelines.lazy_dataset`).
Longer than 500 lines: (~760) the writer and the reader of one format (tensor and image columns), with
the reader's exact ordering contract and its split between loader workers (read) and the training process
(assemble), kept together so that the two sides of the format cannot drift apart.

Format: ``shard-NNNNN.parquet`` files with string columns ``key``, ``uid``, ``caption`` (zstd,
dictionary) and float16 tensor columns stored as flat fixed-size lists (PLAIN, uncompressed, the
shape in the field metadata under ``shape``); the writer's per-shard stats as JSON in the footer
under ``wurst.precompute.stats``; ``empty_text_emb.npy``; ``manifest.json`` (``shards`` with row
counts, ``row_group_size``, ``columns`` with shape and dtype).

Splits: the *training* split is ``shards``; the held-out *validation* split is ``val/shard-NNNNN.parquet``
(same schema), listed under ``validation.shards`` with the ``fraction`` and the ``rule`` that chose it
(`is_validation`: a hash of the uid, so a sample's split never depends on sharding, order or workers).
Separate files, not a column: the training split's blocks stay whole row groups of training samples,
so its ordering contract below is unchanged and validation rows are never read by a training rank.
A dataset written before the split existed has no ``validation`` key: it is all training split.

Reader
------

``LatentDataset(uri, columns, rank, world_size, seed, ...)`` is a ``torch.utils.data.IterableDataset``
that yields dicts: tensor columns as float16 ``torch.Tensor`` shaped as the manifest says
(``text_emb`` (77, W), ``semantic`` (16, h, w), ``stage_a`` (4, H, W)), string columns (``uid``,
``caption``, ``key``) as ``str`` (per sample) or ``list[str]`` (per batch). Only the requested parquet
columns are read.

Ordering contract (exact; tests and resumable training rely on it)
--------------------------------------------------------------------
The split holds N samples in the shards listed in ``manifest.json`` (``shards``, or ``validation.shards``
with ``split="validation"``; in that order);
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
5. With ``batch_size=b`` the stream (from the offset on) is cut into batches of b consecutive samples;
   in epoch mode the last batch may be short unless ``drop_last=True``. With ``batch_size=None`` the
   reader yields single samples.

The order depends on (manifest, seed, epoch, rank, world_size, shuffle, shuffle_window), never on the
number of loader workers.

Loader workers (`pipelines.training.data.batches`): reading and batching are split. The stream's
*pieces* -- each block's rows inside the rank's range, in block-sequence order; blocks of the first
window after ``start_offset`` that hold no sample of the stream are left out -- are read by
``DataLoader(reader.block_pieces(), batch_size=None, num_workers=K)``: piece ``i`` by worker ``i % K``,
which the DataLoader hands back round-robin, i.e. in piece order. ``reader.assemble(pieces)`` in the
consuming process copies each window's pieces into one window buffer and cuts the permuted batches
from it (one gather per column per batch). So each block is read once per epoch per rank (a block
that straddles two ranks' ranges is read by both), and the consumer holds one window plus the pieces
in flight. Iterating the reader itself (``iter(reader)``, no workers) does the same in one process.
A plain ``DataLoader(reader, num_workers=K)`` also yields the stream (batch ``j``, or sample ``j``
with ``batch_size=None``, from worker ``j % K``; with samples the order holds for K <= 1 only, as
``DataLoader(batch_size=b)`` collates one worker's samples), but then every worker reads every block:
K reads per block.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import lazy_dataset
from pipelines import manifest as manifest_lib
from pipelines import storage
from pipelines.phase import InputError

STRING_COLUMNS = ("uid", "caption", "key")
# Image columns: per row one encoded image (binary), decoded by the reader into a uint8 (3, h, w) tensor.
# `semantic_image` holds the Semantic Compressor's input pixels, for a Stage B that fine-tunes it. PNG:
# lossless, so the compressor trains on the pixels the later semantic precompute encodes.
IMAGE_COLUMNS = {"semantic_image": "png"}
EMPTY_TEXT_FILE = "empty_text_emb.npy"
STATS_KEY = b"wurst.precompute.stats"
SHAPE_KEY = b"shape"
SPLITS = ("train", "validation")
VALIDATION_DIR = "val"  # the validation split's shard files: val/shard-NNNNN.parquet
# The held-out rule, recorded in the manifest. A fixed hash of the uid alone: the same sample is held out
# in every dataset version that contains it, and raising the fraction only adds samples to the split.
VALIDATION_RULE = ("held out iff blake2b(uid as UTF-8, digest_size=8), read as a big-endian unsigned "
                   "64-bit integer h, has h / 2**64 < fraction")


class LatentDatasetError(InputError):
    """The latent dataset, its manifest or a requested column is not what the reader expects."""


# ------------------------------------------------------------------------------------------------
# The validation split


def is_validation(uids: Sequence[str], fraction: float) -> np.ndarray:
    """Boolean mask: which of `uids` belong to the validation split at `fraction` (`VALIDATION_RULE`)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    # int < float compares exactly in Python, and fraction * 2**64 is exact: the rule holds to the bit.
    bound = fraction * 18446744073709551616.0
    return np.fromiter((int.from_bytes(hashlib.blake2b(uid.encode("utf-8"), digest_size=8).digest(), "big") < bound
                        for uid in uids), dtype=bool, count=len(uids))


def validation_file(shard_file: str) -> str:
    """The validation split's file for training shard file `shard_file` (a name relative to the dataset)."""
    return f"{VALIDATION_DIR}/{shard_file}"


def split_shards(manifest: dict, split: str) -> list[dict] | None:
    """The manifest's shard entries of `split` (of every bucket, in bucket order, for a bucketed dataset);
    None for "validation" in a dataset without that split."""
    if split not in SPLITS:
        raise LatentDatasetError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    if is_bucketed(manifest):
        entries = [split_shards(bucket_manifest(manifest, b["name"]), split) for b in manifest["buckets"]]
        return None if any(e is None for e in entries) else [s for e in entries for s in e]
    if split == "train":
        return manifest.get("shards")
    validation = manifest.get("validation")
    return validation.get("shards") if isinstance(validation, dict) else None


def split_samples(manifest: dict, split: str) -> int:
    """Samples in `split` (0 for a validation split the dataset does not have)."""
    return sum(int(s["rows"]) for s in split_shards(manifest, split) or [])


# ------------------------------------------------------------------------------------------------
# Aspect-ratio buckets: a bucketed dataset is one sub-dataset per bucket (its own shapes and shard files,
# ``<bucket>/shard-NNNNN.parquet``), listed under the manifest's ``buckets``.


def bucket_name(height: int, width: int) -> str:
    """A bucket's name: its Stage A input size in pixels, height x width."""
    return f"{int(height)}x{int(width)}"


def is_bucketed(manifest: dict) -> bool:
    return isinstance(manifest.get("buckets"), list)


def bucket_names(manifest: dict) -> list[str | None]:
    """The buckets of a dataset in manifest order; [None] for an unbucketed one (one square size)."""
    return [b["name"] for b in manifest["buckets"]] if is_bucketed(manifest) else [None]


def bucket_manifest(manifest: dict, bucket: str | None) -> dict:
    """The manifest of one bucket as an unbucketed dataset's (``columns``, ``shards``, ``validation``,
    ``row_group_size``): what a reader of that bucket reads. `bucket` None: the dataset must be unbucketed."""
    if not is_bucketed(manifest):
        if bucket is not None:
            raise LatentDatasetError(f"bucket {bucket!r}: this latent dataset has no aspect-ratio buckets")
        return manifest
    by_name = {b["name"]: b for b in manifest["buckets"]}
    if bucket not in by_name:
        raise LatentDatasetError(f"bucket {bucket!r}: the dataset's buckets are {', '.join(by_name)}"
                                 if bucket is not None else
                                 f"this latent dataset has aspect-ratio buckets ({', '.join(by_name)}): read it with "
                                 "pipelines.latent_buckets.open_reader, or name a bucket")
    entry = by_name[bucket]
    validation = manifest.get("validation")
    sub = {k: v for k, v in manifest.items() if k not in ("buckets", "columns", "shards", "validation")}
    sub.update(columns=entry["columns"], shards=entry["shards"])
    if isinstance(validation, dict):
        sub["validation"] = {**{k: v for k, v in validation.items() if k != "shards"},
                             **(entry.get("validation") or {"samples": 0, "shards": []})}
    return sub


def column_shapes(manifest: dict) -> dict[str | None, dict[str, dict]]:
    """{bucket (None when unbucketed): {column: its manifest entry (shape, dtype)}}."""
    return {name: bucket_manifest(manifest, name).get("columns") or {} for name in bucket_names(manifest)}


# ------------------------------------------------------------------------------------------------
# Writing


def shard_schema(tensor_shapes: dict[str, Any]):
    """key, uid, caption (strings) + one flat fixed-size list of float16 per tensor column (binary for an
    image column)."""
    fields = [pa.field(name, pa.string(), nullable=False) for name in STRING_COLUMNS]
    for name, shape in tensor_shapes.items():
        kind = pa.binary() if name in IMAGE_COLUMNS else pa.list_(pa.float16(), int(np.prod(shape)))
        fields.append(pa.field(name, kind, nullable=False))
    return pa.schema(fields)


def column_spec(name: str, shape: list[int]) -> dict:
    """A tensor column's manifest entry: shape and dtype (the dtype the reader yields), an image column's
    encoding."""
    if name in IMAGE_COLUMNS:
        return {"shape": list(shape), "dtype": "uint8", "encoding": IMAGE_COLUMNS[name]}
    return {"shape": list(shape), "dtype": "float16"}


def pack_blobs(blobs: Sequence[bytes]) -> bytes:
    """Byte strings -> one (count, offsets, data) blob: how a chunk's encoded images travel as one value."""
    offsets = np.zeros(len(blobs) + 1, dtype="<u8")
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return np.array([len(blobs)], dtype="<u8").tobytes() + offsets.tobytes() + b"".join(blobs)


def unpack_blobs(packed: bytes) -> list[bytes]:
    if not packed:
        return []
    count = int(np.frombuffer(packed, dtype="<u8", count=1)[0])
    offsets = np.frombuffer(packed, dtype="<u8", count=count + 1, offset=8)
    base = 8 * (count + 2)
    return [packed[base + int(offsets[i]):base + int(offsets[i + 1])] for i in range(count)]


def encode_image(pixels: np.ndarray, encoding: str) -> bytes:
    """(3, h, w) uint8 -> encoded bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buffer, format=encoding.upper(),
                                                                          compress_level=1)
    return buffer.getvalue()


def decode_images(blobs: Sequence[bytes], encoding: str, shape: tuple[int, ...], out: np.ndarray, source: str) -> None:
    """Encoded images of one column -> `out` (n, *shape) uint8; a wrong size or mode is an error naming
    `source`. Only the column's own format is opened (no other PIL plug-in sees the bytes)."""
    from PIL import Image

    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob), formats=[encoding.upper()]) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if array.shape != (shape[1], shape[2], shape[0]):
            raise LatentDatasetError(f"{source}: an image of {array.shape[1]}x{array.shape[0]} where the manifest "
                                     f"says {shape[2]}x{shape[1]}")
        out[i] = array.transpose(2, 0, 1)


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
        if name in IMAGE_COLUMNS:  # a pack_blobs blob of n encoded images
            blobs = unpack_blobs(raw)
            if len(blobs) != n:
                raise LatentDatasetError(f"column {name}: {len(blobs)} images for {n} rows")
            columns[name] = pa.array(blobs, pa.binary())
            continue
        columns[name] = tensor_column(np.frombuffer(raw, dtype=np.float16).reshape((n, *shape)))
    return pa.table(columns, schema=tensor_schema(shapes))


def parquet_writer_options(schema) -> dict[str, Any]:
    """Options for `pq.ParquetWriter`: strings zstd + dictionary; tensor columns uncompressed PLAIN
    without statistics. Dictionary-encoded float16 lists read ~15x slower, and fp16 latents do not
    compress, so PLAIN keeps the reader near memory speed (bench/precompute.py measures it). Image
    columns are compressed already (PNG)."""
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    tensors = [f.name for f in schema if not pa.types.is_string(f.type)]
    return {
        "compression": {**{n: "zstd" for n in strings}, **{n: "none" for n in tensors}},
        "use_dictionary": strings,
        "column_encoding": {n: "PLAIN" for n in tensors},
        "write_statistics": strings,
    }


def write_shard(uri: str, tables: Iterable[pa.Table], shapes: dict[str, list[int]], row_group_size: int,
                stats: dict | None = None, filesystem=None) -> int:
    """Stream tables into one shard file with row groups of exactly `row_group_size` rows (the last
    may be shorter), `stats` as JSON in its footer. Written under a temporary name, then renamed: on an
    object store too, where a failed stream would otherwise still publish what it had written under the
    final name when it is closed (a rerun would count that shard as done). Returns the row count.
    `filesystem`: the pyarrow filesystem of a remote `uri` (default: resolved from it)."""
    schema = tensor_schema(shapes)
    metadata = {STATS_KEY: json.dumps(stats).encode()} if stats is not None else {}
    if filesystem is not None:  # no resolving: for s3:// that would ask the endpoint for the bucket's region
        fs, path, local = filesystem, storage.split_options(uri)[0].split("://", 1)[-1], None
    else:
        fs, path = storage.resolve(uri)
        local = storage.local_path(uri)
    if local:
        target = f"{os.path.dirname(local)}/.{os.path.basename(local)}.tmp-{os.getpid()}"
        os.makedirs(os.path.dirname(local), exist_ok=True)
    else:
        head, _, name = path.rpartition("/")
        target = f"{head}/.{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
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
        else:
            fs.move(target, path)  # S3: copy + delete; the final key appears complete or not at all
    except BaseException:
        if local and os.path.exists(target):
            os.unlink(target)
        elif not local:
            try:
                fs.delete_file(target)
            except OSError:
                pass  # nothing (or only an unfinished upload) was left under the temporary key
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


class Piece(NamedTuple):
    """Rows [first_row, first_row + rows) of block `block`: positions [start, start + rows) of epoch
    `epoch`'s block sequence."""
    epoch: int
    block: int
    start: int
    first_row: int
    rows: int


SAMPLE_CHUNK = 256  # batch_size=None: samples gathered together, then yielded one by one


def __getattr__(name: str):
    if name == "LatentDataset":
        return lazy_dataset.iterable_dataset(globals(), name, LatentShardReader)
    if name == "LatentBlockPieces":
        return lazy_dataset.iterable_dataset(globals(), name, LatentPieceReader)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LatentShardReader:
    """The methods of `LatentDataset` (a torch IterableDataset subclass of this class); see the module."""

    def __init__(self, uri: str, columns: Sequence[str], rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_offset: int = 0, epoch: int = 0, infinite: bool = True, batch_size: int | None = None,
                 shuffle: bool = True, shuffle_window: int = 1024, drop_last: bool = False,
                 open_files: int = 8, split: str = "train", bucket: str | None = None):
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
        self.bucket = bucket
        self.manifest = bucket_manifest(manifest_lib.read(self.uri), bucket)  # one bucket's, when bucketed
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
        self.dtypes: dict[str, Any] = {}  # numpy dtype the reader yields per tensor column
        for name in self.columns:
            if name in tensor_specs:
                spec = tensor_specs[name]
                expected = column_spec(name, spec.get("shape") or [])
                if spec.get("dtype") != expected["dtype"] or spec.get("encoding") != expected.get("encoding"):
                    raise LatentDatasetError(
                        f"{self.uri}: column {name!r} has dtype {spec.get('dtype')!r} / encoding "
                        f"{spec.get('encoding')!r}; the reader supports {expected['dtype']} "
                        f"{'images encoded as ' + expected['encoding'] if 'encoding' in expected else 'tensors'} there")
                self.shapes[name] = tuple(int(d) for d in spec["shape"])
                self.dtypes[name] = np.dtype(expected["dtype"])

        self.split = split
        shards = split_shards(self.manifest, split)
        group_rows = self.manifest.get("row_group_size")
        if shards is None and split == "validation":
            raise LatentDatasetError(f"{self.uri}: has no validation split (no 'validation' in its manifest: "
                                     "written before precompute held one out)")
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
                f"{self.uri}: {self.num_samples} samples ({split} split) cannot be split over world_size {world_size}"
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

    def _window_order(self, epoch: int, window: int, size: int) -> np.ndarray:
        """Step 3: the permutation of window `window`'s `size` samples (identity without shuffling)."""
        if not self.shuffle:
            return np.arange(size, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch, self.rank, self.world_size, window]).permutation(size)

    def _window_bounds(self, window: int) -> tuple[int, int]:
        """[first, stop) of window `window` in the epoch's block sequence."""
        first = self.rank * self.samples_per_epoch + window * self.shuffle_window
        return first, min(first + self.shuffle_window, (self.rank + 1) * self.samples_per_epoch)

    def _window_sample_blocks(self, order: np.ndarray, ends: np.ndarray, epoch: int, window: int
                              ) -> tuple[np.ndarray, np.ndarray]:
        """(block id, row inside block) of the samples of window `window` of this rank's epoch
        sequence, in stream order."""
        first, stop = self._window_bounds(window)
        seq = first + self._window_order(epoch, window, stop - first)  # positions in the block sequence
        slot = np.searchsorted(ends, seq, side="right")
        starts = ends - self.block_rows[order]
        return order[slot], seq - starts[slot]

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

    def _windows(self) -> Iterator[tuple[int, int, int, int, int]]:
        """(epoch, window, first, stop, skip) of the stream's windows in order: [first, stop) in the
        epoch's block sequence, of which the first `skip` samples (in window order) precede the offset."""
        per_epoch = self.samples_per_epoch
        position = self.start_offset  # samples of the stream since the start of epoch `self.epoch`
        while self.infinite or position < per_epoch:
            in_epoch = position % per_epoch
            window = in_epoch // self.shuffle_window
            first, stop = self._window_bounds(window)
            skip = in_epoch - window * self.shuffle_window
            yield self.epoch + position // per_epoch, window, first, stop, skip
            position += stop - first - skip

    def _piece_plan(self) -> Iterator[Piece]:
        """The stream's pieces in order: per epoch, the blocks overlapping the rank's range from the
        first window the stream needs on, each cut to that range. In the first window after the
        offset, blocks that hold none of the samples still to come are left out (never read)."""
        per_epoch = self.samples_per_epoch
        if not self.infinite and self.start_offset >= per_epoch:
            return
        epoch = self.epoch + self.start_offset // per_epoch
        in_epoch = self.start_offset % per_epoch
        range_stop = (self.rank + 1) * per_epoch
        while True:
            window = in_epoch // self.shuffle_window
            skip = in_epoch - window * self.shuffle_window
            first, window_stop = self._window_bounds(window)
            order, ends = self._block_order(epoch)
            starts = ends - self.block_rows[order]
            slots = np.arange(np.searchsorted(ends, first, side="right"),
                              np.searchsorted(ends, range_stop - 1, side="right") + 1)
            piece_start = np.maximum(starts[slots], first)
            piece_stop = np.minimum(ends[slots], range_stop)
            if skip:
                needed = np.sort(first + self._window_order(epoch, window, window_stop - first)[skip:])
                used = np.searchsorted(needed, piece_stop) > np.searchsorted(needed, piece_start)
                keep = used | (piece_stop > window_stop)  # later windows need the block anyway
                slots, piece_start, piece_stop = slots[keep], piece_start[keep], piece_stop[keep]
            for slot, start, stop in zip(slots.tolist(), piece_start.tolist(), piece_stop.tolist()):
                yield Piece(epoch, int(order[slot]), start, start - int(starts[slot]), stop - start)
            if not self.infinite:
                return
            epoch, in_epoch = epoch + 1, 0

    def keyed_pieces(self) -> Iterator[tuple[int, Piece]]:
        """(stream position, piece): the pieces in plan order, each with the number of stream samples (from
        the offset) yielded before the consumer fills the window that first needs it, as `_assemble` pulls
        them (a bucketed reader merges several readers' pieces by it)."""
        plan = self._piece_plan()
        upcoming = next(plan, None)
        position = 0
        for epoch, _, first, stop, skip in self._windows():
            while upcoming is not None and (upcoming.epoch, upcoming.start) < (epoch, stop):
                yield position, upcoming
                upcoming = next(plan, None)
            if upcoming is None:
                return
            position += stop - first - skip

    def blocks_per_window(self) -> int:
        """The most pieces one window takes (its blocks, plus one at an unaligned edge): what a loader
        keeps in flight so that reading the next window overlaps batching this one."""
        return -(-min(self.shuffle_window, self.samples_per_epoch) // self.row_group_size) + 1

    # ------------------------------------------------------------------------------------------
    # Reading: pieces (loader workers)

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

    def _read_piece(self, piece: Piece, shared: bool) -> dict[str, Any]:
        """One read of the piece's row group (requested columns only), cut to the piece's rows: tensor
        columns as (rows, *shape) float16 -- numpy views of the arrow buffers, or with `shared` torch
        tensors in shared memory (one copy; the DataLoader then passes them without another) --, string
        columns as object arrays of str."""
        shard, group = int(self.block_shard[piece.block]), int(self.block_group[piece.block])
        path = self.shard_files[shard]
        handle = self._parquet(shard)
        if group >= handle.metadata.num_row_groups:
            raise LatentDatasetError(f"{path}: has {handle.metadata.num_row_groups} row groups, the manifest "
                                     f"implies at least {group + 1}")
        table = handle.read_row_group(group, columns=self.columns)
        if table.num_rows != self.block_rows[piece.block]:
            raise LatentDatasetError(f"{path}: row group {group} has {table.num_rows} rows, expected "
                                     f"{int(self.block_rows[piece.block])} (row_group_size {self.row_group_size})")
        table = table.slice(piece.first_row, piece.rows)
        columns: dict[str, Any] = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            if name not in self.shapes:
                columns[name] = column.to_numpy(zero_copy_only=False)
                continue
            shape = (piece.rows,) + self.shapes[name]
            if name in IMAGE_COLUMNS:  # decoded here, in the loader's worker
                tensor = _shared_tensor(shape, self.dtypes[name]) if shared else None
                values = tensor.numpy() if shared else np.empty(shape, dtype=self.dtypes[name])
                decode_images(column.to_pylist(), IMAGE_COLUMNS[name], self.shapes[name], values,
                              f"{path} row group {group}")
                columns[name] = tensor if shared else values
                continue
            values = column.flatten().to_numpy(zero_copy_only=False).reshape(shape)
            if shared:
                tensor = _shared_tensor(values.shape, np.float16)
                np.copyto(tensor.numpy(), values)
                columns[name] = tensor
            else:
                columns[name] = values
        return {"epoch": piece.epoch, "block": piece.block, "start": piece.start, "columns": columns}

    def read_pieces(self, worker: int = 0, n_workers: int = 1, shared: bool = False) -> Iterator[dict[str, Any]]:
        """Pieces i of the stream with i % n_workers == worker, each read once (see `_read_piece`)."""
        for index, piece in enumerate(self._piece_plan()):
            if index % n_workers == worker:
                yield self._read_piece(piece, shared)

    def block_pieces(self):
        """The stream's pieces as a torch IterableDataset for `DataLoader(..., batch_size=None,
        num_workers=K)`: worker w reads pieces i % K == w; feed the loader to `assemble`."""
        return __getattr__("LatentBlockPieces")(self)

    # ------------------------------------------------------------------------------------------
    # Assembling: windows -> batches (the consuming process)

    def assemble(self, pieces: Iterable[dict[str, Any]] | None = None, pin_memory: bool = False
                 ) -> Iterator[dict[str, Any]]:
        """The stream's batches (or samples) from its pieces in piece order (None: read them here).
        `pin_memory`: tensors are gathered straight into page-locked memory (for async host-to-device)."""
        return self._assemble(pieces, pin_memory, worker=0, n_workers=1)

    def _assemble(self, pieces: Iterable[dict[str, Any]] | None, pin_memory: bool, worker: int, n_workers: int
                  ) -> Iterator[dict[str, Any]]:
        """`assemble`, emitting only batch (or sample) j with j % n_workers == worker (a plain
        DataLoader's worker) and skipping the gathers of the others."""
        import torch

        received = iter(self.read_pieces() if pieces is None else pieces)
        plan = self._piece_plan()
        upcoming = next(plan, None)
        current: tuple[Piece, dict[str, np.ndarray]] | None = None  # a piece that reaches into later windows
        size = min(self.shuffle_window, self.samples_per_epoch)
        window_buffers = {name: np.empty((size,) + self.shapes[name], dtype=self.dtypes[name]) if name in self.shapes
                          else np.empty(size, dtype=object) for name in self.columns}

        def allocate(rows: int) -> dict[str, Any]:
            return {name: torch.empty((rows,) + self.shapes[name], dtype=getattr(torch, self.dtypes[name].name),
                                      pin_memory=pin_memory)
                    if name in self.shapes else np.empty(rows, dtype=object) for name in self.columns}

        def gather(into: dict[str, Any], at: int, rows: np.ndarray) -> None:
            for name, column in into.items():
                target = column.numpy() if name in self.shapes else column
                # mode="clip": with out=, the default mode="raise" gathers into a temporary and copies again.
                np.take(window_buffers[name], rows, axis=0, out=target[at:at + len(rows)], mode="clip")

        batch = self.batch_size
        # Samples of the stream not yet cut (epoch mode); drop_last leaves the short tail out.
        left = None if self.infinite else self.samples_per_epoch - self.start_offset
        if left is not None and batch and self.drop_last:
            left -= left % batch
        emitted = 0  # batches (or samples) started so far: their stream index
        open_batch: dict[str, Any] | None = None
        open_rows = open_filled = 0
        for epoch, window, first, stop, skip in self._windows():
            if left is not None and left <= 0:
                return
            # Fill the window buffer: buffer row k = block-sequence position first + k.
            while True:
                if current is None:
                    if upcoming is None or (upcoming.epoch, upcoming.start) >= (epoch, stop):
                        break
                    got = next(received, None)
                    if got is None or (got["epoch"], got["block"], got["start"]) != upcoming[:3]:
                        found = None if got is None else (got["epoch"], got["block"], got["start"])
                        raise LatentDatasetError(f"{self.uri}: expected piece (epoch, block, start) "
                                                 f"{tuple(upcoming[:3])}, got {found}: pieces arrived out of order")
                    current = (upcoming, {name: np.asarray(v) for name, v in got["columns"].items()})
                    upcoming = next(plan, None)
                piece, piece_columns = current
                lo, hi = max(piece.start, first), min(piece.start + piece.rows, stop)
                for name, buffer in window_buffers.items():
                    buffer[lo - first:hi - first] = piece_columns[name][lo - piece.start:hi - piece.start]
                if piece.start + piece.rows > stop:
                    break
                current = None

            order = self._window_order(epoch, window, stop - first)[skip:]
            if left is not None:
                order = order[:left]
                left -= len(order)
            if not batch:
                mine = order[(emitted + np.arange(len(order))) % n_workers == worker]
                emitted += len(order)
                for chunk_start in range(0, len(mine), SAMPLE_CHUNK):
                    rows = mine[chunk_start:chunk_start + SAMPLE_CHUNK]
                    chunk = allocate(len(rows))
                    gather(chunk, 0, rows)
                    for i in range(len(rows)):
                        yield {name: column[i] if name in self.shapes else str(column[i])
                               for name, column in chunk.items()}
                continue
            at = 0
            while at < len(order):
                if not open_rows:  # start batch `emitted`
                    open_rows = batch if left is None else min(batch, len(order) - at + left)
                    open_batch = allocate(open_rows) if emitted % n_workers == worker else None
                    open_filled = 0
                take = min(open_rows - open_filled, len(order) - at)
                if open_batch is not None:
                    gather(open_batch, open_filled, order[at:at + take])
                open_filled += take
                at += take
                if open_filled == open_rows:
                    if open_batch is not None:
                        yield {name: column if name in self.shapes else column.tolist()
                               for name, column in open_batch.items()}
                    emitted += 1
                    open_batch, open_rows = None, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        # In a plain DataLoader's worker it reads every piece itself and keeps its share of the batches.
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._assemble(None, pin_memory=False, worker=worker, n_workers=n_workers)


class LatentPieceReader:
    """The methods of `LatentBlockPieces` (a torch IterableDataset subclass): a reader's stream of pieces,
    piece i read by DataLoader worker i % K (all of them without workers)."""

    def __init__(self, reader: LatentShardReader):
        super().__init__()
        self.reader = reader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None:
            return self.reader.read_pieces(shared=True)  # tensors, as from workers (DataLoader converts numpy)
        return self.reader.read_pieces(info.id, info.num_workers, shared=True)


def _shared_tensor(shape: tuple[int, ...], dtype):
    """An uninitialised float16 / uint8 tensor in shared memory (what torch's collate makes in a worker)."""
    import torch

    kind = getattr(torch, np.dtype(dtype).name)  # numpy and torch name float16 / uint8 alike
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=kind)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=kind).new(storage).view(shape)
