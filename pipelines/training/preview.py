"""Sample grids logged to MLflow during training: rows of images pasted into one PIL image, latents shown
as images when no decoder is at hand, and `PreviewContext`, what a stage's preview may draw on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipelines.training.config import SamplingConfig


@dataclasses.dataclass
class PreviewContext:
    """What a Stage B / C preview draws with besides the model and the preview batch."""

    sampling: SamplingConfig
    text_uncond: Optional[torch.Tensor]  # the empty caption's embedding (None: conditional sampling only)
    device: torch.device
    source: str  # names the trained weights: "<run name>@<step>"
    available: frozenset[str]  # companion checkpoints of the run (text, stage_a, stage_b, ...)
    load: Callable[[str], nn.Module]  # a companion's module, loaded once


def latent_to_image(latents: torch.Tensor, size: int = 64) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, size, size) in [0, 1]: the first three channels, each image
    min-max normalised, nearest-upsampled. A preview of latents when no decoder is available."""
    x = latents.float()[:, :3]
    if x.shape[1] < 3:
        x = torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], dim=1)
    lo = x.flatten(1).min(dim=1).values[:, None, None, None]
    hi = x.flatten(1).max(dim=1).values[:, None, None, None]
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    scale = max(1, math.ceil(size / max(x.shape[-2:])))
    return torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")


def image_grid(rows: list[torch.Tensor], padding: int = 2) -> Image.Image:
    """Rows of (B, 3, H, W) images in [0, 1] (all the same size) -> one PIL image."""
    columns = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = np.ones((len(rows) * (h + padding) + padding, columns * (w + padding) + padding, 3), dtype=np.uint8) * 255
    for i, row in enumerate(rows):
        pixels = (row.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for j, image in enumerate(pixels):
            y, x = padding + i * (h + padding), padding + j * (w + padding)
            canvas[y:y + h, x:x + w] = image
    return Image.fromarray(canvas)
