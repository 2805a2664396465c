"""Convert between diffusers' Würstchen model folders and our checkpoints.

    python -m stages.convert --from-diffusers DIR --out DIR [--variant fp16] [--dtype float32]
    python -m stages.convert --to-diffusers DIR --out DIR [--dtype float32]

``--from-diffusers`` accepts a model folder as diffusers' ``save_pretrained`` writes it
(``config.json`` with ``_class_name`` + ``diffusion_pytorch_model.safetensors``, possibly sharded
with a ``.index.json``, or a ``.bin`` read with ``weights_only=True``) for ``WuerstchenPrior`` ->
``stage_c``, ``WuerstchenDiffNeXt`` -> ``stage_b`` and ``PaellaVQModel`` -> ``stage_a``. It also
accepts a pipeline folder (``model_index.json``): each such component is converted into
``OUT/<kind>/``, the layout ``pipelines.generate --checkpoints`` reads. Text encoders of diffusers
pipelines are Hugging Face ``CLIPTextModel``s, not open_clip towers: they are skipped (point a text
checkpoint at local open_clip weights instead, see ``stages.checkpoint.save_config``).

Parameter names are identical on both sides, so conversion copies tensors unchanged and only
translates config.json; every key and shape is checked against the target architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from stages.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    cast_floating,
    check_state_dict,
    model_classes,
    read_config,
    read_json_file,
    read_state_dict_file,
    save_state,
    write_json,
    write_safetensors,
)

# diffusers class -> (our kind, the class's constructor defaults). The defaults matter: diffusers
# fills keys missing from config.json with *its* defaults, which differ from our paper presets.
DIFFUSERS_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "WuerstchenPrior": ("stage_c", {
        "c_in": 16, "c": 1280, "c_cond": 1024, "c_r": 64, "depth": 16, "nhead": 16, "dropout": 0.1,
    }),
    "WuerstchenDiffNeXt": ("stage_b", {
        "c_in": 4, "c_out": 4, "c_r": 64, "patch_size": 2, "c_cond": 1024, "c_hidden": [320, 640, 1280, 1280],
        "nhead": [-1, 10, 20, 20], "blocks": [4, 4, 14, 4], "level_config": ["CT", "CTA", "CTA", "CTA"],
        "inject_effnet": [False, True, True, True], "effnet_embd": 16, "clip_embd": 1024, "kernel_size": 3,
        "dropout": 0.1,
    }),
    "PaellaVQModel": ("stage_a", {
        "in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2, "levels": 2, "bottleneck_blocks": 12,
        "embed_dim": 384, "latent_channels": 4, "num_vq_embeddings": 8192, "scale_factor": 0.3764,
    }),
}  # fmt: skip
KIND_TO_DIFFUSERS = {kind: name for name, (kind, _) in DIFFUSERS_CLASSES.items()}

DIFFUSERS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_BIN = "diffusion_pytorch_model.bin"
DIFFUSERS_VERSION_FALLBACK = "0.21.0"  # the release the Würstchen weights were published with

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _variant(name: str, variant: str | None) -> str:
    """diffusers' naming: diffusion_pytorch_model.safetensors -> diffusion_pytorch_model.fp16.safetensors."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def read_diffusers_config(folder: Path) -> tuple[str, dict[str, Any]]:
    """(class name, config dict) of a diffusers model folder."""
    config_path = folder / CONFIG_FILE
    data = read_json_file(config_path, "diffusers model config")
    class_name = data.get("_class_name") if isinstance(data, dict) else None
    if class_name not in DIFFUSERS_CLASSES:
        raise CheckpointError(
            f"{config_path}: _class_name is {class_name!r}; convertible classes are {sorted(DIFFUSERS_CLASSES)}"
        )
    return class_name, data


def read_diffusers_weights(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers model folder: single or sharded safetensors, or a .bin file
    (loaded with ``weights_only=True``; single or sharded)."""
    for weights_name in (DIFFUSERS_SAFETENSORS, DIFFUSERS_BIN):
        single = folder / _variant(weights_name, variant)
        if single.is_file():
            return read_state_dict_file(single)
        index = folder / _variant(weights_name + ".index.json", variant)
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' ({error})") from error
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / shard
                if not shard_path.is_file():
                    raise FileNotFoundError(f"weight shard listed in {index} not found: {shard_path}")
                state.update(read_state_dict_file(shard_path))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError(
                    f"{index}: {len(missing)} keys of the weight_map are not in the shards, e.g. {missing[:5]}"
                )
            return state
    raise FileNotFoundError(
        f"no diffusers weights in {folder}: expected {_variant(DIFFUSERS_SAFETENSORS, variant)} "
        f"(or its .index.json shards, or {_variant(DIFFUSERS_BIN, variant)})"
    )


def convert_model_from_diffusers(
    src: Path, out: Path, variant: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """One diffusers model folder -> one checkpoint directory; returns the kind written."""
    class_name, data = read_diffusers_config(src)
    kind, diffusers_defaults = DIFFUSERS_CLASSES[class_name]
    values = {**diffusers_defaults, **{k: v for k, v in data.items() if k in diffusers_defaults}}
    _, config_cls = model_classes(kind)
    try:
        config = config_cls.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{src / CONFIG_FILE}: cannot be expressed as our {kind} config: {error}") from error
    state = cast_floating(read_diffusers_weights(src, variant), dtype)
    check_state_dict(kind, config, state, f"diffusers {class_name} weights in {src}")
    save_state(kind, config, state, out)
    return kind


def from_diffusers(src: str | os.PathLike, out: str | os.PathLike, variant: str | None = None,
                   dtype: torch.dtype | None = None) -> list[tuple[str, Path]]:
    """Convert a diffusers model folder (to ``out``) or pipeline folder (to ``out/<kind>/``).
    Returns [(kind, checkpoint directory)]."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"diffusers folder not found: {src}")
    if (src / CONFIG_FILE).is_file():
        return [(convert_model_from_diffusers(src, out, variant, dtype), out)]
    index_path = src / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{src} holds neither a diffusers model ({CONFIG_FILE}) nor a pipeline (model_index.json)"
        )
    components = json.loads(index_path.read_text(encoding="utf-8"))
    written = []
    for name, spec in sorted(components.items()):
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] not in DIFFUSERS_CLASSES:
            continue
        kind = DIFFUSERS_CLASSES[spec[1]][0]
        target = out / kind
        convert_model_from_diffusers(src / name, target, variant, dtype)
        written.append((kind, target))
    if not written:
        raise CheckpointError(f"{index_path}: no component of class {sorted(DIFFUSERS_CLASSES)}")
    return written


def diffusers_config_values(config) -> dict[str, Any]:
    """The diffusers config keys of one of our Stage A / B / C configs (ours add keys diffusers' classes do
    not take, e.g. Stage C's cond_init and the attention blocks' attention_dropout_on)."""
    for kind, class_name in KIND_TO_DIFFUSERS.items():
        if isinstance(config, model_classes(kind)[1]):
            ours = config.to_dict()
            return {key: ours[key] for key in DIFFUSERS_CLASSES[class_name][1]}
    raise TypeError(f"{type(config).__name__} has no diffusers model class")


def _diffusers_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("diffusers")
    except (ImportError, PackageNotFoundError):
        return DIFFUSERS_VERSION_FALLBACK


def to_diffusers(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[str, Path]:
    """One of our checkpoints -> a diffusers model folder loadable with ``<Class>.from_pretrained``."""
    src, out = Path(src), Path(out)
    kind, config = read_config(src)
    if kind not in KIND_TO_DIFFUSERS:
        raise CheckpointError(
            f"{src} holds a {kind!r} checkpoint, which has no diffusers model class; "
            f"convertible kinds are {sorted(KIND_TO_DIFFUSERS)}"
        )
    if getattr(config, "prediction", "eps") != "eps":
        raise CheckpointError(
            f"{src}: this {kind} checkpoint predicts {config.prediction!r}; diffusers' Würstchen models and "
            "pipelines read the head as eps only, so the export would generate wrong images"
        )
    class_name = KIND_TO_DIFFUSERS[kind]
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {weights}")
    state = cast_floating(read_state_dict_file(weights), dtype)
    check_state_dict(kind, config, state, str(weights))
    diffusers_config = {"_class_name": class_name, "_diffusers_version": _diffusers_version()}
    diffusers_config.update(diffusers_config_values(config))
    write_safetensors(state, out / DIFFUSERS_SAFETENSORS, metadata={"format": "pt"})
    write_json(diffusers_config, out / CONFIG_FILE)
    return class_name, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.convert", description=__doc__.split("\n\n")[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-diffusers", metavar="DIR", help="diffusers model or pipeline folder to import")
    direction.add_argument("--to-diffusers", metavar="DIR", help="our checkpoint directory to export")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--variant", default=None, help="diffusers weight variant to read, e.g. fp16")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating-point weights")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.from_diffusers:
            for kind, path in from_diffusers(args.from_diffusers, args.out, args.variant, dtype):
                print(f"wrote {kind} checkpoint: {path}")
        else:
            class_name, path = to_diffusers(args.to_diffusers, args.out, dtype)
            print(f"wrote diffusers {class_name} folder: {path}")
    except (FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
