"""Exponential moving average of the weights, sharded the way ZeRO shards the optimizer.

Each rank keeps the EMA of *its own* fp32 master-weight partition (the flat tensors the DeepSpeed
optimizer updates), so an update is a local ``lerp_`` with no communication and costs 4 bytes per
parameter divided by the number of ranks: correct and cheap under ZeRO-1, 2 and 3 alike. To read
the full EMA weights (export, sample grids) the EMA shards are swapped into the master partitions
for the duration of a ``full_fp32_state_dict`` gather and swapped back, bit for bit.

Schedule (the official Würstchen recipe): every ``every`` steps, ``ema = lerp(ema, w, 1 - decay)``
from ``start_step`` on; before it the EMA copies the weights (decay 0), so it starts from the
weights at ``start_step`` rather than from the random initialisation.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from pipelines.training.engine import full_fp32_state_dict, master_partitions


class ShardedEma:
    def __init__(self, engine, *, decay: float, start_step: int, every: int):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"ema.every must be >= 1, got {every}")
        self.engine = engine
        self.decay, self.start_step, self.every = decay, start_step, every
        self.masters = master_partitions(engine)
        self.shadows = [m.detach().clone() for m in self.masters]
        self.updates = 0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Call after the optimizer step that completed ``step`` (1-based). Returns whether it updated."""
        if not self.due(step):
            return False
        decay = self.decay if step >= self.start_step else 0.0
        for shadow, master in zip(self.shadows, self.masters):
            shadow.lerp_(master.detach().to(shadow.dtype), 1.0 - decay)
        self.updates += 1
        return True

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the optimizer's master partitions hold the EMA weights (no optimizer step
        may run); afterwards they hold the training weights again, unchanged."""
        saved = [m.detach().clone() for m in self.masters]
        try:
            for master, shadow in zip(self.masters, self.shadows):
                master.copy_(shadow)
            yield
        finally:
            for master, value in zip(self.masters, saved):
                master.copy_(value)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 EMA weights on rank 0 (None elsewhere). Collective."""
        with self.swapped_in():
            return full_fp32_state_dict(self.engine)

    # Checkpointing: one file per rank with that rank's shards.
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"shadow.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadows)}
        out["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "EMA checkpoint") -> None:
        if len([k for k in state if k.startswith("shadow.")]) != len(self.shadows):
            raise ValueError(f"{source}: has {len(state) - 1} EMA shards, this rank has {len(self.shadows)} "
                             "(resume needs the same number of workers and ZeRO stage)")
        for i, shadow in enumerate(self.shadows):
            value = state[f"shadow.{i}"]
            if value.shape != shadow.shape:
                raise ValueError(f"{source}: EMA shard {i} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(shadow.shape)} (resume needs the same workers, ZeRO stage and model)")
            shadow.copy_(value.to(shadow.device, shadow.dtype))
        self.updates = int(state["updates"])
