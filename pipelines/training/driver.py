"""The driver's half of a training run: resolve it (`plan_run`: the run name and directory, the input's
shapes checked against the model, the companion checkpoints), check a resumed run against its `run.json`,
record the run, and launch the Ray Train `TorchTrainer` whose workers run `pipelines.training.loop`.

The run name defaults to `<stage>-<version>`, the version hashing every setting that changes the weights
(all but `VERSION_EXCLUDES`) and the input's identity: the same config on the same input resumes the run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
from typing import Optional

# torch must be imported before ray.init(): in a `ray job submit` driver with a working_dir runtime env,
# importing it afterwards aborts with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so". This module
# imports it, and `pipelines.train` imports this module before its phase starts Ray. Ray itself is
# imported by `fit` alone: `fit_local` (bench/, a bare GPU machine) runs without it.
import torch  # noqa: F401

from pipelines import config as config_lib
from pipelines import export_layout
from pipelines import manifest as manifest_lib
from pipelines import storage
from pipelines.config import ConfigError
from pipelines.training.config import RUN_INFO, RUNS_DIR, VERSION_EXCLUDES, RunPlan, TrainConfig
from pipelines.training.loop import run_worker, train_worker
from pipelines.training.session import LocalSession
from pipelines.training.specs import STAGES, spec_for

log = logging.getLogger(__name__)

PHASE = "train"  # the phase's name: part of the version hash, and the MLflow experiment's


# --------------------------------------------------------------------------------------------
# Naming


def runs_root(cfg: TrainConfig) -> str:
    return storage.normalize(cfg.output) if cfg.output else storage.join(cfg.data_root, RUNS_DIR)


def require_input(cfg: TrainConfig) -> str:
    if not cfg.input:
        raise ConfigError(f"input: required: {STAGES[cfg.stage].input_what}")
    uri = storage.normalize(cfg.input)
    if not storage.exists(uri):
        raise ConfigError(f"input: {uri} does not exist")
    if not manifest_lib.has_manifest(uri):
        raise ConfigError(f"input: {uri} has no manifest.json; is the previous phase finished?")
    return uri


# Weight-changing settings added after runs existed: left out of the version hash while at these defaults, so
# those runs keep their names (and resume) as before.
VERSION_DEFAULTS_LEFT_OUT = {"model.continue_step_count": False, "data.timestep_warp": 1.0,
                             "semantic_compressor.train": False, "semantic_compressor.init_from": None,
                             "semantic_compressor.lr": None, "semantic_compressor.batchnorm": "frozen"}


def hashed_settings(cfg: TrainConfig) -> dict:
    """The config tree the run's version hashes: without VERSION_EXCLUDES, and without the settings of
    VERSION_DEFAULTS_LEFT_OUT that are at their default."""
    tree = strip_keys(config_lib.to_dict(cfg), VERSION_EXCLUDES)
    for key, default in VERSION_DEFAULTS_LEFT_OUT.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        if isinstance(node, dict) and leaf in node and node[leaf] == default:
            del node[leaf]
            if not node and len(parents) == 1:  # a block of such settings, all at their defaults
                del tree[parents[0]]
    return tree


def weights_hash(cfg: TrainConfig) -> str:
    return config_lib.config_hash(hashed_settings(cfg))


def run_name(cfg: TrainConfig, input_id: Optional[str] = None) -> str:
    """`run_name`, or `<stage>-<version>` (`input_id`: the input's identity, when the caller has it)."""
    if cfg.run_name:
        return cfg.run_name
    if input_id is None:
        input_id = manifest_lib.input_identity(require_input(cfg))
    return f"{cfg.stage}-{manifest_lib.version_id(PHASE, hashed_settings(cfg), input_id)}"


def mlflow_run_name(cfg: TrainConfig, input_uri: str, now: Optional[datetime.datetime] = None) -> str:
    """The MLflow run's name at its first start: `mlflow.run_name` or `run_name` when set, else
    `<stage>-<preset>-data<input version, 8 chars>-<UTC date YYYYMMDD>`, e.g. `c-tiny-data3f2a91c0-20261203`.
    Only a label for the UI: the run directory (`run_name`) stays the version hash, so a rerun on another day
    resumes the same run, and a resumed run keeps its MLflow run and name (tag `wurst.run_name` names the dir)."""
    if cfg.mlflow.run_name or cfg.run_name:
        return cfg.mlflow.run_name or cfg.run_name
    data = re.sub(r"[^A-Za-z0-9]", "", storage.basename(input_uri))[:8] or "unknown"
    date = (now or datetime.datetime.now(datetime.timezone.utc)).astimezone(datetime.timezone.utc).strftime("%Y%m%d")
    return f"{cfg.stage}-{cfg.model.preset}-data{data}-{date}"


def strip_keys(tree: dict, keys: tuple[str, ...]) -> dict:
    """A copy of the config tree without the dotted `keys` (what run.json records of the settings)."""
    tree = json.loads(json.dumps(tree))
    for key in keys:
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {})
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return tree


def _flat_differences(old: dict, new: dict) -> list[str]:
    a, b = config_lib.flatten(old), config_lib.flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# --------------------------------------------------------------------------------------------
# Planning


def _companions(cfg: TrainConfig, input_manifest: dict) -> dict[str, str]:
    """Checkpoint dirs of the other pieces: the config wins, else what the latents were computed with."""
    found: dict[str, str] = {}
    encoders = input_manifest.get("encoders") or {}
    for name in ("text", "stage_a", "stage_b", "stage_c", "semantic"):
        configured = getattr(cfg.checkpoints, name)
        if configured:
            uri = export_layout.resolve_checkpoint(configured)
            if not storage.exists(storage.join(uri, "config.json")):
                raise ConfigError(f"checkpoints.{name}: {uri} is not a stages checkpoint (no config.json)")
            found[name] = uri
        elif isinstance(encoders.get(name), dict) and encoders[name].get("checkpoint"):
            uri = export_layout.resolve_checkpoint(encoders[name]["checkpoint"])
            if storage.exists(storage.join(uri, "config.json")):
                found[name] = uri
    found.pop(STAGES[cfg.stage].kind, None)  # the run's own stage
    return found


def resolve_use_gpu(cfg: TrainConfig, ray) -> bool:
    """`train.use_gpu`, or None: whether the Ray cluster has GPUs."""
    if cfg.train.use_gpu is not None:
        return cfg.train.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """`train.precision` with auto resolved: bf16 (autocast, fp32 weights) on GPUs, fp32 on CPUs."""
    return ("bf16" if use_gpu else "fp32") if precision == "auto" else precision


def continued_step(cfg: TrainConfig) -> int:
    """`model.continue_step_count`: the step of the export `model.init_from` names (its export.json)."""
    checkpoint = export_layout.resolve_checkpoint(cfg.model.init_from)
    record = export_layout.export_record(checkpoint)
    if record is None or not isinstance(record.get("step"), int):
        raise ConfigError(f"model.continue_step_count: {cfg.model.init_from} is not a training run's export (no "
                          f"export.json naming a step next to {checkpoint}); name <run>/export/<kind> or "
                          f"<run>/export/<step>/<kind>, or set continue_step_count: false")
    if record.get("stage") != cfg.stage:
        raise ConfigError(f"model.init_from: {cfg.model.init_from} is an export of a Stage "
                          f"{str(record.get('stage')).upper()} run; this config trains Stage {cfg.stage.upper()}")
    return record["step"]


def compressor_source(cfg: TrainConfig, companions: dict[str, str]) -> str:
    """`semantic_compressor.train`: the checkpoint the compressor starts from: `semantic_compressor.init_from`;
    else model.init_from's export's own semantic/ (a Stage B run continued from one that fine-tuned it); else
    the compressor the input's latents were computed with (or checkpoints.semantic)."""
    configured = cfg.semantic_compressor.init_from
    if configured:
        uri = export_layout.resolve_checkpoint(configured)
        if not storage.exists(storage.join(uri, "config.json")):
            raise ConfigError(f"semantic_compressor.init_from: {uri} is not a stages checkpoint (no config.json)")
        return uri
    if cfg.model.init_from:
        export_dir = storage.parent(export_layout.resolve_checkpoint(cfg.model.init_from))
        own = storage.join(export_dir, "semantic")
        if export_dir and storage.exists(storage.join(export_dir, export_layout.EXPORT_RECORD)) and \
                storage.exists(storage.join(own, "config.json")):
            return own
    if "semantic" in companions:
        return companions["semantic"]
    raise ConfigError("semantic_compressor.init_from: required: the input's manifest names no semantic encoder "
                      "(precompute without output semantic) and checkpoints.semantic is not set")


def plan_run(cfg: TrainConfig, use_gpu: bool) -> RunPlan:
    """Resolve the run; every problem with the config or the input raises ConfigError naming the key."""
    spec = spec_for(cfg)
    input_uri = require_input(cfg)
    input_manifest = manifest_lib.read(input_uri)
    model_config = spec.model_config(cfg.model.preset, cfg.model.overrides)
    if cfg.model.init_from and not storage.exists(storage.join(export_layout.resolve_checkpoint(cfg.model.init_from),
                                                               "config.json")):
        raise ConfigError(f"model.init_from: {cfg.model.init_from} is not a stages checkpoint (no config.json)")
    data = spec.plan_input(cfg, model_config, input_uri, input_manifest)
    if data.num_samples // cfg.train.num_workers < cfg.train.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size: {cfg.train.micro_batch_size} samples per worker, but {input_uri} "
                          f"holds {data.num_samples} samples for {cfg.train.num_workers} workers")
    precision = resolve_precision(cfg.train.precision, use_gpu)
    name = run_name(cfg)
    root = runs_root(cfg)
    start_step = 0
    if cfg.model.continue_step_count:
        # A resumed run keeps the step it started from, even if init_from's latest export has moved on since.
        info = read_run_info(storage.join(root, name))
        start_step = int(info["start_step"]) if info and "start_step" in info else continued_step(cfg)
        if start_step >= cfg.train.max_steps:
            raise ConfigError(f"train.max_steps: {cfg.train.max_steps} is not beyond step {start_step} of "
                              f"{cfg.model.init_from}, which this run continues (max_steps counts the whole chain)")
    companions = _companions(cfg, input_manifest)
    compressor_init = compressor_source(cfg, companions) if cfg.semantic_compressor.train else None
    evaluation_prompts = spec.plan_evaluation(cfg, input_uri, companions) if cfg.evaluation.every else []
    return RunPlan(stage=cfg.stage, run_name=name, run_dir=storage.join(root, name), runs_root=root,
                   input_uri=input_uri, shapes=data.shapes, num_samples=data.num_samples, use_gpu=use_gpu,
                   bf16=precision != "fp32", precision=precision,
                   tracking_uri=None, mlflow_run_id=None, empty_text_emb=data.empty_text_emb,
                   companions=companions, evaluation_prompts=evaluation_prompts, start_step=start_step,
                   compressor_init=compressor_init, bucket_shapes=data.bucket_shapes, bucket_weights=data.bucket_weights)


# --------------------------------------------------------------------------------------------
# run.json: the run's identity across restarts


def read_run_info(run_dir: str) -> Optional[dict]:
    path = storage.join(run_dir, RUN_INFO)
    return storage.read_json(path) if storage.exists(path) else None


def check_resume(cfg: TrainConfig, info: dict, run_dir: str) -> None:
    """A rerun of an existing run must train the same stage with the same weight-changing settings."""
    if info.get("stage") != cfg.stage:
        raise ConfigError(f"run_name: {run_dir} is a Stage {str(info.get('stage')).upper()} run, "
                          f"this config trains Stage {cfg.stage.upper()}")
    if info.get("weights_hash") != weights_hash(cfg) and not cfg.train.allow_config_change:
        changed = _flat_differences(info.get("config", {}), strip_keys(config_lib.to_dict(cfg), VERSION_EXCLUDES))
        raise ConfigError(
            f"run_name: {run_dir} was started with different settings ({', '.join(changed) or 'unknown keys'}); "
            f"resuming would mix two recipes. Use a new run_name, or set train.allow_config_change=true")


def record_run(cfg: TrainConfig, plan: RunPlan, info: Optional[dict]) -> None:
    """Write run.json at the run's first start (or when its MLflow run changed) and the resolved config."""
    if info is None or info.get("mlflow_run_id") != plan.mlflow_run_id:
        storage.makedirs(plan.run_dir)
        storage.write_json(storage.join(plan.run_dir, RUN_INFO), {
            "run_name": plan.run_name, "stage": cfg.stage, "mlflow_run_id": plan.mlflow_run_id,
            # Credentials inside URIs never reach the run directory (config_lib.redact / redact_text).
            "tracking_uri": config_lib.redact_text(plan.tracking_uri) if plan.tracking_uri else None,
            "input": plan.input_uri,
            "input_identity": manifest_lib.input_identity(plan.input_uri), "weights_hash": weights_hash(cfg),
            "config": config_lib.redact(strip_keys(config_lib.to_dict(cfg), VERSION_EXCLUDES)),
            "code_version": manifest_lib.code_version(),
            "start_step": plan.start_step,
        })
    manifest_lib.save_config(plan.run_dir, config_lib.to_dict(cfg))


# --------------------------------------------------------------------------------------------
# Ray Train


def fit(cfg: TrainConfig, plan: RunPlan):
    """Run the workers to max_steps (resuming from the run's latest checkpoint); returns Ray Train's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.train.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = 1
    storage_path, storage_filesystem = plan.runs_root, None
    if storage.is_remote(plan.runs_root):  # the endpoint and options of an s3:// root travel as the filesystem
        storage_filesystem, storage_path = storage.resolve(plan.runs_root)
    trainer = TorchTrainer(
        # By reference from an importable module: under `python -m pipelines.train` that file is
        # __main__, and cloudpickle would ship __main__'s functions by value, without their imports.
        train_worker,
        train_loop_config={"config": config_lib.to_dict(cfg), "plan": dataclasses.asdict(plan)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=plan.run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def fit_local(cfg: TrainConfig, plan: RunPlan) -> None:
    """The same worker loop in this process, without Ray (world size 1, `torch.distributed` on loopback):
    checkpoints in `<run dir>/checkpoint_<step>/`, resumed from the newest. For benchmarks and the GPU
    smoke test on machines with torch and DeepSpeed only; MLflow logging only if `plan.mlflow_run_id`."""
    if cfg.train.num_workers != 1:
        raise ConfigError(f"train.num_workers: {cfg.train.num_workers}; a local run has one worker")
    run_worker(cfg, plan, LocalSession(plan.run_dir, keep=cfg.train.keep_checkpoints))
