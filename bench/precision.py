"""Precision policies compared on one loss curve: the real trainer (`fit_local`: engine builder, train step,
latent reader; no Ray) trains tiny Stage C and Stage B from the same seed on the same data in fp32,
bf16 (fp32 weights + bf16 autocast, fp32 gradients and reductions) and bf16-weights (DeepSpeed's bf16
mode), and prints the loss per window of steps and each policy's deviation from fp32.

    python bench/precision.py [--steps 240] [--stages c,b]

Runs on CPU (bf16 on CPU is emulated on most cores: slow, but numerically what a GPU does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402

import helpers  # noqa: E402  (tests/helpers.py: the structured tiny latent dataset and companions)
from pipelines import config as config_lib  # noqa: E402
from pipelines.training.config import METRICS_FILE, TrainConfig  # noqa: E402
from pipelines.training.driver import fit_local, plan_run  # noqa: E402

POLICIES = ("fp32", "bf16", "bf16-weights")


def train(root: str, stage: str, precision: str, steps: int, latents: str) -> list[dict]:
    cfg = config_lib.load(TrainConfig, os.path.join(ROOT, f"configs/train-{stage}-tiny.yaml"), [
        f"input={latents}", f"data_root={root}", f"run_name={stage}-{precision}", "train.num_workers=1",
        f"train.max_steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=1", "sampling.every=0",
        f"train.precision={precision}", "optim.lr=0.001", "optim.warmup_steps=20"])
    plan = plan_run(cfg, use_gpu=False)
    fit_local(cfg, plan)
    with open(os.path.join(plan.run_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--window", type=int, default=40)
    parser.add_argument("--stages", default="c,b")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wurst-precision-") as root:
        companions = helpers.write_companions(os.path.join(root, "companions"))
        latents = helpers.write_latent_dataset(os.path.join(root, "latents"), shards=(96, 96),
                                               companions={k: companions[k] for k in ("text", "stage_a")})
        for stage in args.stages.split(","):
            curves, seconds = {}, {}
            for policy in POLICIES:
                started = time.perf_counter()
                records = train(root, stage, policy, args.steps, latents)
                seconds[policy] = time.perf_counter() - started
                curves[policy] = np.array([r["loss"] for r in sorted(records, key=lambda r: r["step"])])
            windows = range(0, args.steps, args.window)
            print(f"\nStage {stage.upper()} tiny, {args.steps} steps, batch 4, lr 1e-3: mean loss per {args.window} steps")
            print(f"{'steps':>11} " + " ".join(f"{p:>13}" for p in POLICIES))
            for w in windows:
                print(f"{w + 1:>5}-{w + args.window:<5} " + " ".join(
                    f"{curves[p][w:w + args.window].mean():13.5f}" for p in POLICIES))
            for policy in POLICIES[1:]:
                diff = curves[policy] - curves["fp32"]
                rel = np.abs(diff) / np.abs(curves["fp32"])
                last = slice(-args.window, None)
                print(f"{policy:>13} vs fp32: mean |dloss|/loss {rel.mean():.2%}, last window mean loss "
                      f"{curves[policy][last].mean():.5f} vs {curves['fp32'][last].mean():.5f} "
                      f"({(curves[policy][last].mean() / curves['fp32'][last].mean() - 1):+.2%}); wall {seconds[policy]:.0f} s "
                      f"(fp32 {seconds['fp32']:.0f} s)")


if __name__ == "__main__":
    main()
