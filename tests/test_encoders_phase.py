"""The encoders phase: seeded random encoders (tests, demo), their calibration on image shards, errors."""

from __future__ import annotations

import os

import pytest
import torch

import stages
from pipelines import config as config_lib
from pipelines import encoders, manifest
from pipelines.config import ConfigError
from pipelines.image_shards import ImageShardDataset

import helpers

BASE = ["text_preset=tiny", "semantic_preset=tiny", "random_weights=true", "mlflow.enabled=false"]


def load(tmp_path, *extra: str) -> encoders.EncodersConfig:
    return config_lib.load(encoders.EncodersConfig, None, [f"data_root={tmp_path}", *BASE, *extra])


def test_random_encoders_are_written_once_and_say_they_are_random(tmp_path):
    out = encoders.run(load(tmp_path)).output
    assert os.path.isdir(os.path.join(out, "text")) and os.path.isdir(os.path.join(out, "semantic"))
    info = manifest.read(out)["encoders"]
    assert info["weights"] == "random" and info["calibration"] is None
    mtime = os.path.getmtime(os.path.join(out, "manifest.json"))
    assert encoders.run(load(tmp_path)).output == out  # up to date: nothing rewritten
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == mtime
    assert encoders.run(load(tmp_path, "seed=1")).output != out


def test_calibration_gives_stage_c_targets_unit_scale_on_the_images(tmp_path):
    images = helpers.write_image_shards(str(tmp_path / "images" / "v1"), size=64)
    uncalibrated = stages.load(os.path.join(encoders.run(load(tmp_path)).output, "semantic"), expected_kind="semantic")
    out = encoders.run(load(tmp_path, f"input={images}", "calibration_resolution=64", "calibration_images=32")).output
    info = manifest.read(out)["encoders"]["calibration"]
    assert info == {"images": 32, "resolution": 64, "input": images}
    calibrated = stages.load(os.path.join(out, "semantic"), expected_kind="semantic")

    batch = next(iter(ImageShardDataset(images, batch_size=32, image_size=64, crop_size=64)))["images"]
    with torch.no_grad():
        before = uncalibrated.eval().encode_for_stage_c(batch, 64)
        after = calibrated.eval().encode_for_stage_c(batch, 64)
    # Random weights alone: targets far too small for a diffusion model to learn anything from.
    assert float(before.std()) < 0.05
    # Calibrated on these very images: per channel zero mean, unit variance.
    per_channel = after.transpose(0, 1).reshape(after.shape[1], -1)
    assert per_channel.mean(1).abs().max() < 0.05
    assert ((per_channel.std(1) - 1).abs() < 0.05).all()
    # A different input is a different encoders version.
    assert out != encoders.run(load(tmp_path)).output


def test_pretraining_changes_the_compressor_and_keeps_the_calibration(tmp_path):
    images = helpers.write_image_shards(str(tmp_path / "images" / "v1"), size=64)
    common = (f"input={images}", "calibration_resolution=64", "calibration_images=32")
    plain = encoders.run(load(tmp_path, *common)).output
    out = encoders.run(load(tmp_path, *common, "semantic_pretrain.steps=30", "semantic_pretrain.target_resolution=8",
                            "semantic_pretrain.batch_size=8")).output
    assert out != plain  # pretraining is part of the version
    info = manifest.read(out)["encoders"]
    pre = info["pretraining"]
    assert pre["steps"] == 30 and pre["images"] == 32 and pre["resolution"] == 64 and pre["target_resolution"] == 8
    assert pre["loss_last"] < pre["loss_first"]
    assert manifest.read(plain)["encoders"]["pretraining"] is None
    before = stages.load(os.path.join(plain, "semantic"), expected_kind="semantic").eval()
    after = stages.load(os.path.join(out, "semantic"), expected_kind="semantic").eval()
    assert not torch.equal(before.backbone.state_dict()["body.conv_stem.weight"],
                           after.backbone.state_dict()["body.conv_stem.weight"])
    # Calibrated after pretraining: Stage C's targets keep zero mean and unit variance per channel.
    batch = next(iter(ImageShardDataset(images, batch_size=32, image_size=64, crop_size=64)))["images"]
    with torch.no_grad():
        targets = after.encode_for_stage_c(batch, 64)
    per_channel = targets.transpose(0, 1).reshape(targets.shape[1], -1)
    assert per_channel.mean(1).abs().max() < 0.05
    assert ((per_channel.std(1) - 1).abs() < 0.05).all()


def test_errors_name_the_key(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match="input: calibration images apply only with random_weights"):
        config_lib.load(encoders.EncodersConfig, None, [
            f"data_root={tmp_path}", f"text_weights={weights}", f"semantic_weights={weights}",
            f"input={tmp_path}"])
    with pytest.raises(ConfigError, match="semantic_pretrain.steps: pretraining applies only to random weights with"):
        load(tmp_path, "semantic_pretrain.steps=10")
    with pytest.raises(ConfigError, match="text_weights: required"):
        config_lib.load(encoders.EncodersConfig, None, [f"data_root={tmp_path}"])
    with pytest.raises(ConfigError, match="input: .*nothing does not exist"):
        load(tmp_path, f"input={tmp_path / 'nothing'}")
    with pytest.raises(ConfigError, match="input: .*no .tar shards"):
        encoders.run(load(tmp_path, f"input={tmp_path}"))
