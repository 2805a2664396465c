"""Benchmark of phase `dedup_images`: images/s per core and peak task memory, against bare hashing.

    python bench/dedup_images.py [--images 4000] [--cpus 2]

Generates photo-like 256 px JPEGs in webdataset shards (10% planted copies: re-encoded or resized), runs
the phase on a private Ray with --cpus CPUs, and prints its rate per core next to the same hashing in one
process without Ray (decode + pixel digest + perceptual hash + colour grid), the duplicates found against the
planted ones, and the largest resident memory of a worker (the bucket tasks hold one bucket each).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_filters import image_dedup  # noqa: E402


def photo(rng: np.random.Generator, size: int = 256):
    from PIL import Image

    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    channels = [sum(rng.uniform(0.2, 1) * np.sin(rng.uniform(1, 6) * xx * 6 + rng.uniform(1, 6) * yy * 6
                                                  + rng.uniform(0, 6)) for _ in range(3)) for _ in range(3)]
    pixels = np.stack([(c - c.min()) / (np.ptp(c) + 1e-9) for c in channels], axis=-1) * 220 + 15
    return Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8))


def jpeg(image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def generate(root: str, images: int, per_shard: int = 500, seed: int = 0) -> tuple[list[bytes], int]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    originals = int(images / 1.1)
    data, planted = [], 0
    base = [photo(rng) for _ in range(originals)]  # distinct images
    data = [jpeg(image) for image in base]
    while len(data) < images:
        source = base[len(data) % len(base)]  # a copy of data[k], k < len(base)
        data.append(jpeg(source, 60) if planted % 2 else jpeg(source.resize((128, 128), Image.BICUBIC)))
        planted += 1
    os.makedirs(root)
    for shard in range(-(-len(data) // per_shard)):
        with tarfile.open(os.path.join(root, f"{shard:05d}.tar"), "w") as tar:
            for k in range(shard * per_shard, min(len(data), (shard + 1) * per_shard)):
                for name, payload in ((f"{k:09d}.jpg", data[k]),
                                      (f"{k:09d}.json", json.dumps({"uid": f"u{k}", "aesthetic": 5.0}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"phase": "download", "counts": {"samples": len(data)}}, f)
    return data, planted


def bare(data: list[bytes]) -> float:
    from PIL import Image

    start = time.perf_counter()
    for blob in data:
        with Image.open(io.BytesIO(blob)) as image:
            pixels = np.asarray(image.convert("RGB"))
        image_dedup.pixel_digest(pixels)
        image_dedup.perceptual_hash(pixels)
        image_dedup.colour_grid(pixels)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="wurst-bench-dedup-")
    try:
        root = os.path.join(work, "images", "v1")
        data, planted = generate(root, args.images)
        bare_s = bare(data[:1000])
        bare_rate = 1000 / bare_s
        import ray

        from pipelines import dedup_images

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
        start = time.time()
        result = dedup_images.main(["--input", root, "--set", f"data_root={work}", "--set", "mlflow.enabled=false",
                                    "--set", f"num_buckets={max(2, args.cpus * 2)}"])
        seconds = time.time() - start
        counts = result.manifest["counts"]
        peaks = result.manifest["last_run"]["peak_task_rss_mib"]  # measured inside the Ray workers
        peak_mb = max(peaks.values())
        rate = len(data) / seconds / args.cpus
        print(f"images: {len(data):,} ({planted} planted copies) in {-(-len(data) // 500)} shards")
        print(f"phase:  {seconds:.1f}s on {args.cpus} CPUs  {rate:,.0f} images/s/core   "
              f"bare hashing (1 process): {bare_rate:,.0f} images/s   ratio {rate / bare_rate:.2f}")
        print(f"found:  {counts['duplicates']} duplicates ({counts['exact_duplicates']} exact, "
              f"{counts['near_duplicates']} near) for {planted} planted; peak worker RSS: hash tasks "
              f"{peaks['hash']:,.0f} MiB, pair tasks {peaks['pairs']:,.0f} MiB")
        print("RESULT " + json.dumps({"images": len(data), "cpus": args.cpus, "seconds": seconds,
                                      "images_per_s_per_core": rate, "bare_images_per_s": bare_rate,
                                      "duplicates": counts["duplicates"], "planted": planted,
                                      "peak_worker_rss_mib": peak_mb}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
