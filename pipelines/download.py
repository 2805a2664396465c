"""`python -m pipelines.download`: filtered metadata -> webdataset image shards, with img2dataset.

Longer than 500 lines: the config, the shard plan and the driver with its failed-shard accounting and
reports, one lifecycle; the per-shard work lives in `pipelines.download_task`.

Reads one `filter` output version (part-*.parquet: uid, URL, TEXT, metadata columns), splits its
rows into deterministic shards of `shard_size` consecutive rows and runs one Ray task per shard.
Each task fetches its shard with img2dataset's own downloader, resizer and webdataset writer
(real HTTP through urllib), into a scratch directory, then checks the result (one parquet
row per input row, a readable tar with one image per success) and moves it into
`<output>/<version>/` as NNNNN.tar + NNNNN.parquet + NNNNN_stats.json, the stats file last: its
presence, with the record of what was written checked cheaply (sizes, the tar's ends, the parquet's keys;
no tar header read over the network), marks the shard complete, so a rerun skips complete shards and
redoes partial or altered ones. Failed tasks are retried `max_shard_retries` times; a shard that still
fails has its rows counted as `shard_failed` and the version completes, unless more than
`max_failed_shard_fraction` of the shards failed (then the phase fails, naming them). A version with
failed shards is not complete to a rerun: it retries those shards and rewrites the manifest.

Politeness (`pipelines.download_task`): a per-host connection limit, 429 / 503 retried after their
Retry-After, a DNS cache per shard task (every address still checked by the guard), our own User-Agent.
None of these settings is part of the version.

Re-filtering (issue 19): earlier complete download versions under the same output root with the same
`reuse_key` (the settings that decide what a sample is, and the stored metadata columns) form a pool. A uid the
pool holds a sample or a permanent failure of is not fetched again (`reuse`, `refetch_failures`,
`permanent_failures`; none of them versioned): each shard then writes a selection, NNNNN_selection.parquet (one
row per input row: fetched or reused, success with the tar and member offsets that hold it, or failure with its
reason; `pipelines.image_shards`), plus its own NNNNN.tar for the rows it fetched. `report.json`'s `reuse` and
the manifest's `funnel_by_origin` count every row by origin.

Why not `img2dataset.download()` per shard: it spawns a process pool and a logger process per
call, each re-importing img2dataset (albumentations, torch via webdataset: seconds of CPU per
shard), installs a SIGINT handler in the Ray worker, and gives no handle on the urllib opener the
private-address guard must be installed into. The shard-level pieces it is made of are used as-is.

Safety: every connection goes through `pipelines.netguard` (private, loopback, link-local, metadata,
multicast and reserved addresses refused unless in `allowed_networks`; redirects checked; the
address checked is the one connected to), response bodies are capped, and images are inspected
before decoding (decompression bombs, truncated files, non-image content are per-sample failures).

Every input row ends in `report.json` as a success or a failure with a reason; input rows =
succeeded + sum(failures) is checked before anything is published. MLflow gets the same counts;
`manifest.json` (with the same `funnel` and the `failed_shards`) is written last.

Modules: this one is the config, the input plan, the driver and the `DownloadPhase` lifecycle;
`pipelines.download_task` one shard's work inside its Ray task; `pipelines.image_shards` the output
format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_filters import dedup
from pipelines import manifest as manifest_lib
from pipelines import config as config_lib
from pipelines import image_shards, netguard, reports, storage, tracking
from pipelines.config import ConfigError, param
# download_task first: it sets the environment img2dataset's imports need, in the driver and in workers.
from pipelines.download_task import (DownloadInputError, ShardPlan, ShardSettings, failure_reason, read_slice,
                                     run_shard)
from pipelines.image_shards import SELECTION_SUFFIX, shard_files, shard_name_digits
from pipelines.phase import Context, InputError, Outcome, Phase, PhaseResult, module_cli
from pipelines.runtime import RayConfig, default_data_root

PHASE_NAME = "download"
log = logging.getLogger(__name__)

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
REQUIRED_COLUMNS = ("uid", "URL", "TEXT")
# Column names img2dataset writes itself; an input column with one of these names cannot be kept.
IMG2DATASET_RESERVED = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                                  "status", "error_message", "exif", "md5", "sha256", "sha512"})
# Settings that do not change what is downloaded (parallelism, politeness, bookkeeping, where things go).
# Keys added to this list later are left out of every version, so existing versions keep their names.
VERSION_EXCLUDE = ("input", "output", "data_root", "ray", "mlflow", "threads_per_task", "cpus_per_task",
                   "max_shard_retries", "max_tasks_in_flight", "scratch_dir", "progress_interval_s",
                   "user_agent", "max_connections_per_host", "throttle_retries", "retry_backoff_s",
                   "max_retry_wait_s", "dns_cache_seconds", "max_failed_shard_fraction", "resume_check",
                   "reuse", "refetch_failures", "permanent_failures")
# Keys added after versions were already published: hashed only when set to something other than their
# default, so that adding them did not give every existing download a new version.
LATE_KEYS = {"max_shard_seconds": 3600.0, "allow_metadata_address": False}
SHARD_FAILED = "shard_failed"
REPORT = "report.json"
# The settings that decide what a downloaded sample is (its bytes, its .json, whether it was kept): two download
# versions with the same values (and the same stored metadata columns) hold interchangeable samples, so a new
# version reuses an earlier one's (`reuse_key`). Fetch limits (timeouts, sizes) only decide failures, and only
# permanent failures are reused; the shard size only the layout.
REUSE_KEY_FIELDS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
                    "min_image_size", "max_aspect_ratio", "max_image_pixels", "compute_hash", "extract_exif",
                    "user_agent_token", "disallowed_header_directives", "allowed_networks", "denied_networks")
# Failures that a rerun would meet again: not fetched again by a later version (unless refetch_failures).
PERMANENT_FAILURES = ("http_404", "http_410", "invalid_url", "not_an_image", "decode_error", "decompression_bomb",
                      "image_too_small", "image_area_too_large", "aspect_ratio_too_large")


@dataclasses.dataclass
class DownloadConfig:
    # A finished `filter` output version (directory with manifest.json + part-*.parquet).
    input: Optional[str] = None
    # Output root; the phase writes <output>/<version>/. Default: <data_root>/images.
    output: Optional[str] = None
    data_root: str = dataclasses.field(default_factory=default_data_root)

    # --- images (paper: Stage B trains at 512 px, then 1024 px) ---
    image_size: int = param(512, ge=1)
    resize_mode: str = param("center_crop", choices=RESIZE_MODES)
    resize_only_if_bigger: bool = False
    encode_format: str = param("jpg", choices=("jpg", "png", "webp"))
    encode_quality: int = param(95, ge=0, le=100)
    # Smallest accepted side of the decoded image (paper data: min side >= 512).
    min_image_size: int = param(512, ge=0)
    max_aspect_ratio: Optional[float] = param(None, ge=1)
    # Decompression-bomb limit: images declaring more pixels are rejected before decoding
    # (also set as PIL.Image.MAX_IMAGE_PIXELS and OPENCV_IO_MAX_IMAGE_PIXELS in the workers).
    max_image_pixels: int = param(89_478_485, ge=1)
    compute_hash: Optional[str] = param("sha256", choices=("md5", "sha256", "sha512"))
    extract_exif: bool = False

    # --- fetching ---
    timeout: float = param(10.0, gt=0)  # seconds per connect / read operation
    retries: int = param(0, ge=0)  # extra attempts per URL
    max_response_bytes: int = param(50 * 2**20, ge=1024)
    # Total time one URL may take (connect, headers, body, its retries and redirects); every socket read
    # runs with the time left as its timeout, so a slow-drip server costs at most this much per URL.
    max_response_seconds: float = param(120.0, gt=0)
    # A shard task's deadline: once it passes, the shard's remaining URLs are not fetched and are counted
    # as `timeout`, and the shard completes with what it has.
    max_shard_seconds: float = param(3600.0, gt=0)
    user_agent_token: Optional[str] = None
    # --- politeness (not versioned: how we ask, not what we keep) ---
    # Sent with every request (replaces img2dataset's browser string); user_agent_token is appended when
    # set and not in it already. Name the crawler and a contact (a URL or an address) for site operators.
    user_agent: str = "wurst-download/1.0 (Wuerstchen text-to-image training data; img2dataset)"
    # Connections open to one host (name:port) at once, per shard task; other threads wait for a slot.
    max_connections_per_host: int = param(4, ge=1)
    # A 429 / 503 is retried this many times, after the server's Retry-After (seconds or HTTP-date) or
    # else retry_backoff_s * 2**attempt; the host is paused for the whole shard task meanwhile.
    throttle_retries: int = param(3, ge=0)
    retry_backoff_s: float = param(1.0, gt=0)
    # The longest wait: a Retry-After asking for more is not retried (the URL fails as http_429 / http_503),
    # and no wait runs past max_response_seconds or the shard's deadline.
    max_retry_wait_s: float = param(60.0, gt=0)
    # How long a shard task reuses a DNS answer (0: look up every connection); every address is still
    # checked by the guard. A local caching resolver (unbound, dnsmasq) is the cache that honours TTLs.
    dns_cache_seconds: float = param(300.0, ge=0)
    # Honour X-Robots-Tag opt-outs (img2dataset's default list).
    disallowed_header_directives: list[str] = dataclasses.field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    # Networks exempt from the private-address guard (CIDRs), e.g. ["127.0.0.1/32"] for a local
    # test server. Everything private/loopback/link-local/reserved not listed here is refused.
    allowed_networks: list[str] = dataclasses.field(default_factory=list)
    # Extra public networks to refuse (e.g. your own cloud's public ranges).
    denied_networks: list[str] = dataclasses.field(default_factory=list)
    # The cloud metadata endpoints (169.254.169.254, fd00:ec2::254) hand out the machine's credentials:
    # they stay refused even inside allowed_networks unless this is true as well (logged as a warning).
    allow_metadata_address: bool = False

    # --- sharding and distribution ---
    shard_size: int = param(10_000, ge=1)  # input rows per shard (= per Ray task, per tar)
    threads_per_task: int = param(64, ge=1)  # concurrent downloads in one shard task
    cpus_per_task: float = param(1.0, gt=0)  # Ray CPUs reserved per shard task
    max_shard_retries: int = param(2, ge=0)  # re-runs of a failed shard task
    # A shard still failing after its retries has its rows counted as `shard_failed` and the version
    # completes, unless more than this fraction of the shards failed (then the phase fails); a rerun retries
    # the failed shards. 0: any failed shard fails the phase.
    max_failed_shard_fraction: float = param(0.01, ge=0, le=1)
    # How a rerun checks a shard that is already written: quick (sizes, the tar's first / last 64 KiB and
    # the parquet's keys against the record written with it) or full (also every tar header).
    resume_check: str = param("quick", choices=("quick", "full"))
    # Shard tasks submitted at once (None: 4 per schedulable task slot of the cluster).
    max_tasks_in_flight: Optional[int] = param(None, ge=1)
    # --- re-filtering (not versioned: which bytes are fetched now, not what the version holds) ---
    # Reuse what earlier complete downloads under the same output root with the same reuse key hold (samples
    # and permanent failures): only the other rows are fetched, and the new version refers to the earlier
    # samples (NNNNN_selection.parquet) instead of copying them.
    reuse: bool = True
    # Fetch the earlier versions' permanent failures again (e.g. after a site came back).
    refetch_failures: bool = False
    # The failure reasons that count as permanent (reused as failures, not fetched again).
    permanent_failures: list[str] = dataclasses.field(default_factory=lambda: list(PERMANENT_FAILURES))
    # Input columns copied into each sample's .json / the shard parquet (None: all but URL, TEXT).
    metadata_columns: Optional[list[str]] = None
    scratch_dir: Optional[str] = None  # local temp space on workers (None: system temp dir)
    progress_interval_s: float = param(30.0, gt=0)

    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
        agent = self.user_agent
        if not agent.strip() or any(not (32 <= ord(c) < 127) for c in agent):
            raise ConfigError(f"user_agent: must be non-empty printable ASCII (an HTTP header value), got {agent!r}")
        if self.user_agent_token is not None and any(not (32 <= ord(c) < 127) for c in self.user_agent_token):
            raise ConfigError(f"user_agent_token: must be printable ASCII, got {self.user_agent_token!r}")
        for what in ("allowed_networks", "denied_networks"):
            try:
                netguard.parse_networks(getattr(self, what), what)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ConfigError(f"encode_quality: for png it is the compression level 0-9, got {self.encode_quality}")
        if self.metadata_columns is not None:
            reserved = sorted(set(self.metadata_columns) & IMG2DATASET_RESERVED)
            if reserved:
                raise ConfigError(f"metadata_columns: {reserved} are names img2dataset writes itself; "
                                  f"rename those input columns")
            for name in ("URL", "TEXT"):
                if name in self.metadata_columns:
                    raise ConfigError(f"metadata_columns: {name!r} is already stored (as url / caption)")


def _require_input(cfg: DownloadConfig) -> str:
    if not cfg.input:
        raise ConfigError("input: required (a `filter` output version, e.g. data/filtered/<version>)")
    return storage.normalize(cfg.input)


# --------------------------------------------------------------------------------------------
# Input: validation and deterministic shards


@dataclasses.dataclass(frozen=True)
class InputFile:
    uri: str
    num_rows: int


def _is_string(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def _require_dir(input_uri: str) -> None:
    if not storage.is_dir(input_uri):
        raise FileNotFoundError(f"input {input_uri}: not a directory (expected a `filter` output version)")


def scan_input(input_uri: str) -> tuple[list[InputFile], pa.Schema]:
    """The input's part files with row counts, and their (common) schema; clear errors otherwise."""
    _require_dir(input_uri)
    manifest_lib.read(input_uri)  # a finished dataset only: raises naming the missing manifest
    files = [f for f in storage.list_files(input_uri, suffix=".parquet") if storage.basename(f).startswith("part-")]
    if not files:
        raise FileNotFoundError(f"input {input_uri}: no part-*.parquet files")
    out: list[InputFile] = []
    schema: Optional[pa.Schema] = None
    for uri in files:
        with storage.open_input(uri) as f:
            meta = pq.ParquetFile(f)
            file_schema, num_rows = meta.schema_arrow, meta.metadata.num_rows
        for column in REQUIRED_COLUMNS:
            index = file_schema.get_field_index(column)
            if index < 0:
                raise DownloadInputError(f"{uri}: required column {column!r} is missing (columns: {file_schema.names})")
            if not _is_string(file_schema.field(index).type):
                raise DownloadInputError(f"{uri}: column {column!r} has type {file_schema.field(index).type}, expected string")
        if schema is None:
            schema = file_schema
        elif file_schema.remove_metadata() != schema.remove_metadata():
            raise DownloadInputError(f"{uri}: schema differs from {files[0]}: {file_schema} vs {schema}")
        out.append(InputFile(uri, num_rows))
    return out, schema


def selected_metadata_columns(schema: pa.Schema, wanted: Optional[list[str]]) -> list[str]:
    """Input columns stored with each sample: uid first, then metadata (never URL / TEXT)."""
    if wanted is None:
        skipped = [n for n in schema.names if n in IMG2DATASET_RESERVED]
        if skipped:
            log.warning("input columns %s are not kept: img2dataset reserves these names", skipped)
        columns = [n for n in schema.names if n not in ("URL", "TEXT") and n not in IMG2DATASET_RESERVED]
    else:
        missing = [n for n in wanted if n not in schema.names]
        if missing:
            raise ConfigError(f"metadata_columns: {missing} not in the input (columns: {schema.names})")
        columns = list(wanted)
    return ["uid"] + [c for c in columns if c != "uid"]


def plan_shards(files: list[InputFile], shard_size: int) -> list[ShardPlan]:
    """Consecutive runs of `shard_size` rows over the files in name order (the last may be short);
    the same input and shard size always give the same shards."""
    total = sum(f.num_rows for f in files)
    num_shards = math.ceil(total / shard_size)
    digits = shard_name_digits(num_shards)
    plans: list[ShardPlan] = []
    file_index, offset = 0, 0  # position in the input: file, row within it
    for shard_id in range(num_shards):
        need = min(shard_size, total - shard_id * shard_size)
        slices = []
        while need:
            f = files[file_index]
            take = min(need, f.num_rows - offset)
            if take:
                slices.append((f.uri, offset, offset + take))
            need -= take
            offset += take
            if offset == f.num_rows:
                file_index, offset = file_index + 1, 0
        plans.append(ShardPlan(shard_id, f"{shard_id:0{digits}d}", sum(e - s for _, s, e in slices), tuple(slices)))
    return plans


# --------------------------------------------------------------------------------------------
# Reuse: earlier downloads of the same source (the pool), and what each new shard takes from it


def reuse_key(settings: dict, columns: list[str]) -> str:
    """What makes two download versions' samples interchangeable: REUSE_KEY_FIELDS (defaults for keys an
    older config lacks) and the metadata columns stored in each sample's .json."""
    defaults = config_lib.to_dict(DownloadConfig())
    tree = {k: settings.get(k, defaults.get(k)) for k in REUSE_KEY_FIELDS}
    blob = json.dumps({"settings": tree, "columns": list(columns)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def manifest_reuse_key(manifest: dict) -> Optional[str]:
    """The reuse key a download manifest records, or the one its config and sample fields give (versions
    written before reuse existed); None when it is not a download's manifest."""
    if manifest.get("phase") != PHASE_NAME:
        return None
    if manifest.get("reuse_key"):
        return manifest["reuse_key"]
    fields = manifest.get("json_fields") or []
    if "caption" not in fields or not isinstance(manifest.get("config"), dict):
        return None
    return reuse_key(manifest["config"], fields[:fields.index("caption")])


def find_pool(root: str, version: str, key: str) -> list[str]:
    """The complete download versions under `root` (but `version`) whose samples this key may reuse, oldest
    first (then by name): a version with failed shards counts with its completed shards."""
    return manifest_lib.earlier_versions(root, version, lambda manifest: manifest_reuse_key(manifest) == key)


POOL_SCHEMA = pa.schema([("uid", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                         ("tar", pa.string()), ("key", pa.string()), ("members", pa.string())])


def pool_index(pool: list[str], permanent: set[str]) -> pa.Table:
    """One row per uid the pool holds a sample of, or (else) a failure in `permanent` of: uid, status,
    reason, tar (relative to the images root), key (its member key in that tar), members (offsets, when a
    selection recorded them). A success wins over a failure; among equals the oldest version's."""
    tables = []
    for directory in pool:
        version = storage.basename(directory)
        for name in manifest_lib.read(directory).get("shard_names") or []:
            files = shard_files(directory, name)
            if not storage.exists(files["stats"]):
                continue  # a failed shard of that version
            if storage.exists(files["selection"]):
                with storage.open_input(files["selection"]) as f:
                    t = pq.read_table(f, columns=["uid", "status", "reason", "tar", "key", "members"])
                keep = pc.or_(pc.equal(t.column("status"), "success"),
                              pc.is_in(t.column("reason"), value_set=pa.array(sorted(permanent), pa.string())))
                tables.append(t.filter(keep).cast(POOL_SCHEMA))
                continue
            if not storage.exists(files["parquet"]):
                continue
            with storage.open_input(files["parquet"]) as f:
                t = pq.read_table(f, columns=["uid", "key", "status", "error_message"])
            reasons = [None if st == "success" else failure_reason(st, msg) for st, msg in
                       zip(t.column("status").to_pylist(), t.column("error_message").to_pylist())]
            ok = pc.equal(t.column("status"), "success")
            table = pa.table({"uid": t.column("uid"), "status": pc.if_else(ok, "success", "failed"),
                              "reason": pa.array(reasons, pa.string()),
                              "tar": pc.if_else(ok, f"{version}/{name}.tar", pa.scalar(None, pa.string())),
                              "key": t.column("key"), "members": pa.nulls(t.num_rows, pa.string())},
                             schema=POOL_SCHEMA)
            keep = pc.or_(ok, pc.is_in(table.column("reason"), value_set=pa.array(sorted(permanent), pa.string())))
            tables.append(table.filter(keep))
    if not tables:
        return POOL_SCHEMA.empty_table()
    table = pa.concat_tables(tables).combine_chunks()
    table = table.append_column("rank", pc.if_else(pc.equal(table.column("status"), "success"), 0, 1)) \
        .append_column("order", pa.array(range(table.num_rows), pa.int64()))
    return dedup.first_per_key(table, "uid", [("rank", "ascending"), ("order", "ascending")]).select(POOL_SCHEMA.names)


def split_reuse(plans: list[ShardPlan], index: pa.Table) -> dict[str, pa.Table]:
    """Per shard, the pool rows of its uids (one join over the input's uid column)."""
    pieces = [pa.table({"uid": pa.concat_tables([read_slice(u, a, b, ["uid"]) for u, a, b in plan.slices])
                        .column("uid").combine_chunks(), "shard": pa.nulls(plan.num_rows, pa.int32()).fill_null(i)})
              for i, plan in enumerate(plans)]
    joined = pa.concat_tables(pieces).join(index, "uid", join_type="inner").sort_by([("shard", "ascending")])
    out = {plan.name: POOL_SCHEMA.empty_table() for plan in plans}
    shard = joined.column("shard").to_numpy()
    for i, plan in enumerate(plans):
        lo, hi = int(np.searchsorted(shard, i, "left")), int(np.searchsorted(shard, i, "right"))
        if hi > lo:
            out[plan.name] = joined.slice(lo, hi - lo).select(POOL_SCHEMA.names)
    return out


# --------------------------------------------------------------------------------------------
# Driver


class ShardsFailedError(InputError):
    """Some shards still failed after their retries; the report names them, no manifest is written."""


def run_shards(ray, plans: list[ShardPlan], settings: ShardSettings, cfg: DownloadConfig, on_done=None,
               reuse: Optional[dict[str, pa.Table]] = None) -> tuple[dict[str, dict], dict[str, str]]:
    """One Ray task per shard, at most `max_tasks_in_flight` at once, each retried up to
    `max_shard_retries` times; `reuse`: per shard what the pool holds of it (None: nothing to reuse, plain
    shards). Returns (summaries by shard name, errors of shards that failed)."""
    remote = ray.remote(run_shard)
    refs = {name: ray.put(table) for name, table in reuse.items()} if reuse is not None else {}
    # Retries are ours (max_retries=0 for Ray) so that every attempt and failure is accounted.
    task_options = {"num_cpus": cfg.cpus_per_task, "max_retries": 0}
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_task))
    window = cfg.max_tasks_in_flight or 4 * slots
    queue = [(plan, 0) for plan in reversed(plans)]
    pending: dict[Any, tuple[ShardPlan, int]] = {}
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    while queue or pending:
        while queue and len(pending) < window:
            plan, attempt = queue.pop()
            ref = remote.options(name=f"download-shard-{plan.name}", **task_options).remote(
                plan, settings, attempt, refs.get(plan.name))
            pending[ref] = (plan, attempt)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=cfg.progress_interval_s)
        if not ready:
            log.info("progress: %d/%d shards done, %d running or queued on the cluster",
                     len(done), len(plans), len(pending))
            continue
        for ref in ready:
            plan, attempt = pending.pop(ref)
            try:
                summary = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - task errors, worker crashes, node loss
                message = str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else type(exc).__name__
                cause = getattr(exc, "cause", None)  # a RayTaskError's original exception
                if isinstance(exc, DownloadInputError) or isinstance(cause, DownloadInputError):
                    # Bad input is not a failure to count or retry: the phase stops, naming it.
                    text = str(cause) if isinstance(cause, DownloadInputError) else message
                    raise DownloadInputError(text if text.startswith(f"shard {plan.name}")
                                             else f"shard {plan.name}: {text}") from None
                if attempt < cfg.max_shard_retries:
                    log.warning("shard %s attempt %d failed (%s); retrying", plan.name, attempt + 1, message)
                    queue.append((plan, attempt + 1))
                else:
                    log.error("shard %s failed after %d attempts: %s", plan.name, attempt + 1, message)
                    failed[plan.name] = message
                continue
            done[plan.name] = summary
            if on_done is not None:
                on_done(summary, len(done), len(plans))
    return done, failed


def build_report(plans: list[ShardPlan], done: dict[str, dict], failed: dict[str, str], *, version: str,
                 input_uri: str, output_uri: str, duration_s: float) -> dict:
    """Counts over all shards; input rows = succeeded + sum(failures) is enforced here."""
    failures: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    repaired: dict[str, int] = {}
    politeness: dict[str, int] = {}
    succeeded = 0
    fetched_now = 0
    reuse = {"reused_samples": 0, "reused_failures": {}, "fetched_rows": 0, "fetched_samples": 0,
             "fetched_failures": {}}
    for summary in done.values():
        succeeded += summary["succeeded"]
        plain = "fetched_rows" not in summary  # a shard without a selection: every row was fetched
        reuse["reused_samples"] += summary.get("reused_samples", 0)
        reuse["fetched_rows"] += summary["input_rows"] if plain else summary["fetched_rows"]
        reuse["fetched_samples"] += summary["succeeded"] if plain else summary["fetched_samples"]
        for key in ("reused_failures", "fetched_failures"):
            for reason, n in (summary["failures"] if plain and key == "fetched_failures"
                              else summary.get(key, {})).items():
                reuse[key][reason] = reuse[key].get(reason, 0) + n
        for what, n in summary.get("politeness", {}).items():
            politeness[what] = max(politeness.get(what, 0), n) if what.startswith("peak_") else \
                politeness.get(what, 0) + n
        for reason, n in summary["failures"].items():
            failures[reason] = failures.get(reason, 0) + n
        for what, n in summary.get("repaired", {}).items():  # still samples; counted, not failures
            repaired[what] = repaired.get(what, 0) + n
        for reason, messages in summary.get("failure_examples", {}).items():
            kept = examples.setdefault(reason, [])
            kept.extend(messages[:max(0, 3 - len(kept))])
        if not summary.get("resumed"):
            fetched_now += summary["input_rows"] if plain else summary["fetched_rows"]
    rows_by_name = {p.name: p.num_rows for p in plans}
    lost = sum(rows_by_name[name] for name in failed)
    if lost:
        failures[SHARD_FAILED] = lost
        examples[SHARD_FAILED] = [f"shard {name}: {config_lib.redact_text(message)[:300]}"
                                  for name, message in sorted(failed.items())[:3]]
    input_rows = sum(rows_by_name.values())
    if input_rows != succeeded + sum(failures.values()):
        raise RuntimeError(f"accounting error: {input_rows} input rows != {succeeded} succeeded + "
                           f"{sum(failures.values())} failed {failures}")
    by_origin = reuse["fetched_samples"] + reuse["reused_samples"] + sum(reuse["fetched_failures"].values()) + \
        sum(reuse["reused_failures"].values()) + lost
    if input_rows != by_origin:
        raise RuntimeError(f"accounting error: {input_rows} input rows != {by_origin} by origin {reuse}")
    return {
        "phase": PHASE_NAME, "version": version, "input": input_uri, "output": output_uri,
        "input_rows": input_rows, "succeeded": succeeded, "failed": input_rows - succeeded,
        "success_rate": round(succeeded / input_rows, 6) if input_rows else 0.0,
        "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failure_examples": {k: examples[k] for k in sorted(examples)},
        "repaired": dict(sorted(repaired.items())),
        "politeness": dict(sorted(politeness.items())),
        # Rows fetched by this version vs. taken from earlier downloads of the same source (the pool); failed
        # shards' rows are in neither. reused = reused_samples + sum(reused_failures).
        "reuse": {**reuse, "reused": reuse["reused_samples"] + sum(reuse["reused_failures"].values()),
                  "reused_failures": dict(sorted(reuse["reused_failures"].items())),
                  "fetched_failures": dict(sorted(reuse["fetched_failures"].items()))},
        "shards": {"total": len(plans), "completed": len(done),
                   "resumed": sum(1 for s in done.values() if s.get("resumed")), "failed": len(failed),
                   "failed_shards": {name: config_lib.redact_text(message) for name, message in sorted(failed.items())}},
        "duration_s": round(duration_s, 3),
        "rows_per_second": round(fetched_now / duration_s, 3) if duration_s > 0 else None,
    }


def _metrics(report: dict) -> dict[str, float]:
    metrics = {k: float(report[k]) for k in ("input_rows", "succeeded", "failed", "success_rate", "duration_s")}
    metrics.update({f"shards_{k}": float(v) for k, v in report["shards"].items() if k != "failed_shards"})
    metrics.update({f"failures.{reason}": float(n) for reason, n in report["failures"].items()})
    metrics.update({f"repaired.{what}": float(n) for what, n in report.get("repaired", {}).items()})
    metrics.update({f"politeness.{what}": float(n) for what, n in report.get("politeness", {}).items()})
    reuse = report.get("reuse", {})
    metrics.update({f"reuse.{k}": float(v) for k, v in reuse.items() if not isinstance(v, dict)})
    metrics.update({f"reuse.reused_failures.{r}": float(n) for r, n in reuse.get("reused_failures", {}).items()})
    if report.get("rows_per_second") is not None:
        metrics["rows_per_second"] = float(report["rows_per_second"])
    return metrics


def manifest_extra(cfg: DownloadConfig, columns: list[str], plans: list[ShardPlan], report: dict,
                   pool: Optional[list[str]] = None) -> dict:
    """What the manifest records besides the counts: the image settings and the sample layout."""
    reuse = report.get("reuse") or {}
    extra = {"failures": report["failures"], "image_size": cfg.image_size,
            "resize_mode": cfg.resize_mode, "encode_format": cfg.encode_format,
            "sample_fields": [cfg.encode_format, "txt", "json"],
            "json_fields": [*columns, "caption", "url", "key", "status", "error_message",
                            "width", "height", "original_width", "original_height"]
            + (["exif"] if cfg.extract_exif else [])
            + ([cfg.compute_hash] if cfg.compute_hash else []),
            "shard_names": [p.name for p in plans],
            # Every input row: downloaded, or failed with its reason (a failed shard's rows as shard_failed).
            "funnel": {"input_rows": report["input_rows"], "downloaded": report["succeeded"],
                       "failed": report["failures"]},
            # The same rows by origin: input_rows = downloaded_new + reused_samples + sum(fetched_failures) +
            # sum(reused_failures) + shard_failed; downloaded = downloaded_new + reused_samples.
            "funnel_by_origin": {"input_rows": report["input_rows"],
                                 "downloaded_new": reuse.get("fetched_samples", report["succeeded"]),
                                 "reused_samples": reuse.get("reused_samples", 0),
                                 "fetched_failures": reuse.get("fetched_failures", {}),
                                 "reused_failures": reuse.get("reused_failures", {}),
                                 SHARD_FAILED: report["failures"].get(SHARD_FAILED, 0)},
            "failed_shards": report["shards"]["failed_shards"],
            "reuse_key": reuse_key(config_lib.to_dict(cfg), columns)}
    if pool:
        # The shards are selections (NNNNN_selection.parquet) over these versions' tars and this one's.
        extra.update(layout="selection", reuse_pool=[storage.basename(d) for d in pool],
                     selection_suffix=SELECTION_SUFFIX)
    return extra


def check_failed_shards(failed: dict[str, str], total: int, max_fraction: float, report_uri: str,
                        retries: int) -> None:
    """Raise ShardsFailedError when more than `max_fraction` of `total` shards failed, naming them and the key."""
    if not failed or len(failed) <= max_fraction * total:
        return
    names = sorted(failed)
    shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
    raise ShardsFailedError(
        f"{len(failed)} of {total} shard(s) failed after {retries} retries ({shown}): "
        f"{len(failed) / total:.1%} is more than max_failed_shard_fraction={max_fraction:g}; see {report_uri}; "
        f"rerun to retry them")


class DownloadPhase(Phase):
    name = PHASE_NAME
    config_class = DownloadConfig
    output_subdir = "images"
    description = __doc__.splitlines()[0]
    version_exclude = VERSION_EXCLUDE

    def input_uri(self, cfg: DownloadConfig) -> str:
        return _require_input(cfg)

    def version_config(self, cfg: DownloadConfig) -> dict:
        tree = config_lib.to_dict(cfg)
        for key, default in LATE_KEYS.items():
            if tree.get(key) == default:
                del tree[key]
        return tree

    def input_identity(self, cfg: DownloadConfig) -> str:
        uri = self.input_uri(cfg)
        _require_dir(uri)
        return manifest_lib.input_identity(uri)

    def existing_details(self, output: str, manifest: dict) -> dict:
        return storage.read_json(storage.join(output, REPORT))

    def is_complete(self, cfg: DownloadConfig, output: str) -> bool:
        """A manifest, and no shard left failed: a version that completed with failed shards (within
        max_failed_shard_fraction) is usable, but a rerun retries those shards (and rewrites the manifest)."""
        if not manifest_lib.has_manifest(output):
            return False
        failed = manifest_lib.read(output).get("failed_shards")
        return not failed

    def summary(self, result: PhaseResult) -> dict:
        report = result.details
        return {**super().summary(result), "failures": report.get("failures"), "shards": report.get("shards")}

    def prepare(self, ctx: Context) -> None:
        cfg, out = ctx.cfg, ctx.output
        files, schema = scan_input(ctx.input_uri)
        columns = selected_metadata_columns(schema, cfg.metadata_columns)
        plans = plan_shards(files, cfg.shard_size)
        storage.makedirs(out)
        settings = ShardSettings.from_config(cfg, out, columns, shard_name_digits(len(plans)))
        for warning in settings.guard.metadata_warnings():
            log.warning("SECURITY: %s", warning)
        pool, reuse = [], None
        if cfg.reuse:
            key = reuse_key(config_lib.to_dict(cfg), columns)
            pool = find_pool(self.output_root(cfg), storage.basename(out), key)
        if pool:
            permanent = set() if cfg.refetch_failures else set(cfg.permanent_failures)
            index = pool_index(pool, permanent)
            reuse = split_reuse(plans, index)
            log.info("download: reusing %d earlier version(s) of the same source (%s): %d of %d rows held", len(pool),
                     ", ".join(storage.basename(d) for d in pool), sum(t.num_rows for t in reuse.values()),
                     sum(p.num_rows for p in plans))
        ctx.state.update(columns=columns, plans=plans, settings=settings, pool=pool, reuse=reuse)
        log.info("download %s -> %s: %d rows in %d shards of %d", ctx.input_uri, out, sum(p.num_rows for p in plans),
                 len(plans), cfg.shard_size)

    def execute(self, ctx: Context) -> Outcome:
        cfg, out, plans = ctx.cfg, ctx.output, ctx.state["plans"]
        report_uri = storage.join(out, REPORT)
        totals = {"rows": 0, "ok": 0}

        def on_done(summary: dict, n_done: int, n_total: int) -> None:
            totals["rows"] += summary["input_rows"]
            totals["ok"] += summary["succeeded"]
            log.info("shard %s %s (%d/%d): %d/%d images ok%s; total %d/%d ok", summary["shard"],
                     "already complete" if summary.get("resumed") else "done", n_done, n_total,
                     summary["succeeded"], summary["input_rows"],
                     "" if summary.get("resumed") else f" in {summary['duration_s']:.1f} s",
                     totals["ok"], totals["rows"])
            ctx.log_metrics({"progress.shards_done": n_done, "progress.rows_done": totals["rows"],
                             "progress.succeeded": totals["ok"]}, step=n_done)

        started = time.time()
        done, failed = run_shards(ctx.ray, plans, ctx.state["settings"], cfg, on_done, ctx.state["reuse"])
        report = build_report(plans, done, failed, version=ctx.version, input_uri=ctx.input_uri, output_uri=out,
                              duration_s=time.time() - started)
        storage.write_json(report_uri, report)
        ctx.log_metrics(_metrics(report))
        ctx.log_dict(report, REPORT)
        log.info("report: %d/%d rows downloaded; failures %s", report["succeeded"], report["input_rows"],
                 report["failures"])
        check_failed_shards(failed, len(plans), cfg.max_failed_shard_fraction, report_uri, cfg.max_shard_retries)
        if failed:
            for name in failed:  # what a failed attempt may have published: its rows are counted, not read
                for uri in shard_files(out, name).values():
                    storage.delete(uri)
            log.warning("%d of %d shard(s) failed after %d retries (%s): their %d rows are counted as %s; the "
                        "version completes (max_failed_shard_fraction=%g); rerun to retry them", len(failed),
                        len(plans), cfg.max_shard_retries, ", ".join(sorted(failed)),
                        report["failures"].get(SHARD_FAILED, 0), SHARD_FAILED, cfg.max_failed_shard_fraction)
        ctx.log_files(picture_report(out, ctx.version, report), reports.REPORT_DIR)
        counts = {"input_rows": report["input_rows"], "samples": report["succeeded"], "failed": report["failed"],
                  "shards": len(plans), "fetched_rows": report["reuse"]["fetched_rows"],
                  "reused": report["reuse"]["reused"], "reused_samples": report["reuse"]["reused_samples"]}
        return Outcome(counts=counts, extra=manifest_extra(cfg, ctx.state["columns"], plans, report, ctx.state["pool"]),
                       details=report)


REPORT_SHARDS = 8  # shards whose rows the picture report samples (failed URLs, thumbnails)
REPORT_ROWS = 5  # failed URLs shown per reason


def picture_report(out: str, version: str, report: dict) -> dict:
    """`report/`: downloaded vs failed by reason (chart), failed URLs per reason (redacted), a thumbnail grid of
    downloaded samples with their captions; from the first REPORT_SHARDS shards' side files."""
    failed_rows: dict[str, list[dict]] = {}
    thumbnails: list[tuple[bytes, str]] = []
    try:
        sources = image_shards.list_shards(out)[:REPORT_SHARDS]
    except image_shards.ImageShardError:
        sources = []
    for source in sources:
        name = image_shards.source_name(source)
        files = shard_files(out, name)
        if image_shards.is_selection(source):
            with storage.open_input(source) as handle:
                rows = pq.read_table(handle, columns=["uid", "status", "reason"]).filter(
                    pc.not_equal(pc.field("status"), "success")).to_pylist()
            urls = {}
            if storage.exists(files["parquet"]):  # the URLs of the rows this version fetched
                with storage.open_input(files["parquet"]) as handle:
                    urls = dict(zip(*pq.read_table(handle, columns=["uid", "url"]).to_pydict().values()))
            entries = [(r["reason"], urls.get(r["uid"], f"(reused failure, uid {r['uid']})"), None) for r in rows]
        elif storage.exists(files["parquet"]):
            with storage.open_input(files["parquet"]) as handle:
                table = pq.read_table(handle, columns=["url", "status", "error_message"])
            rows = table.filter(pc.not_equal(table.column("status"), "success")).to_pylist()
            entries = [(failure_reason(r["status"], r["error_message"]), r["url"], r["error_message"]) for r in rows]
        else:
            entries = []
        for reason, url, message in entries:
            kept = failed_rows.setdefault(reason, [])
            if len(kept) < REPORT_ROWS:
                row = {"url": config_lib.redact_text(str(url))[:200]}
                if message:
                    row["error"] = config_lib.redact_text(str(message))[:200]
                kept.append(row)
        for _, parts in image_shards.iter_shard_samples(source):
            if len(thumbnails) >= 24:
                break
            ext = next((e for e in image_shards.IMAGE_EXTENSIONS if e in parts), None)
            if ext:
                thumbnails.append((parts[ext], parts.get("txt", b"").decode("utf-8", "replace")[:40]))
    return reports.counts_report(out, PHASE_NAME, version, report["failures"], kept=report["succeeded"],
                                 samples={k: failed_rows[k] for k in sorted(failed_rows)}, thumbnails=thumbnails)


PHASE = DownloadPhase()
# The module-level entry points callers use: run(cfg) -> main(argv), output_dir(cfg).
run, main, output_dir = PHASE.run, PHASE.main, PHASE.output_dir


if __name__ == "__main__":
    module_cli(__spec__.name)
