"""The paper's resolution schedule as configs, and the Stage B ratio guard.

Stage B trains at 512 px (16x12x12 semantic, 4x128x128 Stage A) and then 1024 px (16x24x24, 4x256x256),
continued from the first run's export with its step count; Stage C at 12x12 then 24x24 the same way. The
chains run the paper configs themselves (configs/train-{b,b-1024,c,c-24x24}.yaml) on tiny stand-ins of the
same shape ratios (3x3 -> 32x32, then 6x6 -> 64x64), a few steps each, in this process (`fit_local`)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from bench.synthetic import write_dataset
from pipelines import config as config_lib
from pipelines import export_layout
from pipelines.config import ConfigError
from pipelines.precompute import PrecomputeConfig
from pipelines import generate
from stages import sampling
from stages.stage_b import StageBConfig
from pipelines.training import driver
from pipelines.training.config import EXPORT_DIR, METRICS_FILE, TRACE_DIR, TrainConfig
from pipelines.training.driver import fit_local, plan_run
from pipelines.training.specs import StageBSpec
from stages.stage_a import StageAConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (77, 32)  # the tiny text width of the tiny Stage B / C presets
PAPER_TEXT = (77, 1024)
# The paper configs run small: tiny presets, one CPU worker, a few steps. Their recipe (lr 1e-4, 10k warm-up,
# EMA every 100 from step 5000, the ratio guard on) is what runs.
TINY_RUN = ["model.preset=tiny", "train.num_workers=1", "train.micro_batch_size=2", "train.use_gpu=false",
            "data.loader_workers=0", "data.shuffle_window=8", "data.trace=true", "train.log_every=1",
            "train.export_every=0", "sampling.every=0", "validation.every=0", "mlflow.enabled=false"]
LR, WARMUP = 1e-4, 10000  # configs/train-{b,c}*.yaml


def paper_config(name: str, data_root, *overrides: str) -> TrainConfig:
    if name.startswith("train-b"):
        # The paper's Stage B fine-tunes the Semantic Compressor: a tiny one to start from (the synthetic latents
        # record no encoder). A continued run (model.init_from) takes its export's own instead.
        compressor = os.path.join(str(data_root), "tiny-semantic")
        if not os.path.exists(compressor):
            import stages
            from stages.semantic import SemanticCompressor, SemanticCompressorConfig

            stages.save(SemanticCompressor(SemanticCompressorConfig.tiny()), compressor)
        overrides = (f"checkpoints.semantic={compressor}", *overrides)
    return config_lib.load(TrainConfig, os.path.join(REPO, "configs", name), [f"data_root={data_root}", *overrides])


def shapes(semantic: int, stage_a: int | None = None, text=TEXT) -> dict:
    """Stage C's columns; with `stage_a` Stage B's: also the compressor's input pixels (32 px per latent cell)."""
    out = {"text_emb": text, "semantic": (16, semantic, semantic)}
    if stage_a is not None:
        out["stage_a"] = (4, stage_a, stage_a)
        out["semantic_image"] = (3, 32 * semantic, 32 * semantic)
    return out


# --------------------------------------------------------------------------------------------
# The ratio guard


def test_stage_b_stops_at_start_up_on_a_ratio_generation_never_samples(tmp_path):
    # The pair configs/precompute.yaml used to write: 24x24 semantic next to 128x128 Stage A latents.
    mismatched = write_dataset(str(tmp_path / "latents" / "mismatched"), shapes(24, 128, PAPER_TEXT), 8, 4)
    cfg = paper_config("train-b.yaml", tmp_path, f"input={mismatched}")
    assert cfg.data.allow_latent_ratio_mismatch is False
    with pytest.raises(ConfigError, match=r"semantic latents \[16, 24, 24\] and Stage A latents \[4, 128, 128\].*"
                                          r"24x24 semantic latent to a 256x256 Stage B latent.*semantic latents of "
                                          r"12x12 fit.*data.allow_latent_ratio_mismatch: true"):
        plan_run(cfg, use_gpu=False)
    meant = paper_config("train-b.yaml", tmp_path, f"input={mismatched}", "data.allow_latent_ratio_mismatch=true",
                         "train.num_workers=1", "train.micro_batch_size=2")
    assert plan_run(meant, use_gpu=False).shapes["stage_a"] == [4, 128, 128]
    # The key does not change the weights: the run's name is the same with or without it.
    assert driver.run_name(meant) == driver.run_name(paper_config(
        "train-b.yaml", tmp_path, f"input={mismatched}", "train.num_workers=1", "train.micro_batch_size=2"))
    with pytest.raises(ConfigError, match="data.allow_latent_ratio_mismatch"):
        paper_config("train-b.yaml", tmp_path, "data.allow_latent_ratio_mismatch=maybe")


def test_ratio_guard_follows_the_inference_arithmetic():
    check = StageBSpec.check_latent_ratio
    for semantic, stage_a in ((3, 32), (6, 64), (12, 128), (24, 256)):  # stage_b_latent_size: int(h * 10.67)
        check({"semantic": [16, semantic, semantic], "stage_a": [4, stage_a, stage_a]}, "ok")
    check({"semantic": [16, 3, 6], "stage_a": [4, 32, 64]}, "non-square")
    with pytest.raises(ConfigError, match=r"\[4, 16, 16\].*no semantic latent size maps to these Stage A latents"):
        check({"semantic": [16, 4, 4], "stage_a": [4, 16, 16]}, "tiny")  # x10.67 skips 16 (2 -> 21)
    with pytest.raises(ConfigError, match=r"3x3 semantic latent to a 32x32"):
        check({"semantic": [16, 3, 3], "stage_a": [4, 32, 64]}, "one side off")


@pytest.mark.parametrize("precompute, train", [("precompute.yaml", "train-b.yaml"),
                                               ("precompute-1024.yaml", "train-b-1024.yaml"),
                                               ("demo/precompute.yaml", "demo/train-b.yaml")])
def test_precompute_configs_write_the_ratio_their_stage_b_config_trains_at(precompute, train, tmp_path):
    # Encoders are required settings (local paths); any name does for reading the resolutions.
    cfg = config_lib.load(PrecomputeConfig, os.path.join(REPO, "configs", precompute),
                          ["encoders.text=t", "encoders.semantic=s", "encoders.stage_a=a"])
    # EfficientNetV2-S has stride 32 (384 px -> 12x12, tests/test_semantic_text.py); Stage A downsamples by 4.
    # Every aspect-ratio bucket too (precompute-1024.yaml): generation at the bucket's size samples its shapes.
    downscale = StageAConfig.paper().downscale
    for bucket in cfg.bucket_sizes():
        semantic = [side // 32 for side in bucket["semantic"]]
        stage_a = [side // downscale for side in bucket["stage_a"]]
        StageBSpec.check_latent_ratio({"semantic": [16, *semantic], "stage_a": [4, *stage_a]}, precompute)
        assert sampling.stage_c_latent_size(*bucket["stage_a"]) == tuple(semantic)
        generate.check_image_size(*bucket["stage_a"], StageBConfig.paper().latent_multiple, downscale)
    overrides = ["model.init_from=x"] if train == "train-b-1024.yaml" else []
    assert paper_config(train, tmp_path, *overrides).data.allow_latent_ratio_mismatch is False


# --------------------------------------------------------------------------------------------
# Continuing a run's step count


def _metrics(run_dir: str) -> dict[int, dict]:
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        return {record.pop("step"): record for record in map(json.loads, filter(None, f.read().splitlines()))}


def _trace(run_dir: str) -> dict[int, list[str]]:
    out = {}
    for name in sorted(os.listdir(os.path.join(run_dir, TRACE_DIR))):
        with open(os.path.join(run_dir, TRACE_DIR, name)) as f:
            out.update({r["step"]: r["ids"] for r in map(json.loads, filter(None, f.read().splitlines()))})
    return out


def _stream(uri: str, seed: int, batches: int) -> list[list[str]]:
    """The first `batches` micro-batches of a fresh rank-0 stream of `uri` (the reader's ordering contract)."""
    from pipelines.latent_shards import LatentDataset

    dataset = LatentDataset(uri, ["uid"], rank=0, world_size=1, seed=seed, start_offset=0, batch_size=2,
                            shuffle_window=8, infinite=True)
    iterator = iter(dataset)
    return [list(next(iterator)["uid"]) for _ in range(batches)]


def _export_weights(run_dir: str, kind: str) -> dict[str, torch.Tensor]:
    latest = export_layout.latest_dir(os.path.join(run_dir, EXPORT_DIR))
    return load_file(os.path.join(latest, kind, "model.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _chain(tmp_path, stage: str, first: str, second: str, kind: str) -> dict:
    """Phase 1 (the first paper config) for 4 steps, then phase 2 (the second) continued from its export to
    step 7. Phase 2 seeds its own initialisation differently (data.seed=1), so loaded weights are recognisable."""
    with_stage_a = stage == "b"
    low = write_dataset(str(tmp_path / "latents" / "low"), shapes(3, 32 if with_stage_a else None), 16, 4)
    high = write_dataset(str(tmp_path / "latents" / "high"), shapes(6, 64 if with_stage_a else None), 16, 4)
    cfg1 = paper_config(first, tmp_path, f"input={low}", "run_name=phase-1", "train.max_steps=4", *TINY_RUN)
    plan1 = plan_run(cfg1, use_gpu=False)
    assert plan1.start_step == 0
    fit_local(cfg1, plan1)
    init_from = os.path.join(plan1.run_dir, EXPORT_DIR, kind)
    phase2 = [f"input={high}", "run_name=phase-2", f"model.init_from={init_from}", "data.seed=1", *TINY_RUN]
    cfg2 = paper_config(second, tmp_path, *phase2, "train.max_steps=7")
    assert cfg2.model.continue_step_count is True
    plan2 = plan_run(cfg2, use_gpu=False)
    assert plan2.start_step == 4
    if with_stage_a:  # the compressor fine-tuned in phase 1 continues, on 192 px inputs (6x6 latents)
        assert plan2.shapes["semantic_image"] == [3, 192, 192]
        assert plan2.compressor_init == os.path.join(export_layout.latest_dir(os.path.join(plan1.run_dir, EXPORT_DIR)),
                                                     "semantic")
    else:
        assert plan2.shapes["semantic"] == [16, 6, 6]
    fit_local(cfg2, plan2)
    return {"low": low, "high": high, "plan1": plan1, "plan2": plan2, "phase2": phase2}


def _check_continued(chain: dict, kind: str, model_class, config_class) -> None:
    run1, run2 = chain["plan1"].run_dir, chain["plan2"].run_dir
    metrics1, metrics2 = _metrics(run1), _metrics(run2)
    assert sorted(metrics1) == [1, 2, 3, 4] and sorted(metrics2) == [5, 6, 7]
    # The LR schedule goes on from step 4: the rate after step s is lr * (s + 1) / warmup in both phases
    # (a restarted count would log 2 / warmup at step 5).
    for metrics in (metrics1, metrics2):
        for step, record in metrics.items():
            assert record["lr"] == pytest.approx(LR * (step + 1) / WARMUP, rel=1e-6), step
            assert record["loss"] == record["loss"]  # finite, not NaN
    assert metrics2[7]["samples_seen"] == 6  # this run's samples: (7 - 4) x 2
    assert export_layout.latest_step(os.path.join(run2, EXPORT_DIR)) == 7
    with open(os.path.join(export_layout.latest_dir(os.path.join(run2, EXPORT_DIR)), "export.json")) as f:
        assert json.load(f)["step"] == 7
    # Phase 2 started from phase 1's weights: 3 steps at ~6e-8 later they are still those, not its own init.
    phase1, phase2 = _export_weights(run1, kind), _export_weights(run2, kind)
    torch.manual_seed(1)  # what phase 2 would have started from (seed_everything(data.seed=1))
    own_init = model_class(config_class.tiny()).state_dict()
    assert _max_difference(phase2, phase1) < 1e-5
    assert _max_difference(phase2, {k: own_init[k] for k in phase2}) > 1e-2
    # Its data stream starts at the first sample of its own input, not 4 steps in.
    assert [_trace(run2)[step] for step in (5, 6, 7)] == _stream(chain["high"], seed=1, batches=3)


def test_stage_b_schedule_512_then_1024_px_continues_the_step_count(tmp_path):
    from stages.stage_b import StageB, StageBConfig

    chain = _chain(tmp_path, "b", "train-b.yaml", "train-b-1024.yaml", "stage_b")
    _check_continued(chain, "stage_b", StageB, StageBConfig)
    # Both phases fine-tuned the compressor (the paper's configs) and exported it next to Stage B; phase 2
    # started from phase 1's export (plan2.compressor_init, checked in _chain). Weight movement is checked by the
    # workflow test: at these steps the exports hold the EMA weights, which are the initial ones before step 5000.
    tuned1, tuned2 = (_export_weights(chain[p].run_dir, "semantic") for p in ("plan1", "plan2"))
    assert _max_difference(tuned2, tuned1) < 1e-5
    # A resume keeps the start: raising max_steps continues from the step-7 checkpoint with the data at
    # sample (7 - 4) x 2 of the stream.
    cfg = paper_config("train-b-1024.yaml", tmp_path, *chain["phase2"], "train.max_steps=9")
    plan = plan_run(cfg, use_gpu=False)
    assert plan.start_step == 4
    fit_local(cfg, plan)
    assert sorted(_metrics(plan.run_dir)) == [5, 6, 7, 8, 9]
    trace = _trace(plan.run_dir)
    assert [trace[8], trace[9]] == _stream(chain["high"], seed=1, batches=5)[3:]


def test_stage_c_schedule_12_then_24_continues_the_step_count(tmp_path):
    from stages.stage_c import StageC, StageCConfig

    chain = _chain(tmp_path, "c", "train-c.yaml", "train-c-24x24.yaml", "stage_c")
    _check_continued(chain, "stage_c", StageC, StageCConfig)


def _write_export(export_root, step: int) -> None:
    """A Stage B run's export at `step` in the layout training writes (pipelines.training.export)."""
    import stages
    from stages.stage_b import StageB, StageBConfig

    stages.save(StageB(StageBConfig.tiny()), export_root / export_layout.step_name(step) / "stage_b")
    with open(export_root / export_layout.step_name(step) / export_layout.EXPORT_RECORD, "w") as f:
        json.dump({"stage": "b", "step": step, "kind": "stage_b"}, f)
    export_layout.set_latest(str(export_root), step)


def test_continuing_needs_an_export_of_the_same_stage_short_of_max_steps(tmp_path):
    import stages
    from stages.stage_b import StageB, StageBConfig

    with pytest.raises(ConfigError, match="model.continue_step_count: true needs model.init_from"):
        paper_config("train-b-1024.yaml", tmp_path)
    data = write_dataset(str(tmp_path / "latents" / "v"), shapes(3, 32), 8, 4)
    plain = tmp_path / "plain_checkpoint"  # a stages checkpoint that is no run's export (no export.json)
    stages.save(StageB(StageBConfig.tiny()), plain)
    with pytest.raises(ConfigError, match=r"model.continue_step_count: .*plain_checkpoint is not a training run's "
                                          r"export"):
        plan_run(paper_config("train-b-1024.yaml", tmp_path, f"input={data}", f"model.init_from={plain}",
                              *TINY_RUN), use_gpu=False)
    export = tmp_path / "runs" / "b-run" / EXPORT_DIR
    _write_export(export, 5)
    continued = paper_config("train-b-1024.yaml", tmp_path, f"input={data}", f"model.init_from={export}/stage_b",
                             *TINY_RUN, "train.max_steps=5")
    with pytest.raises(ConfigError, match="train.max_steps: 5 is not beyond step 5"):
        plan_run(continued, use_gpu=False)
    with pytest.raises(ConfigError, match="is an export of a Stage B run; this config trains Stage C"):
        plan_run(paper_config("train-c-24x24.yaml", tmp_path, f"input={data}", f"model.init_from={export}/stage_b",
                              *TINY_RUN), use_gpu=False)
    # Settings that change the run: continuing is in its version; off, the version is what it was before the
    # key existed (left out of the hash at its default).
    base = paper_config("train-b.yaml", tmp_path, f"input={data}", f"model.init_from={export}/stage_b")
    on = paper_config("train-b.yaml", tmp_path, f"input={data}", f"model.init_from={export}/stage_b",
                      "model.continue_step_count=true")
    assert "continue_step_count" not in driver.hashed_settings(base)["model"]
    assert driver.run_name(base) != driver.run_name(on)


def test_a_resumed_run_keeps_the_step_it_started_from(tmp_path):
    """run.json pins the start: the first run's later exports do not move a started continuation."""
    data = write_dataset(str(tmp_path / "latents" / "v"), shapes(3, 32), 8, 4)
    export = tmp_path / "runs" / "b-512" / EXPORT_DIR
    _write_export(export, 5)
    overrides = [f"input={data}", f"model.init_from={export}/stage_b", *TINY_RUN, "train.max_steps=20"]
    cfg = paper_config("train-b-1024.yaml", tmp_path, *overrides, "run_name=b-1024")
    plan = plan_run(cfg, use_gpu=False)
    assert plan.start_step == 5
    driver.record_run(cfg, plan, None)
    _write_export(export, 9)  # the first run trained on
    assert plan_run(cfg, use_gpu=False).start_step == 5
    fresh = paper_config("train-b-1024.yaml", tmp_path, *overrides, "run_name=another")
    assert plan_run(fresh, use_gpu=False).start_step == 9
