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

from pipelines import image_shards, latent_shards, storage
from pipelines.image_shards import IMAGE_EXTENSIONS, iter_tar_samples
from pipelines.phase import InputError

# A shard's chunk parts while it is being computed: <output>/_parts/<shard>/chunk-NNNNNN.parquet.
PARTS_DIR = "_parts"


class PrecomputeError(InputError):
    """Bad input data or a broken invariant; the message names the file and what is wrong."""


def chunk_file(out_dir: str, shard: str, chunk: int, split: str = "train") -> str:
    prefix = "" if split == "train" else "val-"
    return storage.join(out_dir, PARTS_DIR, shard, f"{prefix}chunk-{chunk:06d}.parquet")


# ---------------------------------------------------------------------------------------------
# Reading and decoding


def decode_image(data: bytes, size: int, max_pixels: int | None = None) -> tuple[np.ndarray, Optional[str]]:
    """Image bytes -> (size, size, 3) uint8 RGB, covering the square and center-cropped, and the
    original mode when it was converted (grayscale, CMYK, palette, alpha) else None. Raises PIL's
    errors for undecodable data, and DecompressionBombError above `max_pixels` (checked from the
    header, before any pixel is decoded)."""
    from PIL import Image

    # Only the formats shards hold: no plug-in (EPS runs Ghostscript) reaches untrusted bytes.
    with Image.open(io.BytesIO(data), formats=image_shards.SHARD_IMAGE_FORMATS) as image:
        if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
            raise Image.DecompressionBombError(
                f"{image.size[0]}x{image.size[1]} = {image.size[0] * image.size[1]} pixels > max_image_pixels {max_pixels}")
        original_mode = image.mode
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that still covers `size`
        image.load()
        converted = None
        if image.mode != "RGB":
            converted = original_mode
            has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or \
                (image.mode == "P" and "transparency" in image.info)
            if has_alpha:
                # Transparent pixels become white, not the arbitrary colour stored under alpha 0.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                image = image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        resized = image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
        return np.asarray(resized, dtype=np.uint8), converted


def _failure_reason(exc: BaseException) -> str:
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return "decompression_bomb"
    return "decode_error"


def _read_sample(key: str, parts: dict[str, bytes], size: int, max_pixels: int
                 ) -> tuple[dict, Optional[np.ndarray]]:
    """One tar sample -> (record, pixels or None). record has uid/caption, or reason/detail if skipped."""
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
        pixels, converted = decode_image(parts[image_ext], size, max_pixels)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data; each is a counted skip
        return {**record, "reason": _failure_reason(exc), "detail": f"{type(exc).__name__}: {exc}"[:200]}, None
    if converted:
        record["converted"] = converted
    return record, pixels


def decode_shard(batch: dict[str, np.ndarray], *, chunk_size: int, size: int,
                 max_image_pixels: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF (one input shard per call) yielding one row per chunk of `chunk_size` input
    samples: `meta` (JSON: keys/uids/captions of decodable samples, skipped samples with reasons,
    conversions) and `pixels` (n x size x size x 3 uint8 bytes). The last chunk has is_last=True."""
    from PIL import Image

    # PIL itself only refuses above 2x its limit; decode_image enforces the limit exactly.
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    (name,), (tar_uri,) = batch["shard"], batch["tar"]

    def chunk_row(index: int, records: list[dict], pixels: list[np.ndarray], last: bool) -> dict:
        good = [r for r in records if "reason" not in r]
        meta = {
            "input_samples": len(records),
            "keys": [r["key"] for r in good], "uids": [r["uid"] for r in good],
            "captions": [r["caption"] for r in good],
            "skipped": [[r["key"], r.get("uid"), r["reason"], r["detail"]] for r in records if "reason" in r],
            "converted": dict(Counter(r["converted"] for r in good if "converted" in r)),
        }
        blob = np.stack(pixels).tobytes() if pixels else b""
        return {"shard": np.array([name]), "chunk": np.array([index]), "is_last": np.array([last]),
                "meta": np.array([json.dumps(meta)]), "pixels": np.array([blob], dtype=object)}

    records: list[dict] = []
    pixels: list[np.ndarray] = []
    index = 0
    for key, parts in iter_tar_samples(str(tar_uri)):
        if len(records) == chunk_size:
            yield chunk_row(index, records, pixels, False)
            records, pixels, index = [], [], index + 1
        record, image = _read_sample(key, parts, size, max_image_pixels)
        records.append(record)
        if image is not None:
            pixels.append(image)
    yield chunk_row(index, records, pixels, True)


# ---------------------------------------------------------------------------------------------
# Writing: chunk parts, then one shard file per input shard


def write_chunk(batch: dict[str, np.ndarray], *, out_dir: str, shapes: dict[str, list[int]],
                row_group_size: int, validation_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Ray Data UDF: an encoded chunk -> `_parts/<shard>/chunk-NNNNNN.parquet` (training split) and,
    when the chunk holds validation samples, `_parts/<shard>/val-chunk-NNNNNN.parquet`; returns the
    chunk's bookkeeping (no tensors) for the driver."""
    import pyarrow as pa

    (shard,), (chunk,) = batch["shard"], batch["chunk"]
    meta = json.loads(batch["meta"][0])
    table = latent_shards.shard_table(meta["keys"], meta["uids"], meta["captions"],
                                      {name: batch[name][0] for name in shapes if name in batch}, shapes)
    held_out = latent_shards.is_validation(meta["uids"], validation_fraction)
    train = table.filter(pa.array(~held_out)) if held_out.any() else table
    latent_shards.write_shard(chunk_file(out_dir, str(shard), int(chunk)), [train], shapes, row_group_size)
    if held_out.any():
        latent_shards.write_shard(chunk_file(out_dir, str(shard), int(chunk), "validation"),
                                  [table.filter(pa.array(held_out))], shapes, row_group_size)
    summary = {"written": train.num_rows, "validation_written": int(held_out.sum()),
               "input_samples": meta["input_samples"], "skipped": meta["skipped"], "converted": meta["converted"]}
    return {"shard": batch["shard"], "chunk": batch["chunk"], "is_last": batch["is_last"],
            "summary": np.array([json.dumps(summary)])}


def finalize_shard(out_dir: str, shard: str, source: str, chunk_summaries: list[dict],
                   shapes: dict[str, list[int]], row_group_size: int) -> dict:
    """Concatenate a shard's chunk parts in order into `val/<shard>.parquet` (when the shard holds
    validation samples) and then `<shard>.parquet` (the training split, with the shard's counts in its
    footer): the training file comes last because its existence marks the shard done."""
    import pyarrow.parquet as pq

    parts_dir = storage.join(out_dir, PARTS_DIR, shard)
    stats = {
        "source": source,
        "input_samples": sum(s["input_samples"] for s in chunk_summaries),
        "written": sum(s["written"] for s in chunk_summaries),  # the training split
        "validation_written": sum(s.get("validation_written", 0) for s in chunk_summaries),
        "skipped_by_reason": dict(Counter(item[2] for s in chunk_summaries for item in s["skipped"])),
        "converted_by_mode": dict(sum((Counter(s["converted"]) for s in chunk_summaries), Counter())),
        "skipped_samples": [item for s in chunk_summaries for item in s["skipped"]],
    }
    skipped = sum(stats["skipped_by_reason"].values())
    if stats["input_samples"] != stats["written"] + stats["validation_written"] + skipped:
        raise PrecomputeError(f"{source}: {stats['input_samples']} input samples != {stats['written']} written "
                              f"(training) + {stats['validation_written']} (validation) + {skipped} skipped")

    def tables(split: str):
        for chunk, summary in enumerate(chunk_summaries):
            if split == "validation" and not summary.get("validation_written"):
                continue  # no validation part for this chunk
            with storage.open_input(chunk_file(out_dir, shard, chunk, split)) as handle:
                yield pq.read_table(handle)

    if stats["validation_written"]:
        uri = storage.join(out_dir, latent_shards.validation_file(f"{shard}.parquet"))
        rows = latent_shards.write_shard(uri, tables("validation"), shapes, row_group_size,
                                         {"source": source, "split": "validation",
                                          "written": stats["validation_written"]})
        if rows != stats["validation_written"]:
            raise PrecomputeError(f"{source}: wrote {rows} validation rows, the chunks reported "
                                  f"{stats['validation_written']}")
    rows = latent_shards.write_shard(storage.join(out_dir, f"{shard}.parquet"), tables("train"), shapes,
                                     row_group_size, stats)
    if rows != stats["written"]:
        raise PrecomputeError(f"{source}: wrote {rows} rows, the chunks reported {stats['written']}")
    storage.delete(parts_dir)
    return stats
