"""Training throughput per stage and preset: samples/s, TFLOP/s and MFU of one training step.

    python bench/train.py                      # CPU: tiny presets of Stage C, B and A
    python bench/train.py --paper              # GPU: Stage C paper at 12x12 and 24x24, Stage B paper at
                                               # 4x128x128 (512 px), Stage A paper (18.4M) on 128 px crops;
                                               # bf16 autocast, each with/without torch.compile and
                                               # activation checkpointing, plus the largest micro-batch
                                               # that fits; projected GPU-hours for the paper's 1.42B
                                               # Stage C samples.

What is timed is a plain PyTorch training step on one device -- forward, p2-weighted loss (the
trainer's own objective functions), backward, gradient clipping, AdamW step -- with torch and our
code alone: no Ray, no DeepSpeed (ZeRO-2 adds gradient reduce-scatter / all-gather traffic on top
of this; on one GPU that is a no-op). FLOPs per sample are model FLOPs (forward + backward, no
activation recomputation) counted with torch's FlopCounterMode on the meta device, so MFU does not
reward recomputation. The peak comes from --peak-tflops or a table of known GPUs (dense bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipelines.training.metrics import peak_tflops_for, training_flops_per_sample  # noqa: E402
from pipelines.training.specs import STAGES  # noqa: E402

PAPER_STAGE_C_SAMPLES = 1.42e9
PAPER_STAGE_C_A100_HOURS = 24602


@dataclasses.dataclass
class Case:
    name: str
    stage: str
    preset: str
    shapes: dict[str, tuple[int, ...]]
    batch: int


def cases(paper: bool, batch: int | None) -> list[Case]:
    if not paper:
        return [
            Case("C tiny 8x8", "c", "tiny", {"text_emb": (77, 32), "semantic": (16, 8, 8)}, batch or 8),
            Case("B tiny 4x32x32", "b", "tiny", {"text_emb": (77, 32), "semantic": (16, 8, 8), "stage_a": (4, 32, 32)},
                 batch or 8),
            Case("A tiny 32px", "a", "tiny", {"images": (32, 32)}, batch or 8),
        ]
    return [
        Case("C paper 12x12", "c", "paper", {"text_emb": (77, 1024), "semantic": (16, 12, 12)}, batch or 64),
        Case("C paper 24x24", "c", "paper", {"text_emb": (77, 1024), "semantic": (16, 24, 24)}, batch or 32),
        Case("B paper 4x128x128", "b", "paper", {"text_emb": (77, 1024), "semantic": (16, 12, 12), "stage_a": (4, 128, 128)},
             batch or 16),
        Case("A paper 128px", "a", "paper", {"images": (128, 128)}, batch or 64),
    ]


def make_step(case: Case, device: torch.device, bf16: bool, compile_model: bool, checkpointing: bool):
    """A closure running one training step on random inputs of the case's shapes."""
    spec = STAGES[case.stage]
    config = spec.model_config(case.preset, {})
    model = spec.build_model(config, gradient_checkpointing=checkpointing).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    forward = torch.compile(model) if compile_model else model
    generator = torch.Generator().manual_seed(0)
    if case.stage == "a":
        batch = {"images": torch.rand(case.batch, 3, *case.shapes["images"], device=device)}
    else:
        with torch.device(device):
            batch = spec.example_inputs(case.shapes, batch=case.batch)
    # No empty-caption embedding in a benchmark, so no text dropout (a torch.where: no measurable cost).
    data_cfg = argparse.Namespace(text_dropout=0.0, effnet_dropout=0.05, effnet_noise_probability=0.3,
                                  effnet_noise_max_t=0.5)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            if case.stage == "a":
                out = forward(batch["images"])
                loss = out.loss
            else:
                loss, _ = spec.loss(forward, batch, text_uncond=None, data_cfg=data_cfg, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


def fits(case: Case, device, bf16: bool, checkpointing: bool) -> bool:
    try:
        step, _ = make_step(case, device, bf16, False, checkpointing)
        step()
        step()
        sync(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(case: Case, device, bf16: bool, checkpointing: bool, limit: int = 4096) -> int:
    """Largest micro-batch (powers of two, then a bisection) whose training step runs without OOM."""
    lo, hi = 0, 1
    while hi <= limit and fits(dataclasses.replace(case, batch=hi), device, bf16, checkpointing):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 8):  # within 12.5%
        mid = (lo + hi) // 2
        if fits(dataclasses.replace(case, batch=mid), device, bf16, checkpointing):
            lo = mid
        else:
            hi = mid
    return lo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="paper presets (needs a GPU)")
    parser.add_argument("--stages", default="c,b,a", help="comma-separated stages to run")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default per case)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 5 with compile)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--variants", default=None,
                        help="comma list of eager,compile,ckpt,compile+ckpt (default: all on GPU, eager on CPU)")
    parser.add_argument("--no-max-batch", action="store_true", help="skip the largest-micro-batch search")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.paper and device.type != "cuda":
        parser.exit(2, "--paper needs a GPU (the paper presets take minutes per step on a CPU)\n")
    bf16 = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    variants = (args.variants or ("eager,compile,ckpt,compile+ckpt" if device.type == "cuda" else "eager")).split(",")
    steps = args.steps or (10 if device.type == "cuda" else 5)
    peak = peak_tflops_for(device, args.peak_tflops)
    wanted = set(args.stages.split(","))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; precision: {'bf16 autocast' if bf16 else 'fp32'}; peak: "
          f"{f'{peak:.0f} TFLOP/s' if peak else 'n/a (no MFU)'}; torch {torch.__version__}")
    print(f"{'case':<20} {'variant':<13} {'batch':>5} {'GFLOP/sample':>12} {'samples/s':>10} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak mem GB':>11}")
    results: dict[tuple[str, str], float] = {}
    for case in cases(args.paper, args.batch):
        if case.stage not in wanted:
            continue
        spec = STAGES[case.stage]
        flops = training_flops_per_sample(spec, spec.model_config(case.preset, {}), case.shapes)
        for variant in variants:
            compile_model, checkpointing = "compile" in variant, "ckpt" in variant
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                step, _ = make_step(case, device, bf16, compile_model, checkpointing)
                warmup = args.warmup if args.warmup is not None else (5 if compile_model else 3)
                seconds = measure(step, device, warmup, steps)
            except torch.cuda.OutOfMemoryError:
                print(f"{case.name:<20} {variant:<13} {case.batch:>5}  out of memory")
                continue
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rate = case.batch * steps / seconds
            tflops = rate * flops / 1e12
            mfu = f"{tflops / peak:6.1%}" if peak else "   n/a"
            mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:11.1f}" if device.type == "cuda" else "        n/a"
            print(f"{case.name:<20} {variant:<13} {case.batch:>5} {flops / 1e9:12.2f} {rate:10.2f} {tflops:8.3g} {mfu} {mem}")
            results[(case.name, variant)] = rate
        if device.type == "cuda" and not args.no_max_batch:
            for checkpointing in (False, True):
                biggest = largest_batch(case, device, bf16, checkpointing)
                print(f"{case.name:<20} largest micro-batch {'with' if checkpointing else 'without'} activation "
                      f"checkpointing: {biggest}")
    for (case_name, variant), rate in results.items():
        if case_name.startswith("C ") and args.paper:
            hours = PAPER_STAGE_C_SAMPLES / rate / 3600
            print(f"projection: {case_name} {variant}: 1.42B samples = {hours:,.0f} GPU-hours on this device "
                  f"(paper: {PAPER_STAGE_C_A100_HOURS:,} A100-hours, mostly at 12x12)")


if __name__ == "__main__":
    main()
