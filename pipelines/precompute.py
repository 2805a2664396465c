"""`python -m pipelines.precompute`: text embeddings and image latents, computed once into shards.

CLIP text states, Semantic-Compressor latents and Stage A latents are computed once from a
`download` output into columnar shards that training reads column by column.

    python -m pipelines.precompute --config configs/precompute.yaml --input data/images/<version>

Data flow (Ray Data, streaming; nothing is materialised whole):

0. the encoders are probed once (output shapes, the empty caption's embedding), on a GPU when the
   actors use GPUs, else in the driver;
1. one task per input shard ``NNNNN.tar`` reads the tar sequentially, groups members by webdataset
   key, decodes each image with PIL on CPU (grayscale / CMYK / palette / alpha converted to RGB and
   counted; undecodable images skipped with a named reason), center-crops and resizes it to the
   largest configured resolution, and emits *chunks* of ``batch_size`` consecutive input samples;
2. an actor pool (one actor per GPU, or CPU actors) runs the encoders on each chunk, so a batch
   never mixes shards and always holds the same samples: a rerun computes bit-identical outputs;
3. a task writes each encoded chunk as a part file; when all chunks of a shard are in, the driver
   starts a task that concatenates them in order into ``shard-NNNNN.parquet`` (temp name + rename).

Output ``<output root>/<version>/``: ``shard-NNNNN.parquet`` per input ``NNNNN.tar`` with columns
``key``, ``uid``, ``caption`` and float16 tensor columns stored as flat fixed-size lists
(``text_emb`` 77 x width, ``semantic`` 16 x h x w raw BatchNorm output, ``stage_a`` 4 x H/4 x W/4
unquantized latent / scale factor); per-shard counts in each file's footer; ``empty_text_emb.npy``
(the empty caption's embedding, for guidance dropout); ``manifest.json`` last, with counts, column
shapes and dtypes, per-shard row counts, encoder checkpoint hashes, the config and the input's
manifest hash. Read it with ``pipelines.latent_shards.LatentDataset``.

Resume: shards whose final file exists are skipped; unfinished shards are redone from scratch; a run
whose manifest exists is a no-op. Input samples = written + skipped, checked per shard and in total.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import sys
import tarfile
import time
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from pipelines import config as config_lib
from pipelines import manifest as manifest_lib
from pipelines import storage, tracking
from pipelines.config import ConfigError, param
from pipelines.runtime import RayConfig, default_data_root, init_ray

PHASE = "precompute"
STRING_COLUMNS = ("uid", "caption", "key")
OUTPUTS = ("text", "semantic", "stage_a")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PARTS_DIR = "_parts"
EMPTY_TEXT_FILE = "empty_text_emb.npy"
STATS_KEY = b"wurst.precompute.stats"
SHAPE_KEY = b"shape"
SEMANTIC_STRIDE = 32  # EfficientNet trunks downsample by 32: 768 px -> 24 x 24
PRECISIONS = ("bfloat16", "float16", "float32")

log = logging.getLogger("wurst.precompute")


class PrecomputeError(RuntimeError):
    """Bad input data or a broken invariant; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------
# The shard format (read by `pipelines.latent_shards`); no torch here, so CPU workers stay light


def shard_schema(tensor_shapes: dict[str, Any]):
    """key, uid, caption (strings) + one flat fixed-size list of float16 per tensor column."""
    fields = [pa.field(name, pa.string(), nullable=False) for name in STRING_COLUMNS]
    for name, shape in tensor_shapes.items():
        fields.append(pa.field(name, pa.list_(pa.float16(), int(np.prod(shape))), nullable=False))
    return pa.schema(fields)


def tensor_column(values: np.ndarray):
    """(n, *shape) array -> flat fixed-size list float16 array of n rows (zero-copy for float16)."""
    values = np.ascontiguousarray(values, dtype=np.float16)
    width = int(np.prod(values.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def parquet_writer_options(schema) -> dict[str, Any]:
    """Options for `pq.ParquetWriter`: strings zstd + dictionary; tensor columns uncompressed PLAIN
    without statistics. Dictionary-encoded float16 lists read ~15x slower, and fp16 latents do not
    compress, so PLAIN keeps the reader near memory speed (bench/precompute.py measures it)."""
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    tensors = [f.name for f in schema if not pa.types.is_string(f.type)]
    return {
        "compression": {**{n: "zstd" for n in strings}, **{n: "none" for n in tensors}},
        "use_dictionary": strings,
        "column_encoding": {n: "PLAIN" for n in tensors},
        "write_statistics": strings,
    }


# ---------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class EncodersConfig:
    # Checkpoint directories written by `stages.save` (local path or object-store URI).
    text: Optional[str] = None
    # Instead of `text`: a local open_clip weights file (the paper: ViT-H-14's
    # open_clip_pytorch_model.bin or open_clip_model.safetensors) and its open_clip model name.
    text_open_clip_weights: Optional[str] = None
    text_model: str = "ViT-H-14"
    semantic: Optional[str] = None
    stage_a: Optional[str] = None


@dataclasses.dataclass
class PrecomputeConfig:
    # A finished `download` output version: <data_root>/images/<version>.
    input: Optional[str] = None
    # Output root; the phase writes <output>/<version>/. Default <data_root>/latents.
    output: Optional[str] = None
    data_root: str = dataclasses.field(default_factory=default_data_root)
    # What to compute: Stage C trains on text + semantic; Stage B needs all three.
    outputs: list[str] = param(default_factory=lambda: list(OUTPUTS), choices=OUTPUTS)
    encoders: EncodersConfig = dataclasses.field(default_factory=EncodersConfig)
    # Semantic Compressor input size: 768 -> 16x24x24 latents, 384 -> 16x12x12 (multiple of 32).
    semantic_resolution: int = param(768, ge=32)
    # Stage A input size = Stage B training resolution: 512 -> 4x128x128, 1024 -> 4x256x256.
    stage_a_resolution: int = param(512, ge=8)
    # Compute precision of the encoders (outputs are always stored as float16).
    precision: str = param("bfloat16", choices=list(PRECISIONS))
    # PIL's decompression-bomb limit (pixels); larger images are skipped as `decompression_bomb`.
    max_image_pixels: int = param(178_956_970, ge=1)
    # Rows per parquet row group: the reader's unit of reading and of block shuffling.
    row_group_size: int = param(256, ge=1)
    # Input samples per encoder call; also the chunk a decode task hands to the actors.
    batch_size: int = param(64, ge=1)
    # Encoder actors (None: one per GPU of the cluster, or 1 CPU actor without GPUs).
    actors: Optional[int] = param(None, ge=1)
    cpus_per_actor: float = param(1.0, gt=0)
    # auto: GPUs when the Ray cluster has any.
    device: str = param("auto", choices=["auto", "cuda", "cpu"])
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
        if not self.outputs:
            raise ConfigError("outputs: choose at least one of " + ", ".join(OUTPUTS))
        if len(set(self.outputs)) != len(self.outputs):
            raise ConfigError(f"outputs: listed twice in {self.outputs}")
        enc = self.encoders
        if "text" in self.outputs:
            if not enc.text and not enc.text_open_clip_weights:
                raise ConfigError("encoders.text: required for output 'text' (a stages checkpoint directory), "
                                  "or set encoders.text_open_clip_weights to a local open_clip weights file")
            if enc.text and enc.text_open_clip_weights:
                raise ConfigError("encoders.text and encoders.text_open_clip_weights are alternatives; set one")
        for name in ("semantic", "stage_a"):
            if name in self.outputs and not getattr(enc, name):
                raise ConfigError(f"encoders.{name}: required for output '{name}' (a stages checkpoint directory)")
        if self.semantic_resolution % SEMANTIC_STRIDE:
            raise ConfigError(f"semantic_resolution: must be a multiple of {SEMANTIC_STRIDE} (paper: 384 or 768), "
                              f"got {self.semantic_resolution}")
        if self.stage_a_resolution % 4:
            raise ConfigError(f"stage_a_resolution: must be a multiple of 4 (Stage A is f4), got {self.stage_a_resolution}")


# Settings that do not change the output. Encoder paths are replaced by their content hashes.
VERSION_EXCLUDE = ("input", "output", "data_root", "ray", "mlflow", "batch_size", "actors", "cpus_per_actor",
                   "device", "encoders")


def image_outputs(cfg: PrecomputeConfig) -> list[str]:
    return [o for o in cfg.outputs if o in ("semantic", "stage_a")]


def decode_resolution(cfg: PrecomputeConfig) -> int:
    """The square size the CPU tasks produce: the largest the image encoders need."""
    sizes = {"semantic": cfg.semantic_resolution, "stage_a": cfg.stage_a_resolution}
    return max((sizes[o] for o in image_outputs(cfg)), default=0)


def require_input(cfg: PrecomputeConfig) -> str:
    if not cfg.input:
        raise ConfigError("input: required (a finished download output, e.g. data/images/<version>)")
    uri = storage.normalize(cfg.input)
    if not storage.is_dir(uri):
        raise ConfigError(f"input: {uri} is not a directory")
    if not manifest_lib.has_manifest(uri):
        raise ConfigError(f"input: {uri} has no manifest.json; is the download finished?")
    return uri


# ---------------------------------------------------------------------------------------------
# Encoder checkpoints: hashing and local copies


def _hash_file(uri: str, digest: Any) -> None:
    with storage.open_input(uri) as stream:
        while True:
            block = stream.read(8 << 20)
            if not block:
                break
            digest.update(block)


@functools.lru_cache(maxsize=32)
def _hash_cached(uri: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    if storage.is_dir(uri):
        for path in storage.list_files(uri, recursive=True):
            digest.update(os.path.relpath(path, uri).encode() + b"\0")
            _hash_file(path, digest)
    else:
        _hash_file(uri, digest)
    return digest.hexdigest()


def content_hash(uri: str) -> str:
    """sha256 over a checkpoint directory's files (names + bytes) or one weights file."""
    uri = storage.normalize(uri)
    if not storage.exists(uri):
        raise ConfigError(f"encoder checkpoint not found: {uri}")
    files = storage.list_files(uri, recursive=True) if storage.is_dir(uri) else [uri]
    infos = [storage.file_info(f) for f in files]
    return _hash_cached(uri, sum(i.size or 0 for i in infos), max((i.mtime_ns or 0) for i in infos) if infos else 0)


def encoder_sources(cfg: PrecomputeConfig) -> dict[str, dict]:
    """Per requested output: where its encoder comes from and the sha256 of its content."""
    enc = cfg.encoders
    sources: dict[str, dict] = {}
    if "text" in cfg.outputs:
        if enc.text:
            source = {"checkpoint": storage.normalize(enc.text), "sha256": content_hash(enc.text)}
            config_file = storage.join(enc.text, "config.json")
            weights = (storage.read_json(config_file).get("config") or {}).get("weights_path") \
                if storage.exists(config_file) else None
            if weights and not storage.exists(storage.join(enc.text, "model.safetensors")):
                # A weight-less text checkpoint names open_clip weights: those bytes define the output.
                source["open_clip_weights"] = weights
                source["open_clip_weights_sha256"] = content_hash(weights)
        else:
            source = {"open_clip_weights": storage.normalize(enc.text_open_clip_weights),
                      "open_clip_model": enc.text_model, "sha256": content_hash(enc.text_open_clip_weights)}
        sources["text"] = source
    for name in ("semantic", "stage_a"):
        if name in cfg.outputs:
            path = getattr(enc, name)
            sources[name] = {"checkpoint": storage.normalize(path), "sha256": content_hash(path)}
    return sources


def local_copy(uri: str) -> str:
    """A local path for a checkpoint dir or file; object-store URIs are copied to a local cache once."""
    local = storage.local_path(uri)
    if local is not None:
        return local
    import tempfile

    target = os.path.join(tempfile.gettempdir(), "wurst-encoders", hashlib.sha256(uri.encode()).hexdigest()[:16])
    done = target + ".complete"
    if not os.path.exists(done):
        if storage.is_dir(uri):
            for path in storage.list_files(uri, recursive=True):
                dest = os.path.join(target, posixpath.relpath(path.split("://", 1)[-1], uri.split("://", 1)[-1]))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                storage.write_bytes(dest, storage.read_bytes(path))
        else:
            storage.write_bytes(target, storage.read_bytes(uri))
        open(done, "w").close()
    return target


# ---------------------------------------------------------------------------------------------
# Version and output location


def version_inputs(cfg: PrecomputeConfig) -> tuple[dict, str]:
    input_uri = require_input(cfg)
    tree = config_lib.to_dict(cfg)
    for key in VERSION_EXCLUDE:
        tree.pop(key, None)
    tree["encoder_sha256"] = {name: src for name, src in
                              ((n, {k: v for k, v in s.items() if k.endswith("sha256") or k == "open_clip_model"})
                               for n, s in encoder_sources(cfg).items())}
    return tree, manifest_lib.input_identity(input_uri)


def output_root(cfg: PrecomputeConfig) -> str:
    return storage.normalize(cfg.output) if cfg.output else storage.join(cfg.data_root, "latents")


def output_dir(cfg: PrecomputeConfig) -> str:
    """<output root>/<version>: where this config writes, computed without running the phase."""
    tree, input_id = version_inputs(cfg)
    return storage.join(output_root(cfg), manifest_lib.version_id(PHASE, tree, input_id))


def shard_name(tar_uri: str) -> str:
    return f"shard-{storage.basename(tar_uri)[:-len('.tar')]}"


# ---------------------------------------------------------------------------------------------
# CPU side: tar reading and image decoding


def iter_tar_samples(uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a webdataset tar, in tar order. Members of a sample
    are consecutive and share the key (path up to the first dot of the file name)."""
    count = 0
    key, parts = None, {}
    try:
        with storage.open_input(uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, name = posixpath.split(member.name)
                if "." not in name:
                    continue
                stem, ext = name.split(".", 1)
                member_key = posixpath.join(directory, stem)
                if member_key != key and key is not None:
                    yield key, parts
                    count += 1
                    parts = {}
                key = member_key
                handle = tar.extractfile(member)
                parts[ext.lower()] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise PrecomputeError(f"{uri}: unreadable tar after {count} samples ({exc})") from exc
    if key is not None:
        yield key, parts


def decode_image(data: bytes, size: int, max_pixels: int | None = None) -> tuple[np.ndarray, Optional[str]]:
    """Image bytes -> (size, size, 3) uint8 RGB, covering the square and center-cropped, and the
    original mode when it was converted (grayscale, CMYK, palette, alpha) else None. Raises PIL's
    errors for undecodable data, and DecompressionBombError above `max_pixels` (checked from the
    header, before any pixel is decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
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
# Encoders (GPU or CPU actors)


def encoder_spec(cfg: PrecomputeConfig, use_gpu: bool) -> dict:
    """Everything an actor needs, as plain data."""
    enc = cfg.encoders
    return {"outputs": list(cfg.outputs), "text": enc.text, "text_open_clip_weights": enc.text_open_clip_weights,
            "text_model": enc.text_model, "semantic": enc.semantic, "stage_a": enc.stage_a,
            "semantic_resolution": cfg.semantic_resolution, "stage_a_resolution": cfg.stage_a_resolution,
            "decode_resolution": decode_resolution(cfg), "precision": cfg.precision, "use_gpu": use_gpu}


class Encoders:
    """The requested encoders on one device; `encode` turns a chunk into float16 numpy outputs."""

    def __init__(self, spec: dict, threads: int | None = None):
        import torch

        import stages

        self.spec = spec
        self.torch = torch
        if threads:
            torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if spec["use_gpu"] else "cpu")
        self.dtype = getattr(torch, spec["precision"])
        self.models: dict[str, Any] = {}
        if "text" in spec["outputs"]:
            if spec["text"]:
                self.models["text"] = stages.load(local_copy(spec["text"]), expected_kind="text",
                                                  device=self.device, dtype=self.dtype)
            else:
                from stages.text import TextEncoder, TextEncoderConfig

                config = TextEncoderConfig(model_name=spec["text_model"],
                                           weights_path=local_copy(spec["text_open_clip_weights"]))
                model = TextEncoder(config, weights_key="encoders.text_open_clip_weights")
                self.models["text"] = model.to(device=self.device, dtype=self.dtype).eval()
        for name in ("semantic", "stage_a"):
            if name in spec["outputs"]:
                self.models[name] = stages.load(local_copy(spec[name]), expected_kind=name, device=self.device,
                                                dtype=self.dtype)

    def _images(self, pixels: np.ndarray, size: int):
        torch = self.torch
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != size:
            # Resize in float32: antialiased interpolation has no bfloat16 CPU kernel.
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        return x.to(self.dtype)

    def encode(self, captions: list[str], pixels: np.ndarray | None) -> dict[str, np.ndarray]:
        """(n captions, n x R x R x 3 uint8) -> {output name: (n, ...) float16}."""
        torch = self.torch
        out = {}
        with torch.inference_mode():
            if "text" in self.models:
                out["text_emb"] = self.models["text"].encode(captions)
            if "semantic" in self.models:
                size = self.spec["semantic_resolution"]
                out["semantic"] = self.models["semantic"].encode(self._images(pixels, size), size=size)
            if "stage_a" in self.models:
                out["stage_a"] = self.models["stage_a"].encode(self._images(pixels, self.spec["stage_a_resolution"]))
            return {k: v.to(torch.float16).cpu().numpy() for k, v in out.items()}

    def probe(self) -> dict:
        """Output shapes (from one blank image) and the empty caption's embedding."""
        size = self.spec["decode_resolution"]
        blank = np.zeros((1, size, size, 3), dtype=np.uint8) if size else None
        outputs = self.encode([""], blank)
        return {"shapes": {k: list(v.shape[1:]) for k, v in outputs.items()},
                "empty_text_emb": outputs["text_emb"][0] if "text_emb" in outputs else None}


class ChunkEncoder:
    """Ray Data actor: one chunk per call; samples with non-finite outputs are skipped and counted."""

    def __init__(self, spec: dict, threads: int | None = None):
        self.encoders = Encoders(spec, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        meta = json.loads(batch["meta"][0])
        n = len(meta["uids"])
        size = self.encoders.spec["decode_resolution"]
        blob = batch["pixels"][0]
        # A writable copy: torch refuses to wrap read-only buffers without a warning.
        pixels = np.frombuffer(blob, dtype=np.uint8).reshape(n, size, size, 3).copy() if size and n else None
        result = {k: batch[k] for k in ("shard", "chunk", "is_last")}
        outputs = self.encoders.encode(meta["captions"], pixels) if n else {}
        if outputs:
            finite = np.ones(n, dtype=bool)
            for values in outputs.values():
                finite &= np.isfinite(values.reshape(n, -1)).all(axis=1)
            if not finite.all():
                for i in np.flatnonzero(~finite).tolist():
                    meta["skipped"].append([meta["keys"][i], meta["uids"][i], "non_finite_output",
                                            f"an encoder output of {meta['keys'][i]} is inf/nan in float16"])
                for field in ("keys", "uids", "captions"):
                    meta[field] = [v for v, ok in zip(meta[field], finite) if ok]
                outputs = {k: v[finite] for k, v in outputs.items()}
        result["meta"] = np.array([json.dumps(meta)])
        for name in ("text_emb", "semantic", "stage_a"):
            if name in outputs:
                result[name] = np.array([outputs[name].tobytes()], dtype=object)
        return result


def compute_probe(spec: dict) -> dict:
    return Encoders(spec).probe()


# ---------------------------------------------------------------------------------------------
# Writing: chunk parts, then one shard file per input shard


def _tensor_schema(shapes: dict[str, list[int]]):
    schema = shard_schema(shapes)
    fields = []
    for field in schema:
        if field.name in shapes:
            field = field.with_metadata({SHAPE_KEY: json.dumps(shapes[field.name]).encode()})
        fields.append(field)
    return pa.schema(fields)


def _write_parquet(uri: str, tables: Iterator, schema, row_group_size: int, metadata: dict[bytes, bytes]) -> int:
    """Stream tables into one parquet file with row groups of exactly `row_group_size` rows (the last
    may be shorter); temp name + rename on local disk. Returns the row count."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    local = storage.local_path(uri)
    target = f"{os.path.dirname(local)}/.{os.path.basename(local)}.tmp-{os.getpid()}" if local else path
    if local:
        os.makedirs(os.path.dirname(local), exist_ok=True)
    schema = schema.with_metadata(metadata)
    rows = 0
    pending: list = []
    pending_rows = 0
    try:
        with pq.ParquetWriter(target, schema, filesystem=None if local else fs,
                              **parquet_writer_options(schema)) as writer:
            def flush(final: bool) -> None:
                nonlocal pending, pending_rows
                if not pending:
                    return
                merged = pa.concat_tables(pending)
                full = (merged.num_rows // row_group_size) * row_group_size
                cut = merged.num_rows if final else full
                if cut:
                    writer.write_table(merged.slice(0, cut), row_group_size=row_group_size)
                rest = merged.slice(cut)
                pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

            for table in tables:
                if not table.schema.equals(schema, check_metadata=False):
                    raise PrecomputeError(f"{uri}: a chunk has schema {table.schema}, expected {schema}")
                table = table.replace_schema_metadata(None)
                rows += table.num_rows
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= row_group_size:
                    flush(final=False)
            flush(final=True)
        if local:
            os.replace(target, local)
    except BaseException:
        if local and os.path.exists(target):
            os.unlink(target)
        raise
    return rows


def write_chunk(batch: dict[str, np.ndarray], *, out_dir: str, shapes: dict[str, list[int]],
                row_group_size: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: an encoded chunk -> `_parts/<shard>/chunk-NNNNNN.parquet`; returns the chunk's
    bookkeeping (no tensors) for the driver."""
    (shard,), (chunk,) = batch["shard"], batch["chunk"]
    meta = json.loads(batch["meta"][0])
    n = len(meta["uids"])
    columns: dict[str, Any] = {"key": pa.array(meta["keys"], pa.string()), "uid": pa.array(meta["uids"], pa.string()),
                               "caption": pa.array(meta["captions"], pa.string())}
    for name, shape in shapes.items():
        raw = batch[name][0] if n and name in batch else b""
        columns[name] = tensor_column(np.frombuffer(raw, dtype=np.float16).reshape((n, *shape)))
    schema = _tensor_schema(shapes)
    table = pa.table(columns, schema=schema)
    part = storage.join(out_dir, PARTS_DIR, str(shard), f"chunk-{int(chunk):06d}.parquet")
    _write_parquet(part, iter([table]), schema, row_group_size, {})
    summary = {"written": n, "input_samples": meta["input_samples"], "skipped": meta["skipped"],
               "converted": meta["converted"]}
    return {"shard": batch["shard"], "chunk": batch["chunk"], "is_last": batch["is_last"],
            "summary": np.array([json.dumps(summary)])}


def finalize_shard(out_dir: str, shard: str, source: str, chunk_summaries: list[dict],
                   shapes: dict[str, list[int]], row_group_size: int) -> dict:
    """Concatenate a shard's chunk parts in order into `<shard>.parquet` (counts in its footer)."""
    import pyarrow.parquet as pq

    parts_dir = storage.join(out_dir, PARTS_DIR, shard)
    n_chunks = len(chunk_summaries)
    stats = {
        "source": source,
        "input_samples": sum(s["input_samples"] for s in chunk_summaries),
        "written": sum(s["written"] for s in chunk_summaries),
        "skipped_by_reason": dict(Counter(item[2] for s in chunk_summaries for item in s["skipped"])),
        "converted_by_mode": dict(sum((Counter(s["converted"]) for s in chunk_summaries), Counter())),
        "skipped_samples": [item for s in chunk_summaries for item in s["skipped"]],
    }
    skipped = sum(stats["skipped_by_reason"].values())
    if stats["input_samples"] != stats["written"] + skipped:
        raise PrecomputeError(f"{source}: {stats['input_samples']} input samples != {stats['written']} written "
                              f"+ {skipped} skipped")

    def tables():
        for chunk in range(n_chunks):
            part = storage.join(parts_dir, f"chunk-{chunk:06d}.parquet")
            with storage.open_input(part) as handle:
                yield pq.read_table(handle)

    rows = _write_parquet(storage.join(out_dir, f"{shard}.parquet"), tables(), _tensor_schema(shapes),
                          row_group_size, {STATS_KEY: json.dumps(stats).encode()})
    if rows != stats["written"]:
        raise PrecomputeError(f"{source}: wrote {rows} rows, the chunks reported {stats['written']}")
    storage.delete(parts_dir)
    return stats


def read_shard_stats(uri: str) -> tuple[dict, int]:
    """(per-shard stats from the footer, row count) of a finished shard file."""
    import pyarrow.parquet as pq

    with storage.open_input(uri) as handle:
        metadata = pq.read_metadata(handle)
    raw = (metadata.metadata or {}).get(STATS_KEY)
    if raw is None:
        raise PrecomputeError(f"{uri}: no {STATS_KEY.decode()} in the parquet footer; not written by this phase")
    return json.loads(raw), metadata.num_rows


# ---------------------------------------------------------------------------------------------
# Driver


def _resources(cfg: PrecomputeConfig, ray) -> tuple[bool, int]:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("device: cuda requested but the Ray cluster has no GPUs")
    use_gpu = gpus > 0 and cfg.device != "cpu"
    actors = cfg.actors or (gpus if use_gpu else 1)
    return use_gpu, actors


def _log_metrics(run, metrics: dict, step: int) -> None:
    if run is not None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def _encode_shards(cfg: PrecomputeConfig, ray, out_dir: str, todo: list[tuple[str, str]], spec: dict,
                   actors: int, shapes: dict, run) -> dict:
    """Run the Ray Data pipeline over the unfinished shards and finalize each when complete; returns
    timings (the steady rate counts from the first finished chunk, so it excludes actor start-up)."""
    import ray.data

    use_gpu = spec["use_gpu"]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    items = [{"shard": name, "tar": tar} for name, tar in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # The memory reservation covers the decoded chunks a task holds; it also keeps Ray Data from fusing
    # decoding into the encoder actors (fusion needs identical remote args), which would serialise
    # decoding behind the encoders instead of running it on the other CPUs.
    chunk_bytes = cfg.batch_size * max(spec["decode_resolution"], 1) ** 2 * 3
    ds = ds.map_batches(decode_shard, batch_size=1, num_cpus=1, memory=4 * chunk_bytes + (768 << 20),
                        fn_kwargs={"chunk_size": cfg.batch_size, "size": spec["decode_resolution"],
                                   "max_image_pixels": cfg.max_image_pixels})
    ds = ds.map_batches(ChunkEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if use_gpu else 0,
                        num_cpus=cfg.cpus_per_actor,
                        fn_constructor_kwargs={"spec": spec, "threads": None if use_gpu else max(1, round(cfg.cpus_per_actor))})
    ds = ds.map_batches(write_chunk, batch_size=1, num_cpus=0.5,
                        fn_kwargs={"out_dir": out_dir, "shapes": shapes, "row_group_size": cfg.row_group_size})

    finalize = ray.remote(num_cpus=0.5, max_retries=2)(finalize_shard)
    sources = dict(todo)
    chunks: dict[str, dict[int, dict]] = {name: {} for name, _ in todo}
    last_chunk: dict[str, int] = {}
    in_flight: dict[str, Any] = {}
    done = {"samples": 0, "written": 0, "shards": 0}
    started = last_log = time.time()
    first_chunk: tuple[float, int] | None = None
    try:
        for row in ds.iter_rows():
            name, chunk = str(row["shard"]), int(row["chunk"])
            summary = json.loads(row["summary"])
            if first_chunk is None:
                first_chunk = (time.time(), summary["input_samples"])
            chunks[name][chunk] = summary
            if bool(row["is_last"]):
                last_chunk[name] = chunk
            done["samples"] += summary["input_samples"]
            done["written"] += summary["written"]
            if name in last_chunk and len(chunks[name]) == last_chunk[name] + 1:
                ordered = [chunks[name][i] for i in range(last_chunk[name] + 1)]
                in_flight[name] = finalize.remote(out_dir, name, sources[name], ordered, shapes, cfg.row_group_size)
            ready, _ = ray.wait(list(in_flight.values()), num_returns=len(in_flight), timeout=0) \
                if in_flight else ([], [])
            for finished in [n for n, ref in in_flight.items() if ref in ready]:
                ray.get(in_flight.pop(finished))
                done["shards"] += 1
                log.info("precompute: %s done (%d/%d shards)", finished, done["shards"], len(todo))
            if time.time() - last_log > 10:
                last_log = time.time()
                _log_metrics(run, {"progress.samples": done["samples"], "progress.written": done["written"],
                                   "progress.shards": done["shards"],
                                   "progress.samples_per_s": done["samples"] / max(last_log - started, 1e-9)},
                             step=done["samples"])
    finally:
        # Keep every shard that completed, even when the pipeline failed part way.
        for ref in in_flight.values():
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - reported below by the missing-shard check
                log.error("precompute: finalizing a shard failed: %s", exc)
    missing = [name for name, _ in todo if name not in last_chunk or len(chunks[name]) != last_chunk[name] + 1]
    if missing:
        raise PrecomputeError(f"{len(missing)} shards did not complete, e.g. {missing[:5]}")
    finished_at = time.time()
    timings = {"seconds": finished_at - started, "samples": done["samples"],
               "samples_per_s": done["samples"] / max(finished_at - started, 1e-9)}
    if first_chunk is not None and finished_at > first_chunk[0] and done["samples"] > first_chunk[1]:
        timings["steady_samples_per_s"] = (done["samples"] - first_chunk[1]) / (finished_at - first_chunk[0])
    _log_metrics(run, {k: v for k, v in timings.items() if k != "samples"}, step=done["samples"])
    return timings


def run(cfg: PrecomputeConfig) -> dict:
    """Compute (or finish) this config's output version; returns its manifest."""
    input_uri = require_input(cfg)
    tree, input_id = version_inputs(cfg)
    out_dir = storage.join(output_root(cfg), manifest_lib.version_id(PHASE, tree, input_id))
    if manifest_lib.has_manifest(out_dir):
        log.info("precompute: %s is complete; nothing to do", out_dir)
        return manifest_lib.read(out_dir)
    tars = storage.list_files(input_uri, suffix=".tar")
    if not tars:
        raise PrecomputeError(f"{input_uri}: no .tar shards (expected img2dataset webdataset output NNNNN.tar)")
    names = [shard_name(t) for t in tars]
    storage.makedirs(out_dir)
    finished = {storage.basename(f)[:-len(".parquet")] for f in storage.list_files(out_dir, suffix=".parquet")}
    todo = [(n, t) for n, t in zip(names, tars) if n not in finished]
    for name, _ in todo:  # parts of a killed run are not trusted: the shard is redone whole
        stale = storage.join(out_dir, PARTS_DIR, name)
        if storage.exists(stale):
            storage.delete(stale)

    ray = init_ray(cfg.ray)
    use_gpu, actors = _resources(cfg, ray)
    spec = encoder_spec(cfg, use_gpu)
    sources = encoder_sources(cfg)
    run_name = f"precompute-{storage.basename(out_dir)}"
    with tracking.start_run(PHASE, cfg, data_root=cfg.data_root, mlflow_cfg=cfg.mlflow, input_uri=input_uri,
                            run_name=run_name, tags={"wurst.output_uri": out_dir}) as mlrun:
        if use_gpu:
            probe = ray.get(ray.remote(num_gpus=1, num_cpus=1)(compute_probe).remote(spec))
        else:
            # CPU actors use the same device and precision: probing here spares a worker that would
            # import and load the encoders only for this.
            probe = compute_probe(spec)
        shapes = probe["shapes"]
        extra: dict[str, Any] = {}
        if probe["empty_text_emb"] is not None:
            empty = np.asarray(probe["empty_text_emb"], dtype=np.float16)
            buffer = io.BytesIO()
            np.save(buffer, empty, allow_pickle=False)
            storage.write_bytes(storage.join(out_dir, EMPTY_TEXT_FILE), buffer.getvalue())
            extra["empty_text_emb"] = {"file": EMPTY_TEXT_FILE, "shape": list(empty.shape), "dtype": "float16",
                                       "sha256": manifest_lib.hash_bytes(buffer.getvalue())}
        log.info("precompute: %d of %d shards to do -> %s (%d %s actors)", len(todo), len(tars), out_dir, actors,
                 "GPU" if use_gpu else "CPU")
        timings = _encode_shards(cfg, ray, out_dir, todo, spec, actors, shapes, mlrun) if todo else {}

        shard_entries, totals = [], Counter()
        skipped_by_reason, converted_by_mode = Counter(), Counter()
        for name, tar in zip(names, tars):
            stats, rows = read_shard_stats(storage.join(out_dir, f"{name}.parquet"))
            if rows != stats["written"]:
                raise PrecomputeError(f"{out_dir}/{name}.parquet: {rows} rows, footer says {stats['written']} written")
            shard_entries.append({"file": f"{name}.parquet", "rows": rows, "source": storage.basename(tar),
                                  "input_samples": stats["input_samples"]})
            totals.update(input_samples=stats["input_samples"], written=rows)
            skipped_by_reason.update(stats["skipped_by_reason"])
            converted_by_mode.update(stats["converted_by_mode"])
        skipped = sum(skipped_by_reason.values())
        if totals["input_samples"] != totals["written"] + skipped:
            raise PrecomputeError(f"{out_dir}: {totals['input_samples']} input samples != {totals['written']} written "
                                  f"+ {skipped} skipped")
        counts = {"input_shards": len(tars), "input_samples": totals["input_samples"], "written": totals["written"],
                  "skipped": skipped, "skipped_by_reason": dict(sorted(skipped_by_reason.items())),
                  "converted": sum(converted_by_mode.values()),
                  "converted_by_mode": dict(sorted(converted_by_mode.items()))}
        columns = {name: {"shape": shape, "dtype": "float16"} for name, shape in shapes.items()}
        extra.update({"columns": columns, "string_columns": ["key", "uid", "caption"], "shards": shard_entries,
                      "row_group_size": cfg.row_group_size, "encoders": sources,
                      "input_manifest_hash": manifest_lib.manifest_hash(input_uri),
                      # This invocation only: a resumed run computed `shards_computed` of the shards.
                      "last_run": {"shards_computed": len(todo), "actors": actors,
                                   "device": "cuda" if use_gpu else "cpu", **timings},
                      "notes": {"semantic": "raw Semantic Compressor (BatchNorm) output; Stage C trains on (x+1)/42",
                                "stage_a": "unquantized Stage A latent divided by its scale_factor"}})
        if mlrun is not None:
            import mlflow

            flat = {"input_samples": counts["input_samples"], "written": counts["written"],
                    "skipped": counts["skipped"], "converted": counts["converted"], "shards": len(tars),
                    "shards_computed": len(todo)}
            flat.update({f"skipped.{k}": v for k, v in skipped_by_reason.items()})
            flat.update({f"converted.{k}": v for k, v in converted_by_mode.items()})
            mlflow.log_metrics({k: float(v) for k, v in flat.items()})
        written = manifest_lib.write(out_dir, phase=PHASE, cfg=cfg, input_uri=input_uri, input_id=input_id,
                                     counts=counts, extra=extra,
                                     mlflow_run_id=mlrun.info.run_id if mlrun is not None else None)
        if mlrun is not None:
            import mlflow

            mlflow.log_dict({k: v for k, v in written.items() if k != "shards"}, "manifest.json")
    parts = storage.join(out_dir, PARTS_DIR)
    if storage.exists(parts):
        storage.delete(parts)
    return written


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = config_lib.argument_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    cfg = config_lib.load_from_args(PrecomputeConfig, args)
    result = run(cfg)
    print(json.dumps({"output": storage.join(output_root(cfg), result["version"]), "counts": result["counts"],
                      "columns": result.get("columns")}, indent=2))
    return result


if __name__ == "__main__":
    config_lib.run_cli("precompute", main, (PrecomputeError,))
