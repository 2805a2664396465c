"""Text states as the references compute them: diffusers' Würstchen pipelines and the authors' training call
`transformers.CLIPTextModel(input_ids, attention_mask).last_hidden_state` (causal + padding mask). Our
open_clip-layout `TextEncoder` must give the same states for the same weights."""

from __future__ import annotations

import pytest
import torch

from stages.text import TINY_CLIP_CONFIG, TextEncoder, TextEncoderConfig

CAPTIONS = ["a photo of a cat", "", "an oil painting of a sausage on a plate next to a small blue teapot",
            "x " * 100]  # the last one is truncated: no padding at all


def _random_encoder() -> TextEncoder:
    """The tiny tower with random weights, biases included (open_clip initialises them to zero, which would
    leave the bias mapping untested)."""
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig.tiny()).eval()
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.05)
            elif "ln" in name and name.endswith("weight"):
                parameter.uniform_(0.5, 1.5)
    return encoder


def _clip_text_model(encoder: TextEncoder, attn_implementation: str):
    """transformers' CLIPTextModel with `encoder`'s weights (open_clip names -> Hugging Face names)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_cfg = TINY_CLIP_CONFIG["text_cfg"]
    config = CLIPTextConfig(vocab_size=text_cfg["vocab_size"], hidden_size=text_cfg["width"],
                            intermediate_size=4 * text_cfg["width"], num_hidden_layers=text_cfg["layers"],
                            num_attention_heads=text_cfg["heads"], max_position_embeddings=text_cfg["context_length"],
                            hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    config._attn_implementation = attn_implementation
    model = CLIPTextModel(config).eval()
    ours = encoder.state_dict()
    state = {"text_model.embeddings.token_embedding.weight": ours["token_embedding.weight"],
             "text_model.embeddings.position_embedding.weight": ours["positional_embedding"],
             "text_model.final_layer_norm.weight": ours["ln_final.weight"],
             "text_model.final_layer_norm.bias": ours["ln_final.bias"]}
    for i in range(text_cfg["layers"]):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = ours[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            state.update({f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k,
                          f"{dst}self_attn.v_proj.{kind}": v,
                          f"{dst}self_attn.out_proj.{kind}": ours[f"{src}attn.out_proj.{kind}"],
                          f"{dst}layer_norm1.{kind}": ours[f"{src}ln_1.{kind}"],
                          f"{dst}layer_norm2.{kind}": ours[f"{src}ln_2.{kind}"],
                          f"{dst}mlp.fc1.{kind}": ours[f"{src}mlp.c_fc.{kind}"],
                          f"{dst}mlp.fc2.{kind}": ours[f"{src}mlp.c_proj.{kind}"]})
    # transformers 4 names the keys text_model.*, 5 drops the prefix.
    prefixed = any(key.startswith("text_model.") for key in model.state_dict())
    state = {key if prefixed else key.removeprefix("text_model."): value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in key for key in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_text_states_match_transformers_clip_text_model(attn_implementation):
    encoder = _random_encoder()
    reference = _clip_text_model(encoder, attn_implementation)
    ids = encoder.tokenize(CAPTIONS)
    mask = encoder.padding_mask(ids)
    # The mask a Hugging Face CLIP tokenizer returns: 1 from start-of-text through end-of-text.
    assert mask.sum(dim=1).tolist()[1] == 2 and bool(mask[3].all())
    with torch.no_grad():
        states = encoder.encode(CAPTIONS)
        expected = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        empty = encoder.empty_embedding(batch_size=2)
        expected_empty = reference(input_ids=ids[1:2], attention_mask=mask[1:2].long()).last_hidden_state
    assert states.shape == expected.shape == (len(CAPTIONS), 77, 32)
    assert (states - expected).abs().max().item() < 1e-5
    assert empty.shape == (2, 77, 32)
    assert (empty - expected_empty).abs().max().item() < 1e-5


def test_padding_mask_changes_only_the_pad_positions():
    """Real tokens attend only to earlier real tokens, so their states (and the pooled EOT feature, CLIP
    score's) are open_clip's causal-only ones; the pad positions are what the padding mask changes."""
    encoder = _random_encoder()
    ids = encoder.tokenize(CAPTIONS[:3])
    mask = encoder.padding_mask(ids)
    with torch.no_grad():
        states = encoder.encode_tokens(ids)
        x = encoder.token_embedding(ids) + encoder.positional_embedding
        causal_only = encoder.ln_final(encoder.transformer(x, attn_mask=encoder.attn_mask))
    torch.testing.assert_close(states[mask], causal_only[mask], rtol=1e-5, atol=1e-5)
    assert (states[~mask] - causal_only[~mask]).abs().max().item() > 1e-2
    torch.testing.assert_close(encoder.pooled(states, ids), encoder.pooled(causal_only, ids), rtol=1e-5, atol=1e-5)


def test_explicit_attention_mask_is_checked():
    encoder = _random_encoder()
    ids = encoder.tokenize(["a cat"])
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_tokens(ids, encoder.padding_mask(ids)), encoder.encode_tokens(ids))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        encoder.encode_tokens(ids, torch.ones(1, 5, dtype=torch.bool))


def test_precompute_names_the_text_states_version():
    """precompute versions its output by the text computation without importing torch: its copy of the
    constant must follow stages.text's."""
    from pipelines import precompute_encoders
    from stages import text

    assert precompute_encoders.TEXT_STATES_VERSION == text.TEXT_STATES_VERSION
