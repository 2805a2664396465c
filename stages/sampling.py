"""Sampling: DDPM with classifier-free guidance for Stage C and Stage B, and the full
text -> Stage C -> Stage B -> Stage A generation.

Behaviour mirrors diffusers' ``WuerstchenPriorPipeline`` + ``WuerstchenDecoderPipeline`` so that the
same generator / initial noise gives the same images: initial noise is drawn first, then one noise
tensor per step (including the last, noise-free step), all from the one generator, Stage C before
Stage B. Guidance is applied when the scale is > 1 (the released pipelines' rule; scale <= 1 runs
the conditional model only): eps = lerp(eps_uncond, eps_cond, scale), with the empty-caption text
embedding as the unconditional text and a zero semantic latent as Stage B's unconditional input.

Latent sizes: Stage C is ceil(H / 42.67) x ceil(W / 42.67); Stage B is int(10.67 x) that; Stage A
decodes Stage B's latent at 4x (so 1024 px -> 24 -> 256 -> 1024).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from stages.diffusion import classifier_free_guidance, ddpm_step, randn, resolve_timesteps
from stages.semantic import from_stage_c

# Paper section 4: Stage C 60 DDPM steps, Stage B 12 steps with guidance w = 4; Stage C guidance 4
# (the released pipelines' default; the 29-step ``diffusion.stage_c_fast_timesteps`` also works).
DEFAULT_STAGE_C_STEPS = 60
DEFAULT_STAGE_C_GUIDANCE = 4.0
DEFAULT_STAGE_B_STEPS = 12
DEFAULT_STAGE_B_GUIDANCE = 4.0

# Pixel -> Stage C latent (the semantic compressor's 768 px -> 24 latent, at 1024 px output) and
# Stage C -> Stage B latent ratios of the released pipelines.
STAGE_C_RESOLUTION_MULTIPLE = 42.67
STAGE_B_LATENT_SCALE = 10.67

Timesteps = int | Sequence[float] | torch.Tensor


def stage_c_latent_size(height: int, width: int) -> tuple[int, int]:
    """Stage C latent (h, w) for an image of height x width pixels: ceil(size / 42.67)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image height and width must be positive, got {height}x{width}")
    return math.ceil(height / STAGE_C_RESOLUTION_MULTIPLE), math.ceil(width / STAGE_C_RESOLUTION_MULTIPLE)


def stage_b_latent_size(stage_c_height: int, stage_c_width: int) -> tuple[int, int]:
    """Stage B latent (h, w) for a Stage C latent size: int(size * 10.67)."""
    return int(stage_c_height * STAGE_B_LATENT_SCALE), int(stage_c_width * STAGE_B_LATENT_SCALE)


def _stage_b_size_ok(size: int, multiple: int) -> bool:
    return int(math.ceil(size / STAGE_C_RESOLUTION_MULTIPLE) * STAGE_B_LATENT_SCALE) % multiple == 0


def nearest_valid_image_size(size: int, stage_b_multiple: int) -> int:
    """The image side closest to ``size`` whose Stage B latent is a multiple of ``stage_b_multiple``."""
    for delta in range(0, 4096):
        for candidate in (size - delta, size + delta):
            if candidate > 0 and _stage_b_size_ok(candidate, stage_b_multiple):
                return candidate
    raise ValueError(f"no image size near {size} fits a Stage B latent multiple of {stage_b_multiple}")


def check_image_size(height: int, width: int, stage_b_multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate a requested image size against Stage B's down-sampling and return the Stage C and
    Stage B latent sizes; the error suggests the nearest sizes that work."""
    c_size = stage_c_latent_size(height, width)
    b_size = stage_b_latent_size(*c_size)
    bad = [
        (name, side, latent)
        for name, side, latent in (("height", height, b_size[0]), ("width", width, b_size[1]))
        if latent % stage_b_multiple
    ]
    if bad:
        details = "; ".join(
            f"{name} {side} -> Stage B latent {latent} (nearest working {name}: "
            f"{nearest_valid_image_size(side, stage_b_multiple)})"
            for name, side, latent in bad
        )
        raise ValueError(
            f"image size {height}x{width} is not allowed: the Stage B latent must be a multiple of "
            f"{stage_b_multiple}; {details}"
        )
    return c_size, b_size


def _param_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    param = next(model.parameters())
    return param.dtype, param.device


def _uncond_like(text: torch.Tensor, text_uncond: torch.Tensor | None, name: str) -> torch.Tensor:
    """Broadcast an unconditional embedding ((tokens, width), (1, tokens, width) or (B, ...)) to text."""
    if text_uncond is None:
        raise ValueError(f"{name}: guidance > 1 needs the unconditional (empty-caption) text embedding")
    if text_uncond.ndim == 2:
        text_uncond = text_uncond[None]
    if text_uncond.ndim != 3 or text_uncond.shape[1:] != text.shape[1:] or text_uncond.shape[0] not in (
        1,
        text.shape[0],
    ):
        raise ValueError(
            f"{name}: unconditional text embedding of shape {tuple(text_uncond.shape)} does not fit the "
            f"text embeddings of shape {tuple(text.shape)} (expected (1 or {text.shape[0]}, tokens, width))"
        )
    return text_uncond.expand_as(text)


def _initial_noise(
    shape: Sequence[int] | None,
    initial_noise: torch.Tensor | None,
    batch: int,
    generator: torch.Generator | None,
    device: torch.device,
    name: str,
) -> torch.Tensor:
    if initial_noise is not None:
        if shape is not None and tuple(initial_noise.shape) != tuple(shape):
            raise ValueError(f"{name}: initial noise has shape {tuple(initial_noise.shape)}, expected {tuple(shape)}")
        x = initial_noise.to(device=device, dtype=torch.float32)
    else:
        if shape is None:
            raise ValueError(f"{name}: give either the latent shape or the initial noise")
        x = randn(shape, generator=generator, device=device)
    if x.ndim != 4 or x.shape[0] != batch:
        raise ValueError(
            f"{name}: latent batch {tuple(x.shape)} does not match the {batch} text embedding(s) "
            "(one prompt per sample: repeat prompts to make several images of one prompt)"
        )
    return x


def _ddpm_loop(
    predict_eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    timesteps: Timesteps,
    generator: torch.Generator | None,
) -> torch.Tensor:
    ts = resolve_timesteps(timesteps).to(x.device)
    batch = x.shape[0]
    for index in range(ts.shape[0] - 1):
        t, t_prev = ts[index].expand(batch), ts[index + 1].expand(batch)
        eps = predict_eps(x, t)
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = ddpm_step(x, eps, t, t_prev, noise)
    return x


@torch.no_grad()
def sample_stage_c(
    model: nn.Module,
    text: torch.Tensor,
    text_uncond: torch.Tensor | None = None,
    shape: Sequence[int] | None = None,
    timesteps: Timesteps = DEFAULT_STAGE_C_STEPS,
    guidance: float = DEFAULT_STAGE_C_GUIDANCE,
    generator: torch.Generator | None = None,
    *,
    initial_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample Stage C latents (in Stage C's (x + 1) / 42 scale) of ``shape`` (B, c_in, h, w) for text
    embeddings (B, tokens, c_cond). Returns float32 latents on the model's device."""
    dtype, device = _param_dtype_device(model)
    text = text.to(device)
    x = _initial_noise(shape, initial_noise, text.shape[0], generator, device, "sample_stage_c")
    use_cfg = guidance > 1
    cond = torch.cat([text, _uncond_like(text, text_uncond, "sample_stage_c").to(device)]) if use_cfg else text
    cond = cond.to(dtype)

    def predict_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not use_cfg:
            return model(x_t.to(dtype), t, cond).float()
        eps_cond, eps_uncond = model(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), cond).float().chunk(2)
        return classifier_free_guidance(eps_cond, eps_uncond, guidance)

    return _ddpm_loop(predict_eps, x, timesteps, generator)


@torch.no_grad()
def sample_stage_b(
    model: nn.Module,
    effnet: torch.Tensor,
    text: torch.Tensor,
    text_uncond: torch.Tensor | None = None,
    shape: Sequence[int] | None = None,
    timesteps: Timesteps = DEFAULT_STAGE_B_STEPS,
    guidance: float = DEFAULT_STAGE_B_GUIDANCE,
    generator: torch.Generator | None = None,
    *,
    initial_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample Stage A latents (B, c_in, H, W) conditioned on the semantic latent ``effnet`` (raw
    Semantic Compressor scale, i.e. ``from_stage_c`` of a Stage C sample) and text embeddings."""
    dtype, device = _param_dtype_device(model)
    text, effnet = text.to(device), effnet.to(device)
    if effnet.shape[0] != text.shape[0]:
        raise ValueError(
            f"sample_stage_b: {effnet.shape[0]} semantic latents but {text.shape[0]} text embeddings"
        )
    x = _initial_noise(shape, initial_noise, text.shape[0], generator, device, "sample_stage_b")
    use_cfg = guidance > 1
    if use_cfg:
        cond_text = torch.cat([text, _uncond_like(text, text_uncond, "sample_stage_b").to(device)])
        cond_effnet = torch.cat([effnet, torch.zeros_like(effnet)])
    else:
        cond_text, cond_effnet = text, effnet
    cond_text, cond_effnet = cond_text.to(dtype), cond_effnet.to(dtype)

    def predict_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not use_cfg:
            return model(x_t.to(dtype), t, cond_effnet, cond_text).float()
        both = model(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), cond_effnet, cond_text).float()
        eps_cond, eps_uncond = both.chunk(2)
        return classifier_free_guidance(eps_cond, eps_uncond, guidance)

    return _ddpm_loop(predict_eps, x, timesteps, generator)


@dataclass
class GenerationOutput:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    stage_c_latents: torch.Tensor  # Stage C samples, (x + 1) / 42 scale
    semantic_latents: torch.Tensor  # what Stage B was conditioned on (x * 42 - 1)
    stage_b_latents: torch.Tensor  # Stage A latents fed to the decoder


@torch.no_grad()
def generate(
    stage_c: nn.Module,
    stage_b: nn.Module,
    stage_a: nn.Module,
    text_c: torch.Tensor,
    uncond_c: torch.Tensor | None,
    text_b: torch.Tensor,
    uncond_b: torch.Tensor | None,
    height: int = 1024,
    width: int = 1024,
    *,
    stage_c_timesteps: Timesteps = DEFAULT_STAGE_C_STEPS,
    stage_c_guidance: float = DEFAULT_STAGE_C_GUIDANCE,
    stage_b_timesteps: Timesteps = DEFAULT_STAGE_B_STEPS,
    stage_b_guidance: float = DEFAULT_STAGE_B_GUIDANCE,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stage_c_noise: torch.Tensor | None = None,
    stage_b_noise: torch.Tensor | None = None,
    return_intermediates: bool = False,
) -> torch.Tensor | GenerationOutput:
    """Text embeddings -> Stage C -> Stage B -> Stage A -> images in [0, 1], (B, 3, H', W').

    ``text_c`` / ``text_b``: (B, 77, width) embeddings for Stage C and Stage B (they differ when
    Stage C uses CLIP-bigG); ``uncond_*``: the empty-caption embeddings (needed when the guidance
    scale is > 1). ``seed`` makes a CPU generator (same images on any device); or pass
    ``generator``. Initial noises may be given instead (e.g. to compare implementations). The
    output side is 4 x int(10.67 x ceil(side / 42.67)) pixels, i.e. ``height`` for the usual sizes.
    """
    if seed is not None and generator is not None:
        raise ValueError("generate: pass either seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    batch = text_c.shape[0]
    if text_b.shape[0] != batch:
        raise ValueError(f"generate: {batch} Stage C text embeddings but {text_b.shape[0]} Stage B text embeddings")
    c_size, b_size = check_image_size(height, width, stage_b.config.latent_multiple)

    stage_c_latents = sample_stage_c(
        stage_c,
        text_c,
        uncond_c,
        shape=(batch, stage_c.config.c_in, *c_size),
        timesteps=stage_c_timesteps,
        guidance=stage_c_guidance,
        generator=generator,
        initial_noise=stage_c_noise,
    )
    semantic = from_stage_c(stage_c_latents)
    stage_b_latents = sample_stage_b(
        stage_b,
        semantic,
        text_b,
        uncond_b,
        shape=(batch, stage_b.config.c_in, *b_size),
        timesteps=stage_b_timesteps,
        guidance=stage_b_guidance,
        generator=generator,
        initial_noise=stage_b_noise,
    )
    a_dtype, a_device = _param_dtype_device(stage_a)
    images = stage_a.decode(stage_b_latents.to(device=a_device, dtype=a_dtype)).float().clamp(0, 1)
    if return_intermediates:
        return GenerationOutput(images, stage_c_latents, semantic, stage_b_latents)
    return images
