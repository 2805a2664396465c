"""Training throughput of the real trainer path: samples/s, TFLOP/s, MFU, peak memory, loader wait.

    python bench/train.py                 # GPU: paper Stage C at 12x12 and 24x24, Stage B at 4x128x128,
                                          # bf16 (fp32 weights + autocast), micro-batch sweep
    python bench/train.py --tiny          # CPU: tiny presets, a short sweep (the test runs it with --json)
    python bench/train.py --cases c24 --batches 32,64,96 --precision bf16-weights --peak-tflops 989

What is timed is what a worker of `python -m pipelines.train` runs per step, in one process with
`torch.distributed` at world size 1 and no Ray: the run plan (`plan_run`), the stage's runner with its
DeepSpeed engine (`make_engine`: ZeRO-2, the configured precision, fused AdamW on GPU), its latent reader
behind the DataLoader (`runner.batches`, real parquet shards written here with the real writer) and its
`train_step` (forward, p2-weighted loss, backward, clipping, optimizer step). Needs torch, DeepSpeed,
pyarrow, safetensors and PyYAML; not Ray or MLflow. FLOPs are model FLOPs from
`pipelines.training.flops` (no recomputation counted); the peak comes from --peak-tflops or the table of
known GPUs (dense bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines import config as config_lib  # noqa: E402
from pipelines.training.config import TrainConfig  # noqa: E402
from pipelines.training.driver import plan_run  # noqa: E402
from pipelines.training.loop import make_runner  # noqa: E402
from pipelines.training.metrics import peak_tflops_for  # noqa: E402
from pipelines.training.session import LocalSession  # noqa: E402
from synthetic import write_dataset  # noqa: E402  (bench/synthetic.py)

PAPER_STAGE_C_SAMPLES = 1.42e9


@dataclasses.dataclass
class Case:
    key: str
    name: str
    stage: str
    preset: str
    shapes: dict[str, tuple[int, ...]]
    batches: tuple[int, ...]


def all_cases(tiny: bool) -> list[Case]:
    if tiny:
        return [
            Case("c", "C tiny 16x4x4", "c", "tiny", {"text_emb": (77, 32), "semantic": (16, 4, 4)}, (2, 4)),
            Case("b", "B tiny 4x16x16", "b", "tiny",
                 {"text_emb": (77, 32), "semantic": (16, 4, 4), "stage_a": (4, 16, 16)}, (2, 4)),
        ]
    return [
        Case("c12", "C paper 16x12x12", "c", "paper", {"text_emb": (77, 1024), "semantic": (16, 12, 12)},
             (64, 128, 256, 384)),
        Case("c24", "C paper 16x24x24", "c", "paper", {"text_emb": (77, 1024), "semantic": (16, 24, 24)},
             (16, 32, 64, 96)),
        Case("b128", "B paper 4x128x128", "b", "paper",
             {"text_emb": (77, 1024), "semantic": (16, 12, 12), "stage_a": (4, 128, 128)}, (8, 16, 32, 48)),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case: Case, batch: int, args, session: LocalSession, device: torch.device, data: str, root: str) -> dict:
    overrides = [f"stage={case.stage}", f"model.preset={case.preset}", f"input={data}", f"data_root={root}",
                 f"run_name=bench-{case.key}-{batch}", "train.num_workers=1", f"train.micro_batch_size={batch}",
                 f"train.precision={args.precision}", f"train.zero_stage={args.zero_stage}",
                 f"data.loader_workers={args.loader_workers}", "data.shuffle_window=1024",
                 f"model.gradient_checkpointing={'true' if args.checkpointing else 'false'}",
                 f"train.compile={'true' if args.compile else 'false'}", "optim.warmup_steps=10"]
    if case.preset == "tiny":  # the tiny B case's 16x4x4 / 4x16x16 are sized for speed, not generation's ratio
        overrides.append("data.allow_latent_ratio_mismatch=true")
    cfg = config_lib.load(TrainConfig, None, overrides)
    plan = plan_run(cfg, use_gpu=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = make_runner(cfg, plan, 0, 1, device)
    batches = None
    try:
        batches = runner.batches(start_sample=0)
        waited = 0.0

        def step(n: int) -> dict:
            nonlocal waited
            started = time.perf_counter()
            micro = [next(batches)]
            waited += time.perf_counter() - started
            return runner.train_step(n, micro)

        for n in range(1, args.warmup + 1):
            step(n)
        sync(device)
        waited = 0.0
        started = time.perf_counter()
        for n in range(args.warmup + 1, args.warmup + args.steps + 1):
            metrics = step(n)
        loss = float(metrics["loss"])  # waits for the last step
        sync(device)
        seconds = time.perf_counter() - started
        flops = runner.flops_per_sample()
        return {"rate": batch * args.steps / seconds, "flops": flops, "loss": loss, "wait": waited / seconds,
                "mem": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    finally:
        batches = runner = None  # stops the loader workers, frees the engine  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny presets on CPU (seconds)")
    parser.add_argument("--cases", default=None, help="comma list of case keys (default: all)")
    parser.add_argument("--batches", default=None, help="comma list of micro-batches (default: per case)")
    parser.add_argument("--precision", default=None, choices=["bf16", "bf16-weights", "fp32"],
                        help="train.precision (default bf16)")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, default=None, help="default 4 on GPU, 0 with --tiny")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 3 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 1 tiny)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--compile", action="store_true", help="torch.compile inside the engine")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object per measurement")
    args = parser.parse_args(argv)

    use_gpu = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not use_gpu:
        parser.exit(2, "bench/train.py: the paper presets need a GPU; use --tiny on a CPU\n")
    args.precision = args.precision or "bf16"
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.loader_workers = args.loader_workers if args.loader_workers is not None else (0 if args.tiny else 4)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cases = [c for c in all_cases(args.tiny) if args.cases is None or c.key in args.cases.split(",")]
    with tempfile.TemporaryDirectory(prefix="wurst-bench-train-") as root:
        session = LocalSession(os.path.join(root, "session"))
        device = session.device(use_gpu)
        peak = peak_tflops_for(device, args.peak_tflops)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
        print(f"device: {name}; precision: {args.precision}; ZeRO-{args.zero_stage}; peak: "
              f"{f'{peak:.1f} TFLOP/s' if peak else 'n/a (no MFU)'}; loader workers {args.loader_workers}; "
              f"torch {torch.__version__}")
        print(f"{'case':<20} {'batch':>5} {'GFLOP/sample':>12} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
              f"{'peak mem GB':>11} {'loader wait':>11}")
        best: dict[str, float] = {}
        for case in cases:
            batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else case.batches
            rows = max(batches) * 8  # the reader wraps around (infinite stream)
            data = write_dataset(os.path.join(root, f"latents-{case.key}"), case.shapes, rows,
                                 row_group_size=min(256, max(batches)))
            for batch in batches:
                try:
                    r = measure(case, batch, args, session, device, data, root)
                except torch.cuda.OutOfMemoryError:
                    print(f"{case.name:<20} {batch:>5}  out of memory")
                    gc.collect()
                    torch.cuda.empty_cache()
                    break
                tflops = r["rate"] * r["flops"] / 1e12
                mfu = f"{tflops / peak:6.1%}" if peak else "   n/a"
                mem = f"{r['mem']:11.1f}" if r["mem"] is not None else "        n/a"
                print(f"{case.name:<20} {batch:>5} {r['flops'] / 1e9:12.2f} {r['rate']:10.2f} {tflops:8.3g} {mfu} "
                      f"{mem} {r['wait']:10.1%}", flush=True)
                if args.json:
                    print(json.dumps({"case": case.key, "micro_batch": batch, "gflop_per_sample": r["flops"] / 1e9,
                                      "samples_per_s": r["rate"], "tflops": tflops, "mfu": tflops / peak if peak else None,
                                      "peak_mem_gb": r["mem"], "loader_wait": r["wait"], "loss": r["loss"]}), flush=True)
                if not np.isfinite(r["loss"]):
                    print(f"{case.name}: loss is {r['loss']}", file=sys.stderr)
                    return 1
                best[case.name] = max(best.get(case.name, 0.0), r["rate"])
        for case_name, rate in best.items():
            if case_name.startswith("C paper"):
                print(f"projection: {case_name} at {rate:.1f} samples/s: 1.42B samples = "
                      f"{PAPER_STAGE_C_SAMPLES / rate / 3600:,.0f} GPU-hours on this device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
