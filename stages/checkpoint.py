"""Checkpoints of the stages: a directory with ``model.safetensors`` and ``config.json``.

``config.json`` = ``{"kind": "stage_a" | "stage_b" | "stage_c" | "semantic" | "text",
"format_version": 1, "config": {...the module's config dataclass...}}``.

- ``save(module, directory)`` writes both files (atomically: temp file + rename).
- ``load(directory, expected_kind=None, device=..., dtype=...)`` rebuilds the right module from the
  config and loads the weights; the module is built on the meta device first and the tensors are
  assigned, so loading a 1B-parameter model does not pay for a random initialisation.
- A text-encoder checkpoint may hold no ``model.safetensors`` and instead name local open_clip
  weights in ``config.weights_path`` (``save_config``): ``load`` reads those.

Nothing here unpickles: weights are safetensors, or torch files read with ``weights_only=True``.
This module (with ``convert`` and ``text``) is the only place in ``stages/`` that touches files.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1

# kind -> (module, model class, config class). Imported lazily: Stage B / C pull in their blocks
# only when such a checkpoint is used.
KINDS: dict[str, tuple[str, str, str]] = {
    "stage_a": ("stages.stage_a", "StageA", "StageAConfig"),
    "stage_b": ("stages.stage_b", "StageB", "StageBConfig"),
    "stage_c": ("stages.stage_c", "StageC", "StageCConfig"),
    "semantic": ("stages.semantic", "SemanticCompressor", "SemanticCompressorConfig"),
    "text": ("stages.text", "TextEncoder", "TextEncoderConfig"),
}


class CheckpointError(ValueError):
    """A checkpoint directory is malformed or of the wrong kind; the message names the path."""


def model_classes(kind: str) -> tuple[type[nn.Module], type]:
    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; known kinds are {sorted(KINDS)}")
    module_name, model_name, config_name = KINDS[kind]
    module = importlib.import_module(module_name)
    return getattr(module, model_name), getattr(module, config_name)


def kind_of(module: nn.Module) -> str:
    for kind in KINDS:
        model_cls, _ = model_classes(kind)
        if isinstance(module, model_cls):
            return kind
    raise CheckpointError(f"cannot checkpoint a {type(module).__name__}: not one of the stage models {sorted(KINDS)}")


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``_orig_mod``) / DDP / DeepSpeed (``module``) wrappers."""
    while True:
        for attribute in ("_orig_mod", "module"):
            inner = getattr(module, attribute, None)
            if isinstance(inner, nn.Module):
                module = inner
                break
        else:
            return module


def config_to_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------
# reading weight files


def read_state_dict_file(
    path: str | os.PathLike, wanted: Callable[[str], bool] | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors file (only keys ``wanted`` accepts are read) or from a
    torch file loaded with ``weights_only=True`` (unwrapping a ``{"state_dict": ...}`` level)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if wanted is None or wanted(k)}
    loaded = torch.load(path, map_location=device, weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return {k: v for k, v in loaded.items() if wanted is None or wanted(k)}


def _unshared_contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: clone the second and later users of a buffer."""
    seen: set[tuple[int, int]] = set()
    result = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and identity in seen:
            tensor = tensor.clone()
        seen.add(identity)
        result[key] = tensor.contiguous()
    return result


def write_safetensors(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict atomically (temp file in the same directory, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(_unshared_contiguous(state), tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(data: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# save / load


def save(module: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``module`` (a stage model, compressor or text encoder) as a checkpoint directory.
    Wrappers are unwrapped first (``torch.compile``'s ``_orig_mod``, DDP / DeepSpeed's ``module``)
    so the keys are the plain model's."""
    module = unwrap(module)
    kind = kind_of(module)
    config = module.config
    if kind == "text" and getattr(config, "weights_path", None) is not None:
        # The weights now live in model.safetensors; the original open_clip file is not needed.
        config = dataclasses.replace(config, weights_path=None)
    return save_state(kind, config, module.state_dict(), directory)


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``CheckpointError`` when a floating tensor of ``state`` holds a NaN or inf, naming it: weights
    like that are the remains of a diverged run, and a module built from them only produces NaN."""
    bad = []
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad.append((key, int((~torch.isfinite(tensor)).sum())))
    if bad:
        key, count = bad[0]
        raise CheckpointError(
            f"{source}: {len(bad)} tensors hold non-finite values (NaN or inf), e.g. {key} ({count} of "
            f"{state[key].numel()} values); refusing weights from a diverged run")


def save_state(kind: str, config: Any, state: dict[str, torch.Tensor], directory: str | os.PathLike) -> Path:
    """Write a checkpoint directory from a config and a state dict (used by ``save`` and the
    converter, which never needs to instantiate the model). Non-finite weights are refused."""
    model_classes(kind)
    directory = Path(directory)
    check_finite(state, f"{kind} weights for {directory}")
    write_safetensors(state, directory / WEIGHTS_FILE, metadata={"format": "pt", "kind": kind})
    _write_config(kind, config, directory)
    return directory


def _write_config(kind: str, config: Any, directory: Path) -> None:
    write_json({"kind": kind, "format_version": FORMAT_VERSION, "config": config_to_dict(config)},
               directory / CONFIG_FILE)


def check_state_dict(kind: str, config: Any, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly the keys and shapes of ``kind`` built
    from ``config`` (checked against a meta-device instance: no memory, no initialisation)."""
    model_cls, _ = model_classes(kind)
    with torch.device("meta"):
        module = model_cls(config)
    _check_keys(module, state, source)


def save_config(kind: str, config: Any, directory: str | os.PathLike) -> Path:
    """Write a weight-less checkpoint (only ``config.json``): for a text encoder whose config names
    local open_clip weights in ``weights_path``."""
    model_classes(kind)
    if kind != "text":
        raise CheckpointError(f"only text-encoder checkpoints may omit {WEIGHTS_FILE}; got kind {kind!r}")
    if getattr(config, "weights_path", None) is None:
        raise CheckpointError("a weight-less text checkpoint needs config.weights_path (local open_clip weights)")
    directory = Path(directory)
    _write_config(kind, config, directory)
    return directory


def read_json_file(path: Path, what: str) -> Any:
    """The parsed JSON at ``path``; FileNotFoundError naming ``what`` when it is missing, CheckpointError when
    it is not JSON."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error


def read_config(directory: str | os.PathLike, expected_kind: str | None = None) -> tuple[str, Any]:
    """(kind, config dataclass) of a checkpoint directory, checking the kind if one is expected."""
    config_path = Path(directory) / CONFIG_FILE
    data = read_json_file(config_path, "checkpoint config")
    if not isinstance(data, dict) or "kind" not in data or not isinstance(data.get("config"), dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{config_path}: expected {{'kind': ..., 'config': {{...}}}}, got {found}")
    kind = data["kind"]
    if kind not in KINDS:
        raise CheckpointError(f"{config_path}: unknown kind {kind!r}; known kinds are {sorted(KINDS)}")
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"{directory} holds a {kind!r} checkpoint, expected a {expected_kind!r} checkpoint")
    _, config_cls = model_classes(kind)
    try:
        config = config_cls.from_dict(data["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: invalid {kind} config: {error}") from error
    return kind, config


def _has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def build_with_state(
    model_cls: type[nn.Module], config: Any, state: dict[str, torch.Tensor], source: str,
    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
) -> nn.Module:
    """Instantiate ``model_cls(config)`` holding exactly ``state`` (strict key and shape check).
    Built on the meta device and filled by assignment; modules whose non-persistent buffers
    cannot be rebuilt that way are built normally and loaded by copy."""
    state = cast_floating({k: v.to(device) for k, v in state.items()}, dtype)
    with torch.device("meta"):
        module = model_cls(config)
    _check_keys(module, state, source)
    module.load_state_dict(state, strict=True, assign=True)
    if hasattr(module, "reset_non_persistent_buffers"):
        module.reset_non_persistent_buffers()
    if _has_meta_tensors(module):
        with torch.device(device):
            module = model_cls(config)
        module.load_state_dict(state, strict=True)
    module.to(device=device)
    if dtype is not None:
        module.to(dtype=dtype)
    return module.eval()


def _check_keys(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match {type(module).__name__}({type(module.config).__name__}): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(
            f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {key}: {got} in the file, "
            f"{want} expected by the config"
        )


def load(
    directory: str | os.PathLike,
    expected_kind: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a checkpoint directory written by ``save`` (or ``save_config`` for text) and return the
    module in eval mode (call ``.train()`` to fine-tune). ``expected_kind`` guards against passing
    e.g. a Stage B checkpoint where Stage C is needed."""
    directory = Path(directory)
    kind, config = read_config(directory, expected_kind)
    model_cls, _ = model_classes(kind)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        if kind == "text" and getattr(config, "weights_path", None):
            module = model_cls(config, weights_key=f"{directory / CONFIG_FILE}: config.weights_path")
            module.to(device=device)
            if dtype is not None:
                module.to(dtype=dtype)
            return module.eval()
        raise FileNotFoundError(f"checkpoint weights not found: {weights}")
    if kind == "text" and getattr(config, "weights_path", None):
        config = dataclasses.replace(config, weights_path=None)  # model.safetensors wins
    from safetensors.torch import load_file

    state = load_file(str(weights), device=str(torch.device(device)))
    check_finite(state, str(weights))
    return build_with_state(model_cls, config, state, str(weights), device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# pretrained backbone weights for the Semantic Compressor


def load_semantic_weights(
    module: nn.Module, path: str | os.PathLike, weights_key: str = "semantic.weights_path"
) -> dict[str, int]:
    """Load pretrained weights into a ``SemanticCompressor`` from a local file, any of:
    - a full compressor state dict (``backbone.*`` + ``mapper.*``, e.g. the authors' released
      ``effnet_state_dict``, possibly nested under that key);
    - a torchvision EfficientNet state dict (``features.*``; the classifier is ignored);
    - a timm model state dict (for a ``timm:`` backbone).
    The backbone must be complete; the mapper is loaded when present. Returns counts per part."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"semantic compressor weights not found: {path} (config key {weights_key})")
    if path.endswith(".safetensors"):
        source = read_state_dict_file(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        for nested in ("effnet_state_dict", "state_dict"):
            if isinstance(raw, dict) and isinstance(raw.get(nested), dict):
                raw = raw[nested]
                break
        source = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)} if isinstance(raw, dict) else {}
    source = {k[len("module."):] if k.startswith("module.") else k: v for k, v in source.items()}

    own = module.state_dict()
    backbone_keys = {k for k in own if k.startswith("backbone.")}
    mapper_keys = {k for k in own if k.startswith("mapper.")}
    timm_body = any(k.startswith("backbone.body.") for k in backbone_keys)
    state: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key in own:
            state[key] = value
        elif key.startswith("features.") and not timm_body:
            state["backbone." + key[len("features."):]] = value
        elif timm_body and "backbone.body." + key in own:
            state["backbone.body." + key] = value
    missing = sorted(backbone_keys - state.keys())
    if missing:
        raise CheckpointError(
            f"{path} (config key {weights_key}) does not fit backbone {module.config.backbone}: "
            f"{len(missing)} backbone keys missing, e.g. {missing[:5]}"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{path} (config key {weights_key}): {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )
    module.load_state_dict(state, strict=False)
    return {"backbone": len(backbone_keys), "mapper": len(mapper_keys & state.keys())}


__all__ = [
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "KINDS",
    "CheckpointError",
    "save",
    "save_config",
    "save_state",
    "check_state_dict",
    "check_finite",
    "load",
    "read_config",
    "kind_of",
    "build_with_state",
    "read_state_dict_file",
    "cast_floating",
    "write_safetensors",
    "write_json",
    "load_semantic_weights",
]
