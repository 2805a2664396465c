"""The encoders of `precompute`: which checkpoints define the output, and the actors that run them.

`encoder_sources` names each requested output's encoder and the sha256 of its bytes (part of the
output's version, so new weights give a new version); `Encoders` loads them on one device and turns a
chunk of captions and decoded images into float16 outputs; `ChunkEncoder` is the Ray Data actor
around it (one per GPU, or CPU actors). Kept apart from the driver because only these import torch,
and only inside the actors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import export_layout, latent_shards, storage
from pipelines.config import ConfigError

if TYPE_CHECKING:
    from pipelines.precompute import PrecomputeConfig

# What the text encoder computes from its weights (`stages.text.TEXT_STATES_VERSION`; copied, not imported,
# so the driver stays free of torch; tests/test_text_states.py checks they agree). Part of the text source,
# hence of the output version: a change in how states are computed gives a new version.
TEXT_STATES_VERSION = 2


# ---------------------------------------------------------------------------------------------
# What the encoders are: checkpoint hashes, output sizes


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
        source["states_version"] = TEXT_STATES_VERSION
        sources["text"] = source
    for name in ("semantic", "stage_a"):
        if name in cfg.outputs:
            path = export_layout.resolve_checkpoint(getattr(enc, name))  # a run's export/<kind>: its latest
            sources[name] = {"checkpoint": path, "sha256": content_hash(path)}
    return sources


def image_outputs(cfg: PrecomputeConfig) -> list[str]:
    return [o for o in cfg.outputs if o in ("semantic", "stage_a", "semantic_image")]


def decode_resolution(cfg: PrecomputeConfig) -> int:
    """The square size the CPU tasks produce: the largest the image encoders need."""
    sizes = {"semantic": cfg.semantic_resolution, "stage_a": cfg.stage_a_resolution,
             "semantic_image": cfg.semantic_resolution}
    return max((sizes[o] for o in image_outputs(cfg)), default=0)



# ---------------------------------------------------------------------------------------------
# Running them (GPU or CPU actors)


def encoder_spec(cfg: PrecomputeConfig, use_gpu: bool) -> dict:
    """Everything an actor needs, as plain data."""
    enc = cfg.encoders
    return {"outputs": list(cfg.outputs), "text": enc.text, "text_open_clip_weights": enc.text_open_clip_weights,
            "text_model": enc.text_model,
            **{name: export_layout.resolve_checkpoint(getattr(enc, name)) if getattr(enc, name) else None
               for name in ("semantic", "stage_a")},
            "semantic_resolution": cfg.semantic_resolution, "stage_a_resolution": cfg.stage_a_resolution,
            "decode_resolution": decode_resolution(cfg), "buckets": cfg.bucket_sizes(), "precision": cfg.precision,
            "use_gpu": use_gpu}


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
                self.models["text"] = stages.load(storage.local_copy(spec["text"]), expected_kind="text",
                                                  device=self.device, dtype=self.dtype)
            else:
                from stages.text import TextEncoder, TextEncoderConfig

                config = TextEncoderConfig(model_name=spec["text_model"],
                                           weights_path=storage.local_copy(spec["text_open_clip_weights"]))
                model = TextEncoder(config, weights_key="encoders.text_open_clip_weights")
                self.models["text"] = model.to(device=self.device, dtype=self.dtype).eval()
        for name in ("semantic", "stage_a"):
            if name in spec["outputs"]:
                self.models[name] = stages.load(storage.local_copy(spec[name]), expected_kind=name, device=self.device,
                                                dtype=self.dtype)

    def _resized(self, pixels: np.ndarray, size: tuple[int, int]):
        """(n, h, w, 3) uint8 -> (n, 3, *size) float32 in [0, 1] on the device."""
        torch = self.torch
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[-2:]) != tuple(size):
            # Resize in float32: antialiased interpolation has no bfloat16 CPU kernel.
            x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", antialias=True,
                                                align_corners=False)
        return x

    def encode(self, captions: list[str], pixels: np.ndarray | None, bucket: int = 0) -> dict[str, np.ndarray]:
        """(n captions, n x h x w x 3 uint8 at bucket `bucket`'s decode size) -> {output name: (n, ...)
        float16; semantic_image: uint8}."""
        torch = self.torch
        sizes = self.spec["buckets"][bucket]
        out = {}
        with torch.inference_mode():
            if "text" in self.models:
                out["text_emb"] = self.models["text"].encode(captions)
            semantic_input = None
            if "semantic" in self.models or "semantic_image" in self.spec["outputs"]:
                semantic_input = self._resized(pixels, sizes["semantic"])
            if "semantic" in self.models:
                out["semantic"] = self.models["semantic"].encode(semantic_input.to(self.dtype),
                                                                 size=tuple(sizes["semantic"]))
            if "stage_a" in self.models:
                out["stage_a"] = self.models["stage_a"].encode(
                    self._resized(pixels, sizes["stage_a"]).to(self.dtype))
            out = {k: v.to(torch.float16).cpu().numpy() for k, v in out.items()}
            if "semantic_image" in self.spec["outputs"]:
                # The compressor's input, rounded: the very resize `semantic` encodes (before ImageNet
                # normalisation), so a compressor fine-tuned on it sees what the semantic precompute encodes.
                out["semantic_image"] = semantic_input.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
            return out

    def probe(self) -> dict:
        """Output shapes per bucket (from one blank image each; `shapes`: the first bucket's) and the empty
        caption's embedding."""
        bucket_shapes, empty = [], None
        for index, sizes in enumerate(self.spec["buckets"]):
            height, width = sizes["decode"]
            blank = np.zeros((1, height, width, 3), dtype=np.uint8) if height else None
            outputs = self.encode([""], blank, index)
            bucket_shapes.append({k: list(v.shape[1:]) for k, v in outputs.items()})  # semantic_image: (3, h, w)
            if empty is None and "text_emb" in outputs:
                empty = outputs["text_emb"][0]
        return {"shapes": bucket_shapes[0], "bucket_shapes": bucket_shapes, "empty_text_emb": empty}


class ChunkEncoder:
    """Ray Data actor: one chunk per call; samples with non-finite outputs are skipped and counted."""

    def __init__(self, spec: dict, threads: int | None = None):
        self.encoders = Encoders(spec, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        meta = json.loads(batch["meta"][0])
        n = len(meta["uids"])
        bucket = int(meta.get("bucket", 0))
        height, width = self.encoders.spec["buckets"][bucket]["decode"]
        blob = batch["pixels"][0]
        # A writable copy: torch refuses to wrap read-only buffers without a warning.
        pixels = np.frombuffer(blob, dtype=np.uint8).reshape(n, height, width, 3).copy() if height and n else None
        result = {k: batch[k] for k in ("shard", "chunk", "is_last")}
        outputs = self.encoders.encode(meta["captions"], pixels, bucket) if n else {}
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
        if "semantic_image" in outputs:  # encoded here: the actor's CPUs, not the driver's
            encoded = [latent_shards.encode_image(image, latent_shards.IMAGE_COLUMNS["semantic_image"])
                       for image in outputs["semantic_image"]]
            result["semantic_image"] = np.array([latent_shards.pack_blobs(encoded)], dtype=object)
        return result


def compute_probe(spec: dict) -> dict:
    return Encoders(spec).probe()
