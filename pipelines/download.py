"""`python -m pipelines.download`: filtered metadata -> webdataset image shards, with img2dataset.

Reads one `filter` output version (part-*.parquet: uid, URL, TEXT, metadata columns), splits its
rows into deterministic shards of `shard_size` consecutive rows and runs one Ray task per shard.
Each task fetches its shard with img2dataset's own downloader, resizer and webdataset writer
(real HTTP through urllib), into a scratch directory, then checks the result (one parquet
row per input row, a readable tar with one image per success) and moves it into
`<output>/<version>/` as NNNNN.tar + NNNNN.parquet + NNNNN_stats.json, the stats file last: its
presence (verified against the tar) marks the shard complete, so a rerun skips complete shards and
redoes partial ones. Failed tasks are retried `max_shard_retries` times.

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
`manifest.json` is written last, only when every shard completed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from typing import Any, Optional

# albumentations (imported by img2dataset) checks PyPI for updates at import time unless told not
# to: that is a network call from every download worker, and a 10-60 s stall without internet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import config as config_lib
from pipelines import manifest as manifest_lib
from pipelines import netguard, storage, tracking
from pipelines.config import ConfigError, param
from pipelines.runtime import RayConfig, default_data_root, init_ray

PHASE = "download"
log = logging.getLogger("wurst.download")

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
REQUIRED_COLUMNS = ("uid", "URL", "TEXT")
# Column names img2dataset writes itself; an input column with one of these names cannot be kept.
IMG2DATASET_RESERVED = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                                  "status", "error_message", "exif", "md5", "sha256", "sha512"})
# Settings that do not change what is downloaded (parallelism, bookkeeping, where things go).
VERSION_EXCLUDE = ("input", "output", "data_root", "ray", "mlflow", "threads_per_task", "cpus_per_task",
                   "max_shard_retries", "max_tasks_in_flight", "scratch_dir", "progress_interval_s")
STATS_SECTION = "wurst"
SHARD_FAILED = "shard_failed"
MISSING_ROWS = "missing_from_downloader_output"


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
    max_response_seconds: float = param(120.0, gt=0)  # total time to read one response body
    user_agent_token: Optional[str] = None
    # Honour X-Robots-Tag opt-outs (img2dataset's default list).
    disallowed_header_directives: list[str] = dataclasses.field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    # Networks exempt from the private-address guard (CIDRs), e.g. ["127.0.0.1/32"] for a local
    # test server. Everything private/loopback/link-local/reserved not listed here is refused.
    allowed_networks: list[str] = dataclasses.field(default_factory=list)
    # Extra public networks to refuse (e.g. your own cloud's public ranges).
    denied_networks: list[str] = dataclasses.field(default_factory=list)

    # --- sharding and distribution ---
    shard_size: int = param(10_000, ge=1)  # input rows per shard (= per Ray task, per tar)
    threads_per_task: int = param(64, ge=1)  # concurrent downloads in one shard task
    cpus_per_task: float = param(1.0, gt=0)  # Ray CPUs reserved per shard task
    max_shard_retries: int = param(2, ge=0)  # re-runs of a failed shard task
    # Shard tasks submitted at once (None: 4 per schedulable task slot of the cluster).
    max_tasks_in_flight: Optional[int] = param(None, ge=1)
    # Input columns copied into each sample's .json / the shard parquet (None: all but URL, TEXT).
    metadata_columns: Optional[list[str]] = None
    scratch_dir: Optional[str] = None  # local temp space on workers (None: system temp dir)
    progress_interval_s: float = param(30.0, gt=0)

    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
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


# --------------------------------------------------------------------------------------------
# Where the output goes


def output_root(cfg: DownloadConfig) -> str:
    return cfg.output or storage.join(cfg.data_root, "images")


def _require_input(cfg: DownloadConfig) -> str:
    if not cfg.input:
        raise ConfigError("input: required (a `filter` output version, e.g. data/filtered/<version>)")
    return storage.normalize(cfg.input)


def output_dir(cfg: DownloadConfig) -> str:
    """`<output root>/<version>`; the version hashes the output-affecting config and the input."""
    input_uri = _require_input(cfg)
    version = manifest_lib.version_id(PHASE, cfg, manifest_lib.input_identity(input_uri), exclude=VERSION_EXCLUDE)
    return storage.join(output_root(cfg), version)


# --------------------------------------------------------------------------------------------
# Input: validation and deterministic shards


@dataclasses.dataclass(frozen=True)
class InputFile:
    uri: str
    num_rows: int


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    shard_id: int
    name: str  # zero-padded shard id, e.g. "00007"
    num_rows: int
    slices: tuple[tuple[str, int, int], ...]  # (file uri, first row, end row) in input order


def _is_string(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def scan_input(input_uri: str) -> tuple[list[InputFile], pa.Schema]:
    """The input's part files with row counts, and their (common) schema; clear errors otherwise."""
    if not storage.is_dir(input_uri):
        raise FileNotFoundError(f"input {input_uri}: not a directory (expected a `filter` output version)")
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
                raise ValueError(f"{uri}: required column {column!r} is missing (columns: {file_schema.names})")
            if not _is_string(file_schema.field(index).type):
                raise ValueError(f"{uri}: column {column!r} has type {file_schema.field(index).type}, expected string")
        if schema is None:
            schema = file_schema
        elif file_schema.remove_metadata() != schema.remove_metadata():
            raise ValueError(f"{uri}: schema differs from {files[0]}: {file_schema} vs {schema}")
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


def shard_name_digits(num_shards: int) -> int:
    return max(5, len(str(max(num_shards - 1, 0))))


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


def read_slice(uri: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of one parquet file, reading only the row groups that hold them."""
    with storage.open_input(uri) as f:
        pf = pq.ParquetFile(f)
        groups, first_row, row = [], None, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if row + n > start and row < stop:
                groups.append(i)
                first_row = row if first_row is None else first_row
            row += n
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first_row, stop - start)


# --------------------------------------------------------------------------------------------
# Per-sample safety and failure reasons


def _jpeg_complete(data: bytes) -> bool:
    # Entropy-coded data never contains FF D9 / FF DA (0xFF is byte-stuffed), so a complete JPEG has
    # an end-of-image marker after its last start-of-scan; a thumbnail's EOI comes before it.
    last_sos = data.rfind(b"\xff\xda")
    return last_sos != -1 and data.rfind(b"\xff\xd9") > last_sos


def _png_complete(data: bytes) -> bool:
    return data.rfind(b"IEND") > data.rfind(b"IDAT") > 0


def _webp_complete(data: bytes) -> bool:
    return len(data) >= 8 + int.from_bytes(data[4:8], "little")


def inspect_image(data: bytes, max_pixels: int) -> Optional[str]:
    """Why downloaded bytes must not be decoded (`decompression_bomb: ...`, `truncated_image: ...`,
    `not_an_image: ...`, `decode_error: ...`), or None. Reads only the header for JPEG/PNG/WebP."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                return f"decompression_bomb: {width}x{height} pixels exceeds max_image_pixels={max_pixels}"
            fmt = im.format
            complete = {"JPEG": _jpeg_complete, "MPO": _jpeg_complete, "PNG": _png_complete,
                        "WEBP": _webp_complete}.get(fmt)
            if complete is not None:
                if not complete(data):
                    return f"truncated_image: {fmt} data ends before the end of the image ({len(data)} bytes)"
            else:
                im.load()  # rarer formats: a full decode is the only reliable completeness check
    except Image.DecompressionBombError as exc:
        return f"decompression_bomb: {exc}"
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        kind = "HTML" if head.startswith((b"<!doctype html", b"<html")) else f"{len(data)} bytes"
        return f"not_an_image: content is not a recognised image format ({kind})"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-sample failure
        text = str(exc)
        if "truncated" in text.lower():
            return f"truncated_image: {text}"
        return f"decode_error: {type(exc).__name__}: {text}"
    return None


class SafeResizer:
    """img2dataset's Resizer behind a pre-decode inspection (same call signature and results)."""

    def __init__(self, resizer, max_pixels: int):
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        reason = inspect_image(img_stream.getvalue(), self.max_pixels)
        if reason is not None:
            return None, None, None, None, None, reason
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


_MESSAGE_REASONS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p, re.I), r) for p, r in (
    (re.escape(netguard.BLOCKED_REASON), "blocked_address"),
    (re.escape(netguard.TOO_LARGE_REASON), "response_too_large"),
    (r"decompression_bomb", "decompression_bomb"),
    (r"truncated_image|image file is truncated", "truncated_image"),
    (r"not_an_image", "not_an_image"),
    (r"decode_error|image decoding error", "decode_error"),
    (r"timed out|timeout", "timeout"),
    (r"image too small", "image_too_small"),
    (r"image area too large", "image_area_too_large"),
    (r"aspect ratio too large", "aspect_ratio_too_large"),
    (r"X-Robots-Tag", "disallowed_by_robots_tag"),
    (r"hash mismatch", "hash_mismatch"),
    (r"unknown url type|no host given|invalid url|control characters|nonnumeric port|redirection to url",
     "invalid_url"),
    (r"name or service not known|name resolution|no address associated|nodename nor servname|errno -[235]\]",
     "dns_error"),
    (r"ssl|certificate", "tls_error"),
    (r"refused|reset|remote end closed|incompleteread|aborted|unreachable|no route|broken pipe|badstatusline"
     r"|remotedisconnected|connection", "connection_error"),
))
_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")


def failure_reason(status: Optional[str], message: Optional[str]) -> str:
    """Stable reason name for one img2dataset failure (status + error_message)."""
    text = message or ""
    for pattern, reason in _MESSAGE_REASONS[:6]:  # our own tagged messages first
        if pattern.search(text):
            return reason
    match = _HTTP_STATUS.search(text)
    if match:
        return f"http_{match.group(1)}"
    for pattern, reason in _MESSAGE_REASONS[6:]:
        if pattern.search(text):
            return reason
    return "resize_error" if status == "failed_to_resize" else "download_error"


# --------------------------------------------------------------------------------------------
# One shard (runs inside a Ray task; plain function so it is testable without Ray)


@dataclasses.dataclass(frozen=True)
class ShardSettings:
    """What a shard task needs: picklable, independent of the driver's config object."""

    output_uri: str
    columns: tuple[str, ...]  # metadata columns saved with each sample (uid first)
    digits: int
    shard_size: int
    image_size: int
    resize_mode: str
    resize_only_if_bigger: bool
    encode_format: str
    encode_quality: int
    min_image_size: int
    max_aspect_ratio: Optional[float]
    max_image_pixels: int
    compute_hash: Optional[str]
    extract_exif: bool
    timeout: float
    retries: int
    threads: int
    user_agent_token: Optional[str]
    disallowed_header_directives: tuple[str, ...]
    guard: netguard.GuardPolicy
    scratch_dir: Optional[str]

    @classmethod
    def from_config(cls, cfg: DownloadConfig, output_uri: str, columns: list[str], digits: int) -> "ShardSettings":
        return cls(output_uri=output_uri, columns=tuple(columns), digits=digits, shard_size=cfg.shard_size,
                   image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                   resize_only_if_bigger=cfg.resize_only_if_bigger, encode_format=cfg.encode_format,
                   encode_quality=cfg.encode_quality, min_image_size=cfg.min_image_size,
                   max_aspect_ratio=cfg.max_aspect_ratio, max_image_pixels=cfg.max_image_pixels,
                   compute_hash=cfg.compute_hash, extract_exif=cfg.extract_exif, timeout=cfg.timeout,
                   retries=cfg.retries, threads=cfg.threads_per_task, user_agent_token=cfg.user_agent_token,
                   disallowed_header_directives=tuple(cfg.disallowed_header_directives),
                   guard=netguard.GuardPolicy(tuple(cfg.allowed_networks), tuple(cfg.denied_networks),
                                              cfg.max_response_bytes, cfg.max_response_seconds),
                   scratch_dir=cfg.scratch_dir)


def shard_files(output_uri: str, name: str) -> dict[str, str]:
    return {"tar": storage.join(output_uri, f"{name}.tar"), "parquet": storage.join(output_uri, f"{name}.parquet"),
            "stats": storage.join(output_uri, f"{name}_stats.json")}


def count_tar_samples(tar_uri: str, image_ext: str) -> int:
    """Samples (members named <key>.<image_ext>) in a tar; reads headers only, raises if unreadable."""
    suffix = "." + image_ext
    with storage.open_input(tar_uri) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return sum(1 for member in tar if member.isfile() and member.name.endswith(suffix))


def verify_shard(settings: ShardSettings, plan: ShardPlan) -> Optional[dict]:
    """The recorded summary of a shard that is complete on storage (stats present, tar readable
    with the recorded size and sample count, parquet with one row per input row), else None."""
    paths = shard_files(settings.output_uri, plan.name)
    if not storage.exists(paths["stats"]):
        return None
    try:
        summary = storage.read_json(paths["stats"]).get(STATS_SECTION)
        if not summary or summary.get("input_rows") != plan.num_rows:
            return None
        if storage.file_info(paths["tar"]).size != summary["tar_bytes"]:
            return None
        if count_tar_samples(paths["tar"], settings.encode_format) != summary["succeeded"]:
            return None
        with storage.open_input(paths["parquet"]) as f:
            if pq.ParquetFile(f).metadata.num_rows != plan.num_rows:
                return None
    except (OSError, ValueError, KeyError, tarfile.TarError, pa.ArrowException) as exc:
        log.warning("shard %s: existing files do not verify (%s); downloading it again", plan.name, exc)
        return None
    return summary


def summarize_results(results: pa.Table, input_uids: pa.Array) -> tuple[int, dict[str, int], dict[str, list[str]]]:
    """(succeeded, failures by reason, up to 3 example messages per reason) of img2dataset's
    per-row results; input rows missing from them are failures too."""
    grouped = results.group_by(["status", "error_message"]).aggregate([([], "count_all")]).to_pylist()
    succeeded, failures, examples = 0, {}, {}
    for row in grouped:
        if row["status"] == "success":
            succeeded += row["count_all"]
            continue
        reason = failure_reason(row["status"], row["error_message"])
        failures[reason] = failures.get(reason, 0) + row["count_all"]
        samples = examples.setdefault(reason, [])
        if len(samples) < 3 and row["error_message"]:
            samples.append(str(row["error_message"])[:300])
    seen = results.column("uid").combine_chunks()
    missing = pc.sum(pc.invert(pc.is_in(input_uids, value_set=seen))).as_py() or 0
    if missing:
        failures[MISSING_ROWS] = missing
    return succeeded, failures, examples


def _publish(local_path: str, dest_uri: str) -> None:
    """Move a finished scratch file to its place in the output (a rename when both are on one
    local filesystem, a streamed copy otherwise, e.g. to an object store)."""
    dest_local = storage.local_path(dest_uri)
    if dest_local is not None:
        shutil.move(local_path, dest_local)
        return
    fs, path = storage.resolve(dest_uri)
    pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _remove_shard(settings: ShardSettings, name: str) -> None:
    for uri in shard_files(settings.output_uri, name).values():
        storage.delete(uri)


def _fetch_with_img2dataset(table: pa.Table, work_dir: str, shard_id: int, settings: ShardSettings) -> str:
    """Run img2dataset's downloader (+ our SafeResizer in front of its Resizer, its webdataset
    writer) on one shard, in this process, with the guarded urllib opener installed. Returns
    img2dataset's output folder."""
    import urllib.request

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before img2dataset imports albumentations
    import PIL.Image
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    PIL.Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    # OpenCV's own decode limit, a second line behind inspect_image; OpenCV reads it at the first
    # decode in a process, so it holds when this task is the first to decode here.
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(settings.max_image_pixels))
    out_dir = os.path.join(work_dir, "out")
    os.makedirs(out_dir)
    # The shard file img2dataset's Reader would write: an Arrow IPC file whose columns are the
    # saved columns, then "caption" and "url" (its column_list order). Writing it here skips the
    # Reader's pandas import and an extra parquet round trip.
    column_list = [*settings.columns, "caption", "url"]
    shard_file = os.path.join(work_dir, f"{shard_id}.feather")
    renamed = table.select([*settings.columns, "TEXT", "URL"]).rename_columns(column_list)
    with pa.OSFile(shard_file, "wb") as sink, pa.ipc.new_file(sink, renamed.schema) as writer:
        writer.write_table(renamed)
    resizer = Resizer(image_size=settings.image_size, resize_mode=settings.resize_mode,
                      resize_only_if_bigger=settings.resize_only_if_bigger, encode_quality=settings.encode_quality,
                      encode_format=settings.encode_format, min_image_size=settings.min_image_size,
                      max_image_area=settings.max_image_pixels,
                      max_aspect_ratio=settings.max_aspect_ratio or float("inf"))
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=SafeResizer(resizer, settings.max_image_pixels),
        thread_count=settings.threads, save_caption=True, extract_exif=settings.extract_exif,
        output_folder=out_dir, column_list=column_list, timeout=settings.timeout,
        number_sample_per_shard=settings.shard_size, oom_shard_count=settings.digits,
        compute_hash=settings.compute_hash, verify_hash_type=None, encode_format=settings.encode_format,
        retries=settings.retries, user_agent_token=settings.user_agent_token,
        disallowed_header_directives=list(settings.disallowed_header_directives) or None)
    previous_opener = urllib.request._opener  # restored so the worker process is left as found
    urllib.request.install_opener(settings.guard.opener())
    try:
        downloader.download_shard((shard_id, shard_file))
    finally:
        urllib.request.install_opener(previous_opener)
    return out_dir


def download_shard(plan: ShardPlan, settings: ShardSettings, attempt: int = 0) -> dict:
    """Make shard `plan` complete on storage and return its summary (skips a verified one)."""
    existing = verify_shard(settings, plan)
    if existing is not None:
        return {**existing, "resumed": True}
    _remove_shard(settings, plan.name)  # leftovers of an interrupted attempt
    started = time.time()
    read_columns = ["URL", "TEXT", *settings.columns]
    table = pa.concat_tables([read_slice(uri, a, b, read_columns) for uri, a, b in plan.slices])
    if table.num_rows != plan.num_rows:
        raise RuntimeError(f"shard {plan.name}: read {table.num_rows} input rows, planned {plan.num_rows}")
    uids = table.column("uid").combine_chunks()
    if uids.null_count or pc.count_distinct(uids).as_py() != len(uids):
        first_file = plan.slices[0][0]
        raise ValueError(f"shard {plan.name} (input {first_file}...): column 'uid' has null or duplicate values; "
                         f"the filter phase guarantees unique uids")
    with tempfile.TemporaryDirectory(prefix=f"wurst-download-{plan.name}-", dir=settings.scratch_dir) as work:
        out_dir = _fetch_with_img2dataset(table, work, plan.shard_id, settings)
        local = {"tar": os.path.join(out_dir, f"{plan.name}.tar"),
                 "parquet": os.path.join(out_dir, f"{plan.name}.parquet"),
                 "stats": os.path.join(out_dir, f"{plan.name}_stats.json")}
        for kind, path in local.items():
            if not os.path.exists(path):
                raise RuntimeError(f"shard {plan.name}: img2dataset wrote no {kind} file")
        results = pq.read_table(local["parquet"], columns=["uid", "status", "error_message"])
        succeeded, failures, examples = summarize_results(results, uids)
        tar_samples = count_tar_samples(local["tar"], settings.encode_format)
        if tar_samples != succeeded:
            raise RuntimeError(f"shard {plan.name}: tar holds {tar_samples} images, results say {succeeded}")
        if succeeded + sum(failures.values()) != plan.num_rows:
            raise RuntimeError(f"shard {plan.name}: {succeeded} ok + {sum(failures.values())} failed "
                               f"!= {plan.num_rows} input rows")
        with open(local["stats"]) as f:
            stats = json.load(f)
        summary = {"shard": plan.name, "input_rows": plan.num_rows, "succeeded": succeeded,
                   "failures": dict(sorted(failures.items())), "failure_examples": examples,
                   "tar_bytes": os.path.getsize(local["tar"]), "attempt": attempt,
                   "duration_s": round(time.time() - started, 3)}
        stats[STATS_SECTION] = summary
        # Data first, the stats file last: its presence is what marks the shard complete.
        _publish(local["tar"], shard_files(settings.output_uri, plan.name)["tar"])
        _publish(local["parquet"], shard_files(settings.output_uri, plan.name)["parquet"])
        storage.write_json(shard_files(settings.output_uri, plan.name)["stats"], stats)
    return {**summary, "resumed": False}


# --------------------------------------------------------------------------------------------
# Driver


class ShardsFailedError(RuntimeError):
    """Some shards still failed after their retries; the report names them, no manifest is written."""


def run_shards(plans: list[ShardPlan], settings: ShardSettings, cfg: DownloadConfig, on_done=None
               ) -> tuple[dict[str, dict], dict[str, str]]:
    """One Ray task per shard, at most `max_tasks_in_flight` at once, each retried up to
    `max_shard_retries` times. Returns (summaries by shard name, errors of shards that failed)."""
    ray = init_ray(cfg.ray)
    remote = ray.remote(download_shard)
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
            ref = remote.options(name=f"download-shard-{plan.name}", **task_options).remote(plan, settings, attempt)
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
    succeeded = 0
    fetched_now = 0
    for summary in done.values():
        succeeded += summary["succeeded"]
        for reason, n in summary["failures"].items():
            failures[reason] = failures.get(reason, 0) + n
        for reason, messages in summary.get("failure_examples", {}).items():
            kept = examples.setdefault(reason, [])
            kept.extend(messages[:max(0, 3 - len(kept))])
        if not summary.get("resumed"):
            fetched_now += summary["input_rows"]
    rows_by_name = {p.name: p.num_rows for p in plans}
    lost = sum(rows_by_name[name] for name in failed)
    if lost:
        failures[SHARD_FAILED] = lost
    input_rows = sum(rows_by_name.values())
    if input_rows != succeeded + sum(failures.values()):
        raise RuntimeError(f"accounting error: {input_rows} input rows != {succeeded} succeeded + "
                           f"{sum(failures.values())} failed {failures}")
    return {
        "phase": PHASE, "version": version, "input": input_uri, "output": output_uri,
        "input_rows": input_rows, "succeeded": succeeded, "failed": input_rows - succeeded,
        "success_rate": round(succeeded / input_rows, 6) if input_rows else 0.0,
        "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failure_examples": {k: examples[k] for k in sorted(examples)},
        "shards": {"total": len(plans), "completed": len(done),
                   "resumed": sum(1 for s in done.values() if s.get("resumed")), "failed": len(failed),
                   "failed_shards": dict(sorted(failed.items()))},
        "duration_s": round(duration_s, 3),
        "rows_per_second": round(fetched_now / duration_s, 3) if duration_s > 0 else None,
    }


def _metrics(report: dict) -> dict[str, float]:
    metrics = {k: float(report[k]) for k in ("input_rows", "succeeded", "failed", "success_rate", "duration_s")}
    metrics.update({f"shards_{k}": float(v) for k, v in report["shards"].items() if k != "failed_shards"})
    metrics.update({f"failures.{reason}": float(n) for reason, n in report["failures"].items()})
    if report.get("rows_per_second") is not None:
        metrics["rows_per_second"] = float(report["rows_per_second"])
    return metrics


def run(cfg: DownloadConfig) -> dict:
    """Download the input into `output_dir(cfg)`; returns the report (a no-op when complete)."""
    input_uri = _require_input(cfg)
    files, schema = scan_input(input_uri)
    input_id = manifest_lib.input_identity(input_uri)
    version = manifest_lib.version_id(PHASE, cfg, input_id, exclude=VERSION_EXCLUDE)
    out = storage.join(output_root(cfg), version)
    report_uri = storage.join(out, "report.json")
    if manifest_lib.has_manifest(out):
        log.info("%s is complete (manifest.json present); nothing to do", out)
        return storage.read_json(report_uri)
    columns = selected_metadata_columns(schema, cfg.metadata_columns)
    plans = plan_shards(files, cfg.shard_size)
    storage.makedirs(out)
    settings = ShardSettings.from_config(cfg, out, columns, shard_name_digits(len(plans)))
    log.info("download %s -> %s: %d rows in %d shards of %d", input_uri, out, sum(p.num_rows for p in plans),
             len(plans), cfg.shard_size)

    with tracking.start_run(PHASE, cfg, data_root=cfg.data_root, mlflow_cfg=cfg.mlflow, input_uri=input_uri,
                            run_name=cfg.mlflow.run_name or f"download-{version}",
                            tags={"wurst.version": version, "wurst.output_uri": out}) as mlrun:
        import mlflow

        totals = {"rows": 0, "ok": 0}

        def on_done(summary: dict, n_done: int, n_total: int) -> None:
            totals["rows"] += summary["input_rows"]
            totals["ok"] += summary["succeeded"]
            log.info("shard %s %s (%d/%d): %d/%d images ok%s; total %d/%d ok", summary["shard"],
                     "already complete" if summary.get("resumed") else "done", n_done, n_total,
                     summary["succeeded"], summary["input_rows"],
                     "" if summary.get("resumed") else f" in {summary['duration_s']:.1f} s",
                     totals["ok"], totals["rows"])
            if mlrun is not None:
                mlflow.log_metrics({"progress.shards_done": n_done, "progress.rows_done": totals["rows"],
                                    "progress.succeeded": totals["ok"]}, step=n_done)

        started = time.time()
        done, failed = run_shards(plans, settings, cfg, on_done)
        report = build_report(plans, done, failed, version=version, input_uri=input_uri, output_uri=out,
                              duration_s=time.time() - started)
        storage.write_json(report_uri, report)
        if mlrun is not None:
            mlflow.log_metrics(_metrics(report))
            mlflow.log_dict(report, "report.json")
        log.info("report: %d/%d rows downloaded; failures %s", report["succeeded"], report["input_rows"],
                 report["failures"])
        if failed:
            raise ShardsFailedError(f"{len(failed)} shard(s) failed after {cfg.max_shard_retries} retries "
                                    f"({', '.join(sorted(failed))}); see {report_uri}; rerun to retry them")
        manifest_lib.write(out, phase=PHASE, cfg=cfg, input_uri=input_uri, input_id=input_id,
                           counts={"input_rows": report["input_rows"], "samples": report["succeeded"],
                                   "failed": report["failed"], "shards": len(plans)},
                           extra={"failures": report["failures"], "image_size": cfg.image_size,
                                  "resize_mode": cfg.resize_mode, "encode_format": cfg.encode_format,
                                  "sample_fields": [cfg.encode_format, "txt", "json"],
                                  "json_fields": [*columns, "caption", "url", "key", "status", "error_message",
                                                  "width", "height", "original_width", "original_height"]
                                  + (["exif"] if cfg.extract_exif else [])
                                  + ([cfg.compute_hash] if cfg.compute_hash else []),
                                  "shard_names": [p.name for p in plans]},
                           mlflow_run_id=mlrun.info.run_id if mlrun is not None else None)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = config_lib.argument_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    cfg = config_lib.load_from_args(DownloadConfig, args)
    report = run(cfg)
    print(json.dumps({k: report[k] for k in ("version", "output", "input_rows", "succeeded", "failures", "shards")},
                     indent=2))
    return report


if __name__ == "__main__":
    # Run from the imported module, not from __main__: Ray pickles __main__ functions by value, so
    # shard tasks would skip this module's import-time set-up (and its classes would be copies).
    from pipelines import download as _module

    config_lib.run_cli("download", _module.main, (FileNotFoundError, ValueError, _module.ShardsFailedError))
