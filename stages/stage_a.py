"""Stage A: the f4 VQGAN that maps images to the 4-channel latent space Stage B works in.

Architecture (reference wuerstchen.md, "Stage A"): PixelUnshuffle(2) + Conv1x1, mixing residual
blocks, one strided conv per extra level, Conv1x1 to the latent channels + BatchNorm, a vector
quantizer (8192 codes), and a mirrored decoder with a deep bottleneck. Module and parameter names
mirror diffusers' ``PaellaVQModel`` so its state dict (the released ``warp-ai/wuerstchen`` vqgan)
loads into ``StageA`` with a plain ``load_state_dict``; config field names are diffusers' config keys.

Conventions (same as the Würstchen pipelines):
- images are float tensors in [0, 1], shape (B, 3, H, W), H and W divisible by 4;
- ``encode`` returns the *unquantized* latent divided by ``scale_factor`` (0.3764), which is the
  space Stage B is trained and sampled in; ``decode`` multiplies by ``scale_factor`` first;
- after Stage A training the quantizer is bypassed (``force_not_quantize=True``, the default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class StageAConfig:
    PRESET_NAMES: ClassVar[tuple[str, ...]] = ("tiny", "paper")

    # Architecture: diffusers PaellaVQModel config keys, so conversion is a plain copy.
    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764
    # Training knobs (not part of diffusers' config).
    commitment_beta: float = 0.25  # weight of the encoder-side commitment term
    quantize_bypass_prob: float = 0.1  # per-sample probability of skipping quantization (paper E.1)

    def __post_init__(self) -> None:
        positive = ("in_channels", "out_channels", "up_down_scale_factor", "levels", "embed_dim",
                    "latent_channels", "num_vq_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"StageAConfig.{name}: expected a positive int, got {value!r}")
        if not isinstance(self.bottleneck_blocks, int) or self.bottleneck_blocks < 0:
            raise ValueError(f"StageAConfig.bottleneck_blocks: expected an int >= 0, got {self.bottleneck_blocks!r}")
        if self.embed_dim % (2 ** (self.levels - 1)) != 0:
            raise ValueError(
                f"StageAConfig.embed_dim: {self.embed_dim} must be divisible by "
                f"2**(levels-1) = {2 ** (self.levels - 1)}"
            )
        if not self.scale_factor > 0:
            raise ValueError(f"StageAConfig.scale_factor: expected > 0, got {self.scale_factor!r}")
        if not 0.0 <= self.quantize_bypass_prob <= 1.0:
            raise ValueError(
                f"StageAConfig.quantize_bypass_prob: expected in [0, 1], got {self.quantize_bypass_prob!r}"
            )

    @classmethod
    def paper(cls) -> "StageAConfig":
        """The released Würstchen v2 VQGAN: 18,406,894 parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> "StageAConfig":
        """Same topology (2 levels, f4), narrow and shallow: milliseconds per step on a CPU."""
        return cls(embed_dim=32, bottleneck_blocks=2, num_vq_embeddings=64)

    @classmethod
    def preset(cls, name: str) -> "StageAConfig":
        if name not in cls.PRESET_NAMES:
            raise ValueError(f"unknown StageAConfig preset {name!r}; choose one of {list(cls.PRESET_NAMES)}")
        return getattr(cls, name)()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "StageAConfig":
        """From a dict such as a saved config; keys starting with "_" (diffusers' bookkeeping:
        ``_class_name``, ``_diffusers_version``, ...) are ignored, other unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"StageAConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def downscale(self) -> int:
        """Spatial compression factor image -> latent (4 for the paper model)."""
        return self.up_down_scale_factor * 2 ** (self.levels - 1)


class MixingResidualBlock(nn.Module):
    """Paella's residual block: a depthwise-conv branch and an MLP branch, each pre-normalised by a
    non-affine LayerNorm and modulated by learned scalars. The six ``gammas`` start at zero, so the
    block is the identity at initialisation."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.channels = channels
        # Replication padding keeps borders from fading to zero in the reconstruction.
        self.depthwise = nn.Sequential(
            nn.ReplicationPad2d(1), nn.Conv2d(channels, channels, kernel_size=3, groups=channels)
        )
        self.channelwise = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        # [scale, shift, gate] for the depthwise branch, then the same for the channelwise branch.
        self.gammas = nn.Parameter(torch.zeros(6))

    def _norm_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self._norm_channels_last(x) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h.permute(0, 3, 1, 2)) * g[2]
        h = self._norm_channels_last(x) * (1 + g[3]) + g[4]
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer with a straight-through gradient.

    The loss follows diffusers' ``VectorQuantizer(legacy=False)``:
    ``beta * |sg(z_q) - z|^2 + |z_q - sg(z)|^2`` (commitment weighted by beta, codebook term by 1).
    """

    # Rows of latents compared against the whole codebook at once; bounds the distance matrix to
    # chunk * num_codes floats (8192 x 8192 x 4 B = 256 MiB for the paper codebook).
    distance_chunk_rows = 8192

    def __init__(self, num_codes: int, code_dim: int, beta: float):
        super().__init__()
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.embedding = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)

    @torch.no_grad()
    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        # Distances in float32: bf16 rounding would merge nearby codes (and cdist lacks bf16 kernels).
        codebook = self.embedding.weight.float()
        indices = [torch.cdist(rows.float(), codebook).argmin(dim=1) for rows in flat.split(self.distance_chunk_rows)]
        return torch.cat(indices) if indices else flat.new_zeros(0, dtype=torch.long)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (B, C, H, W) -> (straight-through quantized z, indices (B, H, W), loss scalar)."""
        b, c, h, w = z.shape
        z_last = z.permute(0, 2, 3, 1)
        indices = self.nearest_codes(z_last.reshape(-1, c)).view(b, h, w)
        z_q = self.embedding(indices)
        loss = self.beta * F.mse_loss(z_last, z_q.detach()) + F.mse_loss(z_q, z_last.detach())
        z_q = z_last + (z_q - z_last).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), indices, loss

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for (B, H, W) indices -> (B, C, H, W)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()


@dataclass
class StageAOutput:
    """Result of a training forward pass. ``loss`` = ``reconstruction_loss`` + ``vq_loss``; the
    perceptual and adversarial terms of the paper's recipe are added by the trainer."""

    reconstruction: torch.Tensor
    latents: torch.Tensor
    indices: torch.Tensor
    reconstruction_loss: torch.Tensor
    vq_loss: torch.Tensor
    loss: torch.Tensor


class StageA(nn.Module):
    def __init__(self, config: StageAConfig | None = None):
        super().__init__()
        self.config = config = config or StageAConfig()
        self.gradient_checkpointing = False
        widths = [config.embed_dim // 2 ** i for i in reversed(range(config.levels))]  # e.g. [192, 384]
        pixels_per_cell = config.up_down_scale_factor ** 2

        self.in_block = nn.Sequential(
            nn.PixelUnshuffle(config.up_down_scale_factor),
            nn.Conv2d(config.in_channels * pixels_per_cell, widths[0], kernel_size=1),
        )
        encoder: list[nn.Module] = []
        for level, width in enumerate(widths):
            if level > 0:
                encoder.append(nn.Conv2d(widths[level - 1], width, kernel_size=4, stride=2, padding=1))
            encoder.append(MixingResidualBlock(width, width * 4))
        encoder.append(nn.Sequential(
            nn.Conv2d(widths[-1], config.latent_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.latent_channels),  # keeps the latent near zero mean / unit variance
        ))
        self.down_blocks = nn.Sequential(*encoder)

        self.vquantizer = VectorQuantizer(config.num_vq_embeddings, config.latent_channels, config.commitment_beta)

        decoder: list[nn.Module] = [nn.Sequential(nn.Conv2d(config.latent_channels, widths[-1], kernel_size=1))]
        for level, width in enumerate(reversed(widths)):
            repeats = config.bottleneck_blocks if level == 0 else 1
            decoder.extend(MixingResidualBlock(width, width * 4) for _ in range(repeats))
            if level < config.levels - 1:
                decoder.append(nn.ConvTranspose2d(width, widths[-2 - level], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*decoder)
        self.out_block = nn.Sequential(
            nn.Conv2d(widths[0], config.out_channels * pixels_per_cell, kernel_size=1),
            nn.PixelShuffle(config.up_down_scale_factor),
        )

    # ------------------------------------------------------------------ shape checks
    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        if images.ndim != 4 or images.shape[1] != c.in_channels:
            raise ValueError(
                f"StageA.encode: expected images of shape (B, {c.in_channels}, H, W), got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % c.downscale or w % c.downscale:
            raise ValueError(
                f"StageA.encode: image height and width must be divisible by {c.downscale}, got {h}x{w}"
            )

    def _check_latents(self, latents: torch.Tensor, caller: str) -> None:
        c = self.config
        if latents.ndim != 4 or latents.shape[1] != c.latent_channels:
            raise ValueError(
                f"StageA.{caller}: expected latents of shape (B, {c.latent_channels}, h, w), got {tuple(latents.shape)}"
            )

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of the latent for an image of height x width."""
        d = self.config.downscale
        if height % d or width % d:
            raise ValueError(f"StageA: image size {height}x{width} is not divisible by {d}")
        return self.config.latent_channels, height // d, width // d

    def _run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for block in blocks:
                x = checkpoint(block, x, use_reentrant=False) if isinstance(block, MixingResidualBlock) else block(x)
            return x
        return blocks(x)

    # ------------------------------------------------------------------ public API
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> unquantized latents / scale_factor (B, 4, H/4, W/4)."""
        self._check_images(images)
        return self._run(self.down_blocks, self.in_block(images)) / self.config.scale_factor

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents as ``encode`` returns them -> (quantized latents in the same scaling,
        codebook indices (B, h, w), vq loss). The codebook lives in the unscaled space, so the
        latents are multiplied by scale_factor for the lookup and divided again afterwards."""
        self._check_latents(latents, "quantize")
        scale = self.config.scale_factor
        quantized, indices, loss = self.vquantizer(latents * scale)
        return quantized / scale, indices, loss

    def decode(self, latents: torch.Tensor, force_not_quantize: bool = True) -> torch.Tensor:
        """Latents (scaled as ``encode`` returns them) -> images, nominally in [0, 1] (not clamped)."""
        self._check_latents(latents, "decode")
        h = latents * self.config.scale_factor
        if not force_not_quantize:
            h, _, _ = self.vquantizer(h)
        return self.out_block(self._run(self.up_blocks, h))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, h, w) -> images."""
        return self.out_block(self._run(self.up_blocks, self.vquantizer.lookup(indices)))

    def forward(self, images: torch.Tensor, bypass_prob: float | None = None) -> StageAOutput:
        """Training pass: encode, quantize (skipped per sample with ``bypass_prob``, default from
        the config, so the decoder also learns the continuous latents Stage B produces), decode.
        Returns reconstruction + MSE and VQ losses."""
        latents = self.encode(images)
        quantized, indices, vq_loss = self.quantize(latents)
        p = self.config.quantize_bypass_prob if bypass_prob is None else bypass_prob
        if self.training and p > 0:
            keep_continuous = torch.rand(latents.shape[0], 1, 1, 1, device=latents.device) < p
            quantized = torch.where(keep_continuous, latents, quantized)
        reconstruction = self.decode(quantized, force_not_quantize=True)
        reconstruction_loss = F.mse_loss(reconstruction, images)
        return StageAOutput(
            reconstruction=reconstruction,
            latents=latents,
            indices=indices,
            reconstruction_loss=reconstruction_loss,
            vq_loss=vq_loss,
            loss=reconstruction_loss + vq_loss,
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["StageAConfig", "StageA", "StageAOutput", "MixingResidualBlock", "VectorQuantizer", "count_parameters"]
