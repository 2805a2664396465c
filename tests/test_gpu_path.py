"""The trainer's GPU path, exercised on CPU: the collective-device audit (real torch.distributed
functions on a real gloo group), the precision policy and ZeRO settings handed to DeepSpeed, per-step
exports with a latest pointer, and the no-Ray bench / smoke scripts in their --tiny CPU mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from pipelines import config as config_lib
from pipelines import export_layout
from pipelines.config import ConfigError
from pipelines.training.collectives import CollectiveDeviceError, device_audit
from pipelines.training.config import TrainConfig
from pipelines.training.driver import resolve_precision
from pipelines.training.engine import engine_config
from pipelines.training.metrics import IntervalMetrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gloo_world_of_one():
    """A real gloo process group of one rank (in-memory store: no port)."""
    if dist.is_initialized():  # another test's LocalSession left its gloo group of one (kept on purpose)
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_audit_passes_tensors_on_the_training_device_to_the_real_collectives(gloo_world_of_one):
    real_all_reduce = dist.all_reduce
    with device_audit(torch.device("cpu")) as audit:
        assert dist.all_reduce is not real_all_reduce  # instrumented, not replaced: the call below runs
        values = torch.tensor([1.5, 2.5])
        dist.all_reduce(values)
        gathered = [torch.zeros(2)]
        dist.all_gather(gathered, values)
        dist.broadcast(values, src=0)
    assert dist.all_reduce is real_all_reduce  # restored after the block
    assert gathered[0].tolist() == [1.5, 2.5]  # the real all_gather ran
    assert audit.calls == {"all_reduce": 1, "all_gather": 1, "broadcast": 1}


def test_audit_names_the_collective_and_the_caller_for_a_tensor_off_the_training_device(gloo_world_of_one):
    # The NCCL failure mode (a CPU tensor in a CUDA run) with the training device declared as another
    # device type: the audit raises before the backend sees the tensor.
    with device_audit(torch.device("meta")):
        with pytest.raises(CollectiveDeviceError, match=r"all_reduce got a \(2,\) torch.float64 tensor on cpu.*"
                                                         r"training device is meta.*test_gpu_path.py"):
            dist.all_reduce(torch.zeros(2, dtype=torch.float64))
        with pytest.raises(CollectiveDeviceError, match="all_gather"):  # tensors inside lists are checked too
            dist.all_gather([torch.empty(2, device="meta")], torch.zeros(2))


def test_interval_metrics_are_reduced_on_the_training_device():
    # "meta" stands in for cuda:0: the tensor the all-reduce gets must be built on the metrics' device,
    # whatever device the per-step values were summed on.
    metrics = IntervalMetrics(world=1, samples_per_step=4, num_samples=100, device=torch.device("meta"))
    metrics.add({"loss": torch.tensor(0.5, device="meta"), "lr": 1e-4}, seconds=0.2)
    metrics.add({"loss": torch.tensor(0.25, device="meta"), "lr": 1e-4}, seconds=0.3)
    keys, values = metrics.local_means()
    assert keys == ["loss", "lr"] and values.device.type == "meta" and values.dtype == torch.float64
    assert values.shape == (3,)
    on_cpu = IntervalMetrics(world=1, samples_per_step=4, num_samples=100, device=torch.device("cpu"))
    for loss in (0.5, 0.25):
        on_cpu.add({"loss": torch.tensor(loss), "lr": 1e-4}, seconds=0.25)
    out = on_cpu.reduce(step=2)
    assert out["loss"] == pytest.approx(0.375) and out["samples_per_s"] == pytest.approx(16.0)
    assert out["samples_seen"] == 8 and out["epoch"] == pytest.approx(0.08)


def test_precision_auto_is_bf16_autocast_on_gpu_and_fp32_on_cpu():
    assert resolve_precision("auto", use_gpu=True) == "bf16"
    assert resolve_precision("auto", use_gpu=False) == "fp32"
    assert resolve_precision("bf16", use_gpu=False) == "bf16"  # bf16 on CPU is allowed (the tests run it)
    with pytest.raises(ConfigError, match="train.precision"):
        config_lib.load(TrainConfig, None, ["train.precision=fp16"])


def test_deepspeed_config_bf16_keeps_fp32_weights_and_reductions():
    common = dict(micro_batch_size=4, grad_accum_steps=2, world_size=8, grad_clip=1.0)
    autocast = engine_config(zero_stage=2, precision="bf16", **common)
    assert autocast["bf16"] == {"enabled": False}  # fp32 master weights, fp32 gradient buffers
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "communication_data_type" not in autocast
    weights = engine_config(zero_stage=2, precision="bf16-weights", **common)
    assert weights["bf16"] == {"enabled": True} and weights["communication_data_type"] == "fp32"
    assert "torch_autocast" not in weights
    zero = autocast["zero_optimization"]
    assert zero["overlap_comm"] and zero["contiguous_gradients"] and zero["reduce_scatter"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 100_000_000
    assert autocast["train_batch_size"] == 4 * 2 * 8
    z3 = engine_config(zero_stage=3, precision="fp32", overlap_comm=False, bucket_size=5_000_000, **common)
    assert z3["zero_optimization"]["overlap_comm"] is False and z3["zero_optimization"]["reduce_bucket_size"] == 5e6
    assert "allgather_bucket_size" not in z3["zero_optimization"]  # a stage-2 setting
    with pytest.raises(ValueError, match="fp16"):
        engine_config(zero_stage=2, precision="fp16", **common)


def test_exponent_floats_from_yaml_1_1_are_floats_and_bad_ones_name_the_key():
    cfg = config_lib.load(TrainConfig, None, ["optim.lr=1e-4"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="optim.lr"):
        config_lib.load(TrainConfig, None, ["optim.lr=1e-4x"])


def _fake_checkpoint(path, tag: str) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"tag": tag}, f)


def test_exports_are_kept_per_step_and_paths_resolve_to_the_latest(tmp_path):
    root = str(tmp_path / "run" / "export")
    for step in (10, 20):
        _fake_checkpoint(os.path.join(export_layout.step_dir(root, step), "stage_c"), f"c{step}")
        with open(os.path.join(export_layout.step_dir(root, step), export_layout.EXPORT_RECORD), "w") as f:
            json.dump({"step": step}, f)
        export_layout.set_latest(root, step)
    _fake_checkpoint(os.path.join(export_layout.companions_dir(root), "text"), "text")

    assert export_layout.steps(root) == [10, 20] and export_layout.latest_step(root) == 20
    assert export_layout.export_set(root) == export_layout.step_dir(root, 20)
    # `<run>/export/<kind>`: the latest export's weights; `<run>/export/<step>/<companion>`: the run's copy.
    assert export_layout.resolve_checkpoint(os.path.join(root, "stage_c")) == \
        os.path.join(export_layout.step_dir(root, 20), "stage_c")
    assert export_layout.resolve_checkpoint(os.path.join(export_layout.step_dir(root, 10), "stage_c")) == \
        os.path.join(export_layout.step_dir(root, 10), "stage_c")
    assert export_layout.resolve_checkpoint(os.path.join(export_layout.step_dir(root, 10), "text")) == \
        os.path.join(export_layout.companions_dir(root), "text")
    assert export_layout.resolve_checkpoint(os.path.join(root, "text")) == \
        os.path.join(export_layout.companions_dir(root), "text")
    elsewhere = str(tmp_path / "not-an-export" / "stage_b")
    assert export_layout.resolve_checkpoint(elsewhere) == elsewhere  # unchanged: the caller reports it


def _run_script(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
def test_gpu_smoke_script_tiny_trains_checkpoints_restores_and_matches_an_uninterrupted_run():
    done = _run_script("bench/gpu_smoke.py", "--tiny")
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["precision"] == "bf16"
    assert sorted(map(int, summary["losses"])) == [5, 10, 15, 20, 25]
    assert summary["max_loss_difference_vs_uninterrupted"] <= 1e-6
    assert summary["collectives"]["all_reduce"] > 0  # every one of them audited on the training device
    assert summary["exports"] == [20, 25]


@pytest.mark.slow_e2e  # the bench script; the smoke script above runs the same training step in the default suite
def test_train_bench_tiny_times_the_real_step_and_reports_throughput():
    done = _run_script("bench/train.py", "--tiny", "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows, done.stdout
    for row in rows:
        assert row["samples_per_s"] > 0 and row["gflop_per_sample"] > 0
