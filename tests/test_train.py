"""The `train` phase for Stage C and Stage B: real Ray jobs, DeepSpeed engines and MLflow, tiny models.

Every end-to-end run is a `ray job submit` against the session's local cluster (a head + one worker
node, so the two training workers may land on different nodes, sharing storage through the local
filesystem). Runs are module-scoped fixtures so each is paid for once:

* `c_reference`: Stage C, 2 workers, ZeRO-2, 24 steps uninterrupted (the reference for the resume test).
* `c_resumed`:   the same config with worker rank 1 SIGKILLed before step 16 (Ray Train restarts the group
                 from the step-12 checkpoint). A stopped run rerun by the phase resumes the same way; that is
                 checked in-process (test_validation, test_train_tracking), without a second Ray job here.
* `c_zero3`:     the reference config under ZeRO-3.
* Stage B:       2 workers, ZeRO-2, 24 steps.
"""

from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
import pytest
import torch

from pipelines import config as config_lib
from pipelines import export_layout
from pipelines import manifest as manifest_lib
from pipelines import train
from pipelines.config import ConfigError
from pipelines.training.checkpoint import TRAIN_STATE
from pipelines.training.config import COLLECTIVES_DIR, EXPORT_DIR, TRACE_DIR, TrainConfig
from pipelines.training.driver import plan_run
from pipelines.training.engine import warmup_then_constant

import helpers

TINY = {"c": "configs/train-c-tiny.yaml", "b": "configs/train-b-tiny.yaml", "a": "configs/train-a-tiny.yaml"}
STEPS = 24


# --------------------------------------------------------------------------------------------
# Inputs and helpers


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-inputs")
    companions = helpers.write_companions(str(root / "companions"))
    # The manifest names the encoders the latents were computed with: text and stage_a.
    latents = helpers.write_latent_dataset(
        str(root / "latents" / "v1"), companions={k: companions[k] for k in ("text", "stage_a")})
    return {"latents": latents, "companions": companions, "root": str(root)}


def submit_train(cluster, stage: str, run_name: str, *overrides: str, timeout: float = 900) -> dict:
    args = ["python", "-m", "pipelines.train", "--config", TINY[stage], "--set", f"run_name={run_name}"]
    for item in overrides:
        args += ["--set", item]
    status, logs = cluster.submit(args, timeout=timeout)
    assert status == "SUCCEEDED", f"train job {run_name} ended {status}:\n{logs[-6000:]}"
    run_dir = os.path.join(cluster.data_root, "runs", run_name)
    with open(os.path.join(run_dir, "run.json")) as f:
        info = json.load(f)
    return {"run_dir": run_dir, "info": info, "logs": logs, "name": run_name}


def metric_by_step(client, run_id: str, key: str) -> dict[int, float]:
    """Last logged value per step (a restarted worker group logs the replayed steps again)."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def read_trace(run_dir: str) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> sample ids, from the data_trace files (later files win)."""
    out: dict[tuple[int, int], list[str]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, TRACE_DIR, "*.jsonl"))):
        rank = int(os.path.basename(path).split("-")[1])
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                out[(rank, record["step"])] = record["ids"]
    return out


def load_export(run_dir: str, kind: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(export_layout.resolve_checkpoint(os.path.join(run_dir, EXPORT_DIR, kind)),
                                  "model.safetensors"))


# The GPU path on CPU: bf16 (fp32 weights + autocast, as on GPUs) and every torch.distributed collective
# audited for tensors off the training device (the NCCL failure mode).
GPU_PATH = ("train.precision=bf16", "train.audit_collectives=true")


def common_overrides(inputs, *extra: str) -> list[str]:
    return [f"input={inputs['latents']}", "data.trace=true", *GPU_PATH, *extra]


def audited_calls(run_dir: str, world: int) -> list[dict[str, int]]:
    """Each rank's collective call counts (the audit raised, and the job failed, on a wrong device)."""
    calls = []
    for rank in range(world):
        with open(os.path.join(run_dir, COLLECTIVES_DIR, f"rank-{rank:05d}.json")) as f:
            calls.append(json.load(f)["calls"])
    return calls


# --------------------------------------------------------------------------------------------
# Fast checks (no Ray)


def test_config_errors_name_the_key(inputs, tmp_path):
    base = [f"input={inputs['latents']}", f"data_root={tmp_path}"]
    with pytest.raises(ConfigError, match="model.preset"):
        plan_run(config_lib.load(TrainConfig, TINY["c"], base + ["model.preset=huge"]), use_gpu=False)
    with pytest.raises(ConfigError, match=r"model.overrides.c_widht"):
        plan_run(config_lib.load(TrainConfig, TINY["c"], base + ["model.overrides={c_widht: 3}"]),
                       use_gpu=False)
    # Stage C built for 64-wide text cannot read 32-wide embeddings: the error names column and shapes.
    with pytest.raises(ConfigError, match=r"text_emb has shape \(77, 32\).*64"):
        plan_run(config_lib.load(TrainConfig, TINY["c"], base + ["model.overrides={c_cond: 64}"]),
                       use_gpu=False)
    with pytest.raises(ConfigError, match="train.zero_stage"):
        config_lib.load(TrainConfig, TINY["c"], base + ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="input: required"):
        plan_run(config_lib.load(TrainConfig, TINY["c"], [f"data_root={tmp_path}"]), use_gpu=False)


def test_plan_and_run_naming(inputs, tmp_path):
    cfg = config_lib.load(TrainConfig, TINY["b"], [f"input={inputs['latents']}", f"data_root={tmp_path}"])
    plan = plan_run(cfg, use_gpu=False)
    assert plan.shapes == {"text_emb": [77, 32], "semantic": [16, 4, 4], "stage_a": [4, 16, 16]}
    assert plan.num_samples == 48 and not plan.bf16
    # Companions come from the latents' manifest (text, stage_a); the config adds stage_c.
    assert set(plan.companions) == {"text", "stage_a"}
    assert plan.run_dir == train.output_dir(cfg) and os.path.basename(plan.run_dir).startswith("b-")
    # Settings that do not change the weights keep the run name (so raising max_steps resumes);
    # a different learning rate is a different run.
    longer = config_lib.load(TrainConfig, TINY["b"], [f"input={inputs['latents']}", f"data_root={tmp_path}",
                                                           "train.max_steps=1000", "sampling.every=0"])
    other = config_lib.load(TrainConfig, TINY["b"], [f"input={inputs['latents']}", f"data_root={tmp_path}",
                                                          "optim.lr=0.1"])
    assert train.output_dir(longer) == train.output_dir(cfg) != train.output_dir(other)


def test_warmup_then_constant():
    factor = warmup_then_constant(4)
    assert [factor(n) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_then_constant(0)(0) == 1.0


def test_phase_names_the_run_and_skips_a_finished_one(inputs, tmp_path):
    cfg = config_lib.load(TrainConfig, TINY["c"], [f"input={inputs['latents']}", f"data_root={tmp_path}"])
    run_dir = train.output_dir(cfg)
    assert train.PHASE.version(cfg) == os.path.basename(run_dir) and run_dir.startswith(str(tmp_path / "runs"))
    named = config_lib.load(TrainConfig, TINY["c"], [f"input={inputs['latents']}", f"data_root={tmp_path}",
                                                     "run_name=mine"])
    assert train.output_dir(named) == str(tmp_path / "runs" / "mine")
    # A manifest that reached max_steps is a finished run: run() returns it without starting Ray.
    manifest_lib.write(run_dir, phase="train", cfg=cfg, input_uri=inputs["latents"], input_id="x",
                       counts={"steps": 12, "max_steps": 12}, extra={"run_name": "r", "export": "e"})
    assert not train.is_complete(cfg, run_dir)  # max_steps is 24: the run resumes
    done = config_lib.load(TrainConfig, TINY["c"], [f"input={inputs['latents']}", f"data_root={tmp_path}",
                                                    "train.max_steps=12"])
    assert train.output_dir(done) == run_dir and train.is_complete(done, run_dir)
    result = train.run(done)
    assert result.skipped and result.counts["steps"] == 12
    assert result.details["run_dir"] == run_dir and result.details["step"] == 12


def test_training_package_does_not_import_the_phase_module():
    """pipelines.training.* never imports pipelines.train (no import cycle with the phase module)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "pipelines" / "training"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "pipelines":
                names = [f"pipelines.{a.name}" for a in node.names]
            assert "pipelines.train" not in names, f"{path.name} imports pipelines.train"


# --------------------------------------------------------------------------------------------
# End-to-end runs (Ray jobs)


@pytest.fixture(scope="module")
def c_reference(ray_cluster, inputs):
    return submit_train(ray_cluster, "c", "c-reference",
                        *common_overrides(inputs, f"checkpoints.stage_b={inputs['companions']['stage_b']}"))


@pytest.fixture(scope="module")
def c_resumed(ray_cluster, inputs):
    return submit_train(ray_cluster, "c", "c-resumed",
                        *common_overrides(inputs, "fault.kill_rank=1", "fault.kill_at_step=16"))


@pytest.mark.e2e
def test_stage_c_job_trains_exports_logs_and_generates(ray_cluster, c_reference, tmp_path):
    run_dir, run_id = c_reference["run_dir"], c_reference["info"]["mlflow_run_id"]
    client = helpers.mlflow_client(ray_cluster.data_root)
    run = client.get_run(run_id)
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.preset"] == "tiny"
    assert run.data.params["derived.world_size"] == "2"
    assert run.data.params["train.precision"] == "bf16" and run.data.params["derived.precision"] == "bf16"
    # DeepSpeed's gradient all-reduces/broadcasts and our metric reductions all got tensors on the device.
    for calls in audited_calls(run_dir, 2):
        assert calls["all_reduce"] > STEPS and calls["broadcast"] > 0, calls
    assert run.data.tags["wurst.input_phase"] == "precompute" and "wurst.input_manifest_hash" in run.data.tags
    loss = metric_by_step(client, run_id, "loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = np.mean([loss[s] for s in range(1, 7)]), np.mean([loss[s] for s in range(STEPS - 5, STEPS + 1)])
    assert last < 0.8 * first, f"loss did not decrease: first 6 steps {first:.4f}, last 6 {last:.4f}"
    for key in ("mse", "lr", "grad_norm", "samples_per_s", "tflops_per_worker"):
        assert metric_by_step(client, run_id, key), f"metric {key} not logged"
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any(p.endswith(".png") and "samples" in p for p in images), images

    # Checkpoints: Ray keeps the last 2 (it deletes older ones asynchronously), each with every rank's
    # DeepSpeed shards, RNG and EMA shards.
    deadline = time.time() + 60
    while len(checkpoints := sorted(glob.glob(os.path.join(run_dir, "checkpoint_*/")))) > 2 and time.time() < deadline:
        time.sleep(1)
    assert len(checkpoints) == 2, checkpoints
    latest = checkpoints[-1]
    with open(os.path.join(latest, TRAIN_STATE)) as f:
        assert json.load(f)["step"] == STEPS
    for rank in (0, 1):
        assert os.path.exists(os.path.join(latest, "model", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        assert os.path.exists(os.path.join(latest, "ema", f"rank-{rank:05d}.safetensors"))

    # The export is a complete generation set: our Stage C (EMA) + the Stage B/A and text it was trained with.
    # Kept per export step, with a pointer to the newest: generate takes the export root (-> latest).
    export = os.path.join(run_dir, EXPORT_DIR)
    assert export_layout.latest_step(export) == STEPS and STEPS in export_layout.steps(export)
    with open(os.path.join(export_layout.latest_dir(export), "export.json")) as f:
        record = json.load(f)
    assert record["step"] == STEPS and record["weights"] == "ema"
    from pipelines import generate

    out = tmp_path / "generated"
    assert generate.main(["--checkpoints", export, "--prompt", "a picture of class 1", "--n", "2", "--height", "128",
                          "--width", "128", "--steps-c", "3", "--steps-b", "2", "--out", str(out)]) in (0, None)
    assert (out / "grid.png").exists() and (out / "0001.png").exists()


@pytest.mark.e2e
@pytest.mark.slow_e2e  # the default suite trains + exports Stage B as a Ray job in test_workflow
def test_stage_b_job_trains_and_exports(ray_cluster, inputs, tmp_path):
    result = submit_train(ray_cluster, "b", "b-reference",
                          *common_overrides(inputs, f"checkpoints.stage_c={inputs['companions']['stage_c']}"))
    client = helpers.mlflow_client(ray_cluster.data_root)
    run_id = result["info"]["mlflow_run_id"]
    loss = metric_by_step(client, run_id, "loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = np.mean([loss[s] for s in range(1, 7)]), np.mean([loss[s] for s in range(STEPS - 5, STEPS + 1)])
    assert last < 0.8 * first, f"loss did not decrease: first 6 steps {first:.4f}, last 6 {last:.4f}"
    assert any("samples" in a.path for a in client.list_artifacts(run_id, "images"))
    export = os.path.join(result["run_dir"], EXPORT_DIR)
    import stages

    model = stages.load(export_layout.resolve_checkpoint(os.path.join(export, "stage_b")), expected_kind="stage_b")
    assert model.config.c_hidden == [16, 32]
    from pipelines import generate

    out = tmp_path / "generated"
    generate.main(["--checkpoints", export, "--prompt", "x", "--height", "128", "--width", "128",
                   "--steps-c", "2", "--steps-b", "2", "--out", str(out)])
    assert (out / "grid.png").exists()


@pytest.mark.e2e
def test_resume_is_exact_after_a_killed_worker(ray_cluster, c_reference, c_resumed):
    second = c_resumed
    # The run lost a worker to SIGKILL before step 16 and still finished all steps.
    assert os.path.exists(os.path.join(second["run_dir"], ".fault-injected-step-16"))
    client = helpers.mlflow_client(ray_cluster.data_root)
    reference = metric_by_step(client, c_reference["info"]["mlflow_run_id"], "loss")
    resumed = metric_by_step(client, second["info"]["mlflow_run_id"], "loss")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    diffs = [abs(resumed[s] - reference[s]) for s in range(1, STEPS + 1)]
    assert max(diffs) <= 1e-6, f"losses differ from the uninterrupted run: {diffs}"

    # Data order: the same samples at every step on every rank, and each epoch covers the dataset once.
    ref_trace, res_trace = read_trace(c_reference["run_dir"]), read_trace(second["run_dir"])
    assert sorted(res_trace) == sorted(ref_trace) == [(r, s) for r in (0, 1) for s in range(1, STEPS + 1)]
    assert res_trace == ref_trace
    steps_per_epoch = 48 // 2 // 4
    for epoch in range(STEPS // steps_per_epoch):
        steps = range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
        seen = [i for r in (0, 1) for s in steps for i in res_trace[(r, s)]]
        assert len(seen) == len(set(seen)) == 48, f"epoch {epoch}: samples repeated or skipped"

    # The resumed run's EMA export equals the uninterrupted run's.
    ref, res = load_export(c_reference["run_dir"], "stage_c"), load_export(second["run_dir"], "stage_c")
    assert max(float((ref[k] - res[k]).abs().max()) for k in ref) <= 1e-6


@pytest.mark.e2e
@pytest.mark.slow_e2e  # ~100 s: a third Stage C job; run by `make test-all`
def test_zero3_with_ema_matches_zero2(ray_cluster, inputs, c_reference):
    result = submit_train(ray_cluster, "c", "c-zero3", *common_overrides(inputs, "train.zero_stage=3"))
    client = helpers.mlflow_client(ray_cluster.data_root)
    reference = metric_by_step(client, c_reference["info"]["mlflow_run_id"], "loss")
    zero3 = metric_by_step(client, result["info"]["mlflow_run_id"], "loss")
    assert max(abs(zero3[s] - reference[s]) for s in reference) < 1e-4
    # The EMA export is gathered from the ZeRO-3 partitions: complete, and equal to the ZeRO-2 run's.
    ref, z3 = load_export(c_reference["run_dir"], "stage_c"), load_export(result["run_dir"], "stage_c")
    assert set(ref) == set(z3)
    for key in ref:
        assert z3[key].shape == ref[key].shape
        assert torch.allclose(z3[key], ref[key], atol=1e-4, rtol=1e-3), key
