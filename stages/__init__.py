"""Würstchen stages in pure PyTorch: Stage A (VQGAN), Stage B (DiffNeXt), Stage C (prior), the
Semantic Compressor, the text encoder, the diffusion maths and sampling.

``stages.save(module, dir)`` / ``stages.load(dir, expected_kind=...)`` read and write checkpoints
(safetensors + config.json). Model classes are imported lazily (``stages.StageA`` etc.) so that
``import stages`` stays cheap and does not pull in timm / open_clip until they are used.
"""

from __future__ import annotations

import importlib

from stages.checkpoint import CheckpointError, load, read_config, save, save_config

_LAZY = {
    "StageA": "stages.stage_a",
    "StageAConfig": "stages.stage_a",
    "StageB": "stages.stage_b",
    "StageBConfig": "stages.stage_b",
    "StageC": "stages.stage_c",
    "StageCConfig": "stages.stage_c",
    "SemanticCompressor": "stages.semantic",
    "SemanticCompressorConfig": "stages.semantic",
    "to_stage_c": "stages.semantic",
    "from_stage_c": "stages.semantic",
    "TextEncoder": "stages.text",
    "TextEncoderConfig": "stages.text",
}

__all__ = ["save", "load", "save_config", "read_config", "CheckpointError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stages' has no attribute {name!r}")
