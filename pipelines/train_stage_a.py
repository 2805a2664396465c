"""Stage A training (the f4 VQGAN) for ``pipelines.train``: image shards in, the paper's recipe out.

Objective per step (paper appendix E.1, reference/wuerstchen.md):
    mse_weight * MSE(x, x_rec) + perceptual_weight * LPIPS-style VGG16 distance + vq_weight * VQ loss
    + adversarial_weight * (-D(x_rec)), the last term only after ``adversarial_start`` steps,
with quantization skipped for ``StageAConfig.quantize_bypass_prob`` of the samples (p = 0.1) so the
decoder also learns the continuous latents Stage B produces. The PatchGAN discriminator is a second
DeepSpeed engine with its own AdamW and a hinge loss, trained from ``adversarial_start`` on.

The perceptual network is torchvision's VGG16 ``features`` (first ``blocks`` conv blocks), with
channel-normalised feature differences as in LPIPS (without LPIPS' learned linear heads). Its weights
come from ``stage_a.perceptual.weights_path``; random weights must be requested explicitly with
``stage_a.perceptual.random_weights: true`` (tests do), never used silently.

Logged per step: loss, mse, psnr (of the training reconstructions), perceptual, vq, adversarial,
discriminator loss, codebook usage (fraction of codes used in the step) and perplexity, lr, grad norm.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import storage
from pipelines.config import ConfigError

# ReLU outputs closing VGG16's five conv blocks (indices into torchvision vgg16().features).
VGG16_BLOCK_ENDS = (3, 8, 15, 22, 29)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_perceptual_config(perceptual) -> None:
    if perceptual.weights_path is None and not perceptual.random_weights:
        raise ConfigError(
            "stage_a.perceptual.weights_path: required (a local torchvision vgg16 state dict, .safetensors or "
            ".pth); to train with a randomly initialised perceptual network (tests only) set "
            "stage_a.perceptual.random_weights=true")
    if perceptual.weights_path is not None and perceptual.random_weights:
        raise ConfigError("stage_a.perceptual.random_weights: true contradicts stage_a.perceptual.weights_path; "
                          "set only one")
    if perceptual.weights_path is not None and not storage.exists(perceptual.weights_path):
        raise ConfigError(f"stage_a.perceptual.weights_path: {perceptual.weights_path} does not exist")


def count_images(uri: str, manifest: dict) -> int:
    from pipelines import image_shards

    try:
        return image_shards.count_images(uri)
    except image_shards.ImageShardError as exc:
        raise ConfigError(f"input: {exc}") from None


class VGGPerceptual(nn.Module):
    """Frozen LPIPS-style distance on VGG16 features: sum over blocks of the mean squared difference of
    channel-normalised activations."""

    def __init__(self, blocks: int = 5, weights_path: str | None = None):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        last = VGG16_BLOCK_ENDS[blocks - 1]
        self.features = features[: last + 1]
        self.block_ends = VGG16_BLOCK_ENDS[:blocks]
        if weights_path is not None:
            self._load(weights_path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: str) -> None:
        from stages.checkpoint import read_state_dict_file

        from pipelines.train import local_checkpoint_file

        state = read_state_dict_file(local_checkpoint_file(path))
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or state
        own = self.features.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ConfigError(f"stage_a.perceptual.weights_path: {path} lacks VGG16 feature weights {missing[:4]} "
                              "(expected a torchvision vgg16 state dict)")
        self.features.load_state_dict({k: state[k] for k in own})

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = torch.cat([reconstruction, target]).float()
        x = (x - self.mean) / self.std
        total = x.new_zeros(())
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.block_ends:
                a, b = x.chunk(2)
                a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                total = total + (a - b).pow(2).sum(dim=1).mean()
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.; the VQGAN discriminator of Esser et al.) with GroupNorm instead of
    BatchNorm, so its statistics do not depend on the per-rank micro-batch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out), out),
                       nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


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


class StageARunner:
    """Stage A for the shared loop: two engines ("model" = VQGAN, "discriminator")."""

    def __init__(self, cfg, plan, rank: int, world: int, device):
        from pipelines import train_specs
        from pipelines.train import load_init_weights, make_engine, reseed_per_rank, seed_everything

        self.cfg, self.plan, self.rank, self.world, self.device = cfg, plan, rank, world, device
        self.kind = "stage_a"
        self.loss_cfg = cfg.stage_a
        self.model_config = train_specs.model_config("a", cfg.model.preset, cfg.model.overrides)
        self.generator = seed_everything(cfg.data.seed, rank)
        model = train_specs.build_model("a", self.model_config, cfg.model.gradient_checkpointing)
        if cfg.model.init_from:
            load_init_weights(model, cfg.model.init_from, self.kind)
        disc = PatchDiscriminator(self.loss_cfg.discriminator.channels, self.loss_cfg.discriminator.layers)
        perceptual_cfg = self.loss_cfg.perceptual
        self.perceptual = None
        if self.loss_cfg.perceptual_weight > 0:
            self.perceptual = VGGPerceptual(perceptual_cfg.blocks, perceptual_cfg.weights_path).to(device)
        reseed_per_rank(cfg.data.seed, rank)
        self.dtype = torch.bfloat16 if plan.bf16 else torch.float32
        self.engine, self.scheduler = make_engine(cfg, plan, world, model)
        # The discriminator is small: at most ZeRO-2, so its parameters stay whole on every rank and the
        # generator's adversarial term can run the bare module (see train_step).
        self.disc_engine, _ = make_engine(cfg, plan, world, disc, lr=self.loss_cfg.discriminator.lr,
                                          zero_stage=min(cfg.train.zero_stage, 2))
        self.engines = {"model": self.engine, "discriminator": self.disc_engine}
        self._preview = None

    # ------------------------------------------------------------ data
    def _reader(self, **kwargs):
        from pipelines.image_shards import ImageShardDataset

        data = self.cfg.data
        return ImageShardDataset(self.plan.input_uri, image_size=data.image_size, crop_size=data.crop_size,
                                 shuffle_window=data.shuffle_window, **kwargs)

    def batches(self, start_sample: int):
        from torch.utils.data import DataLoader

        dataset = self._reader(rank=self.rank, world_size=self.world, seed=self.cfg.data.seed,
                               start_offset=start_sample, batch_size=self.cfg.train.micro_batch_size)
        workers = self.cfg.data.loader_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.cfg.data.seed),
                            prefetch_factor=4 if workers else None)
        return iter(loader)

    @staticmethod
    def sample_ids(batch: dict) -> list[str]:
        return list(batch["key"])

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

    def flops_per_sample(self) -> float:
        """FLOPs of the VQGAN alone (the perceptual network and discriminator are not counted)."""
        from pipelines import train_specs

        return train_specs.training_flops_per_sample("a", self.model_config, {"images": tuple(self.plan.shapes["images"])})

    # ------------------------------------------------------------ export & samples
    def module_from(self, state: dict, device=None):
        from stages.checkpoint import build_with_state
        from stages.stage_a import StageA

        return build_with_state(StageA, self.model_config, state, f"{self.plan.run_name} weights", device=device or "cpu")

    def write_export(self, state: dict, export_uri: str, step: int, *, ema: bool) -> None:
        from pipelines.train import write_export

        write_export(self.kind, self.module_from(state), export_uri, step, ema=ema, plan=self.plan)

    @torch.no_grad()
    def sample_grid(self, state: dict, step: int):
        """Rows: originals, reconstructions through the quantizer, reconstructions of the continuous latent."""
        from pipelines.train_specs import image_grid

        if self._preview is None:
            reader = self._reader(rank=0, world_size=1, seed=self.cfg.sampling.seed,
                                  batch_size=self.cfg.sampling.num_images)
            self._preview = next(iter(reader))["images"]
        model = self.module_from(state, device=self.device)
        images = self._preview.to(self.device)
        latents = model.encode(images)
        quantized = model.decode(latents, force_not_quantize=False)
        continuous = model.decode(latents, force_not_quantize=True)
        return image_grid([images.cpu(), quantized.clamp(0, 1).cpu(), continuous.clamp(0, 1).cpu()])
