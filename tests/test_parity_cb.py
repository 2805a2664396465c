"""Parity with diffusers (test-only oracle): WuerstchenPrior / WuerstchenDiffNeXt state dicts load
into StageC / StageB with a plain ``load_state_dict`` and give the same outputs (fp32, CPU, 1e-5);
our schedule, noising and DDPM step equal ``DDPMWuerstchenScheduler``'s."""

from __future__ import annotations

import pytest
import torch

from stages import diffusion as D
from stages.convert import diffusers_config_values
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig

wuerstchen = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen")
from diffusers import DDPMWuerstchenScheduler  # noqa: E402
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def _perturb(module: torch.nn.Module, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * std)


def _prior_pair(config: StageCConfig):
    torch.manual_seed(0)
    reference = wuerstchen.WuerstchenPrior(**diffusers_config_values(config)).eval()
    with torch.no_grad():
        # Default PyTorch init gives a non-trivial head; keep B away from 1 so the A/B division
        # (x - A) / (|1 - B| + 1e-5) stays well conditioned and 1e-5 is a meaningful tolerance.
        reference.out[1].weight.mul_(0.1)
    ours = StageC(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def _decoder_pair(config: StageBConfig):
    torch.manual_seed(0)
    reference = wuerstchen.WuerstchenDiffNeXt(**diffusers_config_values(config)).eval()
    _perturb(reference, 0.05, seed=1)  # leave the zero-initialised heads / GRN / timestep mappers
    ours = StageB(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


PRIOR_CONFIG = StageCConfig(c_in=16, c=32, c_cond=24, c_r=64, depth=2, nhead=4, dropout=0.1)
# Three levels with attention and EffNet injection patterns that exercise every skip combination.
DECODER_CONFIG = StageBConfig(
    c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=24, c_hidden=[8, 16, 32], nhead=[2, 2, 4], blocks=[1, 2, 1],
    level_config=["CTA", "CT", "CTA"], inject_effnet=[True, False, True], effnet_embd=16, clip_embd=20,
    kernel_size=3, dropout=0.1,
)  # fmt: skip


def test_prior_matches_diffusers():
    reference, ours = _prior_pair(PRIOR_CONFIG)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 6, 5, generator=gen)  # non-square latent
    r = torch.rand(2, generator=gen)
    text = torch.randn(2, 7, 24, generator=gen)
    with torch.no_grad():
        expected = reference(x, r, text)
        got = ours(x, r, text)
    torch.testing.assert_close(got, expected, **TOL)
    assert float((expected - x).abs().mean()) > 0.1  # the model does more than echo its input


def test_decoder_matches_diffusers():
    reference, ours = _decoder_pair(DECODER_CONFIG)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 16, 24, generator=gen)
    r = torch.rand(2, generator=gen)
    effnet = torch.randn(2, 16, 3, 4, generator=gen)
    text = torch.randn(2, 9, 20, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, r, effnet, text), reference(x, r, effnet, text), **TOL)
        ref_a, ref_b = reference(x, r, effnet, text, return_noise=False)
        our_a, our_b = ours(x, r, effnet, text, return_noise=False)
    torch.testing.assert_close(our_a, ref_a, **TOL)
    torch.testing.assert_close(our_b, ref_b, **TOL)


def test_paper_state_dict_layout_matches_diffusers():
    """Released weights load with a plain load_state_dict: same keys and shapes at paper size."""
    with torch.device("meta"):
        pairs = [
            (wuerstchen.WuerstchenPrior(**diffusers_config_values(StageCConfig.paper("clip-bigg"))), StageC(StageCConfig.paper("clip-bigg"))),
            (wuerstchen.WuerstchenDiffNeXt(**diffusers_config_values(StageBConfig.paper())), StageB(StageBConfig.paper())),
        ]  # fmt: skip
    for reference, ours in pairs:
        expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert got == expected


def test_schedule_and_noising_match_scheduler():
    scheduler = DDPMWuerstchenScheduler()
    t = torch.linspace(0, 1, 257)
    torch.testing.assert_close(D.alpha_bar(t), scheduler._alpha_cumprod(t, torch.device("cpu")), rtol=1e-6, atol=1e-7)
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(4, 16, 3, 3, generator=gen), torch.randn(4, 16, 3, 3, generator=gen)
    t4 = torch.tensor([0.0, 0.3, 0.7, 1.0])
    torch.testing.assert_close(D.add_noise(x0, t4, noise), scheduler.add_noise(x0, noise, t4), **TOL)


def test_timestep_lists_match_diffusers():
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(12)
    assert torch.equal(D.linear_timesteps(12), scheduler.timesteps)
    scheduler.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
    assert torch.equal(D.stage_c_fast_timesteps(), scheduler.timesteps)


def test_ddpm_step_matches_scheduler_with_same_noise():
    scheduler = DDPMWuerstchenScheduler()
    timesteps = D.stage_c_fast_timesteps()
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 4, 4, generator=gen)
    eps = torch.randn(2, 16, 4, 4, generator=gen)
    # Every step, including the last (noise-free) one, draws its noise from the generator.
    for index in (0, 19, 28):
        t, t_prev = timesteps[index].expand(2), timesteps[index + 1].expand(2)
        expected = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(index)).prev_sample
        noise = D.randn(x.shape, generator=torch.Generator().manual_seed(index))
        torch.testing.assert_close(D.ddpm_step(x, eps, t, t_prev, noise), expected, **TOL)
