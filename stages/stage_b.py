"""Stage B: the DiffNeXt U-Net that turns the semantic latent + text into a Stage A latent.

Architecture of the released Würstchen v2 decoder (diffusers ``WuerstchenDiffNeXt``): PixelUnshuffle
patch embedding, a 4-level U-Net of ConvNeXt ResBlocks / TimestepBlocks / cross+self AttnBlocks, the
EfficientNet semantic latent bicubic-resized to every level and injected into each ResBlock of the
levels named in ``inject_effnet``, and a PixelShuffle head emitting (A, B) with the objective
``eps = (x_t - A) / B``, ``B = sigmoid(b) * (1 - 2e-3) + 1e-3``.

State-dict keys equal diffusers' (``clip_mapper``, ``effnet_mappers.{i}``, ``embedding.1``,
``down_blocks.{level}.{i}.*``, ``up_blocks.{level}.{i}.*``, ``clf.1``) and config field names equal
diffusers' config.json keys, so the released weights load with ``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.blocks import (
    ATTENTION_DROPOUT_ON,
    AttnBlock,
    GlobalResponseNorm,
    LayerNorm2d,
    ResBlockStageB,
    TimestepBlock,
    sinusoidal_r_embedding,
)
from stages.diffusion import PREDICTIONS, eps_from_v
from stages.stage_c import _check_choice, _config_from_dict

_BLOCK_TYPES = "CTA"  # C: ConvNeXt ResBlock, T: TimestepBlock, A: attention block


@dataclass
class StageBConfig:
    """Hyper-parameters of Stage B; names are diffusers' ``WuerstchenDiffNeXt`` config keys.
    Per-level lists run from the highest resolution (level 0) to the lowest."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    nhead: list[int] = field(default_factory=lambda: [-1, 10, 20, 20])
    blocks: list[int] = field(default_factory=lambda: [4, 4, 14, 4])
    level_config: list[str] = field(default_factory=lambda: ["CT", "CTA", "CTA", "CTA"])
    inject_effnet: list[bool] = field(default_factory=lambda: [False, True, True, True])
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3
    dropout: float | list[float] = 0.1
    # Where the attention blocks' dropout acts (not a diffusers key; see StageCConfig): "weights" (the
    # authors' training) or "output" (diffusers' modules).
    attention_dropout_on: str = "weights"
    # What the head's first half predicts (not a diffusers key). "eps": the released model's
    # eps = (x_t - A) / B. "v": A is v = sqrt(ab) eps - sqrt(1 - ab) x0, and forward still returns eps,
    # so samplers and guidance are unchanged; its loss is the v MSE (stages.diffusion). Under eps, the x0
    # error at t -> 1, where a small latent's layout is decided, weighs ~alpha_bar (1e-4): a short run
    # never learns it (BENCHMARKS.md, "demo prompt adherence"). diffusers' pipelines know only "eps".
    prediction: str = "eps"

    PRESET_NAMES: ClassVar[tuple[str, ...]] = ("tiny", "paper")

    def __post_init__(self) -> None:
        # Normalise tuples (e.g. from YAML/JSON round trips) to lists so configs compare equal.
        for name in ("c_hidden", "nhead", "blocks", "level_config", "inject_effnet"):
            setattr(self, name, list(getattr(self, name)))
        if isinstance(self.dropout, tuple):
            self.dropout = list(self.dropout)
        for name in ("c_in", "c_out", "c_r", "patch_size", "c_cond", "effnet_embd", "clip_embd", "kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"StageBConfig.{name} must be a positive int, got {value!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"StageBConfig.kernel_size must be odd to keep the map size, got {self.kernel_size}")
        if self.c_r < 4:
            raise ValueError(f"StageBConfig.c_r must be >= 4, got {self.c_r}")
        levels = len(self.c_hidden)
        if levels == 0:
            raise ValueError("StageBConfig.c_hidden must list at least one level")
        for name in ("nhead", "blocks", "level_config", "inject_effnet"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"StageBConfig.{name} has {len(getattr(self, name))} entries but c_hidden has {levels} levels"
                )
        if isinstance(self.dropout, list) and len(self.dropout) != levels:
            raise ValueError(f"StageBConfig.dropout list has {len(self.dropout)} entries, expected {levels}")
        _check_choice(self, "prediction", PREDICTIONS)
        _check_choice(self, "attention_dropout_on", ATTENTION_DROPOUT_ON)
        for level, (width, heads, n_blocks, kinds) in enumerate(
            zip(self.c_hidden, self.nhead, self.blocks, self.level_config)
        ):
            if width <= 0 or n_blocks <= 0:
                raise ValueError(f"StageBConfig level {level}: c_hidden and blocks must be positive")
            if not kinds or any(kind not in _BLOCK_TYPES for kind in kinds):
                raise ValueError(
                    f"StageBConfig.level_config[{level}]={kinds!r}: use a non-empty string of "
                    f"{list(_BLOCK_TYPES)} (ResBlock, TimestepBlock, AttnBlock)"
                )
            if "A" in kinds and (heads <= 0 or width % heads != 0):
                raise ValueError(
                    f"StageBConfig level {level}: c_hidden={width} must be divisible by a positive nhead, got {heads}"
                )

    @property
    def levels(self) -> int:
        return len(self.c_hidden)

    @property
    def latent_multiple(self) -> int:
        """Stage B latent height and width must be multiples of this (patch + down-samplings)."""
        return self.patch_size * 2 ** (self.levels - 1)

    def dropout_per_level(self) -> list[float]:
        return list(self.dropout) if isinstance(self.dropout, list) else [float(self.dropout)] * self.levels

    @classmethod
    def tiny(cls) -> StageBConfig:
        """Two-level DiffNeXt for tests and the CPU demo (4x32x32 latents, 32-wide text)."""
        return cls(
            c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=32, c_hidden=[16, 32], nhead=[-1, 2], blocks=[1, 1],
            level_config=["CT", "CTA"], inject_effnet=[False, True], effnet_embd=16, clip_embd=32,
            kernel_size=3, dropout=0.1,
        )  # fmt: skip

    @classmethod
    def paper(cls) -> StageBConfig:
        """The released v2 decoder: 1,055,365,280 parameters, CLIP-H text (77 x 1024)."""
        return cls()

    @classmethod
    def preset(cls, name: str) -> StageBConfig:
        if name == "tiny":
            return cls.tiny()
        if name == "paper":
            return cls.paper()
        raise ValueError(f"unknown Stage B preset {name!r}; choose one of {list(cls.PRESET_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageBConfig:
        return _config_from_dict(cls, data, "Stage B")


class StageB(nn.Module):
    """Würstchen Stage B. ``forward(x, r, effnet, text)`` returns the predicted noise for ``x``."""

    def __init__(self, config: StageBConfig | None = None, *, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config = config or StageBConfig.paper()
        self.gradient_checkpointing = gradient_checkpointing
        c_hidden, levels = config.c_hidden, config.levels
        dropout = config.dropout_per_level()

        # Conditioning. One EffNet mapper per down level and per up level (None where not injected),
        # indexed down levels first, then up levels from the lowest resolution upwards.
        self.clip_mapper = nn.Linear(config.clip_embd, config.c_cond)
        self.effnet_mappers = nn.ModuleList(
            [
                nn.Conv2d(config.effnet_embd, config.c_cond, kernel_size=1) if inject else None
                for inject in config.inject_effnet + list(reversed(config.inject_effnet))
            ]
        )
        self.seq_norm = nn.LayerNorm(config.c_cond, elementwise_affine=False, eps=1e-6)

        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(config.patch_size),
            nn.Conv2d(config.c_in * config.patch_size**2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
        )

        def make_block(kind: str, level: int, c_skip: int) -> nn.Module:
            if kind == "C":
                return ResBlockStageB(c_hidden[level], c_skip, kernel_size=config.kernel_size, dropout=dropout[level])
            if kind == "A":
                return AttnBlock(
                    c_hidden[level], config.c_cond, config.nhead[level], self_attn=True, dropout=dropout[level],
                    dropout_on=config.attention_dropout_on,
                )
            return TimestepBlock(c_hidden[level], config.c_r)

        self.down_blocks = nn.ModuleList()
        for level in range(levels):
            down_block = nn.ModuleList()
            if level > 0:
                down_block.append(
                    nn.Sequential(
                        LayerNorm2d(c_hidden[level - 1], elementwise_affine=False, eps=1e-6),
                        nn.Conv2d(c_hidden[level - 1], c_hidden[level], kernel_size=2, stride=2),
                    )
                )
            effnet_channels = config.c_cond if config.inject_effnet[level] else 0
            for _ in range(config.blocks[level]):
                for kind in config.level_config[level]:
                    down_block.append(make_block(kind, level, effnet_channels))
            self.down_blocks.append(down_block)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            up_block = nn.ModuleList()
            effnet_channels = config.c_cond if config.inject_effnet[level] else 0
            for repeat in range(config.blocks[level]):
                for position, kind in enumerate(config.level_config[level]):
                    # The first block of every level but the lowest also receives the U-Net skip.
                    is_skip_target = level < levels - 1 and repeat == 0 and position == 0
                    c_skip = (c_hidden[level] if is_skip_target else 0) + effnet_channels
                    up_block.append(make_block(kind, level, c_skip))
            if level > 0:
                up_block.append(
                    nn.Sequential(
                        LayerNorm2d(c_hidden[level], elementwise_affine=False, eps=1e-6),
                        nn.ConvTranspose2d(c_hidden[level], c_hidden[level - 1], kernel_size=2, stride=2),
                    )
                )
            self.up_blocks.append(up_block)

        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c_hidden[0], 2 * config.c_out * config.patch_size**2, kernel_size=1),
            nn.PixelShuffle(config.patch_size),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation of the official training code (dome272/Wuerstchen ``DiffNeXt``)."""
        for module in self.modules():
            # ConvTranspose2d up-samplers keep PyTorch's default init, as in the official code.
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GlobalResponseNorm):
                nn.init.zeros_(module.gamma)
                nn.init.zeros_(module.beta)
        for mapper in self.effnet_mappers:
            if mapper is not None:
                nn.init.normal_(mapper.weight, std=0.02)
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
        nn.init.zeros_(self.clf[1].weight)
        residual_scale = math.sqrt(1.0 / sum(self.config.blocks))
        for level_blocks in list(self.down_blocks) + list(self.up_blocks):
            for block in level_blocks:
                if isinstance(block, ResBlockStageB):
                    block.channelwise[-1].weight.mul_(residual_scale)
                elif isinstance(block, TimestepBlock):
                    nn.init.zeros_(block.mapper.weight)

    def _check_inputs(
        self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor | None, text: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(
                f"StageB: x must be a 4-D latent (batch, {cfg.c_in}, height, width), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != cfg.c_in:
            raise ValueError(
                f"StageB: expected {cfg.c_in} latent channels (config c_in), got {x.shape[1]} "
                f"in x of shape {tuple(x.shape)}"
            )
        multiple = cfg.latent_multiple
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(
                f"StageB: latent height and width must be multiples of {multiple} (patch_size {cfg.patch_size} "
                f"x 2^{cfg.levels - 1} down-samplings), got {x.shape[2]}x{x.shape[3]}"
            )
        batch = x.shape[0]
        if not torch.is_tensor(r):
            r = torch.tensor(float(r), device=x.device)
        r = r.to(x.device)
        if r.ndim == 0:
            r = r.expand(batch)
        if r.ndim != 1 or r.shape[0] != batch:
            raise ValueError(f"StageB: r must have shape ({batch},) to match x's batch, got {tuple(r.shape)}")
        if any(cfg.inject_effnet):
            if effnet is None or effnet.ndim != 4:
                got = None if effnet is None else tuple(effnet.shape)
                raise ValueError(
                    f"StageB: effnet must be a 4-D semantic latent (batch, {cfg.effnet_embd}, h, w), got {got}"
                )
            if effnet.shape[1] != cfg.effnet_embd:
                raise ValueError(
                    f"StageB: expected {cfg.effnet_embd} effnet channels (config effnet_embd), "
                    f"got {effnet.shape[1]} in effnet of shape {tuple(effnet.shape)}"
                )
            if effnet.shape[0] != batch:
                raise ValueError(f"StageB: batch mismatch: x has {batch} samples but effnet has {effnet.shape[0]}")
        if text.ndim != 3:
            raise ValueError(
                f"StageB: text must be (batch, tokens, {cfg.clip_embd}) embeddings, got shape {tuple(text.shape)}"
            )
        if text.shape[-1] != cfg.clip_embd:
            raise ValueError(
                f"StageB: text embedding width {text.shape[-1]} does not match config clip_embd={cfg.clip_embd}"
            )
        if text.shape[0] != batch:
            raise ValueError(f"StageB: batch mismatch: x has {batch} samples but text has {text.shape[0]}")
        return r

    def _effnet_features(self, mapper: nn.Module, effnet: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # Bicubic resize in fp32 (antialiased when shrinking), as the released model was trained.
        resized = F.interpolate(
            effnet.float(), size=like.shape[-2:], mode="bicubic", antialias=True, align_corners=True
        )
        return mapper(resized.to(like.dtype))

    def _run(self, block: nn.Module, h: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, extra, use_reentrant=False)
        return block(h, extra)

    def _down_encode(
        self, h: torch.Tensor, r_embed: torch.Tensor, effnet: torch.Tensor | None, clip: torch.Tensor
    ) -> list[torch.Tensor]:
        level_outputs = []
        for level, down_block in enumerate(self.down_blocks):
            mapper = self.effnet_mappers[level]
            effnet_c = None
            for block in down_block:
                if isinstance(block, ResBlockStageB):
                    if mapper is not None and effnet_c is None:
                        effnet_c = self._effnet_features(mapper, effnet, h)
                    h = self._run(block, h, effnet_c)
                elif isinstance(block, AttnBlock):
                    h = self._run(block, h, clip)
                elif isinstance(block, TimestepBlock):
                    h = self._run(block, h, r_embed)
                else:  # down-sampler
                    h = block(h)
            level_outputs.insert(0, h)
        return level_outputs

    def _up_decode(
        self, level_outputs: list[torch.Tensor], r_embed: torch.Tensor, effnet: torch.Tensor | None, clip: torch.Tensor
    ) -> torch.Tensor:
        h = level_outputs[0]
        for up_level, up_block in enumerate(self.up_blocks):
            mapper = self.effnet_mappers[len(self.down_blocks) + up_level]
            effnet_c = None
            for position, block in enumerate(up_block):
                if isinstance(block, ResBlockStageB):
                    if mapper is not None and effnet_c is None:
                        effnet_c = self._effnet_features(mapper, effnet, h)
                    skip = level_outputs[up_level] if position == 0 and up_level > 0 else None
                    if effnet_c is not None:
                        skip = effnet_c if skip is None else torch.cat([skip, effnet_c.to(skip.dtype)], dim=1)
                    h = self._run(block, h, skip)
                elif isinstance(block, AttnBlock):
                    h = self._run(block, h, clip)
                elif isinstance(block, TimestepBlock):
                    h = self._run(block, h, r_embed)
                else:  # up-sampler
                    h = block(h)
        return h

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        effnet: torch.Tensor | None,
        text: torch.Tensor,
        *,
        return_noise: bool = True,
        eps: float = 1e-3,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the noise in Stage A latents ``x`` (B, c_in, H, W) at timesteps ``r`` (B,) in [0, 1],
        conditioned on the semantic latent ``effnet`` (B, effnet_embd, h, w; raw Semantic
        Compressor output, zeros for the unconditional branch) and text (B, tokens, clip_embd).

        With ``return_noise=False`` the head outputs ``(A, B)`` are returned (B already squashed).
        """
        r = self._check_inputs(x, r, effnet, text)
        x_in = x
        h = self.embedding(x)
        # Cast conditioning to the activation dtype so bf16 weights work without autocast too.
        clip = self.seq_norm(self.clip_mapper(text.to(h.dtype)))
        r_embed = sinusoidal_r_embedding(r, self.config.c_r).to(h.dtype)
        level_outputs = self._down_encode(h, r_embed, effnet, clip)
        h = self._up_decode(level_outputs, r_embed, effnet, clip)
        a, b = self.clf(h).chunk(2, dim=1)
        b = b.float().sigmoid() * (1 - 2 * eps) + eps
        if not return_noise:
            return a, b
        if self.config.prediction == "v":
            return eps_from_v(x_in, a, r)
        return (x_in.float() - a.float()) / b


# ---------------------------------------------------------------------------------------------
# Stage B trained together with its Semantic Compressor (the paper fine-tunes the compressor)

COMPRESSOR_BATCHNORM = ("frozen", "train")


@dataclass
class StageBWithCompressorConfig:
    """Stage B and the Semantic Compressor it fine-tunes. ``batchnorm``: "frozen" keeps every BatchNorm
    of the compressor in eval mode with its affine fixed (the running statistics the later semantic
    precompute applies are the ones Stage B trained against, whatever the per-rank batch, and the mapper's
    BatchNorm keeps the latent's scale that Stage C's (x + 1) / 42 assumes); "train" uses batch statistics
    and updates the running ones, as a plain ``train()`` module does."""

    stage_b: StageBConfig
    compressor: Any  # stages.semantic.SemanticCompressorConfig
    batchnorm: str = "frozen"

    def __post_init__(self) -> None:
        _check_choice(self, "batchnorm", COMPRESSOR_BATCHNORM)
        if self.compressor.c_latent != self.stage_b.effnet_embd:
            raise ValueError(f"the Semantic Compressor writes {self.compressor.c_latent} channels, Stage B's "
                             f"effnet_embd is {self.stage_b.effnet_embd}")

    @property
    def prediction(self) -> str:
        return self.stage_b.prediction


class StageBWithCompressor(nn.Module):
    """``forward(x, r, effnet, text)`` is Stage B's; ``forward(images=...)`` (in [0, 1], (B, 3, h, w) at the
    compressor's input size) is the compressor's raw latent. One module, so one engine trains both and the
    conditioning augmentation can sit between them (`stages.diffusion.stage_b_loss`)."""

    def __init__(self, config: StageBWithCompressorConfig, *, gradient_checkpointing: bool = False):
        super().__init__()
        from stages.semantic import SemanticCompressor

        self.config = config
        self.stage_b = StageB(config.stage_b, gradient_checkpointing=gradient_checkpointing)
        self.compressor = SemanticCompressor(config.compressor)
        self._apply_batchnorm_policy()

    @classmethod
    def from_modules(cls, stage_b: StageB, compressor: nn.Module, batchnorm: str = "frozen") -> "StageBWithCompressor":
        """Around existing (e.g. loaded) modules, without initialising new weights."""
        config = StageBWithCompressorConfig(stage_b.config, compressor.config, batchnorm)
        with torch.device("meta"):
            model = cls(config)
        model.stage_b, model.compressor = stage_b, compressor
        model._apply_batchnorm_policy()
        return model.train(stage_b.training)

    def _apply_batchnorm_policy(self) -> None:
        if self.config.batchnorm == "frozen":
            for module in self._batchnorms():
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)

    def _batchnorms(self):
        return [m for m in self.compressor.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> "StageBWithCompressor":
        super().train(mode)
        if self.config.batchnorm == "frozen":
            for module in self._batchnorms():
                module.eval()
        return self

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(Stage B's trainable parameters, the compressor's): the optimizer gives each its own lr."""
        return ([p for p in self.stage_b.parameters() if p.requires_grad],
                [p for p in self.compressor.parameters() if p.requires_grad])

    def forward(self, x: torch.Tensor | None = None, r: torch.Tensor | None = None,
                effnet: torch.Tensor | None = None, text: torch.Tensor | None = None, *,
                images: torch.Tensor | None = None, **kwargs):
        if images is not None:
            return self.compressor.encode(images, size=(int(images.shape[-2]), int(images.shape[-1])))
        return self.stage_b(x, r, effnet, text, **kwargs)
