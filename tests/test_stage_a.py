"""Stage A (f4 VQGAN): sizes, encode/quantize/decode contracts, training pass, errors."""

from __future__ import annotations

import pytest
import torch

from stages.stage_a import StageA, StageAConfig, count_parameters

PAPER_STAGE_A_PARAMS = 18_406_894




def _tiny(seed: int = 0) -> StageA:
    torch.manual_seed(seed)
    model = StageA(StageAConfig.tiny())
    # The mixing blocks start as the identity (gammas = 0); give them weight so tests see them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gammas"):
                param.normal_(0, 0.5)
    return model


def test_paper_parameter_count_is_exact():
    with torch.device("meta"):
        model = StageA(StageAConfig.paper())
    assert count_parameters(model) == PAPER_STAGE_A_PARAMS
    assert model.config.downscale == 4
    assert model.vquantizer.embedding.weight.shape == (8192, 4)


def test_encode_decode_shapes_and_scale():
    model = _tiny().eval()
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        latents = model.encode(images)
        raw = model.down_blocks(model.in_block(images))
        decoded = model.decode(latents)
    assert latents.shape == (2, 4, 8, 12)
    assert model.latent_shape(32, 48) == (4, 8, 12)
    # encode divides by the scale factor like the Würstchen pipelines; decode undoes it.
    torch.testing.assert_close(latents, raw / 0.3764)
    assert decoded.shape == images.shape
    with torch.no_grad():
        direct = model.out_block(model.up_blocks(raw))
    torch.testing.assert_close(decoded, direct, rtol=1e-5, atol=1e-6)


def test_quantize_returns_codebook_entries_and_bypass_is_default():
    model = _tiny().eval()
    with torch.no_grad():
        latents = model.encode(torch.rand(2, 3, 16, 16))
        quantized, indices, loss = model.quantize(latents)
    assert indices.shape == (2, 4, 4) and indices.dtype == torch.long
    assert int(indices.min()) >= 0 and int(indices.max()) < model.config.num_vq_embeddings
    codebook = model.vquantizer.embedding.weight
    torch.testing.assert_close(quantized * 0.3764, codebook[indices].permute(0, 3, 1, 2))
    # Every position picked its nearest code.
    flat = (latents * 0.3764).permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(torch.cdist(flat, codebook).argmin(1), indices.flatten())
    assert loss.ndim == 0 and loss > 0
    with torch.no_grad():
        torch.testing.assert_close(model.decode_indices(indices), model.decode(quantized), rtol=1e-5, atol=1e-5)
        # Default decode bypasses the quantizer: continuous latents decode differently.
        assert not torch.allclose(model.decode(latents), model.decode(latents, force_not_quantize=False))
        torch.testing.assert_close(model.decode(latents, force_not_quantize=False), model.decode(quantized),
                                   rtol=1e-5, atol=1e-5)


def test_quantizer_chunking_matches_single_pass():
    model = _tiny().eval()
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        _, whole, _ = model.vquantizer(z)
        model.vquantizer.distance_chunk_rows = 7  # forces many uneven chunks
        _, chunked, _ = model.vquantizer(z)
    assert torch.equal(whole, chunked)


def test_training_forward_losses_and_bypass():
    model = _tiny().train()
    images = torch.rand(2, 3, 16, 16)
    out = model(images, bypass_prob=0.0)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.vq_loss)
    torch.testing.assert_close(out.reconstruction_loss, torch.mean((out.reconstruction - images) ** 2))
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The codebook learns through the codebook term; the encoder through the straight-through path.
    assert grads["vquantizer.embedding.weight"].abs().sum() > 0
    assert grads["in_block.1.weight"].abs().sum() > 0

    # bypass_prob = 1: every sample decodes its continuous latent.
    full_bypass = model(images, bypass_prob=1.0)
    with torch.no_grad():
        torch.testing.assert_close(full_bypass.reconstruction, model.decode(full_bypass.latents))


def test_gradient_checkpointing_gives_same_gradients():
    images = torch.rand(2, 3, 16, 16)
    grads = []
    for checkpointing in (False, True):
        model = _tiny(seed=3).train()
        model.gradient_checkpointing = checkpointing
        model(images, bypass_prob=1.0).reconstruction_loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_a_few_steps_reduce_the_reconstruction_loss():
    model = _tiny(seed=1).train()
    images = torch.rand(4, 3, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(images, bypass_prob=1.0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.reconstruction_loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_inputs_raise_clear_errors():
    model = _tiny().eval()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(2, 4, 16, 16\)"):
        model.encode(torch.rand(2, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4, got 18x16"):
        model.encode(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 4, h, w\), got \(1, 16, 4, 4\)"):
        model.decode(torch.rand(1, 16, 4, 4))
    with pytest.raises(ValueError, match="StageAConfig.embed_dim"):
        StageAConfig(embed_dim=33)
    with pytest.raises(ValueError, match="unknown keys"):
        StageAConfig.from_dict({"embed_dims": 32})
    # diffusers' bookkeeping keys are ignored.
    assert StageAConfig.from_dict({"_class_name": "PaellaVQModel", "embed_dim": 64}).embed_dim == 64


def test_training_loss_networks(tmp_path):
    """stages.losses: the VGG16 distance is 0 between equal images and loads only a vgg16 state dict;
    the PatchGAN scores patches."""
    from safetensors.torch import save_file

    from stages.losses import PatchDiscriminator, VGGPerceptual

    torch.manual_seed(0)
    perceptual = VGGPerceptual(blocks=2)
    images = torch.rand(2, 3, 32, 32)
    assert float(perceptual(images, images)) == 0.0
    assert float(perceptual(images.flip(-1), images)) > 0.0
    assert not any(p.requires_grad for p in perceptual.parameters())
    weights = tmp_path / "vgg.safetensors"
    save_file({f"features.{k}": v.clone() for k, v in perceptual.features.state_dict().items()}, str(weights))
    loaded = VGGPerceptual(blocks=2, weights_path=str(weights))
    assert float(loaded(images.flip(-1), images)) == float(perceptual(images.flip(-1), images))
    save_file({"other.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="s3://b/vgg.safetensors lacks VGG16 feature weights"):
        VGGPerceptual(blocks=2, weights_path=str(tmp_path / "bad.safetensors"), source="s3://b/vgg.safetensors")
    scores = PatchDiscriminator(channels=8, layers=2)(images)
    assert scores.shape[:2] == (2, 1) and scores.shape[-1] > 1
