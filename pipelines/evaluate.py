"""`python -m pipelines.evaluate --input <run dir | run/export | run/export/<step>>`: evaluate one export.

Generates `n` images per prompt from the export (its Stage C and the Stage B / A and text encoder it
was trained with, generation C -> B -> A) and scores them: the demo attribute probe (background, object
colour, shape, size and position read back from the pixels, on prompts whose combinations the training
captions do not contain; `pipelines.evaluation.probe`), FID against a reference image set with the FID
Inception network loaded from a local weights file, and CLIP score with a local open_clip model. Writes
the images, `grid.png` and `evaluation.json` to `<data_root>/evaluations/<version>/`, and logs the
metrics, the grid and a per-prompt table to an MLflow run tagged with the training run it evaluates.
The version derives from the export (its step and record) and the settings: re-evaluating is a no-op.
The trainer's periodic evaluation (`pipelines.training.periodic_eval`) picks and scores its prompts with
the same functions (`evaluation_prompts`, `probe_applies`, `score_images`).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Literal, Optional

from pipelines import export_layout, storage, tracking
from pipelines import manifest as manifest_lib
from pipelines.config import ConfigError, param
from pipelines.phase import Context, InputError, Outcome, Phase, module_cli
from pipelines.runtime import default_data_root

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass
class FidConfig:
    # Reference images: an image-shard dataset (a download output) or a folder of images; None: no FID.
    reference: Optional[str] = None
    # The FID Inception weights (pt_inception-2015-12-05-6726825d.pth), a local file: never downloaded.
    inception_weights: Optional[str] = None
    max_reference_images: int = param(2048, ge=2)
    # Tests only: seeded random Inception weights instead of the file (FID numbers are then meaningless).
    random_inception_seed: Optional[int] = None


@dataclasses.dataclass
class ClipScoreConfig:
    # A local open_clip checkpoint (file, or a directory holding one) and its open_clip model name.
    checkpoint: Optional[str] = None
    model_name: Optional[str] = None
    # An inline open_clip model config for a custom (e.g. tiny test) model; None: open_clip's own.
    model_cfg: Optional[dict] = None

    def validate(self) -> None:
        if self.checkpoint and not self.model_name:
            raise ConfigError("model_name: required with checkpoint (the open_clip model name)")


@dataclasses.dataclass
class EvaluateConfig:
    input: Optional[str] = None  # a training run dir, its export root, or one export step
    # A Stage B checkpoint to decode with instead of the copy bundled in the Stage C export (a stages
    # checkpoint, or a run's export/stage_b = its latest export): the export keeps the Stage B of the day
    # Stage C trained, and Stage C's weights, hence its export, do not change when only Stage B does.
    stage_b: Optional[str] = None
    output: Optional[str] = None  # default <data_root>/evaluations
    data_root: str = dataclasses.field(default_factory=default_data_root)
    prompts: list[str] = dataclasses.field(default_factory=list)
    # Demo datasets: this many prompts whose attribute combinations the training captions lack.
    unseen_prompts: int = param(0, ge=0)
    probe: Literal["auto", "on", "off"] = "auto"  # auto: on when every prompt is a demo caption
    n: int = param(4, ge=1)
    seed: int = 0
    height: int = param(128, ge=8)
    width: int = param(128, ge=8)
    steps_c: Optional[str] = None
    steps_b: Optional[int] = param(None, ge=1)
    guidance_c: Optional[float] = param(None, ge=0.0)
    guidance_b: Optional[float] = param(None, ge=0.0)
    batch_size: int = param(8, ge=1)
    fid: FidConfig = dataclasses.field(default_factory=FidConfig)
    clip: ClipScoreConfig = dataclasses.field(default_factory=ClipScoreConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
        if not self.prompts and not self.unseen_prompts:
            raise ConfigError("prompts: give prompts, or unseen_prompts: N (demo datasets)")
        if self.fid.reference and not (self.fid.inception_weights or self.fid.random_inception_seed is not None):
            raise ConfigError("fid.inception_weights: required with fid.reference (a local "
                              "pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)")


def export_dir(uri: str) -> str:
    """The export step directory an input names: a run dir, its export root (-> latest), or a step."""
    uri = storage.normalize(uri)
    if storage.exists(storage.join(uri, export_layout.EXPORT_RECORD)):
        return uri
    for root in (uri, storage.join(uri, "export")):
        latest = export_layout.latest_dir(root)
        if latest is not None:
            return latest
    raise InputError(f"input: {uri} is not a training run, its export/ or an export step "
                     f"(no {export_layout.LATEST} or {export_layout.EXPORT_RECORD})")


def training_captions(latents_uri: str) -> list[str]:
    """The captions of a latent dataset (the `caption` column of its shards)."""
    import pyarrow.parquet as pq

    files = sorted(storage.list_files(latents_uri))
    names = [storage.basename(f) for f in files]
    shards = [f for f, name in zip(files, names) if name.startswith("shard-") and name.endswith(".parquet")]
    if not shards:
        raise InputError(f"{latents_uri}: no latent shards to read training captions from (unseen_prompts)")
    captions: list[str] = []
    for path in shards:
        captions += pq.read_table(storage.local_copy(path), columns=["caption"]).column("caption").to_pylist()
    return captions


# ------------------------------------------------------------------ shared with the trainer's periodic evaluation


def evaluation_prompts(prompts: list[str], unseen: int, latents_uri: str, seed: int,
                       key: str = "unseen_prompts") -> list[str]:
    """`prompts`, then `unseen` demo prompts whose attribute combinations the training captions (of the
    latent dataset `latents_uri`) never contain. `key` names the setting in errors."""
    chosen = list(prompts)
    if unseen:
        from pipelines.evaluation import probe

        try:
            chosen += probe.unseen_prompts(training_captions(latents_uri), unseen, seed=seed)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return chosen


def probe_applies(mode: str, prompts: list[str], key: str = "probe") -> bool:
    """Whether the demo attribute probe scores these prompts: `auto` when every one is a demo caption;
    `on` insists (ConfigError naming `key` otherwise); `off` never."""
    if mode == "off":
        return False
    from pipelines.evaluation import probe

    demo = all(probe.is_demo_caption(p) for p in prompts)
    if mode == "on" and not demo:
        raise ConfigError(f"{key}: on, but not every prompt is a demo caption (the probe reads the demo's "
                          "shapes, colours and positions)")
    return demo


def load_clip_scorer(cfg: ClipScoreConfig, device=None) -> Optional[tuple]:
    """(open_clip model, tokenizer) from the configured local checkpoint; None when none is configured."""
    if not cfg.checkpoint:
        return None
    from pipelines.evaluation import clip_score

    return clip_score.load_clip(cfg.checkpoint, cfg.model_name, model_cfg=cfg.model_cfg, device=device)


@dataclasses.dataclass
class ImageScores:
    """What `score_images` measured: flat metrics (`probe/<attribute>`, `clip_score`) and the details."""

    metrics: dict[str, float]
    probe: Optional[dict] = None  # probe.score's result
    clip_score: Optional[dict] = None  # {"mean", "per_image"}


def score_images(images: list, prompts: list[str], *, probe: bool, clip: Optional[tuple] = None) -> ImageScores:
    """Score images[i] against prompts[i]: the demo attribute probe when `probe`, CLIP score with `clip`
    (`load_clip_scorer`'s model and tokenizer) when given."""
    scores = ImageScores(metrics={})
    if probe:
        from pipelines.evaluation import probe as probe_lib

        scores.probe = probe_lib.score(images, prompts)
        scores.metrics.update({f"probe/{attribute}": value for attribute, value in scores.probe["accuracy"].items()})
    if clip is not None:
        from pipelines.evaluation import clip_score

        model, tokenizer = clip
        result = clip_score.clip_score(model, tokenizer, images, prompts)
        scores.clip_score = {"mean": float(result.mean), "per_image": [float(v) for v in result.per_image]}
        scores.metrics["clip_score"] = float(result.mean)
    return scores


def reference_batches(uri: str, limit: int, size: int, batch: int = 32):
    """uint8 (B, size, size, 3) batches of up to `limit` reference images: an image-shard dataset or a folder."""
    import io

    import numpy as np
    from PIL import Image

    from pipelines import image_shards

    def images():
        local = storage.local_path(uri)
        if local and os.path.isdir(local) and not glob.glob(os.path.join(local, "*.tar")) \
                and not glob.glob(os.path.join(local, "*" + image_shards.SELECTION_SUFFIX)):
            for path in sorted(p for p in glob.glob(os.path.join(local, "**", "*"), recursive=True)
                               if p.lower().endswith(IMAGE_SUFFIXES)):
                yield Image.open(path, formats=image_shards.WEB_IMAGE_FORMATS)
            return
        # A download version: each shard's samples (a selection's only, in a version reusing earlier downloads).
        sources = image_shards.list_shards(uri) if storage.is_dir(uri) else [uri]
        for _, members in (sample for source in sources for sample in image_shards.iter_shard_samples(source)):
            data = next((v for k, v in members.items() if k.lower() in {s.lstrip(".") for s in IMAGE_SUFFIXES}), None)
            if data is not None:
                yield Image.open(io.BytesIO(data), formats=image_shards.SHARD_IMAGE_FORMATS)

    out, seen = [], 0
    for image in images():
        out.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)))
        seen += 1
        if len(out) == batch or seen == limit:
            yield np.stack(out)
            out = []
        if seen == limit:
            return
    if out:
        yield np.stack(out)
    if seen < 2:
        raise InputError(f"fid.reference: {uri} holds {seen} images; FID needs at least 2")


class EvaluatePhase(Phase):
    name = "evaluate"
    config_class = EvaluateConfig
    output_subdir = "evaluations"
    description = "Generate images from a training export and score them (probe, FID, CLIP score)."
    uses_ray = False
    input_help = "a training run dir, its export/ or one export step (overrides config key `input`)"

    def input_uri(self, cfg) -> Optional[str]:
        if not cfg.input:
            raise ConfigError("input: required (a training run, its export/ or an export step)")
        return storage.normalize(cfg.input)

    def input_identity(self, cfg) -> Optional[str]:
        uri = self.input_uri(cfg)
        if not storage.exists(uri):
            return f"pending:{uri}"  # a workflow plans this before the training step ran
        try:
            export = export_dir(uri)
        except InputError:
            return f"pending:{uri}"
        record = storage.read_bytes(storage.join(export, export_layout.EXPORT_RECORD))
        identity = f"export:{manifest_lib.hash_bytes(record)}"
        if cfg.stage_b:  # the decoder's weights, not its path: a run trained further keeps its path
            weights = storage.join(export_layout.resolve_checkpoint(cfg.stage_b), "model.safetensors")
            identity += (f"|stage_b:{manifest_lib.hash_bytes(storage.read_bytes(weights))}"
                         if storage.exists(weights) else f"|stage_b:pending:{cfg.stage_b}")
        return identity

    def lineage_input(self, ctx: Context) -> Optional[str]:
        # The training run (its manifest names its MLflow run): wurst.input_run_id links the two runs.
        export = ctx.state.get("export") or export_dir(ctx.input_uri)
        return export.rstrip("/").rsplit("/", 2)[0]  # <run>/export/<step> -> <run>

    def prepare(self, ctx: Context) -> None:
        cfg = ctx.cfg
        export = export_dir(ctx.input_uri)
        record = storage.read_json(storage.join(export, export_layout.EXPORT_RECORD))
        if record.get("stage") != "c":
            raise InputError(f"input: {export} is a Stage {str(record.get('stage')).upper()} export; evaluation "
                             "generates from text and needs a Stage C run's export")
        prompts = evaluation_prompts(cfg.prompts, cfg.unseen_prompts, record["input"], cfg.seed)
        ctx.state.update(export=export, record=record, prompts=prompts, probe=probe_applies(cfg.probe, prompts))

    def mlflow_tags(self, ctx: Context) -> dict:
        record = ctx.state.get("record") or {}
        tags = super().mlflow_tags(ctx)
        tags.update({"wurst.evaluated_run_id": record.get("mlflow_run_id") or "",
                     "wurst.evaluated_run": record.get("run_name") or "",
                     "wurst.evaluated_step": str(record.get("step", ""))})
        return tags

    def execute(self, ctx: Context) -> Outcome:
        import numpy as np

        from pipelines import generate

        cfg, export, prompts = ctx.cfg, ctx.state["export"], ctx.state["prompts"]
        out = storage.local_path(ctx.output)
        if out is None:
            raise ConfigError("output: evaluate writes images to a local or shared filesystem path")
        images_dir = os.path.join(out, "images")
        models = generate.load_generation_models(export)
        if cfg.stage_b:
            import stages

            like = next(models.stage_b.parameters())
            models.stage_b = stages.load(storage.local_copy(export_layout.resolve_checkpoint(cfg.stage_b)),
                                         expected_kind="stage_b", device=like.device, dtype=like.dtype)
            models.sources["stage_b"] = cfg.stage_b
            models.check()
        result = generate.generate_images(
            prompts, models=models, n=cfg.n, height=cfg.height, width=cfg.width, seed=cfg.seed,
            steps_c=cfg.steps_c, steps_b=cfg.steps_b, guidance_c=cfg.guidance_c, guidance_b=cfg.guidance_b,
            batch_size=cfg.batch_size, out_dir=images_dir)
        pixels = np.stack([np.asarray(image.convert("RGB")) for image in result.images])
        scores = score_images(list(result.images), result.prompts, probe=ctx.state["probe"],
                              clip=load_clip_scorer(cfg.clip))
        metrics: dict[str, float] = dict(scores.metrics)
        evaluation: dict = {"export": export, "step": ctx.state["record"].get("step"), "prompts": prompts,
                            "n": cfg.n, "images": [os.path.relpath(p, out) for p in result.files]}
        if scores.probe is not None:
            from pipelines.evaluation import probe

            evaluation["probe"] = scores.probe
            log.info("attribute probe:\n%s", probe.format_table(scores.probe))
        if cfg.fid.reference:
            evaluation["fid"] = self._fid(cfg, pixels)
            metrics["fid"] = evaluation["fid"]["fid"]
        if scores.clip_score is not None:
            evaluation["clip_score"] = scores.clip_score

        evaluation["metrics"] = metrics
        storage.write_json(storage.join(ctx.output, "evaluation.json"), evaluation)
        result.grid.save(os.path.join(out, "grid.png"))
        ctx.log_metrics(metrics, step=int(ctx.state["record"].get("step") or 0))
        if ctx.mlflow_run is not None:
            import mlflow

            mlflow.log_image(result.grid, "images/grid.png")
            if "probe" in evaluation:
                mlflow.log_table(data=probe_table(evaluation["probe"]), artifact_file="probe/per_prompt.json")
        return Outcome(counts={"images": len(result.images), "prompts": len(prompts)},
                       extra={"metrics": metrics, "export": export},
                       details={"metrics": metrics, "evaluation": evaluation})

    @staticmethod
    def _fid(cfg: EvaluateConfig, pixels) -> dict:
        from pipelines.evaluation import fid

        inception = fid.load_inception(cfg.fid.inception_weights, random_init_seed=cfg.fid.random_inception_seed)
        size = int(pixels.shape[1])
        reference = fid.stats_of_image_batches(
            inception, reference_batches(cfg.fid.reference, cfg.fid.max_reference_images, size))
        generated = fid.stats_of_image_batches(inception, (pixels[i:i + 32] for i in range(0, len(pixels), 32)))
        return {"fid": fid.fid_from_stats(generated, reference), "reference_images": reference.count,
                "generated_images": generated.count, "resolution": size}


def probe_table(scored: dict) -> dict[str, list]:
    """The probe's per-prompt accuracies as columns (an MLflow table)."""
    rows = scored["per_prompt"]
    columns: dict[str, list] = {"prompt": list(rows), "n_images": [r["n_images"] for r in rows.values()]}
    for attribute in scored["accuracy"]:
        columns[attribute] = [r["accuracy"][attribute] for r in rows.values()]
    return columns


PHASE = EvaluatePhase()
run, main, output_dir = PHASE.run, PHASE.main, PHASE.output_dir


if __name__ == "__main__":
    module_cli(__spec__.name)
