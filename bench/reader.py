"""Latent reader throughput: the trainer's read path (`pipelines.training.data.batches` over
`LatentDataset`, float16 tensors as delivered) against the rate one GPU consumes in training.

    python bench/reader.py                  # paper shapes, 4096 rows (~1.3 GB on local disk)
    python bench/reader.py --tiny           # tiny shapes, a few seconds

A synthetic dataset in the real latent-shard format (`bench/synthetic.py`: writer options, row groups
of --row-group rows, 4 shards) holds every column precompute writes for both stages (uid, text_emb
77x1024, semantic 16x24x24, stage_a 4x128x128); each stage reads only its own columns
(`pipelines.training.specs`: Stage C uid + text_emb + semantic, Stage B also stage_a). It lives in a
temp dir on local disk, in the page cache after writing: this measures decoding and assembling, not
the disk or object storage.

Per stage and K = 1, 2 loader workers: samples/s in steady state (after one window of warm-up), and
per loader process (/ K), next to the rate one H100 consumes: 0.45 (Stage C) / 0.40 (Stage B) MFU x
989.4 TFLOP/s over the model FLOPs of one training sample (forward + backward, counted on the meta
device by `pipelines.training.metrics.training_flops_per_sample`, the trainer's own count). The target
is >= 3x per loader process. Last, the row-group reads of one epoch with K = 2, counted at the pyarrow
call: the loader path (each block once) against a plain DataLoader over the dataset, whose workers each
read every block (the previous design).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.synthetic import write_dataset  # noqa: E402
from pipelines.latent_shards import LatentDataset  # noqa: E402
from pipelines.training import data as training_data  # noqa: E402
from pipelines.training.config import DataConfig  # noqa: E402
from pipelines.training.specs import STAGES  # noqa: E402

H100_BF16_TFLOPS = 989.4  # dense bf16 peak of an H100 SXM (pipelines.training.flops)
TARGET_MFU = {"c": 0.45, "b": 0.40}
PAPER_SHAPES = {"text_emb": (77, 1024), "semantic": (16, 24, 24), "stage_a": (4, 128, 128)}
TINY_SHAPES = {"text_emb": (77, 32), "semantic": (16, 4, 4), "stage_a": (4, 16, 16)}  # the tiny presets' inputs


def gpu_rate(stage: str, preset: str, shapes: dict[str, tuple[int, ...]]) -> tuple[float, float]:
    """(fwd+bwd FLOPs per sample, samples/s one H100 trains at the target MFU) of the stage's model."""
    from pipelines.training.metrics import training_flops_per_sample

    spec = STAGES[stage]
    flops = training_flops_per_sample(spec, spec.model_config(preset, {}), {c: shapes[c] for c in spec.tensor_columns})
    return flops, TARGET_MFU[stage] * H100_BF16_TFLOPS * 1e12 / flops


def reader(root: str, stage: str, args, **kwargs) -> LatentDataset:
    return LatentDataset(root, list(STAGES[stage].latent_columns), seed=0, batch_size=args.batch,
                         shuffle_window=args.window, **kwargs)


def loader_rate(root: str, stage: str, workers: int, args) -> float:
    """Samples/s the consumer receives from `batches` (the trainer's call), after one window of warm-up."""
    stream = training_data.batches(reader(root, stage, args, infinite=True), DataConfig(seed=0, loader_workers=workers),
                                   torch.device("cpu"))
    warmup = -(-args.window // args.batch)
    timed = max(1, args.epochs * args.rows // args.batch)
    for _ in itertools.islice(stream, warmup):
        pass
    start = time.perf_counter()
    samples = sum(len(batch["uid"]) for batch in itertools.islice(stream, timed))
    seconds = time.perf_counter() - start
    del stream  # stops the loader's workers
    return samples / seconds


def count_reads(log: str, epoch_batches) -> int:
    """Row-group reads (every process, forked workers included) while one epoch is consumed."""
    original = pq.ParquetFile.read_row_group

    def logged(self, i, columns=None, **kwargs):
        with open(log, "a") as f:  # one O_APPEND line per read, from whichever process reads
            f.write(f"{i}\n")
        return original(self, i, columns=columns, **kwargs)

    pq.ParquetFile.read_row_group = logged
    try:
        for _ in epoch_batches():
            pass
    finally:
        pq.ParquetFile.read_row_group = original
    with open(log) as f:
        reads = len(f.read().split())
    os.unlink(log)
    return reads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="samples in the dataset (default 4096; tiny 512)")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch size of the reader")
    parser.add_argument("--window", type=int, default=None,
                        help="shuffle window (default 1024 as bench/train.py; tiny 128)")
    parser.add_argument("--row-group", type=int, default=None,
                        help="rows per row group (default 256 as configs/precompute.yaml; tiny 32)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per case (after the warm-up window)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and models: a few seconds")
    args = parser.parse_args(argv)
    args.rows = args.rows or (512 if args.tiny else 4096)
    args.row_group = args.row_group or (32 if args.tiny else 256)
    args.window = min(args.window or (128 if args.tiny else 1024), args.rows)
    shapes, preset = (TINY_SHAPES, "tiny") if args.tiny else (PAPER_SHAPES, "paper")

    tmp = tempfile.mkdtemp(prefix="bench-reader-")
    try:
        root = write_dataset(os.path.join(tmp, "latents"), shapes, args.rows, args.row_group)
        size = sum(os.path.getsize(os.path.join(root, n)) for n in os.listdir(root))
        print(f"dataset: {args.rows} rows, row groups of {args.row_group}, {size / 2**20:.0f} MiB on local disk "
              f"({tmp}); batch {args.batch}, shuffle window {args.window}; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} (the rates share them)")
        print(f"{'stage':<8} {'columns':<32} {'K':>2} {'samples/s':>10} {'per loader proc':>16} "
              f"{'1 H100 at target':>17} {'ratio':>6}")
        for stage in ("c", "b"):
            flops, target = gpu_rate(stage, preset, shapes)
            for workers in (1, 2):
                rate = loader_rate(root, stage, workers, args)
                per_process = rate / workers
                columns = "+".join(STAGES[stage].latent_columns)
                print(f"{'Stage ' + stage.upper():<8} {columns:<32} {workers:>2} {rate:10.1f} {per_process:16.1f} "
                      f"{target:17.1f} {per_process / target:5.2f}x")
            print(f"{'':<8} ({preset} model: {flops / 1e9:.4g} GFLOP/sample fwd+bwd; target "
                  f"{TARGET_MFU[stage]:.0%} MFU of {H100_BF16_TFLOPS} TFLOP/s)")

        workers = 2
        ds = reader(root, "c", args, infinite=False)
        blocks = len(ds.block_rows)
        log = os.path.join(tmp, "reads.log")
        new = count_reads(log, lambda: training_data.batches(ds, DataConfig(seed=0, loader_workers=workers),
                                                             torch.device("cpu")))
        old = count_reads(log, lambda: DataLoader(ds, batch_size=None, num_workers=workers))
        print(f"row-group reads per epoch, K={workers}, {blocks} row groups: loader path {new}, "
              f"plain DataLoader (every worker reads every block; the previous design) {old}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
