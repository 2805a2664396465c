"""Diffusion maths (stages/diffusion.py): schedule, noising, training t, p2 weight, DDPM step,
guidance, timestep lists and the Stage B / Stage C loss helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stages import diffusion as D


def _cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    value = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return min(max(value, 1e-4), 0.9999)


def test_alpha_bar_matches_cosine_formula_and_clamps():
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    expected = torch.tensor([_cosine_alpha_bar(v) for v in t.tolist()])
    torch.testing.assert_close(D.alpha_bar(t), expected, rtol=1e-6, atol=1e-7)
    assert D.alpha_bar(torch.tensor([0.0])).item() == pytest.approx(0.9999)  # clamped from 1
    assert D.alpha_bar(torch.tensor([1.0])).item() == pytest.approx(1e-4)  # clamped from ~0
    # Monotone decreasing in t.
    grid = D.alpha_bar(torch.linspace(0, 1, 101))
    assert bool((grid[1:] <= grid[:-1]).all())


def test_add_noise_is_the_forward_process():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=gen)
    noise = torch.randn(3, 4, 5, 5, generator=gen)
    t = torch.tensor([0.0, 0.5, 1.0])
    a = D.alpha_bar(t)[:, None, None, None]
    torch.testing.assert_close(D.add_noise(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    with pytest.raises(ValueError, match="noise shape"):
        D.add_noise(x0, t, noise[:, :2])
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        D.add_noise(x0, t[:2], noise)


def test_training_t_distribution():
    t = D.sample_training_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,)
    assert float(t.min()) >= 0.001 and float(t.max()) <= 1.0
    # (1 - U) * 1.08 + 0.001 > 1 for U < 0.0749: about 7.5% of the samples sit at exactly t = 1.
    frac_at_one = float((t == 1.0).float().mean())
    assert 0.065 < frac_at_one < 0.085
    # Seeded draws repeat.
    again = D.sample_training_t(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_p2_weight_is_one_minus_alpha_bar():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(D.p2_weight(t), 1 - D.alpha_bar(t), rtol=1e-5, atol=1e-6)
    assert float(D.p2_weight(torch.tensor([1.0]))) > float(D.p2_weight(torch.tensor([0.1])))


def test_ddpm_step_formula_and_no_noise_on_last_step():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    eps = torch.randn(2, 3, 4, 4, generator=gen)
    noise = torch.randn(2, 3, 4, 4, generator=gen)
    t, t_prev = torch.full((2,), 0.6), torch.full((2,), 0.4)
    a_t, a_p = _cosine_alpha_bar(0.6), _cosine_alpha_bar(0.4)
    alpha = a_t / a_p
    mu = (x - (1 - alpha) * eps / math.sqrt(1 - a_t)) / math.sqrt(alpha)
    sigma = math.sqrt((1 - alpha) * (1 - a_p) / (1 - a_t))
    torch.testing.assert_close(D.ddpm_step(x, eps, t, t_prev, noise), mu + sigma * noise, rtol=1e-5, atol=1e-5)

    last = D.ddpm_step(x, eps, t, torch.zeros(2), noise)
    last_other_noise = D.ddpm_step(x, eps, t, torch.zeros(2), torch.randn(2, 3, 4, 4, generator=gen))
    torch.testing.assert_close(last, last_other_noise)


def test_classifier_free_guidance_is_lerp():
    cond, uncond = torch.full((2, 3), 2.0), torch.full((2, 3), 1.0)
    torch.testing.assert_close(D.classifier_free_guidance(cond, uncond, 4.0), torch.full((2, 3), 5.0))
    torch.testing.assert_close(D.classifier_free_guidance(cond, uncond, 1.0), cond)


def test_timestep_lists():
    ts = D.linear_timesteps(12)
    assert ts.shape == (13,) and ts[0] == 1.0 and ts[-1] == 0.0
    fast = D.stage_c_fast_timesteps()
    assert fast.shape == (30,)  # 29 steps
    assert fast[0] == 1.0 and fast[-1] == 0.0
    assert fast[19].item() == pytest.approx(2 / 3) and fast[20].item() == pytest.approx(2 / 3 * 0.9, abs=1e-6)
    assert bool((fast[1:] < fast[:-1]).all())
    assert torch.equal(D.resolve_timesteps(5), D.linear_timesteps(5))
    torch.testing.assert_close(D.resolve_timesteps([1.0, 0.5, 0.0]), torch.tensor([1.0, 0.5, 0.0]))


@pytest.mark.parametrize(
    "bad, match",
    [(0, "positive int"), ([1.0], "at least 2"), ([1.0, 0.5, 0.6], "strictly decreasing"), ([1.5, 0.0], r"\[0, 1\]")],
)
def test_resolve_timesteps_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        D.resolve_timesteps(bad)


class _EchoStageC(nn.Module):
    """Stand-in model for the loss helpers: returns its input plus a text-dependent offset."""

    def forward(self, x, r, text):
        return x + text.mean(dim=(1, 2))[:, None, None, None]


class _EchoStageB(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen_effnet = None

    def forward(self, x, r, effnet, text):
        self.seen_effnet = effnet
        return x * 0 + effnet.mean(dim=(1, 2, 3))[:, None, None, None]


def test_stage_c_loss_is_p2_weighted_mse():
    gen = torch.Generator().manual_seed(2)
    x0, text = torch.randn(4, 16, 3, 3, generator=gen), torch.randn(4, 5, 8, generator=gen)
    t = torch.tensor([0.1, 0.4, 0.8, 1.0])
    noise = torch.randn(4, 16, 3, 3, generator=gen)
    loss, parts = D.stage_c_loss(_EchoStageC(), x0, text, t=t, noise=noise)
    pred = D.add_noise(x0, t, noise) + text.mean(dim=(1, 2))[:, None, None, None]
    mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(parts.mse, mse)
    torch.testing.assert_close(parts.p2_weight, 1 - D.alpha_bar(t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, (mse * parts.p2_weight).mean())
    torch.testing.assert_close(parts.weighted.mean(), loss)
    # Random t / noise from a seeded generator repeat exactly.
    a, _ = D.stage_c_loss(_EchoStageC(), x0, text, generator=torch.Generator().manual_seed(5))
    b, _ = D.stage_c_loss(_EchoStageC(), x0, text, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_text_dropout_uses_the_empty_caption_embedding():
    x0, text = torch.zeros(64, 16, 2, 2), torch.ones(64, 3, 8)
    uncond = torch.full((1, 3, 8), -1.0)
    t, noise = torch.full((64,), 0.5), torch.zeros(64, 16, 2, 2)
    # Text offset is +1 (kept) or -1 (dropped); mse = 1 either way, so inspect which were dropped.
    dropped = D._drop_text(text, uncond, 0.5, torch.Generator().manual_seed(0))
    n_dropped = int((dropped[:, 0, 0] == -1).sum())
    assert 16 < n_dropped < 48
    assert torch.equal(D._drop_text(text, uncond, 0.0, None), text)
    assert bool((D._drop_text(text, uncond, 1.0, None) == -1).all())
    with pytest.raises(ValueError, match="needs text_uncond"):
        D.stage_c_loss(_EchoStageC(), x0, text, text_dropout=0.1, t=t, noise=noise)
    with pytest.raises(ValueError, match="does not fit"):
        D.stage_c_loss(_EchoStageC(), x0, text, text_uncond=torch.zeros(2, 3, 8), text_dropout=0.1)


def test_effnet_augmentation_zeroes_and_noises_per_sample():
    effnet = torch.ones(400, 16, 2, 2)
    out = D.augment_effnet(effnet, dropout=0.25, noise_probability=0.5, generator=torch.Generator().manual_seed(0))
    zeroed = (out == 0).flatten(1).all(dim=1)
    unchanged = (out == 1).flatten(1).all(dim=1)
    noised = ~zeroed & ~unchanged
    assert 60 < int(zeroed.sum()) < 140  # ~25%
    assert 110 < int(noised.sum()) < 190  # ~0.75 * 0.5 = 37.5%
    assert torch.equal(D.augment_effnet(effnet), effnet)

    model = _EchoStageB()
    x0, text = torch.zeros(400, 4, 4, 4), torch.zeros(400, 2, 8)
    D.stage_b_loss(model, x0, effnet, text, effnet_dropout=1.0, generator=torch.Generator().manual_seed(0))
    assert bool((model.seen_effnet == 0).all())
    loss, parts = D.stage_b_loss(model, x0, effnet, text, t=torch.full((400,), 0.3), noise=torch.zeros_like(x0))
    torch.testing.assert_close(parts.mse, torch.ones(400))  # prediction 1 everywhere, noise 0
    torch.testing.assert_close(loss, torch.full((), 1 - D.alpha_bar(torch.tensor([0.3])).item()))


def test_timestep_warp_draws_more_high_noise_steps():
    paper = D.sample_training_t(20000, generator=torch.Generator().manual_seed(0))
    warped = D.sample_training_t(20000, generator=torch.Generator().manual_seed(0), warp=3.0)
    torch.testing.assert_close(warped, (1 - (1 - paper) ** 3).clamp(D.TRAIN_T_MIN, 1.0))
    assert float((paper > 0.9).float().mean()) == pytest.approx(0.17, abs=0.02)
    assert float((warped > 0.9).float().mean()) == pytest.approx(0.50, abs=0.02)
    assert float(warped.min()) >= D.TRAIN_T_MIN and float(warped.max()) <= 1.0


def test_v_predicting_stage_b_returns_eps_and_trains_on_the_v_mse():
    """A v-predicting Stage B's forward is eps = sqrt(1 - ab) x_t + sqrt(ab) v (A = v), so samplers are
    unchanged; its loss is the eps MSE / alpha_bar, which equals the MSE of A against the true v."""
    from stages.stage_b import StageB, StageBConfig

    torch.manual_seed(0)
    config = StageBConfig.tiny()
    config.prediction = "v"
    model = StageB(config).eval()
    with torch.no_grad():  # a non-zero head, so A is not trivially 0
        model.clf[1].weight.normal_(std=0.05)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 16, 16, generator=gen)
    effnet, text = torch.randn(3, 16, 2, 2, generator=gen), torch.randn(3, 5, 32, generator=gen)
    t = torch.tensor([0.2, 0.7, 1.0])
    noise = torch.randn(x0.shape, generator=gen)
    x_t = D.add_noise(x0, t, noise)
    with torch.no_grad():
        v, _ = model(x_t, t, effnet, text, return_noise=False)
        eps = model(x_t, t, effnet, text)
        ab = D.alpha_bar(t).view(-1, 1, 1, 1)
        torch.testing.assert_close(eps, (1 - ab).sqrt() * x_t + ab.sqrt() * v)
        loss, parts = D.stage_b_loss(model, x0, effnet, text, t=t, noise=noise)
    true_v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    torch.testing.assert_close(parts.weighted, (v - true_v).pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts.p2_weight, 1 / D.alpha_bar(t))
    torch.testing.assert_close(loss, parts.weighted.mean())
    with pytest.raises(ValueError, match="prediction must be one of"):
        StageBConfig(prediction="x0")


def test_v_predicting_stage_c_returns_eps_and_trains_on_the_v_mse():
    from stages.stage_c import StageC, StageCConfig

    torch.manual_seed(0)
    model = StageC(StageCConfig(c=32, c_cond=8, depth=1, nhead=2, prediction="v")).eval()
    with torch.no_grad():
        model.out[1].weight.normal_(std=0.05)
    gen = torch.Generator().manual_seed(4)
    x0, text = torch.randn(3, 16, 3, 3, generator=gen), torch.randn(3, 5, 8, generator=gen)
    t, noise = torch.tensor([0.1, 0.6, 1.0]), torch.randn(3, 16, 3, 3, generator=gen)
    x_t = D.add_noise(x0, t, noise)
    with torch.no_grad():
        v, _ = model(x_t, t, text, return_noise=False)
        ab = D.alpha_bar(t).view(-1, 1, 1, 1)
        torch.testing.assert_close(model(x_t, t, text), (1 - ab).sqrt() * x_t + ab.sqrt() * v)
        _, parts = D.stage_c_loss(model, x0, text, t=t, noise=noise)
    true_v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    torch.testing.assert_close(parts.weighted, (v - true_v).pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-5)
