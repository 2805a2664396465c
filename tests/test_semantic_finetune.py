"""Stage B fine-tuning its Semantic Compressor (issue 18): the image column of the latent format (written as
PNG, read back as the exact uint8 pixels, through loader workers too), the module that trains both, its
BatchNorm policies, where the compressor starts from, and the start-up checks. The Ray / DeepSpeed chain
(precompute -> train B with the compressor -> precompute with its export -> train C) runs in
tests/test_workflow.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import stages
from pipelines import config as config_lib
from pipelines import latent_shards as ld
from pipelines.config import ConfigError
from pipelines.latent_shards import LatentDataset
from pipelines.training import data as training_data
from pipelines.training.config import DataConfig, TrainConfig
from pipelines.training.driver import compressor_source, hashed_settings
from pipelines.training.specs import STAGE_B_WITH_COMPRESSOR, STAGES, spec_for
from stages import diffusion
from stages.semantic import SemanticCompressor, SemanticCompressorConfig
from stages.stage_b import StageB, StageBConfig, StageBWithCompressor, StageBWithCompressorConfig

SHAPES = {"text_emb": [3, 2], "semantic_image": [3, 32, 32]}


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_latents(tmp_path_factory):
    """Two shards written by the precompute writer (shard_table + write_shard) with an image column."""
    root = str(tmp_path_factory.mktemp("image-latents") / "v1")
    pixels = _pixels(13)
    entries, first = [], 0
    for shard, rows in enumerate((8, 5)):
        chunk = pixels[first:first + rows]
        uids = [f"u{first + i}" for i in range(rows)]
        text = np.broadcast_to(np.arange(first, first + rows, dtype=np.float16)[:, None, None], (rows, 3, 2))
        packed = ld.pack_blobs([ld.encode_image(p, "png") for p in chunk])
        table = ld.shard_table([f"k{u}" for u in uids], uids, ["c"] * rows,
                               {"text_emb": np.ascontiguousarray(text).tobytes(), "semantic_image": packed}, SHAPES)
        name = f"shard-{shard:05d}.parquet"
        ld.write_shard(os.path.join(root, name), [table], SHAPES, row_group_size=4, stats={"written": rows})
        entries.append({"file": name, "rows": rows})
        first += rows
    manifest = {"phase": "precompute", "shards": entries, "row_group_size": 4,
                "columns": {k: ld.column_spec(k, v) for k, v in SHAPES.items()}}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root, pixels


def test_image_column_round_trips_exactly(image_latents):
    root, pixels = image_latents
    assert ld.column_spec("semantic_image", [3, 32, 32]) == {"shape": [3, 32, 32], "dtype": "uint8", "encoding": "png"}
    reader = LatentDataset(root, ["text_emb", "semantic_image"], shuffle=False, infinite=False, batch_size=5)
    batches = list(reader)
    images = torch.cat([b["semantic_image"] for b in batches])
    index = torch.cat([b["text_emb"][:, 0, 0] for b in batches]).long()
    assert images.dtype == torch.uint8 and images.shape == (13, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(pixels[index.numpy()]))


@pytest.mark.parametrize("workers", [0, 2])
def test_image_column_through_loader_workers_is_the_same_stream(image_latents, workers):
    root, pixels = image_latents
    reader = LatentDataset(root, ["uid", "semantic_image"], seed=3, batch_size=4, shuffle_window=8, infinite=True)
    stream = training_data.batches(reader, DataConfig(loader_workers=workers, seed=0), torch.device("cpu"))
    got = [next(stream) for _ in range(4)]
    for batch in got:
        expected = np.stack([pixels[int(uid[1:])] for uid in batch["uid"]])
        assert torch.equal(batch["semantic_image"], torch.from_numpy(expected))


def test_blob_packing_and_bad_image_sizes(image_latents, tmp_path):
    blobs = [b"", b"abc", bytes(range(256))]
    assert ld.unpack_blobs(ld.pack_blobs(blobs)) == blobs
    assert ld.unpack_blobs(ld.pack_blobs([])) == []
    with pytest.raises(ld.LatentDatasetError, match="an image of 16x16 where the manifest says 32x32"):
        ld.decode_images([ld.encode_image(np.zeros((3, 16, 16), np.uint8), "png")], "png", (3, 32, 32),
                         np.empty((1, 3, 32, 32), np.uint8), "shard-x")


def _model(batchnorm: str = "frozen") -> StageBWithCompressor:
    torch.manual_seed(0)
    return StageBWithCompressor(StageBWithCompressorConfig(StageBConfig.tiny(), SemanticCompressorConfig.tiny(),
                                                           batchnorm))


def test_gradients_reach_the_compressor_through_the_augmented_condition():
    model = _model().train()
    images = torch.rand(4, 3, 64, 64)
    effnet = model(images=images)
    assert effnet.shape == (4, 16, 2, 2)
    loss, _ = diffusion.stage_b_loss(model, torch.randn(4, 4, 16, 16), effnet, torch.randn(4, 77, 32),
                                     effnet_dropout=0.25, effnet_noise_probability=0.5,
                                     generator=torch.Generator().manual_seed(0))
    loss.backward()
    stage_b_params, compressor_params = model.parameter_groups()
    assert all(p.grad is not None for p in compressor_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage_b_params)


def test_batchnorm_policies():
    frozen = _model("frozen").train()
    norms = frozen._batchnorms()
    assert norms and all(not m.training for m in norms) and frozen.stage_b.training
    assert all(not p.requires_grad for m in norms for p in m.parameters())
    before = {k: v.clone() for k, v in frozen.compressor.state_dict().items() if "running" in k}
    frozen(images=torch.rand(4, 3, 64, 64))
    assert all(torch.equal(v, frozen.compressor.state_dict()[k]) for k, v in before.items())

    trained = _model("train").train()
    assert all(m.training for m in trained._batchnorms())
    assert all(p.requires_grad for m in trained._batchnorms() for p in m.parameters())
    running = trained.compressor.mapper[1].running_mean.clone()
    trained(images=torch.rand(4, 3, 64, 64))
    assert not torch.equal(running, trained.compressor.mapper[1].running_mean)
    with pytest.raises(ValueError, match="batchnorm"):
        _model("sometimes")


def test_from_modules_keeps_the_loaded_weights_and_checks_channels():
    stage_b, compressor = StageB(StageBConfig.tiny()), SemanticCompressor(SemanticCompressorConfig.tiny())
    model = StageBWithCompressor.from_modules(stage_b, compressor)
    assert model.stage_b is stage_b and model.compressor is compressor
    assert model.config.prediction == stage_b.config.prediction
    with pytest.raises(ValueError, match="writes 8 channels, Stage B's effnet_embd is 16"):
        StageBWithCompressorConfig(StageBConfig.tiny(), SemanticCompressorConfig(backbone="timm:test_efficientnet",
                                                                                 c_latent=8, image_size=256))


def _cfg(**blocks) -> TrainConfig:
    return config_lib.from_dict(TrainConfig, {"stage": "b", **blocks})


def test_compressor_config_is_checked_and_left_out_of_old_versions():
    assert spec_for(_cfg()) is STAGES["b"]
    assert spec_for(_cfg(semantic_compressor={"train": True})) is STAGE_B_WITH_COMPRESSOR
    assert "semantic_compressor" not in hashed_settings(_cfg())  # runs from before keep their names
    assert hashed_settings(_cfg(semantic_compressor={"train": True}))["semantic_compressor"] == {"train": True}
    with pytest.raises(ConfigError, match="semantic_compressor.train: only Stage B"):
        config_lib.from_dict(TrainConfig, {"stage": "c", "semantic_compressor": {"train": True}})
    with pytest.raises(ConfigError, match="semantic_compressor.batchnorm"):
        _cfg(semantic_compressor={"batchnorm": "off"})


def test_the_compressor_starts_from_init_from_then_the_continued_export_then_the_input(tmp_path):
    from pipelines import export_layout

    compressor = SemanticCompressor(SemanticCompressorConfig.tiny())
    own = str(tmp_path / "sc")
    stages.save(compressor, own)
    # A Stage B run's export that holds its fine-tuned compressor.
    step = export_layout.step_dir(str(tmp_path / "run" / "export"), 40)
    stages.save(StageB(StageBConfig.tiny()), os.path.join(step, "stage_b"))
    stages.save(compressor, os.path.join(step, "semantic"))
    with open(os.path.join(step, export_layout.EXPORT_RECORD), "w") as f:
        json.dump({"step": 40, "stage": "b"}, f)
    export_layout.set_latest(str(tmp_path / "run" / "export"), 40)

    train = {"train": True}
    assert compressor_source(_cfg(semantic_compressor={**train, "init_from": own}), {"semantic": "x"}) == own
    continued = _cfg(semantic_compressor=train, model={"init_from": str(tmp_path / "run" / "export" / "stage_b")})
    assert compressor_source(continued, {"semantic": "x"}) == os.path.join(step, "semantic")
    assert compressor_source(_cfg(semantic_compressor=train), {"semantic": own}) == own
    with pytest.raises(ConfigError, match="semantic_compressor.init_from: required"):
        compressor_source(_cfg(semantic_compressor=train), {})
    with pytest.raises(ConfigError, match="semantic_compressor.init_from: .* is not a stages checkpoint"):
        compressor_source(_cfg(semantic_compressor={**train, "init_from": str(tmp_path)}), {})


def test_start_up_checks_name_the_column_and_the_ratio(image_latents):
    root, _ = image_latents
    spec, config = STAGE_B_WITH_COMPRESSOR, StageBConfig.tiny()
    with pytest.raises(ConfigError, match=r"no column\(s\) \['stage_a'\]"):
        spec.latent_shapes(config, {k: ld.column_spec(k, v) for k, v in SHAPES.items()}, root)
    with pytest.raises(ConfigError, match="semantic_image has shape .* multiples of 32"):
        spec.check_shapes(config, {"text_emb": (77, 32), "semantic_image": (3, 40, 40), "stage_a": (4, 32, 32)}, root)
    # 96 px pixels -> a 3x3 latent -> generation's 32x32 Stage B latent: the demo's ratio passes, 64x64 does not.
    spec.check_latent_ratio({"semantic": spec.semantic_shape(config, {"semantic_image": [3, 96, 96]}),
                             "stage_a": [4, 32, 32]}, root)
    with pytest.raises(ConfigError, match="semantic latents \\[16, 3, 3\\] and Stage A latents \\[4, 64, 64\\]"):
        spec.check_latent_ratio({"semantic": spec.semantic_shape(config, {"semantic_image": [3, 96, 96]}),
                                 "stage_a": [4, 64, 64]}, root)

