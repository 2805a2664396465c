"""What differs between the stages the trainer trains; everything else is one loop in ``pipelines.train``.

A spec names the stage's model (config preset + overrides), the latent columns it reads, its objective
(from ``stages.diffusion``), the FLOPs of one training sample, and how its sample grid is drawn.
Stage A (the VQGAN, trained from images) lives in ``pipelines.train_stage_a`` and plugs into the
same loop through the same ``Runner`` interface.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import torch

from pipelines.config import ConfigError

STAGE_KINDS = {"a": "stage_a", "b": "stage_b", "c": "stage_c"}

# Dense bf16 tensor-core peaks (TFLOP/s) used for the MFU estimate when `metrics.peak_tflops` is unset.
# Matched against torch.cuda.get_device_name() in order; first hit wins.
KNOWN_PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989.4), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0),
    ("L40S", 362.1), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0),
)


def peak_tflops_for(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None  # no meaningful tensor-core peak on CPUs: MFU is not reported
    name = torch.cuda.get_device_name(device)
    for key, value in KNOWN_PEAK_TFLOPS_BF16:
        if key in name:
            return value
    return None


# --------------------------------------------------------------------------------------------
# Model configs


def model_config(stage: str, preset: str, overrides: dict[str, Any]):
    """The stage's config dataclass: the named preset with `overrides` applied; errors name the key."""
    from stages.stage_a import StageAConfig
    from stages.stage_b import StageBConfig
    from stages.stage_c import StageCConfig

    cls = {"a": StageAConfig, "b": StageBConfig, "c": StageCConfig}[stage]
    presets: dict[str, Callable] = {"tiny": cls.tiny, "paper": cls.paper}
    if stage == "c":
        presets.update({"paper-clip-h": lambda: cls.paper("clip-h"), "paper-clip-bigg": lambda: cls.paper("clip-bigg")})
    if preset not in presets:
        raise ConfigError(f"model.preset: unknown Stage {stage.upper()} preset {preset!r}; choose one of {sorted(presets)}")
    base = dataclasses.asdict(presets[preset]())
    known = set(base)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"model.overrides.{unknown[0]}: not a {cls.__name__} field (fields: {', '.join(sorted(known))})")
    try:
        return cls.from_dict({**base, **overrides})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from None


def build_model(stage: str, config, gradient_checkpointing: bool = False) -> torch.nn.Module:
    from stages.stage_a import StageA
    from stages.stage_b import StageB
    from stages.stage_c import StageC

    if stage == "a":
        model = StageA(config)
        model.gradient_checkpointing = gradient_checkpointing
        return model
    cls = StageB if stage == "b" else StageC
    return cls(config, gradient_checkpointing=gradient_checkpointing)


# --------------------------------------------------------------------------------------------
# Latent datasets: which columns, and do their shapes fit the model?


def latent_columns(stage: str) -> tuple[str, ...]:
    return {"c": ("uid", "text_emb", "semantic"), "b": ("uid", "text_emb", "semantic", "stage_a")}[stage]


def check_latent_shapes(stage: str, config, columns: dict[str, dict], source: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensor columns this stage reads, checked against the model config; a mismatch
    raises ConfigError naming the dataset, the column and both shapes."""
    needed = [c for c in latent_columns(stage) if c != "uid"]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ConfigError(f"input: {source} has no column(s) {missing} needed by Stage {stage.upper()} "
                          f"(it has {sorted(columns)}); precompute them with outputs {needed}")
    shapes = {c: tuple(int(d) for d in columns[c]["shape"]) for c in needed}
    text = shapes["text_emb"]
    semantic = shapes["semantic"]
    if stage == "c":
        if len(text) != 2 or text[1] != config.c_cond:
            raise ConfigError(f"input: {source} column text_emb has shape {text}, Stage C expects (tokens, "
                              f"{config.c_cond}) (model c_cond)")
        if len(semantic) != 3 or semantic[0] != config.c_in:
            raise ConfigError(f"input: {source} column semantic has shape {semantic}, Stage C expects "
                              f"({config.c_in}, h, w) (model c_in)")
    else:
        stage_a = shapes["stage_a"]
        if len(text) != 2 or text[1] != config.clip_embd:
            raise ConfigError(f"input: {source} column text_emb has shape {text}, Stage B expects (tokens, "
                              f"{config.clip_embd}) (model clip_embd)")
        if len(semantic) != 3 or semantic[0] != config.effnet_embd:
            raise ConfigError(f"input: {source} column semantic has shape {semantic}, Stage B expects "
                              f"({config.effnet_embd}, h, w) (model effnet_embd)")
        multiple = config.latent_multiple
        if len(stage_a) != 3 or stage_a[0] != config.c_in or stage_a[1] % multiple or stage_a[2] % multiple:
            raise ConfigError(f"input: {source} column stage_a has shape {stage_a}, Stage B expects "
                              f"({config.c_in}, H, W) with H and W multiples of {multiple}")
    return shapes


# --------------------------------------------------------------------------------------------
# Objectives


def diffusion_loss(stage: str, model, batch: dict[str, torch.Tensor], *, text_uncond: torch.Tensor | None,
                   data_cfg, generator: torch.Generator):
    """(p2-weighted loss, per-sample LossParts) of Stage B or C on a micro-batch of latents."""
    from stages import diffusion
    from stages.semantic import to_stage_c

    text_dropout = data_cfg.text_dropout
    if stage == "c":
        x0 = to_stage_c(batch["semantic"].float()).to(batch["semantic"].dtype)
        return diffusion.stage_c_loss(model, x0, batch["text_emb"], text_uncond=text_uncond,
                                      text_dropout=text_dropout, generator=generator)
    return diffusion.stage_b_loss(
        model, batch["stage_a"], batch["semantic"], batch["text_emb"], text_uncond=text_uncond,
        text_dropout=text_dropout, effnet_dropout=data_cfg.effnet_dropout,
        effnet_noise_probability=data_cfg.effnet_noise_probability,
        effnet_noise_max_t=data_cfg.effnet_noise_max_t, generator=generator)


def example_inputs(stage: str, config, shapes: dict[str, tuple[int, ...]], batch: int = 1) -> dict[str, torch.Tensor]:
    """Random inputs of the dataset's shapes (on the current default device, e.g. meta)."""
    out = {"text_emb": torch.randn(batch, *shapes["text_emb"]), "semantic": torch.randn(batch, *shapes["semantic"])}
    if stage == "b":
        out["stage_a"] = torch.randn(batch, *shapes["stage_a"])
    return out


def training_flops_per_sample(stage: str, config, shapes: dict[str, tuple[int, ...]]) -> float:
    """Model FLOPs of one training sample (forward + backward, no activation recomputation), counted
    with torch's FlopCounterMode on the meta device: no memory, no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(stage, config, gradient_checkpointing=False)
        inputs = example_inputs(stage, config, shapes) if stage != "a" else {"images": torch.rand(1, 3, *shapes["images"])}
        r = torch.rand(1)
    with FlopCounterMode(display=False) as counter:
        if stage == "c":
            out = model(inputs["semantic"], r, inputs["text_emb"])
        elif stage == "b":
            out = model(inputs["stage_a"], r, inputs["semantic"], inputs["text_emb"])
        else:
            out = model(inputs["images"]).reconstruction
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------------------------
# Sample grids


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


def image_grid(rows: list[torch.Tensor], padding: int = 2):
    """Rows of (B, 3, H, W) images in [0, 1] (all the same size) -> one PIL image."""
    from PIL import Image

    columns = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = np.ones((len(rows) * (h + padding) + padding, columns * (w + padding) + padding, 3), dtype=np.uint8) * 255
    for i, row in enumerate(rows):
        pixels = (row.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for j, image in enumerate(pixels):
            y, x = padding + i * (h + padding), padding + j * (w + padding)
            canvas[y:y + h, x:x + w] = image
    return Image.fromarray(canvas)


@torch.no_grad()
def diffusion_preview(stage: str, model, preview: dict[str, torch.Tensor], *, text_uncond: torch.Tensor | None,
                      stage_a=None, steps: int, guidance: float, seed: int):
    """Sample grid for Stage B / C from the preview batch: row 1 the dataset's latents, row 2 the model's
    samples for the same conditioning. Stage B latents are decoded through Stage A when it is given."""
    from stages import sampling
    from stages.semantic import to_stage_c

    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    text = preview["text_emb"].to(device, torch.float32)
    uncond = text_uncond.to(device, torch.float32) if text_uncond is not None else None
    if uncond is None:
        guidance = 1.0  # no empty-caption embedding: conditional sampling only
    if stage == "c":
        real = to_stage_c(preview["semantic"].float())
        fake = sampling.sample_stage_c(model, text, uncond, shape=tuple(real.shape), timesteps=steps,
                                       guidance=guidance, generator=generator)
        return image_grid([latent_to_image(real), latent_to_image(fake.cpu())])
    real = preview["stage_a"].float()
    fake = sampling.sample_stage_b(model, preview["semantic"].float(), text, uncond, shape=tuple(real.shape),
                                   timesteps=steps, guidance=guidance, generator=generator).cpu()
    if stage_a is None:
        return image_grid([latent_to_image(real), latent_to_image(fake)])
    a_device = next(stage_a.parameters()).device
    decoded = [stage_a.decode(x.to(a_device)).float().clamp(0, 1).cpu() for x in (real, fake)]
    return image_grid(decoded)
