"""Multi-aspect buckets through the real chain (issue 18): precompute into buckets as a Ray job, then Stage B
(fine-tuning its Semantic Compressor, bf16 autocast with every collective audited, 2 DeepSpeed workers) trains
on all buckets: each step's batch is one bucket's on every rank, exactly the bucketed reader's stream, across a
resume; validation, the sample grid and the export work at bucket shapes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipelines.latent_buckets import open_reader
from pipelines.training.config import EXPORT_DIR, TRACE_DIR

import helpers
from test_buckets import _write_images
from test_train import GPU_PATH, metric_by_step, read_trace

pytestmark = [pytest.mark.e2e, pytest.mark.slow_e2e]
BUCKETS = "buckets=[[32,32],[16,48],[48,16]]"


def _submit(cluster, module: str, config: str, *overrides: str) -> str:
    args = ["python", "-m", module, "--config", config]
    for item in overrides:
        args += ["--set", item]
    status, logs = cluster.submit(args, timeout=900)
    assert status == "SUCCEEDED", f"{module} ended {status}:\n{logs[-6000:]}"
    return logs


def test_stage_b_trains_on_every_bucket_and_resumes_exactly(ray_cluster, tmp_path):
    import stages
    import torch
    from stages.semantic import SemanticCompressor, SemanticCompressorConfig
    from stages.stage_a import StageA, StageAConfig
    from stages.text import TextEncoder, TextEncoderConfig

    expected = _write_images(str(tmp_path / "images"), np.random.default_rng(1))
    torch.manual_seed(0)
    for name, model in (("text", TextEncoder(TextEncoderConfig.tiny())),
                        ("semantic", SemanticCompressor(SemanticCompressorConfig.tiny())),
                        ("stage_a", StageA(StageAConfig.tiny()))):
        stages.save(model, tmp_path / "ckpt" / name)
    latents_root = tmp_path / "latents"
    _submit(ray_cluster, "pipelines.precompute", "configs/precompute-tiny.yaml", f"input={tmp_path / 'images'}",
            f"output={latents_root}", *(f"encoders.{k}={tmp_path / 'ckpt' / k}" for k in ("text", "semantic", "stage_a")),
            "outputs=[text,semantic,stage_a,semantic_image]", BUCKETS, "validation_fraction=0.2")
    (version,) = os.listdir(latents_root)
    latents = str(latents_root / version)

    common = [f"input={latents}", "data.trace=true", *GPU_PATH, "semantic_compressor.train=true",
              "train.micro_batch_size=2", "train.checkpoint_every=4", "validation.every=4", "validation.max_samples=4",
              "sampling.every=8", "sampling.height=32", "sampling.width=32"]
    run_dir = os.path.join(ray_cluster.data_root, "runs", "b-buckets")
    _submit(ray_cluster, "pipelines.train", "configs/train-b-tiny.yaml", "run_name=b-buckets", "train.max_steps=8",
            *common)
    trace_dir = os.path.join(run_dir, TRACE_DIR)
    first_files = {name: os.stat(os.path.join(trace_dir, name)).st_mtime_ns for name in os.listdir(trace_dir)}
    _submit(ray_cluster, "pipelines.train", "configs/train-b-tiny.yaml", "run_name=b-buckets", "train.max_steps=12",
            *common)
    trace = read_trace(run_dir)
    assert sorted(trace) == [(r, s) for r in (0, 1) for s in range(1, 13)]
    # The second invocation resumed from the step-8 checkpoint: steps 1-8's trace files are untouched.
    assert {name: os.stat(os.path.join(trace_dir, name)).st_mtime_ns for name in first_files} == first_files
    assert len(os.listdir(trace_dir)) > len(first_files)

    # Exactly the bucketed reader's stream per rank, the second invocation continuing it from step 9.
    with open(os.path.join(run_dir, "run.json")) as f:
        info = json.load(f)
    seen_buckets = set()
    for rank in (0, 1):
        reader = open_reader(latents, ["uid"], rank=rank, world_size=2, seed=0, batch_size=2, shuffle_window=16)
        stream = iter(reader)
        for step in range(1, 13):
            assert trace[(rank, step)] == list(next(stream)["uid"]), (rank, step)
    for step in range(1, 13):  # one bucket per step, the same on both ranks
        (bucket,) = {expected[u] for r in (0, 1) for u in trace[(r, step)]}
        seen_buckets.add(bucket)
    assert seen_buckets == {"32x32", "16x48", "48x16"}

    client = helpers.mlflow_client(ray_cluster.data_root)
    run_id = info["mlflow_run_id"]
    assert sorted(metric_by_step(client, run_id, "loss")) == list(range(1, 13))
    assert sorted(metric_by_step(client, run_id, "val/loss")) == [4, 8, 12]
    assert any("samples" in a.path for a in client.list_artifacts(run_id, "images"))
    flops = float(client.get_run(run_id).data.params["derived.flops_per_sample"])
    assert flops > 0
    # The export: Stage B and its fine-tuned compressor, which encodes any bucket's pixels.
    from pipelines import export_layout

    export = os.path.join(run_dir, EXPORT_DIR)
    compressor = stages.load(export_layout.resolve_checkpoint(os.path.join(export, "semantic")), expected_kind="semantic")
    with torch.no_grad():
        assert tuple(compressor.encode(torch.rand(1, 3, 32, 96), size=(32, 96)).shape) == (1, 16, 1, 3)
