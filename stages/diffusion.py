"""Würstchen diffusion maths shared by Stage B and Stage C (pure functions, no state).

Continuous time t in [0, 1] (t = 1 is pure noise) with the cosine schedule of Nichol & Dhariwal:
    alpha_bar(t) = cos^2((t + s) / (1 + s) * pi/2) / cos^2(s / (1 + s) * pi/2),  s = 0.008,
clamped to [1e-4, 0.9999] as in the released code (diffusers ``DDPMWuerstchenScheduler``). The
models predict noise; training uses MSE against the true noise with the p2 weight 1 - alpha_bar(t)
(the official code's ``(1 + alpha_bar / (1 - alpha_bar))^-1``; the paper's printed (1-a)/(1+a) is
not what the released models were trained with). Sampling is DDPM with classifier-free guidance.

Randomness: every random draw takes an optional ``torch.Generator``. Values are drawn on the
generator's device and moved to the data's device, so a CPU generator gives the same numbers on
any accelerator (the behaviour of diffusers' ``randn_tensor``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

COSINE_S = 0.008
ALPHA_BAR_MIN = 1e-4
ALPHA_BAR_MAX = 0.9999

# Training-time sampling of t (official train_stage_C.py): t = clamp((1 - U) * 1.08 + 0.001, 0.001, 1),
# which puts about 7% of the samples exactly at t = 1 (pure noise) so the model learns to start there.
TRAIN_T_SCALE = 1.08
TRAIN_T_MIN = 0.001

# Conditioning dropout / augmentation rates of the official recipes (see reference/wuerstchen.md).
# What a Stage B / C head predicts: "eps" (the released models) or "v" (see eps_from_v).
PREDICTIONS = ("eps", "v")
PAPER_TEXT_DROPOUT = 0.05
PAPER_EFFNET_DROPOUT = 0.05
PAPER_EFFNET_NOISE_PROB = 0.3
PAPER_EFFNET_NOISE_MAX_T = 0.5


def _device_of(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def randn(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``."""
    device = torch.device(device)
    return torch.randn(tuple(shape), generator=generator, device=_device_of(generator, device), dtype=dtype).to(device)


def rand(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform [0, 1) values drawn on the generator's device, then moved to ``device``."""
    device = torch.device(device)
    return torch.rand(tuple(shape), generator=generator, device=_device_of(generator, device), dtype=dtype).to(device)


def alpha_bar(t: torch.Tensor, s: float = COSINE_S, scaler: float = 1.0) -> torch.Tensor:
    """Cumulative signal level alpha_bar(t) of the cosine schedule, in fp32, clamped to
    [1e-4, 0.9999]. ``scaler`` warps t like diffusers' scheduler option (1 = no warp)."""
    t = t.float()
    if scaler > 1:
        t = 1 - (1 - t) ** scaler
    elif scaler < 1:
        t = t**scaler
    init = math.cos(s / (1 + s) * math.pi * 0.5) ** 2
    value = torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2 / init
    return value.clamp(ALPHA_BAR_MIN, ALPHA_BAR_MAX)


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise a v prediction implies: eps = sqrt(1 - ab) x_t + sqrt(ab) v, v = sqrt(ab) eps - sqrt(1 - ab) x0
    (fp32; per-sample t (B,))."""
    signal = alpha_bar(t).reshape(-1, *([1] * (x_t.ndim - 1)))
    return (1 - signal).sqrt() * x_t.float() + signal.sqrt() * v.float()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to broadcast against a (B, ...) tensor."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process: x_t = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise, per-sample t (B,)."""
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"add_noise: t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(f"add_noise: noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    a = _per_sample(alpha_bar(t), x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def sample_training_t(
    batch: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    scale: float = TRAIN_T_SCALE,
    t_min: float = TRAIN_T_MIN,
    warp: float = 1.0,
) -> torch.Tensor:
    """Training timesteps t = clamp((1 - U) * scale + t_min, t_min, 1), U ~ U[0, 1); shape (batch,).
    ``warp`` k > 1 maps t to 1 - (1 - t)^k, drawing more high-noise timesteps (k = 3: 50% above 0.9, the
    paper's density 17%); 1 is the paper's."""
    u = rand((batch,), generator=generator, device=device)
    t = ((1 - u) * scale + t_min).clamp(t_min, 1.0)
    if warp != 1.0:
        t = (1 - (1 - t) ** warp).clamp(t_min, 1.0)
    return t


def p2_weight(t: torch.Tensor, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """p2 loss weight (k + alpha_bar / (1 - alpha_bar))^-gamma; with k = gamma = 1 this is
    1 - alpha_bar(t), so noisier timesteps weigh more."""
    a = alpha_bar(t)
    return (k + a / (1 - a)) ** -gamma


def ddpm_step(
    x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One DDPM ancestral step from t to t_prev (per-sample (B,) tensors) given predicted noise.

    alpha = alpha_bar_t / alpha_bar_prev; mu = (x_t - (1 - alpha) * eps / sqrt(1 - alpha_bar_t)) / sqrt(alpha);
    sigma = sqrt((1 - alpha)(1 - alpha_bar_prev) / (1 - alpha_bar_t)); no noise is added where
    t_prev == 0 (the final step). ``noise`` is always consumed so random streams stay aligned.
    """
    a_t = _per_sample(alpha_bar(t), x_t)
    a_prev = _per_sample(alpha_bar(t_prev), x_t)
    alpha = a_t / a_prev
    mu = (1.0 / alpha).sqrt() * (x_t.float() - (1 - alpha) * eps.float() / (1 - a_t).sqrt())
    sigma = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt()
    not_last = _per_sample((t_prev != 0).float(), x_t)
    return (mu + sigma * noise.float() * not_last).to(x_t.dtype)


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps = eps_uncond + scale * (eps_cond - eps_uncond)  (``torch.lerp``, as the released pipelines)."""
    return torch.lerp(eps_uncond, eps_cond, scale)


def linear_timesteps(steps: int) -> torch.Tensor:
    """``steps`` equal DDPM steps from t = 1 to 0: a (steps + 1,) float32 tensor."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"number of sampling steps must be a positive int, got {steps!r}")
    # float32 linspace, bit-identical to diffusers' DDPMWuerstchenScheduler.set_timesteps.
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)


def stage_c_fast_timesteps() -> torch.Tensor:
    """The released 29-step Stage C schedule: 20 steps from 1 to 2/3, then 10 steps to 0
    (``linspace(1, 2/3, 20) ++ linspace(2/3, 0, 11)[1:]``; 30 values)."""
    head = torch.linspace(1.0, 2.0 / 3.0, 20, dtype=torch.float64)
    tail = torch.linspace(2.0 / 3.0, 0.0, 11, dtype=torch.float64)[1:]
    return torch.cat([head, tail]).float()


def resolve_timesteps(timesteps: int | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Turn a step count or an explicit list of t values into a validated float32 tensor of t
    values, strictly decreasing within [0, 1]; sampling runs one step per consecutive pair."""
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        return linear_timesteps(timesteps)
    values = torch.as_tensor(timesteps, dtype=torch.float64).flatten().float().cpu()
    if values.numel() < 2:
        raise ValueError(f"timesteps must list at least 2 values (start and end), got {values.tolist()}")
    if not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(f"timesteps must lie in [0, 1], got {values.tolist()}")
    if not bool((values[1:] < values[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing, got {values.tolist()}")
    return values


@dataclass
class LossParts:
    """Per-sample pieces of a diffusion loss, detached, for logging (e.g. loss by t bucket)."""

    t: torch.Tensor  # (B,) timesteps used
    mse: torch.Tensor  # (B,) unweighted mean squared error of the noise prediction
    p2_weight: torch.Tensor  # (B,) the loss weights: p2, or 1 / alpha_bar for a v-predicting model
    weighted: torch.Tensor  # (B,) p2_weight * mse; the loss is its mean


def _drop_text(
    text: torch.Tensor,
    text_uncond: torch.Tensor | None,
    probability: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Replace each sample's text embedding by the empty-caption embedding with ``probability``."""
    if probability <= 0:
        return text
    if text_uncond is None:
        raise ValueError("text_dropout > 0 needs text_uncond (the empty-caption embedding)")
    if text_uncond.ndim == 2:
        text_uncond = text_uncond[None]
    if text_uncond.shape[1:] != text.shape[1:] or text_uncond.shape[0] not in (1, text.shape[0]):
        raise ValueError(
            f"text_uncond shape {tuple(text_uncond.shape)} does not fit text shape {tuple(text.shape)} "
            "(expected (1 or batch, tokens, width))"
        )
    drop = rand((text.shape[0],), generator=generator, device=text.device) < probability
    return torch.where(drop[:, None, None], text_uncond.to(text.dtype).expand_as(text), text)


def _diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor | None,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    *,
    prediction: str = "eps",
    timestep_warp: float = 1.0,
) -> tuple[torch.Tensor, LossParts]:
    batch = x0.shape[0]
    if t is None:
        t = sample_training_t(batch, generator=generator, device=x0.device, warp=timestep_warp)
    if noise is None:
        noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = add_noise(x0, t, noise)
    pred = predict(x_t, t)
    mse = (pred.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
    # A v-predicting model returns eps = sqrt(1 - ab) x_t + sqrt(ab) v: its eps error is sqrt(ab) times
    # its v error, so eps MSE / ab is the v MSE it is trained on.
    weight = p2_weight(t) if prediction == "eps" else 1.0 / alpha_bar(t)
    weighted = mse * weight
    parts = LossParts(t=t.detach(), mse=mse.detach(), p2_weight=weight.detach(), weighted=weighted.detach())
    return weighted.mean(), parts


def _prediction_of(model: nn.Module) -> str:
    """"eps" or "v": what a Stage B / C head predicts (a DeepSpeed engine holds it as ``.module``)."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "prediction", "eps")


def stage_c_loss(
    model: nn.Module,
    x0: torch.Tensor,
    text: torch.Tensor,
    *,
    text_uncond: torch.Tensor | None = None,
    text_dropout: float = 0.0,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    timestep_warp: float = 1.0,
) -> tuple[torch.Tensor, LossParts]:
    """p2-weighted noise-prediction loss of Stage C on clean semantic latents ``x0`` (already in the
    Stage C scale (x + 1) / 42). ``text_dropout`` replaces a sample's text by ``text_uncond`` (the
    empty-caption embedding) for classifier-free guidance; the paper uses 0.05. ``t`` / ``noise``
    may be given to make the loss deterministic. Returns (scalar loss, per-sample parts). A prior whose
    config says ``prediction: "v"`` is trained on the v MSE instead (``_diffusion_loss``)."""
    text = _drop_text(text, text_uncond, text_dropout, generator)
    return _diffusion_loss(lambda x_t, t_: model(x_t, t_, text), x0, t, noise, generator,
                           prediction=_prediction_of(model), timestep_warp=timestep_warp)


def augment_effnet(
    effnet: torch.Tensor,
    *,
    dropout: float = 0.0,
    noise_probability: float = 0.0,
    noise_max_t: float = PAPER_EFFNET_NOISE_MAX_T,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stage B conditioning augmentation, per sample: with probability ``dropout`` the semantic
    latent is zeroed (the unconditional input for guidance); otherwise, with probability
    ``noise_probability``, it is noised to t ~ U(0, noise_max_t) so Stage B tolerates Stage C's
    imperfect latents (official: 5% zeroed, 30% noised with t < 0.5)."""
    if dropout <= 0 and noise_probability <= 0:
        return effnet
    batch, device = effnet.shape[0], effnet.device
    drop = rand((batch,), generator=generator, device=device) < dropout
    noised_mask = rand((batch,), generator=generator, device=device) < noise_probability
    t_aug = rand((batch,), generator=generator, device=device) * noise_max_t
    noised = add_noise(effnet, t_aug, randn(effnet.shape, generator=generator, device=device, dtype=effnet.dtype))
    out = torch.where(_per_sample(noised_mask & ~drop, effnet), noised, effnet)
    return torch.where(_per_sample(drop, effnet), torch.zeros_like(effnet), out)


def stage_b_loss(
    model: nn.Module,
    x0: torch.Tensor,
    effnet: torch.Tensor,
    text: torch.Tensor,
    *,
    text_uncond: torch.Tensor | None = None,
    text_dropout: float = 0.0,
    effnet_dropout: float = 0.0,
    effnet_noise_probability: float = 0.0,
    effnet_noise_max_t: float = PAPER_EFFNET_NOISE_MAX_T,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    timestep_warp: float = 1.0,
) -> tuple[torch.Tensor, LossParts]:
    """p2-weighted noise-prediction loss of Stage B on clean Stage A latents ``x0`` conditioned on
    the raw semantic latent ``effnet`` and text, with the official conditioning augmentations
    (see ``augment_effnet``; the paper's rates are the PAPER_* constants of this module). A Stage B whose
    config says ``prediction: "v"`` is trained on the v MSE instead (``_diffusion_loss``)."""
    text = _drop_text(text, text_uncond, text_dropout, generator)
    effnet = augment_effnet(
        effnet,
        dropout=effnet_dropout,
        noise_probability=effnet_noise_probability,
        noise_max_t=effnet_noise_max_t,
        generator=generator,
    )
    return _diffusion_loss(lambda x_t, t_: model(x_t, t_, effnet, text), x0, t, noise, generator,
                           prediction=_prediction_of(model), timestep_warp=timestep_warp)
