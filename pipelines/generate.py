"""Generate images: text -> Stage C -> Stage B -> Stage A.

    python -m pipelines.generate --checkpoints DIR --prompt "a cat" [--prompt ...] --n 2 \\
        --height 1024 --width 1024 --seed 0 --out DIR [--steps-c 60|fast --steps-b 12 \\
        --guidance-c 4 --guidance-b 4 --batch-size 4 --device cuda --dtype bfloat16]

``--checkpoints DIR`` holds checkpoint directories written by ``stages.save``: ``stage_c/``,
``stage_b/``, ``stage_a/`` and ``text/`` (a text-encoder checkpoint, or a config naming local
open_clip weights, see ``stages.checkpoint.save_config``). When Stage C and Stage B use different
text encoders (the released prior uses CLIP-bigG, the decoder CLIP-H), put them in ``text_c/`` and
``text_b/``; each falls back to ``text/``.

Writes one PNG per image (``0000.png`` ... in prompt order, ``n`` per prompt), ``grid.png`` (one
row per prompt) and ``generation.json`` (prompts, seed, steps, guidance, sizes, checkpoints).
Defaults are the paper's: Stage C 60 steps with guidance 4, Stage B 12 steps with guidance 4.

Other phases (training sample grids, the demo) call ``generate_images`` with loaded modules.
"""

from __future__ import annotations

import argparse
import json
import math
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from pipelines.config import ConfigError
from pipelines.phase import InputError, module_cli

log = logging.getLogger(__name__)

STAGE_DIRS = ("stage_c", "stage_b", "stage_a")
TEXT_DIR, TEXT_C_DIR, TEXT_B_DIR = "text", "text_c", "text_b"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GenerateError(ConfigError):
    """A bad request (size, prompts, steps, counts): exit status 2; the message says what and the allowed values."""


class CheckpointMismatchError(InputError):
    """The checkpoints do not fit together (text width vs what a stage was built for): exit status 1."""


@dataclass
class GenerationModels:
    stage_c: torch.nn.Module
    stage_b: torch.nn.Module
    stage_a: torch.nn.Module
    text_c: torch.nn.Module  # text encoder whose states Stage C cross-attends to
    text_b: torch.nn.Module  # text encoder for Stage B (often the same object as text_c)
    sources: dict[str, str] = field(default_factory=dict)  # component -> checkpoint dir, for the record

    def check(self) -> None:
        """Text widths must match what each stage was built for."""
        pairs = (("text_c", self.text_c, "stage_c", self.stage_c.config.c_cond, "c_cond"),
                 ("text_b", self.text_b, "stage_b", self.stage_b.config.clip_embd, "clip_embd"))
        for text_name, text, stage_name, expected, key in pairs:
            if text.width != expected:
                raise CheckpointMismatchError(
                    f"text encoder {self.sources.get(text_name, text_name)} has width {text.width}, but "
                    f"{self.sources.get(stage_name, stage_name)} expects {key}={expected}"
                )


@dataclass
class GenerationResult:
    images: list  # PIL images, prompt-major (n per prompt)
    prompts: list[str]  # the prompt of each image
    grid: object  # PIL image: one row per prompt
    files: list[Path] = field(default_factory=list)  # written PNGs (empty without out_dir)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is the paper's precision on GPUs; CPUs run fp32 (bf16 matmuls are slow there).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def checkpoint_dirs(checkpoints: str | os.PathLike) -> dict[str, Path]:
    """component -> directory; missing directories raise an error naming them. On an object store the
    components are found there and copied locally once (`storage.local_copy`)."""
    from pipelines import export_layout, storage

    if storage.is_remote(str(checkpoints)):
        return _remote_checkpoint_dirs(str(checkpoints))
    if not Path(checkpoints).is_dir():
        raise FileNotFoundError(f"checkpoints directory not found: {checkpoints}")
    # A training run's export root means its latest export; an export's companions live beside it.
    root = Path(export_layout.export_set(str(Path(checkpoints).resolve())))

    def component(name: str) -> Path:
        return Path(export_layout.component_dir(str(root), name))

    dirs = {name: component(name) for name in STAGE_DIRS}
    for name, fallback in ((TEXT_C_DIR, TEXT_DIR), (TEXT_B_DIR, TEXT_DIR)):
        dirs[name] = component(name) if component(name).is_dir() else component(fallback)
    missing = sorted({str(path) for path in dirs.values() if not path.is_dir()})
    if missing:
        raise FileNotFoundError(
            f"missing checkpoint directory: {', '.join(missing)} (expected {', '.join(STAGE_DIRS)} and {TEXT_DIR} "
            f"or {TEXT_C_DIR} + {TEXT_B_DIR} under {root})"
        )
    return dirs


def _remote_checkpoint_dirs(uri: str) -> dict[str, Path]:
    from pipelines import export_layout, storage

    if not storage.is_dir(uri):
        raise FileNotFoundError(f"checkpoints directory not found: {uri}")
    root = export_layout.export_set(storage.normalize(uri))

    def present(path: str) -> bool:
        return storage.exists(storage.join(path, "config.json"))

    dirs = {name: export_layout.component_dir(root, name) for name in STAGE_DIRS}
    for name, fallback in ((TEXT_C_DIR, TEXT_DIR), (TEXT_B_DIR, TEXT_DIR)):
        own = export_layout.component_dir(root, name)
        dirs[name] = own if present(own) else export_layout.component_dir(root, fallback)
    missing = sorted({path for path in dirs.values() if not present(path)})
    if missing:
        raise FileNotFoundError(f"missing checkpoint directory: {', '.join(missing)} (expected {', '.join(STAGE_DIRS)} "
                                f"and {TEXT_DIR} or {TEXT_C_DIR} + {TEXT_B_DIR} under {root})")
    return {name: Path(storage.local_copy(path)) for name, path in dirs.items()}


def size_constraints(checkpoints: str | os.PathLike) -> tuple[int, int]:
    """(Stage B latent multiple, Stage A downscale) read from the configs only, so a bad size is
    reported before any weights are loaded."""
    from stages.checkpoint import read_config

    dirs = checkpoint_dirs(checkpoints)
    _, stage_b_config = read_config(dirs["stage_b"], expected_kind="stage_b")
    _, stage_a_config = read_config(dirs["stage_a"], expected_kind="stage_a")
    return stage_b_config.latent_multiple, stage_a_config.downscale


def allowed_sides(stage_b_multiple: int, stage_a_downscale: int, max_side: int = 8192) -> list[int]:
    """Image sides the pipeline produces exactly: side = downscale * int(10.67 * k) for a Stage C
    latent side k with ceil(side / 42.67) == k, where the Stage B latent int(10.67 * k) is a
    multiple of ``stage_b_multiple`` (the paper models: every multiple of 128 px)."""
    from stages.sampling import stage_b_latent_size, stage_c_latent_size

    sides = []
    for k in range(1, max_side // 40 + 2):
        b_side = stage_b_latent_size(k, k)[0]
        side = b_side * stage_a_downscale
        if side <= max_side and b_side % stage_b_multiple == 0 and stage_c_latent_size(side, side)[0] == k:
            sides.append(side)
    return sides


def check_image_size(height: int, width: int, stage_b_multiple: int, stage_a_downscale: int) -> None:
    """The requested size must be one the pipeline produces exactly (Stage C ceil(side / 42.67),
    Stage B 10.67x that and a multiple of its down-sampling, Stage A 4x); the error lists the
    nearest allowed sides."""
    sides = allowed_sides(stage_b_multiple, stage_a_downscale, max_side=max(8192, height, width))
    bad = [(name, value) for name, value in (("height", height), ("width", width)) if value not in sides]
    if bad:
        details = []
        for name, value in bad:
            below = max((s for s in sides if s < value), default=None)
            above = min((s for s in sides if s > value), default=None)
            nearest = " or ".join(str(s) for s in (below, above) if s is not None)
            details.append(f"{name} {value} is not allowed (nearest allowed: {nearest})")
        raise GenerateError(
            f"image size {height}x{width}: " + "; ".join(details)
            + f". Allowed sides for these checkpoints: {', '.join(map(str, sides[:8]))}, ..."
        )


def load_generation_models(checkpoints: str | os.PathLike, device: torch.device | str | None = None,
                           dtype: torch.dtype | None = None) -> GenerationModels:
    import stages

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    dirs = checkpoint_dirs(checkpoints)
    loaded = {name: stages.load(dirs[name], expected_kind=name, device=device, dtype=dtype) for name in STAGE_DIRS}
    text_c = stages.load(dirs[TEXT_C_DIR], expected_kind="text", device=device, dtype=dtype)
    text_b = text_c if dirs[TEXT_B_DIR] == dirs[TEXT_C_DIR] else stages.load(
        dirs[TEXT_B_DIR], expected_kind="text", device=device, dtype=dtype)
    models = GenerationModels(text_c=text_c, text_b=text_b, sources={k: str(v) for k, v in dirs.items()}, **loaded)
    models.check()
    return models


def parse_steps(value: str | int) -> int | torch.Tensor:
    """An int step count, or "fast" for the paper's 29-step Stage C schedule."""
    if isinstance(value, int):
        steps = value
    elif str(value).strip().lower() == "fast":
        from stages.diffusion import stage_c_fast_timesteps

        return stage_c_fast_timesteps()
    else:
        try:
            steps = int(value)
        except ValueError:
            raise GenerateError(f"steps must be a positive int or 'fast', got {value!r}") from None
    if steps < 1:
        raise GenerateError(f"steps must be >= 1, got {steps}")
    return steps


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL RGB images."""
    from PIL import Image

    array = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in array]


def make_grid(images: Sequence, columns: int, padding: int = 2):
    """Tile equally sized PIL images row by row, ``padding`` px apart, on black."""
    from PIL import Image

    if not images:
        raise GenerateError("no images to put in a grid")
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w + (columns - 1) * padding, rows * h + (rows - 1) * padding))
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        grid.paste(image, (col * (w + padding), row * (h + padding)))
    return grid


def _embed(encoder: torch.nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return encoder.encode(prompts), encoder.empty_embedding()


@torch.no_grad()
def generate_images(
    prompts: Sequence[str],
    *,
    checkpoints: str | os.PathLike | None = None,
    models: GenerationModels | None = None,
    n: int = 1,
    height: int = 1024,
    width: int = 1024,
    seed: int = 0,
    steps_c: int | str | torch.Tensor | None = None,
    steps_b: int | None = None,
    guidance_c: float | None = None,
    guidance_b: float | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    out_dir: str | os.PathLike | None = None,
) -> GenerationResult:
    """Generate ``n`` images per prompt. Give either ``checkpoints`` (a directory as described in
    the module docstring) or already loaded ``models``. Images come from one CPU generator seeded
    with ``seed`` and consumed batch after batch, so a run is reproducible for a given batch size.
    Writes PNGs, ``grid.png`` and ``generation.json`` to ``out_dir`` when given."""
    from stages import sampling

    if isinstance(prompts, str):
        raise GenerateError("prompts must be a list of strings, got a single string")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise GenerateError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if n < 1 or batch_size < 1:
        raise GenerateError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    if (checkpoints is None) == (models is None):
        raise GenerateError("pass exactly one of checkpoints (a directory) or models (loaded modules)")
    steps_c = parse_steps(sampling.DEFAULT_STAGE_C_STEPS if steps_c is None else steps_c)
    steps_b = parse_steps(sampling.DEFAULT_STAGE_B_STEPS if steps_b is None else steps_b)
    guidance_c = sampling.DEFAULT_STAGE_C_GUIDANCE if guidance_c is None else float(guidance_c)
    guidance_b = sampling.DEFAULT_STAGE_B_GUIDANCE if guidance_b is None else float(guidance_b)

    if models is None:
        check_image_size(height, width, *size_constraints(checkpoints))  # before loading any weights
        models = load_generation_models(checkpoints, device=device, dtype=dtype)
    else:
        models.check()
        check_image_size(height, width, models.stage_b.config.latent_multiple, models.stage_a.config.downscale)
    for module in (models.stage_c, models.stage_b, models.stage_a, models.text_c, models.text_b):
        module.eval()

    image_prompts = [prompt for prompt in prompts for _ in range(n)]
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    images = []
    for start in range(0, len(image_prompts), batch_size):
        batch = image_prompts[start:start + batch_size]
        text_c, uncond_c = _embed(models.text_c, batch)
        text_b, uncond_b = (text_c, uncond_c) if models.text_b is models.text_c else _embed(models.text_b, batch)
        pixels = sampling.generate(
            models.stage_c, models.stage_b, models.stage_a, text_c, uncond_c, text_b, uncond_b, height, width,
            stage_c_timesteps=steps_c, stage_c_guidance=guidance_c,
            stage_b_timesteps=steps_b, stage_b_guidance=guidance_b, generator=generator,
        )
        images.extend(to_pil(pixels))
    columns = n if n > 1 else math.ceil(math.sqrt(len(images)))
    result = GenerationResult(images=images, prompts=image_prompts, grid=make_grid(images, columns))

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            path = out / f"{index:04d}.png"
            image.save(path)
            result.files.append(path)
        result.grid.save(out / "grid.png")
        record = {
            "prompts": prompts, "n": n, "seed": seed, "height": height, "width": width,
            "image_size": list(images[0].size[::-1]), "batch_size": batch_size,
            "steps_c": steps_c.tolist() if isinstance(steps_c, torch.Tensor) else steps_c, "steps_b": steps_b,
            "guidance_c": guidance_c, "guidance_b": guidance_b, "checkpoints": models.sources,
            "files": [{"file": p.name, "prompt": q} for p, q in zip(result.files, image_prompts)],
        }
        (out / "generation.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return result


def write_random_checkpoints(directory: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """A complete random-weight checkpoint set (stage_c, stage_b, stage_a, text) for tests and demos.
    ``preset``: "tiny" (CPU, seconds). Stage C's output head starts at zero, so random weights give
    noise-like but valid images."""
    import stages
    from stages.stage_a import StageA, StageAConfig
    from stages.stage_b import StageB, StageBConfig
    from stages.stage_c import StageC, StageCConfig
    from stages.text import TextEncoder, TextEncoderConfig

    if preset != "tiny":
        raise GenerateError(f"write_random_checkpoints: only the 'tiny' preset is supported, got {preset!r}")
    root = Path(directory)
    torch.manual_seed(seed)
    stages.save(StageC(StageCConfig.tiny()), root / "stage_c")
    stages.save(StageB(StageBConfig.tiny()), root / "stage_b")
    stages.save(StageA(StageAConfig.tiny()), root / "stage_a")
    stages.save(TextEncoder(TextEncoderConfig.tiny()), root / TEXT_DIR)
    return root


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.generate", description="Text -> Stage C -> Stage B -> Stage A images."
    )
    parser.add_argument("--checkpoints", required=True, help="directory with stage_c/, stage_b/, stage_a/, text/")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output directory for the PNGs and grid.png")
    parser.add_argument("--steps-c", default=None, help="Stage C steps (default 60) or 'fast' (29-step schedule)")
    parser.add_argument("--steps-b", type=int, default=None, help="Stage B steps (default 12)")
    parser.add_argument("--guidance-c", type=float, default=None, help="Stage C guidance scale (default 4)")
    parser.add_argument("--guidance-b", type=float, default=None, help="Stage B guidance scale (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status 0; a bad request raises GenerateError (exit 2 from the command line), unusable
    checkpoints FileNotFoundError / CheckpointError / CheckpointMismatchError (exit 1)."""
    args = build_parser().parse_args(argv)
    result = generate_images(
        args.prompt, checkpoints=args.checkpoints, n=args.n, height=args.height, width=args.width, seed=args.seed,
        steps_c=args.steps_c, steps_b=args.steps_b, guidance_c=args.guidance_c, guidance_b=args.guidance_b,
        batch_size=args.batch_size, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
        out_dir=args.out,
    )
    log.info("wrote %d images and grid.png to %s", len(result.files), args.out)
    return 0


if __name__ == "__main__":
    module_cli(__spec__.name)
