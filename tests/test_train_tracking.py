"""The training run in MLflow: its readable name, each export logged as artifacts (and registered as a model
version when `mlflow.register_model` is set), and the periodic evaluation's eval/* metrics.

The runs go through the train phase's own lifecycle (naming, registry check, MLflow run with lineage tags,
run.json, manifest) with the worker loop run in this process (`fit_local`) instead of under Ray Train, on
a real SQLite MLflow store under tmp_path: tiny Stage C and Stage B, a few steps each."""

from __future__ import annotations

import datetime
import json
import os
import re

import pytest

from pipelines import config as config_lib
from pipelines import manifest as manifest_lib
from pipelines import tracking, train
from pipelines.config import ConfigError
from pipelines.evaluation import probe
from pipelines.training import driver
from pipelines.training.config import METRICS_FILE, TrainConfig
from pipelines.training.driver import fit_local, plan_run

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {stage: os.path.join(REPO, "configs", f"train-{stage}-tiny.yaml") for stage in ("b", "c")}
ATTRIBUTES = ("background", "colour", "position", "shape", "size", "all")
# Demo captions for the 4 classes of the helper dataset: the probe applies, and unseen prompts exist.
CLASS_CAPTIONS = (probe.caption("large", "red", "circle", "centre", "white"),
                  probe.caption("small", "blue", "square", "top left", "beige"),
                  probe.caption("small", "green", "triangle", "bottom right", "black"),
                  probe.caption("large", "yellow", "cross", "top right", "grey"))
MODEL_NAME = "wurst-c-tiny"


class LocalTrainPhase(train.TrainPhase):
    """The train phase with the worker loop in this process (`fit_local`) instead of Ray Train."""

    uses_ray = False

    def fit(self, cfg, plan):
        fit_local(cfg, plan)
        return cfg.train.max_steps, None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from stages.text import TINY_CLIP_CONFIG, TINY_CLIP_NAME

    root = tmp_path_factory.mktemp("train-tracking")
    companions = helpers.write_companions(str(root / "companions"))
    latents = helpers.write_latent_dataset(str(root / "latents" / "0123456789ab"), companions=companions,
                                           validation_fraction=0.25, class_captions=CLASS_CAPTIONS)
    clip = root / "clip"
    clip.mkdir()
    helpers.write_tiny_clip(clip)
    return {"root": str(root), "latents": latents, "companions": companions,
            "clip": [f"evaluation.clip.checkpoint={clip}", f"evaluation.clip.model_name={TINY_CLIP_NAME}",
                     f"evaluation.clip.model_cfg={json.dumps(TINY_CLIP_CONFIG)}"]}


def tiny_config(stage: str, inputs: dict, data_root: str, *overrides: str) -> TrainConfig:
    return config_lib.load(TrainConfig, TINY[stage], [
        f"input={inputs['latents']}", f"data_root={data_root}", "train.num_workers=1", "train.log_every=2",
        "sampling.every=0", "validation.every=0", *overrides])


# --------------------------------------------------------------------------------------------
# Names and config (no training)


def test_mlflow_run_name_is_readable_and_the_run_dir_keeps_its_hash(inputs, tmp_path):
    cfg = tiny_config("c", inputs, str(tmp_path))
    first = datetime.datetime(2026, 12, 3, 23, 30, tzinfo=datetime.timezone.utc)
    assert driver.mlflow_run_name(cfg, inputs["latents"], now=first) == "c-tiny-data01234567-20261203"
    # The date is the UTC one; the next day's rerun gets another label but resumes the same run directory.
    berlin = datetime.timezone(datetime.timedelta(hours=1))
    assert driver.mlflow_run_name(cfg, inputs["latents"], now=first.astimezone(berlin)).endswith("-20261203")
    assert driver.mlflow_run_name(cfg, inputs["latents"],
                                  now=first + datetime.timedelta(days=1)).endswith("-20261204")
    assert re.fullmatch(r"c-[0-9a-f]{12}", train.PHASE.version(cfg))
    named = tiny_config("c", inputs, str(tmp_path), "run_name=mine")
    assert driver.mlflow_run_name(named, inputs["latents"], now=first) == "mine"
    labelled = tiny_config("c", inputs, str(tmp_path), "run_name=mine", "mlflow.run_name=my label")
    assert driver.mlflow_run_name(labelled, inputs["latents"], now=first) == "my label"
    # Evaluation and registry settings do not change the weights: the same run directory.
    evaluated = tiny_config("c", inputs, str(tmp_path), "evaluation.every=2", "evaluation.unseen_prompts=2",
                            f"mlflow.register_model={MODEL_NAME}")
    assert train.output_dir(evaluated) == train.output_dir(cfg)


def test_evaluation_and_registry_config_errors_name_the_key(inputs, tmp_path):
    for stage, overrides, message in (
            ("c", ["evaluation.every=-1"], "evaluation.every: expected a value >= 0"),
            ("c", ["evaluation.every=2", "evaluation.unseen_prompts=0"],
             "evaluation.prompts: give prompts, or unseen_prompts"),
            ("c", ["evaluation.probe=maybe"], "evaluation.probe: expected one of"),
            ("c", ["evaluation.n=0"], "evaluation.n: expected a value >= 1"),
            ("c", ["evaluation.clip.checkpoint=/x"], "evaluation.clip.model_name: required"),
            ("b", ["evaluation.every=2", "evaluation.unseen_prompts=2"], "evaluation.prompts: Stage B is evaluated"),
            ("c", ["mlflow.register_model=a/b"], "mlflow.register_model: 'a/b' is not a registered model name"),
            ("c", ["mlflow.register_model=m", "mlflow.enabled=false"], "mlflow.register_model: needs mlflow.enabled")):
        with pytest.raises(ConfigError, match=message):
            tiny_config(stage, inputs, str(tmp_path), *overrides)


def test_evaluation_is_checked_against_the_run_before_it_starts(inputs, tmp_path):
    def plan(stage: str, *overrides: str):
        return plan_run(tiny_config(stage, inputs, str(tmp_path), "evaluation.every=2", *overrides), use_gpu=False)

    resolved = plan("c", "evaluation.unseen_prompts=3")
    assert len(resolved.evaluation_prompts) == 3
    assert not set(resolved.evaluation_prompts) & set(CLASS_CAPTIONS)  # combinations the captions lack
    assert all(probe.is_demo_caption(p) for p in resolved.evaluation_prompts)
    with pytest.raises(ConfigError, match=r"evaluation.every: nothing to score: no attribute probe \('a photo of a "
                                          r"dog' is not a demo caption\) and no evaluation.clip.checkpoint"):
        plan("c", "evaluation.prompts=[a photo of a dog]")
    with pytest.raises(ConfigError, match="evaluation.probe: on, but not every prompt is a demo caption"):
        plan("c", "evaluation.prompts=[a photo of a dog]", "evaluation.probe=on")
    with pytest.raises(ConfigError, match=r"evaluation.height / evaluation.width: image size 100x128"):
        plan("c", "evaluation.unseen_prompts=1", "evaluation.height=100")
    without_b = helpers.write_latent_dataset(str(tmp_path / "without-b"), companions={
        name: path for name, path in inputs["companions"].items() if name != "stage_b"})
    with pytest.raises(ConfigError, match=r"evaluation.every: the evaluation generates images through the run's "
                                          r"text, stage_b, stage_a; this run has no stage_b \(set checkpoints.stage_b"):
        plan("c", "evaluation.unseen_prompts=1", f"input={without_b}")
    with pytest.raises(ConfigError, match="evaluation.clip.checkpoint: /nowhere does not exist"):
        plan("c", "evaluation.unseen_prompts=1", "evaluation.clip.checkpoint=/nowhere", "evaluation.clip.model_name=x")
    captions = plan("b", "evaluation.samples=3").evaluation_prompts  # Stage B: the evaluated samples' captions
    assert len(captions) == 3 and set(captions) <= set(CLASS_CAPTIONS)


def test_an_unusable_registry_stops_the_run_at_start_up(inputs, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's directory would be\n")
    cfg = tiny_config("c", inputs, str(tmp_path), f"mlflow.register_model={MODEL_NAME}",
                      f"mlflow.tracking_uri=sqlite:///{blocked}/mlflow.db")
    with pytest.raises(ConfigError, match=f"mlflow.register_model: the model registry of sqlite:///{blocked}"):
        LocalTrainPhase().run(cfg)
    assert not os.path.exists(os.path.join(train.output_dir(cfg), "run.json"))  # nothing trained or recorded


# --------------------------------------------------------------------------------------------
# Training runs on a real MLflow store


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def stage_c_run(inputs):
    """Tiny Stage C: 4 steps with exports and evaluation every 2 (so at 2 and 4), registered; then resumed
    to 6 steps."""
    data_root = os.path.join(inputs["root"], "c-data")
    common = ("train.export_every=2", "evaluation.every=2", "evaluation.unseen_prompts=2", "evaluation.steps_c=2",
              "evaluation.steps_b=2", f"mlflow.register_model={MODEL_NAME}", *inputs["clip"])
    before = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    first = LocalTrainPhase().run(tiny_config("c", inputs, data_root, "train.max_steps=4", *common))
    resumed = LocalTrainPhase().run(tiny_config("c", inputs, data_root, "train.max_steps=6", *common))
    after = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return {"first": first, "resumed": resumed, "dates": {before, after},
            "client": helpers.mlflow_client(data_root)}


def test_the_training_run_has_a_readable_name_and_a_resume_keeps_it(stage_c_run):
    first, resumed, client = stage_c_run["first"], stage_c_run["resumed"], stage_c_run["client"]
    run_id = first.manifest["mlflow_run_id"]
    run = client.get_run(run_id)
    name = re.fullmatch(r"c-tiny-data01234567-(\d{8})", run.info.run_name)
    assert name and name.group(1) in stage_c_run["dates"], run.info.run_name
    assert run.data.tags["wurst.run_name"] == first.version == os.path.basename(first.output)
    assert run.data.tags["wurst.run_dir"] == first.output
    # The resumed run is the same directory and the same MLflow run, not renamed.
    assert resumed.output == first.output and resumed.manifest["mlflow_run_id"] == run_id
    again = client.get_run(run_id)
    assert again.info.run_name == run.info.run_name and again.data.tags["wurst.resumed"] == "true"


def test_each_export_is_logged_as_artifacts_and_registered(stage_c_run):
    client, run_id = stage_c_run["client"], stage_c_run["first"].manifest["mlflow_run_id"]
    exports = {a.path for a in client.list_artifacts(run_id, "export")}
    assert exports == {"export/000000002", "export/000000004", "export/000000006"}
    for step in (2, 4, 6):
        files = {a.path for a in client.list_artifacts(run_id, f"export/{step:09d}")}
        assert files == {f"export/{step:09d}/export.json", f"export/{step:09d}/stage_c"}  # no companions
        weights = {os.path.basename(a.path) for a in client.list_artifacts(run_id, f"export/{step:09d}/stage_c")}
        assert "config.json" in weights and any(w.endswith(".safetensors") for w in weights), weights
    record = json.loads(open(client.download_artifacts(run_id, "export/000000004/export.json")).read())
    assert record["step"] == 4 and record["weights"] == "ema" and record["mlflow_run_id"] == run_id
    versions = sorted(client.search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: int(v.version))
    assert [(v.source, v.run_id, v.tags["wurst.step"]) for v in versions] == [
        (f"runs:/{run_id}/export/{step:09d}", run_id, str(step)) for step in (2, 4, 6)]
    # A step exported again (a resume from the checkpoint before it) gets no second version.
    again = tracking.register_artifacts(client.tracking_uri, MODEL_NAME, run_id, "export/000000004")
    assert again.version == versions[1].version and len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 3


def test_periodic_evaluation_logs_probe_and_clip_score_at_its_steps(stage_c_run):
    client, run_id = stage_c_run["client"], stage_c_run["first"].manifest["mlflow_run_id"]
    for key in [f"eval/probe/{a}" for a in ATTRIBUTES] + ["eval/clip_score"]:
        assert metric_steps(client, run_id, key) == [2, 4, 6], key
    values = [m.value for a in ATTRIBUTES for m in client.get_metric_history(run_id, f"eval/probe/{a}")]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(0.0 <= m.value <= 100.0 for m in client.get_metric_history(run_id, "eval/clip_score"))
    assert manifest_lib.read(stage_c_run["resumed"].output)["counts"]["steps"] == 6


def logged_lines(stage: str, inputs: dict, data_root: str, run_name: str, *overrides: str) -> list[dict]:
    cfg = tiny_config(stage, inputs, data_root, f"run_name={run_name}", "mlflow.enabled=false", *overrides)
    plan = plan_run(cfg, use_gpu=False)
    fit_local(cfg, plan)
    with open(os.path.join(plan.run_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_stage_b_evaluates_decoded_samples_of_its_input_and_leaves_training_alone(inputs, tmp_path):
    """Without MLflow the eval/probe_b metrics go to the run's metrics.jsonl, every 2 steps and at the last."""
    common = ("train.max_steps=3", "train.log_every=1")
    lines = logged_lines("b", inputs, str(tmp_path), "b-evaluated", *common, "evaluation.every=2",
                         "evaluation.samples=3", "evaluation.steps_b=2")
    assert sorted(line["step"] for line in lines if "eval/probe_b/colour" in line) == [2, 3]
    for line in lines:
        if "eval/probe_b/all" in line:
            assert set(line) >= {f"eval/probe_b/{a}" for a in ATTRIBUTES}
            assert not any(key.startswith("eval/clip_score") for key in line)  # no CLIP configured
    # Evaluating (rank 0, its own generator, module building inside fork_rng) does not move the training.
    plain = logged_lines("b", inputs, str(tmp_path), "b-plain", *common)
    loss = {line["step"]: line["loss"] for line in lines if "loss" in line}
    assert loss == {line["step"]: line["loss"] for line in plain if "loss" in line} and sorted(loss) == [1, 2, 3]
