"""`python -m pipelines.filter`: LAION metadata -> an aesthetic, safe, de-duplicated set + funnel.

    python -m pipelines.filter --config configs/filter.yaml --input s3://laion/laion2B-en/ \\
        [--output URI] [--set filters.aesthetic.min=5.5]

Reads LAION parquet files (or directories of them, local or object store) and writes
`<output>/<version>/part-NNNNN.parquet` in the normalised schema of `data_filters.schema`, plus
`funnel.json` (rows read, rows removed by each filter in order and per reason, duplicates
removed, rows written; the counts add up and are checked) and `manifest.json`, written last.
`<version>` hashes the output-affecting config and the input listing: rerunning the same config
on the same input is a no-op, a changed threshold writes a new version next to the old one.

Three streaming stages, nothing materialised on the driver: a footer-only pre-flight, filter tasks that
scatter survivors into URL-hash buckets, one de-dup task per bucket (README, "How the filter scales").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import posixpath
import time
from typing import Optional, Union

from data_filters import dedup, filters, profile, schema
from pipelines import manifest as manifest_lib
from pipelines import filter_join, reports, storage, tracking
from pipelines.config import ConfigError, param
from pipelines.filter_tasks import (FilterInputError, Plan, dedup_bucket, filter_unit, input_uris, preflight,
                                    stage_context, unit_row)
from pipelines.phase import Context, Outcome, Phase, module_cli
from pipelines.runtime import RayConfig, default_data_root, ensure_cwd

log = logging.getLogger(__name__)

PHASE_NAME = "filter"
OUTPUT_SUBDIR = "filtered"
TMP_DIR = "_work.tmp"
FUNNEL = "funnel.json"
# Settings that cannot change the output: they are left out of the version hash.
VERSION_EXCLUDE = ("input", "output", "data_root", "read", "report", "join", "ray", "mlflow")


@dataclasses.dataclass
class SchemaConfig:
    # canonical column -> input column, overriding the built-in aliases (data_filters/schema.py),
    # e.g. {aesthetic: aesthetic} to use the V1 score in files that carry both.
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    # Input columns carried to the output unchanged (e.g. [key, original_width]); others are dropped.
    extra_columns: list[str] = dataclasses.field(default_factory=list)
    # Score columns stored as string tags: tag -> score (LAION-400M's NSFW column as punsafe). A tag not
    # listed becomes null (counted as null_<column>).
    value_maps: dict[str, dict[str, float]] = dataclasses.field(
        default_factory=lambda: {k: dict(v) for k, v in schema.DEFAULT_VALUE_MAPS.items()})


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
    # A bucket holding more surviving rows than this is de-duplicated in slices by a second URL hash (each
    # slice read, de-duplicated and written on its own): the de-dup task's memory is bounded by this, whatever
    # a loose threshold lets through (~1 KB per row in memory).
    max_rows_per_task: int = param(2_000_000, ge=1)


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
    # Ray memory request of each filter / de-dup task in MiB, so that a node runs no more of them at once than
    # its memory holds. None: estimated from batch_rows, buffer_rows and dedup.max_rows_per_task; 0: no request.
    task_memory_mib: Optional[int] = param(None, ge=0)
    # Compression of the temporary bucket files (Arrow IPC). None is fastest on local disk;
    # lz4/zstd trade CPU for fewer bytes when the output lives in an object store.
    temp_compression: Optional[str] = param(None, choices=["lz4", "zstd"])


@dataclasses.dataclass
class ReportConfig:
    # report/ next to funnel.json (and in MLflow): the funnel chart, histograms of the filtered columns over the
    # input with the thresholds drawn, sampled removed rows per reason, report.html. Same pass over the input.
    enabled: bool = True
    samples_per_reason: int = param(8, ge=0, le=1000)


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
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    # Tag files joined to the metadata on a key before filtering (laion2B-en's aesthetic scores are in
    # separate files joined on `hash`): pipelines.filter_join.
    tags: list[filter_join.TagSetConfig] = dataclasses.field(default_factory=list)
    join: filter_join.JoinConfig = dataclasses.field(default_factory=filter_join.JoinConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
        filter_join.validate(self.tags)
        problems = self.filters.problems()
        if problems:
            raise ConfigError(f"filters.{problems[0]}")
        try:
            schema.resolve_columns([], self.schema.columns)
        except schema.SchemaError as exc:
            raise ConfigError(f"schema.columns: {exc}") from None
        for column in self.schema.value_maps:
            if column not in schema.SCORE_COLUMNS:
                raise ConfigError(f"schema.value_maps.{column}: only score columns take a value map "
                                  f"({', '.join(schema.SCORE_COLUMNS)})")
        reserved = set(schema.CANONICAL_TYPES) | {dedup.SOURCE_POSITION}
        for i, name in enumerate(self.schema.extra_columns):
            if name in reserved:
                raise ConfigError(f"schema.extra_columns[{i}]: {name!r} is a canonical output column")


# --------------------------------------------------------------------------------------------
# Where things go


def tag_identities(cfg: FilterConfig) -> list[str]:
    out = []
    for i, tag in enumerate(cfg.tags):
        uris = [storage.normalize(u) for u in ([tag.input] if isinstance(tag.input, str) else tag.input)]
        for uri in uris:
            if not storage.exists(uri):
                raise FilterInputError(f"tags[{i}].input {uri}: no such file or directory")
        out.append(hashlib.sha256(json.dumps([manifest_lib.input_identity(u) for u in uris]).encode()).hexdigest())
    return out


def input_identity(cfg: FilterConfig) -> str:
    uris = input_uris(cfg)
    for uri in uris:
        if not storage.exists(uri):
            raise FilterInputError(f"input {uri}: no such file or directory")
    identities = [manifest_lib.input_identity(u) for u in uris]
    if len(identities) == 1:
        return identities[0]
    return "inputs:" + hashlib.sha256(json.dumps(identities).encode()).hexdigest()



# --------------------------------------------------------------------------------------------
# Driver


def _ray_map(items: list[dict], fn, concurrency: Optional[int], memory: int = 0):
    """Stream results of `fn` over `items`, one Ray task per item (each reserving `memory` bytes, if > 0)."""
    import ray.data

    ensure_cwd()
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    kwargs = {"concurrency": concurrency} if concurrency else {}
    if memory > 0:
        kwargs["memory"] = memory
    yield from dataset.map(fn, num_cpus=1, **kwargs).iter_rows()
    # A worker node on the same machine re-extracts the job's working_dir (the driver's cwd) when its first
    # task lands there: the driver's cwd is then a deleted directory (measured: the filter died in getcwd).
    ensure_cwd()


# What a task holds at its peak, measured with `bench/filter_scale.py memory` (peak RSS of the Ray workers over
# runs with batch_rows 131k / 262k / 524k and de-dup slices of 390k / 781k rows; BENCHMARKS.md): a worker's own
# footprint with what its allocator keeps from earlier tasks, ~750 B per row of a decoded batch (the batch, its
# normalised columns and masks), ~1 KB per row of a de-dup slice (its rows, the normalised URLs and sort keys, the
# kept copy) and ~600 B per buffered survivor (a filter task's spill buffer, one temp file a de-dup task reads).
TASK_BASE_BYTES = 640 * 2**20
BATCH_BYTES_PER_ROW = 750
SLICE_BYTES_PER_ROW = 1000
BUFFERED_BYTES_PER_ROW = 600


def task_memory(cfg: "FilterConfig", unit_rows: Optional[int] = None,
                bucket_rows: Optional[int] = None) -> dict[str, int]:
    """Bytes each filter and de-dup task asks Ray for: what its buffers can reach under the config, or less when
    the largest filter task (`unit_rows`) or de-dup bucket (`bucket_rows`) is smaller than those buffers."""
    if cfg.read.task_memory_mib is not None:  # 0: no request
        return {"filter": cfg.read.task_memory_mib * 2**20, "dedup": cfg.read.task_memory_mib * 2**20}
    unit = cfg.read.rows_per_task if unit_rows is None else unit_rows
    bucket = cfg.dedup.max_rows_per_task if bucket_rows is None else bucket_rows
    return {"filter": TASK_BASE_BYTES + BATCH_BYTES_PER_ROW * min(cfg.read.batch_rows, unit)
            + BUFFERED_BYTES_PER_ROW * min(cfg.read.buffer_rows, unit),
            "dedup": TASK_BASE_BYTES + SLICE_BYTES_PER_ROW * min(cfg.dedup.max_rows_per_task, bucket)
            + BUFFERED_BYTES_PER_ROW * min(cfg.read.buffer_rows, bucket)}


def check_task_memory(requests: dict[str, int], node_memory: list[float]) -> None:
    """Fail fast, naming the keys, when no node could ever run a task (Ray would queue it forever)."""
    largest = max(node_memory, default=0)
    keys = {"filter": "read.batch_rows / read.buffer_rows", "dedup": "dedup.max_rows_per_task / read.buffer_rows"}
    for kind, need in requests.items():
        if need > largest:
            raise ConfigError(f"read.task_memory_mib: a {kind} task needs ~{need / 2**20:,.0f} MiB but the largest "
                              f"Ray node offers {largest / 2**20:,.0f} MiB of task memory; lower {keys[kind]} "
                              f"(or set read.task_memory_mib explicitly)")


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
                  # buckets above dedup.max_rows_per_task are done in several slices (bounded memory)
                  "slices": sum(b.get("passes", 1) for b in bucket_results),
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
        # The funnel as metrics of the same names in every run: the compare view lines two thresholds up.
        metrics[f"rows_after.{step['filter']}"] = step["rows_after"]
    return metrics


def write_report(ctx: Context, funnel: dict, unit_results: list[dict]) -> dict:
    """report/ from the filter tasks' histograms and samples (merged in input order), logged to MLflow."""
    cfg = ctx.cfg
    hists: dict[str, dict] = {}
    samples: dict[str, list] = {}
    for result in sorted(unit_results, key=lambda r: r["unit"]):
        profile.merge_histograms(hists, result.get("histograms") or {})
        profile.merge_samples(samples, result.get("samples") or {}, cfg.report.samples_per_reason)
    files = reports.filter_report(ctx.output, ctx.version, funnel, hists, profile.thresholds(cfg.filters), samples)
    ctx.log_files(files, reports.REPORT_DIR)
    return files


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

    def version_config(self, cfg: FilterConfig) -> dict:
        from pipelines import config as config_lib

        tree = config_lib.to_dict(cfg)
        # At their defaults, settings added later stay out of the hash: earlier versions keep their names.
        if tree.get("schema", {}).get("value_maps") == schema.DEFAULT_VALUE_MAPS:
            tree["schema"].pop("value_maps")
        if tree.get("dedup", {}).get("max_rows_per_task") == DedupConfig.max_rows_per_task:
            tree["dedup"].pop("max_rows_per_task")  # slices change the part files, not the rows; default: as before
        if not tree.get("tags"):
            tree.pop("tags", None)
        else:  # the tag files' content identifies them, not their paths
            for tag, identity in zip(tree["tags"], tag_identities(cfg)):
                tag["input"] = identity
        return tree

    def existing_details(self, output: str, manifest: dict) -> dict:
        return {"funnel": storage.read_json(storage.join(output, FUNNEL))}

    def prepare(self, ctx: Context) -> None:
        cfg = ctx.cfg
        provided = tuple(c for tag in cfg.tags for c in tag.columns)
        plan = ctx.state["plan"] = preflight(cfg, provided=provided)
        if cfg.tags:
            ctx.state["join_plan"] = filter_join.plan_join(cfg, plan.files)
        log.info("%d files, %d rows, %d filter tasks, %d buckets -> %s", len(plan.files),
                 sum(f.rows for f in plan.files), len(plan.units), plan.num_buckets, ctx.output)

    def discard(self, ctx: Context) -> None:
        if storage.exists(ctx.output) and not manifest_lib.has_manifest(ctx.output):
            storage.delete(ctx.output)

    def execute(self, ctx: Context) -> Outcome:
        cfg, plan, out_uri = ctx.cfg, ctx.state["plan"], ctx.output
        storage.makedirs(out_uri)
        join_counts = None
        if cfg.tags:
            # Stage 0: the join; its parts (in the metadata's order per key bucket) are the filter's input.
            metadata_plan, join_plan = plan, ctx.state["join_plan"]
            tmp_uri = _prepare_tmp(out_uri, join_plan)
            parts, join_counts = filter_join.run_join(
                cfg, join_plan, tmp_uri, lambda items, fn: _ray_map(items, fn, cfg.read.max_tasks_in_flight))
            plan = preflight(cfg, uris=parts)
            plan.bad_files = metadata_plan.bad_files  # skipped metadata files (skip_bad_files) stay counted
            log.info("joined %d metadata rows with %d tag set(s) into %d parts", join_counts["metadata_rows"],
                     len(cfg.tags), len(parts))
        else:
            tmp_uri = _prepare_tmp(out_uri, plan)
        stage = stage_context(cfg, plan, tmp_uri)
        # The filter tasks' request, and the de-dup's largest possible one (buckets are sized after stage 1).
        input_rows = sum(u.rows for u in plan.units)
        memory = task_memory(cfg, unit_rows=max((u.rows for u in plan.units), default=0), bucket_rows=input_rows)
        if any(memory.values()):
            import ray

            check_task_memory(memory, [n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]])
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
            for row in _ray_map(items, functools.partial(filter_unit, ctx=stage), cfg.read.max_tasks_in_flight,
                                memory["filter"]):
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
            rows_per_bucket = {b: 0 for b in range(plan.num_buckets)}
            for result in good_units:
                for bucket, files in result["buckets"].items():
                    rows_per_bucket[int(bucket)] += sum(rows for _uri, rows in files)
            # A bucket larger than one task should hold is de-duplicated in slices (memory bounded by config).
            items = [{"bucket": b, "files": json.dumps(bucket_files[b]),
                      "passes": max(1, -(-rows_per_bucket[b] // cfg.dedup.max_rows_per_task))} for b in todo_buckets]
            split = [i for i in items if i["passes"] > 1]
            if split:
                log.info("%d de-dup bucket(s) above dedup.max_rows_per_task=%d rows: done in slices (largest %d rows, "
                         "%d slices)", len(split), cfg.dedup.max_rows_per_task, max(rows_per_bucket.values()),
                         max(i["passes"] for i in split))
            fn = functools.partial(dedup_bucket, ctx=stage, out_uri=out_uri)
            dedup_memory = task_memory(cfg, bucket_rows=max(rows_per_bucket.values(), default=0))["dedup"]
            for row in _ray_map(items, fn, cfg.read.max_tasks_in_flight, dedup_memory):
                done = json.loads(row["result"])
                bucket_results[done["bucket"]] = done
        dedup_seconds = time.time() - t1

        funnel = build_funnel(plan, good_units, list(bucket_results.values()), skipped, cfg)
        if join_counts is not None:
            funnel["files"]["read"] = len(metadata_plan.files)
            funnel["join"] = join_counts
        seconds = time.time() - ctx.started
        funnel["seconds"] = {"total": round(seconds, 3), "filter": round(filter_seconds, 3),
                             "dedup": round(dedup_seconds, 3)}
        storage.write_json(storage.join(out_uri, FUNNEL), funnel)
        parts = sorted(tuple(p) for b in bucket_results.values()
                       for p in (b.get("parts") or ([[b["part"], b["rows_out"]]] if b.get("part") else [])))
        metrics = _metrics(funnel)
        metrics.update({"seconds": seconds, "rows_per_second": funnel["rows_read"] / max(seconds, 1e-9)})
        ctx.log_metrics(metrics)
        ctx.log_dict(funnel, FUNNEL)
        t2 = time.time()
        report = write_report(ctx, funnel, good_units) if cfg.report.enabled else {}
        report_seconds = time.time() - t2
        storage.delete(tmp_uri)
        log.info("done: %d rows read, %d after filters, %d duplicates, %d written in %.1f s", funnel["rows_read"],
                 funnel["rows_after_filters"], funnel["duplicates_removed"], funnel["rows_written"], seconds)
        counts = {"rows_read": funnel["rows_read"], "rows_after_filters": funnel["rows_after_filters"],
                  "duplicates_removed": funnel["duplicates_removed"], "rows_written": funnel["rows_written"],
                  "files_read": funnel["files"]["read"], "files_skipped": len(funnel["files"]["skipped"])}
        extra = {"columns": {f.name: str(f.type) for f in stage.part_schema if f.name != dedup.SOURCE_POSITION},
                 "parts": [{"file": name, "rows": rows} for name, rows in parts],
                 "duplicates_dir": "duplicates" if cfg.dedup.enabled and cfg.dedup.record_duplicates else None,
                 "funnel": FUNNEL,
                 "report": posixpath.join(reports.REPORT_DIR, reports.REPORT_HTML) if report else None}
        return Outcome(counts=counts, extra=extra, details={"funnel": funnel, "resumed": resumed,
                                                            "report_seconds": report_seconds})


PHASE = FilterPhase()
# The module-level entry points callers use: run(cfg) -> PhaseResult, main(argv), output_dir(cfg).
run, main, output_dir = PHASE.run, PHASE.main, PHASE.output_dir


if __name__ == "__main__":
    module_cli(__spec__.name)
