"""DeepSpeed set-up for the trainer: engine config and construction, safe checkpoint loading,
full-weight gathering, the LR schedule and the seeding of a worker.

Kept apart from the training loop so the rules that bite are in one place:

* DeepSpeed JIT-compiles ops on first use (the CPU shared-memory all-reduce; an ``"optimizer"`` block
  would also build a fused Adam). We pass a ``torch.optim.AdamW`` built in Python and keep
  ``TORCH_EXTENSIONS_DIR`` in a cached place so the build happens once per machine. DeepSpeed itself
  is imported lazily, through ``import_deepspeed``, so that the cache is set up before it loads (and
  the driver, which never builds an engine, does not pay for it).
* ``gradient_clipping`` changed its default to 1.0 in 0.19.3: the config always sets it.
* DeepSpeed's own checkpoint loader uses ``torch.load(weights_only=False)``; our engines load with
  ``weights_only=True`` and an explicit allow-list of the few DeepSpeed classes its files contain.
* Under ZeRO-3 ``module.parameters()`` are empty placeholders. Full fp32 weights (for the EMA export,
  sample grids and the final export) come from the optimizer's fp32 master partitions through
  ``deepspeed.utils.safe_get_full_fp32_param``, a collective that every rank must call in the same order.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import torch

from pipelines.training.config import RunPlan, TrainConfig

DEFAULT_TORCH_EXTENSIONS_DIR = os.path.join("~", ".cache", "wurst", "torch_extensions")

# Names of the fp32 master partitions in DeepSpeed's optimizer wrappers (ZeRO-1/2, ZeRO-3, BF16_Optimizer).
_MASTER_PARTITION_ATTRIBUTES = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                                "fp32_groups_flat_partition")


def ensure_extensions_dir() -> str:
    """Point TORCH_EXTENSIONS_DIR at the shared cache (unless the user set it) before DeepSpeed loads,
    and make the build use our environment's ninja.

    torch runs whichever `ninja` is first on PATH. A machine with a system ninja (1.11, log format v5)
    next to the venv's (1.13, v7) rebuilt the op from scratch (~40 s) every time the other one ran
    (a job started from the venv, a test run by `.venv/bin/python` without the venv on PATH): each
    treats the other's build log as invalid."""
    path = os.path.expanduser(os.environ.get("TORCH_EXTENSIONS_DIR") or DEFAULT_TORCH_EXTENSIONS_DIR)
    os.environ["TORCH_EXTENSIONS_DIR"] = path
    os.makedirs(path, exist_ok=True)
    try:
        import ninja  # the PyPI wheel that torch's extension builds depend on

        ninja_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        ninja_dir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(ninja_dir, "ninja")):
        parts = os.environ.get("PATH", "").split(os.pathsep)
        if parts[0] != ninja_dir:
            os.environ["PATH"] = os.pathsep.join([ninja_dir, *[p for p in parts if p != ninja_dir]])
    return path


def import_deepspeed():
    ensure_extensions_dir()
    import deepspeed

    return deepspeed


def prebuild_ops() -> None:
    """Build the DeepSpeed ops a CPU (gloo) run JIT-loads, into the shared cache (`make setup`): the shared-memory
    collectives take ~35 s of 2 cores to compile, which the first training job after an install otherwise pays."""
    import_deepspeed()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def engine_config(*, micro_batch_size: int, grad_accum_steps: int, world_size: int, zero_stage: int,
                  precision: str, grad_clip: float, overlap_comm: bool = True,
                  bucket_size: int = 100_000_000) -> dict[str, Any]:
    """The DeepSpeed config of one engine. No "optimizer"/"scheduler" blocks: both are built in Python.

    precision "bf16": fp32 weights, the engine's forward under bf16 autocast (DeepSpeed's torch_autocast),
    and no module in `lower_precision_safe_modules`, so gradients are kept and reduced in fp32 as in the
    authors' runs (torch autocast + fp32 DDP). "bf16-weights": DeepSpeed's bf16 mode (bf16 weights and
    gradients, fp32 master partitions in the optimizer), gradients reduced in fp32. "fp32": neither."""
    if precision not in ("fp32", "bf16", "bf16-weights"):
        raise ValueError(f"precision: {precision!r} is not fp32, bf16 or bf16-weights")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 2:
        # Reduce-scatter gradient buckets while the backward pass still runs, out of one contiguous buffer.
        zero.update({"overlap_comm": overlap_comm, "contiguous_gradients": True,
                     "reduce_bucket_size": bucket_size})
        if zero_stage == 2:
            zero.update({"allgather_bucket_size": bucket_size, "reduce_scatter": True})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16-weights"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if precision == "bf16-weights":
        config["communication_data_type"] = "fp32"
    if zero_stage == 3:
        # Gather at module granularity; the defaults prefetch for huge models and are fine on GPU.
        config["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    return config


# --------------------------------------------------------------------------------------------
# Loading DeepSpeed checkpoints without unpickling arbitrary objects


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def make_safe_checkpoint_engine(config_params=None):
    """A DeepSpeed checkpoint engine whose ``load`` uses ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - re-raised with the file named
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                raise RuntimeError(
                    f"{path}: refusing to load a DeepSpeed checkpoint file with weights_only=True "
                    f"({type(exc).__name__}: {exc}); classes outside the allow-list: {unsafe}"
                ) from exc

    return WeightsOnlyCheckpointEngine(config_params)


def use_safe_checkpoint_loading(engine) -> None:
    engine.checkpoint_engine = make_safe_checkpoint_engine(getattr(engine, "_config", None))


# --------------------------------------------------------------------------------------------
# fp32 master weights


def master_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 master-weight partitions (what the optimizer updates), one per param group."""
    optimizer = engine.optimizer
    for attribute in _MASTER_PARTITION_ATTRIBUTES:
        flats = getattr(optimizer, attribute, None)
        if flats:
            return list(flats)
    raise RuntimeError(
        f"cannot find fp32 master partitions in DeepSpeed optimizer {type(optimizer).__name__}; "
        f"the trainer needs ZeRO stage 1, 2 or 3"
    )


def full_fp32_state_dict(engine, *, on_rank0_only: bool = True) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights (parameters from the master partitions + buffers) of the engine's module,
    on CPU, keyed as the module's state_dict. Collective: every rank must call it. Returns the dict on
    rank 0 (or on every rank with ``on_rank0_only=False``), None elsewhere."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    keep = rank == 0 or not on_rank0_only
    out: dict[str, torch.Tensor] = {}
    module = engine.module
    for name, param in module.named_parameters():
        if not param.requires_grad:
            value = _gather_frozen(param)
        else:
            value = safe_get_full_fp32_param(param)
            if value is None:
                raise RuntimeError(f"parameter {name!r} has no fp32 master copy (is ZeRO enabled?)")
        if keep:
            out[name] = value.detach().float().cpu().clone()
    if not keep:
        return None
    for name, buffer in module.named_buffers():
        if _is_persistent_buffer(module, name):
            out[name] = buffer.detach().cpu().clone()
    return out


def _gather_frozen(param: torch.Tensor) -> torch.Tensor:
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned, not in the optimizer
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().float().cpu().clone()
    return param.detach().float()


def _is_persistent_buffer(module: torch.nn.Module, dotted: str) -> bool:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf not in getattr(owner, "_non_persistent_buffers_set", set())


# --------------------------------------------------------------------------------------------
# Engines


def warmup_then_constant(warmup_steps: int, start_step: int = 0):
    """LR multiplier for optimizer step n (0-based) of a run whose step count starts at `start_step`
    (model.continue_step_count): linear (start_step+n+1)/warmup up to 1, then 1."""
    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (start_step + step + 1) / warmup_steps)

    return factor


def make_engine(cfg: TrainConfig, plan: RunPlan, world: int, model, *, lr: Optional[float] = None, optimizer=None,
                zero_stage: Optional[int] = None, param_groups: Optional[list[dict]] = None):
    """One DeepSpeed engine around `model` with AdamW + warm-up/constant LR built in Python. `param_groups`:
    AdamW's groups (each with its own "lr"), instead of all trainable parameters at one lr."""
    deepspeed = import_deepspeed()
    optim = cfg.optim
    if optimizer is None:
        groups = param_groups if param_groups is not None else [p for p in model.parameters() if p.requires_grad]
        # One fused kernel per step on GPUs (DeepSpeed steps it on the fp32 master partitions).
        optimizer = torch.optim.AdamW(groups, lr=lr or optim.lr,
                                      betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
                                      **({"fused": True} if plan.use_gpu else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(optim.warmup_steps, plan.start_step))
    ds_config = engine_config(
        micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=cfg.train.grad_accum_steps,
        world_size=world, zero_stage=cfg.train.zero_stage if zero_stage is None else zero_stage,
        precision=plan.precision, grad_clip=optim.grad_clip, overlap_comm=cfg.train.overlap_comm,
        bucket_size=cfg.train.bucket_size)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    use_safe_checkpoint_loading(engine)
    if cfg.train.compile:
        engine.compile()
    return engine, scheduler


# --------------------------------------------------------------------------------------------
# Seeds


def seed_everything(seed: int, rank: int) -> torch.Generator:
    """Same seed on every rank for the model's initialisation; then a per-rank stream for dropout
    and a per-rank generator for the objective's noise, t and condition dropout."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (rank + 1))
    return generator


def reseed_per_rank(seed: int, rank: int) -> None:
    torch.manual_seed(seed * 1_000_003 + rank + 1)
