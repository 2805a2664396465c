"""`StageARunner`: Stage A (the f4 VQGAN) from image shards, with the paper's recipe (appendix E.1).

Objective per step:
    mse_weight * MSE(x, x_rec) + perceptual_weight * LPIPS-style VGG16 distance + vq_weight * VQ loss
    + adversarial_weight * (-D(x_rec)), the last term only after ``adversarial_start`` steps,
with quantization skipped for ``StageAConfig.quantize_bypass_prob`` of the samples (p = 0.1) so the
decoder also learns the continuous latents Stage B produces. The PatchGAN discriminator is a second
DeepSpeed engine with its own AdamW and a hinge loss, trained from ``adversarial_start`` on. The
networks are in `stages.losses`; the perceptual network's weights come from
``stage_a.perceptual.weights_path`` (random weights only when ``random_weights: true`` asks for them).

Logged per step: loss, mse, psnr (of the training reconstructions), perceptual, vq, adversarial,
discriminator loss, codebook usage (fraction of codes used in the step) and perplexity, lr, grad norm.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import storage
from pipelines.config import ConfigError
from pipelines.image_shards import ImageShardDataset
from pipelines.training import data
from pipelines.training.config import RunPlan, TrainConfig
from pipelines.training.engine import make_engine, reseed_per_rank
from pipelines.training.preview import image_grid
from pipelines.training.runner import Runner
from stages.losses import PatchDiscriminator, VGGPerceptual

if TYPE_CHECKING:
    from pipelines.training.specs import StageSpec


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of `module` do not collect gradients inside the block (the generator's adversarial
    term must not feed the discriminator's gradient buffers)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def codebook_stats(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    """(fraction of codes used, perplexity exp(H(code distribution))) of one step's code indices."""
    counts = torch.bincount(indices.flatten(), minlength=num_codes).float()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


def perceptual_network(perceptual) -> VGGPerceptual:
    """The configured VGG16 distance (weights copied locally from their URI first)."""
    uri = perceptual.weights_path
    try:
        return VGGPerceptual(perceptual.blocks, storage.local_copy(uri) if uri is not None else None, source=uri)
    except ValueError as exc:
        raise ConfigError(f"stage_a.perceptual.weights_path: {exc}") from None


class StageARunner(Runner):
    """Stage A for the shared loop: two engines ("model" = VQGAN, "discriminator")."""

    def __init__(self, spec: "StageSpec", cfg: TrainConfig, plan: RunPlan, rank: int, world: int,
                 device: torch.device):
        super().__init__(spec, cfg, plan, rank, world, device)
        self.loss_cfg = cfg.stage_a
        model = self.build_model()
        # Built after the VQGAN from the same seed, before the per-rank reseed: the same weights on every rank.
        disc = PatchDiscriminator(self.loss_cfg.discriminator.channels, self.loss_cfg.discriminator.layers)
        self.perceptual = None
        if self.loss_cfg.perceptual_weight > 0:
            self.perceptual = perceptual_network(self.loss_cfg.perceptual).to(device)
        reseed_per_rank(cfg.data.seed, rank)
        self.engine, self.scheduler = make_engine(cfg, plan, world, model)
        # The discriminator is small: at most ZeRO-2, so its parameters stay whole on every rank and the
        # generator's adversarial term can run the bare module (see train_step).
        self.disc_engine, _ = make_engine(cfg, plan, world, disc, lr=self.loss_cfg.discriminator.lr,
                                          zero_stage=min(cfg.train.zero_stage, 2))
        self.engines = {"model": self.engine, "discriminator": self.disc_engine}
        self._preview = None

    # ------------------------------------------------------------ data
    def _reader(self, **kwargs) -> ImageShardDataset:
        data_cfg = self.cfg.data
        return ImageShardDataset(self.plan.input_uri, image_size=data_cfg.image_size, crop_size=data_cfg.crop_size,
                                 shuffle_window=data_cfg.shuffle_window, **kwargs)

    def batches(self, start_sample: int) -> Iterator[dict]:
        dataset = self._reader(rank=self.rank, world_size=self.world, seed=self.cfg.data.seed,
                               start_offset=start_sample, batch_size=self.cfg.train.micro_batch_size)
        return data.batches(dataset, self.cfg.data, self.device)

    # ------------------------------------------------------------ step
    def train_step(self, step: int, micro_batches: list[dict]) -> dict[str, float]:
        lc = self.loss_cfg
        adversarial = step > lc.adversarial_start and lc.adversarial_weight > 0
        sums: dict[str, float] = {}

        def add(key: str, value: Any) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)

        disc_module = self.disc_engine.module
        for batch in micro_batches:
            images = batch["images"].to(self.device, self.dtype, non_blocking=True)
            with self.autocast():
                out = self.engine(images)
                reconstruction = out.reconstruction
                mse = F.mse_loss(reconstruction.float(), images.float())
                loss = lc.mse_weight * mse + lc.vq_weight * out.vq_loss.float()
                if self.perceptual is not None:
                    perceptual = self.perceptual(reconstruction, images)
                    loss = loss + lc.perceptual_weight * perceptual
                    add("perceptual", perceptual.detach())
                if adversarial:
                    # The bare module, not the engine: DeepSpeed's engine forward hooks its outputs so that a
                    # backward through them runs the discriminator's gradient reduction epilogue, which must
                    # not happen inside the generator's backward (its parameters are frozen here anyway).
                    with frozen(disc_module):
                        adv = -disc_module(reconstruction).float().mean()
                    loss = loss + lc.adversarial_weight * adv
                    add("adversarial", adv.detach())
            self.engine.backward(loss)
            self.engine.step()
            if adversarial:
                with self.autocast():
                    real = self.disc_engine(images).float()
                    fake = self.disc_engine(reconstruction.detach()).float()
                    d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
                self.disc_engine.backward(d_loss)
                self.disc_engine.step()
                add("discriminator_loss", d_loss.detach())
            usage, perplexity = codebook_stats(out.indices, self.model_config.num_vq_embeddings)
            add("loss", loss.detach())
            add("mse", mse.detach())
            add("psnr", -10.0 * torch.log10(mse.detach().clamp_min(1e-10)))
            add("vq", out.vq_loss.detach())
            add("codebook_usage", usage)
            add("codebook_perplexity", perplexity)
        n = len(micro_batches)
        metrics = {k: v / n for k, v in sums.items()}
        grad_norm = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["adversarial_active"] = float(adversarial)
        return metrics

    # ------------------------------------------------------------ samples
    @torch.no_grad()
    def sample_grid(self, state: dict, step: int):
        """Rows: originals, reconstructions through the quantizer, reconstructions of the continuous latent."""
        if self._preview is None:
            reader = self._reader(rank=0, world_size=1, seed=self.cfg.sampling.seed,
                                  batch_size=self.cfg.sampling.num_images)
            self._preview = next(iter(reader))["images"]
        model = self.module_from(state, device=self.device, dtype=self.preview_dtype)
        images = self._preview.to(self.device, self.preview_dtype)
        latents = model.encode(images)
        quantized = model.decode(latents, force_not_quantize=False)
        continuous = model.decode(latents, force_not_quantize=True)
        return image_grid([x.float().clamp(0, 1).cpu() for x in (images, quantized, continuous)])
