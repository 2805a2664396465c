"""`DiffusionRunner`: Stage B and Stage C, diffusion on cached latents (a precompute output).

One DeepSpeed engine; each micro-batch's loss is the stage spec's p2-weighted objective (from
`stages.diffusion`, with condition dropout against the empty caption's embedding). Sample grids come
from a fixed preview batch read by its own reader, never from the training stream.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import nn

import stages
from pipelines import storage
from pipelines.latent_shards import LatentDataset
from pipelines.training import data
from pipelines.training.config import RunPlan, TrainConfig
from pipelines.training.engine import make_engine, reseed_per_rank
from pipelines.training.preview import PreviewContext
from pipelines.training.runner import Runner

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
        self.engine, self.scheduler = make_engine(cfg, plan, world, model)
        self.engines = {"model": self.engine}
        self.text_uncond = None
        if plan.empty_text_emb:
            array = np.load(io.BytesIO(storage.read_bytes(plan.empty_text_emb)), allow_pickle=False)
            self.text_uncond = torch.from_numpy(np.asarray(array, dtype=np.float32)).reshape(
                1, *plan.shapes["text_emb"]).to(device, self.dtype)
        self._companion_models: dict[str, nn.Module] = {}
        self._preview: dict | None = None

    # ------------------------------------------------------------ data
    def batches(self, start_sample: int) -> Iterator[dict]:
        cfg = self.cfg
        dataset = LatentDataset(self.plan.input_uri, list(self.spec.latent_columns), rank=self.rank,
                                world_size=self.world, seed=cfg.data.seed, start_offset=start_sample,
                                batch_size=cfg.train.micro_batch_size, shuffle_window=cfg.data.shuffle_window,
                                infinite=True)
        return data.batches(dataset, cfg.data, self.device)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in batch.items() if hasattr(v, "to")}

    # ------------------------------------------------------------ step
    def train_step(self, step: int, micro_batches: list[dict]) -> dict[str, float]:
        losses, mses = [], []
        for batch in micro_batches:
            batch = self._to_device(batch)
            with self.autocast():
                loss, parts = self.spec.loss(self.engine, batch, text_uncond=self.text_uncond,
                                             data_cfg=self.cfg.data, generator=self.generator)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
            mses.append(parts.mse.mean().float())
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = float("nan")
        # Device tensors: the interval metrics sum them on the device and sync once per log step.
        return {"loss": torch.stack(losses).mean(), "mse": torch.stack(mses).mean(),
                "grad_norm": grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else float(grad_norm),
                "lr": float(self.scheduler.get_last_lr()[0])}

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
            reader = LatentDataset(self.plan.input_uri, columns, rank=0, world_size=1, seed=self.cfg.sampling.seed,
                                   batch_size=self.cfg.sampling.num_images, shuffle_window=self.cfg.data.shuffle_window)
            self._preview = next(iter(reader))
        return self._preview

    def sample_grid(self, state: dict, step: int):
        model = self.module_from(state, device=self.device, dtype=self.preview_dtype)
        context = PreviewContext(sampling=self.cfg.sampling, text_uncond=self.text_uncond, device=self.device,
                                 source=f"{self.plan.run_name}@{step}", available=frozenset(self.plan.companions),
                                 load=self._companion)
        return self.spec.preview(model, self._preview_batch(), context)
