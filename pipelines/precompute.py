"""`python -m pipelines.precompute`: text embeddings and image latents, computed once into shards.

Longer than 500 lines: (~580) the config with its bucket checks, the version and the driver, whose
manifest building has a square and a bucketed layout; the tasks and actors live in their own modules.

CLIP text states, Semantic-Compressor latents and Stage A latents are computed once from a
`download` output into columnar shards that training reads column by column.

    python -m pipelines.precompute --config configs/precompute.yaml --input data/images/<version>

Data flow (Ray Data, streaming; nothing is materialised whole):

0. the encoders are probed once (output shapes, the empty caption's embedding), on a GPU when the
   actors use GPUs, else in the driver;
1. one task per input shard ``NNNNN.tar`` reads the tar sequentially (a shard with a selection,
   ``NNNNN_selection.parquet``: range reads of exactly its selected samples), groups members by webdataset
   key, decodes each image with PIL on CPU (grayscale / CMYK / palette / alpha converted to RGB and
   counted; undecodable images skipped with a named reason), center-crops and resizes it to the
   largest configured resolution, and emits *chunks* of ``batch_size`` consecutive input samples;
2. an actor pool (one actor per GPU, or CPU actors) runs the encoders on each chunk, so a batch
   never mixes shards and always holds the same samples: a rerun computes bit-identical outputs;
3. a task splits each encoded chunk by uid (validation split: `latent_shards.is_validation` at
   ``validation_fraction``) and writes each split as a part file; when all chunks of a shard are in,
   the driver starts a task that concatenates them in order into ``val/shard-NNNNN.parquet`` and
   ``shard-NNNNN.parquet`` (temp name + rename). Samples that an earlier version with the same settings
   and encoders holds are not decoded in 1 nor encoded in 2: that task copies their rows
   (`pipelines.latent_reuse`; counted as ``reused`` of ``written``).

Output ``<output root>/<version>/``: ``shard-NNNNN.parquet`` per input ``NNNNN.tar`` with columns
``key``, ``uid``, ``caption`` and float16 tensor columns stored as flat fixed-size lists
(``text_emb`` 77 x width, ``semantic`` 16 x h x w raw BatchNorm output, ``stage_a`` 4 x H/4 x W/4
unquantized latent / scale factor); per-shard counts in each file's footer; ``empty_text_emb.npy``
(the empty caption's embedding, for guidance dropout); ``manifest.json`` last, with counts, column
shapes and dtypes, per-shard row counts, encoder checkpoint hashes, the config and the input's
manifest hash. ``shards`` is the training split; ``validation`` lists the held-out split's
``val/shard-NNNNN.parquet`` files with the fraction and the hash rule that chose them (decided per
uid, so the split is the same whatever the sharding, chunking or number of actors). Read it with
``pipelines.latent_shards.LatentDataset`` (``split="validation"`` for the held-out split).

Resume: shards whose final file exists are skipped; unfinished shards are redone from scratch; a run
whose manifest exists is a no-op. Input samples = written (training + validation) + skipped, checked
per shard and in total.

Modules: this one is the config, the version and the driver (the `PrecomputePhase` lifecycle);
`pipelines.precompute_cpu` the decode and write tasks; `pipelines.precompute_encoders` the encoders
and their actors; `pipelines.latent_shards` the output format.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections import Counter
from typing import Any, Optional

from pipelines import config as config_lib
from pipelines import image_shards, latent_reuse, latent_shards
from pipelines import manifest as manifest_lib
from pipelines import reports, storage, tracking
from pipelines.config import ConfigError, param
from pipelines.phase import Context, Outcome, Phase, PhaseResult, module_cli
from pipelines.precompute_cpu import (PARTS_DIR, SHARD_STATS_DIR, PrecomputeError, decode_shard, finalize_shard,
                                     shard_stats_file, write_chunk)
from pipelines.precompute_encoders import ChunkEncoder, compute_probe, encoder_sources, encoder_spec, image_outputs
from pipelines.runtime import RayConfig, default_data_root

log = logging.getLogger(__name__)

# semantic_image: the Semantic Compressor's input pixels (PNG), for a Stage B that fine-tunes the compressor.
OUTPUTS = ("text", "semantic", "stage_a", "semantic_image")
SEMANTIC_STRIDE = 32  # EfficientNet trunks downsample by 32: 768 px -> 24 x 24
PRECISIONS = ("bfloat16", "float16", "float32")


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
    # What to compute: Stage C trains on text + semantic; Stage B on text + stage_a + semantic (frozen
    # compressor) or semantic_image (the compressor's input pixels: Stage B fine-tunes it, as the paper).
    outputs: list[str] = param(default_factory=lambda: ["text", "semantic", "stage_a"], choices=OUTPUTS)
    encoders: EncodersConfig = dataclasses.field(default_factory=EncodersConfig)
    # Semantic Compressor input size: 768 -> 16x24x24 latents, 384 -> 16x12x12 (multiple of 32).
    semantic_resolution: int = param(768, ge=32)
    # Stage A input size = Stage B training resolution: 512 -> 4x128x128, 1024 -> 4x256x256.
    stage_a_resolution: int = param(512, ge=8)
    # Compute precision of the encoders (outputs are always stored as float16).
    precision: str = param("bfloat16", choices=list(PRECISIONS))
    # PIL's decompression-bomb limit (pixels); larger images are skipped as `decompression_bomb`.
    max_image_pixels: int = param(178_956_970, ge=1)
    # Aspect-ratio buckets: [height, width] Stage A input sizes of about stage_a_resolution**2 pixels (paper
    # 1024 px: [1024, 1024], [896, 1152], [1152, 896], [768, 1280], [1280, 768]). Each image goes to the bucket
    # nearest its aspect ratio, is center-cropped to it and written at its shapes (<bucket>/shard-NNNNN.parquet;
    # the semantic input scaled by semantic_resolution / stage_a_resolution). null: one square size.
    buckets: Optional[list[list[int]]] = None
    # A finished `dedup_images` output of this input: the samples it names as copies of others are left out
    # (counted as skipped: duplicate_image). null: every sample.
    exclude: Optional[str] = None
    # Copy the latents of samples that an earlier version under the same output root with the same settings
    # and encoders holds, instead of encoding them again (`pipelines.latent_reuse`; not part of the version).
    reuse: bool = True
    # Rows per parquet row group: the reader's unit of reading and of block shuffling.
    row_group_size: int = param(256, ge=1)
    # Share of the samples held out as the validation split, chosen by a hash of the uid (see
    # latent_shards.VALIDATION_RULE); training never reads them. 0: no validation split.
    validation_fraction: float = param(0.01, ge=0.0, lt=1.0)
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
        if self.buckets is not None:
            self._validate_buckets()

    def _validate_buckets(self) -> None:
        if not self.buckets:
            raise ConfigError("buckets: list at least one [height, width] (or null for one square size)")
        if not any(o in self.outputs for o in ("semantic", "stage_a", "semantic_image")):
            raise ConfigError("buckets: need an image output (semantic, stage_a or semantic_image)")
        semantic = any(o in self.outputs for o in ("semantic", "semantic_image"))
        area = self.stage_a_resolution ** 2
        seen = set()
        for i, size in enumerate(self.buckets):
            key = f"buckets[{i}]"
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"{key}: expected [height, width] of positive ints, got {size}")
            if tuple(size) in seen:
                raise ConfigError(f"{key}: {size} is listed twice")
            seen.add(tuple(size))
            for side, name in zip(size, ("height", "width")):
                if side % 4:
                    raise ConfigError(f"{key}: {name} {side} is not a multiple of 4 (Stage A is f4)")
                if semantic and (side * self.semantic_resolution) % (self.stage_a_resolution * SEMANTIC_STRIDE):
                    step = self.stage_a_resolution * SEMANTIC_STRIDE // math.gcd(self.stage_a_resolution * SEMANTIC_STRIDE,
                                                                                  self.semantic_resolution)
                    raise ConfigError(
                        f"{key}: {name} {side} x semantic_resolution / stage_a_resolution ({self.semantic_resolution} / "
                        f"{self.stage_a_resolution}) is not a multiple of {SEMANTIC_STRIDE} px (the compressor's "
                        f"stride): {name}s must be multiples of {step}")
            if not 0.75 <= size[0] * size[1] / area <= 1.25:
                raise ConfigError(f"{key}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels, not within 25% of "
                                  f"stage_a_resolution**2 = {area} (buckets share one pixel budget)")

    def bucket_sizes(self) -> list[dict]:
        """Per bucket: name, and the [height, width] of its Stage A input, semantic input and decoded pixels
        (the larger of the two the outputs need). Unbucketed: one square bucket named None."""
        sizes = self.buckets or [[self.stage_a_resolution, self.stage_a_resolution]]
        images = image_outputs(self)
        out = []
        for height, width in sizes:
            stage_a = [height, width]
            semantic = [height * self.semantic_resolution // self.stage_a_resolution,
                        width * self.semantic_resolution // self.stage_a_resolution]
            if not self.buckets:
                semantic = [self.semantic_resolution] * 2
            needed = ([stage_a] if "stage_a" in images else []) + \
                ([semantic] if {"semantic", "semantic_image"} & set(images) else [])
            decode = max(needed, key=lambda s: s[0] * s[1]) if needed else [0, 0]
            out.append({"name": latent_shards.bucket_name(height, width) if self.buckets else None,
                        "stage_a": stage_a, "semantic": semantic, "decode": decode})
        return out


# Settings that do not change the output. Encoder paths are replaced by their content hashes.
VERSION_EXCLUDE = ("input", "output", "data_root", "ray", "mlflow", "batch_size", "actors", "cpus_per_actor",
                   "device", "encoders", "exclude", "reuse")


def require_input(cfg: PrecomputeConfig) -> str:
    if not cfg.input:
        raise ConfigError("input: required (a finished download output, e.g. data/images/<version>)")
    uri = storage.normalize(cfg.input)
    if not storage.is_dir(uri):
        raise ConfigError(f"input: {uri} is not a directory")
    if not manifest_lib.has_manifest(uri):
        raise ConfigError(f"input: {uri} has no manifest.json; is the download finished?")
    return uri


def version_tree(cfg: PrecomputeConfig) -> dict:
    """What the version hashes besides the input: the output-affecting settings, and the encoders'
    content hashes instead of their paths (plus the text encoder's `states_version`: how its states are
    computed from those weights)."""
    tree = config_lib.to_dict(cfg)
    for key in VERSION_EXCLUDE:
        tree.pop(key, None)
    if tree.get("buckets") is None:
        tree.pop("buckets", None)  # one square size: the version of a dataset written before buckets existed
    if not tree.get("validation_fraction"):
        # No split: the output is the same as before the split existed, so it keeps that version.
        tree.pop("validation_fraction", None)
    if cfg.exclude:  # the de-dup output's version (its input and rule), not its path
        tree["exclude_version"] = storage.basename(cfg.exclude)
    tree["encoder_sha256"] = {name: src for name, src in
                              ((n, {k: v for k, v in s.items()
                                    if k.endswith("sha256") or k in ("open_clip_model", "states_version")})
                               for n, s in encoder_sources(cfg).items())}
    return tree


def shard_name(tar_uri: str) -> str:
    """``shard-NNNNN`` of an input shard source (its tar, or its selection in a version that reuses earlier
    downloads: `image_shards.list_shards`)."""
    return f"shard-{image_shards.source_name(tar_uri)}"


# ---------------------------------------------------------------------------------------------
# Driver


def bucket_names(cfg: PrecomputeConfig) -> list[str] | None:
    return [b["name"] for b in cfg.bucket_sizes()] if cfg.buckets else None


def _finished_shards(cfg: PrecomputeConfig, out_dir: str) -> set[str]:
    if cfg.buckets:  # a bucketed shard is done when its counts file is
        stats_dir = storage.join(out_dir, SHARD_STATS_DIR)
        return {storage.basename(f)[:-len(".json")] for f in storage.list_files(stats_dir, suffix=".json")} \
            if storage.exists(stats_dir) else set()
    return {storage.basename(f)[:-len(".parquet")] for f in storage.list_files(out_dir, suffix=".parquet")}


def _shard_files(cfg: PrecomputeConfig, out_dir: str, name: str) -> list[str]:
    """Every file a shard writes (for clearing what a killed run left of an unfinished shard)."""
    files = [storage.join(out_dir, PARTS_DIR, name)]
    for bucket in bucket_names(cfg) or [None]:
        prefix = f"{bucket}/" if bucket else ""
        files += [storage.join(out_dir, prefix + f) for f in (f"{name}.parquet",
                                                              latent_shards.validation_file(f"{name}.parquet"))]
    return files


def _resources(cfg: PrecomputeConfig, ray) -> tuple[bool, int]:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("device: cuda requested but the Ray cluster has no GPUs")
    use_gpu = gpus > 0 and cfg.device != "cpu"
    actors = cfg.actors or (gpus if use_gpu else 1)
    return use_gpu, actors


def _encode_shards(ctx: Context, todo: list[tuple[str, str]], spec: dict, actors: int, shapes: dict,
                   bucket_shapes: list[dict]) -> dict:
    """Run the Ray Data pipeline over the unfinished shards and finalize each when complete; returns
    timings (the steady rate counts from the first finished chunk, so it excludes actor start-up)."""
    import ray.data

    cfg, out_dir = ctx.cfg, ctx.output
    use_gpu = spec["use_gpu"]
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    reuse_files = ctx.state.get("reuse_files") or {}
    items = [{"shard": name, "tar": tar, "reuse": reuse_files.get(name, "")} for name, tar in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # The memory reservation covers the decoded chunks a task holds; it also keeps Ray Data from fusing
    # decoding into the encoder actors (fusion needs identical remote args), which would serialise
    # decoding behind the encoders instead of running it on the other CPUs.
    buckets = cfg.buckets and [b["decode"] for b in spec["buckets"]]
    largest = max(h * w for h, w in (b["decode"] for b in spec["buckets"]))
    # A bucketed task holds up to one unfinished chunk per bucket.
    chunk_bytes = cfg.batch_size * max(largest, 1) * 3 * (len(buckets) if buckets else 1)
    ds = ds.map_batches(decode_shard, batch_size=1, num_cpus=1, memory=4 * chunk_bytes + (768 << 20),
                        fn_kwargs={"chunk_size": cfg.batch_size, "size": spec["decode_resolution"],
                                   "max_image_pixels": cfg.max_image_pixels, "buckets": buckets or None,
                                   "exclude": storage.normalize(cfg.exclude) if cfg.exclude else None})
    ds = ds.map_batches(ChunkEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if use_gpu else 0,
                        num_cpus=cfg.cpus_per_actor,
                        fn_constructor_kwargs={"spec": spec, "threads": None if use_gpu else max(1, round(cfg.cpus_per_actor))})
    ds = ds.map_batches(write_chunk, batch_size=1, num_cpus=0.5,
                        fn_kwargs={"out_dir": out_dir, "shapes": shapes, "row_group_size": cfg.row_group_size,
                                   "validation_fraction": cfg.validation_fraction,
                                   "bucket_shapes": bucket_shapes if cfg.buckets else None})

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
            done["written"] += summary["written"] + summary["validation_written"]
            if name in last_chunk and len(chunks[name]) == last_chunk[name] + 1:
                ordered = [chunks[name][i] for i in range(last_chunk[name] + 1)]
                in_flight[name] = finalize.remote(out_dir, name, sources[name], ordered, shapes, cfg.row_group_size,
                                                  bucket_names(cfg), bucket_shapes if cfg.buckets else None,
                                                  reuse_files.get(name))
            ready, _ = ray.wait(list(in_flight.values()), num_returns=len(in_flight), timeout=0) \
                if in_flight else ([], [])
            for finished in [n for n, ref in in_flight.items() if ref in ready]:
                ray.get(in_flight.pop(finished))
                done["shards"] += 1
                log.info("precompute: %s done (%d/%d shards)", finished, done["shards"], len(todo))
            if time.time() - last_log > 10:
                last_log = time.time()
                ctx.log_metrics({"progress.samples": done["samples"], "progress.written": done["written"],
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
    ctx.log_metrics({k: v for k, v in timings.items() if k != "samples"}, step=done["samples"])
    return timings


SKIPPED_EXAMPLES = 5  # per reason, in the report


def _keep_examples(examples: dict[str, list[dict]], stats: dict) -> None:
    for key, uid, reason, detail in stats.get("skipped_samples", []):
        kept = examples.setdefault(reason, [])
        if len(kept) < SKIPPED_EXAMPLES:
            kept.append({"key": key, "uid": uid, "detail": config_lib.redact_text(str(detail))[:200]})


class PrecomputePhase(Phase):
    name = "precompute"
    config_class = PrecomputeConfig
    output_subdir = "latents"
    description = __doc__.splitlines()[0]
    # `version_config` drops VERSION_EXCLUDE itself (and adds the encoder hashes): nothing more here.
    version_exclude = ()

    def input_uri(self, cfg: PrecomputeConfig) -> str:
        uri = require_input(cfg)
        if cfg.exclude:
            from pipelines import dedup_images

            dedup_images.check_exclude(cfg.exclude, uri)
        return uri

    def version_config(self, cfg: PrecomputeConfig) -> dict:
        return version_tree(cfg)

    def summary(self, result: PhaseResult) -> dict:
        return {**super().summary(result), "columns": result.manifest.get("columns")}

    def prepare(self, ctx: Context) -> None:
        cfg, out_dir = ctx.cfg, ctx.output
        try:  # per shard its selection where it has one (a version reusing earlier downloads), else its tar
            tars = image_shards.list_shards(ctx.input_uri)
        except image_shards.ImageShardError:
            raise PrecomputeError(f"{ctx.input_uri}: no .tar shards (expected img2dataset webdataset output "
                                  f"NNNNN.tar)") from None
        names = [shard_name(t) for t in tars]
        storage.makedirs(out_dir)
        finished = _finished_shards(cfg, out_dir)
        todo = [(n, t) for n, t in zip(names, tars) if n not in finished]
        for name, _ in todo:  # parts of a killed run are not trusted: the shard is redone whole
            for stale in _shard_files(cfg, out_dir, name):
                if storage.exists(stale):
                    storage.delete(stale)
        use_gpu, actors = _resources(cfg, ctx.ray)
        key = latent_reuse.reuse_key(version_tree(cfg))
        pool, reuse_files = [], {}
        if cfg.reuse:
            pool = latent_reuse.find_pool(storage.parent(out_dir), storage.basename(out_dir), key)
            if pool and todo:
                reuse_files = latent_reuse.plan(out_dir, todo, latent_reuse.pool_index(pool))
                log.info("precompute: latents of %s reused where they hold a sample (%d of %d shards)",
                         ", ".join(storage.basename(d) for d in pool), len(reuse_files), len(todo))
        ctx.state.update(tars=tars, names=names, todo=todo, use_gpu=use_gpu, actors=actors,
                         spec=encoder_spec(cfg, use_gpu), sources=encoder_sources(cfg), reuse_key=key,
                         reuse_pool=pool, reuse_files=reuse_files)

    def execute(self, ctx: Context) -> Outcome:
        cfg, out_dir, state = ctx.cfg, ctx.output, ctx.state
        tars, names, todo, spec = state["tars"], state["names"], state["todo"], state["spec"]
        use_gpu, actors = state["use_gpu"], state["actors"]
        if use_gpu:
            probe = ctx.ray.get(ctx.ray.remote(num_gpus=1, num_cpus=1)(compute_probe).remote(spec))
        else:
            # CPU actors use the same device and precision: probing here spares a worker that would
            # import and load the encoders only for this.
            probe = compute_probe(spec)
        shapes, bucket_shapes = probe["shapes"], probe["bucket_shapes"]
        extra: dict[str, Any] = {}
        if probe["empty_text_emb"] is not None:
            extra["empty_text_emb"] = latent_shards.write_empty_text(out_dir, probe["empty_text_emb"])
        log.info("precompute: %d of %d shards to do -> %s (%d %s actors)", len(todo), len(tars), out_dir, actors,
                 "GPU" if use_gpu else "CPU")
        timings = _encode_shards(ctx, todo, spec, actors, shapes, bucket_shapes) if todo else {}
        if storage.exists(storage.join(out_dir, latent_reuse.REUSE_DIR)):
            storage.delete(storage.join(out_dir, latent_reuse.REUSE_DIR))

        if cfg.buckets:
            return self._bucketed_outcome(ctx, shapes, bucket_shapes, extra, timings)
        shard_entries, validation_entries, totals = [], [], Counter()
        skipped_by_reason, converted_by_mode = Counter(), Counter()
        for name, tar in zip(names, tars):
            stats, rows = latent_shards.read_shard_stats(storage.join(out_dir, f"{name}.parquet"))
            if rows != stats["written"]:
                raise PrecomputeError(f"{out_dir}/{name}.parquet: {rows} rows, footer says {stats['written']} written")
            shard_entries.append({"file": f"{name}.parquet", "rows": rows, "source": storage.basename(tar),
                                  "input_samples": stats["input_samples"]})
            held_out = int(stats.get("validation_written", 0))
            if held_out:
                file = latent_shards.validation_file(f"{name}.parquet")
                _, validation_rows = latent_shards.read_shard_stats(storage.join(out_dir, file))
                if validation_rows != held_out:
                    raise PrecomputeError(f"{out_dir}/{file}: {validation_rows} rows, {name}.parquet's footer says "
                                          f"{held_out} validation samples")
                validation_entries.append({"file": file, "rows": held_out, "source": storage.basename(tar)})
            totals.update(input_samples=stats["input_samples"], train=rows, validation=held_out,
                          reused=stats.get("reused", 0))
            skipped_by_reason.update(stats["skipped_by_reason"])
            _keep_examples(ctx.state.setdefault("skipped_examples", {}), stats)
            converted_by_mode.update(stats["converted_by_mode"])
        columns = {name: latent_shards.column_spec(name, shape) for name, shape in shapes.items()}
        extra.update({"columns": columns, "shards": shard_entries,
                      "validation": {"fraction": cfg.validation_fraction, "rule": latent_shards.VALIDATION_RULE,
                                     "samples": totals["validation"], "shards": validation_entries}})
        return self._outcome(ctx, totals, skipped_by_reason, converted_by_mode, extra, timings)

    def _bucketed_outcome(self, ctx: Context, shapes: dict, bucket_shapes: list[dict], extra: dict,
                          timings: dict) -> Outcome:
        """Per bucket its columns and shard files (`latent_shards.bucket_manifest`), from each shard's counts
        file, every bucket file checked against them."""
        cfg, out_dir, state = ctx.cfg, ctx.output, ctx.state
        sizes = cfg.bucket_sizes()
        buckets = [{"name": b["name"], "size": b["stage_a"], "semantic_size": b["semantic"],
                    "columns": {n: latent_shards.column_spec(n, shape) for n, shape in bucket_shapes[i].items()},
                    "samples": 0, "shards": [], "validation": {"samples": 0, "shards": []}}
                   for i, b in enumerate(sizes)]
        totals, skipped_by_reason, converted_by_mode = Counter(), Counter(), Counter()
        for name, tar in zip(state["names"], state["tars"]):
            stats = storage.read_json(shard_stats_file(out_dir, name))
            totals.update(input_samples=stats["input_samples"], train=stats["written"],
                          validation=stats["validation_written"], reused=stats.get("reused", 0))
            skipped_by_reason.update(stats["skipped_by_reason"])
            _keep_examples(ctx.state.setdefault("skipped_examples", {}), stats)
            converted_by_mode.update(stats["converted_by_mode"])
            for bucket in buckets:
                counts = stats["buckets"].get(bucket["name"], {})
                for split, entry, file in (("written", bucket, f"{name}.parquet"),
                                           ("validation_written", bucket["validation"],
                                            latent_shards.validation_file(f"{name}.parquet"))):
                    expected = int(counts.get(split, 0))
                    if not expected:
                        continue
                    path = f"{bucket['name']}/{file}"
                    _, rows = latent_shards.read_shard_stats(storage.join(out_dir, path))
                    if rows != expected:
                        raise PrecomputeError(f"{out_dir}/{path}: {rows} rows, shards/{name}.json says {expected}")
                    entry["shards"].append({"file": path, "rows": rows, "source": storage.basename(tar)})
                    entry["samples"] += rows
        # Dtypes (and encodings) of the columns; their shapes are per bucket.
        columns = {n: {k: v for k, v in latent_shards.column_spec(n, shape).items() if k != "shape"}
                   for n, shape in shapes.items()}
        extra.update({"columns": columns, "buckets": buckets,
                      "bucket_rule": "nearest aspect ratio in log space (pipelines.latent_buckets.assign_buckets); "
                                     "center-cropped to it",
                      "validation": {"fraction": cfg.validation_fraction, "rule": latent_shards.VALIDATION_RULE,
                                     "samples": totals["validation"]}})
        return self._outcome(ctx, totals, skipped_by_reason, converted_by_mode, extra, timings)

    def _outcome(self, ctx: Context, totals: Counter, skipped_by_reason: Counter, converted_by_mode: Counter,
                 extra: dict, timings: dict) -> Outcome:
        cfg, out_dir, state = ctx.cfg, ctx.output, ctx.state
        tars, todo = state["tars"], state["todo"]
        skipped = sum(skipped_by_reason.values())
        written = totals["train"] + totals["validation"]
        if totals["input_samples"] != written + skipped:
            raise PrecomputeError(f"{out_dir}: {totals['input_samples']} input samples != {written} written "
                                  f"+ {skipped} skipped")
        # written = train + validation: every input sample is in one split or skipped with a reason.
        counts = {"input_shards": len(tars), "input_samples": totals["input_samples"], "written": written,
                  "train": totals["train"], "validation": totals["validation"],
                  "skipped": skipped, "skipped_by_reason": dict(sorted(skipped_by_reason.items())),
                  "converted": sum(converted_by_mode.values()),
                  "converted_by_mode": dict(sorted(converted_by_mode.items())),
                  # Of `written`: copied from earlier versions (reuse_pool) vs encoded by this one.
                  "reused": totals["reused"], "encoded": written - totals["reused"]}
        if cfg.buckets:
            counts["train_by_bucket"] = {b["name"]: b["samples"] for b in extra["buckets"]}
        extra.update({"reuse_key": state["reuse_key"], "reuse_pool": [storage.basename(d) for d in state["reuse_pool"]],
                      "string_columns": ["key", "uid", "caption"],
                      "row_group_size": cfg.row_group_size, "encoders": state["sources"],
                      "input_manifest_hash": manifest_lib.manifest_hash(ctx.input_uri),
                      # This invocation only: a resumed run computed `shards_computed` of the shards.
                      "last_run": {"shards_computed": len(todo), "actors": state["actors"],
                                   "device": "cuda" if state["use_gpu"] else "cpu", **timings},
                      "notes": {"semantic": "raw Semantic Compressor (BatchNorm) output; Stage C trains on (x+1)/42",
                                "stage_a": "unquantized Stage A latent divided by its scale_factor"}})
        flat = {"input_samples": counts["input_samples"], "written": counts["written"],
                "written.train": counts["train"], "written.validation": counts["validation"],
                "skipped": counts["skipped"], "converted": counts["converted"], "shards": len(tars),
                "shards_computed": len(todo), "reused": counts["reused"], "encoded": counts["encoded"]}
        flat.update({f"skipped.{k}": v for k, v in skipped_by_reason.items()})
        flat.update({f"converted.{k}": v for k, v in converted_by_mode.items()})
        flat.update({f"written.train.{k}": v for k, v in counts.get("train_by_bucket", {}).items()})
        ctx.log_metrics(flat)
        # report/: written vs skipped by reason, with sampled skipped samples (key, uid, detail) per reason.
        examples = ctx.state.get("skipped_examples", {})
        ctx.log_files(reports.counts_report(out_dir, self.name, ctx.version, counts["skipped_by_reason"],
                                            kept=written, samples={k: examples[k] for k in sorted(examples)}),
                      reports.REPORT_DIR)
        return Outcome(counts=counts, extra=extra)

    def record(self, ctx: Context, manifest: dict) -> None:
        summary = {k: v for k, v in manifest.items() if k != "shards"}
        if isinstance(summary.get("validation"), dict):  # the file lists stay in manifest.json
            summary["validation"] = {k: v for k, v in summary["validation"].items() if k != "shards"}
        if isinstance(summary.get("buckets"), list):
            summary["buckets"] = [{k: v for k, v in b.items() if k not in ("shards", "validation")}
                                  for b in summary["buckets"]]
        ctx.log_dict(summary, "manifest.json")

    def finish(self, ctx: Context, manifest: dict) -> None:
        parts = storage.join(ctx.output, PARTS_DIR)
        if storage.exists(parts):
            storage.delete(parts)


PHASE = PrecomputePhase()
# The module-level entry points callers use: run(cfg) -> main(argv), output_dir(cfg).
run, main, output_dir = PHASE.run, PHASE.main, PHASE.output_dir


if __name__ == "__main__":
    module_cli(__spec__.name)
