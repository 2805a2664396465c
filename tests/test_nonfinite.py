"""Non-finite losses and weights: a NaN batch is skipped and counted, the run stops past
`train.max_nonfinite_steps`, and no checkpoint or export ever holds non-finite weights (`stages.load` and
`stages.save` refuse them).

The training runs are the real worker loop with a real DeepSpeed engine (ZeRO-2, gloo, one process:
`fit_local`) on a tiny Stage C whose input holds a few samples with NaN latents.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import stages
from bench.synthetic import write_dataset
from pipelines import config as config_lib
from pipelines import export_layout
from pipelines import latent_shards as ld
from pipelines.training import nonfinite
from pipelines.training.config import EXPORT_DIR, METRICS_FILE, TRACE_DIR, TrainConfig
from pipelines.training.driver import fit_local, plan_run
from stages.checkpoint import CheckpointError, write_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["model.preset=tiny", "train.num_workers=1", "train.micro_batch_size=4", "train.use_gpu=false",
       "train.zero_stage=2", "data.loader_workers=0", "data.shuffle_window=8", "data.trace=true", "train.log_every=1",
       "train.checkpoint_every=3", "train.export_every=0", "sampling.every=0", "validation.every=0",
       "ema.enabled=true", "ema.start_step=1", "ema.every=1", "mlflow.enabled=false"]
BAD = {"u00000003", "u00000021", "u00000029"}  # NaN semantic latents: steps 6 and 8 of the seeded stream


def poisoned_latents(root: str) -> str:
    """A tiny Stage C input (32 samples) in which the samples in BAD have a NaN semantic latent."""
    write_dataset(root, {"text_emb": (77, 32), "semantic": (16, 3, 3)}, 32, 4)
    for name in sorted(n for n in os.listdir(root) if n.endswith(".parquet")):
        path = os.path.join(root, name)
        table = pq.read_table(path)
        semantic = table.column("semantic").combine_chunks()
        values = semantic.flatten().to_numpy(zero_copy_only=False).reshape(len(semantic), -1).copy()
        for row, uid in enumerate(table.column("uid").to_pylist()):
            if uid in BAD:
                values[row] = np.nan
        table = table.set_column(table.schema.get_field_index("semantic"), table.schema.field("semantic"),
                                 ld.tensor_column(values))
        with pq.ParquetWriter(path, table.schema, **ld.parquet_writer_options(table.schema)) as writer:
            writer.write_table(table, row_group_size=4)
    return root


def stage_c_config(tmp_path, latents: str, *overrides: str) -> TrainConfig:
    return config_lib.load(TrainConfig, os.path.join(REPO, "configs", "train-c-tiny.yaml"),
                           [f"data_root={tmp_path}", f"input={latents}", *RUN, *overrides])


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines() if line]


def trace_of(run_dir: str) -> dict[int, list[str]]:
    out = {}
    for name in sorted(os.listdir(os.path.join(run_dir, TRACE_DIR))):
        out.update({r["step"]: r["ids"] for r in read_jsonl(os.path.join(run_dir, TRACE_DIR, name))})
    return out


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return poisoned_latents(str(tmp_path_factory.mktemp("nonfinite") / "latents" / "poisoned"))


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_nan_batches_are_skipped_and_counted_and_the_export_is_finite(tmp_path, latents):
    cfg = stage_c_config(tmp_path, latents, "train.max_steps=10", "train.max_nonfinite_steps=10")
    plan = plan_run(cfg, use_gpu=False)
    fit_local(cfg, plan)
    trace = trace_of(plan.run_dir)
    poisoned_steps = sorted(step for step, ids in trace.items() if BAD & set(ids))
    assert poisoned_steps, "the seeded stream never drew a poisoned sample: the test proves nothing"
    assert len(poisoned_steps) < 10
    metrics = {r.pop("step"): r for r in read_jsonl(os.path.join(plan.run_dir, METRICS_FILE))}
    # Every step with a NaN sample was skipped and counted; no other step was.
    counted = [metrics[s]["nonfinite_steps"] for s in sorted(metrics)]
    expected = [sum(1 for p in poisoned_steps if p <= s) for s in sorted(metrics)]
    assert counted == expected
    # The skipped steps' NaN never reached the logged means (a step with only skipped steps logs no loss).
    assert all(np.isfinite(m["loss"]) for m in metrics.values() if "loss" in m)
    assert all(s not in poisoned_steps for s, m in metrics.items() if "loss" in m)
    # The checkpoints and the export hold finite weights, and the export loads.
    model = stages.load(os.path.join(export_layout.latest_dir(os.path.join(plan.run_dir, EXPORT_DIR)), "stage_c"),
                        expected_kind="stage_c")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_run_stops_past_max_nonfinite_steps(tmp_path, latents):
    cfg = stage_c_config(tmp_path, latents, "train.max_steps=10", "train.max_nonfinite_steps=0",
                         "train.checkpoint_every=1")
    plan = plan_run(cfg, use_gpu=False)
    with pytest.raises(nonfinite.NonFiniteTrainingError, match=r"more than train.max_nonfinite_steps=0") as err:
        fit_local(cfg, plan)
    message = str(err.value)
    assert "loss nan" in message
    stopped_at = int(message.split("the last was step ", 1)[1].split(":", 1)[0])
    named = set(message.split("(samples ", 1)[1].split(")", 1)[0].replace(" ...", "").split(", "))
    assert BAD & named  # the error names the step's samples, a poisoned one among them
    # Every step before it was finite (the limit is 0), and nothing was written after it: the last checkpoint
    # is from a finite step, and no export exists.
    assert stopped_at > 1, "the first step was poisoned: the test shows no checkpoint before it"
    assert not any(BAD & set(ids) for ids in trace_of(plan.run_dir).values())
    steps = [int(n.rsplit("_", 1)[1]) for n in os.listdir(plan.run_dir) if n.startswith("checkpoint_")]
    assert steps and all(s < stopped_at for s in steps)
    assert not os.path.exists(os.path.join(plan.run_dir, EXPORT_DIR))


def test_the_decision_counts_and_stops_past_the_limit():
    steps = nonfinite.NonFiniteSteps(limit=2)
    steps.skip(4, {"loss": torch.tensor(float("nan")), "grad_norm": float("inf")}, ["a", "b"])
    steps.skip(9, {"loss": float("inf")}, [])
    assert steps.skipped == 2 and steps.last == 9
    with pytest.raises(nonfinite.NonFiniteTrainingError, match=r"3 steps .* train.max_nonfinite_steps=2; the last was "
                                                               r"step 11: loss nan, gradient norm inf \(samples x\)"):
        steps.skip(11, {"loss": float("nan"), "grad_norm": float("inf")}, ["x"])


def test_stages_refuse_to_save_or_load_non_finite_weights(tmp_path):
    from stages.stage_c import StageC, StageCConfig

    model = StageC(StageCConfig.tiny())
    good = stages.save(model, tmp_path / "good")
    assert stages.load(good, expected_kind="stage_c") is not None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[key].view(-1)[:3] = float("nan")
    # Written past the check (as a diverged run of an older version would have): load refuses it, naming it.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((good / "config.json").read_text())
    write_safetensors(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"non-finite values \(NaN or inf\), e\.g\. {key} \(3 of"):
        stages.load(bad, expected_kind="stage_c")
    model.load_state_dict(state)
    with pytest.raises(CheckpointError, match="refusing weights from a diverged run"):
        stages.save(model, tmp_path / "never")
    assert not (tmp_path / "never" / "model.safetensors").exists()


def test_the_first_non_finite_tensor_is_named():
    assert nonfinite.first_nonfinite([("a", torch.ones(3)), ("b", torch.tensor([1.0, float("inf")]))]) == "b"
    assert nonfinite.first_nonfinite([("i", torch.tensor([1, 2])), ("e", torch.empty(0))]) is None
