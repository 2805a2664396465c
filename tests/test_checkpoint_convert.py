"""Checkpoints (safetensors + config.json) and the diffusers converter, with diffusers as the oracle."""

from __future__ import annotations

import json

import pytest
import torch

import stages
from stages.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, save_config
from stages.convert import from_diffusers, main as convert_main, to_diffusers
from stages.semantic import SemanticCompressor, SemanticCompressorConfig
from stages.stage_a import StageA, StageAConfig
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig
from stages.text import TextEncoder, TextEncoderConfig

wuerstchen = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen")




def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised heads and gates would hide wiring mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        for name, buffer in module.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("running_mean"):
                buffer.normal_(0, 0.5, generator=generator)
    return module.eval()


def _all_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ our checkpoint format


@pytest.mark.parametrize("factory", [
    lambda: StageA(StageAConfig.tiny()),
    lambda: StageB(StageBConfig.tiny()),
    lambda: StageC(StageCConfig.tiny()),
    lambda: SemanticCompressor(SemanticCompressorConfig.tiny()),
    lambda: TextEncoder(TextEncoderConfig.tiny()),
], ids=["stage_a", "stage_b", "stage_c", "semantic", "text"])  # fmt: skip
def test_save_load_round_trip(tmp_path, factory):
    torch.manual_seed(0)
    module = _perturbed(factory(), seed=1)
    stages.save(module, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert saved["config"] == module.config.to_dict()
    loaded = stages.load(tmp_path / "ckpt", expected_kind=saved["kind"])
    assert type(loaded) is type(module) and loaded.config == module.config and not loaded.training
    assert _all_equal(module.state_dict(), loaded.state_dict())
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    half = stages.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_loaded_modules_compute_like_the_originals(tmp_path):
    torch.manual_seed(0)
    stage_a = _perturbed(StageA(StageAConfig.tiny()), seed=2)
    text = TextEncoder(TextEncoderConfig.tiny()).eval()
    stages.save(stage_a, tmp_path / "a")
    stages.save(text, tmp_path / "t")
    images = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(stages.load(tmp_path / "a").encode(images), stage_a.encode(images))
        # The causal mask is not in the state dict: it must be rebuilt after the meta-device build.
        torch.testing.assert_close(stages.load(tmp_path / "t").encode(["a cat"]), text.encode(["a cat"]))


class _ModuleWrapper(torch.nn.Module):
    """Holds the model the way DDP / DeepSpeed engines (``module``) or torch.compile (``_orig_mod``) do
    (building a real one would cost a process group or a torch._dynamo import here)."""

    def __init__(self, inner: torch.nn.Module, attribute: str):
        super().__init__()
        setattr(self, attribute, inner)


def test_wrapped_modules_save_with_plain_keys(tmp_path):
    model = StageA(StageAConfig.tiny())
    wrapped = _ModuleWrapper(_ModuleWrapper(model, "_orig_mod"), "module")
    stages.save(wrapped, tmp_path / "wrapped")
    assert _all_equal(stages.load(tmp_path / "wrapped").state_dict(), model.state_dict())


def test_checkpoint_errors(tmp_path):
    stages.save(StageA(StageAConfig.tiny()), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"holds a 'stage_a' checkpoint, expected a 'stage_c' checkpoint"):
        stages.load(tmp_path / "a", expected_kind="stage_c")
    (tmp_path / "a" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"checkpoint weights not found: {tmp_path / 'a' / WEIGHTS_FILE}"):
        stages.load(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=f"checkpoint config not found: {tmp_path / 'none' / CONFIG_FILE}"):
        stages.load(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_FILE).write_text(json.dumps({"kind": "stage_z", "config": {}}))
    with pytest.raises(CheckpointError, match="unknown kind 'stage_z'"):
        stages.load(tmp_path / "bad")
    # Weights that do not fit the config: saved tiny weights under a different config.
    stages.save(StageA(StageAConfig.tiny()), tmp_path / "mismatch")
    config = json.loads((tmp_path / "mismatch" / CONFIG_FILE).read_text())
    config["config"]["embed_dim"] = 64
    (tmp_path / "mismatch" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong shape"):
        stages.load(tmp_path / "mismatch")
    with pytest.raises(CheckpointError, match="cannot checkpoint a Linear"):
        stages.save(torch.nn.Linear(2, 2), tmp_path / "linear")


def test_text_checkpoint_naming_local_open_clip_weights(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    TextEncoder(TextEncoderConfig.tiny())  # registers the tiny config
    clip = open_clip.create_model("wurst-tiny-clip", pretrained=None)
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    save_config("text", TextEncoderConfig.tiny(str(weights)), tmp_path / "text")
    encoder = stages.load(tmp_path / "text", expected_kind="text")
    assert torch.equal(encoder.token_embedding.weight, clip.token_embedding.weight)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=f"{weights} \\(config key .*config.json: config.weights_path\\)"):
        stages.load(tmp_path / "text")


# ------------------------------------------------------------------ diffusers parity and conversion


def _diffusers_models():
    torch.manual_seed(0)
    prior = wuerstchen.WuerstchenPrior(c_in=16, c=32, c_cond=32, c_r=64, depth=2, nhead=2, dropout=0.0)
    decoder = wuerstchen.WuerstchenDiffNeXt(
        c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=32, c_hidden=[16, 32], nhead=[-1, 2], blocks=[1, 1],
        level_config=["CT", "CTA"], inject_effnet=[False, True], effnet_embd=16, clip_embd=32, dropout=0.0,
    )
    vqgan = wuerstchen.PaellaVQModel(embed_dim=32, bottleneck_blocks=2, num_vq_embeddings=64)
    prior = _perturbed(prior, 1)
    with torch.no_grad():
        # Keep the prior's B output away from 1: the A/B objective divides by |1 - B| + 1e-5, which
        # would otherwise amplify float32 rounding beyond any meaningful tolerance.
        prior.out[1].weight.mul_(0.1)
        prior.out[1].bias.mul_(0.1)
    return prior, _perturbed(decoder, 2), _perturbed(vqgan, 3)


def test_stage_a_matches_diffusers_paella_vq_model():
    *_, vqgan = _diffusers_models()
    ours = StageA(StageAConfig(embed_dim=32, bottleneck_blocks=2, num_vq_embeddings=64)).eval()
    ours.load_state_dict(vqgan.state_dict(), strict=True)
    images = torch.rand(2, 3, 32, 48)
    scale = vqgan.config.scale_factor
    with torch.no_grad():
        reference_latents = vqgan.encode(images).latents
        latents = ours.encode(images)
        torch.testing.assert_close(latents * scale, reference_latents, rtol=1e-5, atol=1e-5)
        for quantize in (False, True):
            expected = vqgan.decode(reference_latents, force_not_quantize=not quantize).sample
            got = ours.decode(latents, force_not_quantize=not quantize)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # The quantizer agrees code for code with diffusers' VectorQuantizer (legacy=False).
        _, reference_loss, (_, _, reference_indices) = vqgan.vquantizer(reference_latents)
        _, indices, loss = ours.quantize(latents)
    assert torch.equal(indices.flatten(), reference_indices.flatten())
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)


def test_diffusers_round_trip_all_three_classes(tmp_path):
    prior, decoder, vqgan = _diffusers_models()
    prior.save_pretrained(tmp_path / "prior")
    decoder.save_pretrained(tmp_path / "decoder", max_shard_size="30KB")  # sharded + index.json
    vqgan.save_pretrained(tmp_path / "vqgan")
    assert (tmp_path / "decoder" / "diffusion_pytorch_model.safetensors.index.json").is_file()

    for name in ("prior", "decoder", "vqgan"):
        assert convert_main(["--from-diffusers", str(tmp_path / name), "--out", str(tmp_path / "ours" / name)]) == 0
    stage_c = stages.load(tmp_path / "ours" / "prior", expected_kind="stage_c")
    stage_b = stages.load(tmp_path / "ours" / "decoder", expected_kind="stage_b")
    stage_a = stages.load(tmp_path / "ours" / "vqgan", expected_kind="stage_a")
    assert _all_equal(stage_c.state_dict(), prior.state_dict())
    assert _all_equal(stage_b.state_dict(), decoder.state_dict())
    assert _all_equal(stage_a.state_dict(), vqgan.state_dict())

    generator = torch.Generator().manual_seed(0)
    x_c, x_b = torch.randn(2, 16, 6, 6, generator=generator), torch.randn(2, 4, 32, 32, generator=generator)
    r, effnet = torch.rand(2, generator=generator), torch.randn(2, 16, 6, 6, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(stage_c(x_c, r, text), prior(x_c, r, text), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stage_b(x_b, r, effnet, text), decoder(x_b, r, effnet, text), rtol=1e-5, atol=1e-5)
        images = torch.rand(1, 3, 16, 16)
        torch.testing.assert_close(stage_a.decode(stage_a.encode(images)),
                                   vqgan.decode(vqgan.encode(images).latents).sample, rtol=1e-5, atol=1e-5)

    # Back to diffusers: from_pretrained gives the original config and weights.
    for name, cls, original in (("prior", wuerstchen.WuerstchenPrior, prior),
                                ("decoder", wuerstchen.WuerstchenDiffNeXt, decoder),
                                ("vqgan", wuerstchen.PaellaVQModel, vqgan)):
        args = ["--to-diffusers", str(tmp_path / "ours" / name), "--out", str(tmp_path / "back" / name)]
        assert convert_main(args) == 0
        restored = cls.from_pretrained(tmp_path / "back" / name)
        assert _all_equal(restored.state_dict(), original.state_dict())
        public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
        assert public(restored.config) == public(original.config)


def test_convert_pipeline_folder_and_errors(tmp_path, capsys):
    prior, decoder, vqgan = _diffusers_models()
    root = tmp_path / "pipeline"
    prior.save_pretrained(root / "prior")
    vqgan.save_pretrained(root / "vqgan")
    decoder.save_pretrained(root / "decoder")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WuerstchenDecoderPipeline", "decoder": ["diffusers", "WuerstchenDiffNeXt"],
        "vqgan": ["diffusers", "PaellaVQModel"], "text_encoder": ["transformers", "CLIPTextModel"],
    }))
    written = from_diffusers(root, tmp_path / "checkpoints")
    assert sorted(kind for kind, _ in written) == ["stage_a", "stage_b"]
    assert stages.read_config(tmp_path / "checkpoints" / "stage_b")[0] == "stage_b"

    # Unknown class, missing weights, a kind without a diffusers class.
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / CONFIG_FILE).write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert convert_main(["--from-diffusers", str(tmp_path / "unet"), "--out", str(tmp_path / "x")]) == 2
    assert "_class_name is 'UNet2DModel'" in capsys.readouterr().err
    (root / "vqgan" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"no diffusers weights in {root / 'vqgan'}"):
        from_diffusers(root / "vqgan", tmp_path / "y")
    stages.save(TextEncoder(TextEncoderConfig.tiny()), tmp_path / "text")
    with pytest.raises(CheckpointError, match="'text' checkpoint, which has no diffusers model class"):
        to_diffusers(tmp_path / "text", tmp_path / "z")
    # A v-predicting Stage B: diffusers' pipelines read the head as eps only, so it is not exported.
    v_config = StageBConfig.tiny()
    v_config.prediction = "v"
    stages.save(StageB(v_config), tmp_path / "stage_b_v")
    with pytest.raises(CheckpointError, match="predicts 'v'"):
        to_diffusers(tmp_path / "stage_b_v", tmp_path / "v")
