"""The filter's optional first stage: LAION metadata joined with tag files on a key (LAION-5B as published
keeps the aesthetic scores, and in some releases punsafe / pwatermark, in separate files joined on `hash`).

Streaming and bucketed like the URL de-duplication, nothing on the driver: one Ray task per metadata or tag
unit scatters its rows by a hash of the key into bucket files (Arrow IPC), one task per bucket left-joins its
metadata rows with each tag set (a key listed twice in one tag set keeps its first row in input order, and is
counted) and writes `joined/part-NNNNN.parquet` in the metadata's input order; those parts are the filter's
input. Every metadata row is in exactly one part (a row without a tag gets nulls there, which the filters
count as `null_<column>`), so the funnel stays exact. Markers per task make an interrupted join resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from data_filters import hashing, schema
from pipelines import storage
from pipelines.config import ConfigError, param
from pipelines.filter_tasks import FilterInputError, list_input_files, read_footer

SOURCE = "_src"  # the metadata row's (file index << 40) + row: restores input order after the join
ROW_BITS = 40


@dataclasses.dataclass
class TagSetConfig:
    # Tag parquet files: a file, a directory (searched recursively) or a list, e.g. laion2B-en-aesthetic/.
    input: Optional[Union[str, list[str]]] = None
    # The join key: a column of the tag files, and of the metadata (`metadata_key`, default the same name).
    key: str = "hash"
    metadata_key: Optional[str] = None
    # Canonical columns these files provide (found by the usual aliases, e.g. AESTHETIC_SCORE -> aesthetic);
    # they replace the metadata's own columns of those names.
    columns: list[str] = param(default_factory=lambda: ["aesthetic"], choices=list(schema.SCORE_COLUMNS))


@dataclasses.dataclass
class JoinConfig:
    # Buckets of the join (0: one per rows_per_bucket metadata rows).
    num_buckets: int = param(0, ge=0, le=100_000)
    rows_per_bucket: int = param(5_000_000, ge=1)


def validate(tags: list[TagSetConfig]) -> None:
    for i, tag in enumerate(tags):
        if not tag.input:
            raise ConfigError(f"tags[{i}].input: required (tag parquet files or a directory of them)")
        if not tag.columns:
            raise ConfigError(f"tags[{i}].columns: list the canonical columns the tag files provide")


def key_buckets(keys: pa.Array | pa.ChunkedArray, num_buckets: int) -> np.ndarray:
    """Bucket per key (integers or strings), stable across runs and machines; a null key goes to bucket 0."""
    if num_buckets == 1:
        return np.zeros(len(keys), dtype=np.int64)
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if pa.types.is_integer(keys.type):
        values = keys.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
        mixed = (values * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(17)  # Fibonacci hashing
        return (mixed % np.uint64(num_buckets)).astype(np.int64)
    return (hashing.hash64(keys.cast(pa.string()).fill_null("")) % np.uint64(num_buckets)).astype(np.int64)


@dataclasses.dataclass
class JoinPlan:
    metadata: list[Any]  # InputFile entries of the metadata
    tag_files: list[list[Any]]  # per tag set, its InputFile entries
    tag_sources: list[dict[str, dict[str, str]]]  # per tag set: file uri -> {canonical: source column}
    num_buckets: int

    def fingerprint(self) -> dict:
        return {"metadata": [[f.uri, f.rows] for f in self.metadata],
                "tags": [[[f.uri, f.rows] for f in files] for files in self.tag_files], "buckets": self.num_buckets}


def plan_join(cfg, metadata: list[Any]) -> JoinPlan:
    """Footers of the tag files; every problem named (missing key or tag column, per file)."""
    tag_files, tag_sources = [], []
    for i, tag in enumerate(cfg.tags):
        uris = [storage.normalize(u) for u in ([tag.input] if isinstance(tag.input, str) else tag.input)]
        entries = [read_footer(n, uri, {}) for n, uri in enumerate(list_input_files(uris))]
        bad = [e for e in entries if e.error]
        if bad:
            raise FilterInputError(f"tags[{i}]: {bad[0].uri} is not a readable parquet file ({bad[0].error})")
        sources = {}
        for entry in entries:
            missing = [c for c in tag.columns if c not in entry.columns]
            problems = ([f"key column {tag.key!r}"] if tag.key not in entry.types else []) + \
                [f"column {c!r} (looked for {' / '.join(schema.ALIASES[c])})" for c in missing]
            if problems:
                raise FilterInputError(f"tags[{i}]: {entry.uri} lacks {', '.join(problems)} (tags[{i}].key / "
                                       f"tags[{i}].columns); columns in the file: {', '.join(entry.types)}")
            sources[entry.uri] = {c: entry.columns[c] for c in tag.columns}
        tag_files.append(entries)
        tag_sources.append(sources)
    for entry in metadata:
        for i, tag in enumerate(cfg.tags):
            key = tag.metadata_key or tag.key
            if key not in entry.types:
                raise FilterInputError(f"{entry.uri}: has no join key column {key!r} for tags[{i}] "
                                       f"(tags[{i}].metadata_key); columns in the file: {', '.join(entry.types)}")
    rows = sum(e.rows for e in metadata)
    buckets = cfg.join.num_buckets or max(1, math.ceil(rows / cfg.join.rows_per_bucket))
    return JoinPlan(metadata, tag_files, tag_sources, buckets)


def _bucket_file(tmp: str, side: str, bucket: int, item: int) -> str:
    return storage.join(tmp, "join", side, f"b{bucket:05d}", f"u{item:06d}.arrow")


def _marker(tmp: str, name: str) -> str:
    return storage.join(tmp, "join", "done", f"{name}.json")


def scatter_file(row: dict[str, str], tmp: str, num_buckets: int) -> dict[str, str]:
    """Ray task: one metadata or tag file -> its rows per key bucket (IPC files); a marker when done."""
    item = json.loads(row["item"])
    if storage.exists(_marker(tmp, item["name"])):
        return {"result": storage.read_text(_marker(tmp, item["name"]))}
    with storage.open_input(item["uri"]) as handle:
        table = pq.read_table(handle, columns=item["columns"])
    if item["side"] == "meta":
        table = table.append_column(SOURCE, pa.array((item["file_index"] << ROW_BITS) + np.arange(table.num_rows),
                                                     pa.int64()))
    else:
        table = table.append_column(SOURCE, pa.array(np.arange(table.num_rows) + (item["file_index"] << ROW_BITS),
                                                     pa.int64()))
    if item.get("rename"):  # a tag file's own names -> the canonical ones (files of one tag set may differ)
        table = table.rename_columns([next((c for c, src in item["rename"].items() if src == name), name)
                                      for name in table.column_names])
    buckets = key_buckets(table.column(item["key"]), num_buckets)
    order = np.argsort(buckets, kind="stable")
    bounds = np.searchsorted(buckets[order], np.arange(num_buckets + 1))
    files = {}
    for bucket in range(num_buckets):
        if bounds[bucket] == bounds[bucket + 1]:
            continue
        part = table.take(pa.array(order[bounds[bucket]:bounds[bucket + 1]]))
        uri = _bucket_file(tmp, item["side"], bucket, item["index"])
        storage.makedirs(storage.parent(uri))
        with storage.open_output(uri) as sink, pa.ipc.new_file(sink, part.schema) as writer:
            writer.write_table(part)
        files[str(bucket)] = uri
    result = json.dumps({"name": item["name"], "rows": table.num_rows, "files": files})
    storage.write_text(_marker(tmp, item["name"]), result)
    return {"result": result}


def _read_ipc(uris: list[str]) -> Optional[pa.Table]:
    tables = []
    for uri in uris:
        with storage.open_input(uri) as source:
            tables.append(pa.ipc.open_file(source).read_all())
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def join_bucket(row: dict[str, str], tmp: str, tags: list[dict]) -> dict[str, str]:
    """Ray task: one bucket's metadata rows left-joined with each tag set -> joined/part-NNNNN.parquet."""
    bucket = int(row["bucket"])
    spec = json.loads(row["spec"])
    marker = _marker(tmp, f"bucket-{bucket:05d}")
    if storage.exists(marker):
        return {"result": storage.read_text(marker)}
    meta = _read_ipc(spec["meta"])
    stats = {"bucket": bucket, "rows": 0, "part": None, "tag_rows": [0] * len(tags),
             "duplicate_tag_keys": [0] * len(tags), "matched": [0] * len(tags)}
    if meta is not None:
        for t, tag in enumerate(tags):
            canonical = tag["columns"]
            found = _read_ipc(spec["tags"][t])
            key, meta_key = tag["key"], tag["metadata_key"]
            # The tag files' own names for the canonical columns may differ per file: renamed on read.
            if found is None:
                found = pa.table({key: pa.array([], meta.schema.field(meta_key).type),
                                  **{c: pa.array([], pa.float64()) for c in canonical}})
            stats["tag_rows"][t] = found.num_rows
            found = found.filter(pa.compute.is_valid(found.column(key)))  # a null key matches nothing
            found = found.set_column(found.schema.get_field_index(key), key,
                                     found.column(key).cast(meta.schema.field(meta_key).type))
            if found.num_rows:
                # First row per key in input order (tag files' order, then rows).
                found = found.sort_by([(SOURCE, "ascending")])
                keys = found.column(key).to_numpy(zero_copy_only=False)
                _, first = np.unique(keys, return_index=True)
                stats["duplicate_tag_keys"][t] = int(found.num_rows - len(first))
                found = found.take(pa.array(np.sort(first)))
            drop = [c for c in meta.column_names if c in canonical or schema.resolve_columns([c]).keys() & set(canonical)]
            meta = meta.drop_columns(drop)
            right = found.select([key, *canonical]).rename_columns([f"_tag_key_{t}", *canonical])
            joined = meta.join(right, keys=meta_key, right_keys=f"_tag_key_{t}", join_type="left outer",
                               use_threads=False)
            stats["matched"][t] = int(joined.num_rows - joined.column(canonical[0]).null_count) if canonical else 0
            if joined.num_rows != meta.num_rows:
                raise FilterInputError(f"join bucket {bucket}: {meta.num_rows} metadata rows became "
                                       f"{joined.num_rows} after joining tags[{t}]")
            meta = joined
        meta = meta.sort_by([(SOURCE, "ascending")])
        part = storage.join(tmp, "join", "joined", f"part-{bucket:05d}.parquet")
        storage.makedirs(storage.parent(part))
        pq.write_table(meta, storage.resolve(part)[1], filesystem=storage.resolve(part)[0], row_group_size=65_536)
        stats.update(rows=meta.num_rows, part=part)
    result = json.dumps(stats)
    storage.write_text(marker, result)
    return {"result": result}


def run_join(cfg, join_plan: JoinPlan, tmp: str, ray_map) -> tuple[list[str], dict]:
    """Both join stages; returns the joined part files (the filter's input) and the join's counts."""
    items = []
    for entry in join_plan.metadata:
        columns = list(entry.types)
        keys = [t.metadata_key or t.key for t in cfg.tags]
        items.append({"side": "meta", "name": f"meta-{entry.index:06d}", "index": entry.index,
                      "file_index": entry.index, "uri": entry.uri, "columns": columns, "key": keys[0]})
    tag_specs = []
    for t, (tag, files) in enumerate(zip(cfg.tags, join_plan.tag_files)):
        tag_specs.append({"key": tag.key, "metadata_key": tag.metadata_key or tag.key, "columns": list(tag.columns)})
        for entry in files:
            sources = join_plan.tag_sources[t][entry.uri]
            items.append({"side": f"tags{t}", "name": f"tags{t}-{entry.index:06d}", "index": entry.index,
                          "file_index": entry.index, "uri": entry.uri, "key": tag.key,
                          "columns": list(dict.fromkeys([tag.key, *sources.values()])), "rename": sources})
    if len(cfg.tags) > 1 and len({t.metadata_key or t.key for t in cfg.tags}) > 1:
        raise ConfigError("tags: every tag set must join on the same metadata key (one bucketing of the metadata)")
    scattered = {}
    rows = [{"item": json.dumps(i)} for i in items]
    for out in ray_map(rows, lambda r: scatter_file(r, tmp, join_plan.num_buckets)):
        result = json.loads(out["result"])
        scattered[result["name"]] = result
    specs = []
    for bucket in range(join_plan.num_buckets):
        meta = [scattered[i["name"]]["files"][str(bucket)] for i in items
                if i["side"] == "meta" and str(bucket) in scattered[i["name"]]["files"]]
        tags = [[scattered[i["name"]]["files"][str(bucket)] for i in items
                 if i["side"] == f"tags{t}" and str(bucket) in scattered[i["name"]]["files"]]
                for t in range(len(cfg.tags))]
        specs.append({"bucket": bucket, "spec": json.dumps({"meta": meta, "tags": tags})})
    results = [json.loads(out["result"]) for out in ray_map(specs, lambda r: join_bucket(r, tmp, tag_specs))]
    results.sort(key=lambda r: r["bucket"])
    counts = {"metadata_rows": sum(scattered[i["name"]]["rows"] for i in items if i["side"] == "meta"),
              "tag_rows": [sum(r["tag_rows"][t] for r in results) for t in range(len(cfg.tags))],
              "duplicate_tag_keys": [sum(r["duplicate_tag_keys"][t] for r in results) for t in range(len(cfg.tags))],
              "metadata_rows_with_tags": [sum(r["matched"][t] for r in results) for t in range(len(cfg.tags))],
              "buckets": join_plan.num_buckets}
    if sum(r["rows"] for r in results) != counts["metadata_rows"]:
        raise RuntimeError(f"join does not add up: {counts['metadata_rows']} metadata rows, "
                           f"{sum(r['rows'] for r in results)} joined")
    return [r["part"] for r in results if r["part"]], counts
