"""The CPU side of `precompute`, run in Ray Data tasks: input shards in, latent shard files out.

`decode_shard` reads one input tar (`pipelines.image_shards`), decodes and center-crops its images
with PIL and hands them on in chunks of ``batch_size`` samples (undecodable samples are skipped with
a named reason); after the encoder actors (`pipelines.precompute_encoders`), `write_chunk` splits
each encoded chunk by uid into the training and validation splits (`latent_shards.is_validation`) and
stores each as a part file, and `finalize_shard` concatenates a shard's parts in order into its
files: ``val/<shard>.parquet`` (if it holds any sample), then ``<shard>.parquet``, whose existence
marks the shard done (`pipelines.latent_shards`). No torch here, so these workers stay light.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np

from pipelines import image_shards, latent_reuse, latent_shards, storage
from pipelines.image_shards import IMAGE_EXTENSIONS
from pipelines.phase import InputError

# The skip reason of a sample a dedup_images output names as a copy of another (precompute's `exclude`).
DUPLICATE_IMAGE = "duplicate_image"
# A shard's chunk parts while it is being computed: <output>/_parts/<shard>/chunk-NNNNNN.parquet.
PARTS_DIR = "_parts"
SHARD_STATS_DIR = "shards"  # bucketed datasets: shards/<shard>.json per finished shard


class PrecomputeError(InputError):
    """Bad input data or a broken invariant; the message names the file and what is wrong."""


def chunk_file(out_dir: str, shard: str, chunk: int, split: str = "train") -> str:
    prefix = "" if split == "train" else "val-"
    return storage.join(out_dir, PARTS_DIR, shard, f"{prefix}chunk-{chunk:06d}.parquet")


# ---------------------------------------------------------------------------------------------
# Reading and decoding


def _open_rgb(data: bytes, max_pixels: int | None, target: tuple[int, int] | None):
    """(opened RGB PIL image, original mode if converted else None). `target` (h, w): decode JPEGs at a
    reduced scale that still covers the crop of that aspect at that size."""
    from PIL import Image

    # Only the formats shards hold: no plug-in (EPS runs Ghostscript) reaches untrusted bytes.
    image = Image.open(io.BytesIO(data), formats=image_shards.SHARD_IMAGE_FORMATS)
    try:
        if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
            raise Image.DecompressionBombError(
                f"{image.size[0]}x{image.size[1]} = {image.size[0] * image.size[1]} pixels > max_image_pixels {max_pixels}")
        original_mode = image.mode
        if target is not None:
            # JPEG: the largest 1/k scale with both sides >= target's; the crop then still covers target, as
            # the crop spans one full side of the image.
            image.draft("RGB", (target[1], target[0]))
        image.load()
        if image.mode == "RGB":
            return image, None
        has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or \
            (image.mode == "P" and "transparency" in image.info)
        if has_alpha:
            # Transparent pixels become white, not the arbitrary colour stored under alpha 0.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            converted = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            converted = image.convert("RGB")
        image.close()
        return converted, original_mode
    except BaseException:
        image.close()
        raise


def _crop_size(width: int, height: int, target: tuple[int, int]) -> tuple[float, float]:
    """(w, h) of the largest centered crop of a width x height image with target's (h, w) aspect ratio."""
    aspect = target[1] / target[0]
    return (height * aspect, height) if width / height > aspect else (width, width / aspect)


def _crop_resize(image, target: tuple[int, int]) -> np.ndarray:
    """The centered crop of `image` at target's aspect ratio, resized to target (h, w): uint8 (h, w, 3)."""
    from PIL import Image

    width, height = image.size
    crop_w, crop_h = _crop_size(width, height, target)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    resized = image.resize((target[1], target[0]), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    return np.asarray(resized, dtype=np.uint8)


def decode_image(data: bytes, size: int, max_pixels: int | None = None) -> tuple[np.ndarray, Optional[str]]:
    """Image bytes -> (size, size, 3) uint8 RGB, covering the square and center-cropped, and the
    original mode when it was converted (grayscale, CMYK, palette, alpha) else None. Raises PIL's
    errors for undecodable data, and DecompressionBombError above `max_pixels` (checked from the
    header, before any pixel is decoded)."""
    pixels, converted, _ = decode_bucketed(data, [(size, size)], max_pixels)
    return pixels, converted


def decode_bucketed(data: bytes, sizes: list, max_pixels: int | None = None
                    ) -> tuple[np.ndarray, Optional[str], int]:
    """`decode_image` into the bucket (sizes: [h, w] each) nearest the image's aspect ratio
    (`latent_buckets.assign_buckets`): (h, w, 3) uint8 pixels, the converted mode, the bucket index."""
    from pipelines.latent_buckets import assign_buckets
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=image_shards.SHARD_IMAGE_FORMATS) as header:
        width, height = header.size  # the header only: choose the bucket before decoding
    bucket = int(assign_buckets([width], [height], sizes)[0]) if len(sizes) > 1 else 0
    target = (int(sizes[bucket][0]), int(sizes[bucket][1]))
    image, converted = _open_rgb(data, max_pixels, target)
    with image:
        return _crop_resize(image, target), converted, bucket


def _failure_reason(exc: BaseException) -> str:
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return "decompression_bomb"
    return "decode_error"


def _read_sample(key: str, parts: dict[str, bytes], size: int | list, max_pixels: int,
                 excluded: Optional[dict[str, str]] = None, reused: Optional[set[str]] = None
                 ) -> tuple[dict, Optional[np.ndarray]]:
    """One tar sample -> (record, pixels or None). record has uid/caption (and `bucket` when `size` is a
    list of bucket sizes), or reason/detail if skipped (`excluded`: uid -> the uid it is a copy of)."""
    record: dict[str, Any] = {"key": key}
    lost = image_shards.truncated_detail(parts)
    if lost is not None:  # a sample the shard's truncated tar lost (image_shards.iter_tar_samples)
        return {**record, "reason": image_shards.TRUNCATED_TAR, "detail": lost[:200]}, None
    if "json" not in parts:
        return {**record, "reason": "missing_json", "detail": f"no {key}.json"}, None
    try:
        meta = json.loads(parts["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        return {**record, "reason": "bad_json", "detail": str(exc)[:200]}, None
    uid = meta.get("uid") if isinstance(meta, dict) else None
    if not isinstance(uid, str) or not uid:
        return {**record, "reason": "missing_uid", "detail": f"{key}.json has no string 'uid'"}, None
    record["uid"] = uid
    if excluded and uid in excluded:  # before decoding: a copy costs no decode
        return {**record, "reason": DUPLICATE_IMAGE, "detail": f"a copy of {excluded[uid]}"}, None
    if reused and uid in reused:  # encoded by an earlier version: copied when the shard is finalized
        return {**record, "reused": True}, None
    caption = meta.get("caption")
    if not isinstance(caption, str):
        caption = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else None
    if caption is None:
        return {**record, "reason": "missing_caption", "detail": f"{key} has no caption in .json or .txt"}, None
    record["caption"] = caption
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if image_ext is None:
        return {**record, "reason": "missing_image", "detail": f"{key} has none of {IMAGE_EXTENSIONS}"}, None
    if size == 0:  # text-only run: images are not decoded
        return record, None
    try:
        if isinstance(size, list):
            pixels, converted, record["bucket"] = decode_bucketed(parts[image_ext], size, max_pixels)
        else:
            pixels, converted = decode_image(parts[image_ext], size, max_pixels)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data; each is a counted skip
        return {**record, "reason": _failure_reason(exc), "detail": f"{type(exc).__name__}: {exc}"[:200]}, None
    if converted:
        record["converted"] = converted
    return record, pixels


def decode_shard(batch: dict[str, np.ndarray], *, chunk_size: int, size: int, max_image_pixels: int,
                 buckets: list | None = None, exclude: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF (one input shard per call) yielding one row per chunk: `meta` (JSON: keys/uids/captions
    of decodable samples, skipped samples with reasons, conversions, the bucket) and `pixels` (n x h x w x 3
    uint8 bytes). Unbucketed: a chunk is `chunk_size` consecutive input samples at size x size. With
    `buckets` ([h, w] decode sizes): each image goes to its bucket (`decode_bucketed`) and a chunk is up to
    `chunk_size` decoded samples of one bucket, in input order within it; skipped samples ride with the
    next chunk. The last chunk has is_last=True. `exclude`: a dedup_images output; this shard's copies it
    names are skipped as DUPLICATE_IMAGE."""
    from PIL import Image

    # PIL itself only refuses above 2x its limit; decode_image enforces the limit exactly.
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    (name,), (tar_uri,) = batch["shard"], batch["tar"]
    reused = latent_reuse.reused_uids(str(batch["reuse"][0])) if "reuse" in batch else set()

    def chunk_row(index: int, records: list[dict], pixels: list[np.ndarray], last: bool, bucket: int = 0) -> dict:
        good = [r for r in records if "reason" not in r and not r.get("reused")]
        meta = {
            "reused": [[r["key"], r["uid"]] for r in records if r.get("reused")],
            "input_samples": len(records), "bucket": bucket,
            "keys": [r["key"] for r in good], "uids": [r["uid"] for r in good],
            "captions": [r["caption"] for r in good],
            "skipped": [[r["key"], r.get("uid"), r["reason"], r["detail"]] for r in records if "reason" in r],
            "converted": dict(Counter(r["converted"] for r in good if "converted" in r)),
        }
        blob = np.stack(pixels).tobytes() if pixels else b""
        return {"shard": np.array([name]), "chunk": np.array([index]), "is_last": np.array([last]),
                "meta": np.array([json.dumps(meta)]), "pixels": np.array([blob], dtype=object)}

    excluded = None
    if exclude:
        from pipelines import dedup_images

        excluded = dedup_images.excluded_uids(exclude, image_shards.source_name(str(tar_uri)))
    samples = image_shards.iter_shard_samples(str(tar_uri))  # a tar, or a selection's samples only
    if buckets is None:
        records: list[dict] = []
        pixels: list[np.ndarray] = []
        index = 0
        for key, parts in samples:
            if len(records) == chunk_size:
                yield chunk_row(index, records, pixels, False)
                records, pixels, index = [], [], index + 1
            record, image = _read_sample(key, parts, size, max_image_pixels, excluded, reused)
            records.append(record)
            if image is not None:
                pixels.append(image)
        yield chunk_row(index, records, pixels, True)
        return

    sizes = [[int(h), int(w)] for h, w in buckets]
    pending: list[tuple[list[dict], list[np.ndarray]]] = [([], []) for _ in sizes]
    skipped: list[dict] = []  # skipped samples not yet in a chunk
    index = 0
    for key, parts in samples:
        record, image = _read_sample(key, parts, sizes if size else 0, max_image_pixels, excluded, reused)
        if "reason" in record or record.get("reused"):  # no bucket: rides with the next chunk
            skipped.append(record)
            continue
        bucket = int(record.pop("bucket", 0))
        records, pixels = pending[bucket]
        records.append(record)
        if image is not None:
            pixels.append(image)
        if len(records) == chunk_size:
            yield chunk_row(index, skipped + records, pixels, False, bucket)
            pending[bucket], skipped, index = ([], []), [], index + 1
    left = [b for b, (records, _) in enumerate(pending) if records]
    for position, bucket in enumerate(left):
        records, pixels = pending[bucket]
        yield chunk_row(index, skipped + records, pixels, position == len(left) - 1, bucket)
        skipped, index = [], index + 1
    if not left:  # the last chunk: the skipped samples left over, or nothing
        yield chunk_row(index, skipped, [], True)


# ---------------------------------------------------------------------------------------------
# Writing: chunk parts, then one shard file per input shard


def write_chunk(batch: dict[str, np.ndarray], *, out_dir: str, shapes: dict[str, list[int]],
                row_group_size: int, validation_fraction: float = 0.0,
                bucket_shapes: list[dict[str, list[int]]] | None = None) -> dict[str, np.ndarray]:
    """Ray Data UDF: an encoded chunk -> `_parts/<shard>/chunk-NNNNNN.parquet` (training split) and,
    when the chunk holds validation samples, `_parts/<shard>/val-chunk-NNNNNN.parquet`; returns the
    chunk's bookkeeping (no tensors) for the driver. `bucket_shapes`: per bucket, its column shapes (the
    chunk's bucket picks them)."""
    import pyarrow as pa

    (shard,), (chunk,) = batch["shard"], batch["chunk"]
    meta = json.loads(batch["meta"][0])
    bucket = int(meta.get("bucket", 0))
    if bucket_shapes is not None:
        shapes = bucket_shapes[bucket]
    table = latent_shards.shard_table(meta["keys"], meta["uids"], meta["captions"],
                                      {name: batch[name][0] for name in shapes if name in batch}, shapes)
    held_out = latent_shards.is_validation(meta["uids"], validation_fraction)
    train = table.filter(pa.array(~held_out)) if held_out.any() else table
    latent_shards.write_shard(chunk_file(out_dir, str(shard), int(chunk)), [train], shapes, row_group_size)
    if held_out.any():
        latent_shards.write_shard(chunk_file(out_dir, str(shard), int(chunk), "validation"),
                                  [table.filter(pa.array(held_out))], shapes, row_group_size)
    summary = {"written": train.num_rows, "validation_written": int(held_out.sum()), "bucket": bucket,
               "input_samples": meta["input_samples"], "skipped": meta["skipped"], "converted": meta["converted"],
               "reused": meta.get("reused", [])}
    return {"shard": batch["shard"], "chunk": batch["chunk"], "is_last": batch["is_last"],
            "summary": np.array([json.dumps(summary)])}


def finalize_shard(out_dir: str, shard: str, source: str, chunk_summaries: list[dict],
                   shapes: dict[str, list[int]], row_group_size: int, buckets: list[str] | None = None,
                   bucket_shapes: list[dict[str, list[int]]] | None = None, reuse_file: str | None = None) -> dict:
    """Concatenate a shard's chunk parts in order into `val/<shard>.parquet` (when the shard holds
    validation samples) and then `<shard>.parquet` (the training split, with the shard's counts in its
    footer): the training file comes last because its existence marks the shard done. With `buckets`
    (names, and `bucket_shapes`): per bucket that holds samples `<bucket>/val/<shard>.parquet` and
    `<bucket>/<shard>.parquet`, then `shards/<shard>.json` (the counts, per bucket too), which marks it done.
    `reuse_file`: the shard's samples another version encoded (`pipelines.latent_reuse`); their rows are copied
    after the computed ones, into the split and bucket they were written to there."""
    import pyarrow.parquet as pq

    parts_dir = storage.join(out_dir, PARTS_DIR, shard)
    reused = {uid: key for s in chunk_summaries for key, uid in s.get("reused", [])}
    copied: dict = {}
    if reused:
        by_bucket = {name: bucket_shapes[i] for i, name in enumerate(buckets)} if buckets is not None else {"": shapes}
        copied = latent_reuse.copied_rows(reuse_file, reused, by_bucket)
        if sum(t.num_rows for t in copied.values()) != len(reused):
            raise PrecomputeError(f"{source}: {len(reused)} samples to copy from earlier versions, found "
                                  f"{sum(t.num_rows for t in copied.values())} in {reuse_file}")
    copied_count = {split: sum(t.num_rows for (sp, _), t in copied.items() if sp == split)
                    for split in ("train", "validation")}
    stats = {
        "source": source,
        "input_samples": sum(s["input_samples"] for s in chunk_summaries),
        "written": sum(s["written"] for s in chunk_summaries) + copied_count["train"],  # the training split
        "validation_written": sum(s.get("validation_written", 0) for s in chunk_summaries) + copied_count["validation"],
        "reused": len(reused),  # of written + validation_written: copied from earlier versions, not encoded
        "skipped_by_reason": dict(Counter(item[2] for s in chunk_summaries for item in s["skipped"])),
        "converted_by_mode": dict(sum((Counter(s["converted"]) for s in chunk_summaries), Counter())),
        "skipped_samples": [item for s in chunk_summaries for item in s["skipped"]],
    }
    skipped = sum(stats["skipped_by_reason"].values())
    if stats["input_samples"] != stats["written"] + stats["validation_written"] + skipped:
        raise PrecomputeError(f"{source}: {stats['input_samples']} input samples != {stats['written']} written "
                              f"(training) + {stats['validation_written']} (validation) + {skipped} skipped")

    def tables(split: str, bucket: int = 0):
        for chunk, summary in enumerate(chunk_summaries):
            if int(summary.get("bucket", 0)) != bucket:
                continue
            if split == "validation" and not summary.get("validation_written"):
                continue  # no validation part for this chunk
            if split == "train" and buckets is not None and not summary["written"]:
                continue
            with storage.open_input(chunk_file(out_dir, shard, chunk, split)) as handle:
                yield pq.read_table(handle)
        extra = copied.get((split, buckets[bucket] if buckets is not None else ""))
        if extra is not None:
            yield extra

    def write(file: str, split: str, bucket: int, expected: int, shard_stats: dict, columns) -> None:
        rows = latent_shards.write_shard(storage.join(out_dir, file), tables(split, bucket), columns,
                                         row_group_size, shard_stats)
        if rows != expected:
            raise PrecomputeError(f"{source}: wrote {rows} {split} rows to {file}, the chunks reported {expected}")

    if buckets is None:
        if stats["validation_written"]:
            write(latent_shards.validation_file(f"{shard}.parquet"), "validation", 0, stats["validation_written"],
                  {"source": source, "split": "validation", "written": stats["validation_written"]}, shapes)
        write(f"{shard}.parquet", "train", 0, stats["written"], stats, shapes)
    else:
        per_bucket = {}
        for index, name in enumerate(buckets):
            counts = {split: sum(s.get(field, 0) for s in chunk_summaries if int(s.get("bucket", 0)) == index)
                      + (copied[(split, name)].num_rows if (split, name) in copied else 0)
                      for split, field in (("train", "written"), ("validation", "validation_written"))}
            per_bucket[name] = {"written": counts["train"], "validation_written": counts["validation"]}
            for split, file in (("validation", latent_shards.validation_file(f"{shard}.parquet")),
                                ("train", f"{shard}.parquet")):
                if counts[split]:
                    write(f"{name}/{file}", split, index, counts[split],
                          {"source": source, "split": split, "bucket": name, "written": counts[split]},
                          bucket_shapes[index])
        storage.write_json(shard_stats_file(out_dir, shard), {**stats, "buckets": per_bucket})
    storage.delete(parts_dir)
    return stats


def shard_stats_file(out_dir: str, shard: str) -> str:
    """A bucketed dataset's per-shard counts, written last: its existence marks the shard done."""
    return storage.join(out_dir, SHARD_STATS_DIR, f"{shard}.json")
