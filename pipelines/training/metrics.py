"""Throughput metrics of a training run: model FLOPs per sample, the device's peak (for MFU), and the
per-interval reduction of the step metrics over steps and ranks that rank 0 logs to MLflow.

FLOPs are model FLOPs (forward + backward, no activation recomputation) counted with torch's
FlopCounterMode on the meta device (no memory, no compute), so MFU does not reward recomputation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from pipelines.training.specs import StageSpec

# Dense bf16 tensor-core peaks (TFLOP/s) used for the MFU estimate when `metrics.peak_tflops` is unset.
# Matched against torch.cuda.get_device_name() in order; first hit wins.
KNOWN_PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989.4), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0),
    ("L40S", 362.1), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0),
)


def peak_tflops_for(device: torch.device, configured: Optional[float]) -> Optional[float]:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None  # no meaningful tensor-core peak on CPUs: MFU is not reported
    name = torch.cuda.get_device_name(device)
    for key, value in KNOWN_PEAK_TFLOPS_BF16:
        if key in name:
            return value
    return None


def training_flops_per_sample(spec: "StageSpec", config, shapes: dict[str, tuple[int, ...]]) -> float:
    """Model FLOPs of one training sample of `spec`'s model built from `config`, on inputs of `shapes`."""
    with torch.device("meta"):
        model = spec.build_model(config, gradient_checkpointing=False)
        inputs = spec.example_inputs(shapes)
        r = torch.rand(1)
    with FlopCounterMode(display=False) as counter:
        out = spec.forward(model, inputs, r)
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


class IntervalMetrics:
    """The step metrics and step time of one logging interval, summed; `reduce` averages them over the
    interval's steps and over the ranks (a collective: every rank calls it at the same step, with the
    same metric keys) and adds throughput, epoch, TFLOP/s, MFU and GPU memory."""

    def __init__(self, *, world: int, samples_per_step: int, num_samples: int, device: torch.device):
        self.world, self.samples_per_step, self.num_samples, self.device = world, samples_per_step, num_samples, device
        # Set on rank 0 (the only rank that logs): TFLOP/s and MFU are reported when they are known.
        self.flops_per_sample: Optional[float] = None
        self.peak_tflops: Optional[float] = None
        self._reset()

    def _reset(self) -> None:
        self.totals: dict[str, float] = {}
        self.steps, self.seconds = 0, 0.0

    def add(self, metrics: dict[str, float], seconds: float) -> None:
        for key, value in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)
        self.steps += 1
        self.seconds += seconds

    def reduce(self, step: int) -> dict[str, float]:
        """The interval's averages at `step` (samples seen so far: step x samples per step x world); starts
        the next interval."""
        keys = sorted(self.totals)
        values = torch.tensor([self.totals[k] / self.steps for k in keys] + [self.seconds], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world
        averaged = dict(zip(keys, values[:-1].tolist()))
        mean_seconds = float(values[-1])
        samples = self.steps * self.samples_per_step * self.world
        out = dict(averaged)
        out["samples_per_s"] = samples / mean_seconds if mean_seconds > 0 else 0.0
        out["samples_seen"] = float(step * self.samples_per_step * self.world)
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
