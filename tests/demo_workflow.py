"""The small demo workflow the suite submits once per session (shared by the workflow and MLflow UI tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from pipelines import demo_data

from conftest import REPO_ROOT

DEMO_WORKFLOW = os.path.join(REPO_ROOT, "configs", "demo", "workflow.yaml")

# The demo config made smaller for the suite: fewer images and optimizer steps, 2 prompts.
SMALL_OVERRIDES = {
    "encoders": ["semantic_pretrain.steps=4"],
    "train_a": ["train.max_steps=6", "train.log_every=1", "train.checkpoint_every=6", "train.micro_batch_size=8", "sampling.every=6"],
    # Stage B takes the GPU path on CPU: bf16 (fp32 weights + autocast), every collective audited for its
    # tensors' device, its grid decoded by the bf16 Stage A, and its only worker SIGKILLed before step 5
    # (Ray Train restarts it from the step-3 checkpoint).
    "train_b": ["train.max_steps=6", "train.log_every=1", "train.checkpoint_every=3", "train.micro_batch_size=8", "sampling.every=6",
                "sampling.steps=2", "train.precision=bf16", "train.audit_collectives=true", "fault.kill_at_step=5"],
    "train_c": ["train.max_steps=6", "train.log_every=1", "train.checkpoint_every=6", "train.micro_batch_size=8", "sampling.every=6",
                "sampling.steps=2", "sampling.steps_b=2"],
    "evaluate": ["unseen_prompts=2", "n=1", "steps_c=\"3\"", "steps_b=2"],
}


def small_workflow(tmp_path, demo_root: str, data_root: str, extra: dict[str, list[str]] | None = None,
                   disable: tuple[str, ...] = (), generate: dict | None = None) -> str:
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
                                     "steps_b": 2, **(generate or {})})
    cfg["data_root"] = data_root
    cfg.setdefault("submit", {})["poll_s"] = 0.5  # job status polls (the default 3 s idles ~1.5 s a step)
    cfg["serve_demo"] = demo_root
    path = tmp_path / f"workflow-{len(os.listdir(tmp_path))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_workflow(cluster, config_path: str, timeout: float = 1500) -> dict:
    """`python -m pipelines.workflow --submit`: every step a Ray job on the cluster. With `cluster=None`, the
    embedded mode instead (`make demo`'s): every step in that one process, on a local Ray it starts itself."""
    args = [sys.executable, "-m", "pipelines.workflow", "--config", config_path] + (["--submit"] if cluster else [])
    env = cluster.env if cluster else {k: v for k, v in os.environ.items()
                                       if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    out = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"workflow failed:\n{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
    # Logs go to stderr; stdout ends with the workflow's JSON summary.
    return json.loads(out.stdout[out.stdout.rfind("\n{") + 1:])


def submit_small_demo(ray_cluster, base) -> dict:
    """The small demo workflow, drawn under `base` and submitted phase by phase to the cluster."""
    demo_root, data_root = str(base / "demo"), str(base / "data")
    demo_data.generate(demo_root, n=120)
    config_path = small_workflow(base, demo_root, data_root)
    summary = run_workflow(ray_cluster, config_path)
    return {"base": base, "demo_root": demo_root, "data_root": data_root, "config": config_path,
            "summary": summary}
