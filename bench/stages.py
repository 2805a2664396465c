"""Training-step throughput of Stage C and Stage B: forward + backward samples/s, FLOPs per sample,
and on a GPU the achieved TFLOP/s and MFU.

    python bench/stages.py                      # CPU: tiny presets, fp32 eager vs channels-last
    python bench/stages.py --paper              # GPU: paper presets too (Stage C 12/24, Stage B 128/256)
    python bench/stages.py --flops-only --paper # FLOPs per sample of every case, counted on the meta device
    python bench/stages.py --flops-only --paper --breakdown  # ... per op kind (conv, matmul), fwd vs bwd
    python bench/stages.py --compile            # adds a torch.compile variant

One training step = the p2-weighted diffusion loss of ``stages.diffusion`` (noise sampling,
forward, loss) + backward; no optimizer step. FLOPs per sample are counted once per case by
``pipelines.training.flops`` (the trainer's counter: FlopCounterMode on the meta device, with grouped
convolution backward counted correctly), so they do not depend on the kernels picked at run time.
MFU = achieved FLOP/s / the device's dense bf16 peak (``--peak-tflops`` or the table in
``pipelines.training.flops``). Every variant is timed in the same process and reported as a ratio to
the first (baseline) variant of its case.

Only torch and this repository are needed (no Ray, no DeepSpeed, no diffusers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.training.flops import FlopCount, count_flops, peak_tflops_for  # noqa: E402
from stages.diffusion import stage_b_loss, stage_c_loss  # noqa: E402
from stages.stage_b import StageB, StageBConfig  # noqa: E402
from stages.stage_c import StageC, StageCConfig  # noqa: E402

@dataclasses.dataclass
class Case:
    name: str
    stage: str  # "c" or "b"
    config: StageCConfig | StageBConfig
    latent: tuple[int, int, int]
    text: tuple[int, int]
    effnet: tuple[int, int, int] | None
    batch: int


def build_cases(paper: bool, tiny: bool, batch_override: int | None) -> list[Case]:
    cases = []
    if tiny:
        cases += [
            Case("C tiny 16x8x8", "c", StageCConfig.tiny(), (16, 8, 8), (77, 32), None, 8),
            Case("B tiny 4x32x32", "b", StageBConfig.tiny(), (4, 32, 32), (77, 32), (16, 3, 3), 8),
        ]
    if paper:
        c_paper, b_paper = StageCConfig.paper("clip-h"), StageBConfig.paper()
        cases += [
            Case("C paper 16x12x12", "c", c_paper, (16, 12, 12), (77, 1024), None, 64),
            Case("C paper 16x24x24", "c", c_paper, (16, 24, 24), (77, 1024), None, 32),
            Case("B paper 4x128x128", "b", b_paper, (4, 128, 128), (77, 1024), (16, 12, 12), 16),
            Case("B paper 4x256x256", "b", b_paper, (4, 256, 256), (77, 1024), (16, 24, 24), 4),
        ]
    if batch_override:
        cases = [dataclasses.replace(case, batch=batch_override) for case in cases]
    return cases


def build_model(case: Case, gradient_checkpointing: bool) -> torch.nn.Module:
    cls = StageC if case.stage == "c" else StageB
    return cls(case.config, gradient_checkpointing=gradient_checkpointing)


def make_inputs(case: Case, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    inputs = {
        "x0": torch.randn(batch, *case.latent, device=device),
        "text": torch.randn(batch, *case.text, device=device),
        "t": torch.rand(batch, device=device),
        "noise": torch.randn(batch, *case.latent, device=device),
    }
    if case.effnet is not None:
        inputs["effnet"] = torch.randn(batch, *case.effnet, device=device)
    return inputs


def training_loss(model: torch.nn.Module, case: Case, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if case.stage == "c":
        loss, _ = stage_c_loss(model, inputs["x0"], inputs["text"], t=inputs["t"], noise=inputs["noise"])
    else:
        loss, _ = stage_b_loss(
            model, inputs["x0"], inputs["effnet"], inputs["text"], t=inputs["t"], noise=inputs["noise"]
        )
    return loss


def flops_per_sample(case: Case) -> FlopCount:
    """Forward and backward FLOPs of one sample, counted on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = build_model(case, gradient_checkpointing=False)
        inputs = make_inputs(case, 1, torch.device("meta"))
    return count_flops(lambda: training_loss(model, case, inputs))


@dataclasses.dataclass
class Variant:
    name: str
    autocast_bf16: bool
    channels_last: bool
    compile: bool
    gradient_checkpointing: bool


def variants_for(device: torch.device, args: argparse.Namespace) -> list[Variant]:
    gpu = device.type == "cuda"
    # Baseline: what a plain training loop does on this device (fp32 on CPU, bf16 autocast on GPU).
    base = Variant("eager" + (" bf16" if gpu else " fp32"), gpu, False, False, args.grad_ckpt)
    out = [base, dataclasses.replace(base, name=base.name + " +channels_last", channels_last=True)]
    if args.compile:
        out.append(dataclasses.replace(base, name=base.name + " +compile", compile=True))
    return out


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def run_variant(case: Case, variant: Variant, device: torch.device, args: argparse.Namespace) -> float:
    """Seconds per training step of ``case`` under ``variant``."""
    torch.manual_seed(0)
    model = build_model(case, variant.gradient_checkpointing).to(device).train()
    inputs = make_inputs(case, case.batch, device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
        for key in ("x0", "noise", "effnet"):
            if key in inputs:
                inputs[key] = inputs[key].contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if variant.compile else model
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if variant.autocast_bf16 else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            loss = training_loss(forward, case, inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = time_steps(step, device, args.warmup, args.steps)
    del model, forward, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paper", action="store_true", help="include the paper presets (GPU only unless --flops-only)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny presets")
    parser.add_argument("--flops-only", action="store_true", help="print FLOPs per sample only; run nothing")
    parser.add_argument("--breakdown", action="store_true", help="also print each case's FLOPs per op kind")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every case (default: per case)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile variant")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in every variant")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paper and device.type != "cuda" and not args.flops_only:
        parser.error("--paper needs a GPU (a 1B-parameter training step on a CPU takes minutes); add --flops-only")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cases = build_cases(paper=args.paper, tiny=not args.no_tiny, batch_override=args.batch)
    peak = peak_tflops_for(device, args.peak_tflops)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; torch {torch.__version__}; peak bf16 TFLOP/s: {peak or 'n/a'}")
    header = f"{'case':<20} {'params':>9} {'fwd GFLOP':>10} {'GFLOP/sample':>13} {'/3xfwd':>6} {'variant':<28} {'batch':>5} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'vs base':>8}"
    print(header)
    print("-" * len(header))
    for case in cases:
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(case, False).parameters())
        count = flops_per_sample(case)
        flops = count.training
        prefix = (f"{case.name:<20} {params / 1e6:>8.2f}M {count.forward / 1e9:>10.2f} {flops / 1e9:>13.2f} "
                  f"{flops / (3 * count.forward):>6.3f}")
        if args.breakdown:
            print(f"{case.name}:\n{count.table()}")
        if args.flops_only:
            print(prefix)
            continue
        base_rate = None
        for variant in variants_for(device, args):
            try:
                seconds = run_variant(case, variant, device, args)
            except torch.OutOfMemoryError:
                print(f"{prefix} {variant.name:<28} {case.batch:>5} {'OOM':>10}")
                continue
            rate = case.batch / seconds
            base_rate = base_rate or rate
            tflops = flops * rate / 1e12
            mfu = f"{100 * tflops / peak:5.1f}%" if peak else "   n/a"
            print(
                f"{prefix} {variant.name:<28} {case.batch:>5} {rate:>10.2f} {tflops:>8.3f} {mfu:>6} "
                f"{rate / base_rate:>7.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
