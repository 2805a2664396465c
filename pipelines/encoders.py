"""`python -m pipelines.encoders`: prepare the frozen encoders as stages checkpoints.

Precompute and generation load the text encoder (open_clip CLIP-H / bigG) and the Semantic
Compressor from stages checkpoint directories. This phase builds them from local weight files named
in the config (never a hub download) and writes `<data_root>/encoders/<version>/{text,semantic}/`
plus a manifest with the source files' hashes. With `random_weights: true` it writes seeded random
weights instead: that is what tests and the demo use (nothing can be downloaded there), and the
manifest says so in `weights: random`, never silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from typing import Literal, Optional

from pipelines import config as config_lib
from pipelines import manifest as manifest_lib
from pipelines import storage, tracking
from pipelines.config import ConfigError, param
from pipelines.runtime import default_data_root

PHASE = "encoders"


@dataclasses.dataclass
class EncodersConfig:
    output: Optional[str] = None  # default: <data_root>/encoders
    data_root: str = dataclasses.field(default_factory=default_data_root)
    text_preset: Literal["clip-h", "clip-bigg", "tiny"] = "clip-h"
    # Local open_clip weights (.safetensors / .bin / .pt) for the text tower; required unless random.
    text_weights: Optional[str] = None
    semantic_preset: Literal["paper", "tiny"] = "paper"
    # Local Semantic Compressor weights (e.g. converted from the released Würstchen EffNet encoder).
    semantic_weights: Optional[str] = None
    # Explicit opt-in to seeded random weights (tests, the demo); never a silent fallback.
    random_weights: bool = False
    seed: int = param(0, ge=0)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
        if not self.random_weights:
            if not self.text_weights:
                raise ConfigError("text_weights: required (a local open_clip weights file), "
                                  "or set random_weights: true for tests")
            if not self.semantic_weights:
                raise ConfigError("semantic_weights: required (a local Semantic Compressor weights file), "
                                  "or set random_weights: true for tests")
        for key in ("text_weights", "semantic_weights"):
            path = getattr(self, key)
            if path and not self.random_weights and not os.path.isfile(path):
                raise ConfigError(f"{key}: weights file not found: {path}")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_identity(cfg: EncodersConfig) -> str:
    if cfg.random_weights:
        return f"random:{cfg.seed}"
    return "files:" + ",".join(_file_sha256(p) for p in (cfg.text_weights, cfg.semantic_weights))


def output_dir(cfg: EncodersConfig) -> str:
    root = cfg.output or storage.join(cfg.data_root, "encoders")
    version = manifest_lib.version_id(PHASE, cfg, source_identity(cfg),
                                      exclude=("output", "data_root", "mlflow", "text_weights", "semantic_weights"))
    return storage.join(root, version)


def build(cfg: EncodersConfig, out: str) -> dict:
    import torch

    import stages
    from stages.checkpoint import read_state_dict_file
    from stages.semantic import SemanticCompressor, SemanticCompressorConfig
    from stages.text import TextEncoder, TextEncoderConfig

    torch.manual_seed(cfg.seed)
    text = TextEncoder(TextEncoderConfig.preset(cfg.text_preset))
    if not cfg.random_weights:
        text.load_open_clip_weights(cfg.text_weights, weights_key="text_weights")
    semantic = SemanticCompressor(SemanticCompressorConfig.preset(cfg.semantic_preset))
    if not cfg.random_weights:
        state = read_state_dict_file(cfg.semantic_weights)
        missing, unexpected = semantic.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"semantic_weights: {cfg.semantic_weights} does not match the "
                              f"{cfg.semantic_preset} Semantic Compressor (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    semantic.eval()
    local = storage.local_path(out)
    if local is None:
        raise ConfigError("output: encoders must be written to a local or shared filesystem path")
    stages.save(text, os.path.join(local, "text"))
    stages.save(semantic, os.path.join(local, "semantic"))
    return {
        "text": {"preset": cfg.text_preset, "width": int(text.width),
                 "sha256": None if cfg.random_weights else _file_sha256(cfg.text_weights)},
        "semantic": {"preset": cfg.semantic_preset, "image_size": semantic.config.image_size,
                     "sha256": None if cfg.random_weights else _file_sha256(cfg.semantic_weights)},
        "weights": "random" if cfg.random_weights else "files",
    }


def run(cfg: EncodersConfig) -> str:
    out = output_dir(cfg)
    if manifest_lib.has_manifest(out):
        print(f"[encoders] up to date: {out}")
        return out
    with tracking.start_run(PHASE, cfg, data_root=cfg.data_root, mlflow_cfg=cfg.mlflow,
                            run_name=cfg.mlflow.run_name or f"encoders-{os.path.basename(out.rstrip('/'))}",
                            tags={"wurst.output_uri": out}) as run_:
        info = build(cfg, out)
        if run_ is not None:
            import mlflow

            mlflow.set_tag("wurst.weights", info["weights"])
        manifest_lib.write(out, phase=PHASE, cfg=cfg, input_uri=None, input_id=source_identity(cfg),
                           counts={}, extra={"encoders": info},
                           mlflow_run_id=run_.info.run_id if run_ is not None else None)
    print(f"[encoders] wrote {out} ({info['weights']} weights)")
    return out


def main(argv: list[str] | None = None) -> str:
    parser = config_lib.argument_parser(__doc__.splitlines()[0], io=False)
    parser.add_argument("--output", help="output root URI (overrides config key `output`)")
    args = parser.parse_args(argv)
    return run(config_lib.load_from_args(EncodersConfig, args))


if __name__ == "__main__":
    main(sys.argv[1:])
