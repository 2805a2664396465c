"""pipelines.generate with tiny random-weight checkpoints on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import stages
from pipelines.generate import (
    CheckpointMismatchError,
    GenerateError,
    GenerationModels,
    allowed_sides,
    generate_images,
    parse_steps,
    main,
    write_random_checkpoints,
)
from stages.text import TextEncoder, TextEncoderConfig

from conftest import REPO_ROOT

FAST = ["--steps-c", "3", "--steps-b", "2"]




@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_random_checkpoints(tmp_path_factory.mktemp("generate") / "checkpoints", seed=0)


def test_cli_writes_one_png_per_image_and_a_grid(checkpoints, tmp_path):
    out = tmp_path / "out"
    code = main(["--checkpoints", str(checkpoints), "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
                 "--height", "128", "--width", "256", "--seed", "7", "--out", str(out), "--batch-size", "3", *FAST])
    assert code == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    for name in files[:-1]:
        with Image.open(out / name) as image:
            assert image.size == (256, 128) and image.mode == "RGB"
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 256 + 2, 2 * 128 + 2)  # one row per prompt, 2 px padding
    record = json.loads((out / "generation.json").read_text())
    assert [f["prompt"] for f in record["files"]] == ["a cat", "a cat", "a dog", "a dog"]
    assert record["seed"] == 7 and record["steps_c"] == 3 and record["guidance_c"] == 4.0


def test_same_seed_same_images_and_batching_is_reproducible(checkpoints):
    kwargs = dict(checkpoints=checkpoints, n=2, height=128, width=128, steps_c=3, steps_b=2)
    first = generate_images(["a red cube"], seed=3, **kwargs)
    again = generate_images(["a red cube"], seed=3, **kwargs)
    other = generate_images(["a red cube"], seed=4, **kwargs)
    pixels = [np.stack([np.asarray(im) for im in r.images]) for r in (first, again, other)]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])
    assert not np.array_equal(pixels[0][0], pixels[0][1])  # two samples of one prompt differ


def test_paper_default_steps_with_loaded_models(checkpoints):
    loaded = {name: stages.load(checkpoints / name) for name in ("stage_c", "stage_b", "stage_a", "text")}
    models = GenerationModels(stage_c=loaded["stage_c"], stage_b=loaded["stage_b"], stage_a=loaded["stage_a"],
                              text_c=loaded["text"], text_b=loaded["text"])
    result = generate_images(["a sausage"], models=models, height=128, width=128)  # 60 + 12 steps, guidance 4
    assert len(result.images) == 1 and result.images[0].size == (128, 128) and result.files == []
    array = np.asarray(result.images[0])
    assert array.std() > 0  # a real decode, not a blank image


def test_size_errors_name_the_allowed_sizes(checkpoints, tmp_path):
    with pytest.raises(GenerateError, match=r"height 100 is not allowed \(nearest allowed: 128\)"):
        main(["--checkpoints", str(checkpoints), "--prompt", "x", "--height", "100", "--width", "128",
              "--out", str(tmp_path / "o"), *FAST])
    assert not (tmp_path / "o").exists()
    with pytest.raises(GenerateError, match="width 1000 is not allowed \\(nearest allowed: 896 or 1024\\)"):
        generate_images(["x"], checkpoints=checkpoints, height=1024, width=1000)
    assert allowed_sides(16, 4)[:4] == [128, 256, 384, 512]  # the paper models: multiples of 128 px


def test_command_line_exit_codes_bad_request_2_missing_checkpoint_1(checkpoints, tmp_path):
    """As `python -m pipelines.generate` runs: a bad size is a usage error (2), a missing stage directory an
    input error (1); each one line naming the problem, no traceback."""
    partial = tmp_path / "partial"
    shutil.copytree(checkpoints, partial)
    shutil.rmtree(partial / "stage_b")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    common = ["--prompt", "x", "--width", "128", "--out", str(tmp_path / "o"), *FAST]
    runs = {code: subprocess.run([sys.executable, "-m", "pipelines.generate", "--checkpoints", str(root),
                                  "--height", height, *common], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
            for code, root, height in ((2, checkpoints, "100"), (1, partial, "128"))}
    assert runs[2].returncode == 2, runs[2].stderr
    assert "generate: error: image size 100x128: height 100 is not allowed (nearest allowed: 128)" in runs[2].stderr
    assert runs[1].returncode == 1, runs[1].stderr
    assert f"generate: error: missing checkpoint directory: {partial / 'stage_b'}" in runs[1].stderr
    assert "Traceback" not in runs[1].stderr + runs[2].stderr
    assert not (tmp_path / "o").exists()


def test_wrong_kind_and_text_width_mismatch(checkpoints, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(checkpoints, swapped)
    shutil.rmtree(swapped / "stage_a")
    shutil.copytree(checkpoints / "stage_c", swapped / "stage_a")
    with pytest.raises(stages.CheckpointError, match="holds a 'stage_c' checkpoint, expected a 'stage_a'"):
        generate_images(["x"], checkpoints=swapped, height=128, width=128)

    wide = tmp_path / "wide"
    shutil.copytree(checkpoints, wide)
    config = dict(TextEncoderConfig.tiny().model_cfg)
    config["text_cfg"] = {**config["text_cfg"], "width": 64, "heads": 2}
    stages.save(TextEncoder(TextEncoderConfig(model_name="wurst-test-wide-clip", model_cfg=config)), wide / "text_c")
    with pytest.raises(CheckpointMismatchError, match="has width 64, but .*stage_c expects c_cond=32"):
        generate_images(["x"], checkpoints=wide, height=128, width=128)


def test_bad_prompts_and_counts(checkpoints):
    with pytest.raises(GenerateError, match="single string"):
        generate_images("a cat", checkpoints=checkpoints, height=128, width=128)
    with pytest.raises(GenerateError, match="non-empty list"):
        generate_images([], checkpoints=checkpoints, height=128, width=128)
    with pytest.raises(GenerateError, match="n and batch_size must be >= 1"):
        generate_images(["x"], checkpoints=checkpoints, n=0, height=128, width=128)
    with pytest.raises(GenerateError, match="steps must be a positive int or 'fast'"):
        generate_images(["x"], checkpoints=checkpoints, steps_c="many", height=128, width=128)
    assert torch.is_tensor(parse_steps("fast")) and parse_steps("12") == 12
