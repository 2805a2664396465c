"""The filter phase's work, apart from its lifecycle: the pre-flight over parquet footers (schema variant,
corrupt files and missing columns found before any task starts, the input cut into tasks of whole row
groups) and the two Ray task functions, filter + scatter into URL-hash buckets, and de-dup of one bucket.
See `pipelines.filter` for how they fit together and scale.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_filters import dedup, filters, profile, schema
from pipelines import manifest as manifest_lib
from pipelines import storage
from pipelines.config import ConfigError
from pipelines.phase import InputError

if TYPE_CHECKING:
    from pipelines.filter import FilterConfig

# Row positions inside a file take the low 40 bits of the `_src` tie-breaker.
ROW_BITS = 40


class FilterInputError(InputError):
    """The input cannot be filtered as configured; the message names file, column and key."""



def input_uris(cfg: FilterConfig) -> list[str]:
    if cfg.input is None or cfg.input == [] or cfg.input == "":
        raise ConfigError("input: required (set `input:` in the config or pass --input URI)")
    uris = [cfg.input] if isinstance(cfg.input, str) else list(cfg.input)
    return [storage.normalize(u) for u in uris]


# --------------------------------------------------------------------------------------------
# Pre-flight: footers only


# Rows per row group of the output parts: a download shard (10,000 rows by default) reads only the groups that
# hold its rows (`download_task.read_slice`), so it reads at most 2 x 2,048 rows it does not need, where pyarrow's
# default (1M-row groups) made every shard read its part's whole group. Layout only: versions are unchanged.
OUTPUT_ROW_GROUP_ROWS = 2048


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


def _is_string_type(arrow_type: pa.DataType) -> bool:
    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
            or pa.types.is_dictionary(arrow_type) or pa.types.is_string_view(arrow_type))


def _type_problem(canonical: str, arrow_type: pa.DataType, mapped: bool = False) -> str | None:
    """What is wrong with a column's type for its canonical use (None: fine). `mapped`: the column's strings
    are mapped to numbers by schema.value_maps (LAION-400M's NSFW tags)."""
    if pa.types.is_null(arrow_type):
        return None
    if mapped and _is_string_type(arrow_type):
        return None
    if canonical in schema.STRING_COLUMNS:
        return None if _is_string_type(arrow_type) else "strings"
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


def preflight(cfg: FilterConfig, uris: list[str] | None = None, provided: tuple[str, ...] = ()) -> Plan:
    """Footers only: the files, their columns checked, the filter tasks. `uris`: these files instead of the
    config's input (the join's parts); `provided`: canonical columns the tag files add (not required here)."""
    uris = list_input_files(input_uris(cfg)) if uris is None else uris
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
    # Every missing column at once (each with the key that disables its filter), for the first file lacking any.
    lacking = [(entry, [c for c in needed if c not in entry.columns and c not in provided]) for entry in good]
    lacking = [(entry, missing) for entry, missing in lacking if missing]
    if lacking:
        entry, missing = lacking[0]
        lines = []
        for column in missing:
            users = needed[column]
            wanted = cfg.schema.columns.get(column)
            looked_for = repr(wanted) if wanted else " / ".join(schema.ALIASES[column])
            if users:
                hint = " or ".join(f"filters.{name}.enabled=false" for name in users)
                why = f"needed by filter{'s' if len(users) > 1 else ''} {', '.join(users)}; disable with {hint}"
            else:
                why = "required in every output row"
            lines.append(f"column {column!r} is missing (looked for {looked_for}; {why}, or map another column "
                         f"to it with schema.columns.{column}=NAME)")
        others = f"; {len(lacking) - 1} more input file(s) lack columns too" if len(lacking) > 1 else ""
        raise FilterInputError(f"{entry.uri}: {len(missing)} needed column(s) missing: " + "; ".join(lines)
                               + f". Columns in the file: {', '.join(entry.types)}{others}")
    for entry in good:
        for column, source in entry.columns.items():
            problem = _type_problem(column, entry.types[source], column in cfg.schema.value_maps)
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
    # The report (pipelines.reports): removed rows sampled per reason per task, histograms of the input.
    report_samples: int = 0
    report_histograms: bool = False
    value_maps: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


def stage_context(cfg: FilterConfig, plan: Plan, tmp_uri: str) -> StageContext:
    out_schema = schema.output_schema(plan.include_language, plan.extra_types)
    return StageContext(filters=cfg.filters, include_language=plan.include_language, extra_types=plan.extra_types,
                        num_buckets=plan.num_buckets, tmp_uri=tmp_uri, batch_rows=cfg.read.batch_rows,
                        buffer_rows=cfg.read.buffer_rows, dedup_enabled=cfg.dedup.enabled,
                        record_duplicates=cfg.dedup.record_duplicates, temp_compression=cfg.read.temp_compression,
                        part_schema=out_schema.append(pa.field(dedup.SOURCE_POSITION, pa.int64())),
                        report_samples=cfg.report.samples_per_reason if cfg.report.enabled else 0,
                        report_histograms=cfg.report.enabled, value_maps=dict(cfg.schema.value_maps))


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
                                              extra_types=ctx.extra_types, value_maps=ctx.value_maps)
            except StopIteration:
                return
            except _INPUT_ERRORS as exc:
                raise _UnreadableInput(f"{type(exc).__name__}: {exc}") from None
            yield table.num_rows, normalised


def filter_unit(row: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Ray Data map function: one unit -> its counts (survivors go to bucket files).

    A broken input file comes back as status "error" (the driver stops or skips the file);
    any other failure, e.g. writing the bucket files, fails the task and the job."""
    unit = json.loads(row["unit"])
    steps = filters.empty_steps(ctx.filters)
    spill = _BucketSpill(ctx, unit["index"])
    rows_read = survivors = 0
    position = unit["first_row"]
    source_base = unit["file_index"] << ROW_BITS
    hists: dict[str, dict] = {}
    samples: dict[str, list] = {}
    try:
        for rows, normalised in _normalised_batches(unit, ctx):
            codes = np.full(normalised.num_rows, -1, dtype=np.int16) if ctx.report_samples else None
            keep, batch_steps = filters.apply_filters(normalised, ctx.filters, codes)
            filters.merge_steps(steps, batch_steps)
            if ctx.report_histograms:  # the same pass: the batch is in memory already
                profile.merge_histograms(hists, profile.histograms(normalised))
            if codes is not None:
                have = {reason: len(rows_) for reason, rows_ in samples.items()}
                profile.merge_samples(samples, profile.sample_removed(normalised, codes, ctx.filters,
                                                                     ctx.report_samples, have), ctx.report_samples)
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
              "histograms": hists, "samples": samples,
              "buckets": {str(b): files for b, files in spill.files.items()}}
    storage.write_json(_unit_marker(ctx.tmp_uri, unit["index"]), result)
    return {"unit": unit["index"], "status": "ok", "error": "", "result": json.dumps(result)}


# --------------------------------------------------------------------------------------------
# Stage 2: one Ray task per bucket


def part_name(bucket: int) -> str:
    return f"part-{bucket:05d}.parquet"


def dedup_bucket(row: dict[str, Any], ctx: StageContext, out_uri: str) -> dict[str, Any]:
    """Ray Data map function: one bucket's temp files -> part-<bucket>.parquet (+ duplicates). A bucket with
    more rows than one task should hold (`passes` > 1, decided by the driver from the filter tasks' counts) is
    done in slices by a second hash of the URL, each read from the files, de-duplicated and written as
    part-<bucket>-<slice>.parquet: memory is one slice, and all copies of a URL fall in one slice."""
    bucket = int(row["bucket"])
    files = json.loads(row["files"])
    passes = int(row.get("passes") or 1)
    fs, _ = storage.resolve(out_uri)
    rows_in = duplicates = rows_out = 0
    parts: list[list] = []
    for slice_index in range(passes):
        tables = []
        for uri in files:
            with fs.open_input_file(storage.resolve(uri)[1]) as source:
                table = pa.ipc.open_file(source).read_all()
            if passes > 1:
                keep = dedup.sub_bucket_of(dedup.normalize_url(table.column("URL")), passes) == slice_index
                table = table.filter(pa.array(keep))
            tables.append(table)
        table = pa.concat_tables(tables) if tables else ctx.part_schema.empty_table()
        rows_in += table.num_rows
        suffix = f"{bucket:05d}" if passes == 1 else f"{bucket:05d}-{slice_index:03d}"
        if ctx.dedup_enabled and table.num_rows:
            result = dedup.keep_best(table)
            duplicates += result.removed
            if ctx.record_duplicates and result.removed:
                dup_uri = storage.join(out_uri, "duplicates", f"dup-{suffix}.parquet")
                storage.makedirs(storage.join(out_uri, "duplicates"))
                pq.write_table(result.duplicates(table), storage.resolve(dup_uri)[1], filesystem=fs)
            table = result.kept
        # Hosts spread over the download's shards (kept rows come grouped by normalised URL, i.e. by host).
        output = dedup.spread_order(table.drop_columns([dedup.SOURCE_POSITION]))
        if output.num_rows:
            part = f"part-{suffix}.parquet"
            pq.write_table(output, storage.resolve(storage.join(out_uri, part))[1], filesystem=fs,
                           row_group_size=OUTPUT_ROW_GROUP_ROWS)
            parts.append([part, output.num_rows])
        rows_out += output.num_rows
    done = {"bucket": bucket, "rows_in": rows_in, "duplicates": duplicates, "rows_out": rows_out,
            "part": parts[0][0] if len(parts) == 1 else None, "parts": parts, "passes": passes}
    storage.write_json(_bucket_marker(ctx.tmp_uri, bucket), done)
    return {"bucket": bucket, "result": json.dumps(done)}
