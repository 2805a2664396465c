"""CLIP score of image/prompt pairs with an open_clip model loaded from local weights only.

``load_clip`` builds an open_clip model from a config name (bundled with open_clip, e.g. ``ViT-H-14``,
or registered from an inline ``model_cfg``, as ``stages.text`` does for the tiny test tower) and fills
it from a local or object-store checkpoint file. open_clip's ``create_model`` treats ``pretrained`` as
a release tag (downloaded) unless it is an existing file, so only an absolute path to a file that
exists is passed, with the towers' own default downloads (timm / Hugging Face base weights) switched
off; configs whose tokenizer or text tower open_clip would fetch from the Hugging Face hub by name are
refused. Images are preprocessed with open_clip's own evaluation transform for the model.

Score: mean over pairs of 100 * max(cos(image_embedding, text_embedding), 0), with the per-pair
values. (Hessel et al. clamp each pair; torchmetrics' CLIPScore clamps the mean. The two agree
whenever no pair has a negative cosine, which is the case for real CLIP models on real pairs.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines import storage
from pipelines.evaluation.fid import as_uint8_nchw

# open_clip's own names for a full-model checkpoint, in the order it prefers them.
CHECKPOINT_FILE_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _find_checkpoint_file(directory: str) -> str:
    for name in CHECKPOINT_FILE_NAMES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    others = sorted(name for name in os.listdir(directory) if name.endswith(_CHECKPOINT_SUFFIXES))
    if len(others) == 1:
        return os.path.join(directory, others[0])
    raise FileNotFoundError(
        f"no unambiguous CLIP checkpoint in {directory}: expected one of {list(CHECKPOINT_FILE_NAMES)}"
        + (f", found several candidates {others}" if others else ", found no weights file")
    )


def _check_fully_local(model_name: str, model_cfg: dict) -> None:
    """Refuse configs for which open_clip would fetch something from the Hugging Face hub by name."""
    text_cfg = model_cfg.get("text_cfg", {})
    fetched = [key for key in ("hf_model_name", "hf_tokenizer_name") if text_cfg.get(key)]
    if fetched or "siglip" in model_name.lower():
        what = ", ".join(f"{key}={text_cfg[key]!r}" for key in fetched) or "a SigLIP tokenizer"
        raise ValueError(
            f"CLIP model {model_name!r} needs {what} from the Hugging Face hub; CLIP score supports models "
            f"with open_clip's own text transformer and bundled tokenizer, which load fully from local files"
        )


def load_clip(
    checkpoint_dir_or_file: str | os.PathLike,
    model_name: str,
    *,
    model_cfg: dict | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> tuple[nn.Module, object]:
    """An open_clip model (eval mode, on ``device``: default CUDA when available) and its tokenizer.

    ``checkpoint_dir_or_file``: a full open_clip checkpoint file (``open_clip_model.safetensors``,
    ``open_clip_pytorch_model.bin``, ...; torch files are read with ``weights_only=True``) or a
    directory holding one, local or in an object store. ``model_name``: an open_clip config name;
    ``model_cfg`` (``{"embed_dim", "vision_cfg", "text_cfg"}``) registers a custom one under it.
    """
    import open_clip
    from open_clip.factory import parse_model_name

    schema, _ = parse_model_name(model_name)
    if schema is not None:
        raise ValueError(
            f"CLIP model_name {model_name!r}: give an open_clip config name (e.g. ViT-H-14), not a "
            f"{schema}: location; the weights come from checkpoint_dir_or_file"
        )
    if model_cfg is not None:
        from stages.text import register_open_clip_config

        missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_cfg]
        if missing:
            raise ValueError(f"CLIP model_cfg for {model_name!r}: missing keys {missing}")
        register_open_clip_config(model_name, model_cfg)
    resolved_cfg = open_clip.get_model_config(model_name)
    if resolved_cfg is None:
        raise ValueError(
            f"open_clip has no model config {model_name!r}; pass model_cfg for a custom model "
            f"(open_clip knows e.g. ViT-H-14, ViT-bigG-14, ViT-L-14)"
        )
    _check_fully_local(model_name, resolved_cfg)

    location = os.fspath(checkpoint_dir_or_file)
    if not storage.exists(location):
        raise FileNotFoundError(f"CLIP checkpoint not found: {location}")
    local = os.path.abspath(storage.local_copy(location))
    checkpoint_file = _find_checkpoint_file(local) if os.path.isdir(local) else local

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    model = open_clip.create_model(
        model_name,
        pretrained=checkpoint_file,  # an existing absolute file path: loaded, never looked up as a tag
        precision=precision,
        device=device,
        pretrained_image=False,  # no timm / Hugging Face base-weight downloads for the towers
        pretrained_text=False,
        require_pretrained=True,
        weights_only=True,
    )
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer


@dataclasses.dataclass(frozen=True)
class ClipScore:
    mean: float
    per_image: np.ndarray  # (N,) float64, 100 * max(cos, 0) of each image with its prompt


def _model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.visual.parameters())
    return parameter.device, parameter.dtype


def _preprocessed(model: nn.Module, images) -> torch.Tensor:
    """Images -> the model's input batch through open_clip's evaluation transform (PIL resize, crop,
    normalise), so the numbers are those of open_clip's own pipeline."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    transform = image_transform_v2(
        PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False
    )
    if isinstance(images, (torch.Tensor, np.ndarray)):
        hwc = as_uint8_nchw(images).permute(0, 2, 3, 1).cpu().numpy()
        pil_images = [Image.fromarray(array) for array in hwc]
    else:
        pil_images = list(images)
        if not all(isinstance(image, Image.Image) for image in pil_images):
            raise TypeError("clip_score: images must be a uint8 batch (tensor or array) or a list of PIL images")
    return torch.stack([transform(image) for image in pil_images])


@torch.inference_mode()
def clip_score(
    model: nn.Module, tokenizer, images, prompts: Sequence[str], *, batch_size: int = 64
) -> ClipScore:
    """CLIP score of ``images[i]`` with ``prompts[i]``: a uint8 batch (N, H, W, 3) or (N, 3, H, W), or
    a list of PIL images, and N prompts."""
    if isinstance(prompts, str) or not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError("clip_score: prompts must be a list of strings")
    count = len(images)
    if count != len(prompts):
        raise ValueError(f"clip_score: {count} images but {len(prompts)} prompts")
    if count == 0:
        raise ValueError("clip_score: no images")
    device, dtype = _model_device_and_dtype(model)
    per_image = []
    for start in range(0, count, batch_size):
        pixels = _preprocessed(model, images[start:start + batch_size]).to(device, dtype)
        tokens = tokenizer(list(prompts[start:start + batch_size])).to(device)
        # Normalised in float64 so a bf16 / fp16 model's rounding stops at its embeddings.
        image_embeddings = F.normalize(model.encode_image(pixels).double(), dim=-1)
        text_embeddings = F.normalize(model.encode_text(tokens).double(), dim=-1)
        cosine = (image_embeddings * text_embeddings).sum(dim=-1)
        per_image.append((100.0 * cosine.clamp(min=0.0)).cpu().numpy())
    values = np.concatenate(per_image)
    return ClipScore(mean=float(values.mean()), per_image=values)


__all__ = ["CHECKPOINT_FILE_NAMES", "ClipScore", "clip_score", "load_clip"]
