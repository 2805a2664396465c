"""Text encoder: the text tower of an open_clip CLIP model, returning the *unpooled* last hidden
states (B, 77, width) that Stage B and Stage C cross-attend to.

The computation is the references' (diffusers' Würstchen pipelines and the authors' training call
``transformers.CLIPTextModel(input_ids, attention_mask).last_hidden_state``): token_embedding +
positional_embedding -> transformer(causal mask + padding mask) -> ln_final, the padding mask hiding
the positions after the end-of-text token as keys. Real tokens' states equal open_clip's causal-only
path (they attend only to earlier, real tokens), and so does the pooled EOT feature; the pad
positions' states differ, and Stage B / C cross-attend to all 77. ``TEXT_STATES_VERSION`` names this
computation: precompute puts it in its output version.
Module attribute names equal open_clip ``CLIP``'s text attributes, so the text part of an open_clip
checkpoint (``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``) loads key for key.

Presets: ``clip_h`` (ViT-H-14, width 1024: the paper's Stage B and CLIP-H Stage C), ``clip_bigg``
(ViT-bigG-14, width 1280: the released Stage C), ``tiny`` (a 2-layer, width-32 CLIP registered
with open_clip under ``wurst-tiny-clip``, for tests and the demo).

Weights never come from a hub: ``weights_path`` names a local file (safetensors, or a torch file read
with ``weights_only=True``). With ``weights_path=None`` the tower has random weights, which is what
tests use and what ``stages.load`` fills from a saved checkpoint. This module may read local weight
files: it is the documented exception to "no I/O in stages/".
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from stages.checkpoint import read_state_dict_file

TINY_CLIP_NAME = "wurst-tiny-clip"
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

DEFAULT_WEIGHTS_KEY = "text.weights_path"

# What `encode_tokens` computes; raise it whenever the states change for the same weights and captions
# (precompute's output version includes it). 1: open_clip's causal mask only; 2: causal + padding mask.
TEXT_STATES_VERSION = 2


@dataclass
class TextEncoderConfig:
    PRESET_NAMES: ClassVar[tuple[str, ...]] = ("tiny", "paper", "clip-h", "clip-bigg")

    model_name: str = "ViT-H-14"
    weights_path: str | None = None
    # An inline open_clip model config ({"embed_dim", "vision_cfg", "text_cfg"}); when set it is
    # registered with open_clip under ``model_name`` (custom or tiny towers). None: use open_clip's
    # bundled config for ``model_name``.
    model_cfg: dict | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"TextEncoderConfig.model_name: expected a non-empty string, got {self.model_name!r}")
        if self.model_cfg is not None:
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in self.model_cfg]
            if missing:
                raise ValueError(f"TextEncoderConfig.model_cfg: missing keys {missing}")

    @classmethod
    def clip_h(cls, weights_path: str | None = None) -> "TextEncoderConfig":
        return cls(model_name="ViT-H-14", weights_path=weights_path)

    @classmethod
    def clip_bigg(cls, weights_path: str | None = None) -> "TextEncoderConfig":
        return cls(model_name="ViT-bigG-14", weights_path=weights_path)

    paper = clip_h

    @classmethod
    def tiny(cls, weights_path: str | None = None) -> "TextEncoderConfig":
        model_cfg = json.loads(json.dumps(TINY_CLIP_CONFIG))  # a deep copy callers may modify
        return cls(model_name=TINY_CLIP_NAME, weights_path=weights_path, model_cfg=model_cfg)

    @classmethod
    def preset(cls, name: str) -> "TextEncoderConfig":
        builders = {"tiny": cls.tiny, "paper": cls.clip_h, "clip-h": cls.clip_h, "clip-bigg": cls.clip_bigg}
        if name not in builders:
            raise ValueError(f"unknown text encoder preset {name!r}; choose one of {list(cls.PRESET_NAMES)}")
        return builders[name]()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TextEncoderConfig":
        """From a dict such as a saved config; keys starting with "_" (diffusers' bookkeeping:
        ``_class_name``, ``_diffusers_version``, ...) are ignored, other unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"TextEncoderConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})


def register_open_clip_config(name: str, model_cfg: dict) -> None:
    """Make ``name`` known to open_clip (create_model, get_tokenizer) through its public
    ``add_model_config``, which reads JSON files; the file only needs to exist during the call."""
    import open_clip

    if open_clip.get_model_config(name) == model_cfg:
        return
    with tempfile.TemporaryDirectory(prefix="wurst-open-clip-") as folder:
        path = os.path.join(folder, f"{name}.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(model_cfg, handle)
        open_clip.add_model_config(path)


def resolve_model_cfg(config: TextEncoderConfig) -> dict:
    import open_clip

    if config.model_cfg is not None:
        register_open_clip_config(config.model_name, config.model_cfg)
        return config.model_cfg
    model_cfg = open_clip.get_model_config(config.model_name)
    if model_cfg is None:
        raise ValueError(
            f"TextEncoderConfig.model_name: open_clip has no model config {config.model_name!r} "
            f"(pass TextEncoderConfig.model_cfg for a custom tower)"
        )
    return model_cfg


def _strip_prefixes(key: str) -> str:
    # DDP-wrapped training checkpoints prefix "module."; CustomTextCLIP keeps its tower under "text.".
    for prefix in ("module.", "text."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig | None = None, weights_key: str = DEFAULT_WEIGHTS_KEY):
        super().__init__()
        import open_clip.model as open_clip_model

        self.config = config = config or TextEncoderConfig()
        model_cfg = resolve_model_cfg(config)
        text_cfg = dict(model_cfg["text_cfg"])
        if text_cfg.get("hf_model_name"):
            raise ValueError(
                f"TextEncoderConfig.model_name: {config.model_name!r} uses a Hugging Face text tower "
                f"({text_cfg['hf_model_name']}); only open_clip's own TextTransformer is supported"
            )
        if text_cfg.get("embed_cls"):
            raise ValueError(
                f"TextEncoderConfig.model_name: {config.model_name!r} appends a CLS token (CoCa); not supported"
            )
        # open_clip's own builder, so every text_cfg option (act/norm kwargs, mlp_ratio, ...) means
        # what it means in open_clip.
        tower = open_clip_model._build_text_tower(
            model_cfg["embed_dim"], text_cfg, model_cfg.get("quick_gelu", False), None
        )
        self.context_length = tower.context_length
        self.width = tower.width
        self.heads = tower.transformer.resblocks[0].attn.num_heads  # for the per-head attention mask
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        # Unused for the unpooled states; kept so open_clip checkpoints load strictly and pooled
        # features stay available for CLIP-score evaluation.
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self._tokenizer = None
        if config.weights_path is not None:
            self.load_open_clip_weights(config.weights_path, weights_key)

    def reset_non_persistent_buffers(self) -> None:
        """Rebuild buffers that are not in the state dict (after a meta-device construction)."""
        if self.attn_mask is None:  # a bidirectional tower has no mask
            return
        n = self.context_length
        self.attn_mask = torch.full((n, n), float("-inf"), device=self.token_embedding.weight.device).triu_(1)

    # ------------------------------------------------------------------ weights
    def load_open_clip_weights(self, path: str | os.PathLike, weights_key: str = DEFAULT_WEIGHTS_KEY) -> None:
        """Load the text part of an open_clip checkpoint (full CLIP or text-only) from a local file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text encoder weights not found: {path} (config key {weights_key})")
        own_keys = set(self.state_dict().keys())
        source = read_state_dict_file(path, wanted=lambda key: _strip_prefixes(key) in own_keys)
        state = {}
        for key, value in source.items():
            stripped = _strip_prefixes(key)
            if stripped in own_keys:
                state[stripped] = value
        missing = sorted(own_keys - state.keys())
        if missing:
            raise ValueError(
                f"{path} (config key {weights_key}) is not an open_clip {self.config.model_name} checkpoint: "
                f"missing {len(missing)} text keys, e.g. {missing[:5]}"
            )
        own_shapes = {key: tensor.shape for key, tensor in self.state_dict().items()}
        for key, value in state.items():
            expected = own_shapes[key]
            if value.shape != expected:
                raise ValueError(
                    f"{path} (config key {weights_key}): {key} has shape {tuple(value.shape)}, "
                    f"{self.config.model_name} expects {tuple(expected)}"
                )
        self.load_state_dict(state, strict=True)

    # ------------------------------------------------------------------ text -> embeddings
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip

            resolve_model_cfg(self.config)  # a custom name must be registered before lookup
            self._tokenizer = open_clip.get_tokenizer(self.config.model_name, context_length=self.context_length)
        return self._tokenizer

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"TextEncoder: expected a list of caption strings, got {type(captions).__name__}")
        return self.tokenizer(list(captions))

    def padding_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, context_length) bool, True for the real tokens: start-of-text through end-of-text, what a
        Hugging Face CLIP tokenizer returns as ``attention_mask``. The EOT token has the highest id of the
        CLIP vocabulary, so its position is the row's argmax (open_clip pools it the same way)."""
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        return positions[None, :] <= token_ids.argmax(dim=-1, keepdim=True)

    def attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (B * heads, L, L): the causal mask plus -inf on the keys ``attention_mask`` marks
        as padding. Every query keeps key 0 (start-of-text), so no row is fully masked."""
        batch, length = attention_mask.shape
        keys_masked = ~attention_mask.to(torch.bool)
        bias = torch.zeros(batch, 1, length, dtype=dtype, device=attention_mask.device)
        bias = bias.masked_fill(keys_masked[:, None, :], float("-inf")).expand(batch, length, length)
        if self.attn_mask is not None:
            bias = bias + self.attn_mask[:length, :length].to(dtype)
        return bias.repeat_interleave(self.heads, dim=0)

    def encode_tokens(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, context_length) -> unpooled last hidden states (B, context_length, width), with
        the pad positions masked as keys (``attention_mask``: 1 for real tokens; default ``padding_mask``)."""
        if token_ids.ndim != 2 or token_ids.shape[1] != self.context_length:
            raise ValueError(
                f"TextEncoder: expected token ids (B, {self.context_length}), got {tuple(token_ids.shape)}"
            )
        token_ids = token_ids.to(self.token_embedding.weight.device)
        if attention_mask is None:
            attention_mask = self.padding_mask(token_ids)
        elif attention_mask.shape != token_ids.shape:
            raise ValueError(f"TextEncoder: attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"token ids {tuple(token_ids.shape)}")
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(token_ids).to(cast_dtype) + self.positional_embedding.to(cast_dtype)
        bias = self.attention_bias(attention_mask.to(token_ids.device), x.dtype)
        x = self.transformer(x, attn_mask=bias)
        return self.ln_final(x)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(token_ids)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, 77, width) unpooled text states."""
        return self.encode_tokens(self.tokenize(captions))

    def empty_embedding(self, batch_size: int = 1) -> torch.Tensor:
        """Embedding of the empty caption (start + end of text, the rest padding masked as in ``encode``):
        the unconditional input for classifier-free guidance."""
        return self.encode([""]).expand(batch_size, -1, -1)

    def pooled(self, hidden_states: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """open_clip's pooled, projected text feature (EOT token = highest id) from ``encode_tokens``."""
        token_ids = token_ids.to(hidden_states.device)
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        pooled = hidden_states[rows, token_ids.argmax(dim=-1)]
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection


__all__ = [
    "TextEncoderConfig",
    "TextEncoder",
    "TINY_CLIP_NAME",
    "TINY_CLIP_CONFIG",
    "TEXT_STATES_VERSION",
    "register_open_clip_config",
]
