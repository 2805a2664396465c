"""One shard of `download`, inside a Ray task: fetch with img2dataset, check, verify, publish.

Longer than 500 lines: one shard's whole life (plan, politeness, img2dataset run, checks, resume
verification, publication) kept together, since each step's invariants feed the next.

`download_shard(plan, settings)` reads its input rows, runs img2dataset's downloader (its resizer
behind `SafeResizer`, its webdataset writer) in this process with the network guard installed into
urllib, checks the result (one result row per input row, one image per success) and moves the shard's
files into the output, the stats file last (`pipelines.image_shards`). A complete shard is verified
and skipped. Apart from the driver (`pipelines.download`) because only this side imports img2dataset
and decodes images.

Per-sample safety: images are inspected before decoding (`inspect_image`: decompression bombs,
truncated files, non-image content are per-sample failures), and every failure gets a stable reason
name (`failure_reason`).

Politeness: img2dataset fetches with `urllib.request.urlopen` from a pool of `threads` threads; the
opener installed for the shard is a `PoliteOpener` over the guarded one (`pipelines.netguard`). It sets
the configured User-Agent, holds at most `max_connections_per_host` connections per host ("name:port";
a `HostLimiter` gates each connection, the slot is held until the body is read), retries a 429 / 503
after the server's Retry-After (seconds or HTTP-date) or an exponential backoff, never longer than
`max_retry_wait_s` and never past the URL's or the shard's deadline, and pauses that host for every
thread of the shard meanwhile. Host names are resolved through one `netguard.CachingResolver` per shard
task; the guard checks every address of every answer, cached or not.

Resume: when a shard is written, its stats file records what was written (`shard_record`: tar and
parquet sizes, member and sample counts, a digest of the tar listing, of the sample keys and of the tar's
first and last 64 KiB). A later run checks that record cheaply (`verify_shard`: two size look-ups, two
64 KiB range reads of the tar, the shard parquet's keys) instead of reading every tar header over the
network; `resume_check: full` reads the whole listing as well.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Callable, Optional

# albumentations (imported by img2dataset) checks PyPI for updates at import time unless told not
# to: that is a network call from every download worker, and a 10-60 s stall without internet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import config as config_lib
from pipelines import image_shards, netguard, storage
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
# Politeness: per-host connection slots, Retry-After, the User-Agent


THROTTLE_STATUSES = (429, 503)  # "too many requests", "service unavailable": retried after a wait


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """The seconds a Retry-After header value asks for: delta-seconds (`120`) or an HTTP-date
    (`Wed, 21 Oct 2015 07:28:00 GMT`, relative to `now`, a `time.time()`; a date in the past is 0);
    None when there is none or it cannot be read."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now)


def throttle_wait(retry_after: Optional[float], attempt: int, backoff_s: float, max_wait_s: float) -> Optional[float]:
    """How long to wait before retry `attempt` (0: the first) of a URL answered 429 / 503: the server's
    Retry-After when it sent one, else `backoff_s * 2**attempt`, at most `max_wait_s`. None: do not retry,
    because the server asked for more than `max_wait_s` (retrying earlier would ignore what it asked)."""
    if retry_after is not None:
        return retry_after if retry_after <= max_wait_s else None
    return min(backoff_s * 2.0 ** attempt, max_wait_s)


def host_key(url: str) -> str:
    """"name:port" of a URL, lower case, with the scheme's default port: the unit of the per-host limit
    (the same key the guarded connections give `HostLimiter`)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


class HostLimiter:
    """The connection gate of one shard task (see `netguard.GuardPolicy.opener`): at most `max_per_host`
    connections to one host at a time, and none while the host's Retry-After pause lasts. A thread waits for
    a slot at most until its URL's deadline, then fails as `timeout`."""

    def __init__(self, max_per_host: int):
        self.max_per_host = max_per_host
        self._cond = threading.Condition()
        self._active: dict[str, int] = {}
        self._paused_until: dict[str, float] = {}  # host -> time.monotonic() instant
        self.peak: dict[str, int] = {}  # most connections a host had at once
        self.waits = 0  # connections that had to wait for a slot or a pause

    def pause(self, host: str, seconds: float) -> None:
        """No new connection to `host` for `seconds` (a later end wins over an earlier one)."""
        with self._cond:
            until = time.monotonic() + seconds
            if until > self._paused_until.get(host, 0.0):
                self._paused_until[host] = until
            self._cond.notify_all()

    def __call__(self, host: str, deadline: float, why: str) -> Callable[[], None]:
        with self._cond:
            waited = False
            while True:
                now = time.monotonic()
                paused_until = self._paused_until.get(host, 0.0)
                if paused_until > now:
                    if paused_until >= deadline:
                        raise netguard.DownloadDeadlineError(
                            f"timed out: {host} asked to wait {paused_until - now:.1f} s more (Retry-After), "
                            f"past the deadline ({why})")
                    waited = True
                    self._cond.wait(paused_until - now)
                    continue
                if self._active.get(host, 0) < self.max_per_host:
                    break
                if now >= deadline:
                    raise netguard.DownloadDeadlineError(
                        f"timed out: waiting for one of {host}'s max_connections_per_host={self.max_per_host} "
                        f"slots ({why})")
                waited = True
                self._cond.wait(deadline - now)
            active = self._active.get(host, 0) + 1
            self._active[host] = active
            self.peak[host] = max(self.peak.get(host, 0), active)
            self.waits += waited
        released = False

        def release() -> None:
            nonlocal released
            with self._cond:
                if released:
                    return
                released = True
                self._active[host] -= 1
                self._cond.notify_all()

        return release


def user_agent_for(user_agent: str, token: Optional[str]) -> str:
    """The User-Agent sent: the configured one, with `user_agent_token` appended when it is not already in
    it (X-Robots-Tag directives addressed to that token then name a crawler the server has seen)."""
    if token and token.strip().lower() not in user_agent.lower():
        return f"{user_agent} ({token.strip()})"
    return user_agent


class PoliteOpener:
    """What img2dataset's `urlopen` calls go through in a shard task (installed as urllib's opener): the
    configured User-Agent replaces img2dataset's, and a 429 / 503 is retried up to `throttle_retries` times
    after `throttle_wait` - unless that wait would end past the URL's deadline (max_response_seconds, the
    shard's deadline), in which case the response stands (`http_429` / `http_503`). While one thread waits
    its host is paused for all (`HostLimiter.pause`), before its slot is given back."""

    def __init__(self, inner, limiter: HostLimiter, user_agent: str, throttle_retries: int, backoff_s: float,
                 max_wait_s: float):
        self.inner, self.limiter, self.user_agent = inner, limiter, user_agent
        self.throttle_retries, self.backoff_s, self.max_wait_s = throttle_retries, backoff_s, max_wait_s
        self._lock = threading.Lock()
        self.retried = 0  # throttled responses that were retried
        self.gave_up = 0  # throttled responses that were not (too long a wait, or no retries left)

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        if isinstance(fullurl, str):
            request = urllib.request.Request(fullurl, data)
        else:
            request = fullurl
            if data is not None:
                request.data = data
        request.add_header("User-Agent", self.user_agent)
        attempt = 0
        while True:
            try:
                return self.inner.open(request, timeout=timeout)
            except urllib.error.HTTPError as err:
                wait = None
                if err.code in THROTTLE_STATUSES:
                    if attempt < self.throttle_retries:
                        wait = throttle_wait(parse_retry_after(err.headers.get("Retry-After"), time.time()),
                                             attempt, self.backoff_s, self.max_wait_s)
                    deadline, _ = self.inner.current_deadline()
                    if wait is not None and time.monotonic() + wait >= deadline:
                        wait = None
                    with self._lock:
                        if wait is None:
                            self.gave_up += 1
                        else:
                            self.retried += 1
                if wait is None:
                    err.close()  # gives the host's slot back now, not when the error is collected
                    raise
                # Pause the host first, then give the slot back: its other threads see the pause.
                self.limiter.pause(host_key(err.geturl() or request.full_url), wait)
                err.close()
                attempt += 1


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
    # politeness and resume (defaults: what a DownloadConfig's defaults give)
    user_agent: str = "wurst-download/1.0"
    max_connections_per_host: int = 4
    throttle_retries: int = 3
    retry_backoff_s: float = 1.0
    max_retry_wait_s: float = 60.0
    dns_cache_seconds: float = 300.0
    resume_check: str = "quick"

    @classmethod
    def from_config(cls, cfg: DownloadConfig, output_uri: str, columns: list[str], digits: int) -> "ShardSettings":
        return cls(output_uri=output_uri, columns=tuple(columns), digits=digits, shard_size=cfg.shard_size,
                   image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                   resize_only_if_bigger=cfg.resize_only_if_bigger, encode_format=cfg.encode_format,
                   encode_quality=cfg.encode_quality, min_image_size=cfg.min_image_size,
                   max_aspect_ratio=cfg.max_aspect_ratio, max_image_pixels=cfg.max_image_pixels,
                   compute_hash=cfg.compute_hash, extract_exif=cfg.extract_exif, timeout=cfg.timeout,
                   max_shard_seconds=cfg.max_shard_seconds, retries=cfg.retries, threads=cfg.threads_per_task,
                   user_agent_token=cfg.user_agent_token,
                   disallowed_header_directives=tuple(cfg.disallowed_header_directives),
                   guard=netguard.GuardPolicy(tuple(cfg.allowed_networks), tuple(cfg.denied_networks),
                                              cfg.max_response_bytes, cfg.max_response_seconds,
                                              cfg.allow_metadata_address),
                   scratch_dir=cfg.scratch_dir,
                   user_agent=user_agent_for(cfg.user_agent, cfg.user_agent_token),
                   max_connections_per_host=cfg.max_connections_per_host, throttle_retries=cfg.throttle_retries,
                   retry_backoff_s=cfg.retry_backoff_s, max_retry_wait_s=cfg.max_retry_wait_s,
                   dns_cache_seconds=cfg.dns_cache_seconds, resume_check=cfg.resume_check)


RECORD_FORMAT = 1  # the layout of the `record` in a shard's stats; a shard without one is checked in full
EDGE_BYTES = 64 * 1024  # how much of each end of a tar the quick resume check reads


def _digest(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def _tar_listing(uri: str) -> list[tuple[str, int]]:
    """(name, size) of every member of a tar, in tar order (reads every header: local use, or a full check)."""
    with storage.open_input(uri) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        return [(m.name, m.size) for m in tar]


def _edge_digest(uri: str, size: int) -> str:
    """sha256 of a file's size and its first and last EDGE_BYTES (two range reads)."""
    n = min(EDGE_BYTES, size)
    with storage.open_input(uri) as f:
        head, tail = f.read_at(n, 0), f.read_at(n, size - n)
    return hashlib.sha256(str(size).encode() + b"\0" + head + b"\0" + tail).hexdigest()


def _sample_keys(listing: list[tuple[str, int]], encode_format: str) -> list[str]:
    suffix = "." + encode_format.lower()
    return sorted(name[: -len(suffix)] for name, _ in listing if name.lower().endswith(suffix))


def _success_keys_digest(parquet_uri: str) -> tuple[int, str]:
    """(rows, digest of the sorted keys whose status is success) of a shard parquet."""
    with storage.open_input(parquet_uri) as f:
        table = pq.read_table(f, columns=["key", "status"])
    keys = table.filter(pc.equal(table.column("status"), "success")).column("key").to_pylist()
    return table.num_rows, _digest(sorted(keys))


def shard_record(tar_path: str, parquet_path: str, encode_format: str) -> dict:
    """What was written for one shard (local files, before they are published): recorded in its stats so
    that a resume can check it without reading the tar's headers."""
    listing = _tar_listing(tar_path)
    keys = _sample_keys(listing, encode_format)
    tar_bytes = os.path.getsize(tar_path)
    return {"format": RECORD_FORMAT, "tar_bytes": tar_bytes, "tar_members": len(listing), "tar_samples": len(keys),
            "listing_sha256": _digest(f"{name}\t{size}" for name, size in listing),
            "keys_sha256": _digest(keys), "edge_sha256": _edge_digest(tar_path, tar_bytes),
            "parquet_bytes": os.path.getsize(parquet_path)}


def _why_not_complete(settings: ShardSettings, plan: ShardPlan) -> tuple[Optional[dict], Optional[str]]:
    """(the recorded summary, None) when shard `plan` is complete on storage, else (None, why not; None when
    there is no sign of a finished shard at all)."""
    paths = shard_files(settings.output_uri, plan.name)
    if not storage.exists(paths["stats"]):
        return None, None
    summary = storage.read_json(paths["stats"]).get(STATS_SECTION)
    if not summary or summary.get("input_rows") != plan.num_rows:
        return None, f"its stats record {summary and summary.get('input_rows')} input rows, the plan {plan.num_rows}"
    tar_size = storage.file_info(paths["tar"]).size
    if tar_size != summary["tar_bytes"]:
        return None, f"the tar is {tar_size} bytes, {summary['tar_bytes']} were written"
    record = summary.get("record")
    if record is not None and record.get("format") == RECORD_FORMAT:
        if record["tar_samples"] != summary["succeeded"]:
            return None, f"its record lists {record['tar_samples']} samples, its stats {summary['succeeded']}"
        parquet_size = storage.file_info(paths["parquet"]).size
        if parquet_size != record["parquet_bytes"]:
            return None, f"the parquet is {parquet_size} bytes, {record['parquet_bytes']} were written"
        if _edge_digest(paths["tar"], tar_size) != record["edge_sha256"]:
            return None, "the tar's first / last 64 KiB differ from what was written"
        rows, keys = _success_keys_digest(paths["parquet"])
        if rows != plan.num_rows:
            return None, f"the parquet has {rows} rows, the plan {plan.num_rows}"
        if keys != record["keys_sha256"]:
            return None, "the parquet's successful keys differ from the tar listing that was written"
        if settings.resume_check == "full":
            listing = _tar_listing(paths["tar"])
            if _digest(f"{name}\t{size}" for name, size in listing) != record["listing_sha256"]:
                return None, "the tar's listing differs from the one that was written"
        return summary, None
    # Written before records existed: count the tar's samples (reads every header).
    if count_tar_samples(paths["tar"], settings.encode_format) != summary["succeeded"]:
        return None, f"the tar does not hold the {summary['succeeded']} recorded samples"
    with storage.open_input(paths["parquet"]) as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    if rows != plan.num_rows:
        return None, f"the parquet has {rows} rows, the plan {plan.num_rows}"
    return summary, None


def verify_shard(settings: ShardSettings, plan: ShardPlan) -> Optional[dict]:
    """The recorded summary of a shard that is complete on storage, else None (logged when there were
    files that did not check out). With a record (`shard_record`): the tar's and parquet's sizes, the tar's
    first and last 64 KiB and the parquet's successful keys against what was written - no tar header is
    read (`resume_check: full` reads and compares the whole listing too). Without one (older shards): the
    tar's samples are counted."""
    try:
        summary, why = _why_not_complete(settings, plan)
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError, pa.ArrowException) as exc:
        summary, why = None, f"{type(exc).__name__}: {exc}"
    if why is not None:
        log.warning("shard %s: existing files do not verify (%s); downloading it again", plan.name, why)
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
                            shard_deadline: Optional[float] = None) -> tuple[str, dict]:
    """Run img2dataset's downloader (+ our SafeResizer in front of its Resizer, its webdataset
    writer) on one shard, in this process, with the polite, guarded urllib opener installed. Returns
    img2dataset's output folder and the shard's politeness counts."""
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
    # One resolver cache and one set of host slots per shard task, shared by its threads.
    resolver = netguard.CachingResolver(settings.dns_cache_seconds)
    limiter = HostLimiter(settings.max_connections_per_host)
    opener = PoliteOpener(settings.guard.opener(shard_deadline, resolver=resolver, gate=limiter), limiter,
                          settings.user_agent, settings.throttle_retries, settings.retry_backoff_s,
                          settings.max_retry_wait_s)
    previous_opener = urllib.request._opener  # restored so the worker process is left as found
    urllib.request.install_opener(opener)
    try:
        downloader.download_shard((shard_id, shard_file))
    finally:
        urllib.request.install_opener(previous_opener)
    politeness = {"throttled_retried": opener.retried, "throttled_not_retried": opener.gave_up,
                  "waited_for_host": limiter.waits, "peak_connections_per_host": max(limiter.peak.values(), default=0),
                  "dns_lookups": resolver.lookups, "dns_cache_hits": resolver.hits}
    return out_dir, politeness


def read_shard_input(plan: ShardPlan, settings: ShardSettings) -> tuple[pa.Table, dict[str, int], pa.Array]:
    """The shard's input rows (URL, TEXT, the stored columns; invalid UTF-8 repaired), the repairs, its uids
    (checked unique and non-null)."""
    read_columns = ["URL", "TEXT", *settings.columns]
    table = pa.concat_tables([read_slice(uri, a, b, read_columns) for uri, a, b in plan.slices])
    if table.num_rows != plan.num_rows:
        raise RuntimeError(f"shard {plan.name}: read {table.num_rows} input rows, planned {plan.num_rows}")
    table, repaired = repair_utf8(table, plan.name)
    uids = table.column("uid").combine_chunks()
    if uids.null_count or pc.count_distinct(uids).as_py() != len(uids):
        raise DownloadInputError(f"shard {plan.name} (input {plan.slices[0][0]}...): column 'uid' has null or "
                                 f"duplicate values; the filter phase guarantees unique uids")
    return table, repaired, uids


def download_shard(plan: ShardPlan, settings: ShardSettings, attempt: int = 0) -> dict:
    """Make shard `plan` complete on storage and return its summary (skips a verified one)."""
    existing = verify_shard(settings, plan)
    if existing is not None:
        return {**existing, "resumed": True}
    _remove_shard(settings, plan.name)  # leftovers of an interrupted attempt
    started = time.time()
    # Past this instant no request starts and no read waits: the shard's late URLs end as `timeout`.
    shard_deadline = time.monotonic() + settings.max_shard_seconds
    table, repaired, uids = read_shard_input(plan, settings)
    with tempfile.TemporaryDirectory(prefix=f"wurst-download-{plan.name}-", dir=settings.scratch_dir) as work:
        out_dir, politeness = _fetch_with_img2dataset(table, work, plan.shard_id, settings, shard_deadline)
        local = {"tar": os.path.join(out_dir, f"{plan.name}.tar"),
                 "parquet": os.path.join(out_dir, f"{plan.name}.parquet"),
                 "stats": os.path.join(out_dir, f"{plan.name}_stats.json")}
        for kind, path in local.items():
            if not os.path.exists(path):
                raise RuntimeError(f"shard {plan.name}: img2dataset wrote no {kind} file")
        results = pq.read_table(local["parquet"], columns=["uid", "status", "error_message"])
        succeeded, failures, examples = summarize_results(results, uids)
        record = shard_record(local["tar"], local["parquet"], settings.encode_format)
        tar_samples = record["tar_samples"]
        if tar_samples != succeeded:
            raise RuntimeError(f"shard {plan.name}: tar holds {tar_samples} images, results say {succeeded}")
        if succeeded + sum(failures.values()) != plan.num_rows:
            raise RuntimeError(f"shard {plan.name}: {succeeded} ok + {sum(failures.values())} failed "
                               f"!= {plan.num_rows} input rows")
        with open(local["stats"]) as f:
            stats = json.load(f)
        summary = {"shard": plan.name, "input_rows": plan.num_rows, "succeeded": succeeded,
                   "failures": dict(sorted(failures.items())), "failure_examples": examples,
                   "repaired": repaired, "politeness": politeness,
                   "tar_bytes": record["tar_bytes"], "record": record, "attempt": attempt,
                   "duration_s": round(time.time() - started, 3)}
        stats[STATS_SECTION] = summary
        # Data first, the stats file last: its presence (and its record) is what marks the shard complete.
        _publish(local["tar"], shard_files(settings.output_uri, plan.name)["tar"])
        _publish(local["parquet"], shard_files(settings.output_uri, plan.name)["parquet"])
        storage.write_json(shard_files(settings.output_uri, plan.name)["stats"], stats)
    return {**summary, "resumed": False}


# --------------------------------------------------------------------------------------------
# A shard of a version that reuses earlier downloads of the same source: fetch only the difference


SELECTION_LAYOUT = "selection"  # the stats' `layout` of a shard written with a selection
FETCHED, REUSED = "fetched", "reused"


def version_key(shard_id: int, row: int, shard_size: int, digits: int) -> str:
    """The key img2dataset gives row `row` of shard `shard_id` (its `compute_key`): a selection's rows keep
    the keys a download of the whole version would have given them, unique within the version."""
    oom = math.ceil(math.log10(shard_size)) if shard_size > 1 else 0
    return f"{10 ** oom * shard_id + row:0{oom + digits}d}"


def _selection_record(selection_path: str, tar_path: Optional[str]) -> dict:
    record = {"format": RECORD_FORMAT, "selection_bytes": os.path.getsize(selection_path), "tar_bytes": None}
    if tar_path is not None:
        size = os.path.getsize(tar_path)
        record.update(tar_bytes=size, edge_sha256=_edge_digest(tar_path, size))
    return record


def verify_selection_shard(settings: ShardSettings, plan: ShardPlan) -> Optional[dict]:
    """The recorded summary of a selection shard that is complete on storage (sizes of its selection and
    own tar, the tar's first / last 64 KiB), else None."""
    paths = shard_files(settings.output_uri, plan.name)
    try:
        if not storage.exists(paths["stats"]):
            return None
        summary = storage.read_json(paths["stats"]).get(STATS_SECTION) or {}
        record = summary.get("record") or {}
        why = None
        if summary.get("layout") != SELECTION_LAYOUT or summary.get("input_rows") != plan.num_rows:
            why = "it was not written as a selection of this plan"
        elif storage.file_info(paths["selection"]).size != record.get("selection_bytes"):
            why = "the selection's size differs from what was written"
        elif record.get("tar_bytes") is not None:
            size = storage.file_info(paths["tar"]).size
            if size != record["tar_bytes"] or _edge_digest(paths["tar"], size) != record["edge_sha256"]:
                why = "its own tar differs from what was written"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = f"{type(exc).__name__}: {exc}"
    if why is not None:
        log.warning("shard %s: existing files do not verify (%s); downloading it again", plan.name, why)
        return None
    return summary


def download_selection_shard(plan: ShardPlan, settings: ShardSettings, reuse: pa.Table, attempt: int = 0) -> dict:
    """Shard `plan` of a version that reuses earlier downloads: `reuse` holds what earlier versions of the
    same source have for some of its uids (uid, status, reason, tar, key, members: see `pipelines.download`).
    Only the other rows are fetched (into this shard's own NNNNN.tar / NNNNN.parquet); the shard's
    NNNNN_selection.parquet lists every input row in input order: fetched or reused, success (with the tar
    and the members' offsets holding it) or failure (with its reason). The stats file is written last."""
    stats_uri = shard_files(settings.output_uri, plan.name)["stats"]
    if storage.exists(stats_uri) and \
            (storage.read_json(stats_uri).get(STATS_SECTION) or {}).get("layout") != SELECTION_LAYOUT:
        existing = verify_shard(settings, plan)  # completed without a selection (before the pool had anything)
    else:
        existing = verify_selection_shard(settings, plan)
    if existing is not None:
        return {**existing, "resumed": True}
    _remove_shard(settings, plan.name)
    started = time.time()
    shard_deadline = time.monotonic() + settings.max_shard_seconds
    table, repaired, uids = read_shard_input(plan, settings)
    held = {row["uid"]: row for row in reuse.to_pylist()}
    fetch_mask = pc.invert(pc.is_in(uids, value_set=reuse.column("uid").combine_chunks()))
    to_fetch = table.filter(fetch_mask)
    version = storage.basename(settings.output_uri)
    own_tar = f"{version}/{plan.name}.tar"
    fetched: dict[str, dict] = {}
    politeness: dict = {}
    failures_new: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    paths = shard_files(settings.output_uri, plan.name)
    with tempfile.TemporaryDirectory(prefix=f"wurst-download-{plan.name}-", dir=settings.scratch_dir) as work:
        local_tar = None
        if to_fetch.num_rows:
            out_dir, politeness = _fetch_with_img2dataset(to_fetch, work, plan.shard_id, settings, shard_deadline)
            local_tar = os.path.join(out_dir, f"{plan.name}.tar")
            local_parquet = os.path.join(out_dir, f"{plan.name}.parquet")
            for path in (local_tar, local_parquet):
                if not os.path.exists(path):
                    raise RuntimeError(f"shard {plan.name}: img2dataset wrote no {os.path.basename(path)}")
            results = pq.read_table(local_parquet, columns=["uid", "key", "status", "error_message"])
            succeeded_new, failures_new, examples = summarize_results(results, to_fetch.column("uid").combine_chunks())
            index = image_shards.tar_member_index(local_tar)
            for row in results.to_pylist():
                if row["status"] == "success":
                    if row["key"] not in index:
                        raise RuntimeError(f"shard {plan.name}: {row['key']} is a success but not in the tar")
                    fetched[row["uid"]] = {"status": "success", "reason": None, "tar": own_tar,
                                           "members": json.dumps({e: list(v) for e, v in index[row["key"]].items()})}
                else:
                    fetched[row["uid"]] = {"status": "failed", "reason": failure_reason(row["status"], row["error_message"]),
                                           "tar": None, "members": None}
            if len(index) != succeeded_new:
                raise RuntimeError(f"shard {plan.name}: tar holds {len(index)} samples, results say {succeeded_new}")
        # Reused successes recorded without offsets (an earlier version's own tar): its headers, once per tar.
        indexes: dict[str, dict] = {}
        rows = []
        reused_failures: dict[str, int] = {}
        reused_samples = 0
        for i, uid in enumerate(uids.to_pylist()):
            key = version_key(plan.shard_id, i, settings.shard_size, settings.digits)
            if uid in held:
                entry, origin = held[uid], REUSED
                if entry["status"] == "success":
                    members = entry["members"]
                    if members is None:
                        tar_uri = image_shards.resolve_tar(paths["selection"], entry["tar"])
                        if tar_uri not in indexes:
                            indexes[tar_uri] = image_shards.tar_member_index(tar_uri)
                        parts = indexes[tar_uri].get(entry["key"])
                        if parts is None:
                            raise RuntimeError(f"shard {plan.name}: {entry['tar']} does not hold {entry['key']} "
                                               f"(uid {uid}), which its shard's results list as a success")
                        members = json.dumps({e: list(v) for e, v in parts.items()})
                    entry = {**entry, "members": members}
                    reused_samples += 1
                else:
                    reused_failures[entry["reason"]] = reused_failures.get(entry["reason"], 0) + 1
            elif uid in fetched:
                entry, origin = fetched[uid], FETCHED
            else:  # img2dataset gave no result row for it: counted by summarize_results as MISSING_ROWS
                entry, origin = {"status": "failed", "reason": MISSING_ROWS, "tar": None, "members": None}, FETCHED
            rows.append({"uid": uid, "key": key, "status": entry["status"], "reason": entry["reason"],
                         "origin": origin, "tar": entry["tar"] if entry["status"] == "success" else None,
                         "members": entry["members"] if entry["status"] == "success" else None})
        selection = pa.Table.from_pylist(rows, schema=image_shards.selection_schema())
        local_selection = os.path.join(work, f"{plan.name}{image_shards.SELECTION_SUFFIX}")
        pq.write_table(selection, local_selection)
        succeeded = sum(1 for r in rows if r["status"] == "success")
        failures: dict[str, int] = {}
        for r in rows:
            if r["status"] != "success":
                failures[r["reason"]] = failures.get(r["reason"], 0) + 1
        if succeeded + sum(failures.values()) != plan.num_rows:
            raise RuntimeError(f"shard {plan.name}: {succeeded} ok + {sum(failures.values())} failed != "
                               f"{plan.num_rows} input rows")
        record = _selection_record(local_selection, local_tar)
        summary = {"shard": plan.name, "layout": SELECTION_LAYOUT, "input_rows": plan.num_rows,
                   "succeeded": succeeded, "failures": dict(sorted(failures.items())),
                   "failure_examples": examples, "repaired": repaired, "politeness": politeness,
                   "fetched_rows": to_fetch.num_rows, "fetched_samples": to_fetch.num_rows - sum(failures_new.values()),
                   "fetched_failures": dict(sorted(failures_new.items())),
                   "reused_samples": reused_samples, "reused_failures": dict(sorted(reused_failures.items())),
                   "tar_bytes": record["tar_bytes"], "record": record, "attempt": attempt,
                   "duration_s": round(time.time() - started, 3)}
        if local_tar is not None:
            _publish(local_tar, paths["tar"])
            _publish(local_parquet, paths["parquet"])
        _publish(local_selection, paths["selection"])
        storage.write_json(paths["stats"], {"successes": succeeded, STATS_SECTION: summary})
    return {**summary, "resumed": False}


def run_shard(plan: ShardPlan, settings: ShardSettings, attempt: int = 0, reuse: Optional[pa.Table] = None) -> dict:
    """One shard task: a plain download (`download_shard`) when there is no earlier download of the same
    source to reuse, else a selection (`download_selection_shard`)."""
    if reuse is None:
        return download_shard(plan, settings, attempt)
    return download_selection_shard(plan, settings, reuse, attempt)
