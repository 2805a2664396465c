"""`DiffusionRunner`: Stage B and Stage C, diffusion on cached latents (a precompute output).

One DeepSpeed engine; each micro-batch's loss is the stage spec's p2-weighted objective (from
`stages.diffusion`, with condition dropout against the empty caption's embedding), also reported per
timestep bucket (train/loss_t<t>). Sample grids come from a fixed preview batch read by its own reader,
never from the training stream. The validation loss (val/*) is computed on the input's held-out split
(``val/`` shards) at fixed timesteps with fixed per-sample noise, each rank a contiguous slice of it. The
periodic evaluation (eval/*) scores the images the stage spec draws (Stage C: generated from prompts; Stage B:
decoded from the evaluated samples) with `periodic_eval.Evaluator`.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import stages
from pipelines import latent_shards
from pipelines import manifest as manifest_lib
from pipelines import storage
from pipelines.latent_buckets import open_reader
from pipelines.training import data
from pipelines.training.config import RunPlan, TrainConfig
from pipelines.training.engine import make_engine, reseed_per_rank
from pipelines.training.metrics import Ratio, bucket_edges, timestep_label
from pipelines.training.periodic_eval import EvaluationContext, Evaluator
from pipelines.training.preview import PreviewContext
from pipelines.training.export import write_export
from pipelines.training.flops import training_flops
from pipelines.training.runner import Runner
from stages.checkpoint import build_with_state
from stages.semantic import SemanticCompressor
from stages.stage_b import StageBWithCompressor

if TYPE_CHECKING:
    from pipelines.training.specs import DiffusionSpec


class DiffusionRunner(Runner):
    """Stage B / C: diffusion on cached latents."""

    spec: "DiffusionSpec"

    def __init__(self, spec: "DiffusionSpec", cfg: TrainConfig, plan: RunPlan, rank: int, world: int,
                 device: torch.device):
        super().__init__(spec, cfg, plan, rank, world, device)
        model = self.build_model()
        reseed_per_rank(cfg.data.seed, rank)
        self.engine, self.scheduler = make_engine(cfg, plan, world, model, param_groups=self.param_groups(model))
        self.engines = {"model": self.engine}
        self.text_uncond = None
        if plan.empty_text_emb:
            array = np.load(io.BytesIO(storage.read_bytes(plan.empty_text_emb)), allow_pickle=False)
            self.text_uncond = torch.from_numpy(np.asarray(array, dtype=np.float32)).reshape(
                1, *plan.shapes["text_emb"]).to(device, self.dtype)
        self._companion_models: dict[str, nn.Module] = {}
        self._preview: dict | None = None
        self._evaluator: Evaluator | None = None
        timesteps = cfg.validation.timesteps
        self.bucket_labels = [timestep_label(t) for t in timesteps]
        self.bucket_edges = torch.tensor(bucket_edges(timesteps), dtype=torch.float32, device=device)
        manifest = manifest_lib.read(plan.input_uri)
        self.validation_samples = latent_shards.split_samples(manifest, "validation")
        if not isinstance(manifest.get("validation"), dict):
            self._no_validation = (f"{plan.input_uri} has no validation split (written before precompute held one "
                                   "out); rerun precompute with validation_fraction > 0 for val/* metrics")
        elif not self.validation_samples:
            self._no_validation = (f"{plan.input_uri}: its validation split is empty (validation_fraction "
                                   f"{manifest['validation'].get('fraction')})")
        else:
            self._no_validation = None

    def param_groups(self, model: nn.Module) -> Optional[list[dict]]:
        """AdamW's parameter groups (None: every trainable parameter at optim.lr)."""
        return None

    # ------------------------------------------------------------ data
    def batches(self, start_sample: int) -> Iterator[dict]:
        cfg = self.cfg
        dataset = open_reader(self.plan.input_uri, list(self.spec.latent_columns), rank=self.rank,
                                world_size=self.world, seed=cfg.data.seed, start_offset=start_sample,
                                batch_size=cfg.train.micro_batch_size, shuffle_window=cfg.data.shuffle_window,
                                infinite=True)
        return data.batches(dataset, cfg.data, self.device)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in batch.items() if hasattr(v, "to")}

    # ------------------------------------------------------------ step
    def train_step(self, step: int, micro_batches: list[dict]) -> dict:
        losses, mses = [], []
        buckets = len(self.bucket_labels)
        bucket_loss = torch.zeros(buckets, dtype=torch.float64, device=self.device)
        bucket_count = torch.zeros(buckets, dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            batch = self._to_device(batch)
            with self.autocast():
                loss, parts = self.spec.loss(self.engine, batch, text_uncond=self.text_uncond,
                                             data_cfg=self.cfg.data, generator=self.generator)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
            mses.append(parts.mse.mean().float())
            # Each sample's weighted loss into the bucket of its t ([lower edge, upper edge)).
            bucket = torch.bucketize(parts.t.float(), self.bucket_edges, right=True)
            bucket_loss.index_add_(0, bucket, parts.weighted.double())
            bucket_count.index_add_(0, bucket, torch.ones(bucket.shape, dtype=torch.float64, device=self.device))
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = float("nan")
        # Device tensors: the interval metrics sum them on the device and sync once per log step.
        metrics = {"loss": torch.stack(losses).mean(), "mse": torch.stack(mses).mean(),
                   "grad_norm": grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else float(grad_norm),
                   "lr": float(self.scheduler.get_last_lr()[0])}
        metrics.update({f"train/loss_t{label}": Ratio(bucket_loss[k], bucket_count[k])
                        for k, label in enumerate(self.bucket_labels)})
        return metrics

    # ------------------------------------------------------------ validation
    def validation_unavailable(self) -> Optional[str]:
        return self._no_validation

    def _validation_batches(self, first: int, stop: int) -> Iterator[tuple[int, dict]]:
        """(index of its first sample in the validation split, batch) for samples [first, stop)."""
        if stop <= first:
            return
        size = self.cfg.validation.batch_size or self.cfg.train.micro_batch_size
        reader = open_reader(self.plan.input_uri, list(self.spec.latent_columns), split="validation",
                               shuffle=False, infinite=False, start_offset=first, batch_size=size)
        position = first
        for batch in reader:
            rows = min(len(batch["uid"]), stop - position)
            yield position, {k: v[:rows] for k, v in batch.items()}
            position += rows
            if position >= stop:
                return

    @staticmethod
    def validation_noise(seed: int, sample: int, bucket: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The fixed noise of validation sample `sample` at timestep `bucket` (float32, on CPU: the same
        values whatever the device)."""
        state = np.random.SeedSequence([seed, sample, bucket]).generate_state(1, np.uint64)[0]
        return torch.randn(shape, generator=torch.Generator().manual_seed(int(state)))

    @torch.no_grad()
    def validation_loss(self, model: Optional[nn.Module] = None, prefix: str = "val") -> dict[str, float]:
        """Mean p2-weighted loss (`<prefix>/loss`, and per timestep `<prefix>/loss_t<t>`) and unweighted
        MSE (`<prefix>/mse`) over the first `validation.max_samples` validation samples and the configured
        timesteps. Rank r of W takes samples [r n / W, (r+1) n / W); the sums are all-reduced on the
        training device. `model`: a plain fp32 module (the EMA weights) instead of the engine."""
        vcfg = self.cfg.validation
        timesteps = vcfg.timesteps
        n = min(vcfg.max_samples, self.validation_samples)
        first, stop = self.rank * n // self.world, (self.rank + 1) * n // self.world
        target = self.engine if model is None else model
        dtype = self.dtype if model is None else torch.float32
        # Per timestep: weighted-loss sums, MSE sums; then the sample count.
        sums = torch.zeros(2 * len(timesteps) + 1, dtype=torch.float64, device=self.device)
        was_training = target.training
        target.eval()  # no dropout: the value depends on the weights alone
        try:
            for start, batch in self._validation_batches(first, stop):
                batch = {k: v.to(self.device, dtype) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                rows = batch[self.spec.target_column].shape[0]
                shape = tuple(batch[self.spec.target_column].shape[1:])
                for k, t_value in enumerate(timesteps):
                    noise = torch.stack([self.validation_noise(vcfg.seed, start + i, k, shape) for i in range(rows)])
                    t = torch.full((rows,), float(t_value), dtype=torch.float32, device=self.device)
                    with self.autocast():
                        _, parts = self.spec.validation_loss(target, batch, t=t, noise=noise.to(self.device, dtype))
                    sums[k] += parts.weighted.double().sum()
                    sums[len(timesteps) + k] += parts.mse.double().sum()
                sums[-1] += rows
        finally:
            target.train(was_training)
        if dist.is_initialized():
            dist.all_reduce(sums)
        values = sums.tolist()
        count, buckets = values[-1], len(timesteps)
        out = {f"{prefix}/loss": sum(values[:buckets]) / (count * buckets),
               f"{prefix}/mse": sum(values[buckets:2 * buckets]) / (count * buckets)}
        out.update({f"{prefix}/loss_t{label}": values[k] / count for k, label in enumerate(self.bucket_labels)})
        return out

    # ------------------------------------------------------------ samples
    def _companion(self, name: str) -> nn.Module:
        if name not in self._companion_models:
            dtype = self.preview_dtype
            self._companion_models[name] = stages.load(storage.local_copy(self.plan.companions[name]),
                                                       expected_kind="text" if name == "text" else name,
                                                       device=self.device, dtype=dtype)
        return self._companion_models[name]

    def _preview_batch(self) -> dict:
        """A fixed batch for sample grids, from its own reader (never from the training stream)."""
        if self._preview is None:
            columns = list(self.spec.latent_columns) + ["caption"]
            reader = open_reader(self.plan.input_uri, columns, rank=0, world_size=1, seed=self.cfg.sampling.seed,
                                   batch_size=self.cfg.sampling.num_images, shuffle_window=self.cfg.data.shuffle_window)
            self._preview = next(iter(reader))
        return self._preview

    def sample_grid(self, state: dict, step: int):
        model = self.module_from(state, device=self.device, dtype=self.preview_dtype)
        context = PreviewContext(sampling=self.cfg.sampling, text_uncond=self.text_uncond, device=self.device,
                                 source=f"{self.plan.run_name}@{step}", available=frozenset(self.plan.companions),
                                 load=self._companion)
        return self.spec.preview(model, self._preview_batch(), context)

    # ------------------------------------------------------------ periodic evaluation
    def evaluate(self, state: dict, step: int) -> dict[str, float]:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.cfg.evaluation, self.plan.input_uri, list(self.spec.evaluation_columns),
                                        self.device)
        model = self.module_from(state, device=self.device, dtype=self.preview_dtype)
        context = EvaluationContext(evaluation=self.cfg.evaluation, prompts=list(self.plan.evaluation_prompts),
                                    text_uncond=self.text_uncond, device=self.device,
                                    source=f"{self.plan.run_name}@{step}", load=self._companion,
                                    samples=self._evaluator.samples)
        images, prompts = self.spec.evaluation_images(model, context)
        return self._evaluator.score(images, prompts, self.spec.evaluation_suffix)


class StageBCompressorRunner(DiffusionRunner):
    """Stage B fine-tuning its Semantic Compressor: one engine around `StageBWithCompressor` (the compressor
    at its own lr), weights and exports of both (`export/<step>/stage_b` and `export/<step>/semantic`)."""

    def build_model(self) -> nn.Module:
        stage_b = super().build_model()  # seeds, model.init_from
        sc = self.cfg.semantic_compressor
        compressor = stages.load(storage.local_copy(self.plan.compressor_init), expected_kind="semantic")
        if compressor.config.c_latent != self.model_config.effnet_embd:
            raise ValueError(f"{self.plan.compressor_init}: the Semantic Compressor writes {compressor.config.c_latent} "
                             f"channels, Stage B's effnet_embd is {self.model_config.effnet_embd}")
        model = StageBWithCompressor.from_modules(stage_b.train(), compressor.float().train(), sc.batchnorm)
        self.module_config = model.config
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        stage_b, compressor = model.parameter_groups()
        lr = self.cfg.optim.lr
        return [{"params": stage_b, "lr": lr}, {"params": compressor, "lr": self.cfg.semantic_compressor.lr or lr}]

    def module_from(self, state: dict, device=None, dtype: Optional[torch.dtype] = None) -> nn.Module:
        return build_with_state(StageBWithCompressor, self.module_config, state, f"{self.plan.run_name} weights",
                                device=device or "cpu", dtype=dtype)

    def write_export(self, state: dict, export_root: str, step: int, *, ema: bool) -> str:
        module = self.module_from(state)
        return write_export(self.kind, module.stage_b, export_root, step, ema=ema, plan=self.plan,
                            trained_with={"semantic": module.compressor})

    def flops_at(self, shapes) -> float:
        """Stage B's and the compressor's (forward + backward at the stored pixels' size)."""
        with torch.device("meta"):
            compressor = SemanticCompressor(self.module_config.compressor)
            pixels = torch.rand(1, *shapes["semantic_image"])
        return super().flops_at(shapes) + training_flops(lambda: compressor(pixels).float().pow(2).mean())
