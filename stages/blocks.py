"""Building blocks shared by Stage B (DiffNeXt) and Stage C (the prior).

Module and parameter names deliberately mirror diffusers' Würstchen modules
(``WuerstchenLayerNorm``, ``ResBlock``, ``ResBlockStageB``, ``TimestepBlock``, ``AttnBlock`` with an
``Attention`` whose projections are ``to_q``/``to_k``/``to_v``/``to_out.0``), so that the released
weights in diffusers format load with a plain ``load_state_dict``. The implementation is our own and
is written for speed: attention goes through ``F.scaled_dot_product_attention``, normalisation and
the channel MLPs work on NHWC views (free for channels-last tensors), and nothing here breaks
``torch.compile`` (no data-dependent Python control flow, no ``.item()``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Würstchen encodes the continuous timestep r in [0, 1] as r * 10000 before the sinusoidal features.
R_EMBEDDING_MAX_POSITIONS = 10000


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (Würstchen's ``WuerstchenLayerNorm``)."""

    def normalize_to_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (NCHW) and return the result as an NHWC view.

        Blocks that continue with channel-wise Linear layers use this directly and skip the permute
        back to NCHW; for channels-last inputs the permute is free.
        """
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize_to_nhwc(x).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response normalisation on NHWC tensors; gamma and beta start at zero,
    so the block is the identity at initialisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # L2 norm over the spatial axes, accumulated in fp32 so bf16 activations do not overflow
        # or lose precision on large feature maps.
        spatial_norm = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True, dtype=torch.float32)
        relative_norm = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * relative_norm.to(x.dtype)) + self.beta + x


def _channel_mlp(c_in: int, c: int, dropout: float) -> nn.Sequential:
    # Index layout (0 Linear, 1 GELU, 2 GRN, 3 Dropout, 4 Linear) is part of the state-dict contract.
    return nn.Sequential(
        nn.Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), nn.Linear(c * 4, c)
    )


class ResBlock(nn.Module):
    """Stage C ConvNeXt block: an optional skip is concatenated *before* the depthwise conv."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = _channel_mlp(c, c, dropout)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        h = x if x_skip is None else torch.cat([x, x_skip], dim=1)
        h = self.channelwise(self.norm.normalize_to_nhwc(self.depthwise(h)))
        return x + h.permute(0, 3, 1, 2)


class ResBlockStageB(nn.Module):
    """Stage B ConvNeXt block: skip / EffNet features are concatenated *after* the norm, into the
    first channel-wise Linear (which therefore has ``c + c_skip`` inputs)."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = _channel_mlp(c + c_skip, c, dropout)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm.normalize_to_nhwc(self.depthwise(x))
        if x_skip is not None:
            h = torch.cat([h, x_skip.permute(0, 2, 3, 1).to(h.dtype)], dim=-1)
        return x + self.channelwise(h).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """FiLM-style timestep conditioning: ``x * (1 + a) + b`` with ``a, b = Linear(r_embed)``."""

    def __init__(self, c: int, c_timestep: int):
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


# Where an attention block's dropout acts: "weights", on the attention probabilities (the authors' training,
# nn.MultiheadAttention(dropout=p)); "output", after the output projection (diffusers' Attention). The two
# differ only in training: in eval mode neither drops anything.
ATTENTION_DROPOUT_ON = ("weights", "output")


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections, named like diffusers' ``Attention``
    (``to_q``, ``to_k``, ``to_v``, ``to_out.0``; ``to_out.1`` is the output dropout, an identity when the
    dropout acts on the attention weights). Neither placement has parameters: the state dict is the same."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0, dropout_on: str = "weights"):
        super().__init__()
        if nhead <= 0 or c % nhead != 0:
            raise ValueError(f"attention width {c} must be divisible by a positive head count, got nhead={nhead}")
        if dropout_on not in ATTENTION_DROPOUT_ON:
            raise ValueError(f"attention dropout_on must be one of {list(ATTENTION_DROPOUT_ON)}, got {dropout_on!r}")
        self.nhead = nhead
        self.weights_dropout = float(dropout) if dropout_on == "weights" else 0.0
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        output_dropout = nn.Dropout(dropout) if dropout_on == "output" else nn.Identity()
        self.to_out = nn.ModuleList([nn.Linear(c, c), output_dropout])

    def forward(self, tokens: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``tokens``: (B, N, c) queries; ``kv``: (B, M, c) keys/values. Returns (B, N, c)."""
        batch, n_query, width = tokens.shape
        head_dim = width // self.nhead

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.nhead, head_dim)).transpose(1, 2)

        q, k, v = split_heads(self.to_q(tokens)), split_heads(self.to_k(kv)), split_heads(self.to_v(kv))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.weights_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, n_query, width)
        return self.to_out[1](self.to_out[0](out))


class AttnBlock(nn.Module):
    """Pre-norm attention over the feature map. Conditioning tokens pass through SiLU + Linear
    (``kv_mapper``); with ``self_attn`` the map's own tokens are prepended to the keys/values."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0,
                 dropout_on: str = "weights"):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(c, nhead, dropout=dropout, dropout_on=dropout_on)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        kv = self.kv_mapper(cond)
        tokens = self.norm.normalize_to_nhwc(x).reshape(batch, height * width, channels)
        if self.self_attn:
            kv = torch.cat([tokens.to(kv.dtype), kv], dim=1)
        out = self.attention(tokens, kv)
        return x + out.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def sinusoidal_r_embedding(r: torch.Tensor, c_r: int, max_positions: int = R_EMBEDDING_MAX_POSITIONS) -> torch.Tensor:
    """Sinusoidal features of the continuous timestep ``r`` (shape (B,), values in [0, 1]).

    Computed in fp32 whatever the input dtype: ``r * 10000`` in bf16 would collapse neighbouring
    timesteps. Returns (B, c_r) float32; odd ``c_r`` is zero-padded.
    """
    if c_r < 4:
        raise ValueError(f"c_r (timestep embedding width) must be >= 4, got {c_r}")
    r = r.float() * max_positions
    half_dim = c_r // 2
    log_step = math.log(max_positions) / (half_dim - 1)
    freqs = torch.arange(half_dim, device=r.device, dtype=torch.float32).mul(-log_step).exp()
    args = r[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1), mode="constant")
    return emb
