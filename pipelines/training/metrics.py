"""Throughput metrics of a training run: model FLOPs per sample, the device's peak (for MFU), the
per-interval reduction of the step metrics over steps and ranks that rank 0 logs to MLflow, and the
diffusion-time buckets of the loss (`train/loss_t<t>`, `val/loss_t<t>`).

FLOPs are model FLOPs (forward + backward, no activation recomputation, so MFU does not reward
recomputation), counted by `pipelines.training.flops` on the meta device; the peak table lives there too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from pipelines.training.flops import peak_tflops_for, training_flops

if TYPE_CHECKING:
    from pipelines.training.specs import StageSpec

__all__ = ["IntervalMetrics", "Ratio", "bucket_edges", "peak_tflops_for", "timestep_label", "training_flops_per_sample"]


class Ratio(NamedTuple):
    """A step metric that `IntervalMetrics` reports as sum(numerator) / sum(denominator) over the interval
    and the ranks (e.g. the mean loss of the samples that fell in a timestep bucket), not as a mean of
    per-step values; omitted from the interval's metrics when the denominator sums to 0."""

    numerator: "float | torch.Tensor"
    denominator: "float | torch.Tensor"


def timestep_label(t: float) -> str:
    """How a diffusion time appears in a metric name: 0.1 -> "0.1" (`loss_t0.1`)."""
    return f"{t:g}"


def bucket_edges(centres: Sequence[float]) -> list[float]:
    """The inner edges of the timestep buckets around increasing `centres`: midpoints between neighbours
    (0.1, 0.3, ..., 0.9 -> 0.2, 0.4, 0.6, 0.8: buckets [0, 0.2), [0.2, 0.4), ..., [0.8, 1])."""
    return [(a + b) / 2 for a, b in zip(centres[:-1], centres[1:])]


def training_flops_per_sample(spec: "StageSpec", config, shapes: dict[str, tuple[int, ...]]) -> float:
    """Model FLOPs of one training sample of `spec`'s model built from `config`, on inputs of `shapes`."""
    with torch.device("meta"):
        model = spec.build_model(config, gradient_checkpointing=False)
        inputs = spec.example_inputs(shapes)
        r = torch.rand(1)
    # A squared-output loss stands in for the stage's objective: its FLOPs are elementwise (not counted).
    return training_flops(lambda: spec.forward(model, inputs, r).float().pow(2).mean())


class IntervalMetrics:
    """The step metrics and step time of one logging interval, summed; `reduce` averages them over the
    interval's steps and over the ranks (a collective: every rank calls it at the same step, with the
    same metric keys) and adds throughput, epoch, TFLOP/s, MFU and GPU memory. `Ratio` metrics are
    reduced as a ratio of their sums instead."""

    # local_means' keys of a Ratio's parts (`reduce` turns them back into one metric).
    NUMERATOR, DENOMINATOR = "#numerator", "#denominator"

    def __init__(self, *, world: int, samples_per_step: int, num_samples: int, device: torch.device,
                 start_step: int = 0):
        self.world, self.samples_per_step, self.num_samples, self.device = world, samples_per_step, num_samples, device
        self.start_step = start_step  # samples_seen / epoch count this run's steps (model.continue_step_count)
        # Set on rank 0 (the only rank that logs): TFLOP/s and MFU are reported when they are known.
        self.flops_per_sample: Optional[float] = None
        self.peak_tflops: Optional[float] = None
        self._reset()

    def _reset(self) -> None:
        self.totals: dict[str, "float | torch.Tensor"] = {}
        self.steps, self.seconds = 0, 0.0

    def add(self, metrics: dict[str, "float | torch.Tensor | Ratio"], seconds: float) -> None:
        """One step's metrics: floats, 0-d tensors on the device (summed there: no host sync per step),
        or `Ratio`s of those."""
        for key, value in metrics.items():
            parts = ((key + self.NUMERATOR, value.numerator), (key + self.DENOMINATOR, value.denominator)) \
                if isinstance(value, Ratio) else ((key, value),)
            for name, part in parts:
                if isinstance(part, torch.Tensor):
                    part = part.detach().to(torch.float64)
                self.totals[name] = self.totals.get(name, 0.0) + part
        self.steps += 1
        self.seconds += seconds

    def local_means(self) -> tuple[list[str], torch.Tensor]:
        """This rank's per-step means of the interval (sorted keys; a `Ratio` as its two parts) and its
        seconds, as one float64 tensor on the training device: NCCL reduces CUDA tensors only (a CPU
        tensor fails on the first GPU run)."""
        keys = sorted(self.totals)
        values = torch.stack([torch.as_tensor(self.totals[k], dtype=torch.float64, device=self.device)
                              for k in keys] + [torch.tensor(self.seconds, dtype=torch.float64, device=self.device)])
        values[:-1] /= self.steps
        return keys, values

    def reduce(self, step: int) -> dict[str, float]:
        """The interval's averages at `step` (samples this run has seen: (step - start_step) x samples per step x
        world); starts the next interval."""
        keys, values = self.local_means()
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world
        averaged = dict(zip(keys, values[:-1].tolist()))
        for key in [k[:-len(self.NUMERATOR)] for k in keys if k.endswith(self.NUMERATOR)]:
            numerator, denominator = averaged.pop(key + self.NUMERATOR), averaged.pop(key + self.DENOMINATOR)
            if denominator > 0:  # the per-step and per-rank averaging of both parts cancels
                averaged[key] = numerator / denominator
        mean_seconds = float(values[-1])
        samples = self.steps * self.samples_per_step * self.world
        out = dict(averaged)
        out["samples_per_s"] = samples / mean_seconds if mean_seconds > 0 else 0.0
        out["samples_seen"] = float((step - self.start_step) * self.samples_per_step * self.world)
        out["epoch"] = out["samples_seen"] / max(1, self.num_samples)
        if self.flops_per_sample:
            out["tflops_per_worker"] = out["samples_per_s"] * self.flops_per_sample / self.world / 1e12
            out["tflops_total"] = out["tflops_per_worker"] * self.world
            if self.peak_tflops:
                out["mfu"] = out["tflops_per_worker"] / self.peak_tflops
        if self.device.type == "cuda":
            out["gpu_mem_allocated_gb"] = torch.cuda.memory_allocated(self.device) / 2**30
            out["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._reset()
        return out
