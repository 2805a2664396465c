"""`python -m pipelines.encoders`: prepare the frozen encoders as stages checkpoints.

Precompute and generation load the text encoder (open_clip CLIP-H / bigG) and the Semantic
Compressor from stages checkpoint directories. This phase builds them from local weight files named
in the config (never a hub download) and writes `<data_root>/encoders/<version>/{text,semantic}/`
plus a manifest with the source files' hashes. With `random_weights: true` it writes seeded random
weights instead: that is what tests and the demo use (nothing can be downloaded there), and the
manifest says so in `weights: random`, never silently.

Random weights + `input` (the download phase's image shards): the Semantic Compressor's output
BatchNorm is calibrated on those images. A trained EfficientNet encoder emits latents spanning about
+-40, which is why the paper's Stage C trains on (x + 1) / 42; a random one emits ~0.02, so Stage C's
targets would be ~5e-4, the noise would be trivially predictable and nothing would be learned. The
calibration sets the BatchNorm statistics from the data (mean, variance per channel) and its affine
to 42 / -1, so (x + 1) / 42 has zero mean and unit variance per channel, as in the paper's latents.

`semantic_pretrain.steps` > 0 (random weights + input) first trains the random compressor to reconstruct
its input images from its latent (`stages.semantic.pretrain_by_reconstruction`): the stand-in for the
paper's ImageNet-pretrained start, without labels (BENCHMARKS.md, "demo prompt adherence"). Like the
calibration it sees every downloaded image's pixels, the later validation split's included; no captions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Literal, Optional

from pipelines import manifest as manifest_lib
from pipelines import storage, tracking
from pipelines.config import ConfigError, param
from pipelines.phase import Context, Outcome, Phase, module_cli
from pipelines.runtime import default_data_root

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SemanticPretrainConfig:
    """Reconstruction pretraining of a random Semantic Compressor on the input images (0 steps: none)."""
    steps: int = param(0, ge=0)
    lr: float = param(2e-3, gt=0)
    batch_size: int = param(32, ge=1)
    # The reconstruction target's size in px (the input downscaled, area average).
    target_resolution: int = param(24, ge=4)
    # Images decoded once and held in memory (uint8 at the calibration resolution: 27 KB each at 96 px).
    max_images: int = param(4096, ge=1)


@dataclasses.dataclass
class EncodersConfig:
    output: Optional[str] = None  # default: <data_root>/encoders
    data_root: str = dataclasses.field(default_factory=default_data_root)
    text_preset: Literal["clip-h", "clip-bigg", "tiny"] = "clip-h"
    # Local open_clip weights (.safetensors / .bin / .pt) for the text tower; required unless random.
    text_weights: Optional[str] = None
    semantic_preset: Literal["paper", "tiny"] = "paper"
    # Local Semantic Compressor weights (e.g. converted from the released Würstchen EffNet encoder).
    semantic_weights: Optional[str] = None
    # Explicit opt-in to seeded random weights (tests, the demo); never a silent fallback.
    random_weights: bool = False
    seed: int = param(0, ge=0)
    # Image shards (download output) to calibrate the random Semantic Compressor's scale on; only
    # with random_weights (real weights carry their trained statistics).
    input: Optional[str] = None
    calibration_images: int = param(256, ge=8)
    # Resolution the calibration encodes at: the one precompute encodes semantic latents at.
    calibration_resolution: int = param(96, ge=32)
    semantic_pretrain: SemanticPretrainConfig = dataclasses.field(default_factory=SemanticPretrainConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
        if self.semantic_pretrain.steps and not (self.random_weights and self.input):
            raise ConfigError("semantic_pretrain.steps: pretraining applies only to random weights with input "
                              "images (random_weights: true and input)")
        if not self.random_weights:
            if not self.text_weights:
                raise ConfigError("text_weights: required (a local open_clip weights file), "
                                  "or set random_weights: true for tests")
            if not self.semantic_weights:
                raise ConfigError("semantic_weights: required (a local Semantic Compressor weights file), "
                                  "or set random_weights: true for tests")
        if self.input and not self.random_weights:
            raise ConfigError("input: calibration images apply only with random_weights: true "
                              "(real weights keep their trained statistics)")
        if self.input and not storage.exists(self.input):
            raise ConfigError(f"input: {self.input} does not exist (image shards from the download phase)")
        for key in ("text_weights", "semantic_weights"):
            path = getattr(self, key)
            if path and not self.random_weights and not os.path.isfile(path):
                raise ConfigError(f"{key}: weights file not found: {path}")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_identity(cfg: EncodersConfig) -> str:
    if cfg.random_weights:
        calibration = f",calibrated:{manifest_lib.input_identity(cfg.input)}" if cfg.input else ""
        return f"random:{cfg.seed}{calibration}"
    return "files:" + ",".join(_file_sha256(p) for p in (cfg.text_weights, cfg.semantic_weights))



def build(cfg: EncodersConfig, out: str) -> dict:
    import torch

    import stages
    from stages.checkpoint import read_state_dict_file
    from stages.semantic import SemanticCompressor, SemanticCompressorConfig
    from stages.text import TextEncoder, TextEncoderConfig

    torch.manual_seed(cfg.seed)
    text = TextEncoder(TextEncoderConfig.preset(cfg.text_preset))
    if not cfg.random_weights:
        text.load_open_clip_weights(cfg.text_weights, weights_key="text_weights")
    semantic = SemanticCompressor(SemanticCompressorConfig.preset(cfg.semantic_preset))
    if not cfg.random_weights:
        state = read_state_dict_file(cfg.semantic_weights)
        missing, unexpected = semantic.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"semantic_weights: {cfg.semantic_weights} does not match the "
                              f"{cfg.semantic_preset} Semantic Compressor (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    pretraining = pretrain_semantic(semantic, cfg) if cfg.semantic_pretrain.steps else None
    semantic.eval()
    calibration = calibrate_semantic(semantic, cfg) if cfg.input else None
    local = storage.local_path(out)
    if local is None:
        raise ConfigError("output: encoders must be written to a local or shared filesystem path")
    stages.save(text, os.path.join(local, "text"))
    stages.save(semantic, os.path.join(local, "semantic"))
    return {
        "text": {"preset": cfg.text_preset, "width": int(text.width),
                 "sha256": None if cfg.random_weights else _file_sha256(cfg.text_weights)},
        "semantic": {"preset": cfg.semantic_preset, "image_size": semantic.config.image_size,
                     "sha256": None if cfg.random_weights else _file_sha256(cfg.semantic_weights)},
        "weights": "random" if cfg.random_weights else "files",
        "calibration": calibration,
        "pretraining": pretraining,
    }


def _image_reader(cfg: EncodersConfig, batch_size: int):
    from pipelines import image_shards

    size = cfg.calibration_resolution
    try:
        return image_shards.ImageShardDataset(cfg.input, seed=cfg.seed, batch_size=batch_size, image_size=size,
                                              crop_size=size, shuffle_window=256)
    except image_shards.ImageShardError as exc:
        raise ConfigError(f"input: {exc}") from None


def pretrain_semantic(semantic, cfg: EncodersConfig) -> dict:
    """`semantic_pretrain`: reconstruction pretraining of the random compressor on up to `max_images` of
    `input`'s images at the calibration resolution (the one precompute encodes at), decoded once and held in
    memory as uint8, batches drawn from them with the config's seed."""
    import time

    import torch

    from stages.semantic import pretrain_by_reconstruction

    pre = cfg.semantic_pretrain
    reader = _image_reader(cfg, 64)
    limit = min(pre.max_images, reader.num_samples)  # the reader cycles epochs: one pass at most
    chunks, count = [], 0
    for batch in reader:
        if count >= limit:
            break
        pixels = batch["images"][: limit - count]
        chunks.append((pixels * 255).round().to(torch.uint8))
        count += pixels.shape[0]
    if count == 0:
        raise ConfigError(f"input: {cfg.input} has no images to pretrain the Semantic Compressor on")
    images = torch.cat(chunks)
    generator = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            yield images[torch.randint(0, count, (pre.batch_size,), generator=generator)].float() / 255.0

    started = time.monotonic()
    result = pretrain_by_reconstruction(semantic, batches(), steps=pre.steps, lr=pre.lr,
                                        input_size=cfg.calibration_resolution, target_size=pre.target_resolution)
    log.info("pretrained the Semantic Compressor on %d images: %d steps, reconstruction loss %.4f -> %.4f, %.1f s",
             count, pre.steps, result["loss_first"], result["loss_last"], time.monotonic() - started)
    return {**result, "resolution": cfg.calibration_resolution, "target_resolution": pre.target_resolution,
            "images": count}


def calibrate_semantic(semantic, cfg: EncodersConfig) -> dict:
    """Set the output BatchNorm of a random Semantic Compressor from the pre-norm feature statistics of
    up to `calibration_images` images of `input` (see the module docstring for why)."""
    import torch

    size = cfg.calibration_resolution
    reader = _image_reader(cfg, 32)
    limit = min(cfg.calibration_images, reader.num_samples)  # the reader cycles epochs: one pass at most
    conv, norm = semantic.mapper[0], semantic.mapper[1]
    total, total_sq, count, images = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for batch in reader:
            pixels = batch["images"][: limit - images]
            features = conv(semantic.backbone(semantic.preprocess(pixels, size))).double()
            total = total + features.sum(dim=(0, 2, 3))
            total_sq = total_sq + (features ** 2).sum(dim=(0, 2, 3))
            count += features.shape[0] * features.shape[2] * features.shape[3]
            images += pixels.shape[0]
            if images >= limit:
                break
    if images == 0:
        raise ConfigError(f"input: {cfg.input} has no images to calibrate the Semantic Compressor on")
    mean = total / count
    var = (total_sq / count - mean ** 2).clamp_min(1e-12)
    norm.running_mean.copy_(mean.float())
    norm.running_var.copy_(var.float())
    norm.weight.data.fill_(42.0)
    norm.bias.data.fill_(-1.0)
    return {"images": images, "resolution": size, "input": cfg.input}


class EncodersPhase(Phase):
    name = "encoders"
    config_class = EncodersConfig
    output_subdir = "encoders"
    description = __doc__.splitlines()[0]
    version_exclude = ("output", "data_root", "mlflow", "text_weights", "semantic_weights", "input")
    uses_ray = False
    input_help = "image shards to calibrate random weights on (config key `input`)"

    def input_identity(self, cfg: EncodersConfig) -> str:
        return source_identity(cfg)

    def execute(self, ctx: Context) -> Outcome:
        info = build(ctx.cfg, ctx.output)
        ctx.set_tags({"wurst.weights": info["weights"]})
        log.info("wrote %s (%s weights)", ctx.output, info["weights"])
        return Outcome(counts={}, extra={"encoders": info})


PHASE = EncodersPhase()
# The module-level entry points callers use: run(cfg) -> PhaseResult, main(argv), output_dir(cfg).
run, main, output_dir = PHASE.run, PHASE.main, PHASE.output_dir


if __name__ == "__main__":
    module_cli(__spec__.name)
