"""Full generation parity: text -> Stage C -> Stage B -> Stage A with our stages and
``stages.sampling.generate`` equals diffusers' ``WuerstchenPriorPipeline`` followed by
``WuerstchenDecoderPipeline`` (the released inference path) for the same weights, text embeddings
and seeded generator.

Everything is tiny, random and local: a CLIP tokenizer built from an in-memory 54-token vocabulary,
a 2-layer ``CLIPTextModel``, and random prior / decoder / VQGAN weights copied into our modules.

Tolerance: both sides run the same fp32 maths, but not the same kernels (SDPA vs explicit softmax
attention, fp64 vs fp32 schedule constant), so they differ at the 1e-7 level per operation. Those
differences pass through 29 Stage C and 6 Stage B DDPM steps with guidance scale 4 (which
multiplies the cond/uncond difference by 4) and the x 42 mapping of Stage C latents; measured
differences are ~3e-5 on semantic latents of magnitude ~70 and ~1e-5 on images in [0, 1]. We assert
1e-3 on semantic latents (relative ~1.5e-5) and 1e-4 on images: an order of magnitude of headroom,
and far below what any real discrepancy (a wrong sign, scale, step order or RNG order) produces.
"""

from __future__ import annotations

import string

import pytest
import torch

from stages.convert import diffusers_config_values
from stages.diffusion import stage_c_fast_timesteps
from stages.sampling import generate
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig

wuerstchen = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen")
transformers = pytest.importorskip("transformers")
from diffusers import DDPMWuerstchenScheduler  # noqa: E402

HEIGHT, WIDTH = 128, 256  # Stage C 3x6 -> Stage B 32x64 -> image 128x256 (non-square on purpose)
PROMPT = "a red cube"
IMAGES_PER_PROMPT = 2
STAGE_B_STEPS = 6
GUIDANCE = 4.0
VQ_CONFIG = dict(
    in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=2, embed_dim=32,
    latent_channels=4, num_vq_embeddings=64, scale_factor=0.3764,
)  # fmt: skip


def _tiny_tokenizer():
    # Byte-level BPE over single lowercase letters (no merges): enough to tokenize the prompts.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), vocab


def _perturb(module: torch.nn.Module, std: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def pipelines_and_stages():
    from stages.stage_a import StageA, StageAConfig

    tokenizer, vocab = _tiny_tokenizer()
    torch.manual_seed(0)
    text_config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(vocab),
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    prior_config = StageCConfig(c_in=16, c=32, c_cond=32, c_r=64, depth=2, nhead=2, dropout=0.0)
    decoder_config = StageBConfig.tiny()
    prior = wuerstchen.WuerstchenPrior(**diffusers_config_values(prior_config)).eval()
    decoder = wuerstchen.WuerstchenDiffNeXt(**diffusers_config_values(decoder_config)).eval()
    vqgan = wuerstchen.PaellaVQModel(**VQ_CONFIG).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        prior.out[1].weight.mul_(0.1)  # keep |1 - B| away from 0 (well-conditioned A/B objective)
    _perturb(decoder, 0.05, gen)  # move off the zero-initialised heads so every path matters
    _perturb(vqgan, 0.05, gen)

    prior_pipe = wuerstchen.WuerstchenPriorPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, scheduler=DDPMWuerstchenScheduler()
    )
    decoder_pipe = wuerstchen.WuerstchenDecoderPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, decoder=decoder, scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan,
    )  # fmt: skip
    for pipe in (prior_pipe, decoder_pipe):
        pipe.set_progress_bar_config(disable=True)

    stage_c = StageC(prior_config).eval()
    stage_c.load_state_dict(prior.state_dict(), strict=True)
    stage_b = StageB(decoder_config).eval()
    stage_b.load_state_dict(decoder.state_dict(), strict=True)
    stage_a = StageA(StageAConfig(**VQ_CONFIG)).eval()
    stage_a.load_state_dict(vqgan.state_dict(), strict=True)
    return prior_pipe, decoder_pipe, stage_c, stage_b, stage_a


def test_generation_matches_diffusers_pipelines(pipelines_and_stages):
    prior_pipe, decoder_pipe, stage_c, stage_b, stage_a = pipelines_and_stages
    timesteps_c = stage_c_fast_timesteps().tolist()

    # diffusers: one generator shared by prior then decoder, as WuerstchenCombinedPipeline does.
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        semantic_ref = prior_pipe(
            PROMPT, height=HEIGHT, width=WIDTH, timesteps=timesteps_c, guidance_scale=GUIDANCE,
            num_images_per_prompt=IMAGES_PER_PROMPT, generator=generator, output_type="pt",
        ).image_embeddings  # fmt: skip
        images_ref = decoder_pipe(
            semantic_ref, PROMPT, num_inference_steps=STAGE_B_STEPS, guidance_scale=GUIDANCE,
            generator=generator, output_type="pt",
        ).images  # fmt: skip

        # Ours, with the text embeddings the pipelines compute for the same prompt.
        text_c, uncond_c = prior_pipe.encode_prompt(
            device="cpu", num_images_per_prompt=IMAGES_PER_PROMPT, do_classifier_free_guidance=True, prompt=[PROMPT]
        )
        text_b, uncond_b = decoder_pipe.encode_prompt([PROMPT], "cpu", IMAGES_PER_PROMPT, True)
        ours = generate(
            stage_c, stage_b, stage_a, text_c, uncond_c, text_b, uncond_b, HEIGHT, WIDTH,
            stage_c_timesteps=timesteps_c, stage_c_guidance=GUIDANCE,
            stage_b_timesteps=STAGE_B_STEPS, stage_b_guidance=GUIDANCE,
            seed=123, return_intermediates=True,
        )  # fmt: skip

    assert images_ref.shape == ours.images.shape == (IMAGES_PER_PROMPT, 3, HEIGHT, WIDTH)
    # The two samples got different noise, and the images are not saturated: a meaningful comparison.
    assert not torch.allclose(ours.images[0], ours.images[1], atol=1e-3)
    assert 0.01 < float(images_ref.std()) and float((images_ref > 0).float().mean()) > 0.2
    torch.testing.assert_close(ours.semantic_latents, semantic_ref, rtol=0, atol=1e-3)
    torch.testing.assert_close(ours.images, images_ref, rtol=0, atol=1e-4)
