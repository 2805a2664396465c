"""GPU smoke test of the trainer: 20 steps of paper Stage C in bf16 through the real worker loop (no Ray):
log steps, a sample grid, checkpoints, the export, then a restore that trains on to step 25.

    python bench/gpu_smoke.py            # GPU: paper Stage C (993M) at 16x24x24, micro-batch 8
    python bench/gpu_smoke.py --tiny     # CPU: tiny Stage C with tiny Stage B / A / text companions, so the
                                         # grid is decoded to images; also checks that the resumed run's
                                         # losses equal an uninterrupted run's (what the test runs)

Exits 1 with the failed checks named, 0 with a JSON summary on stdout. Needs torch, DeepSpeed, pyarrow,
safetensors, PyYAML and Pillow; not Ray or MLflow.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

from pipelines import config as config_lib  # noqa: E402
from pipelines import export_layout  # noqa: E402
from pipelines.phase import setup_logging  # noqa: E402
from pipelines.training.config import EXPORT_DIR, METRICS_FILE, SAMPLES_DIR, TrainConfig  # noqa: E402
from pipelines.training.driver import fit_local, plan_run  # noqa: E402
from synthetic import write_dataset  # noqa: E402

FIRST, SECOND = 20, 25


def inputs(root: str, tiny: bool) -> tuple[str, list[str]]:
    """(latent dataset, config overrides naming the companions)."""
    if tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        import helpers  # tests/helpers.py: structured tiny latents + random tiny companions

        companions = helpers.write_companions(os.path.join(root, "companions"))
        latents = helpers.write_latent_dataset(os.path.join(root, "latents"),
                                               companions={k: companions[k] for k in ("text", "stage_a")})
        return latents, [f"checkpoints.stage_b={companions['stage_b']}"]
    # Paper shapes; no companions (a CLIP-H text encoder needs open_clip): the grid shows latents.
    return write_dataset(os.path.join(root, "latents"), {"text_emb": (77, 1024), "semantic": (16, 24, 24)},
                         rows=512, row_group_size=64), []


def config(root: str, latents: str, extra: list[str], tiny: bool, run_name: str, max_steps: int,
           precision: str) -> TrainConfig:
    base = ["model.preset=tiny", "train.micro_batch_size=4", "data.loader_workers=0"] if tiny else \
        ["model.preset=paper", "train.micro_batch_size=8", "data.loader_workers=2"]
    return config_lib.load(TrainConfig, None, [
        "stage=c", f"input={latents}", f"data_root={root}", f"run_name={run_name}", *base, *extra,
        "train.num_workers=1", f"train.max_steps={max_steps}", "train.log_every=5", "train.checkpoint_every=10",
        f"train.precision={precision}", "train.audit_collectives=true", "train.export_every=0",
        "sampling.every=10", "sampling.num_images=2", "sampling.steps=4", "sampling.steps_b=2",
        "sampling.height=128", "sampling.width=128", "ema.start_step=10", "ema.every=5", "optim.warmup_steps=5",
        "data.shuffle_window=64"])


def train(cfg: TrainConfig) -> tuple[str, float]:
    plan = plan_run(cfg, use_gpu=torch.cuda.is_available() and cfg.model.preset != "tiny")
    started = time.perf_counter()
    fit_local(cfg, plan)
    return plan.run_dir, time.perf_counter() - started


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, filter(None, f.read().splitlines()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "bf16-weights", "fp32"])
    parser.add_argument("--keep", default=None, help="keep the runs in this directory (default: a temp dir)")
    args = parser.parse_args(argv)
    setup_logging()
    if not args.tiny and not torch.cuda.is_available():
        parser.exit(2, "bench/gpu_smoke.py: needs a GPU; use --tiny on a CPU\n")
    with tempfile.TemporaryDirectory(prefix="wurst-smoke-") as tmp:
        root = args.keep or tmp
        latents, extra = inputs(root, args.tiny)
        run_dir, first_s = train(config(root, latents, extra, args.tiny, "smoke", FIRST, args.precision))
        after_first = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "checkpoint_*")))
        _, second_s = train(config(root, latents, extra, args.tiny, "smoke", SECOND, args.precision))
        resumed = losses(run_dir)
        failures: list[str] = []
        if sorted(resumed) != [5, 10, 15, 20, 25]:
            failures.append(f"logged steps {sorted(resumed)}, expected 5..25 every 5")
        if not all(math.isfinite(v) for v in resumed.values()):
            failures.append(f"non-finite losses {resumed}")
        if after_first != [f"checkpoint_{s:09d}" for s in (10, 20)]:
            failures.append(f"checkpoints after the first run: {after_first}")
        grids = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, SAMPLES_DIR, "*.png")))
        if grids != [f"{s:09d}.png" for s in (10, 20, 25)]:
            failures.append(f"sample grids {grids}")
        export_root = os.path.join(run_dir, EXPORT_DIR)
        if export_layout.latest_step(export_root) != SECOND:
            failures.append(f"latest export is step {export_layout.latest_step(export_root)}")
        with open(os.path.join(run_dir, "collectives", "rank-00000.json")) as f:
            calls = json.load(f)["calls"]
        summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu",
                   "precision": args.precision, "first_run_s": round(first_s, 1), "resumed_run_s": round(second_s, 1),
                   "losses": resumed, "collectives": calls, "exports": export_layout.steps(export_root)}
        if torch.cuda.is_available() and not args.tiny:
            summary["gpu_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if args.tiny:  # exact resume: the same 25 steps uninterrupted
            straight, _ = train(config(root, latents, extra, args.tiny, "straight", SECOND, args.precision))
            reference = losses(straight)
            diff = max(abs(reference[s] - resumed[s]) for s in reference)
            summary["max_loss_difference_vs_uninterrupted"] = diff
            if diff > 1e-6:
                failures.append(f"resumed losses differ from the uninterrupted run by {diff}")
        print(json.dumps(summary))  # the last line of stdout (DeepSpeed prints to stdout too)
        if failures:
            print("FAILED: " + "; ".join(failures), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
