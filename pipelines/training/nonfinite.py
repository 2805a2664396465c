"""Non-finite losses and gradients: skip the step, count it, stop past `train.max_nonfinite_steps`; never
save or export non-finite weights.

The skip itself is DeepSpeed's: under ZeRO (stage 1, 2 or 3, the only ones the trainer builds) the optimizer
computes the global gradient norm, all-reduced over the ranks, and when it is not finite it discards the
step's gradients, leaves the weights and the optimizer state as they were, does not advance the LR schedule
and reports `engine.was_step_applied() == False` on every rank alike. A NaN or inf loss makes its gradients
non-finite, so it ends the same way. The loop reads that flag (no extra device sync per step), leaves the
step out of the EMA and of the interval metrics, and counts it here; since every rank sees the same flag,
every rank stops at the same step.

Weights are checked again before every checkpoint and export (`require_finite_weights`, collective), so that
non-finite weights reached by any other path never overwrite a good checkpoint; `stages.checkpoint` refuses
to write or load non-finite weights as well.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """More steps than `train.max_nonfinite_steps` had a non-finite loss or gradients, or the weights
    themselves became non-finite."""


def _value(metric) -> float:
    if isinstance(metric, torch.Tensor):
        return float(metric.detach().float().cpu())
    try:
        return float(metric)
    except (TypeError, ValueError):
        return math.nan


class NonFiniteSteps:
    """The count of skipped steps of one run attempt, and the decision to stop."""

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped = 0
        self.last: Optional[int] = None

    def skip(self, step: int, metrics: dict, sample_ids: list[str]) -> None:
        """Step `step` was not applied: count it, log what it was; raise past the limit."""
        self.skipped += 1
        self.last = step
        loss, grad_norm = _value(metrics.get("loss", math.nan)), _value(metrics.get("grad_norm", math.nan))
        shown = ", ".join(map(str, sample_ids[:8])) + (" ..." if len(sample_ids) > 8 else "")
        what = (f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g} (samples {shown or 'unknown'})")
        if self.skipped > self.limit:
            raise NonFiniteTrainingError(
                f"train: {self.skipped} steps had a non-finite loss or gradients, more than "
                f"train.max_nonfinite_steps={self.limit}; the last was {what}. Their updates were discarded, so "
                f"the weights and the last checkpoint are those of finite steps. Check the input for non-finite "
                f"values, lower optim.lr, or raise train.max_nonfinite_steps")
        log.warning("skipped %s: not finite, update discarded (%d of at most %d skipped steps)", what,
                    self.skipped, self.limit)


def first_nonfinite(tensors) -> Optional[str]:
    """The name of the first floating tensor of (name, tensor) pairs holding a NaN or inf, or None."""
    for name, tensor in tensors:
        if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def local_weights(engine, state: Optional[dict] = None):
    """This rank's view of the trained weights: the fp32 master partitions the optimizer updates (whatever the
    ZeRO stage), the module's own parameters (ZeRO-3: this rank's shard of each), and `state` when given."""
    from pipelines.training.engine import master_partitions

    try:
        for i, flat in enumerate(master_partitions(engine)):
            yield f"fp32 master partition {i}", flat
    except RuntimeError:  # no ZeRO optimizer here: the module's parameters are the weights
        pass
    for name, param in engine.module.named_parameters():
        yield name, getattr(param, "ds_tensor", param.data)
    if state:
        yield from state.items()


def require_finite_weights(engine, device: torch.device, what: str, step: int, state: Optional[dict] = None) -> None:
    """Raise NonFiniteTrainingError on every rank when any rank's weights (or `state`) are not finite.
    Collective: every rank calls it at the same point (before a checkpoint, before an export)."""
    bad = first_nonfinite(local_weights(engine, state))
    flag = torch.tensor([0.0 if bad is None else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    if float(flag.item()) > 0:
        where = f"{bad} on this rank" if bad is not None else "on another rank"
        raise NonFiniteTrainingError(
            f"train: the weights are not finite at step {step} ({where}); refusing to write the {what}, so the "
            f"last one written holds finite weights")
