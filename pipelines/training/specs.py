"""What differs between the stages the trainer trains, in one place: `STAGES`, one `StageSpec` per stage.

A spec names the stage's model (config class, presets, overrides), the input it reads and how that
input is checked against the model, its objective (Stage B / C: from `stages.diffusion`), one sample's
inputs and forward for FLOP counting, its sample grid, the images its periodic evaluation scores, and the
runner class that trains it. The driver,
the loop and the metrics never branch on the stage: they ask its spec.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from pipelines import image_shards, latent_buckets, latent_shards, storage
from pipelines.config import ConfigError
from pipelines.generate import GenerationModels, generate_images, to_pil
from pipelines.precompute import SEMANTIC_STRIDE
from pipelines.training import periodic_eval
from pipelines.training.config import DataConfig, PerceptualConfig, TrainConfig
from pipelines.training.diffusion import DiffusionRunner, StageBCompressorRunner
from pipelines.training.periodic_eval import EvaluationContext
from pipelines.training.preview import PreviewContext, image_grid, latent_to_image
from pipelines.training.runner import Runner
from pipelines.training.stage_a import StageARunner
from stages import diffusion, sampling
from stages.semantic import to_stage_c
from stages.stage_a import StageA, StageAConfig
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig


@dataclasses.dataclass
class InputPlan:
    """What the driver learns from the input dataset: tensor shapes, size, the empty caption's embedding."""

    shapes: dict[str, list[int]]
    num_samples: int
    empty_text_emb: Optional[str] = None
    # Bucketed inputs: per bucket its shapes and share of the training samples (`shapes`: the largest's).
    bucket_shapes: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
    bucket_weights: dict[str, float] = dataclasses.field(default_factory=dict)


class StageSpec:
    name: ClassVar[str]  # "a" | "b" | "c": the config's `stage`
    kind: ClassVar[str]  # the stages checkpoint kind it exports
    config_class: ClassVar[type]
    model_class: ClassVar[type[nn.Module]]
    input_what: ClassVar[str]  # what `input` must name (for the error when it is missing)
    id_column: ClassVar[str]  # a batch's sample ids (the data trace)
    runner_class: ClassVar[type[Runner]]

    @property
    def label(self) -> str:
        return f"Stage {self.name.upper()}"

    # ------------------------------------------------------------ model
    def presets(self) -> dict[str, Callable[[], Any]]:
        return {"tiny": self.config_class.tiny, "paper": self.config_class.paper}

    def model_config(self, preset: str, overrides: dict[str, Any]):
        """The stage's config dataclass: the named preset with `overrides` applied; errors name the key."""
        cls, presets = self.config_class, self.presets()
        if preset not in presets:
            raise ConfigError(f"model.preset: unknown {self.label} preset {preset!r}; choose one of {sorted(presets)}")
        base = dataclasses.asdict(presets[preset]())
        known = set(base)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"model.overrides.{unknown[0]}: not a {cls.__name__} field (fields: {', '.join(sorted(known))})")
        try:
            return cls.from_dict({**base, **overrides})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.overrides: {exc}") from None

    def build_model(self, config, gradient_checkpointing: bool = False) -> nn.Module:
        return self.model_class(config, gradient_checkpointing=gradient_checkpointing)

    def runner(self, cfg: TrainConfig, plan, rank: int, world: int, device: torch.device) -> Runner:
        return self.runner_class(self, cfg, plan, rank, world, device)

    # ------------------------------------------------------------ input
    def plan_input(self, cfg: TrainConfig, model_config, input_uri: str, manifest: dict) -> InputPlan:
        """Check the input dataset against the model and the config (ConfigError naming the key)."""
        raise NotImplementedError

    # ------------------------------------------------------------ periodic evaluation
    evaluation_suffix: ClassVar[str] = ""  # on the metric group: eval/probe<suffix>/<attribute>
    evaluation_columns: ClassVar[tuple[str, ...]] = ()  # the columns of the evaluated samples (none: not read)

    def plan_evaluation(self, cfg: TrainConfig, input_uri: str, companions: dict[str, str]) -> list[str]:
        """Check `evaluation` against the run before it starts (ConfigError naming the key); returns the texts
        the evaluated images are scored against."""
        raise ConfigError(f"evaluation.every: {self.label} runs have no periodic evaluation; set it to 0")

    def evaluation_images(self, model: nn.Module, ctx: EvaluationContext) -> tuple[list, list[str]]:
        """(PIL images, the text each one is scored against) drawn with `model` (the evaluated weights)."""
        raise NotImplementedError

    # ------------------------------------------------------------ FLOP counting
    def example_inputs(self, shapes: dict[str, tuple[int, ...]], batch: int = 1) -> dict[str, torch.Tensor]:
        """Random inputs of the dataset's shapes (on the current default device, e.g. meta)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], r: torch.Tensor) -> torch.Tensor:
        """The training forward of one batch of `example_inputs` (r: the diffusion time)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Stage B / C: diffusion on cached latents


class DiffusionSpec(StageSpec):
    input_what = "a precompute output (latents/<version>)"
    id_column = "uid"
    runner_class = DiffusionRunner
    tensor_columns: ClassVar[tuple[str, ...]]  # the latent columns the model reads
    target_column: ClassVar[str]  # the latent the model denoises (its noise has this column's shape)
    text_width_field: ClassVar[str]  # the model config field text_emb's width must equal
    semantic_channels_field: ClassVar[str]  # ... and the semantic latent's channels

    @property
    def latent_columns(self) -> tuple[str, ...]:
        return ("uid", *self.tensor_columns)

    def latent_shapes(self, config, columns: dict[str, dict], source: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensor columns this stage reads, checked against the model config; a mismatch
        raises ConfigError naming the dataset, the column and both shapes."""
        needed = list(self.tensor_columns)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ConfigError(f"input: {source} has no column(s) {missing} needed by {self.label} "
                              f"(it has {sorted(columns)}); precompute them with outputs {needed}")
        shapes = {c: tuple(int(d) for d in columns[c]["shape"]) for c in needed}
        self.check_shapes(config, shapes, source)
        return shapes

    def check_shapes(self, config, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        text, semantic = shapes["text_emb"], shapes["semantic"]
        width, channels = getattr(config, self.text_width_field), getattr(config, self.semantic_channels_field)
        if len(text) != 2 or text[1] != width:
            raise ConfigError(f"input: {source} column text_emb has shape {text}, {self.label} expects (tokens, "
                              f"{width}) (model {self.text_width_field})")
        if len(semantic) != 3 or semantic[0] != channels:
            raise ConfigError(f"input: {source} column semantic has shape {semantic}, {self.label} expects "
                              f"({channels}, h, w) (model {self.semantic_channels_field})")

    def plan_input(self, cfg: TrainConfig, model_config, input_uri: str, manifest: dict) -> InputPlan:
        """Shapes (of every bucket of a bucketed input, each checked), sample count, empty caption."""
        bucket_shapes = {}
        for bucket, columns in latent_shards.column_shapes(manifest).items():
            source = input_uri if bucket is None else f"{input_uri} (bucket {bucket})"
            bucket_shapes[bucket] = {k: list(v) for k, v in self.latent_shapes(model_config, columns, source).items()}
        num_samples = latent_shards.split_samples(manifest, "train")
        weights = latent_buckets.bucket_weights(manifest)
        shapes = bucket_shapes[max(weights, key=lambda b: weights[b])]
        if not latent_shards.is_bucketed(manifest):
            bucket_shapes, weights = {}, {}
        empty_text = None
        entry = manifest.get("empty_text_emb")
        if isinstance(entry, dict) and entry.get("file"):
            empty_text = storage.join(input_uri, entry["file"])
        if cfg.data.text_dropout > 0 and empty_text is None:
            raise ConfigError(f"data.text_dropout: {cfg.data.text_dropout} needs the empty-caption embedding, but "
                              f"{input_uri}/manifest.json has no 'empty_text_emb' entry")
        return InputPlan(shapes, num_samples, empty_text, bucket_shapes, weights)

    def example_inputs(self, shapes: dict[str, tuple[int, ...]], batch: int = 1) -> dict[str, torch.Tensor]:
        return {c: torch.randn(batch, *shapes[c]) for c in self.tensor_columns}

    def loss(self, model, batch: dict[str, torch.Tensor], *, text_uncond: Optional[torch.Tensor],
             data_cfg: DataConfig, generator: torch.Generator):
        """(p2-weighted loss, per-sample LossParts) on a micro-batch of latents."""
        raise NotImplementedError

    def validation_loss(self, model, batch: dict[str, torch.Tensor], *, t: torch.Tensor, noise: torch.Tensor):
        """(p2-weighted loss, per-sample LossParts) at the given timesteps and noise, with the conditioning as
        it is (no dropout or augmentation): deterministic for fixed weights."""
        raise NotImplementedError

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: PreviewContext):
        """Sample grid from the preview batch: row 1 the dataset's latents, row 2 the model's samples
        for the same conditioning."""
        generator = torch.Generator().manual_seed(ctx.sampling.seed)
        device = next(model.parameters()).device
        text = batch["text_emb"].to(device, torch.float32)
        uncond = ctx.text_uncond.to(device, torch.float32) if ctx.text_uncond is not None else None
        guidance = ctx.sampling.guidance if uncond is not None else 1.0  # no empty-caption embedding: conditional only
        return self.latent_grid(model, batch, text, uncond, guidance=guidance, generator=generator, ctx=ctx)

    def latent_grid(self, model, batch, text, uncond, *, guidance: float, generator: torch.Generator,
                    ctx: PreviewContext):
        raise NotImplementedError


class StageCSpec(DiffusionSpec):
    name, kind = "c", "stage_c"
    config_class, model_class = StageCConfig, StageC
    tensor_columns, target_column = ("text_emb", "semantic"), "semantic"
    text_width_field, semantic_channels_field = "c_cond", "c_in"

    def presets(self) -> dict[str, Callable[[], Any]]:
        cls = self.config_class
        return {**super().presets(), "paper-clip-h": lambda: cls.paper("clip-h"),
                "paper-clip-bigg": lambda: cls.paper("clip-bigg")}

    def loss(self, model, batch, *, text_uncond, data_cfg, generator):
        x0 = to_stage_c(batch["semantic"].float()).to(batch["semantic"].dtype)
        return diffusion.stage_c_loss(model, x0, batch["text_emb"], text_uncond=text_uncond,
                                      text_dropout=data_cfg.text_dropout, timestep_warp=data_cfg.timestep_warp,
                                      generator=generator)

    def validation_loss(self, model, batch, *, t, noise):
        x0 = to_stage_c(batch["semantic"].float()).to(batch["semantic"].dtype)
        return diffusion.stage_c_loss(model, x0, batch["text_emb"], t=t, noise=noise)

    def forward(self, model, inputs, r):
        return model(inputs["semantic"], r, inputs["text_emb"])

    def preview(self, model, batch, ctx: PreviewContext):
        """With the run's text encoder, Stage B and Stage A at hand: images generated from the prompts
        (or the preview batch's captions); else the latent grid."""
        if not ctx.available >= {"stage_b", "stage_a", "text"}:
            return super().preview(model, batch, ctx)
        samp = ctx.sampling
        text = ctx.load("text")
        models = GenerationModels(stage_c=model, stage_b=ctx.load("stage_b"), stage_a=ctx.load("stage_a"),
                                  text_c=text, text_b=text, sources={"stage_c": ctx.source})
        prompts = list(samp.prompts) or list(batch["caption"])
        result = generate_images(prompts, models=models, n=1, height=samp.height, width=samp.width,
                                 seed=samp.seed, steps_c=samp.steps, steps_b=samp.steps_b,
                                 guidance_c=samp.guidance, guidance_b=samp.guidance_b,
                                 batch_size=samp.num_images, device=ctx.device)
        return result.grid

    def plan_evaluation(self, cfg, input_uri, companions):
        evaluation = cfg.evaluation
        periodic_eval.require_companions(companions, ("text", "stage_b", "stage_a"), "generates images through")
        prompts = periodic_eval.resolve_prompts(evaluation, input_uri)
        periodic_eval.check_scorable(evaluation, prompts)
        periodic_eval.check_image_size(evaluation, companions)
        return prompts

    def evaluation_images(self, model, ctx):
        """`n` images per prompt, generated C -> B -> A with the run's text encoder, Stage B and Stage A."""
        e = ctx.evaluation
        text = ctx.load("text")
        models = GenerationModels(stage_c=model, stage_b=ctx.load("stage_b"), stage_a=ctx.load("stage_a"),
                                  text_c=text, text_b=text, sources={"stage_c": ctx.source})
        result = generate_images(ctx.prompts, models=models, n=e.n, height=e.height, width=e.width, seed=e.seed,
                                 steps_c=e.steps_c, steps_b=e.steps_b, guidance_c=e.guidance_c,
                                 guidance_b=e.guidance_b, batch_size=e.batch_size, device=ctx.device)
        return list(result.images), result.prompts

    def latent_grid(self, model, batch, text, uncond, *, guidance, generator, ctx):
        real = to_stage_c(batch["semantic"].float())
        fake = sampling.sample_stage_c(model, text, uncond, shape=tuple(real.shape), timesteps=ctx.sampling.steps,
                                       guidance=guidance, generator=generator)
        return image_grid([latent_to_image(real), latent_to_image(fake.cpu())])


class StageBSpec(DiffusionSpec):
    name, kind = "b", "stage_b"
    config_class, model_class = StageBConfig, StageB
    tensor_columns, target_column = ("text_emb", "semantic", "stage_a"), "stage_a"
    text_width_field, semantic_channels_field = "clip_embd", "effnet_embd"
    evaluation_suffix = "_b"
    evaluation_columns = ("caption", "text_emb", "semantic", "stage_a")

    def check_shapes(self, config, shapes, source) -> None:
        super().check_shapes(config, shapes, source)
        stage_a, multiple = shapes["stage_a"], config.latent_multiple
        if len(stage_a) != 3 or stage_a[0] != config.c_in or stage_a[1] % multiple or stage_a[2] % multiple:
            raise ConfigError(f"input: {source} column stage_a has shape {stage_a}, {self.label} expects "
                              f"({config.c_in}, H, W) with H and W multiples of {multiple}")

    def plan_input(self, cfg, model_config, input_uri, manifest) -> InputPlan:
        plan = super().plan_input(cfg, model_config, input_uri, manifest)
        if not cfg.data.allow_latent_ratio_mismatch:
            for bucket, shapes in (plan.bucket_shapes or {None: plan.shapes}).items():
                self.check_latent_ratio(shapes, input_uri if bucket is None else f"{input_uri} (bucket {bucket})")
        return plan

    @staticmethod
    def check_latent_ratio(shapes: dict[str, list[int]], source: str) -> None:
        """Generation decodes a Stage C latent of h x w into a Stage B latent of stage_b_latent_size(h, w)
        (the released pipelines' x10.67): a Stage B trained at another semantic / latent ratio is sampled
        at one it never saw."""
        semantic, stage_a = shapes["semantic"], shapes["stage_a"]
        expected = sampling.stage_b_latent_size(semantic[1], semantic[2])
        if tuple(stage_a[1:]) == expected:
            return
        # The semantic side that would map to each Stage A side (none where x10.67 skips it, e.g. 16).
        fitting = [math.ceil(side / sampling.STAGE_B_LATENT_SCALE) for side in stage_a[1:]]
        hint = (f"semantic latents of {fitting[0]}x{fitting[1]} fit these Stage A latents"
                if sampling.stage_b_latent_size(*fitting) == tuple(stage_a[1:])
                else "no semantic latent size maps to these Stage A latents")
        raise ConfigError(
            f"input: {source} has semantic latents {list(semantic)} and Stage A latents {list(stage_a)}, but "
            f"generation maps a {semantic[1]}x{semantic[2]} semantic latent to a {expected[0]}x{expected[1]} Stage B "
            f"latent (stages.sampling.stage_b_latent_size): Stage B would train at a ratio it is never sampled at "
            f"({hint}; precompute semantic_resolution / stage_a_resolution decide them). If this is meant, set "
            f"data.allow_latent_ratio_mismatch: true")

    def loss(self, model, batch, *, text_uncond, data_cfg, generator):
        return diffusion.stage_b_loss(
            model, batch["stage_a"], batch["semantic"], batch["text_emb"], text_uncond=text_uncond,
            text_dropout=data_cfg.text_dropout, effnet_dropout=data_cfg.effnet_dropout,
            effnet_noise_probability=data_cfg.effnet_noise_probability,
            effnet_noise_max_t=data_cfg.effnet_noise_max_t, timestep_warp=data_cfg.timestep_warp,
            generator=generator)

    def validation_loss(self, model, batch, *, t, noise):
        return diffusion.stage_b_loss(model, batch["stage_a"], batch["semantic"], batch["text_emb"], t=t, noise=noise)

    def plan_evaluation(self, cfg, input_uri, companions):
        periodic_eval.require_companions(companions, ("stage_a",), "decodes its samples with")
        captions = list(periodic_eval.evaluation_samples(input_uri, ["caption"], cfg.evaluation.samples)["caption"])
        periodic_eval.check_scorable(cfg.evaluation, captions)
        return captions

    def evaluation_images(self, model, ctx):
        """Stage A latents sampled from the evaluated samples' true semantic latents and text, decoded by the
        run's Stage A: does Stage B draw what the semantic latent holds (and the caption says)?"""
        e, batch = ctx.evaluation, ctx.samples()
        device = next(model.parameters()).device
        text = batch["text_emb"].to(device, torch.float32)
        uncond = ctx.text_uncond.to(device, torch.float32) if ctx.text_uncond is not None else None
        latents = sampling.sample_stage_b(model, self.semantic_of(model, batch, device), text, uncond,
                                          shape=tuple(batch["stage_a"].shape), timesteps=e.steps_b,
                                          guidance=e.guidance_b if uncond is not None else 1.0,
                                          generator=torch.Generator().manual_seed(e.seed))
        stage_a = ctx.load("stage_a")
        a_param = next(stage_a.parameters())  # in Stage A's own dtype, as the sample grid decodes
        return to_pil(stage_a.decode(latents.to(a_param.device, a_param.dtype)).float()), list(batch["caption"])

    def forward(self, model, inputs, r):
        return model(inputs["stage_a"], r, inputs["semantic"], inputs["text_emb"])

    def semantic_of(self, model, batch: dict, device) -> torch.Tensor:
        """The semantic latents a batch conditions Stage B on (float32, on `device`)."""
        return batch["semantic"].to(device, torch.float32)

    def latent_grid(self, model, batch, text, uncond, *, guidance, generator, ctx):
        """Stage B latents are decoded through the run's Stage A when it has one."""
        stage_a = ctx.load("stage_a") if "stage_a" in ctx.available else None
        real = batch["stage_a"].float()
        semantic = self.semantic_of(model, batch, next(model.parameters()).device)
        fake = sampling.sample_stage_b(model, semantic, text, uncond, shape=tuple(real.shape),
                                       timesteps=ctx.sampling.steps, guidance=guidance, generator=generator).cpu()
        if stage_a is None:
            return image_grid([latent_to_image(real), latent_to_image(fake)])
        # In Stage A's own dtype (bf16 when the run trains in bf16): fp32 latents into a bf16 decoder fail.
        a_param = next(stage_a.parameters())
        decoded = [stage_a.decode(x.to(a_param.device, a_param.dtype)).float().clamp(0, 1).cpu() for x in (real, fake)]
        return image_grid(decoded)


class StageBCompressorSpec(StageBSpec):
    """Stage B fine-tuning its Semantic Compressor (`semantic_compressor.train`): it reads the compressor's
    input pixels (`semantic_image`, uint8) and trains `stages.stage_b.StageBWithCompressor`, whose
    ``forward(images=...)`` is the compressor; the conditioning augmentation acts on its output."""

    tensor_columns = ("text_emb", "semantic_image", "stage_a")
    evaluation_columns = ("caption", "text_emb", "semantic_image", "stage_a")

    runner_class = StageBCompressorRunner

    @staticmethod
    def semantic_shape(config, shapes) -> list[int]:
        """The compressor's latent for the stored pixels: effnet_embd x (R / 32) x (R / 32)."""
        image = shapes["semantic_image"]
        return [config.effnet_embd, image[1] // SEMANTIC_STRIDE, image[2] // SEMANTIC_STRIDE]

    def check_shapes(self, config, shapes, source) -> None:
        image = shapes["semantic_image"]
        if len(image) != 3 or image[0] != 3 or image[1] % SEMANTIC_STRIDE or image[2] % SEMANTIC_STRIDE:
            raise ConfigError(f"input: {source} column semantic_image has shape {image}, the Semantic Compressor "
                              f"expects (3, h, w) with h and w multiples of {SEMANTIC_STRIDE}")
        super().check_shapes(config, {**shapes, "semantic": self.semantic_shape(config, shapes)}, source)

    def plan_input(self, cfg, model_config, input_uri, manifest) -> InputPlan:
        plan = DiffusionSpec.plan_input(self, cfg, model_config, input_uri, manifest)
        if not cfg.data.allow_latent_ratio_mismatch:
            for bucket, shapes in (plan.bucket_shapes or {None: plan.shapes}).items():
                self.check_latent_ratio({**shapes, "semantic": self.semantic_shape(model_config, shapes)},
                                        input_uri if bucket is None else f"{input_uri} (bucket {bucket})")
        return plan

    def example_inputs(self, shapes, batch: int = 1):
        # FLOPs of the Stage B half (the runner adds the compressor's): its input is the latent.
        image = shapes["semantic_image"]
        semantic = (16, image[1] // SEMANTIC_STRIDE, image[2] // SEMANTIC_STRIDE)
        return {"text_emb": torch.randn(batch, *shapes["text_emb"]), "stage_a": torch.randn(batch, *shapes["stage_a"]),
                "semantic": torch.randn(batch, *semantic)}

    def semantic_of(self, model, batch, device):
        images = batch["semantic_image"].to(device).float().div(255.0)
        return model(images=images).float()

    def loss(self, model, batch, *, text_uncond, data_cfg, generator):
        return super().loss(model, {**batch, "semantic": self.semantic_of(model, batch, batch["stage_a"].device)},
                            text_uncond=text_uncond, data_cfg=data_cfg, generator=generator)

    def validation_loss(self, model, batch, *, t, noise):
        return super().validation_loss(model, {**batch, "semantic": self.semantic_of(model, batch, noise.device)},
                                       t=t, noise=noise)


# --------------------------------------------------------------------------------------------
# Stage A: the VQGAN, from image shards


def check_perceptual_config(perceptual: PerceptualConfig) -> None:
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


class StageASpec(StageSpec):
    name, kind = "a", "stage_a"
    config_class, model_class = StageAConfig, StageA
    input_what = "a download output (images/<version>)"
    id_column = "key"
    runner_class = StageARunner

    def build_model(self, config, gradient_checkpointing: bool = False) -> nn.Module:
        model = StageA(config)
        model.gradient_checkpointing = gradient_checkpointing
        return model

    def plan_input(self, cfg: TrainConfig, model_config, input_uri: str, manifest: dict) -> InputPlan:
        try:
            num_samples = image_shards.count_images(input_uri)
        except image_shards.ImageShardError as exc:
            raise ConfigError(f"input: {exc}") from None
        shapes = {"images": [cfg.data.crop_size, cfg.data.crop_size]}
        if cfg.stage_a.perceptual_weight > 0:
            check_perceptual_config(cfg.stage_a.perceptual)
        if cfg.data.crop_size % model_config.downscale:
            raise ConfigError(f"data.crop_size: {cfg.data.crop_size} is not divisible by Stage A's downscale "
                              f"{model_config.downscale}")
        return InputPlan(shapes, num_samples)

    def example_inputs(self, shapes, batch: int = 1):
        return {"images": torch.rand(batch, 3, *shapes["images"])}

    def forward(self, model, inputs, r):
        return model(inputs["images"]).reconstruction


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (StageASpec(), StageBSpec(), StageCSpec())}
STAGE_B_WITH_COMPRESSOR = StageBCompressorSpec()


def spec_for(cfg: TrainConfig) -> StageSpec:
    """The spec of the stage `cfg` trains (Stage B fine-tuning its compressor is a spec of its own)."""
    if cfg.stage == "b" and cfg.semantic_compressor.train:
        return STAGE_B_WITH_COMPRESSOR
    return STAGES[cfg.stage]
