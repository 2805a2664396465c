"""Stage C / Stage B models and sampling (stages/stage_c.py, stage_b.py, sampling.py): presets and
parameter counts, initial behaviour, training switches, input validation, generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stages.sampling import (
    check_image_size,
    generate,
    sample_stage_b,
    sample_stage_c,
    stage_b_latent_size,
    stage_c_latent_size,
)
from stages.blocks import Attention
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig


def _perturb(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its structured init (zero heads, zero GRN) so outputs and gradients
    depend on all of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * std)
    return module


def _tiny_c(**kwargs) -> StageC:
    torch.manual_seed(0)
    return StageC(StageCConfig.tiny(), **kwargs)


def _tiny_b(**kwargs) -> StageB:
    torch.manual_seed(0)
    return StageB(StageBConfig.tiny(), **kwargs)


def _c_inputs(batch: int = 2, size: int = 8):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 16, size, size, generator=gen), torch.rand(batch, generator=gen), torch.randn(
        batch, 77, 32, generator=gen
    )


def _b_inputs(batch: int = 2, size: int = 32):
    gen = torch.Generator().manual_seed(2)
    return (
        torch.randn(batch, 4, size, size, generator=gen),
        torch.rand(batch, generator=gen),
        torch.randn(batch, 16, 3, 3, generator=gen),
        torch.randn(batch, 77, 32, generator=gen),
    )


# ---------------------------------------------------------------- presets and parameter counts


@pytest.mark.parametrize(
    "config, expected",
    [
        (StageCConfig.paper("clip-h"), 993_243_680),
        (StageCConfig.paper("clip-bigg"), 993_636_896),
        (StageCConfig.preset("paper-clip-bigg"), 993_636_896),
        (StageBConfig.paper(), 1_055_365_280),
    ],
)
def test_paper_parameter_counts(config, expected):
    with torch.device("meta"):
        model = StageC(config) if isinstance(config, StageCConfig) else StageB(config)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_presets_and_config_round_trip():
    assert StageCConfig.preset("paper") == StageCConfig.paper("ViT-H-14")
    assert StageCConfig.paper("ViT-bigG-14").c_cond == 1280
    assert StageBConfig.preset("tiny") == StageBConfig.tiny()
    for config in (StageCConfig.tiny(), StageBConfig.paper()):
        assert type(config).from_dict(config.to_dict()) == config
    # diffusers config.json bookkeeping keys are ignored; tuples normalise to lists.
    diffusers_json = {"_class_name": "WuerstchenDiffNeXt", "_diffusers_version": "0.42", **StageBConfig.tiny().to_dict()}
    diffusers_json["c_hidden"] = tuple(diffusers_json["c_hidden"])
    assert StageBConfig.from_dict(diffusers_json) == StageBConfig.tiny()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['latent_size'\]"):
        StageCConfig.from_dict({**StageCConfig.tiny().to_dict(), "latent_size": [12, 12]})
    with pytest.raises(ValueError, match="unknown text encoder 'clip-l'"):
        StageCConfig.paper("clip-l")
    with pytest.raises(ValueError, match="unknown Stage B preset 'huge'"):
        StageBConfig.preset("huge")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: StageCConfig(c=30, nhead=4), "divisible by nhead"),
        (lambda: StageCConfig(depth=0), "depth must be a positive int"),
        (lambda: StageBConfig(blocks=[1, 1]), "blocks has 2 entries but c_hidden has 4"),
        (lambda: StageBConfig(level_config=["CT", "CTA", "CTX", "CTA"]), r"level_config\[2\]"),
        (lambda: StageBConfig(nhead=[-1, 7, 20, 20]), "level 1: c_hidden=640 must be divisible"),
        (lambda: StageBConfig(kernel_size=4), "kernel_size must be odd"),
        (lambda: StageCConfig(cond_init="xavier"), "cond_init must be one of"),
        (lambda: StageCConfig(attention_dropout_on="probs"), "attention_dropout_on must be one of"),
        (lambda: StageBConfig(attention_dropout_on="input"), "attention_dropout_on must be one of"),
    ],
)
def test_invalid_configs_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_paper_gain_init_keeps_the_paper_text_mapper_gain_at_any_width():
    """"official" draws the text mapper with std 0.02 at any width; "paper_gain" scales it so that
    std * sqrt(fan_in) equals the paper prior's (1024 -> 1536), and equals "official" at those widths."""
    def mapper_gains(config):
        torch.manual_seed(0)
        model = StageC(config)
        return [float(layer.weight.std()) * layer.in_features ** 0.5
                for layer in (model.cond_mapper[0], model.cond_mapper[2])]

    paper_gains = [0.02 * 1024 ** 0.5, 0.02 * 1536 ** 0.5]  # 0.64, 0.78
    narrow = dict(c=64, c_cond=32, depth=1, nhead=2)
    for got, want in zip(mapper_gains(StageCConfig(**narrow, cond_init="paper_gain")), paper_gains):
        assert got == pytest.approx(want, rel=0.1)
    official = mapper_gains(StageCConfig(**narrow))
    assert official[0] == pytest.approx(0.02 * 32 ** 0.5, rel=0.1) and official[1] == pytest.approx(0.02 * 64 ** 0.5, rel=0.1)
    # At the paper's widths both inits draw the same weights (checked on a 1-layer model of those widths).
    wide = dict(c=1536, c_cond=1024, depth=1, nhead=24)
    torch.manual_seed(0)
    a = StageC(StageCConfig(**wide)).cond_mapper.state_dict()
    torch.manual_seed(0)
    b = StageC(StageCConfig(**wide, cond_init="paper_gain")).cond_mapper.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- forward behaviour


def test_stage_c_starts_by_returning_its_input():
    model = _tiny_c().eval()
    x, r, text = _c_inputs()
    with torch.no_grad():
        eps = model(x, r, text)
        a, b = model(x, r, text, return_noise=False)
    assert eps.shape == x.shape and eps.dtype == torch.float32
    torch.testing.assert_close(eps, x / (1 + 1e-5))
    assert bool((a == 0).all()) and bool((b == 0).all())
    # Scalar r broadcasts over the batch.
    torch.testing.assert_close(model(x, torch.tensor(0.3), text), model(x, torch.full((2,), 0.3), text))


def test_stage_b_initial_output_and_shapes():
    model = _tiny_b().eval()
    x, r, effnet, text = _b_inputs()
    with torch.no_grad():
        eps = model(x, r, effnet, text)
    # Zero head: A = 0 and B = sigmoid(0) squashed = 0.5, so eps = 2 x.
    torch.testing.assert_close(eps, 2 * x)
    _perturb(model)
    with torch.no_grad():
        eps = model(x, r, effnet, text)
        eps_other_effnet = model(x, r, effnet + 1, text)
        eps_other_text = model(x, r, effnet, text + 1)
    assert eps.shape == x.shape
    assert not torch.allclose(eps, eps_other_effnet) and not torch.allclose(eps, eps_other_text)


@pytest.mark.parametrize("which", ["c", "b"])
def test_gradient_checkpointing_matches_plain_backward(which):
    if which == "c":
        plain, ckpt = _perturb(_tiny_c()), _perturb(_tiny_c(gradient_checkpointing=True))
        inputs = _c_inputs()
    else:
        plain, ckpt = _perturb(_tiny_b()), _perturb(_tiny_b(gradient_checkpointing=True))
        inputs = _b_inputs()
    results = []
    for model in (plain, ckpt):
        model.eval()  # dropout off so both passes are deterministic
        out = model(*inputs)
        out.square().mean().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)


# ---------------------------------------------------------------- attention dropout placement


@pytest.mark.parametrize("which", ["c", "b"])
def test_attention_dropout_placements_agree_in_eval_mode(which):
    """Only training differs: in eval mode "weights", "output" and no dropout at all give the same output."""
    build, config, inputs = (StageC, StageCConfig.tiny(), _c_inputs()) if which == "c" else \
        (StageB, StageBConfig.tiny(), _b_inputs())
    reference = _perturb(build(dataclasses.replace(config, dropout=0.0))).eval()
    outputs = []
    for placement in ("weights", "output"):
        model = build(dataclasses.replace(config, attention_dropout_on=placement)).eval()
        model.load_state_dict(reference.state_dict(), strict=True)
        with torch.no_grad():
            outputs.append(model(*inputs))
    with torch.no_grad():
        expected = reference(*inputs)
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _attention_reference(attention: Attention, tokens, kv, *, drop_weights: float, drop_output: float, seed: int):
    """Softmax attention written out, with dropout on the probabilities and / or after the output projection,
    drawing from the same seeded stream as the module."""
    heads, width = attention.nhead, tokens.shape[-1]

    def split(t):
        return t.unflatten(-1, (heads, width // heads)).transpose(1, 2)

    q, k, v = split(attention.to_q(tokens)), split(attention.to_k(kv)), split(attention.to_v(kv))
    probs = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
    torch.manual_seed(seed)
    probs = torch.nn.functional.dropout(probs, drop_weights, training=True)
    out = attention.to_out[0]((probs @ v).transpose(1, 2).reshape(tokens.shape))
    return torch.nn.functional.dropout(out, drop_output, training=True), probs


def test_attention_dropout_on_weights_drops_attention_probabilities():
    torch.manual_seed(0)
    weights = Attention(16, 2, dropout=0.3, dropout_on="weights").train()
    output = Attention(16, 2, dropout=0.3, dropout_on="output").train()
    output.load_state_dict(weights.state_dict(), strict=True)
    assert isinstance(weights.to_out[1], torch.nn.Identity)  # same state dict, nothing after the projection
    tokens, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.manual_seed(123)
        got_weights = weights(tokens, kv)
        torch.manual_seed(123)
        got_output = output(tokens, kv)
        expected_weights, probs = _attention_reference(weights, tokens, kv, drop_weights=0.3, drop_output=0.0,
                                                       seed=123)
        expected_output, _ = _attention_reference(output, tokens, kv, drop_weights=0.0, drop_output=0.3, seed=123)
    torch.testing.assert_close(got_weights, expected_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_output, expected_output, rtol=1e-5, atol=1e-6)
    # Dropout on the weights: rows of the probabilities no longer sum to 1, and no output entry is zeroed.
    assert (probs.sum(dim=-1) - 1).abs().max() > 0.1
    assert bool((got_weights != 0).all()) and bool((got_output == 0).any())


def test_channels_last_and_bf16_autocast():
    model_c, model_b = _perturb(_tiny_c()).eval(), _perturb(_tiny_b()).eval()
    x, r, text = _c_inputs()
    xb, rb, effnet, textb = _b_inputs()
    with torch.no_grad():
        ref_c, ref_b = model_c(x, r, text), model_b(xb, rb, effnet, textb)
        model_c.to(memory_format=torch.channels_last)
        model_b.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model_c(x.to(memory_format=torch.channels_last), r, text), ref_c)
        torch.testing.assert_close(model_b(xb.to(memory_format=torch.channels_last), rb, effnet, textb), ref_b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_c, low_b = model_c(x, r, text), model_b(xb, rb, effnet, textb)
    assert low_c.dtype == torch.float32 and low_b.dtype == torch.float32
    # bf16 has ~3 significant digits; the outputs must still track the fp32 ones.
    assert float((low_c - ref_c).abs().mean()) < 0.05 * float(ref_c.abs().mean())
    assert float((low_b - ref_b).abs().mean()) < 0.05 * float(ref_b.abs().mean())


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, r, t: (x[:, :4], r, t), r"expected 16 latent channels \(config c_in\), got 4"),
        (lambda x, r, t: (x[0], r, t), "must be a 4-D latent"),
        (lambda x, r, t: (x, r, t[..., :16]), "text embedding width 16 does not match config c_cond=32"),
        (lambda x, r, t: (x, r, t[:1]), "x has 2 samples but text has 1"),
        (lambda x, r, t: (x, r[:1], t), r"r must have shape \(2,\)"),
        (lambda x, r, t: (x, r, t[0]), "text must be"),
    ],
)
def test_stage_c_input_errors(change, match):
    with pytest.raises(ValueError, match=match):
        _tiny_c()(*change(*_c_inputs()))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, r, e, t: (x[:, :3], r, e, t), r"expected 4 latent channels \(config c_in\), got 3"),
        (lambda x, r, e, t: (x[..., :30, :], r, e, t), "multiples of 4"),
        (lambda x, r, e, t: (x, r, e[:, :8], t), "expected 16 effnet channels"),
        (lambda x, r, e, t: (x, r, e[:1], t), "x has 2 samples but effnet has 1"),
        (lambda x, r, e, t: (x, r, None, t), "effnet must be a 4-D semantic latent"),
        (lambda x, r, e, t: (x, r, e, t[..., :8]), "text embedding width 8 does not match config clip_embd=32"),
        (lambda x, r, e, t: (x, r, e, t[:1]), "x has 2 samples but text has 1"),
    ],
)
def test_stage_b_input_errors(change, match):
    with pytest.raises(ValueError, match=match):
        _tiny_b()(*change(*_b_inputs()))


# ---------------------------------------------------------------- sampling and generation


def test_latent_sizes_follow_the_released_pipelines():
    assert stage_c_latent_size(1024, 1024) == (24, 24)
    assert stage_b_latent_size(24, 24) == (256, 256)
    assert stage_c_latent_size(512, 768) == (12, 18)
    assert stage_b_latent_size(12, 18) == (128, 192)
    assert check_image_size(1024, 1536, 16) == ((24, 36), (256, 384))
    with pytest.raises(ValueError, match=r"height 550 -> Stage B latent 138 \(nearest working height: 5\d\d\)"):
        check_image_size(550, 512, 16)


def test_sample_stage_c_is_seeded_and_uses_guidance():
    model = _perturb(_tiny_c()).eval()
    _, _, text = _c_inputs()
    uncond = torch.zeros(1, 77, 32)

    def run(guidance, seed=0):
        return sample_stage_c(
            model, text, uncond, (2, 16, 4, 4), timesteps=4, guidance=guidance,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    first = run(4.0)
    assert first.shape == (2, 16, 4, 4) and bool(torch.isfinite(first).all())
    assert torch.equal(first, run(4.0))
    assert not torch.allclose(first, run(4.0, seed=1))
    assert not torch.allclose(first, run(1.0))  # guidance <= 1 runs the conditional model only


def test_sampling_input_errors():
    model_c, model_b = _tiny_c().eval(), _tiny_b().eval()
    _, _, text = _c_inputs()
    with pytest.raises(ValueError, match=r"does not match the 2 text embedding\(s\)"):
        sample_stage_c(model_c, text, None, (3, 16, 4, 4), timesteps=2, guidance=1.0)
    with pytest.raises(ValueError, match="guidance > 1 needs the unconditional"):
        sample_stage_c(model_c, text, None, (2, 16, 4, 4), timesteps=2, guidance=4.0)
    with pytest.raises(ValueError, match="does not fit the text embeddings"):
        sample_stage_c(model_c, text, torch.zeros(3, 77, 32), (2, 16, 4, 4), timesteps=2, guidance=4.0)
    with pytest.raises(ValueError, match=r"initial noise has shape \(2, 16, 5, 5\), expected \(2, 16, 4, 4\)"):
        sample_stage_c(model_c, text, None, (2, 16, 4, 4), timesteps=2, guidance=1.0, initial_noise=torch.zeros(2, 16, 5, 5))
    with pytest.raises(ValueError, match="3 semantic latents but 2 text embeddings"):
        sample_stage_b(model_b, torch.zeros(3, 16, 3, 3), text, None, (2, 4, 32, 32), timesteps=2, guidance=1.0)


def test_generate_tiny_end_to_end():
    from stages.stage_a import StageA, StageAConfig

    torch.manual_seed(0)
    stage_a = StageA(StageAConfig.tiny()).eval()
    stage_c, stage_b = _perturb(_tiny_c()).eval(), _perturb(_tiny_b()).eval()
    gen = torch.Generator().manual_seed(3)
    text_c, text_b = torch.randn(2, 77, 32, generator=gen), torch.randn(2, 77, 32, generator=gen)
    uncond = torch.zeros(1, 77, 32)
    kwargs = dict(stage_c_timesteps=3, stage_b_timesteps=2, seed=7)
    out = generate(stage_c, stage_b, stage_a, text_c, uncond, text_b, uncond, 128, 256, return_intermediates=True, **kwargs)
    assert out.images.shape == (2, 3, 128, 256)
    assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0
    assert out.stage_c_latents.shape == (2, 16, 3, 6) and out.stage_b_latents.shape == (2, 4, 32, 64)
    torch.testing.assert_close(out.semantic_latents, out.stage_c_latents * 42 - 1)
    again = generate(stage_c, stage_b, stage_a, text_c, uncond, text_b, uncond, 128, 256, **kwargs)
    assert torch.equal(again, out.images)

    with pytest.raises(ValueError, match="2 Stage C text embeddings but 1 Stage B"):
        generate(stage_c, stage_b, stage_a, text_c, uncond, text_b[:1], uncond, 128, 128, **kwargs)
    with pytest.raises(ValueError, match="image size 128x170 is not allowed"):
        generate(stage_c, stage_b, stage_a, text_c, uncond, text_b, uncond, 128, 170, **kwargs)
    with pytest.raises(ValueError, match="either seed or generator"):
        generate(stage_c, stage_b, stage_a, text_c, uncond, text_b, uncond, 128, 128, generator=gen, **kwargs)
