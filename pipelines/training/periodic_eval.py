"""Periodic evaluation during training (`evaluation.every`, off by default): what the driver checks before
the run starts, and what rank 0 does at an evaluation step.

The stage specs say which images are evaluated (`StageSpec.plan_evaluation` / `evaluation_images`: Stage C
generates them from prompts through the run's text encoder, Stage B and Stage A; Stage B decodes its samples
from true semantic latents with the run's Stage A). The prompts and the scores come from `pipelines.evaluate`,
the functions the evaluate phase uses, so `eval/probe/colour` here means what `probe/colour` means there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Callable, Optional

import torch
from torch import nn

from pipelines import evaluate, storage
from pipelines import latent_shards
from pipelines import manifest as manifest_lib
from pipelines.config import ConfigError
from pipelines.training.config import EvaluationConfig

log = logging.getLogger(__name__)

METRIC_PREFIX = "eval"


@dataclasses.dataclass
class EvaluationContext:
    """What a stage's `evaluation_images` draws with besides the model."""

    evaluation: EvaluationConfig
    prompts: list[str]  # Stage C: the prompts to generate from (resolved once by the driver)
    text_uncond: Optional[torch.Tensor]  # the empty caption's embedding (None: conditional sampling only)
    device: torch.device
    source: str  # names the evaluated weights: "<run name>@<step>"
    load: Callable[[str], nn.Module]  # a companion's module, loaded once
    samples: Callable[[], dict]  # Stage B: the evaluated samples (latents and captions), read once


# --------------------------------------------------------------------------------------------
# Before the run (the driver): every problem is a ConfigError naming the key


def require_companions(companions: dict[str, str], names: tuple[str, ...], what: str) -> None:
    missing = [name for name in names if name not in companions]
    if missing:
        raise ConfigError(f"evaluation.every: the evaluation {what} the run's {', '.join(names)}; this run has no "
                          f"{', '.join(missing)} (set checkpoints.{missing[0]}, or precompute records it)")


def resolve_prompts(cfg: EvaluationConfig, input_uri: str) -> list[str]:
    """Stage C: `prompts`, then `unseen_prompts` demo prompts unseen in the training captions."""
    return evaluate.evaluation_prompts(cfg.prompts, cfg.unseen_prompts, input_uri, cfg.seed,
                                       key="evaluation.unseen_prompts")


def check_scorable(cfg: EvaluationConfig, prompts: list[str]) -> None:
    """Something will be scored: the probe applies to the prompts, or a CLIP checkpoint is configured."""
    probe = evaluate.probe_applies(cfg.probe, prompts, key="evaluation.probe")
    if not probe and not cfg.clip.checkpoint:
        from pipelines.evaluation.probe import is_demo_caption

        example = next((p for p in prompts if not is_demo_caption(p)), "")
        why = "evaluation.probe is off" if cfg.probe == "off" else f"{example!r} is not a demo caption"
        raise ConfigError(f"evaluation.every: nothing to score: no attribute probe ({why}) and no "
                          "evaluation.clip.checkpoint")
    if cfg.clip.checkpoint and not storage.exists(cfg.clip.checkpoint):
        raise ConfigError(f"evaluation.clip.checkpoint: {cfg.clip.checkpoint} does not exist")


def _companion_config(uri: str, kind: str):
    """The config of a companion checkpoint from its config.json alone (no weights are read)."""
    from stages.checkpoint import CONFIG_FILE, read_config

    with tempfile.TemporaryDirectory(prefix="wurst-config-") as tmp:
        storage.write_bytes(os.path.join(tmp, CONFIG_FILE), storage.read_bytes(storage.join(uri, CONFIG_FILE)))
        return read_config(tmp, expected_kind=kind)[1]


def check_image_size(cfg: EvaluationConfig, companions: dict[str, str]) -> None:
    """Stage C: the images' size is one the run's Stage B and Stage A produce exactly."""
    from pipelines.generate import check_image_size as check

    stage_b = _companion_config(companions["stage_b"], "stage_b")
    stage_a = _companion_config(companions["stage_a"], "stage_a")
    try:
        check(cfg.height, cfg.width, stage_b.latent_multiple, stage_a.downscale)
    except ConfigError as exc:
        raise ConfigError(f"evaluation.height / evaluation.width: {exc}") from None


def evaluation_samples(input_uri: str, columns: list[str], count: int) -> dict:
    """The first `count` samples (manifest order) of the input's validation split, or of its training
    shards when it has none: the same samples at every evaluation and in every run on this input."""
    manifest = manifest_lib.read(input_uri)
    split = "validation" if latent_shards.split_samples(manifest, "validation") else "train"
    # A bucketed input: its largest bucket's (one batch holds one size).
    bucket = max(latent_shards.bucket_names(manifest),
                 key=lambda b: latent_shards.split_samples(latent_shards.bucket_manifest(manifest, b), split))
    reader = latent_shards.LatentDataset(input_uri, columns, split=split, shuffle=False, infinite=False,
                                         batch_size=count, bucket=bucket)
    return next(iter(reader))


# --------------------------------------------------------------------------------------------
# At an evaluation step (rank 0)


def metric_names(metrics: dict[str, float], suffix: str) -> dict[str, float]:
    """`score_images`' names under eval/, with the stage's suffix on the group: probe/colour ->
    eval/probe_b/colour, clip_score -> eval/clip_score_b (suffix "_b")."""
    out = {}
    for key, value in metrics.items():
        group, _, attribute = key.partition("/")
        out[f"{METRIC_PREFIX}/{group}{suffix}" + (f"/{attribute}" if attribute else "")] = value
    return out


class Evaluator:
    """Rank 0's periodic evaluation of one run: scores images against their texts with what is loaded once
    (the CLIP model, the evaluated samples)."""

    def __init__(self, cfg: EvaluationConfig, input_uri: str, sample_columns: list[str], device: torch.device):
        self.cfg, self.input_uri, self.sample_columns, self.device = cfg, input_uri, sample_columns, device
        self._clip: Optional[tuple] = None
        self._samples: Optional[dict] = None

    def samples(self) -> dict:
        if self._samples is None:
            self._samples = evaluation_samples(self.input_uri, self.sample_columns, self.cfg.samples)
        return self._samples

    def clip(self) -> Optional[tuple]:
        if self._clip is None and self.cfg.clip.checkpoint:
            self._clip = evaluate.load_clip_scorer(self.cfg.clip, device=self.device)
        return self._clip

    def score(self, images: list, prompts: list[str], suffix: str) -> dict[str, float]:
        probe = evaluate.probe_applies(self.cfg.probe, prompts, key="evaluation.probe")
        scores = evaluate.score_images(images, prompts, probe=probe, clip=self.clip())
        if scores.probe is not None:
            log.info("evaluation: attribute probe on %d images, %d with no object read", scores.probe["n_images"],
                     scores.probe["no_object"])
        return metric_names(scores.metrics, suffix)
