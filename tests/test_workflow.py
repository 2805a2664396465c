"""The workflow: every phase chained, submitted as Ray jobs to a local head; skips and reruns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from pipelines import config as config_lib
from pipelines import demo_data, workflow
from pipelines.config import ConfigError

from conftest import REPO_ROOT

DEMO_WORKFLOW = os.path.join(REPO_ROOT, "configs", "demo", "workflow.yaml")

# The demo config made smaller for the suite: fewer images and optimizer steps, 2 prompts.
SMALL_OVERRIDES = {
    "train_a": ["train.max_steps=6", "train.checkpoint_every=6", "train.micro_batch_size=8", "sampling.every=6"],
    "train_b": ["train.max_steps=6", "train.checkpoint_every=6", "train.micro_batch_size=8", "sampling.every=6",
                "sampling.steps=2"],
    "train_c": ["train.max_steps=6", "train.checkpoint_every=6", "train.micro_batch_size=8", "sampling.every=6",
                "sampling.steps=2", "sampling.steps_b=2"],
}


def small_workflow(tmp_path, demo_root: str, data_root: str, extra: dict[str, list[str]] | None = None,
                   disable: tuple[str, ...] = ()) -> str:
    cfg = yaml.safe_load(open(DEMO_WORKFLOW))
    for step in cfg["steps"]:
        if step.get("input") == "@demo":
            step["input"] = os.path.join(demo_root, "metadata")
        step["set"] = list(step.get("set", [])) + SMALL_OVERRIDES.get(step["name"], []) + \
            (extra or {}).get(step["name"], [])
        if step["name"] in disable:
            step["enabled"] = False
        if step.get("kind") == "generate":
            step["generate"].update({"prompts": step["generate"]["prompts"][:2], "n": 1, "steps_c": "3",
                                     "steps_b": 2})
    cfg["data_root"] = data_root
    cfg["serve_demo"] = demo_root
    path = tmp_path / f"workflow-{len(os.listdir(tmp_path))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_workflow(cluster, config_path: str, timeout: float = 1500) -> dict:
    out = subprocess.run([sys.executable, "-m", "pipelines.workflow", "--config", config_path, "--submit"],
                         cwd=REPO_ROOT, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"workflow failed:\n{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
    return json.loads(out.stdout[out.stdout.rindex("\n{") + 1:])


@pytest.fixture(scope="session")
def demo_workflow_run(ray_cluster, tmp_path_factory):
    """The small demo workflow, submitted phase by phase to the session's Ray cluster, once."""
    base = tmp_path_factory.mktemp("workflow")
    demo_root, data_root = str(base / "demo"), str(base / "data")
    demo_data.generate(demo_root, n=120)
    config_path = small_workflow(base, demo_root, data_root)
    summary = run_workflow(ray_cluster, config_path)
    return {"base": base, "demo_root": demo_root, "data_root": data_root, "config": config_path,
            "summary": summary}


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
                                          "train_c", "generate"]


def test_demo_data_has_the_faults_the_funnel_must_show(tmp_path):
    info = demo_data.generate(str(tmp_path), n=200)
    kinds = info["kinds"]
    for kind in ("good", "low_aesthetic", "too_small", "watermarked", "duplicate", "http_404", "corrupt"):
        assert kinds.get(kind, 0) > 0, kind
    assert info["rows"] == sum(kinds.values())
    assert demo_data.generate(str(tmp_path), n=200) == info  # idempotent


@pytest.mark.e2e
@pytest.mark.slow_e2e
def test_workflow_submits_every_phase_then_skips_then_reruns_downstream(demo_workflow_run, ray_cluster, tmp_path):
    summary = demo_workflow_run["summary"]
    assert list(summary) == ["filter", "download", "encoders", "train_a", "precompute", "train_b", "train_c",
                             "generate"]
    assert all(s["status"] == "ran" for s in summary.values()), summary
    generated = summary["generate"]["output"]
    assert os.path.exists(os.path.join(generated, "grid.png"))
    funnel = json.load(open(os.path.join(summary["filter"]["output"], "funnel.json")))
    assert funnel
    report = json.load(open(os.path.join(summary["download"]["output"], "report.json")))
    assert report

    # Same config again: every phase is up to date.
    again = run_workflow(ray_cluster, demo_workflow_run["config"])
    assert all(s["status"] == "skipped" for s in again.values()), again
    assert {k: v["output"] for k, v in again.items()} == {k: v["output"] for k, v in summary.items()}

    # One changed filter threshold: filter and what is downstream of it rerun, encoders does not.
    # (Training steps are switched off here to keep the suite short: they are downstream of download,
    # whose new version the assertion below shows.)
    changed = small_workflow(demo_workflow_run["base"], demo_workflow_run["demo_root"],
                             demo_workflow_run["data_root"], extra={"filter": ["filters.aesthetic.min=5.5"]},
                             disable=("train_a", "precompute", "train_b", "train_c", "generate"))
    third = run_workflow(ray_cluster, changed)
    assert third["filter"]["status"] == "ran" and third["download"]["status"] == "ran"
    assert third["encoders"]["status"] == "skipped"
    assert third["filter"]["output"] != summary["filter"]["output"]
    assert third["download"]["output"] != summary["download"]["output"]
    # the earlier versions are untouched
    assert os.path.exists(os.path.join(summary["filter"]["output"], "manifest.json"))
