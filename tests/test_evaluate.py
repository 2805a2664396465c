"""The evaluate phase on a tiny random-weight Stage C export: images from demo prompts, the attribute
probe, FID with a random-weight Inception against a folder of demo images, CLIP score with a tiny
random CLIP loaded from a local file, evaluation.json, an MLflow run tagged with the training run, and
a rerun that is a no-op."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import config as config_lib
from pipelines import demo_data, evaluate, export_layout, manifest
from pipelines.config import ConfigError

import helpers

PROMPTS = ["a large red circle at the centre on a white background",
           "a small blue square at the top left on a beige background"]


def write_stage_c_export(run_dir: str, latents: str) -> str:
    """A training run's export layout (pipelines.export_layout) around random tiny checkpoints."""
    companions = helpers.write_companions(os.path.join(run_dir, "export", export_layout.COMPANIONS))
    step_dir = export_layout.step_dir(os.path.join(run_dir, "export"), 7)
    os.makedirs(step_dir)
    os.rename(companions["stage_c"], os.path.join(step_dir, "stage_c"))
    with open(os.path.join(step_dir, export_layout.EXPORT_RECORD), "w") as f:
        json.dump({"run_name": "c-test", "stage": "c", "step": 7, "weights": "ema", "kind": "stage_c",
                   "companions": {}, "mlflow_run_id": "trainrun123", "input": latents}, f)
    export_layout.set_latest(os.path.join(run_dir, "export"), 7)
    return step_dir


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from stages.text import TINY_CLIP_CONFIG, TINY_CLIP_NAME

    folder = tmp_path_factory.mktemp("tiny-clip")
    helpers.write_tiny_clip(folder)
    return str(folder), TINY_CLIP_NAME, TINY_CLIP_CONFIG


def test_config_needs_prompts_and_local_weights():
    with pytest.raises(ConfigError, match="prompts"):
        config_lib.load(evaluate.EvaluateConfig, None, ["input=/x"])
    with pytest.raises(ConfigError, match="fid.inception_weights"):
        config_lib.load(evaluate.EvaluateConfig, None, ["input=/x", "prompts=[a]", "fid.reference=/r"])


def test_evaluate_scores_an_export_logs_mlflow_and_reruns_as_a_no_op(tmp_path, tiny_clip):
    latents = helpers.write_latent_dataset(str(tmp_path / "latents"))
    run_dir = str(tmp_path / "runs" / "c-test")
    write_stage_c_export(run_dir, latents)
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        demo_data.draw("circle", "red", "white", "centre", "large", 64, rng).save(reference / f"{i}.png")
    clip_dir, clip_name, clip_cfg = tiny_clip
    overrides = [f"input={run_dir}", f"data_root={tmp_path}", f"prompts={json.dumps(PROMPTS)}", "n=2",
                 "height=128", "width=128", "steps_c=\"3\"", "steps_b=2", f"fid.reference={reference}",
                 "fid.random_inception_seed=0", f"clip.checkpoint={clip_dir}", f"clip.model_name={clip_name}",
                 f"clip.model_cfg={json.dumps(clip_cfg)}"]
    cfg = config_lib.load(evaluate.EvaluateConfig, None, overrides)
    result = evaluate.run(cfg)
    assert not result.skipped and result.output.startswith(str(tmp_path / "evaluations"))

    evaluation = json.load(open(os.path.join(result.output, "evaluation.json")))
    assert evaluation["step"] == 7 and evaluation["prompts"] == PROMPTS and len(evaluation["images"]) == 4
    assert os.path.exists(os.path.join(result.output, "grid.png"))
    probe = evaluation["probe"]
    assert probe["n_images"] == 4 and set(probe["per_prompt"]) == set(PROMPTS)
    assert all(0.0 <= probe["accuracy"][a] <= 1.0 for a in ("background", "colour", "position", "shape", "size"))
    assert evaluation["fid"]["reference_images"] == 6 and evaluation["fid"]["generated_images"] == 4
    assert np.isfinite(evaluation["fid"]["fid"]) and evaluation["fid"]["fid"] >= 0
    assert len(evaluation["clip_score"]["per_image"]) == 4 and 0 <= evaluation["clip_score"]["mean"] <= 100

    client = helpers.mlflow_client(str(tmp_path))
    run = client.get_run(result.manifest["mlflow_run_id"])
    assert run.data.tags["wurst.evaluated_run_id"] == "trainrun123" and run.data.tags["wurst.evaluated_step"] == "7"
    assert {"fid", "clip_score", "probe/background", "probe/colour", "probe/position"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert "images/grid.png" in artifacts
    assert manifest.has_manifest(result.output)

    again = evaluate.run(config_lib.load(evaluate.EvaluateConfig, None, overrides))
    assert again.skipped and again.output == result.output


def test_unseen_prompts_come_from_the_training_captions_and_a_stage_b_export_is_refused(tmp_path):
    from pipelines.evaluation import probe

    captions = [probe.caption("large", "red", "circle", "centre", "white"),
                probe.caption("small", "blue", "square", "top left", "beige")]
    latents = tmp_path / "latents"
    latents.mkdir()
    pq.write_table(pa.table({"caption": captions * 3}), latents / "shard-00000.parquet")
    latents = str(latents)
    assert sorted(set(evaluate.training_captions(latents))) == sorted(captions)
    run_dir = str(tmp_path / "runs" / "b-test")
    step_dir = write_stage_c_export(run_dir, latents)
    record_path = os.path.join(step_dir, export_layout.EXPORT_RECORD)
    record = json.load(open(record_path))
    json.dump({**record, "stage": "b"}, open(record_path, "w"))
    cfg = config_lib.load(evaluate.EvaluateConfig, None, [f"input={run_dir}", f"data_root={tmp_path}",
                                                          "unseen_prompts=3"])
    with pytest.raises(evaluate.InputError, match="Stage B export"):
        evaluate.run(cfg)


def test_a_separate_stage_b_decodes_and_versions_the_evaluation(tmp_path):
    """`stage_b:` replaces the Stage B bundled in the Stage C export (which keeps the one of the day Stage C
    trained): the evaluation is versioned by that decoder's weights and decodes with it."""
    import torch

    import stages
    from stages.stage_b import StageB, StageBConfig

    latents = helpers.write_latent_dataset(str(tmp_path / "latents"))
    run_dir = str(tmp_path / "runs" / "c-test")
    write_stage_c_export(run_dir, latents)
    base = [f"input={run_dir}", f"data_root={tmp_path}", f"prompts={json.dumps(PROMPTS[:1])}", "n=1",
            "height=128", "width=128", "steps_c=\"2\"", "steps_b=2"]
    bundled = evaluate.run(config_lib.load(evaluate.EvaluateConfig, None, base))

    def write_decoder(path, prediction):
        torch.manual_seed(1)
        config = StageBConfig.tiny()
        config.prediction = prediction
        model = StageB(config)
        with torch.no_grad():
            model.clf[1].weight.normal_(std=0.05)  # a head that draws something
        stages.save(model, path)
        return path

    first = write_decoder(str(tmp_path / "b1" / "stage_b"), "eps")
    second = write_decoder(str(tmp_path / "b2" / "stage_b"), "v")
    with_first = evaluate.run(config_lib.load(evaluate.EvaluateConfig, None, base + [f"stage_b={first}"]))
    with_second = evaluate.run(config_lib.load(evaluate.EvaluateConfig, None, base + [f"stage_b={second}"]))
    assert len({bundled.output, with_first.output, with_second.output}) == 3
    grids = [np.asarray(Image.open(os.path.join(r.output, "grid.png")))
             for r in (bundled, with_first, with_second)]
    assert not np.array_equal(grids[0], grids[1]) and not np.array_equal(grids[1], grids[2])
    again = evaluate.run(config_lib.load(evaluate.EvaluateConfig, None, base + [f"stage_b={first}"]))
    assert again.skipped and again.output == with_first.output
