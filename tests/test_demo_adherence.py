"""Issue 17's target, measured as a newcomer would: the full `make demo` workflow (its own configs, 2,000 images,
nothing shortened), then the attribute probe's accuracies on 12 prompts whose combinations the training
captions do not contain, 4 images each. Slow (~10 min on 2 cores): `make test-all` only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

TARGETS = {"background": 0.90, "colour": 0.60, "position": 0.60}


@pytest.mark.e2e
@pytest.mark.slow_e2e
def test_the_demo_model_follows_unseen_prompts(tmp_path):
    data_root = str(tmp_path / "data")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": REPO_ROOT}
    env.pop("RAY_ADDRESS", None)  # the demo's own embedded Ray, as `make demo` runs it
    out = subprocess.run([sys.executable, "-m", "pipelines.demo", "--data-root", data_root], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, f"make demo failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    evaluations = os.path.join(data_root, "evaluations")
    (version,) = [d for d in os.listdir(evaluations) if os.path.isfile(os.path.join(evaluations, d, "evaluation.json"))]
    with open(os.path.join(evaluations, version, "evaluation.json")) as f:
        probe = json.load(f)["probe"]
    assert probe["n_images"] == 48
    accuracy = probe["accuracy"]
    missed = {k: (round(accuracy[k], 3), target) for k, target in TARGETS.items() if accuracy[k] < target}
    assert not missed, f"below target (accuracy, target): {missed}; all: {accuracy}"
