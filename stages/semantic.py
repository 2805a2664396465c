"""Semantic Compressor: the EfficientNet encoder whose 16-channel output is Stage C's target and
Stage B's semantic condition.

Default backbone: torchvision ``efficientnet_v2_s().features`` (1280 channels, stride 32), the
layout of the released Würstchen weights; then Conv1x1(1280 -> 16, no bias) and BatchNorm2d(16).
Parameter names mirror the authors' ``EfficientNetEncoder`` (``backbone.*``, ``mapper.0``,
``mapper.1``) so their effnet state dict loads directly. A 768 px input gives a 24x24 latent, 384 px
gives 12x12.

Alternative backbones for other domains: ``timm:<model name>`` builds a timm ``features_only``
model and uses its last (deepest) feature map; the mapper adapts to its channel count.

Stage B consumes the raw BatchNorm output; Stage C trains on ``to_stage_c(x) = (x + 1) / 42`` and
generation maps Stage C samples back with ``from_stage_c``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


def to_stage_c(latents: torch.Tensor) -> torch.Tensor:
    """Semantic Compressor output -> the scaling Stage C is trained on."""
    return (latents + 1.0) / 42.0


def from_stage_c(latents: torch.Tensor) -> torch.Tensor:
    """Stage C sample -> the scaling Stage B is conditioned on (inverse of ``to_stage_c``)."""
    return latents * 42.0 - 1.0


@dataclass
class SemanticCompressorConfig:
    PRESET_NAMES: ClassVar[tuple[str, ...]] = ("tiny", "paper")

    backbone: str = "torchvision:efficientnet_v2_s"
    c_latent: int = 16
    image_size: int = 768  # 768 -> 24x24 latents (Stage C, Stage B at 1024 px); 384 -> 12x12

    def __post_init__(self) -> None:
        if not (self.backbone.startswith(TORCHVISION_PREFIX) or self.backbone.startswith(TIMM_PREFIX)):
            raise ValueError(
                "SemanticCompressorConfig.backbone: expected 'torchvision:<name>' or 'timm:<name>', "
                f"got {self.backbone!r}"
            )
        if not isinstance(self.c_latent, int) or self.c_latent < 1:
            raise ValueError(f"SemanticCompressorConfig.c_latent: expected a positive int, got {self.c_latent!r}")
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"SemanticCompressorConfig.image_size: expected an int >= 32, got {self.image_size!r}")

    @classmethod
    def paper(cls) -> "SemanticCompressorConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "SemanticCompressorConfig":
        """timm's ``test_efficientnet`` (82k parameters, 64 channels, stride 32): an EfficientNet
        with the same stride as the paper's, small enough for CPU tests; 256 px -> 8x8 latents."""
        return cls(backbone="timm:test_efficientnet", image_size=256)

    @classmethod
    def preset(cls, name: str) -> "SemanticCompressorConfig":
        if name not in cls.PRESET_NAMES:
            raise ValueError(
                f"unknown SemanticCompressorConfig preset {name!r}; choose one of {list(cls.PRESET_NAMES)}"
            )
        return getattr(cls, name)()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SemanticCompressorConfig":
        """From a dict such as a saved config; keys starting with "_" (diffusers' bookkeeping:
        ``_class_name``, ``_diffusers_version``, ...) are ignored, other unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"SemanticCompressorConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})


class _TimmLastFeature(nn.Module):
    """A timm ``features_only`` model reduced to its deepest feature map. Keeping the timm module
    as ``body`` leaves its parameter names intact for loading timm checkpoints (prefix ``body.``)."""

    def __init__(self, name: str):
        super().__init__()
        import timm

        self.body = timm.create_model(name, pretrained=False, features_only=True)
        self.out_channels = int(self.body.feature_info.channels()[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]


def build_backbone(spec: str) -> tuple[nn.Module, int]:
    """'torchvision:efficientnet_v2_s' | 'timm:<name>' -> (module returning one feature map, channels).
    Weights are random here: pretrained weights come from a local file via the checkpoint module."""
    if spec.startswith(TORCHVISION_PREFIX):
        import torchvision

        name = spec[len(TORCHVISION_PREFIX):]
        builder = getattr(torchvision.models, name, None)
        if builder is None or not callable(builder):
            raise ValueError(f"SemanticCompressorConfig.backbone: torchvision has no model {name!r}")
        model = builder(weights=None)
        features = getattr(model, "features", None)
        if features is None:
            raise ValueError(f"SemanticCompressorConfig.backbone: torchvision model {name!r} has no .features trunk")
        return features, _last_conv_channels(features)
    if spec.startswith(TIMM_PREFIX):
        body = _TimmLastFeature(spec[len(TIMM_PREFIX):])
        return body, body.out_channels
    raise ValueError(f"SemanticCompressorConfig.backbone: unknown backbone spec {spec!r}")


def _last_conv_channels(module: nn.Module) -> int:
    # The trunk of an EfficientNet / MobileNet ends with its widest 1x1 conv (+ norm, act).
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("semantic backbone has no Conv2d layer to infer its output channels from")
    return convs[-1].out_channels


class SemanticCompressor(nn.Module):
    def __init__(self, config: SemanticCompressorConfig | None = None):
        super().__init__()
        self.config = config = config or SemanticCompressorConfig()
        self.backbone, backbone_channels = build_backbone(config.backbone)
        self.mapper = nn.Sequential(
            nn.Conv2d(backbone_channels, config.c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.c_latent),  # normalises the latent to ~zero mean, unit variance
        )

    def preprocess(self, images: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> network input: resized (bilinear, antialiased) so the
        image covers ``size`` keeping its aspect ratio, center-cropped to ``size``, ImageNet-normalised.
        ``size`` is an int (square, default ``config.image_size``) or (height, width)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"SemanticCompressor.preprocess: expected images (B, 3, H, W), got {tuple(images.shape)}")
        size = self.config.image_size if size is None else size
        target_h, target_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        h, w = images.shape[-2:]
        # Same arithmetic as torchvision's Resize(shorter side) + CenterCrop, which the authors used.
        if target_h / h >= target_w / w:
            resized_h, resized_w = target_h, max(target_w, int(target_h * w / h))
        else:
            resized_h, resized_w = max(target_h, int(target_w * h / w)), target_w
        # float32 for the resize (antialiased interpolation has no bfloat16 CPU kernel), then the
        # network's dtype.
        x = images.float()
        if (resized_h, resized_w) != (h, w):
            x = F.interpolate(x, size=(resized_h, resized_w), mode="bilinear", align_corners=False, antialias=True)
        top, left = int(round((resized_h - target_h) / 2.0)), int(round((resized_w - target_w) / 2.0))
        x = x[:, :, top:top + target_h, left:left + target_w]
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.mapper[0].weight.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> semantic latents (B, c_latent, H/32, W/32), raw BatchNorm output."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"SemanticCompressor: expected pixels (B, 3, H, W), got {tuple(pixels.shape)}")
        return self.mapper(self.backbone(pixels))

    def encode(self, images: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Images in [0, 1] -> raw semantic latents (what Stage B is conditioned on)."""
        return self(self.preprocess(images, size))

    def encode_for_stage_c(self, images: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Images in [0, 1] -> Stage C training targets, (x + 1) / 42."""
        return to_stage_c(self.encode(images, size))


class ReconstructionHead(nn.Module):
    """A throwaway decoder for pretraining a random compressor: its latent (c_latent, h, w) -> an RGB image
    of ``size`` px. Three 2x upsamplings of convolutions, then a resize to ``size``."""

    def __init__(self, c_latent: int, size: int, width: int = 128):
        super().__init__()
        self.size = size
        self.net = nn.Sequential(
            nn.Conv2d(c_latent, width, 3, padding=1), nn.GELU(), nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.GELU(), nn.Upsample(scale_factor=2),
            nn.Conv2d(width // 2, width // 2, 3, padding=1), nn.GELU(),
        )
        self.out = nn.Conv2d(width // 2, 3, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.out(F.interpolate(self.net(latents), size=self.size, mode="nearest"))


def pretrain_by_reconstruction(compressor: SemanticCompressor, batches, *, steps: int, lr: float,
                               input_size: int, target_size: int) -> dict:
    """Train a compressor (backbone, mapper) for ``steps`` AdamW steps to reconstruct each image, downscaled to
    ``target_size`` px, from its latent through a ``ReconstructionHead`` that is then discarded.

    The paper's compressor starts from ImageNet weights, a trained feature extractor. A random one's latent
    keeps little of what a small region looks like, and no later stage can draw what the latent does not
    carry. Reconstruction is the label-free way to put it there. ``batches`` yields images in [0, 1]
    (B, 3, H, W), cycled as long as needed. The mapper's BatchNorm trains in batch mode here: calibrate it
    afterwards. Returns the mean loss of the first and the last 10% of steps."""
    if steps < 1:
        raise ValueError(f"pretrain_by_reconstruction: steps must be >= 1, got {steps}")
    head = ReconstructionHead(compressor.config.c_latent, target_size)
    params = list(compressor.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    compressor.train()
    losses = []
    iterator = iter(batches)
    for _ in range(steps):
        images = next(iterator).float()
        target = F.interpolate(images, size=target_size, mode="area")
        loss = F.mse_loss(head(compressor.encode(images, input_size)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    compressor.eval()
    tail = max(1, steps // 10)
    return {"steps": steps, "loss_first": sum(losses[:tail]) / tail, "loss_last": sum(losses[-tail:]) / tail}


__all__ = [
    "SemanticCompressorConfig",
    "SemanticCompressor",
    "build_backbone",
    "ReconstructionHead",
    "pretrain_by_reconstruction",
    "to_stage_c",
    "from_stage_c",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
