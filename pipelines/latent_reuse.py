"""Latents reused across precompute versions (issue 19): a sample another version already encoded is copied.

A precompute of a new download version (a re-filter) finds the earlier complete precompute versions under the
same latents root with the same *reuse key* (every setting of the version but the input and the de-dup
exclusion: the encoders' hashes, resolutions, outputs, buckets, precision, validation split). A uid they hold
latents of is not decoded nor encoded again: its row is copied from the earliest such version's file (its key
replaced by the new version's). Why a copy and not a reference: the latents are what training reads every
epoch, in row groups; a copy keeps the new version an ordinary latent dataset (one reader path, sequential
reads) and costs bytes once, where encoding is what costs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_filters import dedup
from pipelines import image_shards, latent_shards, storage
from pipelines import manifest as manifest_lib

log = logging.getLogger(__name__)

REUSE_DIR = "_reuse"  # <output>/_reuse/<shard>.parquet: what a shard copies (uid, file, row, split, bucket)
INDEX_SCHEMA = pa.schema([("uid", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                          ("split", pa.string()), ("bucket", pa.string())])


def reuse_key(version_tree: dict) -> str:
    tree = {k: v for k, v in version_tree.items() if k != "exclude_version"}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_pool(root: str, version: str, key: str) -> list[str]:
    """Complete precompute versions under `root` (but `version`) with this reuse key, oldest first."""
    return manifest_lib.earlier_versions(
        root, version, lambda manifest: manifest.get("phase") == "precompute" and manifest.get("reuse_key") == key)


def _data_files(manifest: dict) -> Iterable[tuple[str, str, str]]:
    """(file relative to the version, split, bucket name or '') of every latent file a manifest lists."""
    if manifest.get("buckets"):
        for bucket in manifest["buckets"]:
            for entry in bucket["shards"]:
                yield entry["file"], "train", bucket["name"]
            for entry in bucket["validation"]["shards"]:
                yield entry["file"], "validation", bucket["name"]
        return
    for entry in manifest.get("shards") or []:
        yield entry["file"], "train", ""
    for entry in (manifest.get("validation") or {}).get("shards") or []:
        yield entry["file"], "validation", ""


def pool_index(pool: list[str]) -> pa.Table:
    """One row per uid the pool holds latents of: the file (URI), its row there, split and bucket; the
    oldest version's where several hold it. Reads only the uid column of each file."""
    tables = []
    for directory in pool:
        for file, split, bucket in _data_files(manifest_lib.read(directory)):
            uri = storage.join(directory, *file.split("/"))
            with storage.open_input(uri) as handle:
                uids = pq.read_table(handle, columns=["uid"]).column("uid").combine_chunks()
            n = len(uids)
            tables.append(pa.table({"uid": uids, "file": pa.array([uri] * n, pa.string()),
                                    "row": pa.array(np.arange(n, dtype=np.int64)),
                                    "split": pa.array([split] * n, pa.string()),
                                    "bucket": pa.array([bucket] * n, pa.string())}, schema=INDEX_SCHEMA))
    if not tables:
        return INDEX_SCHEMA.empty_table()
    table = pa.concat_tables(tables).combine_chunks()
    table = table.append_column("order", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return dedup.first_per_key(table, "uid", [("order", "ascending")]).select(INDEX_SCHEMA.names)


def shard_uids(source: str) -> Optional[pa.Array]:
    """The uids of an image shard's samples without reading its tar: its selection's successes, or the
    success rows of img2dataset's NNNNN.parquet; None when neither is there."""
    if image_shards.is_selection(source):
        with storage.open_input(source) as handle:
            table = pq.read_table(handle, columns=["uid", "status"])
    else:
        parquet = image_shards.sibling_files(source)["parquet"]
        if not storage.exists(parquet):
            return None
        with storage.open_input(parquet) as handle:
            table = pq.read_table(handle, columns=["uid", "status"])
    return table.filter(pc.equal(table.column("status"), "success")).column("uid").combine_chunks()


def plan(out_dir: str, todo: list[tuple[str, str]], index: pa.Table) -> dict[str, str]:
    """Per unfinished shard that has latents to copy, `_reuse/<shard>.parquet` (its rows of the pool index);
    returns shard name -> that file."""
    files = {}
    if not index.num_rows:
        return files
    for name, source in todo:
        uids = shard_uids(source)
        if uids is None or not len(uids):
            continue
        rows = pa.table({"uid": uids}).join(index, "uid", join_type="inner")
        if not rows.num_rows:
            continue
        target = storage.join(out_dir, REUSE_DIR, f"{name}.parquet")
        storage.makedirs(storage.join(out_dir, REUSE_DIR))
        with storage.open_output(target) as handle:
            pq.write_table(rows.select(INDEX_SCHEMA.names).sort_by("uid"), handle)
        files[name] = target
    return files


def reused_uids(uri: Optional[str]) -> set[str]:
    if not uri:
        return set()
    with storage.open_input(uri) as handle:
        return set(pq.read_table(handle, columns=["uid"]).column("uid").to_pylist())


def copied_rows(uri: str, keys: dict[str, str], shapes_by_bucket: dict[str, dict]) -> dict[tuple[str, str], pa.Table]:
    """The latent rows a shard copies, by (split, bucket): for each uid of `keys` (uid -> this version's key, in
    the shard's input order) its row from the pool file named in the reuse file `uri`, read by row group."""
    with storage.open_input(uri) as handle:
        index = pq.read_table(handle)
    index = index.filter(pc.is_in(index.column("uid"), value_set=pa.array(list(keys), pa.string())))
    order = {uid: i for i, uid in enumerate(keys)}
    pieces: dict[tuple[str, str], list[tuple[list[int], pa.Table]]] = {}
    for file in sorted(set(index.column("file").to_pylist())):
        mine = index.filter(pc.equal(index.column("file"), file))
        rows = mine.column("row").to_numpy()
        with storage.open_input(file) as handle:
            parquet = pq.ParquetFile(handle)
            bounds = np.cumsum([0] + [parquet.metadata.row_group(i).num_rows
                                      for i in range(parquet.metadata.num_row_groups)])
            group_of = np.searchsorted(bounds, rows, "right") - 1
            groups = sorted(set(group_of.tolist()))
            table = parquet.read_row_groups(groups).replace_schema_metadata(None)
        # Where each read group starts in `table`: the sizes of the read groups before it.
        sizes = np.array([bounds[g + 1] - bounds[g] for g in groups], dtype=np.int64)
        start = dict(zip(groups, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()))
        local = np.array([start[g] for g in group_of.tolist()], dtype=np.int64) + rows - bounds[group_of]
        taken = table.take(pa.array(local, pa.int64()))
        split, bucket = mine.column("split")[0].as_py(), mine.column("bucket")[0].as_py()
        positions = [order[u] for u in mine.column("uid").to_pylist()]
        pieces.setdefault((split, bucket), []).append((positions, taken))
    out = {}
    for where, parts in pieces.items():
        table = pa.concat_tables([t for _, t in parts])
        positions = np.concatenate([np.asarray(p, dtype=np.int64) for p, _ in parts])
        table = table.take(pa.array(np.argsort(positions, kind="stable")))
        new_keys = pa.array([keys[u] for u in table.column("uid").to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index("key"), "key", new_keys)
        schema = latent_shards.tensor_schema(shapes_by_bucket[where[1]])
        out[where] = table.select(schema.names).cast(schema)
    return out
