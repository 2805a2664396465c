"""The training run's settings: `TrainConfig` (the YAML / `--set` keys of `python -m pipelines.train`) and
`RunPlan` (what the driver resolves once and hands to every worker).

`VERSION_EXCLUDES` lists the settings that do not change the trained weights: they stay out of the run's
version hash (the default run name), so a run resumes when only they change (e.g. a larger max_steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from pipelines import tracking
from pipelines.config import ConfigError, param
from pipelines.evaluate import ClipScoreConfig
from pipelines.runtime import RayConfig, default_data_root

# The run directory, <runs root>/<run name>/: run.json (the MLflow run id, the weights hash and the
# settings the run started with), Ray Train's checkpoint_*/ dirs, export/ and data_trace/.
RUNS_DIR = "runs"
RUN_INFO = "run.json"
EXPORT_DIR = "export"
TRACE_DIR = "data_trace"
# A run without MLflow (bench/, the GPU smoke test): sample grids and the logged metrics, one JSON per line.
SAMPLES_DIR = "samples"
METRICS_FILE = "metrics.jsonl"
COLLECTIVES_DIR = "collectives"  # train.audit_collectives: each rank's collective call counts

# Settings that do not change the trained weights: excluded from the run's version hash, and free to
# change when a run is resumed (e.g. raise max_steps to train longer).
VERSION_EXCLUDES = (
    "data_root", "output", "run_name", "mlflow", "ray", "sampling", "validation", "evaluation", "checkpoints",
    "metrics", "fault",
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.export_every", "train.max_failures", "train.use_gpu", "train.cpus_per_worker",
    "train.allow_config_change", "train.max_nonfinite_steps", "train.audit_collectives", "train.overlap_comm",
    "train.bucket_size",
    "data.loader_workers", "data.trace", "data.allow_latent_ratio_mismatch",
)


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
    # With init_from naming a run's export (<run>/export/<kind> or <run>/export/<step>/<kind>): continue its step
    # count (export.json's step) instead of starting at 0, as the paper's resolution schedule continues a run
    # at the next resolution. The LR warm-up and the EMA schedule go on from that step and train.max_steps
    # counts the whole chain (12x12 to 500k, then 24x24 to 864k); the data stream starts at this run's first
    # sample and the optimizer starts fresh (an export holds the weights only: the EMA weights when on).
    continue_step_count: bool = False

    def validate(self) -> None:
        if self.continue_step_count and not self.init_from:
            raise ConfigError("continue_step_count: true needs model.init_from (the export whose step count the "
                              "run continues)")


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
    # Stage B / C: training timesteps t -> 1 - (1 - t)^k (k > 1: more high-noise steps; 1: the paper's).
    timestep_warp: float = param(1.0, ge=1.0, le=10.0)
    # Stage A: images are resized (shorter side) to image_size, then randomly cropped to crop_size.
    image_size: int = param(256, ge=8)
    crop_size: int = param(128, ge=8)
    # Write the sample ids of every step to <run dir>/data_trace/ (an audit of the data order).
    trace: bool = False
    # Stage B: start even though the input's Stage A latent size is not what generation derives from its
    # semantic latent size (stages.sampling.stage_b_latent_size: x10.67, e.g. 12x12 -> 128x128, 24x24 ->
    # 256x256); without it such an input stops the run at start-up, naming both shapes. For inputs sized for
    # speed (the suite's tiny latents), not for generation.
    allow_latent_ratio_mismatch: bool = False

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
    # auto: bf16 on GPU, fp32 on CPU. bf16: fp32 weights, bf16 autocast, fp32 gradients and gradient
    # reduction (the authors' recipe; see README "Precision"). bf16-weights: DeepSpeed's bf16 mode (bf16
    # weights and gradients, fp32 optimizer master copy; less memory, a noisier loss).
    precision: Literal["auto", "bf16", "bf16-weights", "fp32"] = "auto"
    zero_stage: int = param(2, choices=[1, 2, 3])
    # ZeRO-2/3: reduce gradient buckets while the backward pass is still running (costs ~4.5 bucket-sized
    # buffers), from a contiguous gradient buffer; bucket_size in elements (reduce and all-gather buckets).
    overlap_comm: bool = True
    bucket_size: int = param(100_000_000, ge=1_000)
    # Check that every torch.distributed collective gets a tensor on the training device (see
    # pipelines.training.collectives); each rank writes its call counts to <run dir>/collectives/.
    audit_collectives: bool = False
    # torch.compile the model inside the DeepSpeed engine.
    compile: bool = False
    log_every: int = param(10, ge=1)
    checkpoint_every: int = param(1000, ge=1)
    keep_checkpoints: int = param(3, ge=1)
    # Consolidated (EMA) export every N steps (and always at the end); 0: only at the end.
    export_every: int = param(5000, ge=0)
    max_failures: int = param(3, ge=0)
    # Steps whose loss or gradients are not finite are skipped (DeepSpeed discards the update) and counted;
    # the run stops with an error at the next one beyond this many.
    max_nonfinite_steps: int = param(10, ge=0)
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
class ValidationConfig:
    """Stage B / C: the loss on the input's held-out split (precompute's `validation_fraction`), logged as
    val/loss, val/mse and val/loss_t<t>. Deterministic: the same samples, fixed timesteps and fixed noise
    per (seed, sample, timestep), so it changes only when the weights do (equal across runs and resumes).
    Evaluated on the trained weights through the engine; with `ema`, also on the EMA weights (val_ema/*)."""

    # Every N steps and at the last step; 0: never.
    every: int = param(1000, ge=0)
    # The first N samples of the validation split (manifest order), split between the ranks.
    max_samples: int = param(1024, ge=1)
    # The diffusion times t evaluated (val/loss_t<t>); also the centres of the train/loss_t<t> buckets of
    # the training loss (bucket edges halfway between neighbours, the outer ones 0 and 1).
    timesteps: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    # Sample i's noise at timesteps[k] is drawn from a torch.Generator seeded from (seed, i, k).
    seed: int = param(0, ge=0)
    # Samples per forward; None: train.micro_batch_size.
    batch_size: Optional[int] = param(None, ge=1)
    # Also val_ema/*: the EMA weights, gathered in full on every rank and run as a second model copy.
    ema: bool = False

    def validate(self) -> None:
        if not self.timesteps:
            raise ConfigError("timesteps: list at least one diffusion time t in (0, 1]")
        if not all(0.0 < t <= 1.0 for t in self.timesteps):
            raise ConfigError(f"timesteps: each t must be in (0, 1], got {self.timesteps}")
        if any(b <= a for a, b in zip(self.timesteps[:-1], self.timesteps[1:])):
            raise ConfigError(f"timesteps: must be strictly increasing, got {self.timesteps}")
        labels = [f"{t:g}" for t in self.timesteps]  # metrics.timestep_label: the metric names must differ
        if len(set(labels)) != len(labels):
            raise ConfigError(f"timesteps: {self.timesteps} give the same metric name twice ({labels})")


@dataclasses.dataclass
class EvaluationConfig:
    """Periodic evaluation on rank 0 with the weights the export writes (the EMA weights when `ema.enabled`),
    every N steps and at the last step. Stage C generates `n` images per prompt through the run's text
    encoder, Stage B and Stage A, scored as eval/probe/<attribute> (the demo attribute probe, when every
    prompt is a demo caption) and eval/clip_score (with `clip.checkpoint`). Stage B samples Stage A latents
    from the true semantic latents of the first `samples` held-out samples (the training shards' first when
    the input has no validation split), decodes them with the run's Stage A and scores them against their
    captions: eval/probe_b/<attribute>, eval/clip_score_b. Scored by `pipelines.evaluate`'s functions."""

    # Every N steps and at the last step; 0: never.
    every: int = param(0, ge=0)
    # Stage C: prompts, plus `unseen_prompts` demo prompts whose attribute combinations the training
    # captions lack (pipelines.evaluation.probe.unseen_prompts).
    prompts: list[str] = dataclasses.field(default_factory=list)
    unseen_prompts: int = param(0, ge=0)
    probe: Literal["auto", "on", "off"] = "auto"  # auto: on when every prompt (caption) is a demo caption
    n: int = param(1, ge=1)  # Stage C: images per prompt
    samples: int = param(4, ge=1)  # Stage B: samples decoded and scored
    steps_c: int = param(8, ge=1)  # DDPM steps of Stage C (Stage C runs)
    steps_b: int = param(4, ge=1)  # ... of Stage B (the trained one, or the companion decoding Stage C's latents)
    guidance_c: float = param(2.0, ge=0.0)
    guidance_b: float = param(0.0, ge=0.0)
    # Stage C: the generated images' size (Stage B's latent must fit its U-Net, see pipelines.generate).
    height: int = param(128, ge=8)
    width: int = param(128, ge=8)
    seed: int = 0
    batch_size: int = param(8, ge=1)
    clip: ClipScoreConfig = dataclasses.field(default_factory=ClipScoreConfig)


@dataclasses.dataclass
class TrainMlflowConfig(tracking.MlflowConfig):
    # A registered model name: every export is logged to the run as artifacts export/<step>/ and, with a
    # name here, becomes a new version of that registered model (source runs:/<run id>/export/<step>).
    register_model: Optional[str] = None

    def validate(self) -> None:
        name = self.register_model
        if name is not None and (not name.strip() or any(c in name for c in "/:'\"")):
            raise ConfigError(f"register_model: {name!r} is not a registered model name (non-empty, without / : "
                              "or quotes)")
        if name is not None and not self.enabled:
            raise ConfigError("register_model: needs mlflow.enabled: true (a version points at the MLflow run's "
                              "artifacts)")


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
class SemanticCompressorTrainConfig:
    """Stage B: fine-tune the Semantic Compressor with Stage B, as the paper does ("we updated the weights of
    the Semantic Compressor during training"). The run then reads the compressor's input pixels (precompute
    output `semantic_image`) instead of precomputed `semantic` latents, trains both in one engine (the
    conditioning dropout / noise act on the compressor's output), and exports the fine-tuned compressor as
    `export/<step>/semantic`, which the semantic precompute for Stage C takes (encoders.semantic)."""

    train: bool = False
    # Its starting weights (a stages checkpoint or <run>/export/semantic). None: model.init_from's export's
    # semantic/ when it has one (a continued Stage B run), else the encoder the input's latents record.
    init_from: Optional[str] = None
    # Its own learning rate (an AdamW param group; the warm-up applies to both). None: optim.lr.
    lr: Optional[float] = param(None, gt=0.0)
    # frozen: BatchNorm in eval mode with affine fixed (see stages.stage_b.StageBWithCompressorConfig); train.
    batchnorm: Literal["frozen", "train"] = "frozen"


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
    # Seconds the drill waits before the kill, so the checkpoint reported just before has reached Ray
    # Train's controller (it polls workers every 2 s; a checkpoint reported less than that before a crash
    # is lost and the group restarts from the one before).
    settle_s: float = param(4.0, ge=0.0)


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
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    checkpoints: CheckpointsConfig = dataclasses.field(default_factory=CheckpointsConfig)
    stage_a: StageALossConfig = dataclasses.field(default_factory=StageALossConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    fault: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    semantic_compressor: SemanticCompressorTrainConfig = dataclasses.field(default_factory=SemanticCompressorTrainConfig)
    mlflow: TrainMlflowConfig = dataclasses.field(default_factory=TrainMlflowConfig)

    def validate(self) -> None:
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            raise ConfigError(f"run_name: {self.run_name!r} must be a plain directory name")
        if self.validation.ema and not self.ema.enabled:
            raise ConfigError("validation.ema: true needs ema.enabled: true (there are no EMA weights to evaluate)")
        if self.semantic_compressor.train and self.stage != "b":
            raise ConfigError("semantic_compressor.train: only Stage B fine-tunes the Semantic Compressor")
        if self.fault.kill_rank is not None and self.fault.kill_rank >= self.train.num_workers:
            raise ConfigError(f"fault.kill_rank: {self.fault.kill_rank} is not a rank of {self.train.num_workers} workers")
        self._validate_evaluation()

    def _validate_evaluation(self) -> None:
        evaluation = self.evaluation
        if not evaluation.every:
            return
        if self.stage == "a":
            raise ConfigError("evaluation.every: Stage A runs have no periodic evaluation (Stage B and C do); set 0")
        if self.stage == "c" and not evaluation.prompts and not evaluation.unseen_prompts:
            raise ConfigError("evaluation.prompts: give prompts, or unseen_prompts: N (demo datasets)")
        if self.stage == "b" and (evaluation.prompts or evaluation.unseen_prompts):
            raise ConfigError("evaluation.prompts: Stage B is evaluated on samples of its input against their own "
                              "captions (evaluation.samples); prompts and unseen_prompts are for Stage C")


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
    bf16: bool  # any bf16 compute (precision bf16 or bf16-weights)
    tracking_uri: Optional[str]
    mlflow_run_id: Optional[str]
    empty_text_emb: Optional[str]
    companions: dict[str, str]
    precision: str = "fp32"  # resolved train.precision: fp32 | bf16 | bf16-weights
    # The step the run's count starts at: 0, or with model.continue_step_count the init export's step (pinned in
    # run.json at the first start, so a resume keeps it).
    start_step: int = 0
    # evaluation.every: the texts the evaluated images are scored against (Stage C: the prompts, resolved once
    # by the driver; Stage B: the evaluated samples' captions).
    evaluation_prompts: list[str] = dataclasses.field(default_factory=list)
    # semantic_compressor.train: the checkpoint the compressor starts from (resolved by the driver).
    compressor_init: Optional[str] = None
    # A bucketed input (precompute buckets): each bucket's tensor shapes and share of the samples (`shapes` is
    # then the largest bucket's). Empty for one size.
    bucket_shapes: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
    bucket_weights: dict[str, float] = dataclasses.field(default_factory=dict)
