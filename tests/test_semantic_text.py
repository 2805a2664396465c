"""Semantic Compressor and text encoder: shapes, preprocessing, weight loading, errors."""

from __future__ import annotations

import pytest
import torch

from stages.checkpoint import CheckpointError, load_semantic_weights
from stages.semantic import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SemanticCompressor,
    SemanticCompressorConfig,
    from_stage_c,
    pretrain_by_reconstruction,
    to_stage_c,
)
from stages.text import TINY_CLIP_NAME, TextEncoder, TextEncoderConfig

# torchvision efficientnet_v2_s().features (20,177,488) + Conv1x1 1280->16 (20,480) + BatchNorm(16) (32).
PAPER_SEMANTIC_PARAMS = 20_198_000
# open_clip ViT-H-14 text tower incl. its (unused) projection.
CLIP_H_TEXT_PARAMS = 354_032_640




# ------------------------------------------------------------------ Semantic Compressor


def test_paper_semantic_compressor_size_and_latent_shapes_on_meta():
    with torch.device("meta"):
        model = SemanticCompressor(SemanticCompressorConfig.paper()).eval()
        assert sum(p.numel() for p in model.parameters()) == PAPER_SEMANTIC_PARAMS
        assert model.mapper[0].weight.shape == (16, 1280, 1, 1) and model.mapper[0].bias is None
        assert model(torch.empty(1, 3, 768, 768)).shape == (1, 16, 24, 24)
        assert model(torch.empty(1, 3, 384, 384)).shape == (1, 16, 12, 12)
    # Parameter names of the authors' EfficientNetEncoder (backbone.*, mapper.0, mapper.1).
    keys = set(model.state_dict())
    assert {"backbone.0.0.weight", "mapper.0.weight", "mapper.1.running_var"} <= keys


def test_tiny_semantic_compressor_encodes_images():
    torch.manual_seed(0)
    model = SemanticCompressor(SemanticCompressorConfig.tiny()).eval()
    images = torch.rand(2, 3, 200, 300)
    with torch.no_grad():
        latents = model.encode(images)
        stage_c_targets = model.encode_for_stage_c(images)
    assert latents.shape == (2, 16, 8, 8)
    torch.testing.assert_close(stage_c_targets, (latents + 1) / 42)
    torch.testing.assert_close(from_stage_c(to_stage_c(latents)), latents, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert model.encode(images, size=64).shape == (2, 16, 2, 2)


def _square_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A coloured square at a random place on a flat background: what the latent should come to describe."""
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, size, size).clone()
    for i in range(n):
        top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        images[i, :, top:top + size // 3, left:left + size // 3] = torch.rand(3, 1, 1, generator=generator)
    return images


def test_reconstruction_pretraining_teaches_a_random_compressor_its_images():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = SemanticCompressor(SemanticCompressorConfig.tiny())
    batches = (_square_images(16, 64, generator) for _ in range(60))
    result = pretrain_by_reconstruction(model, batches, steps=60, lr=2e-3, input_size=64, target_size=8)
    assert result["steps"] == 60
    assert result["loss_last"] < 0.5 * result["loss_first"], result
    assert not model.training  # left in eval mode, for the calibration that follows
    assert model.encode(torch.rand(1, 3, 64, 64), 64).shape == (1, 16, 2, 2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pretrain_by_reconstruction(model, iter([]), steps=0, lr=1e-3, input_size=64, target_size=8)


@pytest.mark.parametrize("height,width", [(300, 517), (517, 300), (1000, 999)])
def test_preprocess_equals_torchvision_resize_crop_normalize(height, width):
    from torchvision import transforms

    model = SemanticCompressor(SemanticCompressorConfig.tiny())
    images = torch.rand(2, 3, height, width)
    reference = transforms.Compose([
        transforms.Resize(384, antialias=True), transforms.CenterCrop(384),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])(images)  # fmt: skip
    torch.testing.assert_close(model.preprocess(images, 384), reference)
    assert model.preprocess(images, (128, 256)).shape == (2, 3, 128, 256)


def test_torchvision_backbone_weights_load_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    classifier_model = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "mobilenet.pth"
    torch.save(classifier_model.state_dict(), path)
    model = SemanticCompressor(SemanticCompressorConfig(backbone="torchvision:mobilenet_v3_small", image_size=64))
    counts = load_semantic_weights(model, path)
    assert counts["mapper"] == 0 and counts["backbone"] > 0
    for key, value in classifier_model.features.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_timm_backbone_weights_and_full_compressor_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    timm_model = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(path))
    model = SemanticCompressor(SemanticCompressorConfig.tiny())
    load_semantic_weights(model, path)
    assert torch.equal(model.backbone.body.conv_stem.weight, timm_model.conv_stem.weight)

    # A full compressor state dict nested like the authors' release ({"effnet_state_dict": ...}).
    other = SemanticCompressor(SemanticCompressorConfig.tiny())
    nested = tmp_path / "stage_b_release.pt"
    torch.save({"effnet_state_dict": model.state_dict()}, nested)
    mapper_keys = [k for k in model.state_dict() if k.startswith("mapper.")]
    assert load_semantic_weights(other, nested)["mapper"] == len(mapper_keys)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_semantic_errors(tmp_path):
    with pytest.raises(ValueError, match="SemanticCompressorConfig.backbone"):
        SemanticCompressorConfig(backbone="efficientnet_v2_s")
    with pytest.raises(ValueError, match="torchvision has no model 'nonexistent_net'"):
        SemanticCompressor(SemanticCompressorConfig(backbone="torchvision:nonexistent_net"))
    model = SemanticCompressor(SemanticCompressorConfig.tiny())
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*config key semantic.weights_path"):
        load_semantic_weights(model, missing)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CheckpointError, match="backbone keys missing"):
        load_semantic_weights(model, wrong)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        model.preprocess(torch.rand(3, 64, 64))


# ------------------------------------------------------------------ text encoder


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip CLIP with random weights saved as a local weights file."""
    import open_clip
    from safetensors.torch import save_file

    TextEncoder(TextEncoderConfig.tiny())  # registers the tiny config with open_clip
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP_NAME, pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return clip, path


def test_text_encoder_matches_open_clip(tiny_open_clip):
    clip, path = tiny_open_clip
    encoder = TextEncoder(TextEncoderConfig.tiny(str(path))).eval()
    captions = ["a photo of a cat", "", "an oil painting of a sausage on a plate"]
    ids = encoder.tokenize(captions)
    with torch.no_grad():
        states = encoder.encode(captions)
        # Reference: open_clip's own text path, taking the states before pooling. Its causal-only mask gives
        # the real tokens' states; the pad positions follow transformers' CLIPTextModel (test_text_states).
        x = clip.token_embedding(ids) + clip.positional_embedding
        reference = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        pooled_reference = clip.encode_text(ids)
    assert states.shape == (3, 77, 32)
    real = encoder.padding_mask(ids)
    torch.testing.assert_close(states[real], reference[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder.pooled(states, ids), pooled_reference, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        empty = encoder.empty_embedding(batch_size=2)
    assert empty.shape == (2, 77, 32)
    torch.testing.assert_close(empty[0], states[1])


def test_text_encoder_loads_full_clip_torch_file_with_module_prefix(tiny_open_clip, tmp_path):
    clip, _ = tiny_open_clip
    path = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in clip.state_dict().items()}}, path)
    encoder = TextEncoder(TextEncoderConfig.tiny(str(path)))
    assert torch.equal(encoder.token_embedding.weight, clip.token_embedding.weight)


def test_text_encoder_errors(tiny_open_clip, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=f"{missing} \\(config key text.weights_path\\)"):
        TextEncoder(TextEncoderConfig.tiny(str(missing)))
    with pytest.raises(FileNotFoundError, match="config key encoders.text_weights"):
        TextEncoder(TextEncoderConfig.tiny(str(missing)), weights_key="encoders.text_weights")
    not_clip = tmp_path / "not_clip.pth"
    torch.save({"weight": torch.zeros(2)}, not_clip)
    with pytest.raises(ValueError, match="not an open_clip wurst-tiny-clip checkpoint"):
        TextEncoder(TextEncoderConfig.tiny(str(not_clip)))
    encoder = TextEncoder(TextEncoderConfig.tiny())
    with pytest.raises(TypeError, match="list of caption strings"):
        encoder.encode("a single string")
    with pytest.raises(ValueError, match="open_clip has no model config 'ViT-Nope'"):
        TextEncoder(TextEncoderConfig(model_name="ViT-Nope"))


def test_paper_text_encoders_on_meta():
    with torch.device("meta"):
        clip_h = TextEncoder(TextEncoderConfig.clip_h())
        bigg = TextEncoder(TextEncoderConfig.clip_bigg())
    assert sum(p.numel() for p in clip_h.parameters()) == CLIP_H_TEXT_PARAMS
    assert (clip_h.width, clip_h.context_length) == (1024, 77)
    assert (bigg.width, bigg.context_length) == (1280, 77)
    assert TextEncoderConfig.preset("paper") == TextEncoderConfig.clip_h()
