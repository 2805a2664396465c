"""`Runner`: what the shared worker loop (`pipelines.training.loop`) asks of the stage it trains.

A runner owns the stage's DeepSpeed engines and its data stream; the loop owns the step count, the EMA,
checkpoints, exports, metrics and MLflow. `DiffusionRunner` (Stage B / C) and `StageARunner` (the VQGAN
and its discriminator) implement it; a stage's `StageSpec` names its runner class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import nn

import stages
from pipelines import export_layout, storage
from pipelines.training import metrics
from pipelines.training.config import RunPlan, TrainConfig
from pipelines.training.engine import seed_everything
from pipelines.training.export import write_export
from stages.checkpoint import build_with_state

if TYPE_CHECKING:
    from pipelines.training.specs import StageSpec


def load_init_weights(model: nn.Module, uri: str, kind: str) -> None:
    """`model.init_from`: start from a stages checkpoint (fine-tuning, e.g. released weights)."""
    source = stages.load(storage.local_copy(export_layout.resolve_checkpoint(uri)), expected_kind=kind)
    model.load_state_dict(source.state_dict(), strict=True)


class Runner:
    """The stage-specific half of a worker. The loop reads `engines` ("model": the trained stage's engine,
    whose weights the EMA tracks and the export writes; more engines are checkpointed alongside) and
    `generator` (the per-rank RNG of the objective, checkpointed), and calls the methods below."""

    engines: dict[str, Any]
    generator: torch.Generator

    def __init__(self, spec: "StageSpec", cfg: TrainConfig, plan: RunPlan, rank: int, world: int, device: torch.device):
        self.spec, self.cfg, self.plan, self.rank, self.world, self.device = spec, cfg, plan, rank, world, device
        self.kind = spec.kind
        self.model_config = spec.model_config(cfg.model.preset, cfg.model.overrides)
        # What the engine's forward takes: bf16 inputs for bf16 weights; fp32 under autocast (it casts).
        self.dtype = torch.bfloat16 if plan.precision == "bf16-weights" else torch.float32
        # Previews (sample grids through the companions) run in bf16 whenever training does, on CPU too,
        # so a CPU bf16 run takes the dtype paths of a GPU run.
        self.preview_dtype = torch.bfloat16 if plan.bf16 else torch.float32

    def build_model(self) -> nn.Module:
        """The stage's model, initialised from the run's seed (the same weights on every rank) or from
        `model.init_from`; seeds `generator`. The caller reseeds per rank once its modules are built."""
        cfg = self.cfg
        self.generator = seed_everything(cfg.data.seed, self.rank)
        model = self.spec.build_model(self.model_config, cfg.model.gradient_checkpointing)
        if cfg.model.init_from:
            load_init_weights(model, cfg.model.init_from, self.kind)
        return model

    def autocast(self):
        """The bf16 autocast of precision "bf16" around the parts of a step outside the engine's forward
        (losses on its outputs, Stage A's perceptual network and discriminator); a no-op otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.plan.precision == "bf16")

    # ------------------------------------------------------------ data and steps
    def batches(self, start_sample: int) -> Iterator[dict]:
        """This rank's micro-batches, from sample `start_sample` of its stream on (resume)."""
        raise NotImplementedError

    def sample_ids(self, batch: dict) -> list[str]:
        """The ids of a batch's samples (for the data trace)."""
        return list(batch[self.spec.id_column])

    def train_step(self, step: int, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step (`step`, 1-based) over the micro-batches; returns the step's metrics."""
        raise NotImplementedError

    # ------------------------------------------------------------ validation
    def validation_unavailable(self) -> Optional[str]:
        """Why this run cannot compute a validation loss (None: it can)."""
        return f"{self.spec.label} has no held-out validation split"

    def validation_loss(self, model: Optional[nn.Module] = None, prefix: str = "val") -> dict[str, float]:
        """The validation metrics `<prefix>/...` of the engine's weights (or of `model`); collective."""
        raise NotImplementedError

    def flops_per_sample(self) -> float:
        """Model FLOPs of one training sample of the trained stage alone (for Stage A: without the
        perceptual network and the discriminator)."""
        # A bucketed input: the mean over its buckets, weighted by their samples.
        buckets = [(self.plan.bucket_weights[b], s) for b, s in self.plan.bucket_shapes.items()] or \
            [(1.0, self.plan.shapes)]
        return sum(weight * self.flops_at({k: tuple(v) for k, v in shapes.items()}) for weight, shapes in buckets)

    def flops_at(self, shapes: dict[str, tuple[int, ...]]) -> float:
        """`flops_per_sample` for samples of these tensor shapes."""
        return metrics.training_flops_per_sample(self.spec, self.model_config, shapes)

    # ------------------------------------------------------------ export and samples
    def module_from(self, state: dict, device=None, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The stage's module holding `state` (full weights from `full_weights`)."""
        return build_with_state(self.spec.model_class, self.model_config, state, f"{self.plan.run_name} weights",
                                device=device or "cpu", dtype=dtype)

    def write_export(self, state: dict, export_root: str, step: int, *, ema: bool) -> str:
        """`<export_root>/<step>/` (and latest.json naming it); returns that directory."""
        return write_export(self.kind, self.module_from(state), export_root, step, ema=ema, plan=self.plan)

    def sample_grid(self, state: dict, step: int):
        """A PIL image for MLflow drawn with the weights `state` (None: no grid)."""
        raise NotImplementedError

    def evaluate(self, state: dict, step: int) -> dict[str, float]:
        """Rank 0, `evaluation.every`: the eval/* metrics of the weights `state` (see `periodic_eval`)."""
        raise NotImplementedError
