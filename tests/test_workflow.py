"""The workflow: every phase chained, submitted as Ray jobs to a local head; skips and reruns."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipelines import config as config_lib
from pipelines import export_layout
from pipelines import demo_data, workflow
from pipelines.config import ConfigError

import helpers
from demo_workflow import DEMO_WORKFLOW, run_workflow, small_workflow


def test_workflow_config_is_validated():
    with pytest.raises(ConfigError, match=r"steps\[1\]: refers to step 'nope'"):
        config_lib.from_dict(workflow.WorkflowConfig, {"steps": [
            {"name": "a", "module": "pipelines.filter"},
            {"name": "b", "module": "pipelines.download", "input_from": "nope"}]})
    with pytest.raises(ConfigError, match=r"steps\[0\].module: required"):
        config_lib.from_dict(workflow.WorkflowConfig, {"steps": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="duplicate step name"):
        config_lib.from_dict(workflow.WorkflowConfig, {"steps": [{"name": "a", "module": "m"},
                                                                 {"name": "a", "module": "m"}]})
    cfg = config_lib.load(workflow.WorkflowConfig, DEMO_WORKFLOW)
    assert [s.name for s in cfg.steps] == ["filter", "download", "encoders", "train_a", "precompute", "train_b",
                                          "precompute_c", "train_c", "generate", "evaluate"]


def test_demo_data_has_the_faults_the_funnel_must_show(tmp_path):
    info = demo_data.generate(str(tmp_path), n=200)
    kinds = info["kinds"]
    for kind in ("good", "low_aesthetic", "too_small", "watermarked", "duplicate", "http_404", "corrupt"):
        assert kinds.get(kind, 0) > 0, kind
    assert info["rows"] == sum(kinds.values())
    assert demo_data.generate(str(tmp_path), n=200) == info  # idempotent


@pytest.mark.e2e
def test_workflow_submits_every_phase_then_skips_then_reruns_downstream(demo_workflow_run, ray_cluster, tmp_path):
    summary = demo_workflow_run["summary"]
    assert list(summary) == ["filter", "download", "encoders", "train_a", "precompute", "train_b", "precompute_c",
                             "train_c", "generate", "evaluate"]
    assert all(s["status"] == "ran" for s in summary.values()), summary
    generated = summary["generate"]["output"]
    assert os.path.exists(os.path.join(generated, "grid.png"))
    funnel = json.load(open(os.path.join(summary["filter"]["output"], "funnel.json")))
    assert funnel
    report = json.load(open(os.path.join(summary["download"]["output"], "report.json")))
    assert report

    # Every training job logged its loss at every step and a sample grid, and exported a checkpoint
    # the next step consumed (Stage B's export is what train_c samples with and generate decodes with).
    import stages
    client = helpers.mlflow_client(demo_workflow_run["data_root"])
    for step, kind in (("train_a", "stage_a"), ("train_b", "stage_b"), ("train_c", "stage_c")):
        run_info = json.load(open(os.path.join(summary[step]["output"], "run.json")))
        run_id = run_info["mlflow_run_id"]
        losses = client.get_metric_history(run_id, "loss")
        assert sorted({m.step for m in losses}) == list(range(1, 7)), step
        assert all(m.value == m.value for m in losses), f"{step}: NaN loss"
        assert any(a.path.endswith(".png") for a in client.list_artifacts(run_id, "images")), step
        model = stages.load(export_layout.resolve_checkpoint(os.path.join(summary[step]["output"], "export", kind)),
                            expected_kind=kind)
        assert model is not None

    # Stage B in bf16 through a killed worker: resumed from its step-3 checkpoint (steps 1-3 logged once: not
    # restarted from scratch), with every collective's tensors on the training device.
    train_b = summary["train_b"]["output"]
    assert os.path.exists(os.path.join(train_b, ".fault-injected-step-5"))
    b_run = client.get_run(json.load(open(os.path.join(train_b, "run.json")))["mlflow_run_id"])
    assert b_run.data.params["derived.precision"] == "bf16"
    b_steps = sorted(m.step for m in client.get_metric_history(b_run.info.run_id, "loss"))
    assert b_steps[:3] == [1, 2, 3] and b_steps[3] == 4 and sorted(set(b_steps)) == list(range(1, 7)), b_steps
    with open(os.path.join(train_b, "collectives", "rank-00000.json")) as f:
        assert json.load(f)["calls"]["all_reduce"] > 0

    # Stage B fine-tuned the Semantic Compressor (the paper): its export holds the compressor, whose weights moved
    # from the encoders step's; precompute_c encoded Stage C's latents with exactly that export, and train_c
    # trained on them.
    from safetensors.torch import load_file

    exported = export_layout.resolve_checkpoint(os.path.join(train_b, "export", "semantic"))
    tuned, initial = (load_file(os.path.join(d, "model.safetensors"))
                      for d in (exported, os.path.join(summary["encoders"]["output"], "semantic")))
    assert set(tuned) == set(initial)
    compressor = stages.load(exported, expected_kind="semantic")
    batchnorms = {name for name, m in compressor.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    in_batchnorm = {k for k in tuned if k.rpartition(".")[0] in batchnorms}
    # Every convolution / linear weight moved; BatchNorm frozen (the demo's policy): statistics and affine kept.
    assert all(not torch.equal(tuned[k], initial[k]) for k in set(tuned) - in_batchnorm), \
        sorted(k for k in set(tuned) - in_batchnorm if torch.equal(tuned[k], initial[k]))
    assert in_batchnorm and all(torch.equal(tuned[k], initial[k]) for k in in_batchnorm)
    c_latents = json.load(open(os.path.join(summary["precompute_c"]["output"], "manifest.json")))
    assert c_latents["encoders"]["semantic"]["checkpoint"] == exported
    assert json.load(open(os.path.join(summary["train_c"]["output"], "run.json")))["input"] == \
        summary["precompute_c"]["output"]

    # The evaluation of train_c's export: probe accuracies in evaluation.json and in an MLflow run that
    # names the training run it evaluates.
    evaluation = json.load(open(os.path.join(summary["evaluate"]["output"], "evaluation.json")))
    assert set(evaluation["probe"]["accuracy"]) >= {"background", "colour", "position"}
    assert evaluation["probe"]["n_images"] == 2 and len(evaluation["prompts"]) == 2
    e_run = client.get_run(json.load(open(os.path.join(summary["evaluate"]["output"], "manifest.json")))["mlflow_run_id"])
    c_run_id = json.load(open(os.path.join(summary["train_c"]["output"], "run.json")))["mlflow_run_id"]
    assert e_run.data.tags["wurst.evaluated_run_id"] == c_run_id and e_run.data.tags["wurst.input_run_id"] == c_run_id
    assert {"probe/background", "probe/colour", "probe/position"} <= set(e_run.data.metrics)

    # Lineage: each phase's MLflow run names the run that produced its input.
    def run_of(step):
        return json.load(open(os.path.join(summary[step]["output"], "manifest.json")))["mlflow_run_id"]

    for child, parent in (("download", "filter"), ("precompute", "download"), ("train_a", "download"),
                          ("train_b", "precompute"), ("precompute_c", "download"), ("train_c", "precompute_c")):
        tags = client.get_run(run_of(child)).data.tags
        assert tags["wurst.input_run_id"] == run_of(parent), (child, parent)

    # Same config again: every phase is up to date.
    again = run_workflow(ray_cluster, demo_workflow_run["config"])
    assert all(s["status"] == "skipped" for s in again.values()), again
    assert {k: v["output"] for k, v in again.items()} == {k: v["output"] for k, v in summary.items()}

    # One changed filter threshold: filter and what is downstream of it rerun. These reruns go through the
    # embedded mode (`python -m pipelines.workflow` without --submit, as `make demo`: every phase in one process
    # on one local Ray), which plans versions exactly as the submitted runs above and saves the ~10 s a Ray job
    # costs on top of the phase.
    # (Training steps are switched off here to keep the suite short: they are downstream of download,
    # whose new version the assertion below shows.)
    changed = small_workflow(demo_workflow_run["base"], demo_workflow_run["demo_root"],
                             demo_workflow_run["data_root"], extra={"filter": ["filters.aesthetic.min=5.5"]},
                             disable=("train_a", "precompute", "train_b", "precompute_c", "train_c", "generate",
                                      "evaluate"))
    third = run_workflow(None, changed)
    # encoders are calibrated on the downloaded images, so they are downstream of the filter too.
    assert [third[s]["status"] for s in ("filter", "download", "encoders")] == ["ran", "ran", "ran"]
    assert third["encoders"]["output"] != summary["encoders"]["output"]
    assert third["filter"]["output"] != summary["filter"]["output"]
    assert third["download"]["output"] != summary["download"]["output"]
    # A change at the end of the chain (the generation's Stage B steps) reruns that step alone.
    late = small_workflow(demo_workflow_run["base"], demo_workflow_run["demo_root"], demo_workflow_run["data_root"],
                          generate={"steps_b": 3})
    fourth = run_workflow(None, late)
    assert [k for k, v in fourth.items() if v["status"] == "ran"] == ["generate"], fourth
    assert fourth["generate"]["output"] != summary["generate"]["output"]
    # the earlier versions are untouched
    assert os.path.exists(os.path.join(summary["filter"]["output"], "manifest.json"))
