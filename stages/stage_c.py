"""Stage C: the text-conditional prior that generates the 16-channel semantic latent.

Architecture of the released Würstchen v2 prior (diffusers ``WuerstchenPrior``): a 1x1 input
projection, a text mapper, ``depth`` x [ResBlock, TimestepBlock, AttnBlock(self-attention)] at a
constant resolution, and a LayerNorm + 1x1 conv head that emits (A, B). The model predicts noise via
the paper's A/B objective ``eps = (x_t - A) / (|1 - B| + 1e-5)``; with the zero-initialised head it
starts out returning its input, which is what made training stable.

State-dict keys equal diffusers' (``projection``, ``cond_mapper.{0,2}``, ``blocks.{i}.*``, ``out.1``) so
released weights load with ``load_state_dict``; config field names equal diffusers' config.json keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.diffusion import PREDICTIONS, eps_from_v

from stages.blocks import (
    ATTENTION_DROPOUT_ON,
    AttnBlock,
    GlobalResponseNorm,
    LayerNorm2d,
    ResBlock,
    TimestepBlock,
    sinusoidal_r_embedding,
)

# Width of the unpooled last hidden states of the supported text encoders (77 tokens each).
TEXT_ENCODER_WIDTHS: dict[str, int] = {"clip-h": 1024, "clip-bigg": 1280}
_TEXT_ENCODER_ALIASES = {"vit-h-14": "clip-h", "vit-bigg-14": "clip-bigg", "clip-g": "clip-bigg"}

# Stage C blocks come in groups of three: ResBlock, TimestepBlock, AttnBlock.
_BLOCKS_PER_LAYER = 3
# The paper prior's text width (CLIP-H) and model width: "paper_gain" init keeps their mapper gains.
_PAPER_TEXT_WIDTH, _PAPER_WIDTH = 1024, 1536


def _check_choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
    """A config field that takes one of `choices`: a ValueError naming the class and the field otherwise."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} must be one of {list(choices)}, got {value!r}")


def _config_from_dict(cls, data: dict[str, Any], what: str):
    """Build a config dataclass from a dict (e.g. a diffusers config.json), ignoring diffusers'
    bookkeeping keys (``_class_name``, ``_diffusers_version``, ...) and rejecting unknown ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{what} config has unknown key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class StageCConfig:
    """Hyper-parameters of Stage C; names are diffusers' ``WuerstchenPrior`` config keys."""

    c_in: int = 16
    c: int = 1536
    c_cond: int = 1024
    c_r: int = 64
    depth: int = 32
    nhead: int = 24
    dropout: float = 0.1
    # Init of the text mapper (not a diffusers key; weights load the same either way). "official": std 0.02
    # at any width, as the authors' code, a gain of ~0.64 and ~0.78 per layer at the paper's 1024 -> 1536
    # but ~0.11 and ~0.16 at the demo's 32 -> 64, so a narrow prior starts with its text ~50x weaker and
    # learns to follow it far later. "paper_gain": the paper model's per-layer gain at any width (the
    # same std as "official" at c_cond 1024, c 1536).
    cond_init: str = "official"
    # Where the attention blocks' dropout acts (not a diffusers key): "weights", on the attention probabilities
    # as the authors trained (nn.MultiheadAttention(dropout=0.1)); "output", after the output projection as
    # diffusers' modules do. Only training differs.
    attention_dropout_on: str = "weights"
    # What the head's A predicts (not a diffusers key): "eps", the released prior's eps = (x_t - A) / |1 - B|,
    # or "v", as StageBConfig.prediction (forward still returns eps; trained on the v MSE).
    prediction: str = "eps"

    PRESET_NAMES: ClassVar[tuple[str, ...]] = ("tiny", "paper", "paper-clip-h", "paper-clip-bigg")
    COND_INITS: ClassVar[tuple[str, ...]] = ("official", "paper_gain")

    def __post_init__(self) -> None:
        for name in ("c_in", "c", "c_cond", "c_r", "depth", "nhead"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"StageCConfig.{name} must be a positive int, got {value!r}")
        if self.c % self.nhead != 0:
            raise ValueError(f"StageCConfig.c={self.c} must be divisible by nhead={self.nhead}")
        if self.c_r < 4:
            raise ValueError(f"StageCConfig.c_r must be >= 4, got {self.c_r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"StageCConfig.dropout must be in [0, 1), got {self.dropout!r}")
        _check_choice(self, "cond_init", self.COND_INITS)
        _check_choice(self, "prediction", PREDICTIONS)
        _check_choice(self, "attention_dropout_on", ATTENTION_DROPOUT_ON)

    @classmethod
    def tiny(cls) -> StageCConfig:
        """A few-thousand-parameter prior for tests and the CPU demo (8x8 latents, 32-wide text)."""
        return cls(c_in=16, c=32, c_cond=32, c_r=64, depth=2, nhead=2, dropout=0.1)

    @classmethod
    def paper(cls, text_encoder: str = "clip-h") -> StageCConfig:
        """The released v2 prior (c=1536, depth 32, 24 heads): 993,243,680 parameters with CLIP-H
        text (c_cond 1024, what the paper describes) or 993,636,896 with CLIP-bigG (c_cond 1280,
        the released ``warp-ai/wuerstchen-prior`` weights)."""
        key = _TEXT_ENCODER_ALIASES.get(text_encoder.lower(), text_encoder.lower())
        if key not in TEXT_ENCODER_WIDTHS:
            raise ValueError(
                f"unknown text encoder {text_encoder!r} for the paper Stage C; "
                f"choose one of {sorted(TEXT_ENCODER_WIDTHS)} (or open_clip names ViT-H-14 / ViT-bigG-14)"
            )
        return cls(c_in=16, c=1536, c_cond=TEXT_ENCODER_WIDTHS[key], c_r=64, depth=32, nhead=24, dropout=0.1)

    @classmethod
    def preset(cls, name: str) -> StageCConfig:
        if name == "tiny":
            return cls.tiny()
        if name in ("paper", "paper-clip-h"):
            return cls.paper("clip-h")
        if name == "paper-clip-bigg":
            return cls.paper("clip-bigg")
        raise ValueError(f"unknown Stage C preset {name!r}; choose one of {list(cls.PRESET_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageCConfig:
        return _config_from_dict(cls, data, "Stage C")


class StageC(nn.Module):
    """Würstchen Stage C. ``forward(x, r, text)`` returns the predicted noise for latents ``x``."""

    def __init__(self, config: StageCConfig | None = None, *, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config = config or StageCConfig.paper()
        self.gradient_checkpointing = gradient_checkpointing
        c = config.c

        self.projection = nn.Conv2d(config.c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(config.c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        self.blocks = nn.ModuleList()
        for _ in range(config.depth):
            self.blocks.append(ResBlock(c, dropout=config.dropout))
            self.blocks.append(TimestepBlock(c, config.c_r))
            # The text tokens were already mapped to width c by cond_mapper, hence c_cond=c here.
            self.blocks.append(AttnBlock(c, c, config.nhead, self_attn=True, dropout=config.dropout,
                                         dropout_on=config.attention_dropout_on))
        self.out = nn.Sequential(
            LayerNorm2d(c, elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c, config.c_in * 2, kernel_size=1),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation of the official training code (dome272/Wuerstchen ``Prior``)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.projection.weight, std=0.02)
        first, second = 0.02, 0.02
        if self.config.cond_init == "paper_gain":
            first *= math.sqrt(_PAPER_TEXT_WIDTH / self.config.c_cond)
            second *= math.sqrt(_PAPER_WIDTH / self.config.c)
        nn.init.normal_(self.cond_mapper[0].weight, std=first)
        nn.init.normal_(self.cond_mapper[2].weight, std=second)
        # Zero head: A = B = 0, so the initial noise prediction is the input itself.
        nn.init.zeros_(self.out[1].weight)
        residual_scale = math.sqrt(1.0 / self.config.depth)
        for block in self.blocks:
            if isinstance(block, ResBlock):
                block.channelwise[-1].weight.mul_(residual_scale)
            elif isinstance(block, TimestepBlock):
                nn.init.zeros_(block.mapper.weight)
        for module in self.modules():
            if isinstance(module, GlobalResponseNorm):
                nn.init.zeros_(module.gamma)
                nn.init.zeros_(module.beta)

    def _check_inputs(self, x: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(
                f"StageC: x must be a 4-D latent (batch, {cfg.c_in}, height, width), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != cfg.c_in:
            raise ValueError(
                f"StageC: expected {cfg.c_in} latent channels (config c_in), got {x.shape[1]} "
                f"in x of shape {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if not torch.is_tensor(r):
            r = torch.tensor(float(r), device=x.device)
        r = r.to(x.device)
        if r.ndim == 0:
            r = r.expand(batch)
        if r.ndim != 1 or r.shape[0] != batch:
            raise ValueError(f"StageC: r must have shape ({batch},) to match x's batch, got {tuple(r.shape)}")
        if text.ndim != 3:
            raise ValueError(
                f"StageC: text must be (batch, tokens, {cfg.c_cond}) embeddings, got shape {tuple(text.shape)}"
            )
        if text.shape[-1] != cfg.c_cond:
            raise ValueError(
                f"StageC: text embedding width {text.shape[-1]} does not match config c_cond={cfg.c_cond} "
                f"(CLIP-H gives 1024, CLIP-bigG 1280)"
            )
        if text.shape[0] != batch:
            raise ValueError(f"StageC: batch mismatch: x has {batch} samples but text has {text.shape[0]}")
        return r

    def _layer(self, index: int, x: torch.Tensor, r_embed: torch.Tensor, c_embed: torch.Tensor) -> torch.Tensor:
        res_block, timestep_block, attn_block = self.blocks[index], self.blocks[index + 1], self.blocks[index + 2]
        return attn_block(timestep_block(res_block(x), r_embed), c_embed)

    def forward(
        self, x: torch.Tensor, r: torch.Tensor, text: torch.Tensor, *, return_noise: bool = True
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the noise in ``x`` (B, c_in, H, W) at continuous timesteps ``r`` (B,) in [0, 1],
        conditioned on text embeddings (B, tokens, c_cond).

        With ``return_noise=False`` the raw head outputs ``(A, B)`` are returned instead.
        """
        r = self._check_inputs(x, r, text)
        x_in = x
        h = self.projection(x)
        # Cast conditioning to the activation dtype so bf16 weights work without autocast too.
        c_embed = self.cond_mapper(text.to(h.dtype))
        r_embed = sinusoidal_r_embedding(r, self.config.c_r).to(h.dtype)
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        for index in range(0, len(self.blocks), _BLOCKS_PER_LAYER):
            if use_checkpoint:
                h = checkpoint(self._layer, index, h, r_embed, c_embed, use_reentrant=False)
            else:
                h = self._layer(index, h, r_embed, c_embed)
        a, b = self.out(h).chunk(2, dim=1)
        if not return_noise:
            return a, b
        if self.config.prediction == "v":
            return eps_from_v(x_in, a, r)
        # fp32 so that |1 - B| + 1e-5 is not rounded away under bf16 autocast.
        return (x_in.float() - a.float()) / ((1 - b.float()).abs() + 1e-5)
