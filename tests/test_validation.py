"""The held-out validation split and the validation loss: precompute's split rule (a hash of the uid,
independent of sharding and chunking), the readers of both splits, the interval metrics' ratios, and the
trainer's val/* and train/loss_t* metrics through `fit_local` (one process, no Ray) for tiny Stage C and
Stage B runs, including a stopped-and-resumed run."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import config as config_lib
from pipelines import latent_shards as ld
from pipelines import precompute, precompute_cpu
from pipelines.config import ConfigError
from pipelines.latent_shards import LatentDatasetError
from pipelines.training.config import METRICS_FILE, TRACE_DIR, RunPlan, TrainConfig
from pipelines.training.driver import fit_local, plan_run
from pipelines.training.session import Session, free_port
from pipelines.training.metrics import IntervalMetrics, Ratio, bucket_edges, timestep_label

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = ("0.1", "0.3", "0.5", "0.7", "0.9")


# --------------------------------------------------------------------------------------------
# The rule


def test_the_split_is_a_fixed_hash_of_the_uid_alone():
    uids = [f"uid-{i:05d}" for i in range(200)]
    held_out = ld.is_validation(uids, 0.05)
    # Golden: a change of the rule would silently move samples between the splits of every new version.
    assert np.flatnonzero(held_out).tolist() == [3, 32, 50, 81, 126, 149, 169]
    # Per uid, whatever the order or the company: a shuffled table, or the table cut into pieces.
    shuffled = random.Random(0).sample(uids, len(uids))
    assert dict(zip(shuffled, ld.is_validation(shuffled, 0.05).tolist())) == dict(zip(uids, held_out.tolist()))
    pieces = np.concatenate([ld.is_validation(uids[i:i + 7], 0.05) for i in range(0, len(uids), 7)])
    assert pieces.tolist() == held_out.tolist()
    # A larger fraction only adds samples; 0 holds out none.
    larger = ld.is_validation(uids, 0.2)
    assert (larger | held_out).tolist() == larger.tolist() and 20 < larger.sum() < 60
    assert not ld.is_validation(uids, 0.0).any()
    with pytest.raises(ValueError, match="fraction"):
        ld.is_validation(uids, 1.0)


def test_precompute_fraction_defaults_and_bounds():
    # (Its part in the version: tests/test_precompute_phase.py::test_version_follows_output_affecting_settings_only.)
    base = ["encoders.text=t", "encoders.semantic=s", "encoders.stage_a=a"]
    assert config_lib.load(precompute.PrecomputeConfig, os.path.join(REPO, "configs", "precompute.yaml"),
                           base).validation_fraction == 0.01
    for bad in ("1", "-0.1"):
        with pytest.raises(ConfigError, match="validation_fraction"):
            config_lib.load(precompute.PrecomputeConfig, None, [*base, f"validation_fraction={bad}"])


# --------------------------------------------------------------------------------------------
# The split through precompute's CPU tasks and encoder (no Ray): independent of shards and chunks


def _write_tars(root: str, samples: list[tuple[str, str]], per_tar: list[int]) -> list[str]:
    """The (uid, caption) samples cut into webdataset tars of `per_tar` samples; the text-only run does not
    decode images, so the image member is a placeholder. A sample without uid is skipped with a reason."""
    os.makedirs(root)
    tars, position = [], 0
    for index, count in enumerate(per_tar):
        path = os.path.join(root, f"{index:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for uid, caption in samples[position:position + count]:
                key = f"{index:05d}{position:04d}"
                meta = {"caption": caption} if uid is None else {"uid": uid, "caption": caption}
                for name, data in ((f"{key}.jpg", b"not decoded"), (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                position += 1
        tars.append(path)
    return tars


def _precompute_without_ray(tars: list[str], out_dir: str, spec: dict, shapes: dict, chunk_size: int,
                            fraction: float) -> list[dict]:
    """decode_shard -> ChunkEncoder -> write_chunk -> finalize_shard per tar, as the phase's Ray Data
    pipeline runs them; returns each shard's footer stats."""
    from pipelines.precompute_encoders import ChunkEncoder

    encoder = ChunkEncoder(spec, threads=1)
    stats = []
    for tar in tars:
        name = precompute.shard_name(tar)
        summaries = []
        for chunk in precompute_cpu.decode_shard({"shard": np.array([name]), "tar": np.array([tar])},
                                                 chunk_size=chunk_size, size=0, max_image_pixels=1 << 20):
            written = precompute_cpu.write_chunk(encoder(chunk), out_dir=out_dir, shapes=shapes, row_group_size=2,
                                                 validation_fraction=fraction)
            summaries.append(json.loads(written["summary"][0]))
        stats.append(precompute_cpu.finalize_shard(out_dir, name, os.path.basename(tar), summaries, shapes, 2))
    return stats


def _rows(directory: str) -> dict[str, bytes]:
    """uid -> text embedding bytes of the shard files in `directory`."""
    out: dict[str, bytes] = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.endswith(".parquet"):
            table = pq.read_table(os.path.join(directory, name), columns=["uid", "text_emb"])
            embeddings = table.column("text_emb").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
            out.update({uid: row.tobytes() for uid, row in zip(table.column("uid").to_pylist(), embeddings)})
    return out


def test_precompute_tasks_split_by_uid_whatever_the_sharding_and_chunking(tmp_path):
    import stages
    from pipelines.precompute_encoders import compute_probe, encoder_spec
    from stages.text import TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    stages.save(TextEncoder(TextEncoderConfig.tiny()), tmp_path / "text")
    cfg = config_lib.load(precompute.PrecomputeConfig, os.path.join(REPO, "configs", "precompute-tiny.yaml"),
                          ["outputs=[text]", f"encoders.text={tmp_path / 'text'}", "validation_fraction=0.25"])
    spec = encoder_spec(cfg, use_gpu=False)
    shapes = compute_probe(spec)["shapes"]
    samples = [(f"sample-{i}", f"caption {i}") for i in range(20)] + [(None, "no uid")]
    expected = {uid for uid, held in zip([s[0] for s in samples[:20]],
                                         ld.is_validation([s[0] for s in samples[:20]], 0.25)) if held}
    assert 0 < len(expected) < 20

    layouts = {"two tars, chunks of 3": ([11, 10], 3), "three tars, chunks of 4": ([7, 7, 7], 4)}
    found = {}
    for label, (per_tar, chunk_size) in layouts.items():
        root = tmp_path / label.replace(" ", "-").replace(",", "")
        tars = _write_tars(str(root / "images"), samples, per_tar)
        out_dir = str(root / "latents")
        stats = _precompute_without_ray(tars, out_dir, spec, shapes, chunk_size, cfg.validation_fraction)
        train, validation = _rows(out_dir), _rows(os.path.join(out_dir, ld.VALIDATION_DIR))
        assert set(validation) == expected, label
        assert not set(train) & set(validation) and len(train) + len(validation) == 20, label
        # Every input sample is in one split or skipped with a reason, per shard.
        for shard in stats:
            assert shard["input_samples"] == shard["written"] + shard["validation_written"] + \
                sum(shard["skipped_by_reason"].values())
        assert sum(sum(s["skipped_by_reason"].values()) for s in stats) == 1
        assert not os.listdir(os.path.join(out_dir, precompute_cpu.PARTS_DIR))  # each shard's parts removed
        found[label] = validation
    # The same samples with the same values (their captions' embeddings) in either layout.
    assert found["two tars, chunks of 3"] == found["three tars, chunks of 4"]


# --------------------------------------------------------------------------------------------
# Readers


def test_training_reader_never_yields_validation_samples(tmp_path):
    root = helpers.write_latent_dataset(str(tmp_path / "latents"), validation_fraction=0.25)
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    all_uids = [f"uid-{i:05d}" for i in range(48)]
    held_out = {u for u, h in zip(all_uids, ld.is_validation(all_uids, 0.25)) if h}
    assert ld.split_samples(manifest, "validation") == len(held_out) > 0
    assert ld.split_samples(manifest, "train") == 48 - len(held_out)

    for world in (1, 2):
        for rank in range(world):
            reader = ld.LatentDataset(root, ["uid"], rank=rank, world_size=world, seed=3, shuffle_window=5,
                                      infinite=False)
            for epoch in range(3):
                reader.set_epoch(epoch)
                seen = [sample["uid"] for sample in reader]
                assert seen and not set(seen) & held_out
    everything = [s["uid"] for s in ld.LatentDataset(root, ["uid"], shuffle=False, infinite=False)]
    assert set(everything) == set(all_uids) - held_out
    validation = [s["uid"] for s in ld.LatentDataset(root, ["uid"], split="validation", shuffle=False, infinite=False)]
    assert sorted(validation) == sorted(held_out)


def test_a_dataset_without_a_validation_split_has_none_to_read(tmp_path):
    root = helpers.write_latent_dataset(str(tmp_path / "latents"))
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert ld.split_samples(manifest, "validation") == 0 and ld.split_shards(manifest, "validation") is None
    with pytest.raises(LatentDatasetError, match="has no validation split"):
        ld.LatentDataset(root, ["uid"], split="validation")
    with pytest.raises(LatentDatasetError, match="split 'test'"):
        ld.LatentDataset(root, ["uid"], split="test")


# --------------------------------------------------------------------------------------------
# Metrics and config


def test_interval_ratios_are_sums_over_steps_and_empty_buckets_are_left_out():
    metrics = IntervalMetrics(world=1, samples_per_step=4, num_samples=100, device=torch.device("cpu"))
    metrics.add({"loss": torch.tensor(0.5), "train/loss_t0.1": Ratio(torch.tensor(3.0), torch.tensor(3.0)),
                 "train/loss_t0.9": Ratio(torch.tensor(0.0), torch.tensor(0.0))}, seconds=0.25)
    metrics.add({"loss": torch.tensor(0.25), "train/loss_t0.1": Ratio(torch.tensor(1.0), torch.tensor(1.0)),
                 "train/loss_t0.9": Ratio(torch.tensor(0.0), torch.tensor(0.0))}, seconds=0.25)
    out = metrics.reduce(step=2)
    # (3 + 1) / (3 + 1) samples, not the mean of the two steps' means (1.0 either way here) ...
    assert out["train/loss_t0.1"] == pytest.approx(1.0) and out["loss"] == pytest.approx(0.375)
    assert "train/loss_t0.9" not in out  # no sample in that bucket this interval
    assert not any("#" in key for key in out)
    metrics.add({"train/loss_t0.1": Ratio(torch.tensor(6.0), torch.tensor(2.0))}, seconds=0.1)
    metrics.add({"train/loss_t0.1": Ratio(torch.tensor(1.0), torch.tensor(2.0))}, seconds=0.1)
    assert metrics.reduce(step=4)["train/loss_t0.1"] == pytest.approx(7.0 / 4.0)  # ... which would be 1.75 too
    on_meta = IntervalMetrics(world=1, samples_per_step=4, num_samples=100, device=torch.device("meta"))
    on_meta.add({"train/loss_t0.1": Ratio(torch.tensor(1.0, device="meta"), torch.tensor(1.0, device="meta"))},
                seconds=0.1)
    keys, values = on_meta.local_means()
    assert keys == ["train/loss_t0.1#denominator", "train/loss_t0.1#numerator"] and values.device.type == "meta"


def test_timestep_buckets_and_validation_config_errors_name_the_key():
    assert bucket_edges([0.1, 0.3, 0.5, 0.7, 0.9]) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [timestep_label(t) for t in (0.1, 0.25, 1.0)] == ["0.1", "0.25", "1"]
    cfg = config_lib.load(TrainConfig, None, [])
    assert cfg.validation.timesteps == [0.1, 0.3, 0.5, 0.7, 0.9] and cfg.validation.every > 0
    for override, message in (("validation.timesteps=[]", "validation.timesteps: list at least one"),
                              ("validation.timesteps=[0.5, 0.3]", "validation.timesteps: must be strictly increasing"),
                              ("validation.timesteps=[0.0, 0.5]", r"validation.timesteps: each t must be in \(0, 1\]"),
                              ("validation.every=-1", "validation.every"),
                              ("validation.max_samples=0", "validation.max_samples")):
        with pytest.raises(ConfigError, match=message):
            config_lib.load(TrainConfig, None, [override])
    with pytest.raises(ConfigError, match="validation.ema: true needs ema.enabled"):
        config_lib.load(TrainConfig, None, ["validation.ema=true", "ema.enabled=false"])


# --------------------------------------------------------------------------------------------
# The trainer, in one process (fit_local)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation-latents")
    return {"split": helpers.write_latent_dataset(str(root / "split"), validation_fraction=0.25),
            "old": helpers.write_latent_dataset(str(root / "old")), "root": str(root)}


def tiny_config(latents_dir: str, data_root: str, run_name: str, stage: str, *overrides: str) -> TrainConfig:
    return config_lib.load(TrainConfig, os.path.join(REPO, "configs", f"train-{stage}-tiny.yaml"), [
        f"input={latents_dir}", f"data_root={data_root}", f"run_name={run_name}", "train.num_workers=1",
        "train.log_every=2", "train.checkpoint_every=4", "sampling.every=0", "mlflow.enabled=false",
        "train.audit_collectives=true", "validation.max_samples=10", *overrides])


def train_local(latents_dir: str, data_root: str, run_name: str, stage: str, *overrides: str) -> str:
    cfg = tiny_config(latents_dir, data_root, run_name, stage, *overrides)
    plan = plan_run(cfg, use_gpu=False)
    fit_local(cfg, plan)
    return plan.run_dir


def metrics_by_step(run_dir: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        for line in filter(None, f.read().splitlines()):
            record = json.loads(line)
            out.setdefault(record.pop("step"), {}).update(record)
    return out


def val_keys(prefix: str) -> set[str]:
    return {f"{prefix}/loss", f"{prefix}/mse", *(f"{prefix}/loss_t{b}" for b in BUCKETS)}


@pytest.fixture(scope="module")
def stage_c_runs(latents):
    """Stage C with val/* every 3 steps (3, 6 and the last, 8) and val_ema/*: uninterrupted to step 8, the same
    stopped at step 4 and resumed to 8, and uninterrupted without validation."""
    common = ("validation.every=3", "validation.ema=true", "validation.batch_size=3", "data.trace=true")
    root = latents["root"]
    straight = train_local(latents["split"], root, "c-straight", "c", "train.max_steps=8", *common)
    train_local(latents["split"], root, "c-resumed", "c", "train.max_steps=4", *common)
    resumed = train_local(latents["split"], root, "c-resumed", "c", "train.max_steps=8", *common)
    unvalidated = train_local(latents["split"], root, "c-unvalidated", "c", "train.max_steps=8", "validation.every=0")
    return {"straight": straight, "resumed": resumed, "unvalidated": unvalidated}


def test_validation_loss_is_logged_at_its_steps_and_equal_after_a_resume(stage_c_runs):
    straight, resumed = metrics_by_step(stage_c_runs["straight"]), metrics_by_step(stage_c_runs["resumed"])
    wanted = val_keys("val") | val_keys("val_ema")
    assert [s for s, m in sorted(straight.items()) if wanted <= set(m)] == [3, 6, 8]
    # The resumed run validated at its first run's last step (4) as well; at 3, 6 and 8 the weights and so
    # the values are those of the uninterrupted run (6 and 8 after the restore).
    assert [s for s, m in sorted(resumed.items()) if wanted <= set(m)] == [3, 4, 6, 8]
    for step in (3, 6, 8):
        for key in sorted(wanted):
            assert abs(straight[step][key] - resumed[step][key]) <= 1e-7, (step, key)
            assert np.isfinite(straight[step][key]) and straight[step][key] > 0
        # val/loss is the mean over the buckets of the per-bucket losses.
        assert straight[step]["val/loss"] == pytest.approx(np.mean([straight[step][f"val/loss_t{b}"] for b in BUCKETS]))
    assert straight[3]["val/loss"] != straight[8]["val/loss"]  # it follows the weights
    assert "loss" not in straight[3]  # a validation step that is not a log step gets its own line


def test_training_loss_by_timestep_bucket_is_logged_and_validation_does_not_change_training(stage_c_runs):
    straight, unvalidated = metrics_by_step(stage_c_runs["straight"]), metrics_by_step(stage_c_runs["unvalidated"])
    logged = {key for m in straight.values() for key in m if key.startswith("train/loss_t")}
    assert logged and logged <= {f"train/loss_t{b}" for b in BUCKETS}
    for step in (2, 4, 6, 8):
        buckets = [v for k, v in straight[step].items() if k.startswith("train/loss_t")]
        assert buckets and all(np.isfinite(v) and v >= 0 for v in buckets), step
        # Evaluating (eval mode, its own noise generators, the EMA gather) leaves the training path untouched.
        assert straight[step]["loss"] == unvalidated[step]["loss"], step
    assert not any(key.startswith("val") for m in unvalidated.values() for key in m)


def test_validation_samples_are_never_trained_on(stage_c_runs, latents):
    validation = {s["uid"] for s in ld.LatentDataset(latents["split"], ["uid"], split="validation", shuffle=False,
                                                     infinite=False)}
    trained = set()
    trace_dir = os.path.join(stage_c_runs["straight"], TRACE_DIR)
    for name in os.listdir(trace_dir):
        with open(os.path.join(trace_dir, name)) as f:
            trained |= {uid for line in f for uid in json.loads(line)["ids"]}
    assert len(trained) > 20 and not trained & validation


def test_stage_b_bf16_logs_validation_loss(latents):
    run_dir = train_local(latents["split"], latents["root"], "b-bf16", "b", "train.max_steps=4",
                          "train.precision=bf16", "validation.every=2")
    metrics = metrics_by_step(run_dir)
    assert [s for s, m in sorted(metrics.items()) if val_keys("val") <= set(m)] == [2, 4]
    assert all(np.isfinite(metrics[s][k]) for s in (2, 4) for k in val_keys("val"))
    assert any(k.startswith("train/loss_t") for k in metrics[4])
    with open(os.path.join(run_dir, "collectives", "rank-00000.json")) as f:
        assert json.load(f)["calls"]["all_reduce"] > 0  # the validation sums among them, audited


def test_a_dataset_without_validation_split_trains_with_validation_off(latents, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.training.loop")
    run_dir = train_local(latents["old"], latents["root"], "c-old", "c", "train.max_steps=2", "validation.every=1")
    metrics = metrics_by_step(run_dir)
    assert sorted(metrics) == [2] and np.isfinite(metrics[2]["loss"])
    assert not any(key.startswith("val") for key in metrics[2])
    off = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation off")]
    assert len(off) == 1 and "has no validation split" in off[0], off


# --------------------------------------------------------------------------------------------
# Two ranks without Ray: the worker loop in two processes on a gloo group


class ProcessSession(Session):
    """Rank `rank` of `world` local processes (gloo on loopback); checkpoints are dropped (no resume)."""

    def __init__(self, rank: int, world: int, port: int):
        self.rank, self.world, self.port = rank, world, port

    def device(self, use_gpu: bool) -> torch.device:
        import torch.distributed as dist

        if not dist.is_initialized():
            os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.rank), WORLD_SIZE=str(self.world),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port))
            dist.init_process_group("gloo", init_method="env://", rank=self.rank, world_size=self.world)
        return torch.device("cpu")

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield None

    def report(self, metrics: dict, checkpoint_dir: str, step: int) -> None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def run_rank(job_file: str, rank: int) -> None:
    """A child process's entry: rank `rank` of the job described in `job_file`."""
    from pipelines.training.loop import run_worker

    with open(job_file) as f:
        job = json.load(f)
    cfg = config_lib.from_dict(TrainConfig, job["config"])
    run_worker(cfg, RunPlan(**job["plan"]), ProcessSession(rank, cfg.train.num_workers, job["port"]))


def train_ranks(cfg: TrainConfig, tmp_path) -> str:
    plan = plan_run(cfg, use_gpu=False)
    job_file = str(tmp_path / f"{cfg.run_name}.json")
    with open(job_file, "w") as f:
        json.dump({"config": config_lib.to_dict(cfg), "plan": dataclasses.asdict(plan), "port": free_port()}, f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # set by a LocalSession here
        env.pop(key, None)
    children = [subprocess.Popen([sys.executable, "-c", f"import test_validation; test_validation.run_rank({job_file!r}, {r})"],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for r in range(cfg.train.num_workers)]
    outputs = [child.communicate(timeout=600)[0] for child in children]
    for rank, (child, output) in enumerate(zip(children, outputs)):
        assert child.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    return plan.run_dir


def test_ranks_evaluate_disjoint_slices_whose_sums_are_all_reduced(latents, tmp_path):
    # From the same initial weights with a negligible learning rate, the step-1 validation loss of two ZeRO-2
    # ranks (samples [0, 3) and [3, 7), all-reduced) is the one-rank value; also for the EMA gathered on
    # every rank. Collectives are audited on the training device.
    common = ("train.max_steps=1", "optim.lr=1e-12", "validation.every=1", "validation.max_samples=7",
              "validation.ema=true", "validation.batch_size=2")
    two = train_ranks(tiny_config(latents["split"], latents["root"], "c-two-ranks", "c", *common,
                                  "train.num_workers=2", "train.micro_batch_size=2"), tmp_path)
    one = train_local(latents["split"], latents["root"], "c-one-rank", "c", *common, "train.micro_batch_size=4")
    two_ranks, one_rank = metrics_by_step(two)[1], metrics_by_step(one)[1]
    for key in sorted(val_keys("val") | val_keys("val_ema")):
        assert two_ranks[key] == pytest.approx(one_rank[key], rel=1e-5), key
    for rank in (0, 1):
        with open(os.path.join(two, "collectives", f"rank-{rank:05d}.json")) as f:
            assert json.load(f)["calls"]["all_reduce"] > 0
