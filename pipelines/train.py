"""`python -m pipelines.train --config configs/train-c.yaml`: train Stage C, B or A with DeepSpeed under Ray Train.

One trainer for all stages; what differs per stage (model, objective, columns, sample grid) lives in
``pipelines.train_specs`` (B, C: diffusion on cached latents) and ``pipelines.train_stage_a`` (A: the
VQGAN from image shards, with a discriminator that has its own optimizer).

How a run works
---------------
* The driver resolves the run: ``<output root>/<run name>`` (default ``<data_root>/runs/<stage>-<version>``,
  the version hashing every setting that changes the weights plus the input's manifest), checks the
  dataset's shapes against the model, opens (or re-opens) the MLflow run and stores its id in
  ``run.json``, then starts a Ray Train ``TorchTrainer`` with ``train.num_workers`` workers.
* Each worker builds the model, an AdamW built in Python with linear warm-up then a constant rate, and
  one DeepSpeed engine (ZeRO 1/2/3, bf16 on GPU, fp32 on CPU with gloo, micro-batch, accumulation,
  explicit clipping). Data come from ``LatentDataset``: each rank its own part of a seeded order.
* Every ``checkpoint_every`` steps all ranks save their DeepSpeed shards, RNG states, EMA shards and the
  step into a checkpoint reported through ``ray.train.report``; Ray keeps the last ``keep_checkpoints``.
  Rerunning the same run name resumes from the latest one (same MLflow run, same data order: the data
  position is step x samples per step, and the reader resumes at that sample exactly); a crashed worker
  group is restarted from it by ``FailureConfig(max_failures)``.
* Every ``export_every`` steps and at the end, the EMA weights (or the weights, without EMA) are
  gathered from the ZeRO partitions and written as a ``stages`` checkpoint to ``<run dir>/export/<stage>/``,
  next to copies of the text encoder / Stage A / Stage B checkpoints the run was trained against, so
  ``python -m pipelines.generate --checkpoints <run dir>/export`` works directly.
* Rank 0 logs to MLflow: loss (p2-weighted, the objective), unweighted MSE, lr, grad norm, samples/s,
  TFLOP/s and MFU, GPU memory, system metrics, and a sample grid every ``sampling.every`` steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import signal
import sys
import tempfile
import time
from typing import Any, Literal, Optional

from pipelines import config as config_lib
from pipelines import manifest as manifest_lib
from pipelines import storage, tracking
from pipelines.config import ConfigError, param
from pipelines.runtime import RayConfig, default_data_root, init_ray

log = logging.getLogger("wurst.train")

PHASE = "train"
RUNS_DIR = "runs"
RUN_INFO = "run.json"
EXPORT_DIR = "export"
TRACE_DIR = "data_trace"
TRAIN_STATE = "train_state.json"

# Settings that do not change the trained weights: excluded from the run's version hash, and free to
# change when a run is resumed (e.g. raise max_steps to train longer).
VERSION_EXCLUDES = (
    "data_root", "output", "run_name", "mlflow", "ray", "sampling", "checkpoints", "metrics", "fault",
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.export_every", "train.max_failures", "train.use_gpu", "train.cpus_per_worker",
    "train.allow_config_change", "data.loader_workers", "data.trace",
)


# --------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class ModelConfig:
    # Stage preset: tiny | paper (Stage C also paper-clip-h | paper-clip-bigg).
    preset: str = "paper"
    # Fields of the stage's config dataclass set on top of the preset (StageCConfig / StageBConfig / StageAConfig).
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Recompute each block's activations in the backward pass (saves memory, costs ~1/3 more compute).
    gradient_checkpointing: bool = False
    # A stages checkpoint directory to start from (fine-tuning, e.g. released weights via stages.convert).
    init_from: Optional[str] = None


@dataclasses.dataclass
class DataConfig:
    seed: int = 0
    # Samples shuffled together within a rank's stream (see LatentDataset's ordering contract).
    shuffle_window: int = param(4096, ge=1)
    # DataLoader worker processes per training worker (0: read in the training process).
    loader_workers: int = param(2, ge=0)
    # Per-sample probability of replacing the caption embedding by the empty caption's (classifier-free guidance).
    text_dropout: float = param(0.05, ge=0.0, le=1.0)
    # Stage B: zero the semantic latent (guidance), and noise it with t ~ U(0, effnet_noise_max_t).
    effnet_dropout: float = param(0.05, ge=0.0, le=1.0)
    effnet_noise_probability: float = param(0.3, ge=0.0, le=1.0)
    effnet_noise_max_t: float = param(0.5, ge=0.0, le=1.0)
    # Stage A: images are resized (shorter side) to image_size, then randomly cropped to crop_size.
    image_size: int = param(256, ge=8)
    crop_size: int = param(128, ge=8)
    # Write the sample ids of every step to <run dir>/data_trace/ (an audit of the data order).
    trace: bool = False

    def validate(self) -> None:
        if self.crop_size > self.image_size:
            raise ConfigError(f"data.crop_size: {self.crop_size} is larger than data.image_size {self.image_size}")


@dataclasses.dataclass
class OptimConfig:
    # AdamW; the official Würstchen scripts use torch's defaults besides the rate.
    lr: float = param(1e-4, gt=0.0)
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = param(1e-8, gt=0.0)
    weight_decay: float = param(0.01, ge=0.0)
    # Linear warm-up from lr/warmup_steps to lr over warmup_steps optimizer steps, then constant.
    warmup_steps: int = param(10000, ge=0)
    # Global gradient-norm clipping (always explicit: DeepSpeed's default changed in 0.19.3); 0 = off.
    grad_clip: float = param(1.0, ge=0.0)

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {self.betas}")


@dataclasses.dataclass
class EmaConfig:
    enabled: bool = True
    # Official recipe: beta 0.9 every 100 steps from step 5000 (the EMA copies the weights before that).
    decay: float = param(0.9, ge=0.0, lt=1.0)
    start_step: int = param(5000, ge=0)
    every: int = param(100, ge=1)


@dataclasses.dataclass
class LoopConfig:
    max_steps: int = param(500000, ge=1)
    micro_batch_size: int = param(32, ge=1)
    grad_accum_steps: int = param(1, ge=1)
    num_workers: int = param(1, ge=1)
    # None: use GPUs when the Ray cluster has them.
    use_gpu: Optional[bool] = None
    cpus_per_worker: float = param(1.0, gt=0.0)
    # auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    zero_stage: int = param(2, choices=[1, 2, 3])
    # torch.compile the model inside the DeepSpeed engine.
    compile: bool = False
    log_every: int = param(10, ge=1)
    checkpoint_every: int = param(1000, ge=1)
    keep_checkpoints: int = param(3, ge=1)
    # Consolidated (EMA) export every N steps (and always at the end); 0: only at the end.
    export_every: int = param(5000, ge=0)
    max_failures: int = param(3, ge=0)
    # Resume even if settings that change the weights differ from the run's first start.
    allow_config_change: bool = False


@dataclasses.dataclass
class SamplingConfig:
    # Sample grid every N steps (and at the end); 0: never.
    every: int = param(5000, ge=0)
    num_images: int = param(4, ge=1)
    # Prompts for Stage C grids decoded through Stage B/A (empty: captions of the preview samples).
    prompts: list[str] = dataclasses.field(default_factory=list)
    steps: int = param(20, ge=1)  # DDPM steps of the trained stage's sampler
    steps_b: int = param(12, ge=1)  # Stage B steps when a Stage C grid is decoded through Stage B
    guidance: float = param(4.0, ge=0.0)
    guidance_b: float = param(0.0, ge=0.0)
    # Image size of decoded Stage C grids (Stage B's latent must fit its U-Net, see stages.sampling).
    height: int = param(1024, ge=8)
    width: int = param(1024, ge=8)
    seed: int = 0


@dataclasses.dataclass
class CheckpointsConfig:
    """The other pieces a run is trained against (stages checkpoint directories). Used for decoded
    sample grids and copied into the export so `pipelines.generate` runs on it. None: taken from the
    latent dataset's manifest when it records the encoder (text, stage_a, semantic)."""

    text: Optional[str] = None
    stage_a: Optional[str] = None
    stage_b: Optional[str] = None
    stage_c: Optional[str] = None
    semantic: Optional[str] = None


@dataclasses.dataclass
class MetricsConfig:
    # Dense peak TFLOP/s of one worker's device for the MFU estimate; None: known GPUs by name, else no MFU.
    peak_tflops: Optional[float] = param(None, gt=0.0)


@dataclasses.dataclass
class FaultConfig:
    """Chaos drill: SIGKILL worker `kill_rank` once when it reaches step `kill_at_step` (tests use it to
    prove that Ray Train restarts the worker group from the last checkpoint)."""

    kill_rank: Optional[int] = param(None, ge=0)
    kill_at_step: Optional[int] = param(None, ge=1)


@dataclasses.dataclass
class PerceptualConfig:
    # LPIPS-style feature distance on torchvision VGG16 features (first `blocks` conv blocks).
    network: Literal["vgg16"] = "vgg16"
    blocks: int = param(5, ge=1, le=5)
    # Local weights (torchvision vgg16 state dict, safetensors or torch file). Required unless
    # random_weights is true: a perceptual loss with random weights must be asked for, never silent.
    weights_path: Optional[str] = None
    random_weights: bool = False


@dataclasses.dataclass
class DiscriminatorConfig:
    channels: int = param(64, ge=1)
    layers: int = param(3, ge=1)
    lr: float = param(1e-4, gt=0.0)


@dataclasses.dataclass
class StageALossConfig:
    """Stage A recipe (paper appendix E.1): MSE 1.0 + perceptual 0.1 + VQ (commitment) terms; adversarial
    weight 0 until `adversarial_start` steps, then `adversarial_weight` (hinge loss, PatchGAN)."""

    mse_weight: float = param(1.0, ge=0.0)
    perceptual_weight: float = param(0.1, ge=0.0)
    vq_weight: float = param(1.0, ge=0.0)
    adversarial_weight: float = param(0.01, ge=0.0)
    adversarial_start: int = param(10000, ge=0)
    perceptual: PerceptualConfig = dataclasses.field(default_factory=PerceptualConfig)
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=DiscriminatorConfig)


@dataclasses.dataclass
class TrainConfig:
    stage: Literal["a", "b", "c"] = "c"
    # Stage B/C: a precompute output (latents/<version>); Stage A: a download output (images/<version>).
    input: Optional[str] = None
    # Root of the runs (default <data_root>/runs); the run lives in <output>/<run_name>.
    output: Optional[str] = None
    # Default: <stage>-<version>. Rerunning the same name resumes the run.
    run_name: Optional[str] = None
    data_root: str = dataclasses.field(default_factory=default_data_root)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    checkpoints: CheckpointsConfig = dataclasses.field(default_factory=CheckpointsConfig)
    stage_a: StageALossConfig = dataclasses.field(default_factory=StageALossConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    fault: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            raise ConfigError(f"run_name: {self.run_name!r} must be a plain directory name")
        if self.fault.kill_rank is not None and self.fault.kill_rank >= self.train.num_workers:
            raise ConfigError(f"fault.kill_rank: {self.fault.kill_rank} is not a rank of {self.train.num_workers} workers")


# --------------------------------------------------------------------------------------------
# Run layout


def runs_root(cfg: TrainConfig) -> str:
    return storage.normalize(cfg.output) if cfg.output else storage.join(cfg.data_root, RUNS_DIR)


def require_input(cfg: TrainConfig) -> str:
    if not cfg.input:
        what = "a download output (images/<version>)" if cfg.stage == "a" else "a precompute output (latents/<version>)"
        raise ConfigError(f"input: required: {what}")
    uri = storage.normalize(cfg.input)
    if not storage.exists(uri):
        raise ConfigError(f"input: {uri} does not exist")
    if not manifest_lib.has_manifest(uri):
        raise ConfigError(f"input: {uri} has no manifest.json; is the previous phase finished?")
    return uri


def weights_hash(cfg: TrainConfig) -> str:
    return config_lib.config_hash(cfg, exclude=VERSION_EXCLUDES)


def run_name(cfg: TrainConfig) -> str:
    if cfg.run_name:
        return cfg.run_name
    uri = require_input(cfg)
    version = manifest_lib.version_id(PHASE, cfg, manifest_lib.input_identity(uri), exclude=VERSION_EXCLUDES)
    return f"{cfg.stage}-{version}"


def output_dir(cfg: TrainConfig) -> str:
    """Where the run lives: <output root>/<run name> (Ray Train storage + export/ + run.json)."""
    return storage.join(runs_root(cfg), run_name(cfg))


def is_complete(cfg: TrainConfig, run_dir: str) -> bool:
    """A finished run: its manifest exists and records at least the configured max_steps."""
    if not manifest_lib.has_manifest(run_dir):
        return False
    steps = (manifest_lib.read(run_dir).get("counts") or {}).get("steps") or 0
    return steps >= cfg.train.max_steps


def export_dir(cfg: TrainConfig) -> str:
    return storage.join(output_dir(cfg), EXPORT_DIR)


def _flat_differences(old: dict, new: dict) -> list[str]:
    a, b = config_lib.flatten(old), config_lib.flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _strip(tree: dict, keys: tuple[str, ...]) -> dict:
    tree = json.loads(json.dumps(tree))
    for key in keys:
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {})
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return tree


# --------------------------------------------------------------------------------------------
# Driver


@dataclasses.dataclass
class RunPlan:
    """Everything the workers need besides the config; resolved once by the driver."""

    stage: str
    run_name: str
    run_dir: str
    runs_root: str
    input_uri: str
    shapes: dict[str, list[int]]
    num_samples: int
    use_gpu: bool
    bf16: bool
    tracking_uri: Optional[str]
    mlflow_run_id: Optional[str]
    empty_text_emb: Optional[str]
    companions: dict[str, str]


def _companions(cfg: TrainConfig, input_manifest: dict) -> dict[str, str]:
    """Checkpoint dirs of the other pieces: the config wins, else what the latents were computed with."""
    found: dict[str, str] = {}
    encoders = input_manifest.get("encoders") or {}
    for name in ("text", "stage_a", "stage_b", "stage_c", "semantic"):
        configured = getattr(cfg.checkpoints, name)
        if configured:
            uri = storage.normalize(configured)
            if not storage.exists(storage.join(uri, "config.json")):
                raise ConfigError(f"checkpoints.{name}: {uri} is not a stages checkpoint (no config.json)")
            found[name] = uri
        elif isinstance(encoders.get(name), dict) and encoders[name].get("checkpoint"):
            uri = encoders[name]["checkpoint"]
            if storage.exists(storage.join(uri, "config.json")):
                found[name] = uri
    found.pop({"a": "stage_a", "b": "stage_b", "c": "stage_c"}[cfg.stage], None)  # the run's own stage
    return found


def _use_gpu(cfg: TrainConfig, ray) -> bool:
    if cfg.train.use_gpu is not None:
        return cfg.train.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


def plan_run(cfg: TrainConfig, use_gpu: bool) -> RunPlan:
    from pipelines import train_specs

    input_uri = require_input(cfg)
    input_manifest = manifest_lib.read(input_uri)
    model_config = train_specs.model_config(cfg.stage, cfg.model.preset, cfg.model.overrides)
    if cfg.model.init_from and not storage.exists(storage.join(cfg.model.init_from, "config.json")):
        raise ConfigError(f"model.init_from: {cfg.model.init_from} is not a stages checkpoint (no config.json)")
    empty_text = None
    if cfg.stage == "a":
        from pipelines import train_stage_a

        num_samples = train_stage_a.count_images(input_uri, input_manifest)
        shapes = {"images": [cfg.data.crop_size, cfg.data.crop_size]}
        if cfg.stage_a.perceptual_weight > 0:
            train_stage_a.check_perceptual_config(cfg.stage_a.perceptual)
        if cfg.data.crop_size % model_config.downscale:
            raise ConfigError(f"data.crop_size: {cfg.data.crop_size} is not divisible by Stage A's downscale "
                              f"{model_config.downscale}")
    else:
        shapes = {k: list(v) for k, v in train_specs.check_latent_shapes(
            cfg.stage, model_config, input_manifest.get("columns") or {}, input_uri).items()}
        num_samples = sum(int(s["rows"]) for s in input_manifest.get("shards") or [])
        entry = input_manifest.get("empty_text_emb")
        if isinstance(entry, dict) and entry.get("file"):
            empty_text = storage.join(input_uri, entry["file"])
        if cfg.data.text_dropout > 0 and empty_text is None:
            raise ConfigError(f"data.text_dropout: {cfg.data.text_dropout} needs the empty-caption embedding, but "
                              f"{input_uri}/manifest.json has no 'empty_text_emb' entry")
    if num_samples // cfg.train.num_workers < cfg.train.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size: {cfg.train.micro_batch_size} samples per worker, but {input_uri} "
                          f"holds {num_samples} samples for {cfg.train.num_workers} workers")
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_gpu)
    name = run_name(cfg)
    root = runs_root(cfg)
    return RunPlan(stage=cfg.stage, run_name=name, run_dir=storage.join(root, name), runs_root=root,
                   input_uri=input_uri, shapes=shapes, num_samples=num_samples, use_gpu=use_gpu, bf16=bf16,
                   tracking_uri=None, mlflow_run_id=None, empty_text_emb=empty_text,
                   companions=_companions(cfg, input_manifest))


def _check_resume(cfg: TrainConfig, info: dict, run_dir: str) -> None:
    if info.get("stage") != cfg.stage:
        raise ConfigError(f"run_name: {run_dir} is a Stage {str(info.get('stage')).upper()} run, "
                          f"this config trains Stage {cfg.stage.upper()}")
    if info.get("weights_hash") != weights_hash(cfg) and not cfg.train.allow_config_change:
        changed = _flat_differences(info.get("config", {}), _strip(config_lib.to_dict(cfg), VERSION_EXCLUDES))
        raise ConfigError(
            f"run_name: {run_dir} was started with different settings ({', '.join(changed) or 'unknown keys'}); "
            f"resuming would mix two recipes. Use a new run_name, or set train.allow_config_change=true")


def _reenter(directory: str) -> None:
    """chdir to `directory` again. On a local multi-node Ray cluster (several raylets sharing one temp
    dir) a job's working_dir can be re-extracted at the same path after the driver connects, which
    leaves the driver in a deleted directory: os.getcwd() (MLflow calls it) then fails."""
    try:
        os.chdir(directory)
    except OSError:
        os.chdir(tempfile.gettempdir())


def run(cfg: TrainConfig) -> dict:
    """Train (or resume) the configured run; returns a summary (run dir, step, export, MLflow run id)."""
    # torch must be imported before ray.init(): in a `ray job submit` driver with a working_dir runtime
    # env, importing it afterwards aborts with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so".
    import torch  # noqa: F401

    start_dir = os.getcwd()
    ray = init_ray(cfg.ray)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan = plan_run(cfg, _use_gpu(cfg, ray))
    _reenter(start_dir)
    info_path = storage.join(plan.run_dir, RUN_INFO)
    info = storage.read_json(info_path) if storage.exists(info_path) else None
    if info is not None:
        _check_resume(cfg, info, plan.run_dir)
        log.info("train: resuming run %s", plan.run_dir)
    mlflow_cfg = dataclasses.replace(cfg.mlflow, system_metrics=False)  # rank 0 records the training node's
    tags = {"wurst.run_name": plan.run_name, "wurst.run_dir": plan.run_dir, "wurst.stage": cfg.stage}
    with tracking.start_run(PHASE, cfg, data_root=cfg.data_root, mlflow_cfg=mlflow_cfg, input_uri=plan.input_uri,
                            run_name=plan.run_name, run_id=(info or {}).get("mlflow_run_id"), tags=tags) as mlrun:
        if mlrun is not None:
            import mlflow

            plan.tracking_uri = mlflow.get_tracking_uri()
            plan.mlflow_run_id = mlrun.info.run_id
            if info is not None and info.get("mlflow_run_id") == plan.mlflow_run_id:
                mlflow.set_tag("wurst.resumed", "true")
        if info is None or info.get("mlflow_run_id") != plan.mlflow_run_id:
            storage.makedirs(plan.run_dir)
            storage.write_json(info_path, {
                "run_name": plan.run_name, "stage": cfg.stage, "mlflow_run_id": plan.mlflow_run_id,
                "tracking_uri": plan.tracking_uri, "input": plan.input_uri,
                "input_identity": manifest_lib.input_identity(plan.input_uri), "weights_hash": weights_hash(cfg),
                "config": _strip(config_lib.to_dict(cfg), VERSION_EXCLUDES), "code_version": manifest_lib.code_version(),
            })
        manifest_lib.save_config(plan.run_dir, config_lib.to_dict(cfg))
        resources = {"CPU": cfg.train.cpus_per_worker}
        if plan.use_gpu:
            resources["GPU"] = 1
        # By reference from the importable module: under `python -m pipelines.train` this file is
        # __main__, and cloudpickle would ship __main__'s functions by value, without their imports.
        from pipelines.train import train_worker as worker_entry

        trainer = TorchTrainer(
            worker_entry,
            train_loop_config={"config": config_lib.to_dict(cfg), "plan": dataclasses.asdict(plan)},
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=plan.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=plan.run_name, storage_path=plan.runs_root,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        summary = {"run_dir": plan.run_dir, "run_name": plan.run_name, "step": (result.metrics or {}).get("step"),
                   "export": storage.join(plan.run_dir, EXPORT_DIR), "mlflow_run_id": plan.mlflow_run_id,
                   "checkpoint": result.checkpoint.path if result.checkpoint else None}
        # The completion marker and lineage record (the workflow skips a run whose manifest reached
        # max_steps; raising max_steps later resumes the same run and rewrites it).
        manifest_lib.write(plan.run_dir, phase=PHASE, cfg=cfg, input_uri=plan.input_uri,
                           input_id=manifest_lib.input_identity(plan.input_uri),
                           counts={"steps": summary["step"], "max_steps": cfg.train.max_steps},
                           extra={"stage": cfg.stage, "run_name": plan.run_name, "export": summary["export"]},
                           mlflow_run_id=plan.mlflow_run_id)
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = config_lib.argument_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    return run(config_lib.load_from_args(TrainConfig, args))


# --------------------------------------------------------------------------------------------
# Worker


def _rng_state(generator) -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, generator) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save_tensors(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


def _load_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file missing: {path} (was the checkpoint written by the same "
                                "number of workers?)")
    return load_file(path)


class WorkerLoop:
    """The training loop of one Ray Train worker; the stage-specific parts come from a runner."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan):
        import ray.train
        import ray.train.torch
        import torch

        from pipelines import deepspeed_utils

        self.cfg, self.plan = cfg, plan
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        deepspeed_utils.ensure_extensions_dir()
        self.device = ray.train.torch.get_device() if plan.use_gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.runner = make_runner(cfg, plan, self.rank, self.world, self.device)
        self.engine = self.runner.engines["model"]
        self.ema = None
        if cfg.ema.enabled:
            from pipelines.ema import ShardedEma

            self.ema = ShardedEma(self.engine, decay=cfg.ema.decay, start_step=cfg.ema.start_step,
                                  every=cfg.ema.every)
        self.samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps  # per rank
        self.step = 0
        self.trace: list[str] = []
        self.mlflow = None
        self.flops_per_sample: float | None = None
        self.peak_tflops = None

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, metrics: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="wurst-ckpt-") as tmp:
            for name, engine in self.runner.engines.items():
                engine.save_checkpoint(tmp, tag=name, save_latest=False)
            _save_tensors(_rng_state(self.runner.generator), os.path.join(tmp, "rng", f"rank-{self.rank:05d}.safetensors"))
            if self.ema is not None:
                _save_tensors(self.ema.state_dict(), os.path.join(tmp, "ema", f"rank-{self.rank:05d}.safetensors"))
            if self.rank == 0:
                state = {"step": self.step, "samples_per_rank": self.step * self.samples_per_step,
                         "world_size": self.world, "zero_stage": self.cfg.train.zero_stage,
                         "engines": sorted(self.runner.engines), "ema": self.ema is not None,
                         "mlflow_run_id": self.plan.mlflow_run_id}
                with open(os.path.join(tmp, TRAIN_STATE), "w") as f:
                    json.dump(state, f, indent=2)
            self._flush_trace()
            ray.train.report({"step": self.step, **metrics}, checkpoint=Checkpoint.from_directory(tmp))

    def restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            with open(os.path.join(directory, TRAIN_STATE)) as f:
                state = json.load(f)
            if state["world_size"] != self.world or state["zero_stage"] != self.cfg.train.zero_stage:
                raise RuntimeError(
                    f"{directory}: written by {state['world_size']} workers with ZeRO-{state['zero_stage']}; this run has "
                    f"{self.world} workers with ZeRO-{self.cfg.train.zero_stage}. DeepSpeed shards only load into the "
                    "same layout: set train.num_workers / train.zero_stage back, or start a new run_name")
            for name, engine in self.runner.engines.items():
                path, _ = engine.load_checkpoint(directory, tag=name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
                if path is None:
                    raise RuntimeError(f"{directory}/{name}: DeepSpeed could not load this checkpoint")
            _set_rng_state(_load_tensors(os.path.join(directory, "rng", f"rank-{self.rank:05d}.safetensors")),
                           self.runner.generator)
            if self.ema is not None:
                ema_file = os.path.join(directory, "ema", f"rank-{self.rank:05d}.safetensors")
                self.ema.load_state_dict(_load_tensors(ema_file), ema_file)
            self.step = int(state["step"])
        log.info("rank %d: resumed at step %d", self.rank, self.step)

    # ---------------------------------------------------------------- consolidated weights
    def full_weights(self) -> dict | None:
        """Full fp32 (EMA if enabled) weights on rank 0; collective."""
        from pipelines import deepspeed_utils

        if self.ema is not None:
            return self.ema.full_state_dict()
        return deepspeed_utils.full_fp32_state_dict(self.engine)

    def export(self, state: dict | None) -> None:
        if self.rank == 0:
            import torch

            with torch.random.fork_rng(devices=[]):  # building modules must not move the training RNG
                self.runner.write_export(state, storage.join(self.plan.run_dir, EXPORT_DIR), self.step,
                                         ema=self.ema is not None)

    def sample_grid(self, state: dict | None) -> None:
        if self.rank == 0 and self.mlflow is not None:
            import torch

            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                grid = self.runner.sample_grid(state, self.step)
            if grid is not None:
                self.mlflow.log_image(grid, key="samples", step=self.step)

    # ---------------------------------------------------------------- logging
    def _start_mlflow(self) -> None:
        if self.rank != 0 or not self.plan.mlflow_run_id:
            return
        import mlflow

        mlflow.set_tracking_uri(self.plan.tracking_uri)
        mlflow.start_run(run_id=self.plan.mlflow_run_id, log_system_metrics=self.cfg.mlflow.system_metrics)
        self.mlflow = mlflow

    def _flush_trace(self) -> None:
        if not self.trace:
            return
        first, last = json.loads(self.trace[0])["step"], json.loads(self.trace[-1])["step"]
        path = storage.join(self.plan.run_dir, TRACE_DIR, f"rank-{self.rank:05d}-steps-{first:09d}-{last:09d}.jsonl")
        storage.write_text(path, "\n".join(self.trace) + "\n")
        self.trace = []

    def _maybe_inject_fault(self) -> None:
        fault = self.cfg.fault
        if fault.kill_at_step is None or self.step + 1 != fault.kill_at_step or self.rank != (fault.kill_rank or 0):
            return
        marker = storage.join(self.plan.run_dir, f".fault-injected-step-{fault.kill_at_step}")
        if storage.exists(marker):
            return
        storage.write_text(marker, f"rank {self.rank} killed itself before step {fault.kill_at_step}\n")
        log.warning("fault drill: SIGKILL rank %d before step %d", self.rank, fault.kill_at_step)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    # ---------------------------------------------------------------- main loop
    def run(self) -> None:
        import torch.distributed as dist

        from pipelines import train_specs

        cfg = self.cfg
        self.restore()
        self._start_mlflow()
        try:
            if self.rank == 0:
                self.flops_per_sample = self.runner.flops_per_sample()
                self.peak_tflops = train_specs.peak_tflops_for(self.device, cfg.metrics.peak_tflops)
                if self.mlflow is not None and self.step == 0:
                    self.mlflow.log_params({"derived.flops_per_sample": f"{self.flops_per_sample:.4g}",
                                            "derived.world_size": self.world,
                                            "derived.device": str(self.device),
                                            "derived.precision": "bf16" if self.plan.bf16 else "fp32",
                                            "derived.num_samples": self.plan.num_samples})
            batches = self.runner.batches(start_sample=self.step * self.samples_per_step)
            totals: dict[str, float] = {}
            interval_steps, interval_time = 0, 0.0
            last_metrics: dict[str, float] = {}
            while self.step < cfg.train.max_steps:
                self._maybe_inject_fault()
                started = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
                metrics = self.runner.train_step(self.step + 1, micro)
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.step)
                if cfg.data.trace:
                    ids = [i for m in micro for i in self.runner.sample_ids(m)]
                    self.trace.append(json.dumps({"step": self.step, "ids": ids}))
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                interval_steps += 1
                interval_time += time.perf_counter() - started
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    last_metrics = self._log(totals, interval_steps, interval_time)
                    totals, interval_steps, interval_time = {}, 0, 0.0
                sample_due = cfg.sampling.every and self.step % cfg.sampling.every == 0
                export_due = cfg.train.export_every and self.step % cfg.train.export_every == 0
                if (sample_due or export_due) and self.step != cfg.train.max_steps:
                    state = self.full_weights()
                    if export_due:
                        self.export(state)
                    if sample_due:
                        self.sample_grid(state)
                    del state
                if self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps:
                    self.save_checkpoint(last_metrics)
            state = self.full_weights()
            self.export(state)
            if cfg.sampling.every:
                self.sample_grid(state)
            if dist.is_initialized():
                dist.barrier()
        finally:
            if self.mlflow is not None:
                self.mlflow.end_run()

    def _log(self, totals: dict[str, float], steps: int, seconds: float) -> dict[str, float]:
        """Average the interval's metrics over steps and ranks; rank 0 writes them to MLflow."""
        import torch
        import torch.distributed as dist

        keys = sorted(totals)
        values = torch.tensor([totals[k] / steps for k in keys] + [seconds], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world
        averaged = dict(zip(keys, values[:-1].tolist()))
        mean_seconds = float(values[-1])
        samples = steps * self.samples_per_step * self.world
        out = dict(averaged)
        out["samples_per_s"] = samples / mean_seconds if mean_seconds > 0 else 0.0
        out["samples_seen"] = float(self.step * self.samples_per_step * self.world)
        out["epoch"] = out["samples_seen"] / max(1, self.plan.num_samples)
        if self.flops_per_sample:
            out["tflops_per_worker"] = out["samples_per_s"] * self.flops_per_sample / self.world / 1e12
            out["tflops_total"] = out["tflops_per_worker"] * self.world
            if self.peak_tflops:
                out["mfu"] = out["tflops_per_worker"] / self.peak_tflops
        if self.device.type == "cuda":
            out["gpu_mem_allocated_gb"] = torch.cuda.memory_allocated(self.device) / 2**30
            out["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.rank == 0:
            log.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(out.items())))
            if self.mlflow is not None:
                self.mlflow.log_metrics(out, step=self.step)
        return out


def make_runner(cfg: TrainConfig, plan: RunPlan, rank: int, world: int, device):
    if cfg.stage == "a":
        from pipelines.train_stage_a import StageARunner

        return StageARunner(cfg, plan, rank, world, device)
    return DiffusionRunner(cfg, plan, rank, world, device)


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    cfg = config_lib.from_dict(TrainConfig, loop_config["config"])
    plan = RunPlan(**loop_config["plan"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    WorkerLoop(cfg, plan).run()


# --------------------------------------------------------------------------------------------
# Shared engine set-up and the Stage B / C runner


def warmup_then_constant(warmup_steps: int):
    """LR multiplier for optimizer step n (0-based): linear (n+1)/warmup up to 1, then 1."""
    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


def make_engine(cfg: TrainConfig, plan: RunPlan, world: int, model, *, lr: float | None = None, optimizer=None,
                zero_stage: int | None = None):
    """One DeepSpeed engine around `model` with AdamW + warm-up/constant LR built in Python."""
    import torch

    from pipelines import deepspeed_utils

    deepspeed = deepspeed_utils.import_deepspeed()
    optim = cfg.optim
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr or optim.lr,
                                      betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(optim.warmup_steps))
    ds_config = deepspeed_utils.engine_config(
        micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=cfg.train.grad_accum_steps,
        world_size=world, zero_stage=cfg.train.zero_stage if zero_stage is None else zero_stage, bf16=plan.bf16, grad_clip=optim.grad_clip)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    deepspeed_utils.use_safe_checkpoint_loading(engine)
    if cfg.train.compile:
        engine.compile()
    return engine, scheduler


def load_init_weights(model, path: str, kind: str) -> None:
    import stages

    source = stages.load(local_checkpoint(path), expected_kind=kind)
    model.load_state_dict(source.state_dict(), strict=True)


def seed_everything(seed: int, rank: int) -> "Any":
    """Same seed on every rank for the model's initialisation; then a per-rank stream for dropout
    and a per-rank generator for the objective's noise, t and condition dropout."""
    import torch

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (rank + 1))
    return generator


def reseed_per_rank(seed: int, rank: int) -> None:
    import torch

    torch.manual_seed(seed * 1_000_003 + rank + 1)


class DiffusionRunner:
    """Stage B / C: diffusion on cached latents."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan, rank: int, world: int, device):
        import numpy as np
        import torch

        from pipelines import train_specs

        self.cfg, self.plan, self.rank, self.world, self.device = cfg, plan, rank, world, device
        self.stage = cfg.stage
        self.kind = train_specs.STAGE_KINDS[self.stage]
        self.model_config = train_specs.model_config(self.stage, cfg.model.preset, cfg.model.overrides)
        self.generator = seed_everything(cfg.data.seed, rank)
        model = train_specs.build_model(self.stage, self.model_config, cfg.model.gradient_checkpointing)
        if cfg.model.init_from:
            load_init_weights(model, cfg.model.init_from, self.kind)
        reseed_per_rank(cfg.data.seed, rank)
        self.dtype = torch.bfloat16 if plan.bf16 else torch.float32
        self.engine, self.scheduler = make_engine(cfg, plan, world, model)
        self.engines = {"model": self.engine}
        self.text_uncond = None
        if plan.empty_text_emb:
            array = np.load(io.BytesIO(storage.read_bytes(plan.empty_text_emb)), allow_pickle=False)
            self.text_uncond = torch.from_numpy(np.asarray(array, dtype=np.float32)).reshape(
                1, *plan.shapes["text_emb"]).to(device, self.dtype)
        self.shapes = {k: tuple(v) for k, v in plan.shapes.items()}
        self._companion_models: dict[str, Any] = {}
        self._preview: dict | None = None

    # ------------------------------------------------------------ data
    def dataset(self, **kwargs):
        from pipelines.latent_shards import LatentDataset
        from pipelines import train_specs

        return LatentDataset(self.plan.input_uri, list(train_specs.latent_columns(self.stage)), **kwargs)

    def batches(self, start_sample: int):
        import torch
        from torch.utils.data import DataLoader

        dataset = self.dataset(rank=self.rank, world_size=self.world, seed=self.cfg.data.seed,
                               start_offset=start_sample, batch_size=self.cfg.train.micro_batch_size,
                               shuffle_window=self.cfg.data.shuffle_window, infinite=True)
        workers = self.cfg.data.loader_workers
        # A private generator: DataLoader draws its workers' base seed from it, not from the global RNG
        # (which would shift the dropout stream of a resumed run against an uninterrupted one).
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.cfg.data.seed),
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        return iter(loader)

    @staticmethod
    def sample_ids(batch: dict) -> list[str]:
        return list(batch["uid"])

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in batch.items() if hasattr(v, "to")}

    # ------------------------------------------------------------ step
    def train_step(self, step: int, micro_batches: list[dict]) -> dict[str, float]:
        import torch

        from pipelines import train_specs

        losses, mses = [], []
        for batch in micro_batches:
            batch = self._to_device(batch)
            loss, parts = train_specs.diffusion_loss(self.stage, self.engine, batch, text_uncond=self.text_uncond,
                                                     data_cfg=self.cfg.data, generator=self.generator)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
            mses.append(parts.mse.mean().float())
        grad_norm = self.engine.get_global_grad_norm()
        return {"loss": float(torch.stack(losses).mean()), "mse": float(torch.stack(mses).mean()),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": float(self.scheduler.get_last_lr()[0])}

    def flops_per_sample(self) -> float:
        from pipelines import train_specs

        return train_specs.training_flops_per_sample(self.stage, self.model_config, self.shapes)

    # ------------------------------------------------------------ export & samples
    def module_from(self, state: dict, device=None, dtype=None):
        from stages.checkpoint import build_with_state, model_classes

        model_cls, _ = model_classes(self.kind)
        return build_with_state(model_cls, self.model_config, state, f"{self.plan.run_name} weights",
                                device=device or "cpu", dtype=dtype)

    def write_export(self, state: dict, export_uri: str, step: int, *, ema: bool) -> None:
        write_export(self.kind, self.module_from(state), export_uri, step, ema=ema, plan=self.plan)

    def _companion(self, name: str):
        if name not in self._companion_models:
            import stages

            dtype = self.dtype if self.device.type == "cuda" else None
            self._companion_models[name] = stages.load(local_checkpoint(self.plan.companions[name]),
                                                       expected_kind="text" if name == "text" else name,
                                                       device=self.device, dtype=dtype)
        return self._companion_models[name]

    def _preview_batch(self) -> dict:
        """A fixed batch for sample grids, from its own reader (never from the training stream)."""
        if self._preview is None:
            from pipelines import train_specs
            from pipelines.latent_shards import LatentDataset

            columns = list(train_specs.latent_columns(self.stage)) + ["caption"]
            reader = LatentDataset(self.plan.input_uri, columns, rank=0, world_size=1, seed=self.cfg.sampling.seed,
                                   batch_size=self.cfg.sampling.num_images, shuffle_window=self.cfg.data.shuffle_window)
            self._preview = next(iter(reader))
        return self._preview

    def sample_grid(self, state: dict, step: int):
        from pipelines import train_specs

        samp = self.cfg.sampling
        dtype = self.dtype if self.device.type == "cuda" else None
        model = self.module_from(state, device=self.device, dtype=dtype)
        preview = self._preview_batch()
        companions = self.plan.companions
        if self.stage == "c" and all(k in companions for k in ("stage_b", "stage_a", "text")):
            from pipelines.generate import GenerationModels, generate_images

            text = self._companion("text")
            models = GenerationModels(stage_c=model, stage_b=self._companion("stage_b"),
                                      stage_a=self._companion("stage_a"), text_c=text, text_b=text,
                                      sources={"stage_c": f"{self.plan.run_name}@{step}"})
            prompts = list(samp.prompts) or list(preview["caption"])
            result = generate_images(prompts, models=models, n=1, height=samp.height, width=samp.width,
                                     seed=samp.seed, steps_c=samp.steps, steps_b=samp.steps_b,
                                     guidance_c=samp.guidance, guidance_b=samp.guidance_b,
                                     batch_size=samp.num_images, device=self.device)
            return result.grid
        stage_a = self._companion("stage_a") if self.stage == "b" and "stage_a" in companions else None
        return train_specs.diffusion_preview(self.stage, model, preview, text_uncond=self.text_uncond,
                                             stage_a=stage_a, steps=samp.steps, guidance=samp.guidance,
                                             seed=samp.seed)


# --------------------------------------------------------------------------------------------
# Export


def local_checkpoint(uri: str) -> str:
    """A local directory for a stages checkpoint (object-store checkpoints are copied to a temp dir)."""
    local = storage.local_path(uri)
    if local is not None:
        return local
    target = tempfile.mkdtemp(prefix="wurst-checkpoint-")
    for path in storage.list_files(uri):
        with open(os.path.join(target, storage.basename(path)), "wb") as f:
            f.write(storage.read_bytes(path))
    return target


def local_checkpoint_file(uri: str) -> str:
    """A local path for a weights file (an object-store file is copied to a temp file)."""
    local = storage.local_path(uri)
    if local is not None:
        return local
    fd, target = tempfile.mkstemp(prefix="wurst-weights-", suffix=os.path.splitext(uri)[1])
    with os.fdopen(fd, "wb") as f:
        f.write(storage.read_bytes(uri))
    return target


def _copy_tree(source: str, target: str) -> None:
    for path in storage.list_files(source):
        storage.write_bytes(storage.join(target, storage.basename(path)), storage.read_bytes(path))


def write_export(kind: str, module, export_uri: str, step: int, *, ema: bool, plan: RunPlan) -> None:
    """<export>/<kind>/ (stages checkpoint) + copies of the companion checkpoints + export.json."""
    import stages

    with tempfile.TemporaryDirectory(prefix="wurst-export-") as tmp:
        stages.save(module, os.path.join(tmp, kind))
        _copy_tree(os.path.join(tmp, kind), storage.join(export_uri, kind))
    copied = {}
    for name, source in plan.companions.items():
        target = storage.join(export_uri, name)
        marker = storage.join(target, ".source.json")
        # Copy once per source: a 1-2 GB text encoder is not rewritten at every export.
        if not (storage.exists(marker) and storage.read_json(marker).get("source") == source):
            _copy_tree(source, target)
            storage.write_json(marker, {"source": source})
        copied[name] = source
    storage.write_json(storage.join(export_uri, "export.json"), {
        "run_name": plan.run_name, "stage": plan.stage, "step": step, "weights": "ema" if ema else "model",
        "kind": kind, "companions": copied, "mlflow_run_id": plan.mlflow_run_id, "input": plan.input_uri,
    })


if __name__ == "__main__":
    config_lib.run_cli("train", main)
