"""Download throughput: our phase vs a bare `img2dataset.download` on the same input, same run.

    python bench/download.py [--rows 2000] [--processes 2] [--threads 16] [--shard-size 250]

A loopback HTTP server (a separate process, so it does not share the GIL with either side) serves
distinct JPEGs; both sides fetch the same filter-style input with the same image size, resize mode,
threads and shard size, and the same number of processes / Ray CPUs. Prints images/s per core for
each (best of --repeats, alternating to spread machine noise) and our overhead in percent
(target <= 10%), twice: end to end (wall time of the whole call) and inside shard tasks (images per
second of per-shard time: img2dataset's own shard duration for the bare run, our whole shard task -
input read, downloader, image inspection, verification, publishing - for ours). Ray is started before timing our side, as on a cluster that `ray job submit`
targets, with its workers at the same niceness as img2dataset's processes; each side's worker
start-up and imports are inside its timing. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def _serve(port_queue, distinct: int, width: int, height: int) -> None:
    """Server process: /img/<n>.jpg -> one of `distinct` pre-encoded JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(distinct):
        # Smooth gradients plus noise compress like photos (~20-40 KB at 512x384, quality 90).
        base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
        pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        bodies.append(buf.getvalue())

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):  # noqa: N802
            try:
                n = int(self.path.rsplit("/", 1)[-1].split(".")[0])
            except ValueError:
                self.send_error(404)
                return
            body = bodies[n % distinct]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    port_queue.put((server.server_address[1], sum(map(len, bodies)) / len(bodies)))
    server.serve_forever()


def make_input(root: str, rows: int, port: int) -> str:
    from pipelines import manifest

    os.makedirs(root, exist_ok=True)
    urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(rows)]
    captions = [f"benchmark image {i}" for i in range(rows)]
    table = pa.table({
        "uid": [hashlib.blake2b(f"{u}\x00{c}".encode(), digest_size=8).hexdigest() for u, c in zip(urls, captions)],
        "URL": urls, "TEXT": captions,
        "WIDTH": pa.array([512] * rows, pa.int64()), "HEIGHT": pa.array([384] * rows, pa.int64()),
        "aesthetic": [6.0] * rows, "punsafe": [0.0] * rows, "pwatermark": [0.1] * rows, "similarity": [0.3] * rows,
    })
    pq.write_table(table, os.path.join(root, "part-00000.parquet"))
    manifest.write(root, phase="filter", cfg={"bench": True}, input_uri=None, input_id=None, counts={"rows": rows})
    return root


def run_bare(args, input_dir: str, out: str) -> tuple[float, int]:
    import img2dataset

    start = time.perf_counter()
    img2dataset.download(
        url_list=os.path.join(input_dir, "part-00000.parquet"), output_folder=out, input_format="parquet",
        url_col="URL", caption_col="TEXT",
        save_additional_columns=["uid", "WIDTH", "HEIGHT", "aesthetic", "punsafe", "pwatermark", "similarity"],
        output_format="webdataset", image_size=args.image_size, resize_mode="center_crop",
        processes_count=args.processes, thread_count=args.threads, number_sample_per_shard=args.shard_size,
        timeout=10, retries=0, compute_hash="sha256", extract_exif=False, min_image_size=0,
        distributor="multiprocessing", enable_wandb=False)
    wall = time.perf_counter() - start
    stats = [json.load(open(os.path.join(out, f))) for f in os.listdir(out) if f.endswith("_stats.json")]
    # img2dataset's own per-shard duration: the downloader's work on one shard, in one process.
    seconds = sum(s["duration"] for s in stats)
    return wall, sum(s["successes"] for s in stats), seconds, seconds


def run_ours(args, input_dir: str, out: str) -> tuple[float, int]:
    from pipelines import config as config_lib
    from pipelines import download

    cfg = config_lib.from_dict(download.DownloadConfig, {
        "input": input_dir, "output": out, "data_root": out, "image_size": args.image_size,
        "resize_mode": "center_crop", "min_image_size": 0, "timeout": 10, "retries": 0,
        "threads_per_task": args.threads, "cpus_per_task": 1.0, "shard_size": args.shard_size,
        "allowed_networks": ["127.0.0.1/32"], "ray": {"num_cpus": args.processes},
        "mlflow": {"enabled": False}})
    start = time.perf_counter()
    report = download.run(cfg).details
    wall = time.perf_counter() - start
    version_dir = report["output"]
    stats = [json.load(open(os.path.join(version_dir, f))) for f in os.listdir(version_dir) if f.endswith("_stats.json")]
    # Our whole shard task (input read, downloader, inspection, verification, publishing), and the
    # downloader's own part of it (img2dataset's duration, the same scope as the bare run's).
    return (wall, report["succeeded"], sum(s["wurst"]["duration_s"] for s in stats),
            sum(s["duration"] for s in stats))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2, help="img2dataset processes = Ray CPUs for ours")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--distinct-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("spawn")
    port_queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(port_queue, args.distinct_images, 512, 384), daemon=True)
    server.start()
    work = tempfile.mkdtemp(prefix="wurst-bench-download-")
    try:
        port, mean_bytes = port_queue.get(timeout=120)
        input_dir = make_input(os.path.join(work, "filtered"), args.rows, port)
        from pipelines.runtime import RayConfig, init_ray

        # Ray starts its workers at nice 15 (to keep its own daemons responsive). On a machine shared
        # with other busy processes that alone halves their CPU share, which is not what this compares:
        # the bare img2dataset processes run at nice 0, so ours do too.
        os.environ.setdefault("RAY_worker_niceness", "0")
        init_ray(RayConfig(num_cpus=args.processes))
        end_to_end = {"bare": [], "ours": []}
        per_shard = {"bare": [], "ours": []}
        downloader_only = {"bare": [], "ours": []}
        for i in range(args.repeats):
            for side, fn in (("bare", run_bare), ("ours", run_ours)):
                out = os.path.join(work, f"{side}-{i}")
                wall, ok, shard_seconds, downloader_seconds = fn(args, input_dir, out)
                if ok != args.rows:
                    raise RuntimeError(f"{side}: only {ok}/{args.rows} images downloaded")
                end_to_end[side].append(ok / wall / args.processes)
                per_shard[side].append(ok / shard_seconds)
                downloader_only[side].append(ok / downloader_seconds)
                print(f"[{side} #{i}] {ok} images in {wall:.2f} s = {end_to_end[side][-1]:.1f} images/s per core "
                      f"end to end; {per_shard[side][-1]:.1f} inside shard tasks; "
                      f"{downloader_only[side][-1]:.1f} inside the downloader", flush=True)
                shutil.rmtree(out, ignore_errors=True)

        def overhead(results):
            bare, ours = max(results["bare"]), max(results["ours"])
            return {"bare_img2dataset": round(bare, 2), "ours": round(ours, 2),
                    "overhead_percent": round(100 * (bare - ours) / bare, 1),
                    "all_runs": {k: [round(v, 2) for v in vs] for k, vs in results.items()}}

        figures = {
            "rows": args.rows, "cores": args.processes, "threads": args.threads, "shard_size": args.shard_size,
            "image_size": args.image_size, "resize_mode": "center_crop", "source": "512x384 JPEG",
            "mean_source_bytes": round(mean_bytes),
            # wall time of the whole call (process / worker start-up included), images/s per core
            "end_to_end_images_per_s_per_core": overhead(end_to_end),
            # images per second of shard-task time (one shard = one core), start-up excluded
            "per_shard_images_per_s_per_core": overhead(per_shard),
            # the same, counting only img2dataset's downloader inside our tasks (guarded opener and
            # image inspection included; input read, verification and publishing excluded)
            "downloader_only_images_per_s_per_core": overhead(downloader_only),
        }
        print(json.dumps(figures, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)
        return figures
    finally:
        server.terminate()
        server.join(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
