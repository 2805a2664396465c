"""Benchmark of phase `precompute` and of the latent reader; prints tables of samples/s.

    python bench/precompute.py                 # tiny preset on CPU: phase vs bare encoders; reader
    python bench/precompute.py --paper         # + paper encoders in bf16 (needs a GPU; random weights)

1. Tiny preset, CPU: the whole phase (embedded Ray, webdataset shards generated here) against the bare
   encoders on the same samples in the same process (torch + our code, no Ray): the pipeline's cost.
2. `--paper`: CLIP-H text (77x1024), EfficientNetV2-S Semantic Compressor at 768 px, Stage A at 512 px,
   bf16, random weights, one device; each encoder alone and the three together (samples/s).
3. The reader: `LatentDataset` samples/s on one core (num_workers=0) over paper-shaped shards, for the
   columns Stage C reads (text_emb + semantic) and those Stage B reads (all three), against the rate
   one GPU consumes in training (paper: Stage C ~16 samples/s per A100, Stage B ~8 samples/s per A100,
   from the reported A100-hours and sample counts).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Training consumption per A100 from the paper's compute report (reference/wuerstchen.md).
TRAIN_RATE = {"stage_c": 16.0, "stage_b": 8.0}


def make_download_output(root: str, shards: int, per_shard: int, size: int) -> None:
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard in range(shards):
        with tarfile.open(os.path.join(root, f"{shard:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                # Smooth random images compress like photos rather than like noise.
                small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((size, size * 3 // 4), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                caption = f"benchmark photo {shard} {i} of a sausage on a plate"
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"uid": f"u{key}", "caption": caption}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"phase": "download", "bench": True}, f)


def tiny_phase(work: str, shards: int, per_shard: int) -> list[tuple[str, float, str]]:
    """Phase throughput without its fixed start-up: runs on N and 2N samples, rate = N / (T2N - TN)."""
    import torch

    import stages
    from pipelines import config as config_lib
    from pipelines import precompute, precompute_cpu, precompute_encoders
    from pipelines.runtime import init_ray
    from stages.semantic import SemanticCompressor, SemanticCompressorConfig
    from stages.stage_a import StageA, StageAConfig
    from stages.text import TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    ckpt = os.path.join(work, "ckpt")
    stages.save(TextEncoder(TextEncoderConfig.tiny()), os.path.join(ckpt, "text"))
    stages.save(SemanticCompressor(SemanticCompressorConfig.tiny()), os.path.join(ckpt, "semantic"))
    stages.save(StageA(StageAConfig.tiny()), os.path.join(ckpt, "stage_a"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def config(images: str):
        return config_lib.load(precompute.PrecomputeConfig, os.path.join(repo, "configs", "precompute-tiny.yaml"), [
            f"input={images}", f"output={os.path.join(work, 'latents')}", f"data_root={work}",
            "mlflow.enabled=false", "batch_size=32", "row_group_size=64",
            *(f"encoders.{k}={os.path.join(ckpt, k)}" for k in ("text", "semantic", "stage_a"))])

    images = os.path.join(work, "images")
    make_download_output(images, shards, per_shard, size=96)
    n = shards * per_shard

    # Bare encoders on the same samples: decode + encode in this process, one thread, no Ray.
    cfg = config(images)
    spec = precompute_encoders.encoder_spec(cfg, use_gpu=False)
    encoders = precompute_encoders.Encoders(spec, threads=1)
    r = spec["decode_resolution"]
    start = time.perf_counter()
    for tar in sorted(f for f in os.listdir(images) if f.endswith(".tar")):
        item = {"shard": np.array(["s"]), "tar": np.array([os.path.join(images, tar)])}
        for batch in precompute_cpu.decode_shard(item, chunk_size=32, size=r, max_image_pixels=cfg.max_image_pixels):
            meta = json.loads(batch["meta"][0])
            pixels = np.frombuffer(batch["pixels"][0], dtype=np.uint8).reshape(len(meta["uids"]), r, r, 3).copy()
            encoders.encode(meta["captions"], pixels)
    bare = n / (time.perf_counter() - start)

    ray = init_ray(cfg.ray)  # Ray's own start-up is not part of the timings
    cores = int(ray.cluster_resources().get("CPU", 1))
    start = time.perf_counter()
    last_run = precompute.run(cfg).manifest["last_run"]
    total = time.perf_counter() - start
    ray.shutdown()
    steady = last_run["steady_samples_per_s"]
    return [("tiny: bare decode + encoders, 1 thread, no Ray", bare, "samples/s"),
            (f"tiny: phase steady rate, from first chunk done ({cores} CPUs: decode, 1 actor, writes)",
             steady, "samples/s"),
            ("tiny: phase steady / bare", steady / bare, "ratio"),
            (f"tiny: phase incl. probe + actor start-up, {n} samples", n / total, "samples/s")]


def paper_encoders(device: str, batch: int, steps: int) -> list[tuple[str, float, str]]:
    import torch

    from stages.semantic import SemanticCompressor, SemanticCompressorConfig
    from stages.stage_a import StageA, StageAConfig
    from stages.text import TextEncoder, TextEncoderConfig

    dtype = torch.bfloat16
    dev = torch.device(device)
    models = {
        "text": TextEncoder(TextEncoderConfig.clip_h()).to(dev, dtype).eval(),
        "semantic": SemanticCompressor(SemanticCompressorConfig.paper()).to(dev, dtype).eval(),
        "stage_a": StageA(StageAConfig.paper()).to(dev, dtype).eval(),
    }
    captions = [f"a photograph of sausage number {i} on a wooden table, high quality" for i in range(batch)]
    tokens = models["text"].tokenize(captions).to(dev)
    images768 = torch.rand(batch, 3, 768, 768, device=dev, dtype=dtype)
    images512 = torch.rand(batch, 3, 512, 512, device=dev, dtype=dtype)
    calls = {
        "text": lambda: models["text"].encode_tokens(tokens),
        "semantic": lambda: models["semantic"].encode(images768, size=768),
        "stage_a": lambda: models["stage_a"].encode(images512),
    }

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def rate(fns) -> float:
        with torch.inference_mode():
            for fn in fns:  # warm-up (cuDNN autotuning, allocator)
                fn()
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                for fn in fns:
                    fn()
            sync()
        return steps * batch / (time.perf_counter() - start)

    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    rows = [(f"paper {k} ({name}, bf16, batch {batch})", rate([fn]), "samples/s") for k, fn in calls.items()]
    rows.append((f"paper all three encoders ({name})", rate(list(calls.values())), "samples/s"))
    return rows


def reader(work: str, samples: int) -> list[tuple[str, float, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import latent_shards as ld

    root = os.path.join(work, "reader")
    os.makedirs(root, exist_ok=True)
    shapes = {"text_emb": (77, 1024), "semantic": (16, 24, 24), "stage_a": (4, 128, 128)}
    schema = ld.shard_schema(shapes)
    rng = np.random.default_rng(0)
    per_shard, group = 512, 256
    shards = []
    for s in range(samples // per_shard):
        cols = {"key": [f"{s}-{i}" for i in range(per_shard)], "uid": [f"u{s}-{i}" for i in range(per_shard)],
                "caption": ["a caption of typical length for a LAION sample"] * per_shard}
        for name, shape in shapes.items():
            cols[name] = ld.tensor_column(rng.standard_normal((per_shard, *shape), dtype=np.float32))
        table = pa.table(cols, schema=schema)
        with pq.ParquetWriter(os.path.join(root, f"shard-{s:05d}.parquet"), schema,
                              **ld.parquet_writer_options(schema)) as writer:
            writer.write_table(table, row_group_size=group)
        shards.append({"file": f"shard-{s:05d}.parquet", "rows": per_shard})
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"shards": shards, "row_group_size": group,
                   "columns": {k: {"shape": list(v), "dtype": "float16"} for k, v in shapes.items()}}, f)
    rows = []
    for stage, columns in (("stage_c", ["text_emb", "semantic"]), ("stage_b", ["text_emb", "semantic", "stage_a"])):
        ds = ld.LatentDataset(root, columns, seed=0, infinite=False, batch_size=64, shuffle_window=1024)
        for _ in ds:  # warm the page cache: measure decoding, not the disk
            pass
        start = time.perf_counter()
        n = sum(len(b["text_emb"]) for b in ds)
        per_core = n / (time.perf_counter() - start)
        rows.append((f"reader {stage} columns {'+'.join(columns)}, 1 core", per_core, "samples/s"))
        rows.append((f"reader {stage}: per core / one A100's training rate ({TRAIN_RATE[stage]:.0f}/s)",
                     per_core / TRAIN_RATE[stage], "ratio"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="benchmark the paper encoders (GPU recommended)")
    parser.add_argument("--device", default=None, help="device for --paper (default: cuda if available)")
    parser.add_argument("--paper-batch", type=int, default=64)
    parser.add_argument("--paper-steps", type=int, default=10)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--reader-samples", type=int, default=2048)
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args(argv)

    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="wurst-bench-precompute-") as work:
        if not args.skip_tiny:
            rows += tiny_phase(work, args.shards, args.per_shard)
        if args.paper:
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            rows += paper_encoders(device, args.paper_batch, args.paper_steps)
        rows += reader(work, args.reader_samples)
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>10}  unit")
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:>10.2f}  {unit}")


if __name__ == "__main__":
    main()
