"""One shard of `download`, inside a Ray task: fetch with img2dataset, check, verify, publish.

`download_shard(plan, settings)` reads its input rows, runs img2dataset's downloader (its resizer
behind `SafeResizer`, its webdataset writer) in this process with the network guard installed into
urllib, checks the result (one result row per input row, one image per success) and moves the shard's
files into the output, the stats file last (`pipelines.image_shards`). A complete shard is verified
and skipped. Apart from the driver (`pipelines.download`) because only this side imports img2dataset
and decodes images.

Per-sample safety: images are inspected before decoding (`inspect_image`: decompression bombs,
truncated files, non-image content are per-sample failures), and every failure gets a stable reason
name (`failure_reason`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
from typing import TYPE_CHECKING, Optional

# albumentations (imported by img2dataset) checks PyPI for updates at import time unless told not
# to: that is a network call from every download worker, and a 10-60 s stall without internet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import config as config_lib
from pipelines import netguard, storage
from pipelines.image_shards import WEB_IMAGE_FORMATS, count_tar_samples, shard_files
from pipelines.phase import InputError

if TYPE_CHECKING:
    from pipelines.download import DownloadConfig

log = logging.getLogger(__name__)

STATS_SECTION = "wurst"  # our summary's key in img2dataset's NNNNN_stats.json
MISSING_ROWS = "missing_from_downloader_output"


class DownloadInputError(InputError):
    """The download input cannot be used (a missing or mistyped column, differing schemas, duplicate uids)."""


# --------------------------------------------------------------------------------------------
# The unit of work


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    shard_id: int
    name: str  # zero-padded shard id, e.g. "00007"
    num_rows: int
    slices: tuple[tuple[str, int, int], ...]  # (file uri, first row, end row) in input order


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
    `not_an_image: ...`, `decode_error: ...`), or None. Reads only the header for JPEG/PNG/WebP. Only the
    web image formats are identified (`WEB_IMAGE_FORMATS`): anything else, EPS (Ghostscript) included, is
    `not_an_image` before any decoder of it runs."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=WEB_IMAGE_FORMATS) as im:
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
        return f"not_an_image: content is not one of the accepted image formats {list(WEB_IMAGE_FORMATS)} ({kind})"
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
# One shard (plain functions, so they are testable without Ray)


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
    max_shard_seconds: float
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
                   max_shard_seconds=cfg.max_shard_seconds, retries=cfg.retries, threads=cfg.threads_per_task, user_agent_token=cfg.user_agent_token,
                   disallowed_header_directives=tuple(cfg.disallowed_header_directives),
                   guard=netguard.GuardPolicy(tuple(cfg.allowed_networks), tuple(cfg.denied_networks),
                                              cfg.max_response_bytes, cfg.max_response_seconds,
                                              cfg.allow_metadata_address),
                   scratch_dir=cfg.scratch_dir)


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
            # Messages quote URLs, which may carry signatures (presigned links): report.json and MLflow get them redacted.
            samples.append(config_lib.redact_text(str(row["error_message"]))[:300])
    seen = results.column("uid").combine_chunks()
    missing = pc.sum(pc.invert(pc.is_in(input_uids, value_set=seen))).as_py() or 0
    if missing:
        failures[MISSING_ROWS] = missing
    return succeeded, failures, examples


INVALID_UTF8 = "invalid_utf8"


def repair_utf8(table: pa.Table, shard: str) -> tuple[pa.Table, dict[str, int]]:
    """The table with every string that is not valid UTF-8 decoded with U+FFFD for the bad bytes, and how
    many values were repaired per column (`invalid_utf8.<column>`). Parquet does not validate UTF-8, and one
    bad caption would otherwise fail img2dataset's whole shard when it converts the column to Python."""
    repaired: dict[str, int] = {}
    for index, field in enumerate(table.schema):
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        column = table.column(index)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        if field.name == "uid":
            raise DownloadInputError(f"shard {shard}: column 'uid' holds bytes that are not UTF-8; "
                                     f"the filter phase writes hex uids")
        raw = column.cast(pa.large_binary() if pa.types.is_large_string(field.type) else pa.binary(),
                          safe=False).to_pylist()
        fixed, n = [], 0
        for value in raw:
            if value is None:
                fixed.append(None)
                continue
            text = value.decode("utf-8", errors="replace")
            n += text.encode("utf-8") != value
            fixed.append(text)
        table = table.set_column(index, field, pa.array(fixed, field.type))
        repaired[f"{INVALID_UTF8}.{field.name}"] = n
        log.warning("shard %s: %d value(s) of column %r were not valid UTF-8; repaired with U+FFFD",
                    shard, n, field.name)
    return table, repaired


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


def _fetch_with_img2dataset(table: pa.Table, work_dir: str, shard_id: int, settings: ShardSettings,
                            shard_deadline: Optional[float] = None) -> str:
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
    urllib.request.install_opener(settings.guard.opener(shard_deadline))
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
    # Past this instant no request starts and no read waits: the shard's late URLs end as `timeout`.
    shard_deadline = time.monotonic() + settings.max_shard_seconds
    read_columns = ["URL", "TEXT", *settings.columns]
    table = pa.concat_tables([read_slice(uri, a, b, read_columns) for uri, a, b in plan.slices])
    if table.num_rows != plan.num_rows:
        raise RuntimeError(f"shard {plan.name}: read {table.num_rows} input rows, planned {plan.num_rows}")
    table, repaired = repair_utf8(table, plan.name)
    uids = table.column("uid").combine_chunks()
    if uids.null_count or pc.count_distinct(uids).as_py() != len(uids):
        first_file = plan.slices[0][0]
        raise DownloadInputError(f"shard {plan.name} (input {first_file}...): column 'uid' has null or duplicate values; "
                         f"the filter phase guarantees unique uids")
    with tempfile.TemporaryDirectory(prefix=f"wurst-download-{plan.name}-", dir=settings.scratch_dir) as work:
        out_dir = _fetch_with_img2dataset(table, work, plan.shard_id, settings, shard_deadline)
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
                   "repaired": repaired,
                   "tar_bytes": os.path.getsize(local["tar"]), "attempt": attempt,
                   "duration_s": round(time.time() - started, 3)}
        stats[STATS_SECTION] = summary
        # Data first, the stats file last: its presence is what marks the shard complete.
        _publish(local["tar"], shard_files(settings.output_uri, plan.name)["tar"])
        _publish(local["parquet"], shard_files(settings.output_uri, plan.name)["parquet"])
        storage.write_json(shard_files(settings.output_uri, plan.name)["stats"], stats)
    return {**summary, "resumed": False}
