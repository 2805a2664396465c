"""`python -m pipelines.filter`: LAION metadata -> an aesthetic, safe, de-duplicated set + funnel.

    python -m pipelines.filter --config configs/filter.yaml --input s3://laion/laion2B-en/ \\
        [--output URI] [--set filters.aesthetic.min=5.5]

Reads LAION parquet files (or directories of them, local or object store) and writes
`<output>/<version>/part-NNNNN.parquet` in the normalised schema of `data_filters.schema`, plus
`funnel.json` (rows read, rows removed by each filter in order and per reason, duplicates
removed, rows written; the counts add up and are checked) and `manifest.json`, written last.
`<version>` hashes the output-affecting config and the input listing: rerunning the same config
on the same input is a no-op, a changed threshold writes a new version next to the old one.

How it scales (nothing is ever materialised on the driver):
1. Pre-flight: the driver reads only the parquet footers (threads; small) to find the schema
   variant of each file, catch corrupt files and missing columns before any work starts, and cut
   the input into tasks of whole row groups.
2. Filter: a Ray Data map over those tasks. Each task streams its row groups in batches,
   normalises and filters them, and appends the survivors to hash buckets
   (BLAKE2b(normalised URL) % num_buckets) that it writes as Arrow IPC files under
   `<version>/_work.tmp/buckets/`. Only per-task counts come back to the driver.
   Files are read with pyarrow inside the tasks rather than `ray.data.read_parquet`: LAION
   variants differ in schema (int32 vs float64 sizes, `aesthetic` vs `AESTHETIC_SCORE`), which a
   single Ray Data read cannot unify, and the per-file errors must name the file.
3. De-dup: a Ray Data map over buckets. All copies of a URL share a bucket, so each task loads
   one bucket, keeps the best row per normalised URL and writes `part-<bucket>.parquet` (and
   `duplicates/dup-<bucket>.parquet`: which uid was dropped in favour of which). Memory per task is
   one bucket, whatever the size of the input.
Both stages leave a marker per finished task in `_work.tmp`, so a killed run resumes where it
stopped; the temp dir is deleted before the manifest is written.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from typing import Any, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from data_filters import dedup, filters, schema
from pipelines import manifest as manifest_lib
from pipelines import storage, tracking
from pipelines.config import ConfigError, param
from pipelines.phase import Context, InputError, Outcome, Phase, PhaseResult, module_cli
from pipelines.runtime import RayConfig, default_data_root

log = logging.getLogger(__name__)

PHASE_NAME = "filter"
OUTPUT_SUBDIR = "filtered"
TMP_DIR = "_work.tmp"
FUNNEL = "funnel.json"
# Settings that cannot change the output: they are left out of the version hash.
VERSION_EXCLUDE = ("input", "output", "data_root", "read", "ray", "mlflow")
# Row positions inside a file take the low 40 bits of the `_src` tie-breaker.
ROW_BITS = 40


@dataclasses.dataclass
class SchemaConfig:
    # canonical column -> input column, overriding the built-in aliases (data_filters/schema.py),
    # e.g. {aesthetic: aesthetic} to use the V1 score in files that carry both.
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    # Input columns carried to the output unchanged (e.g. [key, original_width]); others are dropped.
    extra_columns: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DedupConfig:
    enabled: bool = True
    # Hash buckets (= output part files). 0: one per `input_rows_per_bucket` input rows, which
    # keeps a bucket's survivors (a few % of the input with the default thresholds) well inside
    # one worker's memory.
    num_buckets: int = param(0, ge=0, le=100_000)
    input_rows_per_bucket: int = param(20_000_000, ge=1)
    # Write duplicates/dup-NNNNN.parquet: (uid removed, uid kept instead) for every duplicate.
    record_duplicates: bool = True


@dataclasses.dataclass
class ReadConfig:
    # A filter task reads whole row groups of one file, up to this many rows.
    rows_per_task: int = param(8_000_000, ge=1)
    # Rows decoded at once inside a task (bounds its memory).
    batch_rows: int = param(262_144, ge=1)
    # Surviving rows a task buffers before writing them to bucket files.
    buffer_rows: int = param(1_000_000, ge=1)
    # Concurrent Ray tasks per stage (None: as many as the cluster's CPUs allow).
    max_tasks_in_flight: Optional[int] = param(None, ge=1)
    # Threads reading parquet footers in the pre-flight (I/O bound: object stores like many).
    footer_threads: int = param(16, ge=1, le=256)
    # Compression of the temporary bucket files (Arrow IPC). None is fastest on local disk;
    # lz4/zstd trade CPU for fewer bytes when the output lives in an object store.
    temp_compression: Optional[str] = param(None, choices=["lz4", "zstd"])


@dataclasses.dataclass
class FilterConfig:
    # LAION parquet: a file, a directory (searched recursively for *.parquet) or a list of them.
    input: Optional[Union[str, list[str]]] = None
    # Output root; the phase writes <output>/<version>/. Default: <data_root>/filtered.
    output: Optional[str] = None
    data_root: str = dataclasses.field(default_factory=default_data_root)
    # false: a corrupt/unreadable input file stops the job, naming it. true: skip it and count it.
    skip_bad_files: bool = False
    schema: SchemaConfig = dataclasses.field(default_factory=SchemaConfig)
    filters: filters.FiltersConfig = dataclasses.field(default_factory=filters.FiltersConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    read: ReadConfig = dataclasses.field(default_factory=ReadConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
        problems = self.filters.problems()
        if problems:
            raise ConfigError(f"filters.{problems[0]}")
        try:
            schema.resolve_columns([], self.schema.columns)
        except schema.SchemaError as exc:
            raise ConfigError(f"schema.columns: {exc}") from None
        reserved = set(schema.CANONICAL_TYPES) | {dedup.SOURCE_POSITION}
        for i, name in enumerate(self.schema.extra_columns):
            if name in reserved:
                raise ConfigError(f"schema.extra_columns[{i}]: {name!r} is a canonical output column")


class FilterInputError(InputError):
    """The input cannot be filtered as configured; the message names file, column and key."""


# --------------------------------------------------------------------------------------------
# Where things go


def input_uris(cfg: FilterConfig) -> list[str]:
    if cfg.input is None or cfg.input == [] or cfg.input == "":
        raise ConfigError("input: required (set `input:` in the config or pass --input URI)")
    uris = [cfg.input] if isinstance(cfg.input, str) else list(cfg.input)
    return [storage.normalize(u) for u in uris]


def input_identity(cfg: FilterConfig) -> str:
    uris = input_uris(cfg)
    for uri in uris:
        if not storage.exists(uri):
            raise FilterInputError(f"input {uri}: no such file or directory")
    identities = [manifest_lib.input_identity(u) for u in uris]
    if len(identities) == 1:
        return identities[0]
    return "inputs:" + hashlib.sha256(json.dumps(identities).encode()).hexdigest()


def output_dir(cfg: FilterConfig) -> str:
    """`<output root>/<version>`: where this config writes for its input (computed, not run)."""
    return PHASE.output_dir(cfg)


# --------------------------------------------------------------------------------------------
# Pre-flight: footers only


@dataclasses.dataclass
class InputFile:
    index: int
    uri: str
    rows: int = 0
    row_group_rows: list[int] = dataclasses.field(default_factory=list)
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # canonical -> source
    types: dict[str, pa.DataType] = dataclasses.field(default_factory=dict)  # source column -> type
    error: Optional[str] = None


@dataclasses.dataclass
class Unit:
    """One filter task: consecutive row groups of one file."""
    index: int
    file_index: int
    uri: str
    row_groups: list[int]
    first_row: int  # position of the unit's first row in its file
    rows: int


def list_input_files(uris: list[str]) -> list[str]:
    files: list[str] = []
    for uri in uris:
        if storage.is_dir(uri):
            # One of our own datasets: only its top-level parts (not duplicates/ or temp files).
            recursive = not manifest_lib.has_manifest(uri)
            found = storage.list_files(uri, suffix=".parquet", recursive=recursive)
            if not found:
                raise FilterInputError(f"input {uri}: no *.parquet files in this directory")
            files.extend(found)
        else:
            files.append(uri)
    duplicates = sorted(name for name, count in collections.Counter(files).items() if count > 1)
    if duplicates:
        raise FilterInputError(f"input: file {duplicates[0]} is listed twice (overlapping inputs)")
    return files


def read_footer(index: int, uri: str, rename: dict[str, str]) -> InputFile:
    entry = InputFile(index=index, uri=uri)
    try:
        with storage.open_input(uri) as handle:
            metadata = pq.ParquetFile(handle).metadata
            arrow_schema = metadata.schema.to_arrow_schema()
        entry.rows = metadata.num_rows
        entry.row_group_rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    except (OSError, pa.ArrowException, ValueError) as exc:
        entry.error = f"{type(exc).__name__}: {exc}"
        return entry
    entry.columns = schema.resolve_columns(arrow_schema.names, rename)
    entry.types = {f.name: f.type for f in arrow_schema}
    return entry


def _type_problem(canonical: str, arrow_type: pa.DataType) -> str | None:
    if pa.types.is_null(arrow_type):
        return None
    if canonical in schema.STRING_COLUMNS:
        ok = (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
              or pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
              or pa.types.is_dictionary(arrow_type) or pa.types.is_string_view(arrow_type))
        return None if ok else "strings"
    ok = pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type)
    return None if ok else "numbers"


@dataclasses.dataclass
class Plan:
    files: list[InputFile]  # readable files, in input order
    bad_files: list[InputFile]  # unreadable footers (only when skip_bad_files)
    include_language: bool
    extra_types: dict[str, pa.DataType]
    num_buckets: int
    units: list[Unit]

    def fingerprint(self) -> dict:
        """What the temp state of a run depends on; a resume with a different plan starts over."""
        return {"files": [[f.index, f.uri, f.rows] for f in self.files],
                "units": [[u.file_index, u.row_groups] for u in self.units],
                "num_buckets": self.num_buckets,
                "include_language": self.include_language,
                "extra_types": {k: str(v) for k, v in self.extra_types.items()}}


def preflight(cfg: FilterConfig) -> Plan:
    uris = list_input_files(input_uris(cfg))
    rename = dict(cfg.schema.columns)
    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.read.footer_threads) as pool:
        entries = list(pool.map(lambda item: read_footer(item[0], item[1], rename), enumerate(uris)))

    bad = [e for e in entries if e.error is not None]
    if bad and not cfg.skip_bad_files:
        raise FilterInputError(
            f"{bad[0].uri}: not a readable parquet file ({bad[0].error}); fix or remove it, or set "
            f"skip_bad_files: true (--set skip_bad_files=true) to skip unreadable files and count them")
    good = [e for e in entries if e.error is None]

    needed = filters.required_columns(cfg.filters)
    for column in ("URL", "TEXT"):  # the output contract (and the uid) need them whatever the filters
        needed.setdefault(column, [])
    for entry in good:
        for column, users in needed.items():
            source = entry.columns.get(column)
            if source is None:
                wanted = cfg.schema.columns.get(column)
                looked_for = repr(wanted) if wanted else " / ".join(schema.ALIASES[column])
                if users:
                    hint = " or ".join(f"filters.{name}.enabled=false" for name in users)
                    why = f"needed by filter{'s' if len(users) > 1 else ''} {', '.join(users)}; disable with {hint}"
                else:
                    why = "required in every output row"
                raise FilterInputError(
                    f"{entry.uri}: column {column!r} is missing (looked for {looked_for}; {why}, "
                    f"or map another column to it with schema.columns.{column}=NAME). "
                    f"Columns in the file: {', '.join(entry.types)}")
        for column, source in entry.columns.items():
            problem = _type_problem(column, entry.types[source])
            if problem:
                raise FilterInputError(f"{entry.uri}: column {source!r} (used as {column}) holds "
                                       f"{entry.types[source]}, expected {problem}")

    include_language = any("LANGUAGE" in e.columns for e in good) or cfg.filters.language.enabled
    extra_types: dict[str, pa.DataType] = {}
    for i, name in enumerate(cfg.schema.extra_columns):
        holder = next((e for e in good if name in e.types), None)
        if holder is None and good:
            raise FilterInputError(f"schema.extra_columns[{i}]: column {name!r} is in none of the input files")
        if holder is not None:
            extra_types[name] = holder.types[name]

    total_rows = sum(e.rows for e in good)
    num_buckets = cfg.dedup.num_buckets or max(1, math.ceil(total_rows / cfg.dedup.input_rows_per_bucket))

    units: list[Unit] = []
    for entry in good:
        groups: list[int] = []
        first_row = unit_first = unit_rows = 0
        for group, rows in enumerate(entry.row_group_rows):
            if groups and unit_rows + rows > cfg.read.rows_per_task:
                units.append(Unit(len(units), entry.index, entry.uri, groups, unit_first, unit_rows))
                groups, unit_rows = [], 0
            if not groups:
                unit_first = first_row
            groups.append(group)
            unit_rows += rows
            first_row += rows
        if groups:
            units.append(Unit(len(units), entry.index, entry.uri, groups, unit_first, unit_rows))
    return Plan(files=good, bad_files=bad, include_language=include_language, extra_types=extra_types,
                num_buckets=num_buckets, units=units)


# --------------------------------------------------------------------------------------------
# Stage 1: normalise + filter + scatter survivors into buckets (one Ray task per unit)


@dataclasses.dataclass
class StageContext:
    filters: filters.FiltersConfig
    include_language: bool
    extra_types: dict[str, pa.DataType]
    num_buckets: int
    tmp_uri: str
    batch_rows: int
    buffer_rows: int
    dedup_enabled: bool
    record_duplicates: bool
    temp_compression: Optional[str]
    part_schema: pa.Schema  # output schema + the _src tie-breaker


def stage_context(cfg: FilterConfig, plan: Plan, tmp_uri: str) -> StageContext:
    out_schema = schema.output_schema(plan.include_language, plan.extra_types)
    return StageContext(filters=cfg.filters, include_language=plan.include_language, extra_types=plan.extra_types,
                        num_buckets=plan.num_buckets, tmp_uri=tmp_uri, batch_rows=cfg.read.batch_rows,
                        buffer_rows=cfg.read.buffer_rows, dedup_enabled=cfg.dedup.enabled,
                        record_duplicates=cfg.dedup.record_duplicates, temp_compression=cfg.read.temp_compression,
                        part_schema=out_schema.append(pa.field(dedup.SOURCE_POSITION, pa.int64())))


def unit_row(unit: Unit, plan: Plan) -> dict[str, str]:
    """The Ray Data row describing one filter task."""
    entry = next(f for f in plan.files if f.index == unit.file_index)
    return {"unit": json.dumps({**dataclasses.asdict(unit), "columns": entry.columns,
                                "file_columns": list(entry.types)})}


def _bucket_file(ctx: StageContext, bucket: int, unit: int, flush: int) -> str:
    return storage.join(ctx.tmp_uri, "buckets", f"b{bucket:05d}", f"u{unit:06d}-{flush:03d}.arrow")


def _unit_marker(tmp_uri: str, unit: int) -> str:
    return storage.join(tmp_uri, "units", f"u{unit:06d}.json")


def _bucket_marker(tmp_uri: str, bucket: int) -> str:
    return storage.join(tmp_uri, "buckets_done", f"b{bucket:05d}.json")


class _BucketSpill:
    """Buffers a task's surviving rows and writes them, split by bucket, to temp parquet files."""

    def __init__(self, ctx: StageContext, unit: int):
        self.ctx = ctx
        self.unit = unit
        self.pending: list[pa.Table] = []
        self.pending_buckets: list = []
        self.pending_rows = 0
        self.flushes = 0
        self.files: dict[int, list[list]] = {}  # bucket -> [[uri, rows], ...]

    def add(self, table: pa.Table, buckets) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_buckets.append(buckets)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.ctx.buffer_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        import numpy as np

        table = pa.concat_tables(self.pending)
        buckets = np.concatenate(self.pending_buckets)
        self.pending, self.pending_buckets, self.pending_rows = [], [], 0
        order = np.argsort(buckets, kind="stable")
        table = table.take(pa.array(order))
        buckets = buckets[order]
        bounds = np.searchsorted(buckets, np.arange(self.ctx.num_buckets + 1))
        fs, _ = storage.resolve(self.ctx.tmp_uri)
        for bucket in np.unique(buckets):
            start, stop = int(bounds[bucket]), int(bounds[bucket + 1])
            uri = _bucket_file(self.ctx, int(bucket), self.unit, self.flushes)
            path = storage.resolve(uri)[1]
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            # Arrow IPC, not parquet: written once, read once, and ~5x cheaper to encode.
            options = pa.ipc.IpcWriteOptions(compression=self.ctx.temp_compression)
            with fs.open_output_stream(path) as sink, pa.ipc.new_file(sink, table.schema, options=options) as out:
                out.write_table(table.slice(start, stop - start))
            self.files.setdefault(int(bucket), []).append([uri, stop - start])
        self.flushes += 1


# What a broken or unreadable input file raises while it is opened, decoded or normalised.
_INPUT_ERRORS = (OSError, pa.ArrowException, schema.SchemaError)


class _UnreadableInput(Exception):
    """An input file failed while being read; never raised for errors writing our own output."""


def _normalised_batches(unit: dict, ctx: StageContext):
    """Yield (rows read, normalised table) per batch of the unit's row groups."""
    columns = unit["columns"]
    wanted = ["URL", "TEXT", "WIDTH", "HEIGHT", "aesthetic", "punsafe", "pwatermark", "similarity", "hash"]
    if ctx.include_language:
        wanted.append("LANGUAGE")
    read_columns = list(dict.fromkeys(schema.source_columns(columns, wanted)
                                      + [c for c in ctx.extra_types if c in unit["file_columns"]]))
    try:
        handle = storage.open_input(unit["uri"])
        # Checksums are verified when the writer stored them (newer LAION mirrors do).
        batches = pq.ParquetFile(handle, page_checksum_verification=True).iter_batches(
            batch_size=ctx.batch_rows, row_groups=unit["row_groups"], columns=read_columns, use_threads=False)
    except _INPUT_ERRORS as exc:
        raise _UnreadableInput(f"{type(exc).__name__}: {exc}") from None
    with handle:
        while True:
            try:
                batch = next(batches)
                table = pa.Table.from_batches([batch])
                normalised = schema.normalize(table, columns, include_language=ctx.include_language,
                                              extra_types=ctx.extra_types)
            except StopIteration:
                return
            except _INPUT_ERRORS as exc:
                raise _UnreadableInput(f"{type(exc).__name__}: {exc}") from None
            yield table.num_rows, normalised


def filter_unit(row: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Ray Data map function: one unit -> its counts (survivors go to bucket files).

    A broken input file comes back as status "error" (the driver stops or skips the file);
    any other failure, e.g. writing the bucket files, fails the task and the job."""
    import numpy as np

    unit = json.loads(row["unit"])
    steps = filters.empty_steps(ctx.filters)
    spill = _BucketSpill(ctx, unit["index"])
    rows_read = survivors = 0
    position = unit["first_row"]
    source_base = unit["file_index"] << ROW_BITS
    try:
        for rows, normalised in _normalised_batches(unit, ctx):
            keep, batch_steps = filters.apply_filters(normalised, ctx.filters)
            filters.merge_steps(steps, batch_steps)
            kept_rows = np.flatnonzero(keep)
            if len(kept_rows):
                kept = normalised.take(pa.array(kept_rows))
                kept = schema.add_uid(schema.strip_url(kept))
                kept = kept.append_column(dedup.SOURCE_POSITION,
                                          pa.array(source_base + position + kept_rows, pa.int64()))
                if ctx.dedup_enabled:
                    buckets = dedup.bucket_of(dedup.normalize_url(kept.column("URL")), ctx.num_buckets)
                else:  # no de-dup: buckets only spread the rows over parts, by input position
                    buckets = np.full(kept.num_rows, unit["index"] % ctx.num_buckets, dtype=np.int64)
                spill.add(schema.conform(kept, ctx.part_schema), buckets)
            rows_read += rows
            survivors += len(kept_rows)
            position += rows
    except _UnreadableInput as exc:
        return {"unit": unit["index"], "status": "error", "error": str(exc), "result": ""}
    spill.flush()
    result = {"unit": unit["index"], "file_index": unit["file_index"], "rows_read": rows_read,
              "survivors": survivors, "steps": [dataclasses.asdict(s) for s in steps],
              "buckets": {str(b): files for b, files in spill.files.items()}}
    storage.write_json(_unit_marker(ctx.tmp_uri, unit["index"]), result)
    return {"unit": unit["index"], "status": "ok", "error": "", "result": json.dumps(result)}


# --------------------------------------------------------------------------------------------
# Stage 2: one Ray task per bucket


def part_name(bucket: int) -> str:
    return f"part-{bucket:05d}.parquet"


def dedup_bucket(row: dict[str, Any], ctx: StageContext, out_uri: str) -> dict[str, Any]:
    """Ray Data map function: one bucket's temp files -> part-<bucket>.parquet (+ duplicates)."""
    bucket = int(row["bucket"])
    files = json.loads(row["files"])
    fs, _ = storage.resolve(out_uri)
    tables = []
    for uri in files:
        with fs.open_input_file(storage.resolve(uri)[1]) as source:
            tables.append(pa.ipc.open_file(source).read_all())
    table = pa.concat_tables(tables) if tables else ctx.part_schema.empty_table()
    rows_in = table.num_rows
    duplicates = 0
    if ctx.dedup_enabled and rows_in:
        result = dedup.keep_best(table)
        duplicates = result.removed
        if ctx.record_duplicates and duplicates:
            dup_uri = storage.join(out_uri, "duplicates", f"dup-{bucket:05d}.parquet")
            storage.makedirs(storage.join(out_uri, "duplicates"))
            pq.write_table(result.duplicates(table), storage.resolve(dup_uri)[1], filesystem=fs)
        table = result.kept
    else:
        table = table.sort_by(dedup.SOURCE_POSITION)
    output = table.drop_columns([dedup.SOURCE_POSITION])
    part = None
    if output.num_rows:
        part = part_name(bucket)
        pq.write_table(output, storage.resolve(storage.join(out_uri, part))[1], filesystem=fs)
    done = {"bucket": bucket, "rows_in": rows_in, "duplicates": duplicates, "rows_out": output.num_rows,
            "part": part}
    storage.write_json(_bucket_marker(ctx.tmp_uri, bucket), done)
    return {"bucket": bucket, "result": json.dumps(done)}


# --------------------------------------------------------------------------------------------
# Driver


def _ray_map(items: list[dict], fn, concurrency: Optional[int]):
    """Stream results of `fn` over `items`, one Ray task per item."""
    import ray.data

    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    kwargs = {"concurrency": concurrency} if concurrency else {}
    return dataset.map(fn, num_cpus=1, **kwargs).iter_rows()


def _prepare_tmp(out_uri: str, plan: Plan) -> str:
    """The run's temp dir; kept from an interrupted run with the same plan (resume), else fresh."""
    tmp_uri = storage.join(out_uri, TMP_DIR)
    plan_uri = storage.join(tmp_uri, "plan.json")
    fingerprint = plan.fingerprint()
    if storage.exists(plan_uri):
        try:
            same = storage.read_json(plan_uri) == json.loads(json.dumps(fingerprint))
        except ValueError:
            same = False
        if same:
            return tmp_uri
    if storage.exists(tmp_uri):
        storage.delete(tmp_uri)
    storage.makedirs(tmp_uri)
    storage.write_json(plan_uri, fingerprint)
    return tmp_uri


def _done_markers(tmp_uri: str, subdir: str) -> dict[int, dict]:
    folder = storage.join(tmp_uri, subdir)
    if not storage.exists(folder):
        return {}
    out = {}
    for uri in storage.list_files(folder, suffix=".json"):
        data = storage.read_json(uri)
        out[int(data["unit" if subdir == "units" else "bucket"])] = data
    return out


def build_funnel(plan: Plan, unit_results: list[dict], bucket_results: list[dict], skipped: list[dict],
                 cfg: FilterConfig) -> dict:
    steps = filters.empty_steps(cfg.filters)
    for result in unit_results:
        filters.merge_steps(steps, [filters.FilterStep(**s) for s in result["steps"]])
    rows_read = sum(r["rows_read"] for r in unit_results)
    after_filters = sum(r["survivors"] for r in unit_results)
    remaining = rows_read
    filter_rows = []
    for step in steps:
        removed = sum(step.removed.values())
        remaining -= removed
        filter_rows.append({"filter": step.name, "rule": step.rule, "removed": step.removed,
                            "removed_total": removed, "rows_after": remaining})
    duplicates = sum(b["duplicates"] for b in bucket_results)
    rows_in_buckets = sum(b["rows_in"] for b in bucket_results)
    written = sum(b["rows_out"] for b in bucket_results)
    # The funnel must add up exactly; a mismatch means lost or doubled rows: refuse to publish.
    if remaining != after_filters:
        raise RuntimeError(f"funnel does not add up: {rows_read} read - filters = {remaining}, "
                           f"but {after_filters} rows survived the filters")
    if rows_in_buckets != after_filters:
        raise RuntimeError(f"funnel does not add up: {after_filters} rows left the filters but the "
                           f"de-dup buckets hold {rows_in_buckets}")
    if after_filters - duplicates != written:
        raise RuntimeError(f"funnel does not add up: {after_filters} - {duplicates} duplicates != "
                           f"{written} written")
    return {
        "rows_read": rows_read,
        "filters": filter_rows,
        "rows_after_filters": after_filters,
        "duplicates_removed": duplicates,
        "rows_written": written,
        "dedup": {"enabled": cfg.dedup.enabled, "key": "normalised URL", "num_buckets": plan.num_buckets,
                  "keep": "highest aesthetic, then smallest caption"},
        "files": {"read": len(plan.files) - len({s["file_index"] for s in skipped if "file_index" in s}),
                  "skipped": [{k: v for k, v in s.items() if k != "file_index"} for s in skipped]},
        "rows_in_skipped_files": sum(s.get("rows") or 0 for s in skipped),
    }


def _metrics(funnel: dict) -> dict[str, float]:
    metrics = {"rows_read": funnel["rows_read"], "rows_after_filters": funnel["rows_after_filters"],
               "duplicates_removed": funnel["duplicates_removed"], "rows_written": funnel["rows_written"],
               "files_read": funnel["files"]["read"], "files_skipped": len(funnel["files"]["skipped"]),
               "rows_in_skipped_files": funnel["rows_in_skipped_files"]}
    for step in funnel["filters"]:
        for reason, count in step["removed"].items():
            metrics[f"removed.{reason}"] = count
    return metrics


class FilterPhase(Phase):
    name = PHASE_NAME
    config_class = FilterConfig
    output_subdir = OUTPUT_SUBDIR
    description = __doc__.splitlines()[0]
    version_exclude = VERSION_EXCLUDE

    def input_uri(self, cfg: FilterConfig) -> str:
        return ",".join(input_uris(cfg))

    def input_identity(self, cfg: FilterConfig) -> str:
        return input_identity(cfg)

    def existing_details(self, output: str, manifest: dict) -> dict:
        return {"funnel": storage.read_json(storage.join(output, FUNNEL))}

    def prepare(self, ctx: Context) -> None:
        plan = ctx.state["plan"] = preflight(ctx.cfg)
        log.info("%d files, %d rows, %d filter tasks, %d buckets -> %s", len(plan.files),
                 sum(f.rows for f in plan.files), len(plan.units), plan.num_buckets, ctx.output)

    def discard(self, ctx: Context) -> None:
        if storage.exists(ctx.output) and not manifest_lib.has_manifest(ctx.output):
            storage.delete(ctx.output)

    def execute(self, ctx: Context) -> Outcome:
        cfg, plan, out_uri = ctx.cfg, ctx.state["plan"], ctx.output
        storage.makedirs(out_uri)
        tmp_uri = _prepare_tmp(out_uri, plan)
        stage = stage_context(cfg, plan, tmp_uri)
        files_by_index = {f.index: f for f in plan.files}

        # Stage 1
        t0 = time.time()
        unit_results = _done_markers(tmp_uri, "units")
        resumed = {"filter_tasks": len(unit_results)}
        todo = [u for u in plan.units if u.index not in unit_results]
        if unit_results:
            log.info("resuming: %d of %d filter tasks already done", len(unit_results), len(plan.units))
        failed: dict[int, str] = {}  # file index -> error
        if todo:
            items = [unit_row(u, plan) for u in todo]
            for row in _ray_map(items, functools.partial(filter_unit, ctx=stage), cfg.read.max_tasks_in_flight):
                if row["status"] == "ok":
                    result = json.loads(row["result"])
                    unit_results[result["unit"]] = result
                    continue
                unit = plan.units[row["unit"]]
                if not cfg.skip_bad_files:
                    raise FilterInputError(
                        f"{unit.uri}: cannot read parquet data ({row['error']}); fix or remove the file, or set "
                        f"skip_bad_files: true (--set skip_bad_files=true) to skip unreadable files and count them")
                failed.setdefault(unit.file_index, row["error"])
        filter_seconds = time.time() - t0

        skipped = [{"file": f.uri, "error": f.error, "rows": None} for f in plan.bad_files]
        skipped += [{"file": files_by_index[i].uri, "error": err, "rows": files_by_index[i].rows, "file_index": i}
                    for i, err in sorted(failed.items())]
        for entry in skipped:
            log.warning("skipped unreadable file %s: %s", entry["file"], entry["error"])
        good_units = [r for r in unit_results.values() if r["file_index"] not in failed]

        # Stage 2
        t1 = time.time()
        bucket_files: dict[int, list[str]] = {b: [] for b in range(plan.num_buckets)}
        for result in sorted(good_units, key=lambda r: r["unit"]):
            for bucket, files in result["buckets"].items():
                bucket_files[int(bucket)].extend(uri for uri, _rows in files)
        bucket_results = _done_markers(tmp_uri, "buckets_done")
        resumed["buckets"] = len(bucket_results)
        todo_buckets = [b for b in range(plan.num_buckets) if b not in bucket_results]
        if todo_buckets:
            items = [{"bucket": b, "files": json.dumps(bucket_files[b])} for b in todo_buckets]
            fn = functools.partial(dedup_bucket, ctx=stage, out_uri=out_uri)
            for row in _ray_map(items, fn, cfg.read.max_tasks_in_flight):
                done = json.loads(row["result"])
                bucket_results[done["bucket"]] = done
        dedup_seconds = time.time() - t1

        funnel = build_funnel(plan, good_units, list(bucket_results.values()), skipped, cfg)
        seconds = time.time() - ctx.started
        funnel["seconds"] = {"total": round(seconds, 3), "filter": round(filter_seconds, 3),
                             "dedup": round(dedup_seconds, 3)}
        storage.write_json(storage.join(out_uri, FUNNEL), funnel)
        parts = sorted((b["part"], b["rows_out"]) for b in bucket_results.values() if b["part"])
        metrics = _metrics(funnel)
        metrics.update({"seconds": seconds, "rows_per_second": funnel["rows_read"] / max(seconds, 1e-9)})
        ctx.log_metrics(metrics)
        ctx.log_dict(funnel, FUNNEL)
        storage.delete(tmp_uri)
        log.info("done: %d rows read, %d after filters, %d duplicates, %d written in %.1f s", funnel["rows_read"],
                 funnel["rows_after_filters"], funnel["duplicates_removed"], funnel["rows_written"], seconds)
        counts = {"rows_read": funnel["rows_read"], "rows_after_filters": funnel["rows_after_filters"],
                  "duplicates_removed": funnel["duplicates_removed"], "rows_written": funnel["rows_written"],
                  "files_read": funnel["files"]["read"], "files_skipped": len(funnel["files"]["skipped"])}
        extra = {"columns": {f.name: str(f.type) for f in stage.part_schema if f.name != dedup.SOURCE_POSITION},
                 "parts": [{"file": name, "rows": rows} for name, rows in parts],
                 "duplicates_dir": "duplicates" if cfg.dedup.enabled and cfg.dedup.record_duplicates else None,
                 "funnel": FUNNEL}
        return Outcome(counts=counts, extra=extra, details={"funnel": funnel, "resumed": resumed})


PHASE = FilterPhase()


def run(cfg: FilterConfig) -> PhaseResult:
    """Run the phase (or return the existing result)."""
    return PHASE.run(cfg)


def main(argv: list[str] | None = None) -> PhaseResult:
    return PHASE.main(argv)


if __name__ == "__main__":
    module_cli(__spec__.name)
